//! Routes of the job manager: trees, jobs, logs, the event feed.

use super::*;
use crate::accounts::Role;
use crate::manager::AbortError;
use crate::protocol::ToAgent;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use muster_core::spec::{build_tree, JobSpec};
use muster_core::{Job, JobState, Run, Tree, TreeState, Uuid};
use muster_store::{Created, Event, TreeFilter};
use serde::Deserialize;
use serde_json::Value;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub(super) fn routes(r: Routes) -> Routes {
    r.add(
        "/api/v1/jobs",
        &["GET", "POST"],
        post(create_jobs).get(list_jobs),
    )
    .add("/api/v1/jobs/{id}", &["GET"], get(get_job))
    .add("/api/v1/jobs/{id}/tree", &["GET"], get(get_tree))
    .add("/api/v1/jobs/{id}/abort", &["POST"], post(abort_job))
    .add("/api/v1/jobs/{id}/log", &["GET"], get(job_log))
    .add("/api/v1/jobs/{id}/log/ws", &["GET"], get(job_log_ws))
    .add("/api/v1/jobs/{id}/result", &["GET"], get(job_result))
    .add("/api/v1/events/ws", &["GET"], get(events_ws))
}

/// A job in a creation answer.
pub(super) fn job_brief(j: &Job) -> Value {
    json!({"id": j.id, "key": j.key, "name": j.name, "parent": j.parent, "state": j.state})
}

/// A job as the API shows it: the stored job plus its tree's tags.
fn job_json(job: &Job, tree: &Tree) -> Value {
    let mut v = serde_json::to_value(job).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert(
            "tags".into(),
            serde_json::to_value(&tree.tags).unwrap_or(Value::Null),
        );
        let what = match &job.run {
            Run::Exec(a) => json!({"exec": a}),
            Run::Shell(s) => json!({"shell": s}),
            Run::Noop => json!({"noop": true}),
            Run::Group => json!({}),
        };
        m.remove("run");
        if let Value::Object(w) = what {
            m.extend(w);
        }
    }
    v
}

fn tree_json(t: &Tree) -> Value {
    json!({
        "id": t.id, "name": t.name, "tags": t.tags, "state": t.state, "on_failure": t.on_failure,
        "created_at": t.created_at, "finished_at": t.finished_at, "jobs": t.jobs, "nodes": t.nodes,
        "created_by": t.created_by,
    })
}

