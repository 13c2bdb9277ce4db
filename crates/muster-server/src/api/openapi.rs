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

/// An object that may be `null` (a field the server reports as "none yet").
fn or_null(mut schema: Value) -> Value {
    schema["nullable"] = json!(true);
    schema
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

/// A service's path in `services/` (each `/` as `%2F`): `domain__name__instance` segments.
fn service_path_param() -> Value {
    json!({"name": "path", "in": "path", "required": true, "schema": {"type": "string", "minLength": 1, "maxLength": 512, "pattern": "^[A-Za-z0-9_.%-]+$"}})
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
        op(
            "Prometheus metrics (OpenMetrics text)",
            None,
            "200",
            text("application/openmetrics-text"),
            true,
        ),
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
    let me = obj(
        json!({"user": {"type": "string"}, "admin": {"type": "boolean"},
               "workspaces": {"type": "array", "items": obj(json!({"name": {"type": "string"}, "role": {"type": "string", "enum": ["viewer", "operator", "admin"]}}), &["name", "role"])},
               "scopes": {"type": "array", "items": {"type": "string"}},
               "token": obj(json!({"id": {"type": "string"}, "name": {"type": "string"}, "expires_at": ts_null, "workspace": nullable("string")}), &["id", "name"])}),
        &["user", "admin", "workspaces", "scopes", "token"],
    );
    add(
        "/api/v1/me",
        "get",
        op(
            "Who the caller is: the user, whether a cluster admin, the caller's role in each workspace (cluster admins: admin in all), and the token's scopes",
            None,
            "200",
            Some(me),
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
            json!({"token": {"type": "string"}, "expires_at": {"type": "string", "format": "date-time"}, "uses": {"type": "integer"}, "command": {"type": "string"},
                   "hint": {"type": "string", "description": "present when the command names an address other machines cannot reach (loopback or wildcard, no server.advertise_url): how to fix that"}}),
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
    let mut put_script = op(
        "Write a node control script (the body: its bytes, text with a #! line), committed to HQ scripts/ with the caller as author (cluster admins)",
        None,
        "200",
        Some(obj(json!({"name": {"type": "string"}, "commit": {"type": "string"}}), &["name", "commit"])),
        false,
    );
    put_script["requestBody"] = json!({"required": true, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}});
    add(
        "/api/v1/scripts/{name}",
        "put",
        put_script,
        vec![path_param("name")],
    );
    add(
        "/api/v1/scripts/{name}",
        "delete",
        op(
            "Remove a node control script from HQ (a commit; cluster admins)",
            None,
            "200",
            Some(obj(
                json!({"name": {"type": "string"}, "commit": {"type": "string"}}),
                &["name", "commit"],
            )),
            false,
        ),
        vec![path_param("name")],
    );
    let commit = or_null(obj(
        json!({"id": {"type": "string"}, "message": {"type": "string"}}),
        &["id", "message"],
    ));
    let sync_run = or_null(obj(
        json!({"at": ts.clone(), "ok": {"type": "boolean"}, "message": {"type": "string"}}),
        &["at", "ok", "message"],
    ));
    let conflict = or_null(obj(
        json!({"files": {"type": "array", "items": {"type": "string"}}, "local": {"type": "string"}, "remote": {"type": "string"}, "since": ts.clone(), "message": {"type": "string"}}),
        &["files", "local", "remote"],
    ));
    add(
        "/api/v1/hq",
        "get",
        op(
            "Headquarters: path, remote, branch, head commit, last sync, a conflict, problems, the watchers' and the reaper's last runs",
            None,
            "200",
            Some(obj(json!({
                "path": {"type": "string"}, "remote": {"type": "string"}, "branch": {"type": "string"},
                "error": nullable("string"), "head": commit.clone(), "last_sync": sync_run.clone(),
                "conflict": conflict.clone(), "pulses": {"type": "integer"},
                "problems": {"type": "array", "items": obj(json!({"source": {"type": "string"}, "message": {"type": "string"}}), &["source", "message"])},
                "watchers": {"type": "array", "items": obj(json!({"name": {"type": "string"}, "started_at": ts.clone(), "duration_ms": {"type": "integer"}, "outcome": {"type": "string", "enum": ["ok", "failed", "slow", "busy"]}, "message": {"type": "string"}}), &["name", "outcome"])},
                "reaper": {"type": "array", "items": obj(json!({"name": {"type": "string"}, "started_at": ts.clone(), "duration_ms": {"type": "integer"}, "ok": {"type": "boolean"}, "message": {"type": "string"}}), &["name", "ok"])}
            }), &["path", "branch", "watchers"])),
            false,
        ),
        vec![],
    );
    let mut sync = op(
        "Run a pulse (and so a sync with the remote) now; a token with the operate scope, or with [hq] webhook_secret an X-Hub-Signature-256 header (sha256=HMAC of the body) instead",
        None,
        "200",
        Some(obj(json!({"synced": {"type": "boolean"}, "head": commit, "last_sync": sync_run, "conflict": conflict}), &["synced"])),
        false,
    );
    sync["security"] = json!([{"bearer": []}, {}]);
    add("/api/v1/hq/sync", "post", sync, vec![]);
    let order = obj(
        json!({
        "file": {"type": "string"}, "line": {"type": "integer"}, "text": {"type": "string"},
        "state": {"type": "string", "enum": ["pending", "running", "succeeded", "failed", "rejected"]},
        "tree": {"type": "string", "format": "uuid", "nullable": true},
        "created_at": ts.clone(), "started_at": {"type": "string", "format": "date-time", "nullable": true},
        "finished_at": {"type": "string", "format": "date-time", "nullable": true}, "message": {"type": "string"}}),
        &["file", "line", "text", "state"],
    );
    add(
        "/api/v1/hq/orders",
        "get",
        op(
            "The orders of HQ's orders files and their outcomes (the newest last), and each file's progress",
            None,
            "200",
            Some(obj(json!({"items": {"type": "array", "items": order},
                "files": {"type": "array", "items": obj(json!({"file": {"type": "string"}, "processed": {"type": "integer"}, "open": {"type": "integer", "nullable": true}, "stopped": nullable("string")}), &["file", "processed"])}}),
                &["items", "files"])),
            false,
        ),
        vec![query("file", "string"), query("state", "string"), query("limit", "integer")],
    );
    add(
        "/api/v1/hq/log",
        "get",
        op(
            "HQ's history: the last commits from HEAD, newest first",
            None,
            "200",
            Some(obj(
                json!({"items": {"type": "array", "items": obj(json!({"id": {"type": "string"}, "author": {"type": "string"}, "at": {"type": "string"}, "message": {"type": "string"}}), &["id", "author", "at", "message"])}}),
                &["items"],
            )),
            false,
        ),
        vec![query("limit", "integer")],
    );
    add(
        "/api/v1/hq/orders/resolve",
        "post",
        op(
            "Resolve a stopped orders file: its current content counts as processed up to where it was; later lines run (cluster admins)",
            Some(json!({"type": "object", "additionalProperties": false, "required": ["file"], "properties": {"file": {"type": "string"}}})),
            "200",
            Some(obj(json!({"file": {"type": "string"}, "resolved": {"type": "boolean"}}), &["file", "resolved"])),
            false,
        ),
        vec![],
    );
    add(
        "/api/v1/tokens/{id}",
        "delete",
        op("Revoke a token", None, "204", None, false),
        id(),
    );
    let mut create = op(
        "Create a job tree (JSON, or TOML with Content-Type: application/toml)",
        Some(r("JobSpec")),
        "201",
        Some(obj(
            json!({"id": {"type": "string"}, "jobs": {"type": "array", "items": r("JobBrief")}}),
            &["id", "jobs"],
        )),
        false,
    );
    create["requestBody"]["content"]["application/toml"] =
        json!({"schema": {"type": "string", "description": "the same tree as TOML"}});
    create["parameters"] = json!([{"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "minLength": 1, "maxLength": 200}}]);
    create["responses"]["200"] = json!({"description": "the tree made earlier with this Idempotency-Key", "content": {"application/json": {"schema": obj(json!({"id": {"type": "string"}, "jobs": {"type": "array", "items": r("JobBrief")}}), &["id", "jobs"])}}});
    let err = json!({"content": {"application/json": {"schema": r("Error")}}});
    let mut e = |status: &str, why: &str| {
        let mut v = err.clone();
        v["description"] = json!(why);
        create["responses"][status] = v;
    };
    e(
        "400",
        "an invalid tree (a job's command over jobs.command_max, a bad name...)",
    );
    e("413", "a body over server.body_max");
    e("422", "unknown_workspace, unknown_node, no_matching_node (no registered node has the selector's labels), or idempotency_key_reused (the key came with another tree)");
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
    let mut log = op(
        "The log of an attempt; `follow` streams until it ends; `tail` (the last N bytes) or `offset`/`limit` give a part, with its place in X-Log-Offset and the log's size so far in X-Log-Size",
        None,
        "200",
        text("text/plain"),
        false,
    );
    log["responses"]["200"]["headers"] = json!({
        "X-Log-Offset": {"description": "with tail/offset/limit: the offset of the first byte sent", "schema": {"type": "integer"}},
        "X-Log-Size": {"description": "with tail/offset/limit: the size of the whole log so far", "schema": {"type": "integer"}},
    });
    let bytes = |name: &str, min: u64| json!({"name": name, "in": "query", "required": false, "schema": {"type": "integer", "minimum": min, "maximum": 9007199254740991u64}});
    let mut params = log_params();
    params.extend([bytes("tail", 1), bytes("offset", 0), bytes("limit", 1)]);
    add("/api/v1/jobs/{id}/log", "get", log, params);
    add(
        "/api/v1/jobs/{id}/log/ws",
        "get",
        op("The log as a websocket", None, "101", None, false),
        log_params(),
    );
    let mut result = op(
        "How a finished job ended (a batch tree's root: the result CSV)",
        None,
        "200",
        Some(obj(
            json!({"id": {"type": "string"}, "state": {"type": "string"}, "exit_code": {"type": "integer", "nullable": true}, "error": nullable("string"), "result": {}}),
            &["id", "state"],
        )),
        false,
    );
    result["responses"]["200"]["content"]["text/csv"] = json!({"schema": {"type": "string"}});
    add("/api/v1/jobs/{id}/result", "get", result, job_id());
    // Long-running processes (SPEC §5a).
    let process = obj(
        json!({"id": {"type": "string"}, "name": {"type": "string"}, "workspace": {"type": "string"},
            "state": {"type": "string", "enum": ["pending", "starting", "healthy", "unhealthy", "restarting", "stopped", "failed", "lost", "removed"]},
            "reason": {"type": "string"}, "node": nullable("string"), "address": nullable("string"),
            "ports": {"type": "object", "additionalProperties": {"type": "integer"}},
            "restarts": {"type": "integer"}, "started_at": nullable("string"), "pid": {"type": "integer", "nullable": true},
            "limits": {"type": "object"}, "gen": {"type": "integer"}}),
        &[
            "id", "name", "state", "reason", "ports", "restarts", "limits",
        ],
    );
    let process_spec = json!({"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "tags": r("Tags"), "exec": {"type": "array", "items": {"type": "string"}}, "shell": {"type": "string"},
        "env": {"type": "object", "additionalProperties": {"type": "string"}}, "cwd": {"type": "string"},
        "node": {"type": "string"}, "node_selector": {"type": "object", "additionalProperties": {"type": "string"}},
        "ports": {"type": "array", "items": {"type": "string"}}, "restart": {"type": "string", "enum": ["always", "on-failure", "never"]},
        "backoff_base": {}, "backoff_max": {}, "max_restarts": {"type": "integer", "minimum": 0}, "restart_window": {},
        "health": {"type": "object"}, "stop_signal": {"type": "string"}, "kill_grace": {}, "limits": {"type": "object"}}});
    let proc_id = || vec![path_param("id")];
    add(
        "/api/v1/processes",
        "post",
        op(
            "Start a long-running process",
            Some(process_spec),
            "201",
            Some(r("Process")),
            false,
        ),
        vec![],
    );
    add(
        "/api/v1/processes",
        "get",
        op(
            "Processes, newest first",
            None,
            "200",
            Some(obj(
                json!({"items": {"type": "array", "items": r("Process")}, "next_cursor": nullable("string")}),
                &["items"],
            )),
            false,
        ),
        vec![
            query("workspace", "string"),
            query("node", "string"),
            query("state", "string"),
        ],
    );
    add(
        "/api/v1/processes/{id}",
        "get",
        op("One process", None, "200", Some(r("Process")), false),
        proc_id(),
    );
    add(
        "/api/v1/processes/{id}",
        "delete",
        op(
            "Stop and remove a process",
            None,
            "202",
            Some(r("Process")),
            false,
        ),
        proc_id(),
    );
    for (verb, what) in [
        (
            "stop",
            "Stop a process (its stop signal, SIGKILL after its kill grace)",
        ),
        ("start", "Start a stopped or failed process again"),
        ("restart", "Restart a process"),
    ] {
        add(
            &format!("/api/v1/processes/{{id}}/{verb}"),
            "post",
            op(what, None, "202", Some(r("Process")), false),
            proc_id(),
        );
    }
    add(
        "/api/v1/processes/{id}/log",
        "get",
        op(
            "The process's log; `follow` streams it",
            None,
            "200",
            text("text/plain"),
            false,
        ),
        vec![path_param("id"), query("follow", "boolean")],
    );
    add(
        "/api/v1/processes/{id}/log/ws",
        "get",
        op(
            "The process's log followed, as a websocket",
            None,
            "101",
            None,
            false,
        ),
        proc_id(),
    );
    // Models (SPEC §8).
    let model_params = || vec![path_param("ws"), path_param("model")];
    let version_params = || vec![path_param("ws"), path_param("model"), path_param("version")];
    let model_version = obj(
        json!({"version": {"type": "integer"},
            "state": {"type": "string", "enum": ["deploying", "live", "draining", "stopped", "failed", "retired"]},
            "created_at": ts, "created_by": {"type": "string"}, "size": {"type": "integer"},
            "replicas": {"type": "integer"}, "workers": {"type": "integer"},
            "requirements": {"type": "array", "items": {"type": "string"}},
            "tree": nullable("string"), "commit": nullable("string"), "error": nullable("string"),
            "live_at": ts_null, "node": nullable("string"), "env": nullable("string"),
            "processes": {"type": "array", "items": {"type": "string"}}}),
        &["version", "state", "created_at", "replicas", "workers"],
    );
    let replica = obj(
        json!({"process": {"type": "string"}, "version": {"type": "integer"}, "node": nullable("string"),
            "state": {"type": "string"}, "address": nullable("string"), "inflight": {"type": "integer"},
            "requests": {"type": "integer"}, "errors": {"type": "integer"},
            "p50_ms": {"type": "number", "nullable": true}, "p99_ms": {"type": "number", "nullable": true}}),
        &[
            "process", "version", "state", "inflight", "requests", "errors",
        ],
    );
    let model = obj(
        json!({"workspace": {"type": "string"}, "name": {"type": "string"}, "runtime": {"type": "string"},
            "live": {"type": "integer", "nullable": true}, "created_at": ts, "updated_at": ts,
            "versions": {"type": "array", "items": r("ModelVersion")},
            "replicas": {"type": "array", "items": r("Replica")}}),
        &[
            "workspace",
            "name",
            "runtime",
            "live",
            "versions",
            "replicas",
        ],
    );
    add(
        "/api/v1/models",
        "get",
        op(
            "Models of the caller's workspaces",
            None,
            "200",
            Some(obj(
                json!({"items": {"type": "array", "items": obj(
                    json!({"workspace": {"type": "string"}, "name": {"type": "string"}, "runtime": {"type": "string"},
                        "live": {"type": "integer", "nullable": true}, "versions": {"type": "integer"},
                        "last_version": {"type": "integer"}, "updated_at": ts, "replicas": {"type": "integer"},
                        "state": nullable("string")}),
                    &["workspace", "name", "live", "versions"],
                )}}),
                &["items"],
            )),
            false,
        ),
        vec![],
    );
    add(
        "/api/v1/models/{ws}/{model}",
        "get",
        op(
            "A model: its versions, the live one, its replicas",
            None,
            "200",
            Some(r("Model")),
            false,
        ),
        model_params(),
    );
    let mut upload = op(
        "Deploy a bundle (.tar.gz) as the model's next version: answers once its deploy tree is made",
        None,
        "202",
        Some(obj(
            json!({"workspace": {"type": "string"}, "model": {"type": "string"},
                "version": {"type": "integer"}, "tree": {"type": "string"}}),
            &["model", "version", "tree"],
        )),
        false,
    );
    upload["requestBody"] = json!({"required": true, "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}, "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}});
    add(
        "/api/v1/models/{ws}/{model}",
        "post",
        upload,
        model_params(),
    );

    add(
        "/api/v1/models/{ws}/{model}",
        "delete",
        op(
            "Delete a model: it serves nothing from now on; the reaper removes its processes and files",
            None,
            "202",
            Some(obj(
                json!({"workspace": {"type": "string"}, "model": {"type": "string"}, "deleted": {"type": "boolean"}}),
                &["model", "deleted"],
            )),
            false,
        ),
        model_params(),
    );
    add(
        "/api/v1/models/{ws}/{model}/revert",
        "post",
        op(
            "Switch back to a kept version (its predictors started again): answers with its tree",
            Some(obj(
                json!({"version": {"type": "integer", "minimum": 1}}),
                &["version"],
            )),
            "202",
            Some(obj(
                json!({"model": {"type": "string"}, "version": {"type": "integer"}, "tree": {"type": "string"}}),
                &["model", "version", "tree"],
            )),
            false,
        ),
        model_params(),
    );
    let mut predict_params = model_params();
    predict_params.push(query("version", "integer"));
    add(
        "/api/v1/models/{ws}/{model}/predict",
        "post",
        op(
            "Call the model (its live version, or ?version=N)",
            Some(obj(json!({"data": {}}), &["data"])),
            "200",
            Some(obj(
                json!({"result": {}, "version": {"type": "integer"}}),
                &["result", "version"],
            )),
            false,
        ),
        predict_params,
    );
    // Batch scoring.
    let batch = obj(
        json!({
            "id": {"type": "string"}, "tree": {"type": "string"}, "workspace": {"type": "string"},
            "model": {"type": "string"}, "version": {"type": "integer", "nullable": true},
            "state": {"type": "string"}, "columns": {"type": "array", "items": {"type": "string"}},
            "chunk_rows": {"type": "integer"}, "on_error": {"type": "string"},
            "shape": {"type": "string"}, "output": {"type": "string"},
            "rows_total": {"type": "integer"}, "rows_done": {"type": "integer"},
            "chunks": {"type": "integer"}, "chunks_done": {"type": "integer"},
            "errors": {"type": "integer"}, "result_size": {"type": "integer", "nullable": true},
            "created_at": ts.clone(), "created_by": {"type": "string"},
        }),
        &["id", "tree", "state", "rows_total", "rows_done"],
    );
    let mut batch_params = model_params();
    batch_params.extend([
        query("version", "integer"),
        query("chunk_rows", "integer"),
        query("on_error", "string"),
        query("shape", "string"),
        query("output", "string"),
    ]);
    let mut batch_op = op(
        "Score a CSV (a header line, then rows) in chunks across the replicas: answers with the batch's tree; the result CSV at /api/v1/jobs/{tree}/result",
        None,
        "202",
        Some(obj(
            json!({"tree": {"type": "string"}, "batch": batch.clone()}),
            &["tree", "batch"],
        )),
        false,
    );
    batch_op["requestBody"] =
        json!({"required": true, "content": {"text/csv": {"schema": {"type": "string"}}}});
    add(
        "/api/v1/models/{ws}/{model}/batch",
        "post",
        batch_op,
        batch_params,
    );
    let mut one_batch = model_params();
    one_batch.push(path_param("id"));
    add(
        "/api/v1/models/{ws}/{model}/batches/{id}",
        "get",
        op(
            "A batch's progress",
            None,
            "200",
            Some(batch.clone()),
            false,
        ),
        one_batch.clone(),
    );
    let mut chunk_params = one_batch.clone();
    chunk_params.push(path_param("chunk"));
    add(
        "/api/v1/models/{ws}/{model}/batches/{id}/chunks/{chunk}",
        "post",
        op(
            "Score one chunk of a batch (what its job runs)",
            None,
            "200",
            Some(obj(
                json!({"chunk": {"type": "integer"}, "rows": {"type": "integer"}, "errors": {"type": "integer"}, "rows_done": {"type": "integer"}, "rows_total": {"type": "integer"}}),
                &["chunk", "rows"],
            )),
            false,
        ),
        chunk_params,
    );
    add(
        "/api/v1/models/{ws}/{model}/batches/{id}/merge",
        "post",
        op(
            "Write a batch's result CSV (what its merge job runs)",
            None,
            "200",
            Some(batch),
            false,
        ),
        one_batch,
    );
    add(
        "/api/v1/models/{ws}/{model}/versions/{version}/bundle",
        "get",
        op(
            "A version's bundle as uploaded (what a node's prepare step fetches)",
            None,
            "200",
            text("application/gzip"),
            false,
        ),
        version_params(),
    );
    let mut step_params = version_params();
    step_params.push(path_param("step"));
    add(
        "/api/v1/models/{ws}/{model}/versions/{version}/steps/{step}",
        "post",
        op(
            "Carry out a step of a deploy tree (start, health, switch, drain, stop): progress lines, then `ok` or `error: WHY`",
            None,
            "200",
            text("text/plain"),
            false,
        ),
        step_params,
    );
    // Services (SPEC §6).
    let any = json!({"nullable": true});
    let service = obj(
        json!({
            "path": {"type": "string"}, "node": nullable("string"),
            "status": {"type": "string", "enum": ["active", "maintenance", "waiting", "blocked", "error", "unknown"]},
            "message": {"type": "string"}, "installed": {"type": "boolean"}, "hash": {"type": "string"},
            "deps": {"type": "array", "items": {"type": "string"}}, "state": any.clone(), "published": any.clone(),
            "last_action": nullable("string"), "last_job": {"type": "string", "format": "uuid", "nullable": true},
            "last_plan": nullable("string"), "process": {"type": "string", "format": "uuid", "nullable": true},
            "exports": {"type": "array", "items": obj(json!({"id": {"type": "string"}, "size": {"type": "integer"}, "at": ts.clone(), "job": {"type": "string", "format": "uuid", "nullable": true}}), &["id", "size"])},
            "history": {"type": "array", "description": "its last actions, newest first, each with the job that has its log", "items": obj(json!({"action": {"type": "string"}, "job": {"type": "string", "format": "uuid"}, "state": {"type": "string"}, "at": ts.clone()}), &["action", "job", "state", "at"])},
            "updated_at": ts.clone()
        }),
        &["path", "status", "installed"],
    );
    let plan = obj(
        json!({
            "id": {"type": "string"}, "kind": {"type": "string", "enum": ["plan", "reset", "action"]},
            "commit": {"type": "string"}, "created_at": ts.clone(),
            "created_by": {"type": "string"},
            "steps": {"type": "array", "items": obj(json!({
                "key": {"type": "string"}, "path": {"type": "string"},
                "action": {"type": "string", "enum": ["install", "reconfigure", "reset"]},
                "reason": {"type": "string"}, "hash": nullable("string"),
                "after": {"type": "array", "items": {"type": "string"}}, "node": nullable("string"),
                "build": {"type": "string", "enum": ["cached", "needed"], "nullable": true}
            }), &["key", "path", "action", "reason"])},
            "unchanged": {"type": "array", "items": {"type": "string"}},
            "tree": {"type": "string", "format": "uuid", "nullable": true},
            "applied_at": {"type": "string", "format": "date-time", "nullable": true}
        }),
        &["id", "commit", "steps", "unchanged"],
    );
    add(
        "/api/v1/services",
        "get",
        op(
            "The services as recorded (by path): status, message, node, published data, state, last action",
            None,
            "200",
            Some(obj(json!({"items": {"type": "array", "items": service.clone()}}), &["items"])),
            false,
        ),
        vec![],
    );
    add(
        "/api/v1/services/{path}",
        "get",
        op(
            "One service as recorded ({path}: its path in services/, each / as %2F)",
            None,
            "200",
            Some(service),
            false,
        ),
        vec![service_path_param()],
    );
    add(
        "/api/v1/services/plan",
        "post",
        op(
            "Plan HQ's services at its head against their recorded state (cluster admins): install, reconfigure or reset per service with the reason, in dependency order; bad service directories, cycles and missing producers are 422 naming the files. `{}` plans every service; `only` one service, what is under it and what it waits for",
            Some(obj(json!({"only": {"type": "string", "description": "a service path, e.g. demo__app__web"}}), &[])),
            "201",
            Some(plan.clone()),
            false,
        ),
        vec![],
    );
    add(
        "/api/v1/services/apply",
        "post",
        op(
            "Apply a plan as one job tree (202 with the tree; 200 when it has no steps); 409 when HQ moved since the plan, the recorded state changed, or another plan is being applied",
            Some(obj(json!({"plan": {"type": "string", "format": "uuid"}}), &["plan"])),
            "202",
            Some(plan.clone()),
            false,
        ),
        vec![],
    );
    add(
        "/api/v1/services/{path}/reset",
        "post",
        op(
            "Reset a recorded service on its node (stop, reset action, state dir, record) as a tree (202); 409 naming the services that depend on it unless cascade; dependencies nothing else uses go too unless keep_deps",
            Some(obj(json!({"cascade": {"type": "boolean"}, "keep_deps": {"type": "boolean"}}), &[])),
            "202",
            Some(plan.clone()),
            false,
        ),
        vec![service_path_param()],
    );
    add(
        "/api/v1/services/{path}/actions/{verb}",
        "post",
        op(
            "Run one action of a recorded service on its node as a tree (202)",
            None,
            "202",
            Some(plan.clone()),
            false,
        ),
        vec![service_path_param(), path_param("verb")],
    );
    add(
        "/api/v1/services/plans/{id}",
        "get",
        op("A stored plan", None, "200", Some(plan.clone()), false),
        vec![path_param("id")],
    );
    add(
        "/api/v1/services/plans/{id}/steps/{key}",
        "get",
        op(
            "What a step's job runs (for the apply tree's jobs): path, action, verbs, node, archive and the JSON context of its actions",
            None,
            "200",
            Some(obj(json!({
                "plan": {"type": "string"}, "key": {"type": "string"}, "path": {"type": "string"},
                "action": {"type": "string"}, "verbs": {"type": "array", "items": {"type": "string"}},
                "node": nullable("string"), "archive": nullable("string"),
                "actions": {"type": "array", "items": {"type": "string"}}, "process": {"type": "boolean"},
                "secrets": {"type": "array", "items": {"type": "string"}},
                "context": {"type": "object"}, "build": {"type": "object", "nullable": true}
            }), &["plan", "key", "path", "action", "verbs", "context"])),
            false,
        ),
        vec![path_param("id"), path_param("key")],
    );
    add(
        "/api/v1/services/plans/{id}/steps/{key}/process/{verb}",
        "post",
        op(
            "The built-in start, stop, restart or remove of a step's [process] through the process layer (for the apply tree's jobs); start answers once the process is healthy",
            None,
            "200",
            Some(obj(json!({"process": {"type": "string", "format": "uuid", "nullable": true}, "state": {"type": "string"}}), &["process"])),
            false,
        ),
        vec![path_param("id"), path_param("key"), path_param("verb")],
    );
    add(
        "/api/v1/services/plans/{id}/steps/{key}/export",
        "post",
        {
            let mut o = op(
                "The archive an export step's action left (for the apply tree's jobs), kept in the blob store",
                None,
                "201",
                Some(obj(json!({"export": {"type": "string"}, "size": {"type": "integer"}}), &["export", "size"])),
                false,
            );
            o["requestBody"] = json!({"required": true, "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}, "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}});
            o
        },
        vec![path_param("id"), path_param("key")],
    );
    add(
        "/api/v1/services/plans/{id}/steps/{key}/import",
        "get",
        op(
            "The archive an import step unpacks (for the apply tree's jobs)",
            None,
            "200",
            text("application/gzip"),
            false,
        ),
        vec![path_param("id"), path_param("key")],
    );
    let secret = obj(
        json!({"path": {"type": "string"}, "key": {"type": "string"}, "version": {"type": "string"},
               "updated_at": ts.clone(), "updated_by": {"type": "string"}}),
        &["path", "key", "version", "updated_at", "updated_by"],
    );
    add(
        "/api/v1/services/{path}/secrets",
        "get",
        op(
            "A service's secrets: keys and versions (a hash of the ciphertext), never values",
            None,
            "200",
            Some(list(secret.clone())),
            false,
        ),
        vec![service_path_param()],
    );
    add(
        "/api/v1/services/{path}/secrets/{key}",
        "put",
        op(
            "Set a secret of a service (an operator of the hq workspace): kept encrypted at rest, resolved as ${secrets.KEY} only on the node, never answered",
            Some(json!({"type": "object", "additionalProperties": false, "required": ["value"],
                        "properties": {"value": {"type": "string", "minLength": 1, "maxLength": 65536}}})),
            "200",
            Some(secret),
            false,
        ),
        vec![service_path_param(), path_param("key")],
    );
    add(
        "/api/v1/services/{path}/secrets/{key}",
        "delete",
        op("Remove a secret of a service", None, "204", None, false),
        vec![service_path_param(), path_param("key")],
    );
    add(
        "/api/v1/services/plans/{id}/steps/{key}/secrets",
        "get",
        op(
            "The values of the secrets a step's service uses, for that step's own job only (its tree's job token); 403 for anyone else",
            None,
            "200",
            Some(obj(json!({"secrets": {"type": "object", "additionalProperties": {"type": "string"}}}), &["secrets"])),
            false,
        ),
        vec![path_param("id"), path_param("key")],
    );
    add(
        "/api/v1/services/{path}/exports/{id}",
        "get",
        op(
            "One export of a service, as a .tar.gz",
            None,
            "200",
            text("application/gzip"),
            false,
        ),
        vec![service_path_param(), path_param("id")],
    );
    add(
        "/api/v1/services/{path}/import",
        "post",
        {
            let mut o = op(
                "Import a .tar.gz into a service: its import action runs on its node with the archive unpacked in MUSTER_IMPORT_DIR (202 with the tree)",
                None,
                "202",
                Some(plan.clone()),
                false,
            );
            o["requestBody"] = json!({"required": true, "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}, "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}});
            o
        },
        vec![service_path_param()],
    );
    add(
        "/api/v1/services/plans/{id}/steps/{key}/build/source",
        "get",
        op(
            "The HQ source directory of a step's [build] as a .tar.gz, as planned (for the apply tree's jobs)",
            None,
            "200",
            text("application/gzip"),
            false,
        ),
        vec![path_param("id"), path_param("key")],
    );
    add(
        "/api/v1/services/plans/{id}/steps/{key}/build",
        "post",
        {
            let mut o = op(
                "The artifacts a step's [build] left, as a .tar.gz: kept in the blob store under the build's input hash (a key built meanwhile keeps its first artifacts)",
                None,
                "201",
                Some(obj(json!({"key": {"type": "string"}, "blob": {"type": "string"}, "size": {"type": "integer"}}), &["key", "blob", "size"])),
                false,
            );
            o["requestBody"] = json!({"required": true, "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}, "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}});
            o
        },
        vec![path_param("id"), path_param("key")],
    );
    add(
        "/api/v1/services/plans/{id}/steps/{key}/build/artifacts",
        "get",
        op(
            "The artifacts of a step's [build] as a .tar.gz, once built (404 before)",
            None,
            "200",
            text("application/gzip"),
            false,
        ),
        vec![path_param("id"), path_param("key")],
    );
    add(
        "/api/v1/services/plans/{id}/steps/{key}/archive",
        "get",
        op(
            "The service directory of a step as a .tar.gz (content-addressed in the blob store)",
            None,
            "200",
            text("application/gzip"),
            false,
        ),
        vec![path_param("id"), path_param("key")],
    );
    // The yhat client's routes (PROTOCOL.md): HTTP Basic username:apikey or ?username=&apikey=.
    let yhat_query = || vec![query("username", "string"), query("apikey", "string")];
    add(
        "/verify",
        "post",
        op(
            "yhat client: check username and apikey (a muster token)",
            None,
            "200",
            Some(obj(json!({"success": {"type": "string"}}), &["success"])),
            true,
        ),
        yhat_query(),
    );
    let mut yhat_deploy = op(
        "yhat client: deploy a model (multipart part model_name: zlib'd JSON bundle); answers once it is live or failed",
        None,
        "200",
        Some(obj(
            json!({"status": {"type": "string"}, "modelname": {"type": "string"}, "version": {"type": "integer"}}),
            &["status", "modelname", "version"],
        )),
        true,
    );
    yhat_deploy["requestBody"] = json!({"required": true, "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {"model_name": {"type": "string", "format": "binary"}}}}}});
    add("/deployer/model/large", "post", yhat_deploy, yhat_query());
    let mut yhat_batch = op(
        "yhat client: run a batch job (multipart parts job_name and job: a .tar.gz holding bundle.json) as a muster job; answers at once",
        None,
        "200",
        Some(obj(
            json!({"status": {"type": "string"}, "job_name": {"type": "string"}, "job": {"type": "string"}}),
            &["status", "job_name", "job"],
        )),
        true,
    );
    yhat_batch["requestBody"] = json!({"required": true, "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {"job_name": {"type": "string"}, "job": {"type": "string", "format": "binary"}}}}}});
    add("/batch/deploy", "post", yhat_batch, yhat_query());
    let mut yhat_predict_params = vec![path_param("user"), path_param("model")];
    yhat_predict_params.extend(yhat_query());
    yhat_predict_params.push(query("raw_input", "string"));
    add(
        "/{user}/models/{model}/",
        "post",
        op(
            "yhat client: call a model (JSON, or a form when the client has no pandas)",
            Some(json!({})),
            "200",
            Some(obj(
                json!({"result": {}, "yhat_id": {"type": "string"}, "yhat_model": {"type": "string"}}),
                &["result", "yhat_id", "yhat_model"],
            )),
            true,
        ),
        yhat_predict_params,
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
                "ApiToken": api_token, "Workspace": workspace, "Process": process,
                "Model": model, "ModelVersion": model_version, "Replica": replica,
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
