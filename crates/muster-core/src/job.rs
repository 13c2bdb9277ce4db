//! Jobs and trees as the store keeps them and the API serves them (SPEC §4).

use crate::time::Ts;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

/// The life of one job: `waiting` → `running` → `succeeded` | `failed` | `aborted`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Waiting,
    Running,
    Succeeded,
    Failed,
    Aborted,
}

impl JobState {
    /// A finished job never changes again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Aborted
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "waiting" => JobState::Waiting,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "aborted" => JobState::Aborted,
            _ => return None,
        })
    }
}

/// A tree's derived state: `running` while any job waits or runs, then `succeeded` if the root
/// succeeded, `aborted` if a user aborted it, `failed` otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TreeState {
    Running,
    Succeeded,
    Failed,
    Aborted,
}

impl TreeState {
    pub fn as_str(self) -> &'static str {
        match self {
            TreeState::Running => "running",
            TreeState::Succeeded => "succeeded",
            TreeState::Failed => "failed",
            TreeState::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<TreeState> {
        Some(match s {
            "running" => TreeState::Running,
            "succeeded" => TreeState::Succeeded,
            "failed" => TreeState::Failed,
            "aborted" => TreeState::Aborted,
            _ => return None,
        })
    }
}

/// What the rest of a tree does when one of its jobs fails for good.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Kill every running job, abort every waiting one; nothing starts afterwards.
    #[default]
    Abort,
    /// Abort only the jobs that depend on the failed one; independent branches finish.
    Continue,
}

/// What a job runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Run {
    /// An argv, executed directly.
    Exec(Vec<String>),
    /// A script text, run by `/bin/sh -c`.
    Shell(String),
    /// Dispatched to an agent, which reports success at once.
    Noop,
    /// Nothing to run: a grouping job, resolved on the server.
    Group,
}

impl Run {
    /// Whether the job must reach an agent at all.
    pub fn needs_agent(&self) -> bool {
        !matches!(self, Run::Group)
    }
}

/// The tags of a tree, indexed for listing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tags {
    /// The workspace owning the tree (required; defaults to the caller's own).
    #[serde(default)]
    pub workspace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Free labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// One job of a tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: Uuid,
    /// The root's id.
    pub tree: Uuid,
    pub parent: Option<Uuid>,
    pub children: Vec<Uuid>,
    /// Extra dependencies inside the tree.
    pub needs: Vec<Uuid>,
    pub name: String,
    /// Unique in its tree.
    pub key: String,
    pub state: JobState,
    /// The node it runs (or ran) on.
    pub node: Option<String>,
    /// A node the job is pinned to, by name or id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub want_node: Option<String>,
    /// Labels a node must carry to run the job.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    pub run: Run,
    pub timeout_s: Option<u64>,
    pub retries: u32,
    pub created_at: Ts,
    pub started_at: Option<Ts>,
    pub finished_at: Option<Ts>,
    /// Null when killed by a signal.
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// Starts at 1; a retry is a new attempt.
    pub attempt: u32,
    /// When a job waiting to retry may start again.
    pub retry_at: Option<Ts>,
    /// The JSON the job printed as its last stdout line, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The outcome hook that hears how the job ended (set by internal kinds of trees — service
    /// actions, deploy steps — never by API callers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
}

impl Job {
    /// Every job this one waits for: its children, then its `needs`.
    pub fn deps(&self) -> impl Iterator<Item = &Uuid> {
        self.children.iter().chain(self.needs.iter())
    }
}

/// A tree: the root's id names it; tags and `on_failure` live here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub id: Uuid,
    /// The root job's name.
    pub name: String,
    pub tags: Tags,
    pub on_failure: OnFailure,
    pub state: TreeState,
    /// Set when a user aborted a job of the tree.
    pub user_aborted: bool,
    pub created_at: Ts,
    pub finished_at: Option<Ts>,
    /// How many jobs the tree has.
    pub jobs: u32,
    /// Who made it.
    pub created_by: Option<String>,
    /// Every node a job of the tree was placed on (for `?node=`).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Made by a cluster admin: may run on nodes that allow no workspace in particular.
    #[serde(default)]
    pub admin: bool,
    /// A digest of the request that made it, so a reused idempotency key with another request
    /// is told apart from a retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_digest: Option<String>,
}
