//! muster-server: the control plane (the node agent is `muster-agent`; what crosses the wire
//! between them is `muster-wire`).
//!
//! - [`config`]: the one configuration struct and how file, env and flags combine.
//! - [`jobs`]: the job manager thread, sole writer of job state, with group commit, and the
//!   hooks other parts react to job outcomes with.
//! - [`session`]: the server's side of an agent connection.
//! - [`hq`]: headquarters, the git repository of desired state: the pulse and its watchers
//!   (sync, orders), node control scripts, the reaper's frame.
//! - [`models`]: models (SPEC §8): versions, deploy trees and their steps, predict routing.
//! - [`services`]: services (SPEC §6): plans of HQ's services, applies as job trees, records.
//! - [`api`]: the HTTP API (thin routes over the pieces above).
//! - [`auth`], [`blobs`]: passwords and tokens; the content-addressed blob store.
//!
//! [`run`] serves an [`App`] on a listener the caller bound until `shutdown` resolves.

pub mod accounts;
pub mod alerts;
pub mod api;
pub mod auth;
pub mod blobs;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod discovery;
pub mod hq;
pub mod jobs;
pub mod links;
pub mod login_limit;
pub mod logs;
pub mod metrics;
pub mod models;
pub mod nodes;
pub mod perf;
pub mod processes;
pub mod server;
pub mod services;
pub mod session;
pub mod tls;

