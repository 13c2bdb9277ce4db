//! The SQLite engine (`sqlite://PATH`): one file, WAL journal, `synchronous=NORMAL` (a committed
//! batch survives the process being killed; the last few may be lost on power loss).
//!
//! One writer connection behind a mutex does every write, each call in one `BEGIN IMMEDIATE`
//! transaction; a small pool of reader connections answers reads, so a listing never waits for a
//! big write batch (WAL lets readers and the writer run at once). Events are fanned out in-process
//! only, like the memory engine.
//!
//! Records are kept whole as JSON (`doc` columns); the columns beside them exist only to be
//! searched. UUIDs are 16-byte blobs of their big-endian bytes, so UUID v7 ids sort by time.
//!
//! Schema (version 2, `PRAGMA user_version`):
//! - `trees(id PK, workspace, application, version, instance, state, finished_at, doc)`, with
//!   indexes `(workspace, id)`, `(application, id)`, `(version, id)`, `(instance, id)`,
//!   `(state, id)` and `(finished_at)`: a listing with any one filter, newest first, from a
//!   cursor (`id < cursor`), is an index range scan.
//! - `tree_nodes(node, tree)` (primary key in that order, plus `(tree)`): the `node` filter.
//! - `jobs(seq INTEGER PK, id UNIQUE, tree, state, doc)` with `(tree)`: `seq` is the rowid, so
//!   `tree_jobs` reads the `(tree)` index in creation order.
//! - `logs(job, attempt, blob)` (primary key `(job, attempt)`, plus `(blob)`).
//! - `idempotency(key PK, tree)` with `(tree)`.
//! - `users(name PK, doc)`, `tokens(id PK, hash UNIQUE, user, doc)`, `meta(key PK, value)`,
//!   `nodes(id PK, doc)`.
//! - `docs(kind, key, value, version)` (primary key `(kind, key)`: prefix listings are a range
//!   of it) and `doc_seq(kind PK, last)`, the last version given in each kind.
//!
//! Version 2 added `docs.version` and `doc_seq`: opening a version-1 file adds the column, every
//! existing document at version 1 (and the first write after gives 2). A file of a newer version
//! than this code knows is refused rather than written with the wrong rules.

use crate::{
    Change, Created, Doc, DocCond, DocWrite, Event, Node, PurgedBlobs, Result, Store, StoreError,
    Token, Tree, TreeFilter, User, Version,
};
use muster_core::{Job, Ts, Uuid};
use rusqlite::types::Value;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::broadcast;

/// How many reader connections a store keeps.
const READERS: usize = 4;
/// How long a call waits for another process's lock before failing with `Unavailable`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// The capacity of the event channel; a subscriber further behind misses events.
const EVENT_CAPACITY: usize = 65_536;
/// The schema version this code writes.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS trees (
    id BLOB PRIMARY KEY NOT NULL,
    workspace TEXT NOT NULL,
    application TEXT,
    version TEXT,
    instance TEXT,
    state TEXT NOT NULL,
    finished_at INTEGER,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS trees_workspace ON trees(workspace, id);
CREATE INDEX IF NOT EXISTS trees_application ON trees(application, id);
CREATE INDEX IF NOT EXISTS trees_version ON trees(version, id);
CREATE INDEX IF NOT EXISTS trees_instance ON trees(instance, id);
CREATE INDEX IF NOT EXISTS trees_state ON trees(state, id);
CREATE INDEX IF NOT EXISTS trees_finished ON trees(finished_at);

