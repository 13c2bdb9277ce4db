//! The node agent: runs the jobs a server assigns, each under a [`supervisor`] process, keeps
//! their logs in its data dir, streams them on request and reports every state change.
//!
//! The agent talks to a server only through the messages of [`crate::protocol`], over a
//! [`Link`]: in-process channels for the embedded agent of `muster up`, a websocket for remote
//! agents. Its own truth is on disk, one directory per attempt (`jobs/<job>.<attempt>/`), so it
//! can restart at any time: on start it re-adopts attempts whose supervisor still runs, reports
//! those that ended meanwhile, and never starts an attempt twice.

pub mod launcher;
pub mod logs;
pub mod supervisor;

use crate::protocol::{Assignment, ExitReport, FromAgent, Known, Report, ToAgent};
use muster_core::{Run, Uuid};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

/// A way to reach a server: each call makes one connection.
pub type Link = Arc<
    dyn Fn() -> Pin<
            Box<
                dyn Future<
                        Output = std::io::Result<(
                            UnboundedSender<FromAgent>,
                            UnboundedReceiver<ToAgent>,
                        )>,
                    > + Send,
            >,
        > + Send
        + Sync,
>;

/// What an agent needs to know about itself.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The agent's data dir (job directories, its node id).
    pub dir: PathBuf,
    pub name: String,
    pub slots: u32,
    pub labels: BTreeMap<String, String>,
    /// The muster binary, started as `muster supervise DIR` for every attempt.
    pub exe: PathBuf,
    pub heartbeat: Duration,
    /// How long the directories of acknowledged attempts (their logs) are kept.
    pub retention: Duration,
    /// Cut off from every server this long, the agent kills its retryable jobs itself (the
    /// server retries them elsewhere), so a partition never runs a job twice.
    pub lost_after: Duration,
    /// Where to serve job logs to the servers ([`logs`]), with the fingerprint of the cluster CA
    /// the agent joined under; `None`: no endpoint (the embedded agent).
    pub log_endpoint: Option<(std::net::SocketAddr, [u8; 32])>,
    /// An unprivileged user every job runs as (`agent.run_as`; the agent runs as root then).
    pub run_as: Option<String>,
}

enum Internal {
    /// An attempt ended (its `exit.json` is written).
    Ended {
        job: Uuid,
        attempt: u32,
        outcome: ExitReport,
    },
    /// The launcher could not start this attempt's supervisor, or died before telling its end:
    /// start `muster supervise DIR` (see [`launcher`]).
    Respawn {
        job: Uuid,
        attempt: u32,
        dir: PathBuf,
    },
}

/// Handed-over attempts not heard of yet, by directory, with when they were handed over; `None`
/// once the launcher is gone.
type Waiting = Arc<Mutex<Option<HashMap<PathBuf, (Uuid, u32, std::time::Instant)>>>>;

/// An attempt handed to the launcher without a `started.json` after this long: the launcher is
/// taken for stuck (stopped, say), and the agent starts its attempts itself.
const LAUNCHER_STUCK: Duration = Duration::from_secs(10);

/// The agent's end of its supervisor launcher ([`launcher`]).
struct Launcher {
    /// Non-blocking: a launcher that does not read makes the agent start supervisors itself.
    stdin: std::fs::File,
    waiting: Waiting,
}

/// After this many launcher deaths the agent starts every supervisor itself.
const LAUNCHER_STARTS: u32 = 5;

