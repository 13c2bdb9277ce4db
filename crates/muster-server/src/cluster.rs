//! Several servers on one store (cluster mode, SPEC §3/§4): the leader lease and the forwarding
//! of leader-only requests.
//!
//! Every server takes part in an election through [`muster_store::Store::lease`]: the holder of
//! the `leader` lease runs the job manager's scheduling (and so the pulse of jobs, node liveness
//! and agent connections); the others serve reads from the shared store and the event feed from
//! its pub/sub, and forward what only the leader can do (creating and aborting trees, running
//! scripts, node changes, following a live log) to the leader over HTTP. Agents connect to the
//! leader: a follower refuses them, and the agent tries the next server of `agent.servers`.
//! When the leader dies its lease expires and another server takes over, resuming every running
//! tree from the store; compare-and-set on every job transition keeps a deposed leader from
//! assigning anything twice.

use crate::jobs::Cmd;
use crate::App;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::Duration;

/// This server's place in the cluster: its id in the election, whether it leads, and the
/// leader's URL. Written only by [`lead`]; read by every request (an atomic and a read-mostly
/// lock: a request never waits on a writer for long).
pub struct Cluster {
    server_id: String,
    leading: AtomicBool,
    leader_url: RwLock<Option<String>>,
}

impl Cluster {
    /// This server, not leading yet.
    pub fn new(server_id: String) -> Cluster {
        Cluster {
            server_id,
            leading: AtomicBool::new(false),
            leader_url: RwLock::new(None),
        }
    }

    /// This server's id in the election (stable across restarts).
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// Whether this server holds the leader lease now.
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// The leader's URL, as its lease says.
    pub fn leader_url(&self) -> Option<String> {
        self.leader_url
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Keeps this server's part in the election: takes or renews the lease every third of its TTL.
pub async fn lead(app: Arc<App>) {
    let ttl = app.config.server.lease_ttl;
    // The lease names the server by its id (stable across restarts); its URL is kept beside it.
    let me = app.cluster.server_id.clone();
    let mut leading = false;
    let mut published = false;
    loop {
        let (store, me2, url) = (app.store.clone(), me.clone(), app.url.clone());
        let got = tokio::task::spawn_blocking(move || {
            if !published {
                store.set_meta(&format!("server_url:{me2}"), Some(&url))?;
            }
            let holder = store.lease("leader", &me2, ttl.as_millis() as u64)?;
            let url = store.meta(&format!("server_url:{holder}"))?;
            Ok::<_, muster_store::StoreError>((holder, url))
        })
        .await;
        if let Ok(Ok((holder, url))) = got {
            published = true;
            let now_leading = holder == me;
            *app.cluster
                .leader_url
                .write()
                .unwrap_or_else(|e| e.into_inner()) = url;
            if now_leading != leading {
                leading = now_leading;
                app.cluster.leading.store(leading, Ordering::SeqCst);
                app.manager.send(Cmd::Lead(leading));
            }
        }
        // (A store error changes nothing: nobody can take the lease while the store is down.)
        tokio::time::sleep(ttl / 3).await;
    }
}

fn unavailable(msg: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({"error": {"code": "not_leader", "message": msg}})),
    )
        .into_response()
}

/// Middleware: on a follower, leader-only requests are forwarded to the leader; agent
/// connections are refused (the agent tries another server).
/// The routes only the leader serves, as (method, path): marked where they are registered
/// (`Routes::leader` in the API).
pub type LeaderOnly = Arc<std::collections::HashSet<(String, String)>>;

pub async fn forward(
    State((app, leader_only)): State<(Arc<App>, LeaderOnly)>,
    req: Request,
    next: Next,
) -> Response {
    if app.cluster.is_leader() {
        return next.run(req).await;
    }
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if route == "/api/v1/agent/ws" {
        return unavailable("this server does not lead the cluster: connect to the leader".into());
    }
    if !leader_only.contains(&(req.method().to_string(), route.clone())) {
        return next.run(req).await;
    }
    let Some(leader) = app.cluster.leader_url() else {
        return unavailable("no server leads the cluster right now; try again".into());
    };
    if req.headers().contains_key("x-muster-forwarded") {
        return unavailable("the leader moved; try again".into());
    }
    match proxy(&leader, req, app.config.server.body_max).await {
        Ok(r) => r,
        Err(e) => unavailable(format!("cannot reach the leader at {leader}: {e}")),
    }
}

/// Sends `req` to the leader and streams its answer back.
async fn proxy(leader: &str, req: Request, body_max: usize) -> Result<Response, String> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, body_max)
        .await
        .map_err(|e| e.to_string())?;
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let url = format!("{}{}", leader.trim_end_matches('/'), path);
    let mut builder = ureq::http::Request::builder()
        .method(parts.method.clone())
        .uri(&url)
        .header("x-muster-forwarded", "1");
    for name in [
        "authorization",
        "cookie",
        "x-csrf-token",
        "content-type",
        "idempotency-key",
        "x-forwarded-for",
    ] {
        if let Some(v) = parts.headers.get(name) {
            builder = builder.header(name, v.clone());
        }
    }
    let request = builder.body(body.to_vec()).map_err(|e| e.to_string())?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .into();
        let resp = match agent.run(request) {
            Ok(r) => r,
            Err(e) => {
                let _ = head_tx.send(Err(e.to_string()));
                return;
            }
        };
        let status = resp.status();
        let ct = resp.headers().get("content-type").cloned();
        let _ = head_tx.send(Ok((status, ct)));
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            use std::io::Read;
            match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(Ok(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let (status, ct) = head_rx.await.map_err(|e| e.to_string())??;
    let mut resp = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    *resp.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    if let Some(ct) = ct.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
        resp.headers_mut().insert("content-type", ct);
    }
    Ok(resp)
}
