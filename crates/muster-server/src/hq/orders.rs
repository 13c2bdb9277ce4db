//! The orders watcher (SPEC §7): each line appended to an orders file (`deployer/orders`, and
//! `<workspace>/models/<Model>/orders` once a verb of that scope is registered) is one order, run
//! **exactly once** as a job tree, its outcome recorded in the store and appended to the
//! `orders.log` beside the file (committed, so HQ's history shows what ran).
//!
//! How exactly once holds across restarts, `kill -9` and failover, with every step a
//! compare-and-set in the store (so two servers that both think they lead cannot both act):
//!
//! 1. The order's identity ([`muster_core::orders::OrderId`]: file, line, hash of the line and of
//!    the prefix before it) is recorded as an [`Order`] document (`pending`, with the tree it
//!    will make) *before* anything runs, then the file's [`OrdersFile`] document moves past the
//!    line and marks it open.
//! 2. The tree is created with an idempotency key derived from the identity: whoever repeats
//!    this step after a crash gets the same tree, never a second one.
//! 3. The order becomes `running` with its tree; when the tree ends, `succeeded` or `failed`;
//!    then the outcome goes to `orders.log` (a line carrying the order's digest, so a repeat
//!    after a crash finds it there and appends nothing), and the file's open mark is cleared.
//!
//! Orders of one file run one after another, in line order. Unknown or malformed lines are
//! recorded `rejected` with the reason and never run. An edit or removal of a line already
//! processed stops the whole file (reported in `GET /api/v1/hq`, an `hq_orders_stopped` alert)
//! until an admin resolves it ([`super::Hq::resolve`]): the file's current content then counts
//! as processed up to where it was, and later lines run.
//!
//! Orders are read from the commit at `HEAD`, not from the working tree: only committed desired
//! state runs. When `HEAD` has not moved (a `stat` of four files in `.git`, see
//! [`super::repo::Fingerprint`]) and no order is open, a pulse reads nothing else.

use super::repo::{Entry, Fingerprint, Repo};
use super::Author;
use crate::App;
use muster_core::orders::{self, check_progress, number_lines, OrderLine, Progress};
use muster_core::spec::{build_tree, JobSpec};
use muster_core::{TreeState, Ts, Uuid};
use muster_store::{Created, Docs, Version};
use muster_wire::util::now;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

/// The largest orders file read, in bytes; a larger one is reported and nothing of it runs.
pub const MAX_FILE: u64 = 16 << 20;

/// The workspace the trees of cluster-wide orders are tagged with.
pub const ORDERS_WORKSPACE: &str = "hq";

/// Which orders files a verb is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// `deployer/orders`.
    Deployer,
    /// `<workspace>/models/<Model>/orders`.
    Model,
}

impl Scope {
    /// The scope of an orders file at `path` in HQ, if it is one.
    pub fn of(path: &str) -> Option<Scope> {
        if path == "deployer/orders" {
            return Some(Scope::Deployer);
        }
        let p: Vec<&str> = path.split('/').collect();
        (p.len() == 4 && p[1] == "models" && p[3] == "orders").then_some(Scope::Model)
    }
}

/// Where an order is, for a verb planning it.
#[derive(Clone, Debug)]
pub struct OrderAt<'a> {
    /// The orders file, relative to HQ.
    pub file: &'a str,
    pub line: u32,
}

/// One verb of the orders grammar.
pub trait Verb: Send + Sync {
    /// The job tree that carries out `line`; `Err` rejects the order with the reason (nothing
    /// runs). Called once per order, before it is recorded as pending.
    fn plan(&self, app: &App, at: &OrderAt<'_>, line: &OrderLine) -> Result<JobSpec, String>;
}

/// The verbs by scope: this issue's `noop` and `script` for `deployer/orders`; later parts
/// register theirs (`apply`, `deploy`, `revert`, `delete`) before the server leads.
#[derive(Default)]
pub struct Verbs {
    map: RwLock<BTreeMap<(Scope, String), Arc<dyn Verb>>>,
}

impl Verbs {
    /// Registers `verb` under `name` for the orders files of `scope`.
    pub fn register(&self, scope: Scope, name: &str, verb: Arc<dyn Verb>) {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert((scope, name.to_string()), verb);
    }

