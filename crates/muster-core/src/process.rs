//! Long-running processes (SPEC §5a): the spec a client submits, its validation into a
//! [`ProcessDef`], and [`Supervision`], the state machine a process supervisor runs (start,
//! health, exit, restart with backoff and jitter within a restart window, stop).
//!
//! Pure like the rest of the core: the caller passes the time (milliseconds) and the jitter in.

use crate::job::{Run, Tags};
use crate::names::check_name;
use crate::time::Ts;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A duration as a client writes it: `"100ms"`, `"2s"`, `"5m"`, `"1h"`, or a number of seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DurText {
    Secs(f64),
    Text(String),
}

impl DurText {
    /// Milliseconds, or why not (without quoting the input).
    pub fn ms(&self, what: &str) -> Result<u64, String> {
        let bad = || format!("{what} is not a duration like 500ms, 10s, 5m, 2h");
        let secs = match self {
            DurText::Secs(n) => *n,
            DurText::Text(s) => {
                let s = s.trim();
                let split = s
                    .find(|c: char| !c.is_ascii_digit() && c != '.')
                    .unwrap_or(s.len());
                let (num, unit) = s.split_at(split);
                let n: f64 = num.parse().map_err(|_| bad())?;
                match unit.trim() {
                    "ms" => n / 1000.0,
                    "" | "s" => n,
                    "m" => n * 60.0,
                    "h" => n * 3600.0,
                    "d" => n * 86_400.0,
                    _ => return Err(bad()),
                }
            }
        };
        if !(0.0..=365.0 * 86_400.0).contains(&secs) {
            return Err(bad());
        }
        Ok((secs * 1000.0).round() as u64)
    }
}

/// When a process is started again after it ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// Whatever the way it ended.
    #[default]
    Always,
    /// Unless it exited with code 0.
    OnFailure,
    /// Never: an exit is final.
    Never,
}

/// The health check of a submitted spec: one of `tcp`, `http` (with `port`) or `exec`, with
/// optional timings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<DurText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<DurText>,
}

/// Resource limits as submitted: `memory` (`"256M"`, `"1G"`, bytes), `cpu` (cores), `pids`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

/// A process as a client submits it (SPEC §5a).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_base: Option<DurText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_max: Option<DurText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_window: Option<DurText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_grace: Option<DurText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
}

/// The restart policy of a validated process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub mode: RestartMode,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// At most this many restarts within `window_ms`; one more and the process is `failed`.
    pub max_restarts: u32,
    pub window_ms: u64,
}

impl RestartPolicy {
    /// The delay before the `n`th restart in a row (1 for the first): `backoff_base` doubling up
    /// to `backoff_max`, with jitter (`jitter` in [0, 1) takes it down to half at most).
    pub fn delay_ms(&self, n: u32, jitter: f64) -> u64 {
        let exp = n.saturating_sub(1).min(40);
        let full = self
            .backoff_base_ms
            .saturating_mul(1u64 << exp)
            .min(self.backoff_max_ms.max(self.backoff_base_ms));
        full / 2 + ((full as f64 / 2.0) * jitter.clamp(0.0, 1.0)) as u64
    }
}

/// What a health check does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Connect to the named port.
    Tcp { port: String },
    /// `GET path` on the named port, expecting 2xx.
    Http { path: String, port: String },
    /// Run a command, expecting exit code 0.
    Exec { argv: Vec<String> },
}

/// A validated health check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub check: Check,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Failed checks in a row that make the process unhealthy.
    pub failures: u32,
    /// After a start, failed checks do not count for this long.
    pub grace_ms: u64,
}

/// Validated limits (applied through a cgroup v2 where the node has one).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.memory.is_none() && self.cpu.is_none() && self.pids.is_none()
    }
}

/// A validated process: what the server stores and sends to an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessDef {
    pub name: String,
    pub tags: Tags,
    pub run: Run,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<String>,
    pub restart: RestartPolicy,
    #[serde(default)]
    pub health: Option<Health>,
    /// The signal's name without `SIG` (`TERM`, `INT`, ...).
    pub stop_signal: String,
    pub kill_grace_ms: u64,
    #[serde(default)]
    pub limits: Limits,
    /// The service whose secrets its env names (`${secrets.KEY}`): set by the services layer,
    /// never from a spec; the server puts the values in at each start, for the node only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_of: Option<String>,
}

/// Defaults of a process spec that the server's config gives.
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub kill_grace_ms: u64,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            backoff_base_ms: 100,
            backoff_max_ms: 30_000,
            kill_grace_ms: 10_000,
        }
    }
}

