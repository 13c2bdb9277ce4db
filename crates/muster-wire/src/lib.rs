//! muster-wire: what crosses the wire between a server and its agents, in one place both sides
//! import, so the agent never needs the server's crates.
//!
//! - [`protocol`]: the agent protocol messages (versioned: [`protocol::PROTOCOL_VERSION`]) and the
//!   [`protocol::Link`] an agent reaches a server through.
//! - [`beacon`]: the discovery beacons (format, signing, checking, sockets, key files, and what a
//!   join token carries).
//! - [`pki`]: the cluster CA, node and server certificates, the pinned-CA verifier agents use,
//!   and dialling a TLS peer.
//! - [`util`]: the wall clock and hex.
//! - [`perms`]: the modes of the files and directories muster makes in its data dir (private
//!   to its user), shared by server and agent.

pub mod beacon;
pub mod perms;
pub mod pki;
pub mod protocol;
pub mod util;
