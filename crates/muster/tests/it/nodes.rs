//! Nodes and agents (SPEC §5): real `muster agent` processes on loopback joining the server with
//! join tokens, placement by name, selector and workspace, logs followed across nodes, node
//! loss, agent restarts and removal.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `muster agent` process with its own data dir; killed (with its jobs) on drop.
pub struct Agent {
    child: Option<Child>,
    pub dir: TempDir,
    name: String,
    servers: Vec<String>,
    /// Extra environment (config overrides).
    pub env: Vec<(String, String)>,
}

impl Agent {
    pub fn join(s: &Server, name: &str, labels: &[&str]) -> Agent {
        Self::join_cluster(s, &[], name, labels)
    }

    /// Joins through `s`, knowing the `more` servers too.
    pub fn join_cluster(s: &Server, more: &[&Server], name: &str, labels: &[&str]) -> Agent {
        let (st, t) = s.call("POST", "/api/v1/nodes/join-token", Some(json!({"uses": 1})));
        assert_eq!(st, 201, "{t}");
        let dir = TempDir::new("agent");
        let mut servers = vec![s.url.clone()];
        servers.extend(more.iter().map(|m| m.url.clone()));
        let mut a = Agent {
            child: None,
            dir,
            name: name.into(),
            servers,
            env: Vec::new(),
        };
        a.start(Some(t["token"].as_str().unwrap()), labels);
        a
    }

