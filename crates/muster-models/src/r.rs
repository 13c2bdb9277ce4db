//! The R runtime's environment: Debian's R (`Rscript` from `r-base-core`) with `r-cran-jsonlite`,
//! and a bundle's `requirements` as Debian packages (`r-cran-NAME`, `r-bioc-NAME`): CRAN itself
//! cannot be reached from these machines, so `install.packages` is not used. Missing packages
//! are installed with `apt-get` when the node runs as root and allows it (`MUSTER_R_APT` is not
//! `0`), else the environment step fails naming them.
//!
//! An R "environment" is a directory per hash of (R version, packages) under the node's
//! environments, holding the embedded worker script ([`WORKER_R`]) and the marker; the packages
//! themselves are the system's. The worker speaks the Python worker's frame protocol over two
//! pipes (R has no unix sockets): see `worker.R`.

use crate::env::{PythonEnv, MARKER};
use crate::{Bundle, Error, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The worker script, embedded in the binary and written into each R environment.
pub const WORKER_R: &str = include_str!("worker.R");
/// Its file name inside the environment.
pub const WORKER_R_FILE: &str = "muster_worker.R";
/// The package every R environment needs (the worker's JSON).
pub const JSONLITE: &str = "r-cran-jsonlite";

/// Whether `s` names a Debian R package (`r-cran-*`, `r-bioc-*`, `r-other-*`).
pub fn is_debian_r_package(s: &str) -> bool {
    let rest = s
        .strip_prefix("r-cran-")
        .or_else(|| s.strip_prefix("r-bioc-"))
        .or_else(|| s.strip_prefix("r-other-"));
    rest.is_some_and(|r| {
        !r.is_empty()
            && r.len() <= 100
            && r.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
    })
}

/// `Rscript` on the PATH.
pub fn rscript() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join("Rscript");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::Env(
        "Rscript is not installed on this node: install Debian's r-base-core and r-cran-jsonlite (apt-get install r-base-core r-cran-jsonlite)".into(),
    ))
}

/// The R version line (`R scripting front-end version 4.2.2 ...`).
fn version(rscript: &Path) -> Result<String> {
    let out = Command::new(rscript)
        .arg("--version")
        .output()
        .map_err(Error::io("running Rscript --version"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// Which of `pkgs` dpkg does not know as installed.
fn missing(pkgs: &[String]) -> Vec<String> {
    pkgs.iter()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).ends_with("install ok installed"))
        })
        .cloned()
        .collect()
}

fn say(progress: &mut dyn Write, line: String) {
    let _ = writeln!(progress, "{line}");
    let _ = progress.flush();
}

/// The R environment of `bundle` under `root`, made now unless it exists.
pub fn ensure(root: &Path, bundle: &Bundle, progress: &mut dyn Write) -> Result<PythonEnv> {
    let rscript = rscript()?;
    let version = version(&rscript)?;
    say(progress, format!("R: {} ({version})", rscript.display()));
    let mut pkgs: Vec<String> = bundle
        .requirements
        .iter()
        .map(|r| r.trim().to_string())
        .collect();
    if let Some(bad) = pkgs.iter().find(|p| !is_debian_r_package(p)) {
        return Err(Error::Bundle(format!(
            "requirement {bad:?} of an R bundle must be a Debian package such as r-cran-randomforest (CRAN cannot be reached from these machines)"
        )));
    }
    pkgs.push(JSONLITE.into());
    pkgs.sort();
    pkgs.dedup();
    let lacking = missing(&pkgs);
    if !lacking.is_empty() {
        // SAFETY: geteuid has no preconditions.
        let root_user = unsafe { libc::geteuid() } == 0;
        let allowed = std::env::var("MUSTER_R_APT").map_or(true, |v| v != "0");
        if !root_user || !allowed {
            return Err(Error::Env(format!(
                "this node lacks the Debian package(s) {}: install them (apt-get install {}), or let muster do it (run the agent as root without MUSTER_R_APT=0)",
                lacking.join(", "),
                lacking.join(" ")
            )));
        }
        say(progress, format!("apt-get install {}", lacking.join(" ")));
        let out = Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&lacking)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map_err(Error::io("running apt-get"))?;
        for l in String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            say(progress, format!("  {l}"));
        }
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(Error::Env(format!(
                "apt-get could not install {}: {}",
                lacking.join(" "),
                err.lines().last().unwrap_or("").trim()
            )));
        }
    }
    let mut h = Sha256::new();
    h.update(format!(
        "muster-r-env 1\n{version}\n{}\n",
        rscript.display()
    ));
    for p in &pkgs {
        h.update(format!("pkg {p}\n"));
    }
    let hex: String = h
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let key = format!("r-{hex}");
    let dir = root.join(&key);
    let reused = dir.join(MARKER).is_file();
    std::fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    install_worker(&dir)?;
    if !reused {
        let marker = serde_json::json!({"runtime": "r", "rscript": rscript, "version": version, "packages": pkgs});
        std::fs::write(dir.join(MARKER), marker.to_string())
            .map_err(Error::io("writing the environment's marker"))?;
    }
    say(
        progress,
        format!(
            "environment {key}: {}",
            if reused { "reused" } else { "made" }
        ),
    );
    Ok(PythonEnv { dir, key, reused })
}

/// Writes the worker script into the environment, unless it is there with the same text.
pub fn install_worker(env_dir: &Path) -> Result<()> {
    let path = env_dir.join(WORKER_R_FILE);
    if std::fs::read_to_string(&path).is_ok_and(|t| t == WORKER_R) {
        return Ok(());
    }
    let tmp = env_dir.join(format!(".{WORKER_R_FILE}.{}", std::process::id()));
    std::fs::write(&tmp, WORKER_R).map_err(Error::io("writing the R worker"))?;
    std::fs::rename(&tmp, &path).map_err(Error::io("writing the R worker"))
}