struct Agent {
    opts: AgentOptions,
    node_id: Option<String>,
    /// Attempts whose supervisor runs: whether the server would retry them elsewhere.
    running: HashMap<(Uuid, u32), bool>,
    /// Set when a server said goodbye: the agent stops.
    goodbye: Option<String>,
    /// Set when the server asks the agent to connect again (it no longer leads).
    reconnect: bool,
    /// Ended attempts not yet acknowledged by a server.
    ended: HashMap<(Uuid, u32), ExitReport>,
    /// Report seq → the exec attempts it ended, marked `acked` once acknowledged.
    in_flight: BTreeMap<u64, Vec<(Uuid, u32)>>,
    next_seq: u64,
    internal_tx: UnboundedSender<Internal>,
    streams: HashMap<u64, JoinHandle<()>>,
    logs: Option<logs::LogServer>,
    launcher: Option<Launcher>,
    launcher_starts: u32,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn attempt_dir(dir: &Path, job: Uuid, attempt: u32) -> PathBuf {
    let id = job.to_string();
    // 256 shards by the id's last (random) hex digits: a directory with tens of thousands of
    // entries makes every lookup slow on file systems without directory indexes.
    dir.join("jobs")
        .join(&id[id.len() - 2..])
        .join(format!("{id}.{attempt}"))
}

/// Every attempt directory under `<dir>/jobs`.
pub fn attempt_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(shards) = std::fs::read_dir(dir.join("jobs")) else {
        return out;
    };
    for shard in shards.flatten() {
        if let Ok(rd) = std::fs::read_dir(shard.path()) {
            out.extend(rd.flatten().map(|e| e.path()));
        }
    }
    out
}

/// Runs the agent until `shutdown` resolves. Running jobs are left to their supervisors.
pub async fn run(
    opts: AgentOptions,
    link: Link,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(opts.dir.join("jobs"))?;
    let (internal_tx, mut internal_rx) = unbounded_channel();
    let node_id = std::fs::read_to_string(opts.dir.join("node-id"))
        .ok()
        .map(|s| s.trim().to_string());
    let logs = match opts.log_endpoint {
        Some((addr, fingerprint)) => {
            match logs::LogServer::start(addr, opts.dir.clone(), fingerprint).await {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("muster agent: cannot serve logs on {addr}: {e}; logs go over the server connection");
                    None
                }
            }
        }
        None => None,
    };
    let mut agent = Agent {
        logs,
        opts,
        node_id,
        running: HashMap::new(),
        ended: HashMap::new(),
        in_flight: BTreeMap::new(),
        next_seq: 1,
        internal_tx,
        streams: HashMap::new(),
        goodbye: None,
        reconnect: false,
        launcher: None,
        launcher_starts: 0,
    };
    agent.adopt().await?;
    let sweep_dir = agent.opts.dir.clone();
    let retention = agent.opts.retention;
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(
            retention.clamp(Duration::from_secs(1), Duration::from_secs(3600)),
        );
        loop {
            tick.tick().await;
            let dir = sweep_dir.clone();
            let _ = tokio::task::spawn_blocking(move || sweep(&dir, retention)).await;
        }
    });
    let _sweeper = AbortOnDrop(sweeper);
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(100);
    let mut cut_off_since = std::time::Instant::now();
    loop {
        if let Some(reason) = agent.goodbye.take() {
            return Err(std::io::Error::other(format!(
                "the server said goodbye: {reason}"
            )));
        }
        if cut_off_since.elapsed() >= agent.opts.lost_after {
            agent.kill_retryable();
        }
        let conn = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            c = (link)() => c,
        };
        let (tx, mut rx) = match conn {
            Ok(c) => {
                backoff = Duration::from_millis(100);
                c
            }
            Err(e) => {
                eprintln!("muster agent: cannot reach the server: {e}; again in {backoff:?}");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        agent.hello(&tx);
        let mut beat = tokio::time::interval(agent.opts.heartbeat);
        let mut pending: Vec<Report> = Vec::new();
        let mut pending_exec: Vec<(Uuid, u32)> = Vec::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    for (_, h) in agent.streams.drain() { h.abort(); }
                    return Ok(());
                }
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    agent.on_message(msg, &tx, &mut pending);
                    while let Ok(msg) = rx.try_recv() {
                        agent.on_message(msg, &tx, &mut pending);
                    }
                    if agent.goodbye.is_some() || std::mem::take(&mut agent.reconnect) {
                        break;
                    }
                }
                ev = internal_rx.recv() => {
                    let Some(ev) = ev else { continue };
                    agent.on_internal(ev, &tx, &mut pending, &mut pending_exec);
                    while let Ok(ev) = internal_rx.try_recv() {
                        agent.on_internal(ev, &tx, &mut pending, &mut pending_exec);
                    }
                }
                _ = beat.tick() => {
                    let _ = tx.send(FromAgent::Heartbeat);
                    agent.check_launcher();
                }
            }
            if !pending.is_empty() {
                let seq = agent.next_seq;
                agent.next_seq += 1;
                agent
                    .in_flight
                    .insert(seq, std::mem::take(&mut pending_exec));
                let _ = tx.send(FromAgent::Report {
                    seq,
                    reports: std::mem::take(&mut pending),
                });
            }
        }
        for (_, h) in agent.streams.drain() {
            h.abort();
        }
        cut_off_since = std::time::Instant::now();
        if agent.goodbye.is_none() {
            eprintln!("muster agent: lost the server; reconnecting");
            // A breath before the next server (a follower sends us on our way at once).
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}

