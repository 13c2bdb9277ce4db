//! The OpenAPI 3.0 document served at `/api/v1/openapi.json`. A test checks it against the
//! routes the router really serves ([`super::routes`]): none missing, none stale.

use super::*;
use serde_json::Value;

fn nullable(t: &str) -> Value {
    json!({"type": t, "nullable": true})
}

fn obj(props: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": props, "required": required})
}

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn json_body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

/// One operation: summary, request body, success status and schema.
fn op(
    summary: &str,
    body: Option<Value>,
    ok: &str,
    ok_schema: Option<Value>,
    public: bool,
) -> Value {
    let mut o = json!({"summary": summary, "responses": {
        "default": {"description": "an error", "content": {"application/json": {"schema": r("Error")}}}
    }});
    let ok_resp = match ok_schema {
        Some(s) if s.get("text").is_some() => {
            json!({"description": "ok", "content": {s["text"].as_str().unwrap_or("text/plain"): {"schema": {"type": "string"}}}})
        }
        Some(s) => json!({"description": "ok", "content": {"application/json": {"schema": s}}}),
        None => json!({"description": "ok"}),
    };
    o["responses"][ok] = ok_resp;
    if let Some(b) = body {
        o["requestBody"] = json_body(b);
    }
    if public {
        o["security"] = json!([]);
    }
    o
}

fn text(ct: &str) -> Option<Value> {
    Some(json!({"text": ct}))
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

/// The name rule of `muster_core::names::check_name` (users, workspaces, tags, job keys, nodes).
/// Not expressed: no `__`, and a few reserved words (`api`, `setup`, ...).
fn name() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 63, "pattern": "^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"})
}

/// Passwords: at least 12 characters (and not the user name).
fn password() -> Value {
    json!({"type": "string", "minLength": 12})
}

fn job_id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}})
}

fn query(name: &str, t: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": {"type": t}})
}