/// Signals a process may be stopped with.
pub const STOP_SIGNALS: &[&str] = &["TERM", "INT", "QUIT", "HUP", "KILL", "USR1", "USR2"];

/// The most ports one process may ask for.
pub const MAX_PORTS: usize = 16;

/// The environment variable that carries the port `name`: `MUSTER_PORT_<NAME>`.
pub fn port_env(name: &str) -> String {
    format!(
        "MUSTER_PORT_{}",
        name.to_ascii_uppercase().replace(['-', '.'], "_")
    )
}

fn check_port_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    if b.is_empty()
        || b.len() > 32
        || !b[0].is_ascii_lowercase()
        || !b
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
    {
        return Err(
            "a port name must be 1-32 lowercase letters, digits or '_', starting with a letter"
                .into(),
        );
    }
    Ok(())
}

/// Parses a memory size: bytes as a number, or text with a unit (`K`, `M`, `G`, `T`, binary, with
/// an optional `i`/`B`: `"64M"`, `"1Gi"`, `"512KB"`).
pub fn parse_memory(v: &serde_json::Value) -> Result<u64, String> {
    let bad = || "limits.memory must be a size like 64M, 1G or a number of bytes".to_string();
    let n = match v {
        serde_json::Value::Number(n) => n.as_u64().ok_or_else(bad)?,
        serde_json::Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let n: u64 = num.parse().map_err(|_| bad())?;
            let unit = unit
                .trim()
                .trim_end_matches(['B', 'b'])
                .trim_end_matches('i');
            let mul: u64 = match unit.to_ascii_uppercase().as_str() {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(bad()),
            };
            n.checked_mul(mul).ok_or_else(bad)?
        }
        _ => return Err(bad()),
    };
    if n < 1 << 20 {
        return Err("limits.memory must be at least 1M".into());
    }
    Ok(n)
}

/// Validates a submitted process; `default_workspace` fills a missing workspace tag. Errors are
/// short sentences that do not quote the input.
pub fn validate(
    spec: &ProcessSpec,
    default_workspace: &str,
    d: Defaults,
) -> Result<ProcessDef, String> {
    crate::names::check_job_name(&spec.name)
        .map_err(|_| "name must be 1-200 printable characters".to_string())?;
    let mut tags = spec.tags.clone().unwrap_or_default();
    if tags.workspace.is_empty() {
        tags.workspace = default_workspace.to_string();
    }
    check_name("workspace", &tags.workspace)?;
    let run = match (&spec.exec, &spec.shell) {
        (Some(argv), None) => {
            if argv.is_empty() || argv[0].is_empty() {
                return Err("exec needs a program".into());
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return Err("exec arguments must not hold NUL bytes".into());
            }
            Run::Exec(argv.clone())
        }
        (None, Some(text)) => {
            if text.trim().is_empty() || text.contains('\0') {
                return Err("shell needs a script text".into());
            }
            Run::Shell(text.clone())
        }
        (Some(_), Some(_)) => return Err("give exec or shell, not both".into()),
        (None, None) => return Err("a process needs exec or shell".into()),
    };
    for (k, v) in &spec.env {
        let ok = !k.is_empty()
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
        if !ok || v.contains('\0') {
            return Err("env names must be letters, digits and '_' (not starting with a digit), values without NUL".into());
        }
        if k.starts_with("MUSTER_") || k == "PORT" {
            return Err("env must not set MUSTER_* or PORT: muster sets them".into());
        }
    }
    if let Some(cwd) = &spec.cwd {
        if !cwd.starts_with('/') || cwd.contains('\0') {
            return Err("cwd must be an absolute path".into());
        }
    }
    if let Some(n) = &spec.node {
        check_name("node", n)?;
    }
    let node_selector = spec.node_selector.clone().unwrap_or_default();
    if spec.node.is_some() && !node_selector.is_empty() {
        return Err("give node or node_selector, not both".into());
    }
    if spec.ports.len() > MAX_PORTS {
        return Err(format!("a process may have at most {MAX_PORTS} ports"));
    }
    let mut seen = BTreeSet::new();
    for p in &spec.ports {
        check_port_name(p)?;
        if !seen.insert(p.as_str()) {
            return Err("a port name is given twice".into());
        }
    }
    let base = match &spec.backoff_base {
        Some(t) => t.ms("backoff_base")?,
        None => d.backoff_base_ms,
    };
    let max = match &spec.backoff_max {
        Some(t) => t.ms("backoff_max")?,
        None => d.backoff_max_ms.max(base),
    };
    if max < base {
        return Err("backoff_max must not be less than backoff_base".into());
    }
    let window_ms = match &spec.restart_window {
        Some(t) => t.ms("restart_window")?,
        None => 5 * 60_000,
    };
    if window_ms == 0 {
        return Err("restart_window must be more than 0".into());
    }
    let restart = RestartPolicy {
        mode: spec.restart.unwrap_or_default(),
        backoff_base_ms: base,
        backoff_max_ms: max,
        max_restarts: spec.max_restarts.unwrap_or(5),
        window_ms,
    };
    let health = match &spec.health {
        None => None,
        Some(h) => Some(health(h, &spec.ports)?),
    };
    let stop_signal = match &spec.stop_signal {
        None => "TERM".to_string(),
        Some(s) => {
            let s = s.trim().to_ascii_uppercase();
            let s = s.strip_prefix("SIG").unwrap_or(&s).to_string();
            if !STOP_SIGNALS.contains(&s.as_str()) {
                return Err(format!(
                    "stop_signal must be one of {}",
                    STOP_SIGNALS.join(", ")
                ));
            }
            s
        }
    };
    let kill_grace_ms = match &spec.kill_grace {
        Some(t) => t.ms("kill_grace")?,
        None => d.kill_grace_ms,
    };
    let limits = match &spec.limits {
        None => Limits::default(),
        Some(l) => {
            let memory = l.memory.as_ref().map(parse_memory).transpose()?;
            if let Some(c) = l.cpu {
                if !(0.01..=1024.0).contains(&c) {
                    return Err("limits.cpu must be a number of cores from 0.01 to 1024".into());
                }
            }
            if let Some(p) = l.pids {
                if p == 0 || p > 4_194_304 {
                    return Err("limits.pids must be from 1 to 4194304".into());
                }
            }
            Limits {
                memory,
                cpu: l.cpu,
                pids: l.pids,
            }
        }
    };
    Ok(ProcessDef {
        name: spec.name.clone(),
        tags,
        run,
        env: spec.env.clone(),
        cwd: spec.cwd.clone(),
        node: spec.node.clone(),
        node_selector,
        ports: spec.ports.clone(),
        restart,
        health,
        stop_signal,
        kill_grace_ms,
        limits,
        secrets_of: None,
    })
}