    fn get(&self, scope: Scope, name: &str) -> Option<Arc<dyn Verb>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(scope, name.to_string()))
            .cloned()
    }

    /// The verbs of `scope`, sorted.
    pub fn names(&self, scope: Scope) -> Vec<String> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|(s, _)| *s == scope)
            .map(|(_, n)| n.clone())
            .collect()
    }
}

/// `noop`: a tree of one job that does nothing (for tests and benchmarks).
pub struct Noop;

impl Verb for Noop {
    fn plan(&self, _: &App, at: &OrderAt<'_>, line: &OrderLine) -> Result<JobSpec, String> {
        if !line.words.is_empty() || !line.params.is_empty() || !line.args.is_empty() {
            return Err("noop takes nothing".into());
        }
        Ok(JobSpec {
            name: format!("order {}:{} noop", at.file, at.line),
            noop: true,
            ..Default::default()
        })
    }
}

/// `script NAME [KEY=VALUE ...] [-- ARGS]`: runs HQ `scripts/NAME` with `ARGS` on every ready
/// node whose labels match the `KEY=VALUE`s.
pub struct Script;

impl Verb for Script {
    fn plan(&self, app: &App, at: &OrderAt<'_>, line: &OrderLine) -> Result<JobSpec, String> {
        let [name] = line.words.as_slice() else {
            return Err("usage: script NAME [KEY=VALUE ...] [-- ARGS]".into());
        };
        let text = super::scripts::read(&app.hq, name).map_err(|e| e.to_string())?;
        let nodes = super::scripts::targets(&*app.store, &line.params)
            .map_err(|e| format!("cannot list the nodes: {e}"))?;
        if nodes.is_empty() {
            return Err(format!("no ready node matches {:?}", line.params));
        }
        let mut spec = super::scripts::tree(name, &text, &line.args, &nodes);
        spec.name = format!("order {}:{} script {name}", at.file, at.line);
        Ok(spec)
    }
}

/// Registers this module's verbs.
pub fn register_builtin(verbs: &Verbs) {
    verbs.register(Scope::Deployer, "noop", Arc::new(Noop));
    verbs.register(Scope::Deployer, "script", Arc::new(Script));
}

/// An order's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Rejected,
}

impl OrderState {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::Pending => "pending",
            OrderState::Running => "running",
            OrderState::Succeeded => "succeeded",
            OrderState::Failed => "failed",
            OrderState::Rejected => "rejected",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<OrderState> {
        [
            OrderState::Pending,
            OrderState::Running,
            OrderState::Succeeded,
            OrderState::Failed,
            OrderState::Rejected,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }

    fn finished(self) -> bool {
        matches!(
            self,
            OrderState::Succeeded | OrderState::Failed | OrderState::Rejected
        )
    }
}

/// One order as recorded (document kind `hq_order`, key `<file>#<line, 8 digits>`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Order {
    pub file: String,
    pub line: u32,
    pub text: String,
    /// The identity's digest ([`muster_core::orders::OrderId::digest`]).
    pub digest: String,
    pub state: OrderState,
    pub tree: Option<Uuid>,
    pub created_at: Ts,
    pub started_at: Option<Ts>,
    pub finished_at: Option<Ts>,
    pub message: String,
    /// The tree to make, kept while pending (so a repeat after a crash makes the same one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<JobSpec>,
    /// Whether the outcome is in `orders.log`.
    #[serde(default)]
    pub logged: bool,
}

/// Where an orders file stands (document kind `hq_orders_file`, key the file's path).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OrdersFile {
    /// How many of its lines are processed (recorded as orders, or no orders).
    pub processed: u32,
    /// The hash of those lines ([`muster_core::orders::Numbered::through_hash`]).
    pub through_hash: String,
    /// The line of the order in flight (recorded, not yet ended and logged).
    pub open: Option<u32>,
    /// Why nothing of the file runs until an admin resolves it.
    pub stopped: Option<String>,
}

pub const ORDERS: Docs<Order> = Docs::new("hq_order");
pub const FILES: Docs<OrdersFile> = Docs::new("hq_orders_file");

/// The document key of the order at `file`, `line`.
pub fn order_key(file: &str, line: u32) -> String {
    format!("{file}#{line:08}")
}

type Res<T> = Result<T, String>;

