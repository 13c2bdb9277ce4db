//! The predict path (SPEC §8): which replica answers a call, and the call itself.
//!
//! [`Routes`] is this server's table of every model's live version and, per version, its ready
//! replicas (healthy predictor processes with an address). It is rebuilt for one model from the
//! store when that model or one of its predictors changes (the store's events, from any server
//! of a cluster) and for all of them every few seconds, never on the request path: a call reads
//! the table under a read lock, takes the replica with the fewest calls in flight that is
//! under `[models] replica_max_inflight`, and counts itself in flight there — in the same
//! critical section, so once a switch has replaced the table, the drain step's count of the
//! old version's calls misses none. Every replica full: refused at once (503 + `Retry-After`).
//!
//! Calls go to the predictor's `POST /predict` over kept-alive HTTP/1.1 connections (a small
//! pool per replica). A call that got no answer (connection refused or closed: the replica
//! stopped, say) is sent once more to another replica, since predict is idempotent.

use super::{Models, VersionState};
use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use muster_core::process::ProcState;
use muster_core::Uuid;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Latency buckets: upper bounds in microseconds, growing by half each (50 µs to ~10 min).
const BUCKETS: usize = 48;

fn bucket_bound(i: usize) -> f64 {
    50.0 * 1.5f64.powi(i as i32)
}

/// A latency histogram (lock-free counts).
pub struct Latency {
    counts: [AtomicU64; BUCKETS],
    total: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            total: AtomicU64::new(0),
        }
    }
}

impl Latency {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros() as f64;
        let i = (0..BUCKETS)
            .find(|&i| us <= bucket_bound(i))
            .unwrap_or(BUCKETS - 1);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// The `q` quantile in milliseconds (the bucket's upper bound), `None` before any call.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.total.load(Ordering::Relaxed);
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for i in 0..BUCKETS {
            seen += self.counts[i].load(Ordering::Relaxed);
            if seen >= want {
                return Some((bucket_bound(i) / 1000.0 * 100.0).round() / 100.0);
            }
        }
        Some(bucket_bound(BUCKETS - 1) / 1000.0)
    }
}

/// One replica: a predictor process the server can call.
pub struct Replica {
    pub process: Uuid,
    pub gen: u32,
    /// `host:port` of its `/predict`.
    pub addr: String,
    pub node: Option<String>,
    inflight: AtomicUsize,
    conns: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub latency: Latency,
}

impl Replica {
    fn new(process: Uuid, gen: u32, addr: String, node: Option<String>) -> Replica {
        Replica {
            process,
            gen,
            addr,
            node,
            inflight: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Latency::default(),
        }
    }

    /// A replica outside the table, for one check (the deploy's health step).
    pub fn probe(process: Uuid, addr: String) -> Replica {
        Replica::new(process, 0, addr, None)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    fn idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut c = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(s) = c.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put_back(&self, s: SendRequest<Full<Bytes>>) {
        let mut c = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() < 256 {
            c.push(s);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&self.addr),
        )
        .await
        .map_err(|_| "connecting timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let (tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(tx)
    }

    /// `method path` with `body`; `Err(true)` when no answer came (safe to send elsewhere).
    pub async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Bytes,
    ) -> Result<Reply, (bool, String)> {
        let mut sender = match self.idle() {
            Some(s) => s,
            None => self.connect().await.map_err(|e| (true, e))?,
        };
        if sender.ready().await.is_err() {
            sender = self.connect().await.map_err(|e| (true, e))?;
        }
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.addr)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| (false, e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| (true, e.to_string()))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| (false, e.to_string()))?
            .to_bytes();
        self.put_back(sender);
        Ok(Reply {
            status,
            body,
            retry_after,
        })
    }
}

/// A predictor's answer.
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    pub retry_after: Option<String>,
}

/// One version's replicas, and its calls in flight on this server.
struct VersionRoute {
    replicas: Vec<Arc<Replica>>,
    inflight: Arc<AtomicUsize>,
}

struct ModelRoute {
    /// The model document's version it was built from: an older read never replaces it.
    doc: muster_store::Version,
    live: Option<u32>,
    versions: HashMap<u32, VersionRoute>,
}

/// A call counted in flight on a replica (and its version) until dropped.
pub struct Lease {
    pub replica: Arc<Replica>,
    pub version: u32,
    version_inflight: Arc<AtomicUsize>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.replica.inflight.fetch_sub(1, Ordering::SeqCst);
        self.version_inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why no replica was picked.
#[derive(Debug, PartialEq, Eq)]
pub enum NoRoute {
    /// No such model here (or deleted).
    Model,
    /// The model has no live version (its first deploy has not switched yet).
    NotLive,
    /// That version is not running (a kept version whose predictors are stopped, say).
    Version(u32),
    /// The version has no ready replica now.
    NoReplica(u32),
    /// Every ready replica has `replica_max_inflight` calls in flight.
    Full(u32),
}

/// The table (see the module doc).
pub struct Routes {
    max_inflight: usize,
    table: RwLock<HashMap<String, ModelRoute>>,
    /// Calls in flight per (model, version), kept across rebuilds of the table.
    counters: Mutex<HashMap<(String, u32), Arc<AtomicUsize>>>,
    /// Replicas by process, kept across rebuilds (their connections and statistics).
    replicas: Mutex<HashMap<Uuid, Arc<Replica>>>,
}

/// What `GET /api/v1/models/{ws}/{model}` shows of a replica.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaView {
    pub process: Uuid,
    pub version: u32,
    pub node: Option<String>,
    pub state: String,
    pub address: Option<String>,
    pub inflight: usize,
    pub requests: u64,
    pub errors: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Routes {
    pub fn new(max_inflight: usize) -> Routes {
        Routes {
            max_inflight,
            table: RwLock::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
            replicas: Mutex::new(HashMap::new()),
        }
    }

    fn counter(&self, key: &str, v: u32) -> Arc<AtomicUsize> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((key.to_string(), v))
            .or_default()
            .clone()
    }

