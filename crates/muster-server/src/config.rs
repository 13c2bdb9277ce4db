//! The one configuration struct (SPEC §12): `muster.toml`, overridden by `MUSTER_<SECTION>__<KEY>`
//! environment variables (plus the aliases `MUSTER_DATA_DIR` and `MUSTER_STORE`), overridden by
//! flags. Unknown keys are errors that name the key.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The effective configuration of a muster process.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where muster keeps its state: the SQLite file, blobs, the agent's job logs, the setup code.
    pub data_dir: PathBuf,
    /// The HTTP server.
    pub server: ServerConfig,
    /// The store of record.
    pub store: StoreConfig,
    /// Accounts and passwords.
    pub auth: AuthConfig,
    /// Per-run performance logs.
    pub perf: PerfConfig,
    /// The server's main loop.
    pub pulse: PulseConfig,
    /// The clean-up loop.
    pub reaper: ReaperConfig,
    /// UDP discovery.
    pub discovery: DiscoveryConfig,
    /// The node agent (also the embedded one of `muster up`).
    pub agent: AgentConfig,
    /// The node registry.
    pub nodes: NodesConfig,
    /// The job manager.
    pub jobs: JobsConfig,
    /// Headquarters, the git repository of desired state.
    pub hq: HqConfig,
    /// Notifications to operators.
    pub alerts: AlertsConfig,
    /// Models: uploads, versions, predict routing.
    pub models: ModelsConfig,
    /// Services (HQ's `services/`).
    pub services: ServicesConfig,
}

/// `[server]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The address the HTTP server binds.
    pub listen: String,
    /// Worker threads of the async runtime (0: one per core).
    pub workers: usize,
    /// The URL that join commands and jobs (`MUSTER_URL`) are given; empty: derived from `listen`.
    pub advertise_url: String,
    /// Proxies whose `X-Forwarded-For` is believed (addresses).
    pub trusted_proxies: Vec<String>,
    /// The leader lease's lifetime: a dead leader is replaced after at most this long.
    #[serde(with = "dur")]
    pub lease_ttl: Duration,
    /// A certificate chain (PEM) for browsers and the CLI on `https://`, with `tls_key`; read
    /// again every day, so renewed files take effect. Empty: TLS clients get the cluster's own
    /// certificate (agents always do: they ask for `server.muster`).
    pub tls_cert: String,
    /// The private key (PEM, PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    pub tls_key: String,
    /// The largest request body, in bytes (a job tree of 100,000 jobs takes a few MiB); a
    /// bigger one is refused with 413 before it is parsed.
    pub body_max: usize,
}

/// `[store]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `memory://`, `sqlite://PATH` or `redis://HOST:PORT/DB`; empty: `sqlite://<data_dir>/muster.db`.
    pub url: String,
    /// The blob store's directory (logs, bundles); empty: `<data_dir>/blobs`. Servers of one
    /// cluster share it (a shared path).
    pub blob_dir: String,
}

/// `[auth]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The hash for new passwords: `argon2id` (default), `scrypt`, `pbkdf2-sha256`, `bcrypt`.
    pub password_hash: String,
    /// How long a login token lasts.
    #[serde(with = "dur")]
    pub session_ttl: Duration,
    /// After a failed login of a user from an address, the next attempt of that user from that
    /// address waits this long, doubling with each further failure (at most 30 s). Other
    /// addresses are not slowed, and an address the user logged in from lately is never slowed.
    #[serde(with = "dur")]
    pub login_delay: Duration,
    /// Failed logins of one user per hour, from all addresses together, after which that user's
    /// attempts wait (except from addresses the user logged in from lately): against guessing
    /// spread over many addresses.
    pub login_user_limit: u32,
    /// Failed logins from one address per hour, of all users together, after which attempts
    /// from it wait: against one address trying many users.
    pub login_address_limit: u32,
}

/// `[perf]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PerfConfig {
    /// Write `perf/logs/<n>/<pid>.log` with one line per timed call.
    pub enabled: bool,
}

/// `[pulse]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PulseConfig {
    /// How often the watchers run.
    #[serde(with = "dur")]
    pub interval: Duration,
    /// How long the pulse waits for one watcher before going on without it (it keeps running,
    /// and is skipped until it ends).
    #[serde(with = "dur")]
    pub watcher_timeout: Duration,
}