fn store_err(e: muster_store::StoreError) -> String {
    format!("the store: {e}")
}

/// The orders watcher's memory: what `HEAD` was, the blob of each orders file, and each file's
/// document as last written (the leader is their only writer; a compare-and-set that fails
/// makes it read them again).
#[derive(Default)]
pub struct OrdersWatcher {
    fingerprint: Option<Fingerprint>,
    head: Option<String>,
    blobs: BTreeMap<String, Entry>,
    files: HashMap<String, (OrdersFile, Option<Version>)>,
    problems: BTreeMap<String, String>,
    layout: Vec<String>,
}

impl super::Watcher for OrdersWatcher {
    fn name(&self) -> &'static str {
        "orders"
    }

    fn run(&mut self, app: &Arc<App>, tick: &super::pulse::Tick) -> Result<String, String> {
        let Some(repo) = app.hq.repo() else {
            return Err("HQ is not open".into());
        };
        if !tick.continued {
            *self = OrdersWatcher::default();
        }
        let res = self.pulse(app, &repo);
        if res.is_err() {
            // Read everything again next time: a failed write may have left memory ahead.
            self.files.clear();
            self.fingerprint = None;
            self.head = None;
            self.blobs.clear();
        }
        let mut problems = self.layout.clone();
        problems.extend(self.problems.values().cloned());
        app.hq.set_problems("orders", problems);
        res
    }
}

impl OrdersWatcher {
    fn pulse(&mut self, app: &Arc<App>, repo: &Repo) -> Res<String> {
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        let first = self.head.is_none() && self.files.is_empty();
        let fp = repo.fingerprint();
        if self.fingerprint.as_ref() != Some(&fp) {
            let head = repo.head()?;
            let id = head.as_ref().map(|c| c.id.clone());
            app.hq.set_head(head);
            if id != self.head {
                let entries = repo.ls_tree()?;
                self.layout = layout_problems(repo, &entries);
                let mut seen = BTreeMap::new();
                for e in entries {
                    let Some(scope) = Scope::of(&e.path) else {
                        continue;
                    };
                    if app.hq.verbs().names(scope).is_empty() {
                        continue;
                    }
                    if self.blobs.get(&e.path).map(|b| &b.oid) != Some(&e.oid) {
                        dirty.insert(e.path.clone());
                    }
                    seen.insert(e.path.clone(), e);
                }
                for gone in self.blobs.keys() {
                    if !seen.contains_key(gone) {
                        dirty.insert(gone.clone());
                    }
                }
                self.blobs = seen;
                self.head = id;
            }
            self.fingerprint = Some(fp);
        }
        if first {
            for (file, doc, v) in FILES.list(&*app.store, "").map_err(store_err)? {
                dirty.insert(file.clone());
                self.files.insert(file, (doc, Some(v)));
            }
        }
        let mut did = Vec::new();
        for file in app.hq.take_resolved() {
            self.resolve(app, repo, &file)?;
            did.push(format!("{file} resolved"));
            dirty.insert(file);
        }
        let open: Vec<String> = self
            .files
            .iter()
            .filter(|(_, (d, _))| d.open.is_some())
            .map(|(f, _)| f.clone())
            .collect();
        for file in open {
            if self.check_open(app, repo, &file, &mut did)? {
                dirty.insert(file);
            }
        }
        for file in dirty {
            self.advance(app, repo, &file, &mut did)?;
        }
        Ok(if did.is_empty() {
            "nothing new".into()
        } else {
            did.join("; ")
        })
    }

    /// The file's document (from memory, else the store).
    fn file_doc(&mut self, app: &App, file: &str) -> Res<(OrdersFile, Option<Version>)> {
        if let Some(d) = self.files.get(file) {
            return Ok(d.clone());
        }
        let d = match FILES.get(&*app.store, file).map_err(store_err)? {
            Some((d, v)) => (d, Some(v)),
            None => (
                OrdersFile {
                    through_hash: orders::empty_prefix_hash(),
                    ..Default::default()
                },
                None,
            ),
        };
        self.files.insert(file.to_string(), d.clone());
        Ok(d)
    }

