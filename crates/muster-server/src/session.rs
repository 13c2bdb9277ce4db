//! The server's side of one agent connection: it turns the agent's messages into job-manager
//! commands, stores uploaded logs, and routes relayed log pieces to their readers
//! ([`crate::links`]).

use crate::blobs::BlobWriter;
use crate::jobs::Cmd;
use crate::links::{LogEndpoint, Piece};
use crate::App;
use muster_core::Uuid;
use muster_store::Node;
use muster_wire::protocol::{FromAgent, LogOffer, ProcessReport, ToAgent};
use muster_wire::util::now;
use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// A remote agent's connection: the node id its credential authenticated, where it connects from.
pub struct Remote {
    pub node: String,
    pub peer: Option<IpAddr>,
}

/// Serves one connection until the agent goes away. `remote` says which node a remote agent's
/// credential authenticated, which wins over what `Hello` says.
pub async fn serve(
    app: Arc<App>,
    mut rx: UnboundedReceiver<FromAgent>,
    tx: UnboundedSender<ToAgent>,
    remote: Option<Remote>,
) {
    let session = app.links.next_id();
    let Some(FromAgent::Hello {
        protocol,
        name,
        node_id,
        slots,
        labels,
        version,
        known,
        seq,
        log_endpoint,
        processes,
    }) = rx.recv().await
    else {
        return;
    };
    if let Err(why) = muster_wire::protocol::check_agent_version(protocol) {
        tracing::warn!(node = %name, "refusing agent {name:?}: {why}");
        let _ = tx.send(ToAgent::Goodbye { reason: why });
        return;
    }
    let peer = remote.as_ref().and_then(|r| r.peer);
    let node = remote.map(|r| r.node);
    let slots = if slots == 0 {
        2 * std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(2)
    } else {
        slots
    };
    let node = Node {
        id: node
            .or(node_id)
            .unwrap_or_else(|| muster_core::Uuid::now_v7().to_string()),
        name: name.clone(),
        state: "ready".into(),
        labels,
        slots,
        last_seen: now(),
        version,
    };
    app.links.connected(&name, session, tx.clone());
    if let Some(offer) = log_endpoint {
        offer_logs(&app, &node, offer, peer, session, &tx);
    }
    let proc_node = node.clone();
    app.manager.send(Cmd::Connect {
        session,
        node,
        tx: tx.clone(),
        known,
        seq,
    });
    // Process statuses are applied in order, off the async threads, by one task per connection.
    let (proc_tx, mut proc_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<ProcessReport>>();
    let procs = app.processes.clone();
    let node_name = proc_node.name.clone();
    let leading = app.cluster.is_leader();
    let proc_task = tokio::spawn(async move {
        if !leading {
            // The manager sends this agent on to the leader: its processes are the leader's.
            while proc_rx.recv().await.is_some() {}
            return;
        }
        let (p, n) = (procs.clone(), proc_node.clone());
        let _ = tokio::task::spawn_blocking(move || {
            p.connected(&n, session, protocol, peer, processes)
        })
        .await;
        while let Some(states) = proc_rx.recv().await {
            let (p, n) = (procs.clone(), proc_node.clone());
            let _ = tokio::task::spawn_blocking(move || p.reports(&n, states)).await;
        }
    });
    // Log uploads in progress on this connection (an agent sends one part at a time).
    let mut uploads: HashMap<(Uuid, u32), BlobWriter> = HashMap::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            FromAgent::Hello { .. } => break, // Only once per connection.
            FromAgent::Report { seq, reports } => {
                app.manager.send(Cmd::Reports {
                    session,
                    seq,
                    reports,
                });
            }
            FromAgent::ProcessStates { states } => {
                let _ = proc_tx.send(states);
            }
            FromAgent::Heartbeat => {
                app.manager.send(Cmd::Heartbeat { session });
            }
            FromAgent::LogChunk { stream, data, eof } => {
                // Never waits: a reader that cannot keep up loses its stream (it reads on from
                // its offset another way) rather than stall this connection.
                if let Some(s) = app.links.stream(stream) {
                    if s.try_send(Piece { data, eof }).is_err() || eof {
                        app.links.close_stream(stream);
                    }
                }
            }
            FromAgent::LogPart {
                job,
                attempt,
                offset,
                data,
                last,
            } => {
                let stored =
                    store_log_part(&app, &mut uploads, job, attempt, offset, data, last).await;
                let _ = tx.send(ToAgent::LogStored {
                    job,
                    attempt,
                    offset: stored,
                });
            }
        }
    }
    app.links.disconnected(&name, session);
    app.processes.disconnected(&node_name, session);
    drop(proc_tx);
    let _ = proc_task.await;
    app.manager.send(Cmd::Disconnect { session });
}

/// Stores one part of an uploaded log; returns the offset the agent should go on from (0: start
/// again). After the last part the log is a blob, and its record goes to the job manager before
/// the attempt's `Exited` report (which the agent sends only after this answer) can.
async fn store_log_part(
    app: &Arc<App>,
    uploads: &mut HashMap<(Uuid, u32), BlobWriter>,
    job: Uuid,
    attempt: u32,
    offset: u64,
    data: String,
    last: bool,
) -> u64 {
    let key = (job, attempt);
    let writer = if offset == 0 {
        app.blobs.writer()
    } else {
        match uploads.remove(&key) {
            Some(w) if w.len() == offset => Ok(w),
            // Parts this server does not have (it restarted, or a part went missing).
            _ => return 0,
        }
    };
    /// Where an upload stands after a part.
    enum Part {
        More(BlobWriter),
        /// The last part is in: the blob's name.
        Done(String),
    }
    let res = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let mut w = writer?;
        w.write_all(data.as_bytes())?;
        let end = w.len();
        Ok(if last {
            (Part::Done(w.finish()?), end)
        } else {
            (Part::More(w), end)
        })
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match res {
        Ok((Part::More(w), end)) => {
            uploads.insert(key, w);
            end
        }
        Ok((Part::Done(blob), end)) => {
            app.manager.send(Cmd::Log { job, attempt, blob });
            end
        }
        Err(e) => {
            tracing::error!(%job, attempt, "cannot store the log of {job} attempt {attempt}: {e}");
            0
        }
    }
}

/// Certifies the key of a node's log endpoint and notes where to dial it: at the address the
/// agent's authenticated connection came from, unless it named a specific one. A beacon never
/// gives this address.
fn offer_logs(
    app: &App,
    node: &Node,
    offer: LogOffer,
    peer: Option<IpAddr>,
    session: u64,
    tx: &UnboundedSender<ToAgent>,
) {
    let cert = muster_wire::util::unhex(&offer.key)
        .ok_or_else(|| "the key is not hex".to_string())
        .and_then(|k| app.ca.sign_node(&node.id, &k));
    let cert = match cert {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("node {}: cannot certify its log endpoint: {e}", node.name);
            return;
        }
    };
    let mut addr = offer.addr;
    if addr.ip().is_unspecified() {
        match peer {
            Some(ip) => addr.set_ip(ip),
            None => return,
        }
    }
    let hex = muster_wire::util::hex;
    let _ = tx.send(ToAgent::Certificate {
        cert: hex(&cert),
        ca: hex(app.ca.cert()),
    });
    app.links
        .set_endpoint(&node.name, LogEndpoint::new(node.id.clone(), addr, session));
}
