//! Node control scripts (SPEC §5): the routes over [`crate::hq::scripts`] — listing, running
//! (a tree with one child per matching node), and writing or removing one, which commits to HQ
//! with the caller as author.

use super::*;
use crate::accounts::Role;
use crate::hq::scripts::{self, ScriptError};
use axum::body::Bytes;
use axum::extract::Path;
use axum::routing::post;
use muster_core::spec::build_tree;
use muster_core::Uuid;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

pub(super) fn routes(r: Routes) -> Routes {
    r.add("/api/v1/scripts", &["GET"], get(list_scripts))
        .add("/api/v1/scripts/{name}/run", &["POST"], post(run_script))
        .leader(&["POST"])
        .add(
            "/api/v1/scripts/{name}",
            &["PUT", "DELETE"],
            axum::routing::put(put_script).delete(delete_script),
        )
        .leader(&["PUT", "DELETE"])
}

impl From<ScriptError> for ApiError {
    fn from(e: ScriptError) -> ApiError {
        match e {
            ScriptError::Invalid(m) => ApiError::bad(m),
            ScriptError::NotFound(_) => ApiError::not_found("script"),
            ScriptError::NoHq(m) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "hq_unavailable",
                format!("HQ is not available: {m}"),
            ),
            ScriptError::Failed(m) => ApiError::internal(m),
        }
    }
}

async fn list_scripts(State(app): AppState, caller: Caller) -> ApiResult<Response> {
    caller.need_scope("read")?;
    let a = app.clone();
    let (names, dir) = blocking(move || Ok((scripts::list(&a.hq)?, scripts::dir(&a.hq)?))).await?;
    let items: Vec<Value> = names.into_iter().map(|n| json!({"name": n})).collect();
    Ok(axum::Json(json!({"items": items, "dir": dir})).into_response())
}

async fn put_script(
    State(app): AppState,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.need_cluster_admin("write node control scripts")?;
    let (a, who) = (app.clone(), caller.user.name.clone());
    let n = name.clone();
    let commit = blocking(move || Ok(scripts::write(&a.hq, &n, &body, &who)?)).await?;
    Ok(axum::Json(json!({"name": name, "commit": commit})).into_response())
}

async fn delete_script(
    State(app): AppState,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    caller.need_cluster_admin("remove node control scripts")?;
    let (a, who) = (app.clone(), caller.user.name.clone());
    let n = name.clone();
    let commit = blocking(move || Ok(scripts::delete(&a.hq, &n, &who)?)).await?;
    Ok(axum::Json(json!({"name": name, "commit": commit})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    /// A label selector; empty: every ready node.
    #[serde(default)]
    nodes: BTreeMap<String, String>,
    #[serde(default)]
    args: Vec<String>,
    /// The tree's workspace (default: the caller's own).
    #[serde(default)]
    workspace: Option<String>,
}

async fn run_script(
    State(app): AppState,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<RunBody>,
) -> ApiResult<Response> {
    let (a, n) = (app.clone(), name.clone());
    let text = blocking(move || Ok(scripts::read(&a.hq, &n)?)).await?;
    let (store, sel) = (app.store.clone(), b.nodes.clone());
    let targets = blocking(move || Ok(scripts::targets(&*store, &sel)?)).await?;
    if targets.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_nodes",
            format!("no ready node matches {}", quote(&format!("{:?}", b.nodes))),
        ));
    }
    let mut spec = scripts::tree(&name, &text, &b.args, &targets);
    let mut tags = muster_core::Tags::default();
    if let Some(ws) = &b.workspace {
        tags.workspace = ws.clone();
    }
    spec.tags = Some(tags);
    let user = caller.user.name.clone();
    let mut new =
        build_tree(&spec, &user, Some(&user), now(), &mut Uuid::now_v7).map_err(ApiError::bad)?;
    caller.need_role(&new.tree.tags.workspace, Role::Operator)?;
    new.tree.admin = caller.user.admin;
    let id = new.tree.id;
    let jobs: Vec<Value> = new.jobs.iter().map(super::jobs::job_brief).collect();
    app.manager.create(new, None).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"id": id, "jobs": jobs})),
    )
        .into_response())
}
