//! Long-running processes on the server (SPEC §5a): each one a versioned document (kind
//! [`PROCESSES`], changed only by compare-and-set), placed on a node like a job (`node`,
//! `node_selector`, the workspace rule), started there with `StartProcess` and followed by the
//! statuses its agent reports. This is also the internal API the services and models use:
//! [`Processes::start`], [`Processes::stop`], [`Processes::wait_for`] (health-watch) and
//! [`Processes::address`] (node address and ports).
//!
//! Generations: a process placed anew (started after a stop, moved after its node was lost)
//! gets the next `gen`; an agent runs one generation of a process at a time, and reports for
//! an older generation or from another node change nothing (the agent is told to drop them).
//! Every message to an agent goes after the document write that caused it.

use crate::links::Links;
use muster_core::process::{ProcState, ProcessDef, RestartMode};
use muster_core::{Ts, Uuid};
use muster_store::{Docs, Event, Node, Store, StoreError};
use muster_wire::protocol::{ProcessAssignment, ProcessReport, ToAgent, PROCESSES_SINCE};
use muster_wire::util::now;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The process documents, by id.
pub const PROCESSES: Docs<Process> = Docs::new("process");

/// What the operators want of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Want {
    Running,
    Stopped,
}

/// One process as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Process {
    pub id: Uuid,
    pub def: ProcessDef,
    pub created_by: String,
    /// Made by a cluster admin: it may run on nodes that allow no workspace.
    pub admin: bool,
    pub created_at: Ts,
    pub want: Want,
    pub gen: u32,
    /// The node (name and id) of the current generation.
    pub node: Option<String>,
    pub node_id: Option<String>,
    pub state: ProcState,
    pub reason: String,
    /// Restarts over every generation.
    pub restarts: u32,
    /// Restarts of the earlier generations.
    #[serde(default)]
    pub base_restarts: u32,
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub started_at: Option<Ts>,
    #[serde(default)]
    pub limits: String,
    /// Its node was lost and it is to be placed on another.
    #[serde(default)]
    pub moving: bool,
    /// The node's address, for clients (`address`).
    #[serde(default)]
    pub address: Option<String>,
    pub updated_at: Ts,
}

/// Where a process listens: its node's address and its ports by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub host: String,
    pub ports: BTreeMap<String, u16>,
}

/// What can go wrong with a request about a process.
#[derive(Debug)]
pub enum ProcError {
    NotFound,
    /// The process's node is not connected now (a restart cannot reach it).
    NodeUnavailable(String),
    Store(StoreError),
}

impl From<StoreError> for ProcError {
    fn from(e: StoreError) -> ProcError {
        ProcError::Store(e)
    }
}

/// A filter for [`Processes::list`].
#[derive(Clone, Debug, Default)]
pub struct ProcFilter {
    /// Only these workspaces (`None`: all).
    pub workspaces: Option<Vec<String>>,
    pub workspace: Option<String>,
    pub node: Option<String>,
    pub state: Option<ProcState>,
}

/// An agent connection able to run processes.
#[derive(Clone)]
struct Agent {
    session: u64,
    node_id: String,
    addr: String,
}

struct Inner {
    store: Arc<dyn Store>,
    links: Links,
    url: String,
    /// Connected agents that speak the process messages, by node name.
    agents: Mutex<HashMap<String, Agent>>,
    /// Where the values of a process's `${secrets.KEY}` come from (the services' secrets).
    secrets: std::sync::OnceLock<SecretSource>,
}

/// The values of `keys` of service `path` (`Err`: why they cannot be read now).
pub type SecretSource =
    Arc<dyn Fn(&str, &[String]) -> Result<BTreeMap<String, String>, String> + Send + Sync>;

/// The handle (cheap to clone).
#[derive(Clone)]
pub struct Processes {
    inner: Arc<Inner>,
}

