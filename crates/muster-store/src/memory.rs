//! The in-memory engine (`memory://`): everything in maps behind one mutex, events on an
//! in-process broadcast channel. Nothing survives the process; meant for tests and trying muster
//! out. Every call takes the one lock, so each call (in particular each [`Store::apply`] batch)
//! is atomic.

use crate::{
    Change, Created, Doc, DocCond, DocWrite, Event, Node, PurgedBlobs, Result, Store, StoreError,
    Token, Tree, TreeFilter, User, Version,
};
use muster_core::{Job, TreeState, Ts, Uuid};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use tokio::sync::broadcast;

/// The capacity of the event channel; a subscriber further behind misses events.
const EVENT_CAPACITY: usize = 65_536;

/// A store that lives in the process's memory only.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
}

#[derive(Default)]
struct Inner {
    /// Ordered by id, so by creation time (UUID v7): listing walks it backwards.
    trees: BTreeMap<Uuid, Tree>,
    jobs: HashMap<Uuid, Job>,
    /// The job ids of each tree, in creation order.
    tree_jobs: HashMap<Uuid, Vec<Uuid>>,
    logs: BTreeMap<(Uuid, u32), String>,
    /// How many `logs` entries name each blob.
    blob_refs: HashMap<String, usize>,
    idempotency: HashMap<String, Uuid>,
    /// The idempotency key a tree was created with, to drop it on purge.
    tree_key: HashMap<Uuid, String>,
    users: BTreeMap<String, User>,
    /// By token id.
    tokens: BTreeMap<String, Token>,
    meta: BTreeMap<String, String>,
    /// By (kind, key): the text and version.
    docs: BTreeMap<(String, String), Doc>,
    /// Per kind, the last version given to any of its documents (see [`Store::write_doc`]).
    doc_seq: HashMap<String, u64>,
    leases: BTreeMap<String, (String, std::time::Instant)>,
    nodes: BTreeMap<String, Node>,
}

impl Inner {
    fn set_log(&mut self, job: Uuid, attempt: u32, blob: &str) {
        *self.blob_refs.entry(blob.to_string()).or_default() += 1;
        if let Some(old) = self.logs.insert((job, attempt), blob.to_string()) {
            self.unref_blob(&old);
        }
    }

