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
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// The log of one attempt. Lines past `max` bytes are dropped, with one note saying so. Not
/// fsynced: the log is evidence, `exit.json` is the record.
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

/// Splits one output stream into lines (at most 64 KiB each) and keeps the last one.
struct Lines {
    kind: &'static str,
    buf: Vec<u8>,
    last: Option<String>,
    open: bool,
}

impl Lines {
    const MAX_LINE: usize = 64 * 1024;

    fn new(kind: &'static str) -> Lines {
        Lines {
            kind,
            buf: Vec::new(),
            last: None,
            open: true,
        }
    }

    fn feed(&mut self, data: &[u8], log: &mut Log) {
        self.buf.extend_from_slice(data);
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let rest = self.buf.split_off(pos + 1);
            let mut line = std::mem::replace(&mut self.buf, rest);
            line.pop();
            self.emit(&line, log);
        }
        while self.buf.len() >= Self::MAX_LINE {
            let rest = self.buf.split_off(Self::MAX_LINE);
            let line = std::mem::replace(&mut self.buf, rest);
            self.emit(&line, log);
        }
    }

    fn finish(&mut self, log: &mut Log) {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.emit(&line, log);
        }
        self.open = false;
    }

    fn emit(&mut self, line: &[u8], log: &mut Log) {
        let text = String::from_utf8_lossy(line).into_owned();
        log.line(self.kind, &text);
        self.last = Some(text);
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

fn exit_now(dir: &Path, exit_code: Option<i32>, error: Option<String>) -> std::io::Result<()> {
    let report = ExitReport {
        exit_code,
        error,
        result: None,
        at: now(),
    };
    write_durable(&dir.join("exit.json"), &serde_json::to_vec(&report)?)
}

fn supervise(dir: &Path) -> std::io::Result<()> {
    // A session of our own: we outlive the agent, and every process of the job shares our session
    // id, which is how a dead supervisor's leftovers are found. (Fails only if we already lead
    // a process group, which a plain spawn never makes us.)
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    // SAFETY: installs an async-signal-safe handler (it only stores to an atomic). A handler, not
    // SIG_IGN, so the child gets the default disposition back at exec.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_term as *const () as libc::sighandler_t);
    }
    if !dir.exists() && super::done_dir(dir).exists() {
        // Started late (by a launcher that was given up) for an attempt that another
        // supervisor ran and the server has acknowledged since: nothing to do.
        return Ok(());
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
    let mut log = Log {
        file: log_file,
        written: 0,
        max: spec.log_max,
        capped: false,
    };
    // A kill asked for before `started.json` existed left a `kill` file (the agent writes it
    // before it looks for `started.json`; we write `started.json` before we look for it).
    if TERM.load(Ordering::SeqCst) || dir.join("kill").exists() {
        log.line("sys", "aborted before it started");
        return exit_now(dir, None, Some("aborted before start".into()));
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
        Run::Noop | Run::Group => return exit_now(dir, Some(0), None),
    };
    if let Some(name) = &spec.run_as {
        let user = match user(name) {
            Ok(u) => u,
            Err(e) => {
                log.line("sys", &e);
                return exit_now(dir, None, Some(e));
            }
        };
        // std drops the supplementary groups too when root changes the uid.
        cmd.uid(user.uid).gid(user.gid);
        let home = Path::new(&user.home);
        cmd.current_dir(if home.is_dir() { home } else { Path::new("/") });
        cmd.env("HOME", &user.home)
            .env("USER", name)
            .env("LOGNAME", name);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.envs(&spec.env);
    cmd.env("MUSTER_JOB_ID", spec.job.to_string());
    cmd.env("MUSTER_TREE_ID", spec.tree.to_string());
    cmd.env("MUSTER_ATTEMPT", spec.attempt.to_string());
    // The job leads its own process group (posix_spawn sets it; no fork of this process).
    cmd.process_group(0);
    let what = match &spec.run {
        Run::Exec(argv) => format!("exec {argv:?}"),
        Run::Shell(text) => format!("shell {text:?}"),
        _ => String::new(),
    };
    log.line("sys", &format!("attempt {} started: {what}", spec.attempt));
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("cannot start: {e}");
            log.line("sys", &msg);
            return exit_now(dir, None, Some(msg));
        }
    };
    let pgid = child.id() as i32;
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    use std::os::fd::AsRawFd;
    let (out_fd, err_fd) = (out_pipe.as_raw_fd(), err_pipe.as_raw_fd());
    // A pidfd becomes readable when the child ends: one poll() waits for output, the end and
    // (every 10 ms) SIGTERM and the clock, in this one thread.
    // SAFETY: pidfd_open on our own child's pid.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pgid, 0) } as i32;
    let mut out = Lines::new("out");
    let mut err = Lines::new("err");
    let deadline = spec
        .timeout_s
        .and_then(|s| Instant::now().checked_add(Duration::from_secs(s)));
    let grace = Duration::from_millis(spec.kill_grace_ms);
    let mut term_sent: Option<Instant> = None;
    let mut killed = false;
    let mut timed_out = false;
    let mut status = None;
    let mut drain_until: Option<Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if status.is_none() {
            if let Some(st) = child.try_wait()? {
                status = Some(st);
                // Whatever the job left behind in its group goes with it, so the pipes close.
                // SAFETY: signalling our child's process group; ESRCH when empty is fine.
                unsafe { libc::killpg(pgid, libc::SIGKILL) };
                drain_until = Some(Instant::now() + Duration::from_secs(2));
            }
        }
        if status.is_some()
            && (!out.open && !err.open || drain_until.is_some_and(|d| Instant::now() >= d))
        {
            break;
        }
        let mut fds = [
            libc::pollfd {
                fd: if out.open { out_fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if err.open { err_fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if status.is_none() { pidfd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polling three descriptors we own (or -1, which poll ignores).
        unsafe { libc::poll(fds.as_mut_ptr(), 3, 10) };
        for (i, lines) in [(0, &mut out), (1, &mut err)] {
            if fds[i].revents == 0 || !lines.open {
                continue;
            }
            let pipe: &mut dyn Read = if i == 0 { &mut out_pipe } else { &mut err_pipe };
            match pipe.read(&mut buf) {
                Ok(0) => lines.finish(&mut log),
                Ok(n) => lines.feed(&buf[..n], &mut log),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => lines.finish(&mut log),
            }
        }
        if status.is_some() {
            continue;
        }
        let timeout_now = deadline.is_some_and(|d| Instant::now() >= d);
        if term_sent.is_none() && (TERM.load(Ordering::SeqCst) || timeout_now) {
            timed_out = timeout_now && !TERM.load(Ordering::SeqCst);
            let why = if timed_out {
                format!("timeout after {}s: SIGTERM", spec.timeout_s.unwrap_or(0))
            } else {
                "abort: SIGTERM".into()
            };
            log.line("sys", &why);
            // SAFETY: signalling our child's process group.
            unsafe { libc::killpg(pgid, libc::SIGTERM) };
            term_sent = Some(Instant::now());
        }
        if let Some(t) = term_sent {
            if !killed && t.elapsed() >= grace {
                log.line("sys", "grace period over: SIGKILL");
                // SAFETY: as above.
                unsafe { libc::killpg(pgid, libc::SIGKILL) };
                killed = true;
            }
        }
    }
    out.finish(&mut log);
    err.finish(&mut log);
    if pidfd >= 0 {
        // SAFETY: closing the pidfd we opened.
        unsafe { libc::close(pidfd) };
    }
    let status = status.expect("the loop ends after the child");
    let (exit_code, error) = match (status.code(), status.signal()) {
        (Some(c), _) => (Some(c), timed_out.then(|| "timeout".to_string())),
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
    log.line("sys", &line);
    let result = out
        .last
        .as_deref()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter(|v| v.is_object() || v.is_array());
    let report = ExitReport {
        exit_code,
        error,
        result,
        at: now(),
    };
    write_durable(&dir.join("exit.json"), &serde_json::to_vec(&report)?)
}

/// A user jobs may run as (`agent.run_as`).
#[derive(Debug)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Looks up `name` in the user database; an error says why it cannot run jobs.
pub fn user(name: &str) -> Result<User, String> {
    let c_name = std::ffi::CString::new(name)
        .map_err(|_| format!("agent.run_as = {name:?} is not a user name"))?;
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r with a zeroed passwd, a buffer we own and its true length.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!(
            "agent.run_as: there is no user {name:?} on this node (make one, e.g. useradd --system {name})"
        ));
    }
    if pw.pw_uid == 0 {
        return Err(format!(
            "agent.run_as: {name:?} is root; name an unprivileged user"
        ));
    }
    // SAFETY: pw_dir points into `buf`, a NUL-terminated string set by getpwnam_r.
    let home = unsafe { std::ffi::CStr::from_ptr(pw.pw_dir) }
        .to_string_lossy()
        .into_owned();
    Ok(User {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
        home,
    })
}

/// Checks at agent start that jobs can run as `name`: the user exists, is not root, and the
/// agent runs as root (only root may change to another user).
pub fn check_run_as(name: &str) -> Result<(), String> {
    user(name)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(format!(
            "agent.run_as = {name:?} needs the agent to run as root (it changes to that user for each job)"
        ));
    }
    Ok(())
}
