//! Routes of services (SPEC §6): plan, apply, the recorded services, a stored plan, and the two
//! an apply's step jobs use (the step's context, the service's archive). A `{path}` is the
//! service's path with its `/` sent as `%2F`.

use super::*;
use crate::accounts::Role;
use crate::services::{ServiceError, ServiceRecord, StoredPlan};
use axum::extract::Path;
use axum::routing::post;
use serde::Deserialize;
use serde_json::Value;

pub(super) fn routes(r: Routes) -> Routes {
    r.add("/api/v1/services", &["GET"], get(list))
        .add("/api/v1/services/plan", &["POST"], post(plan))
        .leader(&["POST"])
        .add("/api/v1/services/apply", &["POST"], post(apply))
        .leader(&["POST"])
        .add("/api/v1/services/plans/{id}", &["GET"], get(show_plan))
        .add(
            "/api/v1/services/plans/{id}/steps/{key}",
            &["GET"],
            get(step),
        )
        .add(
            "/api/v1/services/plans/{id}/steps/{key}/archive",
            &["GET"],
            get(archive),
        )
        .add(
            "/api/v1/services/plans/{id}/steps/{key}/process/{verb}",
            &["POST"],
            post(process),
        )
        .leader(&["POST"])
        .add(
            "/api/v1/services/plans/{id}/steps/{key}/export",
            &["POST"],
            post(export_upload),
        )
        .add(
            "/api/v1/services/plans/{id}/steps/{key}/import",
            &["GET"],
            get(import_archive),
        )
        .add(
            "/api/v1/services/plans/{id}/steps/{key}/build/source",
            &["GET"],
            get(build_source),
        )
        .add(
            "/api/v1/services/plans/{id}/steps/{key}/build",
            &["POST"],
            post(build_upload),
        )
        .add(
            "/api/v1/services/plans/{id}/steps/{key}/build/artifacts",
            &["GET"],
            get(build_artifacts),
        )
        .add(
            "/api/v1/services/plans/{id}/steps/{key}/secrets",
            &["GET"],
            get(step_secrets),
        )
        .add("/api/v1/services/{path}", &["GET"], get(show))
        .add(
            "/api/v1/services/{path}/secrets",
            &["GET"],
            get(list_secrets),
        )
        .add(
            "/api/v1/services/{path}/secrets/{key}",
            &["PUT", "DELETE"],
            axum::routing::put(set_secret).delete(delete_secret),
        )
        .add(
            "/api/v1/services/{path}/exports/{id}",
            &["GET"],
            get(export_download),
        )
        .add("/api/v1/services/{path}/import", &["POST"], post(import))
        .leader(&["POST"])
        .add("/api/v1/services/{path}/reset", &["POST"], post(reset))
        .leader(&["POST"])
        .add(
            "/api/v1/services/{path}/actions/{verb}",
            &["POST"],
            post(action),
        )
        .leader(&["POST"])
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    #[serde(default)]
    cascade: bool,
    #[serde(default)]
    keep_deps: bool,
}

/// Applies a stored reset or action plan at once: 202 with the plan and its tree.
async fn run_now(app: &Arc<App>, caller: &Caller, plan: StoredPlan) -> ApiResult<Response> {
    let (plan, _) = app
        .services
        .apply(app, &plan.id, &caller.user.name, caller.user.admin)
        .await?;
    Ok((StatusCode::ACCEPTED, axum::Json(plan_json(&plan))).into_response())
}

async fn reset(
    State(app): AppState,
    caller: Caller,
    Path(path): Path<String>,
    JsonBody(body): JsonBody<ResetBody>,
) -> ApiResult<Response> {
    caller.need_cluster_admin("reset services")?;
    muster_core::service::check_path(&path).map_err(ApiError::bad)?;
    let (a, by) = (app.clone(), caller.user.name.clone());
    let plan = blocking(move || {
        Ok(a.services
            .reset_plan(&a, &path, body.cascade, body.keep_deps, &by)?)
    })
    .await?;
    run_now(&app, &caller, plan).await
}

