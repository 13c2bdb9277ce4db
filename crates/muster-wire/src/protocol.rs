//! The agent protocol: the messages between a server and an agent (ARCHITECTURE.md has the
//! walk-through).
//!
//! The agent dials out and holds one connection. The same message types travel over a websocket
//! for remote agents and over in-process channels for the embedded agent of `muster up`; the
//! server-side session code is the same for both. Rules:
//! - every assignment carries `(job, attempt)` and the server's lease `epoch`; an agent runs a
//!   given `(job, attempt)` at most once, whatever arrives twice;
//! - the agent numbers its reports (`seq`); the server acknowledges them once they are stored,
//!   and an agent that reconnects re-sends what was not acknowledged (its `Hello` lists every
//!   attempt it knows that the server has not acknowledged as ended);
//! - log lines are never pushed unasked: the server asks for a log stream (`FollowLog`) when
//!   someone follows, and an ended attempt's log is uploaded (`LogPart`s, each acknowledged by
//!   `LogStored`, so neither side ever holds more than a part in memory) before its `Exited`
//!   report.
//! - the protocol is versioned: `Hello` carries the agent's [`PROTOCOL_VERSION`], a server
//!   answers an agent it cannot speak to with `Goodbye` saying why, and `Welcome` carries the
//!   server's version so an agent refuses a server too old for it.

use muster_core::process::{ProcStatus, ProcessDef};
use muster_core::{Run, Ts, Uuid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// The version of these messages. Bump it when a change is not backward compatible (a new
/// required field, a changed meaning); optional fields with defaults need no bump.
///
/// - 1: the first versioned protocol.
/// - 2: an ended attempt's log is uploaded in acknowledged parts (`LogPart`, `LogStored`) instead
///   of one `LogUpload` message holding the whole log.
/// - 3: long-running processes: `StartProcess`, `StopProcess`, `RestartProcess`, the agent's
///   `ProcessStates` and the `processes` of its `Hello`. A server places processes only on
///   agents of version 3 or later.
pub const PROTOCOL_VERSION: u32 = 3;
/// The first version that runs long-running processes.
pub const PROCESSES_SINCE: u32 = 3;
/// The oldest version a server of this build still speaks.
pub const OLDEST_SUPPORTED: u32 = 2;

/// Whether a server of this build can speak to an agent speaking `version`; the reason if not.
pub fn check_agent_version(version: u32) -> Result<(), String> {
    if version < OLDEST_SUPPORTED {
        Err(format!(
            "this agent speaks agent protocol {version} and this server needs {OLDEST_SUPPORTED} to {PROTOCOL_VERSION}: upgrade the agent to this server's version ({})",
            env!("CARGO_PKG_VERSION")
        ))
    } else if version > PROTOCOL_VERSION {
        Err(format!(
            "this agent speaks agent protocol {version} and this server only up to {PROTOCOL_VERSION}: upgrade the server (it runs muster {})",
            env!("CARGO_PKG_VERSION")
        ))
    } else {
        Ok(())
    }
}

/// Whether an agent of this build can speak to a server whose `Welcome` said `version`.
pub fn check_server_version(version: u32) -> Result<(), String> {
    if version < OLDEST_SUPPORTED {
        Err(format!(
            "the server speaks agent protocol {version} and this agent needs at least {OLDEST_SUPPORTED}: upgrade the server to muster {}",
            env!("CARGO_PKG_VERSION")
        ))
    } else {
        Ok(())
    }
}

/// A way to reach a server: each call makes one connection, a pair of channels carrying the
/// messages below (in-process for the embedded agent, a websocket for remote ones).
pub type Link = Arc<
    dyn Fn() -> Pin<
            Box<
                dyn Future<
                        Output = std::io::Result<(
                            UnboundedSender<FromAgent>,
                            UnboundedReceiver<ToAgent>,
                        )>,
                    > + Send,
            >,
        > + Send
        + Sync,
>;

/// From server to agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ToAgent {
    /// The answer to `Hello`: the node's id, the lease epoch of this server and the protocol
    /// version it speaks (absent, 0, from servers before versioning).
    Welcome {
        node_id: String,
        epoch: u64,
        #[serde(default)]
        protocol: u32,
    },
    /// Jobs to run.
    Assign { epoch: u64, jobs: Vec<Assignment> },
    /// Kill a running attempt (SIGTERM, SIGKILL after its grace period).
    Kill { job: Uuid, attempt: u32 },
    /// Reports up to and including `seq` are stored.
    Ack { seq: u64 },
    /// Stream the log of an attempt from byte `from`; with `follow`, until the attempt ends.
    /// With `limit`, stop (with `eof`) at the first line end at or after `limit` bytes: a reader
    /// catching up asks for one window at a time, so nothing queues up behind a slow one.
    /// Chunks always end on a line end, except the last of an ended attempt.
    FollowLog {
        stream: u64,
        job: Uuid,
        attempt: u32,
        from: u64,
        follow: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
    },
    /// Stop a log stream.
    StopLog { stream: u64 },
    /// The server will not talk to this agent again (its node was removed).
    Goodbye { reason: String },
    /// This server stopped leading the cluster: connect again (to the leader).
    Reconnect,
    /// The parts of an uploaded log up to byte `offset` are stored; after the last part, the log
    /// is in the blob store. `offset` 0 after a part asks the agent to upload again from the
    /// start (the server lost the earlier parts, e.g. after a reconnect).
    LogStored {
        job: Uuid,
        attempt: u32,
        offset: u64,
    },
    /// The answer to a `Hello` with a `log_endpoint`: the certificate the cluster CA made for the
    /// node's key, and the CA certificate (both DER in hex). The agent serves its logs with it.
    Certificate { cert: String, ca: String },
    /// Run a long-running process (generation `gen` of it) until told to stop. Sent again for
    /// the same generation, it changes nothing: one generation runs at most once at a time on a
    /// node, under one supervisor.
    StartProcess {
        epoch: u64,
        process: Box<ProcessAssignment>,
    },
    /// Stop a process (its stop signal, SIGKILL after its grace); with `remove`, forget it
    /// too (its directory and log go once it has stopped).
    StopProcess { id: Uuid, gen: u32, remove: bool },
    /// Stop the process's current run and start it again at once (same generation).
    RestartProcess { id: Uuid, gen: u32 },
}

