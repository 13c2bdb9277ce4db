//! The connected agents of this server (the connection table): where to send a node a message,
//! where its log endpoint is, and the log streams relayed over each connection.
//!
//! One [`Links`] handle, cheap to clone, over private state. Its lock is a `std::sync::Mutex`:
//! every critical section is a few map operations, never held across an `.await`, so an async
//! mutex would only cost more.

use muster_wire::protocol::ToAgent;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{Sender, UnboundedSender};

/// A piece of a log relayed over an agent's connection; `eof` ends the stream. A stream whose
/// sender is dropped without `eof` was cut (the agent went away).
#[derive(Debug)]
pub struct Piece {
    pub data: String,
    pub eof: bool,
}

/// A node's log endpoint, as its authenticated connection told it.
#[derive(Clone, Debug)]
pub struct LogEndpoint {
    pub node_id: String,
    pub addr: SocketAddr,
    /// The connection that told it.
    pub session: u64,
    /// Dials that failed in a row, and until when the connection path is used instead.
    failures: u32,
    retry_at: Option<Instant>,
}

impl LogEndpoint {
    pub fn new(node_id: String, addr: SocketAddr, session: u64) -> LogEndpoint {
        LogEndpoint {
            node_id,
            addr,
            session,
            failures: 0,
            retry_at: None,
        }
    }

    /// Notes a failed dial: the endpoint rests 30 s, doubling with each failure in a row up to an
    /// hour, so a firewalled endpoint does not delay every follow while a one-off failure (the
    /// agent restarting, say) does not give the direct path up for good. Returns the rest.
    fn failed(&mut self, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let rest = 30u64
            .saturating_mul(1 << (self.failures - 1).min(7))
            .min(3600);
        let rest = Duration::from_secs(rest);
        self.retry_at = Some(now + rest);
        rest
    }

    /// Whether a follow should dial it now.
    fn usable(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| now >= t)
    }
}

/// One agent connection.
struct Conn {
    session: u64,
    tx: UnboundedSender<ToAgent>,
}

#[derive(Default)]
struct State {
    /// Connected agents by node name.
    agents: HashMap<String, Conn>,
    /// Log endpoints by node name.
    endpoints: HashMap<String, LogEndpoint>,
    /// Relayed log streams: id → (the connection carrying it, where its pieces go).
    streams: HashMap<u64, (u64, Sender<Piece>)>,
}

/// The connection table (see the module doc).
#[derive(Clone, Default)]
pub struct Links {
    state: Arc<Mutex<State>>,
    next_id: Arc<AtomicU64>,
}

impl Links {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh id for a connection or a stream.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Node `name` is connected as `session` (a newer connection replaces an older one).
    pub fn connected(&self, name: &str, session: u64, tx: UnboundedSender<ToAgent>) {
        self.state()
            .agents
            .insert(name.to_string(), Conn { session, tx });
    }

    /// Connection `session` of node `name` ended: it, its endpoint and its relayed streams are
    /// forgotten (the streams' readers see them cut).
    pub fn disconnected(&self, name: &str, session: u64) {
        let mut s = self.state();
        if s.agents.get(name).is_some_and(|c| c.session == session) {
            s.agents.remove(name);
        }
        if s.endpoints.get(name).is_some_and(|e| e.session == session) {
            s.endpoints.remove(name);
        }
        s.streams.retain(|_, (sess, _)| *sess != session);
    }

    /// Sends a message to node `name`; `false` when it is not connected.
    pub fn send(&self, name: &str, msg: ToAgent) -> bool {
        self.state()
            .agents
            .get(name)
            .is_some_and(|c| c.tx.send(msg).is_ok())
    }

    /// Whether node `name` is connected now.
    pub fn is_connected(&self, name: &str) -> bool {
        self.state().agents.contains_key(name)
    }

    /// Records where node `name` serves its logs.
    pub fn set_endpoint(&self, name: &str, ep: LogEndpoint) {
        self.state().endpoints.insert(name.to_string(), ep);
    }

    /// Node `name`'s log endpoint, when it has one that is not resting after failed dials.
    pub fn endpoint(&self, name: &str) -> Option<LogEndpoint> {
        self.state()
            .endpoints
            .get(name)
            .filter(|e| e.usable(Instant::now()))
            .cloned()
    }

    /// Notes how a dial of `ep` went; after a failure, how long the endpoint now rests.
    pub fn dialled(&self, name: &str, ep: &LogEndpoint, ok: bool) -> Duration {
        let mut s = self.state();
        let Some(known) = s
            .endpoints
            .get_mut(name)
            .filter(|e| e.session == ep.session)
        else {
            return Duration::ZERO;
        };
        if ok {
            known.failures = 0;
            known.retry_at = None;
            Duration::ZERO
        } else {
            known.failed(Instant::now())
        }
    }

    /// Opens a relayed stream on node `name`'s connection: its id, and where its pieces arrive.
    /// `None` when the node is not connected. The caller sends the request (`FollowLog`).
    pub fn open_stream(
        &self,
        name: &str,
        capacity: usize,
    ) -> Option<(u64, tokio::sync::mpsc::Receiver<Piece>)> {
        let id = self.next_id();
        let mut s = self.state();
        let session = s.agents.get(name)?.session;
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        s.streams.insert(id, (session, tx));
        Some((id, rx))
    }

    /// Where a relayed stream's pieces go (the session hands them on; `None`: nobody listens).
    pub fn stream(&self, id: u64) -> Option<Sender<Piece>> {
        self.state().streams.get(&id).map(|(_, tx)| tx.clone())
    }

    /// Forgets a stream (it ended, or its reader left).
    pub fn close_stream(&self, id: u64) {
        self.state().streams.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_log_endpoint_rests_longer_each_time_and_is_tried_again() {
        let mut ep = LogEndpoint::new("n1".into(), "127.0.0.1:1".parse().unwrap(), 1);
        let t0 = Instant::now();
        assert!(ep.usable(t0));
        let mut rests = Vec::new();
        for _ in 0..10 {
            let rest = ep.failed(t0);
            assert!(!ep.usable(t0));
            assert!(ep.usable(t0 + rest));
            rests.push(rest.as_secs());
        }
        assert_eq!(rests, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert_eq!(ep.failures, 10);
    }

    #[test]
    fn a_connection_that_ends_takes_its_endpoint_and_streams_with_it() {
        let links = Links::default();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        links.connected("n1", 1, tx.clone());
        let ep = LogEndpoint::new("id1".into(), "127.0.0.1:1".parse().unwrap(), 1);
        links.set_endpoint("n1", ep.clone());
        let (id, mut rx) = links.open_stream("n1", 4).unwrap();
        assert!(links.stream(id).is_some());
        // A newer connection of the same node; the old one's end leaves it alone.
        links.connected("n1", 2, tx);
        links.disconnected("n1", 1);
        assert!(links.is_connected("n1"));
        assert!(
            links.endpoint("n1").is_none(),
            "the endpoint came with session 1"
        );
        assert!(links.stream(id).is_none());
        assert!(rx.try_recv().is_err(), "the stream is cut, not ended");
        links.disconnected("n1", 2);
        assert!(!links.is_connected("n1"));
        assert!(links.open_stream("n1", 4).is_none());
        assert!(!links.send("n1", ToAgent::Reconnect));
    }
}