    /// Joins `s` with extra environment.
    pub fn join_with(s: &Server, name: &str, env: &[(&str, &str)]) -> Agent {
        let (st, t) = s.call("POST", "/api/v1/nodes/join-token", Some(json!({"uses": 1})));
        assert_eq!(st, 201, "{t}");
        let mut a = Agent {
            child: None,
            dir: TempDir::new("agent"),
            name: name.into(),
            servers: vec![s.url.clone()],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        a.start(Some(t["token"].as_str().unwrap()), &[]);
        a
    }

    pub fn start(&mut self, token: Option<&str>, labels: &[&str]) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_muster"));
        cmd.args(["agent", "--name", &self.name, "--data-dir"])
            .arg(&self.dir.0);
        for s in &self.servers {
            cmd.args(["--server", s]);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("MUSTER_DISCOVERY__INTERVAL", "300ms")
            .env("MUSTER_NODES__LOST_AFTER", "3s")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(t) = token {
            cmd.args(["--join-token", t]);
        }
        for l in labels {
            cmd.args(["--label", l]);
        }
        let mut child = cmd.spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the agent ended at once"
        );
        assert!(line.contains("is running"), "{line}");
        std::thread::spawn(move || for _ in out.lines() {});
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Waits for the agent process to end by itself; its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let mut status = None;
        wait_until(within, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn node(s: &Server, name: &str) -> Value {
    let (st, n) = s.call("GET", &format!("/api/v1/nodes/{name}"), None);
    assert_eq!(st, 200, "{n}");
    n
}

pub fn wait_node(s: &Server, name: &str, state: &str, within: Duration) {
    let mut last = Value::Null;
    let ok = wait_until(within, || {
        last = s.call("GET", &format!("/api/v1/nodes/{name}"), None).1;
        last["state"] == state
    });
    assert!(ok, "node {name} never became {state}: {last}");
}

pub fn fast_nodes(c: &mut muster_server::config::Config) {
    c.discovery.interval = Duration::from_millis(300);
    c.nodes.lost_after = Duration::from_secs(3);
}

#[test]
fn agents_join_run_pinned_and_selected_jobs_and_stream_logs() {
    let s = Server::start_with(fast_nodes);
    let _gpu = Agent::join(&s, "gpu-1", &["type=gpu"]);
    let _cpu = Agent::join(&s, "cpu-1", &["type=cpu"]);
    wait_node(&s, "gpu-1", "ready", Duration::from_secs(10));
    wait_node(&s, "cpu-1", "ready", Duration::from_secs(10));
    assert_eq!(node(&s, "gpu-1")["labels"]["type"], "gpu");
    let go = s.dir.0.join("go");
    let (id, body) = s.create(json!({"name": "spread", "on_failure": "continue", "children": [
        {"name": "on-gpu", "node_selector": {"type": "gpu"}, "shell": format!("echo gpu-line; while [ ! -e {} ]; do sleep 0.02; done; echo gpu-done", go.display())},
        {"name": "on-cpu", "node": "cpu-1", "exec": ["sh", "-c", "echo on $MUSTER_JOB_ID"]}
    ]}));
    // A selector no registered node matches is refused at submit.
    let (st, refused) = s.call(
        "POST",
        "/api/v1/jobs",
        Some(json!({"name": "nowhere", "node_selector": {"type": "tpu"}, "exec": ["true"]})),
    );
    assert_eq!(st, 422, "{refused}");
    // The log of a job on another node, followed live through the server.
    let gpu_job = body["jobs"][1]["id"].as_str().unwrap().to_string();
    let resp = http()
        .get(&format!("{}/api/v1/jobs/{gpu_job}/log?follow=true", s.url))
        .header("authorization", &format!("Bearer {}", s.token))
        .call()
        .unwrap();
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut first = String::new();
    loop {
        first.clear();
        assert!(reader.read_line(&mut first).unwrap() > 0);
        if first.contains("gpu-line") {
            break;
        }
    }
    std::fs::write(&go, b"").unwrap();
    let rest: Vec<String> = reader.lines().map(|l| l.unwrap()).collect();
    assert!(
        rest.iter().any(|l| l.ends_with(" out gpu-done")),
        "{rest:?}"
    );
    let t = s.wait_tree(&id, Duration::from_secs(20));
    assert_eq!(child(&t, "on-gpu")["node"], "gpu-1");
    assert_eq!(child(&t, "on-cpu")["node"], "cpu-1");
    // The full log stays readable from the server after the attempt ended.
    assert!(s.log(&gpu_job).contains("gpu-done"));
    // The live log came straight from the node's own endpoint.
    assert_eq!(log_streams(&s, "endpoint"), 1);
    assert_eq!(log_streams(&s, "connection"), 0);
}

/// `muster_remote_log_streams_total{via=...}`.
fn log_streams(s: &Server, via: &str) -> u64 {
    let (_, text) = s.raw(Some(&s.token), "GET", "/metrics", None, &[]);
    let want = format!("muster_remote_log_streams_total{{via=\"{via}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want).map(|n| n.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no {want} in {text}"))
}

#[test]
fn an_agent_without_a_log_endpoint_relays_logs_over_its_connection() {
    let s = Server::start_with(fast_nodes);
    let _a = Agent::join_with(&s, "plain", &[("MUSTER_AGENT__LISTEN", "")]);
    wait_node(&s, "plain", "ready", Duration::from_secs(10));
    let go = s.dir.0.join("go-plain");
    let (id, body) = s.create(json!({"name": "relay", "node": "plain",
        "shell": format!("echo first; while [ ! -e {} ]; do sleep 0.02; done; echo last", go.display())}));
    let job = body["jobs"][0]["id"].as_str().unwrap().to_string();
    let resp = http()
        .get(&format!("{}/api/v1/jobs/{job}/log?follow=true", s.url))
        .header("authorization", &format!("Bearer {}", s.token))
        .call()
        .unwrap();
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut line = String::new();
    while !line.contains("first") {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0);
    }
    std::fs::write(&go, b"").unwrap();
    let rest: Vec<String> = reader.lines().map(|l| l.unwrap()).collect();
    assert!(rest.iter().any(|l| l.ends_with(" out last")), "{rest:?}");
    assert_eq!(
        s.wait_tree(&id, Duration::from_secs(20))["state"],
        "succeeded"
    );
    assert_eq!(log_streams(&s, "connection"), 1);
    assert_eq!(log_streams(&s, "endpoint"), 0);
}

/// One request to the server over TLS under the CA `fingerprint` names, as an agent makes it.
fn tls_call(
    s: &Server,
    fingerprint: [u8; 32],
    path: &str,
    body: Value,
) -> Result<(u16, Value), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(muster_wire::pki::request(
        &s.url,
        fingerprint,
        "POST",
        path,
        body.to_string(),
    ))
    .map(|(st, b)| (st, serde_json::from_slice(&b).unwrap_or(Value::Null)))
    .map_err(|e| e.to_string())
}

