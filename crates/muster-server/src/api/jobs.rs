//! Routes of the job manager: trees, jobs, logs, the event feed.

use super::*;
use crate::accounts::Role;
use crate::jobs::submit;
use crate::jobs::AbortError;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use muster_core::spec::{build_tree_with, JobSpec};
use muster_core::{Job, Run, Tree, TreeState, Uuid};
use muster_store::{Created, Event, TreeFilter};
use serde::Deserialize;
use serde_json::Value;

pub(super) fn routes(r: Routes) -> Routes {
    r.add(
        "/api/v1/jobs",
        &["GET", "POST"],
        post(create_jobs).get(list_jobs),
    )
    .leader(&["POST"])
    .add("/api/v1/jobs/{id}", &["GET"], get(get_job))
    .add("/api/v1/jobs/{id}/tree", &["GET"], get(get_tree))
    .add("/api/v1/jobs/{id}/abort", &["POST"], post(abort_job))
    .leader(&["POST"])
    .add("/api/v1/jobs/{id}/log", &["GET"], get(job_log))
    .leader(&["GET"])
    .add("/api/v1/jobs/{id}/log/ws", &["GET"], get(job_log_ws))
    // A batch's result CSV is a blob of the leader (it split, scored and merged the batch):
    // a follower forwards the call, streamed, so it reads the same from any server.
    .add("/api/v1/jobs/{id}/result", &["GET"], get(job_result))
    .leader(&["GET"])
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

/// A job tree in a request body: JSON (`application/json`, or no type), or TOML
/// (`application/toml`), the two forms `muster jobs run --file` reads.
struct TreeBody(JobSpec);

impl<S: Send + Sync> axum::extract::FromRequest<S> for TreeBody {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let toml = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/toml"));
        if !toml {
            let JsonBody(spec) = JsonBody::from_request(req, state).await?;
            return Ok(TreeBody(spec));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.body_text())
            })?;
        let text =
            std::str::from_utf8(&bytes).map_err(|_| ApiError::bad("the TOML body is not UTF-8"))?;
        toml::from_str(text)
            .map(TreeBody)
            .map_err(|e| ApiError::bad(toml_error(text, &e)))
    }
}

/// A TOML error as one short line with its place, without the quoted input that the error's
/// own text carries.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let mut message: String = e.message().trim().chars().take(120).collect();
    if let Some(first) = message.lines().next() {
        message = first.to_string();
    }
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("invalid TOML body at line {line}, column {column}: {message}")
        }
        None => format!("invalid TOML body: {message}"),
    }
}

