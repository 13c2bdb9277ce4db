//! How other parts react to job outcomes without the job manager knowing them.
//!
//! Two kinds of listeners, both called on the manager's thread **after** the commit that made
//! the outcome (so they never see anything a crash could take back), and both quick (anything
//! slow is handed to a task of their own):
//!
//! - [`Observer`]s see every tree: when the manager takes a tree in hand (created, or recovered
//!   after a restart or a failover) — they may give its jobs environment variables then (the
//!   job token) —, when a tree ends, and when a node is lost (alerts).
//! - Named [`JobHook`]s hear how the jobs that name them (`Job::hook`, set by internal kinds of
//!   trees: service actions, deploy steps) ended. These are **durable**: before the commit that
//!   ends such a job, the manager records an *intent* in the store (a document of kind
//!   [`INTENTS`]); after the commit it calls the hook, then deletes the intent. A server that
//!   dies in between leaves the intent, and whoever leads next calls the hook when it recovers
//!   the trees. So a hook runs once per outcome, and once more only if the server died after it
//!   ran and before its intent was deleted: hooks make their effect idempotent (a write keyed by
//!   the job and attempt, a compare-and-set to a value), which the store's versioned documents
//!   make easy.

use muster_core::{Job, Tree, Uuid};
use muster_store::Node;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// The document kind of recorded hook intents: key `<job>.<attempt>`, value the hook's name.
pub const INTENTS: &str = "job_hook";

/// Sees every tree the manager runs.
pub trait Observer: Send {
    /// The manager has taken `tree` in hand (created now, or recovered): environment variables
    /// every job of it gets.
    fn started(&mut self, tree: &Tree) -> BTreeMap<String, String> {
        let _ = tree;
        BTreeMap::new()
    }
    /// `tree` ended (committed), with its jobs.
    fn ended(&mut self, tree: &Tree, jobs: &[Job]) {
        let _ = (tree, jobs);
    }
    /// `node` was found lost (its running jobs failed or moved).
    fn node_lost(&mut self, node: &Node) {
        let _ = node;
    }
}

/// Hears how the jobs that name it ended (see the module doc).
pub trait JobHook: Send + Sync {
    /// `job` (in `tree`) reached a final state, committed.
    fn ended(&self, tree: &Tree, job: &Job);
}

/// The named hooks, shared by whoever registers them and the manager that calls them.
#[derive(Clone, Default)]
pub struct Hooks {
    map: Arc<Mutex<HashMap<String, Arc<dyn JobHook>>>>,
}

impl Hooks {
    /// Registers `hook` under `name` (before this server leads, so recovered outcomes find it).
    pub fn register(&self, name: &str, hook: Arc<dyn JobHook>) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), hook);
    }

    /// The hook of that name.
    pub fn get(&self, name: &str) -> Option<Arc<dyn JobHook>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

/// The key of an intent.
pub fn intent_key(job: Uuid, attempt: u32) -> String {
    format!("{job}.{attempt}")
}

/// The job and attempt of an intent's key.
pub fn parse_intent_key(key: &str) -> Option<(Uuid, u32)> {
    let (job, attempt) = key.split_once('.')?;
    Some((job.parse().ok()?, attempt.parse().ok()?))
}