/// One long-running process for an agent to run (SPEC §5a).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessAssignment {
    pub id: Uuid,
    /// Bumped by the server each time it places the process anew (a start after a stop, a move
    /// to another node); restarts by the supervisor keep it.
    pub gen: u32,
    pub def: ProcessDef,
    /// Extra environment (`MUSTER_PROCESS_ID`, `MUSTER_URL`).
    pub env: BTreeMap<String, String>,
    /// The size at which the log is rotated, and how many rotated files are kept.
    pub log_max: u64,
    pub log_keep: u32,
    /// Set by the agent (from `agent.run_as`); whatever a server sends is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
    /// Set by the agent: where the supervisor makes the process's cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<std::path::PathBuf>,
    /// Set by the agent: the ports it picked from `agent.port_range`, by name.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// Env vars whose values hold secrets (`def.env` names them as `${secrets.KEY}`): kept in
    /// the agent's and the supervisor's memory only, never in the process's files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_env: Vec<(String, String)>,
}

/// What an agent says of one process: its generation and status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessReport {
    pub id: Uuid,
    pub gen: u32,
    pub status: ProcStatus,
}

/// One job for an agent to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Assignment {
    pub job: Uuid,
    pub tree: Uuid,
    pub attempt: u32,
    pub run: Run,
    pub timeout_s: Option<u64>,
    pub kill_grace_ms: u64,
    pub log_max: u64,
    /// Whether the server would retry this job elsewhere if its node were lost: an agent cut off
    /// from every server for `lost_after` kills such jobs itself, so nothing runs twice.
    #[serde(default)]
    pub retryable: bool,
    /// Extra environment (`MUSTER_URL`, a scoped `MUSTER_TOKEN`). The agent keeps the
    /// [`SECRET_ENV`] ones out of `spec.json`: it hands them to the supervisor directly.
    pub env: BTreeMap<String, String>,
    /// The user the job runs as: set by the agent from its own `agent.run_as` before it writes
    /// `spec.json`; whatever a server sends here is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
    /// The cgroup v2 directory under which the supervisor makes the attempt's own cgroup: set by
    /// the agent from what it found writable at start (`agent.cgroups`); `None`: the
    /// supervisor's subreaper alone tracks the job's processes. Whatever a server sends here is
    /// replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<std::path::PathBuf>,
}