/// `[reaper]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReaperConfig {
    /// How often deleted things and expired jobs are cleaned up.
    #[serde(with = "dur")]
    pub interval: Duration,
}

/// `[discovery]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// Whether beacons are sent and heard (`muster up` never broadcasts).
    pub enabled: bool,
    /// The UDP port of beacons.
    pub port: u16,
    /// Where beacons are sent.
    pub broadcast: String,
    /// How often a beacon is sent.
    #[serde(with = "dur")]
    pub interval: Duration,
    /// The file holding the cluster's HMAC key.
    pub cluster_key_file: String,
}

/// `[agent]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The node's name; empty: the host name.
    pub name: String,
    /// Servers to connect to.
    pub servers: Vec<String>,
    /// How many jobs run at once (0: twice the cores).
    pub slots: u32,
    /// The node's labels (`type`, `rack`, `workspaces`...).
    pub labels: BTreeMap<String, String>,
    /// An unprivileged user to run jobs as (the agent must run as root; supplementary groups are
    /// dropped, HOME/USER/LOGNAME set, the working directory is the user's home or `/`); empty:
    /// the agent's own user.
    pub run_as: String,
    /// Where the agent serves its job logs to the servers (TLS under the cluster CA; port 0: any
    /// free port, told to the server over the agent's connection). `auto` (the default): any
    /// port on the address the agent reaches its first server from, so the endpoint is open on
    /// that network only; an address like `0.0.0.0:7071` binds that; empty: no endpoint (logs
    /// then travel over the agent's own connection).
    pub listen: String,
    /// Whether each job attempt gets a cgroup v2 of its own, where the agent finds one it can
    /// write (under its own cgroup; not on cgroup v1 hosts or with a read-only `/sys/fs/cgroup`):
    /// the daemons a job leaves are then killed even if its supervisor dies. Without it, the
    /// supervisor (a child subreaper) still kills them when the job ends.
    pub cgroups: bool,
    /// The ports the agent gives long-running processes (`MUSTER_PORT_<NAME>`, `PORT`), as
    /// `LOW-HIGH`, inclusive.
    pub port_range: String,
    /// A long-running process's log is rotated at this many bytes...
    pub process_log_max: u64,
    /// ...keeping this many rotated files (`log.1` the newest).
    pub process_log_keep: u32,
    /// Whether the agent stops its long-running processes when it stops (`muster agent
    /// --stop-processes`); by default they run on under their supervisors and are re-adopted.
    pub stop_processes: bool,
}

impl AgentConfig {
    /// `port_range` as numbers.
    pub fn ports(&self) -> Result<(u16, u16), String> {
        let bad = || {
            format!(
                "agent.port_range = {:?} is not a range like 20000-29999",
                self.port_range
            )
        };
        let (lo, hi) = self.port_range.split_once('-').ok_or_else(bad)?;
        let (lo, hi): (u16, u16) = (
            lo.trim().parse().map_err(|_| bad())?,
            hi.trim().parse().map_err(|_| bad())?,
        );
        if lo == 0 || hi < lo {
            return Err(bad());
        }
        Ok((lo, hi))
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            name: String::new(),
            servers: Vec::new(),
            slots: 0,
            labels: BTreeMap::new(),
            run_as: String::new(),
            listen: "auto".into(),
            cgroups: true,
            port_range: "20000-29999".into(),
            process_log_max: 16 << 20,
            process_log_keep: 3,
            stop_processes: false,
        }
    }
}

/// `[nodes]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodesConfig {
    /// A node with no heartbeat for this long is lost and its jobs fail.
    #[serde(with = "dur")]
    pub lost_after: Duration,
}

/// `[jobs]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Between SIGTERM and SIGKILL when a job is aborted or times out.
    #[serde(with = "dur")]
    pub kill_grace: Duration,
    /// The first retry's delay; each further retry doubles it.
    #[serde(with = "dur")]
    pub backoff_base: Duration,
    /// The longest retry delay.
    #[serde(with = "dur")]
    pub backoff_max: Duration,
    /// The largest log of one attempt, in bytes; the rest is cut with a note.
    pub log_max: u64,
    /// How long finished trees and their logs are kept.
    #[serde(with = "dur")]
    pub retention: Duration,
    /// The largest command of one job, in bytes: its `shell` text, or its `exec` arguments
    /// together (each of which Linux limits to 128 KiB). A `shell` text reaches the shell as a
    /// file, so it may be bigger than a command line could be.
    pub command_max: usize,
}

