//! Jobs (SPEC §4): the job manager, sole writer of job state ([`manager`]), and how other parts
//! react to its outcomes without it knowing them ([`hooks`]: observers of every tree and durable
//! named hooks; [`observers`]: the job tokens and alerts every server has). Its clock is
//! [`clock::Clock`], so its decisions are tested with time the test moves. [`submit`]: what a
//! tree is checked against before the manager takes it.

pub mod clock;
pub mod hooks;
pub mod manager;
pub mod observers;
pub mod submit;

pub use manager::{AbortError, Cmd, Manager, ManagerConfig};
