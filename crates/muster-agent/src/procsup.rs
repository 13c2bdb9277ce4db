//! The supervisor of a long-running process (SPEC §5a): `muster supervise DIR` for a process
//! directory (`procs/<id>/`, holding [`SPEC`]), forked by the agent's launcher like a job's
//! supervisor and outliving the agent the same way.
//!
//! It reuses the job supervisor's parts: the `flock` on `lock` for its whole life (the agent's
//! liveness test, and what keeps a second supervisor of the same process waiting), the child
//! subreaper and the cgroup ([`crate::reap`], [`crate::cgroup`]), the command builder and the
//! typed, time-stamped log ([`crate::supervisor`]), rotated here by size. What it adds is the
//! loop of [`muster_core::process::Supervision`]: start, health checks, restarts with backoff,
//! stop.
//!
//! Files of a process directory:
//! - `process.json` ([`SPEC`]): the [`ProcessAssignment`] (the agent's ports, user, cgroup);
//! - `lock`; `started.json` (`{sid, at, cgroup, gen}`, written before the first start, so the
//!   agent can kill what a supervisor killed with -9 left);
//! - `state.json`: the current [`ProcStatus`], rewritten at each change (the agent reads it);
//! - `exit.json`: `{gen, status}`, written once the supervisor is done with that generation
//!   (stopped or failed): a supervisor started again for it does nothing;
//! - `stop` (a stop asked for; SIGTERM follows), `restart` (a restart asked for; SIGHUP follows);
//! - `log`, `log.1`..: the output, rotated at `log_max`; `work/`: the default working directory.

use crate::cgroup::{Cgroup, Mover, V1Limits};
use crate::reap::{Ending, Reaper, Step};
use crate::supervisor::{self, lock, write_durable, Lines, Log, Secrets};
use muster_core::process::{Check, Exit, Next, ProcState, ProcStatus, Supervision};
use muster_core::{Run, Ts};
use muster_wire::perms;
use muster_wire::protocol::ProcessAssignment;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The spec file that makes a directory a process directory.
pub const SPEC: &str = "process.json";

/// What `exit.json` of a process directory holds.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Ended {
    pub gen: u32,
    pub status: ProcStatus,
}

/// What `started.json` of a process directory holds (readable as [`supervisor::Started`]).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Started {
    pub sid: i32,
    pub at: Ts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// The cgroup v1 groups holding its limits, where the unified hierarchy has no controllers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub v1: Vec<PathBuf>,
    pub gen: u32,
}

static TERM: AtomicBool = AtomicBool::new(false);
static HUP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

extern "C" fn on_hup(_: libc::c_int) {
    HUP.store(true, Ordering::SeqCst);
}

fn now() -> Ts {
    muster_wire::util::now()
}

/// The signal number of a stop signal's name (validated by the core).
pub fn signal_number(name: &str) -> i32 {
    match name {
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "HUP" => libc::SIGHUP,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        _ => libc::SIGTERM,
    }
}

pub fn read_spec(dir: &Path) -> Option<ProcessAssignment> {
    serde_json::from_slice(&std::fs::read(dir.join(SPEC)).ok()?).ok()
}

pub fn read_ended(dir: &Path) -> Option<Ended> {
    serde_json::from_slice(&std::fs::read(dir.join("exit.json")).ok()?).ok()
}

pub fn read_state(dir: &Path) -> Option<ProcStatus> {
    serde_json::from_slice(&std::fs::read(dir.join("state.json")).ok()?).ok()
}

/// The body of `muster supervise DIR` for a process directory; returns the exit code.
pub fn main(dir: PathBuf, secrets: Secrets) -> i32 {
    match supervise(&dir, &secrets) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(dir = %dir.display(), "muster supervise {}: {e}", dir.display());
            1
        }
    }
}

