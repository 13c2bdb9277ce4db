//! muster-server: the control plane and the node agent.
//!
//! - [`config`]: the one configuration struct and how file, env and flags combine.
//! - [`manager`]: the job manager thread, sole writer of job state, with group commit.
//! - [`protocol`]: the agent protocol messages; [`session`]: the server's side of a connection.
//! - [`agent`]: the node agent and the per-attempt [`agent::supervisor`].
//! - [`api`]: the HTTP API (thin routes over the pieces above).
//! - [`auth`], [`blobs`]: passwords and tokens; the content-addressed blob store.
//!
//! [`run`] serves an [`App`] on a listener the caller bound until `shutdown` resolves.

pub mod accounts;
pub mod agent;
pub mod alerts;
pub mod api;
pub mod auth;
pub mod blobs;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod discovery;
pub mod manager;
pub mod metrics;
pub mod nodes;
pub mod perf;
pub mod protocol;
pub mod session;
pub mod tls;

use crate::agent::Link;
use crate::blobs::Blobs;
use crate::config::Config;
use crate::manager::{Manager, ManagerConfig};
use crate::protocol::ToAgent;
use muster_core::sched::Backoff;
use muster_store::Store;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedSender;

/// Everything the server shares between requests.
pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub manager: Manager,
    pub blobs: Blobs,
    /// Connected agents by node name.
    pub agents: Mutex<HashMap<String, UnboundedSender<ToAgent>>>,
    /// Open log streams: id → where the agent's chunks go.
    pub streams: Mutex<HashMap<u64, UnboundedSender<(String, bool)>>>,
    pub next_id: AtomicU64,
    /// The URL jobs and join commands are given.
    pub url: String,
    pub metrics: metrics::Metrics,
    /// The perf log of this run, with `[perf] enabled`.
    pub perf: Option<perf::PerfLog>,
    pub login_limiter: api::LoginLimiter,
    /// Who each recently seen token is (see [`api::CallerCache`]).
    pub callers: api::CallerCache,
    /// Where alerts go (`[alerts] webhook_url`).
    pub alerts: Arc<alerts::Alerts>,
    /// This server's id in the leader election.
    pub server_id: String,
    /// Whether this server holds the leader lease (see [`cluster`]).
    pub leading: std::sync::atomic::AtomicBool,
    /// The leader's URL, as its lease says.
    pub leader_url: std::sync::RwLock<Option<String>>,
    /// The cluster CA (shared by the servers through the store) and this server's TLS.
    pub ca: tls::ClusterCa,
    pub tls: Arc<tls::CurrentTls>,
    /// Where connected agents serve their log files (see [`agent::logs`]), by node name.
    pub log_endpoints: Mutex<HashMap<String, LogEndpoint>>,
}

/// A node's log endpoint, as its authenticated connection told it.
#[derive(Clone, Debug)]
pub struct LogEndpoint {
    pub node_id: String,
    pub addr: std::net::SocketAddr,
    /// The connection that told it.
    pub session: u64,
    /// Dials that failed in a row, and until when the connection path is used instead.
    pub failures: u32,
    pub retry_at: Option<std::time::Instant>,
}

impl LogEndpoint {
    /// Notes a failed dial: the endpoint rests 30 s, doubling with each failure in a row up to an
    /// hour, so a firewalled endpoint does not delay every follow while a one-off failure (the
    /// agent restarting, say) does not give the direct path up for good.
    pub fn failed(&mut self, now: std::time::Instant) {
        self.failures = self.failures.saturating_add(1);
        let rest = 30u64
            .saturating_mul(1 << (self.failures - 1).min(7))
            .min(3600);
        self.retry_at = Some(now + std::time::Duration::from_secs(rest));
    }

    /// Whether a follow should dial it now.
    pub fn usable(&self, now: std::time::Instant) -> bool {
        self.retry_at.is_none_or(|t| now >= t)
    }
}

