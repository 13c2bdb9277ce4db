//! Services (SPEC §6, the AtYourService model): plan and apply over HQ's `services/`.
//!
//! - this file: [`Services`], the handle over the recorded state of each service (kind
//!   [`SERVICES`], one per path, changed by compare-and-set) and the stored plans (kind
//!   [`PLANS`]); [`Services::plan`] reads HQ at its head (services and interfaces), the nodes,
//!   the records, and stores the plan of `muster_core::service_plan`; [`Services::apply`] checks
//!   the plan still holds (HQ's head, the same steps), packs each service directory as a
//!   content-addressed archive in the blob store and makes **one job tree** of the plan: each
//!   step a job `muster services step PLAN KEY` on the service's node, every dependency a child
//!   of the first step that needs it (the others `needs` it); [`StepHook`], the outcome hook on
//!   every step, records what it did (the hash it installed, published data, state, status).
//! - [`step`]: what a step's job asks the server: its verbs, the JSON context (params, producer
//!   data with what producers published in this apply, the node, the previous state) and the
//!   archive.
//!
//! Invariant: an apply runs exactly the stored plan; a plan whose HQ commit or steps no longer
//! hold is refused (409), never re-planned behind the caller's back; one plan or reset is
//! applied at a time ([`APPLYING`], taken before the plan is checked).

pub mod build;
pub mod monitor;
pub mod process;
pub mod reset;
pub mod secrets;
pub mod step;

use crate::App;
use muster_core::service::{self, NodeInfo, Problem, Resolved};
use muster_core::service_plan::{self, Action, Recorded};
use muster_core::spec::JobSpec;
use muster_core::{Job, JobState, Tags, Tree, Ts, Uuid};
use muster_store::{Docs, StoreError};
use muster_wire::util::now;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

/// The recorded state of each service, by path.
pub const SERVICES: Docs<ServiceRecord> = Docs::new("service");

/// The stored plans, by id.
pub const PLANS: Docs<StoredPlan> = Docs::new("service_plan");

/// Who applies now (one key, [`APPLYING_KEY`]): one plan or reset at a time, taken by
/// compare-and-set before the plan is checked, so two applies of plans made at the same state
/// never both run (the second gets 409). Actions and monitors do not take it.
pub const APPLYING: Docs<Applying> = Docs::new("service_applying");
const APPLYING_KEY: &str = "current";

/// How long a claim without a tree holds (the server died between the claim and the tree).
const CLAIM_TTL_MS: i64 = 60_000;

/// The claim of the apply running now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Applying {
    pub plan: String,
    /// Its tree, once made.
    pub tree: Option<Uuid>,
    pub since: Ts,
}

/// The outcome hook on every step of an apply tree.
pub const STEP_HOOK: &str = "service-step";

/// The label of apply trees (`tags.labels.kind`) and the one naming their plan.
pub const KIND_APPLY: &str = "services-apply";

/// What is recorded of a service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub path: String,
    #[serde(flatten)]
    pub recorded: Recorded,
    /// Where it runs (`None`: the embedded node, or any).
    pub node: Option<String>,
    /// `active | maintenance | waiting | blocked | error | unknown`.
    pub status: String,
    #[serde(default)]
    pub message: String,
    /// What its actions last returned as `state` (given back to the next action).
    #[serde(default)]
    pub state: Value,
    /// What its actions published (merged into its consumers' context).
    #[serde(default)]
    pub published: Value,
    /// The archive of its directory as last installed (what a reset runs).
    #[serde(default)]
    pub archive: Option<String>,
    /// Its params as last installed (a reset's context).
    #[serde(default)]
    pub params: Value,
    /// Its `[process]`, run by the process layer.
    #[serde(default)]
    pub process: Option<Uuid>,
    /// Its actions (verbs), as last installed.
    #[serde(default)]
    pub actions: Vec<String>,
    #[serde(default)]
    pub monitor_every: Option<String>,
    /// When its monitor last started (or its status was last taken from its process).
    #[serde(default)]
    pub monitored_at: Option<Ts>,
    /// The tree of its last monitor.
    #[serde(default)]
    pub monitor_tree: Option<Uuid>,
    /// Its exports (newest last, at most [`KEEP_EXPORTS`]): archives in the blob store.
    #[serde(default)]
    pub exports: Vec<Export>,
    #[serde(default)]
    pub last_action: Option<String>,
    #[serde(default)]
    pub last_job: Option<Uuid>,
    #[serde(default)]
    pub last_plan: Option<String>,
    /// Its last actions (newest last, at most [`KEEP_HISTORY`]): each with its job, for its log.
    #[serde(default)]
    pub history: Vec<ActionRun>,
    pub updated_at: Ts,
}