/// The environment of the process: its own, the agent's extra, the ports.
fn environment(spec: &ProcessAssignment) -> BTreeMap<String, String> {
    let mut env = spec.def.env.clone();
    env.extend(spec.env.clone());
    for (name, port) in &spec.ports {
        env.insert(muster_core::process::port_env(name), port.to_string());
    }
    if spec.ports.len() == 1 {
        if let Some(p) = spec.ports.values().next() {
            env.insert("PORT".into(), p.to_string());
        }
    }
    env.insert("MUSTER_PROCESS_ID".into(), spec.id.to_string());
    env.insert("MUSTER_PROCESS_GEN".into(), spec.gen.to_string());
    env
}

/// `$PORT`, `${PORT}`, `$MUSTER_PORT_X` in an exec argv become the port numbers (there is no
/// shell to do it; `shell` processes get them from the environment).
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_string();
    let mut names: Vec<&String> = env
        .keys()
        .filter(|k| *k == "PORT" || k.starts_with("MUSTER_PORT_"))
        .collect();
    // Longest first, so `$PORT` never eats the start of a longer name.
    names.sort_by_key(|k| std::cmp::Reverse(k.len()));
    for k in names {
        out = out
            .replace(&format!("${{{k}}}"), &env[k])
            .replace(&format!("${k}"), &env[k]);
    }
    out
}

/// The main process of the current run.
struct Running {
    pid: i32,
    pidfd: i32,
    out: std::process::ChildStdout,
    err: std::process::ChildStderr,
    out_lines: Lines,
    err_lines: Lines,
    status: Option<ExitStatus>,
    oom_before: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.pidfd >= 0 {
            // SAFETY: closing the pidfd we opened.
            unsafe { libc::close(self.pidfd) };
        }
    }
}

/// A health check under way.
enum Probe {
    /// tcp/http in a thread of its own; its answer comes on the channel, and a byte on the
    /// socket wakes the supervisor's poll (no polling on a timer while a check runs).
    Thread(mpsc::Receiver<Result<(), String>>, UnixStream, Instant),
    /// An exec check: its pid, a pidfd that the poll watches for its end, and when it times
    /// out.
    Exec(i32, Option<OwnedFd>, Instant),
}

impl Probe {
    /// The descriptor that becomes readable when the check has an answer.
    fn fd(&self) -> i32 {
        match self {
            Probe::Thread(_, s, _) => s.as_raw_fd(),
            Probe::Exec(_, fd, _) => fd.as_ref().map_or(-1, |f| f.as_raw_fd()),
        }
    }

    /// When the check is given up on.
    fn deadline(&self) -> Instant {
        match self {
            Probe::Thread(_, _, d) => *d + Duration::from_millis(100),
            Probe::Exec(_, _, d) => *d,
        }
    }
}

/// Runs a check in a thread of its own; its answer comes on the channel and a byte on the
/// socket pair.
fn probe_thread(
    deadline: Instant,
    check: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Option<Probe> {
    let (tx, rx) = mpsc::channel();
    // No socket pair (out of descriptors): no check now; the next comes an interval later.
    let (wake, mut poke) = UnixStream::pair().ok()?;
    std::thread::spawn(move || {
        let _ = tx.send(check());
        let _ = poke.write_all(&[1]);
    });
    Some(Probe::Thread(rx, wake, deadline))
}

struct Sup<'a> {
    dir: &'a Path,
    spec: ProcessAssignment,
    secrets: &'a Secrets,
    sm: Supervision,
    log: Log,
    reaper: Reaper,
    user: Option<(String, supervisor::User)>,
    env: BTreeMap<String, String>,
    cwd: PathBuf,
    limits: String,
    /// The cgroup v1 groups of its limits, if the unified hierarchy could not take them.
    v1: Option<V1Limits>,
    run: Option<Running>,
    started_at: Option<Ts>,
    seq: u64,
    last_written: Option<(ProcState, String, u32, Option<i32>)>,
    /// The end of a run under way (a stop, a restart, an unhealthy check, or the leftovers of
    /// an ended main process).
    ending: Option<Ending>,
    /// `/dev/null`, opened once (see [`Sup::null`]).
    devnull: Option<std::fs::File>,
}

