//! Routes of long-running processes (SPEC §5a): create, list, show, stop, start, restart,
//! remove, and the log (whole, followed, or as a websocket).

use super::*;
use crate::accounts::Role;
use crate::processes::{ProcError, ProcFilter, Process};
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use muster_core::process::{validate, Defaults, ProcState, ProcessSpec};
use muster_core::{Run, Uuid};
use serde::Deserialize;
use serde_json::Value;

pub(super) fn routes(r: Routes) -> Routes {
    r.add(
        "/api/v1/processes",
        &["GET", "POST"],
        post(create).get(list),
    )
    .leader(&["POST"])
    .add(
        "/api/v1/processes/{id}",
        &["GET", "DELETE"],
        get(show).delete(remove),
    )
    .leader(&["DELETE"])
    .add("/api/v1/processes/{id}/stop", &["POST"], post(stop))
    .leader(&["POST"])
    .add("/api/v1/processes/{id}/start", &["POST"], post(start))
    .leader(&["POST"])
    .add("/api/v1/processes/{id}/restart", &["POST"], post(restart))
    .leader(&["POST"])
    .add("/api/v1/processes/{id}/log", &["GET"], get(log))
    .leader(&["GET"])
    .add("/api/v1/processes/{id}/log/ws", &["GET"], get(log_ws))
}

/// A process as the API shows it.
pub(super) fn process_json(p: &Process) -> Value {
    let mut what = match &p.def.run {
        Run::Exec(a) => json!({"exec": a}),
        Run::Shell(s) => json!({"shell": s}),
        _ => json!({}),
    };
    let d = &p.def;
    let limits = json!({
        "memory": d.limits.memory, "cpu": d.limits.cpu, "pids": d.limits.pids,
        "status": if p.limits.is_empty() { if d.limits.is_empty() { "none" } else { "pending" } } else { p.limits.as_str() },
    });
    let v = json!({
        "id": p.id, "name": d.name, "tags": d.tags, "workspace": d.tags.workspace,
        "state": p.state, "reason": p.reason, "node": p.node, "ports": p.ports,
        "address": p.address, "restarts": p.restarts, "started_at": p.started_at,
        "pid": p.pid, "limits": limits, "gen": p.gen, "want": p.want,
        "created_at": p.created_at, "created_by": p.created_by, "updated_at": p.updated_at,
        "env": d.env, "cwd": d.cwd, "node_selector": d.node_selector, "want_node": d.node,
        "port_names": d.ports, "restart": d.restart, "health": d.health,
        "stop_signal": d.stop_signal, "kill_grace_ms": d.kill_grace_ms,
    });
    if let (Value::Object(w), Value::Object(mut m)) = (&mut what, v) {
        m.extend(std::mem::take(w));
        return Value::Object(m);
    }
    Value::Null
}

fn proc_error(e: ProcError) -> ApiError {
    match e {
        ProcError::NotFound => ApiError::not_found("process"),
        ProcError::NodeUnavailable(m) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "node_unavailable", m)
        }
        ProcError::Store(s) => s.into(),
    }
}

fn parse_id(id: &str) -> ApiResult<Uuid> {
    id.parse()
        .map_err(|_| ApiError::bad("that is not a process id"))
}