/// How many past actions a record keeps.
pub const KEEP_HISTORY: usize = 10;

/// One action a service ran: install, reconfigure, monitor, export...
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionRun {
    pub action: String,
    pub job: Uuid,
    /// `succeeded` or `failed`.
    pub state: String,
    pub at: Ts,
}

impl ServiceRecord {
    /// Records that job `job` ran `action` and ended in `state`.
    fn ran(&mut self, action: &str, job: &Job) {
        self.history.push(ActionRun {
            action: action.to_string(),
            job: job.id,
            state: job.state.as_str().to_string(),
            at: now(),
        });
        let n = self.history.len();
        if n > KEEP_HISTORY {
            self.history.drain(..n - KEEP_HISTORY);
        }
    }
}

/// How many exports of a service are kept.
pub const KEEP_EXPORTS: usize = 10;

/// One export of a service: its `.tar.gz` in the blob store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Export {
    pub id: String,
    pub size: u64,
    pub at: Ts,
    pub job: Option<Uuid>,
}

/// One step of a stored plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanStep {
    /// The job key of the step in the apply tree.
    pub key: String,
    #[serde(flatten)]
    pub step: service_plan::Step,
    /// The node it runs on.
    pub node: Option<String>,
    /// The service as resolved (none for a reset).
    #[serde(default)]
    pub resolved: Option<Resolved>,
    /// The node's published data (`node` in the context).
    #[serde(default)]
    pub node_data: Value,
    /// The archive of its directory (set at apply; a reset's is the one it was installed with).
    #[serde(default)]
    pub archive: Option<String>,
    /// The verbs to run instead of the action's own (`muster services action PATH VERB`).
    #[serde(default)]
    pub verbs: Option<Vec<String>>,
    /// The archive an `import` unpacks for the action.
    #[serde(default)]
    pub import: Option<String>,
    /// Its `[build]`: fetched when cached, else built by the step before `install`.
    #[serde(default)]
    pub build: Option<build::PlannedBuild>,
}

/// A plan as stored: what an apply runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredPlan {
    pub id: String,
    /// The HQ commit it was made at.
    pub commit: String,
    pub created_at: Ts,
    pub created_by: String,
    pub steps: Vec<PlanStep>,
    pub unchanged: Vec<String>,
    /// `plan` (of HQ), `reset` (of recorded services, asked for by path) or `action` (one verb).
    #[serde(default = "plan_kind")]
    pub kind: String,
    /// Only this service and what it depends on (`apply services/PATH`).
    #[serde(default)]
    pub only: Option<String>,
    /// The tree of its apply.
    #[serde(default)]
    pub tree: Option<Uuid>,
    #[serde(default)]
    pub applied_at: Option<Ts>,
}

fn plan_kind() -> String {
    "plan".into()
}

/// What can go wrong with a request about services.
#[derive(Debug)]
pub enum ServiceError {
    NotFound(String),
    /// HQ's services do not make a valid graph: every problem with its file and line.
    Invalid(Vec<Problem>),
    /// The plan no longer holds (HQ moved, the records changed), or the service has consumers.
    Conflict(String),
    Unavailable(String),
    Store(StoreError),
    Internal(String),
}

impl std::fmt::Display for ServiceError {
    /// The message (of an invalid HQ: its first three problems).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceError::Invalid(p) => {
                let first: Vec<String> = p.iter().take(3).map(|p| p.to_string()).collect();
                f.write_str(&first.join("; "))
            }
            ServiceError::NotFound(m)
            | ServiceError::Conflict(m)
            | ServiceError::Unavailable(m)
            | ServiceError::Internal(m) => f.write_str(m),
            ServiceError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> ServiceError {
        ServiceError::Store(e)
    }
}

type Result<T> = std::result::Result<T, ServiceError>;

/// The handle (cheap to clone).
#[derive(Clone, Default)]
pub struct Services {
    /// The embedded node's name (`muster up`): where services that consume no node run.
    embedded: Arc<OnceLock<String>>,
    /// The app, for the hook (set once it exists).
    app: Arc<OnceLock<std::sync::Weak<App>>>,
    /// The last snapshot read, by its commit: a commit names its files for good, so planning
    /// again at the same head reads nothing from git but the head.
    last_snapshot: Arc<std::sync::Mutex<Option<Snapshot>>>,
}