/// `[hq]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HqConfig {
    /// The working copy's path; empty: `<data_dir>/hq`. Made on first start (a new repository,
    /// or a clone of `remote`); an existing directory must be a git repository.
    pub path: String,
    /// A remote to sync with every pulse: a path, a `file://`, `ssh://` or `https://` URL (the
    /// user's own git and ssh configuration applies). Required in cluster mode (a Redis store),
    /// where every server keeps its own clone. Empty: HQ is local only.
    pub remote: String,
    /// The branch HQ follows; empty: `main`.
    pub branch: String,
    /// With it, `POST /api/v1/hq/sync` also accepts no token but an `X-Hub-Signature-256:
    /// sha256=HEX` header, the HMAC-SHA256 of the body under this secret (a git host's push
    /// webhook). Empty: the route needs a token.
    pub webhook_secret: String,
    /// Files larger than this (bytes) that a deploy commits (a model's pickles) go to the blob
    /// store, and HQ gets a small pointer file naming their hash, as git-lfs does. 0: 1 MiB.
    pub max_file_size: u64,
}

/// `[services]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    /// The key file of the services' secrets (`muster services secret set`): 32 random bytes
    /// (hex) that encrypt every stored secret value (ChaCha20-Poly1305), kept apart from the
    /// store. Empty: `<data_dir>/secrets.key`, made (0600) on first use. In cluster mode every
    /// server must use the same key file (copy it to each before they start): a server with
    /// another key cannot read the secrets and fails the steps that use them.
    pub secrets_key_file: String,
}

/// `[alerts]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Where alerts are POSTed as JSON; empty: nowhere.
    pub webhook_url: String,
}

/// `[models]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// The largest bundle upload (a `.tar.gz`), in bytes; the unpacked bundle is bounded by the
    /// archive checks (entries, bytes, ratio).
    pub upload_max: u64,
    /// How many versions of a model before the live one keep their files and environments
    /// (`revert` can go back to them); older ones are removed by the reaper.
    pub keep_versions: u32,
    /// How long a predict call may take, end to end, before it is answered 504.
    #[serde(with = "dur")]
    pub predict_timeout: Duration,
    /// Calls the server keeps in flight to one replica; past it, a call goes to another replica,
    /// and when every one is full it is refused with 503 and `Retry-After` (never queued
    /// without bound).
    pub replica_max_inflight: usize,
    /// How long a deploy's new predictors may take to start and answer their health check.
    #[serde(with = "dur")]
    pub start_timeout: Duration,
    /// How long the drain step waits for the old version's calls in flight.
    #[serde(with = "dur")]
    pub drain_timeout: Duration,
    /// Where nodes keep the models' Python environments; empty: `<node data dir>/models/envs`.
    pub envs_dir: String,
    /// The pip wheel cache of the nodes; empty: `<node data dir>/models/wheels`.
    pub wheels_dir: String,
    /// The ONNX Runtime shared library (`libonnxruntime.so`) that onnx deploys load on every
    /// node, checked by the deploy's environment step (a missing or wrong one fails the deploy
    /// with the reason). Empty: the node's `ORT_DYLIB_PATH` if set, else the `onnxruntime` wheel
    /// installed once per node into the environments' cache.
    pub onnxruntime_lib: String,
    /// The address predictors listen on, on their node (the server reaches them at the node's
    /// address): `0.0.0.0`, or `127.0.0.1` when every node is this server's own machine.
    pub predictor_host: String,
    /// Rows per chunk of a batch (`POST …/batch`) unless the call names `chunk_rows`.
    pub batch_chunk_rows: u64,
    /// Batch chunks this server scores at once, over every batch (the others' jobs wait their
    /// turn): each holds one chunk's rows and its predict call in memory.
    pub batch_parallel: usize,
    /// How long one chunk's predict call may take (a chunk is many rows).
    #[serde(with = "dur")]
    pub batch_timeout: Duration,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            upload_max: 512 << 20,
            keep_versions: 3,
            predict_timeout: Duration::from_secs(30),
            replica_max_inflight: 256,
            start_timeout: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(30),
            envs_dir: String::new(),
            wheels_dir: String::new(),
            onnxruntime_lib: String::new(),
            predictor_host: "0.0.0.0".into(),
            batch_chunk_rows: 10_000,
            batch_parallel: 4,
            batch_timeout: Duration::from_secs(600),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("muster-data"),
            server: ServerConfig::default(),
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            perf: PerfConfig::default(),
            pulse: PulseConfig::default(),
            reaper: ReaperConfig::default(),
            discovery: DiscoveryConfig::default(),
            agent: AgentConfig::default(),
            nodes: NodesConfig::default(),
            jobs: JobsConfig::default(),
            hq: HqConfig::default(),
            alerts: AlertsConfig::default(),
            models: ModelsConfig::default(),
            services: ServicesConfig::default(),
        }
    }
}