    /// Calls in flight on this server to version `v` of `ws/name`.
    pub fn inflight(&self, ws: &str, name: &str, v: u32) -> usize {
        self.counter(&super::key(ws, name), v)
            .load(Ordering::SeqCst)
    }

    /// The replica stats of a process, if this server has called it.
    pub fn replica(&self, id: Uuid) -> Option<Arc<Replica>> {
        self.replicas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Picks the replica for a call to `ws/name` (its live version, or `version`), counted in
    /// flight until the lease drops; `skip` is a replica that just failed this call.
    pub fn pick(
        &self,
        ws: &str,
        name: &str,
        version: Option<u32>,
        skip: Option<Uuid>,
    ) -> Result<Lease, NoRoute> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let m = table.get(&super::key(ws, name)).ok_or(NoRoute::Model)?;
        let v = match version {
            Some(v) => v,
            None => m.live.ok_or(NoRoute::NotLive)?,
        };
        let vr = m.versions.get(&v).ok_or(NoRoute::Version(v))?;
        let mut candidates = vr
            .replicas
            .iter()
            .filter(|r| Some(r.process) != skip)
            .peekable();
        if candidates.peek().is_none() {
            return Err(NoRoute::NoReplica(v));
        }
        let best = candidates
            .filter(|r| r.inflight() < self.max_inflight)
            .min_by_key(|r| r.inflight())
            .ok_or(NoRoute::Full(v))?;
        best.inflight.fetch_add(1, Ordering::SeqCst);
        vr.inflight.fetch_add(1, Ordering::SeqCst);
        Ok(Lease {
            replica: best.clone(),
            version: v,
            version_inflight: vr.inflight.clone(),
        })
    }

    /// Rebuilds the routes of one model from the store (blocking).
    pub fn refresh_model(&self, models: &Models, ws: &str, name: &str) {
        let key = super::key(ws, name);
        let route = match super::MODELS.get(models.store(), &key) {
            Ok(Some((m, doc))) if !m.deleted => Some(self.build(models, &m, doc)),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("cannot refresh the routes of {key}: {e}");
                return;
            }
        };
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        match route {
            Some(r) => {
                if t.get(&key).is_none_or(|old| old.doc <= r.doc) {
                    t.insert(key, r);
                }
            }
            None => {
                t.remove(&key);
            }
        }
    }

    /// Rebuilds every model's routes (blocking): the periodic catch-up.
    pub fn refresh_all(&self, models: &Models) {
        let all = match super::MODELS.list(models.store(), "") {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("cannot refresh the predict routes: {e}");
                return;
            }
        };
        let mut built = HashMap::new();
        let mut gone = HashMap::new();
        for (k, m, doc) in all {
            if m.deleted {
                gone.insert(k, doc);
            } else {
                built.insert(k, self.build(models, &m, doc));
            }
        }
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        // A model changed since this pass read it keeps its newer routes.
        t.retain(|k, old| gone.get(k).is_none_or(|doc| *doc < old.doc));
        for (k, r) in built {
            if t.get(&k).is_none_or(|old| old.doc <= r.doc) {
                t.insert(k, r);
            }
        }
    }

    fn build(&self, models: &Models, m: &super::Model, doc: muster_store::Version) -> ModelRoute {
        let key = m.key();
        let mut versions = HashMap::new();
        for v in &m.versions {
            if matches!(v.state, VersionState::Failed | VersionState::Retired) {
                continue;
            }
            let mut replicas = Vec::new();
            for id in &v.processes {
                let Ok(Some(p)) = models.processes().get(*id) else {
                    continue;
                };
                let (Some(host), Some(port)) = (&p.address, p.ports.get("http")) else {
                    continue;
                };
                if p.state != ProcState::Healthy {
                    continue;
                }
                let addr = if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                let mut known = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
                let r = match known.get(id) {
                    Some(r) if r.addr == addr && r.gen == p.gen => r.clone(),
                    _ => {
                        let r = Arc::new(Replica::new(*id, p.gen, addr, p.node.clone()));
                        known.insert(*id, r.clone());
                        r
                    }
                };
                replicas.push(r);
            }
            if !replicas.is_empty() {
                versions.insert(
                    v.version,
                    VersionRoute {
                        replicas,
                        inflight: self.counter(&key, v.version),
                    },
                );
            }
        }
        ModelRoute {
            doc,
            live: m.live,
            versions,
        }
    }

    /// The replicas of a model's versions, as shown (blocking: reads the processes).
    pub fn views(&self, models: &Models, m: &super::Model) -> Vec<ReplicaView> {
        let mut out = Vec::new();
        for v in &m.versions {
            for id in &v.processes {
                let Ok(Some(p)) = models.processes().get(*id) else {
                    continue;
                };
                let r = self.replica(*id);
                let address = match (&p.address, p.ports.get("http")) {
                    (Some(h), Some(port)) => Some(format!("{h}:{port}")),
                    _ => None,
                };
                out.push(ReplicaView {
                    process: *id,
                    version: v.version,
                    node: p.node.clone(),
                    state: p.state.as_str().to_string(),
                    address,
                    inflight: r.as_ref().map_or(0, |r| r.inflight()),
                    requests: r.as_ref().map_or(0, |r| r.requests.load(Ordering::Relaxed)),
                    errors: r.as_ref().map_or(0, |r| r.errors.load(Ordering::Relaxed)),
                    p50_ms: r.as_ref().and_then(|r| r.latency.quantile_ms(0.5)),
                    p99_ms: r.as_ref().and_then(|r| r.latency.quantile_ms(0.99)),
                });
            }
        }
        out
    }
}

