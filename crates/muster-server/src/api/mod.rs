//! The HTTP API (SPEC §9). Routes are thin: they parse and check input, call a domain function
//! (the store, the job manager, [`crate::accounts`]), and map the result. Only this module knows
//! HTTP and JSON.
//!
//! - `mod.rs`: errors, the JSON body and caller extractors (bearer token or session cookie with
//!   CSRF), the router (every route is recorded for the OpenAPI check), health.
//! - `jobs.rs`, `accounts.rs`: the routes of each area. `openapi.rs`: the OpenAPI document.

mod accounts;
mod hq;
mod jobs;
mod models;
mod nodes;
pub mod openapi;
mod processes;
mod scripts;
mod services;
mod yhat;

use crate::accounts::Role;
use crate::auth;
use crate::App;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::Router;
use muster_core::names::quote;
use muster_store::{Token, User};
use muster_wire::util::now;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

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
    fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// An internal error: logged here with a fresh error id; the client gets only that id, never
    /// the error's text (which may name files, keys or internals).
    fn internal(e: impl std::fmt::Display) -> ApiError {
        let id = auth::random_hex(6);
        tracing::error!(error_id = %id, "internal error {id}: {e}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error (id {id}; the server's log has the details)"),
        )
    }
}

impl ApiError {
    /// No space left to write: 507, saying where and that it passes once space is freed (the
    /// details, with paths, go to the server's log only).
    fn no_space(what: &str, e: impl std::fmt::Display) -> ApiError {
        tracing::error!("{what} cannot write: {e}");
        ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            format!("{what} cannot write: no space left on its disk; this works again once space is freed there"),
        )
    }
}

impl From<muster_store::StoreError> for ApiError {
    fn from(e: muster_store::StoreError) -> ApiError {
        match e {
            muster_store::StoreError::Unavailable(why) => {
                tracing::warn!("store unavailable: {why}");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "store unavailable",
                )
            }
            muster_store::StoreError::NoSpace(e) => ApiError::no_space("the store", e),
            other => ApiError::internal(other),
        }
    }
}

impl From<crate::blobs::BlobError> for ApiError {
    fn from(e: crate::blobs::BlobError) -> ApiError {
        match e {
            crate::blobs::BlobError::NoSpace(e) => ApiError::no_space("the blob store", e),
            other => ApiError::internal(other),
        }
    }
}

impl From<crate::accounts::AccountError> for ApiError {
    fn from(e: crate::accounts::AccountError) -> ApiError {
        use crate::accounts::AccountError as E;
        match e {
            E::Invalid(m) => ApiError::bad(m),
            E::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            E::NotFound(m) => ApiError::not_found(&m),
            E::Store(s) => s.into(),
        }
    }
}

impl From<crate::jobs::submit::Refused> for ApiError {
    fn from(e: crate::jobs::submit::Refused) -> ApiError {
        use crate::jobs::submit::Refused as R;
        let code = match &e {
            R::Store(_) => {
                let R::Store(s) = e else { unreachable!() };
                return s.into();
            }
            R::NoWorkspace(_) => "unknown_workspace",
            R::NoNode { .. } => "unknown_node",
            R::NoMatch { .. } => "no_matching_node",
        };
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, e.to_string())
    }
}

/// The longest error message sent: every message quotes input through
/// [`muster_core::names::quote`]; this is the guard for one that does not.
pub const MESSAGE_MAX: usize = 400;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut message = self.message;
        if message.len() > MESSAGE_MAX {
            let mut cut = MESSAGE_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        (
            self.status,
            axum::Json(json!({"error": {"code": self.code, "message": message}})),
        )
            .into_response()
    }
}

/// A JSON (or TOML) parser's error as one short line: its own text may quote the input (an
/// unknown field's name, a string of the wrong type), so only its first characters are kept.
fn parse_error(what: &str, message: &str) -> String {
    let first = message.lines().next().unwrap_or("").trim();
    let mut short: String = first.chars().take(120).collect();
    if short.len() < first.len() {
        short.push('…');
    }
    format!("{what}: {short}")
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
            .map_err(|e| ApiError::bad(parse_error("invalid JSON body", &e.to_string())))
    }
}

/// Token scopes (SPEC §13).
pub const SCOPES: &[&str] = &["read", "operate", "admin", "predict"];

/// The authenticated caller: from `Authorization: Bearer <token>` or the session cookie.
pub struct Caller {
    pub user: User,
    pub token: Token,
    /// Roles by workspace (empty for cluster admins, who have every role everywhere).
    pub roles: HashMap<String, Role>,
}