async fn action(
    State(app): AppState,
    caller: Caller,
    Path((path, verb)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.need_cluster_admin("run service actions")?;
    muster_core::service::check_path(&path).map_err(ApiError::bad)?;
    muster_core::names::check_name("action", &verb).map_err(ApiError::bad)?;
    let (a, by) = (app.clone(), caller.user.name.clone());
    let plan = blocking(move || Ok(a.services.action_plan(&a, &path, &verb, &by)?)).await?;
    run_now(&app, &caller, plan).await
}

/// At most this many problems are named in an error (the rest counted).
const PROBLEMS_SHOWN: usize = 3;

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        match e {
            ServiceError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
            ServiceError::Invalid(problems) => {
                let mut msg: Vec<String> = problems
                    .iter()
                    .take(PROBLEMS_SHOWN)
                    .map(|p| p.to_string())
                    .collect();
                if problems.len() > PROBLEMS_SHOWN {
                    msg.push(format!("and {} more", problems.len() - PROBLEMS_SHOWN));
                }
                let mut text = msg.join("; ");
                if text.len() > 390 {
                    let mut cut = 387;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                    text.push_str("...");
                }
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_services", text)
            }
            ServiceError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            ServiceError::Unavailable(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "hq_unavailable", m)
            }
            ServiceError::Store(s) => s.into(),
            ServiceError::Internal(m) => ApiError::internal(m),
        }
    }
}

fn record_json(r: &ServiceRecord) -> Value {
    json!({
        "path": r.path, "node": r.node, "status": r.status, "message": r.message,
        "installed": r.recorded.installed, "hash": r.recorded.hash, "deps": r.recorded.deps,
        "state": r.state, "published": r.published, "last_action": r.last_action,
        "last_job": r.last_job, "last_plan": r.last_plan, "process": r.process,
        "exports": r.exports.iter().map(|e| json!({"id": e.id, "size": e.size, "at": e.at, "job": e.job})).collect::<Vec<_>>(),
        "history": r.history.iter().rev().map(|h| json!({"action": h.action, "job": h.job, "state": h.state, "at": h.at})).collect::<Vec<_>>(),
        "updated_at": r.updated_at,
    })
}

fn plan_json(p: &StoredPlan) -> Value {
    let steps: Vec<Value> = p
        .steps
        .iter()
        .map(|s| {
            json!({"key": s.key, "path": s.step.path, "action": s.step.action.as_str(),
                   "reason": s.step.reason, "hash": s.step.hash, "after": s.step.after, "node": s.node,
                   "build": s.build.as_ref().map(|b| b.status.as_str())})
        })
        .collect();
    json!({"id": p.id, "kind": p.kind, "commit": p.commit, "created_at": p.created_at, "created_by": p.created_by,
           "steps": steps, "unchanged": p.unchanged, "tree": p.tree, "applied_at": p.applied_at})
}

async fn list(State(app): AppState, caller: Caller) -> ApiResult<Response> {
    caller.need_scope("read")?;
    let a = app.clone();
    let records = blocking(move || Ok(a.services.records(&a)?)).await?;
    let items: Vec<Value> = records.values().map(record_json).collect();
    Ok(axum::Json(json!({"items": items})).into_response())
}

/// The recorded state of the service at `path` (checked first), or 404.
async fn record_of(app: &Arc<App>, path: String) -> ApiResult<ServiceRecord> {
    muster_core::service::check_path(&path).map_err(ApiError::bad)?;
    let a = app.clone();
    blocking(move || {
        Ok(crate::services::SERVICES
            .get(&*a.store, &path)?
            .map(|(r, _)| r))
    })
    .await?
    .ok_or_else(|| ApiError::not_found("service"))
}

async fn show(
    State(app): AppState,
    caller: Caller,
    Path(path): Path<String>,
) -> ApiResult<Response> {
    caller.need_scope("read")?;
    let rec = record_of(&app, path).await?;
    Ok(axum::Json(record_json(&rec)).into_response())
}

/// `POST /services/plan`: `{}` (or no body) plans every service; `only` plans one service,
/// what is under it and what it waits for.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PlanBody {
    #[serde(default)]
    only: Option<String>,
}

