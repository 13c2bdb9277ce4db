//! Routes of models (SPEC §8): deploy (a bundle upload), list, show, predict, and the two the
//! deploy tree's jobs use (the version's archive, a step).

use super::*;
use crate::accounts::Role;
use crate::models::deploy::Step;
use crate::models::routes::{NoRoute, Predicted};
use crate::models::upload::{deploy_archive, Scratch};
use crate::models::{Model, ModelError};
use axum::body::Body;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, HeaderValue};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::Value;

pub(super) fn routes(r: Routes) -> Routes {
    r.add("/api/v1/models", &["GET"], get(list))
        .add(
            "/api/v1/models/{ws}/{model}",
            &["GET", "POST", "DELETE"],
            get(show).post(upload).delete(remove),
        )
        .leader(&["POST", "DELETE"])
        .add(
            "/api/v1/models/{ws}/{model}/revert",
            &["POST"],
            post(revert),
        )
        .leader(&["POST"])
        .add(
            "/api/v1/models/{ws}/{model}/predict",
            &["POST"],
            post(predict),
        )
        .add(
            "/api/v1/models/{ws}/{model}/batch",
            &["POST"],
            post(batch_create),
        )
        .leader(&["POST"])
        .add(
            "/api/v1/models/{ws}/{model}/batches/{id}",
            &["GET"],
            get(batch_show),
        )
        .add(
            "/api/v1/models/{ws}/{model}/batches/{id}/chunks/{chunk}",
            &["POST"],
            post(batch_chunk),
        )
        .leader(&["POST"])
        .add(
            "/api/v1/models/{ws}/{model}/batches/{id}/merge",
            &["POST"],
            post(batch_merge),
        )
        .leader(&["POST"])
        .add(
            "/api/v1/models/{ws}/{model}/versions/{version}/bundle",
            &["GET"],
            get(bundle),
        )
        .add(
            "/api/v1/models/{ws}/{model}/versions/{version}/steps/{step}",
            &["POST"],
            post(step),
        )
        .leader(&["POST"])
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> ApiError {
        match e {
            ModelError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
            ModelError::Invalid(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_bundle", m)
            }
            ModelError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            ModelError::Unavailable(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
            }
            ModelError::TooLarge(m) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", m),
            ModelError::Store(s) => s.into(),
            ModelError::Internal(m) => ApiError::internal(m),
        }
    }
}

/// The workspace and model of a path, checked as names.
fn names(ws: &str, model: &str) -> ApiResult<()> {
    muster_core::names::check_name("workspace", ws).map_err(ApiError::bad)?;
    muster_core::names::check_name("model", model).map_err(ApiError::bad)?;
    Ok(())
}

/// A model as the API shows it (`replicas` given by the caller).
fn model_json(m: &Model, replicas: Value) -> Value {
    let versions: Vec<Value> = m
        .versions
        .iter()
        .rev()
        .map(|v| {
            json!({
                "version": v.version, "state": v.state.as_str(), "created_at": v.created_at,
                "created_by": v.created_by, "size": v.size, "replicas": v.replicas,
                "workers": v.workers, "requirements": v.requirements, "tree": v.tree,
                "commit": v.commit, "error": v.error, "live_at": v.live_at,
                "node": v.placement.as_ref().map(|p| p.node.clone()),
                "env": v.placement.as_ref().map(|p| p.env_key.clone()),
                "processes": v.processes,
            })
        })
        .collect();
    json!({
        "workspace": m.workspace, "name": m.name, "runtime": m.runtime, "live": m.live,
        "created_at": m.created_at, "updated_at": m.updated_at, "versions": versions,
        "replicas": replicas,
    })
}

