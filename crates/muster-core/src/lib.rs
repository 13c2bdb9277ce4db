//! muster-core: the pure heart of muster.
//!
//! Everything here is plain data and functions over it: no tokio, no I/O, no clocks. Callers pass
//! the current time and any randomness in, which is what lets the scheduling rules be tested as
//! properties.
//!
//! - [`time`]: millisecond UTC timestamps and their RFC 3339 form.
//! - [`names`]: the name rule of SPEC §13.
//! - [`job`]: jobs, trees, tags and states as stored and served.
//! - [`spec`]: the job tree a client submits, and its validation into jobs.
//! - [`process`]: long-running processes: their spec and validation, and [`process::Supervision`],
//!   the state machine of one supervised process (health, restart policy, backoff, window).
//! - [`orders`]: the orders grammar of HQ and the identity of an order.
//! - [`service`], [`service_plan`]: services (SPEC §6): `service.toml` and interfaces parsed,
//!   the graph of services resolved with an input hash each, and the plan against the recorded
//!   state.
//! - [`sched`]: [`sched::TreeRun`], the state machine of one running tree (leaf-first starts,
//!   fail-fast, retries, user abort, the derived tree state).

pub mod job;
pub mod names;
pub mod orders;
pub mod process;
pub mod sched;
pub mod service;
pub mod service_plan;
pub mod spec;
pub mod time;

pub use job::{Job, JobState, OnFailure, Run, Tags, Tree, TreeState};
pub use time::Ts;
pub use uuid::Uuid;
