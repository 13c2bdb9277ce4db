//! Models (SPEC §8): versions, deploys as job trees, predict routing.
//!
//! - this file: [`Models`], the handle (cheap to clone) over the model documents (kind
//!   [`MODELS`], one per `<workspace>/<model>`, changed only by compare-and-set) and what the
//!   other parts of a model use; the outcome hook of deploy trees ([`DeployHook`]).
//! - [`upload`]: a bundle upload (`.tar.gz`) checked, kept in the blob store, committed to HQ
//!   under `<workspace>/models/<Model>/` (large files as pointers to the blob store), given the
//!   next version, and its deploy tree created.
//! - [`deploy`]: the deploy tree's steps. `prepare` runs on a node (`muster models step
//!   prepare`: the bundle fetched from the server, its environment built, progress in the job
//!   log); `start`, `health`, `switch`, `drain` and `stop` run here, asked by their job on a node
//!   (`muster models step STEP`), each one's progress streamed back into that job's log.
//! - [`lifecycle`]: revert, delete, the reaper's clean-up, HQ's order verbs, the leader's watch
//!   that settles a deploy whose tree ended unheard.
//! - [`uploads`]: the HQ `uploads/` watcher: archives and `.yhat` files dropped there deployed,
//!   then moved to `uploads/done/` or `uploads/rejected/` (with a `.why`), the move committed.
//! - [`batch`]: batch scoring: a CSV split into chunks in the blob store, a tree of a job per
//!   chunk scored through the predict routes and a merge into the result CSV, input order kept.
//! - [`routes`]: the predict path: a table of each model's live version and ready replicas, kept
//!   from the store's events (never read or written per request), least outstanding calls first,
//!   a bound on calls in flight per replica, kept-alive connections to the predictors.
//!
//! Invariant: the live version changes only in the `switch` step, by compare-and-set of the
//! model's document; a deploy that fails before it leaves the old version serving.

pub mod batch;
pub mod deploy;
pub mod lifecycle;
pub mod routes;
pub mod upload;
pub mod uploads;

use crate::processes::Processes;
use muster_core::process::Limits;
use muster_core::{Job, JobState, Tree, TreeState, Ts, Uuid};
use muster_store::{Docs, Event, Store, StoreError};
use muster_wire::util::now;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The model documents, by `<workspace>/<model>`.
pub const MODELS: Docs<Model> = Docs::new("model");

/// The name of the outcome hook on the root of every deploy tree.
pub const DEPLOY_HOOK: &str = "model-deploy";

/// The label that marks a deploy tree (`tags.labels.kind`) and a predictor process.
pub const KIND_DEPLOY: &str = "model-deploy";
pub const KIND_PREDICTOR: &str = "model";

/// Where a version is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionState {
    /// Its deploy tree runs.
    Deploying,
    /// Serving the model's predict calls.
    Live,
    /// Replaced by a newer live version; its calls in flight finish before it stops.
    Draining,
    /// Kept (files and environment) for a revert; its predictors are stopped.
    Stopped,
    /// Its deploy failed (the error says which step and why).
    Failed,
    /// Past `[models] keep_versions`, or its model deleted: the reaper removes its files.
    Retired,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Deploying => "deploying",
            VersionState::Live => "live",
            VersionState::Draining => "draining",
            VersionState::Stopped => "stopped",
            VersionState::Failed => "failed",
            VersionState::Retired => "retired",
        }
    }
}

/// Where `prepare` left a version on its node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The node (name) holding the bundle and environment.
    pub node: String,
    /// The unpacked bundle there.
    pub bundle_dir: String,
    /// The Python environment there.
    pub env_dir: String,
    /// The environment's content hash.
    pub env_key: String,
    /// Whether the environment was there already.
    pub env_reused: bool,
}

