//! Prometheus metrics (`GET /metrics`, text format 0.0.4): requests by route and status, request
//! latency histograms, jobs by state, job start latency, the ready queue's depth, nodes by state.

use crate::App;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram.
#[derive(Default, Clone)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += s;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let l = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{l} {}", self.sum);
        let _ = writeln!(out, "{name}_count{l} {}", self.count);
    }
}

/// Job counters the job manager keeps up to date.
#[derive(Default)]
pub struct JobStats {
    /// Jobs waiting or running now.
    pub waiting: AtomicI64,
    pub running: AtomicI64,
    /// Jobs that ended, by final state, since the server started.
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub aborted: AtomicU64,
    /// Ready jobs waiting for a slot.
    pub queue_depth: AtomicI64,
    /// From "ready" to "started on a node".
    pub start_latency: Mutex<Histogram>,
}

/// The server's metrics.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    pub jobs: Arc<JobStats>,
    /// Beacons heard by the discovery listener.
    pub discovery: Arc<DiscoveryStats>,
    /// Remote logs streamed straight from the node's log endpoint, and relayed over the agent's
    /// connection (no endpoint, or it could not be reached).
    pub log_streams_direct: AtomicU64,
    pub log_streams_relayed: AtomicU64,
}

/// What the discovery listener heard: beacons by verdict, and when each node was last heard.
#[derive(Default)]
pub struct DiscoveryStats {
    pub ok: AtomicU64,
    pub unsigned: AtomicU64,
    pub bad_signature: AtomicU64,
    pub stale: AtomicU64,
    pub replayed: AtomicU64,
    pub malformed: AtomicU64,
    /// node id → the last valid beacon's arrival (Unix ms). A hint, never an identity.
    last_heard: Mutex<BTreeMap<String, i64>>,
}

impl DiscoveryStats {
    /// Records a valid beacon of `node` at `at_ms` (ids beyond 10 000 are not recorded).
    pub fn heard(&self, node: &str, at_ms: i64) {
        let mut m = self.last_heard.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() < 10_000 || m.contains_key(node) {
            m.insert(node.to_string(), at_ms);
        }
    }

    /// When a valid beacon of `node` last arrived (Unix ms).
    pub fn last_heard(&self, node: &str) -> Option<i64> {
        self.last_heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .copied()
    }

    /// `muster_discovery_beacons_total{result=...}`.
    pub fn render(&self) -> String {
        let mut out = String::from("# HELP muster_discovery_beacons_total Discovery beacons heard, by verdict.\n# TYPE muster_discovery_beacons_total counter\n");
        for (k, v) in [
            ("ok", &self.ok),
            ("unsigned", &self.unsigned),
            ("bad_signature", &self.bad_signature),
            ("stale", &self.stale),
            ("replayed", &self.replayed),
            ("malformed", &self.malformed),
        ] {
            let _ = writeln!(
                out,
                "muster_discovery_beacons_total{{result=\"{k}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}

impl Metrics {
    /// Records one HTTP request (`route` is the method and the route pattern).
    pub fn request(&self, route: &str, status: u16, took: Duration) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route.to_string(), status))
            .or_insert(0) += 1;
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(route.to_string())
            .or_default()
            .observe(took);
    }

    /// The text exposition; `nodes` are (state, count).
    pub fn render(&self, nodes: &[(String, u64)]) -> String {
        let mut out = String::new();
        out.push_str("# HELP muster_http_requests_total HTTP requests by route and status.\n# TYPE muster_http_requests_total counter\n");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "muster_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                esc(route)
            );
        }
        out.push_str("# HELP muster_http_request_duration_seconds HTTP request latency by route.\n# TYPE muster_http_request_duration_seconds histogram\n");
        for (route, h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            h.write(
                &mut out,
                "muster_http_request_duration_seconds",
                &format!("route=\"{}\"", esc(route)),
            );
        }
        let j = &self.jobs;
        out.push_str("# HELP muster_jobs Jobs waiting or running now.\n# TYPE muster_jobs gauge\n");
        let _ = writeln!(
            out,
            "muster_jobs{{state=\"waiting\"}} {}",
            j.waiting.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "muster_jobs{{state=\"running\"}} {}",
            j.running.load(Ordering::Relaxed)
        );
        out.push_str("# HELP muster_jobs_finished_total Jobs that ended, by state.\n# TYPE muster_jobs_finished_total counter\n");
        for (s, v) in [
            ("succeeded", &j.succeeded),
            ("failed", &j.failed),
            ("aborted", &j.aborted),
        ] {
            let _ = writeln!(
                out,
                "muster_jobs_finished_total{{state=\"{s}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP muster_job_queue_depth Ready jobs waiting for a slot.\n# TYPE muster_job_queue_depth gauge\n");
        let _ = writeln!(
            out,
            "muster_job_queue_depth {}",
            j.queue_depth.load(Ordering::Relaxed)
        );
        out.push_str("# HELP muster_job_start_latency_seconds From ready to started on a node.\n# TYPE muster_job_start_latency_seconds histogram\n");
        j.start_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(&mut out, "muster_job_start_latency_seconds", "");
        out.push_str("# HELP muster_nodes Nodes by state.\n# TYPE muster_nodes gauge\n");
        for state in ["ready", "draining", "down", "lost"] {
            let n = nodes
                .iter()
                .find(|(s, _)| s == state)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            let _ = writeln!(out, "muster_nodes{{state=\"{state}\"}} {n}");
        }
        out.push_str("# HELP muster_remote_log_streams_total Logs of jobs on other nodes streamed, by path.\n# TYPE muster_remote_log_streams_total counter\n");
        for (path, v) in [
            ("endpoint", &self.log_streams_direct),
            ("connection", &self.log_streams_relayed),
        ] {
            let _ = writeln!(
                out,
                "muster_remote_log_streams_total{{via=\"{path}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out.push_str(&self.discovery.render());
        out
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// `GET /metrics`.
pub async fn serve(State(app): State<Arc<App>>) -> impl IntoResponse {
    let store = app.store.clone();
    let nodes = tokio::task::spawn_blocking(move || store.nodes())
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for n in nodes {
        *by_state.entry(n.state).or_insert(0) += 1;
    }
    let counts: Vec<(String, u64)> = by_state.into_iter().collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(&counts),
    )
}