fn health(h: &HealthSpec, ports: &[String]) -> Result<Health, String> {
    let port_of = |named: Option<&String>| -> Result<String, String> {
        match named {
            Some(p) if ports.contains(p) => Ok(p.clone()),
            Some(_) => Err("health names a port the process does not have".into()),
            None if ports.len() == 1 => Ok(ports[0].clone()),
            None => Err("health needs a port: name one of the process's ports".into()),
        }
    };
    let check = match (&h.tcp, &h.http, &h.exec) {
        (Some(p), None, None) => {
            if h.port.is_some() {
                return Err("a tcp health check names its port as tcp = \"<port>\"".into());
            }
            Check::Tcp {
                port: port_of(Some(p))?,
            }
        }
        (None, Some(path), None) => {
            if !path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' ') {
                return Err("an http health check needs a path starting with /".into());
            }
            Check::Http {
                path: path.clone(),
                port: port_of(h.port.as_ref())?,
            }
        }
        (None, None, Some(argv)) => {
            if argv.is_empty() || argv[0].is_empty() || argv.iter().any(|a| a.contains('\0')) {
                return Err("an exec health check needs a program".into());
            }
            Check::Exec { argv: argv.clone() }
        }
        (None, None, None) => return Err("health needs one of tcp, http or exec".into()),
        _ => return Err("health takes one of tcp, http or exec".into()),
    };
    let interval_ms = h
        .interval
        .as_ref()
        .map(|t| t.ms("health.interval"))
        .transpose()?
        .unwrap_or(2000);
    if interval_ms < 10 {
        return Err("health.interval must be at least 10ms".into());
    }
    let timeout_ms = h
        .timeout
        .as_ref()
        .map(|t| t.ms("health.timeout"))
        .transpose()?
        .unwrap_or(1000)
        .max(1);
    let failures = h.failures.unwrap_or(3);
    if failures == 0 {
        return Err("health.failures must be at least 1".into());
    }
    let grace_ms = h
        .grace
        .as_ref()
        .map(|t| t.ms("health.grace"))
        .transpose()?
        .unwrap_or(0);
    Ok(Health {
        check,
        interval_ms,
        timeout_ms,
        failures,
        grace_ms,
    })
}

