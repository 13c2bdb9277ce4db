//! The `yhat` client's routes (`yhat==1.10.0`, `../shared/yhat/PROTOCOL.md`): `POST /verify`,
//! `POST /deployer/model/large` and `POST /{user}/models/{model}/`. The client authenticates
//! with HTTP Basic `username:apikey` and the same pair in the query string (either is
//! accepted); the apikey is a muster token of that user. A user's models live in the workspace
//! of the user's name.

use super::*;
use crate::accounts::Role;
use crate::models::routes::Predicted;
use axum::body::Body;
use axum::extract::Path;
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::Value;

pub(super) fn routes(r: Routes) -> Routes {
    r.add("/verify", &["POST"], post(verify))
        .add("/deployer/model/large", &["POST"], post(deploy))
        .leader(&["POST"])
        .add("/batch/deploy", &["POST"], post(batch_deploy))
        .leader(&["POST"])
        .add("/{user}/models/{model}/", &["POST"], post(predict))
}

/// Percent-decoding of a query or form value (`+` is a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `application/x-www-form-urlencoded` pairs, in order.
fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k), unescape(v))
        })
        .collect()
}

/// The `(username, apikey)` of a request: HTTP Basic, else the query string.
fn credentials(headers: &HeaderMap, query: &[(String, String)]) -> Option<(String, String)> {
    if let Some(basic) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    {
        let text = base64_decode(basic.trim())?;
        let text = String::from_utf8(text).ok()?;
        let (u, k) = text.split_once(':')?;
        return Some((u.to_string(), k.to_string()));
    }
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    Some((get("username")?, get("apikey")?))
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => continue,
            _ => return None,
        } as u32;
        acc = ((acc << 6) | v) & 0xff_ffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The caller of a yhat request: the apikey is a token of the named user.
async fn yhat_caller(app: &Arc<App>, headers: &HeaderMap, query: &str) -> ApiResult<Caller> {
    let q = form_pairs(query);
    let (user, key) = credentials(headers, &q).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "give username and apikey (HTTP Basic, or ?username=&apikey=); the apikey is a muster token",
        )
    })?;
    let caller = Caller::of_token(app, &key).await?;
    if !auth::constant_time_eq(caller.user.name.as_bytes(), user.as_bytes()) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the apikey is not a token of that username",
        ));
    }
    Ok(caller)
}

fn raw_query(uri: &axum::http::Uri) -> String {
    uri.query().unwrap_or("").to_string()
}

/// `POST /verify`: `{"success": "true"}` for good credentials, 401 otherwise.
async fn verify(
    State(app): AppState,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    yhat_caller(&app, &headers, &raw_query(&uri)).await?;
    Ok(axum::Json(json!({"success": "true"})).into_response())
}

/// What both yhat uploads start with: the caller (an operator of their own workspace, which is
/// named after them), the body's content type, and the body read up to `[models] upload_max`.
async fn upload(
    app: &Arc<App>,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<(Caller, String, String, axum::body::Bytes)> {
    let caller = yhat_caller(app, headers, &raw_query(uri)).await?;
    let ws = caller.user.name.clone();
    caller.need_role(&ws, Role::Operator)?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let max = app.config.models.upload_max as usize;
    let bytes = axum::body::to_bytes(body, max).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the upload is larger than [models] upload_max ({max} bytes)"),
        )
    })?;
    Ok((caller, ws, ct, bytes))
}

/// `POST /deployer/model/large`: deploys the bundle and answers once it is live or failed (the
/// client predicts right after).
async fn deploy(
    State(app): AppState,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let (caller, ws, ct, bytes) = upload(&app, &uri, &headers, body).await?;
    let zlib = muster_models::yhat::model_part(&ct, &bytes)
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_bundle",
                e.to_string(),
            )
        })?
        .to_vec();
    let d =
        crate::models::upload::deploy_yhat(&app, &ws, zlib, &caller.user.name, caller.user.admin)
            .await?;
    let within = app.config.models.start_timeout + std::time::Duration::from_secs(3600);
    let v = crate::models::upload::wait_deployed(&app, &ws, &d.model, d.version, within).await?;
    if v.state == crate::models::VersionState::Live {
        Ok(
            axum::Json(json!({"status": "success", "modelname": d.model, "version": d.version}))
                .into_response(),
        )
    } else {
        let why = v
            .error
            .unwrap_or_else(|| format!("the deploy is {}", v.state.as_str()));
        Ok((
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(
                json!({"status": "error", "modelname": d.model, "version": d.version,
                "message": why, "error": {"code": "deploy_failed", "message": why}}),
            ),
        )
            .into_response())
    }
}

