//! The server's side of one agent connection: it turns the agent's messages into job-manager
//! commands, stores uploaded logs, and routes log-stream chunks to whoever follows them.

use crate::manager::{now, Cmd};
use crate::protocol::{FromAgent, LogOffer, ToAgent};
use crate::App;
use muster_store::Node;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
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
    let session = app.next_id.fetch_add(1, Ordering::Relaxed);
    let Some(FromAgent::Hello {
        name,
        node_id,
        slots,
        labels,
        version,
        known,
        seq,
        log_endpoint,
    }) = rx.recv().await
    else {
        return;
    };
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
    app.agents
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.clone(), tx.clone());
    if let Some(offer) = log_endpoint {
        offer_logs(&app, &node, offer, peer, session, &tx);
    }
    app.manager.send(Cmd::Connect {
        session,
        node,
        tx: tx.clone(),
        known,
        seq,
    });
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
            FromAgent::Heartbeat => {
                app.manager.send(Cmd::Heartbeat { session });
            }
            FromAgent::LogChunk { stream, data, eof } => {
                let mut streams = app.streams.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(s) = streams.get(&stream) {
                    if s.send((data, eof)).is_err() || eof {
                        streams.remove(&stream);
                    }
                }
            }
            FromAgent::LogUpload { job, attempt, data } => {
                // The blob is written before the job's `Exited` report is read from this
                // connection; its record joins the manager's next commit.
                let blobs = app.blobs.clone();
                match tokio::task::spawn_blocking(move || blobs.put(data.as_bytes())).await {
                    Ok(Ok(blob)) => {
                        app.manager.send(Cmd::Log { job, attempt, blob });
                    }
                    Ok(Err(e)) => {
                        eprintln!("muster: cannot store the log of {job} attempt {attempt}: {e}")
                    }
                    Err(e) => {
                        eprintln!("muster: cannot store the log of {job} attempt {attempt}: {e}")
                    }
                }
            }
        }
    }
    let mut agents = app.agents.lock().unwrap_or_else(|e| e.into_inner());
    if agents.get(&name).is_some_and(|t| t.same_channel(&tx)) {
        agents.remove(&name);
    }
    drop(agents);
    let mut eps = app.log_endpoints.lock().unwrap_or_else(|e| e.into_inner());
    if eps.get(&name).is_some_and(|e| e.session == session) {
        eps.remove(&name);
    }
    drop(eps);
    app.manager.send(Cmd::Disconnect { session });
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
    let cert = crate::tls::unhex(&offer.key)
        .ok_or_else(|| "the key is not hex".to_string())
        .and_then(|k| app.ca.sign_node(&node.id, &k));
    let cert = match cert {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "muster: node {}: cannot certify its log endpoint: {e}",
                node.name
            );
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
    let hex = crate::discovery::hex;
    let _ = tx.send(ToAgent::Certificate {
        cert: hex(&cert),
        ca: hex(app.ca.cert()),
    });
    app.log_endpoints
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            node.name.clone(),
            crate::LogEndpoint {
                node_id: node.id.clone(),
                addr,
                session,
                failures: 0,
                retry_at: None,
            },
        );
}