impl Caller {
    /// The workspaces the caller may see; `None` for cluster admins (all).
    pub fn workspaces(&self) -> Option<Vec<String>> {
        if self.user.admin {
            None
        } else {
            let mut w: Vec<String> = self.roles.keys().cloned().collect();
            w.sort();
            Some(w)
        }
    }

    pub fn role(&self, ws: &str) -> Option<Role> {
        if self.user.admin {
            Some(Role::Admin)
        } else {
            self.roles.get(ws).copied()
        }
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.token.scopes.iter().any(|s| s == scope)
    }

    /// Refuses unless the token carries `scope`.
    pub fn need_scope(&self, scope: &str) -> ApiResult<()> {
        if self.has_scope(scope) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this token lacks the {scope:?} scope"
            )))
        }
    }

    /// Refuses unless the caller has at least `role` in `ws` (and the scope that goes with it).
    pub fn need_role(&self, ws: &str, role: Role) -> ApiResult<()> {
        let scope = if role >= Role::Operator {
            "operate"
        } else {
            "read"
        };
        self.need_scope(scope)?;
        match self.role(ws) {
            Some(r) if r >= role => Ok(()),
            _ => Err(ApiError::forbidden(
                format!("this needs the {role:?} role in workspace {ws:?}").to_lowercase(),
            )),
        }
    }

    /// Refuses unless the caller is a cluster admin with the `admin` scope; `what` names the
    /// task for the error ("manage users").
    pub fn need_cluster_admin(&self, what: &str) -> ApiResult<()> {
        self.need_scope("admin")?;
        if self.user.admin {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!("only cluster admins {what}")))
        }
    }

    pub fn may_see(&self, ws: &str) -> bool {
        self.has_scope("read") && self.role(ws).is_some()
    }
}

/// Who a token is, for a couple of seconds: a request then costs no store read to authenticate.
/// Every change of tokens, users or memberships through this server clears it; other servers of
/// a cluster see such a change within [`CallerCache::TTL`].
#[derive(Default)]
pub struct CallerCache {
    map: std::sync::Mutex<HashMap<String, (Instant, CallerEntry)>>,
}

type CallerEntry = (Token, User, HashMap<String, Role>);

impl CallerCache {
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(2);

    fn get(&self, hash: &str) -> Option<CallerEntry> {
        let g = self.map.lock().unwrap_or_else(|e| e.into_inner());
        g.get(hash)
            .filter(|(at, _)| at.elapsed() < Self::TTL)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, hash: String, v: CallerEntry) {
        let mut g = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if g.len() > 10_000 {
            g.retain(|_, (at, _)| at.elapsed() < Self::TTL);
        }
        g.insert(hash, (Instant::now(), v));
    }

    /// Forgets everything (after a token, user or membership changed).
    pub fn clear(&self) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Clears the caller cache once the response is ready, for routes that change who is who.
async fn forget_callers(State(app): AppState, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD)
        && [
            "/api/v1/users",
            "/api/v1/workspaces",
            "/api/v1/tokens",
            "/api/v1/logout",
        ]
        .iter()
        .any(|p| path.starts_with(p));
    let resp = next.run(req).await;
    if changes {
        app.callers.clear();
    }
    resp
}

/// The session cookie's name, and the CSRF cookie's (readable by the page's script).
pub const SESSION_COOKIE: &str = "muster_session";
pub const CSRF_COOKIE: &str = "muster_csrf";

/// The CSRF token of a session: derived from the session token, so it needs no storage, and
/// only a page that can read the CSRF cookie (same origin) can send it.
pub fn csrf_token(session_token: &str) -> String {
    auth::sha256_hex(&format!("csrf:{session_token}"))
}

fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string());
        let (token_text, via_cookie) = match bearer {
            Some(t) => (t, false),
            None => match cookie(&parts.headers, SESSION_COOKIE) {
                Some(t) => (t, true),
                None => return Err(unauthorized(
                    "a bearer token is required: log in with `muster login` or POST /api/v1/login",
                )),
            },
        };
        if via_cookie && !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
            let sent = parts
                .headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !auth::constant_time_eq(sent.as_bytes(), csrf_token(&token_text).as_bytes()) {
                return Err(ApiError::forbidden(
                    "a cookie-authenticated write needs the X-CSRF-Token header",
                ));
            }
        }
        Caller::of_token(app, &token_text).await
    }
}

