//! Prometheus metrics (`GET /metrics`), kept and rendered by the `prometheus-client` crate:
//! requests by route and status, request latency histograms, jobs by state, job start latency,
//! the ready queue's depth, nodes by state, remote log streams by path, discovery beacons by
//! verdict. Other parts register their own metrics in [`Metrics::registry`] at start.
//!
//! Every metric is updated through a method here, so callers never see the crate's types and the
//! names stay in one place.

use crate::App;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use muster_core::JobState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram with the latency buckets.
pub fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// A label set of one label, `state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViaLabel {
    via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Job counters the job manager keeps up to date.
pub struct JobStats {
    /// Jobs waiting or running now.
    jobs: Family<StateLabel, Gauge>,
    /// Jobs that ended, by final state, since the server started.
    finished: Family<StateLabel, Counter>,
    /// Ready jobs waiting for a slot.
    queue_depth: Gauge,
    /// From "ready" to "started on a node".
    start_latency: Histogram,
}

impl Default for JobStats {
    fn default() -> JobStats {
        JobStats {
            jobs: Family::default(),
            finished: Family::default(),
            queue_depth: Gauge::default(),
            start_latency: latency_histogram(),
        }
    }
}

impl JobStats {
    /// Moves one job between the state gauges and counters (`None`: it did not exist / is gone).
    pub fn moved(&self, from: Option<JobState>, to: Option<JobState>) {
        if from == to {
            return;
        }
        let live = |st: JobState| match st {
            JobState::Waiting => Some("waiting"),
            JobState::Running => Some("running"),
            _ => None,
        };
        if let Some(s) = from.and_then(live) {
            self.jobs.get_or_create(&StateLabel { state: s }).dec();
        }
        let Some(to) = to else { return };
        match to {
            JobState::Succeeded | JobState::Failed | JobState::Aborted => {
                self.finished
                    .get_or_create(&StateLabel { state: to.as_str() })
                    .inc();
            }
            st => {
                if let Some(s) = live(st) {
                    self.jobs.get_or_create(&StateLabel { state: s }).inc();
                }
            }
        }
    }

    /// `n` new jobs, all waiting.
    pub fn created(&self, n: usize) {
        self.jobs
            .get_or_create(&StateLabel { state: "waiting" })
            .inc_by(n as i64);
    }

    /// How many ready jobs wait for a slot now.
    pub fn set_queue_depth(&self, n: usize) {
        self.queue_depth.set(n as i64);
    }

    /// A job started `waited` after it became ready.
    pub fn started_after(&self, waited: Duration) {
        self.start_latency.observe(waited.as_secs_f64());
    }

    fn register(&self, r: &mut Registry) {
        for s in ["waiting", "running"] {
            let _ = self.jobs.get_or_create(&StateLabel { state: s });
        }
        for s in ["succeeded", "failed", "aborted"] {
            let _ = self.finished.get_or_create(&StateLabel { state: s });
        }
        r.register(
            "muster_jobs",
            "Jobs waiting or running now",
            self.jobs.clone(),
        );
        r.register(
            "muster_jobs_finished",
            "Jobs that ended, by state",
            self.finished.clone(),
        );
        r.register(
            "muster_job_queue_depth",
            "Ready jobs waiting for a slot",
            self.queue_depth.clone(),
        );
        r.register(
            "muster_job_start_latency_seconds",
            "From ready to started on a node",
            self.start_latency.clone(),
        );
    }
}

/// What the discovery listener heard: beacons by verdict, and when each node was last heard.
#[derive(Default)]
pub struct DiscoveryStats {
    beacons: Family<ResultLabel, Counter>,
    /// node id → the last valid beacon's arrival (Unix ms). A hint, never an identity.
    last_heard: Mutex<BTreeMap<String, i64>>,
}

/// The verdicts counted in `muster_discovery_beacons_total{result}`.
const VERDICTS: [&str; 6] = [
    "ok",
    "unsigned",
    "bad_signature",
    "stale",
    "replayed",
    "malformed",
];