async fn create_jobs(
    State(app): AppState,
    caller: Caller,
    headers: HeaderMap,
    TreeBody(spec): TreeBody,
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
    let limits = muster_core::spec::Limits {
        command_bytes: app.config.jobs.command_max,
    };
    let (new, digest) = tokio::task::spawn_blocking(move || {
        let new = build_tree_with(&spec, &limits, &user, Some(&user), now(), &mut Uuid::now_v7)?;
        Ok::<_, String>((new, submit::digest(&spec)))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::bad)?;
    // While the store is down, refuse at once (503) rather than queue behind the outage.
    let store = app.store.clone();
    blocking(move || Ok(store.ping()?)).await?;
    // Running anything needs `operator` in the tree's workspace (SPEC §13).
    caller.need_role(&new.tree.tags.workspace, Role::Operator)?;
    // A tree that could never run (no such workspace, node or matching node) is refused now.
    let store = app.store.clone();
    let mut new = blocking(move || {
        submit::check(&*store, &new)?;
        Ok(new)
    })
    .await?;
    new.tree.admin = caller.user.admin;
    new.tree.request_digest = Some(digest.clone());
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
                // A retry gets the first tree; another request under the same key does not.
                if tree.request_digest.as_ref().is_some_and(|d| *d != digest) {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "idempotency_key_reused",
                        "this Idempotency-Key was used with another request: use a new key",
                    ));
                }
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
    let Query(q) = q.map_err(|e| ApiError::bad(parse_error("invalid query", &e.body_text())))?;
    caller.need_scope("read")?;
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad("limit must be 1-1000"));
    }
    let state = match &q.state {
        Some(s) => Some(TreeState::parse(s).ok_or_else(|| {
            ApiError::bad(format!(
                "state {} is not running, succeeded, failed or aborted",
                quote(s)
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
        .map_err(|_| ApiError::bad(format!("{} is not a job id", quote(id))))
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
    let (job, tree) = load_job(&app, &caller, &id).await?;
    // A batch tree's result is its CSV, once the tree has succeeded.
    if job.parent.is_none()
        && tree.tags.labels.get("kind").map(String::as_str)
            == Some(crate::models::batch::KIND_BATCH)
    {
        if tree.state != TreeState::Succeeded {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_finished",
                format!(
                    "the batch is {}; its result is not ready",
                    tree.state.as_str()
                ),
            ));
        }
        let (a, id) = (app.clone(), job.id);
        let b = blocking(move || Ok(crate::models::batch::get(&a, id)?)).await?;
        if let Some(blob) = b.and_then(|b| b.result) {
            return super::models::batch_result(&app, &blob);
        }
    }
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
    /// Only the last this many bytes (see [`crate::logs::Range`]).
    tail: Option<u64>,
    /// Bytes from this offset on.
    offset: Option<u64>,
    /// At most this many bytes.
    limit: Option<u64>,
}

/// The part of a log a query asks for, if any; refuses what does not make sense.
fn log_range(q: &LogQuery) -> ApiResult<Option<crate::logs::Range>> {
    use crate::logs::Range;
    if q.tail.is_none() && q.offset.is_none() && q.limit.is_none() {
        return Ok(None);
    }
    if q.follow {
        return Err(ApiError::bad(
            "tail, offset and limit read a part of a log; they do not go with follow",
        ));
    }
    match (q.tail, q.offset, q.limit) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            Err(ApiError::bad("give either tail or offset/limit, not both"))
        }
        (Some(0), _, _) | (_, _, Some(0)) => {
            Err(ApiError::bad("tail and limit must be at least 1"))
        }
        (Some(n), None, None) => Ok(Some(Range::Tail(n))),
        (None, offset, limit) => Ok(Some(Range::Span {
            offset: offset.unwrap_or(0),
            limit,
        })),
    }
}

/// Answers a part of a log, with where it starts (`X-Log-Offset`) and how big the whole log is
/// so far (`X-Log-Size`).
fn log_part(part: crate::logs::LogPart) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::HeaderName::from_static("x-log-offset"),
                part.start.to_string(),
            ),
            (
                header::HeaderName::from_static("x-log-size"),
                part.size.to_string(),
            ),
        ],
        part.data,
    )
        .into_response()
}

fn log_error(e: crate::logs::LogError) -> ApiError {
    match e {
        crate::logs::LogError::NotFound(what) => ApiError::not_found(&what),
        crate::logs::LogError::NodeUnavailable(m) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "node_unavailable", m)
        }
    }
}

/// Opens a job's log for the caller: the pieces of its text, ending with the log (with
/// `follow`, at the attempt's end).
async fn open_log(
    app: &Arc<App>,
    caller: &Caller,
    id: &str,
    q: &LogQuery,
) -> ApiResult<tokio::sync::mpsc::Receiver<String>> {
    let (job, _) = load_job(app, caller, id).await?;
    let attempt = q.attempt.unwrap_or(job.attempt);
    crate::logs::read(app, job.id, attempt, q.follow)
        .await
        .map_err(log_error)
}

async fn job_log(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::bad(parse_error("invalid query", &e.body_text())))?;
    if let Some(range) = log_range(&q)? {
        let (job, _) = load_job(&app, &caller, &id).await?;
        let attempt = q.attempt.unwrap_or(job.attempt);
        let part = crate::logs::read_part(&app, job.id, attempt, range)
            .await
            .map_err(log_error)?;
        return Ok(log_part(part));
    }
    let rx = open_log(&app, &caller, &id, &q).await?;
    Ok(super::text_stream(rx))
}

/// A websocket that only writes to its client (log follows, the event feed): a small read
/// buffer instead of the default 128 KiB, so a thousand of them cost little.
pub(super) fn ws_small(ws: WebSocketUpgrade) -> WebSocketUpgrade {
    ws.read_buffer_size(4 * 1024).write_buffer_size(16 * 1024)
}

