//! The supervisor: `muster supervise DIR`, one small process per job attempt that outlives the
//! agent (SPEC §4, "at most once").
//!
//! The agent makes the attempt's directory (an atomic `mkdir`: one directory, one attempt), writes
//! `spec.json` there (without the job's secret environment, which it hands over directly: see
//! [`Secrets`]) and starts the supervisor in a new session. The supervisor:
//! 1. takes an exclusive `flock` on `lock` for its whole life (the agent's liveness test; a second
//!    supervisor for the same directory waits here and then finds step 2 done);
//! 2. becomes the child subreaper of what it starts and makes the attempt's cgroup where the
//!    agent found a writable cgroup v2 ([`crate::reap`], [`crate::cgroup`]);
//! 3. durably writes `started.json` (its session id, the cgroup) **before** it executes the
//!    command, and gives up at once if `started.json` or `exit.json` already exists, so a
//!    command runs at most once;
//! 4. runs the command in its own process group (and cgroup), writing stdout, stderr and its own
//!    system lines to `log`, each line time-stamped and typed (`out`, `err`, `sys`), capped at
//!    `log_max`; it reaps every process that ends below it, orphans included;
//! 5. on SIGTERM (an abort) or at `timeout_s`, sends SIGTERM to every process the command
//!    started — its group, daemons that left it, the cgroup — and SIGKILL after the grace
//!    period; when the command's main process ends, whatever it left running gets the same;
//! 6. writes `exit.json` (the main process's status) atomically (temp file, fsync, rename) once
//!    none of its processes is left, retrying while the disk is full — the status stays in
//!    memory meanwhile and the lock stays held, so the agent waits rather than call the attempt
//!    lost — and exits.
//!
//! If the supervisor itself is killed, the agent finds `started.json` without `exit.json` and an
//! unlocked `lock`: it kills what is left of the session and of the cgroup and reports
//! `supervisor lost`.

use crate::cgroup::{Cgroup, MoveFds, Mover};
use crate::reap::{Ending, Reaper, Step};
use muster_core::names::quote;
use muster_core::{Run, Ts};
use muster_wire::perms;
use muster_wire::protocol::{Assignment, ExitReport, SECRET_ENV};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What `started.json` holds.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Started {
    /// The supervisor's session id (its pid): the job's own processes share it (daemons that
    /// left it are in the cgroup, if there is one).
    pub sid: i32,
    pub at: Ts,
    /// The attempt's cgroup, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// The cgroup v1 groups of a process's limits (see [`crate::cgroup::V1Limits`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub v1: Vec<PathBuf>,
}

/// The job's secret environment ([`SECRET_ENV`]: its `MUSTER_TOKEN`), which never goes into
/// `spec.json`: the agent hands it to the launcher over its pipe, or to a supervisor it starts
/// directly in that supervisor's environment under [`SECRET_PREFIX`].
pub type Secrets = Vec<(String, String)>;

/// The prefix of the supervisor's environment variables that carry [`Secrets`]
/// (`MUSTER_SUPERVISE_SECRET_MUSTER_TOKEN=...`); they are not passed on to the job as such.
pub const SECRET_PREFIX: &str = "MUSTER_SUPERVISE_SECRET_";

/// The [`Secrets`] a directly started supervisor was given in its environment.
pub fn secrets_from_env() -> Secrets {
    std::env::vars()
        .filter_map(|(k, v)| Some((k.strip_prefix(SECRET_PREFIX)?.to_string(), v)))
        .collect()
}

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

/// Writes `data` to `path` atomically and durably (mode 0600): temp file, fsync, rename, fsync
/// of the dir.
pub fn write_durable(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = perms::create(&tmp)?;
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
    let f = perms::options()
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
    muster_wire::util::now()
}

/// The log of one attempt. Lines past `max` bytes are dropped, with one note saying so. Not
/// fsynced: the log is evidence, `exit.json` is the record. What cannot be written yet (a full
/// disk) waits in memory — within `max` — and goes out with the next line or [`Log::flush`].
pub(crate) struct Log {
    file: File,
    written: u64,
    max: u64,
    capped: bool,
    unwritten: Vec<u8>,
    /// For a long-running process: instead of capping, the log is rotated at `max` (`log` →
    /// `log.1` → ... → `log.N`, the oldest dropped) and this many rotated files are kept.
    rotate: Option<(PathBuf, u32)>,
    /// Secret values written as `***` (a process's secret env).
    mask: Vec<String>,
}

