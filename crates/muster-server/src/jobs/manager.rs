//! The job manager: one thread that owns every running tree and is the only writer of job and
//! tree state.
//!
//! It works in *batches*: it blocks for the first command, drains whatever else is queued (agent
//! reports, new trees, aborts), runs the [`TreeRun`] rules, places ready jobs on nodes, and then
//! commits every change of the batch in **one** store transaction (group commit). Only after the
//! commit does it send assignments and kills to agents, acknowledge agent reports, answer API
//! callers and publish events, so nothing anyone has been told can be lost by a crash.
//!
//! Why a thread and not a task: the store calls block (SQLite), and one owner of the state needs
//! no locks at all.

use super::clock::Clock;
use super::hooks::{intent_key, parse_intent_key, Hooks, Observer, INTENTS};
use crate::metrics::JobStats;
use muster_core::sched::{Backoff, Effect, Outcome, TreeRun};
use muster_core::spec::NewTree;
use muster_core::{JobState, Run, TreeState, Ts, Uuid};
use muster_store::{Change, Created, Event, Node, Store};
use muster_wire::protocol::{Assignment, ExitReport, Known, Report, ToAgent};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc::UnboundedSender, oneshot};

/// Settings of the manager, from `[jobs]`.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub backoff: Backoff,
    pub kill_grace_ms: u64,
    pub log_max: u64,
    /// `MUSTER_URL` given to jobs.
    pub url: String,
    /// A connected node with no heartbeat for this long is `down` (3 × `discovery.interval`).
    pub down_after: Duration,
    /// A node unheard of for this long is `lost` (`nodes.lost_after`).
    pub lost_after: Duration,
}

/// Why an abort was refused.
#[derive(Debug, PartialEq)]
pub enum AbortError {
    NotFound,
    Finished(TreeState),
}

/// A request to the manager.
pub enum Cmd {
    Create {
        new: NewTree,
        idempotency_key: Option<String>,
        reply: oneshot::Sender<Result<Created, muster_store::StoreError>>,
    },
    Abort {
        tree: Uuid,
        reply: oneshot::Sender<Result<(), AbortError>>,
    },
    /// An agent connected (its `Hello`).
    Connect {
        session: u64,
        node: Node,
        tx: UnboundedSender<ToAgent>,
        known: Vec<Known>,
        seq: u64,
    },
    Disconnect {
        session: u64,
    },
    Reports {
        session: u64,
        seq: u64,
        reports: Vec<Report>,
    },
    /// An agent's heartbeat.
    Heartbeat {
        session: u64,
    },
    /// An operator changed a node: labels (`None` values remove), `draining` on or off.
    UpdateNode {
        id: String,
        labels: BTreeMap<String, Option<String>>,
        draining: Option<bool>,
        reply: oneshot::Sender<Result<Node, String>>,
    },
    /// A node was removed (its credential revoked): it gets no more jobs and is told to go.
    RemoveNode {
        id: String,
        reply: oneshot::Sender<bool>,
    },
    /// This server gained (`true`) or lost the cluster's leader lease: only the leader
    /// schedules; a server that loses the lease forgets its running trees and its agents.
    Lead(bool),
    /// The log of an attempt is in the blob store under `blob`.
    Log {
        job: Uuid,
        attempt: u32,
        blob: String,
    },
    Shutdown,
}

/// What reacts to the manager's outcomes (see [`super::hooks`]), and the clock it reads.
pub struct Reactions {
    pub observers: Vec<Box<dyn Observer>>,
    pub hooks: Hooks,
    pub clock: Arc<dyn Clock>,
}

/// The handle the API and the agent sessions use.
#[derive(Clone)]
pub struct Manager {
    tx: Sender<Cmd>,
    alive: Arc<AtomicBool>,
    store_full: Arc<AtomicBool>,
}

impl Manager {
    /// Starts the manager thread. It first resumes every running tree of the store.
    pub fn start(
        store: Arc<dyn Store>,
        config: ManagerConfig,
        stats: Arc<JobStats>,
        reactions: Reactions,
    ) -> std::io::Result<(Manager, std::thread::JoinHandle<()>)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let alive = Arc::new(AtomicBool::new(true));
        let flag = alive.clone();
        let store_full = Arc::new(AtomicBool::new(false));
        let full = store_full.clone();
        let handle = std::thread::Builder::new()
            .name("job-manager".into())
            .spawn(move || {
                let mut m = State::new(store, config, stats, reactions, full);
                m.run(rx);
                flag.store(false, Ordering::SeqCst);
            })?;
        Ok((
            Manager {
                tx,
                alive,
                store_full,
            },
            handle,
        ))
    }

    pub fn send(&self, cmd: Cmd) -> bool {
        self.tx.send(cmd).is_ok()
    }

    /// Whether the manager thread still runs (for `/readyz`).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Whether the manager's last store write failed for lack of space and it is waiting to
    /// try again (for `/readyz`).
    pub fn store_full(&self) -> bool {
        self.store_full.load(Ordering::SeqCst)
    }

    pub async fn create(
        &self,
        new: NewTree,
        idempotency_key: Option<String>,
    ) -> Result<Created, muster_store::StoreError> {
        let stopped = || muster_store::StoreError::Other("the job manager has stopped".into());
        let (reply, rx) = oneshot::channel();
        if !self.send(Cmd::Create {
            new,
            idempotency_key,
            reply,
        }) {
            return Err(stopped());
        }
        rx.await.map_err(|_| stopped())?
    }

    pub async fn abort(&self, tree: Uuid) -> Result<(), AbortError> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Cmd::Abort { tree, reply }) {
            return Err(AbortError::NotFound);
        }
        rx.await.unwrap_or(Err(AbortError::NotFound))
    }
}

struct Entry {
    run: TreeRun,
    /// Each job's state as last committed (the compare-and-set expectation).
    persisted: Vec<JobState>,
}

struct Conn {
    session: u64,
    node: Node,
    tx: UnboundedSender<ToAgent>,
    /// Jobs that take a slot (exec, shell) running there now.
    used: u32,
    last_beat: std::time::Instant,
}

enum Placement {
    Node(String),
    Wait,
    Never(String),
}

