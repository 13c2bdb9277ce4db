//! muster-store: the store of record behind one trait, [`Store`], with several engines chosen by
//! URL (SPEC §3): `memory://`, `sqlite://PATH` and `redis://[:PASSWORD@]HOST[:PORT][/DB]`.
//!
//! Invariants every engine keeps (checked by [`conformance`], which every engine runs):
//! - [`Store::apply`] applies a batch in one atomic step: all of it survives a crash or none.
//!   Each job write is a compare-and-set on the job's state, so a stale writer cannot move a job
//!   that someone else already moved.
//! - Creating a tree with an idempotency key is atomic with the key: a second create with the
//!   same key returns the first tree and writes nothing.
//! - Listing answers newest first, from an index, without scanning every tree.
//! - Events are hints for live views; the store itself is the truth. An engine delivers the events
//!   published through it to every subscriber of every process sharing the store (in-process for
//!   memory and SQLite, pub/sub for Redis).
//! - Documents are versioned: every write of a document is one atomic step that first checks its
//!   [`DocCond`] (any, absent, or at a version) and gives the document a version greater than
//!   any of its kind had, so a compare-and-set against a version read earlier fails if anyone
//!   wrote the document since, in any process sharing the store. [`Docs`] is the typed layer
//!   over it, with a read-modify-write retry loop ([`Docs::update`]).
//!
//! No SQL outside `sqlite.rs`.

use muster_core::{Job, JobState, Tree, TreeState, Ts, Uuid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

pub mod conformance;
mod docs;
mod memory;
pub mod migrate;
mod redis;
mod resp;
mod sqlite;

pub use docs::Docs;
pub use memory::MemoryStore;
pub use redis::RedisStore;
pub use sqlite::SqliteStore;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing service cannot be reached (the API answers 503 `store unavailable`).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store cannot write for lack of space (a full disk: SQLite's `SQLITE_FULL`, Redis
    /// unable to persist or out of memory). Reads still work; the API answers 507
    /// `insufficient_storage`, and writes succeed again once space is freed.
    #[error("store full: {0}")]
    NoSpace(String),
    /// A URL or argument the engine cannot use.
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// Anything else the engine reports.
    #[error("store error: {0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// One write of a batch given to [`Store::apply`].
#[derive(Clone, Debug)]
pub enum Change {
    /// Overwrite a job, if its stored state is `expect` (compare-and-set).
    Job { job: Job, expect: JobState },
    /// Overwrite a tree's record (state, finish time, nodes, abort flag).
    Tree(Tree),
    /// Record where the log of an attempt lives in the blob store.
    Log {
        job: Uuid,
        attempt: u32,
        blob: String,
    },
}

/// What [`Store::create_tree`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Created {
    /// The tree was stored.
    New,
    /// The idempotency key was used before, for this tree, and nothing was written.
    Existing(Uuid),
}

/// Filters of a tree listing; all given ones must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeFilter {
    /// Only these workspaces (`None`: every workspace, for cluster admins).
    pub workspaces: Option<Vec<String>>,
    pub workspace: Option<String>,
    pub application: Option<String>,
    pub version: Option<String>,
    pub instance: Option<String>,
    /// Trees with any job placed on this node.
    pub node: Option<String>,
    pub state: Option<TreeState>,
}

/// A user account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    /// A PHC string.
    pub password_hash: String,
    /// A cluster admin sees and may do everything.
    pub admin: bool,
    pub created_at: Ts,
}

/// An API or session token. Only the SHA-256 of the secret is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    /// Hex SHA-256 of the whole token text.
    pub hash: String,
    /// The visible start of the token, to recognise it in a listing.
    pub prefix: String,
    pub user: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at: Ts,
    pub expires_at: Option<Ts>,
    /// Limits the token to one workspace (the tokens given to jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
}

/// A node as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub name: String,
    /// `ready`, `draining`, `down` or `lost`.
    pub state: String,
    pub labels: BTreeMap<String, String>,
    pub slots: u32,
    pub last_seen: Ts,
    pub version: String,
}