CREATE TABLE IF NOT EXISTS tree_nodes (
    node TEXT NOT NULL,
    tree BLOB NOT NULL,
    PRIMARY KEY (node, tree)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tree_nodes_tree ON tree_nodes(tree);

CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    tree BLOB NOT NULL,
    state TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_tree ON jobs(tree);

CREATE TABLE IF NOT EXISTS logs (
    job BLOB NOT NULL,
    attempt INTEGER NOT NULL,
    blob TEXT NOT NULL,
    PRIMARY KEY (job, attempt)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS logs_blob ON logs(blob);

CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY NOT NULL,
    tree BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_tree ON idempotency(tree);

CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    user TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tokens_user ON tokens(user, id);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS docs (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS doc_seq (
    kind TEXT PRIMARY KEY NOT NULL,
    last INTEGER NOT NULL
) WITHOUT ROWID;
";

/// A store in one SQLite file.
pub struct SqliteStore {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    events: broadcast::Sender<Event>,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::CannotOpen) => {
                StoreError::Unavailable(e.to_string())
            }
            // SQLITE_FULL: a write found the disk full (ENOSPC, or the quota).
            Some(ErrorCode::DiskFull) => StoreError::NoSpace(e.to_string()),
            _ => StoreError::Other(e.to_string()),
        }
    }
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Other(format!("bad stored record: {e}"))
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Other(format!("cannot encode record: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(json_err)
}

fn uuid_from(bytes: &[u8]) -> Result<Uuid> {
    Uuid::from_slice(bytes).map_err(|e| StoreError::Other(format!("bad stored id: {e}")))
}

/// Takes group and other permissions off the file `path`, with a warning, if it has any.
fn private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return;
    }
    let tight = mode & !0o077;
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(tight)) {
        Ok(()) => tracing::warn!(
            path = %path.display(),
            "{} was open to other users (mode {mode:o}); made it {tight:o}: it holds secrets",
            path.display()
        ),
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot tighten the mode of {}: {e}", path.display())
        }
    }
}

/// The pragmas every connection gets.
fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(64);
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // 32 MiB of page cache per connection.
    conn.pragma_update(None, "cache_size", -32_768)?;
    Ok(())
}

/// Whether `table` has a column named `column`.
fn has_column(conn: &Connection, table: &str, column: &str) -> Result<bool> {
    let mut stmt = conn.prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?;
    Ok(stmt.exists([table, column])?)
}

fn version_of(v: i64) -> Result<Version> {
    u64::try_from(v)
        .map(Version)
        .map_err(|_| StoreError::Other(format!("bad stored document version {v}")))
}

/// Runs a query returning JSON docs in column 0 and decodes them.
fn docs<T: serde::de::DeserializeOwned>(
    stmt: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
) -> Result<Vec<T>> {
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let doc = row
            .get_ref(0)?
            .as_str()
            .map_err(|e| StoreError::Other(e.to_string()))?;
        out.push(from_json(doc)?);
    }
    Ok(out)
}

/// Runs a query returning at most one JSON doc in column 0 and decodes it.
fn doc<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Option<T>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let s: Option<String> = stmt.query_row(params, |r| r.get(0)).optional()?;
    s.map(|s| from_json(&s)).transpose()
}