async fn list(State(app): AppState, caller: Caller) -> ApiResult<Response> {
    caller.need_scope("read")?;
    let ws = caller.workspaces();
    let models = blocking(move || Ok(app.models.list(ws.as_deref())?)).await?;
    let items: Vec<Value> = models
        .iter()
        .map(|m| {
            let live = m.live.and_then(|n| m.version(n));
            json!({
                "workspace": m.workspace, "name": m.name, "runtime": m.runtime,
                "live": m.live, "versions": m.versions.len(),
                "last_version": m.last_version, "updated_at": m.updated_at,
                "replicas": live.map_or(0, |v| v.replicas),
                "state": m.versions.last().map(|v| v.state.as_str()),
            })
        })
        .collect();
    Ok(axum::Json(json!({ "items": items })).into_response())
}

async fn show(
    State(app): AppState,
    caller: Caller,
    Path((ws, model)): Path<(String, String)>,
) -> ApiResult<Response> {
    names(&ws, &model)?;
    caller.need_role(&ws, Role::Viewer)?;
    let body = blocking(move || {
        let m = app
            .models
            .get(&ws, &model)?
            .filter(|m| !m.deleted)
            .ok_or_else(|| ApiError::not_found("model"))?;
        let replicas = app.models.routes().views(&app.models, &m);
        Ok(model_json(&m, json!(replicas)))
    })
    .await?;
    Ok(axum::Json(body).into_response())
}

/// `POST /api/v1/models/{ws}/{model}`: the body is the bundle as a `.tar.gz`, streamed to disk
/// under `[models] upload_max`; answers 202 with the version and its deploy tree.
async fn upload(
    State(app): AppState,
    caller: Caller,
    Path((ws, model)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    names(&ws, &model)?;
    caller.need_role(&ws, Role::Operator)?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ok_types = [
        "application/gzip",
        "application/x-gzip",
        "application/x-tar",
        "application/octet-stream",
        "application/x-compressed-tar",
    ];
    if !ct.is_empty() && !ok_types.iter().any(|t| ct.starts_with(t)) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the bundle as a .tar.gz with Content-Type: application/gzip",
        ));
    }
    let max = app.config.models.upload_max;
    let scratch = Scratch::new(&app, "archive").map_err(ApiError::internal)?;
    std::fs::create_dir_all(&scratch.0).map_err(ApiError::internal)?;
    let path = scratch.0.join("bundle.tar.gz");
    {
        use tokio::io::AsyncWriteExt;
        let mut f = tokio::fs::File::create(&path)
            .await
            .map_err(ApiError::internal)?;
        let mut stream = body.into_data_stream();
        let mut n: u64 = 0;
        while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
            let chunk = chunk.map_err(|e| ApiError::bad(format!("the upload broke off: {e}")))?;
            n += chunk.len() as u64;
            if n > max {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("the bundle is larger than [models] upload_max ({max} bytes)"),
                ));
            }
            f.write_all(&chunk).await.map_err(ApiError::internal)?;
        }
        if n == 0 {
            return Err(ApiError::bad(
                "the body is empty: send the bundle as a .tar.gz (muster models deploy DIR makes one)",
            ));
        }
        f.flush().await.map_err(ApiError::internal)?;
    }
    let d = deploy_archive(
        &app,
        &ws,
        &model,
        path,
        &caller.user.name,
        caller.user.admin,
    )
    .await?;
    drop(scratch);
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({
            "workspace": d.workspace, "model": d.model, "version": d.version, "tree": d.tree,
        })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevertBody {
    version: u32,
}

/// `POST …/revert {"version": N}`: back to a kept version; 202 with the tree.
async fn revert(
    State(app): AppState,
    caller: Caller,
    Path((ws, model)): Path<(String, String)>,
    JsonBody(b): JsonBody<RevertBody>,
) -> ApiResult<Response> {
    names(&ws, &model)?;
    caller.need_role(&ws, Role::Operator)?;
    let d = crate::models::lifecycle::revert(
        &app,
        &ws,
        &model,
        b.version,
        &caller.user.name,
        caller.user.admin,
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"model": d.model, "version": d.version, "tree": d.tree})),
    )
        .into_response())
}