fn ms() -> i64 {
    muster_wire::util::now().0
}

impl Sup<'_> {
    fn status(&self) -> ProcStatus {
        ProcStatus {
            state: self.sm.state(),
            reason: self.sm.reason().to_string(),
            restarts: self.sm.restarts(),
            pid: self
                .run
                .as_ref()
                .filter(|r| r.status.is_none())
                .map(|r| r.pid),
            ports: self.spec.ports.clone(),
            started_at: self.started_at,
            limits: self.limits.clone(),
            seq: self.seq,
            at: now(),
        }
    }

    /// Writes `state.json` when something the agent reports changed.
    fn publish(&mut self) {
        let pid = self
            .run
            .as_ref()
            .filter(|r| r.status.is_none())
            .map(|r| r.pid);
        let key = (
            self.sm.state(),
            self.sm.reason().to_string(),
            self.sm.restarts(),
            pid,
        );
        if self.last_written.as_ref() == Some(&key) {
            return;
        }
        if self.last_written.as_ref().map(|k| (k.0, &k.1)) != Some((key.0, &key.1)) {
            self.log.line(
                "sys",
                &format!("{}: {}", self.sm.state().as_str(), self.sm.reason()),
            );
        }
        self.last_written = Some(key);
        self.seq += 1;
        let st = self.status();
        if let Err(e) = write_durable(
            &self.dir.join("state.json"),
            &serde_json::to_vec(&st).unwrap_or_default(),
        ) {
            self.log
                .line("sys", &format!("cannot record the state: {e}"));
        }
    }

    /// The OOM kills in its cgroups so far (the unified one, or the v1 memory group).
    fn oom_kills(&self) -> u64 {
        self.reaper.cgroup().map_or(0, Cgroup::oom_kills)
            + self.v1.as_ref().map_or(0, V1Limits::oom_kills)
    }

    /// Starts a run; a failure to start is an exit like any other (the policy decides).
    fn start(&mut self) -> Option<Next> {
        let run = match &self.spec.def.run {
            Run::Exec(argv) => Run::Exec(argv.iter().map(|a| expand(a, &self.env)).collect()),
            other => other.clone(),
        };
        let oom_before = self.oom_kills();
        let mover = match self
            .reaper
            .cgroup()
            .map(|c| Mover::into_all(c, self.v1.as_ref()))
        {
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => {
                self.log.line(
                    "sys",
                    &format!("cannot use the process's cgroup: {e}; its process group is used"),
                );
                None
            }
            None => None,
        };
        let mut cmd = supervisor::command_for(
            &run,
            &self.env,
            &[],
            self.secrets,
            self.user.as_ref(),
            mover.as_ref().map(Mover::fds),
            None,
        );
        cmd.current_dir(&self.cwd);
        let spawned = cmd.spawn();
        if let Some(m) = mover {
            if let Err(e) = m.result() {
                self.log.line(
                    "sys",
                    &format!("cannot move the process into its cgroup: {e}"),
                );
            }
        }
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let why = if e.kind() == std::io::ErrorKind::NotFound {
                    "no such file".to_string()
                } else if e.kind() == std::io::ErrorKind::PermissionDenied {
                    "permission denied".to_string()
                } else {
                    format!("cannot start: {e}")
                };
                self.log.line("sys", &format!("cannot start: {e}"));
                return Some(self.sm.exited(Exit::CannotStart(why), ms(), jitter()));
            }
        };
        let pid = child.id() as i32;
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        // The reaper waits for it, not `Child`.
        drop(child);
        // SAFETY: pidfd_open on our own child's pid (not reaped yet).
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        for fd in [out.as_raw_fd(), err.as_raw_fd()] {
            // SAFETY: fcntl on descriptors we own.
            unsafe {
                let fl = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
        self.run = Some(Running {
            pid,
            pidfd,
            out,
            err,
            out_lines: Lines::new("out"),
            err_lines: Lines::new("err"),
            status: None,
            oom_before,
        });
        self.started_at = Some(now());
        self.sm.started(ms());
        self.log.line("sys", &format!("started, pid {pid}"));
        None
    }

    /// `/dev/null` for a check's standard streams: a copy of a descriptor kept open, with no
    /// path to look up each time (`Stdio::null` opens the file anew).
    fn null(&self) -> std::process::Stdio {
        self.devnull
            .as_ref()
            .and_then(|f| f.try_clone().ok())
            .map_or_else(std::process::Stdio::null, std::process::Stdio::from)
    }

    fn probe(&mut self) -> Option<Probe> {
        let h = self.spec.def.health.as_ref()?;
        let timeout = Duration::from_millis(h.timeout_ms);
        let deadline = Instant::now() + timeout;
        let port_of = |name: &str| self.spec.ports.get(name).copied().unwrap_or(0);
        match &h.check {
            Check::Tcp { port } => {
                let port = port_of(port);
                probe_thread(deadline, move || tcp_check(port, timeout).map(drop))
            }
            Check::Http { path, port } => {
                let port = port_of(port);
                let path = path.clone();
                probe_thread(deadline, move || http_check(port, &path, timeout))
            }
            Check::Exec { argv } => {
                let mut cmd = std::process::Command::new(expand(&argv[0], &self.env));
                cmd.args(argv[1..].iter().map(|a| expand(a, &self.env)))
                    .envs(&self.env)
                    .current_dir(&self.cwd)
                    .stdin(self.null())
                    .stdout(self.null())
                    .stderr(self.null())
                    .process_group(0);
                match cmd.spawn() {
                    Ok(c) => {
                        let pid = c.id() as i32;
                        drop(c);
                        // SAFETY: pidfd_open on our own child's pid (not reaped yet: only this
                        // thread reaps). Without one the poll falls back to a short timer.
                        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
                        // SAFETY: a descriptor just opened for us, owned from here on.
                        let fd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
                        Some(Probe::Exec(pid, fd, deadline))
                    }
                    Err(e) => {
                        let why = format!("cannot run the check: {e}");
                        self.health_result(Err(why));
                        None
                    }
                }
            }
        }
    }

    /// A health check's answer.
    fn health_result(&mut self, r: Result<(), String>) {
        match r {
            Ok(()) => self.sm.health_ok(),
            Err(why) => {
                if self.sm.health_failed(&why, ms()) {
                    self.publish();
                    self.kill_run();
                }
            }
        }
    }

    /// Ends the current run: the stop signal to all of it, SIGKILL after the grace.
    fn kill_run(&mut self) {
        if self.ending.is_some() {
            return;
        }
        let sig = signal_number(&self.spec.def.stop_signal);
        let grace = Duration::from_millis(self.spec.def.kill_grace_ms);
        let (e, n) = Ending::start_with(&self.reaper, sig, grace);
        if n > 0 {
            self.log.line(
                "sys",
                &format!("SIG{} to {n} process(es)", self.spec.def.stop_signal),
            );
        }
        self.ending = Some(e);
    }

    /// Reads what the run's pipes have now.
    fn read_pipes(&mut self, buf: &mut [u8]) {
        let Some(r) = &mut self.run else {
            return;
        };
        for i in 0..2 {
            loop {
                let (pipe, lines): (&mut dyn Read, &mut Lines) = if i == 0 {
                    (&mut r.out, &mut r.out_lines)
                } else {
                    (&mut r.err, &mut r.err_lines)
                };
                if !lines.open {
                    break;
                }
                match pipe.read(buf) {
                    Ok(0) => {
                        lines.finish(&mut self.log);
                        break;
                    }
                    Ok(n) => lines.feed(&buf[..n], &mut self.log),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        lines.finish(&mut self.log);
                        break;
                    }
                }
            }
        }
    }

    fn run_loop(&mut self) -> std::io::Result<()> {
        let mut restart_at: Option<i64> = Some(ms());
        let mut next_probe: Option<Instant> = None;
        let mut probe: Option<Probe> = None;
        let mut last_counted: Option<Instant> = None;
        let mut exited_at: Option<Instant> = None;
        let mut done = false;
        let mut files_seen: Option<Instant> = None;
        let mut buf = vec![0u8; 64 * 1024];
        let interval = self
            .spec
            .def
            .health
            .as_ref()
            .map_or(Duration::from_secs(1), |h| {
                Duration::from_millis(h.interval_ms)
            });
        self.publish();
        loop {
            // Requests: a stop (SIGTERM and the `stop` file), a restart (SIGHUP, `restart`).
            // The agent writes the file, then signals; the files themselves are looked at on a
            // signal and at most once a second otherwise (a path walk each turn of this loop was
            // a good part of an idle supervisor's CPU).
            let term = TERM.swap(false, Ordering::SeqCst);
            let hup = HUP.swap(false, Ordering::SeqCst);
            let look = term
                || hup
                || files_seen.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(1));
            if look {
                files_seen = Some(Instant::now());
            }
            if (term || (look && self.dir.join("stop").exists())) && !self.sm.stopping() {
                self.log.line("sys", "stop asked");
                if self.sm.stop() {
                    self.kill_run();
                }
                restart_at = None;
                if self.sm.state().is_final() {
                    done = true;
                }
            }
            let restart_file = self.dir.join("restart");
            if hup || (look && restart_file.exists()) {
                let _ = std::fs::remove_file(&restart_file);
                if !self.sm.stopping() && !done {
                    self.log.line("sys", "restart asked");
                    if self.sm.restart() {
                        self.kill_run();
                    } else if restart_at.is_some() {
                        restart_at = Some(ms());
                    }
                }
            }
            // Ends: the main process, a check, orphans.
            for (pid, st) in self.reaper.reap() {
                let ooms = self.oom_kills();
                if let Some(r) = &mut self.run {
                    if r.pid == pid && r.status.is_none() {
                        r.status = Some(st);
                        let oom = ooms > r.oom_before;
                        let how = match (st.code(), st.signal()) {
                            (_, Some(_)) if oom => Exit::Oom,
                            (Some(c), _) => Exit::Code(c),
                            (None, Some(s)) => Exit::Signal(s),
                            _ => Exit::Code(-1),
                        };
                        exited_at = Some(Instant::now());
                        probe = None;
                        match self.sm.exited(how, ms(), jitter()) {
                            Next::RestartAt(t) => restart_at = Some(t),
                            Next::Done => done = true,
                        }
                        if self.reaper.any_left() {
                            // What it left running goes with it before anything starts again.
                            self.kill_run();
                        }
                        continue;
                    }
                }
                if let Some(Probe::Exec(p, _, _)) = &probe {
                    if *p == pid {
                        probe = None;
                        let r = if st.success() {
                            Ok(())
                        } else {
                            Err(match st.code() {
                                Some(c) => format!("check exited {c}"),
                                None => "check killed".into(),
                            })
                        };
                        self.health_result(r);
                    }
                }
            }
            self.read_pipes(&mut buf);
            if let Some(e) = &mut self.ending {
                match e.step(&self.reaper) {
                    Step::Done => self.ending = None,
                    Step::Killed(n) => self.log.line(
                        "sys",
                        &format!("grace period over: SIGKILL to {n} process(es)"),
                    ),
                    Step::Stuck => {
                        self.log
                            .line("sys", "processes still there after SIGKILL: given up");
                        self.ending = None;
                    }
                    Step::Waiting => {}
                }
            }
            // A run whose main process ended is over once its pipes are drained (or given up
            // on a moment after nothing of it is left).
            if let Some(r) = &mut self.run {
                let drained = !r.out_lines.open && !r.err_lines.open;
                let late = exited_at.is_some_and(|t| t.elapsed() >= Duration::from_millis(200))
                    && self.ending.is_none();
                if r.status.is_some() && (drained || late) {
                    r.out_lines.finish(&mut self.log);
                    r.err_lines.finish(&mut self.log);
                    self.run = None;
                    exited_at = None;
                }
            }
            // Health.
            let alive = self.run.as_ref().is_some_and(|r| r.status.is_none());
            match &probe {
                Some(Probe::Thread(rx, _, deadline)) => match rx.try_recv() {
                    Ok(r) => {
                        probe = None;
                        if alive {
                            self.count_probe(r, &mut last_counted, interval);
                        }
                    }
                    Err(mpsc::TryRecvError::Empty)
                        if Instant::now() > *deadline + Duration::from_millis(100) =>
                    {
                        probe = None;
                        if alive {
                            self.count_probe(Err("timed out".into()), &mut last_counted, interval);
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => {}
                    Err(mpsc::TryRecvError::Disconnected) => probe = None,
                },
                Some(Probe::Exec(pid, _, deadline)) if Instant::now() > *deadline => {
                    // SAFETY: SIGKILL to the check's own process group.
                    unsafe { libc::kill(-*pid, libc::SIGKILL) };
                    probe = None;
                    if alive {
                        self.count_probe(Err("timed out".into()), &mut last_counted, interval);
                    }
                }
                _ => {}
            }
            let alive = self.run.as_ref().is_some_and(|r| r.status.is_none());
            if alive
                && probe.is_none()
                && self.ending.is_none()
                && self.spec.def.health.is_some()
                && next_probe.is_none_or(|t| Instant::now() >= t)
            {
                probe = self.probe();
                // Quick checks while it starts, so it is healthy soon after it listens.
                let every = if self.sm.state() == ProcState::Starting {
                    interval.min(Duration::from_millis(25))
                } else {
                    interval
                };
                next_probe = Some(Instant::now() + every);
            }
            // Start (again).
            if self.run.is_none()
                && self.ending.is_none()
                && !done
                && restart_at.is_some_and(|t| ms() >= t)
            {
                restart_at = None;
                match self.start() {
                    Some(Next::RestartAt(t)) => restart_at = Some(t),
                    Some(Next::Done) => done = true,
                    None if self.spec.def.health.is_some() => {
                        next_probe = Some(Instant::now());
                        // The first failure that counts comes an interval after the start.
                        last_counted = Some(Instant::now());
                    }
                    // No check: nothing to time.
                    None => {}
                }
            }
            self.publish();
            if done && self.run.is_none() && self.ending.is_none() {
                if self.reaper.any_left() {
                    self.kill_run();
                    continue;
                }
                if let Some(cg) = self.reaper.cgroup() {
                    let _ = cg.remove();
                }
                if let Some(v1) = &self.v1 {
                    v1.remove();
                }
                let status = self.status();
                return finish(self.dir, &self.spec, status, &mut self.log);
            }
            // Wait for output, the main process's end, or the next timer. Requests come with a
            // signal, which ends the wait at once; the second is only a safety net.
            // A check's end and a drained pipe wake the poll themselves; timers only bound them.
            let mut timeout = Duration::from_millis(1000);
            if self.ending.is_some() {
                timeout = Duration::from_millis(10);
            }
            if let Some(p) = &probe {
                let left = p.deadline().saturating_duration_since(Instant::now());
                timeout = timeout.min(if p.fd() < 0 {
                    Duration::from_millis(10)
                } else {
                    left + Duration::from_millis(1)
                });
            }
            if let Some(t) = exited_at {
                let late =
                    (t + Duration::from_millis(200)).saturating_duration_since(Instant::now());
                timeout = timeout.min(late + Duration::from_millis(1));
            }
            if let Some(t) = restart_at {
                timeout = timeout.min(Duration::from_millis((t - ms()).max(0) as u64));
            }
            // The next check is a timer only when one can start: a live run, no check running,
            // no ending (a past time otherwise turns this wait into a hot loop).
            let can_probe = self.run.as_ref().is_some_and(|r| r.status.is_none())
                && probe.is_none()
                && self.ending.is_none()
                && self.spec.def.health.is_some();
            if let (Some(t), true) = (next_probe, can_probe) {
                timeout = timeout.min(t.saturating_duration_since(Instant::now()));
            }
            let (out_fd, err_fd, pidfd) = match &self.run {
                Some(r) => (
                    if r.out_lines.open {
                        r.out.as_raw_fd()
                    } else {
                        -1
                    },
                    if r.err_lines.open {
                        r.err.as_raw_fd()
                    } else {
                        -1
                    },
                    if r.status.is_none() { r.pidfd } else { -1 },
                ),
                None => (-1, -1, -1),
            };
            let probe_fd = probe.as_ref().map_or(-1, Probe::fd);
            let mut fds = [out_fd, err_fd, pidfd, probe_fd].map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: polling descriptors we own (or -1, which poll ignores).
            unsafe { libc::poll(fds.as_mut_ptr(), 4, timeout.as_millis() as i32) };
        }
    }

    /// A check's answer, counted: while the process starts, checks run quicker than the
    /// interval, and only one failure per interval counts.
    fn count_probe(
        &mut self,
        r: Result<(), String>,
        last_counted: &mut Option<Instant>,
        interval: Duration,
    ) {
        if r.is_err() && last_counted.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        if r.is_err() {
            *last_counted = Some(Instant::now());
        }
        self.health_result(r);
    }
}

