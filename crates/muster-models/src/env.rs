//! Python environments: one venv per distinct (requirements, interpreter), content-addressed.
//!
//! [`Envs::ensure`] names an environment by the hash of its requirements and the interpreter
//! ([`EnvSpec::key`]) and returns the one already built under that name, or builds it: under a
//! lock on the name (two builds of one environment wait for each other instead of clashing), in
//! a temporary directory that is renamed into place once complete, so a half-built environment
//! is never seen. The venv comes from the node's `python3 -m venv` (without a pip of its own when
//! the interpreter has ensurepip's wheel to run pip from); pip installs the requirements
//! from the **wheel cache** only (`pip install --no-index --find-links CACHE`), after a
//! `pip wheel` into the cache when that set of requirements is not known to be complete there.
//! So a second environment with the same requirements (another directory, a rebuilt node) costs
//! no network and a few seconds. Every step and pip's own lines go to a progress writer (the
//! deploy's job log). This is blocking code: async callers run it on a blocking thread.

use crate::bundle::{Bundle, Compat, PythonConstraint};
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The marker written into a complete environment (the last file before the rename).
pub const MARKER: &str = ".muster-env.json";

/// The packages the `yhat` client's bundles import, installed without their pinned, dated
/// dependencies (PROTOCOL.md §0, "modern deps": tested on Python 3.11 and 3.13)…
pub const YHAT_NO_DEPS: &[&str] = &["yhat==1.10.0", "terragon==0.3.1"];
/// …and what `import yhat` needs instead.
pub const YHAT_DEPS: &[&str] = &["requests", "requests-toolbelt", "progressbar2", "six"];

/// A node's Python interpreter, as it describes itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interpreter {
    /// The real executable (`sys.executable`), not a shim.
    pub executable: PathBuf,
    /// `sys.version_info[:3]`.
    pub version: [u32; 3],
    /// `sys.implementation.name`, e.g. `cpython`.
    pub implementation: String,
    /// The pip wheel that comes with the interpreter (ensurepip's), when there is one: pip runs
    /// from it instead of being installed into every venv (3 to 4 times faster to make one).
    pub pip_wheel: Option<PathBuf>,
}

impl Interpreter {
    /// Asks `command` (e.g. `python3`) who it is; an error if it is missing or has no `venv`.
    pub fn probe(command: &Path) -> Result<Interpreter> {
        // The pip wheel ensurepip would install: in the standard library, or where Debian keeps
        // it (python3-pip-whl).
        let script = "import glob, json, os, sys, sysconfig\n\
            wheel = None\n\
            try:\n    import ensurepip, venv\n    ok = True\n\
            \x20   dirs = [os.path.join(os.path.dirname(ensurepip.__file__), '_bundled'),\n\
            \x20           sysconfig.get_config_var('WHEEL_PKG_DIR') or '', '/usr/share/python-wheels']\n\
            \x20   found = [w for d in dirs if d for w in sorted(glob.glob(os.path.join(d, 'pip-*.whl')))]\n\
            \x20   wheel = found[0] if found else None\n\
            except ImportError:\n    ok = False\n\
            print(json.dumps({'exe': sys.executable, 'v': list(sys.version_info[:3]),\n\
            'impl': sys.implementation.name, 'venv': ok, 'pip': wheel}))\n";
        let out = Command::new(command)
            .args(["-I", "-c", script])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                Error::Env(format!(
                    "the node's Python ({}) cannot be run: {e}",
                    command.display()
                ))
            })?;
        if !out.status.success() {
            return Err(Error::Env(format!(
                "the node's Python ({}) failed: {}",
                command.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| Error::Env(format!("the node's Python answered oddly: {e}")))?;
        if v["venv"] != true {
            return Err(Error::Env(format!(
                "the node's Python ({}) has no venv module: install python3-venv",
                command.display()
            )));
        }
        let n = |i: usize| v["v"][i].as_u64().unwrap_or(0) as u32;
        Ok(Interpreter {
            executable: PathBuf::from(v["exe"].as_str().unwrap_or_default()),
            version: [n(0), n(1), n(2)],
            implementation: v["impl"].as_str().unwrap_or_default().to_string(),
            pip_wheel: v["pip"].as_str().map(PathBuf::from),
        })
    }

    /// `3.11.7`.
    pub fn version_text(&self) -> String {
        let [a, b, c] = self.version;
        format!("{a}.{b}.{c}")
    }

    /// Checks a bundle's `python` constraint against this interpreter.
    pub fn check(&self, constraint: &PythonConstraint) -> Result<()> {
        if constraint.matches(self.version) {
            return Ok(());
        }
        Err(Error::Env(format!(
            "the model needs Python {}, and this node's is {}",
            constraint.as_str(),
            self.version_text()
        )))
    }
}

/// What goes into an environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvSpec {
    /// pip requirement strings, installed with their dependencies.
    pub requirements: Vec<String>,
    /// pip requirement strings installed without their dependencies.
    pub no_deps: Vec<String>,
}