/// One version of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    pub version: u32,
    pub state: VersionState,
    pub created_at: Ts,
    pub created_by: String,
    /// The uploaded archive in the blob store.
    pub blob: String,
    pub size: u64,
    /// From `bundle.json`.
    pub runtime: String,
    pub replicas: u32,
    pub workers: u32,
    #[serde(default)]
    pub requirements: Vec<String>,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: Limits,
    /// The bundle has an `example` (the health check calls it).
    #[serde(default)]
    pub has_example: bool,
    /// The deploy tree.
    #[serde(default)]
    pub tree: Option<Uuid>,
    /// The HQ commit that holds this version's files.
    #[serde(default)]
    pub commit: Option<String>,
    /// Why its deploy failed: the step and the error.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub placement: Option<Placement>,
    /// Its predictor processes.
    #[serde(default)]
    pub processes: Vec<Uuid>,
    #[serde(default)]
    pub live_at: Option<Ts>,
    /// Made by a cluster admin (its predictors may run on nodes that allow no workspace).
    #[serde(default)]
    pub admin: bool,
    /// The running tree is a revert to this kept version (a failure leaves it kept, not failed).
    #[serde(default)]
    pub reverting: bool,
    /// The reaper has removed its files on its node (a retired version, or a deleted model's).
    #[serde(default)]
    pub files_removed: bool,
}

/// A model as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Model {
    pub workspace: String,
    pub name: String,
    pub runtime: String,
    /// The version serving predict calls.
    pub live: Option<u32>,
    /// The last version number given (the next deploy gets one more).
    pub last_version: u32,
    /// Deleted: it serves nothing; the reaper removes its processes, files and, last, this.
    #[serde(default)]
    pub deleted: bool,
    pub created_at: Ts,
    pub updated_at: Ts,
    /// Oldest first.
    pub versions: Vec<ModelVersion>,
}

impl Model {
    pub fn key(&self) -> String {
        key(&self.workspace, &self.name)
    }

    pub fn version(&self, n: u32) -> Option<&ModelVersion> {
        self.versions.iter().find(|v| v.version == n)
    }

    pub fn version_mut(&mut self, n: u32) -> Option<&mut ModelVersion> {
        self.versions.iter_mut().find(|v| v.version == n)
    }
}

/// The document key of a model.
pub fn key(ws: &str, name: &str) -> String {
    format!("{ws}/{name}")
}

/// What can go wrong with a request about a model.
#[derive(Debug)]
pub enum ModelError {
    /// No such model (or version, or workspace), as the message says.
    NotFound(String),
    /// The request is not valid (a bad bundle, a bad name): 400 or 422.
    Invalid(String),
    /// It conflicts with the model's state (a deploy running, deleted).
    Conflict(String),
    /// A part it needs is not available now (HQ, the job manager).
    Unavailable(String),
    /// The upload is larger than `[models] upload_max`.
    TooLarge(String),
    Store(StoreError),
    /// Anything else: logged, the client sees an id.
    Internal(String),
}

impl From<StoreError> for ModelError {
    fn from(e: StoreError) -> ModelError {
        ModelError::Store(e)
    }
}

impl std::fmt::Display for ModelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelError::NotFound(m)
            | ModelError::Invalid(m)
            | ModelError::Conflict(m)
            | ModelError::Unavailable(m)
            | ModelError::TooLarge(m)
            | ModelError::Internal(m) => f.write_str(m),
            ModelError::Store(e) => write!(f, "{e}"),
        }
    }
}

struct Inner {
    store: Arc<dyn Store>,
    processes: Processes,
    routes: routes::Routes,
    /// Batch chunks being scored by this server at once (`[models] batch_parallel`): what
    /// bounds the memory of every batch together.
    batch_slots: tokio::sync::Semaphore,
    /// The server's app, for the parts called with a `&App` that make trees (order verbs).
    app: std::sync::OnceLock<std::sync::Weak<crate::App>>,
}

/// The handle (cheap to clone): the model documents and the predict routes.
#[derive(Clone)]
pub struct Models {
    inner: Arc<Inner>,
}

