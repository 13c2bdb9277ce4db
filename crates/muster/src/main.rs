//! The `muster` binary: wiring only. `up` (server + embedded agent + SQLite), `server`,
//! `supervise` (the per-attempt supervisor, started by agents), `predictor` (one model replica,
//! [`predictor`]), `config show`, and the client commands of [`cli`].

mod cli;
mod predictor;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use muster_agent::{self as agent, AgentOptions};
use muster_server::config::{self, Config};

use std::path::PathBuf;

use std::time::Instant;

/// muster: deploy and run services, ML models and scripts on a fleet of machines.
#[derive(Parser)]
#[command(name = "muster", version, about, after_help = cli::EXIT_STATUS)]
struct Opts {
    /// How the server and agent write their logs to stderr: `text` (for people) or `json` (one
    /// object a line, for machines). Which messages: RUST_LOG, e.g. `info` or
    /// `warn,muster_server=debug`.
    #[arg(long, global = true, env = "MUSTER_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The format of `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The log subscriber: RUST_LOG-style targets (`info` by default) to stderr, as text or JSON.
fn init_logging(format: LogFormat) -> Result<()> {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let filter: Targets = if spec.trim().is_empty() {
        Targets::new().with_default(tracing::Level::INFO)
    } else {
        spec.parse().with_context(|| {
            format!("RUST_LOG={spec:?} is not a filter like `info` or `warn,muster_server=debug`")
        })?
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
        LogFormat::Text => registry
            .with(fmt.with_ansi(std::io::stderr().is_terminal()))
            .try_init(),
    }
    .map_err(|e| anyhow::anyhow!("cannot start logging: {e}"))
}

#[derive(Subcommand)]
enum Cmd {
    /// Start everything on this machine: server, embedded agent, SQLite store.
    Up(ServeArgs),
    /// Start the control plane alone.
    Server(ServeArgs),
    /// Run a node agent that takes jobs from muster servers.
    Agent(AgentArgs),
    /// Move the store's contents to another engine (stop the servers first).
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
    /// Show the effective configuration.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Serve one replica of a Python model: POST /predict through its worker processes.
    Predictor(predictor::PredictorArgs),
    /// Run one job attempt (started by agents, not by hand).
    #[command(hide = true)]
    Supervise {
        /// Be the agent's launcher instead, forking a supervisor for every directory it is given
        /// (DIR is then the agent's data dir, for ps).
        #[arg(long)]
        launcher: bool,
        dir: PathBuf,
        /// Room for the forked supervisors' command lines (spaces).
        #[arg(hide = true)]
        _room: Option<String>,
    },
    #[command(flatten)]
    Client(cli::ClientCmd),
}

/// Flags of `muster agent`.
#[derive(Args, Clone, Default)]
struct AgentArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// A server to connect to (repeat for several; default: agent.servers).
    #[arg(long = "server")]
    servers: Vec<String>,
    /// A join token from `muster nodes join-token` (needed only on the first start).
    #[arg(long, env = "MUSTER_JOIN_TOKEN")]
    join_token: Option<String>,
    /// The node's name (default: agent.name, else the host name).
    #[arg(long)]
    name: Option<String>,
    /// A label, KEY=VALUE (repeat for several; added to agent.labels).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// How many jobs run at once (default: agent.slots, else twice the cores).
    #[arg(long)]
    slots: Option<u32>,
    /// Stop the node's long-running processes when the agent stops (agent.stop_processes);
    /// without, they run on under their supervisors and the next agent re-adopts them.
    #[arg(long)]
    stop_processes: bool,
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Copy every tree, job, log record, user, token, node and workspace from one store to
    /// another, e.g. --from sqlite://muster-data/muster.db --to redis://127.0.0.1:6379/0.
    Migrate {
        /// The store to read.
        #[arg(long)]
        from: String,
        /// The store to write.
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the configuration in force (file + env + flags) as TOML.
    Show(ServeArgs),
}

/// Flags shared by the server commands; they override the file and the environment.
#[derive(Args, Clone, Default)]
struct ServeArgs {
    /// The config file (default: <data-dir>/muster.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where muster keeps its state (env MUSTER_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The address to listen on, e.g. 127.0.0.1:7070 (port 0: any free port).
    #[arg(long)]
    listen: Option<String>,
    /// The store URL: memory://, sqlite://PATH (env MUSTER_STORE).
    #[arg(long)]
    store: Option<String>,
}

fn load_config(a: &ServeArgs) -> Result<Config> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    // The data dir decides where the default config file is, so it is read first.
    let data_dir = a
        .data_dir
        .clone()
        .or_else(|| std::env::var_os("MUSTER_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("muster-data"));
    let (file, required) = match &a.config {
        Some(f) => (f.clone(), true),
        None => (data_dir.join("muster.toml"), false),
    };
    let mut c = config::load(Some(&file), required, &env).map_err(anyhow::Error::msg)?;
    if let Some(d) = &a.data_dir {
        c.data_dir = d.clone();
    }
    if let Some(l) = &a.listen {
        c.server.listen = l.clone();
    }
    if let Some(s) = &a.store {
        c.store.url = s.clone();
    }
    c.validate().map_err(anyhow::Error::msg)?;
    Ok(c)
}

/// Caps glibc's malloc arenas at one per core (its default is eight per core). A server's
/// connections are made on one worker thread and freed on another; with many arenas the freed
/// memory stays spread over them. Measured with 1,000 websocket log follows of one job: 23 MB
/// added with the default, 12 MB with one arena per core on this 2-core machine. And a fixed
/// mmap threshold of 4 MiB (glibc raises its own up to 32 MiB after the first big free): big
/// passing buffers, such as a login's 19 MiB of Argon2, go back to the system when freed
/// instead of staying in the heap (a logged-in server at rest: 15 MB, not 33 to 52 MB).
fn cap_malloc_arenas() {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    // SAFETY: mallopt only sets a tunable; called first thing, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, cores.max(2) as libc::c_int);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

fn main() {
    cap_malloc_arenas();
    let opts = Opts::parse();
    if let Err(e) = init_logging(opts.log_format) {
        eprintln!("muster: {e:#}");
        std::process::exit(2);
    }
    let res = match opts.cmd {
        Cmd::Supervise { launcher: true, .. } => std::process::exit(agent::launcher::main()),
        Cmd::Supervise { dir, .. } => std::process::exit(agent::supervisor::main(
            dir,
            agent::supervisor::secrets_from_env(),
        )),
        Cmd::Up(a) => serve(a, true),
        Cmd::Server(a) => serve(a, false),
        Cmd::Agent(a) => agent_main(a),
        Cmd::Predictor(a) => predictor::main(a),
        Cmd::Store {
            cmd: StoreCmd::Migrate { from, to },
        } => store_migrate(&from, &to),
        Cmd::Config {
            cmd: ConfigCmd::Show(a),
        } => load_config(&a).map(|c| print!("{}", c.to_toml())),
        Cmd::Client(c) => cli::run(c),
    };
    if let Err(e) = res {
        eprintln!("muster: {e:#}");
        std::process::exit(1);
    }
}

fn serve(a: ServeArgs, embedded_agent: bool) -> Result<()> {
    let t0 = Instant::now();
    let config = load_config(&a)?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if config.server.workers > 0 {
        rt.worker_threads(config.server.workers);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&config.server.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (set --listen or server.listen)",
                    config.server.listen
                )
            })?;
        let embedded = if embedded_agent {
            let name = if config.agent.name.is_empty() {
                hostname()
            } else {
                config.agent.name.clone()
            };
            Some(muster_server::server::Embedded {
                name,
                exe: std::env::current_exe().context("cannot find the muster binary")?,
            })
        } else {
            None
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = muster_server::Server::start(
            config,
            listener,
            async move {
                let _ = stop_rx.await;
            },
            embedded,
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let url = server.url.clone();
        tracing::info!(%url, "muster is up");
        println!(
            "muster is up at {url}/ (started in {} ms)",
            t0.elapsed().as_millis()
        );
        if let Some(path) = &server.setup_code {
            println!(
                "first start: open {url}/ and create the admin with the one-time code in {}",
                path.display()
            );
            println!(
                "  or: muster setup --server {url} --code-file {} --username admin",
                path.display()
            );
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        shutdown_signal().await;
        tracing::info!("stopping; running jobs stay with their supervisors");
        let _ = stop_tx.send(());
        server.stopped().await;
        Ok(())
    })
}

async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// `muster agent`: joins with a join token on first start (the node's credential is kept in
/// `<data-dir>/agent/credential`, the server it joined in `<data-dir>/agent/servers`, the
/// cluster key in `<data-dir>/agent/cluster-key`), then serves its servers over the agent
/// protocol. With no server given or saved, it finds the server by its beacon, signed by the key
/// the join token carries.
fn agent_main(a: AgentArgs) -> Result<()> {
    // For an agent, --listen is where it serves its job logs (agent.listen), not server.listen;
    // an empty one: no log endpoint (logs travel over the agent's connection).
    let mut serve = a.serve.clone();
    let listen = serve.listen.take();
    let mut config = load_config(&serve)?;
    let job_user = run_as(&config.agent.run_as)?;
    if let Some(l) = &listen {
        if !l.is_empty() && l != "auto" {
            l.parse::<std::net::SocketAddr>().with_context(|| {
                format!("--listen {l:?} is not an address like 0.0.0.0:7071 (or auto, or \"\" for no log endpoint)")
            })?;
        }
        config.agent.listen = l.clone();
    }
    if !a.servers.is_empty() {
        config.agent.servers = a.servers.clone();
    }
    if let Some(n) = &a.name {
        config.agent.name = n.clone();
    }
    if let Some(s) = a.slots {
        config.agent.slots = s;
    }
    if a.stop_processes {
        config.agent.stop_processes = true;
    }
    for l in &a.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l:?} is not KEY=VALUE"))?;
        config.agent.labels.insert(k.to_string(), v.to_string());
    }
    let name = if config.agent.name.is_empty() {
        hostname()
    } else {
        config.agent.name.clone()
    };
    muster_core::names::check_name("node name", &name).map_err(anyhow::Error::msg)?;
    let dir = config.data_dir.join("agent");
    muster_wire::perms::create_dir_all(&dir)
        .with_context(|| format!("cannot make {}", dir.display()))?;
    muster_wire::perms::repair_all([config.data_dir.as_path()]);
    let servers_path = dir.join("servers");
    if config.agent.servers.is_empty() {
        // The server this agent joined, when it was found by its beacon.
        config.agent.servers = agent::join::saved_servers(&dir);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let credential = match agent::join::credential(&dir) {
        Some(c) => c,
        None => {
            let token = a.join_token.clone().context(
                "this agent has not joined yet: give --join-token (make one with `muster nodes join-token` on the server)",
            )?;
            if config.agent.servers.is_empty() {
                let key = muster_wire::beacon::token_server_key(&token).context(
                    "give the server to join: muster agent --server http://HOST:7070 --join-token TOKEN (this token carries no server key to find it by its beacon)",
                )?;
                let url = rt.block_on(find_server_by_beacon(&config.discovery, key))?;
                tracing::info!("found the server {url} by its beacon");
                config.agent.servers = vec![url];
            }
            let fingerprint = muster_wire::beacon::token_ca_fingerprint(&token).context(
                "this join token carries no cluster CA fingerprint: make a new one with `muster nodes join-token`",
            )?;
            let joined = rt
                .block_on(agent::join::join(
                    &config.agent.servers,
                    &token,
                    fingerprint,
                    &name,
                ))
                .map_err(anyhow::Error::msg)?;
            agent::join::save(&dir, &joined, fingerprint).with_context(|| {
                format!("cannot keep the node's credential in {}", dir.display())
            })?;
            tracing::info!(node = %name, "joined as node {name:?} ({})", joined.node_id);
            joined.credential
        }
    };
    let fingerprint = agent::join::ca_fingerprint(&dir).map_err(anyhow::Error::msg)?;
    let log_endpoint = match config.agent.listen.as_str() {
        "" => None,
        "auto" => match agent::link::local_addr_towards(&config.agent.servers) {
            Ok(ip) => Some((std::net::SocketAddr::new(ip, 0), fingerprint)),
            Err(e) => {
                tracing::warn!("no log endpoint: {e}; logs travel over the agent's connection");
                None
            }
        },
        l => Some((l.parse()?, fingerprint)),
    };
    let opts = AgentOptions {
        run_as: job_user,
        log_endpoint,
        dir,
        name,
        slots: config.agent.slots,
        labels: config.agent.labels.clone(),
        exe: std::env::current_exe().context("cannot find the muster binary")?,
        heartbeat: config.discovery.interval,
        retention: config.jobs.retention,
        lost_after: config.nodes.lost_after,
        cgroups: config.agent.cgroups,
        port_range: config.agent.ports().map_err(anyhow::Error::msg)?,
        process_log_max: config.agent.process_log_max,
        process_log_keep: config.agent.process_log_keep,
        stop_processes: config.agent.stop_processes,
    };
    if config.agent.servers.is_empty() {
        anyhow::bail!(
            "give the server to connect to: muster agent --server http://HOST:7070 (no server is configured or saved in {})",
            servers_path.display()
        );
    }
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let beacon = if config.discovery.enabled {
            agent_beacon(&config, &opts, stop_rx.clone())
        } else {
            None
        };
        let link = agent::ws_link(config.agent.servers.clone(), credential, fingerprint);
        println!(
            "muster agent {} is running (servers: {})",
            opts.name,
            config.agent.servers.join(", ")
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let res = agent::run(opts, link, stopped(stop_rx))
            .await
            .context("agent");
        if let Some(b) = beacon {
            b.abort();
        }
        res
    })
}