async fn create_jobs(
    State(app): AppState,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(spec): JsonBody<JobSpec>,
) -> ApiResult<Response> {
    let key = match headers.get("idempotency-key") {
        Some(v) => {
            let k = v
                .to_str()
                .map_err(|_| ApiError::bad("Idempotency-Key must be text"))?;
            if k.is_empty() || k.len() > 200 {
                return Err(ApiError::bad("Idempotency-Key must be 1-200 characters"));
            }
            Some(format!("{}:{k}", caller.user.name))
        }
        None => None,
    };
    let user = caller.user.name.clone();
    let new = tokio::task::spawn_blocking(move || {
        build_tree(&spec, &user, Some(&user), now(), &mut Uuid::now_v7)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::bad)?;
    // While the store is down, refuse at once (503) rather than queue behind the outage.
    let store = app.store.clone();
    blocking(move || Ok(store.ping()?)).await?;
    // Running anything needs `operator` in the tree's workspace (SPEC §13).
    caller.need_role(&new.tree.tags.workspace, Role::Operator)?;
    let mut new = new;
    new.tree.admin = caller.user.admin;
    let tree = new.tree.clone();
    // The answer names every job (id, key, name, parent); GET the tree for the rest.
    let jobs: Vec<Value> = new.jobs.iter().map(job_brief).collect();
    match app.manager.create(new, key).await? {
        Created::New => Ok((
            StatusCode::CREATED,
            axum::Json(json!({"id": tree.id, "jobs": jobs})),
        )
            .into_response()),
        Created::Existing(id) => {
            let (tree, jobs) = blocking(move || {
                let tree = app
                    .store
                    .tree(id)?
                    .ok_or_else(|| ApiError::not_found("tree"))?;
                Ok((tree, app.store.tree_jobs(id)?))
            })
            .await?;
            let jobs: Vec<Value> = jobs.iter().map(job_brief).collect();
            Ok((
                StatusCode::OK,
                axum::Json(json!({"id": tree.id, "jobs": jobs})),
            )
                .into_response())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    workspace: Option<String>,
    application: Option<String>,
    version: Option<String>,
    instance: Option<String>,
    node: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list_jobs(
    State(app): AppState,
    caller: Caller,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    caller.need_scope("read")?;
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad("limit must be 1-1000"));
    }
    let state = match &q.state {
        Some(s) => Some(TreeState::parse(s).ok_or_else(|| {
            ApiError::bad(format!(
                "state {s:?} is not running, succeeded, failed or aborted"
            ))
        })?),
        None => None,
    };
    let cursor = match &q.cursor {
        Some(c) => Some(
            c.parse::<Uuid>()
                .map_err(|_| ApiError::bad("cursor is not one this server gave"))?,
        ),
        None => None,
    };
    let filter = TreeFilter {
        workspaces: caller.workspaces(),
        workspace: q.workspace,
        application: q.application,
        version: q.version,
        instance: q.instance,
        node: q.node,
        state,
    };
    let trees = blocking(move || Ok(app.store.list_trees(&filter, cursor, limit)?)).await?;
    let next = if trees.len() == limit {
        trees.last().map(|t| t.id.to_string())
    } else {
        None
    };
    let items: Vec<Value> = trees.iter().map(tree_json).collect();
    Ok(axum::Json(json!({"items": items, "next_cursor": next})).into_response())
}

fn parse_id(id: &str) -> ApiResult<Uuid> {
    id.parse()
        .map_err(|_| ApiError::bad(format!("{id:?} is not a job id")))
}

/// Loads a job and its tree, checking that the caller may see them.
async fn load_job(app: &Arc<App>, caller: &Caller, id: &str) -> ApiResult<(Job, Tree)> {
    let id = parse_id(id)?;
    let store = app.store.clone();
    let (job, tree) = blocking(move || {
        let job = store.job(id)?.ok_or_else(|| ApiError::not_found("job"))?;
        let tree = store
            .tree(job.tree)?
            .ok_or_else(|| ApiError::not_found("tree"))?;
        Ok((job, tree))
    })
    .await?;
    if !caller.may_see(&tree.tags.workspace) {
        return Err(ApiError::not_found("job"));
    }
    Ok((job, tree))
}

async fn get_job(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (job, tree) = load_job(&app, &caller, &id).await?;
    Ok(axum::Json(job_json(&job, &tree)).into_response())
}

async fn get_tree(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (job, tree) = load_job(&app, &caller, &id).await?;
    let store = app.store.clone();
    let tid = tree.id;
    let jobs = blocking(move || Ok(store.tree_jobs(tid)?)).await?;
    // Nest bottom-up: jobs come root first in pre-order, so children follow their parent.
    let index: HashMap<Uuid, usize> = jobs.iter().enumerate().map(|(i, j)| (j.id, i)).collect();
    let mut built: Vec<Option<Value>> = vec![None; jobs.len()];
    for i in (0..jobs.len()).rev() {
        let mut v = job_json(&jobs[i], &tree);
        let kids: Vec<Value> = jobs[i]
            .children
            .iter()
            .filter_map(|c| built[index[c]].take())
            .collect();
        if let Value::Object(m) = &mut v {
            m.insert("children".into(), Value::Array(kids));
        }
        built[i] = Some(v);
    }
    let start = index.get(&job.id).copied().unwrap_or(0);
    let mut root = if start == 0 {
        built[0].take().unwrap_or(Value::Null)
    } else {
        job_json(&job, &tree)
    };
    if let Value::Object(m) = &mut root {
        m.insert("tree_state".into(), json!(tree.state));
        m.insert("on_failure".into(), json!(tree.on_failure));
    }
    Ok(axum::Json(root).into_response())
}

async fn abort_job(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (job, tree) = load_job(&app, &caller, &id).await?;
    caller.need_role(&tree.tags.workspace, Role::Operator)?;
    match app.manager.abort(tree.id).await {
        Ok(()) => Ok((
            StatusCode::ACCEPTED,
            axum::Json(json!({"id": job.id, "tree": tree.id, "state": "aborting"})),
        )
            .into_response()),
        Err(AbortError::Finished(s)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("the tree has already {}", s.as_str()),
        )),
        Err(AbortError::NotFound) => Err(ApiError::not_found("tree")),
    }
}

async fn job_result(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (job, _) = load_job(&app, &caller, &id).await?;
    if !job.state.is_final() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_finished",
            format!("the job is {}; it has no result yet", job.state.as_str()),
        ));
    }
    Ok(axum::Json(json!({"id": job.id, "state": job.state, "exit_code": job.exit_code, "error": job.error, "result": job.result})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    attempt: Option<u32>,
    #[serde(default)]
    follow: bool,
}

/// Where a log's text comes from.
enum LogSource {
    /// The uploaded log of an ended attempt.
    Stored(Vec<u8>),
    /// Chunks from the agent that runs (or ran) the attempt; dropping it stops the stream.
    Live(LiveLog),
}

struct LiveLog {
    rx: UnboundedReceiver<(String, bool)>,
    stop: Option<(Arc<App>, String, u64)>,
    /// Reads a node's log endpoint (the direct path).
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for LiveLog {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
        if let Some((app, node, stream)) = self.stop.take() {
            app.streams
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&stream);
            if let Some(tx) = app
                .agents
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&node)
            {
                let _ = tx.send(ToAgent::StopLog { stream });
            }
        }
    }
}