impl Models {
    pub fn new(
        store: Arc<dyn Store>,
        processes: Processes,
        max_inflight: usize,
        batch_parallel: usize,
    ) -> Models {
        Models {
            inner: Arc::new(Inner {
                routes: routes::Routes::new(max_inflight),
                batch_slots: tokio::sync::Semaphore::new(batch_parallel.max(1)),
                store,
                processes,
                app: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Gives the handle its app (once, when the app is made).
    pub fn set_app(&self, app: &Arc<crate::App>) {
        let _ = self.inner.app.set(Arc::downgrade(app));
    }

    /// The app, while it lives.
    pub fn app(&self) -> Option<Arc<crate::App>> {
        self.inner.app.get()?.upgrade()
    }

    pub fn store(&self) -> &dyn Store {
        &*self.inner.store
    }

    pub fn processes(&self) -> &Processes {
        &self.inner.processes
    }

    /// The predict routes of this server.
    pub fn routes(&self) -> &routes::Routes {
        &self.inner.routes
    }

    /// A place to score one batch chunk (waits while `[models] batch_parallel` are taken).
    pub async fn batch_slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.inner
            .batch_slots
            .acquire()
            .await
            .expect("the batch semaphore is never closed")
    }

    /// One model.
    pub fn get(&self, ws: &str, name: &str) -> Result<Option<Model>, StoreError> {
        Ok(MODELS.get(self.store(), &key(ws, name))?.map(|(m, _)| m))
    }

    /// Every model of `workspaces` (`None`: all), deleted ones left out, by workspace and name.
    pub fn list(&self, workspaces: Option<&[String]>) -> Result<Vec<Model>, StoreError> {
        let mut all: Vec<Model> = MODELS
            .list(self.store(), "")?
            .into_iter()
            .map(|(_, m, _)| m)
            .filter(|m| !m.deleted && workspaces.is_none_or(|w| w.contains(&m.workspace)))
            .collect();
        all.sort_by(|a, b| (&a.workspace, &a.name).cmp(&(&b.workspace, &b.name)));
        Ok(all)
    }

    /// Predictor processes of every model by state, for `/metrics`: `(model, state, count)`.
    /// Blocking (store reads).
    pub fn replica_states(&self) -> Vec<(String, String, u64)> {
        let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
        for m in self.list(None).unwrap_or_default() {
            for v in &m.versions {
                for id in &v.processes {
                    if let Ok(Some(p)) = self.processes().get(*id) {
                        *counts
                            .entry((m.key(), p.state.as_str().to_string()))
                            .or_default() += 1;
                    }
                }
            }
        }
        counts.into_iter().map(|((m, s), n)| (m, s, n)).collect()
    }

    /// Changes model `ws/name` by `f` (compare-and-set, retried on conflict); `f` answers
    /// `Err` to change nothing. Publishes the model's event when it changed.
    pub fn update<E>(
        &self,
        ws: &str,
        name: &str,
        mut f: impl FnMut(&mut Model) -> Result<(), E>,
    ) -> Result<Result<Model, E>, StoreError> {
        let mut refused = None;
        let written = MODELS.update(self.store(), &key(ws, name), |cur| {
            let mut m = cur?;
            let before = m.clone();
            refused = None;
            match f(&mut m) {
                Ok(()) => {
                    if m != before {
                        m.updated_at = now();
                    }
                    Some(m)
                }
                Err(e) => {
                    refused = Some(e);
                    Some(before)
                }
            }
        })?;
        if let Some(e) = refused {
            return Ok(Err(e));
        }
        match written {
            Some((m, _)) => {
                self.changed(&m);
                Ok(Ok(m))
            }
            None => Err(StoreError::Other(format!("model {ws}/{name} is gone"))),
        }
    }

    /// [`Models::update`] for a request: a model that does not exist is `NotFound` (not a
    /// store error), and the change's refusal is the answer.
    pub fn edit(
        &self,
        ws: &str,
        name: &str,
        f: impl FnMut(&mut Model) -> Result<(), ModelError>,
    ) -> Result<Model, ModelError> {
        if self.get(ws, name)?.is_none() {
            return Err(ModelError::NotFound(format!("model {ws}/{name} not found")));
        }
        self.update(ws, name, f)?
    }

    /// Tells every server (this one first) that a model changed: their routes follow.
    pub fn changed(&self, m: &Model) {
        self.inner.routes.refresh_model(self, &m.workspace, &m.name);
        self.store().publish(&[Event::Model {
            workspace: m.workspace.clone(),
            name: m.name.clone(),
            live: m.live,
            at: now(),
        }]);
    }

    /// A deploy tree ended without success: its version is failed (unless it had gone live),
    /// its predictors stopped, and a `deploy_failed` alert sent. Blocking.
    pub fn deploy_ended(&self, tree: &Tree, jobs: &[Job], alerts: &crate::alerts::Alerts) {
        let Some((ws, name, version)) = deploy_of(tree) else {
            return;
        };
        if tree.state == TreeState::Succeeded {
            return;
        }
        let failed = jobs
            .iter()
            .find(|j| j.state == JobState::Failed)
            .or_else(|| {
                jobs.iter()
                    .find(|j| j.state == JobState::Aborted && j.parent.is_some())
            });
        let step = failed
            .map(|j| j.key.clone())
            .unwrap_or_else(|| "deploy".into());
        let mut why = None;
        let done = self.update(&ws, &name, |m| {
            let Some(v) = m.version_mut(version) else {
                return Err(());
            };
            if v.state != VersionState::Deploying {
                return Err(());
            }
            let error = v.error.clone().unwrap_or_else(|| {
                let detail = failed
                    .and_then(|j| j.error.clone())
                    .unwrap_or_else(|| format!("the deploy tree ended {}", tree.state.as_str()));
                format!("{step}: {detail}")
            });
            why = Some(error.clone());
            v.error = Some(error);
            // A failed revert leaves the version kept (its files are there), only stopped.
            v.state = if v.reverting {
                VersionState::Stopped
            } else {
                VersionState::Failed
            };
            v.reverting = false;
            Ok(())
        });
        let m = match done {
            Ok(Ok(m)) => m,
            Ok(Err(())) => return,
            Err(e) => {
                tracing::error!("cannot mark {ws}/{name} v{version} failed: {e}");
                return;
            }
        };
        if let Some(v) = m.version(version).filter(|_| m.live != Some(version)) {
            for id in &v.processes {
                if let Err(e) = self.processes().stop(*id) {
                    tracing::warn!("cannot stop predictor {id} of a failed deploy: {e:?}");
                }
            }
        }
        let error = why.unwrap_or_default();
        tracing::warn!("deploy of {ws}/{name} v{version} failed: {error}");
        alerts.send(
            "deploy_failed",
            serde_json::json!({
                "workspace": ws, "model": name, "version": version,
                "step": step, "error": error, "tree": tree.id,
            }),
        );
    }
}

/// The model and version a deploy tree is for (its tags).
pub fn deploy_of(tree: &Tree) -> Option<(String, String, u32)> {
    let t = &tree.tags;
    if t.labels.get("kind").map(String::as_str) != Some(KIND_DEPLOY) {
        return None;
    }
    Some((
        t.workspace.clone(),
        t.application.clone()?,
        t.version.as_deref()?.parse().ok()?,
    ))
}

/// The outcome hook of deploy trees' roots: a deploy that did not succeed is marked failed.
pub struct DeployHook {
    pub models: Models,
    pub alerts: Arc<crate::alerts::Alerts>,
}

impl crate::jobs::hooks::JobHook for DeployHook {
    fn ended(&self, tree: &Tree, _job: &Job) {
        // The hook runs on the manager's thread: the work (store reads, stops) goes elsewhere.
        let (models, alerts, tree) = (self.models.clone(), self.alerts.clone(), tree.clone());
        std::thread::spawn(move || {
            let jobs = match models.store().tree_jobs(tree.id) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!("cannot read deploy tree {}: {e}", tree.id);
                    return;
                }
            };
            let mut tree = tree;
            if let Ok(Some(t)) = models.store().tree(tree.id) {
                tree = t;
            }
            models.deploy_ended(&tree, &jobs, &alerts);
        });
    }
}