impl SqliteStore {
    /// Opens (creating when missing, with its parent directory) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                // Private to our user, as the data dir it usually is (see muster_wire::perms).
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| {
                        StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
                    })?;
            }
        }
        // The database holds the cluster CA's private key and password hashes: private to our
        // user. SQLite makes its -wal and -shm files with the database file's mode, so making
        // that file 0600 first covers all three.
        {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot create {}: {e}",
                        path.display()
                    )))
                }
            }
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut writer = Connection::open_with_flags(path, flags)?;
        configure(&writer)?;
        let mode: String =
            writer.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!(
                "{}: cannot use the WAL journal (got {mode})",
                path.display()
            )));
        }
        {
            let tx = writer.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if version > SCHEMA_VERSION {
                return Err(StoreError::Invalid(format!(
                    "{}: schema version {version} is newer than this muster knows ({SCHEMA_VERSION})",
                    path.display()
                )));
            }
            tx.execute_batch(SCHEMA)?;
            // A version-1 file has `docs` without `version` (CREATE TABLE IF NOT EXISTS left it
            // as it was): its documents start at version 1.
            if !has_column(&tx, "docs", "version")? {
                tx.execute_batch("ALTER TABLE docs ADD COLUMN version INTEGER NOT NULL DEFAULT 1")?;
            }
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            tx.commit()?;
        }
        // Files an older version made 0644 (and the -wal/-shm that copied their mode) are
        // closed now that all three exist.
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            private(Path::new(&p));
        }
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let r = Connection::open_with_flags(path, flags)?;
            configure(&r)?;
            r.pragma_update(None, "query_only", true)?;
            readers.push(Mutex::new(r));
        }
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Ok(SqliteStore {
            writer: Mutex::new(writer),
            readers,
            next_reader: AtomicUsize::new(0),
            events,
        })
    }

    fn writer(&self) -> MutexGuard<'_, Connection> {
        // A panic inside a transaction drops (so rolls back) it: the connection stays usable.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free reader connection, or the next one in turn when all are busy.
    fn reader(&self) -> MutexGuard<'_, Connection> {
        for r in &self.readers {
            if let Ok(g) = r.try_lock() {
                return g;
            }
        }
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        self.readers[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` in one immediate (write-locking) transaction, committing when it returns `Ok`.
    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut w = self.writer();
        let tx = w.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// One listing query for a filter without `workspaces` (the caller resolves that set).
    fn list_one(
        &self,
        conn: &Connection,
        filter: &TreeFilter,
        cursor: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Tree>> {
        let (sql, args) = list_sql(filter, cursor, limit);
        let mut stmt = conn.prepare_cached(&sql)?;
        docs(&mut stmt, rusqlite::params_from_iter(args))
    }
}

/// The SQL and arguments of one listing query (`filter.workspaces` is ignored).
fn list_sql(filter: &TreeFilter, cursor: Option<Uuid>, limit: usize) -> (String, Vec<Value>) {
    let mut sql = String::with_capacity(200);
    let mut args: Vec<Value> = Vec::new();
    let id_col = if let Some(node) = &filter.node {
        // Driven by the (node, tree) key; CROSS JOIN keeps tree_nodes the outer loop.
        sql.push_str(
            "SELECT t.doc FROM tree_nodes n CROSS JOIN trees t ON t.id = n.tree WHERE n.node = ?",
        );
        args.push(Value::Text(node.clone()));
        "n.tree"
    } else {
        sql.push_str("SELECT t.doc FROM trees t WHERE 1");
        "t.id"
    };
    if let Some(c) = cursor {
        sql.push_str(" AND ");
        sql.push_str(id_col);
        sql.push_str(" < ?");
        args.push(Value::Blob(c.as_bytes().to_vec()));
    }
    let text = [
        ("workspace", &filter.workspace),
        ("application", &filter.application),
        ("version", &filter.version),
        ("instance", &filter.instance),
    ];
    for (col, v) in text {
        if let Some(v) = v {
            sql.push_str(" AND t.");
            sql.push_str(col);
            sql.push_str(" = ?");
            args.push(Value::Text(v.clone()));
        }
    }
    if let Some(s) = filter.state {
        sql.push_str(" AND t.state = ?");
        args.push(Value::Text(s.as_str().to_string()));
    }
    sql.push_str(" ORDER BY ");
    sql.push_str(id_col);
    sql.push_str(" DESC LIMIT ?");
    args.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
    (sql, args)
}

fn tree_params(tree: &Tree) -> Result<[Value; 8]> {
    let opt = |v: &Option<String>| v.clone().map(Value::Text).unwrap_or(Value::Null);
    Ok([
        Value::Blob(tree.id.as_bytes().to_vec()),
        Value::Text(tree.tags.workspace.clone()),
        opt(&tree.tags.application),
        opt(&tree.tags.version),
        opt(&tree.tags.instance),
        Value::Text(tree.state.as_str().to_string()),
        tree.finished_at
            .map(|t| Value::Integer(t.0))
            .unwrap_or(Value::Null),
        Value::Text(to_json(tree)?),
    ])
}

/// Makes `tree_nodes` hold exactly the nodes of `tree`.
fn sync_tree_nodes(tx: &rusqlite::Transaction<'_>, tree: &Tree, fresh: bool) -> Result<()> {
    let id = tree.id.as_bytes().as_slice();
    if !fresh {
        tx.prepare_cached("DELETE FROM tree_nodes WHERE tree = ?1")?
            .execute([id])?;
    }
    let mut ins =
        tx.prepare_cached("INSERT OR IGNORE INTO tree_nodes (node, tree) VALUES (?1, ?2)")?;
    for node in &tree.nodes {
        ins.execute(params![node, id])?;
    }
    Ok(())
}

impl Store for SqliteStore {
    fn create_tree(
        &self,
        tree: &Tree,
        jobs: &[Job],
        idempotency_key: Option<&str>,
    ) -> Result<Created> {
        self.write(|tx| {
            if let Some(key) = idempotency_key {
                let existing: Option<Vec<u8>> = tx
                    .prepare_cached("SELECT tree FROM idempotency WHERE key = ?1")?
                    .query_row([key], |r| r.get(0))
                    .optional()?;
                if let Some(id) = existing {
                    return Ok(Created::Existing(uuid_from(&id)?));
                }
            }
            tx.prepare_cached(
                "INSERT INTO trees (id, workspace, application, version, instance, state, finished_at, doc)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(rusqlite::params_from_iter(tree_params(tree)?))?;
            sync_tree_nodes(tx, tree, true)?;
            let mut ins = tx.prepare_cached("INSERT INTO jobs (id, tree, state, doc) VALUES (?1, ?2, ?3, ?4)")?;
            let tree_id = tree.id.as_bytes().as_slice();
            let mut buf = Vec::with_capacity(1024);
            for job in jobs {
                buf.clear();
                serde_json::to_writer(&mut buf, job)
                    .map_err(|e| StoreError::Other(format!("cannot encode job: {e}")))?;
                // serde_json writes valid UTF-8.
                let doc = std::str::from_utf8(&buf).map_err(|e| StoreError::Other(e.to_string()))?;
                ins.execute(params![job.id.as_bytes().as_slice(), tree_id, job.state.as_str(), doc])?;
            }
            if let Some(key) = idempotency_key {
                tx.prepare_cached("INSERT INTO idempotency (key, tree) VALUES (?1, ?2)")?.execute(params![key, tree_id])?;
            }
            Ok(Created::New)
        })
    }

    fn apply(&self, changes: &[Change]) -> Result<Vec<bool>> {
        self.write(|tx| {
            let mut out = Vec::with_capacity(changes.len());
            let mut job_stmt = tx.prepare_cached("UPDATE jobs SET state = ?1, doc = ?2 WHERE id = ?3 AND state = ?4")?;
            let mut buf = Vec::with_capacity(1024);
            for change in changes {
                let applied = match change {
                    Change::Job { job, expect } => {
                        buf.clear();
                        serde_json::to_writer(&mut buf, job)
                            .map_err(|e| StoreError::Other(format!("cannot encode job: {e}")))?;
                        let doc = std::str::from_utf8(&buf).map_err(|e| StoreError::Other(e.to_string()))?;
                        job_stmt.execute(params![job.state.as_str(), doc, job.id.as_bytes().as_slice(), expect.as_str()])?
                            == 1
                    }
                    Change::Tree(tree) => {
                        let n = tx
                            .prepare_cached(
                                "UPDATE trees SET workspace = ?2, application = ?3, version = ?4, instance = ?5,
                                 state = ?6, finished_at = ?7, doc = ?8 WHERE id = ?1",
                            )?
                            .execute(rusqlite::params_from_iter(tree_params(tree)?))?;
                        if n == 1 {
                            sync_tree_nodes(tx, tree, false)?;
                        }
                        n == 1
                    }
                    Change::Log { job, attempt, blob } => {
                        tx.prepare_cached(
                            "INSERT INTO logs (job, attempt, blob) VALUES (?1, ?2, ?3)
                             ON CONFLICT (job, attempt) DO UPDATE SET blob = excluded.blob",
                        )?
                        .execute(params![job.as_bytes().as_slice(), attempt, blob])?;
                        true
                    }
                };
                out.push(applied);
            }
            Ok(out)
        })
    }

    fn job(&self, id: Uuid) -> Result<Option<Job>> {
        doc(
            &self.reader(),
            "SELECT doc FROM jobs WHERE id = ?1",
            [id.as_bytes().as_slice()],
        )
    }

    fn tree(&self, id: Uuid) -> Result<Option<Tree>> {
        doc(
            &self.reader(),
            "SELECT doc FROM trees WHERE id = ?1",
            [id.as_bytes().as_slice()],
        )
    }

    fn tree_jobs(&self, tree: Uuid) -> Result<Vec<Job>> {
        let r = self.reader();
        let mut stmt = r.prepare_cached("SELECT doc FROM jobs WHERE tree = ?1 ORDER BY seq")?;
        docs(&mut stmt, [tree.as_bytes().as_slice()])
    }

    fn list_trees(
        &self,
        filter: &TreeFilter,
        cursor: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Tree>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let r = self.reader();
        let Some(set) = &filter.workspaces else {
            return self.list_one(&r, filter, cursor, limit);
        };
        // A set of workspaces: one index range per workspace, merged newest first.
        let mut wanted: Vec<&String> = set
            .iter()
            .filter(|w| filter.workspace.as_ref().is_none_or(|x| x == *w))
            .collect();
        wanted.sort();
        wanted.dedup();
        let mut one = filter.clone();
        one.workspaces = None;
        let mut all = Vec::new();
        for w in &wanted {
            one.workspace = Some((*w).clone());
            all.extend(self.list_one(&r, &one, cursor, limit)?);
        }
        if wanted.len() > 1 {
            all.sort_by_key(|t| std::cmp::Reverse(t.id));
            all.truncate(limit);
        }
        Ok(all)
    }

    fn running_trees(&self) -> Result<Vec<Tree>> {
        let r = self.reader();
        let mut stmt =
            r.prepare_cached("SELECT doc FROM trees WHERE state = 'running' ORDER BY id")?;
        docs(&mut stmt, [])
    }

    fn log_blob(&self, job: Uuid, attempt: u32) -> Result<Option<String>> {
        let r = self.reader();
        let mut stmt = r.prepare_cached("SELECT blob FROM logs WHERE job = ?1 AND attempt = ?2")?;
        Ok(stmt
            .query_row(params![job.as_bytes().as_slice(), attempt], |r| r.get(0))
            .optional()?)
    }

    fn purge_finished(&self, before: Ts, limit: usize) -> Result<(Vec<Uuid>, PurgedBlobs)> {
        if limit == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        self.write(|tx| {
            let mut ids = Vec::new();
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT id FROM trees WHERE finished_at < ?1 AND state != 'running'
                     ORDER BY finished_at LIMIT ?2",
                )?;
                let mut rows = stmt.query(params![before.0, i64::try_from(limit).unwrap_or(i64::MAX)])?;
                while let Some(row) = rows.next()? {
                    ids.push(uuid_from(row.get_ref(0)?.as_blob().map_err(|e| StoreError::Other(e.to_string()))?)?);
                }
            }
            let mut blobs: Vec<String> = Vec::new();
            for id in &ids {
                let id = id.as_bytes().as_slice();
                {
                    let mut stmt = tx.prepare_cached(
                        "SELECT DISTINCT l.blob FROM jobs j JOIN logs l ON l.job = j.id WHERE j.tree = ?1",
                    )?;
                    let found = stmt.query_map([id], |r| r.get::<_, String>(0))?;
                    for b in found {
                        blobs.push(b?);
                    }
                }
                tx.prepare_cached("DELETE FROM logs WHERE job IN (SELECT id FROM jobs WHERE tree = ?1)")?.execute([id])?;
                tx.prepare_cached("DELETE FROM jobs WHERE tree = ?1")?.execute([id])?;
                tx.prepare_cached("DELETE FROM tree_nodes WHERE tree = ?1")?.execute([id])?;
                tx.prepare_cached("DELETE FROM idempotency WHERE tree = ?1")?.execute([id])?;
                tx.prepare_cached("DELETE FROM trees WHERE id = ?1")?.execute([id])?;
            }
            blobs.sort();
            blobs.dedup();
            let mut freed = Vec::with_capacity(blobs.len());
            let mut used = tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM logs WHERE blob = ?1)")?;
            for b in blobs {
                if !used.query_row([&b], |r| r.get::<_, bool>(0))? {
                    freed.push(b);
                }
            }
            Ok((ids, freed))
        })
    }

    fn consume_setup_code(&self, code_hash: &str, admin: &User) -> Result<bool> {
        self.write(|tx| {
            let stored: Option<String> = tx
                .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row([crate::SETUP_CODE_KEY], |r| r.get(0))
                .optional()?;
            if stored.as_deref() != Some(code_hash) {
                return Ok(false);
            }
            let any_user: bool = tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM users)")?
                .query_row([], |r| r.get(0))?;
            if any_user {
                return Ok(false);
            }
            tx.prepare_cached("INSERT INTO users (name, doc) VALUES (?1, ?2)")?
                .execute(params![admin.name, to_json(admin)?])?;
            tx.prepare_cached("DELETE FROM meta WHERE key = ?1")?
                .execute([crate::SETUP_CODE_KEY])?;
            Ok(true)
        })
    }

    fn put_user(&self, user: &User) -> Result<()> {
        let doc = to_json(user)?;
        self.write(|tx| {
            tx.prepare_cached("INSERT OR REPLACE INTO users (name, doc) VALUES (?1, ?2)")?
                .execute(params![user.name, doc])?;
            Ok(())
        })
    }

    fn user(&self, name: &str) -> Result<Option<User>> {
        doc(
            &self.reader(),
            "SELECT doc FROM users WHERE name = ?1",
            [name],
        )
    }

    fn users(&self) -> Result<Vec<User>> {
        let r = self.reader();
        let mut stmt = r.prepare_cached("SELECT doc FROM users ORDER BY name")?;
        docs(&mut stmt, [])
    }

    fn delete_user(&self, name: &str) -> Result<bool> {
        self.write(|tx| {
            Ok(tx
                .prepare_cached("DELETE FROM users WHERE name = ?1")?
                .execute([name])?
                > 0)
        })
    }

    fn put_token(&self, token: &Token) -> Result<()> {
        let doc = to_json(token)?;
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO tokens (id, hash, user, doc) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![token.id, token.hash, token.user, doc])?;
            Ok(())
        })
    }

    fn token_by_hash(&self, hash: &str) -> Result<Option<Token>> {
        doc(
            &self.reader(),
            "SELECT doc FROM tokens WHERE hash = ?1",
            [hash],
        )
    }

    fn tokens(&self, user: Option<&str>) -> Result<Vec<Token>> {
        let r = self.reader();
        match user {
            Some(u) => docs(
                &mut r.prepare_cached("SELECT doc FROM tokens WHERE user = ?1 ORDER BY id")?,
                [u],
            ),
            None => docs(
                &mut r.prepare_cached("SELECT doc FROM tokens ORDER BY id")?,
                [],
            ),
        }
    }

    fn delete_token(&self, id: &str) -> Result<bool> {
        self.write(|tx| {
            Ok(tx
                .prepare_cached("DELETE FROM tokens WHERE id = ?1")?
                .execute([id])?
                > 0)
        })
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        let r = self.reader();
        let mut stmt = r.prepare_cached("SELECT value FROM meta WHERE key = ?1")?;
        Ok(stmt.query_row([key], |r| r.get(0)).optional()?)
    }

    fn set_meta(&self, key: &str, value: Option<&str>) -> Result<()> {
        self.write(|tx| {
            match value {
                Some(v) => tx
                    .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
                    .execute([key, v])?,
                None => tx
                    .prepare_cached("DELETE FROM meta WHERE key = ?1")?
                    .execute([key])?,
            };
            Ok(())
        })
    }

    fn write_doc(
        &self,
        kind: &str,
        key: &str,
        value: Option<&str>,
        cond: DocCond,
    ) -> Result<DocWrite> {
        // Check and write in one immediate transaction: the write lock is taken before the
        // read, so no other connection (in this process or another) writes in between.
        self.write(|tx| {
            let cur: Option<i64> = tx
                .prepare_cached("SELECT version FROM docs WHERE kind = ?1 AND key = ?2")?
                .query_row([kind, key], |r| r.get(0))
                .optional()?;
            let cur = cur.map(version_of).transpose()?;
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
            // Past every version this kind gave, deletes included (and past a document that
            // predates `doc_seq`), so no key shows one version twice.
            let seq: Option<i64> = tx
                .prepare_cached("SELECT last FROM doc_seq WHERE kind = ?1")?
                .query_row([kind], |r| r.get(0))
                .optional()?;
            let next = seq.unwrap_or(0).max(cur.map_or(0, |v| v.0 as i64)) + 1;
            tx.prepare_cached("INSERT OR REPLACE INTO doc_seq (kind, last) VALUES (?1, ?2)")?
                .execute(params![kind, next])?;
            Ok(DocWrite::Done(match value {
                Some(v) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO docs (kind, key, value, version) VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![kind, key, v, next])?;
                    Some(version_of(next)?)
                }
                None => {
                    tx.prepare_cached("DELETE FROM docs WHERE kind = ?1 AND key = ?2")?
                        .execute([kind, key])?;
                    None
                }
            }))
        })
    }

    fn doc(&self, kind: &str, key: &str) -> Result<Option<Doc>> {
        let r = self.reader();
        let mut stmt =
            r.prepare_cached("SELECT value, version FROM docs WHERE kind = ?1 AND key = ?2")?;
        let row: Option<(String, i64)> = stmt
            .query_row([kind, key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        row.map(|(value, v)| {
            Ok(Doc {
                value,
                version: version_of(v)?,
            })
        })
        .transpose()
    }

    fn docs(&self, kind: &str, prefix: &str) -> Result<Vec<(String, Doc)>> {
        let r = self.reader();
        // A range on the primary key: `key >= prefix AND key < prefix || U+10FFFF`.
        let mut stmt = r.prepare_cached(
            "SELECT key, value, version FROM docs WHERE kind = ?1 AND key >= ?2 AND key < ?3 ORDER BY key",
        )?;
        let upper = format!("{prefix}\u{10FFFF}");
        let rows = stmt.query_map([kind, prefix, upper.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, value, v) = row?;
            out.push((
                key,
                Doc {
                    value,
                    version: version_of(v)?,
                },
            ));
        }
        Ok(out)
    }

    fn lease(&self, name: &str, holder: &str, ttl_ms: u64) -> Result<String> {
        // Wall-clock expiry, so several processes sharing the file agree.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let key = format!("lease:{name}");
        self.write(|tx| {
            let cur: Option<String> = tx
                .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row([&key], |r| r.get(0))
                .optional()?;
            let (h, until) = cur
                .as_deref()
                .and_then(|v| v.rsplit_once('\n'))
                .map(|(h, u)| (h.to_string(), u.parse::<i64>().unwrap_or(0)))
                .unwrap_or_default();
            if h.is_empty() || h == holder || until <= now {
                let value = format!("{holder}\n{}", now + ttl_ms as i64);
                tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
                    .execute([key.as_str(), value.as_str()])?;
                Ok(holder.to_string())
            } else {
                Ok(h)
            }
        })
    }

    fn put_node(&self, node: &Node) -> Result<()> {
        let doc = to_json(node)?;
        self.write(|tx| {
            tx.prepare_cached("INSERT OR REPLACE INTO nodes (id, doc) VALUES (?1, ?2)")?
                .execute(params![node.id, doc])?;
            Ok(())
        })
    }

    fn nodes(&self) -> Result<Vec<Node>> {
        let r = self.reader();
        let mut stmt = r.prepare_cached("SELECT doc FROM nodes ORDER BY id")?;
        docs(&mut stmt, [])
    }

    fn delete_node(&self, id: &str) -> Result<bool> {
        self.write(|tx| {
            Ok(tx
                .prepare_cached("DELETE FROM nodes WHERE id = ?1")?
                .execute([id])?
                > 0)
        })
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
        let r = self.reader();
        let one: i64 = r.prepare_cached("SELECT 1")?.query_row([], |r| r.get(0))?;
        if one == 1 {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!("SELECT 1 answered {one}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every single-filter listing, with and without a cursor, is an index range scan with no
    /// sort step.
    #[test]
    fn listings_use_an_index() {
        let dir = std::env::temp_dir().join(format!("muster-store-plan-{}", std::process::id()));
        let store = SqliteStore::open(&dir.join("plan.db")).unwrap();
        let base = TreeFilter::default();
        let filters = [
            base.clone(),
            TreeFilter {
                workspace: Some("w".into()),
                ..base.clone()
            },
            TreeFilter {
                application: Some("a".into()),
                ..base.clone()
            },
            TreeFilter {
                version: Some("v".into()),
                ..base.clone()
            },
            TreeFilter {
                instance: Some("i".into()),
                ..base.clone()
            },
            TreeFilter {
                state: Some(muster_core::TreeState::Running),
                ..base.clone()
            },
            TreeFilter {
                node: Some("n".into()),
                ..base.clone()
            },
        ];
        let r = store.reader();
        for f in &filters {
            for cursor in [None, Some(Uuid::now_v7())] {
                let (sql, args) = list_sql(f, cursor, 10);
                let mut stmt = r.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
                let mut rows = stmt.query(rusqlite::params_from_iter(args)).unwrap();
                let mut plan = String::new();
                while let Some(row) = rows.next().unwrap() {
                    plan.push_str(&row.get::<_, String>(3).unwrap());
                    plan.push('\n');
                }
                assert!(!plan.contains("TEMP B-TREE"), "{f:?}: sorts:\n{plan}");
                if f != &base || cursor.is_some() {
                    assert!(!plan.contains("SCAN t\n"), "{f:?}: scans trees:\n{plan}");
                    assert!(plan.contains("USING"), "{f:?}: no index:\n{plan}");
                }
                eprintln!("{f:?} {cursor:?}:\n{plan}");
            }
        }
        drop(r);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