async fn open_log(app: &Arc<App>, caller: &Caller, id: &str, q: &LogQuery) -> ApiResult<LogSource> {
    let (mut job, _) = load_job(app, caller, id).await?;
    let attempt = q.attempt.unwrap_or(job.attempt);
    if attempt == 0 || attempt > job.attempt {
        return Err(ApiError::not_found(&format!("attempt {attempt}")));
    }
    // A followed job that has not started yet: wait for it to start or end.
    if q.follow && job.state == JobState::Waiting && attempt == job.attempt {
        let mut events = app.store.subscribe();
        loop {
            let store = app.store.clone();
            let jid = job.id;
            job =
                blocking(move || store.job(jid)?.ok_or_else(|| ApiError::not_found("job"))).await?;
            if job.state != JobState::Waiting || job.attempt != attempt {
                break;
            }
            loop {
                match events.recv().await {
                    Ok(Event::Job { id, .. }) if id == job.id => break,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(_) => return Err(ApiError::internal("event feed closed")),
                }
            }
        }
    }
    let store = app.store.clone();
    let jid = job.id;
    if let Some(blob) = blocking(move || Ok(store.log_blob(jid, attempt)?)).await? {
        let blobs = app.blobs.clone();
        let data = blocking(move || blobs.get(&blob).map_err(ApiError::internal)).await?;
        return Ok(LogSource::Stored(data));
    }
    if job.state == JobState::Waiting || (job.node.is_none() && job.state.is_final()) {
        return Ok(LogSource::Stored(Vec::new()));
    }
    let node = job.node.clone().unwrap_or_default();
    let agent = app
        .agents
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&node)
        .cloned();
    let Some(agent) = agent else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_unavailable",
            format!("the log is on node {node:?}, which is not connected now"),
        ));
    };
    let endpoint = app
        .log_endpoints
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&node)
        .filter(|ep| ep.usable(std::time::Instant::now()))
        .cloned();
    if let Some(ep) = endpoint {
        let direct = tokio::time::timeout(
            // Short: a firewalled endpoint must not hold up the follower long (the connection
            // path takes over).
            ENDPOINT_DIAL,
            endpoint_log(app, &ep, job.id, attempt, q.follow),
        )
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timed out")));
        let mut eps = app.log_endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let known = eps.get_mut(&node).filter(|e| e.session == ep.session);
        match direct {
            Ok(live) => {
                if let Some(known) = known {
                    known.failures = 0;
                    known.retry_at = None;
                }
                app.metrics
                    .log_streams_direct
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(LogSource::Live(live));
            }
            Err(e) => {
                let rest = known.map(|known| {
                    let now = std::time::Instant::now();
                    known.failed(now);
                    known.retry_at.map_or(0, |t| (t - now).as_secs())
                });
                eprintln!(
                    "muster: cannot reach the log endpoint of node {node:?} at {}: {e}; relaying over its connection for {}s",
                    ep.addr,
                    rest.unwrap_or(0)
                );
            }
        }
    }
    app.metrics
        .log_streams_relayed
        .fetch_add(1, Ordering::Relaxed);
    let stream = app.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = unbounded_channel();
    app.streams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(stream, tx);
    let _ = agent.send(ToAgent::FollowLog {
        stream,
        job: job.id,
        attempt,
        from: 0,
        follow: q.follow,
    });
    Ok(LogSource::Live(LiveLog {
        rx,
        stop: Some((app.clone(), node, stream)),
        reader: None,
    }))
}

