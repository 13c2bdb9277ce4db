//! Starting a whole server — the one start-up path, used by `muster up`, `muster server` and the
//! test harness alike: open the store and start the job manager ([`App::start`]), write the
//! one-time setup code while no user exists, serve the HTTP API on the listener the caller bound,
//! beacon for discovery (`muster server` only), and run the embedded agent (`muster up`), all
//! until the caller's `shutdown` resolves. [`Server::stopped`] then waits for every part to end.

use crate::config::Config;
use crate::App;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The agent that runs inside the server process (`muster up`): its node name and the binary its
/// supervisors are started from. The rest comes from `[agent]`, `[jobs]`, `[nodes]` and
/// `[discovery]`.
#[derive(Clone, Debug)]
pub struct Embedded {
    pub name: String,
    pub exe: PathBuf,
}

/// A running server.
pub struct Server {
    pub app: Arc<App>,
    /// What jobs and join commands are given (`server.advertise_url`, or the listener's address).
    pub url: String,
    /// The one-time setup code's file, when this start wrote one (no user exists yet).
    pub setup_code: Option<PathBuf>,
    stop: watch::Receiver<bool>,
    http: JoinHandle<std::io::Result<()>>,
    others: Vec<JoinHandle<()>>,
    manager: std::thread::JoinHandle<()>,
}

impl Server {
    /// Starts everything on `listener` until `shutdown` resolves.
    pub async fn start(
        config: Config,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
        embedded: Option<Embedded>,
    ) -> Result<Server, String> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            format!(
                "cannot make the data dir {}: {e}",
                config.data_dir.display()
            )
        })?;
        if config.store_url().starts_with("redis") && config.hq.remote.is_empty() {
            return Err("cluster mode (a Redis store) needs [hq] remote: every server keeps its own clone of HQ and syncs it with the remote (set [hq] remote, or MUSTER_HQ__REMOTE, to a git URL or path)".into());
        }
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let url = if config.server.advertise_url.is_empty() {
            format!("http://{addr}")
        } else {
            config.server.advertise_url.clone()
        };
        let agent = match &embedded {
            Some(e) => Some(embedded_options(&config, e)?),
            None => None,
        };
        let (app, manager) = {
            let (config, url) = (config.clone(), url.clone());
            tokio::task::spawn_blocking(move || App::start(config, url))
                .await
                .map_err(|e| e.to_string())??
        };
        if let Some(e) = &embedded {
            app.services.set_embedded(&e.name);
        }
        let setup_code = write_setup_code(&app)?;
        // HQ: made on first start; a failure is reported and retried each pulse, the server
        // goes on. Scripts kept in the data dir before HQ held them move in.
        {
            let a = app.clone();
            tokio::task::spawn_blocking(move || {
                if a.hq.open().is_some() {
                    crate::hq::scripts::move_old(&a.hq, &a.config.data_dir);
                }
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        // Made at first start: join tokens carry its public half.
        crate::discovery::server_key(&app.config.data_dir)
            .map_err(|e| format!("cannot make the server key: {e}"))?;
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut others = Vec::new();
        if app.config.discovery.enabled && embedded.is_none() {
            others.extend(discovery(&app, &url, stop.clone())?);
        } else if app.config.discovery.enabled {
            tracing::info!(
                "`muster up` broadcasts nothing: discovery stays off (it runs with `muster server`)"
            );
        }
        let http = tokio::spawn(crate::run(app.clone(), listener, stopped(stop.clone())));
        if let Some(opts) = agent {
            let link = app.local_link();
            let stop = stopped(stop.clone());
            others.push(tokio::spawn(async move {
                if let Err(e) = muster_agent::run(opts, link, stop).await {
                    tracing::error!("the embedded agent stopped: {e}");
                }
            }));
        }
        Ok(Server {
            app,
            url,
            setup_code,
            stop,
            http,
            others,
            manager,
        })
    }

    /// Waits for the shutdown, then for every part to end: the agent and discovery, the HTTP
    /// server (at most 5 s for open connections), and the job manager's last commit. Running jobs
    /// stay with their supervisors.
    pub async fn stopped(mut self) {
        let _ = self.stop.wait_for(|s| *s).await;
        for t in self.others {
            let _ = t.await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.http).await;
        self.app.stop();
        let manager = self.manager;
        let _ = tokio::task::spawn_blocking(move || manager.join()).await;
    }
}

/// Resolves once `stop` says so.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The embedded agent's options. Its node runs every workspace's jobs unless `[agent] labels`
/// say otherwise (remote nodes take only cluster-admin jobs until labelled).
fn embedded_options(config: &Config, e: &Embedded) -> Result<muster_agent::AgentOptions, String> {
    let run_as = if config.agent.run_as.is_empty() {
        None
    } else {
        muster_agent::supervisor::check_run_as(&config.agent.run_as)?;
        Some(config.agent.run_as.clone())
    };
    let mut labels = config.agent.labels.clone();
    labels
        .entry("workspaces".into())
        .or_insert_with(|| "*".into());
    Ok(muster_agent::AgentOptions {
        dir: config.data_dir.join("agent"),
        name: e.name.clone(),
        slots: config.agent.slots,
        labels,
        exe: e.exe.clone(),
        // The same clock as remote agents: a node goes `down` after 3 silent intervals.
        heartbeat: config.discovery.interval,
        retention: config.jobs.retention,
        lost_after: config.nodes.lost_after,
        log_endpoint: None,
        run_as,
        cgroups: config.agent.cgroups,
        port_range: config.agent.ports()?,
        process_log_max: config.agent.process_log_max,
        process_log_keep: config.agent.process_log_keep,
        stop_processes: config.agent.stop_processes,
    })
}

/// While no user exists, writes a fresh one-time setup code (mode 0600) and stores its hash.
fn write_setup_code(app: &App) -> Result<Option<PathBuf>, String> {
    use std::io::Write;
    if !app.store.users().map_err(|e| e.to_string())?.is_empty() {
        return Ok(None);
    }
    let code = crate::auth::random_hex(12);
    app.store
        .set_meta(
            muster_store::SETUP_CODE_KEY,
            Some(&crate::auth::sha256_hex(&code)),
        )
        .map_err(|e| e.to_string())?;
    let path = app.config.data_dir.join("setup-code");
    let _ = std::fs::remove_file(&path);
    let mut f = muster_wire::perms::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(f, "{code}").map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(path))
}