/// HQ's services and interfaces at its head.
#[derive(Clone)]
pub struct Snapshot {
    pub commit: String,
    pub files: BTreeMap<String, Vec<u8>>,
    /// Git's mode of each file (`100755` for executables).
    pub modes: BTreeMap<String, String>,
    /// Git's blob id of each file: the next snapshot reads from git only the blobs it lacks.
    pub oids: BTreeMap<String, String>,
    /// Every file of HQ (links too) with its blob id and mode, not read: builds' sources.
    pub tree: BTreeMap<String, (String, String)>,
}

impl Services {
    pub fn set_app(&self, app: &Arc<App>) {
        let _ = self.app.set(Arc::downgrade(app));
    }

    pub fn set_embedded(&self, name: &str) {
        let _ = self.embedded.set(name.to_string());
    }

    pub fn embedded(&self) -> Option<String> {
        self.embedded.get().cloned()
    }

    /// Reads `services/` and `interfaces/` at HQ's head (git's objects, never the working tree;
    /// a symlink is a problem, not followed).
    pub fn snapshot(&self, app: &App) -> Result<Snapshot> {
        let repo = app.hq.repo().ok_or_else(|| {
            ServiceError::Unavailable("HQ is not available (GET /api/v1/hq says why)".into())
        })?;
        let commit = repo
            .head()
            .map_err(ServiceError::Internal)?
            .map(|c| c.id)
            .unwrap_or_default();
        let previous = self
            .last_snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(s) = previous
            .as_ref()
            .filter(|s| !commit.is_empty() && s.commit == commit)
        {
            return Ok(s.clone());
        }
        // The blobs the last snapshot read, by id: a commit that changed a few files costs a
        // read of those few.
        let known: std::collections::HashMap<&str, &Vec<u8>> = previous
            .as_ref()
            .map(|p| {
                p.oids
                    .iter()
                    .filter_map(|(path, oid)| Some((oid.as_str(), p.files.get(path)?)))
                    .collect()
            })
            .unwrap_or_default();
        let mut files = BTreeMap::new();
        let mut modes = BTreeMap::new();
        let mut oids = BTreeMap::new();
        let mut tree = BTreeMap::new();
        let mut problems = Vec::new();
        // A service file may be as large as HQ's files may be (0: 1 MiB).
        let max = match app.config.hq.max_file_size {
            0 => 1 << 20,
            n => n,
        };
        if !commit.is_empty() {
            let mut wanted = Vec::new();
            for e in repo.ls_tree().map_err(ServiceError::Internal)? {
                if e.kind == "blob" {
                    tree.insert(e.path.clone(), (e.oid.clone(), e.mode.clone()));
                }
                if !(e.path.starts_with("services/") || e.path.starts_with("interfaces/")) {
                    continue;
                }
                if e.is_symlink() {
                    problems.push(Problem {
                        file: e.path.clone(),
                        line: None,
                        message: "a symlink (services hold files only)".into(),
                    });
                    continue;
                }
                if e.kind != "blob" {
                    continue;
                }
                wanted.push(e);
            }
            let (have, read): (Vec<_>, Vec<_>) = wanted
                .into_iter()
                .partition(|e| known.contains_key(e.oid.as_str()));
            for e in have {
                modes.insert(e.path.clone(), e.mode.clone());
                files.insert(e.path.clone(), known[e.oid.as_str()].clone());
                oids.insert(e.path, e.oid);
            }
            // Every other file in one batch: two git processes, whatever their number.
            let ids: Vec<(&str, Option<u64>)> =
                read.iter().map(|e| (e.oid.as_str(), e.size)).collect();
            let datas = repo
                .blobs_sized(&ids, max)
                .map_err(ServiceError::Internal)?;
            for (e, data) in read.into_iter().zip(datas) {
                let data = data.map_err(|why| {
                    ServiceError::Invalid(vec![Problem {
                        file: e.path.clone(),
                        line: None,
                        message: why,
                    }])
                })?;
                modes.insert(e.path.clone(), e.mode.clone());
                files.insert(e.path.clone(), data);
                oids.insert(e.path, e.oid);
            }
        }
        if !problems.is_empty() {
            return Err(ServiceError::Invalid(problems));
        }
        let snap = Snapshot {
            commit,
            files,
            modes,
            oids,
            tree,
        };
        *self.last_snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(snap.clone());
        Ok(snap)
    }

