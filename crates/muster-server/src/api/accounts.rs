//! Routes of accounts and access: setup, login/logout, users, workspaces and members, API tokens.

use super::*;
use crate::accounts::{self as acc, Role};
use axum::extract::{ConnectInfo, Path, Query};
use axum::routing::{delete, post, put};
use serde::Deserialize;
use serde_json::Value;
use std::net::IpAddr;
use std::time::Duration;

pub(super) fn routes(r: Routes) -> Routes {
    r.add("/api/v1/setup", &["POST"], post(setup))
        .add("/api/v1/login", &["POST"], post(login))
        .add("/api/v1/logout", &["POST"], post(logout))
        .add("/api/v1/me", &["GET"], get(me))
        .add(
            "/api/v1/users",
            &["GET", "POST"],
            get(list_users).post(create_user),
        )
        .add("/api/v1/users/{name}", &["DELETE"], delete(delete_user))
        .add(
            "/api/v1/workspaces",
            &["GET", "POST"],
            get(list_workspaces).post(create_workspace),
        )
        .add(
            "/api/v1/workspaces/{ws}/members/{user}",
            &["PUT", "DELETE"],
            put(set_member).delete(remove_member),
        )
        .add(
            "/api/v1/tokens",
            &["GET", "POST"],
            get(list_tokens).post(create_token),
        )
        .add("/api/v1/tokens/{id}", &["DELETE"], delete(delete_token))
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the last address in
/// `X-Forwarded-For` that is not one of ours.
pub struct ClientAddr(pub Option<IpAddr>);

impl FromRequestParts<Arc<App>> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<crate::tls::Peer>>()
            .map(|c| c.0.addr.ip());
        let trusted = |ip: &IpAddr| {
            app.config
                .server
                .trusted_proxies
                .iter()
                .any(|p| p.parse::<IpAddr>().ok() == Some(*ip))
        };
        let Some(peer) = peer else {
            return Ok(ClientAddr(None));
        };
        if !trusted(&peer) {
            return Ok(ClientAddr(Some(peer)));
        }
        let forwarded: Vec<IpAddr> = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        Ok(ClientAddr(Some(
            forwarded
                .into_iter()
                .rev()
                .find(|ip| !trusted(ip))
                .unwrap_or(peer),
        )))
    }
}

/// Whether the client reached us over TLS: directly, or through a trusted proxy that says
/// `X-Forwarded-Proto: https`. Session cookies get `Secure` then.
pub struct Secure(pub bool);

impl FromRequestParts<Arc<App>> for Secure {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let Some(peer) = parts
            .extensions
            .get::<ConnectInfo<crate::tls::Peer>>()
            .map(|c| c.0)
        else {
            return Ok(Secure(false));
        };
        if peer.tls {
            return Ok(Secure(true));
        }
        let proxy = app
            .config
            .server
            .trusted_proxies
            .iter()
            .any(|p| p.parse::<IpAddr>().ok() == Some(peer.addr.ip()));
        let https = parts
            .headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"));
        Ok(Secure(proxy && https))
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

fn algo(app: &App) -> auth::Algo {
    auth::Algo::parse(&app.config.auth.password_hash).unwrap_or(auth::Algo::Argon2id)
}

async fn hash(app: &App, password: String) -> ApiResult<String> {
    let a = algo(app);
    auth::hashing(move || auth::hash_password_with(a, &password))
        .await
        .map_err(ApiError::internal)
}

async fn setup(State(app): AppState, JsonBody(b): JsonBody<SetupBody>) -> ApiResult<Response> {
    muster_core::names::check_name("user name", &b.username).map_err(ApiError::bad)?;
    auth::check_password(&b.username, &b.password).map_err(ApiError::bad)?;
    if let Some(c) = &b.cluster_name {
        muster_core::names::check_name("cluster name", c).map_err(ApiError::bad)?;
    }
    let hash = hash(&app, b.password.clone()).await?;
    let user = User {
        name: b.username.clone(),
        password_hash: hash,
        admin: true,
        created_at: now(),
    };
    let code_hash = auth::sha256_hex(b.setup_code.trim());
    let token = blocking(move || {
        // One atomic step: the code matches, no user exists, the admin is created, the code is
        // gone. Two racing setups cannot both pass it.
        if !app.store.consume_setup_code(&code_hash, &user)? {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "setup_refused",
                "setup refused: the code is wrong or was used, or an admin already exists",
            ));
        }
        acc::ensure_personal_workspace(&*app.store, &user.name)?;
        if let Some(c) = &b.cluster_name {
            app.store.set_meta("cluster_name", Some(c))?;
        }
        let _ = std::fs::remove_file(app.config.data_dir.join("setup-code"));
        issue_token(
            &app,
            &user.name,
            "setup",
            SCOPES,
            Some(app.config.auth.session_ttl),
        )
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(json!({"token": token.0}))).into_response())
}