fn store_retry<T>(mut f: impl FnMut() -> muster_store::Result<T>) -> muster_store::Result<T> {
    let mut delay = Duration::from_millis(20);
    for _ in 0..5 {
        match f() {
            Err(StoreError::Unavailable(_)) => {
                std::thread::sleep(delay);
                delay *= 2;
            }
            r => return r,
        }
    }
    f()
}

impl Processes {
    pub fn new(store: Arc<dyn Store>, links: Links, url: String) -> Processes {
        Processes {
            inner: Arc::new(Inner {
                store,
                links,
                url,
                agents: Mutex::new(HashMap::new()),
                secrets: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Sets where processes' secrets come from (once, at start).
    pub fn set_secret_source(&self, source: SecretSource) {
        let _ = self.inner.secrets.set(source);
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<String, Agent>> {
        self.inner.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store(&self) -> &dyn Store {
        &*self.inner.store
    }

    fn event(&self, p: &Process) {
        self.store().publish(&[Event::Process {
            id: p.id,
            workspace: p.def.tags.workspace.clone(),
            name: p.def.name.clone(),
            state: p.state,
            reason: p.reason.clone(),
            node: p.node.clone(),
            at: now(),
        }]);
    }

    /// Writes `f`'s change of process `id`; publishes the event when its state or reason
    /// changed. Returns the process as written.
    fn update(
        &self,
        id: Uuid,
        mut f: impl FnMut(&mut Process) -> bool,
    ) -> Result<Option<Process>, StoreError> {
        let mut before: Option<(ProcState, String)> = None;
        let done = store_retry(|| {
            PROCESSES.update(self.store(), &id.to_string(), |cur| {
                let mut p = cur?;
                before = Some((p.state, p.reason.clone()));
                if f(&mut p) {
                    p.updated_at = now();
                }
                Some(p)
            })
        })?;
        let p = done.map(|(p, _)| p);
        if let (Some(p), Some((s, r))) = (&p, &before) {
            if p.state != *s || p.reason != *r {
                self.event(p);
            }
        }
        Ok(p)
    }

    /// Stores a new process (`pending`) and places it if a node fits now. The internal API of
    /// services and models calls this too.
    pub fn start(&self, def: ProcessDef, by: &str, admin: bool) -> Result<Process, StoreError> {
        let t = now();
        let p = Process {
            id: Uuid::now_v7(),
            def,
            created_by: by.to_string(),
            admin,
            created_at: t,
            want: Want::Running,
            gen: 0,
            node: None,
            node_id: None,
            state: ProcState::Pending,
            reason: "waiting for a node".into(),
            restarts: 0,
            base_restarts: 0,
            ports: BTreeMap::new(),
            pid: None,
            started_at: None,
            limits: String::new(),
            moving: false,
            address: None,
            updated_at: t,
        };
        store_retry(|| PROCESSES.create(self.store(), &p.id.to_string(), &p))?;
        self.event(&p);
        let placed = self.place(p.id)?;
        Ok(placed.unwrap_or(p))
    }

    pub fn get(&self, id: Uuid) -> Result<Option<Process>, StoreError> {
        Ok(PROCESSES
            .get(self.store(), &id.to_string())?
            .map(|(p, _)| p))
    }

    /// Processes matching `f`, newest first.
    pub fn list(&self, f: &ProcFilter) -> Result<Vec<Process>, StoreError> {
        let mut all: Vec<Process> = PROCESSES
            .list(self.store(), "")?
            .into_iter()
            .map(|(_, p, _)| p)
            .filter(|p| {
                let ws = &p.def.tags.workspace;
                f.workspaces.as_ref().is_none_or(|w| w.contains(ws))
                    && f.workspace.as_ref().is_none_or(|w| w == ws)
                    && f.node
                        .as_ref()
                        .is_none_or(|n| p.node.as_ref() == Some(n) || p.node_id.as_ref() == Some(n))
                    && f.state.is_none_or(|s| s == p.state)
            })
            .collect();
        all.sort_by_key(|p| std::cmp::Reverse(p.id));
        Ok(all)
    }

    /// Asks for a stop: the agent stops it (stop signal, SIGKILL after its grace).
    pub fn stop(&self, id: Uuid) -> Result<Process, ProcError> {
        let p = self
            .update(id, |p| {
                p.want = Want::Stopped;
                p.moving = false;
                if p.node.is_none() || p.state.is_final() {
                    p.state = ProcState::Stopped;
                    p.reason = "stopped".into();
                }
                true
            })?
            .ok_or(ProcError::NotFound)?;
        if let (Some(node), false) = (&p.node, p.state.is_final()) {
            self.inner.links.send(
                node,
                ToAgent::StopProcess {
                    id,
                    gen: p.gen,
                    remove: false,
                },
            );
        }
        Ok(p)
    }

    /// Starts a stopped, failed or lost process again (a new generation); a running one is
    /// left as it is.
    pub fn resume(&self, id: Uuid) -> Result<Process, ProcError> {
        let p = self
            .update(id, |p| {
                if p.want == Want::Running && !p.state.is_final() {
                    return false;
                }
                p.want = Want::Running;
                p.moving = false;
                p.base_restarts = p.restarts;
                p.node = None;
                p.node_id = None;
                p.pid = None;
                p.state = ProcState::Pending;
                p.reason = "start asked; waiting for a node".into();
                true
            })?
            .ok_or(ProcError::NotFound)?;
        Ok(self.place(id)?.unwrap_or(p))
    }

    /// Restarts a running process in place (its supervisor stops the run and starts it again
    /// at once), or starts a stopped one.
    pub fn restart(&self, id: Uuid) -> Result<Process, ProcError> {
        let p = self.get(id)?.ok_or(ProcError::NotFound)?;
        match (&p.node, p.state.is_final() || p.want == Want::Stopped) {
            (Some(node), false) => {
                if !self
                    .inner
                    .links
                    .send(node, ToAgent::RestartProcess { id, gen: p.gen })
                {
                    return Err(ProcError::NodeUnavailable(format!(
                        "its node {node} is not connected now; try again once it is"
                    )));
                }
                Ok(p)
            }
            _ => self.resume(id),
        }
    }

    /// Stops and forgets a process (its node removes its directory and log once it stopped).
    pub fn delete(&self, id: Uuid) -> Result<Process, ProcError> {
        let (p, v) = PROCESSES
            .get(self.store(), &id.to_string())?
            .ok_or(ProcError::NotFound)?;
        if !PROCESSES.delete_if(self.store(), &id.to_string(), v)? {
            return self.delete(id);
        }
        if let Some(node) = &p.node {
            self.inner.links.send(
                node,
                ToAgent::StopProcess {
                    id,
                    gen: p.gen,
                    remove: true,
                },
            );
        }
        let mut gone = p.clone();
        gone.state = ProcState::Stopped;
        gone.reason = "removed".into();
        self.event(&gone);
        Ok(p)
    }

    /// The address node `name`'s agent is connected from, while it is (services publish it as
    /// the node's `address`).
    pub fn node_address(&self, name: &str) -> Option<String> {
        self.agents().get(name).map(|a| a.addr.clone())
    }

    /// Where a process listens: its node's address and its ports by name (`None` until it runs
    /// somewhere).
    pub fn address(&self, id: Uuid) -> Result<Option<Address>, StoreError> {
        Ok(self.get(id)?.and_then(|p| {
            Some(Address {
                host: p.address.clone()?,
                ports: p.ports.clone(),
            })
        }))
    }

    /// Waits until process `id` satisfies `ready` (a health-watch: `|p| p.state ==
    /// ProcState::Healthy`), at most `timeout`; the process as last seen.
    pub async fn wait_for(
        &self,
        id: Uuid,
        timeout: Duration,
        ready: impl Fn(&Process) -> bool,
    ) -> Result<Option<Process>, StoreError> {
        let mut events = self.store().subscribe();
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let me = self.clone();
            let p = tokio::task::spawn_blocking(move || me.get(id))
                .await
                .map_err(|e| StoreError::Other(e.to_string()))??;
            match &p {
                None => return Ok(None),
                Some(p) if ready(p) => return Ok(Some(p.clone())),
                Some(_) if tokio::time::Instant::now() >= end => return Ok(p),
                _ => {}
            }
            let _ = tokio::time::timeout_at(
                end.min(tokio::time::Instant::now() + Duration::from_millis(500)),
                async {
                    loop {
                        match events.recv().await {
                            Ok(Event::Process { id: e, .. }) if e == id => return,
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                },
            )
            .await;
        }
    }

    /// The node for a process now, if one fits: ready, connected with a protocol that runs
    /// processes, matching its `node`/`node_selector`, allowing its workspace; the one with
    /// the fewest processes. Else why not.
    fn choose(&self, p: &Process) -> Result<(Node, Agent), String> {
        let nodes = self.store().nodes().map_err(|e| e.to_string())?;
        let agents = self.agents().clone();
        let def = &p.def;
        let fits = |n: &Node| {
            def.node.as_ref().is_none_or(|w| *w == n.name || *w == n.id)
                && def
                    .node_selector
                    .iter()
                    .all(|(k, v)| n.labels.get(k) == Some(v))
        };
        let ws = &def.tags.workspace;
        let allows = |n: &Node| {
            p.admin
                || n.labels
                    .get("workspaces")
                    .is_some_and(|w| w.split(',').any(|x| x.trim() == ws || x.trim() == "*"))
        };
        if !nodes.iter().any(fits) {
            return Err(match (&def.node, def.node_selector.is_empty()) {
                (Some(_), _) => "waiting for its node to join".into(),
                (None, false) => "no node matches its node_selector".into(),
                (None, true) => "no node has joined the cluster".into(),
            });
        }
        if !nodes.iter().any(|n| fits(n) && allows(n)) {
            return Err(format!(
                "no node allows workspace {ws:?} (node label workspaces=...)"
            ));
        }
        let mut load: HashMap<String, usize> = HashMap::new();
        if let Ok(all) = PROCESSES.list(self.store(), "") {
            for (_, q, _) in all {
                if let (Some(n), false) = (q.node, q.state.is_final()) {
                    *load.entry(n).or_default() += 1;
                }
            }
        }
        nodes
            .into_iter()
            .filter(|n| n.state == "ready" && fits(n) && allows(n))
            .filter_map(|n| {
                let a = agents.get(&n.name).filter(|a| a.node_id == n.id)?.clone();
                Some((n, a))
            })
            .min_by_key(|(n, _)| (load.get(&n.name).copied().unwrap_or(0), n.name.clone()))
            .ok_or_else(|| "waiting for a ready node that fits".to_string())
    }

    /// Places process `id` if it waits for a node and one fits: the next generation goes there.
    fn place(&self, id: Uuid) -> Result<Option<Process>, StoreError> {
        let Some(p) = self.get(id)? else {
            return Ok(None);
        };
        let waiting = p.want == Want::Running && (p.node.is_none() || p.moving);
        if !waiting {
            return Ok(Some(p));
        }
        let choice = self.choose(&p);
        let written = self.update(id, |q| {
            if q.gen != p.gen || !(q.want == Want::Running && (q.node.is_none() || q.moving)) {
                return false;
            }
            match &choice {
                Ok((node, agent)) => {
                    let from = q.node.clone().filter(|_| q.moving);
                    q.gen += 1;
                    q.node = Some(node.name.clone());
                    q.node_id = Some(node.id.clone());
                    q.address = Some(agent.addr.clone());
                    q.moving = false;
                    q.base_restarts = q.restarts;
                    q.pid = None;
                    q.ports.clear();
                    q.state = ProcState::Pending;
                    q.reason = match from {
                        Some(old) => format!("moved from node {old} (lost) to {}", node.name),
                        None => format!("starting on node {}", node.name),
                    };
                    true
                }
                Err(why) => {
                    if q.moving || q.reason == *why {
                        return false;
                    }
                    q.reason = why.clone();
                    true
                }
            }
        })?;
        if let (Some(q), Ok((node, _))) = (&written, &choice) {
            if q.node.as_deref() == Some(node.name.as_str()) && q.gen == p.gen + 1 {
                self.send_start(q);
            }
        }
        Ok(written)
    }

    /// The env vars of `p` that name secrets, with the values put in (for the node only).
    fn secret_env(&self, p: &Process) -> Result<Vec<(String, String)>, String> {
        let Some(path) = &p.def.secrets_of else {
            return Ok(Vec::new());
        };
        let mut keys = std::collections::BTreeSet::new();
        for v in p.def.env.values() {
            muster_core::service::secret_refs(&serde_json::Value::String(v.clone()), &mut keys);
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let source = self
            .inner
            .secrets
            .get()
            .ok_or("this server reads no secrets")?;
        let keys: Vec<String> = keys.into_iter().collect();
        let values = source(path, &keys)?;
        let mut out = Vec::new();
        for (name, v) in &p.def.env {
            if !v.contains("${") {
                continue;
            }
            let mut text = v.clone();
            for (k, value) in &values {
                for form in [format!("${{secrets.{k}}}"), format!("${{ secrets.{k} }}")] {
                    text = text.replace(&form, value);
                }
            }
            if text != *v {
                out.push((name.clone(), text));
            }
        }
        Ok(out)
    }

    fn assignment(&self, p: &Process, secret_env: Vec<(String, String)>) -> ProcessAssignment {
        let mut env = BTreeMap::new();
        env.insert("MUSTER_URL".to_string(), self.inner.url.clone());
        env.insert("MUSTER_PROCESS_NAME".to_string(), p.def.name.clone());
        ProcessAssignment {
            id: p.id,
            gen: p.gen,
            def: p.def.clone(),
            env,
            log_max: 0,
            log_keep: 0,
            run_as: None,
            cgroup: None,
            ports: BTreeMap::new(),
            secret_env,
        }
    }

    fn send_start(&self, p: &Process) {
        let Some(node) = &p.node else {
            return;
        };
        let secret_env = match self.secret_env(p) {
            Ok(s) => s,
            Err(why) => {
                // Not started without them: failed, with why (never the values).
                let (gen, why) = (p.gen, format!("its secrets cannot be read: {why}"));
                let _ = self.update(p.id, |q| {
                    if q.gen != gen || q.state.is_final() {
                        return false;
                    }
                    q.state = ProcState::Failed;
                    q.reason = why.clone();
                    true
                });
                return;
            }
        };
        self.inner.links.send(
            node,
            ToAgent::StartProcess {
                epoch: 0,
                process: Box::new(self.assignment(p, secret_env)),
            },
        );
    }

    /// Every second on the leader: places the processes that wait for a node.
    pub fn tick(&self) {
        let Ok(all) = PROCESSES.list(self.store(), "") else {
            return;
        };
        for (_, p, _) in all {
            if p.want == Want::Running && (p.node.is_none() || p.moving) {
                if let Err(e) = self.place(p.id) {
                    tracing::warn!(id = %p.id, "cannot place process {}: {e}", p.id);
                }
            }
        }
    }

    /// An agent connected (its `Hello`): its reports are applied, the processes it should run
    /// and does not know are sent again.
    pub fn connected(
        &self,
        node: &Node,
        session: u64,
        protocol: u32,
        peer: Option<IpAddr>,
        reports: Vec<ProcessReport>,
    ) {
        if protocol < PROCESSES_SINCE {
            return;
        }
        let addr = peer.map_or_else(|| "127.0.0.1".to_string(), |ip| ip.to_string());
        self.agents().insert(
            node.name.clone(),
            Agent {
                session,
                node_id: node.id.clone(),
                addr,
            },
        );
        let known: HashMap<Uuid, u32> = reports.iter().map(|r| (r.id, r.gen)).collect();
        self.reports(node, reports);
        let Ok(all) = PROCESSES.list(self.store(), "") else {
            return;
        };
        for (_, p, _) in all {
            if p.node_id.as_deref() != Some(node.id.as_str()) || p.moving {
                continue;
            }
            let has = known.get(&p.id).is_some_and(|g| *g >= p.gen);
            if p.want == Want::Running && !has && p.state != ProcState::Lost {
                self.send_start(&p);
            }
        }
    }

    /// Connection `session` of node `name` ended.
    pub fn disconnected(&self, name: &str, session: u64) {
        let mut a = self.agents();
        if a.get(name).is_some_and(|c| c.session == session) {
            a.remove(name);
        }
    }

    /// Statuses an agent reported.
    pub fn reports(&self, node: &Node, reports: Vec<ProcessReport>) {
        for r in reports {
            if let Err(e) = self.report(node, r) {
                tracing::warn!("cannot record a process status: {e}");
            }
        }
    }

    fn report(&self, node: &Node, r: ProcessReport) -> Result<(), StoreError> {
        let Some(p) = self.get(r.id)? else {
            // Removed meanwhile: the node forgets it.
            self.inner.links.send(
                &node.name,
                ToAgent::StopProcess {
                    id: r.id,
                    gen: r.gen,
                    remove: true,
                },
            );
            return Ok(());
        };
        let ours = p.node_id.as_deref() == Some(node.id.as_str());
        if !ours || r.gen > p.gen {
            if !ours {
                // A generation the server moved elsewhere (its node was lost): it must go.
                self.inner.links.send(
                    &node.name,
                    ToAgent::StopProcess {
                        id: r.id,
                        gen: r.gen,
                        remove: true,
                    },
                );
            }
            return Ok(());
        }
        if r.gen < p.gen {
            return Ok(()); // The newer generation's start is on its way to this node.
        }
        let st = r.status;
        let written = self.update(r.id, |q| {
            if q.gen != r.gen || q.node_id.as_deref() != Some(node.id.as_str()) {
                return false;
            }
            q.state = st.state;
            q.reason = st.reason.clone();
            q.restarts = q.base_restarts + st.restarts;
            q.pid = st.pid;
            q.ports = st.ports.clone();
            q.started_at = st.started_at;
            q.limits = st.limits.clone();
            true
        })?;
        if let Some(q) = written {
            if q.want == Want::Stopped && !q.state.is_final() {
                self.inner.links.send(
                    &node.name,
                    ToAgent::StopProcess {
                        id: q.id,
                        gen: q.gen,
                        remove: false,
                    },
                );
            }
        }
        Ok(())
    }

    /// Node `node` was lost: its processes are `lost`; those that restart `always` and name no
    /// node move to another.
    pub fn node_lost(&self, node: &Node) {
        let Ok(all) = PROCESSES.list(self.store(), "") else {
            return;
        };
        for (_, p, _) in all {
            if p.node_id.as_deref() != Some(node.id.as_str()) || p.state.is_final() {
                continue;
            }
            let moves = p.want == Want::Running
                && p.def.restart.mode == RestartMode::Always
                && p.def.node.is_none();
            let r = self.update(p.id, |q| {
                if q.gen != p.gen {
                    return false;
                }
                q.state = ProcState::Lost;
                q.reason = "node lost".into();
                q.pid = None;
                q.moving = moves;
                true
            });
            if let Err(e) = r {
                tracing::warn!(id = %p.id, "cannot mark process {} lost: {e}", p.id);
            } else if moves {
                let _ = self.place(p.id);
            }
        }
    }
}

/// Tells the processes of lost nodes (an observer of the job manager, which finds nodes lost).
pub struct OnNodeLost(pub Processes);

impl crate::jobs::hooks::Observer for OnNodeLost {
    fn node_lost(&mut self, node: &Node) {
        let p = self.0.clone();
        let node = node.clone();
        std::thread::spawn(move || p.node_lost(&node));
    }
}

/// Places waiting processes every second while this server leads.
pub async fn run(app: Arc<crate::App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if !app.cluster.is_leader() {
            continue;
        }
        let p = app.processes.clone();
        let _ = tokio::task::spawn_blocking(move || p.tick()).await;
    }
}