    /// The nodes as producers of `node`: name, address (where its agent connects from) and
    /// labels.
    pub fn nodes(&self, app: &App) -> Result<Vec<NodeInfo>> {
        Ok(app
            .store
            .nodes()?
            .into_iter()
            .filter(|n| n.state != "lost")
            .map(|n| NodeInfo {
                address: app.processes.node_address(&n.name).unwrap_or_default(),
                name: n.name,
                labels: n.labels,
            })
            .collect())
    }

    /// The first cluster admin (by creation): whom HQ's orders and the monitors act as.
    pub fn first_admin(&self, app: &App) -> std::result::Result<String, String> {
        let mut admins: Vec<_> = app
            .store
            .users()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|u| u.admin)
            .collect();
        admins.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
        admins
            .first()
            .map(|u| u.name.clone())
            .ok_or_else(|| "no cluster admin to act as".to_string())
    }

    /// Every record, by path.
    pub fn records(&self, app: &App) -> Result<BTreeMap<String, ServiceRecord>> {
        Ok(SERVICES
            .list(&*app.store, "")?
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect())
    }

    /// The plan at HQ's head, not stored.
    fn compute(
        &self,
        app: &App,
        snap: &Snapshot,
        only: Option<&str>,
    ) -> Result<(Vec<PlanStep>, Vec<String>)> {
        let mut cat = service::load(&snap.files).map_err(ServiceError::Invalid)?;
        cat.secret_versions = secrets::versions(app)?;
        let sources = build::sources(snap, &mut cat)?;
        let nodes = self.nodes(app)?;
        let graph = service::resolve(&cat, &nodes).map_err(ServiceError::Invalid)?;
        let records = self.records(app)?;
        let recorded: BTreeMap<String, Recorded> = records
            .iter()
            .map(|(k, r)| (k.clone(), r.recorded.clone()))
            .collect();
        let mut plan = service_plan::plan(&graph, &recorded);
        if let Some(only) = only {
            if !graph.services.contains_key(only) && !recorded.contains_key(only) {
                return Err(ServiceError::NotFound(format!(
                    "no service services/{only} in HQ"
                )));
            }
            // The service, what is under it, and (transitively) the steps they wait for.
            let mut keep: std::collections::BTreeSet<String> = plan
                .steps
                .iter()
                .filter(|s| s.path == only || s.path.starts_with(&format!("{only}/")))
                .map(|s| s.path.clone())
                .collect();
            for s in plan.steps.iter().rev() {
                if keep.contains(&s.path) {
                    keep.extend(s.after.iter().cloned());
                }
            }
            plan.steps.retain(|s| keep.contains(&s.path));
        }
        let by_name: BTreeMap<&str, &NodeInfo> =
            nodes.iter().map(|n| (n.name.as_str(), n)).collect();
        let embedded = self.embedded();
        let steps = plan
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let resolved = graph.services.get(&s.path).cloned();
                let node = match (&resolved, records.get(&s.path)) {
                    (Some(r), _) => r.node.clone().or_else(|| embedded.clone()),
                    (None, Some(rec)) => rec.node.clone(),
                    (None, None) => embedded.clone(),
                };
                let node_data = node
                    .as_deref()
                    .and_then(|n| by_name.get(n))
                    .map(|n| n.data())
                    .unwrap_or(Value::Null);
                let archive = if s.action == Action::Reset {
                    records.get(&s.path).and_then(|r| r.archive.clone())
                } else {
                    None
                };
                let build = match &resolved {
                    Some(r) if s.action != Action::Reset => build::plan_build(app, r, &sources)?,
                    _ => None,
                };
                Ok(PlanStep {
                    key: format!("s{}", i + 1),
                    step: s,
                    node,
                    resolved,
                    node_data,
                    archive,
                    verbs: None,
                    import: None,
                    build,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((steps, plan.unchanged))
    }

    /// Plans at HQ's head and stores the plan (blocking).
    pub fn plan(&self, app: &App, by: &str, only: Option<&str>) -> Result<StoredPlan> {
        let snap = self.snapshot(app)?;
        let (steps, unchanged) = self.compute(app, &snap, only)?;
        let plan = StoredPlan {
            id: Uuid::now_v7().to_string(),
            commit: snap.commit,
            created_at: now(),
            created_by: by.to_string(),
            steps,
            unchanged,
            kind: plan_kind(),
            only: only.map(str::to_string),
            tree: None,
            applied_at: None,
        };
        PLANS.put(&*app.store, &plan.id, &plan)?;
        Ok(plan)
    }

    pub fn get_plan(&self, app: &App, id: &str) -> Result<Option<StoredPlan>> {
        Ok(PLANS.get(&*app.store, id)?.map(|(p, _)| p))
    }

    /// The archive (`.tar.gz` in the blob store) of the service directory `path` at `snap`: its
    /// own files with their modes, not its children's.
    fn archive(&self, app: &App, snap: &Snapshot, path: &str) -> Result<String> {
        let prefix = format!("services/{path}/");
        let children: Vec<String> = snap
            .files
            .keys()
            .filter_map(|p| p.strip_prefix(&prefix))
            .filter_map(|rel| rel.strip_suffix("/service.toml"))
            .filter(|d| !d.is_empty())
            .map(|d| format!("{d}/"))
            .collect();
        let tmp = app
            .config
            .data_dir
            .join("tmp")
            .join(format!("service-{}", Uuid::now_v7()));
        let write = || -> std::io::Result<Vec<u8>> {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(&tmp)?;
            for (p, data) in snap.files.range(prefix.clone()..) {
                let Some(rel) = p.strip_prefix(&prefix) else {
                    break;
                };
                if children.iter().any(|c| rel.starts_with(c.as_str())) {
                    continue;
                }
                let dst = tmp.join(rel);
                if let Some(parent) = dst.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&dst, data)?;
                let exec =
                    snap.modes.get(p).is_some_and(|m| m == "100755") || rel.starts_with("actions/");
                std::fs::set_permissions(
                    &dst,
                    std::fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }),
                )?;
            }
            let mut out = Vec::new();
            muster_models::archive::pack(&tmp, &mut out)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(out)
        };
        let packed = write();
        let _ = std::fs::remove_dir_all(&tmp);
        let packed = packed.map_err(|e| ServiceError::Internal(format!("packing {path}: {e}")))?;
        app.blobs
            .put(&packed)
            .map_err(|e| ServiceError::Internal(format!("keeping the archive of {path}: {e}")))
    }

    /// Takes the apply claim for plan `id` (unless it is an action, or applied or empty
    /// already), then [`Services::prepare_apply`]; the claim is let go unless the plan is ready
    /// for its tree. `true`: the claim is held.
    fn claim_and_prepare(&self, app: &App, id: &str) -> Result<(Prepared, bool)> {
        let plan = self
            .get_plan(app, id)?
            .ok_or_else(|| ServiceError::NotFound("plan not found".into()))?;
        let claim = plan.tree.is_none() && !plan.steps.is_empty() && plan.kind != "action";
        if claim {
            let mut busy: Option<Applying> = None;
            APPLYING.update(&*app.store, APPLYING_KEY, |old| {
                busy = None;
                match old {
                    Some(c) if c.plan != id && claim_holds(app, &c) => {
                        busy = Some(c.clone());
                        Some(c)
                    }
                    Some(c) if c.plan == id => Some(c),
                    _ => Some(Applying {
                        plan: id.to_string(),
                        tree: None,
                        since: now(),
                    }),
                }
            })?;
            if let Some(c) = busy {
                let what = match c.tree {
                    Some(t) => format!("in tree {t}"),
                    None => "its tree is being made".to_string(),
                };
                return Err(ServiceError::Conflict(format!(
                    "plan {} is being applied ({what}): wait for it to end, then plan again",
                    c.plan
                )));
            }
        }
        match self.prepare_apply(app, id) {
            Ok(p @ Prepared::Ready(_)) => Ok((p, claim)),
            other => {
                if claim {
                    release(app, id)?;
                }
                other.map(|p| (p, false))
            }
        }
    }

    /// Checks that plan `id` still holds and makes its tree (blocking but for the tree, which
    /// the caller creates with [`Services::create_tree`]). `Ok(None)`: nothing to do.
    pub fn prepare_apply(&self, app: &App, id: &str) -> Result<Prepared> {
        let plan = self
            .get_plan(app, id)?
            .ok_or_else(|| ServiceError::NotFound("plan not found".into()))?;
        if let Some(tree) = plan.tree {
            return Ok(Prepared::Applied(plan.clone(), tree));
        }
        if plan.steps.is_empty() {
            return Ok(Prepared::Empty(plan));
        }
        if plan.kind != "plan" {
            // A reset or an action of recorded services: they must still be recorded.
            for s in &plan.steps {
                if SERVICES.get(&*app.store, &s.step.path)?.is_none() {
                    return Err(ServiceError::Conflict(format!(
                        "service {} is no longer recorded: ask again",
                        s.step.path
                    )));
                }
            }
            return Ok(Prepared::Ready(plan));
        }
        let snap = self.snapshot(app)?;
        if snap.commit != plan.commit {
            return Err(ServiceError::Conflict(format!(
                "HQ moved since the plan (it was made at {}, HQ is at {}): plan again",
                short(&plan.commit),
                short(&snap.commit)
            )));
        }
        let (now_steps, _) = self.compute(app, &snap, plan.only.as_deref())?;
        let same = now_steps.len() == plan.steps.len()
            && now_steps.iter().zip(&plan.steps).all(|(a, b)| {
                a.step.path == b.step.path
                    && a.step.action == b.step.action
                    && a.step.hash == b.step.hash
            });
        if !same {
            return Err(ServiceError::Conflict(
                "the recorded state of the services changed since the plan (another apply?): plan again".into(),
            ));
        }
        let mut plan = plan;
        for s in plan.steps.iter_mut() {
            if s.step.action != Action::Reset {
                s.archive = Some(self.archive(app, &snap, &s.step.path)?);
            }
        }
        // The archives are in the plan before its tree exists: a step reads them.
        let stored = plan.clone();
        PLANS.update(&*app.store, id, |p| {
            let mut p = p?;
            if p.tree.is_none() {
                p.steps = stored.steps.clone();
            }
            Some(p)
        })?;
        Ok(Prepared::Ready(plan))
    }

    /// The job tree of `plan` (see the module doc).
    pub fn tree_spec(&self, plan: &StoredPlan) -> JobSpec {
        let idx: BTreeMap<&str, usize> = plan
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.step.path.as_str(), i))
            .collect();
        // Each step's place: under the first later step that waits for it.
        let mut owner: Vec<Option<usize>> = vec![None; plan.steps.len()];
        for (j, s) in plan.steps.iter().enumerate() {
            for dep in &s.step.after {
                if let Some(&i) = idx.get(dep.as_str()) {
                    if owner[i].is_none() && i != j {
                        owner[i] = Some(j);
                    }
                }
            }
        }
        fn build(
            plan: &StoredPlan,
            owner: &[Option<usize>],
            idx: &BTreeMap<&str, usize>,
            i: usize,
        ) -> JobSpec {
            let s = &plan.steps[i];
            let children: Vec<JobSpec> = (0..plan.steps.len())
                .filter(|k| owner[*k] == Some(i))
                .map(|k| build(plan, owner, idx, k))
                .collect();
            let needs = s
                .step
                .after
                .iter()
                .filter_map(|d| idx.get(d.as_str()).copied())
                .filter(|k| owner[*k] != Some(i))
                .map(|k| plan.steps[k].key.clone())
                .collect();
            JobSpec {
                name: format!("{} {}", s.step.action.as_str(), s.step.path),
                key: Some(s.key.clone()),
                shell: Some(format!(
                    "exec \"$MUSTER_EXE\" services step {} {}",
                    plan.id, s.key
                )),
                node: s.node.clone(),
                timeout_s: Some(3600),
                retries: Some(0),
                needs,
                children,
                ..Default::default()
            }
        }
        let top: Vec<JobSpec> = (0..plan.steps.len())
            .filter(|k| owner[*k].is_none())
            .map(|k| build(plan, &owner, &idx, k))
            .collect();
        let mut labels = BTreeMap::new();
        labels.insert("kind".to_string(), KIND_APPLY.to_string());
        labels.insert("plan".to_string(), plan.id.clone());
        JobSpec {
            name: format!(
                "apply services plan {} ({} steps)",
                short(&plan.id),
                plan.steps.len()
            ),
            tags: Some(Tags {
                workspace: crate::hq::orders::ORDERS_WORKSPACE.to_string(),
                application: None,
                version: None,
                instance: None,
                labels,
            }),
            children: top,
            ..Default::default()
        }
    }

    /// Applies plan `id`: checks it, makes its tree (once: a second apply of it gives the same
    /// tree). `None`: an empty plan, nothing done.
    pub async fn apply(
        &self,
        app: &Arc<App>,
        id: &str,
        by: &str,
        admin: bool,
    ) -> Result<(StoredPlan, Option<Uuid>)> {
        let (me, a, id2) = (self.clone(), app.clone(), id.to_string());
        let (prepared, claimed) =
            tokio::task::spawn_blocking(move || me.claim_and_prepare(&a, &id2))
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))??;
        let plan = match prepared {
            Prepared::Applied(p, t) => return Ok((p, Some(t))),
            Prepared::Empty(p) => return Ok((p, None)),
            Prepared::Ready(p) => p,
        };
        let spec = self.tree_spec(&plan);
        let mut new = muster_core::spec::build_tree(
            &spec,
            crate::hq::orders::ORDERS_WORKSPACE,
            Some(by),
            now(),
            &mut Uuid::now_v7,
        )
        .map_err(ServiceError::Internal)?;
        new.tree.admin = admin;
        for j in new.jobs.iter_mut().skip(1) {
            j.hook = Some(STEP_HOOK.to_string());
        }
        let created = app
            .manager
            .create(new.clone(), Some(format!("services-apply:{}", plan.id)))
            .await;
        let tree = match created {
            Ok(muster_store::Created::New) => new.tree.id,
            Ok(muster_store::Created::Existing(t)) => t,
            Err(e) => {
                if claimed {
                    let (a, id2) = (app.clone(), plan.id.clone());
                    let _ = tokio::task::spawn_blocking(move || release(&a, &id2)).await;
                }
                return Err(e.into());
            }
        };
        if claimed {
            let (a, id2) = (app.clone(), plan.id.clone());
            tokio::task::spawn_blocking(move || {
                APPLYING.update(&*a.store, APPLYING_KEY, |c| {
                    let mut c = c?;
                    if c.plan == id2 {
                        c.tree = Some(tree);
                    }
                    Some(c)
                })
            })
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))??;
        }
        let (a, id2) = (app.clone(), plan.id.clone());
        let plan = tokio::task::spawn_blocking(move || {
            PLANS.update(&*a.store, &id2, |p| {
                let mut p = p?;
                if p.tree.is_none() {
                    p.tree = Some(tree);
                    p.applied_at = Some(now());
                }
                Some(p)
            })
        })
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))??
        .map(|(p, _)| p)
        .unwrap_or(plan);
        Ok((plan, Some(tree)))
    }

    /// Records how step `job` of the apply of `plan` ended.
    pub fn record(&self, app: &App, plan: &StoredPlan, job: &Job) -> Result<()> {
        let Some(s) = plan.steps.iter().find(|s| s.key == job.key) else {
            return Ok(());
        };
        let path = s.step.path.clone();
        let result = job.result.clone().unwrap_or(Value::Null);
        let text = |k: &str| result.get(k).and_then(|v| v.as_str()).map(str::to_string);
        if plan.kind == "action" {
            // One verb: what it returned, nothing of what is installed.
            let verb = s.verbs.clone().unwrap_or_default().join("+");
            SERVICES.update(&*app.store, &path, |old| {
                let mut rec = old?;
                match job.state {
                    JobState::Succeeded => {
                        if let Some(v) = text("status") {
                            rec.status = v;
                        }
                        rec.message = text("message").unwrap_or_default();
                        if let Some(v) = result.get("state") {
                            rec.state = v.clone();
                        }
                        if let Some(v) = result.get("published") {
                            rec.published = v.clone();
                        }
                    }
                    JobState::Failed => {
                        rec.status = "error".into();
                        rec.message = format!(
                            "{verb} failed: {}",
                            job.error.clone().unwrap_or_else(|| format!(
                                "exit code {}",
                                job.exit_code.unwrap_or(-1)
                            ))
                        );
                    }
                    _ => return Some(rec),
                }
                rec.last_action = Some(verb.clone());
                rec.last_job = Some(job.id);
                // A monitor that passed is no news (the pulse runs one every few seconds).
                if !(verb == "monitor" && job.state == JobState::Succeeded) {
                    rec.ran(&verb, job);
                }
                rec.updated_at = now();
                Some(rec)
            })?;
            return Ok(());
        }
        match job.state {
            JobState::Succeeded if s.step.action == Action::Reset => {
                SERVICES.delete(&*app.store, &path)?;
            }
            JobState::Succeeded => {
                let r = s.resolved.clone();
                SERVICES.update(&*app.store, &path, |old| {
                    let old = old.unwrap_or_default();
                    let mut history = ServiceRecord {
                        history: old.history.clone(),
                        ..Default::default()
                    };
                    history.ran(s.step.action.as_str(), job);
                    Some(ServiceRecord {
                        path: path.clone(),
                        recorded: Recorded {
                            hash: s.step.hash.clone().unwrap_or_default(),
                            parts: r.as_ref().map(|r| r.parts.clone()).unwrap_or_default(),
                            installed: true,
                            deps: r.as_ref().map(|r| r.deps.clone()).unwrap_or_default(),
                        },
                        node: job.node.clone().or(s.node.clone()),
                        status: text("status").unwrap_or_else(|| "active".into()),
                        message: text("message").unwrap_or_default(),
                        state: result.get("state").cloned().unwrap_or(old.state),
                        published: result.get("published").cloned().unwrap_or(old.published),
                        archive: s.archive.clone(),
                        params: r.as_ref().map(|r| r.params.clone()).unwrap_or(old.params),
                        process: old.process,
                        actions: r
                            .as_ref()
                            .map(|r| r.actions.iter().cloned().collect())
                            .unwrap_or(old.actions),
                        monitor_every: r.as_ref().and_then(|r| r.monitor_every.clone()),
                        monitored_at: old.monitored_at,
                        monitor_tree: old.monitor_tree,
                        exports: old.exports,
                        last_action: Some(s.step.action.as_str().into()),
                        last_job: Some(job.id),
                        last_plan: Some(plan.id.clone()),
                        history: history.history,
                        updated_at: now(),
                    })
                })?;
            }
            JobState::Failed => {
                let why = text("message")
                    .or_else(|| job.error.clone())
                    .unwrap_or_else(|| format!("exit code {}", job.exit_code.unwrap_or(-1)));
                SERVICES.update(&*app.store, &path, |old| {
                    let mut rec = old.unwrap_or_else(|| ServiceRecord {
                        path: path.clone(),
                        node: s.node.clone(),
                        ..Default::default()
                    });
                    rec.recorded.installed = false;
                    if s.step.action != Action::Reset && rec.archive.is_none() {
                        rec.archive = s.archive.clone();
                    }
                    rec.status = "error".into();
                    rec.message = format!("{} failed: {why}", s.step.action.as_str());
                    rec.last_action = Some(s.step.action.as_str().into());
                    rec.last_job = Some(job.id);
                    rec.last_plan = Some(plan.id.clone());
                    rec.ran(s.step.action.as_str(), job);
                    rec.updated_at = now();
                    Some(rec)
                })?;
            }
            // Aborted before it ran (or cancelled): nothing happened to the service.
            _ => {}
        }
        Ok(())
    }
}