impl Agent {
    /// Looks at every attempt directory not yet acknowledged: re-adopts live supervisors, picks up
    /// ended attempts, settles dead supervisors, starts attempts that never started.
    async fn adopt(&mut self) -> std::io::Result<()> {
        let mut entries = Vec::new();
        for path in attempt_dirs(&self.opts.dir) {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let Some((job, attempt)) = name.split_once('.') else {
                continue;
            };
            let (Ok(job), Ok(attempt)) = (job.parse::<Uuid>(), attempt.parse::<u32>()) else {
                continue;
            };
            // (Acknowledged attempts are renamed `<job>.<attempt>.done`: their attempt part
            // does not parse, so they are skipped above.)
            entries.push((job, attempt, path));
        }
        for (job, attempt, dir) in entries {
            if let Some(outcome) = read_exit(&dir) {
                self.ended.insert((job, attempt), outcome);
                continue;
            }
            let lock = match supervisor::lock(&dir, false) {
                Ok(l) => l,
                Err(_) if !dir.join("started.json").exists() => {
                    // No spec (the agent stopped between mkdir and writing it): the command never
                    // ran, and without its spec it cannot; the server decides about a retry.
                    let outcome = ExitReport {
                        exit_code: None,
                        error: Some("the agent stopped before the job started".into()),
                        result: None,
                        at: crate::manager::now(),
                    };
                    let _ = supervisor::write_durable(
                        &dir.join("exit.json"),
                        &serde_json::to_vec(&outcome).unwrap_or_default(),
                    );
                    self.ended.insert((job, attempt), outcome);
                    continue;
                }
                Err(e) => return Err(e),
            };
            match lock {
                None => {
                    // The supervisor lives: wait for it to end.
                    let retryable = read_spec(&dir).is_some_and(|a| a.retryable);
                    self.running.insert((job, attempt), retryable);
                    self.watch_adopted(job, attempt, dir);
                }
                Some(lock) => {
                    if dir.join("started.json").exists() {
                        drop(lock);
                        let outcome = settle_lost_supervisor(&dir);
                        self.ended.insert((job, attempt), outcome);
                    } else {
                        // Never started: the command did not run, so starting it now is its
                        // first and only run.
                        drop(lock);
                        let retryable = read_spec(&dir).is_some_and(|a| a.retryable);
                        self.spawn_supervisor(job, attempt, dir, retryable);
                    }
                }
            }
        }
        Ok(())
    }