struct State {
    store: Arc<dyn Store>,
    config: ManagerConfig,
    epoch: u64,
    trees: HashMap<Uuid, Entry>,
    /// Running jobs → their tree, to route agent reports.
    job_tree: HashMap<Uuid, Uuid>,
    ready_noop: VecDeque<(Uuid, u32)>,
    ready_work: VecDeque<(Uuid, u32)>,
    timers: BinaryHeap<Reverse<(Ts, Uuid, u32)>>,
    /// Connected agents by node id.
    conns: HashMap<String, Conn>,
    /// Every node ever registered, by id.
    known_nodes: HashMap<String, Node>,
    // The batch being built.
    dirty_jobs: Vec<(Uuid, u32)>,
    dirty_set: HashSet<(Uuid, u32)>,
    dirty_trees: HashSet<Uuid>,
    outbox: HashMap<String, Vec<Assignment>>,
    messages: Vec<(UnboundedSender<ToAgent>, ToAgent)>,
    after_commit: Vec<Box<dyn FnOnce() + Send>>,
    /// Writes of the batch that are not job or tree states (log records).
    extra: Vec<Change>,
    stats: Arc<JobStats>,
    /// When each ready job became ready (for the start-latency histogram).
    ready_since: HashMap<(Uuid, u32), std::time::Instant>,
    /// Whoever hears of trees starting and ending, and of lost nodes.
    observers: Vec<Box<dyn Observer>>,
    /// The named hooks of jobs' outcomes.
    hooks: Hooks,
    /// Hooked jobs that ended in the batch being built: (tree, job index), told after the commit.
    hooked: Vec<(Uuid, u32)>,
    clock: Arc<dyn Clock>,
    /// Set while a write is held up by a full store (see [`Manager::store_full`]).
    store_full: Arc<AtomicBool>,
    /// Whether this server holds the leader lease.
    leading: bool,
    /// The round-robin turn for placing noop jobs.
    noop_turn: std::cell::Cell<usize>,
    /// The environment each active tree's jobs get from the observers (`MUSTER_TOKEN`).
    tree_env: HashMap<Uuid, BTreeMap<String, String>>,
    /// Nodes not connected now, since when (for `lost`).
    away: HashMap<String, std::time::Instant>,
    /// Nodes an operator set to drain.
    draining: HashSet<String>,
    started: std::time::Instant,
    last_liveness: std::time::Instant,
}

impl State {
    fn new(
        store: Arc<dyn Store>,
        config: ManagerConfig,
        stats: Arc<JobStats>,
        reactions: Reactions,
        store_full: Arc<AtomicBool>,
    ) -> State {
        let clock = reactions.clock;
        State {
            store_full,
            observers: reactions.observers,
            hooks: reactions.hooks,
            hooked: Vec::new(),
            leading: false,
            noop_turn: std::cell::Cell::new(0),
            store,
            config,
            stats,
            ready_since: HashMap::new(),
            away: HashMap::new(),
            tree_env: HashMap::new(),
            draining: HashSet::new(),
            started: clock.instant(),
            last_liveness: clock.instant(),
            epoch: clock.now().0 as u64,
            clock,
            trees: HashMap::new(),
            job_tree: HashMap::new(),
            ready_noop: VecDeque::new(),
            ready_work: VecDeque::new(),
            timers: BinaryHeap::new(),
            conns: HashMap::new(),
            known_nodes: HashMap::new(),
            dirty_jobs: Vec::new(),
            dirty_set: HashSet::new(),
            dirty_trees: HashSet::new(),
            outbox: HashMap::new(),
            messages: Vec::new(),
            after_commit: Vec::new(),
            extra: Vec::new(),
        }
    }