impl Caller {
    /// The caller a token's text names (through the caller cache): 401 if it is unknown or
    /// expired. For routes that take the token another way (the yhat client's apikey).
    pub async fn of_token(app: &Arc<App>, token_text: &str) -> Result<Caller, ApiError> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let hash = auth::sha256_hex(token_text);
        if let Some(found) = app.callers.get(&hash) {
            return match found {
                (token, user, roles) if token.expires_at.is_none_or(|e| e > now()) => {
                    Ok(Caller { user, token, roles })
                }
                _ => Err(unauthorized(
                    "the token has expired: log in again, or make a new API token",
                )),
            };
        }
        let store = app.store.clone();
        let key = hash.clone();
        let found = blocking(move || {
            let Some(t) = store.token_by_hash(&hash)? else {
                return Ok(None);
            };
            let Some(u) = store.user(&t.user)? else {
                return Ok(None);
            };
            let mut u = u;
            let mut roles: HashMap<String, Role> = if u.admin {
                HashMap::new()
            } else {
                crate::accounts::memberships(&*store, &u.name)?
                    .into_iter()
                    .collect()
            };
            if let Some(ws) = &t.workspace {
                // A workspace token (the one given to jobs) acts in that one workspace, at
                // most as an operator, whoever its user is.
                let role = if u.admin {
                    Some(Role::Admin)
                } else {
                    roles.get(ws).copied()
                };
                roles = role
                    .map(|r| (ws.clone(), r.min(Role::Operator)))
                    .into_iter()
                    .collect();
                u.admin = false;
            }
            Ok(Some((t, u, roles)))
        })
        .await?;
        if let Some((t, u, r)) = &found {
            app.callers.put(key, (t.clone(), u.clone(), r.clone()));
        }
        match found {
            Some((token, user, roles)) if token.expires_at.is_none_or(|e| e > now()) => {
                Ok(Caller { user, token, roles })
            }
            Some(_) => Err(unauthorized(
                "the token has expired: log in again, or make a new API token",
            )),
            None => Err(unauthorized("the token is not valid")),
        }
    }
}

/// A log read or followed, as a plain-text body streamed while its pieces come (job and
/// process logs alike).
pub fn text_stream(rx: tokio::sync::mpsc::Receiver<String>) -> Response {
    let body =
        tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |text| {
            Ok::<_, std::io::Error>(text)
        });
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// A blob of the blob store as the response body, streamed in 64 KiB pieces (never read whole
/// into memory): bundles, archives, exports, batch results. A blob that is gone is a 404.
pub fn blob_response(app: &App, blob: &str, content_type: &'static str) -> ApiResult<Response> {
    let f = match app.blobs.open(blob) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found("blob"))
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    let mut f = tokio::fs::File::from_std(f);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match f.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    if tx.send(Ok(buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err::<Vec<u8>, _>(e)).await;
                    return;
                }
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response())
}

/// Refuses a websocket upgrade from a page of another origin (SPEC §13): a browser always sends
/// `Origin`; it must name the host the request was sent to.
pub fn check_origin(headers: &axum::http::HeaderMap) -> ApiResult<()> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(()); // Not a browser.
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin.split("://").nth(1).unwrap_or("");
    if !host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "websocket from origin {} refused",
            quote(origin)
        )))
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

/// Builds the router while recording every (method, path), so the OpenAPI document can be
/// checked against what is really served.
pub struct Routes {
    router: Router<Arc<App>>,
    pub list: Vec<(String, String)>,
    /// (method, path) that only the leader serves (a follower forwards them).
    leader_only: std::collections::HashSet<(String, String)>,
}

impl Routes {
    fn new() -> Routes {
        Routes {
            router: Router::new(),
            list: Vec::new(),
            leader_only: Default::default(),
        }
    }

    fn add(mut self, path: &str, methods: &[&str], mr: MethodRouter<Arc<App>>) -> Routes {
        for m in methods {
            self.list.push((m.to_string(), path.to_string()));
        }
        self.router = self.router.route(path, mr);
        self
    }

    /// Marks `methods` of the route just added as the leader's alone (they change jobs or need an
    /// agent's connection): in cluster mode a follower forwards them to the leader.
    fn leader(mut self, methods: &[&str]) -> Routes {
        let path = self.list.last().map(|(_, p)| p.clone()).unwrap_or_default();
        for m in methods {
            debug_assert!(self.list.contains(&(m.to_string(), path.clone())));
            self.leader_only.insert((m.to_string(), path.clone()));
        }
        self
    }
}

/// Every route, recorded.
pub fn routes() -> Routes {
    let r = Routes::new()
        .add("/", &["GET"], get(crate::dashboard::index))
        .add("/assets/{file}", &["GET"], get(crate::dashboard::asset))
        .add("/healthz", &["GET"], get(healthz))
        .add("/readyz", &["GET"], get(readyz))
        .add("/metrics", &["GET"], get(crate::metrics::serve))
        .add("/api/v1/openapi.json", &["GET"], get(openapi::serve));
    let r = accounts::routes(r);
    let r = nodes::routes(r);
    let r = scripts::routes(r);
    let r = hq::routes(r);
    let r = processes::routes(r);
    let r = models::routes(r);
    let r = services::routes(r);
    let r = yhat::routes(r);
    jobs::routes(r)
}