impl EnvSpec {
    /// The environment a bundle's model runs in.
    pub fn for_bundle(b: &Bundle) -> EnvSpec {
        let mut spec = EnvSpec {
            requirements: b.requirements.clone(),
            no_deps: Vec::new(),
        };
        if b.compat == Some(Compat::Yhat) {
            spec.no_deps = YHAT_NO_DEPS.iter().map(|s| s.to_string()).collect();
            spec.requirements
                .extend(YHAT_DEPS.iter().map(|s| s.to_string()));
        }
        spec
    }

    /// The environment's name: a hash of the requirements (order and repeats aside) and of the
    /// interpreter.
    pub fn key(&self, python: &Interpreter) -> String {
        fn sorted(v: &[String]) -> Vec<&str> {
            let mut v: Vec<&str> = v.iter().map(|s| s.trim()).collect();
            v.sort_unstable();
            v.dedup();
            v
        }
        let mut h = Sha256::new();
        h.update(b"muster-env 1\n");
        h.update(format!(
            "{} {} {}\n",
            python.implementation,
            python.version_text(),
            python.executable.display()
        ));
        for r in sorted(&self.requirements) {
            h.update(format!("req {r}\n"));
        }
        for r in sorted(&self.no_deps) {
            h.update(format!("nodeps {r}\n"));
        }
        let digest = h.finalize();
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A built environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PythonEnv {
    /// The venv's directory, named by its key.
    pub dir: PathBuf,
    pub key: String,
    /// True when it was there already.
    pub reused: bool,
}

impl PythonEnv {
    /// The venv's interpreter.
    pub fn python(&self) -> PathBuf {
        self.dir.join("bin/python")
    }
}

/// Where a node keeps its environments and its wheel cache.
#[derive(Clone, Debug)]
pub struct Envs {
    /// Environments, one directory per key.
    pub root: PathBuf,
    /// Wheels (and pip's HTTP cache under `http/`), shared by every environment.
    pub wheels: PathBuf,
    /// More environment for pip, e.g. `PIP_INDEX_URL` for a node behind a mirror.
    pub pip_env: Vec<(String, String)>,
}

impl Envs {
    pub fn new(root: impl Into<PathBuf>, wheels: impl Into<PathBuf>) -> Envs {
        Envs {
            root: root.into(),
            wheels: wheels.into(),
            pip_env: Vec::new(),
        }
    }

    /// A bundle's environment: its `python` constraint checked against the interpreter, then
    /// [`Envs::ensure`] of [`EnvSpec::for_bundle`].
    pub fn ensure_bundle(
        &self,
        bundle: &Bundle,
        python: &Interpreter,
        progress: &mut dyn Write,
    ) -> Result<PythonEnv> {
        if let Some(c) = &bundle.python {
            python.check(c)?;
        }
        self.ensure(&EnvSpec::for_bundle(bundle), python, progress)
    }

    /// The environment `spec` on `python`, built now unless it exists. Progress lines go to
    /// `progress`.
    pub fn ensure(
        &self,
        spec: &EnvSpec,
        python: &Interpreter,
        progress: &mut dyn Write,
    ) -> Result<PythonEnv> {
        let key = spec.key(python);
        let dir = self.root.join(&key);
        let env = |reused| PythonEnv {
            dir: dir.clone(),
            key: key.clone(),
            reused,
        };
        if dir.join(MARKER).is_file() {
            say(progress, format!("environment {key}: reused"));
            return Ok(env(true));
        }
        let locks = self.root.join(".locks");
        fs::create_dir_all(&locks).map_err(Error::io(format!("creating {}", locks.display())))?;
        fs::create_dir_all(self.wheels.join(".complete"))
            .map_err(Error::io(format!("creating {}", self.wheels.display())))?;
        let lock = lock_file(&locks.join(format!("{key}.lock")))?;
        if !try_lock(&lock) {
            say(
                progress,
                format!("environment {key}: another build of it is running; waiting"),
            );
            lock.lock().map_err(Error::io("locking the environment"))?;
        }
        if dir.join(MARKER).is_file() {
            say(
                progress,
                format!("environment {key}: reused (built meanwhile)"),
            );
            return Ok(env(true));
        }
        let build = self.root.join(format!(".build-{key}"));
        if build.exists() {
            fs::remove_dir_all(&build).map_err(Error::io("removing an unfinished build"))?;
        }
        let started = std::time::Instant::now();
        let res = self.build(spec, python, &key, &build, &dir, progress);
        if res.is_err() {
            let _ = fs::remove_dir_all(&build);
        }
        res?;
        say(
            progress,
            format!(
                "environment {key}: ready in {:.1} s",
                started.elapsed().as_secs_f64()
            ),
        );
        Ok(env(false))
    }

    fn build(
        &self,
        spec: &EnvSpec,
        python: &Interpreter,
        key: &str,
        build: &Path,
        dir: &Path,
        progress: &mut dyn Write,
    ) -> Result<()> {
        say(
            progress,
            format!(
                "environment {key}: creating a venv with Python {} ({} requirements)",
                python.version_text(),
                spec.requirements.len() + spec.no_deps.len()
            ),
        );
        let mut venv = Command::new(&python.executable);
        // The prompt would be the build directory's name.
        venv.arg("-m").arg("venv").arg("--prompt").arg(key);
        if python.pip_wheel.is_some() {
            venv.arg("--without-pip");
        }
        venv.arg(build);
        run(venv, "python3 -m venv", progress)?;
        let pip = Pip {
            python: build.join("bin/python"),
            wheel: python.pip_wheel.clone(),
        };
        let reqs = build.join("muster-requirements.txt");
        fs::write(&reqs, spec.requirements.join("\n") + "\n")
            .map_err(Error::io("writing the requirements"))?;
        let py = &pip;
        let complete = self.wheels.join(".complete").join(key);
        let any = !spec.requirements.is_empty() || !spec.no_deps.is_empty();
        if any && !(complete.is_file() && self.install(spec, py, &reqs, progress).is_ok()) {
            say(
                progress,
                format!("environment {key}: fetching wheels into the cache"),
            );
            {
                // One `pip wheel` at a time writes to the cache.
                let l = lock_file(&self.wheels.join(".lock"))?;
                l.lock().map_err(Error::io("locking the wheel cache"))?;
                if !spec.requirements.is_empty() {
                    let mut c = self.pip(py, "wheel");
                    c.arg("--wheel-dir").arg(&self.wheels).arg("-r").arg(&reqs);
                    run(c, "pip wheel", progress)?;
                }
                if !spec.no_deps.is_empty() {
                    let mut c = self.pip(py, "wheel");
                    c.arg("--no-deps").arg("--wheel-dir").arg(&self.wheels);
                    c.args(&spec.no_deps);
                    run(c, "pip wheel", progress)?;
                }
            }
            self.install(spec, py, &reqs, progress)?;
            fs::write(&complete, b"").map_err(Error::io("marking the wheel set complete"))?;
        }
        let marker = serde_json::json!({
            "key": key,
            "python": python.version_text(),
            "executable": python.executable,
            "requirements": spec.requirements,
            "no_deps": spec.no_deps,
        });
        fs::write(build.join(MARKER), marker.to_string() + "\n")
            .map_err(Error::io("writing the environment's marker"))?;
        relocate(build, dir)?;
        fs::rename(build, dir).map_err(Error::io(format!("renaming into {}", dir.display())))?;
        Ok(())
    }

    /// Installs from the wheel cache alone.
    fn install(
        &self,
        spec: &EnvSpec,
        py: &Pip,
        reqs: &Path,
        progress: &mut dyn Write,
    ) -> Result<()> {
        say(
            progress,
            "installing from the wheel cache (no network)".to_string(),
        );
        if !spec.requirements.is_empty() {
            let mut c = self.pip(py, "install");
            c.arg("--no-index").arg("-r").arg(reqs);
            run(c, "pip install", progress)?;
        }
        if !spec.no_deps.is_empty() {
            let mut c = self.pip(py, "install");
            c.arg("--no-index").arg("--no-deps").args(&spec.no_deps);
            run(c, "pip install", progress)?;
        }
        Ok(())
    }

    /// `pip VERB` for the venv, reading the wheel cache, quiet about its own version.
    fn pip(&self, py: &Pip, verb: &str) -> Command {
        let mut c = Command::new(&py.python);
        c.arg("-I");
        match &py.wheel {
            // A wheel is a zip that Python can run pip from.
            Some(w) => c.arg(w.join("pip")),
            None => c.args(["-m", "pip"]),
        };
        c.args([verb, "--progress-bar", "off", "--find-links"])
            .arg(&self.wheels)
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            .env("PIP_NO_INPUT", "1")
            .env("PIP_CACHE_DIR", self.wheels.join("http"))
            .envs(self.pip_env.iter().map(|(k, v)| (k, v)));
        c
    }
}

/// How pip runs for a venv: the venv's python, with pip from the interpreter's wheel or its own.
struct Pip {
    python: PathBuf,
    wheel: Option<PathBuf>,
}

fn lock_file(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(Error::io(format!("opening {}", path.display())))
}

fn try_lock(f: &fs::File) -> bool {
    f.try_lock().is_ok()
}

fn say(progress: &mut dyn Write, line: String) {
    let _ = writeln!(progress, "{line}");
}

/// Runs a command, its stdout and stderr lines going to `progress`; an error with its last lines
/// when it fails.
fn run(mut cmd: Command, what: &str, progress: &mut dyn Write) -> Result<()> {
    let (reader, writer) = std::io::pipe().map_err(Error::io("making a pipe"))?;
    let writer2 = writer.try_clone().map_err(Error::io("making a pipe"))?;
    cmd.stdin(Stdio::null()).stdout(writer).stderr(writer2);
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Env(format!("{what} cannot be started: {e}")))?;
    // The parent's copies of the write end go with `cmd`, so the reader sees the end.
    drop(cmd);
    let mut tail: std::collections::VecDeque<String> = Default::default();
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        say(progress, format!("  {line}"));
        if tail.len() == 5 {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child
        .wait()
        .map_err(Error::io(format!("waiting for {what}")))?;
    if !status.success() {
        let last: Vec<String> = tail.into_iter().collect();
        let mut msg = format!("{what} failed ({status}): {}", last.join(" / "));
        if msg.len() > 600 {
            let mut cut = 600;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
            msg.push('…');
        }
        return Err(Error::Env(msg));
    }
    Ok(())
}

/// Rewrites the build directory's own path to its final one where a venv records it (scripts'
/// `#!` lines, `activate`, `pyvenv.cfg`), so the renamed venv is whole.
fn relocate(build: &Path, dir: &Path) -> Result<()> {
    let from = build.to_string_lossy().into_owned();
    let to = dir.to_string_lossy().into_owned();
    let mut files = vec![build.join("pyvenv.cfg")];
    if let Ok(rd) = fs::read_dir(build.join("bin")) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                files.push(e.path());
            }
        }
    }
    for f in files {
        let Ok(bytes) = fs::read(&f) else { continue };
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        if text.contains(&from) {
            fs::write(&f, text.replace(&from, &to))
                .map_err(Error::io(format!("rewriting {}", f.display())))?;
        }
    }
    Ok(())
}
