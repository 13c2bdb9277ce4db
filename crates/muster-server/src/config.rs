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
    /// After a failed login the next attempt from that user or address waits this long, doubling
    /// with each further failure (at most 30 s).
    #[serde(with = "dur")]
    pub login_delay: Duration,
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
    /// free port, told to the server over the agent's connection); empty: no endpoint (logs then
    /// travel over the agent's own connection).
    pub listen: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            name: String::new(),
            servers: Vec::new(),
            slots: 0,
            labels: BTreeMap::new(),
            run_as: String::new(),
            listen: "0.0.0.0:0".into(),
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
}

/// `[hq]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HqConfig {
    /// The repository's path; empty: `<data_dir>/hq`.
    pub path: String,
    /// A remote to sync with.
    pub remote: String,
}

/// `[alerts]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Where alerts are POSTed as JSON; empty: nowhere.
    pub webhook_url: String,
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
        }
    }
}

impl Default for PulseConfig {
    fn default() -> Self {
        PulseConfig {
            interval: Duration::from_secs(5),
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
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            password_hash: "argon2id".into(),
            session_ttl: Duration::from_secs(30 * 86_400),
            login_delay: Duration::from_millis(250),
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
            && self.agent.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(format!(
                "agent.listen = {:?} is not an address like 0.0.0.0:7071 (or empty for no log endpoint)",
                self.agent.listen
            ));
        }
        if self.server.tls_cert.is_empty() != self.server.tls_key.is_empty() {
            return Err(
                "server.tls_cert and server.tls_key go together: set both or neither".into(),
            );
        }
        if self.jobs.log_max < 1024 {
            return Err("jobs.log_max must be at least 1024 bytes".into());
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