/// `DELETE`: the model serves nothing from now on; the reaper removes its processes and files.
async fn remove(
    State(app): AppState,
    caller: Caller,
    Path((ws, model)): Path<(String, String)>,
) -> ApiResult<Response> {
    names(&ws, &model)?;
    caller.need_role(&ws, Role::Operator)?;
    crate::models::lifecycle::delete(&app, &ws, &model).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"workspace": ws, "model": model, "deleted": true})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictQuery {
    version: Option<u32>,
}

/// `POST /api/v1/models/{ws}/{model}/predict` `{"data": ...}` → `{"result", "version"}`.
async fn predict(
    State(app): AppState,
    caller: Caller,
    Path((ws, model)): Path<(String, String)>,
    Query(q): Query<PredictQuery>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    if !(caller.has_scope("predict") || caller.has_scope("operate")) {
        return Err(ApiError::forbidden(
            "this token lacks the \"predict\" scope (or \"operate\")",
        ));
    }
    if caller.role(&ws).is_none() {
        return Err(ApiError::forbidden(format!(
            "this needs a role in workspace {}",
            quote(&ws)
        )));
    }
    // The predictor checks the shape; here only that it is a JSON object with `data`.
    if !body.starts_with(b"{") || serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        return Err(ApiError::bad(
            "the body must be a JSON object {\"data\": <records or columns>}",
        ));
    }
    let timeout = app.config.models.predict_timeout;
    let label = crate::models::key(&ws, &model);
    let (t0, _call) = (std::time::Instant::now(), app.metrics.models.begin(&label));
    let answer = app
        .models
        .routes()
        .predict(&ws, &model, q.version, body, timeout)
        .await;
    let version = answer.version();
    let resp = predicted(answer, &ws, &model, timeout);
    app.metrics
        .models
        .predicted(&label, version, resp.status().as_u16(), t0.elapsed());
    Ok(resp)
}

/// A predict outcome as the API answers it.
pub(super) fn predicted(
    p: Predicted,
    ws: &str,
    model: &str,
    timeout: std::time::Duration,
) -> Response {
    let unavailable = |code: &'static str, msg: String| {
        let mut r = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, msg).into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    };
    match p {
        Predicted::Answer { version, reply } if reply.status == 200 => {
            // `{"result": ...}` from the predictor, with the version added.
            let b = &reply.body;
            let end = b.iter().rposition(|c| *c == b'}').unwrap_or(0);
            let mut out = Vec::with_capacity(b.len() + 16);
            out.extend_from_slice(&b[..end]);
            out.extend_from_slice(format!(",\"version\":{version}}}").as_bytes());
            ([(header::CONTENT_TYPE, "application/json")], out).into_response()
        }
        Predicted::Answer { reply, .. } => {
            let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut r = ([(header::CONTENT_TYPE, "application/json")], reply.body).into_response();
            *r.status_mut() = status;
            if let Some(v) = reply
                .retry_after
                .and_then(|v| HeaderValue::from_str(&v).ok())
            {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        Predicted::NoRoute(NoRoute::Model) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("model {ws}/{model} not found"),
        )
        .into_response(),
        Predicted::NoRoute(NoRoute::NotLive) => unavailable(
            "not_live",
            format!(
                "model {ws}/{model} has no live version yet (its first deploy has not switched)"
            ),
        ),
        Predicted::NoRoute(NoRoute::Version(v)) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("version {v} of {ws}/{model} is not running (revert to it to start it)"),
        )
        .into_response(),
        Predicted::NoRoute(NoRoute::NoReplica(v)) => unavailable(
            "no_replica",
            format!("version {v} of {ws}/{model} has no ready replica now"),
        ),
        Predicted::NoRoute(NoRoute::Full(v)) => unavailable(
            "overloaded",
            format!("every replica of {ws}/{model} v{v} is busy; retry shortly"),
        ),
        Predicted::Timeout(v) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("{ws}/{model} v{v} did not answer within {timeout:?}"),
        )
        .into_response(),
        Predicted::Failed(v, e) => {
            tracing::warn!("predict {ws}/{model} v{v}: {e}");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "model_unreachable",
                format!("the replicas of {ws}/{model} v{v} could not be reached"),
            )
            .into_response()
        }
    }
}