/// The server's side of discovery (SPEC §5): the listener that judges and counts node beacons
/// (hints only: nothing here ever calls an address a beacon gave), and the server's own beacon of
/// its URL, signed with its Ed25519 key (made at first start: join tokens carry its public half).
fn discovery(
    app: &Arc<App>,
    url: &str,
    stop: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, String> {
    use muster_wire::beacon;
    let c = &app.config.discovery;
    let key = crate::discovery::server_key(&app.config.data_dir)
        .map_err(|e| format!("cannot make the server key: {e}"))?;
    let cluster_key = crate::discovery::cluster_key(&app.config)
        .map_err(|e| format!("cannot make the cluster key: {e}"))?;
    let dest = beacon::destination(&c.broadcast, c.port).map_err(|e| e.to_string())?;
    let socket = beacon::bind_listener(c.port)
        .map_err(|e| format!("cannot listen for beacons on udp port {}: {e}", c.port))?;
    let sender =
        beacon::bind_sender().map_err(|e| format!("cannot open the beacon socket: {e}"))?;
    let listener = crate::discovery::Listener::new(cluster_key, app.metrics.discovery.clone());
    let announcer = crate::discovery::ServerAnnouncer {
        key,
        url: url.to_string(),
        interval: c.interval,
        dest,
    };
    tracing::info!(
        "discovery: hearing beacons on udp port {}, beaconing {url} to {dest}",
        c.port
    );
    Ok(vec![
        tokio::spawn(listener.run(socket, stopped(stop.clone()))),
        tokio::spawn(announcer.run(sender, stopped(stop))),
    ])
}