/// The document.
pub fn document() -> Value {
    let ts = json!({"type": "string", "format": "date-time"});
    let ts_null = json!({"type": "string", "format": "date-time", "nullable": true});
    let tags = obj(
        json!({"workspace": name(), "application": name(), "version": name(),
               "instance": name(), "labels": {"type": "object", "additionalProperties": {"type": "string", "minLength": 1, "maxLength": 200}}}),
        &[],
    );
    let job = json!({"type": "object", "required": ["id", "tree", "name", "key", "state", "attempt", "created_at"], "properties": {
        "id": {"type": "string"}, "tree": {"type": "string"}, "parent": nullable("string"),
        "children": {"type": "array", "items": {}}, "needs": {"type": "array", "items": {"type": "string"}},
        "name": {"type": "string"}, "key": {"type": "string"}, "state": {"type": "string", "enum": ["waiting", "running", "succeeded", "failed", "aborted"]},
        "node": nullable("string"), "want_node": {"type": "string"}, "node_selector": {"type": "object"},
        "exec": {"type": "array", "items": {"type": "string"}}, "shell": {"type": "string"}, "noop": {"type": "boolean"},
        "timeout_s": {"type": "integer", "nullable": true}, "retries": {"type": "integer"},
        "created_at": ts, "started_at": ts_null, "finished_at": ts_null,
        "exit_code": {"type": "integer", "nullable": true}, "error": nullable("string"), "attempt": {"type": "integer"},
        "retry_at": ts_null, "result": {}, "tags": r("Tags"),
        "tree_state": {"type": "string"}, "on_failure": {"type": "string"}
    }});
    let job_spec = json!({"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"}, "key": name(),
        "exec": {"type": "array", "items": {"type": "string"}, "minItems": 1}, "shell": {"type": "string"}, "noop": {"type": "boolean"},
        "node": name(), "node_selector": {"type": "object", "additionalProperties": {"type": "string"}},
        "timeout_s": {"type": "integer", "minimum": 1, "maximum": 31536000}, "retries": {"type": "integer", "minimum": 0, "maximum": 100},
        "needs": {"type": "array", "items": {"type": "string"}}, "children": {"type": "array", "items": r("JobSpec")},
        "tags": r("Tags"), "on_failure": {"type": "string", "enum": ["abort", "continue"]}
    }});
    let tree_summary = obj(
        json!({"id": {"type": "string"}, "name": {"type": "string"}, "tags": r("Tags"), "state": {"type": "string"},
               "on_failure": {"type": "string"}, "created_at": ts, "finished_at": ts_null, "jobs": {"type": "integer"},
               "nodes": {"type": "array", "items": {"type": "string"}}, "created_by": nullable("string")}),
        &["id", "name", "tags", "state", "created_at", "jobs"],
    );
    let user = obj(
        json!({"name": {"type": "string"}, "admin": {"type": "boolean"}, "created_at": ts}),
        &["name", "admin"],
    );
    let api_token = obj(
        json!({"id": {"type": "string"}, "prefix": {"type": "string"}, "name": {"type": "string"}, "user": {"type": "string"},
               "scopes": {"type": "array", "items": {"type": "string"}}, "created_at": ts, "expires_at": ts_null, "token": {"type": "string"}}),
        &["id", "prefix", "name", "scopes"],
    );
    let workspace = obj(
        json!({"name": {"type": "string"}, "created_at": ts, "created_by": {"type": "string"}, "role": nullable("string"),
               "members": {"type": "array", "items": obj(json!({"user": {"type": "string"}, "role": {"type": "string"}}), &["user", "role"])}}),
        &["name"],
    );
    let list = |item: Value| {
        obj(
            json!({"items": {"type": "array", "items": item}}),
            &["items"],
        )
    };
    let id = || vec![path_param("id")];
    let job_id = || vec![job_id_param()];
    let mut paths = serde_json::Map::new();
    let mut add = |path: &str, method: &str, mut o: Value, params: Vec<Value>| {
        if !params.is_empty() {
            o["parameters"] = Value::Array(params);
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[method] = o;
    };
    add(
        "/",
        "get",
        op(
            "The start page (setup while no user exists)",
            None,
            "200",
            text("text/html"),
            true,
        ),
        vec![],
    );
    add(
        "/assets/{file}",
        "get",
        op(
            "An embedded dashboard asset (script, style, icon)",
            None,
            "200",
            text("application/octet-stream"),
            true,
        ),
        vec![path_param("file")],
    );
    add(
        "/healthz",
        "get",
        op(
            "Liveness",
            None,
            "200",
            Some(obj(json!({"status": {"type": "string"}}), &["status"])),
            true,
        ),
        vec![],
    );
    add(
        "/readyz",
        "get",
        op(
            "Readiness: the store answers and the job manager runs",
            None,
            "200",
            Some(obj(json!({"status": {"type": "string"}}), &["status"])),
            true,
        ),
        vec![],
    );
    add(
        "/metrics",
        "get",
        op("Prometheus metrics", None, "200", text("text/plain"), true),
        vec![],
    );
    add(
        "/api/v1/openapi.json",
        "get",
        op(
            "This document",
            None,
            "200",
            Some(json!({"type": "object"})),
            true,
        ),
        vec![],
    );
    let setup_body = json!({"type": "object", "additionalProperties": false, "required": ["setup_code", "username", "password"], "properties": {
        "setup_code": {"type": "string"}, "username": name(), "password": password(), "cluster_name": name()}});
    add(
        "/api/v1/setup",
        "post",
        op(
            "Create the first admin with the one-time setup code",
            Some(setup_body),
            "201",
            Some(obj(json!({"token": {"type": "string"}}), &["token"])),
            true,
        ),
        vec![],
    );
    let login_body = json!({"type": "object", "additionalProperties": false, "required": ["username", "password"], "properties": {"username": {"type": "string"}, "password": {"type": "string"}}});
    add(
        "/api/v1/login",
        "post",
        op(
            "Log in: a bearer token, and a session cookie with its CSRF token",
            Some(login_body),
            "200",
            Some(obj(
                json!({"token": {"type": "string"}, "csrf_token": {"type": "string"}}),
                &["token", "csrf_token"],
            )),
            true,
        ),
        vec![],
    );
    add(
        "/api/v1/logout",
        "post",
        op(
            "Revoke the caller's session token",
            None,
            "204",
            None,
            false,
        ),
        vec![],
    );
    add(
        "/api/v1/users",
        "get",
        op(
            "Users (cluster admins see all)",
            None,
            "200",
            Some(list(r("User"))),
            false,
        ),
        vec![],
    );
    let new_user = json!({"type": "object", "additionalProperties": false, "required": ["username", "password"], "properties": {"username": name(), "password": password(), "admin": {"type": "boolean"}}});
    add(
        "/api/v1/users",
        "post",
        op(
            "Create a user (cluster admins)",
            Some(new_user),
            "201",
            Some(r("User")),
            false,
        ),
        vec![],
    );
    add(
        "/api/v1/users/{name}",
        "delete",
        op("Delete a user", None, "204", None, false),
        vec![path_param("name")],
    );
    add(
        "/api/v1/workspaces",
        "get",
        op(
            "The caller's workspaces with members",
            None,
            "200",
            Some(list(r("Workspace"))),
            false,
        ),
        vec![],
    );
    let new_ws = json!({"type": "object", "additionalProperties": false, "required": ["name"], "properties": {"name": name()}});
    add(
        "/api/v1/workspaces",
        "post",
        op(
            "Create a workspace (the caller is its admin)",
            Some(new_ws),
            "201",
            Some(r("Workspace")),
            false,
        ),
        vec![],
    );
    let member = json!({"type": "object", "additionalProperties": false, "required": ["role"], "properties": {"role": {"type": "string", "enum": ["viewer", "operator", "admin"]}}});
    let ws_user = || vec![path_param("ws"), path_param("user")];
    add(
        "/api/v1/workspaces/{ws}/members/{user}",
        "put",
        op(
            "Set a member's role",
            Some(member),
            "200",
            Some(obj(
                json!({"workspace": {"type": "string"}, "user": {"type": "string"}, "role": {"type": "string"}}),
                &["workspace", "user", "role"],
            )),
            false,
        ),
        ws_user(),
    );
    add(
        "/api/v1/workspaces/{ws}/members/{user}",
        "delete",
        op("Remove a member", None, "204", None, false),
        ws_user(),
    );
    add(
        "/api/v1/tokens",
        "get",
        op(
            "API tokens (the caller's; `all` for cluster admins)",
            None,
            "200",
            Some(list(r("ApiToken"))),
            false,
        ),
        vec![query("all", "boolean")],
    );
    let new_token = json!({"type": "object", "additionalProperties": false, "required": ["name", "scopes"], "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 100}, "scopes": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": SCOPES}}, "expires_in_s": {"type": "integer", "minimum": 1, "maximum": 315360000, "nullable": true}}});
    add(
        "/api/v1/tokens",
        "post",
        op(
            "Create an API token (its text is shown once)",
            Some(new_token),
            "201",
            Some(r("ApiToken")),
            false,
        ),
        vec![],
    );
    let node = obj(
        json!({"id": {"type": "string"}, "name": {"type": "string"}, "state": {"type": "string", "enum": ["ready", "draining", "down", "lost"]},
               "labels": {"type": "object", "additionalProperties": {"type": "string"}}, "slots": {"type": "integer"},
               "last_seen": {"type": "string", "format": "date-time"}, "version": {"type": "string"}}),
        &["id", "name", "state", "labels", "slots"],
    );
    add(
        "/api/v1/nodes",
        "get",
        op(
            "Nodes and their states",
            None,
            "200",
            Some(list(node.clone())),
            false,
        ),
        vec![],
    );
    add(
        "/api/v1/nodes/{id}",
        "get",
        op(
            "One node (by id or name)",
            None,
            "200",
            Some(node.clone()),
            false,
        ),
        vec![path_param("id")],
    );
    let node_patch = json!({"type": "object", "additionalProperties": false, "properties": {
        "labels": {"type": "object", "additionalProperties": {"type": "string", "nullable": true}},
        "state": {"type": "string", "enum": ["draining", "ready"]}}});
    add(
        "/api/v1/nodes/{id}",
        "patch",
        op(
            "Label a node, drain it or make it ready again (cluster admins)",
            Some(node_patch),
            "200",
            Some(node.clone()),
            false,
        ),
        vec![path_param("id")],
    );
    add(
        "/api/v1/nodes/{id}",
        "delete",
        op(
            "Remove a node and revoke its credential (cluster admins)",
            None,
            "204",
            None,
            false,
        ),
        vec![path_param("id")],
    );
    let join_token_body = json!({"type": "object", "additionalProperties": false, "properties": {"ttl_s": {"type": "integer", "minimum": 1, "maximum": 2592000}, "uses": {"type": "integer", "minimum": 1, "maximum": 10000}}});
    let mut jt = op(
        "A join token for new agents (cluster admins)",
        None,
        "201",
        Some(obj(
            json!({"token": {"type": "string"}, "expires_at": {"type": "string", "format": "date-time"}, "uses": {"type": "integer"}, "command": {"type": "string"}}),
            &["token", "expires_at", "uses", "command"],
        )),
        false,
    );
    jt["requestBody"] =
        json!({"required": false, "content": {"application/json": {"schema": join_token_body}}});
    add("/api/v1/nodes/join-token", "post", jt, vec![]);
    let join_body = json!({"type": "object", "additionalProperties": false, "required": ["join_token", "name"], "properties": {"join_token": {"type": "string"}, "name": {"type": "string"}}});
    add(
        "/api/v1/nodes/join",
        "post",
        op(
            "An agent trades a join token for its node credential (over TLS under the cluster CA only; 426 otherwise)",
            Some(join_body),
            "201",
            Some(obj(
                json!({"node_id": {"type": "string"}, "credential": {"type": "string"}}),
                &["node_id", "credential"],
            )),
            true,
        ),
        vec![],
    );
    let mut agent_ws = op(
        "The agent connection (agent protocol over a websocket in TLS under the cluster CA; bearer: the node credential; 426 without TLS)",
        None,
        "101",
        None,
        true,
    );
    agent_ws["security"] = json!([{"bearer": []}]);
    add("/api/v1/agent/ws", "get", agent_ws, vec![]);
    add(
        "/api/v1/scripts",
        "get",
        op(
            "Node control scripts",
            None,
            "200",
            Some(obj(
                json!({"items": {"type": "array", "items": obj(json!({"name": {"type": "string"}}), &["name"])}, "dir": {"type": "string"}}),
                &["items"],
            )),
            false,
        ),
        vec![],
    );
    let run_body = json!({"type": "object", "additionalProperties": false, "properties": {
        "nodes": {"type": "object", "additionalProperties": {"type": "string"}}, "args": {"type": "array", "items": {"type": "string"}}, "workspace": {"type": "string"}}});
    add(
        "/api/v1/scripts/{name}/run",
        "post",
        op(
            "Run a script on every matching node, as a job tree (on_failure = continue)",
            Some(run_body),
            "201",
            Some(obj(
                json!({"id": {"type": "string"}, "jobs": {"type": "array", "items": r("JobBrief")}}),
                &["id", "jobs"],
            )),
            false,
        ),
        vec![path_param("name")],
    );
    add(
        "/api/v1/tokens/{id}",
        "delete",
        op("Revoke a token", None, "204", None, false),
        id(),
    );
    let mut create = op(
        "Create a job tree",
        Some(r("JobSpec")),
        "201",
        Some(obj(
            json!({"id": {"type": "string"}, "jobs": {"type": "array", "items": r("JobBrief")}}),
            &["id", "jobs"],
        )),
        false,
    );
    create["parameters"] = json!([{"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "minLength": 1, "maxLength": 200}}]);
    create["responses"]["200"] = json!({"description": "the tree made earlier with this Idempotency-Key", "content": {"application/json": {"schema": obj(json!({"id": {"type": "string"}, "jobs": {"type": "array", "items": r("JobBrief")}}), &["id", "jobs"])}}});
    add("/api/v1/jobs", "post", create, vec![]);
    let list_params = [
        "workspace",
        "application",
        "version",
        "instance",
        "node",
    ]
    .iter()
    .map(|n| query(n, "string"))
    .chain([
        json!({"name": "state", "in": "query", "required": false, "schema": {"type": "string", "enum": ["running", "succeeded", "failed", "aborted"]}}),
        json!({"name": "cursor", "in": "query", "required": false, "schema": {"type": "string", "format": "uuid"}}),
        json!({"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}}),
    ])
    .collect();
    add(
        "/api/v1/jobs",
        "get",
        op(
            "Trees, newest first",
            None,
            "200",
            Some(obj(
                json!({"items": {"type": "array", "items": r("TreeSummary")}, "next_cursor": nullable("string")}),
                &["items", "next_cursor"],
            )),
            false,
        ),
        list_params,
    );
    add(
        "/api/v1/jobs/{id}",
        "get",
        op("One job", None, "200", Some(r("Job")), false),
        job_id(),
    );
    add(
        "/api/v1/jobs/{id}/tree",
        "get",
        op(
            "The job's tree, nested, with live states",
            None,
            "200",
            Some(r("Job")),
            false,
        ),
        job_id(),
    );
    add(
        "/api/v1/jobs/{id}/abort",
        "post",
        op(
            "Abort the job's tree",
            None,
            "202",
            Some(obj(
                json!({"id": {"type": "string"}, "tree": {"type": "string"}, "state": {"type": "string"}}),
                &["id", "tree", "state"],
            )),
            false,
        ),
        job_id(),
    );
    let log_params = || {
        vec![
            job_id_param(),
            json!({"name": "attempt", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 4294967295u64}}),
            query("follow", "boolean"),
        ]
    };
    add(
        "/api/v1/jobs/{id}/log",
        "get",
        op(
            "The log of an attempt; `follow` streams until it ends",
            None,
            "200",
            text("text/plain"),
            false,
        ),
        log_params(),
    );
    add(
        "/api/v1/jobs/{id}/log/ws",
        "get",
        op("The log as a websocket", None, "101", None, false),
        log_params(),
    );
    add(
        "/api/v1/jobs/{id}/result",
        "get",
        op(
            "How a finished job ended",
            None,
            "200",
            Some(obj(
                json!({"id": {"type": "string"}, "state": {"type": "string"}, "exit_code": {"type": "integer", "nullable": true}, "error": nullable("string"), "result": {}}),
                &["id", "state"],
            )),
            false,
        ),
        job_id(),
    );
    add(
        "/api/v1/events/ws",
        "get",
        op(
            "Live job, tree and node events (websocket)",
            None,
            "101",
            None,
            false,
        ),
        vec![],
    );
    json!({
        "openapi": "3.0.3",
        "info": {"title": "muster", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": obj(json!({"error": obj(json!({"code": {"type": "string"}, "message": {"type": "string"}}), &["code", "message"])}), &["error"]),
                "JobBrief": obj(json!({"id": {"type": "string"}, "key": {"type": "string"}, "name": {"type": "string"}, "parent": nullable("string"), "state": {"type": "string"}}), &["id", "key", "name", "state"]),
                "Tags": tags, "Job": job, "JobSpec": job_spec, "TreeSummary": tree_summary, "User": user,
                "ApiToken": api_token, "Workspace": workspace,
            }
        }
    })
}

/// `GET /api/v1/openapi.json`.
pub async fn serve() -> impl IntoResponse {
    axum::Json(document())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_document_matches_the_router() {
        let served: BTreeSet<(String, String)> = routes()
            .list
            .into_iter()
            .map(|(m, p)| (m.to_lowercase(), p))
            .collect();
        let doc = document();
        let mut documented = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                documented.insert((method.clone(), path.clone()));
            }
        }
        let missing: Vec<_> = served.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&served).collect();
        assert!(
            missing.is_empty(),
            "routes missing from the OpenAPI document: {missing:?}"
        );
        assert!(
            stale.is_empty(),
            "documented routes the router does not serve: {stale:?}"
        );
        // Every $ref resolves.
        let text = doc.to_string();
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert!(
                doc["components"]["schemas"].get(&name).is_some(),
                "dangling $ref {name}"
            );
        }
    }
}