impl Log {
    /// A log that rotates at `max` bytes, keeping `keep` old files (`log.1` the newest).
    pub(crate) fn rotating(path: &Path, max: u64, keep: u32) -> std::io::Result<Log> {
        let file = perms::options().create(true).append(true).open(path)?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Log {
            file,
            written,
            max: max.max(4096),
            capped: false,
            unwritten: Vec::new(),
            rotate: Some((path.to_path_buf(), keep)),
            mask: Vec::new(),
        })
    }

    /// Writes each of `values` (the non-empty ones) as `***` from now on.
    pub(crate) fn masking(mut self, values: impl IntoIterator<Item = String>) -> Log {
        self.mask = values.into_iter().filter(|v| !v.is_empty()).collect();
        // The longest first, so that a value holding another is masked whole.
        self.mask.sort_by_key(|v| std::cmp::Reverse(v.len()));
        self
    }

    fn rotate_now(&mut self) {
        self.flush();
        let Some((path, keep)) = self.rotate.clone() else {
            return;
        };
        let path = &path;
        let keep = &keep;
        let name = |n: u32| {
            let mut p = path.as_os_str().to_owned();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if *keep == 0 {
            let _ = std::fs::remove_file(path);
        } else {
            for n in (1..*keep).rev() {
                let _ = std::fs::rename(name(n), name(n + 1));
            }
            let _ = std::fs::rename(path, name(1));
        }
        if let Ok(f) = perms::options().create(true).append(true).open(path) {
            self.file = f;
            self.written = 0;
        }
    }

    pub(crate) fn line(&mut self, kind: &str, text: &str) {
        if self.capped {
            return;
        }
        let mut masked;
        let mut text = text;
        if self.mask.iter().any(|m| text.contains(m.as_str())) {
            masked = text.to_string();
            for m in &self.mask {
                masked = masked.replace(m.as_str(), "***");
            }
            text = &masked;
        }
        let line = format!("{} {kind} {text}\n", now());
        if self.rotate.is_some() && self.written + line.len() as u64 > self.max {
            self.rotate_now();
        }
        if self.written + line.len() as u64 > self.max {
            self.capped = true;
            let note = format!(
                "{} sys log capped at {} bytes; the rest is dropped\n",
                now(),
                self.max
            );
            self.unwritten.extend_from_slice(note.as_bytes());
            self.flush();
            return;
        }
        self.written += line.len() as u64;
        self.unwritten.extend_from_slice(line.as_bytes());
        self.flush();
    }

    /// Writes what is waiting; true when nothing is left waiting.
    pub(crate) fn flush(&mut self) -> bool {
        while !self.unwritten.is_empty() {
            match self.file.write(&self.unwritten) {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    self.unwritten.drain(..n);
                }
            }
        }
        true
    }
}

/// Splits one output stream into lines (at most 64 KiB each) and keeps the last one.
pub(crate) struct Lines {
    kind: &'static str,
    buf: Vec<u8>,
    pub(crate) last: Option<String>,
    pub(crate) open: bool,
}

impl Lines {
    const MAX_LINE: usize = 64 * 1024;

    pub(crate) fn new(kind: &'static str) -> Lines {
        Lines {
            kind,
            buf: Vec::new(),
            last: None,
            open: true,
        }
    }