impl Default for PulseConfig {
    fn default() -> Self {
        PulseConfig {
            interval: Duration::from_secs(5),
            watcher_timeout: Duration::from_secs(60),
        }
    }
}

impl Default for ReaperConfig {
    fn default() -> Self {
        ReaperConfig {
            interval: Duration::from_secs(600),
        }
    }
}

impl Default for NodesConfig {
    fn default() -> Self {
        NodesConfig {
            lost_after: Duration::from_secs(30),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7070".into(),
            workers: 0,
            advertise_url: String::new(),
            trusted_proxies: Vec::new(),
            lease_ttl: Duration::from_secs(6),
            tls_cert: String::new(),
            tls_key: String::new(),
            body_max: 16 << 20,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            password_hash: "argon2id".into(),
            session_ttl: Duration::from_secs(30 * 86_400),
            login_delay: Duration::from_millis(250),
            login_user_limit: 100,
            login_address_limit: 100,
        }
    }
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            enabled: false,
            port: 47070,
            broadcast: "127.255.255.255".into(),
            interval: Duration::from_secs(2),
            cluster_key_file: String::new(),
        }
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            kill_grace: Duration::from_secs(10),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            log_max: 64 << 20,
            retention: Duration::from_secs(30 * 86_400),
            command_max: muster_core::spec::DEFAULT_COMMAND_BYTES,
        }
    }
}

impl Config {
    /// The store URL in force.
    pub fn store_url(&self) -> String {
        if self.store.url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("muster.db").display())
        } else {
            self.store.url.clone()
        }
    }

    /// Checks values serde cannot check.
    pub fn validate(&self) -> Result<(), String> {
        let known = ["argon2id", "scrypt", "pbkdf2-sha256", "bcrypt"];
        if !known.contains(&self.auth.password_hash.as_str()) {
            return Err(format!(
                "auth.password_hash = {:?} is not one of {}",
                self.auth.password_hash,
                known.join(", ")
            ));
        }
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "server.listen = {:?} is not an address like 127.0.0.1:7070",
                self.server.listen
            ));
        }
        if !self.agent.listen.is_empty()
            && self.agent.listen != "auto"
            && self.agent.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(format!(
                "agent.listen = {:?} is not an address like 0.0.0.0:7071 (or auto, or empty for no log endpoint)",
                self.agent.listen
            ));
        }
        if self.server.tls_cert.is_empty() != self.server.tls_key.is_empty() {
            return Err(
                "server.tls_cert and server.tls_key go together: set both or neither".into(),
            );
        }
        if self.auth.login_user_limit == 0 || self.auth.login_address_limit == 0 {
            return Err(
                "auth.login_user_limit and auth.login_address_limit must be at least 1".into(),
            );
        }
        if self.server.body_max < 4096 {
            return Err("server.body_max must be at least 4096 bytes".into());
        }
        if self.jobs.command_max == 0 {
            return Err("jobs.command_max must be at least 1 byte".into());
        }
        if self.jobs.log_max < 1024 {
            return Err("jobs.log_max must be at least 1024 bytes".into());
        }
        self.agent.ports()?;
        if self.models.keep_versions == 0 || self.models.replica_max_inflight == 0 {
            return Err(
                "models.keep_versions and models.replica_max_inflight must be at least 1".into(),
            );
        }
        if self
            .models
            .predictor_host
            .parse::<std::net::IpAddr>()
            .is_err()
        {
            return Err(format!(
                "models.predictor_host = {:?} is not an IP address like 0.0.0.0",
                self.models.predictor_host
            ));
        }
        if self.agent.process_log_max < 4096 {
            return Err("agent.process_log_max must be at least 4096 bytes".into());
        }
        Ok(())
    }

    /// The effective config as TOML text (`muster config show`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot show config: {e}"))
    }
}

