//! Routes of the node registry and of agents: join tokens, joining, the agent connection.

use super::*;
use crate::jobs::Cmd;
use crate::nodes as n;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path};
use axum::routing::post;
use muster_store::Node;
use muster_wire::protocol::{FromAgent, ToAgent};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

pub(super) fn routes(r: Routes) -> Routes {
    r.add("/api/v1/nodes", &["GET"], get(list_nodes))
        .add(
            "/api/v1/nodes/{id}",
            &["GET", "PATCH", "DELETE"],
            get(get_node).patch(patch_node).delete(delete_node),
        )
        .leader(&["PATCH", "DELETE"])
        .add("/api/v1/nodes/join-token", &["POST"], post(join_token))
        .add("/api/v1/nodes/join", &["POST"], post(join))
        .add("/api/v1/agent/ws", &["GET"], get(agent_ws))
}

fn node_json(n: &Node) -> Value {
    json!({"id": n.id, "name": n.name, "state": n.state, "labels": n.labels, "slots": n.slots, "last_seen": n.last_seen, "version": n.version})
}

/// Adds when the node's last valid discovery beacon arrived (`beacon_at`), if one did: a hint
/// only, never what the node's state or identity rests on.
fn with_beacon(app: &App, mut v: Value) -> Value {
    let heard = v["id"]
        .as_str()
        .and_then(|id| app.metrics.discovery.last_heard(id));
    if let Some(t) = heard {
        v["beacon_at"] = json!(muster_core::Ts(t));
    }
    v
}

async fn find_node(app: &Arc<App>, id: &str) -> ApiResult<Node> {
    let (store, id) = (app.store.clone(), id.to_string());
    blocking(move || {
        store
            .nodes()?
            .into_iter()
            .find(|n| n.id == id || n.name == id)
            .ok_or_else(|| ApiError::not_found(&format!("node {id:?}")))
    })
    .await
}

async fn list_nodes(State(app): AppState, caller: Caller) -> ApiResult<Response> {
    caller.need_scope("read")?;
    let store = app.store.clone();
    let nodes = blocking(move || Ok(store.nodes()?)).await?;
    let items: Vec<Value> = nodes
        .iter()
        .map(|n| with_beacon(&app, node_json(n)))
        .collect();
    Ok(axum::Json(json!({"items": items})).into_response())
}

async fn get_node(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.need_scope("read")?;
    let node = node_json(&find_node(&app, &id).await?);
    Ok(axum::Json(with_beacon(&app, node)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodePatch {
    /// Labels to set; a null value removes the label.
    #[serde(default)]
    labels: BTreeMap<String, Option<String>>,
    /// `draining` or `ready`.
    #[serde(default)]
    state: Option<String>,
}

async fn patch_node(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<NodePatch>,
) -> ApiResult<Response> {
    caller.need_cluster_admin("manage nodes")?;
    for (k, v) in &b.labels {
        muster_core::names::check_name("label", k).map_err(ApiError::bad)?;
        if v.as_ref().is_some_and(|v| v.is_empty() || v.len() > 200) {
            return Err(ApiError::bad(format!(
                "label {k:?} needs a value of 1-200 characters"
            )));
        }
    }
    let draining = match b.state.as_deref() {
        None => None,
        Some("draining") => Some(true),
        Some("ready") => Some(false),
        Some(other) => {
            return Err(ApiError::bad(format!(
                "state {} is not draining or ready",
                quote(other)
            )))
        }
    };
    let node = find_node(&app, &id).await?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    app.manager.send(Cmd::UpdateNode {
        id: node.id,
        labels: b.labels,
        draining,
        reply,
    });
    let node = rx
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::not_found(&e))?;
    Ok(axum::Json(node_json(&node)).into_response())
}

async fn delete_node(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.need_cluster_admin("manage nodes")?;
    let node = find_node(&app, &id).await?;
    let (store, nid) = (app.store.clone(), node.id.clone());
    blocking(move || {
        n::revoke_node(&*store, &nid)?;
        store.delete_node(&nid)?;
        Ok(())
    })
    .await?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    app.manager.send(Cmd::RemoveNode { id: node.id, reply });
    let _ = rx.await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinTokenBody {
    /// Seconds the token stays valid (default one hour).
    #[serde(default)]
    ttl_s: Option<u64>,
    /// How many nodes may join with it (default 1).
    #[serde(default)]
    uses: Option<u32>,
}

async fn join_token(
    State(app): AppState,
    caller: Caller,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    caller.need_cluster_admin("manage nodes")?;
    // The body is optional: an empty one takes the defaults.
    let b: JoinTokenBody = if body.iter().all(|c| c.is_ascii_whitespace()) {
        JoinTokenBody {
            ttl_s: None,
            uses: None,
        }
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))?
    };
    let ttl = b.ttl_s.unwrap_or(3600);
    let uses = b.uses.unwrap_or(1);
    if ttl == 0 || ttl > 30 * 86_400 || uses == 0 || uses > 10_000 {
        return Err(ApiError::bad(
            "ttl_s must be 1 s to 30 days and uses 1-10000",
        ));
    }
    let (store, data_dir) = (app.store.clone(), app.config.data_dir.clone());
    let fingerprint = app.ca.fingerprint_hex();
    let (token, expires_at) = blocking(move || {
        let key = crate::discovery::server_key(&data_dir)
            .map_err(|e| ApiError::internal(format!("the server key: {e}")))?;
        let public = key.verifying_key().to_bytes();
        Ok(n::create_join_token(
            &*store,
            ttl as i64 * 1000,
            uses,
            &public,
            &fingerprint,
        )?)
    })
    .await?;
    let command = format!("muster agent --server {} --join-token {token}", app.url);
    let mut answer =
        json!({"token": token, "expires_at": expires_at, "uses": uses, "command": command});
    if let Some(hint) = join_hint(&app.config.server.advertise_url, &app.url) {
        answer["hint"] = json!(hint);
    }
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

/// What to tell whoever runs a join command that names an address other machines cannot use:
/// the server's loopback or wildcard listen address, when `server.advertise_url` is not set.
fn join_hint(advertise_url: &str, url: &str) -> Option<String> {
    if !advertise_url.is_empty() {
        return None;
    }
    let host = url.split("://").nth(1)?.split('/').next()?;
    let ip = match host.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => host,
    };
    let ip: std::net::IpAddr = if ip == "localhost" {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        ip.parse().ok()?
    };
    let set = "set server.advertise_url (MUSTER_SERVER__ADVERTISE_URL) to a URL of this server that they can reach";
    if ip.is_loopback() {
        Some(format!(
            "this server listens on {host}, which only agents on this machine can reach; for other machines, start it with --listen 0.0.0.0:PORT and {set}"
        ))
    } else if ip.is_unspecified() {
        Some(format!(
            "{host} is this server's listen address, not one other machines can dial: {set}"
        ))
    } else {
        None
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    join_token: String,
    name: String,
}

/// Agent routes take TLS connections only (the agent always speaks TLS to its server): a join
/// hands out a credential, and the agent connection carries job specs and tokens.
fn need_tls(ext: &axum::http::Extensions) -> ApiResult<Option<crate::tls::Peer>> {
    match ext.get::<ConnectInfo<crate::tls::Peer>>() {
        Some(ConnectInfo(p)) if p.tls => Ok(Some(*p)),
        _ => Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "tls_required",
            "agents talk to the server over TLS under the cluster CA: use `muster agent`, which does",
        )),
    }
}

