//! The supervisor: `muster supervise DIR`, one small process per job attempt that outlives the
//! agent (SPEC §4, "at most once").
//!
//! The agent makes the attempt's directory (an atomic `mkdir`: one directory, one attempt), writes
//! `spec.json` there and starts the supervisor in a new session. The supervisor:
//! 1. takes an exclusive `flock` on `lock` for its whole life (the agent's liveness test; a second
//!    supervisor for the same directory waits here and then finds step 2 done);
//! 2. durably writes `started.json` (its session id) **before** it executes the command, and gives
//!    up at once if `started.json` or `exit.json` already exists, so a command runs at most once;
//! 3. runs the command in its own process group, writing stdout, stderr and its own system lines to
//!    `log`, each line time-stamped and typed (`out`, `err`, `sys`), capped at `log_max`;
//! 4. on SIGTERM (an abort) or at `timeout_s`, sends SIGTERM to the group and SIGKILL after the
//!    grace period;
//! 5. writes `exit.json` atomically (temp file, fsync, rename) and exits.
//!
//! If the supervisor itself is killed, the agent finds `started.json` without `exit.json` and an
//! unlocked `lock`: it kills what is left of the session and reports `supervisor lost`.

use crate::protocol::{Assignment, ExitReport};
use muster_core::{Run, Ts};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What `started.json` holds.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Started {
    /// The supervisor's session id (its pid): every process of the job belongs to it.
    pub sid: i32,
    pub at: Ts,
}

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

/// Writes `data` to `path` atomically and durably: temp file, fsync, rename, fsync of the dir.
pub fn write_durable(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_data()?;
    }
    Ok(())
}

/// Takes the attempt's lock; `block` waits for it, else `Ok(None)` when another holds it.
pub fn lock(dir: &Path, block: bool) -> std::io::Result<Option<File>> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    use std::os::fd::AsRawFd;
    let op = if block {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(Some(f));
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(None),
            _ => return Err(err),
        }
    }
}

fn now() -> Ts {
    crate::manager::now()
}

/// The log of one attempt, shared by the output pumps. Lines past `max` bytes are dropped,
/// with one note saying so.
struct Log {
    file: File,
    written: u64,
    max: u64,
    capped: bool,
}

impl Log {
    fn line(&mut self, kind: &str, text: &str) {
        if self.capped {
            return;
        }
        let line = format!("{} {kind} {text}\n", now());
        if self.written + line.len() as u64 > self.max {
            self.capped = true;
            let note = format!(
                "{} sys log capped at {} bytes; the rest is dropped\n",
                now(),
                self.max
            );
            let _ = self.file.write_all(note.as_bytes());
            return;
        }
        self.written += line.len() as u64;
        let _ = self.file.write_all(line.as_bytes());
    }
}

/// Copies one output stream into the log line by line; returns its last line.
fn pump(stream: impl Read, kind: &'static str, log: Arc<Mutex<Log>>) -> Option<String> {
    const MAX_LINE: usize = 64 * 1024;
    let mut r = BufReader::with_capacity(MAX_LINE, stream);
    let mut buf = Vec::new();
    let mut last = None;
    loop {
        buf.clear();
        // Read one line, at most MAX_LINE bytes of it at a time.
        let n = match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if n == 0 {
            return last;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .line(kind, &text);
        last = Some(text);
    }
}

/// The body of `muster supervise DIR`; returns the process exit code.
pub fn main(dir: PathBuf) -> i32 {
    match supervise(&dir) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("muster supervise {}: {e}", dir.display());
            1
        }
    }
}