    fn hello(&mut self, tx: &UnboundedSender<FromAgent>) {
        let mut known: Vec<Known> = self
            .running
            .keys()
            .map(|&(job, attempt)| Known::Running { job, attempt })
            .collect();
        let mut exec = Vec::new();
        for (&(job, attempt), outcome) in &self.ended {
            known.push(Known::Exited {
                job,
                attempt,
                outcome: outcome.clone(),
            });
            exec.push((job, attempt));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.clear();
        self.in_flight.insert(seq, exec);
        let _ = tx.send(FromAgent::Hello {
            name: self.opts.name.clone(),
            node_id: self.node_id.clone(),
            slots: self.opts.slots,
            labels: self.opts.labels.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            known,
            seq,
            log_endpoint: self.logs.as_ref().map(|l| l.offer()),
        });
        // Logs of attempts that ended while no server listened.
        for &(job, attempt) in self.ended.keys() {
            let dir = attempt_dir(&self.opts.dir, job, attempt);
            if let Ok(data) = std::fs::read(dir.join("log")) {
                let _ = tx.send(FromAgent::LogUpload {
                    job,
                    attempt,
                    data: String::from_utf8_lossy(&data).into_owned(),
                });
            }
        }
    }

    fn on_message(
        &mut self,
        msg: ToAgent,
        tx: &UnboundedSender<FromAgent>,
        pending: &mut Vec<Report>,
    ) {
        match msg {
            ToAgent::Welcome { node_id, .. } => {
                if self.node_id.as_deref() != Some(node_id.as_str()) {
                    let _ = std::fs::write(self.opts.dir.join("node-id"), &node_id);
                    self.node_id = Some(node_id);
                }
            }
            ToAgent::Assign { jobs, .. } => {
                for a in jobs {
                    self.assign(a, pending);
                }
            }
            ToAgent::Kill { job, attempt } => self.kill(job, attempt),
            ToAgent::Ack { seq } => {
                let done: Vec<u64> = self.in_flight.range(..=seq).map(|(k, _)| *k).collect();
                for k in done {
                    for (job, attempt) in self.in_flight.remove(&k).unwrap_or_default() {
                        self.ended.remove(&(job, attempt));
                        let dir = attempt_dir(&self.opts.dir, job, attempt);
                        let _ = std::fs::rename(&dir, done_dir(&dir));
                    }
                }
            }
            ToAgent::FollowLog {
                stream,
                job,
                attempt,
                from,
                follow,
            } => {
                let dir = attempt_dir(&self.opts.dir, job, attempt);
                let tx = tx.clone();
                let h = tokio::spawn(stream_log(dir, stream, from, follow, tx));
                self.streams.retain(|_, h| !h.is_finished());
                self.streams.insert(stream, h);
            }
            ToAgent::Reconnect => {
                self.reconnect = true;
            }
            ToAgent::Goodbye { reason } => {
                eprintln!("muster agent: {reason}");
                self.goodbye = Some(reason);
            }
            ToAgent::StopLog { stream } => {
                if let Some(h) = self.streams.remove(&stream) {
                    h.abort();
                }
            }
            ToAgent::Certificate { cert, ca } => {
                if let Some(l) = &self.logs {
                    if let Err(e) = l.certify(&cert, &ca) {
                        eprintln!("muster agent: log endpoint certificate refused: {e}");
                    }
                }
            }
        }
    }

    /// Asks an attempt's supervisor to stop it: first the `kill` file (for a supervisor that has
    /// not started the command yet), then SIGTERM to the supervisor (pid in started.json).
    fn kill(&self, job: Uuid, attempt: u32) {
        if !self.running.contains_key(&(job, attempt)) {
            return;
        }
        let dir = attempt_dir(&self.opts.dir, job, attempt);
        let _ = std::fs::write(dir.join("kill"), b"");
        if let Some(sid) = read_started(&dir) {
            // SAFETY: SIGTERM to the supervisor, which forwards it to the job's group.
            unsafe { libc::kill(sid, libc::SIGTERM) };
        }
    }

    /// Cut off for `lost_after`: the server has failed these jobs over to other nodes.
    fn kill_retryable(&self) {
        for (&(job, attempt), &retryable) in &self.running {
            if retryable {
                eprintln!("muster agent: no server for too long; stopping retryable job {job} attempt {attempt}");
                self.kill(job, attempt);
            }
        }
    }

    fn assign(&mut self, mut a: Assignment, pending: &mut Vec<Report>) {
        a.run_as = self.opts.run_as.clone();
        let key = (a.job, a.attempt);
        if self.running.contains_key(&key) {
            return;
        }
        if let Some(outcome) = self.ended.get(&key) {
            pending.push(Report::Exited {
                job: a.job,
                attempt: a.attempt,
                outcome: outcome.clone(),
            });
            return;
        }
        match a.run {
            Run::Noop | Run::Group => {
                // Nothing runs, so nothing can run twice: report success at once.
                pending.push(Report::Exited {
                    job: a.job,
                    attempt: a.attempt,
                    outcome: ExitReport {
                        exit_code: Some(0),
                        error: None,
                        result: None,
                        at: crate::manager::now(),
                    },
                });
            }
            Run::Exec(_) | Run::Shell(_) => {
                let dir = attempt_dir(&self.opts.dir, a.job, a.attempt);
                // mkdir is the once-only gate: an attempt whose directory exists is never
                // started from here again.
                if let Some(shard) = dir.parent() {
                    let _ = std::fs::create_dir(shard);
                }
                match std::fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return,
                    Err(e) => {
                        pending.push(Report::Exited {
                            job: a.job,
                            attempt: a.attempt,
                            outcome: ExitReport {
                                exit_code: None,
                                error: Some(format!("agent cannot make the job directory: {e}")),
                                result: None,
                                at: crate::manager::now(),
                            },
                        });
                        return;
                    }
                }
                let spec = serde_json::to_vec(&a).expect("an assignment serializes");
                // Written whole or not at all: the supervisor locks and reads it.
                let tmp = dir.join("spec.tmp");
                if let Err(e) = std::fs::write(&tmp, spec)
                    .and_then(|()| std::fs::rename(&tmp, dir.join("spec.json")))
                {
                    let outcome = ExitReport {
                        exit_code: None,
                        error: Some(format!("agent cannot write the job spec: {e}")),
                        result: None,
                        at: crate::manager::now(),
                    };
                    let _ = supervisor::write_durable(
                        &dir.join("exit.json"),
                        &serde_json::to_vec(&outcome).unwrap_or_default(),
                    );
                    pending.push(Report::Exited {
                        job: a.job,
                        attempt: a.attempt,
                        outcome,
                    });
                    return;
                }
                self.spawn_supervisor(a.job, a.attempt, dir, a.retryable);
            }
        }
    }