    /// Writes the file's document by compare-and-set on the version last seen.
    fn put_file(&mut self, app: &App, file: &str, doc: OrdersFile, v: Option<Version>) -> Res<()> {
        let written = match v {
            Some(v) => FILES.put_if(&*app.store, file, &doc, v),
            None => FILES.create(&*app.store, file, &doc),
        }
        .map_err(store_err)?;
        match written {
            Some(v) => {
                self.files.insert(file.to_string(), (doc, Some(v)));
                Ok(())
            }
            None => {
                self.files.remove(file);
                Err(format!(
                    "the record of {file} changed under this server (another server leads?); read again next pulse"
                ))
            }
        }
    }

    /// The file's content at HEAD ("" when it is gone), or why it cannot be read.
    fn content(&self, repo: &Repo, file: &str) -> Res<String> {
        let Some(e) = self.blobs.get(file) else {
            return Ok(String::new());
        };
        if e.is_symlink() {
            return Err(format!(
                "{file} is a symlink; orders files are never followed"
            ));
        }
        if e.kind != "blob" {
            return Err(format!("{file} is not a file"));
        }
        let bytes = repo
            .blob(&e.oid, MAX_FILE)
            .map_err(|m| format!("{file} is not read: {m}; nothing of it runs"))?;
        String::from_utf8(bytes)
            .map_err(|_| format!("{file} is not UTF-8 text; nothing of it runs"))
    }

    fn resolve(&mut self, app: &App, repo: &Repo, file: &str) -> Res<()> {
        let (mut doc, v) = self.file_doc(app, file)?;
        let text = self.content(repo, file)?;
        let lines = number_lines(file, &text);
        let keep = (doc.processed as usize).min(lines.len());
        doc.processed = keep as u32;
        doc.through_hash = if keep == 0 {
            orders::empty_prefix_hash()
        } else {
            lines[keep - 1].through_hash.clone()
        };
        doc.stopped = None;
        tracing::info!("HQ orders: {file} resolved; its first {keep} lines count as processed");
        self.problems.remove(file);
        self.put_file(app, file, doc, v)
    }

    /// Looks at the open order of `file`; answers whether the file may go on.
    fn check_open(
        &mut self,
        app: &App,
        repo: &Repo,
        file: &str,
        did: &mut Vec<String>,
    ) -> Res<bool> {
        let (doc, v) = self.file_doc(app, file)?;
        let Some(line) = doc.open else {
            return Ok(true);
        };
        let key = order_key(file, line);
        let Some((order, _)) = ORDERS.get(&*app.store, &key).map_err(store_err)? else {
            // Recorded open but never written: the order document write is first, so this
            // cannot be; clear the mark rather than stall the file.
            let mut d = doc;
            d.open = None;
            self.put_file(app, file, d, v)?;
            return Ok(true);
        };
        let order = match order.state {
            OrderState::Pending => {
                let o = launch(app, &key)?;
                did.push(format!("{file}:{line} started"));
                o
            }
            OrderState::Running => {
                let Some(o) = finish_if_ended(app, &key, &order)? else {
                    return Ok(false);
                };
                o
            }
            _ => order,
        };
        if !order.state.finished() {
            return Ok(false);
        }
        log_outcome(app, repo, &key, &order)?;
        did.push(format!("{file}:{line} {}", order.state.as_str()));
        let mut d = doc;
        d.open = None;
        self.put_file(app, file, d, v)?;
        Ok(true)
    }