/// Makes a token; returns the text (shown once) and its record.
fn issue_token(
    app: &App,
    user: &str,
    name: &str,
    scopes: &[&str],
    ttl: Option<Duration>,
) -> ApiResult<(String, Token)> {
    let text = auth::new_token();
    let t = Token {
        id: muster_core::Uuid::now_v7().to_string(),
        hash: auth::sha256_hex(&text),
        prefix: text[..12].to_string(),
        user: user.to_string(),
        name: name.to_string(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        created_at: now(),
        expires_at: ttl.map(|d| now().plus_ms(d.as_millis() as i64)),
        workspace: None,
    };
    app.store.put_token(&t)?;
    Ok((text, t))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: String,
}

async fn login(
    State(app): AppState,
    ClientAddr(addr): ClientAddr,
    Secure(secure): Secure,
    JsonBody(b): JsonBody<LoginBody>,
) -> ApiResult<Response> {
    let attempt = match app.login_limiter.attempt(&b.username, addr) {
        Ok(a) => a,
        Err(wait) => {
            let secs = wait.as_secs_f64().ceil() as u64;
            let mut resp = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "slow_down",
                format!("too many failed logins: try again in {secs} s"),
            )
            .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, secs.max(1).into());
            return Ok(resp);
        }
    };
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
    let (pw, phc) = (
        b.password.clone(),
        user.as_ref().map(|u| u.password_hash.clone()),
    );
    // Hashing runs on its own low-priority thread; an unknown user costs the same as a wrong password.
    let ok = auth::hashing(move || match phc {
        Some(phc) => auth::verify_password(&pw, &phc),
        None => {
            let _ = auth::hash_password("timing equaliser");
            false
        }
    })
    .await;
    let Some(mut user) = user.filter(|_| ok) else {
        attempt.failed();
        return Err(refused());
    };
    attempt.succeeded();
    // A successful login moves the stored hash to the configured algorithm.
    if auth::needs_rehash(&user.password_hash, algo(&app)) {
        user.password_hash = hash(&app, b.password.clone()).await?;
        let (store, u) = (app.store.clone(), user.clone());
        blocking(move || Ok(store.put_user(&u)?)).await?;
    }
    let app2 = app.clone();
    let name = user.name.clone();
    let (text, _) = blocking(move || {
        issue_token(
            &app2,
            &name,
            "login",
            SCOPES,
            Some(app2.config.auth.session_ttl),
        )
    })
    .await?;
    let csrf = csrf_token(&text);
    let max_age = app.config.auth.session_ttl.as_secs();
    let secure = if secure { "; Secure" } else { "" };
    let mut resp = axum::Json(json!({"token": text, "csrf_token": csrf})).into_response();
    let h = resp.headers_mut();
    h.append(
        header::SET_COOKIE,
        format!(
            "{SESSION_COOKIE}={text}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
        )
        .parse()
        .map_err(ApiError::internal)?,
    );
    h.append(
        header::SET_COOKIE,
        format!("{CSRF_COOKIE}={csrf}; Path=/; SameSite=Strict; Max-Age={max_age}{secure}")
            .parse()
            .map_err(ApiError::internal)?,
    );
    Ok(resp)
}

/// Revokes the caller's own token (the session) and clears the cookies.
async fn logout(State(app): AppState, caller: Caller) -> ApiResult<Response> {
    let (store, id) = (app.store.clone(), caller.token.id.clone());
    blocking(move || Ok(store.delete_token(&id)?)).await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    for c in [SESSION_COOKIE, CSRF_COOKIE] {
        h.append(
            header::SET_COOKIE,
            format!("{c}=; Path=/; Max-Age=0; SameSite=Strict")
                .parse()
                .map_err(ApiError::internal)?,
        );
    }
    Ok(resp)
}