/// The state of a process (SPEC §5a).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcState {
    /// Not started yet (waiting for a node, or for its supervisor).
    Pending,
    /// Started; its health check has not passed yet.
    Starting,
    /// Running, and its health check passes (or it has none).
    Healthy,
    /// Running, and its health check fails.
    Unhealthy,
    /// Ended; started again after its backoff.
    Restarting,
    /// Stopped on request (or exited 0 where the policy does not restart it).
    Stopped,
    /// Ended for good: it failed where the policy does not restart, or too often.
    Failed,
    /// Its node was lost.
    Lost,
}

impl ProcState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcState::Pending => "pending",
            ProcState::Starting => "starting",
            ProcState::Healthy => "healthy",
            ProcState::Unhealthy => "unhealthy",
            ProcState::Restarting => "restarting",
            ProcState::Stopped => "stopped",
            ProcState::Failed => "failed",
            ProcState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<ProcState> {
        Some(match s {
            "pending" => ProcState::Pending,
            "starting" => ProcState::Starting,
            "healthy" => ProcState::Healthy,
            "unhealthy" => ProcState::Unhealthy,
            "restarting" => ProcState::Restarting,
            "stopped" => ProcState::Stopped,
            "failed" => ProcState::Failed,
            "lost" => ProcState::Lost,
            _ => return None,
        })
    }

    /// No supervisor runs it any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ProcState::Stopped | ProcState::Failed | ProcState::Lost
        )
    }
}

/// How a run of the process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// Killed by the kernel for going over its memory limit.
    Oom,
    /// It could not be started at all (`no such file`, ...).
    CannotStart(String),
}

impl Exit {
    /// The reason it gives a state.
    pub fn reason(&self) -> String {
        match self {
            Exit::Code(c) => format!("exited {c}"),
            Exit::Signal(s) => format!("killed by signal {s}"),
            Exit::Oom => "oom".into(),
            Exit::CannotStart(why) => why.clone(),
        }
    }
}

/// What the supervisor does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Start it again at this time (ms).
    RestartAt(i64),
    /// Nothing more: the state is final.
    Done,
}

/// A run lasting this long counts as a success for the backoff: the next restart after it is a
/// first one again.
pub const STABLE_MS: i64 = 10_000;

/// The state machine of one supervised process. The supervisor feeds it what happens (starts,
/// health results, exits, stop and restart requests) with the time in ms, and does what it says.
#[derive(Clone, Debug)]
pub struct Supervision {
    policy: RestartPolicy,
    health: Option<(u32, u64)>,
    state: ProcState,
    reason: String,
    restarts: u32,
    /// When the restarts counted against the window happened.
    recent: Vec<i64>,
    /// Restarts in a row without a stable run (for the backoff).
    in_a_row: u32,
    failed_checks: u32,
    started_ms: Option<i64>,
    stopping: bool,
    restart_asked: bool,
    /// Why the current run is being killed (an unhealthy check), to report at its exit.
    killed_for: Option<String>,
}

impl Supervision {
    pub fn new(policy: RestartPolicy, health: Option<&Health>) -> Supervision {
        Supervision {
            policy,
            health: health.map(|h| (h.failures, h.grace_ms)),
            state: ProcState::Pending,
            reason: "waiting to start".into(),
            restarts: 0,
            recent: Vec::new(),
            in_a_row: 0,
            failed_checks: 0,
            started_ms: None,
            stopping: false,
            restart_asked: false,
            killed_for: None,
        }
    }

