//! What every test binary of `crates/muster/tests` shares (each includes it with `mod support;`):
//! temp dirs that end what the test left running, waiting on conditions with deadlines, a
//! `redis-server` of the test's own on a free loopback port, and an HTTP client that does not
//! turn statuses into errors. Not every binary uses every piece.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh, unique temp dir; on drop, every job supervisor under it is ended (jobs outlive their
/// agents by design) and the dir removed.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "muster-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        kill_supervisors(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh, unique temp dir that the caller owns (and removes).
pub fn temp_path(tag: &str) -> PathBuf {
    let d = TempDir::new(tag);
    let p = d.0.clone();
    std::mem::forget(d);
    p
}

/// Ends what every supervisor (of a job attempt or a process) of every agent dir under `dir` (at
/// most two levels down) runs: its session, its daemons, its cgroup.
pub fn kill_supervisors(dir: &Path) {
    let mut agents = vec![dir.join("agent")];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            agents.push(e.path().join("agent"));
            agents.push(e.path());
        }
    }
    for a in agents {
        for path in muster_agent::attempt_dirs(&a) {
            muster_agent::kill_leftovers(&path);
        }
        for path in muster_agent::procs::proc_dirs(&a) {
            muster_agent::kill_leftovers(&path);
        }
    }
}

/// Polls `cond` every 20 ms until it holds (true) or `within` passes (false).
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTP client that answers every status as a response.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// A free TCP port on loopback (bound and released: good enough for a child to bind next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of the test's own on a free loopback port (AOF, fsync always), never the
/// machine's own Redis.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: TempDir::new("redis"),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A bare git repository beside this Redis, made on first call: the HQ remote every server
    /// of a cluster on this Redis shares (cluster mode requires one).
    pub fn hq_remote(&self) -> String {
        let p = self.dir.0.join("hq-remote.git");
        if !p.exists() {
            let ok = Command::new("git")
                .args(["init", "-q", "--bare", "-b", "main"])
                .arg(&p)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "git init --bare {}", p.display());
        }
        p.display().to_string()
    }

    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
            ])
            .arg(&self.dir.0)
            .stdout(Stdio::null())
            .spawn()
            .expect(
                "redis-server is needed: scripts/test installs it (apt-get install redis-server)",
            );
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            }),
            "redis-server did not come up on port {port}"
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The store engine the engine-independent integration tests run on: `MUSTER_TEST_STORE`
/// (`sqlite`, the default, or `redis`); `scripts/test` runs them once on each.
pub fn test_store() -> &'static str {
    match std::env::var("MUSTER_TEST_STORE").as_deref() {
        Ok("redis") => "redis",
        _ => "sqlite",
    }
}

/// Runs `git ARGS` in `dir` as a user would; retries while the server holds the index lock or
/// moved HEAD under it.
pub fn git(dir: &Path, args: &[&str]) -> String {
    for _ in 0..50 {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "ann")
            .env("GIT_AUTHOR_EMAIL", "ann@example.com")
            .env("GIT_COMMITTER_NAME", "ann")
            .env("GIT_COMMITTER_EMAIL", "ann@example.com")
            .output()
            .expect("git runs");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        // The server commits to HQ too (orders.log): its index lock, or a HEAD it moved
        // between our read and our write, make a user try again; so does this.
        if err.contains("index.lock") || err.contains("cannot lock ref") {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        panic!("git {args:?} in {}: {err}", dir.display());
    }
    panic!("git {args:?}: the index stayed locked");
}