/// Sends a log's pieces to a websocket client until the log ends, then closes. It reads too: a
/// client that goes away ends its follow now, not at the next line, and the first read frees
/// what the upgrade had buffered (hyper's 8 KiB read buffer, the most of an idle follow).
pub(super) async fn send_lines(mut socket: WebSocket, mut rx: tokio::sync::mpsc::Receiver<String>) {
    loop {
        tokio::select! {
            data = rx.recv() => match data {
                Some(data) => {
                    if socket.send(Message::Text(data.into())).await.is_err() {
                        return;
                    }
                }
                None => break,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

/// Carries the leader's log websocket to a client of this follower.
pub(super) async fn relay_ws(mut socket: WebSocket, url: String, headers: Vec<(String, String)>) {
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
    let Query(mut q) =
        q.map_err(|e| ApiError::bad(parse_error("invalid query", &e.body_text())))?;
    if q.tail.is_some() || q.offset.is_some() || q.limit.is_some() {
        return Err(ApiError::bad(
            "the log websocket follows the whole log: read parts with GET .../log?tail=",
        ));
    }
    if !app.cluster.is_leader() {
        // A follower relays the leader's log websocket (the agent is connected there).
        load_job(&app, &caller, &id).await?;
        let leader = app.cluster.leader_url();
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
    let rx = open_log(&app, &caller, &id, &q).await?;
    Ok(ws_small(ws).on_upgrade(move |socket: WebSocket| send_lines(socket, rx)))
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
        Event::Job { workspace, .. }
        | Event::Tree { workspace, .. }
        | Event::Process { workspace, .. }
        | Event::Model { workspace, .. }
        | Event::Batch { workspace, .. } => caller.role(workspace).is_some(),
        Event::Node { .. } => true,
    };
    Ok(
        ws_small(ws).on_upgrade(move |mut socket: WebSocket| async move {
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
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(tail: Option<u64>, offset: Option<u64>, limit: Option<u64>, follow: bool) -> LogQuery {
        LogQuery {
            attempt: None,
            follow,
            tail,
            offset,
            limit,
        }
    }

    #[test]
    fn toml_errors_say_where_without_quoting_the_input() {
        let text = "name = \"x\"\nsecret-token-abc = = 3\n";
        let e = toml::from_str::<JobSpec>(text).unwrap_err();
        let m = toml_error(text, &e);
        assert!(m.starts_with("invalid TOML body at line 2, column "), "{m}");
        assert!(!m.contains("secret-token-abc") && !m.contains('\n'), "{m}");
        let e = toml::from_str::<JobSpec>("name = \"x\"\nbogus = 1\n").unwrap_err();
        let m = toml_error("name = \"x\"\nbogus = 1\n", &e);
        assert!(m.contains("line 2") && m.contains("unknown field"), "{m}");
    }

    #[test]
    fn log_ranges_cut_within_the_log_and_refuse_nonsense() {
        assert_eq!(log_range(&q(None, None, None, true)).unwrap(), None);
        let tail = log_range(&q(Some(10), None, None, false)).unwrap().unwrap();
        assert_eq!(tail.bounds(100), (90, 100));
        assert_eq!(tail.bounds(4), (0, 4));
        let span = log_range(&q(None, Some(20), Some(30), false))
            .unwrap()
            .unwrap();
        assert_eq!(span.bounds(100), (20, 50));
        assert_eq!(span.bounds(40), (20, 40));
        assert_eq!(span.bounds(10), (10, 10));
        let from = log_range(&q(None, Some(u64::MAX), None, false))
            .unwrap()
            .unwrap();
        assert_eq!(from.bounds(7), (7, 7));
        let huge = log_range(&q(None, Some(5), Some(u64::MAX), false))
            .unwrap()
            .unwrap();
        assert_eq!(huge.bounds(7), (5, 7));
        for bad in [
            q(Some(1), None, None, true),
            q(Some(1), Some(0), None, false),
            q(Some(1), None, Some(2), false),
            q(Some(0), None, None, false),
            q(None, None, Some(0), false),
        ] {
            let e = log_range(&bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message);
        }
    }
}