/// Whether the apply claim `c` still holds: its tree runs, or it is being made.
fn claim_holds(app: &App, c: &Applying) -> bool {
    match c.tree {
        Some(t) => match app.store.tree(t) {
            Ok(Some(tree)) => tree.state == muster_core::TreeState::Running,
            Ok(None) => false,
            // The store cannot say: it holds, to be safe.
            Err(_) => true,
        },
        None => now().0 - c.since.0 < CLAIM_TTL_MS,
    }
}

/// Lets go of plan `id`'s apply claim (if it still has it).
fn release(app: &App, id: &str) -> Result<()> {
    APPLYING.update(&*app.store, APPLYING_KEY, |c| match c {
        Some(c) if c.plan == id => None,
        other => other,
    })?;
    Ok(())
}

/// What [`Services::prepare_apply`] found.
pub enum Prepared {
    /// Applied before: its tree.
    Applied(StoredPlan, Uuid),
    /// Nothing to do.
    Empty(StoredPlan),
    /// Checked, archives made: make its tree.
    Ready(StoredPlan),
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The outcome hook on each step: records the service's new state.
pub struct StepHook(pub Services);

impl crate::jobs::hooks::JobHook for StepHook {
    fn ended(&self, tree: &Tree, job: &Job) {
        let Some(plan_id) = tree.tags.labels.get("plan").cloned() else {
            return;
        };
        let (cell, job) = (self.0.app.clone(), job.clone());
        // The hook runs on the manager's thread: the store writes go elsewhere. An outcome
        // recovered at start may come before the app is made: it waits for it a while.
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            let app = loop {
                if let Some(a) = cell.get() {
                    break a.clone();
                }
                if std::time::Instant::now() > deadline {
                    tracing::error!(
                        "services: no app to record step {} of plan {plan_id}",
                        job.key
                    );
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            let Some(app) = app.upgrade() else {
                return;
            };
            let plan = match app.services.get_plan(&app, &plan_id) {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(e) => {
                    tracing::error!("cannot read services plan {plan_id}: {e:?}");
                    return;
                }
            };
            if let Err(e) = app.services.record(&app, &plan, &job) {
                tracing::error!("cannot record step {} of plan {plan_id}: {e:?}", job.key);
            }
        });
    }
}