    /// Starts an attempt's supervisor: forked by the launcher, or else `muster supervise DIR`.
    fn spawn_supervisor(&mut self, job: Uuid, attempt: u32, dir: PathBuf, retryable: bool) {
        self.running.insert((job, attempt), retryable);
        if !self.launch(job, attempt, &dir) {
            self.spawn_direct(job, attempt, dir);
        }
    }

    /// Hands the attempt to the launcher (starting one if needed); false when it cannot take it.
    fn launch(&mut self, job: Uuid, attempt: u32, dir: &Path) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let mut msg = dir.as_os_str().as_bytes().to_vec();
        // One write of at most PIPE_BUF bytes is all or nothing: the stream never holds half a
        // request.
        if msg.contains(&0) || msg.len() >= libc::PIPE_BUF {
            return false;
        }
        msg.push(0);
        if self
            .launcher
            .as_ref()
            .is_some_and(|l| locked(&l.waiting).is_none())
        {
            self.launcher = None;
        }
        if self.launcher.is_none() {
            if self.launcher_starts >= LAUNCHER_STARTS {
                return false;
            }
            self.launcher_starts += 1;
            match self.start_launcher() {
                Ok(l) => self.launcher = Some(l),
                Err(e) => {
                    eprintln!("muster agent: cannot start the supervisor launcher: {e}; starting supervisors one by one");
                    self.launcher_starts = LAUNCHER_STARTS;
                    return false;
                }
            }
        }
        let Some(l) = &self.launcher else {
            return false;
        };
        let mut waiting = locked(&l.waiting);
        let Some(map) = waiting.as_mut() else {
            return false;
        };
        map.insert(dir.to_path_buf(), (job, attempt, std::time::Instant::now()));
        match (&l.stdin).write(&msg) {
            Ok(n) if n == msg.len() => true,
            _ => {
                // Gone (its reader respawns the rest) or not reading: this one starts directly.
                map.remove(dir);
                false
            }
        }
    }

    /// Gives up a launcher that has not started an attempt it was handed `LAUNCHER_STUCK` ago:
    /// every attempt it holds is started directly (where it did fork a supervisor, the direct
    /// one only waits for it), and the next attempt gets a new launcher.
    fn check_launcher(&mut self) {
        let Some(l) = &self.launcher else {
            return;
        };
        let mut waiting = locked(&l.waiting);
        let stuck = waiting.as_ref().is_some_and(|m| {
            m.iter().any(|(dir, &(_, _, at))| {
                at.elapsed() >= LAUNCHER_STUCK && !dir.join("started.json").exists()
            })
        });
        if !stuck {
            return;
        }
        let held = waiting.take().unwrap_or_default();
        drop(waiting);
        eprintln!(
            "muster agent: the supervisor launcher started nothing for {}s; starting {} supervisor(s) directly",
            LAUNCHER_STUCK.as_secs(),
            held.len()
        );
        self.launcher = None;
        for (dir, (job, attempt, _)) in held {
            self.spawn_direct(job, attempt, dir);
        }
    }

    fn start_launcher(&self) -> std::io::Result<Launcher> {
        let mut child = tokio::process::Command::new(&self.opts.exe)
            .arg("supervise")
            .arg("--launcher")
            .arg(&self.opts.dir)
            // Room for each forked supervisor to show `muster supervise DIR` (see launcher.rs).
            .arg(" ".repeat(self.opts.dir.as_os_str().len() + 80))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(false)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped").into_owned_fd()?;
        let mut stdout = child.stdout.take().expect("piped");
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(stdin.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(stdin.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let waiting: Waiting = Arc::new(Mutex::new(Some(HashMap::new())));
        let tx = self.internal_tx.clone();
        let w = waiting.clone();
        tokio::spawn(async move {
            use std::os::unix::ffi::OsStrExt;
            use tokio::io::AsyncReadExt;
            let mut input = Vec::new();
            let mut chunk = vec![0u8; 16 * 1024];
            loop {
                match stdout.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => input.extend_from_slice(&chunk[..n]),
                }
                while let Some(end) = input.iter().position(|&b| b == 0) {
                    let msg: Vec<u8> = input.drain(..=end).take(end).collect();
                    let (Some(kind), Some(path)) = (msg.first(), msg.get(2..)) else {
                        continue;
                    };
                    let dir = PathBuf::from(std::ffi::OsStr::from_bytes(path));
                    let Some((job, attempt, _)) = locked(&w).as_mut().and_then(|m| m.remove(&dir))
                    else {
                        continue;
                    };
                    let ev = if *kind == b'E' {
                        Internal::Ended {
                            job,
                            attempt,
                            outcome: ended_outcome(&dir),
                        }
                    } else {
                        Internal::Respawn { job, attempt, dir }
                    };
                    let _ = tx.send(ev);
                }
            }
            // Gone: whatever it had not told the end of is started directly (the lock keeps a
            // supervisor it did fork the only one to run the command).
            let left = locked(&w).take().unwrap_or_default();
            for (dir, (job, attempt, _)) in left {
                let _ = tx.send(Internal::Respawn { job, attempt, dir });
            }
            let _ = child.wait().await;
        });
        Ok(Launcher {
            stdin: std::fs::File::from(stdin),
            waiting,
        })
    }

    /// Starts `muster supervise DIR` and waits for it (the attempt is in `running` already).
    fn spawn_direct(&mut self, job: Uuid, attempt: u32, dir: PathBuf) {
        let mut cmd = tokio::process::Command::new(&self.opts.exe);
        cmd.arg("supervise").arg(&dir);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        cmd.kill_on_drop(false);
        // No pre_exec hook here: that would force a fork() of this large, multi-threaded process.
        // Without one, std spawns with posix_spawn (vfork-like), and the supervisor calls setsid()
        // itself as its first act.
        let tx = self.internal_tx.clone();
        match cmd.spawn() {
            Ok(mut child) => {
                tokio::spawn(async move {
                    let _ = child.wait().await;
                    let _ = tx.send(Internal::Ended {
                        job,
                        attempt,
                        outcome: ended_outcome(&dir),
                    });
                });
            }
            Err(e) => {
                let outcome = ExitReport {
                    exit_code: None,
                    error: Some(format!("cannot start the supervisor: {e}")),
                    result: None,
                    at: crate::manager::now(),
                };
                let _ = supervisor::write_durable(
                    &dir.join("exit.json"),
                    &serde_json::to_vec(&outcome).unwrap_or_default(),
                );
                let _ = tx.send(Internal::Ended {
                    job,
                    attempt,
                    outcome,
                });
            }
        }
    }

    /// Waits for a supervisor this agent did not start (found alive at start-up).
    fn watch_adopted(&self, job: Uuid, attempt: u32, dir: PathBuf) {
        let tx = self.internal_tx.clone();
        tokio::task::spawn_blocking(move || {
            let outcome = match supervisor::lock(&dir, true) {
                Ok(_lock) => ended_outcome(&dir),
                Err(e) => ExitReport {
                    exit_code: None,
                    error: Some(format!("cannot watch the supervisor: {e}")),
                    result: None,
                    at: crate::manager::now(),
                },
            };
            let _ = tx.send(Internal::Ended {
                job,
                attempt,
                outcome,
            });
        });
    }

    fn on_internal(
        &mut self,
        ev: Internal,
        tx: &UnboundedSender<FromAgent>,
        pending: &mut Vec<Report>,
        pending_exec: &mut Vec<(Uuid, u32)>,
    ) {
        match ev {
            Internal::Ended {
                job,
                attempt,
                outcome,
            } => self.on_ended(job, attempt, outcome, tx, pending, pending_exec),
            Internal::Respawn { job, attempt, dir } => self.spawn_direct(job, attempt, dir),
        }
    }

    fn on_ended(
        &mut self,
        job: Uuid,
        attempt: u32,
        outcome: ExitReport,
        tx: &UnboundedSender<FromAgent>,
        pending: &mut Vec<Report>,
        pending_exec: &mut Vec<(Uuid, u32)>,
    ) {
        self.running.remove(&(job, attempt));
        let dir = attempt_dir(&self.opts.dir, job, attempt);
        let data = std::fs::read(dir.join("log")).unwrap_or_default();
        let _ = tx.send(FromAgent::LogUpload {
            job,
            attempt,
            data: String::from_utf8_lossy(&data).into_owned(),
        });
        self.ended.insert((job, attempt), outcome.clone());
        pending.push(Report::Exited {
            job,
            attempt,
            outcome,
        });
        pending_exec.push((job, attempt));
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Removes the directories of acknowledged attempts that ended longer than `retention` ago.
pub fn sweep(dir: &Path, retention: Duration) -> usize {
    let mut removed = 0;
    for path in attempt_dirs(dir) {
        if path.extension().is_none_or(|e| e != "done") {
            continue;
        }
        let old = std::fs::metadata(path.join("exit.json"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age >= retention);
        if old && std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Where an attempt's directory goes once the server acknowledged its end.
pub fn done_dir(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(".done");
    PathBuf::from(name)
}

fn read_spec(dir: &Path) -> Option<Assignment> {
    serde_json::from_slice(&std::fs::read(dir.join("spec.json")).ok()?).ok()
}

fn read_exit(dir: &Path) -> Option<ExitReport> {
    serde_json::from_slice(&std::fs::read(dir.join("exit.json")).ok()?).ok()
}

fn read_started(dir: &Path) -> Option<i32> {
    let s: supervisor::Started =
        serde_json::from_slice(&std::fs::read(dir.join("started.json")).ok()?).ok()?;
    Some(s.sid)
}

/// How an attempt whose supervisor has ended came out: its `exit.json`, or `supervisor lost`.
fn ended_outcome(dir: &Path) -> ExitReport {
    read_exit(dir).unwrap_or_else(|| settle_lost_supervisor(dir))
}

/// A supervisor died without writing `exit.json`: kill every process left in its session and
/// record the attempt as ended, durably, so the verdict never changes.
fn settle_lost_supervisor(dir: &Path) -> ExitReport {
    if let Some(sid) = read_started(dir) {
        kill_session(sid);
    }
    let outcome = ExitReport {
        exit_code: None,
        error: Some("supervisor lost".into()),
        result: None,
        at: crate::manager::now(),
    };
    let _ = supervisor::write_durable(
        &dir.join("exit.json"),
        &serde_json::to_vec(&outcome).unwrap_or_default(),
    );
    outcome
}

/// SIGKILLs every process whose session id is `sid` (read from /proc).
pub fn kill_session(sid: i32) {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // state ppid pgrp session ...
        if fields.get(3).and_then(|s| s.parse::<i32>().ok()) == Some(sid) {
            // SAFETY: SIGKILL to a process of the dead supervisor's session.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Streams an attempt's log file from byte `from`: whole lines while it grows, the rest once the
/// attempt has ended (or at once without `follow`).
async fn stream_log(
    dir: PathBuf,
    stream: u64,
    from: u64,
    follow: bool,
    tx: UnboundedSender<FromAgent>,
) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut pos = from;
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    let done = done_dir(&dir);
    let mut waited_for_dir = Duration::ZERO;
    loop {
        // The directory is renamed `.done` once the server acknowledged the end: follow it.
        let dir = if dir.exists() { &dir } else { &done };
        let path = dir.join("log");
        // A follow may arrive just before the assignment it is about (the server commits, then
        // sends both); a directory that does not exist yet is waited for, a while.
        let missing = !dir.exists();
        if missing && follow && waited_for_dir < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited_for_dir += Duration::from_millis(10);
            continue;
        }
        let ended = dir.join("exit.json").exists() || missing;
        let mut progressed = false;
        if let Ok(mut f) = tokio::fs::File::open(&path).await {
            if f.seek(std::io::SeekFrom::Start(pos)).await.is_ok() {
                loop {
                    let n = match f.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    pos += n as u64;
                    carry.extend_from_slice(&buf[..n]);
                    progressed = true;
                    // Send whole lines only, so a chunk never splits a character.
                    if let Some(cut) = carry.iter().rposition(|&b| b == b'\n') {
                        let rest = carry.split_off(cut + 1);
                        let data = String::from_utf8_lossy(&carry).into_owned();
                        carry = rest;
                        if tx
                            .send(FromAgent::LogChunk {
                                stream,
                                data,
                                eof: false,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }
        if (ended || !follow) && !progressed {
            let data = String::from_utf8_lossy(&carry).into_owned();
            let _ = tx.send(FromAgent::LogChunk {
                stream,
                data,
                eof: true,
            });
            return;
        }
        if !progressed {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A [`Link`] to remote servers over websockets (`/api/v1/agent/ws`) in TLS under the cluster CA
/// whose `fingerprint` the join token carried, authenticated by the node's credential. Each
/// connection tries the servers in turn, starting after the last one that worked, so an agent
/// whose server died carries on with another.
pub fn ws_link(servers: Vec<String>, credential: String, fingerprint: [u8; 32]) -> Link {
    let tls = crate::tls::PinnedCa::client_config(fingerprint);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Arc::new(move || {
        let servers = servers.clone();
        let credential = credential.clone();
        let next = next.clone();
        let tls = tls.clone();
        Box::pin(async move {
            let mut last_err =
                std::io::Error::other("no server configured (agent.servers / --server)");
            for k in 0..servers.len() {
                let i = (next.load(std::sync::atomic::Ordering::Relaxed) + k) % servers.len();
                match ws_connect(&servers[i], &credential, tls.clone()).await {
                    Ok(link) => {
                        next.store(i, std::sync::atomic::Ordering::Relaxed);
                        return Ok(link);
                    }
                    Err(e) => last_err = std::io::Error::other(format!("{}: {e}", servers[i])),
                }
            }
            next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(last_err)
        })
    })
}

/// Opens the agent connection to one server: TLS (whatever the URL's scheme; the server serves
/// both on one port), then the websocket.
pub async fn ws_connect(
    server: &str,
    credential: &str,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<(UnboundedSender<FromAgent>, UnboundedReceiver<ToAgent>)> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let addr =
        crate::tls::host_port(server.trim_end_matches('/')).map_err(std::io::Error::other)?;
    let url = format!("wss://{addr}/api/v1/agent/ws");
    let mut req = url.into_client_request().map_err(std::io::Error::other)?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {credential}")
            .parse()
            .map_err(std::io::Error::other)?,
    );
    let stream =
        crate::tls::dial(&addr, tls, crate::tls::SERVER_NAME, Duration::from_secs(10)).await?;
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(req, stream),
    )
    .await
    .map_err(|_| std::io::Error::other("timed out"))?
    .map_err(std::io::Error::other)?;
    let (to_server, mut from_agent) = unbounded_channel::<FromAgent>();
    let (to_agent, from_server) = unbounded_channel::<ToAgent>();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                out = from_agent.recv() => match out {
                    Some(m) => {
                        let text = serde_json::to_string(&m).unwrap_or_default();
                        if ws.send(Message::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<ToAgent>(&t) {
                        Ok(m) => {
                            if to_agent.send(m).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            eprintln!("muster agent: the server sent a bad message: {e}");
                            break;
                        }
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        let _ = ws.close(None).await;
    });
    Ok((to_server, from_server))
}
