//! The server's side of one agent connection: it turns the agent's messages into job-manager
//! commands, stores uploaded logs, and routes log-stream chunks to whoever follows them.

use crate::manager::{now, Cmd};
use crate::protocol::{FromAgent, ToAgent};
use crate::App;
use muster_store::Node;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Serves one connection until the agent goes away. `node` is the node id the connection
/// authenticated as (remote agents: their credential), which wins over what `Hello` says.
pub async fn serve(
    app: Arc<App>,
    mut rx: UnboundedReceiver<FromAgent>,
    tx: UnboundedSender<ToAgent>,
    node: Option<String>,
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
    }) = rx.recv().await
    else {
        return;
    };
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
    app.manager.send(Cmd::Disconnect { session });
}
