//! muster-agent: the node side. The agent runs the jobs a server assigns, each under a [`supervisor`] process, keeps
//! their logs in its data dir, streams them on request and reports every state change.
//!
//! The agent talks to a server only through the messages of `muster_wire::protocol`, over a
//! [`Link`]: in-process channels for the embedded agent of `muster up`, a websocket for remote
//! agents. Its own truth is on disk, one directory per attempt (`jobs/<job>.<attempt>/`), so it
//! can restart at any time: on start it re-adopts attempts whose supervisor still runs, reports
//! those that ended meanwhile, and never starts an attempt twice.
//!
//! A job's secret environment (its `MUSTER_TOKEN`) is never written to disk: the agent keeps it
//! out of `spec.json` and hands it to the supervisor (over the launcher's pipe, or in a direct
//! supervisor's environment). So an attempt found never started at agent start has no token: it
//! is left out of the `Hello`, which makes the server send its assignment again, and is started
//! with that; if the server does not send it by the time it acknowledges the `Hello`, it no
//! longer wants it, and the attempt is recorded as never started.
//!
//! Modules: [`supervisor`] and [`launcher`] (the per-attempt process and its fork server),
//! [`reap`] and [`cgroup`] (every process a job starts, reaped and killed at its end),
//! [`logs`], [`link`], [`join`], [`discovery`].

pub mod cgroup;
pub mod discovery;
pub mod join;
pub mod launcher;
pub mod link;
pub mod logs;
pub mod procs;
pub mod procsup;
pub mod reap;
pub mod supervisor;
pub mod upload;

pub use link::ws_link;
use muster_core::{Run, Uuid};
use muster_wire::perms;
pub use muster_wire::protocol::Link;
use muster_wire::protocol::{
    Assignment, ExitReport, FromAgent, Known, Report, ToAgent, SECRET_ENV,
};
use muster_wire::util::now;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use supervisor::Secrets;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::task::JoinHandle;

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
    /// Whether each attempt gets a cgroup v2 of its own where one is writable (`agent.cgroups`);
    /// without, the supervisor's subreaper alone finds the processes a job leaves behind.
    pub cgroups: bool,
    /// The ports long-running processes get (`agent.port_range`, inclusive).
    pub port_range: (u16, u16),
    /// A process's log is rotated at this size (`agent.process_log_max`), keeping this many old
    /// files (`agent.process_log_keep`).
    pub process_log_max: u64,
    pub process_log_keep: u32,
    /// Whether the agent stops its processes when it stops (`--stop-processes`); by default
    /// they run on under their supervisors.
    pub stop_processes: bool,
}

enum Internal {
    /// An attempt ended (its `exit.json` is written).
    Ended {
        job: Uuid,
        attempt: u32,
        outcome: ExitReport,
    },
    /// An ended attempt's log is in the server's blob store: its `Exited` report can go.
    Uploaded { job: Uuid, attempt: u32 },
    /// The launcher could not start this attempt's supervisor, or died before telling its end:
    /// start `muster supervise DIR` (see [`launcher`]).
    Respawn {
        job: Uuid,
        attempt: u32,
        dir: PathBuf,
    },
    /// The supervisor of a long-running process ended ([`procs`]).
    ProcEnded { id: Uuid, gen: u32, dir: PathBuf },
    /// Statuses of processes that changed (read from their `state.json`).
    ProcStates(Vec<(Uuid, u32, muster_core::process::ProcStatus)>),
}

