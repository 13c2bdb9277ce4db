//! Node control scripts (SPEC §5): executables in the scripts directory (`<data-dir>/scripts`;
//! headquarters will hold it later). Running one makes a job tree with `on_failure = continue`
//! and one child per matching node; each child carries the script's text, so the node needs no
//! copy of it. Its logs are the job logs; its jobs get `MUSTER_URL` and a workspace token.

use super::*;
use crate::accounts::Role;
use axum::extract::Path;
use axum::routing::post;
use muster_core::spec::{build_tree, JobSpec};
use muster_core::Uuid;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

pub(super) fn routes(r: Routes) -> Routes {
    r.add("/api/v1/scripts", &["GET"], get(list_scripts)).add(
        "/api/v1/scripts/{name}/run",
        &["POST"],
        post(run_script),
    )
}

/// The scripts directory.
pub fn scripts_dir(app: &App) -> std::path::PathBuf {
    app.config.data_dir.join("scripts")
}

/// The scripts: executable regular files whose names follow the name rule.
pub fn scripts(app: &App) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out: Vec<String> = std::fs::read_dir(scripts_dir(app))
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.metadata()
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                })
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| muster_core::names::check_name("script", n).is_ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

async fn list_scripts(State(app): AppState, caller: Caller) -> ApiResult<Response> {
    caller.need_scope("read")?;
    let items: Vec<Value> = scripts(&app)
        .into_iter()
        .map(|n| json!({"name": n}))
        .collect();
    Ok(axum::Json(json!({"items": items, "dir": scripts_dir(&app)})).into_response())
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

/// Single-quotes a word for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A shell text that writes the script to a temporary file and runs it with `args`.
fn wrapper(text: &str, args: &[String]) -> String {
    let delim = format!("MUSTER_SCRIPT_{}", crate::auth::random_hex(8));
    let body = if text.ends_with('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    };
    let args: Vec<String> = args.iter().map(|a| sh_quote(a)).collect();
    format!(
        "f=\"$(mktemp)\" || exit 1\ntrap 'rm -f \"$f\"' EXIT\ncat > \"$f\" <<'{delim}'\n{body}{delim}\nchmod +x \"$f\"\n\"$f\" {}\n",
        args.join(" ")
    )
}

async fn run_script(
    State(app): AppState,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<RunBody>,
) -> ApiResult<Response> {
    muster_core::names::check_name("script", &name).map_err(ApiError::bad)?;
    if !scripts(&app).contains(&name) {
        return Err(ApiError::not_found(&format!(
            "script {name:?} (in {})",
            scripts_dir(&app).display()
        )));
    }
    let text = std::fs::read(scripts_dir(&app).join(&name)).map_err(ApiError::internal)?;
    let text = String::from_utf8(text).map_err(|_| ApiError::bad(format!("script {name:?} is not text; only text scripts (with a #! line) can be shipped to nodes")))?;
    let store = app.store.clone();
    let nodes = blocking(move || Ok(store.nodes()?)).await?;
    let targets: Vec<String> = nodes
        .iter()
        .filter(|n| n.state == "ready" && b.nodes.iter().all(|(k, v)| n.labels.get(k) == Some(v)))
        .map(|n| n.name.clone())
        .collect();
    if targets.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_nodes",
            format!("no ready node matches {:?}", b.nodes),
        ));
    }
    let shell = wrapper(&text, &b.args);
    let mut tags = muster_core::Tags::default();
    if let Some(ws) = &b.workspace {
        tags.workspace = ws.clone();
    }
    let spec = JobSpec {
        name: format!("script {name}"),
        on_failure: Some(muster_core::OnFailure::Continue),
        tags: Some(tags),
        children: targets
            .iter()
            .map(|n| JobSpec {
                name: format!("{name} on {n}"),
                node: Some(n.clone()),
                shell: Some(shell.clone()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrapper_runs_the_script_with_its_arguments() {
        let w = wrapper(
            "#!/bin/sh\necho \"got: $1|$2\"",
            &["a b".into(), "it's".into()],
        );
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&w)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "got: a b|it's\n",
            "{w}"
        );
    }
}