/// Who the caller is and what they may do: the user, whether a cluster admin, each workspace
/// with the caller's role in it, and the token's scopes. Needs no scope: any valid token may
/// ask who it is (the dashboard shows only the controls the answer allows).
async fn me(State(app): AppState, caller: Caller) -> ApiResult<Response> {
    let mut roles: Vec<(String, Role)> = if caller.user.admin {
        let store = app.store.clone();
        blocking(move || Ok(acc::workspaces(&*store)?))
            .await?
            .into_iter()
            .map(|w| (w.name, Role::Admin))
            .collect()
    } else {
        caller.roles.iter().map(|(w, r)| (w.clone(), *r)).collect()
    };
    roles.sort();
    let workspaces: Vec<Value> = roles
        .iter()
        .map(|(name, role)| json!({"name": name, "role": role}))
        .collect();
    let t = &caller.token;
    Ok(axum::Json(json!({
        "user": caller.user.name,
        "admin": caller.user.admin,
        "workspaces": workspaces,
        "scopes": t.scopes,
        "token": {"id": t.id, "name": t.name, "expires_at": t.expires_at, "workspace": t.workspace},
    }))
    .into_response())
}

fn user_json(u: &User) -> Value {
    json!({"name": u.name, "admin": u.admin, "created_at": u.created_at})
}