    pub(crate) fn feed(&mut self, data: &[u8], log: &mut Log) {
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

    pub(crate) fn finish(&mut self, log: &mut Log) {
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

/// The body of `muster supervise DIR`; returns the process exit code. `secrets` is the job's
/// secret environment ([`Secrets`]).
pub fn main(dir: PathBuf, secrets: Secrets) -> i32 {
    if dir.join(crate::procsup::SPEC).exists() {
        // A long-running process's directory: its own supervisor (same lock discipline).
        return crate::procsup::main(dir, secrets);
    }
    match supervise(&dir, &secrets) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(dir = %dir.display(), "muster supervise {}: {e}", dir.display());
            1
        }
    }
}

/// Writes `exit.json` durably, trying again (backing off to every 5 s) for as long as that
/// fails — a full disk, say: the attempt's outcome is known and must not turn into `supervisor
/// lost` because it could not be written yet. Meanwhile the supervisor lives and holds the
/// lock, so the agent waits for it. Gives up only when the attempt's directory is gone.
fn record_exit(dir: &Path, report: &ExitReport, mut log: Option<&mut Log>) -> std::io::Result<()> {
    let data = serde_json::to_vec(report)?;
    let mut delay = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        // The log's last lines first: the agent reads the log once `exit.json` is there.
        if let Some(log) = log.as_deref_mut() {
            log.flush();
        }
        match write_durable(&dir.join("exit.json"), &data) {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(dir = %dir.display(), "recorded the end of {} after {failures} failed tries", dir.display());
                }
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(e),
            Err(e) => {
                // Every try is not worth a line: the first, then about one a minute.
                if failures.is_multiple_of(12) {
                    tracing::error!(dir = %dir.display(), "cannot record the end of {} yet: {e}; the outcome is kept and the write retried", dir.display());
                }
                failures += 1;
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn exit_now(
    dir: &Path,
    log: &mut Log,
    exit_code: Option<i32>,
    error: Option<String>,
) -> std::io::Result<()> {
    let report = ExitReport {
        exit_code,
        error,
        result: None,
        at: now(),
    };
    record_exit(dir, &report, Some(log))
}

fn supervise(dir: &Path, secrets: &Secrets) -> std::io::Result<()> {
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
    // The cgroup is made before `started.json` names it, so whatever the command starts can
    // always be found from there, even after this supervisor died.
    let mut cgroup_note = None;
    let cgroup = spec.cgroup.as_ref().and_then(|base| {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        match Cgroup::create(base, &name) {
            Ok(cg) => Some(cg),
            Err(e) => {
                cgroup_note = Some(format!(
                    "cannot make the cgroup {}: {e}; the job's processes are tracked by the supervisor alone",
                    base.join(&*name).display()
                ));
                None
            }
        }
    });
    // Before anything is started: every orphan below us comes back to us, to be reaped and,
    // at the end, killed.
    let mut reaper = Reaper::new(cgroup)?;
    // SAFETY: getpid has no preconditions.
    let sid = unsafe { libc::getpid() };
    write_durable(
        &dir.join("started.json"),
        &serde_json::to_vec(&Started {
            sid,
            at: now(),
            cgroup: reaper.cgroup().map(|c| c.path().to_path_buf()),
            v1: Vec::new(),
        })?,
    )?;

    let log_file = perms::options()
        .create(true)
        .append(true)
        .open(dir.join("log"))?;
    let mut log = Log {
        file: log_file,
        written: 0,
        max: spec.log_max,
        capped: false,
        unwritten: Vec::new(),
        rotate: None,
        mask: Vec::new(),
    };
    if let Some(note) = cgroup_note {
        log.line("sys", &note);
    }
    // A kill asked for before `started.json` existed left a `kill` file (the agent writes it
    // before it looks for `started.json`; we write `started.json` before we look for it).
    if TERM.load(Ordering::SeqCst) || dir.join("kill").exists() {
        log.line("sys", "aborted before it started");
        reaper.drop_cgroup();
        return exit_now(dir, &mut log, None, Some("aborted before start".into()));
    }
    if matches!(spec.run, Run::Noop | Run::Group) {
        reaper.drop_cgroup();
        return exit_now(dir, &mut log, Some(0), None);
    }
    let user = match &spec.run_as {
        Some(name) => match user(name) {
            Ok(u) => Some((name.clone(), u)),
            Err(e) => {
                log.line("sys", &e);
                reaper.drop_cgroup();
                return exit_now(dir, &mut log, None, Some(e));
            }
        },
        None => None,
    };
    let what = match &spec.run {
        Run::Exec(argv) => format!("exec {}", brief(&format!("{argv:?}"))),
        Run::Shell(text) => format!("shell {}", quote(text)),
        _ => String::new(),
    };
    log.line("sys", &format!("attempt {} started: {what}", spec.attempt));
    // A shell script reaches the shell as a file, not as an argument (one argument may hold
    // at most 128 KiB): `script`, 0600 like everything here.
    let script = match &spec.run {
        Run::Shell(text) => match Script::write(dir, text, user.as_ref().map(|(_, u)| u)) {
            Ok(s) => Some(s),
            Err(e) => {
                let msg = format!("cannot write the script: {e}");
                log.line("sys", &msg);
                reaper.drop_cgroup();
                return exit_now(dir, &mut log, None, Some(msg));
            }
        },
        _ => None,
    };
    let mover = match reaper.cgroup().map(Mover::new) {
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            log.line(
                "sys",
                &format!(
                    "cannot use the job's cgroup: {e}; the supervisor alone tracks its processes"
                ),
            );
            reaper.drop_cgroup();
            None
        }
        None => None,
    };
    let spawned = command(
        &spec,
        secrets,
        user.as_ref(),
        mover.as_ref().map(Mover::fds),
        script.as_ref(),
    )
    .spawn();
    drop(script);
    if let Some(m) = mover {
        if let Err(e) = m.result() {
            // Started outside it: the subreaper still tracks every process of the job.
            log.line(
                "sys",
                &format!("cannot move the job into its cgroup: {e}; the supervisor alone tracks its processes"),
            );
            reaper.drop_cgroup();
        }
    }
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("cannot start: {e}");
            log.line("sys", &msg);
            reaper.drop_cgroup();
            return exit_now(dir, &mut log, None, Some(msg));
        }
    };
    let main_pid = child.id() as i32;
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    // The reaper waits for the main process along with every other child of ours; `Child`
    // must not wait for it too (it would take the status away from the reaper).
    drop(child);
    use std::os::fd::AsRawFd;
    let (out_fd, err_fd) = (out_pipe.as_raw_fd(), err_pipe.as_raw_fd());
    // A pidfd becomes readable when the child ends: one poll() waits for output, the end and
    // (every 10 ms) SIGTERM, the clock and the orphans to reap, in this one thread.
    // SAFETY: pidfd_open on our own child's pid (not reaped yet, so it is still ours).
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, main_pid, 0) } as i32;
    let mut out = Lines::new("out");
    let mut err = Lines::new("err");
    let deadline = spec
        .timeout_s
        .and_then(|s| Instant::now().checked_add(Duration::from_secs(s)));
    let grace = Duration::from_millis(spec.kill_grace_ms);
    // The end of every process of the job, once begun (an abort, the timeout, or leftovers of
    // an ended main process).
    let mut ending: Option<Ending> = None;
    let mut timed_out = false;
    let mut gave_up = false;
    let mut status: Option<ExitStatus> = None;
    let mut drain_until: Option<Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        for (pid, st) in reaper.reap() {
            if pid == main_pid {
                status = Some(st);
            }
        }
        if status.is_some() && ending.is_none() && reaper.any_left() {
            // The job ends with its main process: what it leaves running goes with it.
            let (e, n) = Ending::start(&reaper, grace);
            if n > 0 {
                log.line(
                    "sys",
                    &format!("the command ended; SIGTERM to the {n} process(es) it left running"),
                );
            }
            ending = Some(e);
        }
        if let Some(e) = &mut ending {
            match e.step(&reaper) {
                Step::Killed(n) => log.line(
                    "sys",
                    &format!("grace period over: SIGKILL to {n} process(es)"),
                ),
                Step::Stuck if status.is_some() && !gave_up => {
                    gave_up = true;
                    log.line(
                        "sys",
                        &format!(
                            "{} process(es) still there {}s after SIGKILL (uninterruptible?): given up",
                            crate::reap::descendants(sid).len(),
                            crate::reap::STUCK_AFTER.as_secs()
                        ),
                    );
                }
                _ => {}
            }
        }
        if status.is_some() && (gave_up || !reaper.any_left()) {
            // Nothing of the job is left to hold the pipes: read what they still have.
            let d = *drain_until.get_or_insert_with(|| Instant::now() + Duration::from_secs(2));
            if !out.open && !err.open || Instant::now() >= d {
                break;
            }
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
        if status.is_some() || ending.is_some() {
            continue;
        }
        let timeout_now = deadline.is_some_and(|d| Instant::now() >= d);
        if TERM.load(Ordering::SeqCst) || timeout_now {
            timed_out = timeout_now && !TERM.load(Ordering::SeqCst);
            let why = if timed_out {
                format!("timeout after {}s: SIGTERM", spec.timeout_s.unwrap_or(0))
            } else {
                "abort: SIGTERM".into()
            };
            log.line("sys", &why);
            ending = Some(Ending::start(&reaper, grace).0);
        }
    }
    out.finish(&mut log);
    err.finish(&mut log);
    if pidfd >= 0 {
        // SAFETY: closing the pidfd we opened.
        unsafe { libc::close(pidfd) };
    }
    if let Some(cg) = reaper.cgroup() {
        // Empty now (or given up on): the directory goes; a busy one is left for the agent.
        if let Err(e) = cg.remove() {
            log.line(
                "sys",
                &format!("cannot remove the cgroup {}: {e}", cg.path().display()),
            );
        }
    }
    let status = status.expect("the loop ends after the main process");
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
    record_exit(dir, &report, Some(&mut log))
}