/// A live change, fanned out to every server (job, tree, node, process and model states).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Job {
        id: Uuid,
        tree: Uuid,
        /// The tree's workspace, so feeds can show each caller only their workspaces.
        #[serde(default)]
        workspace: String,
        key: String,
        state: JobState,
        attempt: u32,
        node: Option<String>,
        at: Ts,
    },
    Tree {
        id: Uuid,
        #[serde(default)]
        workspace: String,
        state: TreeState,
        at: Ts,
    },
    Node {
        id: String,
        name: String,
        state: String,
        at: Ts,
    },
    /// A long-running process changed state (SPEC §5a).
    Process {
        id: Uuid,
        workspace: String,
        name: String,
        state: muster_core::process::ProcState,
        reason: String,
        node: Option<String>,
        at: Ts,
    },
    /// A model changed (SPEC §8): a version deployed, its live version switched, the model
    /// deleted. Every server refreshes its predict routes on it.
    Model {
        workspace: String,
        name: String,
        live: Option<u32>,
        at: Ts,
    },
    /// A batch scoring's progress (SPEC §8): a chunk scored, the result merged.
    Batch {
        id: Uuid,
        workspace: String,
        model: String,
        rows_done: u64,
        rows_total: u64,
        /// `running` or `done`.
        state: String,
        at: Ts,
    },
}

/// The version of a stored document (see [`Store::write_doc`]): only its order means anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version(pub u64);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// A stored document as the engines keep it: text and version. [`Docs`] is the typed view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Doc {
    /// The document's text (JSON for everything written through [`Docs`]).
    pub value: String,
    /// Its version now.
    pub version: Version,
}

/// The condition a [`Store::write_doc`] checks before it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocCond {
    /// Write whatever is stored.
    Any,
    /// Write only if there is no document under the key (create-if-absent).
    Absent,
    /// Write only if the document exists at exactly this version (compare-and-set).
    At(Version),
}

/// What a [`Store::write_doc`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum DocWrite {
    /// The condition held and the write happened: the document's version now, `None` when it
    /// was deleted (or was already absent).
    Done(Option<Version>),
    /// The condition failed and nothing changed: the document's version now, `None` when absent.
    Conflict(Option<Version>),
}

impl DocWrite {
    /// Whether the write happened.
    pub fn done(self) -> bool {
        matches!(self, DocWrite::Done(_))
    }
}

/// The [`Store::meta`] key holding the hash of the one-time setup code that
/// [`Store::consume_setup_code`] checks and consumes.
pub const SETUP_CODE_KEY: &str = "setup_code_hash";

/// Log blobs of the jobs a purge removed, no longer referenced by any remaining job.
pub type PurgedBlobs = Vec<String>;