impl App {
    /// Opens the store, starts the job manager (which resumes running trees).
    pub fn start(
        config: Config,
        url: String,
    ) -> Result<(Arc<App>, std::thread::JoinHandle<()>), String> {
        let store = muster_store::open(&config.store_url()).map_err(|e| e.to_string())?;
        Self::with_store(config, url, store)
    }

    pub fn with_store(
        config: Config,
        url: String,
        store: Arc<dyn Store>,
    ) -> Result<(Arc<App>, std::thread::JoinHandle<()>), String> {
        let blob_dir = if config.store.blob_dir.is_empty() {
            config.data_dir.join("blobs")
        } else {
            std::path::PathBuf::from(&config.store.blob_dir)
        };
        let blobs = Blobs::new(&blob_dir).map_err(|e| format!("blob store: {e}"))?;
        let mc = ManagerConfig {
            backoff: Backoff {
                base_ms: config.jobs.backoff_base.as_millis() as u64,
                max_ms: config.jobs.backoff_max.as_millis() as u64,
            },
            kill_grace_ms: config.jobs.kill_grace.as_millis() as u64,
            log_max: config.jobs.log_max,
            url: url.clone(),
            down_after: config.discovery.interval * 3,
            lost_after: config.nodes.lost_after,
        };
        let metrics = metrics::Metrics::default();
        let alerts = Arc::new(alerts::Alerts::start(&config.alerts.webhook_url)?);
        let login_delay = config.auth.login_delay;
        // Stable across restarts, so a restarted server renews its own lease at once.
        let id_file = config.data_dir.join("server-id");
        let server_id = match std::fs::read_to_string(&id_file) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
            _ => {
                let id = muster_core::Uuid::now_v7().to_string();
                std::fs::write(&id_file, &id).map_err(|e| format!("{}: {e}", id_file.display()))?;
                id
            }
        };
        let (manager, handle) =
            Manager::start(store.clone(), mc, metrics.jobs.clone(), alerts.clone())
                .map_err(|e| format!("job manager: {e}"))?;
        // The store may be coming up with us (cluster mode): wait for it a while.
        let mut tries = 0;
        let ca = loop {
            match tls::ClusterCa::load_or_create(&*store) {
                Ok(ca) => break ca,
                Err(e) if tries < 30 => {
                    if tries == 0 {
                        eprintln!("muster: waiting for the store to load the cluster CA: {e}");
                    }
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                Err(e) => return Err(format!("cannot load the cluster CA from the store: {e}")),
            }
        };
        let public = if config.server.tls_cert.is_empty() {
            None
        } else {
            Some(tls::load_public(
                &config.server.tls_cert,
                &config.server.tls_key,
            )?)
        };
        let tls = Arc::new(tls::CurrentTls::new(ca.server_tls(public)?));
        let perf = if config.perf.enabled {
            Some(perf::PerfLog::start(&config.data_dir).map_err(|e| format!("perf log: {e}"))?)
        } else {
            None
        };
        let app = Arc::new(App {
            config,
            store,
            manager,
            blobs,
            agents: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            url,
            metrics,
            perf,
            login_limiter: api::LoginLimiter::new(login_delay),
            callers: api::CallerCache::default(),
            alerts,
            server_id,
            leading: std::sync::atomic::AtomicBool::new(false),
            leader_url: std::sync::RwLock::new(None),
            ca,
            tls,
            log_endpoints: Mutex::new(HashMap::new()),
        });
        Ok((app, handle))
    }

    /// A [`Link`] for an agent in this process: the same protocol messages over channels.
    pub fn local_link(self: &Arc<App>) -> Link {
        let app = self.clone();
        Arc::new(move || {
            let app = app.clone();
            Box::pin(async move {
                let (to_server, from_agent) = tokio::sync::mpsc::unbounded_channel();
                let (to_agent, from_server) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(session::serve(app, from_agent, to_agent, None));
                Ok((to_server, from_server))
            })
        })
    }