#[test]
fn join_tokens_are_spent_and_removed_nodes_are_refused() {
    let s = Server::start_with(fast_nodes);
    let (_, t) = s.call(
        "POST",
        "/api/v1/nodes/join-token",
        Some(json!({"uses": 1, "ttl_s": 60})),
    );
    let token = t["token"].as_str().unwrap().to_string();
    assert!(t["command"].as_str().unwrap().contains(&token));
    let fingerprint = muster_wire::beacon::token_ca_fingerprint(&token).unwrap();
    let join = |name: &str| json!({"join_token": token, "name": name});
    // Agents talk TLS: a plain-HTTP join is refused and spends nothing.
    let (st, body) = s.call_as(
        None,
        "POST",
        "/api/v1/nodes/join",
        Some(join("plain").to_string()),
        &[],
    );
    assert_eq!(st, 426, "{body}");
    assert_eq!(body["error"]["code"], "tls_required");
    // A server whose certificate is not under the CA the token names is not trusted.
    let err = tls_call(&s, [9; 32], "/api/v1/nodes/join", join("first")).unwrap_err();
    assert!(err.contains("not of this cluster's CA"), "{err}");
    let (st, body) = tls_call(&s, fingerprint, "/api/v1/nodes/join", join("first")).unwrap();
    assert_eq!(st, 201, "{body}");
    assert!(body["credential"].as_str().unwrap().starts_with("mnc_"));
    let (st, body) = tls_call(&s, fingerprint, "/api/v1/nodes/join", join("second")).unwrap();
    assert_eq!(st, 401, "a one-use token works once: {body}");
    let mut a = Agent::join(&s, "doomed", &[]);
    wait_node(&s, "doomed", "ready", Duration::from_secs(10));
    assert_eq!(s.call("DELETE", "/api/v1/nodes/doomed", None).0, 204);
    let status = a
        .wait_exit(Duration::from_secs(10))
        .expect("a removed agent stops");
    assert!(!status.success());
    // Its credential is revoked: a restart cannot connect.
    let cred = std::fs::read_to_string(a.dir.0.join("agent/credential")).unwrap();
    let saved = std::fs::read_to_string(a.dir.0.join("agent/ca-fingerprint")).unwrap();
    assert_eq!(muster_wire::util::unhex(saved.trim()).unwrap(), fingerprint);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = rt.block_on(muster_agent::link::ws_connect(
        &s.url,
        cred.trim(),
        muster_wire::pki::PinnedCa::client_config(fingerprint),
    ));
    let err = refused.expect_err("a revoked credential cannot connect");
    assert!(err.to_string().contains("401"), "{err}");
    // Nor over plain HTTP, whatever the credential.
    let (st, _) = s.raw(
        Some(cred.trim()),
        "GET",
        "/api/v1/agent/ws",
        None,
        &[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    );
    assert_eq!(st, 426);
    assert_eq!(s.call("GET", "/api/v1/nodes/doomed", None).0, 404);
}

#[test]
fn a_killed_agent_goes_down_then_lost_and_its_tree_aborts() {
    let s = Server::start_with(fast_nodes);
    let mut a = Agent::join(&s, "fragile", &["workspaces=admin"]);
    wait_node(&s, "fragile", "ready", Duration::from_secs(10));
    let started = s.dir.0.join("started");
    let (id, _) = s.create(json!({"name": "doomed", "children": [
        {"name": "remote", "node": "fragile", "shell": format!("touch {}; sleep 30", started.display())},
        {"name": "local", "node": "node-1", "shell": "sleep 30"}
    ]}));
    assert!(wait_until(Duration::from_secs(10), || started.exists()));
    // A long-running process pinned to the node: it cannot move, so it stays `lost`.
    let (st, p) = s.call(
        "POST",
        "/api/v1/processes",
        Some(json!({"name": "pinned", "node": "fragile", "exec": ["sleep", "300"]})),
    );
    assert_eq!(st, 201, "{p}");
    let proc_path = format!("/api/v1/processes/{}", p["id"].as_str().unwrap());
    let mut p = json!(null);
    assert!(
        wait_until(Duration::from_secs(15), || {
            p = s.call("GET", &proc_path, None).1;
            p["pid"].is_i64()
        }),
        "the pinned process never ran: {p:#}"
    );
    a.kill9();
    wait_node(&s, "fragile", "down", Duration::from_secs(5));
    wait_node(&s, "fragile", "lost", Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(10), || {
            p = s.call("GET", &proc_path, None).1;
            p["state"] == "lost"
        }),
        "the pinned process was not marked lost: {p:#}"
    );
    assert_eq!(p["reason"], "node lost", "{p:#}");
    assert_eq!(p["node"], "fragile", "{p:#}");
    let t = s.wait_tree(&id, Duration::from_secs(15));
    assert_eq!(t["tree_state"], "failed");
    assert_eq!(child(&t, "remote")["error"], "node lost");
    assert_eq!(child(&t, "local")["state"], "aborted");
    // The agent comes back: the job the server ended is not resurrected; its process is killed.
    a.start(None, &["workspaces=admin"]);
    wait_node(&s, "fragile", "ready", Duration::from_secs(10));
    assert_eq!(s.call("DELETE", &proc_path, None).0, 202);
    let remote = child(&t, "remote")["id"].as_str().unwrap().to_string();
    let sup_dir = muster_agent::attempt_dirs(&a.dir.0.join("agent"))
        .into_iter()
        .find(|p| p.to_string_lossy().contains(&remote))
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || sup_dir
        .join("exit.json")
        .exists()
        || muster_agent::done_dir(&sup_dir).join("exit.json").exists()));
    assert_eq!(s.job(&remote)["state"], "failed");
}