    /// Processes the new lines of `file`, up to and including the next order that runs.
    fn advance(&mut self, app: &App, repo: &Repo, file: &str, did: &mut Vec<String>) -> Res<()> {
        let Some(scope) = Scope::of(file) else {
            return Ok(());
        };
        let (doc, v) = self.file_doc(app, file)?;
        if let Some(why) = &doc.stopped {
            self.problems.insert(
                file.to_string(),
                format!("{file} is stopped: {why}; nothing of it runs until an admin runs `muster hq orders resolve {file}`"),
            );
            return Ok(());
        }
        if doc.open.is_some() {
            return Ok(());
        }
        let text = match self.content(repo, file) {
            Ok(t) => t,
            Err(m) => {
                self.problems.insert(file.to_string(), m);
                return Ok(());
            }
        };
        self.problems.remove(file);
        let lines = number_lines(file, &text);
        if let Progress::Edited(why) =
            check_progress(&lines, doc.processed as usize, &doc.through_hash)
        {
            tracing::warn!("HQ orders: {file} stopped: {why}");
            app.alerts.send(
                "hq_orders_stopped",
                serde_json::json!({"file": file, "reason": why}),
            );
            self.problems.insert(
                file.to_string(),
                format!("{file} is stopped: {why}; nothing of it runs until an admin runs `muster hq orders resolve {file}`"),
            );
            let mut d = doc;
            d.stopped = Some(why);
            return self.put_file(app, file, d, v);
        }
        let mut d = doc.clone();
        let mut v = v;
        let mut rejected: Vec<(String, Order)> = Vec::new();
        for l in &lines[doc.processed as usize..] {
            let parsed = match orders::parse_line(l.text) {
                Ok(None) => {
                    d.processed = l.id.line;
                    d.through_hash = l.through_hash.clone();
                    continue;
                }
                Ok(Some(p)) => Ok(p),
                Err(why) => Err(format!("malformed: {why}")),
            };
            let at = OrderAt {
                file,
                line: l.id.line,
            };
            let planned = parsed.and_then(|p| match app.hq.verbs().get(scope, &p.verb) {
                None => Err(format!(
                    "unknown verb {:?} (here: {})",
                    p.verb,
                    app.hq.verbs().names(scope).join(", ")
                )),
                Some(verb) => verb.plan(app, &at, &p),
            });
            let key = order_key(file, l.id.line);
            let text: String = l.text.chars().take(orders::MAX_LINE).collect();
            let t = now();
            let mut order = Order {
                file: file.to_string(),
                line: l.id.line,
                text,
                digest: l.id.digest(),
                state: OrderState::Pending,
                tree: None,
                created_at: t,
                started_at: None,
                finished_at: None,
                message: String::new(),
                plan: None,
                logged: false,
            };
            match planned {
                Ok(mut spec) => {
                    let mut tags = spec.tags.clone().unwrap_or_default();
                    if tags.workspace.is_empty() {
                        tags.workspace = ORDERS_WORKSPACE.into();
                    }
                    spec.tags = Some(tags);
                    order.plan = Some(spec);
                }
                Err(why) => {
                    order.state = OrderState::Rejected;
                    order.finished_at = Some(t);
                    order.message = why;
                }
            }
            // 1. The identity, recorded before anything runs.
            let order = record(app, &key, order)?;
            if order.state == OrderState::Rejected {
                rejected.push((key, order));
                d.processed = l.id.line;
                d.through_hash = l.through_hash.clone();
                continue;
            }
            // (The rejected ones before it are logged first, in one commit.)
            if !rejected.is_empty() {
                did.push(format!("{file}: {} rejected", rejected.len()));
                log_outcomes(app, repo, &std::mem::take(&mut rejected))?;
            }
            // 2. The file moves past it, with it open.
            d.processed = l.id.line;
            d.through_hash = l.through_hash.clone();
            d.open = Some(l.id.line);
            self.put_file(app, file, d.clone(), v)?;
            // 3. Its tree, once whoever does this.
            if order.state == OrderState::Pending {
                launch(app, &key)?;
                did.push(format!("{file}:{} started", l.id.line));
            }
            return Ok(());
        }
        if !rejected.is_empty() {
            did.push(format!("{file}: {} rejected", rejected.len()));
            log_outcomes(app, repo, &rejected)?;
        }
        if d.processed != doc.processed {
            self.put_file(app, file, d, v.take())?;
        }
        Ok(())
    }
}