    fn run(&mut self, rx: Receiver<Cmd>) {
        loop {
            let wait = match self.timers.peek() {
                Some(Reverse((at, _, _))) => {
                    Duration::from_millis((at.0 - self.clock.now().0).clamp(0, 60_000) as u64)
                }
                None => Duration::from_secs(60),
            }
            .min(Duration::from_millis(250))
            // Wake when a silent node's time is up, so `down` comes on time.
            .min(self.next_down_in());
            let mut stop = false;
            match rx.recv_timeout(wait) {
                Ok(cmd) => stop |= self.handle(cmd),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
            let mut n = 0;
            while !stop && n < 20_000 {
                match rx.try_recv() {
                    Ok(cmd) => stop |= self.handle(cmd),
                    Err(_) => break,
                }
                n += 1;
            }
            self.fire_timers();
            self.liveness();
            self.schedule();
            self.stats
                .set_queue_depth(self.ready_work.len() + self.ready_noop.len());
            self.commit();
            if stop {
                return;
            }
        }
    }

    /// Resumes every running tree of the store (after a restart or a crash).
    fn recover(&mut self) {
        let t = self.clock.now();
        let nodes = retry_store(&self.store_full, || self.store.nodes());
        for n in nodes {
            // Every node starts away; it has `lost_after` of grace from now to come back.
            self.away.insert(n.id.clone(), self.clock.instant());
            if n.state == "draining" {
                self.draining.insert(n.id.clone());
            }
            self.known_nodes.insert(n.id.clone(), n);
        }
        let trees = retry_store(&self.store_full, || self.store.running_trees());
        for tree in trees {
            let jobs = retry_store(&self.store_full, || self.store.tree_jobs(tree.id));
            if jobs.is_empty() {
                continue;
            }
            let id = tree.id;
            for j in &jobs {
                if j.state == JobState::Running {
                    self.job_tree.insert(j.id, id);
                }
            }
            self.started(&tree);
            let persisted: Vec<JobState> = jobs.iter().map(|j| j.state).collect();
            for st in persisted.iter().filter(|s| !s.is_final()) {
                self.stats.moved(None, Some(*st));
            }
            let (run, fx) = TreeRun::new(tree, jobs, t);
            self.trees.insert(id, Entry { run, persisted });
            self.absorb(id, fx);
        }
    }

    /// The observers hear that the manager has `tree` in hand; what they give its jobs is kept.
    fn started(&mut self, tree: &muster_core::Tree) {
        let mut env = BTreeMap::new();
        for o in &mut self.observers {
            env.extend(o.started(tree));
        }
        self.tree_env.insert(tree.id, env);
    }

    /// Calls the hooks of outcomes recorded before a crash or a failover (their intents are
    /// still in the store): an outcome that is committed gets its hook now; an intent whose job
    /// has not ended in the store was written for a commit that never happened, and goes.
    fn recover_hooks(&mut self) {
        let intents = retry_store(&self.store_full, || self.store.docs(INTENTS, ""));
        for (key, doc) in intents {
            let Some((job_id, attempt)) = parse_intent_key(&key) else {
                continue;
            };
            let job = retry_store(&self.store_full, || self.store.job(job_id));
            if let Some(job) = job.filter(|j| j.state.is_final() && j.attempt == attempt) {
                let tree = retry_store(&self.store_full, || self.store.tree(job.tree));
                match (tree, self.hooks.get(&doc.value)) {
                    (Some(tree), Some(hook)) => hook.ended(&tree, &job),
                    (_, None) => tracing::warn!(
                        job = %job_id,
                        "no hook named {:?} for the outcome of job {job_id}",
                        doc.value
                    ),
                    (None, _) => {}
                }
            }
            retry_store(&self.store_full, || self.store.put_doc(INTENTS, &key, None));
        }
    }

    /// Handles one command; `true` means stop.
    fn handle(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Create { reply, .. } if !self.leading => {
                let _ = reply.send(Err(muster_store::StoreError::Unavailable(
                    "this server does not lead the cluster now".into(),
                )));
            }
            Cmd::Create {
                new,
                idempotency_key,
                reply,
            } => {
                let res = self
                    .store
                    .create_tree(&new.tree, &new.jobs, idempotency_key.as_deref());
                match &res {
                    Ok(_) => self.store_full.store(false, Ordering::SeqCst),
                    Err(muster_store::StoreError::NoSpace(_)) => {
                        self.store_full.store(true, Ordering::SeqCst)
                    }
                    Err(_) => {}
                }
                match res {
                    Ok(Created::New) => {
                        let id = new.tree.id;
                        self.started(&new.tree);
                        let persisted = new.jobs.iter().map(|j| j.state).collect();
                        self.stats.created(new.jobs.len());
                        let (run, fx) = TreeRun::new(new.tree, new.jobs, self.clock.now());
                        self.trees.insert(id, Entry { run, persisted });
                        self.absorb(id, fx);
                        self.after_commit.push(Box::new(move || {
                            let _ = reply.send(Ok(Created::New));
                        }));
                    }
                    Ok(existing) => {
                        let _ = reply.send(Ok(existing));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Cmd::Abort { tree, reply } => {
                let res = match self.trees.get_mut(&tree) {
                    Some(entry) => match entry.run.abort(self.clock.now()) {
                        Ok(fx) => {
                            // The tree's abort flag is written with (before) the aborted jobs.
                            self.dirty_trees.insert(tree);
                            self.absorb(tree, fx);
                            Ok(())
                        }
                        Err(state) => Err(AbortError::Finished(state)),
                    },
                    None => match self.store.tree(tree) {
                        Ok(Some(t)) => Err(AbortError::Finished(t.state)),
                        _ => Err(AbortError::NotFound),
                    },
                };
                self.after_commit.push(Box::new(move || {
                    let _ = reply.send(res);
                }));
            }
            Cmd::Connect {
                session,
                node,
                tx,
                known,
                seq,
            } => self.connect(session, node, tx, known, seq),
            Cmd::Disconnect { session } => {
                let gone: Vec<String> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.session == session)
                    .map(|(k, _)| k.clone())
                    .collect();
                for id in gone {
                    self.away.insert(id.clone(), self.clock.instant());
                    if let Some(c) = self.conns.remove(&id) {
                        // Written (retried until it is) before anyone is told.
                        self.set_node(Node {
                            state: "down".into(),
                            last_seen: self.clock.now(),
                            ..c.node
                        });
                    }
                }
            }
            Cmd::Reports {
                session,
                seq,
                reports,
            } => {
                for r in reports {
                    self.report(r);
                }
                self.ack(session, seq);
            }
            Cmd::Log { job, attempt, blob } => self.extra.push(Change::Log { job, attempt, blob }),
            Cmd::Heartbeat { session } => {
                let mut save = None;
                if let Some(c) = self.conns.values_mut().find(|c| c.session == session) {
                    c.last_beat = self.clock.instant();
                    // `last_seen` in the registry moves with the heartbeats, written at most
                    // every 5 s per node.
                    if self.clock.now().0 - c.node.last_seen.0 >= 5_000 {
                        c.node.last_seen = self.clock.now();
                        save = Some(c.node.clone());
                    }
                }
                if let Some(n) = save {
                    retry_store(&self.store_full, || self.store.put_node(&n));
                    self.known_nodes.insert(n.id.clone(), n);
                }
            }
            Cmd::UpdateNode {
                id,
                labels,
                draining,
                reply,
            } => {
                let res = self.update_node(&id, labels, draining);
                let _ = reply.send(res);
            }
            Cmd::RemoveNode { id, reply } => {
                let known = self.known_nodes.remove(&id).is_some();
                self.away.remove(&id);
                self.draining.remove(&id);
                if let Some(c) = self.conns.remove(&id) {
                    let _ = c.tx.send(ToAgent::Goodbye {
                        reason: "this node was removed from the cluster".into(),
                    });
                }
                let _ = reply.send(known);
            }
            Cmd::Lead(on) if on == self.leading => {}
            Cmd::Lead(true) => {
                tracing::info!("this server leads the cluster now");
                self.leading = true;
                self.started = self.clock.instant();
                self.recover();
                self.recover_hooks();
            }
            Cmd::Lead(false) => {
                tracing::warn!("this server no longer leads the cluster");
                self.leading = false;
                for c in self.conns.values() {
                    let _ = c.tx.send(ToAgent::Reconnect);
                }
                self.conns.clear();
                self.trees.clear();
                self.job_tree.clear();
                self.ready_noop.clear();
                self.ready_work.clear();
                self.timers.clear();
                self.away.clear();
                self.tree_env.clear();
                self.hooked.clear();
                self.dirty_jobs.clear();
                self.dirty_set.clear();
                self.dirty_trees.clear();
                self.outbox.clear();
            }
            Cmd::Shutdown => return true,
        }
        false
    }

    fn ack(&mut self, session: u64, seq: u64) {
        if let Some(c) = self.conns.values().find(|c| c.session == session) {
            self.messages.push((c.tx.clone(), ToAgent::Ack { seq }));
        }
    }

    fn connect(
        &mut self,
        session: u64,
        node: Node,
        tx: UnboundedSender<ToAgent>,
        known: Vec<Known>,
        seq: u64,
    ) {
        if !self.leading {
            let _ = tx.send(ToAgent::Reconnect);
            return;
        }
        let id = node.id.clone();
        let mut node = node;
        self.away.remove(&id);
        if self.draining.contains(&id) {
            node.state = "draining".into();
        }
        if let Some(old) = self.known_nodes.get(&id) {
            // Labels set by operators (PATCH) win over the agent's config until changed again.
            for (k, v) in &old.labels {
                node.labels.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        let _ = tx.send(ToAgent::Welcome {
            node_id: id.clone(),
            epoch: self.epoch,
            protocol: muster_wire::protocol::PROTOCOL_VERSION,
        });
        retry_store(&self.store_full, || self.store.put_node(&node));
        self.store.publish(&[Event::Node {
            id: id.clone(),
            name: node.name.clone(),
            state: node.state.clone(),
            at: self.clock.now(),
        }]);
        self.known_nodes.insert(id.clone(), node.clone());
        self.conns.insert(
            id.clone(),
            Conn {
                session,
                node,
                tx: tx.clone(),
                used: 0,
                last_beat: self.clock.instant(),
            },
        );
        let mut known_running: HashSet<(Uuid, u32)> = HashSet::new();
        for k in known {
            match k {
                Known::Running { job, attempt } => {
                    known_running.insert((job, attempt));
                }
                Known::Exited {
                    job,
                    attempt,
                    outcome,
                } => {
                    // Counted as running until the report is applied below.
                    known_running.insert((job, attempt));
                    self.report(Report::Exited {
                        job,
                        attempt,
                        outcome,
                    });
                }
            }
        }
        // Jobs this node should be running that it does not know were never delivered: send
        // them again (same attempt; the agent runs an attempt at most once). Kills asked for
        // while it was away are sent now.
        let mut resend = Vec::new();
        let mut kills = Vec::new();
        let mut used = 0;
        let mut ours: HashSet<(Uuid, u32)> = HashSet::new();
        for (tid, entry) in &self.trees {
            for (i, j) in entry.run.jobs.iter().enumerate() {
                if j.state != JobState::Running
                    || !node_is(j.node.as_deref(), &self.conns[&id].node)
                {
                    continue;
                }
                ours.insert((j.id, j.attempt));
                if entry.run.kill_requested(i as u32) {
                    kills.push(ToAgent::Kill {
                        job: j.id,
                        attempt: j.attempt,
                    });
                }
                if !known_running.contains(&(j.id, j.attempt)) {
                    resend.push((*tid, i as u32));
                }
                if takes_slot(&j.run) {
                    used += 1;
                }
            }
        }
        if let Some(c) = self.conns.get_mut(&id) {
            c.used = used;
        }
        for (tid, i) in resend {
            let a = self.assignment(tid, i);
            self.outbox.entry(id.clone()).or_default().push(a);
        }
        // Attempts the agent still runs that the server already ended (e.g. as `node lost`
        // while it was cut off) must not come back to life: kill them.
        for (job, attempt) in known_running.difference(&ours) {
            kills.push(ToAgent::Kill {
                job: *job,
                attempt: *attempt,
            });
        }
        for k in kills {
            self.messages.push((tx.clone(), k));
        }
        self.ack(session, seq);
    }

    fn report(&mut self, r: Report) {
        let Report::Exited {
            job,
            attempt,
            outcome,
        } = r;
        let Some(&tid) = self.job_tree.get(&job) else {
            return;
        };
        let Some(entry) = self.trees.get_mut(&tid) else {
            return;
        };
        let Some(i) = entry.run.index_of(&job) else {
            return;
        };
        let j = entry.run.job(i);
        if j.state != JobState::Running || j.attempt != attempt {
            return;
        }
        if takes_slot(&j.run) {
            if let Some(c) = self
                .conns
                .values_mut()
                .find(|c| node_is(j.node.as_deref(), &c.node))
            {
                c.used = c.used.saturating_sub(1);
            }
        }
        self.job_tree.remove(&job);
        let ExitReport {
            exit_code,
            error,
            result,
            ..
        } = outcome;
        let fx = entry.run.finish(
            i,
            attempt,
            Outcome {
                exit_code,
                error,
                result,
            },
            self.clock.now(),
            self.config.backoff,
            rand::random::<f64>(),
        );
        self.absorb(tid, fx);
    }

    fn update_node(
        &mut self,
        id: &str,
        labels: BTreeMap<String, Option<String>>,
        draining: Option<bool>,
    ) -> Result<Node, String> {
        let Some(mut node) = self.known_nodes.get(id).cloned() else {
            return Err(format!("node {id:?} not found"));
        };
        for (k, v) in labels {
            match v {
                Some(v) => node.labels.insert(k, v),
                None => node.labels.remove(&k),
            };
        }
        match draining {
            Some(true) => {
                self.draining.insert(id.to_string());
                if node.state == "ready" {
                    node.state = "draining".into();
                }
            }
            Some(false) => {
                self.draining.remove(id);
                if node.state == "draining" {
                    node.state = "ready".into();
                }
            }
            None => {}
        }
        self.set_node(node.clone());
        Ok(node)
    }

    /// Records a node's new record everywhere: registry, connection, store, event feed.
    fn set_node(&mut self, node: Node) {
        if let Some(c) = self.conns.get_mut(&node.id) {
            c.node = node.clone();
        }
        retry_store(&self.store_full, || self.store.put_node(&node));
        self.store.publish(&[Event::Node {
            id: node.id.clone(),
            name: node.name.clone(),
            state: node.state.clone(),
            at: self.clock.now(),
        }]);
        self.known_nodes.insert(node.id.clone(), node);
    }

    /// How long until a connected node that is not `down` yet has been silent for `down_after`.
    fn next_down_in(&self) -> Duration {
        self.conns
            .values()
            .filter(|c| c.node.state == "ready" || c.node.state == "draining")
            .map(|c| {
                self.config
                    .down_after
                    .saturating_sub(self.clock.since(c.last_beat))
            })
            .min()
            .map_or(Duration::MAX, |d| d + Duration::from_millis(1))
    }

    /// Node liveness (SPEC §5): a connected node silent for `down_after` is `down` (no new jobs);
    /// a node unheard of for `lost_after` is `lost`: its running jobs fail with `node lost`, or
    /// are retried elsewhere when they have retries left and no fixed node. After a server start,
    /// every node has `lost_after` of grace.
    fn liveness(&mut self) {
        if self.clock.since(self.last_liveness) < Duration::from_millis(10) {
            return;
        }
        self.last_liveness = self.clock.instant();
        let mut changed = Vec::new();
        for c in self.conns.values() {
            let silent = self.clock.since(c.last_beat);
            let want = if silent >= self.config.down_after {
                "down"
            } else if self.draining.contains(&c.node.id) {
                "draining"
            } else {
                "ready"
            };
            if c.node.state != want {
                changed.push(Node {
                    state: want.into(),
                    last_seen: self.clock.now(),
                    ..c.node.clone()
                });
            }
            if silent >= self.config.lost_after {
                self.away.entry(c.node.id.clone()).or_insert(c.last_beat);
            }
        }
        for n in changed {
            self.set_node(n);
        }
        let lost: Vec<String> = self
            .away
            .iter()
            .filter(|(_, since)| {
                self.clock.since(**since) >= self.config.lost_after
                    && self.clock.since(self.started) >= self.config.lost_after
            })
            .map(|(id, _)| id.clone())
            .filter(|id| self.known_nodes.get(id).is_some_and(|n| n.state != "lost"))
            .collect();
        for id in lost {
            let Some(node) = self.known_nodes.get(&id).cloned() else {
                continue;
            };
            self.conns.remove(&id);
            self.set_node(Node {
                state: "lost".into(),
                ..node.clone()
            });
            tracing::warn!(
                node = %node.name,
                "node {} is lost; failing its running jobs",
                node.name
            );
            for o in &mut self.observers {
                o.node_lost(&node);
            }
            let t = self.clock.now();
            let mut hits = Vec::new();
            for (tid, entry) in &self.trees {
                for (i, j) in entry.run.jobs.iter().enumerate() {
                    if j.state == JobState::Running && j.node.as_deref() == Some(node.name.as_str())
                    {
                        hits.push((*tid, i as u32, j.id, j.want_node.is_none()));
                    }
                }
            }
            for (tid, i, job, movable) in hits {
                self.job_tree.remove(&job);
                let retry = movable.then(|| (self.config.backoff, rand::random::<f64>()));
                let entry = self.trees.get_mut(&tid).expect("present");
                let fx = entry.run.lose(i, "node lost".into(), t, retry);
                self.absorb(tid, fx);
            }
        }
    }

    /// Carries out the effects of a transition (except the starts, which [`Self::schedule`] does).
    fn absorb(&mut self, tid: Uuid, fx: Vec<Effect>) {
        for e in fx {
            match e {
                Effect::Changed(i) => {
                    if self.dirty_set.insert((tid, i)) {
                        self.dirty_jobs.push((tid, i));
                    }
                }
                Effect::Ready(i) => {
                    let Some(entry) = self.trees.get(&tid) else {
                        continue;
                    };
                    match entry.run.job(i).run {
                        Run::Noop | Run::Group => self.ready_noop.push_back((tid, i)),
                        _ => self.ready_work.push_back((tid, i)),
                    }
                    self.ready_since.insert((tid, i), self.clock.instant());
                }
                Effect::Kill(i) => {
                    let Some(entry) = self.trees.get(&tid) else {
                        continue;
                    };
                    let j = entry.run.job(i);
                    if let Some(c) = self
                        .conns
                        .values()
                        .find(|c| node_is(j.node.as_deref(), &c.node))
                    {
                        self.messages.push((
                            c.tx.clone(),
                            ToAgent::Kill {
                                job: j.id,
                                attempt: j.attempt,
                            },
                        ));
                    }
                }
                Effect::Retry(i, at) => self.timers.push(Reverse((at, tid, i))),
                Effect::TreeDone => {
                    self.dirty_trees.insert(tid);
                }
            }
        }
    }

    fn fire_timers(&mut self) {
        let t = self.clock.now();
        while let Some(Reverse((at, tid, i))) = self.timers.peek().cloned() {
            if at > t {
                break;
            }
            self.timers.pop();
            if let Some(entry) = self.trees.get_mut(&tid) {
                let fx = entry.run.retry_due(i, t);
                self.absorb(tid, fx);
            }
        }
    }

    /// Starts ready jobs where they can run: grouping jobs resolve here, noop jobs take no slot,
    /// exec and shell jobs wait for a free slot on a matching node.
    fn schedule(&mut self) {
        let t = self.clock.now();
        // Noop jobs that found no node now wait for the next round, in order.
        let mut parked = VecDeque::new();
        loop {
            let mut progressed = false;
            while let Some((tid, i)) = self.ready_noop.pop_front() {
                if self.try_start(tid, i, t) {
                    progressed = true;
                } else {
                    parked.push_back((tid, i));
                }
            }
            let n = self.ready_work.len();
            for _ in 0..n {
                if !self.conns.values().any(|c| c.used < c.node.slots) {
                    break;
                }
                let Some((tid, i)) = self.ready_work.pop_front() else {
                    break;
                };
                if !self.try_start(tid, i, t) {
                    self.ready_work.push_back((tid, i));
                } else {
                    progressed = true;
                }
            }
            // Resolving grouping jobs can make more jobs ready at once.
            if !progressed || self.ready_noop.is_empty() {
                break;
            }
        }
        parked.append(&mut self.ready_noop);
        self.ready_noop = parked;
    }

    /// `false`: the job must wait for a slot.
    fn try_start(&mut self, tid: Uuid, i: u32, t: Ts) -> bool {
        let Some(entry) = self.trees.get(&tid) else {
            return true;
        };
        if entry.run.startable(i, t).is_err() {
            return true;
        }
        let job = entry.run.job(i);
        if matches!(job.run, Run::Group) {
            let entry = self.trees.get_mut(&tid).expect("present");
            if let Ok(fx) = entry.run.resolve_group(i, t) {
                self.absorb(tid, fx);
            }
            self.ready_since.remove(&(tid, i));
            return true;
        }
        match self.place(tid, i) {
            Placement::Wait => false,
            Placement::Never(why) => {
                let entry = self.trees.get_mut(&tid).expect("present");
                let fx = entry.run.reject(i, why, t);
                self.absorb(tid, fx);
                true
            }
            Placement::Node(node_id) => {
                let conn = self
                    .conns
                    .get_mut(&node_id)
                    .expect("placed on a connected node");
                let entry = self.trees.get_mut(&tid).expect("present");
                let nodes_before = entry.run.tree.nodes.len();
                let Ok(fx) = entry.run.start(i, &conn.node.name, t) else {
                    return true;
                };
                if entry.run.tree.nodes.len() != nodes_before {
                    self.dirty_trees.insert(tid);
                }
                let job = entry.run.job(i);
                if takes_slot(&job.run) {
                    conn.used += 1;
                }
                self.job_tree.insert(job.id, tid);
                self.absorb(tid, fx);
                if let Some(since) = self.ready_since.remove(&(tid, i)) {
                    self.stats.started_after(self.clock.since(since));
                }
                let a = self.assignment(tid, i);
                self.outbox.entry(node_id).or_default().push(a);
                true
            }
        }
    }

    fn place(&self, tid: Uuid, i: u32) -> Placement {
        let job = self.trees[&tid].run.job(i);
        let fits = |n: &Node| {
            job.want_node
                .as_ref()
                .is_none_or(|w| *w == n.name || *w == n.id)
                && job
                    .node_selector
                    .iter()
                    .all(|(k, v)| n.labels.get(k) == Some(v))
        };
        // Just after this server started leading, nodes are still connecting: a job that fits no
        // known node waits out that grace rather than failing.
        let settling =
            self.clock.since(self.started) < self.config.down_after.max(Duration::from_secs(2));
        if !self.known_nodes.values().any(fits) {
            if settling {
                return Placement::Wait;
            }
            let want = match (&job.want_node, job.node_selector.is_empty()) {
                (Some(n), _) => format!("no node named {n:?}"),
                (None, false) => format!("no node matches the selector {:?}", job.node_selector),
                (None, true) => "no node has joined the cluster".to_string(),
            };
            return Placement::Never(want);
        }
        let ws = &self.trees[&tid].run.tree.tags.workspace;
        let admin_tree = self.trees[&tid].run.tree.admin;
        let allows = |n: &Node| {
            admin_tree
                || n.labels
                    .get("workspaces")
                    .is_some_and(|w| w.split(',').any(|x| x.trim() == ws || x.trim() == "*"))
        };
        if !settling && !self.known_nodes.values().any(|n| fits(n) && allows(n)) {
            return Placement::Never(format!(
                "no node allows workspace {ws:?} (node label workspaces=...)"
            ));
        }
        let slot = takes_slot(&job.run);
        let mut fitting: Vec<(&String, &Conn)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.node.state == "ready"
                    && fits(&c.node)
                    && allows(&c.node)
                    && (!slot || c.used < c.node.slots)
            })
            .collect();
        if fitting.is_empty() {
            return Placement::Wait;
        }
        if !slot {
            // Noop jobs take no slot: spread them round-robin instead.
            fitting.sort_by(|a, b| a.0.cmp(b.0));
            let k = self.noop_turn.get();
            self.noop_turn.set(k.wrapping_add(1));
            return Placement::Node(fitting[k % fitting.len()].0.clone());
        }
        fitting
            .into_iter()
            .max_by_key(|(_, c)| c.node.slots.saturating_sub(c.used))
            .map(|(id, _)| Placement::Node(id.clone()))
            .unwrap_or(Placement::Wait)
    }

    fn assignment(&self, tid: Uuid, i: u32) -> Assignment {
        let job = self.trees[&tid].run.job(i);
        let mut env = BTreeMap::new();
        env.insert("MUSTER_URL".to_string(), self.config.url.clone());
        if let Some(more) = self.tree_env.get(&tid) {
            env.extend(more.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        if let Some(n) = &job.node {
            env.insert("MUSTER_NODE_NAME".to_string(), n.clone());
        }
        Assignment {
            job: job.id,
            tree: tid,
            attempt: job.attempt,
            run: job.run.clone(),
            timeout_s: job.timeout_s,
            kill_grace_ms: self.config.kill_grace_ms,
            retryable: job.retries >= job.attempt && job.want_node.is_none(),
            log_max: self.config.log_max,
            env,
            run_as: None,
            cgroup: None,
        }
    }

    /// Applies a batch: in one atomic step when it is small; a big one (a halt of a 100,000-job
    /// tree) in chunks, so no single store call holds the store (a Redis script blocks every
    /// other client while it runs). The order keeps recovery right if a crash falls between
    /// chunks: records of running trees (their abort flag) and failed jobs first, so a restart
    /// halts the tree again; the records of finished trees last, so a tree is never finished in
    /// the store while jobs of it are not.
    fn apply_in_chunks(&self, changes: &[Change]) -> Vec<bool> {
        const CHUNK: usize = 1000;
        if changes.len() <= CHUNK {
            return retry_store(&self.store_full, || self.store.apply(changes));
        }
        let rank = |c: &Change| match c {
            Change::Tree(t) if t.state == TreeState::Running => 0,
            Change::Job { job, .. } if job.state == JobState::Failed => 1,
            Change::Tree(_) => 3,
            _ => 2,
        };
        let mut order: Vec<usize> = (0..changes.len()).collect();
        order.sort_by_key(|&i| rank(&changes[i]));
        let mut applied = vec![false; changes.len()];
        for chunk in order.chunks(CHUNK) {
            let batch: Vec<Change> = chunk.iter().map(|&i| changes[i].clone()).collect();
            let res = retry_store(&self.store_full, || self.store.apply(&batch));
            for (k, &i) in chunk.iter().enumerate() {
                applied[i] = res.get(k).copied().unwrap_or(false);
            }
        }
        applied
    }

    /// Group commit: one store transaction for the batch, then every message that depends on it.
    fn commit(&mut self) {
        let mut changes = Vec::with_capacity(self.dirty_jobs.len() + self.dirty_trees.len());
        let mut events = Vec::with_capacity(changes.capacity());
        let t = self.clock.now();
        for (tid, i) in self.dirty_jobs.drain(..) {
            let Some(entry) = self.trees.get_mut(&tid) else {
                continue;
            };
            let job = entry.run.job(i).clone();
            let expect = entry.persisted[i as usize];
            entry.persisted[i as usize] = job.state;
            self.stats.moved(Some(expect), Some(job.state));
            if let Some(hook) = job
                .hook
                .as_deref()
                .filter(|_| job.state.is_final() && !expect.is_final())
            {
                // The intent first: a crash after the commit leaves it for the next leader.
                let key = intent_key(job.id, job.attempt);
                retry_store(&self.store_full, || {
                    self.store.put_doc(INTENTS, &key, Some(hook))
                });
                self.hooked.push((tid, i));
            }
            events.push(Event::Job {
                id: job.id,
                tree: tid,
                workspace: entry.run.tree.tags.workspace.clone(),
                key: job.key.clone(),
                state: job.state,
                attempt: job.attempt,
                node: job.node.clone(),
                at: t,
            });
            changes.push(Change::Job { job, expect });
        }
        self.dirty_set.clear();
        changes.append(&mut self.extra);
        let mut lost_race: HashSet<Uuid> = HashSet::new();
        let mut finished = Vec::new();
        for tid in self.dirty_trees.drain() {
            let Some(entry) = self.trees.get(&tid) else {
                continue;
            };
            changes.push(Change::Tree(entry.run.tree.clone()));
            if entry.run.tree.state != TreeState::Running {
                events.push(Event::Tree {
                    id: tid,
                    workspace: entry.run.tree.tags.workspace.clone(),
                    state: entry.run.tree.state,
                    at: t,
                });
                finished.push(tid);
            }
        }
        if !changes.is_empty() {
            let applied = self.apply_in_chunks(&changes);
            for (k, ok) in applied.iter().enumerate() {
                if !ok {
                    // Another server moved this job (a race over the lease): never send it.
                    tracing::warn!(
                        "job manager: a stored state moved under us ({})",
                        summary(&changes[k])
                    );
                    if let Change::Job { job, .. } = &changes[k] {
                        lost_race.insert(job.id);
                    }
                }
            }
        }
        // Committed: the hooks of the jobs that ended hear of it, then their intents go.
        for (tid, i) in std::mem::take(&mut self.hooked) {
            let Some(entry) = self.trees.get(&tid) else {
                continue;
            };
            let job = entry.run.job(i);
            if lost_race.contains(&job.id) {
                continue;
            }
            let name = job.hook.clone().unwrap_or_default();
            match self.hooks.get(&name) {
                Some(hook) => hook.ended(&entry.run.tree, job),
                None => tracing::warn!(job = %job.id, "no hook named {name:?} for job {}", job.id),
            }
            let key = intent_key(job.id, job.attempt);
            retry_store(&self.store_full, || self.store.put_doc(INTENTS, &key, None));
        }
        let mut freed = 0;
        for tid in finished {
            if let Some(e) = self.trees.remove(&tid) {
                for o in &mut self.observers {
                    o.ended(&e.run.tree, &e.run.jobs);
                }
                freed += e.run.jobs.len();
            }
            self.tree_env.remove(&tid);
        }
        if freed >= 1000 {
            // A big tree's memory goes back to the system rather than staying in malloc's
            // arenas (glibc keeps freed memory otherwise).
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
        }
        for (node, mut jobs) in self.outbox.drain() {
            jobs.retain(|a| !lost_race.contains(&a.job));
            if jobs.is_empty() {
                continue;
            }
            if let Some(c) = self.conns.get(&node) {
                let _ = c.tx.send(ToAgent::Assign {
                    epoch: self.epoch,
                    jobs,
                });
            }
        }
        for (tx, msg) in self.messages.drain(..) {
            let _ = tx.send(msg);
        }
        for f in self.after_commit.drain(..) {
            f();
        }
        if !events.is_empty() {
            self.store.publish(&events);
        }
    }
}

/// A change in a log line.
fn summary(change: &Change) -> String {
    match change {
        Change::Job { job, expect } => format!("job {} expected {}", job.id, expect.as_str()),
        Change::Tree(t) => format!("tree {}", t.id),
        Change::Log { job, attempt, .. } => format!("log of {job} attempt {attempt}"),
    }
}

fn takes_slot(run: &Run) -> bool {
    matches!(run, Run::Exec(_) | Run::Shell(_))
}

fn node_is(name: Option<&str>, node: &Node) -> bool {
    name == Some(node.name.as_str())
}

/// The manager never drops a write: while the store is unavailable (or full) it waits and tries
/// again. `full` tells `/readyz` while a full store holds it up.
fn retry_store<T>(full: &AtomicBool, mut f: impl FnMut() -> muster_store::Result<T>) -> T {
    let mut delay = Duration::from_millis(50);
    loop {
        match f() {
            Ok(v) => {
                full.store(false, Ordering::SeqCst);
                return v;
            }
            Err(e) => {
                if matches!(e, muster_store::StoreError::NoSpace(_)) {
                    full.store(true, Ordering::SeqCst);
                }
                tracing::error!("job manager: {e}; retrying in {delay:?}");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The manager's decisions, driven command by command with a clock the test moves and
    //! in-process channels for the agents: no sockets, no sleeping.

    use super::*;
    use crate::jobs::clock::FakeClock;
    use crate::jobs::hooks::JobHook;
    use muster_core::spec::{build_tree, JobSpec};
    use std::sync::Mutex;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    const DOWN: Duration = Duration::from_secs(3);
    const LOST: Duration = Duration::from_secs(30);

    fn config() -> ManagerConfig {
        ManagerConfig {
            backoff: Backoff {
                base_ms: 1000,
                max_ms: 1000,
            },
            kill_grace_ms: 1000,
            log_max: 1 << 20,
            url: "http://muster.test".into(),
            down_after: DOWN,
            lost_after: LOST,
        }
    }

    /// A hook that remembers what it heard.
    #[derive(Default)]
    struct Heard(Mutex<Vec<(Uuid, JobState)>>);

    impl JobHook for Heard {
        fn ended(&self, _tree: &muster_core::Tree, job: &muster_core::Job) {
            self.0.lock().unwrap().push((job.id, job.state));
        }
    }

    struct Rig {
        st: State,
        clock: FakeClock,
        store: Arc<dyn Store>,
        heard: Arc<Heard>,
    }

    fn rig_on(store: Arc<dyn Store>) -> Rig {
        let clock = FakeClock::default();
        let hooks = Hooks::default();
        let heard = Arc::new(Heard::default());
        hooks.register("test", heard.clone());
        let reactions = Reactions {
            observers: Vec::new(),
            hooks,
            clock: Arc::new(clock.clone()),
        };
        let mut st = State::new(
            store.clone(),
            config(),
            Arc::default(),
            reactions,
            Arc::default(),
        );
        st.handle(Cmd::Lead(true));
        Rig {
            st,
            clock,
            store,
            heard,
        }
    }

    fn rig() -> Rig {
        rig_on(muster_store::open("memory://").unwrap())
    }

    impl Rig {
        /// One turn of the manager's loop after the commands given.
        fn step(&mut self, cmds: Vec<Cmd>) {
            for c in cmds {
                self.st.handle(c);
            }
            self.st.fire_timers();
            self.st.liveness();
            self.st.schedule();
            self.st.commit();
        }

        fn connect(
            &mut self,
            session: u64,
            name: &str,
            labels: &[(&str, &str)],
            slots: u32,
        ) -> UnboundedReceiver<ToAgent> {
            let (tx, rx) = unbounded_channel();
            let node = Node {
                id: format!("id-{name}"),
                name: name.into(),
                state: "ready".into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .chain([("workspaces".to_string(), "*".to_string())])
                    .collect(),
                slots,
                last_seen: self.clock.now(),
                version: "test".into(),
            };
            self.step(vec![Cmd::Connect {
                session,
                node,
                tx,
                known: vec![],
                seq: 1,
            }]);
            rx
        }

        fn create(&mut self, spec: serde_json::Value, hook: bool) -> muster_core::spec::NewTree {
            let spec: JobSpec = serde_json::from_value(spec).unwrap();
            let mut new = build_tree(
                &spec,
                "ws",
                Some("ann"),
                self.clock.now(),
                &mut Uuid::now_v7,
            )
            .unwrap();
            if hook {
                for j in &mut new.jobs {
                    j.hook = Some("test".into());
                }
            }
            let (reply, _rx) = tokio::sync::oneshot::channel();
            self.step(vec![Cmd::Create {
                new: new.clone(),
                idempotency_key: None,
                reply,
            }]);
            new
        }

        fn node_state(&self, name: &str) -> String {
            let nodes = self.store.nodes().unwrap();
            nodes.iter().find(|n| n.name == name).unwrap().state.clone()
        }

        fn job(&self, id: Uuid) -> muster_core::Job {
            self.store.job(id).unwrap().unwrap()
        }
    }

    /// The jobs assigned in the messages waiting on `rx`.
    fn assigned(rx: &mut UnboundedReceiver<ToAgent>) -> Vec<Assignment> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let ToAgent::Assign { jobs, .. } = m {
                out.extend(jobs);
            }
        }
        out
    }

    fn exited(job: &Assignment, code: i32) -> Cmd {
        Cmd::Reports {
            session: 0,
            seq: 2,
            reports: vec![Report::Exited {
                job: job.job,
                attempt: job.attempt,
                outcome: ExitReport {
                    exit_code: Some(code),
                    error: None,
                    result: None,
                    at: Ts(0),
                },
            }],
        }
    }

    #[test]
    fn jobs_go_to_the_node_they_name_or_select_and_wait_for_a_free_slot() {
        let mut r = rig();
        let mut gpu = r.connect(1, "gpu-1", &[("type", "gpu")], 1);
        let mut cpu = r.connect(2, "cpu-1", &[("type", "cpu")], 2);
        let new = r.create(
            serde_json::json!({"name": "t", "children": [
                {"name": "a", "key": "a", "node_selector": {"type": "gpu"}, "exec": ["true"]},
                {"name": "b", "key": "b", "node_selector": {"type": "gpu"}, "exec": ["true"]},
                {"name": "c", "key": "c", "node": "cpu-1", "exec": ["true"]},
                {"name": "d", "key": "d", "node_selector": {"type": "tpu"}, "exec": ["true"]}
            ]}),
            false,
        );
        // One slot on the gpu node: one of a and b now, the other waits for it.
        let on_gpu = assigned(&mut gpu);
        assert_eq!(on_gpu.len(), 1);
        let on_cpu = assigned(&mut cpu);
        assert_eq!(on_cpu.len(), 1);
        assert_eq!(on_cpu[0].job, new.jobs[3].id);
        assert_eq!(on_cpu[0].env["MUSTER_URL"], "http://muster.test");
        // Past the start-up grace, a selector no node matches fails its job at once.
        r.clock.advance(Duration::from_secs(3));
        r.step(vec![]);
        let d = r.job(new.jobs[4].id);
        assert_eq!(d.state, JobState::Failed);
        assert!(d.error.unwrap().contains("no node matches"), "d fails");
        // (The tree halts on d's failure: nothing else starts.)
        r.step(vec![exited(&on_gpu[0], 0)]);
        assert!(
            assigned(&mut gpu).is_empty(),
            "a halted tree starts nothing"
        );
    }

    #[test]
    fn a_silent_node_goes_down_then_lost_and_its_movable_job_moves() {
        let mut r = rig();
        let mut a = r.connect(1, "a", &[], 4);
        let mut b = r.connect(2, "b", &[], 4);
        let new = r.create(
            serde_json::json!({"name": "mover", "exec": ["sleep", "100"], "retries": 1}),
            false,
        );
        let (mut first, other) = (assigned(&mut a), assigned(&mut b));
        let (silent, mut alive_rx, alive_session) = if first.is_empty() {
            first = other;
            ("b", a, 1)
        } else {
            ("a", b, 2)
        };
        assert_eq!(first.len(), 1);
        // Heartbeats keep only the other node up.
        for _ in 0..4 {
            r.clock.advance(Duration::from_secs(1));
            r.step(vec![Cmd::Heartbeat {
                session: alive_session,
            }]);
        }
        assert_eq!(r.node_state(silent), "down", "3 s silent: down");
        assert_eq!(
            r.job(new.jobs[0].id).state,
            JobState::Running,
            "down is not lost"
        );
        // Lost after lost_after (the server's start-up grace has passed too).
        for _ in 0..30 {
            r.clock.advance(Duration::from_secs(1));
            r.step(vec![Cmd::Heartbeat {
                session: alive_session,
            }]);
        }
        assert_eq!(r.node_state(silent), "lost");
        // Its backoff (1 s) over, the second attempt went to the node still alive.
        let j = r.job(new.jobs[0].id);
        assert_eq!((j.state, j.attempt), (JobState::Running, 2), "retried");
        assert_eq!(
            j.node.as_deref(),
            Some(if silent == "a" { "b" } else { "a" })
        );
        let moved = assigned(&mut alive_rx);
        assert_eq!(moved.len(), 1, "{moved:?}");
        assert_eq!((moved[0].job, moved[0].attempt), (new.jobs[0].id, 2));
    }

    #[test]
    fn a_hook_hears_each_outcome_once_after_the_commit() {
        let mut r = rig();
        let mut a = r.connect(1, "a", &[], 4);
        let new = r.create(
            serde_json::json!({"name": "h", "children": [{"name": "x", "exec": ["true"]}]}),
            true,
        );
        let x = assigned(&mut a);
        assert_eq!(x.len(), 1);
        assert!(r.heard.0.lock().unwrap().is_empty());
        r.step(vec![exited(&x[0], 0)]);
        // The child, then the root (a grouping job) a turn later.
        r.step(vec![]);
        let heard = r.heard.0.lock().unwrap().clone();
        assert_eq!(
            heard,
            vec![
                (new.jobs[1].id, JobState::Succeeded),
                (new.jobs[0].id, JobState::Succeeded)
            ]
        );
        // Told after the commit: the store has it; and no intent is left.
        assert_eq!(r.job(new.jobs[1].id).state, JobState::Succeeded);
        assert!(r.store.docs(INTENTS, "").unwrap().is_empty());
        // A repeated report changes nothing and is not heard again.
        r.step(vec![exited(&x[0], 0)]);
        assert_eq!(r.heard.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn an_outcome_committed_before_a_crash_is_heard_by_the_next_leader() {
        let store = muster_store::open("memory://").unwrap();
        let mut r = rig_on(store.clone());
        let mut a = r.connect(1, "a", &[], 4);
        let new = r.create(
            serde_json::json!({"name": "h", "children": [{"name": "x", "exec": ["true"]}, {"name": "y", "exec": ["true"]}]}),
            true,
        );
        let jobs = assigned(&mut a);
        assert_eq!(jobs.len(), 2);
        r.step(vec![exited(&jobs[0], 0)]);
        let heard_first = r.heard.0.lock().unwrap().clone();
        assert_eq!(heard_first.len(), 1);
        // As if the server died between the commit and the hook: the intent is still there, and
        // another for an outcome whose commit never happened.
        let done = heard_first[0].0;
        let done_attempt = r.job(done).attempt;
        store
            .put_doc(INTENTS, &intent_key(done, done_attempt), Some("test"))
            .unwrap();
        let pending = if done == jobs[0].job {
            &jobs[1]
        } else {
            &jobs[0]
        };
        store
            .put_doc(
                INTENTS,
                &intent_key(pending.job, pending.attempt),
                Some("test"),
            )
            .unwrap();
        drop(r);
        // The next leader hears the committed one, drops the other, and resumes the tree.
        let r2 = rig_on(store.clone());
        assert_eq!(
            r2.heard.0.lock().unwrap().clone(),
            vec![(done, JobState::Succeeded)]
        );
        assert!(store.docs(INTENTS, "").unwrap().is_empty());
        assert!(r2.st.trees.contains_key(&new.tree.id));
    }
}