/// What to tell the agent when the supervisor of `dir` ended: a process's end, or an
/// attempt's with its outcome.
fn end_event(job: Uuid, attempt: u32, dir: PathBuf) -> Internal {
    if procs::is_proc_dir(&dir) {
        Internal::ProcEnded {
            id: job,
            gen: attempt,
            dir,
        }
    } else {
        Internal::Ended {
            job,
            attempt,
            outcome: ended_outcome(&dir),
        }
    }
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
    /// Ended attempts whose log the server has stored (their report may still be unacknowledged).
    uploaded: HashSet<(Uuid, u32)>,
    /// Log uploads of this connection: where the server's acknowledgements go, and the task.
    uploads: HashMap<(Uuid, u32), (UnboundedSender<u64>, JoinHandle<()>)>,
    /// Report seq → the exec attempts it ended, marked `acked` once acknowledged.
    in_flight: BTreeMap<u64, Vec<(Uuid, u32)>>,
    next_seq: u64,
    internal_tx: UnboundedSender<Internal>,
    streams: HashMap<u64, JoinHandle<()>>,
    logs: Option<logs::LogServer>,
    launcher: Option<Launcher>,
    launcher_starts: u32,
    /// Where supervisors make the attempts' cgroups ([`cgroup::base`]), if anywhere.
    cgroup_base: Option<PathBuf>,
    /// The secret environment of each attempt in `running` (see the crate comment), until it
    /// ends: a supervisor started again (the launcher died) needs it too.
    secrets: HashMap<(Uuid, u32), Secrets>,
    /// Attempts found never started at agent start, waiting for their assignment again.
    unstarted: HashMap<(Uuid, u32), PathBuf>,
    /// The `seq` of the last `Hello`: once it is acknowledged, the server has sent again every
    /// assignment it still wants run.
    hello_seq: u64,
    /// Long-running processes ([`procs`]).
    procs: procs::Procs,
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
    perms::create_dir_all(&opts.dir.join("jobs"))?;
    secure(&opts.dir);
    let cgroup_base = if opts.cgroups {
        match cgroup::base() {
            Ok(b) => {
                tracing::info!(cgroup = %b.display(), "each job attempt gets a cgroup of its own under {}", b.display());
                Some(b)
            }
            Err(why) => {
                // Common (cgroup v1 hosts, a read-only /sys/fs/cgroup under systemd) and
                // handled: a note, not a warning.
                tracing::info!("no cgroup for job attempts ({why}): their supervisors alone find the processes they leave behind (as child subreapers); a supervisor killed with -9 leaves a job's daemons running");
                None
            }
        }
    } else {
        None
    };
    let (internal_tx, mut internal_rx) = unbounded_channel();
    let node_id = std::fs::read_to_string(opts.dir.join("node-id"))
        .ok()
        .map(|s| s.trim().to_string());
    let logs = match opts.log_endpoint {
        Some((addr, fingerprint)) => {
            match logs::LogServer::start(addr, opts.dir.clone(), fingerprint).await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(%addr, "cannot serve logs on {addr}: {e}; logs go over the server connection");
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
        uploaded: HashSet::new(),
        uploads: HashMap::new(),
        in_flight: BTreeMap::new(),
        next_seq: 1,
        internal_tx,
        streams: HashMap::new(),
        goodbye: None,
        reconnect: false,
        launcher: None,
        launcher_starts: 0,
        cgroup_base,
        secrets: HashMap::new(),
        unstarted: HashMap::new(),
        hello_seq: 0,
        procs: procs::Procs::default(),
    };
    agent.adopt().await?;
    agent.adopt_processes();
    // Process states come from an inotify watch as they change; the scan behind it is a
    // safety net every 2 s (each 100 ms where inotify cannot be had).
    let (watch_dir, watch_tx) = (agent.opts.dir.clone(), agent.internal_tx.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("proc-states".into())
        .spawn(move || {
            if let Err(e) = procs::watch_states(&watch_dir, &watch_tx, &ready_tx) {
                tracing::warn!(
                    "no inotify watch on process states ({e}): they are scanned every 100 ms"
                );
                let _ = ready_tx.send(false);
            }
        })?;
    // The watch is set up in a moment (a watch per process directory); without it, the scan.
    let every = match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(true) => Duration::from_secs(2),
        _ => Duration::from_millis(100),
    };
    let poller = tokio::spawn(procs::poll_states(
        agent.opts.dir.clone(),
        agent.internal_tx.clone(),
        every,
    ));
    let _poller = AbortOnDrop(poller);
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
            _ = &mut shutdown => return agent.stopping(),
            c = (link)() => c,
        };
        let (tx, mut rx) = match conn {
            Ok(c) => {
                backoff = Duration::from_millis(100);
                c
            }
            Err(e) => {
                tracing::warn!("cannot reach the server: {e}; again in {backoff:?}");
                tokio::select! {
                    _ = &mut shutdown => return agent.stopping(),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        agent.hello(&tx);
        // Whether the server asked for the reconnect (it does not lead the cluster, e.g. it is
        // still starting): nothing went wrong then.
        let mut asked = false;
        let mut beat = tokio::time::interval(agent.opts.heartbeat);
        let mut pending: Vec<Report> = Vec::new();
        let mut pending_exec: Vec<(Uuid, u32)> = Vec::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    agent.drop_connection();
                    return agent.stopping();
                }
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    agent.on_message(msg, &tx, &mut pending, &mut pending_exec);
                    while let Ok(msg) = rx.try_recv() {
                        agent.on_message(msg, &tx, &mut pending, &mut pending_exec);
                    }
                    if agent.goodbye.is_some() {
                        break;
                    }
                    if std::mem::take(&mut agent.reconnect) {
                        asked = true;
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
        agent.drop_connection();
        cut_off_since = std::time::Instant::now();
        if agent.goodbye.is_none() {
            if asked {
                tracing::info!("the server does not lead the cluster now; connecting again");
            } else {
                tracing::warn!("lost the server; reconnecting");
            }
            // A breath before the next server (a follower sends us on our way at once).
            tokio::select! {
                _ = &mut shutdown => return agent.stopping(),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}

impl Agent {
    /// The agent stops: its processes run on, unless it was told to stop them.
    fn stopping(&mut self) -> std::io::Result<()> {
        if self.opts.stop_processes {
            self.stop_all_processes();
        }
        Ok(())
    }

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
                        at: now(),
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
                        // Never started: the command did not run, so starting it is its first
                        // and only run — but its token is not on disk. Left out of the Hello,
                        // it makes the server send the assignment again (see the crate
                        // comment).
                        drop(lock);
                        self.unstarted.insert((job, attempt), dir);
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
        let mut upload = Vec::new();
        for (&(job, attempt), outcome) in &self.ended {
            if self.uploaded.contains(&(job, attempt)) {
                known.push(Known::Exited {
                    job,
                    attempt,
                    outcome: outcome.clone(),
                });
                exec.push((job, attempt));
            } else {
                // Its log goes up first; until then the server keeps it running.
                known.push(Known::Running { job, attempt });
                upload.push((job, attempt));
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.hello_seq = seq;
        self.in_flight.clear();
        self.in_flight.insert(seq, exec);
        let _ = tx.send(FromAgent::Hello {
            protocol: muster_wire::protocol::PROTOCOL_VERSION,
            name: self.opts.name.clone(),
            node_id: self.node_id.clone(),
            slots: self.opts.slots,
            labels: self.opts.labels.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            known,
            seq,
            log_endpoint: self.logs.as_ref().map(|l| l.offer()),
            processes: self.process_reports(),
        });
        // Logs of attempts that ended while no server listened.
        for (job, attempt) in upload {
            self.start_upload(job, attempt, tx);
        }
    }

    /// Uploads an ended attempt's log over this connection; [`Internal::Uploaded`] says when the
    /// server has it.
    fn start_upload(&mut self, job: Uuid, attempt: u32, tx: &UnboundedSender<FromAgent>) {
        if self.uploads.contains_key(&(job, attempt)) {
            return;
        }
        let (ack_tx, acks) = unbounded_channel();
        let log = attempt_dir(&self.opts.dir, job, attempt).join("log");
        let (tx, done) = (tx.clone(), self.internal_tx.clone());
        let task = tokio::spawn(async move {
            match upload::upload(log, job, attempt, tx, acks).await {
                Ok(()) => {
                    let _ = done.send(Internal::Uploaded { job, attempt });
                }
                Err(e) => tracing::debug!(%job, attempt, "log upload stopped: {e}"),
            }
        });
        self.uploads.insert((job, attempt), (ack_tx, task));
    }

    /// The connection is gone: its log streams and uploads stop (the next `Hello` starts the
    /// uploads again).
    fn drop_connection(&mut self) {
        for (_, h) in self.streams.drain() {
            h.abort();
        }
        for (_, (_, h)) in self.uploads.drain() {
            h.abort();
        }
    }

    fn on_message(
        &mut self,
        msg: ToAgent,
        tx: &UnboundedSender<FromAgent>,
        pending: &mut Vec<Report>,
        pending_exec: &mut Vec<(Uuid, u32)>,
    ) {
        match msg {
            ToAgent::Welcome {
                node_id, protocol, ..
            } => {
                if let Err(why) = muster_wire::protocol::check_server_version(protocol) {
                    tracing::error!("{why}");
                    self.goodbye = Some(why);
                    return;
                }
                if self.node_id.as_deref() != Some(node_id.as_str()) {
                    let _ = perms::write(&self.opts.dir.join("node-id"), &node_id);
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
                        self.uploaded.remove(&(job, attempt));
                        let dir = attempt_dir(&self.opts.dir, job, attempt);
                        let _ = std::fs::rename(&dir, done_dir(&dir));
                    }
                }
                if seq >= self.hello_seq && !self.unstarted.is_empty() {
                    self.settle_unstarted(pending, pending_exec);
                }
            }
            ToAgent::FollowLog {
                stream,
                job,
                attempt,
                from,
                follow,
                limit,
            } => {
                let mut dir = attempt_dir(&self.opts.dir, job, attempt);
                let proc_dir = procs::procs_dir(&self.opts.dir).join(job.to_string());
                if attempt == 0 && proc_dir.exists() {
                    // A long-running process's log (attempt 0 names it).
                    dir = proc_dir;
                }
                let tx = tx.clone();
                let h = tokio::spawn(stream_log(dir, stream, from, follow, limit, tx));
                self.streams.retain(|_, h| !h.is_finished());
                self.streams.insert(stream, h);
            }
            ToAgent::Reconnect => {
                self.reconnect = true;
            }
            ToAgent::Goodbye { reason } => {
                tracing::warn!("the server said goodbye: {reason}");
                self.goodbye = Some(reason);
            }
            ToAgent::LogStored {
                job,
                attempt,
                offset,
            } => {
                if let Some((acks, _)) = self.uploads.get(&(job, attempt)) {
                    let _ = acks.send(offset);
                }
            }
            ToAgent::StopLog { stream } => {
                if let Some(h) = self.streams.remove(&stream) {
                    h.abort();
                }
            }
            ToAgent::StartProcess { process, .. } => self.start_process(*process, tx),
            ToAgent::StopProcess { id, gen, remove } => self.stop_process(id, gen, remove, tx),
            ToAgent::RestartProcess { id, gen } => self.restart_process(id, gen),
            ToAgent::Certificate { cert, ca } => {
                if let Some(l) = &self.logs {
                    if let Err(e) = l.certify(&cert, &ca) {
                        tracing::error!("log endpoint certificate refused: {e}");
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
        let _ = perms::write(&dir.join("kill"), b"");
        if let Some(started) = read_started(&dir) {
            // SAFETY: SIGTERM to the supervisor, which passes it on to every process of the job.
            unsafe { libc::kill(started.sid, libc::SIGTERM) };
        }
    }

    /// What every job and process of this node is told of it: `MUSTER_EXE`, the muster binary
    /// (so a job or a model's predictor runs `"$MUSTER_EXE" ...` whatever its `PATH`), and
    /// `MUSTER_NODE_DIR`, the agent's data dir (where model bundles and environments are kept).
    pub(crate) fn node_env(&self, env: &mut BTreeMap<String, String>) {
        env.insert(
            "MUSTER_EXE".into(),
            self.opts.exe.to_string_lossy().into_owned(),
        );
        let dir = std::path::absolute(&self.opts.dir).unwrap_or_else(|_| self.opts.dir.clone());
        env.insert("MUSTER_NODE_DIR".into(), dir.to_string_lossy().into_owned());
    }

    /// Cut off for `lost_after`: the server has failed these jobs over to other nodes.
    fn kill_retryable(&self) {
        for (&(job, attempt), &retryable) in &self.running {
            if retryable {
                tracing::warn!(%job, attempt, "no server for too long; stopping retryable job {job} attempt {attempt}");
                self.kill(job, attempt);
            }
        }
    }

    fn assign(&mut self, mut a: Assignment, pending: &mut Vec<Report>) {
        a.run_as = self.opts.run_as.clone();
        a.cgroup = self.cgroup_base.clone();
        self.node_env(&mut a.env);
        // The credentials stay in memory: spec.json is on disk for as long as the attempt's
        // directory is kept.
        let secrets: Secrets = SECRET_ENV
            .iter()
            .filter_map(|k| a.env.remove_entry(*k))
            .collect();
        let key = (a.job, a.attempt);
        if self.running.contains_key(&key) {
            return;
        }
        if let Some(dir) = self.unstarted.remove(&key) {
            // Sent again for an attempt found never started at agent start: now it has its
            // secrets. Its spec is written again from this assignment (the agent's settings
            // may have changed since); no supervisor has started, so none reads it meanwhile
            // but one that would only find it the same attempt.
            let _ = write_spec(&dir, &a);
            let retryable = a.retryable;
            self.spawn_supervisor(a.job, a.attempt, dir, retryable, secrets);
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
                        at: now(),
                    },
                });
            }
            Run::Exec(_) | Run::Shell(_) => {
                let dir = attempt_dir(&self.opts.dir, a.job, a.attempt);
                // mkdir is the once-only gate: an attempt whose directory exists is never
                // started from here again.
                if let Some(shard) = dir.parent() {
                    let _ = perms::create_dir(shard);
                }
                match perms::create_dir(&dir) {
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
                                at: now(),
                            },
                        });
                        return;
                    }
                }
                if let Err(e) = write_spec(&dir, &a) {
                    let outcome = ExitReport {
                        exit_code: None,
                        error: Some(format!("agent cannot write the job spec: {e}")),
                        result: None,
                        at: now(),
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
                self.spawn_supervisor(a.job, a.attempt, dir, a.retryable, secrets);
            }
        }
    }

    /// Attempts found never started at agent start whose assignment the server did not send
    /// again before it acknowledged the `Hello`: it no longer wants them run (it ended the job
    /// meanwhile, say). Each is recorded as never started.
    fn settle_unstarted(&mut self, pending: &mut Vec<Report>, pending_exec: &mut Vec<(Uuid, u32)>) {
        for ((job, attempt), dir) in std::mem::take(&mut self.unstarted) {
            if dir.join("started.json").exists() {
                // A supervisor started late (by a launcher of the agent before the restart)
                // ran it after all: its end is watched like any adopted one's.
                let retryable = read_spec(&dir).is_some_and(|a| a.retryable);
                self.running.insert((job, attempt), retryable);
                self.watch_adopted(job, attempt, dir);
                continue;
            }
            let outcome = ExitReport {
                exit_code: None,
                error: Some(
                    "never started: the agent restarted before it started the job, and the server did not send it again".into(),
                ),
                result: None,
                at: now(),
            };
            let _ = supervisor::write_durable(
                &dir.join("exit.json"),
                &serde_json::to_vec(&outcome).unwrap_or_default(),
            );
            self.ended.insert((job, attempt), outcome.clone());
            pending.push(Report::Exited {
                job,
                attempt,
                outcome,
            });
            pending_exec.push((job, attempt));
        }
    }

    /// Starts an attempt's supervisor: forked by the launcher, or else `muster supervise DIR`.
    fn spawn_supervisor(
        &mut self,
        job: Uuid,
        attempt: u32,
        dir: PathBuf,
        retryable: bool,
        secrets: Secrets,
    ) {
        self.running.insert((job, attempt), retryable);
        self.secrets.insert((job, attempt), secrets);
        if !self.launch(job, attempt, &dir) {
            self.spawn_direct(job, attempt, dir);
        }
    }

    /// Hands the attempt to the launcher (starting one if needed); false when it cannot take it.
    fn launch(&mut self, job: Uuid, attempt: u32, dir: &Path) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let mut msg = dir.as_os_str().as_bytes().to_vec();
        if msg.contains(&0) || msg.contains(&launcher::SEPARATOR) {
            return false;
        }
        for (k, v) in self.secrets.get(&(job, attempt)).into_iter().flatten() {
            let sep = launcher::SEPARATOR as char;
            if k.contains('=') || k.contains(sep) || v.contains(sep) {
                return false; // Not expressible on the pipe: a direct supervisor takes it.
            }
            msg.push(launcher::SEPARATOR);
            msg.extend_from_slice(k.as_bytes());
            msg.push(b'=');
            msg.extend_from_slice(v.as_bytes());
        }
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
                    tracing::warn!("cannot start the supervisor launcher: {e}; starting supervisors one by one");
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
        tracing::warn!(
            "the supervisor launcher started nothing for {}s; starting {} supervisor(s) directly",
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
                        end_event(job, attempt, dir)
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
        for (k, v) in self.secrets.get(&(job, attempt)).into_iter().flatten() {
            cmd.env(format!("{}{k}", supervisor::SECRET_PREFIX), v);
        }
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
                    let _ = tx.send(end_event(job, attempt, dir));
                });
            }
            Err(e) if procs::is_proc_dir(&dir) => {
                tracing::error!(dir = %dir.display(), "cannot start the supervisor of {}: {e}", dir.display());
                let _ = tx.send(end_event(job, attempt, dir));
            }
            Err(e) => {
                let outcome = ExitReport {
                    exit_code: None,
                    error: Some(format!("cannot start the supervisor: {e}")),
                    result: None,
                    at: now(),
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
                    at: now(),
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
            } => {
                self.running.remove(&(job, attempt));
                self.secrets.remove(&(job, attempt));
                self.ended.insert((job, attempt), outcome);
                self.start_upload(job, attempt, tx);
            }
            Internal::Uploaded { job, attempt } => {
                self.uploads.remove(&(job, attempt));
                if let Some(outcome) = self.ended.get(&(job, attempt)) {
                    self.uploaded.insert((job, attempt));
                    pending.push(Report::Exited {
                        job,
                        attempt,
                        outcome: outcome.clone(),
                    });
                    pending_exec.push((job, attempt));
                }
            }
            Internal::Respawn { job, attempt, dir } => self.spawn_direct(job, attempt, dir),
            Internal::ProcEnded { id, gen, dir } => self.process_ended(id, gen, dir, tx),
            Internal::ProcStates(states) => self.process_states(states, tx),
        }
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

/// Writes an attempt's `spec.json` (mode 0600, without its secrets), whole or not at all: the
/// supervisor locks and reads it.
fn write_spec(dir: &Path, a: &Assignment) -> std::io::Result<()> {
    debug_assert!(SECRET_ENV.iter().all(|k| !a.env.contains_key(*k)));
    let spec = serde_json::to_vec(a).expect("an assignment serializes");
    let tmp = dir.join("spec.tmp");
    perms::write(&tmp, spec)?;
    std::fs::rename(&tmp, dir.join("spec.json"))
}

/// Closes to other users what an older version (or a hand) left open in the agent's data dir
/// `dir`: the directory, its files (the node credential, keys), `jobs` and its shards, and the
/// attempts not yet acknowledged with their files. Acknowledged (`.done`) attempts are left
/// alone — there may be a month of them, and the shards' mode keeps them private.
fn secure(dir: &Path) {
    let mut paths = vec![dir.to_path_buf()];
    let entries = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    paths.extend(entries(dir).into_iter().filter(|p| !p.ends_with("jobs")));
    paths.push(dir.join("jobs"));
    paths.extend(entries(&dir.join("jobs")));
    for attempt in attempt_dirs(dir) {
        if attempt.extension().is_some_and(|e| e == "done") {
            continue;
        }
        paths.extend(entries(&attempt));
        paths.push(attempt);
    }
    perms::repair_all(paths.iter().map(PathBuf::as_path));
}

fn read_spec(dir: &Path) -> Option<Assignment> {
    serde_json::from_slice(&std::fs::read(dir.join("spec.json")).ok()?).ok()
}

fn read_exit(dir: &Path) -> Option<ExitReport> {
    serde_json::from_slice(&std::fs::read(dir.join("exit.json")).ok()?).ok()
}

fn read_started(dir: &Path) -> Option<supervisor::Started> {
    serde_json::from_slice(&std::fs::read(dir.join("started.json")).ok()?).ok()
}

/// How an attempt whose supervisor has ended came out: its `exit.json`, or `supervisor lost`.
fn ended_outcome(dir: &Path) -> ExitReport {
    read_exit(dir).unwrap_or_else(|| settle_lost_supervisor(dir))
}

/// Kills whatever a supervisor of the attempt directory `dir` left: every process of its
/// session and of the attempt's cgroup (which holds the daemons that left the session), and
/// removes the cgroup once empty.
pub fn kill_leftovers(dir: &Path) {
    let Some(started) = read_started(dir) else {
        return;
    };
    kill_session(started.sid);
    if let Some(path) = started.cgroup {
        let cg = cgroup::Cgroup::at(path);
        cg.kill();
        // The kernel empties a killed cgroup within moments; a cgroup still busy after a second
        // (a process stuck in the kernel) is left in place, harmless.
        let end = std::time::Instant::now() + Duration::from_secs(1);
        while cg.populated() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = cg.remove();
    }
    cgroup::remove_v1(&started.v1);
}

/// A supervisor died without writing `exit.json`: kill every process it left and record the
/// attempt as ended, durably, so the verdict never changes.
fn settle_lost_supervisor(dir: &Path) -> ExitReport {
    let started = dir.join("started.json").exists();
    kill_leftovers(dir);
    let outcome = ExitReport {
        exit_code: None,
        // Without `started.json` the command never ran (it is written durably first).
        error: Some(if started {
            "supervisor lost".into()
        } else {
            "the supervisor ended before it started the job".into()
        }),
        result: None,
        at: now(),
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
/// attempt has ended (or at once without `follow`). With `limit`, it ends (`eof`) at the first
/// line end at or past `limit` bytes from `from`, so a reader catching up takes the log one
/// window at a time. Every chunk but the last of an ended attempt ends on a line end (and so on a
/// character: the supervisor writes whole UTF-8 lines).
async fn stream_log(
    dir: PathBuf,
    stream: u64,
    from: u64,
    follow: bool,
    limit: Option<u64>,
    tx: UnboundedSender<FromAgent>,
) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut pos = from;
    let mut sent: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    let done = done_dir(&dir);
    let mut waited_for_dir = Duration::ZERO;
    let chunk = |data: String, eof: bool| FromAgent::LogChunk { stream, data, eof };
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
        // Checked before the read: when the attempt had ended by then, reading to the end of
        // the file reads all of it.
        let ended = dir.join("exit.json").exists() || missing;
        let mut progressed = false;
        let file = tokio::fs::File::open(&path).await;
        if file.is_err() && !missing && !dir.exists() {
            // The directory was renamed `.done` between the looks above and the open (the
            // server acknowledged the end just now): look again, never end on this.
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        if let Ok(mut f) = file {
            if f.metadata().await.is_ok_and(|m| m.len() < pos) {
                // Shorter than what was read: a process's log was rotated. On from its start.
                pos = 0;
                carry.clear();
            }
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
                        let mut data = std::mem::replace(&mut carry, rest);
                        let window_full = limit.is_some_and(|l| sent + data.len() as u64 >= l);
                        if let Some(l) = limit.filter(|_| window_full) {
                            // Up to the first line end at or past the limit.
                            let want = (l - sent) as usize;
                            let end = data[want.saturating_sub(1)..]
                                .iter()
                                .position(|&b| b == b'\n')
                                .map_or(data.len(), |p| want.saturating_sub(1) + p + 1);
                            data.truncate(end);
                        }
                        sent += data.len() as u64;
                        let text = String::from_utf8_lossy(&data).into_owned();
                        if tx.send(chunk(text, false)).is_err() {
                            return;
                        }
                        if window_full {
                            let _ = tx.send(chunk(String::new(), true));
                            return;
                        }
                    }
                }
            }
        }
        if (ended || !follow) && !progressed {
            // An ended attempt's last bytes go too; a running one's unfinished line waits for
            // the next read.
            let data = if ended {
                String::from_utf8_lossy(&carry).into_owned()
            } else {
                String::new()
            };
            let _ = tx.send(chunk(data, true));
            return;
        }
        if !progressed {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a whole stream of `stream_log`: its text and how many chunks it took.
    async fn read(dir: &Path, from: u64, follow: bool, limit: Option<u64>) -> (String, usize) {
        let (tx, mut rx) = unbounded_channel();
        tokio::spawn(stream_log(dir.to_path_buf(), 1, from, follow, limit, tx));
        let (mut text, mut chunks) = (String::new(), 0);
        while let Some(FromAgent::LogChunk { data, eof, .. }) = rx.recv().await {
            text.push_str(&data);
            chunks += 1;
            if eof {
                break;
            }
        }
        (text, chunks)
    }

    /// The server acknowledges an attempt's end (its directory is renamed `.done`) while a follow
    /// reads it: the follow still gets every line before its end.
    #[tokio::test]
    async fn a_follow_racing_the_rename_to_done_gets_every_line() {
        let base = std::env::temp_dir().join(format!("muster-stream-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let log: String = (0..200).map(|i| format!("t out line {i}\n")).collect();
        for round in 0..300 {
            let dir = base.join(format!("a{round}.1"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("log"), &log).unwrap();
            std::fs::write(dir.join("exit.json"), "{}").unwrap();
            let (tx, mut rx) = unbounded_channel();
            let reading = tokio::spawn(stream_log(dir.clone(), 1, 0, true, None, tx));
            // Rename at a moment that moves from round to round.
            for _ in 0..(round % 7) {
                tokio::task::yield_now().await;
            }
            std::fs::rename(&dir, done_dir(&dir)).unwrap();
            let mut text = String::new();
            while let Some(FromAgent::LogChunk { data, eof, .. }) = rx.recv().await {
                text.push_str(&data);
                if eof {
                    break;
                }
            }
            reading.await.unwrap();
            assert_eq!(text.len(), log.len(), "round {round}");
        }
        let _ = std::fs::remove_dir_all(&base);
    }

    #[tokio::test]
    async fn a_log_is_read_in_windows_that_end_on_line_ends() {
        let dir = std::env::temp_dir().join(format!("muster-stream-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log: String = (0..5000).map(|i| format!("t out line {i} ü\n")).collect();
        std::fs::write(dir.join("log"), &log).unwrap();
        // Running (no exit.json): without follow, what is there now.
        assert_eq!(read(&dir, 0, false, None).await.0, log);
        // Windows of about 10 KiB, each ending on a line end, together the whole log.
        let mut got = String::new();
        let mut windows = 0;
        loop {
            let (w, _) = read(&dir, got.len() as u64, false, Some(10_000)).await;
            if w.is_empty() {
                break;
            }
            assert!(w.ends_with('\n'));
            assert!(w.len() >= 10_000 || got.len() + w.len() == log.len());
            assert!(w.len() < 10_000 + 100, "{}", w.len());
            got.push_str(&w);
            windows += 1;
        }
        assert_eq!(got, log);
        assert!(windows >= log.len() / 10_100, "{windows}");
        // Ended: a follow ends, with the last unfinished line too.
        std::fs::write(dir.join("log"), format!("{log}partial")).unwrap();
        std::fs::write(dir.join("exit.json"), "{}").unwrap();
        assert_eq!(read(&dir, 0, true, None).await.0, format!("{log}partial"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