#[test]
fn a_lost_node_s_retryable_job_moves_to_another_node() {
    let s = Server::start_with(fast_nodes);
    let mut a = Agent::join(&s, "first", &["pool=x"]);
    wait_node(&s, "first", "ready", Duration::from_secs(10));
    let marks = s.dir.0.join("marks");
    let (id, _) = s.create(
        json!({"name": "mover", "node_selector": {"pool": "x"}, "retries": 1,
        "shell": format!("echo $MUSTER_ATTEMPT >> {}; sleep 2", marks.display())}),
    );
    assert!(wait_until(Duration::from_secs(10), || marks.exists()));
    a.kill9();
    let _b = Agent::join(&s, "second", &["pool=x"]);
    let t = s.wait_tree(&id, Duration::from_secs(20));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    assert_eq!(
        (t["attempt"].as_u64(), t["node"].as_str()),
        (Some(2), Some("second"))
    );
}

#[test]
fn an_agent_restart_keeps_its_jobs() {
    let s = Server::start_with(fast_nodes);
    let mut a = Agent::join(&s, "steady", &[]);
    wait_node(&s, "steady", "ready", Duration::from_secs(10));
    let (gate, marks) = (s.dir.0.join("gate"), s.dir.0.join("marks"));
    let (id, _) = s.create(json!({"name": "survivor", "node": "steady",
        "shell": format!("echo run >> {}; while [ ! -e {} ]; do sleep 0.02; done", marks.display(), gate.display())}));
    assert!(wait_until(Duration::from_secs(10), || marks.exists()));
    a.kill9();
    a.start(None, &[]);
    std::fs::write(&gate, b"").unwrap();
    let t = s.wait_tree(&id, Duration::from_secs(20));
    assert_eq!(t["tree_state"], "succeeded");
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap(),
        "run\n",
        "ran once"
    );
}