/// An agent trades a join token for its own credential.
async fn join(
    State(app): AppState,
    ext: axum::http::Extensions,
    JsonBody(b): JsonBody<JoinBody>,
) -> ApiResult<Response> {
    need_tls(&ext)?;
    muster_core::names::check_name("node name", &b.name).map_err(ApiError::bad)?;
    let (store, config) = (app.store.clone(), app.config.clone());
    let (id, credential, cluster_key) = blocking(move || {
        // The key the node signs its discovery beacons with.
        let cluster_key = crate::discovery::cluster_key(&config)
            .map_err(|e| ApiError::internal(format!("the cluster key: {e}")))?;
        if store.nodes()?.iter().any(|n| n.name == b.name) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("a node named {:?} exists: remove it first (`muster nodes rm`) or choose another name", b.name),
            ));
        }
        n::redeem_join_token(&*store, &b.join_token)?.map_err(|m| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m))?;
        let id = muster_core::Uuid::now_v7().to_string();
        let credential = n::issue_credential(&*store, &id)?;
        Ok((id, credential, muster_wire::util::hex(&cluster_key)))
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"node_id": id, "credential": credential, "cluster_key": cluster_key})),
    )
        .into_response())
}

/// The agent connection (the agent protocol as JSON text frames), authenticated by the node's
/// credential.
async fn agent_ws(
    State(app): AppState,
    ext: axum::http::Extensions,
    headers: axum::http::HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let peer_ip = need_tls(&ext)?.map(|p| p.addr.ip());
    let ws = ws.map_err(|e| ApiError::bad(e.body_text()))?;
    let cred = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|s| s.trim().to_string())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "an agent connects with its node credential",
            )
        })?;
    let store = app.store.clone();
    let node = blocking(move || Ok(n::node_of_credential(&*store, &cred)?)).await?;
    let Some(node) = node else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the node credential is not valid (was the node removed?)",
        ));
    };
    Ok(ws.on_upgrade(move |socket| bridge(app, socket, node, peer_ip)))
}

/// Carries protocol messages between a websocket and a [`crate::session`].
async fn bridge(
    app: Arc<App>,
    mut socket: WebSocket,
    node: String,
    peer: Option<std::net::IpAddr>,
) {
    let (to_server, from_agent) = tokio::sync::mpsc::unbounded_channel::<FromAgent>();
    let (to_agent, mut from_server) = tokio::sync::mpsc::unbounded_channel::<ToAgent>();
    let session = tokio::spawn(crate::session::serve(
        app,
        from_agent,
        to_agent,
        Some(crate::session::Remote { node, peer }),
    ));
    loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<FromAgent>(&t) {
                    Ok(m) => {
                        if to_server.send(m).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("agent sent a bad message: {e}");
                        break;
                    }
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            out = from_server.recv() => match out {
                Some(m) => {
                    let text = serde_json::to_string(&m).unwrap_or_default();
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                    if matches!(m, ToAgent::Goodbye { .. } | ToAgent::Reconnect) {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    drop(to_server);
    let _ = session.await;
}

#[cfg(test)]
mod tests {
    use super::join_hint;

    #[test]
    fn join_commands_on_loopback_or_a_wildcard_come_with_a_hint() {
        let loopback = join_hint("", "http://127.0.0.1:7070").unwrap();
        assert!(loopback.contains("advertise_url") && loopback.contains("--listen"));
        assert!(join_hint("", "http://[::1]:7070").is_some());
        assert!(join_hint("", "http://localhost:7070").is_some());
        let any = join_hint("", "http://0.0.0.0:7070").unwrap();
        assert!(any.contains("advertise_url"), "{any}");
        assert_eq!(join_hint("", "http://10.1.2.3:7070"), None);
        assert_eq!(join_hint("", "https://build.example:7070"), None);
        assert_eq!(
            join_hint("http://127.0.0.1:7070", "http://127.0.0.1:7070"),
            None
        );
    }
}
