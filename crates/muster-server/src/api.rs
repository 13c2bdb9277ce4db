//! The HTTP API (SPEC §9). Routes are thin: they parse and check input, call the store, the job
//! manager or an agent, and map the result. Only this module knows HTTP and JSON.

use crate::auth;
use crate::manager::{now, AbortError};
use crate::protocol::ToAgent;
use crate::App;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use muster_core::spec::{build_tree, JobSpec};
use muster_core::{Job, JobState, Tree, TreeState, Uuid};
use muster_store::{Created, Event, Token, TreeFilter, User};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

type AppState = State<Arc<App>>;

/// An error answer: `{"error": {"code", "message"}}` with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
    fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

impl From<muster_store::StoreError> for ApiError {
    fn from(e: muster_store::StoreError) -> ApiError {
        match e {
            muster_store::StoreError::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "store unavailable",
            ),
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// A JSON body whose every problem (syntax, unknown fields, wrong types) is a 400 with the reason.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct.is_empty() && !ct.starts_with("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send application/json",
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.body_text())
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
    }
}

/// The caller, from `Authorization: Bearer <token>`.
pub struct Caller {
    pub user: User,
    pub token: Token,
}

impl Caller {
    /// The workspaces the caller may see; `None` for cluster admins (all).
    fn workspaces(&self) -> Option<Vec<String>> {
        if self.user.admin {
            None
        } else {
            Some(vec![self.user.name.clone()])
        }
    }

    fn may_see(&self, workspace: &str) -> bool {
        self.workspaces()
            .is_none_or(|w| w.iter().any(|x| x == workspace))
    }
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token_text =
            match value.and_then(|v| v.strip_prefix("Bearer ")) {
                Some(t) => t.trim().to_string(),
                None => return Err(unauthorized(
                    "a bearer token is required: log in with `muster login` or POST /api/v1/login",
                )),
            };
        let hash = auth::sha256_hex(&token_text);
        let store = app.store.clone();
        let found = tokio::task::spawn_blocking(
            move || -> muster_store::Result<Option<(Token, Option<User>)>> {
                let Some(t) = store.token_by_hash(&hash)? else {
                    return Ok(None);
                };
                let u = store.user(&t.user)?;
                Ok(Some((t, u)))
            },
        )
        .await
        .map_err(ApiError::internal)??;
        match found {
            Some((token, Some(user))) if token.expires_at.is_none_or(|e| e > now()) => {
                Ok(Caller { user, token })
            }
            Some((_, Some(_))) => Err(unauthorized("the token has expired: log in again")),
            _ => Err(unauthorized("the token is not valid")),
        }
    }
}

/// Runs a blocking store call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

/// The whole router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/setup", post(setup))
        .route("/api/v1/login", post(login))
        .route("/api/v1/jobs", post(create_jobs).get(list_jobs))
        .route("/api/v1/jobs/{id}", get(get_job))
        .route("/api/v1/jobs/{id}/tree", get(get_tree))
        .route("/api/v1/jobs/{id}/abort", post(abort_job))
        .route("/api/v1/jobs/{id}/log", get(job_log))
        .route("/api/v1/jobs/{id}/log/ws", get(job_log_ws))
        .route("/api/v1/jobs/{id}/result", get(job_result))
        .route("/api/v1/events/ws", get(events_ws))
        .fallback(|| async { ApiError::not_found("route") })
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(app)
}

async fn index(State(app): AppState) -> ApiResult<Response> {
    let users = blocking({
        let app = app.clone();
        move || Ok(app.store.users()?.len())
    })
    .await?;
    let body = if users == 0 {
        "<!doctype html><title>muster setup</title><h1>muster</h1><p>No user exists yet. Create the admin with the one-time code from <code>&lt;data-dir&gt;/setup-code</code>: <code>muster setup</code> or <code>POST /api/v1/setup</code>.</p>".to_string()
    } else {
        "<!doctype html><title>muster</title><h1>muster</h1><p>The API is at <code>/api/v1</code>; log in with <code>muster login</code>.</p>".to_string()
    };
    Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response())
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn readyz(State(app): AppState) -> Response {
    let store = app.store.clone();
    let ping = tokio::task::spawn_blocking(move || store.ping()).await;
    match ping {
        Ok(Ok(())) if app.manager.is_alive() => {
            axum::Json(json!({"status": "ready"})).into_response()
        }
        Ok(Ok(())) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the job manager has stopped",
        )
        .into_response(),
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "store unavailable",
        )
        .into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetupBody {
    setup_code: String,
    username: String,
    password: String,
    #[serde(default)]
    cluster_name: Option<String>,
}