/// The whole of dialing a node's log endpoint (TCP, TLS, websocket upgrade) gets this long.
const ENDPOINT_DIAL: std::time::Duration = std::time::Duration::from_secs(3);

/// Streams a log straight from the node's own endpoint (TLS both ways under the cluster CA: the
/// node must hold the certificate made for its id, this server shows its own).
async fn endpoint_log(
    app: &Arc<App>,
    ep: &crate::LogEndpoint,
    job: muster_core::Uuid,
    attempt: u32,
    follow: bool,
) -> std::io::Result<LiveLog> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message as TMessage;
    let addr = ep.addr.to_string();
    let tls = crate::tls::dial(
        &addr,
        app.tls.get().dialer.clone(),
        &crate::tls::node_name(&ep.node_id),
        ENDPOINT_DIAL,
    )
    .await?;
    let url = format!("wss://{addr}/logs/{job}/{attempt}?follow={follow}");
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .map_err(std::io::Error::other)?;
    let (tx, rx) = unbounded_channel();
    let reader = tokio::spawn(async move {
        loop {
            match ws.next().await {
                Some(Ok(TMessage::Text(t))) => {
                    if tx.send((t.to_string(), false)).is_err() {
                        return;
                    }
                }
                Some(Ok(TMessage::Ping(_) | TMessage::Pong(_) | TMessage::Frame(_))) => {}
                // A close, an error or the end: the log ends here.
                _ => {
                    let _ = tx.send((String::new(), true));
                    return;
                }
            }
        }
    });
    Ok(LiveLog {
        rx,
        stop: None,
        reader: Some(reader),
    })
}

async fn job_log(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let text = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    match open_log(&app, &caller, &id, &q).await? {
        LogSource::Stored(data) => Ok((text, data).into_response()),
        LogSource::Live(live) => {
            let stream = futures_stream(live);
            Ok((
                text,
                [(header::CACHE_CONTROL, "no-cache")],
                Body::from_stream(stream),
            )
                .into_response())
        }
    }
}