/// A test aid for the crash tests: with `MUSTER_TEST_KILL_AT` naming this point
/// (`order_tree_made`, `order_before_outcome`), the process sends itself SIGKILL here — the
/// `kill -9` at the worst moment, made certain rather than raced for.
fn failpoint(name: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("MUSTER_TEST_KILL_AT").ok())
        .as_deref()
        == Some(name)
    {
        tracing::warn!("MUSTER_TEST_KILL_AT={name}: killing this process");
        // SAFETY: kill(2) of our own process.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Records `order` under `key` unless that identity is recorded already (then answers what is
/// recorded). A document of another identity under the key (from before a resolve cut the
/// file) is replaced.
fn record(app: &App, key: &str, order: Order) -> Res<Order> {
    let store = &*app.store;
    if ORDERS
        .create(store, key, &order)
        .map_err(store_err)?
        .is_some()
    {
        return Ok(order);
    }
    match ORDERS.get(store, key).map_err(store_err)? {
        Some((o, _)) if o.digest == order.digest => Ok(o),
        Some((_, v)) => match ORDERS.put_if(store, key, &order, v).map_err(store_err)? {
            Some(_) => Ok(order),
            None => Err(format!(
                "the order {key} changed under this server; read again next pulse"
            )),
        },
        None => Err(format!("the order {key} vanished; read again next pulse")),
    }
}

/// Makes the tree of the pending order under `key` (by its idempotency key: the same tree
/// however often this runs) and records it running.
fn launch(app: &App, key: &str) -> Res<Order> {
    let Some((order, _)) = ORDERS.get(&*app.store, key).map_err(store_err)? else {
        return Err(format!("the order {key} vanished"));
    };
    if order.state != OrderState::Pending {
        return Ok(order);
    }
    let Some(spec) = order.plan.clone() else {
        return Err(format!("the pending order {key} has no plan"));
    };
    let idem = muster_core::orders::idempotency_key(&order.digest);
    let tree = match build_tree(
        &spec,
        ORDERS_WORKSPACE,
        Some("hq"),
        now(),
        &mut Uuid::now_v7,
    ) {
        Ok(mut new) => {
            new.tree.admin = true;
            let tid = new.tree.id;
            let created = tokio::runtime::Handle::current()
                .block_on(app.manager.create(new, Some(idem)))
                .map_err(|e| format!("cannot make the tree of {key}: {e}"))?;
            failpoint("order_tree_made");
            Ok(match created {
                Created::New => tid,
                Created::Existing(t) => t,
            })
        }
        Err(why) => Err(why),
    };
    let res = ORDERS
        .update(&*app.store, key, |o| {
            let mut o = o?;
            if o.state != OrderState::Pending {
                return None;
            }
            o.plan = None;
            match &tree {
                Ok(t) => {
                    o.state = OrderState::Running;
                    o.tree = Some(*t);
                    o.started_at = Some(now());
                }
                Err(why) => {
                    o.state = OrderState::Rejected;
                    o.finished_at = Some(now());
                    o.message = format!("its tree is not valid: {why}");
                }
            }
            Some(o)
        })
        .map_err(store_err)?;
    match res {
        Some((o, _)) => Ok(o),
        None => ORDERS
            .get(&*app.store, key)
            .map_err(store_err)?
            .map(|(o, _)| o)
            .ok_or_else(|| format!("the order {key} vanished")),
    }
}

/// When the running order's tree has ended, records its outcome; `None` while it runs.
fn finish_if_ended(app: &App, key: &str, order: &Order) -> Res<Option<Order>> {
    let Some(tid) = order.tree else {
        return Err(format!("the running order {key} has no tree"));
    };
    let tree = app.store.tree(tid).map_err(store_err)?;
    let (state, message) = match tree {
        None => (OrderState::Failed, "its tree is gone".to_string()),
        Some(t) => match t.state {
            TreeState::Running => return Ok(None),
            TreeState::Succeeded => (OrderState::Succeeded, String::new()),
            s => (OrderState::Failed, format!("its tree {}", s.as_str())),
        },
    };
    failpoint("order_before_outcome");
    let res = ORDERS
        .update(&*app.store, key, |o| {
            let mut o = o?;
            if o.state != OrderState::Running {
                return None;
            }
            o.state = state;
            o.finished_at = Some(now());
            o.message = message.clone();
            Some(o)
        })
        .map_err(store_err)?;
    Ok(match res {
        Some((o, _)) => Some(o),
        None => ORDERS
            .get(&*app.store, key)
            .map_err(store_err)?
            .map(|(o, _)| o),
    })
}

/// Appends the finished order's outcome to the `orders.log` beside its file and commits it
/// (unless a line of that order is there already: a repeat after a crash), then marks it logged.
fn log_outcome(app: &App, repo: &Repo, key: &str, order: &Order) -> Res<()> {
    log_outcomes(app, repo, &[(key.to_string(), order.clone())])
}

/// [`log_outcome`] for several finished orders of one file, in one commit.
fn log_outcomes(app: &App, _repo: &Repo, orders: &[(String, Order)]) -> Res<()> {
    let todo: Vec<&(String, Order)> = orders.iter().filter(|(_, o)| !o.logged).collect();
    let Some((_, first)) = todo.first() else {
        return Ok(());
    };
    let dir = std::path::Path::new(&first.file)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let log = if dir.is_empty() {
        "orders.log".to_string()
    } else {
        format!("{dir}/orders.log")
    };
    let lines: Vec<(String, String)> = todo
        .iter()
        .map(|(_, order)| {
            let tag = format!("order={}", &order.digest[..16.min(order.digest.len())]);
            let line = format!(
                "{} line {} {} tree={} {tag} {}{}\n",
                order.finished_at.unwrap_or_else(now),
                order.line,
                order.state.as_str(),
                order
                    .tree
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "-".into()),
                order.text,
                if order.message.is_empty() {
                    String::new()
                } else {
                    format!(" -- {}", order.message.replace('\n', " "))
                }
            );
            (tag, line)
        })
        .collect();
    let message = if todo.len() == 1 {
        format!(
            "orders: {} line {} {}",
            first.file,
            first.line,
            first.state.as_str()
        )
    } else {
        format!(
            "orders: {} lines {}-{}: {} outcomes",
            first.file,
            first.line,
            todo[todo.len() - 1].1.line,
            todo.len()
        )
    };
    let log2 = log.clone();
    app.hq
        .commit(&[&log], &message, &Author::server(), move |root| {
            use std::io::Write;
            let p = root.join(&log2);
            let have = std::fs::read_to_string(&p).unwrap_or_default();
            let mut add = String::new();
            if !have.is_empty() && !have.ends_with('\n') {
                add.push('\n');
            }
            for (tag, line) in &lines {
                if !have.contains(tag.as_str()) {
                    add.push_str(line);
                }
            }
            if add.trim().is_empty() {
                return Ok(());
            }
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(|e| e.to_string())?;
            f.write_all(add.as_bytes()).map_err(|e| e.to_string())
        })?;
    for (key, _) in todo {
        ORDERS
            .update(&*app.store, key, |o| {
                let mut o = o?;
                (!o.logged).then(|| {
                    o.logged = true;
                    o
                })
            })
            .map_err(store_err)?;
    }
    Ok(())
}