async fn plan(
    State(app): AppState,
    caller: Caller,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    caller.need_cluster_admin("plan and apply services")?;
    let body: PlanBody = if body.iter().all(u8::is_ascii_whitespace) {
        PlanBody::default()
    } else {
        let ct = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct.is_empty() && !ct.starts_with("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send application/json",
            ));
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(parse_error("invalid JSON body", &e.to_string())))?;
        if !v.is_object() {
            return Err(ApiError::bad("a plan request is a JSON object, e.g. {}"));
        }
        serde_json::from_value(v)
            .map_err(|e| ApiError::bad(parse_error("invalid plan request", &e.to_string())))?
    };
    let only = match body.only {
        Some(p) => {
            let p = p
                .strip_prefix("services/")
                .unwrap_or(&p)
                .trim_end_matches('/')
                .to_string();
            muster_core::service::check_path(&p).map_err(|_| {
                ApiError::bad("only: a service path is domain__name__instance parts joined by /")
            })?;
            Some(p)
        }
        None => None,
    };
    let (a, by) = (app.clone(), caller.user.name.clone());
    let p = blocking(move || Ok(a.services.plan(&a, &by, only.as_deref())?)).await?;
    Ok((StatusCode::CREATED, axum::Json(plan_json(&p))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyBody {
    plan: String,
}

fn plan_id(id: &str) -> ApiResult<()> {
    id.parse::<muster_core::Uuid>()
        .map(|_| ())
        .map_err(|_| ApiError::bad("a plan id is a UUID"))
}

async fn apply(
    State(app): AppState,
    caller: Caller,
    JsonBody(body): JsonBody<ApplyBody>,
) -> ApiResult<Response> {
    caller.need_cluster_admin("plan and apply services")?;
    plan_id(&body.plan)?;
    let (plan, tree) = app
        .services
        .apply(&app, &body.plan, &caller.user.name, caller.user.admin)
        .await?;
    let status = if tree.is_some() {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(plan_json(&plan))).into_response())
}

async fn show_plan(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.need_scope("read")?;
    plan_id(&id)?;
    let a = app.clone();
    let p = blocking(move || Ok(a.services.get_plan(&a, &id)?))
        .await?
        .ok_or_else(|| ApiError::not_found("plan"))?;
    Ok(axum::Json(plan_json(&p)).into_response())
}

/// The plan and step a step's job asks about, for a caller acting in the trees' workspace.
async fn step_of(app: &Arc<App>, caller: &Caller, id: &str, key: &str) -> ApiResult<StoredPlan> {
    caller.need_role(crate::hq::orders::ORDERS_WORKSPACE, Role::Operator)?;
    plan_id(id)?;
    muster_core::names::check_name("step", key).map_err(ApiError::bad)?;
    let (a, id) = (app.clone(), id.to_string());
    blocking(move || Ok(a.services.get_plan(&a, &id)?))
        .await?
        .ok_or_else(|| ApiError::not_found("plan"))
}

async fn step(
    State(app): AppState,
    caller: Caller,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<Response> {
    let plan = step_of(&app, &caller, &id, &key).await?;
    let a = app.clone();
    let v = blocking(move || Ok(crate::services::step::info(&a, &plan, &key)?)).await?;
    Ok(axum::Json(v).into_response())
}

async fn archive(
    State(app): AppState,
    caller: Caller,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<Response> {
    let plan = step_of(&app, &caller, &id, &key).await?;
    let blob = plan
        .steps
        .iter()
        .find(|s| s.key == key)
        .ok_or_else(|| ApiError::not_found("step"))?
        .archive
        .clone()
        .ok_or_else(|| ApiError::not_found("archive"))?;
    super::blob_response(&app, &blob, "application/gzip")
}

/// The built-in process verbs of a step (`start`, `stop`, `restart`, `remove`).
async fn process(
    State(app): AppState,
    caller: Caller,
    Path((id, key, verb)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let plan = step_of(&app, &caller, &id, &key).await?;
    if !["start", "stop", "restart", "remove"].contains(&verb.as_str()) {
        return Err(ApiError::bad(
            "the verb must be one of start, stop, restart, remove",
        ));
    }
    let v = crate::services::process::run(&app, &plan, &key, &verb).await?;
    Ok(axum::Json(v).into_response())
}

/// The archive a step's `export` action left (`.tar.gz`), kept in the blob store.
async fn export_upload(
    State(app): AppState,
    caller: Caller,
    Path((id, key)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let plan = step_of(&app, &caller, &id, &key).await?;
    let s = plan
        .steps
        .iter()
        .find(|s| s.key == key)
        .ok_or_else(|| ApiError::not_found("step"))?
        .clone();
    if !s
        .verbs
        .as_ref()
        .is_some_and(|v| v.iter().any(|v| v == "export"))
    {
        return Err(ApiError::bad("this step is no export"));
    }
    if body.len() < 2 || body[..2] != [0x1f, 0x8b] {
        return Err(ApiError::bad("send the export as a .tar.gz"));
    }
    let a = app.clone();
    let size = body.len() as u64;
    let blob = blocking(move || {
        let blob = a.blobs.put(&body)?;
        let job = a
            .store
            .tree_jobs(plan.tree.unwrap_or_default())
            .ok()
            .and_then(|j| j.into_iter().find(|j| j.key == key).map(|j| j.id));
        crate::services::SERVICES.update(&*a.store, &s.step.path, |r| {
            let mut r = r?;
            r.exports.push(crate::services::Export {
                id: blob.clone(),
                size,
                at: muster_wire::util::now(),
                job,
            });
            let n = r.exports.len();
            if n > crate::services::KEEP_EXPORTS {
                r.exports.drain(..n - crate::services::KEEP_EXPORTS);
            }
            Some(r)
        })?;
        Ok(blob)
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"export": blob, "size": size})),
    )
        .into_response())
}

/// The planned build of step `key` of `plan`, or 404.
fn build_of(plan: &StoredPlan, key: &str) -> ApiResult<crate::services::build::PlannedBuild> {
    plan.steps
        .iter()
        .find(|s| s.key == key)
        .ok_or_else(|| ApiError::not_found("step"))?
        .build
        .clone()
        .ok_or_else(|| ApiError::not_found("build"))
}

/// The `.tar.gz` of a build's HQ source directory, as planned.
async fn build_source(
    State(app): AppState,
    caller: Caller,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<Response> {
    let plan = step_of(&app, &caller, &id, &key).await?;
    let crate::services::build::Source::Hq { files, .. } = build_of(&plan, &key)?.source else {
        return Err(ApiError::not_found(
            "HQ source (the build clones its git repository)",
        ));
    };
    let a = app.clone();
    let blob = blocking(move || Ok(crate::services::build::source_archive(&a, &files)?)).await?;
    super::blob_response(&app, &blob, "application/gzip")
}

/// A step's build artifacts (a `.tar.gz`): kept in the blob store under the build's key.
async fn build_upload(
    State(app): AppState,
    caller: Caller,
    Path((id, key)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let plan = step_of(&app, &caller, &id, &key).await?;
    let b = build_of(&plan, &key)?;
    if body.len() < 2 || body[..2] != [0x1f, 0x8b] {
        return Err(ApiError::bad("send the artifacts as a .tar.gz"));
    }
    let a = app.clone();
    let size = body.len() as u64;
    let key_of_build = b.key.clone();
    let kept = blocking(move || {
        let blob = a.blobs.put(&body)?;
        let s = plan.steps.iter().find(|s| s.key == key);
        let job = a
            .store
            .tree_jobs(plan.tree.unwrap_or_default())
            .ok()
            .and_then(|j| j.into_iter().find(|j| j.key == key).map(|j| j.id));
        let built = crate::services::build::Built {
            blob,
            size,
            at: muster_wire::util::now(),
            by: s.map(|s| s.step.path.clone()).unwrap_or_default(),
            node: s.and_then(|s| s.node.clone()),
            job,
        };
        Ok(crate::services::build::keep(&a, &b.key, built)?)
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"key": key_of_build, "blob": kept.blob, "size": kept.size})),
    )
        .into_response())
}

/// The artifacts of a step's build, once built.
async fn build_artifacts(
    State(app): AppState,
    caller: Caller,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<Response> {
    let plan = step_of(&app, &caller, &id, &key).await?;
    let b = build_of(&plan, &key)?;
    let a = app.clone();
    let kept = blocking(move || Ok(crate::services::build::cached(&a, &b.key)?))
        .await?
        .ok_or_else(|| ApiError::not_found("artifacts (not built yet)"))?;
    super::blob_response(&app, &kept.blob, "application/gzip")
}

/// The archive an `import` step unpacks.
async fn import_archive(
    State(app): AppState,
    caller: Caller,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<Response> {
    let plan = step_of(&app, &caller, &id, &key).await?;
    let blob = plan
        .steps
        .iter()
        .find(|s| s.key == key)
        .and_then(|s| s.import.clone())
        .ok_or_else(|| ApiError::not_found("import"))?;
    super::blob_response(&app, &blob, "application/gzip")
}

/// One export of a service, as a `.tar.gz`.
async fn export_download(
    State(app): AppState,
    caller: Caller,
    Path((path, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.need_scope("read")?;
    let rec = record_of(&app, path).await?;
    let e = rec
        .exports
        .iter()
        .find(|e| e.id == id)
        .ok_or_else(|| ApiError::not_found("export"))?;
    super::blob_response(&app, &e.id, "application/gzip")
}

/// Imports a `.tar.gz` (the body) into a service: its `import` action gets it unpacked in
/// `MUSTER_IMPORT_DIR` (the node checks paths, links and sizes).
async fn import(
    State(app): AppState,
    caller: Caller,
    Path(path): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    caller.need_cluster_admin("import into services")?;
    muster_core::service::check_path(&path).map_err(ApiError::bad)?;
    if body.len() < 2 || body[..2] != [0x1f, 0x8b] {
        return Err(ApiError::bad("send the archive as a .tar.gz"));
    }
    let (a, by) = (app.clone(), caller.user.name.clone());
    let plan = blocking(move || {
        let blob = a.blobs.put(&body)?;
        Ok(a.services
            .action_plan_with(&a, &path, "import", Some(blob), &by)?)
    })
    .await?;
    run_now(&app, &caller, plan).await
}

// ---------------------------------------------------------------------------------------------
// secrets

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretBody {
    value: String,
}

fn secret_args(path: &str, key: &str) -> ApiResult<()> {
    muster_core::service::check_path(path).map_err(ApiError::bad)?;
    crate::services::secrets::check_key(key).map_err(ApiError::bad)
}

fn secret_json(r: &crate::services::secrets::SecretRecord) -> Value {
    json!({"path": r.path, "key": r.key, "version": r.version(),
           "updated_at": r.updated_at, "updated_by": r.updated_by})
}

/// Sets a secret of a service (an operator of HQ's workspace): the value is kept encrypted,
/// never answered.
async fn set_secret(
    State(app): AppState,
    caller: Caller,
    Path((path, key)): Path<(String, String)>,
    JsonBody(body): JsonBody<SecretBody>,
) -> ApiResult<Response> {
    caller.need_role(crate::hq::orders::ORDERS_WORKSPACE, Role::Operator)?;
    secret_args(&path, &key)?;
    if body.value.is_empty() {
        return Err(ApiError::bad("the value is empty"));
    }
    if body.value.len() > crate::services::secrets::MAX_VALUE {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "a secret has at most {} bytes",
                crate::services::secrets::MAX_VALUE
            ),
        ));
    }
    let (a, by) = (app.clone(), caller.user.name.clone());
    let rec = blocking(move || {
        Ok(crate::services::secrets::set(
            &a,
            &path,
            &key,
            body.value.as_bytes(),
            &by,
        )?)
    })
    .await?;
    Ok(axum::Json(secret_json(&rec)).into_response())
}

async fn delete_secret(
    State(app): AppState,
    caller: Caller,
    Path((path, key)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.need_role(crate::hq::orders::ORDERS_WORKSPACE, Role::Operator)?;
    secret_args(&path, &key)?;
    let a = app.clone();
    let found = blocking(move || Ok(crate::services::secrets::delete(&a, &path, &key)?)).await?;
    if !found {
        return Err(ApiError::not_found("secret"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A service's secrets: keys and versions, never values.
async fn list_secrets(
    State(app): AppState,
    caller: Caller,
    Path(path): Path<String>,
) -> ApiResult<Response> {
    caller.need_role(crate::hq::orders::ORDERS_WORKSPACE, Role::Viewer)?;
    muster_core::service::check_path(&path).map_err(ApiError::bad)?;
    let a = app.clone();
    let list = blocking(move || Ok(crate::services::secrets::list(&a, &path)?)).await?;
    let items: Vec<Value> = list.values().map(secret_json).collect();
    Ok(axum::Json(json!({"items": items})).into_response())
}

/// The values of the secrets a step's service uses: only for that step's own job (the job
/// token of the plan's apply tree), never for a person.
async fn step_secrets(
    State(app): AppState,
    caller: Caller,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<Response> {
    let plan = step_of(&app, &caller, &id, &key).await?;
    let own = plan.tree.is_some_and(|t| {
        caller.token.workspace.as_deref() == Some(crate::hq::orders::ORDERS_WORKSPACE)
            && caller.token.name == format!("jobs of tree {t}")
    });
    if !own {
        return Err(ApiError::forbidden(
            "only the step's own job may read its secrets",
        ));
    }
    let a = app.clone();
    let values = blocking(move || {
        let info = crate::services::step::info(&a, &plan, &key)?;
        let keys: Vec<String> = info["secrets"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let path = info["path"].as_str().unwrap_or_default().to_string();
        Ok(crate::services::secrets::for_step(&a, &path, &keys)?)
    })
    .await?;
    let mut resp = axum::Json(json!({"secrets": values})).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    Ok(resp)
}