/// Turns a live log into a body stream that ends at the agent's end-of-file.
fn futures_stream(
    mut live: LiveLog,
) -> impl tokio_stream::Stream<Item = Result<String, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(16);
    tokio::spawn(async move {
        while let Some((data, eof)) = live.rx.recv().await {
            if !data.is_empty() && tx.send(Ok(data)).await.is_err() {
                return;
            }
            if eof {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Carries the leader's log websocket to a client of this follower.
async fn relay_ws(mut socket: WebSocket, url: String, headers: Vec<(String, String)>) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message as TMessage;
    let Ok(mut req) = url.into_client_request() else {
        return;
    };
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (axum::http::HeaderName::from_bytes(k.as_bytes()), v.parse()) {
            req.headers_mut().insert(k, v);
        }
    }
    let Ok((mut upstream, _)) = tokio_tungstenite::connect_async(req).await else {
        let _ = socket.send(Message::Close(None)).await;
        return;
    };
    loop {
        tokio::select! {
            m = upstream.next() => match m {
                Some(Ok(TMessage::Text(t))) => {
                    if socket.send(Message::Text(t.as_str().into())).await.is_err() { break; }
                }
                Some(Ok(TMessage::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            m = socket.recv() => match m {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => {}
            },
        }
    }
    let _ = upstream.close(None).await;
    let _ = socket.send(Message::Close(None)).await;
}

async fn job_log_ws(
    State(app): AppState,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    check_origin(&headers)?;
    let Query(mut q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    if !app.leading.load(Ordering::SeqCst) {
        // A follower relays the leader's log websocket (the agent is connected there).
        load_job(&app, &caller, &id).await?;
        let leader = app
            .leader_url
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(leader) = leader else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_leader",
                "no server leads the cluster right now; try again",
            ));
        };
        let mut url = format!(
            "{}/api/v1/jobs/{id}/log/ws",
            leader.trim_end_matches('/').replacen("http", "ws", 1)
        );
        if let Some(a) = q.attempt {
            url.push_str(&format!("?attempt={a}"));
        }
        let auth: Vec<(String, String)> = ["authorization", "cookie"]
            .iter()
            .filter_map(|h| Some((h.to_string(), headers.get(*h)?.to_str().ok()?.to_string())))
            .collect();
        return Ok(ws.on_upgrade(move |socket| relay_ws(socket, url, auth)));
    }
    q.follow = true;
    let source = open_log(&app, &caller, &id, &q).await?;
    Ok(ws.on_upgrade(move |mut socket: WebSocket| async move {
        match source {
            LogSource::Stored(data) => {
                let _ = socket
                    .send(Message::Text(
                        String::from_utf8_lossy(&data).into_owned().into(),
                    ))
                    .await;
            }
            LogSource::Live(mut live) => {
                while let Some((data, eof)) = live.rx.recv().await {
                    if !data.is_empty() && socket.send(Message::Text(data.into())).await.is_err() {
                        return;
                    }
                    if eof {
                        break;
                    }
                }
            }
        }
        let _ = socket.send(Message::Close(None)).await;
    }))
}

async fn events_ws(
    State(app): AppState,
    caller: Caller,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    check_origin(&headers)?;
    caller.need_scope("read")?;
    let mut rx = app.store.subscribe();
    // Each caller sees the events of their own workspaces only (node events: everyone).
    let visible = move |ev: &Event| match ev {
        Event::Job { workspace, .. } | Event::Tree { workspace, .. } => {
            caller.role(workspace).is_some()
        }
        Event::Node { .. } => true,
    };
    Ok(ws.on_upgrade(move |mut socket: WebSocket| async move {
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(ev) if !visible(&ev) => {}
                    Ok(ev) => {
                        let text = serde_json::to_string(&ev).unwrap_or_default();
                        if socket.send(Message::Text(text.into())).await.is_err() { return; }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let text = json!({"type": "lagged", "missed": n}).to_string();
                        if socket.send(Message::Text(text.into())).await.is_err() { return; }
                    }
                    Err(_) => return,
                },
                msg = socket.recv() => match msg {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    _ => {}
                },
            }
        }
    }))
}
