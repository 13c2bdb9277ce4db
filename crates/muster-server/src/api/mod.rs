//! The HTTP API (SPEC §9). Routes are thin: they parse and check input, call a domain function
//! (the store, the job manager, [`crate::accounts`]), and map the result. Only this module knows
//! HTTP and JSON.
//!
//! - `mod.rs`: errors, the JSON body and caller extractors (bearer token or session cookie with
//!   CSRF), the router (every route is recorded for the OpenAPI check), health.
//! - `jobs.rs`, `accounts.rs`: the routes of each area. `openapi.rs`: the OpenAPI document.

mod accounts;
pub use accounts::LoginLimiter;
mod jobs;
mod nodes;
pub mod openapi;
mod scripts;

use crate::accounts::Role;
use crate::auth;
use crate::manager::now;
use crate::App;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::Router;
use muster_store::{Token, User};
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
        let hash = auth::sha256_hex(&token_text);
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
            "websocket from origin {origin:?} refused"
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
}

impl Routes {
    fn new() -> Routes {
        Routes {
            router: Router::new(),
            list: Vec::new(),
        }
    }

    fn add(mut self, path: &str, methods: &[&str], mr: MethodRouter<Arc<App>>) -> Routes {
        for m in methods {
            self.list.push((m.to_string(), path.to_string()));
        }
        self.router = self.router.route(path, mr);
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
    jobs::routes(r)
}

/// The whole router.
pub fn router(app: Arc<App>) -> Router {
    routes()
        .router
        .fallback(|| async { ApiError::not_found("route") })
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            crate::cluster::forward,
        ))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            forget_callers,
        ))
        .layer(axum::middleware::from_fn_with_state(app.clone(), observe))
        .layer(DefaultBodyLimit::max(64 << 20))
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
