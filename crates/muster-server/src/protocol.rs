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
//!   someone follows, and an ended attempt's log is uploaded once (`LogUpload`) before its
//!   `Exited` report.

use muster_core::{Run, Ts, Uuid};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// From server to agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ToAgent {
    /// The answer to `Hello`: the node's id and the lease epoch of this server.
    Welcome { node_id: String, epoch: u64 },
    /// Jobs to run.
    Assign { epoch: u64, jobs: Vec<Assignment> },
    /// Kill a running attempt (SIGTERM, SIGKILL after its grace period).
    Kill { job: Uuid, attempt: u32 },
    /// Reports up to and including `seq` are stored.
    Ack { seq: u64 },
    /// Stream the log of an attempt from byte `from`; with `follow`, until the attempt ends.
    FollowLog {
        stream: u64,
        job: Uuid,
        attempt: u32,
        from: u64,
        follow: bool,
    },
    /// Stop a log stream.
    StopLog { stream: u64 },
    /// The server will not talk to this agent again (its node was removed).
    Goodbye { reason: String },
    /// This server stopped leading the cluster: connect again (to the leader).
    Reconnect,
    /// The answer to a `Hello` with a `log_endpoint`: the certificate the cluster CA made for the
    /// node's key, and the CA certificate (both DER in hex). The agent serves its logs with it.
    Certificate { cert: String, ca: String },
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
    /// Extra environment (`MUSTER_URL`, a scoped `MUSTER_TOKEN`).
    pub env: BTreeMap<String, String>,
    /// The user the job runs as: set by the agent from its own `agent.run_as` before it writes
    /// `spec.json`; whatever a server sends here is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
}

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
    },
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
    /// The whole log of an ended attempt, sent once before its `Exited` report.
    LogUpload {
        job: Uuid,
        attempt: u32,
        data: String,
    },
}

/// An agent's log endpoint (see [`crate::agent::logs`]).
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