/// Reads `file` (when given and present), then applies environment overrides from `env`
/// (`MUSTER_<SECTION>__<KEY>`, `MUSTER_DATA_DIR`, `MUSTER_STORE`). Flags are applied by the
/// caller on the result. `file_required` makes a missing file an error (an explicit `--config`).
pub fn load(
    file: Option<&Path>,
    file_required: bool,
    env: &[(String, String)],
) -> Result<Config, String> {
    let mut root = toml::Table::new();
    if let Some(path) = file {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                root = text
                    .parse::<toml::Table>()
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !file_required => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    for (k, v) in env {
        let Some(rest) = k.strip_prefix("MUSTER_") else {
            continue;
        };
        let value = parse_env_value(v);
        match rest {
            "DATA_DIR" => {
                root.insert("data_dir".into(), toml::Value::String(v.clone()));
            }
            "STORE" => {
                table(&mut root, "store")?.insert("url".into(), toml::Value::String(v.clone()));
            }
            _ => {
                let Some((section, key)) = rest.split_once("__") else {
                    continue;
                };
                let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
                if key.is_empty() || section.is_empty() {
                    continue;
                }
                table(&mut root, &section)
                    .map_err(|e| format!("environment variable {k}: {e}"))?
                    .insert(key, value);
            }
        }
    }
    let config: Config = Config::deserialize(toml::Value::Table(root)).map_err(|e| {
        let msg = e.to_string();
        format!("config: {}", msg.trim())
    })?;
    config.validate()?;
    Ok(config)
}

fn table<'a>(root: &'a mut toml::Table, name: &str) -> Result<&'a mut toml::Table, String> {
    root.entry(name.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| format!("{name} is not a section"))
}

/// An env value is read as TOML when it parses as a value (numbers, booleans, arrays, inline
/// tables), else as a plain string.
fn parse_env_value(v: &str) -> toml::Value {
    let doc = format!("v = {v}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(v.into())),
        Err(_) => toml::Value::String(v.into()),
    }
}

/// Durations as text: `500ms`, `10s`, `5m`, `2h`, `30d`, or a bare number of seconds.
pub mod dur {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration like 10s, 500ms, 5m, 2h, 30d"))?;
        let secs = match unit.trim() {
            "ms" => n / 1000.0,
            "" | "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86_400.0,
            _ => {
                return Err(format!(
                    "{s:?} is not a duration like 10s, 500ms, 5m, 2h, 30d"
                ))
            }
        };
        Ok(Duration::from_secs_f64(secs))
    }

    pub fn format(d: Duration) -> String {
        let ms = d.as_millis();
        if ms.is_multiple_of(86_400_000) && ms > 0 {
            format!("{}d", ms / 86_400_000)
        } else if ms.is_multiple_of(3_600_000) && ms > 0 {
            format!("{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            format!("{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) if n >= 0.0 => Ok(Duration::from_secs_f64(n)),
            Raw::Num(n) => Err(serde::de::Error::custom(format!("{n} is not a duration"))),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn file_env_and_defaults() {
        let dir = std::env::temp_dir().join(format!("muster-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("muster.toml");
        std::fs::write(
            &f,
            "[jobs]\nkill_grace = \"3s\"\n[server]\nlisten = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        let c = load(
            Some(&f),
            true,
            &env(&[
                ("MUSTER_SERVER__LISTEN", "127.0.0.1:9100"),
                ("MUSTER_DATA_DIR", "/tmp/x"),
                ("MUSTER_JOB_ID", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.jobs.kill_grace, Duration::from_secs(3));
        assert_eq!(c.server.listen, "127.0.0.1:9100");
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.jobs.log_max, 64 << 20);
        let shown = c.to_toml();
        assert!(shown.contains("kill_grace = \"3s\""), "{shown}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = load(None, false, &env(&[("MUSTER_JOBS__KILL_GRAYCE", "3s")])).unwrap_err();
        assert!(e.contains("kill_grayce"), "{e}");
        let e = load(None, false, &env(&[("MUSTER_NOPE__X", "1")])).unwrap_err();
        assert!(e.contains("nope"), "{e}");
        let e = load(None, false, &env(&[("MUSTER_AUTH__PASSWORD_HASH", "md5")])).unwrap_err();
        assert!(e.contains("md5"), "{e}");
        let e = load(None, false, &env(&[("MUSTER_JOBS__KILL_GRACE", "soon")])).unwrap_err();
        assert!(e.contains("duration"), "{e}");
    }
}