impl DiscoveryStats {
    /// Counts one beacon with verdict `result` (a label of [`VERDICTS`]).
    pub fn count(&self, result: &'static str) {
        self.beacons.get_or_create(&ResultLabel { result }).inc();
    }

    /// How many beacons had verdict `result`.
    pub fn counted(&self, result: &'static str) -> u64 {
        self.beacons.get_or_create(&ResultLabel { result }).get()
    }

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

    fn register(&self, r: &mut Registry) {
        for v in VERDICTS {
            let _ = self.beacons.get_or_create(&ResultLabel { result: v });
        }
        r.register(
            "muster_discovery_beacons",
            "Discovery beacons heard, by verdict",
            self.beacons.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatcherLabel {
    watcher: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatcherOutcome {
    watcher: &'static str,
    outcome: &'static str,
}

/// The pulse and its watchers (see [`crate::hq::pulse`]).
pub struct PulseStats {
    pulses: Counter,
    /// Pulses that took longer than the interval (so the next one started late).
    overruns: Counter,
    duration: Histogram,
    /// The CPU time of a pulse's watchers (their threads' user + system time).
    cpu: Histogram,
    runs: Family<WatcherOutcome, Counter>,
    watcher_duration: Family<WatcherLabel, Histogram, fn() -> Histogram>,
}

impl Default for PulseStats {
    fn default() -> PulseStats {
        PulseStats {
            pulses: Counter::default(),
            overruns: Counter::default(),
            duration: latency_histogram(),
            cpu: latency_histogram(),
            runs: Family::default(),
            watcher_duration: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl PulseStats {
    /// A pulse ended after `took`, its watchers having used `cpu_us` of CPU; `overran` when it
    /// took longer than the interval.
    pub fn pulsed(&self, took: Duration, overran: bool, cpu_us: u64) {
        self.pulses.inc();
        self.cpu.observe(cpu_us as f64 / 1e6);
        if overran {
            self.overruns.inc();
        }
        self.duration.observe(took.as_secs_f64());
    }

    /// A watcher's run ended (or was skipped) with `outcome` after `ms`.
    pub fn watcher(&self, watcher: &'static str, outcome: &'static str, ms: u64) {
        self.runs
            .get_or_create(&WatcherOutcome { watcher, outcome })
            .inc();
        self.watcher_duration
            .get_or_create(&WatcherLabel { watcher })
            .observe(ms as f64 / 1000.0);
    }

    /// How many pulses ran.
    pub fn pulses(&self) -> u64 {
        self.pulses.get()
    }

    fn register(&self, r: &mut Registry) {
        r.register("muster_pulses", "Pulses run", self.pulses.clone());
        r.register(
            "muster_pulse_overruns",
            "Pulses that took longer than the interval, delaying the next one",
            self.overruns.clone(),
        );
        r.register(
            "muster_pulse_duration_seconds",
            "How long a pulse took",
            self.duration.clone(),
        );
        r.register(
            "muster_pulse_cpu_seconds",
            "CPU time a pulse's watchers used (their threads' user + system time)",
            self.cpu.clone(),
        );
        r.register(
            "muster_watcher_runs",
            "Watcher runs by watcher and outcome (ok, failed, slow, busy)",
            self.runs.clone(),
        );
        r.register(
            "muster_watcher_duration_seconds",
            "How long a watcher's run took",
            self.watcher_duration.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelVersionLabel {
    model: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelStatusLabel {
    model: String,
    version: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelStateLabel {
    model: String,
    state: String,
}

/// Predict calls (SPEC §8) through this server, by model (`<ws>/<name>`) and version.
pub struct ModelStats {
    requests: Family<ModelStatusLabel, Counter>,
    /// Calls answered 5xx or not at all.
    errors: Family<ModelVersionLabel, Counter>,
    duration: Family<ModelVersionLabel, Histogram, fn() -> Histogram>,
    /// Calls in flight now (the server's queue of each model: bounded per replica).
    inflight: Family<ModelLabel, Gauge>,
    /// Predictor processes by state, set at each scrape.
    replicas: Family<ModelStateLabel, Gauge>,
}

impl Default for ModelStats {
    fn default() -> ModelStats {
        ModelStats {
            requests: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            inflight: Family::default(),
            replicas: Family::default(),
        }
    }
}

/// A predict call counted in flight until dropped.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ModelStats {
    /// A call to `model` begins.
    pub fn begin(&self, model: &str) -> InFlight {
        let g = self
            .inflight
            .get_or_create(&ModelLabel {
                model: model.to_string(),
            })
            .clone();
        g.inc();
        InFlight(g)
    }

    /// A call to `model` (answered by `version`, 0 if none) ended with `status` after `took`.
    pub fn predicted(&self, model: &str, version: u32, status: u16, took: Duration) {
        let version = version.to_string();
        self.requests
            .get_or_create(&ModelStatusLabel {
                model: model.to_string(),
                version: version.clone(),
                status,
            })
            .inc();
        let mv = ModelVersionLabel {
            model: model.to_string(),
            version,
        };
        if status >= 500 {
            self.errors.get_or_create(&mv).inc();
        }
        self.duration.get_or_create(&mv).observe(took.as_secs_f64());
    }

    /// Sets the predictors of each model by state: `(model, state, count)`.
    pub fn set_replicas(&self, counts: &[(String, String, u64)]) {
        self.replicas.clear();
        for (model, state, n) in counts {
            self.replicas
                .get_or_create(&ModelStateLabel {
                    model: model.clone(),
                    state: state.clone(),
                })
                .set(*n as i64);
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "muster_predict_requests",
            "Predict calls by model, version and status",
            self.requests.clone(),
        );
        r.register(
            "muster_predict_errors",
            "Predict calls answered 5xx or not at all, by model and version",
            self.errors.clone(),
        );
        r.register(
            "muster_predict_duration_seconds",
            "Predict latency through the server, by model and version",
            self.duration.clone(),
        );
        r.register(
            "muster_predict_inflight",
            "Predict calls in flight now, by model",
            self.inflight.clone(),
        );
        r.register(
            "muster_model_replicas",
            "Predictor processes by model and state",
            self.replicas.clone(),
        );
    }
}

/// The server's metrics.
pub struct Metrics {
    /// Every metric of the server; parts that come later register theirs here at start.
    registry: Mutex<Registry>,
    requests: Family<RouteStatus, Counter>,
    latency: Family<RouteLabel, Histogram, fn() -> Histogram>,
    nodes: Family<StateLabel, Gauge>,
    /// Remote logs streamed straight from the node's log endpoint (`endpoint`), and relayed over
    /// the agent's connection (`connection`: no endpoint, or it could not be reached).
    log_streams: Family<ViaLabel, Counter>,
    pub jobs: Arc<JobStats>,
    /// Beacons heard by the discovery listener.
    pub discovery: Arc<DiscoveryStats>,
    /// The pulse and its watchers.
    pub pulse: Arc<PulseStats>,
    /// Predict calls and predictors.
    pub models: Arc<ModelStats>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            nodes: Family::default(),
            log_streams: Family::default(),
            jobs: Arc::default(),
            discovery: Arc::default(),
            pulse: Arc::default(),
            models: Arc::default(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            r.register(
                "muster_http_requests",
                "HTTP requests by route and status",
                m.requests.clone(),
            );
            r.register(
                "muster_http_request_duration_seconds",
                "HTTP request latency by route",
                m.latency.clone(),
            );
            m.jobs.register(&mut r);
            for s in NODE_STATES {
                let _ = m.nodes.get_or_create(&StateLabel { state: s });
            }
            r.register("muster_nodes", "Nodes by state", m.nodes.clone());
            for via in ["endpoint", "connection"] {
                let _ = m.log_streams.get_or_create(&ViaLabel { via });
            }
            r.register(
                "muster_remote_log_streams",
                "Logs of jobs on other nodes streamed, by path",
                m.log_streams.clone(),
            );
            m.discovery.register(&mut r);
            m.pulse.register(&mut r);
            m.models.register(&mut r);
        }
        m
    }
}

/// The node states `muster_nodes{state}` shows.
const NODE_STATES: [&str; 4] = ["ready", "draining", "down", "lost"];

impl Metrics {
    /// Records one HTTP request (`route` is the method and the route pattern).
    pub fn request(&self, route: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RouteStatus {
                route: route.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabel {
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records a remote log stream: `direct` from the node's endpoint, else over its connection.
    pub fn log_stream(&self, direct: bool) {
        let via = if direct { "endpoint" } else { "connection" };
        self.log_streams.get_or_create(&ViaLabel { via }).inc();
    }

    /// Adds metrics of another part (`muster_<part>_...`) to what `/metrics` shows.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(name, help, metric);
    }

    /// The text exposition (OpenMetrics); `nodes` are (state, count).
    pub fn render(&self, nodes: &[(String, u64)]) -> String {
        for s in NODE_STATES {
            let n = nodes
                .iter()
                .find(|(st, _)| st == s)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            self.nodes
                .get_or_create(&StateLabel { state: s })
                .set(n as i64);
        }
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
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
    let a = app.clone();
    if let Ok(replicas) = tokio::task::spawn_blocking(move || a.models.replica_states()).await {
        app.metrics.models.set_replicas(&replicas);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(&counts),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_keeps_the_metric_names() {
        let m = Metrics::default();
        m.request("GET /api/v1/jobs", 200, Duration::from_millis(3));
        m.jobs.created(2);
        m.jobs
            .moved(Some(JobState::Waiting), Some(JobState::Running));
        m.jobs
            .moved(Some(JobState::Running), Some(JobState::Succeeded));
        m.jobs.started_after(Duration::from_millis(1));
        m.jobs.set_queue_depth(4);
        m.log_stream(true);
        m.discovery.count("stale");
        {
            let _call = m.models.begin("acme/Iris");
            m.models
                .predicted("acme/Iris", 2, 200, Duration::from_millis(2));
        }
        m.models
            .predicted("acme/Iris", 2, 503, Duration::from_millis(1));
        m.models
            .set_replicas(&[("acme/Iris".into(), "healthy".into(), 2)]);
        let text = m.render(&[("ready".into(), 3)]);
        for line in [
            "muster_http_requests_total{route=\"GET /api/v1/jobs\",status=\"200\"} 1",
            "muster_http_request_duration_seconds_count{route=\"GET /api/v1/jobs\"} 1",
            "muster_jobs{state=\"waiting\"} 1",
            "muster_jobs{state=\"running\"} 0",
            "muster_jobs_finished_total{state=\"succeeded\"} 1",
            "muster_jobs_finished_total{state=\"failed\"} 0",
            "muster_job_queue_depth 4",
            "muster_job_start_latency_seconds_count 1",
            "muster_nodes{state=\"ready\"} 3",
            "muster_nodes{state=\"lost\"} 0",
            "muster_remote_log_streams_total{via=\"endpoint\"} 1",
            "muster_remote_log_streams_total{via=\"connection\"} 0",
            "muster_discovery_beacons_total{result=\"stale\"} 1",
            "muster_discovery_beacons_total{result=\"ok\"} 0",
            "muster_predict_requests_total{model=\"acme/Iris\",version=\"2\",status=\"200\"} 1",
            "muster_predict_errors_total{model=\"acme/Iris\",version=\"2\"} 1",
            "muster_predict_duration_seconds_count{model=\"acme/Iris\",version=\"2\"} 2",
            "muster_predict_inflight{model=\"acme/Iris\"} 0",
            "muster_model_replicas{model=\"acme/Iris\",state=\"healthy\"} 2",
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} in:\n{text}");
        }
    }
}