fn version_of(ws: &str, model: &str, version: &str) -> ApiResult<u32> {
    names(ws, model)?;
    version
        .parse()
        .map_err(|_| ApiError::bad("the version must be a number"))
}

/// The archive of a version (what the node's `prepare` step fetches).
async fn bundle(
    State(app): AppState,
    caller: Caller,
    Path((ws, model, version)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let n = version_of(&ws, &model, &version)?;
    caller.need_role(&ws, Role::Operator)?;
    let a = app.clone();
    let blob = blocking(move || {
        let m = a
            .models
            .get(&ws, &model)?
            .ok_or_else(|| ApiError::not_found("model"))?;
        let v = m.version(n).ok_or_else(|| ApiError::not_found("version"))?;
        Ok(v.blob.clone())
    })
    .await?;
    super::blob_response(&app, &blob, "application/gzip")
}

/// A deploy step (`muster models step STEP`, run by its job): progress lines streamed, then
/// `ok` or `error: WHY` as the last line.
async fn step(
    State(app): AppState,
    caller: Caller,
    Path((ws, model, version, step)): Path<(String, String, String, String)>,
) -> ApiResult<Response> {
    let n = version_of(&ws, &model, &version)?;
    caller.need_role(&ws, Role::Operator)?;
    let step = Step::parse(&step).ok_or_else(|| {
        ApiError::bad("the step must be one of start, health, switch, drain, stop")
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let res = crate::models::deploy::run_step(&app, &ws, &model, n, step, &tx).await;
        let last = match res {
            Ok(()) => "ok\n".to_string(),
            Err(e) => format!("error: {e}\n"),
        };
        let _ = tx.send(last).await;
    });
    Ok(text_stream(rx))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchQuery {
    version: Option<u32>,
    chunk_rows: Option<u64>,
    on_error: Option<String>,
    shape: Option<String>,
    output: Option<String>,
}

/// `POST /api/v1/models/{ws}/{model}/batch`: the body is a CSV (a header line, then rows),
/// read as a stream and split into chunks in the blob store as it comes; answers 202 with the
/// batch's tree (the result CSV: `GET /api/v1/jobs/{tree}/result` once it has succeeded).
async fn batch_create(
    State(app): AppState,
    caller: Caller,
    Path((ws, model)): Path<(String, String)>,
    Query(q): Query<BatchQuery>,
    body: Body,
) -> ApiResult<Response> {
    use crate::models::batch::{self, OnError, Output, Shape};
    names(&ws, &model)?;
    caller.need_role(&ws, Role::Operator)?;
    let chunk_rows = q.chunk_rows.unwrap_or(app.config.models.batch_chunk_rows);
    if !(1..=1_000_000).contains(&chunk_rows) {
        return Err(ApiError::bad("chunk_rows must be between 1 and 1000000"));
    }
    let on_error = match q.on_error.as_deref() {
        None | Some("fail") => OnError::Fail,
        Some("mark") => OnError::Mark,
        Some(_) => return Err(ApiError::bad("on_error must be fail or mark")),
    };
    let shape = match q.shape.as_deref() {
        None | Some("rows") => Shape::Rows,
        Some("records") => Shape::Records,
        Some("columns") => Shape::Columns,
        Some(_) => return Err(ApiError::bad("shape must be rows, records or columns")),
    };
    let output = match q.output.as_deref() {
        None | Some("input") => Output::Input,
        Some("id") => Output::Id,
        Some(_) => return Err(ApiError::bad("output must be input or id")),
    };
    let (a, ws2, m2) = (app.clone(), ws.clone(), model.clone());
    let m = blocking(move || Ok(a.models.get(&ws2, &m2)?))
        .await?
        .filter(|m| !m.deleted)
        .ok_or_else(|| ApiError::not_found("model"))?;
    match q.version {
        Some(v) if m.version(v).is_none() => return Err(ApiError::not_found("version")),
        None if m.live.is_none() => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_live",
                format!("model {ws}/{model} has no live version yet"),
            ))
        }
        _ => {}
    }
    let id = muster_core::Uuid::now_v7();
    // The body goes to the splitter through a small channel: memory stays bounded.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let a = app.clone();
    let splitter = tokio::task::spawn_blocking(move || {
        batch::split(&a, id, batch::ChanReader::new(rx), chunk_rows)
    });
    let mut stream = body.into_data_stream();
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let item = chunk.map_err(|e| format!("the upload broke off: {e}"));
        let broke = item.is_err();
        if tx.send(item).await.is_err() || broke {
            break;
        }
    }
    drop(tx);
    let split = splitter
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| match e {
            batch::SplitError::Bad(m) => ApiError::bad(m),
            batch::SplitError::Io(m) => ApiError::bad(format!("the CSV could not be read: {m}")),
        })?;
    if split.rows == 0 {
        return Err(ApiError::bad("the CSV has a header but no rows"));
    }
    let b = batch::Batch {
        id,
        workspace: ws,
        model,
        version: q.version,
        columns: split.columns,
        chunk_rows,
        on_error,
        shape,
        output,
        rows_total: split.rows,
        rows_done: 0,
        chunks: split.chunks,
        result: None,
        result_size: 0,
        created_at: muster_wire::util::now(),
        created_by: caller.user.name.clone(),
    };
    let view = b.view();
    let tree = batch::start(&app, b, caller.user.admin)
        .await
        .map_err(ApiError::internal)?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"tree": tree, "batch": view})),
    )
        .into_response())
}