/// The whole router.
pub fn router(app: Arc<App>) -> Router {
    let routes = routes();
    let leader_only = Arc::new(routes.leader_only);
    routes
        .router
        .fallback(|| async { ApiError::not_found("route") })
        .route_layer(axum::middleware::from_fn_with_state(
            (app.clone(), leader_only),
            crate::cluster::forward,
        ))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            forget_callers,
        ))
        .layer(axum::middleware::from_fn_with_state(app.clone(), observe))
        .layer(DefaultBodyLimit::max(app.config.server.body_max))
        .with_state(app)
}

/// Times every request for `/metrics` and, with `[perf] enabled`, the perf log.
async fn observe(State(app): AppState, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().clone();
    let resp = next.run(req).await;
    let elapsed = t0.elapsed();
    let status = resp.status().as_u16();
    let label = format!("{method} {route}");
    app.metrics.request(&label, status, elapsed);
    if let Some(perf) = &app.perf {
        perf.record(&label, status, elapsed);
    }
    resp
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn readyz(State(app): AppState) -> Response {
    let store = app.store.clone();
    let ping = tokio::task::spawn_blocking(move || store.ping()).await;
    let a = app.clone();
    if let Ok(Some(full)) = tokio::task::spawn_blocking(move || a.no_space()).await {
        // Reads still work, but nothing can be recorded: not ready.
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "insufficient_storage",
            full,
        )
        .into_response();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_only_routes_are_the_ones_that_change_jobs_or_need_an_agent() {
        let r = routes();
        let mut marked: Vec<(String, String)> = r.leader_only.iter().cloned().collect();
        marked.sort();
        let want = [
            ("DELETE", "/api/v1/models/{ws}/{model}"),
            ("DELETE", "/api/v1/nodes/{id}"),
            ("DELETE", "/api/v1/processes/{id}"),
            ("DELETE", "/api/v1/scripts/{name}"),
            ("GET", "/api/v1/jobs/{id}/log"),
            ("GET", "/api/v1/jobs/{id}/result"),
            ("GET", "/api/v1/processes/{id}/log"),
            ("PATCH", "/api/v1/nodes/{id}"),
            ("POST", "/api/v1/hq/orders/resolve"),
            ("POST", "/api/v1/hq/sync"),
            ("POST", "/api/v1/jobs"),
            ("POST", "/api/v1/jobs/{id}/abort"),
            ("POST", "/api/v1/models/{ws}/{model}"),
            ("POST", "/api/v1/models/{ws}/{model}/batch"),
            (
                "POST",
                "/api/v1/models/{ws}/{model}/batches/{id}/chunks/{chunk}",
            ),
            ("POST", "/api/v1/models/{ws}/{model}/batches/{id}/merge"),
            ("POST", "/api/v1/models/{ws}/{model}/revert"),
            (
                "POST",
                "/api/v1/models/{ws}/{model}/versions/{version}/steps/{step}",
            ),
            ("POST", "/api/v1/processes"),
            ("POST", "/api/v1/processes/{id}/restart"),
            ("POST", "/api/v1/processes/{id}/start"),
            ("POST", "/api/v1/processes/{id}/stop"),
            ("POST", "/api/v1/scripts/{name}/run"),
            ("POST", "/api/v1/services/apply"),
            ("POST", "/api/v1/services/plan"),
            (
                "POST",
                "/api/v1/services/plans/{id}/steps/{key}/process/{verb}",
            ),
            ("POST", "/api/v1/services/{path}/actions/{verb}"),
            ("POST", "/api/v1/services/{path}/import"),
            ("POST", "/api/v1/services/{path}/reset"),
            ("POST", "/batch/deploy"),
            ("POST", "/deployer/model/large"),
            ("PUT", "/api/v1/scripts/{name}"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(marked, want);
        for m in &marked {
            assert!(r.list.contains(m), "{m:?} is marked but not served");
        }
    }

    #[test]
    fn internal_errors_reach_the_client_as_an_id_only() {
        let e = ApiError::internal("disk full at /secret/path/muster.db");
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.message.contains("/secret"), "{}", e.message);
        assert!(e.message.contains("internal error (id "), "{}", e.message);
        let other = ApiError::internal("x");
        assert_ne!(e.message, other.message, "every error gets its own id");
    }
}