fn jitter() -> f64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a buffer we own.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timed out".into(),
        _ => {
            let s = e.to_string();
            s.split(" (os error").next().unwrap_or(&s).to_lowercase()
        }
    }
}

fn tcp_check(port: u16, timeout: Duration) -> Result<std::net::TcpStream, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| describe(&e))
}

fn http_check(port: u16, path: &str, timeout: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    let mut s = tcp_check(port, timeout)?;
    let left = timeout
        .saturating_sub(t0.elapsed())
        .max(Duration::from_millis(1));
    let _ = s.set_read_timeout(Some(left));
    let _ = s.set_write_timeout(Some(left));
    s.write_all(
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: muster-health\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .map_err(|e| describe(&e))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(describe(&e)),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let code: Option<u16> = line
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok());
    match code {
        Some(c) if (200..300).contains(&c) => Ok(()),
        Some(c) => Err(format!("HTTP {c}")),
        None => Err("not an HTTP answer".into()),
    }
}

fn supervise(dir: &Path, secrets: &Secrets) -> std::io::Result<()> {
    // SAFETY: setsid has no preconditions (see the job supervisor).
    unsafe { libc::setsid() };
    // SAFETY: handlers that only store to atomics; not SIG_IGN, so children get the defaults.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, on_hup as *const () as libc::sighandler_t);
    }
    let _lock = lock(dir, true)?.expect("a blocking lock is always taken");
    let spec = read_spec(dir).ok_or_else(|| std::io::Error::other("no readable process.json"))?;
    if read_ended(dir).is_some_and(|e| e.gen >= spec.gen) {
        return Ok(()); // This generation ran and ended: never again.
    }
    let mut log = Log::rotating(&dir.join("log"), spec.log_max, spec.log_keep)?
        .masking(secrets.iter().map(|(_, v)| v.clone()));
    let user = match &spec.run_as {
        Some(name) => match supervisor::user(name) {
            Ok(u) => Some((name.clone(), u)),
            Err(e) => {
                log.line("sys", &e);
                return finish(dir, &spec, failed_status(&spec, &e), &mut log);
            }
        },
        None => None,
    };
    // The cgroup, with the limits; without one, the process group and the subreaper.
    let mut limits = if spec.def.limits.is_empty() {
        "none".to_string()
    } else {
        "unavailable: this node has no writable cgroup v2 (agent.cgroups, or a read-only /sys/fs/cgroup)".to_string()
    };
    let mut v1 = None;
    let cgroup = spec.cgroup.as_ref().and_then(|base| {
        let name = format!("proc-{}", spec.id);
        match Cgroup::create(base, &name) {
            Ok(cg) => {
                if !spec.def.limits.is_empty() {
                    limits = match cg.limit(base, &spec.def.limits) {
                        Ok(()) => "applied".into(),
                        // A hybrid host: the controllers are on cgroup v1.
                        Err(why) => match V1Limits::create(&name, &spec.def.limits) {
                            Ok(groups) => {
                                log.line(
                                    "sys",
                                    &format!("limits applied through cgroup v1 ({why})"),
                                );
                                v1 = Some(groups);
                                "applied".into()
                            }
                            Err(why_v1) => format!("unavailable: {why}; {why_v1}"),
                        },
                    };
                }
                Some(cg)
            }
            Err(e) => {
                log.line(
                    "sys",
                    &format!(
                        "cannot make the cgroup {}: {e}; the process group is used",
                        base.join(&name).display()
                    ),
                );
                None
            }
        }
    });
    if limits.starts_with("unavailable") {
        log.line("sys", &format!("limits {limits}"));
    }
    let reaper = Reaper::new(cgroup)?;
    // SAFETY: getpid has no preconditions.
    let sid = unsafe { libc::getpid() };
    write_durable(
        &dir.join("started.json"),
        &serde_json::to_vec(&Started {
            sid,
            at: now(),
            cgroup: reaper.cgroup().map(|c| c.path().to_path_buf()),
            v1: v1.as_ref().map_or_else(Vec::new, |g| g.dirs().to_vec()),
            gen: spec.gen,
        })?,
    )?;
    let cwd = match &spec.def.cwd {
        Some(c) => PathBuf::from(c),
        None => match &user {
            Some((_, u)) if Path::new(&u.home).is_dir() => PathBuf::from(&u.home),
            _ => {
                let w = dir.join("work");
                let _ = perms::create_dir(&w);
                if let Some((_, u)) = &user {
                    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(
                        w.as_os_str(),
                    ))
                    .unwrap_or_default();
                    // SAFETY: chown of a directory we made, to the process's user.
                    unsafe { libc::chown(c.as_ptr(), u.uid, u.gid) };
                }
                w
            }
        },
    };
    let env = environment(&spec);
    let sm = Supervision::new(spec.def.restart, spec.def.health.as_ref());
    let mut sup = Sup {
        dir,
        spec,
        secrets,
        sm,
        log,
        reaper,
        user,
        env,
        cwd,
        limits,
        v1,
        run: None,
        started_at: None,
        // On from the last status of a supervisor before us (killed, say): readers take a
        // status for new by its higher `seq`.
        seq: read_state(dir).map_or(0, |s| s.seq),
        last_written: None,
        ending: None,
        devnull: std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .ok(),
    };
    sup.run_loop()
}

fn failed_status(spec: &ProcessAssignment, why: &str) -> ProcStatus {
    ProcStatus::last(ProcState::Failed, why, spec.ports.clone(), now())
}

/// Records the final status (`state.json`, then `exit.json`) and ends.
fn finish(
    dir: &Path,
    spec: &ProcessAssignment,
    status: ProcStatus,
    log: &mut Log,
) -> std::io::Result<()> {
    log.flush();
    let data = serde_json::to_vec(&status)?;
    let _ = write_durable(&dir.join("state.json"), &data);
    let ended = Ended {
        gen: spec.gen,
        status,
    };
    write_durable(&dir.join("exit.json"), &serde_json::to_vec(&ended)?)
}