fn batch_id(ws: &str, model: &str, id: &str) -> ApiResult<muster_core::Uuid> {
    names(ws, model)?;
    id.parse()
        .map_err(|_| ApiError::bad("the batch id must be a UUID"))
}

/// A batch's progress: rows done and total, chunks, errors, whether its result is merged.
async fn batch_show(
    State(app): AppState,
    caller: Caller,
    Path((ws, model, id)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let id = batch_id(&ws, &model, &id)?;
    caller.need_role(&ws, Role::Viewer)?;
    let b = blocking(move || Ok(crate::models::batch::get(&app, id)?))
        .await?
        .filter(|b| b.workspace == ws && b.model == model)
        .ok_or_else(|| ApiError::not_found("batch"))?;
    Ok(axum::Json(b.view()).into_response())
}

/// One chunk of a batch scored (what its job runs): answers the chunk's rows and the batch's
/// progress.
async fn batch_chunk(
    State(app): AppState,
    caller: Caller,
    Path((ws, model, id, chunk)): Path<(String, String, String, String)>,
) -> ApiResult<Response> {
    let id = batch_id(&ws, &model, &id)?;
    let i: usize = chunk
        .parse()
        .map_err(|_| ApiError::bad("the chunk must be a number"))?;
    caller.need_role(&ws, Role::Operator)?;
    let s = crate::models::batch::score_chunk(&app, &ws, &model, id, i)
        .await
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "batch_failed", e))?;
    Ok(axum::Json(json!(s)).into_response())
}

/// The result CSV of a batch written (what its `merge` job runs).
async fn batch_merge(
    State(app): AppState,
    caller: Caller,
    Path((ws, model, id)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let id = batch_id(&ws, &model, &id)?;
    caller.need_role(&ws, Role::Operator)?;
    let v = crate::models::batch::merge(&app, &ws, &model, id)
        .await
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "batch_failed", e))?;
    Ok(axum::Json(v).into_response())
}

/// The result CSV of batch tree `id`, streamed (`GET /api/v1/jobs/{id}/result`).
pub(super) fn batch_result(app: &App, blob: &str) -> ApiResult<Response> {
    super::blob_response(app, blob, "text/csv")
}
