//! The Redis engine (`redis://[:PASSWORD@]HOST[:PORT][/DB]`): one Redis instance (not Redis
//! Cluster), spoken to with the small RESP2 client of [`crate::resp`].
//!
//! Every multi-key write is one Lua script (`EVALSHA`, loaded with `SCRIPT LOAD` and reloaded
//! after `NOSCRIPT`), so it runs atomically: no other client sees or interleaves with half of it.
//! Each script first checks everything it depends on (idempotency key, compare-and-set states,
//! existence) and only then writes, so a refused batch writes nothing. Reads are plain commands,
//! pipelined in chunks.
//!
//! Key layout (every key starts with the prefix, `muster:` by default; ids are UUIDs as 32
//! lowercase hex digits, which sort like the UUIDs, so by creation time for v7):
//! - `tree:<id>`: the tree as JSON.
//! - `tree:<id>:x`: hash: `ix`, the index zsets the tree is in (newline-separated full key
//!   names, to move it when it changes); `idem`, the full key of its idempotency key.
//! - `tree:<id>:jobs`: list of the tree's job ids in creation order.
//! - `job:<id>`: `<state>\n<JSON>`: the job's state, a newline, then the job as JSON. The state
//!   up front lets the compare-and-set read it with `GETRANGE` instead of decoding the JSON
//!   (a root job of a 100,000-job tree is megabytes).
//! - `logs:<job id>`: hash attempt → log blob; `blobrefs`: hash blob → how many log records
//!   name it (to report the blobs a purge frees).
//! - `idem:<key>`: the id of the tree created with that idempotency key.
//! - Listing indexes, zsets of tree ids all with score 0, walked newest first with
//!   `ZREVRANGEBYLEX` from `(<cursor>`: `trees:all`, `trees:ws:<w>`, `trees:app:<a>`,
//!   `trees:ver:<v>`, `trees:inst:<i>`, `trees:state:<s>` (`trees:state:running` is also the
//!   running set), `trees:node:<n>`.
//! - `trees:finished`: zset of finished trees scored by `finished_at` (ms), for purging.
//! - `users` (name → JSON), `tokens` (id → JSON), `tokens:byhash` (hash → id), `meta`
//!   (key → value), `nodes` (id → JSON): hashes.
//! - `docs:<kind>`: hash key → document; `dockeys:<kind>`: zset of the same keys (score 0), for
//!   prefix listings with `ZRANGEBYLEX`; `docver:<kind>`: hash key → the document's version (a
//!   document without one predates versions and is at version 1); `docseq`: hash kind → the
//!   last version given in that kind. The values hash is the one it always was, so documents
//!   written before versions existed read as they did; value and version are read together in
//!   one `MULTI`, written together in one script.
//!
//! Events go through pub/sub on the channel `<prefix>events:<db>` (pub/sub is not scoped by
//! database, so the number keeps two clusters in two databases of one Redis apart). One
//! background thread per store holds the SUBSCRIBE connection, reconnecting with backoff, and
//! forwards events into the in-process broadcast channel.

use crate::resp::{encode, Conn, Pool, Reply, Target};
use crate::{
    Change, Created, Doc, DocCond, DocWrite, Event, Node, PurgedBlobs, Result, Store, StoreError,
    Token, Tree, TreeFilter, User, Version,
};
use muster_core::{Job, TreeState, Ts, Uuid};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// The capacity of the event channel; a subscriber further behind misses events.
const EVENT_CAPACITY: usize = 65_536;
/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "muster:";
/// How many keys one `MGET` of a read asks for.
const READ_CHUNK: usize = 2_000;
/// How many tree ids a listing fetches at most per round.
const LIST_CHUNK_MAX: usize = 5_000;
/// How long the first `subscribe` waits for the subscriber connection.
const FIRST_SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);
/// How long `subscribe` waits for its barrier to come back.
const BARRIER_WAIT: Duration = Duration::from_secs(1);
/// How long the subscriber connection may be silent before it is pinged, and then dropped.
const SUB_IDLE: Duration = Duration::from_secs(15);
/// The subscriber's reconnect backoff.
const SUB_BACKOFF_MIN: Duration = Duration::from_millis(50);
const SUB_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Creates a tree, its jobs and its index entries, unless the idempotency key exists.
/// Returns `{0, existing id}`, `{1, ''}` (created) or `{2, message}` (refused).
const CREATE_TREE: &str = r#"
local idem = ARGV[1]
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing then return {0, existing} end
end
local hex, tk, xk, lk = ARGV[2], ARGV[3], ARGV[5], ARGV[6]
if redis.call('EXISTS', tk) == 1 then return {2, 'tree ' .. hex .. ' exists'} end
local jp, n = ARGV[10], tonumber(ARGV[11])
for i = 0, n - 1 do
  local j = ARGV[12 + 2 * i]
  if redis.call('EXISTS', jp .. j) == 1 then return {2, 'job ' .. j .. ' exists'} end
end
redis.call('SET', tk, ARGV[4])
for key in string.gmatch(ARGV[7], '[^\n]+') do redis.call('ZADD', key, 0, hex) end
if ARGV[9] ~= '' then redis.call('ZADD', ARGV[8], ARGV[9], hex) end
redis.call('HSET', xk, 'ix', ARGV[7])
if idem ~= '' then
  redis.call('HSET', xk, 'idem', idem)
  redis.call('SET', idem, hex)