/// `agent.run_as`, checked: `None` when empty.
fn run_as(name: &str) -> Result<Option<String>> {
    if name.is_empty() {
        return Ok(None);
    }
    agent::supervisor::check_run_as(name).map_err(anyhow::Error::msg)?;
    Ok(Some(name.to_string()))
}

/// Waits for a fresh beacon signed by the server's key (from the join token); its URL.
async fn find_server_by_beacon(
    c: &config::DiscoveryConfig,
    key: muster_wire::beacon::VerifyingKey,
) -> Result<String> {
    let socket = muster_wire::beacon::bind_listener(c.port)
        .with_context(|| format!("cannot listen for server beacons on udp port {}", c.port))?;
    tracing::info!(
        "no --server given: waiting for the server's beacon on udp port {}",
        c.port
    );
    agent::discovery::find_server(&socket, &key, shutdown_signal())
        .await
        .context("stopped before a server beacon was heard")
}

/// The agent's own beacon (with `discovery.enabled`), signed with the cluster key it got when
/// it joined; `None` (with a note) when it has no key or node id yet.
fn agent_beacon(
    config: &Config,
    opts: &AgentOptions,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    use muster_wire::beacon as d;
    let dir = &opts.dir;
    let key = match d::read_key(&dir.join("cluster-key")) {
        Ok(Some(k)) => k,
        Ok(None) => {
            tracing::warn!("no cluster key (joined before discovery?): sending no beacons");
            return None;
        }
        Err(e) => {
            tracing::warn!("{e}: sending no beacons");
            return None;
        }
    };
    let node_id = std::fs::read_to_string(dir.join("node-id")).unwrap_or_default();
    let (dest, socket) = match (
        d::destination(&config.discovery.broadcast, config.discovery.port),
        d::bind_sender(),
    ) {
        (Ok(dest), Ok(s)) => (dest, s),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("cannot send beacons: {e}");
            return None;
        }
    };
    let announcer = agent::discovery::NodeAnnouncer {
        cluster_key: key,
        node_id: node_id.trim().to_string(),
        name: opts.name.clone(),
        api: String::new(),
        labels: opts.labels.clone(),
        interval: config.discovery.interval,
        dest,
    };
    Some(tokio::spawn(announcer.run(socket, stopped(stop))))
}

fn store_migrate(from: &str, to: &str) -> Result<()> {
    if from == to {
        anyhow::bail!("--from and --to name the same store");
    }
    let src = muster_store::open(from).with_context(|| format!("cannot open {from}"))?;
    let dst = muster_store::open(to).with_context(|| format!("cannot open {to}"))?;
    let m = muster_store::migrate::migrate(&*src, &*dst, |m| {
        eprint!("\rmigrating: {} trees, {} jobs", m.trees, m.jobs)
    })?;
    eprintln!();
    println!(
        "migrated {} trees ({} jobs, {} log records), {} users, {} tokens, {} nodes, {} workspace records; {} trees were there already",
        m.trees, m.jobs, m.logs, m.users, m.tokens, m.nodes, m.docs, m.skipped_trees
    );
    println!("the blob store (logs) stays in the data dir; point the servers at {to} with --store or [store] url");
    Ok(())
}

fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if muster_core::names::check_name("node", &name).is_ok() {
        name
    } else {
        "local".into()
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