/// `POST /batch/deploy` (`yhat.batch.BatchJob.deploy`): the multipart parts `job_name` and
/// `job` (a `.tar.gz` of the job's `bundle.json`) become a muster job in the user's workspace
/// that runs `execute()` once; answers at once with the job (the client ignores the answer).
async fn batch_deploy(
    State(app): AppState,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let (caller, ws, ct, bytes) = upload(&app, &uri, &headers, body).await?;
    let invalid = |e: muster_models::Error| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_bundle",
            e.to_string(),
        )
    };
    let name = muster_models::yhat::part(&ct, &bytes, "job_name").map_err(invalid)?;
    let name = std::str::from_utf8(name)
        .map_err(|_| ApiError::bad("job_name is not UTF-8"))?
        .trim()
        .to_string();
    let job = muster_models::yhat::part(&ct, &bytes, "job")
        .map_err(invalid)?
        .to_vec();
    let tree = crate::models::upload::yhat_batch(&app, &ws, &name, job, &caller.user.name).await?;
    Ok(axum::Json(json!({"status": "success", "job_name": name, "job": tree})).into_response())
}

/// `POST /{user}/models/{model}/`: the body as JSON, else as a form (the client form-encodes a
/// dict when it has no pandas), or with `raw_input=True` the text itself; answers `{"result",
/// "yhat_id", "yhat_model"}`.
async fn predict(
    State(app): AppState,
    Path((user, model)): Path<(String, String)>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let query = raw_query(&uri);
    let caller = yhat_caller(&app, &headers, &query).await?;
    if !(caller.has_scope("predict") || caller.has_scope("operate")) {
        return Err(ApiError::forbidden(
            "this apikey lacks the \"predict\" scope (or \"operate\")",
        ));
    }
    if caller.role(&user).is_none() {
        return Err(ApiError::forbidden(format!(
            "this needs a role in workspace {}",
            quote(&user)
        )));
    }
    let raw = form_pairs(&query)
        .iter()
        .any(|(k, v)| k == "raw_input" && v.eq_ignore_ascii_case("true"));
    let text = String::from_utf8_lossy(&body);
    let data: Value = if raw {
        Value::String(text.into_owned())
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => {
                let mut obj = serde_json::Map::new();
                for (k, v) in form_pairs(&text) {
                    match obj.get_mut(&k) {
                        Some(Value::Array(a)) => a.push(Value::String(v)),
                        Some(old) => {
                            let first = old.take();
                            *old = Value::Array(vec![first, Value::String(v)]);
                        }
                        None => {
                            obj.insert(k, Value::String(v));
                        }
                    }
                }
                if obj.is_empty() {
                    return Err(ApiError::bad("the body is neither JSON nor a form"));
                }
                Value::Object(obj)
            }
        }
    };
    let call = serde_json::to_vec(&json!({ "data": data })).map_err(ApiError::internal)?;
    let timeout = app.config.models.predict_timeout;
    let label = crate::models::key(&user, &model);
    let (t0, _call) = (std::time::Instant::now(), app.metrics.models.begin(&label));
    let p = app
        .models
        .routes()
        .predict(&user, &model, None, call.into(), timeout)
        .await;
    let version = p.version();
    let resp = match &p {
        Predicted::Answer { reply, .. } if reply.status == 200 => {
            let v: Value = serde_json::from_slice(&reply.body).map_err(ApiError::internal)?;
            axum::Json(json!({
                "result": v["result"], "yhat_id": muster_core::Uuid::now_v7(), "yhat_model": model,
            }))
            .into_response()
        }
        _ => super::models::predicted(p, &user, &model, timeout),
    };
    app.metrics
        .models
        .predicted(&label, version, resp.status().as_u16(), t0.elapsed());
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_basic_credentials_are_read() {
        assert_eq!(
            form_pairs("name=Bea&lang=fr&a=1&a=2&s=h%C3%A9+there"),
            vec![
                ("name".into(), "Bea".into()),
                ("lang".into(), "fr".into()),
                ("a".into(), "1".into()),
                ("a".into(), "2".into()),
                ("s".into(), "hé there".into())
            ]
        );
        assert_eq!(unescape("100%"), "100%");
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            "Basic YWxpY2U6c2VjcmV0".parse().unwrap(),
        );
        assert_eq!(
            credentials(&h, &[]),
            Some(("alice".into(), "secret".into()))
        );
        let q = form_pairs("username=bob&raw_input=True&apikey=k");
        assert_eq!(
            credentials(&HeaderMap::new(), &q),
            Some(("bob".into(), "k".into()))
        );
        assert_eq!(credentials(&HeaderMap::new(), &[]), None);
    }
}