/// `text` cut to about 100 characters for a log line, saying how long the whole was.
fn brief(text: &str) -> String {
    if text.len() <= 100 {
        return text.to_string();
    }
    let mut cut = 100;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} bytes)", &text[..cut], text.len())
}

/// A shell job's script, written to `<attempt>/script` (0600). The shell reads it by its path;
/// under `agent.run_as` (whose user cannot enter the attempt's 0700 directory) the file is that
/// user's and the shell reads it through a descriptor left open for it (`/dev/fd/N`).
pub(crate) struct Script {
    path: PathBuf,
    file: File,
}

impl Script {
    fn write(dir: &Path, text: &str, user: Option<&User>) -> std::io::Result<Script> {
        let path = dir.join("script");
        perms::write(&path, text)?;
        if let Some(u) = user {
            std::os::unix::fs::chown(&path, Some(u.uid), Some(u.gid))?;
        }
        let file = File::open(&path)?;
        Ok(Script { path, file })
    }
}

/// The job's command: its environment (the spec's, its secrets, its ids), its own process group,
/// stdout and stderr piped. With `mover` ([`Mover::fds`]), the child moves itself into the
/// attempt's cgroup between fork and exec; with `user`, it then becomes that user (in that
/// order: the move needs the supervisor's rights). A shell job runs `/bin/sh` on its
/// [`Script`].
fn command(
    spec: &Assignment,
    secrets: &Secrets,
    user: Option<&(String, User)>,
    mover: Option<MoveFds>,
    script: Option<&Script>,
) -> Command {
    let ids = [
        ("MUSTER_JOB_ID", spec.job.to_string()),
        ("MUSTER_TREE_ID", spec.tree.to_string()),
        ("MUSTER_ATTEMPT", spec.attempt.to_string()),
    ];
    command_for(&spec.run, &spec.env, &ids, secrets, user, mover, script)
}