#[test]
fn draining_nodes_get_no_new_jobs_and_workspaces_limit_placement() {
    let s = Server::start_with(fast_nodes);
    let _a = Agent::join(&s, "team-node", &["workspaces=team"]);
    wait_node(&s, "team-node", "ready", Duration::from_secs(10));
    let (st, n) = s.call(
        "PATCH",
        "/api/v1/nodes/team-node",
        Some(json!({"state": "draining", "labels": {"rack": "2"}})),
    );
    assert_eq!(st, 200, "{n}");
    assert_eq!(
        (n["state"].as_str(), n["labels"]["rack"].as_str()),
        (Some("draining"), Some("2"))
    );
    let (id, _) = s.create(json!({"name": "waits", "node": "team-node", "exec": ["true"]}));
    assert!(
        !wait_until(Duration::from_millis(700), || s.tree(&id)["tree_state"]
            != "running"),
        "a draining node took a job"
    );
    assert_eq!(
        s.call(
            "PATCH",
            "/api/v1/nodes/team-node",
            Some(json!({"state": "ready"}))
        )
        .0,
        200
    );
    assert_eq!(
        s.wait_tree(&id, Duration::from_secs(10))["tree_state"],
        "succeeded"
    );
    // A non-admin's jobs run only on nodes that allow their workspace.
    let (st, _) = s.call(
        "POST",
        "/api/v1/users",
        Some(json!({"username": "tina", "password": "a long password 1"})),
    );
    assert_eq!(st, 201);
    let (_, login) = s.call_as(
        None,
        "POST",
        "/api/v1/login",
        Some(json!({"username": "tina", "password": "a long password 1"}).to_string()),
        &[],
    );
    let tina = login["token"].as_str().unwrap();
    let (st, body) = s.call_as(
        Some(tina),
        "POST",
        "/api/v1/jobs",
        Some(json!({"name": "t", "node": "team-node", "exec": ["true"]}).to_string()),
        &[],
    );
    assert_eq!(st, 201, "{body}");
    let tid = body["id"].as_str().unwrap().to_string();
    let t = s.wait_tree(&tid, Duration::from_secs(10));
    assert!(
        t["error"]
            .as_str()
            .unwrap_or("")
            .contains("allows workspace"),
        "{t:#}"
    );
}