/// The variables of [`Assignment::env`] that are credentials: never written to disk on the node
/// (the agent passes them to the supervisor over a pipe or in its environment).
pub const SECRET_ENV: &[&str] = &["MUSTER_TOKEN"];

/// What an agent knows of an attempt when it (re)connects.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Known {
    Running {
        job: Uuid,
        attempt: u32,
    },
    Exited {
        job: Uuid,
        attempt: u32,
        outcome: ExitReport,
    },
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitReport {
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// The JSON object or array the job printed as its last stdout line, if any.
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    pub at: Ts,
}

/// From agent to server.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum FromAgent {
    /// The first message on a connection; acknowledged by `Ack { seq }` once what `known`
    /// reports is stored.
    Hello {
        /// The agent's [`PROTOCOL_VERSION`] (absent, 0, from agents before versioning).
        #[serde(default)]
        protocol: u32,
        name: String,
        node_id: Option<String>,
        slots: u32,
        labels: BTreeMap<String, String>,
        version: String,
        known: Vec<Known>,
        seq: u64,
        /// Where the agent serves its log files, if it does.
        #[serde(default)]
        log_endpoint: Option<LogOffer>,
        /// Every process the agent has (running or ended and not removed), with its status.
        #[serde(default)]
        processes: Vec<ProcessReport>,
    },
    /// Processes whose status changed. Not numbered nor acknowledged: each carries the whole
    /// status, and the next `Hello` carries all of them again.
    ProcessStates { states: Vec<ProcessReport> },
    /// Numbered state reports.
    Report { seq: u64, reports: Vec<Report> },
    /// Liveness, every few seconds.
    Heartbeat,
    /// A piece of a requested log stream; `eof` ends the stream.
    LogChunk {
        stream: u64,
        data: String,
        eof: bool,
    },
    /// A part of the log of an ended attempt, from byte `offset` (the log is UTF-8: every part
    /// ends on a character boundary). The next part is sent once this one is acknowledged
    /// (`LogStored`); `last` closes the upload, before the attempt's `Exited` report.
    LogPart {
        job: Uuid,
        attempt: u32,
        offset: u64,
        data: String,
        last: bool,
    },
}

/// An agent's log endpoint (see `muster_agent::logs`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogOffer {
    /// The address it listens on; an unspecified one (`0.0.0.0`, `::`) means "the address you
    /// see me connect from".
    pub addr: std::net::SocketAddr,
    /// Its P-256 public key (uncompressed point, hex), for the server to certify.
    pub key: String,
}

/// One state report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum Report {
    /// The attempt ended.
    Exited {
        job: Uuid,
        attempt: u32,
        outcome: ExitReport,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_outside_the_supported_range_are_refused_with_the_fix() {
        assert!(check_agent_version(PROTOCOL_VERSION).is_ok());
        let old = check_agent_version(0).unwrap_err();
        assert!(old.contains("upgrade the agent"), "{old}");
        let new = check_agent_version(PROTOCOL_VERSION + 1).unwrap_err();
        assert!(new.contains("upgrade the server"), "{new}");
        assert!(check_server_version(PROTOCOL_VERSION).is_ok());
        assert!(check_server_version(0)
            .unwrap_err()
            .contains("upgrade the server"));
        // A Hello from before versioning parses, as version 0.
        let hello: FromAgent = serde_json::from_str(
            r#"{"t":"hello","name":"n","node_id":null,"slots":1,"labels":{},"version":"0.1.0","known":[],"seq":1}"#,
        )
        .unwrap();
        assert!(matches!(hello, FromAgent::Hello { protocol: 0, .. }));
    }
}
