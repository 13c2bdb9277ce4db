//! muster-models: what a node needs to run a model, apart from the process and HQ layers.
//!
//! - [`bundle`]: `bundle.json` (SPEC §8) read and strictly validated against its directory: name,
//!   runtime, entrypoint file and class, requirements, replicas, workers, selector, limits,
//!   example, the `python` version constraint ([`bundle::PythonConstraint`]).
//! - [`archive`]: a `.tar.gz` upload unpacked as a stream into a fresh directory, refusing path
//!   traversal, links pointing out, devices and archive bombs, leaving nothing behind on refusal.
//! - [`env`]: Python environments, one venv per (requirements, interpreter) hash, built with the
//!   node's `python3 -m venv` and pip through a wheel cache, atomically and under a lock, reused.
//! - [`pool`]: [`pool::Pool`], `workers` persistent Python worker processes (the embedded
//!   `worker.py`) that import the entrypoint once and answer `execute(self, data)` calls over a
//!   unix socket in length-prefixed JSON frames; dead workers are replaced, a call whose worker
//!   died fails over once, a Python exception comes back as its type and message.
//! - [`yhat`]: the `yhat` client's deploy (`/deployer/model/large`, a zlib-compressed JSON bundle
//!   in a multipart body) turned into a bundle directory the worker runs.

pub mod archive;
pub mod bundle;
pub mod env;
pub mod onnx;
pub mod pool;
pub mod r;
pub mod yhat;

pub use bundle::{Bundle, Runtime};
pub use env::{EnvSpec, Envs, Interpreter, PythonEnv};
pub use pool::{Pool, PoolConfig};

/// What can go wrong, by cause. Messages are sentences for the caller, quoting at most a short
/// piece of any input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bundle (its `bundle.json` or its files) is not valid.
    #[error("{0}")]
    Bundle(String),
    /// An uploaded archive was refused.
    #[error("{0}")]
    Archive(String),
    /// The Python environment could not be made.
    #[error("{0}")]
    Env(String),
    /// A yhat upload could not be read.
    #[error("{0}")]
    Yhat(String),
    /// The model's workers could not start (the entrypoint failed to import, say).
    #[error("the model did not start: {0}")]
    Start(String),
    /// The model raised: the Python exception's type and message (the traceback went to the log).
    #[error("{kind}: {message}")]
    Model { kind: String, message: String },
    /// The model's answer could not be sent back (not JSON-able, say) or the request was not JSON.
    #[error("{0}")]
    Protocol(String),
    /// No answer in time; the worker was ended.
    #[error("the model did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// Every worker is busy and the queue is full.
    #[error("the model is overloaded: its queue is full")]
    Overloaded,
    /// A worker died during the request, and again on its retry.
    #[error("the model's worker died during the request ({0})")]
    WorkerDied(String),
    /// The pool has stopped.
    #[error("the model's pool has stopped")]
    Closed,
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// An I/O error with what was being done.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// The crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