#[test]
fn node_control_scripts_run_once_per_matching_node_with_a_workspace_token() {
    let s = Server::start_with(fast_nodes);
    let _a = Agent::join(&s, "web-1", &["role=web"]);
    let _b = Agent::join(&s, "web-2", &["role=web"]);
    let _c = Agent::join(&s, "db-1", &["role=db"]);
    for n in ["web-1", "web-2", "db-1"] {
        wait_node(&s, n, "ready", Duration::from_secs(10));
    }
    let script = format!(
        "#!/bin/sh\necho \"hello $1 from $MUSTER_NODE_NAME\"\n{} jobs ls --json > /dev/null && echo cli-works\n[ \"$MUSTER_NODE_NAME\" != web-2 ] || exit 4\n",
        env!("CARGO_BIN_EXE_muster")
    );
    // Written through the API: a commit to HQ scripts/ by the caller.
    let (st, body) = s.call_as(
        Some(&s.token),
        "PUT",
        "/api/v1/scripts/greet",
        Some(script),
        &[("content-type", "application/octet-stream")],
    );
    assert_eq!(st, 200, "{body}");
    let (st, list) = s.call("GET", "/api/v1/scripts", None);
    assert_eq!(st, 200);
    assert_eq!(list["items"][0]["name"], "greet");
    let (st, body) = s.call(
        "POST",
        "/api/v1/scripts/greet/run",
        Some(json!({"nodes": {"role": "web"}, "args": ["world"]})),
    );
    assert_eq!(st, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let t = s.wait_tree(&id, Duration::from_secs(20));
    let kids = t["children"].as_array().unwrap();
    assert_eq!(kids.len(), 2, "one child per matching node: {t:#}");
    assert_eq!(t["on_failure"], "continue");
    let one = child(&t, "greet on web-1");
    assert_eq!(one["state"], "succeeded", "{one:#}");
    let log = s.log(one["id"].as_str().unwrap());
    assert!(
        log.contains("out hello world from web-1") && log.contains("out cli-works"),
        "{log}"
    );
    let two = child(&t, "greet on web-2");
    assert_eq!(
        (two["state"].as_str(), two["exit_code"].as_i64()),
        (Some("failed"), Some(4))
    );
    assert_eq!(t["tree_state"], "failed");
    assert_eq!(
        s.call("POST", "/api/v1/scripts/nope/run", Some(json!({})))
            .0,
        404
    );
    assert_eq!(
        s.call(
            "POST",
            "/api/v1/scripts/greet/run",
            Some(json!({"nodes": {"role": "none"}}))
        )
        .0,
        409
    );
    // The job token is gone once the tree ended.
    let (_, tokens) = s.call("GET", "/api/v1/tokens?all=true", None);
    assert!(
        !tokens.to_string().contains(&format!("jobs of tree {id}")),
        "{tokens}"
    );
}

#[test]
fn jobs_for_an_absent_node_wait_for_it() {
    let s = Server::start_with(fast_nodes);
    let mut a = Agent::join(&s, "sleepy", &[]);
    wait_node(&s, "sleepy", "ready", Duration::from_secs(10));
    a.kill9();
    wait_node(&s, "sleepy", "down", Duration::from_secs(5));
    let (id, _) = s.create(json!({"name": "patient", "children": [
        {"name": "probe", "node": "sleepy", "noop": true},
        {"name": "work", "node": "sleepy", "exec": ["true"]}
    ]}));
    assert!(
        !wait_until(Duration::from_millis(500), || s.tree(&id)["tree_state"]
            != "running"),
        "jobs for a down node must wait"
    );
    a.start(None, &[]);
    assert_eq!(
        s.wait_tree(&id, Duration::from_secs(15))["tree_state"],
        "succeeded"
    );
}

#[test]
fn noop_jobs_are_spread_over_the_nodes() {
    let s = Server::start_with(fast_nodes);
    let _a = Agent::join(&s, "left", &["pool=z"]);
    let _b = Agent::join(&s, "right", &["pool=z"]);
    wait_node(&s, "left", "ready", Duration::from_secs(10));
    wait_node(&s, "right", "ready", Duration::from_secs(10));
    let children: Vec<Value> = (0..20)
        .map(|i| json!({"name": format!("n{i}"), "noop": true, "node_selector": {"pool": "z"}}))
        .collect();
    let (id, _) = s.create(json!({"name": "spread", "children": children}));
    let t = s.wait_tree(&id, Duration::from_secs(10));
    let on = |n: &str| {
        t["children"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["node"] == n)
            .count()
    };
    assert_eq!(on("left") + on("right"), 20);
    assert!(
        on("left") >= 5 && on("right") >= 5,
        "left {} right {}",
        on("left"),
        on("right")
    );
}

#[test]
fn tls_clients_get_the_configured_certificate_and_agents_the_cluster_one() {
    // A certificate of the operator's own (self-signed here) for browsers and the CLI.
    let files = TempDir::new("tls");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = files.0.join("cert.pem");
    let key = files.0.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let s = Server::start_with(move |cfg| {
        fast_nodes(cfg);
        cfg.server.tls_cert = c;
        cfg.server.tls_key = k;
    });
    let https = s.url.replace("http://", "https://");
    let trusting = |roots: Option<&str>| -> ureq::Agent {
        let mut b = ureq::Agent::config_builder().http_status_as_error(false);
        if let Some(pem) = roots {
            let c = ureq::tls::Certificate::from_pem(pem.as_bytes()).unwrap();
            b = b.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&[c]))
                    .build(),
            );
        }
        b.build().into()
    };
    let pem = ck.cert.pem();
    let ok = trusting(Some(&pem))
        .get(&format!("{https}/healthz"))
        .call()
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    // It is that certificate: with only the public roots it is not trusted.
    let err = trusting(None)
        .get(&format!("{https}/healthz"))
        .call()
        .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    // A login over TLS gets Secure cookies; over plain HTTP it does not.
    let login = |agent: ureq::Agent, base: &str| -> Vec<String> {
        let resp = agent
            .post(&format!("{base}/api/v1/login"))
            .header("content-type", "application/json")
            .send(json!({"username": "admin", "password": "correct horse battery"}).to_string())
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };
    let secure = login(trusting(Some(&pem)), &https);
    assert!(
        secure.len() == 2 && secure.iter().all(|c| c.ends_with("; Secure")),
        "{secure:?}"
    );
    let plain = login(http(), &s.url);
    assert!(
        plain.len() == 2 && plain.iter().all(|c| !c.contains("Secure")),
        "{plain:?}"
    );
    // Agents ask for the cluster's name and get the cluster certificate: they still join.
    let _a = Agent::join(&s, "tls-node", &[]);
    wait_node(&s, "tls-node", "ready", Duration::from_secs(10));
    // The CLI on https://, trusting the operator's certificate through MUSTER_CA_FILE.
    let cli = |ca: Option<&std::path::Path>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_muster"));
        c.args(["nodes", "ls", "--json"])
            .env("MUSTER_URL", &https)
            .env("MUSTER_TOKEN", &s.token)
            .env("HOME", &files.0)
            .env_remove("MUSTER_CA_FILE");
        if let Some(p) = ca {
            c.env("MUSTER_CA_FILE", p);
        }
        c.output().unwrap()
    };
    let out = cli(Some(&cert));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tls-node"));
    let out = cli(None);
    assert!(!out.status.success());
    let out = cli(Some(&key));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds no certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn agents_and_servers_of_other_protocol_versions_refuse_each_other_saying_why() {
    use muster_wire::protocol::{FromAgent, ToAgent, PROTOCOL_VERSION};
    let s = Server::start_bare(|_| {});
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A newer agent: the server says goodbye with the fix, and registers nothing.
    let reason = rt.block_on(async {
        let (tx, mut rx) = (s.app.local_link())().await.unwrap();
        tx.send(FromAgent::Hello {
            protocol: PROTOCOL_VERSION + 1,
            name: "future".into(),
            node_id: None,
            slots: 1,
            labels: Default::default(),
            version: "99.0.0".into(),
            known: vec![],
            seq: 1,
            log_endpoint: None,
            processes: vec![],
        })
        .unwrap();
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(ToAgent::Goodbye { reason })) => reason,
            other => panic!("expected a goodbye, got {other:?}"),
        }
    });
    assert!(reason.contains("upgrade the server"), "{reason}");
    let (st, nodes) = s.call("GET", "/api/v1/nodes", None);
    assert_eq!(st, 200);
    assert!(!nodes.to_string().contains("future"), "{nodes}");
    // An agent that hears a server too old for it stops, saying so.
    let dir = TempDir::new("old-server");
    let link: muster_wire::protocol::Link = std::sync::Arc::new(|| {
        Box::pin(async {
            let (to_server, mut from_agent) = tokio::sync::mpsc::unbounded_channel();
            let (to_agent, from_server) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                if let Some(FromAgent::Hello { .. }) = from_agent.recv().await {
                    let _ = to_agent.send(ToAgent::Welcome {
                        node_id: "n".into(),
                        epoch: 1,
                        protocol: 0,
                    });
                }
                // Keep the connection open: the agent must leave on its own.
                while from_agent.recv().await.is_some() {}
            });
            Ok((to_server, from_server))
        })
    });
    let opts = muster_agent::AgentOptions {
        dir: dir.0.join("agent"),
        name: "n".into(),
        slots: 1,
        labels: Default::default(),
        exe: env!("CARGO_BIN_EXE_muster").into(),
        heartbeat: Duration::from_secs(1),
        retention: Duration::from_secs(60),
        lost_after: Duration::from_secs(30),
        log_endpoint: None,
        run_as: None,
        cgroups: true,
        port_range: (20000, 29999),
        process_log_max: 1 << 20,
        process_log_keep: 1,
        stop_processes: false,
    };
    let res = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            muster_agent::run(opts, link, std::future::pending()),
        )
        .await
    });
    let err = res.expect("the agent stopped").unwrap_err().to_string();
    assert!(err.contains("upgrade the server"), "{err}");
}