async fn setup(State(app): AppState, JsonBody(b): JsonBody<SetupBody>) -> ApiResult<Response> {
    muster_core::names::check_name("user name", &b.username).map_err(ApiError::bad)?;
    auth::check_password(&b.username, &b.password).map_err(ApiError::bad)?;
    if let Some(c) = &b.cluster_name {
        muster_core::names::check_name("cluster name", c).map_err(ApiError::bad)?;
    }
    let password = b.password.clone();
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let user = User {
        name: b.username.clone(),
        password_hash: hash,
        admin: true,
        created_at: now(),
    };
    let code_hash = auth::sha256_hex(b.setup_code.trim());
    let token = blocking(move || {
        if !app.store.consume_setup_code(&code_hash, &user)? {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "setup_refused",
                "setup refused: the code is wrong or was used, or an admin already exists",
            ));
        }
        if let Some(c) = &b.cluster_name {
            app.store.set_meta("cluster_name", Some(c))?;
        }
        let _ = std::fs::remove_file(app.config.data_dir.join("setup-code"));
        issue_token(&app, &user.name, "setup")
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(json!({"token": token}))).into_response())
}

fn issue_token(app: &App, user: &str, name: &str) -> ApiResult<String> {
    let text = auth::new_token();
    let t = Token {
        id: Uuid::now_v7().to_string(),
        hash: auth::sha256_hex(&text),
        prefix: text[..12].to_string(),
        user: user.to_string(),
        name: name.to_string(),
        scopes: vec![
            "read".into(),
            "operate".into(),
            "admin".into(),
            "predict".into(),
        ],
        created_at: now(),
        expires_at: Some(now().plus_ms(app.config.auth.session_ttl.as_millis() as i64)),
    };
    app.store.put_token(&t)?;
    Ok(text)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: String,
}

async fn login(State(app): AppState, JsonBody(b): JsonBody<LoginBody>) -> ApiResult<Response> {
    let refused = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "login_failed",
            "wrong user name or password",
        )
    };
    let store = app.store.clone();
    let name = b.username.clone();
    let user = blocking(move || Ok(store.user(&name)?)).await?;
    let Some(user) = user else {
        // Hash anyway, so an unknown user takes as long as a wrong password.
        let _ = tokio::task::spawn_blocking(|| auth::hash_password("timing equaliser")).await;
        return Err(refused());
    };
    let (pw, phc) = (b.password.clone(), user.password_hash.clone());
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&pw, &phc))
        .await
        .map_err(ApiError::internal)?;
    if !ok {
        return Err(refused());
    }
    let token = blocking(move || issue_token(&app, &user.name, "login")).await?;
    Ok(axum::Json(json!({"token": token})).into_response())
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
            muster_core::Run::Exec(a) => json!({"exec": a}),
            muster_core::Run::Shell(s) => json!({"shell": s}),
            muster_core::Run::Noop => json!({"noop": true}),
            muster_core::Run::Group => json!({}),
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
    if !caller.may_see(&new.tree.tags.workspace) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "you are not a member of workspace {:?}",
                new.tree.tags.workspace
            ),
        ));
    }
    let tree = new.tree.clone();
    let jobs: Vec<Value> = new.jobs.iter().map(|j| job_json(j, &tree)).collect();
    match app
        .manager
        .create(new, key)
        .await
        .map_err(ApiError::internal)?
    {
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
            let jobs: Vec<Value> = jobs.iter().map(|j| job_json(j, &tree)).collect();
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
}

impl Drop for LiveLog {
    fn drop(&mut self) {
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
    }))
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

async fn job_log_ws(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let Query(mut q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
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

async fn events_ws(State(app): AppState, caller: Caller, ws: WebSocketUpgrade) -> Response {
    let _ = caller;
    let mut rx = app.store.subscribe();
    ws.on_upgrade(move |mut socket: WebSocket| async move {
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
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
    })
}