    /// Stops the job manager after its current batch (it commits first).
    pub fn stop(&self) {
        self.manager.send(manager::Cmd::Shutdown);
    }
}

/// Serves the HTTP API of `app` on `listener` until `shutdown` resolves.
pub async fn run(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let reaper = tokio::spawn(reaper(app.clone()));
    let watch = tokio::spawn(watch_store(app.clone()));
    let lead = tokio::spawn(cluster::lead(app.clone()));
    let listener = tls::Sniff::new(listener, app.tls.clone())?;
    let files = (
        app.config.server.tls_cert.clone(),
        app.config.server.tls_key.clone(),
    );
    let renew = tokio::spawn(app.tls.clone().renew_daily(AppCa(app.clone()), files));
    let router = api::router(app);
    let res = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<tls::Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    reaper.abort();
    renew.abort();
    watch.abort();
    lead.abort();
    res
}

/// Every `reaper.interval`: removes finished trees older than `jobs.retention`, their records and
/// the log blobs no remaining job refers to.
async fn reaper(app: Arc<App>) {
    let mut tick = tokio::time::interval(app.config.reaper.interval);
    loop {
        tick.tick().await;
        let app = app.clone();
        let _ = tokio::task::spawn_blocking(move || reap_once(&app)).await;
    }
}

/// Pings the store every second and tells the operators (`[alerts]`) when it becomes
/// unavailable and when it is back.
async fn watch_store(app: Arc<App>) {
    let mut up = true;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let store = app.store.clone();
        let ok = tokio::task::spawn_blocking(move || store.ping())
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
        if ok != up {
            up = ok;
            let (kind, url) = (
                if ok {
                    "store_available"
                } else {
                    "store_unavailable"
                },
                app.config.store_url(),
            );
            eprintln!("muster: {kind}: {url}");
            app.alerts
                .send(kind, serde_json::json!({"store": redact(&url)}));
        }
    }
}

/// A store URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(i), Some(j)) if j > i => format!("{}://***{}", &url[..i], &url[j..]),
        _ => url.to_string(),
    }
}

/// One pass of the reaper; returns how many trees it removed.
pub fn reap_once(app: &App) -> usize {
    let before = manager::now().plus_ms(-(app.config.jobs.retention.as_millis() as i64));
    let mut removed = 0;
    loop {
        match app.store.purge_finished(before, 1000) {
            Ok((trees, blobs)) => {
                for b in &blobs {
                    if let Err(e) = app.blobs.delete(b) {
                        eprintln!("muster: reaper: cannot delete blob {b}: {e}");
                    }
                }
                removed += trees.len();
                if trees.len() < 1000 {
                    return removed;
                }
            }
            Err(e) => {
                eprintln!("muster: reaper: {e}");
                return removed;
            }
        }
    }
}

/// The cluster CA of an [`App`], owned.
struct AppCa(Arc<App>);

impl std::ops::Deref for AppCa {
    type Target = tls::ClusterCa;
    fn deref(&self) -> &tls::ClusterCa {
        &self.0.ca
    }
}

#[cfg(test)]
mod tests {
    use super::LogEndpoint;
    use std::time::Instant;

    #[test]
    fn an_unreachable_log_endpoint_rests_longer_each_time_and_is_tried_again() {
        let mut ep = LogEndpoint {
            node_id: "n1".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            session: 1,
            failures: 0,
            retry_at: None,
        };
        let t0 = Instant::now();
        assert!(ep.usable(t0));
        let mut rests = Vec::new();
        for _ in 0..10 {
            ep.failed(t0);
            assert!(!ep.usable(t0));
            let rest = ep.retry_at.unwrap() - t0;
            assert!(ep.usable(t0 + rest));
            rests.push(rest.as_secs());
        }
        assert_eq!(rests, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert_eq!(ep.failures, 10);
    }
}