    pub fn state(&self) -> ProcState {
        self.state
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// How many times it was started again (locally, by this supervision).
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Whether a stop was asked for.
    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// The process was started at `now`.
    pub fn started(&mut self, now: i64) {
        self.started_ms = Some(now);
        self.failed_checks = 0;
        self.killed_for = None;
        if self.health.is_some() {
            self.set(ProcState::Starting, "started; waiting for its health check");
        } else {
            self.set(ProcState::Healthy, "running (no health check)");
        }
    }

    /// Whether health checks are due at `now` (past the start grace).
    pub fn checks_count(&self, now: i64) -> bool {
        match (self.health, self.started_ms) {
            (Some((_, grace)), Some(t)) => now - t >= grace as i64,
            _ => false,
        }
    }

    /// A health check passed.
    pub fn health_ok(&mut self) {
        self.failed_checks = 0;
        if matches!(self.state, ProcState::Starting | ProcState::Unhealthy) && !self.stopping {
            self.set(ProcState::Healthy, "health check passed");
        }
    }

    /// A health check failed with `why`; true when the process is now unhealthy and must be
    /// killed (it is then restarted as the policy says).
    pub fn health_failed(&mut self, why: &str, now: i64) -> bool {
        let Some((failures, _)) = self.health else {
            return false;
        };
        if self.stopping || !self.checks_count(now) || self.killed_for.is_some() {
            return false;
        }
        if !matches!(self.state, ProcState::Starting | ProcState::Healthy) {
            return false;
        }
        self.failed_checks += 1;
        if self.failed_checks < failures {
            return false;
        }
        let reason = format!("health check failed: {why}");
        self.set(ProcState::Unhealthy, &reason);
        self.killed_for = Some(reason);
        true
    }

    /// A stop was asked for; true when a run is there to kill (else it is stopped now).
    pub fn stop(&mut self) -> bool {
        self.stopping = true;
        match self.state {
            ProcState::Starting | ProcState::Healthy | ProcState::Unhealthy => true,
            s if s.is_final() => false,
            _ => {
                self.set(ProcState::Stopped, "stopped");
                false
            }
        }
    }

    /// A restart was asked for; true when a run is there to kill first (else start now).
    pub fn restart(&mut self) -> bool {
        if self.stopping {
            return false;
        }
        self.restart_asked = true;
        self.in_a_row = 0;
        matches!(
            self.state,
            ProcState::Starting | ProcState::Healthy | ProcState::Unhealthy
        )
    }

    /// The run ended as `how` at `now`; `jitter` in [0, 1). Says when to start it again, if ever.
    pub fn exited(&mut self, how: Exit, now: i64, jitter: f64) -> Next {
        let why = self.killed_for.take().unwrap_or_else(|| how.reason());
        let ran = self.started_ms.take().map(|t| now - t);
        if self.stopping {
            self.set(ProcState::Stopped, "stopped");
            return Next::Done;
        }
        if std::mem::take(&mut self.restart_asked) {
            self.restarts += 1;
            self.set(ProcState::Restarting, "restart asked");
            return Next::RestartAt(now);
        }
        let clean = how == Exit::Code(0);
        let again = match self.policy.mode {
            RestartMode::Always => true,
            RestartMode::OnFailure => !clean,
            RestartMode::Never => false,
        };
        if !again {
            let state = if clean {
                ProcState::Stopped
            } else {
                ProcState::Failed
            };
            self.set(state, &why);
            return Next::Done;
        }
        let window = self.policy.window_ms as i64;
        self.recent.retain(|&t| now - t < window);
        if self.recent.len() as u32 >= self.policy.max_restarts {
            let n = self.recent.len();
            self.set(
                ProcState::Failed,
                &format!(
                    "{why} (restarted {n} time{} within {}s)",
                    if n == 1 { "" } else { "s" },
                    window / 1000
                ),
            );
            return Next::Done;
        }
        if ran.is_some_and(|r| r >= STABLE_MS) {
            self.in_a_row = 0;
        }
        self.in_a_row += 1;
        self.restarts += 1;
        self.recent.push(now);
        let delay = self.policy.delay_ms(self.in_a_row, jitter);
        self.set(ProcState::Restarting, &why);
        Next::RestartAt(now + delay as i64)
    }

    fn set(&mut self, state: ProcState, reason: &str) {
        self.state = state;
        self.reason = reason.to_string();
    }
}

/// The status of one process as its supervisor (and then its agent) reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcStatus {
    pub state: ProcState,
    pub reason: String,
    pub restarts: u32,
    /// The main process's pid while it runs.
    #[serde(default)]
    pub pid: Option<i32>,
    /// The ports the agent gave it, by name.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// When the current run started.
    #[serde(default)]
    pub started_at: Option<Ts>,
    /// `applied`, `none`, or `unavailable: <why>`.
    #[serde(default)]
    pub limits: String,
    /// Bumped at each change, so a reader can tell a new status from one it has.
    #[serde(default)]
    pub seq: u64,
    pub at: Ts,
}

impl ProcStatus {
    /// A last status written for a process that is over, not by its running supervisor (it
    /// could not start, was stopped while away, or its supervisor kept dying). Its `seq` is
    /// above any a supervisor reaches, so it wins over the statuses before it.
    pub fn last(state: ProcState, reason: &str, ports: BTreeMap<String, u16>, at: Ts) -> Self {
        ProcStatus {
            state,
            reason: reason.to_string(),
            restarts: 0,
            pid: None,
            ports,
            started_at: None,
            limits: String::new(),
            seq: u64::MAX / 2,
            at,
        }
    }
}

#[cfg(test)]
mod tests;