async fn list_users(State(app): AppState, caller: Caller) -> ApiResult<Response> {
    caller.need_scope("read")?;
    let store = app.store.clone();
    let users = blocking(move || Ok(store.users()?)).await?;
    let items: Vec<Value> = users
        .iter()
        .filter(|u| caller.user.admin || u.name == caller.user.name)
        .map(user_json)
        .collect();
    Ok(axum::Json(json!({"items": items})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    username: String,
    password: String,
    #[serde(default)]
    admin: bool,
}

async fn create_user(
    State(app): AppState,
    caller: Caller,
    JsonBody(b): JsonBody<NewUser>,
) -> ApiResult<Response> {
    caller.need_cluster_admin("manage users")?;
    muster_core::names::check_name("user name", &b.username).map_err(ApiError::bad)?;
    auth::check_password(&b.username, &b.password).map_err(ApiError::bad)?;
    let h = hash(&app, b.password.clone()).await?;
    let store = app.store.clone();
    let user = blocking(move || Ok(acc::create_user(&*store, &b.username, h, b.admin)?)).await?;
    Ok((StatusCode::CREATED, axum::Json(user_json(&user))).into_response())
}

async fn delete_user(
    State(app): AppState,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    caller.need_cluster_admin("manage users")?;
    let store = app.store.clone();
    blocking(move || Ok(acc::delete_user(&*store, &name)?)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_workspaces(State(app): AppState, caller: Caller) -> ApiResult<Response> {
    caller.need_scope("read")?;
    let store = app.store.clone();
    let all = blocking(move || {
        let mut out = Vec::new();
        for ws in acc::workspaces(&*store)? {
            let members = acc::members(&*store, &ws.name)?;
            out.push((ws, members));
        }
        Ok(out)
    })
    .await?;
    let items: Vec<Value> = all
        .into_iter()
        .filter(|(ws, _)| caller.role(&ws.name).is_some())
        .map(|(ws, members)| {
            let m: Vec<Value> = members.iter().map(|(u, r)| json!({"user": u, "role": r})).collect();
            json!({"name": ws.name, "created_at": ws.created_at, "created_by": ws.created_by, "role": caller.role(&ws.name), "members": m})
        })
        .collect();
    Ok(axum::Json(json!({"items": items})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewWorkspace {
    name: String,
}

async fn create_workspace(
    State(app): AppState,
    caller: Caller,
    JsonBody(b): JsonBody<NewWorkspace>,
) -> ApiResult<Response> {
    caller.need_scope("admin")?;
    let store = app.store.clone();
    let me = caller.user.name.clone();
    let ws = blocking(move || Ok(acc::create_workspace(&*store, &b.name, &me)?)).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(
            json!({"name": ws.name, "created_at": ws.created_at, "created_by": ws.created_by}),
        ),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberBody {
    role: String,
}

fn need_ws_admin(caller: &Caller, ws: &str) -> ApiResult<()> {
    caller.need_scope("admin")?;
    match caller.role(ws) {
        Some(Role::Admin) => Ok(()),
        Some(_) => Err(ApiError::forbidden(format!(
            "only admins of {ws:?} manage its members"
        ))),
        None => Err(ApiError::not_found(&format!("workspace {ws:?}"))),
    }
}

async fn set_member(
    State(app): AppState,
    caller: Caller,
    Path((ws, user)): Path<(String, String)>,
    JsonBody(b): JsonBody<MemberBody>,
) -> ApiResult<Response> {
    let role = Role::parse(&b.role).ok_or_else(|| {
        ApiError::bad(format!(
            "role {} is not viewer, operator or admin",
            quote(&b.role)
        ))
    })?;
    need_ws_admin(&caller, &ws)?;
    let store = app.store.clone();
    let (w, u) = (ws.clone(), user.clone());
    blocking(move || Ok(acc::set_member(&*store, &w, &u, Some(role))?)).await?;
    Ok(axum::Json(json!({"workspace": ws, "user": user, "role": role})).into_response())
}

async fn remove_member(
    State(app): AppState,
    caller: Caller,
    Path((ws, user)): Path<(String, String)>,
) -> ApiResult<Response> {
    need_ws_admin(&caller, &ws)?;
    let store = app.store.clone();
    blocking(move || Ok(acc::set_member(&*store, &ws, &user, None)?)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn token_json(t: &Token) -> Value {
    json!({"id": t.id, "prefix": t.prefix, "name": t.name, "user": t.user, "scopes": t.scopes, "created_at": t.created_at, "expires_at": t.expires_at})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenQuery {
    #[serde(default)]
    all: bool,
}

async fn list_tokens(
    State(app): AppState,
    caller: Caller,
    q: Result<Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::bad(parse_error("invalid query", &e.body_text())))?;
    caller.need_scope("read")?;
    if q.all && !caller.user.admin {
        return Err(ApiError::forbidden(
            "only cluster admins list every user's tokens",
        ));
    }
    let store = app.store.clone();
    let me = (!q.all).then(|| caller.user.name.clone());
    let tokens = blocking(move || Ok(store.tokens(me.as_deref())?)).await?;
    let items: Vec<Value> = tokens.iter().map(token_json).collect();
    Ok(axum::Json(json!({"items": items})).into_response())
}

/// The longest life of an API token: 10 years.
const MAX_TOKEN_TTL_S: u64 = 10 * 365 * 86_400;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    scopes: Vec<String>,
    /// Seconds until it expires; none: it does not expire.
    #[serde(default)]
    expires_in_s: Option<u64>,
}

async fn create_token(
    State(app): AppState,
    caller: Caller,
    JsonBody(b): JsonBody<NewToken>,
) -> ApiResult<Response> {
    caller.need_scope("admin")?;
    if b.name.is_empty() || b.name.len() > 100 {
        return Err(ApiError::bad("a token name has 1-100 characters"));
    }
    if b.scopes.is_empty() {
        return Err(ApiError::bad(format!(
            "give at least one scope of {}",
            SCOPES.join(", ")
        )));
    }
    let mut scopes: Vec<&'static str> = Vec::new();
    for s in &b.scopes {
        let known = SCOPES.iter().find(|k| *k == s).ok_or_else(|| {
            ApiError::bad(format!(
                "scope {} is not one of {}",
                quote(s),
                SCOPES.join(", ")
            ))
        })?;
        if !caller.has_scope(known) {
            return Err(ApiError::forbidden(format!(
                "you cannot grant {known:?}: your token lacks it"
            )));
        }
        if !scopes.contains(known) {
            scopes.push(known);
        }
    }
    if b.expires_in_s
        .is_some_and(|s| s == 0 || s > MAX_TOKEN_TTL_S)
    {
        return Err(ApiError::bad(format!(
            "expires_in_s must be 1 to {MAX_TOKEN_TTL_S} (10 years)"
        )));
    }
    let ttl = b.expires_in_s.map(Duration::from_secs);
    let user = caller.user.name.clone();
    let (text, t) = blocking(move || issue_token(&app, &user, &b.name, &scopes, ttl)).await?;
    let mut v = token_json(&t);
    v["token"] = json!(text);
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

async fn delete_token(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.need_scope("admin")?;
    let store = app.store.clone();
    let me = caller.user.clone();
    blocking(move || {
        let mine = store.tokens(if me.admin { None } else { Some(&me.name) })?;
        if !mine.iter().any(|t| t.id == id) {
            return Err(ApiError::not_found("token"));
        }
        store.delete_token(&id)?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