end
redis.call('DEL', lk)
local batch = {}
for i = 0, n - 1 do
  local j = ARGV[12 + 2 * i]
  redis.call('SET', jp .. j, ARGV[13 + 2 * i])
  batch[#batch + 1] = j
  if #batch == 1000 then
    redis.call('RPUSH', lk, unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('RPUSH', lk, unpack(batch)) end
return {1, ''}
"#;

/// Applies a batch: first decides every change (job compare-and-set against the state as the
/// earlier changes of the batch leave it, tree existence), then writes the applied ones.
/// ARGV: finished zset, blobrefs hash, then per change
/// `j key expect new_state value` | `t tree_key x_key id doc finished_score ix` |
/// `l logs_key attempt blob`. Returns 1/0 per change.
const APPLY: &str = r#"
local fin, refs = ARGV[1], ARGV[2]
local n = #ARGV
local res, overlay = {}, {}
local i, c = 3, 0
while i <= n do
  local t = ARGV[i]
  c = c + 1
  if t == 'j' then
    local k, exp = ARGV[i + 1], ARGV[i + 2]
    local cur = overlay[k]
    if cur == nil then
      local head = redis.call('GETRANGE', k, 0, 15)
      local p = string.find(head, '\n', 1, true)
      if p then cur = string.sub(head, 1, p - 1) else cur = false end
    end
    if cur == exp then
      res[c] = 1
      overlay[k] = ARGV[i + 3]
    else
      res[c] = 0
      overlay[k] = cur
    end
    i = i + 5
  elseif t == 't' then
    res[c] = redis.call('EXISTS', ARGV[i + 1])
    i = i + 7
  elseif t == 'l' then
    res[c] = 1
    i = i + 4
  else
    return redis.error_reply('muster apply: bad change tag ' .. tostring(t))
  end
end
i, c = 3, 0
while i <= n do
  local t = ARGV[i]
  c = c + 1
  if t == 'j' then
    if res[c] == 1 then redis.call('SET', ARGV[i + 1], ARGV[i + 4]) end
    i = i + 5
  elseif t == 't' then
    if res[c] == 1 then
      local tk, xk, hex, doc, score, ix = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
      redis.call('SET', tk, doc)
      local new = {}
      for key in string.gmatch(ix, '[^\n]+') do new[key] = true end
      local old = redis.call('HGET', xk, 'ix')
      local had = {}
      if old then
        for key in string.gmatch(old, '[^\n]+') do
          had[key] = true
          if not new[key] then redis.call('ZREM', key, hex) end
        end
      end
      for key, _ in pairs(new) do
        if not had[key] then redis.call('ZADD', key, 0, hex) end
      end
      redis.call('HSET', xk, 'ix', ix)
      if score == '' then redis.call('ZREM', fin, hex) else redis.call('ZADD', fin, score, hex) end
    end
    i = i + 7
  else
    local lk, attempt, blob = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local old = redis.call('HGET', lk, attempt)
    redis.call('HSET', lk, attempt, blob)
    redis.call('HINCRBY', refs, blob, 1)
    if old and redis.call('HINCRBY', refs, old, -1) <= 0 then redis.call('HDEL', refs, old) end
    i = i + 4
  end
end
return res
"#;

/// Deletes up to `limit` trees finished before `before`, with everything of theirs.
/// ARGV: finished zset, before (ms, exclusive), limit, blobrefs hash, key prefix.
/// Returns `{ids, freed blobs}`.
const PURGE: &str = r#"
local fin, before, limit, refs, p = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ids = redis.call('ZRANGEBYSCORE', fin, '-inf', '(' .. before, 'LIMIT', 0, limit)
local freed, out = {}, {}
for _, hex in ipairs(ids) do
  local tk = p .. 'tree:' .. hex
  local xk, jl = tk .. ':x', tk .. ':jobs'
  local ix = redis.call('HGET', xk, 'ix')
  if ix then
    for key in string.gmatch(ix, '[^\n]+') do redis.call('ZREM', key, hex) end
  end
  local idem = redis.call('HGET', xk, 'idem')
  if idem and redis.call('GET', idem) == hex then redis.call('DEL', idem) end
  redis.call('ZREM', fin, hex)
  for _, j in ipairs(redis.call('LRANGE', jl, 0, -1)) do
    local lk = p .. 'logs:' .. j
    for _, b in ipairs(redis.call('HVALS', lk)) do
      if redis.call('HINCRBY', refs, b, -1) <= 0 then
        redis.call('HDEL', refs, b)
        if not freed[b] then
          freed[b] = true
          out[#out + 1] = b
        end
      end
    end
    redis.call('DEL', p .. 'job:' .. j, lk)
  end
  redis.call('DEL', tk, xk, jl)
end
return {ids, out}
"#;

/// ARGV: meta hash, setup-code field, code hash, users hash, user name, user doc.
const CONSUME_SETUP_CODE: &str = r#"
if redis.call('HGET', ARGV[1], ARGV[2]) ~= ARGV[3] then return 0 end
if redis.call('HLEN', ARGV[4]) > 0 then return 0 end
redis.call('HSET', ARGV[4], ARGV[5], ARGV[6])
redis.call('HDEL', ARGV[1], ARGV[2])
return 1
"#;

/// Stores a token, replacing the one with the same id and the one with the same hash.
/// ARGV: tokens hash, by-hash hash, id, token hash, doc.
const PUT_TOKEN: &str = r#"
local tokens, byhash, id, hash = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local other = redis.call('HGET', byhash, hash)
if other and other ~= id then redis.call('HDEL', tokens, other) end
local old = redis.call('HGET', tokens, id)
if old then
  local oh = cjson.decode(old).hash
  if oh ~= hash and redis.call('HGET', byhash, oh) == id then redis.call('HDEL', byhash, oh) end
end
redis.call('HSET', tokens, id, ARGV[5])
redis.call('HSET', byhash, hash, id)
return 1
"#;

/// ARGV: tokens hash, by-hash hash, id. Returns 1 when a token was deleted.
const DELETE_TOKEN: &str = r#"
local tokens, byhash, id = ARGV[1], ARGV[2], ARGV[3]
local old = redis.call('HGET', tokens, id)
if not old then return 0 end
local h = cjson.decode(old).hash
if redis.call('HGET', byhash, h) == id then redis.call('HDEL', byhash, h) end
redis.call('HDEL', tokens, id)
return 1
"#;

/// Writes a document if its condition holds. ARGV: values hash, versions hash, key zset, seq
/// hash, kind, key, condition (`any`, `absent` or `at`), expected version, op (`put` or
/// `delete`), value. Returns `{1, new version (0: deleted or absent)}` when written, `{0,
/// current version (0: absent)}` when the condition failed.
const WRITE_DOC: &str = r#"
local h, vh, z, sh, kind, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local cond, exp, op = ARGV[7], tonumber(ARGV[8]), ARGV[9]
local cur = 0
if redis.call('HEXISTS', h, key) == 1 then
  cur = tonumber(redis.call('HGET', vh, key) or '1')
end
if (cond == 'absent' and cur ~= 0) or (cond == 'at' and cur ~= exp) then return {0, cur} end
if op == 'delete' and cur == 0 then return {1, 0} end
local nv = tonumber(redis.call('HGET', sh, kind) or '0')
if cur > nv then nv = cur end
nv = nv + 1
redis.call('HSET', sh, kind, nv)
if op == 'delete' then
  redis.call('HDEL', h, key)
  redis.call('HDEL', vh, key)
  redis.call('ZREM', z, key)
  return {1, 0}
end
redis.call('HSET', h, key, ARGV[10])
redis.call('HSET', vh, key, nv)
redis.call('ZADD', z, 0, key)
return {1, nv}
"#;

/// Takes or renews a lease: ARGV: key, holder, ttl ms. Returns the holder after the call.
const LEASE: &str = r#"
local cur = redis.call('GET', ARGV[1])
if not cur or cur == ARGV[2] then
  redis.call('SET', ARGV[1], ARGV[2], 'PX', ARGV[3])
  return ARGV[2]
end
return cur
"#;

/// A Lua script and its SHA-1 once loaded.
struct Script {
    src: &'static str,
    sha: Mutex<Option<String>>,
}

impl Script {
    const fn new(src: &'static str) -> Script {
        Script {
            src,
            sha: Mutex::new(None),
        }
    }

    fn sha(&self) -> Option<String> {
        self.sha.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs the script on `c` with `args` as ARGV (no KEYS: one instance, not a cluster).
    fn eval(&self, c: &mut Conn, args: &[Vec<u8>]) -> Result<Reply> {
        let run = |c: &mut Conn, sha: &str| {
            let mut cmd: Vec<&[u8]> = Vec::with_capacity(args.len() + 3);
            cmd.extend([b"EVALSHA".as_slice(), sha.as_bytes(), b"0"]);
            cmd.extend(args.iter().map(Vec::as_slice));
            c.call(&cmd)
        };
        if let Some(sha) = self.sha() {
            match run(c, &sha)? {
                Reply::Error(e) if e.starts_with("NOSCRIPT") => {}
                r => return r.check(),
            }
        }
        let sha = c
            .call(&["SCRIPT", "LOAD", self.src])?
            .opt_string()?
            .ok_or_else(|| StoreError::Other("SCRIPT LOAD answered nil".into()))?;
        *self.sha.lock().unwrap_or_else(|e| e.into_inner()) = Some(sha.clone());
        run(c, &sha)?.check()
    }
}

/// The scripts of one store.
struct Scripts {
    create_tree: Script,
    apply: Script,
    purge: Script,
    consume_setup_code: Script,
    put_token: Script,
    delete_token: Script,
    write_doc: Script,
    lease: Script,
}

/// What the subscriber thread and `subscribe` share.
struct SubShared {
    stop: AtomicBool,
    state: Mutex<SubState>,
    cv: Condvar,
}

#[derive(Default)]
struct SubState {
    started: bool,
    /// Connection attempts made so far (to stop waiting when Redis refuses).
    attempts: u64,
    /// A handle of the live SUBSCRIBE connection: commands to it are written through here
    /// (under this lock), and `Drop` shuts it down to end the thread.
    socket: Option<TcpStream>,
    /// Events forwarded into the channel so far.
    forwarded: u64,
    next_barrier: u64,
    /// Barrier nonce → `forwarded` when its PONG came back.
    barriers: HashMap<String, u64>,
}

impl SubShared {
    fn lock(&self) -> MutexGuard<'_, SubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A store in one Redis database.
pub struct RedisStore {
    pool: Arc<Pool>,
    prefix: String,
    channel: String,
    scripts: Scripts,
    events: broadcast::Sender<Event>,
    sub: Arc<SubShared>,
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Other(format!("cannot encode record: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(s: &[u8]) -> Result<T> {
    serde_json::from_slice(s).map_err(|e| StoreError::Other(format!("bad stored record: {e}")))
}

fn hex(id: Uuid) -> String {
    id.simple().to_string()
}

fn parse_hex(s: &str) -> Result<Uuid> {
    Uuid::try_parse(s).map_err(|e| StoreError::Other(format!("bad stored id {s:?}: {e}")))
}

/// A stored job value: `<state>\n<JSON>`.
fn job_value(job: &Job) -> Result<Vec<u8>> {
    let mut v = Vec::with_capacity(512);
    v.extend_from_slice(job.state.as_str().as_bytes());
    v.push(b'\n');
    serde_json::to_writer(&mut v, job)
        .map_err(|e| StoreError::Other(format!("cannot encode job: {e}")))?;
    Ok(v)
}

fn parse_job(value: &[u8]) -> Result<Job> {
    let nl = value
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| StoreError::Other("bad stored job: no state".into()))?;
    from_json(&value[nl + 1..])
}

/// The bytes of a bulk reply; `None` for nil.
fn bulk(r: Reply) -> Result<Option<Vec<u8>>> {
    match r.check()? {
        Reply::Bulk(b) => Ok(b),
        Reply::Status(s) => Ok(Some(s.into_bytes())),
        r => Err(StoreError::Other(format!("expected a bulk reply: {r:?}"))),
    }
}

fn bulks(r: Reply) -> Result<Vec<Option<Vec<u8>>>> {
    r.array()?.into_iter().map(bulk).collect()
}

/// A document version from a script's reply (0: none).
fn doc_version(v: i64) -> Result<Option<Version>> {
    match v {
        0 => Ok(None),
        v if v > 0 => Ok(Some(Version(v as u64))),
        v => Err(StoreError::Other(format!("bad document version {v}"))),
    }
}

/// The version in the versions hash; a document without one was written before versions and
/// is at version 1.
fn stored_version(v: Option<&str>) -> Result<Version> {
    match v {
        None => Ok(Version(1)),
        Some(s) => s
            .parse()
            .map(Version)
            .map_err(|_| StoreError::Other(format!("bad stored document version {s:?}"))),
    }
}

fn arg(s: impl Into<Vec<u8>>) -> Vec<u8> {
    s.into()
}

impl RedisStore {
    /// Connects to the Redis a `redis://` URL names, with the default key prefix.
    pub fn open(url: &str) -> Result<RedisStore> {
        RedisStore::open_with_prefix(url, DEFAULT_PREFIX)
    }

    /// Connects with every key starting with `prefix`.
    pub fn open_with_prefix(url: &str, prefix: &str) -> Result<RedisStore> {
        let target = Target::parse(url)?;
        let channel = format!("{prefix}events:{}", target.db);
        let pool = Arc::new(Pool::new(target));
        // Fail early on a wrong address or password.
        pool.call(&["PING"])?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Ok(RedisStore {
            pool,
            prefix: prefix.to_string(),
            channel,
            scripts: Scripts {
                create_tree: Script::new(CREATE_TREE),
                apply: Script::new(APPLY),
                purge: Script::new(PURGE),
                consume_setup_code: Script::new(CONSUME_SETUP_CODE),
                put_token: Script::new(PUT_TOKEN),
                delete_token: Script::new(DELETE_TOKEN),
                write_doc: Script::new(WRITE_DOC),
                lease: Script::new(LEASE),
            },
            events,
            sub: Arc::new(SubShared {
                stop: AtomicBool::new(false),
                state: Mutex::new(SubState::default()),
                cv: Condvar::new(),
            }),
        })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn tree_key(&self, id: &str) -> String {
        format!("{}tree:{id}", self.prefix)
    }

    fn job_key(&self, id: &str) -> String {
        format!("{}job:{id}", self.prefix)
    }

    /// The hash of the documents of `kind` (key → value), the hash of their versions and the
    /// zset of their keys (score 0, for prefix ranges).
    fn doc_keys(&self, kind: &str) -> (String, String, String) {
        (
            format!("{}docs:{kind}", self.prefix),
            format!("{}docver:{kind}", self.prefix),
            format!("{}dockeys:{kind}", self.prefix),
        )
    }

    /// Every JSON record kept as a value of the hash `name` (users, tokens, nodes).
    fn hash_docs<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Vec<T>> {
        let docs = bulks(self.pool.call(&["HVALS", &self.key(name)])?)?;
        docs.into_iter().flatten().map(|d| from_json(&d)).collect()
    }

    /// Runs `cmds` in one `MULTI`/`EXEC` (so they see one moment of the data) and returns
    /// their replies.
    fn multi(&self, cmds: &[&[&[u8]]]) -> Result<Vec<Reply>> {
        let replies = self.pool.with(|c| {
            c.send(&["MULTI"]);
            for cmd in cmds {
                c.send(cmd);
            }
            c.send(&["EXEC"]);
            c.recv_all()
        })?;
        let n = replies.len();
        let mut it = replies.into_iter();
        // MULTI's +OK, then a +QUEUED (or an error) per command.
        for r in it.by_ref().take(n.saturating_sub(1)) {
            r.check()?;
        }
        let out = it
            .next()
            .ok_or_else(|| StoreError::Other("no reply to EXEC".into()))?
            .array()?;
        if out.len() != cmds.len() {
            return Err(StoreError::Other(format!(
                "EXEC answered {} replies for {} commands",
                out.len(),
                cmds.len()
            )));
        }
        Ok(out)
    }

    /// The listing indexes `tree` belongs in.
    fn index_keys(&self, tree: &Tree) -> Vec<String> {
        let p = &self.prefix;
        let t = &tree.tags;
        let mut keys = vec![
            format!("{p}trees:all"),
            format!("{p}trees:ws:{}", t.workspace),
            format!("{p}trees:state:{}", tree.state.as_str()),
        ];
        let opt = [
            ("app", &t.application),
            ("ver", &t.version),
            ("inst", &t.instance),
        ];
        for (what, v) in opt {
            if let Some(v) = v {
                keys.push(format!("{p}trees:{what}:{v}"));
            }
        }
        for n in &tree.nodes {
            keys.push(format!("{p}trees:node:{n}"));
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// The `trees:finished` score of a tree, when it is finished.
    fn finished_score(tree: &Tree) -> String {
        match tree.finished_at {
            Some(at) if tree.state != TreeState::Running => at.0.to_string(),
            _ => String::new(),
        }
    }

    /// Reads JSON docs of `keys` with pipelined `MGET`s; missing keys are `None`.
    fn mget(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.pool.with(|c| {
            for chunk in keys.chunks(READ_CHUNK) {
                let mut cmd: Vec<&[u8]> = Vec::with_capacity(chunk.len() + 1);
                cmd.push(b"MGET");
                cmd.extend(chunk.iter().map(|k| k.as_bytes()));
                c.send(&cmd);
            }
            let mut out = Vec::with_capacity(keys.len());
            for r in c.recv_all()? {
                out.extend(bulks(r)?);
            }
            Ok(out)
        })
    }

    fn trees_by_ids(&self, ids: &[String]) -> Result<Vec<Tree>> {
        let keys: Vec<String> = ids.iter().map(|id| self.tree_key(id)).collect();
        self.mget(&keys)?
            .into_iter()
            .flatten()
            .map(|d| from_json(&d))
            .collect()
    }

    /// Walks one index newest first from `cursor`, keeping the trees that match `filter`,
    /// until `limit` are found or the index ends.
    fn scan(
        &self,
        index: &str,
        filter: &TreeFilter,
        cursor: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Tree>> {
        let mut out = Vec::new();
        let mut max = match cursor {
            Some(c) => format!("({}", hex(c)),
            None => "+".to_string(),
        };
        let mut chunk = limit.clamp(1, LIST_CHUNK_MAX);
        loop {
            let n = chunk.to_string();
            let ids: Vec<String> = self
                .pool
                .call(&["ZREVRANGEBYLEX", index, &max, "-", "LIMIT", "0", &n])?
                .strings()?
                .into_iter()
                .flatten()
                .collect();
            let Some(last) = ids.last() else { break };
            max = format!("({last}");
            for t in self.trees_by_ids(&ids)? {
                if crate::memory::matches(filter, &t) {
                    out.push(t);
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
            if ids.len() < chunk {
                break;
            }
            // Filtering drops some: fetch more per round from now on.
            chunk = (chunk * 4).min(LIST_CHUNK_MAX);
        }
        Ok(out)
    }

    /// The index or indexes a listing walks: the smallest single-value index of the filter,
    /// or the per-workspace indexes of a workspace set when together they are smaller.
    fn drivers(&self, filter: &TreeFilter) -> Result<Vec<String>> {
        let p = &self.prefix;
        let mut single = Vec::new();
        let fields = [
            ("ws", &filter.workspace),
            ("app", &filter.application),
            ("ver", &filter.version),
            ("inst", &filter.instance),
            ("node", &filter.node),
        ];
        for (what, v) in fields {
            if let Some(v) = v {
                single.push(format!("{p}trees:{what}:{v}"));
            }
        }
        if let Some(s) = filter.state {
            single.push(format!("{p}trees:state:{}", s.as_str()));
        }
        let group: Option<Vec<String>> = filter.workspaces.as_ref().map(|set| {
            let mut ws: Vec<&String> = set
                .iter()
                .filter(|w| filter.workspace.as_ref().is_none_or(|x| x == *w))
                .collect();
            ws.sort();
            ws.dedup();
            ws.iter().map(|w| format!("{p}trees:ws:{w}")).collect()
        });
        match (&group, single.len()) {
            (Some(g), _) if g.is_empty() => return Ok(Vec::new()),
            (None, 0) => return Ok(vec![format!("{p}trees:all")]),
            (None, 1) => return Ok(single),
            (Some(g), 0) => return Ok(g.clone()),
            _ => {}
        }
        let group = group.unwrap_or_default();
        let sizes = self.pool.with(|c| {
            for k in single.iter().chain(&group) {
                c.send(&["ZCARD", k.as_str()]);
            }
            c.recv_all()?
                .into_iter()
                .map(Reply::int)
                .collect::<Result<Vec<i64>>>()
        })?;
        let (best, best_size) = single
            .iter()
            .zip(&sizes)
            .min_by_key(|(_, n)| **n)
            .map(|(k, n)| (k.clone(), *n))
            .unwrap_or_default();
        let group_size: i64 = sizes[single.len()..].iter().sum();
        if !group.is_empty() && group_size < best_size {
            Ok(group)
        } else {
            Ok(vec![best])
        }
    }

    /// Starts the subscriber thread once; true when this call started it.
    fn start_subscriber(&self) -> bool {
        {
            let mut st = self.sub.lock();
            if st.started {
                return false;
            }
            st.started = true;
        }
        let shared = self.sub.clone();
        let target = self.pool.target().clone();
        let channel = self.channel.clone();
        let tx = self.events.clone();
        let spawned = std::thread::Builder::new()
            .name("muster-redis-events".into())
            .spawn(move || subscriber(shared, target, channel, tx));
        if spawned.is_err() {
            self.sub.lock().started = false;
            return false;
        }
        true
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.sub.stop.store(true, Ordering::SeqCst);
        let st = self.sub.lock();
        if let Some(s) = &st.socket {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.sub.cv.notify_all();
    }
}

/// The subscriber thread: holds a SUBSCRIBE connection, reconnecting with backoff, until the
/// store is dropped.
fn subscriber(
    shared: Arc<SubShared>,
    target: Target,
    channel: String,
    tx: broadcast::Sender<Event>,
) {
    let mut backoff = SUB_BACKOFF_MIN;
    while !shared.stop.load(Ordering::SeqCst) {
        let connected = subscribe_session(&shared, &target, &channel, &tx);
        {
            let mut st = shared.lock();
            st.attempts += 1;
            st.socket = None;
            st.barriers.clear();
        }
        shared.cv.notify_all();
        if connected {
            backoff = SUB_BACKOFF_MIN;
        }
        let until = Instant::now() + backoff;
        while !shared.stop.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        backoff = (backoff * 2).min(SUB_BACKOFF_MAX);
    }
}

/// Writes one command to the subscriber connection (the caller holds the state lock).
fn sub_write(st: &SubState, args: &[&str]) -> bool {
    let Some(s) = &st.socket else { return false };
    let mut buf = Vec::new();
    encode(&mut buf, args);
    let mut s: &TcpStream = s;
    s.write_all(&buf).is_ok()
}

/// One SUBSCRIBE connection, until it fails or the store is dropped. True when it got as far
/// as subscribing.
fn subscribe_session(
    shared: &SubShared,
    target: &Target,
    channel: &str,
    tx: &broadcast::Sender<Event>,
) -> bool {
    let Ok(mut conn) = Conn::open(target) else {
        return false;
    };
    let Ok(r) = conn.call(&["SUBSCRIBE", channel]) else {
        return false;
    };
    if !matches!(&r, Reply::Array(Some(a)) if a.first() == Some(&Reply::Bulk(Some(b"subscribe".to_vec()))))
    {
        return false;
    }
    {
        let mut st = shared.lock();
        if shared.stop.load(Ordering::SeqCst) {
            return true;
        }
        match conn.shutdown_handle() {
            Ok(h) => st.socket = Some(h),
            Err(_) => return true,
        }
    }
    shared.cv.notify_all();
    if conn.set_read_timeout(Some(SUB_IDLE)).is_err() {
        return true;
    }
    let mut pinged = false;
    while !shared.stop.load(Ordering::SeqCst) {
        match conn.wait_readable() {
            Ok(true) => {}
            Ok(false) => {
                // Silent for a while: ping, and give up when the ping is not answered either.
                if pinged || !sub_write(&shared.lock(), &["PING"]) {
                    return true;
                }
                pinged = true;
                continue;
            }
            Err(_) => return true,
        }
        let Ok(msg) = conn.read_push() else {
            return true;
        };
        pinged = false;
        let Reply::Array(Some(parts)) = msg else {
            continue;
        };
        let kind = match parts.first() {
            Some(Reply::Bulk(Some(k))) => k.as_slice(),
            _ => continue,
        };
        match (kind, parts.get(1), parts.get(2)) {
            (b"message", _, Some(Reply::Bulk(Some(payload)))) => {
                // Anything that is not an event (another version's, garbage) is skipped.
                if let Ok(ev) = serde_json::from_slice::<Event>(payload) {
                    let mut st = shared.lock();
                    let _ = tx.send(ev);
                    st.forwarded += 1;
                }
            }
            (b"pong", Some(Reply::Bulk(Some(nonce))), _) if !nonce.is_empty() => {
                let mut st = shared.lock();
                if st.barriers.len() > 1024 {
                    // Barriers whose waiters gave up.
                    st.barriers.clear();
                }
                let at = st.forwarded;
                st.barriers
                    .insert(String::from_utf8_lossy(nonce).into_owned(), at);
                drop(st);
                shared.cv.notify_all();
            }
            _ => {}
        }
    }
    true
}

impl Store for RedisStore {
    fn create_tree(
        &self,
        tree: &Tree,
        jobs: &[Job],
        idempotency_key: Option<&str>,
    ) -> Result<Created> {
        let mut seen = HashSet::with_capacity(jobs.len());
        for job in jobs {
            if !seen.insert(job.id) {
                return Err(StoreError::Other(format!("job {} exists", job.id)));
            }
        }
        let id = hex(tree.id);
        let tk = self.tree_key(&id);
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(11 + 2 * jobs.len());
        args.extend([
            arg(idempotency_key
                .map(|k| self.key(&format!("idem:{k}")))
                .unwrap_or_default()),
            arg(id.clone()),
            arg(tk.clone()),
            to_json(tree)?,
            arg(format!("{tk}:x")),
            arg(format!("{tk}:jobs")),
            arg(self.index_keys(tree).join("\n")),
            arg(self.key("trees:finished")),
            arg(Self::finished_score(tree)),
            arg(self.key("job:")),
            arg(jobs.len().to_string()),
        ]);
        for job in jobs {
            args.push(arg(hex(job.id)));
            args.push(job_value(job)?);
        }
        let r = self
            .pool
            .with(|c| self.scripts.create_tree.eval(c, &args))?
            .array()?;
        let mut it = r.into_iter();
        let code = it.next().map(Reply::int).transpose()?;
        let text = it
            .next()
            .map(Reply::opt_string)
            .transpose()?
            .flatten()
            .unwrap_or_default();
        match code {
            Some(0) => Ok(Created::Existing(parse_hex(&text)?)),
            Some(1) => Ok(Created::New),
            _ => Err(StoreError::Other(text)),
        }
    }

    fn apply(&self, changes: &[Change]) -> Result<Vec<bool>> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(2 + 5 * changes.len());
        args.push(arg(self.key("trees:finished")));
        args.push(arg(self.key("blobrefs")));
        for change in changes {
            match change {
                Change::Job { job, expect } => args.extend([
                    arg("j"),
                    arg(self.job_key(&hex(job.id))),
                    arg(expect.as_str()),
                    arg(job.state.as_str()),
                    job_value(job)?,
                ]),
                Change::Tree(tree) => {
                    let id = hex(tree.id);
                    let tk = self.tree_key(&id);
                    args.extend([
                        arg("t"),
                        arg(tk.clone()),
                        arg(format!("{tk}:x")),
                        arg(id),
                        to_json(tree)?,
                        arg(Self::finished_score(tree)),
                        arg(self.index_keys(tree).join("\n")),
                    ]);
                }
                Change::Log { job, attempt, blob } => args.extend([
                    arg("l"),
                    arg(self.key(&format!("logs:{}", hex(*job)))),
                    arg(attempt.to_string()),
                    arg(blob.as_str()),
                ]),
            }
        }
        let r = self.pool.with(|c| self.scripts.apply.eval(c, &args))?;
        let out: Vec<bool> = r
            .array()?
            .into_iter()
            .map(|r| r.int().map(|n| n == 1))
            .collect::<Result<_>>()?;
        if out.len() != changes.len() {
            return Err(StoreError::Other(format!(
                "apply answered {} results for {} changes",
                out.len(),
                changes.len()
            )));
        }
        Ok(out)
    }

    fn job(&self, id: Uuid) -> Result<Option<Job>> {
        let v = bulk(self.pool.call(&["GET", &self.job_key(&hex(id))])?)?;
        v.map(|v| parse_job(&v)).transpose()
    }

    fn tree(&self, id: Uuid) -> Result<Option<Tree>> {
        let v = bulk(self.pool.call(&["GET", &self.tree_key(&hex(id))])?)?;
        v.map(|v| from_json(&v)).transpose()
    }

    fn tree_jobs(&self, tree: Uuid) -> Result<Vec<Job>> {
        let list = format!("{}:jobs", self.tree_key(&hex(tree)));
        let ids = self.pool.call(&["LRANGE", &list, "0", "-1"])?.strings()?;
        let keys: Vec<String> = ids.iter().flatten().map(|id| self.job_key(id)).collect();
        self.mget(&keys)?
            .into_iter()
            .flatten()
            .map(|v| parse_job(&v))
            .collect()
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
        let drivers = self.drivers(filter)?;
        let mut all = Vec::new();
        for d in &drivers {
            all.extend(self.scan(d, filter, cursor, limit)?);
        }
        if drivers.len() > 1 {
            all.sort_by_key(|t| std::cmp::Reverse(t.id));
            all.dedup_by_key(|t| t.id);
            all.truncate(limit);
        }
        Ok(all)
    }

    fn running_trees(&self) -> Result<Vec<Tree>> {
        let key = self.key("trees:state:running");
        let ids: Vec<String> = self
            .pool
            .call(&["ZRANGE", &key, "0", "-1"])?
            .strings()?
            .into_iter()
            .flatten()
            .collect();
        // The index and the docs are read apart: keep only what is still running.
        Ok(self
            .trees_by_ids(&ids)?
            .into_iter()
            .filter(|t| t.state == TreeState::Running)
            .collect())
    }

    fn log_blob(&self, job: Uuid, attempt: u32) -> Result<Option<String>> {
        let key = self.key(&format!("logs:{}", hex(job)));
        self.pool
            .call(&["HGET", &key, &attempt.to_string()])?
            .opt_string()
    }

    fn purge_finished(&self, before: Ts, limit: usize) -> Result<(Vec<Uuid>, PurgedBlobs)> {
        if limit == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let args = [
            arg(self.key("trees:finished")),
            arg(before.0.to_string()),
            arg(limit.to_string()),
            arg(self.key("blobrefs")),
            arg(self.prefix.as_str()),
        ];
        let r = self.pool.with(|c| self.scripts.purge.eval(c, &args))?;
        let mut parts = r.array()?.into_iter();
        let ids = parts
            .next()
            .map(Reply::strings)
            .transpose()?
            .unwrap_or_default();
        let blobs = parts
            .next()
            .map(Reply::strings)
            .transpose()?
            .unwrap_or_default();
        let ids = ids
            .into_iter()
            .flatten()
            .map(|s| parse_hex(&s))
            .collect::<Result<Vec<_>>>()?;
        let mut blobs: Vec<String> = blobs.into_iter().flatten().collect();
        blobs.sort();
        blobs.dedup();
        Ok((ids, blobs))
    }

    fn consume_setup_code(&self, code_hash: &str, admin: &User) -> Result<bool> {
        let args = [
            arg(self.key("meta")),
            arg(crate::SETUP_CODE_KEY),
            arg(code_hash),
            arg(self.key("users")),
            arg(admin.name.as_str()),
            to_json(admin)?,
        ];
        let r = self
            .pool
            .with(|c| self.scripts.consume_setup_code.eval(c, &args))?;
        Ok(r.int()? == 1)
    }

    fn put_user(&self, user: &User) -> Result<()> {
        let doc = to_json(user)?;
        self.pool.call(&[
            b"HSET".as_slice(),
            self.key("users").as_bytes(),
            user.name.as_bytes(),
            &doc,
        ])?;
        Ok(())
    }

    fn user(&self, name: &str) -> Result<Option<User>> {
        let v = bulk(self.pool.call(&["HGET", &self.key("users"), name])?)?;
        v.map(|v| from_json(&v)).transpose()
    }

    fn users(&self) -> Result<Vec<User>> {
        let mut users: Vec<User> = self.hash_docs("users")?;
        users.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(users)
    }

    fn delete_user(&self, name: &str) -> Result<bool> {
        Ok(self.pool.call(&["HDEL", &self.key("users"), name])?.int()? > 0)
    }

    fn put_token(&self, token: &Token) -> Result<()> {
        let args = [
            arg(self.key("tokens")),
            arg(self.key("tokens:byhash")),
            arg(token.id.as_str()),
            arg(token.hash.as_str()),
            to_json(token)?,
        ];
        self.pool.with(|c| self.scripts.put_token.eval(c, &args))?;
        Ok(())
    }

    fn token_by_hash(&self, hash: &str) -> Result<Option<Token>> {
        let id = self
            .pool
            .call(&["HGET", &self.key("tokens:byhash"), hash])?
            .opt_string()?;
        let Some(id) = id else { return Ok(None) };
        let v = bulk(self.pool.call(&["HGET", &self.key("tokens"), &id])?)?;
        let token: Option<Token> = v.map(|v| from_json(&v)).transpose()?;
        // Replaced or deleted between the two reads.
        Ok(token.filter(|t| t.hash == hash))
    }

    fn tokens(&self, user: Option<&str>) -> Result<Vec<Token>> {
        let mut tokens: Vec<Token> = self.hash_docs("tokens")?;
        tokens.retain(|t| user.is_none_or(|u| t.user == u));
        tokens.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(tokens)
    }

    fn delete_token(&self, id: &str) -> Result<bool> {
        let args = [
            arg(self.key("tokens")),
            arg(self.key("tokens:byhash")),
            arg(id),
        ];
        let r = self
            .pool
            .with(|c| self.scripts.delete_token.eval(c, &args))?;
        Ok(r.int()? == 1)
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        self.pool
            .call(&["HGET", &self.key("meta"), key])?
            .opt_string()
    }

    fn set_meta(&self, key: &str, value: Option<&str>) -> Result<()> {
        let meta = self.key("meta");
        match value {
            Some(v) => self.pool.call(&["HSET", &meta, key, v])?,
            None => self.pool.call(&["HDEL", &meta, key])?,
        };
        Ok(())
    }

    fn lease(&self, name: &str, holder: &str, ttl_ms: u64) -> Result<String> {
        let args = [
            arg(self.key(&format!("lease:{name}"))),
            arg(holder),
            arg(ttl_ms.to_string()),
        ];
        let r = self.pool.with(|c| self.scripts.lease.eval(c, &args))?;
        Ok(r.opt_string()?.unwrap_or_default())
    }

    fn write_doc(
        &self,
        kind: &str,
        key: &str,
        value: Option<&str>,
        cond: DocCond,
    ) -> Result<DocWrite> {
        let (h, vh, z) = self.doc_keys(kind);
        let (cond, expected) = match cond {
            DocCond::Any => ("any", 0),
            DocCond::Absent => ("absent", 0),
            DocCond::At(v) => ("at", v.0),
        };
        let args = [
            arg(h),
            arg(vh),
            arg(z),
            arg(self.key("docseq")),
            arg(kind),
            arg(key),
            arg(cond),
            arg(expected.to_string()),
            arg(if value.is_some() { "put" } else { "delete" }),
            arg(value.unwrap_or_default()),
        ];
        let r = self.pool.with(|c| self.scripts.write_doc.eval(c, &args))?;
        let mut it = r.array()?.into_iter();
        let (Some(done), Some(v)) = (it.next(), it.next()) else {
            return Err(StoreError::Other("write_doc answered too little".into()));
        };
        let v = doc_version(v.int()?)?;
        Ok(if done.int()? == 1 {
            DocWrite::Done(v)
        } else {
            DocWrite::Conflict(v)
        })
    }

    fn doc(&self, kind: &str, key: &str) -> Result<Option<Doc>> {
        let (h, vh, _) = self.doc_keys(kind);
        let k = key.as_bytes();
        let replies = self.multi(&[&[b"HGET", h.as_bytes(), k], &[b"HGET", vh.as_bytes(), k]])?;
        let mut it = replies.into_iter();
        let value = it.next().map(Reply::opt_string).transpose()?.flatten();
        let version = it.next().map(Reply::opt_string).transpose()?.flatten();
        value
            .map(|value| {
                Ok(Doc {
                    value,
                    version: stored_version(version.as_deref())?,
                })
            })
            .transpose()
    }

    fn docs(&self, kind: &str, prefix: &str) -> Result<Vec<(String, Doc)>> {
        let (h, vh, z) = self.doc_keys(kind);
        // Every UTF-8 key starting with `prefix` sorts before `prefix` + byte 0xFF.
        let (min, max) = if prefix.is_empty() {
            (b"-".to_vec(), b"+".to_vec())
        } else {
            let mut max = Vec::with_capacity(prefix.len() + 2);
            max.push(b'(');
            max.extend_from_slice(prefix.as_bytes());
            max.push(0xFF);
            (format!("[{prefix}").into_bytes(), max)
        };
        let keys: Vec<String> = self
            .pool
            .call(&[b"ZRANGEBYLEX".as_slice(), z.as_bytes(), &min, &max])?
            .strings()?
            .into_iter()
            .flatten()
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut values: Vec<&[u8]> = Vec::with_capacity(keys.len() + 2);
        values.extend([b"HMGET".as_slice(), h.as_bytes()]);
        values.extend(keys.iter().map(|k| k.as_bytes()));
        let mut versions = values.clone();
        versions[1] = vh.as_bytes();
        // Values and versions from one moment, so each pair belongs together.
        let mut replies = self.multi(&[&values, &versions])?.into_iter();
        let (Some(values), Some(versions)) = (replies.next(), replies.next()) else {
            return Err(StoreError::Other("EXEC answered too little".into()));
        };
        let (values, versions) = (values.strings()?, versions.strings()?);
        // A key deleted between the two reads is left out.
        keys.into_iter()
            .zip(values.into_iter().zip(versions))
            .filter_map(|(k, (value, version))| {
                let value = value?;
                Some(stored_version(version.as_deref()).map(|version| (k, Doc { value, version })))
            })
            .collect()
    }

    fn put_node(&self, node: &Node) -> Result<()> {
        let doc = to_json(node)?;
        self.pool.call(&[
            b"HSET".as_slice(),
            self.key("nodes").as_bytes(),
            node.id.as_bytes(),
            &doc,
        ])?;
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<Node>> {
        let mut nodes: Vec<Node> = self.hash_docs("nodes")?;
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    fn delete_node(&self, id: &str) -> Result<bool> {
        Ok(self.pool.call(&["HDEL", &self.key("nodes"), id])?.int()? > 0)
    }

    fn publish(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let mut payloads = Vec::with_capacity(events.len());
        for e in events {
            if let Ok(p) = serde_json::to_vec(e) {
                payloads.push(p);
            }
        }
        // Events are hints: a Redis that is away loses them, and the caller carries on.
        let _ = self.pool.with(|c| {
            for p in &payloads {
                c.send(&[b"PUBLISH".as_slice(), self.channel.as_bytes(), p]);
            }
            c.recv_all()
        });
    }

    /// Events published (by anyone) before this call are not delivered to the new receiver;
    /// events published after it returns are, while the subscriber connection is up.
    fn subscribe(&self) -> broadcast::Receiver<Event> {
        let first = self.start_subscriber();
        let mut st = self.sub.lock();
        if first {
            // Wait for the first connection attempt, so that events published right after
            // this call are not lost.
            let deadline = Instant::now() + FIRST_SUBSCRIBE_WAIT;
            while st.socket.is_none() && st.attempts == 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                st = self
                    .sub
                    .cv
                    .wait_timeout(st, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let mut rx = self.events.subscribe();
        let from = st.forwarded;
        // A barrier: a PING on the subscriber connection comes back after every message
        // published before it; the events forwarded until then are skipped.
        let nonce = format!("barrier-{}", st.next_barrier);
        st.next_barrier += 1;
        if !sub_write(&st, &["PING", &nonce]) {
            return rx;
        }
        let deadline = Instant::now() + BARRIER_WAIT;
        let upto = loop {
            if let Some(at) = st.barriers.remove(&nonce) {
                break Some(at);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || st.socket.is_none() {
                break None;
            }
            st = self
                .sub
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        drop(st);
        if let Some(upto) = upto {
            for _ in from..upto {
                if rx.try_recv().is_err() {
                    break;
                }
            }
        }
        rx
    }

    fn ping(&self) -> Result<()> {
        match self.pool.call(&["PING"])? {
            Reply::Status(s) if s == "PONG" => Ok(()),
            r => Err(StoreError::Unavailable(format!("PING answered {r:?}"))),
        }
    }
}