/// The outcome of a predict call.
pub enum Predicted {
    /// The predictor answered (any status), with the version that did.
    Answer { version: u32, reply: Reply },
    /// No replica could take it.
    NoRoute(NoRoute),
    /// No answer within the timeout.
    Timeout(u32),
    /// The predictors could not be reached (twice).
    Failed(u32, String),
}

impl Predicted {
    /// The version that answered or was asked (0: none).
    pub fn version(&self) -> u32 {
        match self {
            Predicted::Answer { version, .. } | Predicted::Timeout(version) => *version,
            Predicted::Failed(v, _) => *v,
            Predicted::NoRoute(NoRoute::Version(v) | NoRoute::NoReplica(v) | NoRoute::Full(v)) => {
                *v
            }
            Predicted::NoRoute(_) => 0,
        }
    }
}

impl Routes {
    /// Calls `POST /predict` with `body` on a replica of `ws/name` (see the module doc).
    pub async fn predict(
        &self,
        ws: &str,
        name: &str,
        version: Option<u32>,
        body: Bytes,
        timeout: Duration,
    ) -> Predicted {
        let t0 = Instant::now();
        let mut skip = None;
        let mut last_error = String::new();
        for _ in 0..2 {
            let lease = match self.pick(ws, name, version, skip) {
                Ok(l) => l,
                Err(NoRoute::NoReplica(v)) if skip.is_some() => {
                    return Predicted::Failed(v, last_error);
                }
                Err(e) => return Predicted::NoRoute(e),
            };
            let r = lease.replica.clone();
            let left = timeout.saturating_sub(t0.elapsed());
            let call = r.call(hyper::Method::POST, "/predict", body.clone());
            match tokio::time::timeout(left, call).await {
                Ok(Ok(reply)) => {
                    r.requests.fetch_add(1, Ordering::Relaxed);
                    if reply.status >= 500 {
                        r.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    r.latency.record(t0.elapsed());
                    return Predicted::Answer {
                        version: lease.version,
                        reply,
                    };
                }
                Ok(Err((retry, e))) => {
                    r.errors.fetch_add(1, Ordering::Relaxed);
                    last_error = e;
                    if !retry {
                        return Predicted::Failed(lease.version, last_error);
                    }
                    skip = Some(r.process);
                }
                Err(_) => {
                    r.errors.fetch_add(1, Ordering::Relaxed);
                    return Predicted::Timeout(lease.version);
                }
            }
        }
        Predicted::Failed(version.unwrap_or(0), last_error)
    }
}

/// Keeps this server's routes current: every model changed (any server's event) is rebuilt
/// at once, and all of them every two seconds.
pub async fn run(app: Arc<crate::App>) {
    let mut events = app.store.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let which: Option<(String, String)> = tokio::select! {
            _ = tick.tick() => None,
            ev = events.recv() => match ev {
                Ok(muster_store::Event::Model { workspace, name, .. }) => Some((workspace, name)),
                Ok(muster_store::Event::Process { workspace, name, .. }) => {
                    match predictor_of(&name) {
                        Some(model) => Some((workspace, model)),
                        None => continue,
                    }
                }
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                Err(_) => {
                    events = app.store.subscribe();
                    None
                }
            },
        };
        let models = app.models.clone();
        let _ = tokio::task::spawn_blocking(move || match which {
            Some((ws, name)) => models.routes().refresh_model(&models, &ws, &name),
            None => models.routes().refresh_all(&models),
        })
        .await;
    }
}

/// The model of a predictor process's name (`model WS/NAME vN rR`).
pub fn predictor_of(process_name: &str) -> Option<String> {
    let rest = process_name.strip_prefix("model ")?;
    let (path, _) = rest.split_once(' ')?;
    let (_, name) = path.split_once('/')?;
    Some(name.to_string())
}