/// What is wrong in HQ's layout at HEAD: a reserved directory that is not one, a top-level
/// directory whose name no workspace may have, a symlink pointing outside HQ.
pub fn layout_problems(repo: &Repo, entries: &[Entry]) -> Vec<String> {
    let mut out = Vec::new();
    for e in entries {
        let top = !e.path.contains('/');
        if top && super::repo::RESERVED_DIRS.contains(&e.path.as_str()) {
            if e.kind != "tree" {
                out.push(format!(
                    "{} must be a directory but is a file; nothing in it is read",
                    e.path
                ));
            }
            continue;
        }
        if top && e.kind == "tree" && !e.path.starts_with('.') {
            if let Err(why) = muster_core::names::check_name("workspace", &e.path) {
                out.push(format!("directory {}/ is ignored: {why}", e.path));
            }
        }
        if e.is_symlink() {
            let target = repo
                .blob(&e.oid, 4096)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            if escapes(&e.path, &target) {
                out.push(format!(
                    "{} is a symlink pointing outside HQ; it is not followed",
                    e.path
                ));
            }
        }
    }
    out
}

/// Whether a symlink at `path` (relative to HQ) to `target` leads outside HQ.
fn escapes(path: &str, target: &str) -> bool {
    if target.starts_with('/') {
        return true;
    }
    let mut depth: i64 = path.matches('/').count() as i64;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_symlinks() {
        assert_eq!(Scope::of("deployer/orders"), Some(Scope::Deployer));
        assert_eq!(Scope::of("acme/models/Iris/orders"), Some(Scope::Model));
        assert_eq!(Scope::of("acme/models/Iris/orders.log"), None);
        assert_eq!(Scope::of("deployer/orders.log"), None);
        assert!(escapes("scripts/x", "/etc/passwd"));
        assert!(escapes("scripts/x", "../../x"));
        assert!(!escapes("scripts/x", "../README.md"));
        assert!(!escapes("scripts/x", "y"));
    }
}