use crate::blobs::Blobs;
use crate::config::Config;
use crate::jobs::{Manager, ManagerConfig};
pub use crate::server::Server;
use muster_core::sched::Backoff;
use muster_store::Store;
use muster_wire::protocol::Link;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Everything the server shares between requests.
pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub manager: Manager,
    /// The named hooks of job outcomes (see [`jobs::hooks`]).
    pub hooks: jobs::hooks::Hooks,
    pub blobs: Blobs,
    /// The connected agents: where to reach each node, its log endpoint, relayed log streams.
    pub links: links::Links,
    /// The live log hubs (one stream per followed attempt, fanned out).
    pub logs: logs::Logs,
    /// Long-running processes (SPEC §5a), also the internal API services and models use.
    pub processes: processes::Processes,
    /// The URL jobs and join commands are given.
    pub url: String,
    pub metrics: metrics::Metrics,
    /// The perf log of this run, with `[perf] enabled`.
    pub perf: Option<perf::PerfLog>,
    /// Slows password guessing (see [`login_limit`]).
    pub login_limiter: login_limit::LoginLimiter,
    /// Who each recently seen token is (see [`api::CallerCache`]).
    pub callers: api::CallerCache,
    /// Where alerts go (`[alerts] webhook_url`).
    pub alerts: Arc<alerts::Alerts>,
    /// This server's place in the cluster: its id, whether it leads, the leader's URL.
    pub cluster: cluster::Cluster,
    /// The cluster CA (shared by the servers through the store) and this server's TLS.
    pub ca: muster_wire::pki::ClusterCa,
    pub tls: Arc<tls::CurrentTls>,
    /// Headquarters: the repository, the pulse's watchers, the order verbs, the reaper's tasks.
    pub hq: hq::Hq,
    /// Models (SPEC §8): their versions and this server's predict routes.
    pub models: models::Models,
    /// Services (SPEC §6): plans, applies and the recorded state of each service.
    pub services: services::Services,
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
        secure_data_dir(&config);
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
        let login_limits = login_limit::Limits {
            base: config.auth.login_delay,
            per_user: config.auth.login_user_limit,
            per_address: config.auth.login_address_limit,
        };
        // Stable across restarts, so a restarted server renews its own lease at once.
        let id_file = config.data_dir.join("server-id");
        let server_id = match std::fs::read_to_string(&id_file) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
            _ => {
                let id = muster_core::Uuid::now_v7().to_string();
                muster_wire::perms::write(&id_file, &id)
                    .map_err(|e| format!("{}: {e}", id_file.display()))?;
                id
            }
        };
        // What reacts to job outcomes: the job tokens and alerts here; services and models
        // register their named hooks in `hooks` before this server leads.
        let hooks = jobs::hooks::Hooks::default();
        let links = links::Links::default();
        let processes = processes::Processes::new(store.clone(), links.clone(), url.clone());
        let models = models::Models::new(
            store.clone(),
            processes.clone(),
            config.models.replica_max_inflight,
            config.models.batch_parallel,
        );
        hooks.register(
            models::DEPLOY_HOOK,
            Arc::new(models::DeployHook {
                models: models.clone(),
                alerts: alerts.clone(),
            }),
        );
        let services = services::Services::default();
        hooks.register(
            services::STEP_HOOK,
            Arc::new(services::StepHook(services.clone())),
        );
        let reactions = jobs::manager::Reactions {
            observers: vec![
                Box::new(jobs::observers::JobTokens::new(store.clone())),
                Box::new(jobs::observers::AlertOnFailure(alerts.clone())),
                Box::new(processes::OnNodeLost(processes.clone())),
            ],
            hooks: hooks.clone(),
            clock: Arc::new(jobs::clock::SystemClock),
        };
        let (manager, handle) = Manager::start(store.clone(), mc, metrics.jobs.clone(), reactions)
            .map_err(|e| format!("job manager: {e}"))?;
        // The store may be coming up with us (cluster mode): wait for it a while.
        let mut tries = 0;
        let ca = loop {
            match tls::load_or_create_ca(&*store) {
                Ok(ca) => break ca,
                Err(e) if tries < 30 => {
                    if tries == 0 {
                        tracing::warn!("waiting for the store to load the cluster CA: {e}");
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
        let hq = hq::Hq::new(&config);
        hq::orders::register_builtin(hq.verbs());
        hq.add_watcher(Box::new(hq::sync::SyncWatcher::default()));
        hq.add_watcher(Box::new(hq::orders::OrdersWatcher::default()));
        hq.add_watcher(Box::new(models::uploads::UploadsWatcher));
        hq.add_watcher(Box::new(services::monitor::MonitorWatcher));
        hq.reaper().register(Arc::new(hq::reaper::ExpiredJobs));
        hq.reaper()
            .register(Arc::new(models::lifecycle::DeletedModels));
        models::lifecycle::register_verbs(hq.verbs());
        services::reset::register_verbs(hq.verbs());
        let perf = if config.perf.enabled {
            Some(perf::PerfLog::start(&config.data_dir).map_err(|e| format!("perf log: {e}"))?)
        } else {
            None
        };
        let app = Arc::new(App {
            config,
            store,
            manager,
            hooks,
            blobs,
            links,
            logs: logs::Logs::default(),
            processes,
            url,
            metrics,
            perf,
            login_limiter: login_limit::LoginLimiter::new(
                login_limits,
                Arc::new(jobs::clock::SystemClock),
            ),
            callers: api::CallerCache::default(),
            alerts,
            cluster: cluster::Cluster::new(server_id),
            ca,
            tls,
            hq,
            models,
            services,
        });
        app.models.set_app(&app);
        app.services.set_app(&app);
        let weak = Arc::downgrade(&app);
        app.processes
            .set_secret_source(Arc::new(move |path: &str, keys: &[String]| {
                let app = weak.upgrade().ok_or("the server is stopping")?;
                services::secrets::for_step(&app, path, keys).map_err(|e| e.to_string())
            }));
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

    /// What cannot write for lack of space, for `/readyz`: the store (its last write failed
    /// so, or its SQLite file's disk is full) or the blob store (its disk is full); `None`
    /// when there is room.
    pub fn no_space(&self) -> Option<String> {
        let url = self.config.store_url();
        let sqlite_dir = url
            .strip_prefix("sqlite://")
            .map(|p| {
                std::path::Path::new(p)
                    .parent()
                    .unwrap_or(std::path::Path::new("."))
            })
            .map(|d| {
                if d.as_os_str().is_empty() {
                    std::path::Path::new(".")
                } else {
                    d
                }
            });
        if self.manager.store_full() || sqlite_dir.is_some_and(blobs::disk_full) {
            return Some(
                "the store cannot write: no space left on its disk (free space there)".into(),
            );
        }
        if blobs::disk_full(self.blobs.dir()) {
            return Some(
                "the blob store cannot write: no space left on its disk (free space there)".into(),
            );
        }
        None
    }

    /// Stops the job manager after its current batch (it commits first).
    pub fn stop(&self) {
        self.manager.send(jobs::Cmd::Shutdown);
    }
}

/// Makes the data dir private to our user (0700) if it is not, and the server's files in it
/// (keys, the setup code, the perf logs; the store and blob store see to their own), with a
/// warning for each one fixed: what an older version or a hand left open to other users.
fn secure_data_dir(config: &Config) {
    let d = &config.data_dir;
    if let Err(e) = muster_wire::perms::create_dir_all(d) {
        tracing::warn!("cannot make the data dir {}: {e}", d.display());
    }
    let paths = [
        d.clone(),
        d.join("setup-code"),
        d.join("server-key"),
        d.join("server-id"),
        discovery::cluster_key_path(config),
        d.join("perf"),
        d.join("perf").join("logs"),
    ];
    muster_wire::perms::repair_all(paths.iter().map(std::path::PathBuf::as_path));
}

/// Serves the HTTP API of `app` on `listener` until `shutdown` resolves.
pub async fn run(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let loops = hq::start(app.clone());
    let watch = tokio::spawn(watch_store(app.clone()));
    let lead = tokio::spawn(cluster::lead(app.clone()));
    let procs = tokio::spawn(processes::run(app.clone()));
    let model_routes = tokio::spawn(models::routes::run(app.clone()));
    let model_watch = tokio::spawn(models::lifecycle::watch(app.clone()));
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
    for l in loops {
        l.abort();
    }
    renew.abort();
    watch.abort();
    lead.abort();
    procs.abort();
    model_routes.abort();
    model_watch.abort();
    res
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
            if ok {
                tracing::info!("{kind}: {}", redact(&url));
            } else {
                tracing::error!("{kind}: {}", redact(&url));
            }
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

/// Removes finished trees older than `jobs.retention`, their records and the log blobs no
/// remaining job refers to (the reaper's `expired_jobs` task), then the batches of the removed
/// trees with their chunk and result blobs ([`models::batch::reap`]); returns how many trees
/// it removed.
pub fn reap_once(app: &App) -> usize {
    let mut purged = Vec::new();
    let removed = reap_trees(app, &mut purged);
    if let Err(e) = models::batch::reap(app, &purged) {
        tracing::error!("reaper: batches: {e}");
    }
    removed
}

fn reap_trees(app: &App, purged: &mut Vec<muster_core::Uuid>) -> usize {
    let before = muster_wire::util::now().plus_ms(-(app.config.jobs.retention.as_millis() as i64));
    let mut removed = 0;
    loop {
        match app.store.purge_finished(before, 1000) {
            Ok((trees, blobs)) => {
                for b in &blobs {
                    if let Err(e) = app.blobs.delete(b) {
                        tracing::warn!("reaper: cannot delete blob {b}: {e}");
                    }
                }
                removed += trees.len();
                let more = trees.len() >= 1000;
                purged.extend(trees);
                if !more {
                    return removed;
                }
            }
            Err(e) => {
                tracing::error!("reaper: {e}");
                return removed;
            }
        }
    }
}

/// The cluster CA of an [`App`], owned.
struct AppCa(Arc<App>);

impl std::ops::Deref for AppCa {
    type Target = muster_wire::pki::ClusterCa;
    fn deref(&self) -> &muster_wire::pki::ClusterCa {
        &self.0.ca
    }
}
