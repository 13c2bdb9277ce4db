//! Headquarters routes (SPEC §7, §9): `GET /api/v1/hq` (the repository, the last sync, a
//! conflict, problems, the watchers' and the reaper's last runs), `POST /api/v1/hq/sync` (a pulse
//! now; with `[hq] webhook_secret` a git host may call it with an HMAC-SHA256 signature instead
//! of a token), `GET /api/v1/hq/orders`, `POST /api/v1/hq/orders/resolve`.

use super::*;
use crate::hq::orders as hqo;
use axum::extract::Query;
use axum::routing::post;
use serde::Deserialize;
use serde_json::Value;
use std::time::Duration;

pub(super) fn routes(r: Routes) -> Routes {
    r.add("/api/v1/hq", &["GET"], get(status))
        .add("/api/v1/hq/sync", &["POST"], post(sync))
        .leader(&["POST"])
        .add("/api/v1/hq/log", &["GET"], get(log))
        .add("/api/v1/hq/orders", &["GET"], get(list_orders))
        .add("/api/v1/hq/orders/resolve", &["POST"], post(resolve))
        .leader(&["POST"])
}

async fn status(State(app): AppState, caller: Caller) -> ApiResult<Response> {
    caller.need_scope("read")?;
    Ok(axum::Json(app.hq.status()).into_response())
}

/// Whether `sig` (`sha256=HEX`) is the HMAC-SHA256 of `body` under `secret`.
fn signed(secret: &str, body: &[u8], sig: &str) -> bool {
    use hmac::{Hmac, KeyInit, Mac};
    let Some(mac) = sig
        .strip_prefix("sha256=")
        .and_then(muster_wire::util::unhex)
    else {
        return false;
    };
    let mut m =
        <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).expect("any key length");
    m.update(body);
    m.verify_slice(&mac).is_ok()
}

/// The signature header of a push webhook.
const SIGNATURE: &str = "x-hub-signature-256";

async fn sync(State(app): AppState, req: Request) -> ApiResult<Response> {
    let (mut parts, body) = req.into_parts();
    let sig = parts
        .headers
        .get(SIGNATURE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match sig {
        Some(sig) if !app.hq.webhook_secret().is_empty() => {
            let body = axum::body::to_bytes(body, 1 << 20).await.map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    "a webhook body may have at most 1 MiB",
                )
            })?;
            if !signed(app.hq.webhook_secret(), &body, &sig) {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the webhook signature does not match [hq] webhook_secret",
                ));
            }
        }
        _ => {
            let caller = Caller::from_request_parts(&mut parts, &app).await?;
            caller.need_scope("operate")?;
        }
    }
    let done = app.hq.pulse_now(Duration::from_secs(60)).await;
    let s = app.hq.status();
    let status = if done {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        status,
        axum::Json(json!({"synced": done, "head": s.head, "last_sync": s.last_sync, "conflict": s.conflict})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    limit: Option<usize>,
}

async fn log(
    State(app): AppState,
    caller: Caller,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|_| ApiError::bad("the query takes limit"))?;
    caller.need_scope("read")?;
    let n = q.limit.unwrap_or(20);
    if n == 0 || n > 1000 {
        return Err(ApiError::bad("limit must be 1-1000"));
    }
    let Some(repo) = app.hq.repo() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "hq_unavailable",
            "HQ is not available (GET /api/v1/hq says why)",
        ));
    };
    let items = blocking(move || repo.log(n).map_err(ApiError::internal)).await?;
    Ok(axum::Json(json!({"items": items})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrdersQuery {
    file: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
}

async fn list_orders(
    State(app): AppState,
    caller: Caller,
    q: Result<Query<OrdersQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|_| ApiError::bad("the query takes file, state and limit"))?;
    caller.need_scope("read")?;
    let limit = q.limit.unwrap_or(1000);
    if limit == 0 || limit > 10_000 {
        return Err(ApiError::bad("limit must be 1-10000"));
    }
    let want = match q.state.as_deref() {
        None => None,
        Some(s) => Some(hqo::OrderState::parse(s).ok_or_else(|| {
            ApiError::bad("state must be pending, running, succeeded, failed or rejected")
        })?),
    };
    let store = app.store.clone();
    let (orders, files) = blocking(move || {
        let prefix = q.file.map(|f| format!("{f}#")).unwrap_or_default();
        Ok((
            hqo::ORDERS.list(&*store, &prefix)?,
            hqo::FILES.list(&*store, "")?,
        ))
    })
    .await?;
    let mut items: Vec<Value> = orders
        .into_iter()
        .filter(|(_, o, _)| want.is_none_or(|w| o.state == w))
        .map(|(_, o, _)| {
            json!({"file": o.file, "line": o.line, "text": o.text, "state": o.state.as_str(),
                   "tree": o.tree, "created_at": o.created_at, "started_at": o.started_at,
                   "finished_at": o.finished_at, "message": o.message})
        })
        .collect();
    // The newest last, at most `limit`.
    items.sort_by(|a, b| a["created_at"].as_str().cmp(&b["created_at"].as_str()));
    let skip = items.len().saturating_sub(limit);
    let items: Vec<Value> = items.into_iter().skip(skip).collect();
    let files: Vec<Value> = files
        .into_iter()
        .map(|(f, d, _)| json!({"file": f, "processed": d.processed, "open": d.open, "stopped": d.stopped}))
        .collect();
    Ok(axum::Json(json!({"items": items, "files": files})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    file: String,
}

async fn resolve(
    State(app): AppState,
    caller: Caller,
    JsonBody(b): JsonBody<ResolveBody>,
) -> ApiResult<Response> {
    caller.need_cluster_admin("resolve orders files")?;
    if hqo::Scope::of(&b.file).is_none() {
        return Err(ApiError::bad(
            "file must be an orders file of HQ (deployer/orders, WORKSPACE/models/MODEL/orders)",
        ));
    }
    let (store, file) = (app.store.clone(), b.file.clone());
    let known = blocking(move || Ok(hqo::FILES.get(&*store, &file)?)).await?;
    match known {
        None => return Err(ApiError::not_found("orders file")),
        Some((d, _)) if d.stopped.is_none() => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_stopped",
                "that orders file is not stopped",
            ))
        }
        Some(_) => {}
    }
    tracing::info!("HQ orders: {} resolved by {}", b.file, caller.user.name);
    app.hq.resolve(&b.file);
    let done = app.hq.pulse_now(Duration::from_secs(60)).await;
    Ok(axum::Json(json!({"file": b.file, "resolved": done})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_signatures_are_checked() {
        use hmac::{Hmac, KeyInit, Mac};
        let mut m = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(b"s3cret").unwrap();
        m.update(b"{}");
        let good = format!(
            "sha256={}",
            muster_wire::util::hex(&m.finalize().into_bytes())
        );
        assert!(signed("s3cret", b"{}", &good));
        assert!(!signed("other", b"{}", &good));
        assert!(!signed("s3cret", b"{ }", &good));
        assert!(!signed("s3cret", b"{}", "sha256=zz"));
        assert!(!signed("s3cret", b"{}", &good[7..]));
    }
}