/// A follow that survives the agent's restart mid-job (SIGKILL, started again): it ends only at
/// the job's end, with every line of the log once — through the agent's log endpoint and
/// relayed over its connection.
#[test]
fn a_followed_log_survives_an_agent_restart_with_every_line_once() {
    for (name, env) in [
        ("restart-ep", vec![]),
        ("restart-relay", vec![("MUSTER_AGENT__LISTEN", "")]),
    ] {
        let s = Server::start_with(fast_nodes);
        let mut a = Agent::join_with(&s, name, &env);
        wait_node(&s, name, "ready", Duration::from_secs(10));
        let gates: Vec<_> = (1..=2).map(|i| s.dir.0.join(format!("gate{i}"))).collect();
        let wait =
            |g: &std::path::Path| format!("while [ ! -e {} ]; do sleep 0.02; done", g.display());
        let (id, body) = s.create(json!({"name": "chatty", "node": name, "shell": format!(
            "for i in $(seq 1 200); do echo before-$i; done; {}; for i in $(seq 1 200); do echo during-$i; done; {}; for i in $(seq 1 200); do echo after-$i; done",
            wait(&gates[0]), wait(&gates[1])
        )}));
        let job = body["jobs"][0]["id"].as_str().unwrap().to_string();
        let resp = http()
            .get(&format!("{}/api/v1/jobs/{job}/log?follow=true", s.url))
            .header("authorization", &format!("Bearer {}", s.token))
            .call()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for l in BufReader::new(resp.into_body().into_reader()).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let upto = |what: &str| {
            let mut got = Vec::new();
            loop {
                let l = lines
                    .recv_timeout(Duration::from_secs(20))
                    .unwrap_or_else(|e| panic!("{name}: no {what} ({e}) after {got:?}"));
                let done = l.ends_with(what);
                got.push(l);
                if done {
                    return got;
                }
            }
        };
        let mut all = upto(" out before-200");
        // The agent dies and comes back while the job runs on under its supervisor.
        a.kill9();
        a.start(None, &[]);
        wait_node(&s, name, "ready", Duration::from_secs(20));
        std::fs::write(&gates[0], b"").unwrap();
        all.extend(upto(" out during-200"));
        std::fs::write(&gates[1], b"").unwrap();
        // The follow ends with the job, and not before.
        loop {
            match lines.recv_timeout(Duration::from_secs(30)) {
                Ok(l) => all.push(l),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(e) => panic!("{name}: the follow did not end ({e})"),
            }
        }
        assert_eq!(
            s.wait_tree(&id, Duration::from_secs(20))["state"],
            "succeeded"
        );
        let stored: Vec<String> = s.log(&job).lines().map(str::to_string).collect();
        assert_eq!(
            all, stored,
            "{name}: the followed lines are the log, each once"
        );
        let outs = all.iter().filter(|l| l.contains(" out ")).count();
        assert_eq!(outs, 600, "{name}");
    }
}