async fn create(
    State(app): AppState,
    caller: Caller,
    JsonBody(spec): JsonBody<ProcessSpec>,
) -> ApiResult<Response> {
    let defaults = Defaults {
        kill_grace_ms: app.config.jobs.kill_grace.as_millis() as u64,
        ..Defaults::default()
    };
    let def = validate(&spec, &caller.user.name, defaults).map_err(ApiError::bad)?;
    caller.need_role(&def.tags.workspace, Role::Operator)?;
    let store = app.store.clone();
    blocking(move || Ok(store.ping()?)).await?;
    let (by, admin) = (caller.user.name.clone(), caller.user.admin);
    let procs = app.processes.clone();
    let p = blocking(move || Ok(procs.start(def, &by, admin)?)).await?;
    Ok((StatusCode::CREATED, axum::Json(process_json(&p))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    workspace: Option<String>,
    node: Option<String>,
    state: Option<String>,
}

async fn list(
    State(app): AppState,
    caller: Caller,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|_| ApiError::bad("unknown or malformed query parameter"))?;
    caller.need_scope("read")?;
    let state = match &q.state {
        Some(s) => Some(ProcState::parse(s).ok_or_else(|| {
            ApiError::bad("state must be pending, starting, healthy, unhealthy, restarting, stopped, failed or lost")
        })?),
        None => None,
    };
    let filter = ProcFilter {
        workspaces: caller.workspaces(),
        workspace: q.workspace,
        node: q.node,
        state,
    };
    let procs = app.processes.clone();
    let all = blocking(move || Ok(procs.list(&filter)?)).await?;
    let items: Vec<Value> = all.iter().map(process_json).collect();
    Ok(axum::Json(json!({"items": items, "next_cursor": null})).into_response())
}

/// Loads a process the caller may see.
async fn load(app: &Arc<App>, caller: &Caller, id: &str) -> ApiResult<Process> {
    let id = parse_id(id)?;
    let procs = app.processes.clone();
    let p = blocking(move || Ok(procs.get(id)?))
        .await?
        .ok_or_else(|| ApiError::not_found("process"))?;
    if !caller.may_see(&p.def.tags.workspace) {
        return Err(ApiError::not_found("process"));
    }
    Ok(p)
}

async fn show(State(app): AppState, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    let p = load(&app, &caller, &id).await?;
    Ok(axum::Json(process_json(&p)).into_response())
}

/// The verbs that change a process.
#[derive(Clone, Copy)]
enum Verb {
    Stop,
    Start,
    Restart,
    Remove,
}

async fn act(app: Arc<App>, caller: Caller, id: String, verb: Verb) -> ApiResult<Response> {
    let p = load(&app, &caller, &id).await?;
    caller.need_role(&p.def.tags.workspace, Role::Operator)?;
    let procs = app.processes.clone();
    let id = p.id;
    let p = blocking(move || {
        match verb {
            Verb::Stop => procs.stop(id),
            Verb::Start => procs.resume(id),
            Verb::Restart => procs.restart(id),
            Verb::Remove => procs.delete(id),
        }
        .map_err(proc_error)
    })
    .await?;
    let mut v = process_json(&p);
    if let (Verb::Remove, Value::Object(m)) = (verb, &mut v) {
        m.insert("state".into(), json!("removed"));
    }
    Ok((StatusCode::ACCEPTED, axum::Json(v)).into_response())
}

async fn stop(State(app): AppState, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    act(app, caller, id, Verb::Stop).await
}

async fn start(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    act(app, caller, id, Verb::Start).await
}

async fn restart(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    act(app, caller, id, Verb::Restart).await
}

async fn remove(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    act(app, caller, id, Verb::Remove).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
}

async fn open_log(
    app: &Arc<App>,
    caller: &Caller,
    id: &str,
    follow: bool,
) -> ApiResult<tokio::sync::mpsc::Receiver<String>> {
    let p = load(app, caller, id).await?;
    let Some(node) = &p.node else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_placed",
            "the process has not run on a node yet",
        ));
    };
    crate::logs::read_process(app, node, p.id, follow)
        .await
        .map_err(|e| match e {
            crate::logs::LogError::NotFound(what) => ApiError::not_found(&what),
            crate::logs::LogError::NodeUnavailable(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "node_unavailable", m)
            }
        })
}

async fn log(
    State(app): AppState,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|_| ApiError::bad("unknown or malformed query parameter"))?;
    let rx = open_log(&app, &caller, &id, q.follow).await?;
    Ok(super::text_stream(rx))
}

async fn log_ws(
    State(app): AppState,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    check_origin(&headers)?;
    if !app.cluster.is_leader() {
        // A follower relays the leader's log websocket (the agent is connected there).
        load(&app, &caller, &id).await?;
        let Some(leader) = app.cluster.leader_url() else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_leader",
                "no server leads the cluster right now; try again",
            ));
        };
        let url = format!(
            "{}/api/v1/processes/{id}/log/ws",
            leader.trim_end_matches('/').replacen("http", "ws", 1)
        );
        let auth: Vec<(String, String)> = ["authorization", "cookie"]
            .iter()
            .filter_map(|h| Some((h.to_string(), headers.get(*h)?.to_str().ok()?.to_string())))
            .collect();
        return Ok(ws.on_upgrade(move |socket| super::jobs::relay_ws(socket, url, auth)));
    }
    let rx = open_log(&app, &caller, &id, true).await?;
    Ok(super::jobs::ws_small(ws)
        .on_upgrade(move |socket: WebSocket| super::jobs::send_lines(socket, rx)))
}
