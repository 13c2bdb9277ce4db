//! End-to-end tests of the client commands against a real `muster up`.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_muster");
const PASSWORD: &str = "correct horse battery staple";

/// A fresh directory, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p =
            std::env::temp_dir().join(format!("muster-cli-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `muster up` child, stopped (SIGTERM, then SIGKILL) when dropped, also on panic.
struct Server {
    child: Child,
    url: String,
    data: PathBuf,
    config: PathBuf,
    // Last, so the directory goes after the server has stopped.
    dir: TempDir,
}

impl Server {
    fn start(name: &str) -> Server {
        let dir = TempDir::new(name);
        let data = dir.0.join("data");
        let config = dir.0.join("config");
        let log = std::fs::File::create(dir.0.join("server.stderr")).unwrap();
        let mut child = Command::new(BIN)
            .args(["up", "--data-dir"])
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .env_remove("MUSTER_URL")
            .env_remove("MUSTER_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("cannot start muster up");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Keeps draining stdout for the server's whole life.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut server = Server {
            child,
            url: String::new(),
            data,
            config,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("muster is up at ") {
                        let url = rest.split_whitespace().next().unwrap();
                        server.url = url.trim_end_matches('/').to_string();
                        return server;
                    }
                }
                Err(e) => panic!(
                    "muster up did not come up ({e}); stderr:\n{}",
                    server.stderr()
                ),
            }
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("server.stderr")).unwrap_or_default()
    }

    /// Runs a client command with this test's config dir; `stdin` is written to its stdin.
    fn muster(&self, args: &[&str], stdin: Option<&str>) -> Out {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("MUSTER_CONFIG_DIR", &self.config)
            .env_remove("MUSTER_URL")
            .env_remove("MUSTER_TOKEN")
            .env_remove("MUSTER_PASSWORD")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot run muster");
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        Out(child.wait_with_output().unwrap(), args.join(" "))
    }

    /// `muster setup` with the code file, then `muster login` (password on stdin).
    fn setup_and_login(&self) {
        let code_file = self.data.join("setup-code");
        assert!(
            code_file.exists(),
            "no setup code at {}",
            code_file.display()
        );
        let code_file = code_file.to_str().unwrap().to_string();
        let out = self.muster(
            &[
                "setup",
                "--server",
                &self.url,
                "--username",
                "admin",
                "--code-file",
                &code_file,
                "--password-stdin",
            ],
            Some(&format!("{PASSWORD}\n")),
        );
        out.ok();
        let creds = self.config.join("credentials.json");
        let meta = std::fs::metadata(&creds).expect("setup saved no credentials");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let saved: Value = serde_json::from_str(&std::fs::read_to_string(&creds).unwrap()).unwrap();
        assert_eq!(saved["server"], self.url.as_str());
        assert_eq!(saved["username"], "admin");

        // A wrong password is refused with the server's message.
        let bad = self.muster(
            &[
                "login",
                "--server",
                &self.url,
                "--username",
                "admin",
                "--password-stdin",
            ],
            Some("nope-nope-nope\n"),
        );
        bad.fails_with("wrong user name or password (HTTP 401)");

        let out = self.muster(
            &[
                "login",
                "--server",
                &self.url,
                "--username",
                "admin",
                "--password-stdin",
            ],
            Some(&format!("{PASSWORD}\n")),
        );
        out.ok();
        let again: Value = serde_json::from_str(&std::fs::read_to_string(&creds).unwrap()).unwrap();
        assert_ne!(
            again["token"], saved["token"],
            "login should save a new token"
        );
    }

    fn job(&self, id: &str) -> Value {
        let out = self.muster(&["jobs", "show", id, "--json"], None).ok();
        serde_json::from_str(&out).unwrap()
    }

    /// Polls `jobs show --json` until `done` holds for the job (20 s at most).
    fn wait_job(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let j = self.job(id);
            if done(&j) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never became {what}; last: {j:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `jobs tree --json` until the tree has ended; gives its state.
    fn wait_tree(&self, id: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.muster(&["jobs", "tree", id, "--json"], None).ok();
            let t: Value = serde_json::from_str(&out).unwrap();
            let s = t["tree_state"].as_str().unwrap().to_string();
            if s != "running" {
                return s;
            }
            assert!(Instant::now() < deadline, "tree {id} never ended: {t:#}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- muster up stderr ---\n{}", self.stderr());
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A finished client command.
struct Out(Output, String);

impl Out {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    /// Asserts success; gives stdout.
    fn ok(&self) -> String {
        assert!(
            self.0.status.success(),
            "`muster {}` failed ({}):\nstdout: {}\nstderr: {}",
            self.1,
            self.0.status,
            self.stdout(),
            self.stderr()
        );
        self.stdout()
    }
    /// Asserts failure with exit code 1 and a `muster: …message…` line on stderr.
    fn fails_with(&self, message: &str) {
        assert_eq!(
            self.0.status.code(),
            Some(1),
            "`muster {}` should fail:\nstdout: {}\nstderr: {}",
            self.1,
            self.stdout(),
            self.stderr()
        );
        assert!(
            self.stderr()
                .lines()
                .any(|l| l.starts_with("muster: ") && l.contains(message)),
            "`muster {}`: stderr lacks a `muster: …{message}…` line:\n{}",
            self.1,
            self.stderr()
        );
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn setup_login_run_list_tree_abort() {
    let s = Server::start("flow");
    s.setup_and_login();

    // One job from the command line.
    let id = s
        .muster(
            &["jobs", "run", "--", "sh", "-c", "echo hello-from-job"],
            None,
        )
        .ok()
        .trim()
        .to_string();
    assert_eq!(id.len(), 36, "not an id: {id:?}");
    let j = s.wait_job(&id, "finished", |j| {
        j["state"] != "waiting" && j["state"] != "running"
    });
    assert_eq!(j["state"], "succeeded", "{j:#}");
    assert_eq!(j["exit_code"], 0);
    let log = s.muster(&["jobs", "logs", &id], None).ok();
    assert!(log.contains("out hello-from-job"), "{log}");
    let show = s.muster(&["jobs", "show", &id], None).ok();
    assert!(show.contains("succeeded") && show.contains(&id), "{show}");

    let ls: Value = serde_json::from_str(&s.muster(&["jobs", "ls", "--json"], None).ok()).unwrap();
    assert!(
        ls["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == id.as_str()),
        "{ls:#}"
    );
    let table = s.muster(&["jobs", "ls"], None).ok();
    assert!(table.starts_with("ID ") && table.contains(&id), "{table}");

    // A two-level tree from TOML.
    let toml = write(
        &s.dir.0,
        "tree.toml",
        r#"
name = "build all"
key = "root"
[tags]
application = "demo"
[[children]]
name = "compile it"
key = "compile"
shell = "echo compiled"
[[children]]
name = "test it"
key = "test"
exec = ["sh", "-c", "echo tested"]
needs = ["compile"]
"#,
    );
    let tree = s
        .muster(&["jobs", "run", "--file", &toml, "--version", "1.2"], None)
        .ok()
        .trim()
        .to_string();
    assert_eq!(s.wait_tree(&tree), "succeeded");
    let drawn = s.muster(&["jobs", "tree", &tree], None).ok();
    assert!(drawn.contains("root [succeeded] build all"), "{drawn}");
    assert!(
        drawn.contains("├─ compile [succeeded] compile it"),
        "{drawn}"
    );
    assert!(drawn.contains("└─ test [succeeded] test it"), "{drawn}");
    let filtered: Value = serde_json::from_str(
        &s.muster(&["jobs", "ls", "--application", "demo", "--json"], None)
            .ok(),
    )
    .unwrap();
    let items = filtered["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{filtered:#}");
    assert_eq!(items[0]["tags"]["version"], "1.2");

    // A long job, aborted once it runs; a second abort is refused.
    let long = s
        .muster(&["jobs", "run", "--", "sleep", "30"], None)
        .ok()
        .trim()
        .to_string();
    s.wait_job(&long, "running", |j| j["state"] == "running");
    let out = s.muster(&["jobs", "abort", &long], None).ok();
    assert!(out.contains("aborting"), "{out}");
    assert_eq!(s.wait_tree(&long), "aborted");
    s.muster(&["jobs", "abort", &long], None)
        .fails_with("cannot abort: the tree has already aborted (HTTP 409)");

    // Bad input: the server's message comes through.
    let bad = write(
        &s.dir.0,
        "bad.json",
        r#"{"name": "x", "exec": ["true"], "bogus": 1}"#,
    );
    let out = s.muster(&["jobs", "run", "--file", &bad], None);
    out.fails_with("unknown field `bogus`");
    assert!(out.stderr().contains("(HTTP 400)"), "{}", out.stderr());
    s.muster(&["jobs", "show", "not-an-id"], None)
        .fails_with("(HTTP 400)");
}

#[test]
fn follow_logs_and_exit_codes() {
    let s = Server::start("follow");
    s.setup_and_login();

    let script = "for i in 1 2 3 4 5; do echo tick-$i; sleep 0.2; done";
    let id = s
        .muster(&["jobs", "run", "--shell", "--", script], None)
        .ok()
        .trim()
        .to_string();
    let t0 = Instant::now();
    let log = s.muster(&["jobs", "logs", "-f", &id], None).ok();
    for i in 1..=5 {
        assert!(
            log.contains(&format!("out tick-{i}\n")),
            "tick-{i} missing:\n{log}"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(15));
    // `logs -f` returns once the job has ended.
    let j = s.job(&id);
    assert_eq!(j["state"], "succeeded", "{j:#}");

    // `run -f`: the log, then the exit code of the tree.
    let out = s.muster(
        &["jobs", "run", "-f", "--", "sh", "-c", "echo ran-ok"],
        None,
    );
    assert!(out.ok().contains("out ran-ok"));
    let out = s.muster(
        &[
            "jobs",
            "run",
            "-f",
            "--",
            "sh",
            "-c",
            "echo ran-bad; exit 3",
        ],
        None,
    );
    assert!(out.stdout().contains("out ran-bad"), "{}", out.stdout());
    out.fails_with("ended failed");
}

#[test]
fn client_errors_are_clear() {
    let dir = TempDir::new("errors");
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("MUSTER_CONFIG_DIR", &dir.0)
            .env_remove("MUSTER_URL")
            .env_remove("MUSTER_TOKEN")
            .env_remove("MUSTER_PASSWORD");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Out(cmd.stdin(Stdio::null()).output().unwrap(), args.join(" "))
    };
    // Nothing listens on port 1.
    let out = run(
        &["jobs", "ls", "--server", "http://127.0.0.1:1"],
        &[("MUSTER_TOKEN", "x")],
    );
    out.fails_with("cannot reach the muster server at http://127.0.0.1:1");
    assert!(out.stderr().contains("muster up"), "{}", out.stderr());
    run(&["jobs", "ls"], &[]).fails_with("not logged in");
    run(&["login", "--username", "admin"], &[]).fails_with("--password-stdin");
}