    /// Drops one reference to `blob`; true when none remains.
    fn unref_blob(&mut self, blob: &str) -> bool {
        match self.blob_refs.get_mut(blob) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.blob_refs.remove(blob);
                true
            }
            None => true,
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            events,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied call behind (every call
        // checks before it writes), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether `tree` passes every given filter.
pub(crate) fn matches(filter: &TreeFilter, tree: &Tree) -> bool {
    let tags = &tree.tags;
    filter
        .workspaces
        .as_ref()
        .is_none_or(|ws| ws.contains(&tags.workspace))
        && filter
            .workspace
            .as_ref()
            .is_none_or(|w| *w == tags.workspace)
        && filter
            .application
            .as_ref()
            .is_none_or(|a| tags.application.as_ref() == Some(a))
        && filter
            .version
            .as_ref()
            .is_none_or(|v| tags.version.as_ref() == Some(v))
        && filter
            .instance
            .as_ref()
            .is_none_or(|i| tags.instance.as_ref() == Some(i))
        && filter.node.as_ref().is_none_or(|n| tree.nodes.contains(n))
        && filter.state.is_none_or(|s| tree.state == s)
}

impl Store for MemoryStore {
    fn create_tree(
        &self,
        tree: &Tree,
        jobs: &[Job],
        idempotency_key: Option<&str>,
    ) -> Result<Created> {
        let mut g = self.lock();
        if let Some(key) = idempotency_key {
            if let Some(id) = g.idempotency.get(key) {
                return Ok(Created::Existing(*id));
            }
        }
        if g.trees.contains_key(&tree.id) {
            return Err(StoreError::Other(format!("tree {} exists", tree.id)));
        }
        let mut seen = std::collections::HashSet::with_capacity(jobs.len());
        for job in jobs {
            if g.jobs.contains_key(&job.id) || !seen.insert(job.id) {
                return Err(StoreError::Other(format!("job {} exists", job.id)));
            }
        }
        g.trees.insert(tree.id, tree.clone());
        g.tree_jobs
            .insert(tree.id, jobs.iter().map(|j| j.id).collect());
        for job in jobs {
            g.jobs.insert(job.id, job.clone());
        }
        if let Some(key) = idempotency_key {
            g.idempotency.insert(key.to_string(), tree.id);
            g.tree_key.insert(tree.id, key.to_string());
        }
        Ok(Created::New)
    }

    fn apply(&self, changes: &[Change]) -> Result<Vec<bool>> {
        let mut g = self.lock();
        let mut out = Vec::with_capacity(changes.len());
        for change in changes {
            let applied = match change {
                Change::Job { job, expect } => match g.jobs.get_mut(&job.id) {
                    Some(stored) if stored.state == *expect => {
                        *stored = job.clone();
                        true
                    }
                    _ => false,
                },
                Change::Tree(tree) => match g.trees.get_mut(&tree.id) {
                    Some(stored) => {
                        *stored = tree.clone();
                        true
                    }
                    None => false,
                },
                Change::Log { job, attempt, blob } => {
                    g.set_log(*job, *attempt, blob);
                    true
                }
            };
            out.push(applied);
        }
        Ok(out)
    }

    fn job(&self, id: Uuid) -> Result<Option<Job>> {
        Ok(self.lock().jobs.get(&id).cloned())
    }

    fn tree(&self, id: Uuid) -> Result<Option<Tree>> {
        Ok(self.lock().trees.get(&id).cloned())
    }

    fn tree_jobs(&self, tree: Uuid) -> Result<Vec<Job>> {
        let g = self.lock();
        let ids = g
            .tree_jobs
            .get(&tree)
            .map(Vec::as_slice)
            .unwrap_or_default();
        Ok(ids
            .iter()
            .filter_map(|id| g.jobs.get(id).cloned())
            .collect())
    }

    fn list_trees(
        &self,
        filter: &TreeFilter,
        cursor: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Tree>> {
        let g = self.lock();
        let range = match cursor {
            Some(c) => g.trees.range(..c),
            None => g.trees.range(..),
        };
        Ok(range
            .rev()
            .map(|(_, t)| t)
            .filter(|t| matches(filter, t))
            .take(limit)
            .cloned()
            .collect())
    }

    fn running_trees(&self) -> Result<Vec<Tree>> {
        let g = self.lock();
        Ok(g.trees
            .values()
            .filter(|t| t.state == TreeState::Running)
            .cloned()
            .collect())
    }

    fn log_blob(&self, job: Uuid, attempt: u32) -> Result<Option<String>> {
        Ok(self.lock().logs.get(&(job, attempt)).cloned())
    }

    fn purge_finished(&self, before: Ts, limit: usize) -> Result<(Vec<Uuid>, PurgedBlobs)> {
        let mut g = self.lock();
        let mut doomed: Vec<(Ts, Uuid)> = g
            .trees
            .values()
            .filter(|t| t.state != TreeState::Running)
            .filter_map(|t| t.finished_at.filter(|f| *f < before).map(|f| (f, t.id)))
            .collect();
        doomed.sort();
        doomed.truncate(limit);
        let mut ids = Vec::with_capacity(doomed.len());
        let mut freed = Vec::new();
        for (_, id) in doomed {
            g.trees.remove(&id);
            if let Some(key) = g.tree_key.remove(&id) {
                g.idempotency.remove(&key);
            }
            for job in g.tree_jobs.remove(&id).unwrap_or_default() {
                g.jobs.remove(&job);
                let attempts: Vec<(Uuid, u32)> = g
                    .logs
                    .range((job, 0)..=(job, u32::MAX))
                    .map(|(k, _)| *k)
                    .collect();
                for k in attempts {
                    if let Some(blob) = g.logs.remove(&k) {
                        if g.unref_blob(&blob) {
                            freed.push(blob);
                        }
                    }
                }
            }
            ids.push(id);
        }
        freed.sort();
        freed.dedup();
        Ok((ids, freed))
    }

    fn consume_setup_code(&self, code_hash: &str, admin: &User) -> Result<bool> {
        let mut g = self.lock();
        if g.meta.get(crate::SETUP_CODE_KEY).map(String::as_str) != Some(code_hash)
            || !g.users.is_empty()
        {
            return Ok(false);
        }
        g.users.insert(admin.name.clone(), admin.clone());
        g.meta.remove(crate::SETUP_CODE_KEY);
        Ok(true)
    }

    fn put_user(&self, user: &User) -> Result<()> {
        self.lock().users.insert(user.name.clone(), user.clone());
        Ok(())
    }

    fn user(&self, name: &str) -> Result<Option<User>> {
        Ok(self.lock().users.get(name).cloned())
    }

    fn users(&self) -> Result<Vec<User>> {
        Ok(self.lock().users.values().cloned().collect())
    }

    fn delete_user(&self, name: &str) -> Result<bool> {
        Ok(self.lock().users.remove(name).is_some())
    }

    fn put_token(&self, token: &Token) -> Result<()> {
        let mut g = self.lock();
        // Like SQLite's INSERT OR REPLACE: a token with the same hash is replaced too.
        g.tokens
            .retain(|id, t| *id == token.id || t.hash != token.hash);
        g.tokens.insert(token.id.clone(), token.clone());
        Ok(())
    }

    fn token_by_hash(&self, hash: &str) -> Result<Option<Token>> {
        Ok(self
            .lock()
            .tokens
            .values()
            .find(|t| t.hash == hash)
            .cloned())
    }

    fn tokens(&self, user: Option<&str>) -> Result<Vec<Token>> {
        let g = self.lock();
        Ok(g.tokens
            .values()
            .filter(|t| user.is_none_or(|u| t.user == u))
            .cloned()
            .collect())
    }

    fn delete_token(&self, id: &str) -> Result<bool> {
        Ok(self.lock().tokens.remove(id).is_some())
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self.lock().meta.get(key).cloned())
    }

    fn set_meta(&self, key: &str, value: Option<&str>) -> Result<()> {
        let mut g = self.lock();
        match value {
            Some(v) => g.meta.insert(key.to_string(), v.to_string()),
            None => g.meta.remove(key),
        };
        Ok(())
    }

    fn write_doc(
        &self,
        kind: &str,
        key: &str,
        value: Option<&str>,
        cond: DocCond,
    ) -> Result<DocWrite> {
        let mut g = self.lock();
        let k = (kind.to_string(), key.to_string());
        let cur = g.docs.get(&k).map(|d| d.version);
        let holds = match cond {
            DocCond::Any => true,
            DocCond::Absent => cur.is_none(),
            DocCond::At(v) => cur == Some(v),
        };
        if !holds {
            return Ok(DocWrite::Conflict(cur));
        }
        if value.is_none() && cur.is_none() {
            return Ok(DocWrite::Done(None));
        }
        // Past every version this kind gave, deletes included, so no key shows one twice.
        let seq = g.doc_seq.entry(kind.to_string()).or_default();
        *seq = (*seq).max(cur.map_or(0, |v| v.0)) + 1;
        let version = Version(*seq);
        Ok(DocWrite::Done(match value {
            Some(v) => {
                g.docs.insert(
                    k,
                    Doc {
                        value: v.to_string(),
                        version,
                    },
                );
                Some(version)
            }
            None => {
                g.docs.remove(&k);
                None
            }
        }))
    }

    fn doc(&self, kind: &str, key: &str) -> Result<Option<Doc>> {
        Ok(self
            .lock()
            .docs
            .get(&(kind.to_string(), key.to_string()))
            .cloned())
    }

    fn docs(&self, kind: &str, prefix: &str) -> Result<Vec<(String, Doc)>> {
        let g = self.lock();
        Ok(g.docs
            .range((kind.to_string(), prefix.to_string())..)
            .take_while(|((k, key), _)| k == kind && key.starts_with(prefix))
            .map(|((_, key), d)| (key.clone(), d.clone()))
            .collect())
    }

    fn lease(&self, name: &str, holder: &str, ttl_ms: u64) -> Result<String> {
        let mut g = self.lock();
        let now = std::time::Instant::now();
        let free = match g.leases.get(name) {
            Some((h, until)) => h == holder || *until <= now,
            None => true,
        };
        if free {
            g.leases.insert(
                name.to_string(),
                (
                    holder.to_string(),
                    now + std::time::Duration::from_millis(ttl_ms),
                ),
            );
        }
        Ok(g.leases[name].0.clone())
    }

    fn put_node(&self, node: &Node) -> Result<()> {
        self.lock().nodes.insert(node.id.clone(), node.clone());
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<Node>> {
        Ok(self.lock().nodes.values().cloned().collect())
    }

    fn delete_node(&self, id: &str) -> Result<bool> {
        Ok(self.lock().nodes.remove(id).is_some())
    }

    fn publish(&self, events: &[Event]) {
        for e in events {
            // No subscriber is not an error.
            let _ = self.events.send(e.clone());
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn ping(&self) -> Result<()> {
        Ok(())
    }
}