/// The store of record. Calls block (SQLite does I/O); async callers use `spawn_blocking` or a
/// dedicated thread.
pub trait Store: Send + Sync + 'static {
    /// Stores a new tree and its jobs atomically. With `idempotency_key`, a key seen before returns
    /// [`Created::Existing`] with that tree's id and writes nothing.
    fn create_tree(
        &self,
        tree: &Tree,
        jobs: &[Job],
        idempotency_key: Option<&str>,
    ) -> Result<Created>;
    /// Applies a batch atomically; returns, per change, whether it applied (a job whose stored
    /// state differs from `expect`, or that does not exist, is skipped and reported `false`).
    fn apply(&self, changes: &[Change]) -> Result<Vec<bool>>;
    fn job(&self, id: Uuid) -> Result<Option<Job>>;
    fn tree(&self, id: Uuid) -> Result<Option<Tree>>;
    /// The jobs of a tree, in creation order (the root first).
    fn tree_jobs(&self, tree: Uuid) -> Result<Vec<Job>>;
    /// Trees matching `filter`, newest first, strictly older than `cursor` when given.
    fn list_trees(
        &self,
        filter: &TreeFilter,
        cursor: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Tree>>;
    /// Every tree whose state is `running` (to resume after a restart).
    fn running_trees(&self) -> Result<Vec<Tree>>;
    /// Where the log of an attempt was uploaded.
    fn log_blob(&self, job: Uuid, attempt: u32) -> Result<Option<String>>;
    /// Deletes up to `limit` finished trees that finished before `before`, with their jobs, log
    /// records and idempotency keys. Returns the deleted trees' ids and the log blobs no remaining
    /// job refers to.
    fn purge_finished(&self, before: Ts, limit: usize) -> Result<(Vec<Uuid>, PurgedBlobs)>;

    /// Creates the first user if and only if `code_hash` is the stored setup-code hash and no
    /// user exists; consumes the code. `false` when the code is wrong, used, or a user exists.
    fn consume_setup_code(&self, code_hash: &str, admin: &User) -> Result<bool>;
    fn put_user(&self, user: &User) -> Result<()>;
    fn user(&self, name: &str) -> Result<Option<User>>;
    fn users(&self) -> Result<Vec<User>>;
    fn delete_user(&self, name: &str) -> Result<bool>;
    fn put_token(&self, token: &Token) -> Result<()>;
    fn token_by_hash(&self, hash: &str) -> Result<Option<Token>>;
    fn tokens(&self, user: Option<&str>) -> Result<Vec<Token>>;
    fn delete_token(&self, id: &str) -> Result<bool>;
    /// Small named values (the setup-code hash, the cluster name).
    fn meta(&self, key: &str) -> Result<Option<String>>;
    fn set_meta(&self, key: &str, value: Option<&str>) -> Result<()>;

    /// Writes a small document of one `kind` (workspaces, memberships, join tokens) under `key`
    /// if `cond` holds, atomically: stores `value` (`Some`) or deletes the document (`None`).
    /// A stored document gets a new version, greater than every version any document of this
    /// kind had, so a key deleted and created again never shows an old version (no ABA). A
    /// failed condition changes nothing and answers the current version.
    fn write_doc(
        &self,
        kind: &str,
        key: &str,
        value: Option<&str>,
        cond: DocCond,
    ) -> Result<DocWrite>;
    /// A document and its version; `None` when there is none.
    fn doc(&self, kind: &str, key: &str) -> Result<Option<Doc>>;
    /// The documents of a kind whose key starts with `prefix`, sorted by key (bytewise).
    fn docs(&self, kind: &str, prefix: &str) -> Result<Vec<(String, Doc)>>;

    /// Stores (`Some`) or deletes (`None`) a document whatever its version.
    fn put_doc(&self, kind: &str, key: &str, value: Option<&str>) -> Result<()> {
        self.write_doc(kind, key, value, DocCond::Any).map(|_| ())
    }
    /// Stores a document only if its key is free, atomically; `false` when it exists.
    fn create_doc(&self, kind: &str, key: &str, value: &str) -> Result<bool> {
        Ok(self
            .write_doc(kind, key, Some(value), DocCond::Absent)?
            .done())
    }
    /// Replaces a document only if it is at version `expected`; `false` (and nothing written)
    /// when it is at another version or absent.
    fn put_doc_if(&self, kind: &str, key: &str, value: &str, expected: Version) -> Result<bool> {
        Ok(self
            .write_doc(kind, key, Some(value), DocCond::At(expected))?
            .done())
    }
    /// Deletes a document only if it is at version `expected`; `false` (and nothing deleted)
    /// when it is at another version or absent.
    fn delete_doc_if(&self, kind: &str, key: &str, expected: Version) -> Result<bool> {
        Ok(self
            .write_doc(kind, key, None, DocCond::At(expected))?
            .done())
    }

    /// Takes or renews a lease: when `name` is free, expired, or held by `holder`, `holder`
    /// holds it for `ttl_ms` from now. Returns the holder after the call (atomic).
    fn lease(&self, name: &str, holder: &str, ttl_ms: u64) -> Result<String>;

    fn put_node(&self, node: &Node) -> Result<()>;
    fn nodes(&self) -> Result<Vec<Node>>;
    fn delete_node(&self, id: &str) -> Result<bool>;

    /// Fans an event out to every subscriber (in every process sharing the store).
    fn publish(&self, events: &[Event]);
    /// A live feed of events. A lagging subscriber misses events, never blocks a publisher.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event>;
    /// Whether the backing service answers (for `/readyz`).
    fn ping(&self) -> Result<()>;
}

/// Opens the engine a URL names: `memory://`, `sqlite://PATH` (relative paths allowed),
/// `redis://[:PASSWORD@]HOST[:PORT][/DB]` (fails with [`StoreError::Unavailable`] when that Redis
/// does not answer).
pub fn open(url: &str) -> Result<Arc<dyn Store>> {
    if url == "memory://" || url == "memory:" {
        Ok(Arc::new(MemoryStore::new()))
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(StoreError::Invalid(
                "sqlite:// needs a path, e.g. sqlite://muster-data/muster.db".into(),
            ));
        }
        Ok(Arc::new(SqliteStore::open(std::path::Path::new(path))?))
    } else if url.starts_with("redis://") {
        Ok(Arc::new(RedisStore::open(url)?))
    } else {
        Err(StoreError::Invalid(format!(
            "unknown store URL {url:?}: use memory://, sqlite://PATH or redis://HOST:PORT/DB"
        )))
    }
}