/// A supervised command (a job's or a long-running process's): `run` with the environment
/// `env`, then the secrets, then `ids`; its own process group; stdout and stderr piped; moved
/// into a cgroup (`mover`) and changed to `user` between fork and exec. A shell command runs
/// `/bin/sh` on its [`Script`] when it has one, else `/bin/sh -c TEXT`.
pub(crate) fn command_for(
    run: &Run,
    env: &std::collections::BTreeMap<String, String>,
    ids: &[(&str, String)],
    secrets: &Secrets,
    user: Option<&(String, User)>,
    mover: Option<MoveFds>,
    script: Option<&Script>,
) -> Command {
    use std::os::fd::AsRawFd;
    // The descriptor the shell reads its script from, under run_as.
    let mut script_fd = None;
    let cmd = match run {
        Run::Exec(argv) => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        Run::Shell(text) => {
            let mut c = Command::new("/bin/sh");
            let Some(script) = script else {
                c.arg("-c").arg(text);
                return finish_command(c, env, ids, secrets, user, mover, None);
            };
            if user.is_some() {
                let fd = script.file.as_raw_fd();
                script_fd = Some(fd);
                c.arg(format!("/dev/fd/{fd}"));
            } else {
                c.arg(&script.path);
            }
            c
        }
        Run::Noop | Run::Group => unreachable!("nothing runs for noop and group jobs"),
    };
    finish_command(cmd, env, ids, secrets, user, mover, script_fd)
}

/// The environment, pipes, process group and between-fork-and-exec steps of [`command_for`].
fn finish_command(
    mut cmd: Command,
    env: &std::collections::BTreeMap<String, String>,
    ids: &[(&str, String)],
    secrets: &Secrets,
    user: Option<&(String, User)>,
    mover: Option<MoveFds>,
    script_fd: Option<i32>,
) -> Command {
    if let Some((name, user)) = user {
        let home = Path::new(&user.home);
        cmd.current_dir(if home.is_dir() { home } else { Path::new("/") });
        cmd.env("HOME", &user.home)
            .env("USER", name)
            .env("LOGNAME", name);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The secrets come from the agent for this job only: not from whatever environment the
    // agent itself was started with, and not under the names that carried them here.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with(SECRET_PREFIX) {
            cmd.env_remove(k);
        }
    }
    for name in SECRET_ENV {
        cmd.env_remove(name);
    }
    cmd.envs(env);
    cmd.envs(secrets.iter().map(|(k, v)| (k, v)));
    cmd.envs(ids.iter().map(|(k, v)| (k, v)));
    // The job leads its own process group.
    cmd.process_group(0);
    let ids = user.map(|(_, u)| (u.uid, u.gid));
    if mover.is_some() || ids.is_some() {
        // With no hook, std starts the job with posix_spawn; a hook makes it fork (cheap: this
        // process is small and single-threaded).
        // SAFETY: the hook runs between fork and exec and makes only async-signal-safe system
        // calls on values copied in (descriptors the parent keeps open, two ids).
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fds) = mover {
                    Mover::move_child(fds);
                }
                if let Some(fd) = script_fd {
                    // Kept open across exec for the shell to read.
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some((uid, gid)) = ids {
                    // No supplementary groups, then the group, then the user (last: it
                    // gives up the right to change the other two).
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            })
        };
    }
    cmd
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