fn supervise(dir: &Path) -> std::io::Result<()> {
    // SAFETY: installs an async-signal-safe handler (it only stores to an atomic). A handler, not
    // SIG_IGN, so the child gets the default disposition back at exec.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_term as *const () as libc::sighandler_t);
    }
    let _lock = lock(dir, true)?.expect("a blocking lock is always taken");
    if dir.join("started.json").exists() || dir.join("exit.json").exists() {
        return Ok(()); // Another supervisor ran this attempt: never twice.
    }
    let spec: Assignment = serde_json::from_slice(&std::fs::read(dir.join("spec.json"))?)?;
    // SAFETY: getpid has no preconditions.
    let sid = unsafe { libc::getpid() };
    write_durable(
        &dir.join("started.json"),
        &serde_json::to_vec(&Started { sid, at: now() })?,
    )?;

    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))?;
    let log = Arc::new(Mutex::new(Log {
        file: log_file,
        written: 0,
        max: spec.log_max,
        capped: false,
    }));
    // A kill asked for before `started.json` existed left a `kill` file (the agent writes it
    // before it looks for `started.json`; we write `started.json` before we look for it).
    if TERM.load(Ordering::SeqCst) || dir.join("kill").exists() {
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .line("sys", "aborted before it started");
        let report = ExitReport {
            exit_code: None,
            error: Some("aborted before start".into()),
            result: None,
            at: now(),
        };
        return write_durable(&dir.join("exit.json"), &serde_json::to_vec(&report)?);
    }

    let mut cmd = match &spec.run {
        Run::Exec(argv) => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        Run::Shell(text) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(text);
            c
        }
        Run::Noop | Run::Group => {
            let report = ExitReport {
                exit_code: Some(0),
                error: None,
                result: None,
                at: now(),
            };
            return write_durable(&dir.join("exit.json"), &serde_json::to_vec(&report)?);
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.envs(&spec.env);
    cmd.env("MUSTER_JOB_ID", spec.job.to_string());
    cmd.env("MUSTER_TREE_ID", spec.tree.to_string());
    cmd.env("MUSTER_ATTEMPT", spec.attempt.to_string());
    // SAFETY: setpgid is async-signal-safe; the child leads its own process group.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let what = match &spec.run {
        Run::Exec(argv) => format!("exec {argv:?}"),
        Run::Shell(text) => format!("shell {:?}", text),
        _ => String::new(),
    };
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .line("sys", &format!("attempt {} started: {what}", spec.attempt));
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("cannot start: {e}");
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .line("sys", &msg);
            let report = ExitReport {
                exit_code: None,
                error: Some(msg),
                result: None,
                at: now(),
            };
            return write_durable(&dir.join("exit.json"), &serde_json::to_vec(&report)?);
        }
    };
    let pgid = child.id() as i32;
    let out = child.stdout.take().map(|s| {
        let log = log.clone();
        std::thread::spawn(move || pump(s, "out", log))
    });
    let err = child.stderr.take().map(|s| {
        let log = log.clone();
        std::thread::spawn(move || pump(s, "err", log))
    });

    let deadline = spec
        .timeout_s
        .map(|s| Instant::now() + Duration::from_secs(s));
    let grace = Duration::from_millis(spec.kill_grace_ms);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let mut term_sent: Option<Instant> = None;
    let mut killed = false;
    let mut timed_out = false;
    let status = loop {
        // Wakes at once when the child ends; every 10 ms to look at SIGTERM and the clock.
        match done_rx.recv_timeout(Duration::from_millis(10)) {
            Ok(st) => break st?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => return Err(std::io::Error::other("lost the child's waiter")),
        }
        let timeout_now = deadline.is_some_and(|d| Instant::now() >= d);
        if term_sent.is_none() && (TERM.load(Ordering::SeqCst) || timeout_now) {
            timed_out = timeout_now && !TERM.load(Ordering::SeqCst);
            let why = if timed_out {
                format!("timeout after {}s: SIGTERM", spec.timeout_s.unwrap_or(0))
            } else {
                "abort: SIGTERM".into()
            };
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .line("sys", &why);
            // SAFETY: signalling our child's process group.
            unsafe { libc::killpg(pgid, libc::SIGTERM) };
            term_sent = Some(Instant::now());
        }
        if let Some(t) = term_sent {
            if !killed && t.elapsed() >= grace {
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .line("sys", "grace period over: SIGKILL");
                // SAFETY: as above.
                unsafe { libc::killpg(pgid, libc::SIGKILL) };
                killed = true;
            }
        }
    };
    // Whatever the job left behind in its group goes with it.
    // SAFETY: as above; ESRCH when the group is empty is fine.
    unsafe { libc::killpg(pgid, libc::SIGKILL) };
    let last_out = out.and_then(|h| h.join().ok()).flatten();
    if let Some(h) = err {
        let _ = h.join();
    }
    let (exit_code, error) = match (status.code(), status.signal()) {
        (Some(c), _) => (
            Some(c),
            if timed_out {
                Some("timeout".to_string())
            } else {
                None
            },
        ),
        (None, Some(sig)) => (
            None,
            Some(if timed_out {
                "timeout".to_string()
            } else {
                format!("killed by signal {sig}")
            }),
        ),
        _ => (None, Some("ended without a status".to_string())),
    };
    let line = match (exit_code, &error) {
        (Some(c), None) => format!("exited with code {c}"),
        (Some(c), Some(e)) => format!("exited with code {c} ({e})"),
        (None, Some(e)) => e.clone(),
        (None, None) => "exited".into(),
    };
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .line("sys", &line);
    let result = last_out
        .as_deref()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter(|v| v.is_object() || v.is_array());
    let report = ExitReport {
        exit_code,
        error,
        result,
        at: now(),
    };
    {
        let l = log.lock().unwrap_or_else(|e| e.into_inner());
        let _ = l.file.sync_data();
    }
    write_durable(&dir.join("exit.json"), &serde_json::to_vec(&report)?)
}
