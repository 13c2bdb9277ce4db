//! The API's contract: auth, bad input refused with a clear 4xx JSON error and nothing changed.

use crate::harness::*;
use serde_json::{json, Value};

fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"))
}

#[test]
fn health_and_readiness() {
    let s = Server::start();
    assert_eq!(s.call_as(None, "GET", "/healthz", None, &[]).0, 200);
    let (st, body) = s.call_as(None, "GET", "/readyz", None, &[]);
    assert_eq!((st, body["status"].as_str()), (200, Some("ready")));
}

#[test]
fn setup_is_single_use_and_login_gives_a_token() {
    let s = Server::start();
    // The code was used by the harness: a second setup is refused and creates nothing.
    let (st, body) = s.call_as(None, "POST", "/api/v1/setup", Some(json!({"setup_code": "test-setup-code", "username": "eve", "password": "correct horse battery"}).to_string()), &[]);
    assert_eq!((st, error_code(&body)), (403, "setup_refused"));
    assert!(s.app.store.user("eve").unwrap().is_none());

    let (st, body) = s.call_as(
        None,
        "POST",
        "/api/v1/login",
        Some(json!({"username": "admin", "password": "wrong password here"}).to_string()),
        &[],
    );
    assert_eq!((st, error_code(&body)), (401, "login_failed"));
    // (The failure makes the next attempt from this address wait a little: see access.rs.)
    let mut st = 0;
    let mut body = serde_json::Value::Null;
    assert!(wait_until(std::time::Duration::from_secs(5), || {
        (st, body) = s.call_as(
            None,
            "POST",
            "/api/v1/login",
            Some(json!({"username": "admin", "password": "correct horse battery"}).to_string()),
            &[],
        );
        st != 429
    }));
    assert_eq!(st, 200, "{body}");
    let token = body["token"].as_str().unwrap();
    assert!(token.starts_with("mst_") && token.len() == 68);
    let (st, _) = s.call_as(Some(token), "GET", "/api/v1/jobs", None, &[]);
    assert_eq!(st, 200);
    // Only the hash is stored.
    let stored = s.app.store.tokens(Some("admin")).unwrap();
    assert!(stored
        .iter()
        .all(|t| t.hash != token && !t.hash.contains(&token[4..])));
}

#[test]
fn routes_need_a_token() {
    let s = Server::start();
    for (m, p) in [
        ("GET", "/api/v1/jobs"),
        ("POST", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs/01a20950-5e80-763f-9abc-a0995ac9ece5"),
        ("GET", "/api/v1/events/ws"),
    ] {
        let (st, body) = s.call_as(None, m, p, None, &[]);
        assert_eq!((st, error_code(&body)), (401, "unauthorized"), "{m} {p}");
        let (st, _) = s.call_as(Some("mst_forged"), m, p, None, &[]);
        assert_eq!(st, 401, "{m} {p} with a forged token");
    }
}

#[test]
fn bad_trees_are_refused_and_change_nothing() {
    let s = Server::start();
    let deep_children: Vec<Value> = (0..100_000)
        .map(|i| json!({"name": format!("j{i}"), "noop": true}))
        .collect();
    let too_big = json!({"name": "root", "children": deep_children}).to_string();
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "invalid JSON"),
        (json!({"name": "r", "bogus": 1}).to_string(), "unknown field"),
        (json!({"name": "r", "children": [{"name": "a", "key": "a", "needs": ["b"]}, {"name": "b", "key": "b", "needs": ["a"]}]}).to_string(), "cycle"),
        (json!({"name": "r", "tags": {"workspace": "bad name!"}}).to_string(), "workspace"),
        (json!({"name": "r", "children": [{"name": "a", "key": "has space"}]}).to_string(), "job key"),
        (json!({"name": "r", "exec": ["true"], "shell": "true"}).to_string(), "at most one"),
        (json!({"name": "r", "timeout_s": "soon"}).to_string(), "invalid JSON"),
        (too_big, "at most 100000"),
    ];
    for (body, why) in cases {
        let (st, resp) = s.call_as(Some(&s.token), "POST", "/api/v1/jobs", Some(body), &[]);
        assert_eq!(st, 400, "{why}: {resp}");
        let msg = resp["error"]["message"].as_str().unwrap();
        assert!(msg.contains(why), "{why}: {msg}");
    }
    let (st, list) = s.call("GET", "/api/v1/jobs", None);
    assert_eq!(st, 200);
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        0,
        "a refused tree was stored: {list}"
    );
    // Bad query and path input.
    assert_eq!(s.call("GET", "/api/v1/jobs?limit=0", None).0, 400);
    assert_eq!(s.call("GET", "/api/v1/jobs?state=sleeping", None).0, 400);
    assert_eq!(s.call("GET", "/api/v1/jobs?cursor=garbage", None).0, 400);
    assert_eq!(s.call("GET", "/api/v1/jobs/not-a-uuid", None).0, 400);
    assert_eq!(
        s.call(
            "GET",
            "/api/v1/jobs/01a20950-5e80-763f-9abc-a0995ac9ece5",
            None
        )
        .0,
        404
    );
    assert_eq!(s.call("GET", "/api/v1/nowhere", None).0, 404);
}

#[test]
fn a_tree_of_exactly_the_limit_is_accepted() {
    let s = Server::start();
    let children: Vec<Value> = (0..99_999)
        .map(|i| json!({"name": format!("j{i}"), "noop": true}))
        .collect();
    let (id, body) = s.create(json!({"name": "root", "children": children}));
    assert_eq!(body["jobs"].as_array().unwrap().len(), 100_000);
    let t = s.wait_tree(&id, std::time::Duration::from_secs(120));
    assert_eq!(t["tree_state"], "succeeded");
}

#[test]
fn idempotency_key_returns_the_first_tree() {
    let s = Server::start();
    let tree = json!({"name": "once", "noop": true}).to_string();
    let (st1, a) = s.call_as(
        Some(&s.token),
        "POST",
        "/api/v1/jobs",
        Some(tree.clone()),
        &[("idempotency-key", "k-1")],
    );
    let (st2, b) = s.call_as(
        Some(&s.token),
        "POST",
        "/api/v1/jobs",
        Some(tree.clone()),
        &[("idempotency-key", "k-1")],
    );
    assert_eq!((st1, st2), (201, 200));
    assert_eq!(a["id"], b["id"]);
    let (_, list) = s.call("GET", "/api/v1/jobs", None);
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let (st3, c) = s.call_as(
        Some(&s.token),
        "POST",
        "/api/v1/jobs",
        Some(tree),
        &[("idempotency-key", "k-2")],
    );
    assert_eq!(st3, 201);
    assert_ne!(a["id"], c["id"]);
    // The same tree in TOML, spaced otherwise, is the same request: the first tree again.
    let (st, d) = s.call_as(
        Some(&s.token),
        "POST",
        "/api/v1/jobs",
        Some("noop = true\nname   = \"once\"\n".into()),
        &[
            ("idempotency-key", "k-1"),
            ("content-type", "application/toml"),
        ],
    );
    assert_eq!((st, &d["id"]), (200, &a["id"]), "{d}");
    // Another tree under a used key is refused, not answered with the first tree.
    let (st, e) = s.call_as(
        Some(&s.token),
        "POST",
        "/api/v1/jobs",
        Some(json!({"name": "other", "exec": ["true"]}).to_string()),
        &[("idempotency-key", "k-1")],
    );
    assert_eq!((st, error_code(&e)), (422, "idempotency_key_reused"), "{e}");
    assert!(e.get("id").is_none(), "{e}");
    let (_, list) = s.call("GET", "/api/v1/jobs", None);
    assert_eq!(list["items"].as_array().unwrap().len(), 2, "{list}");
}

/// Posts a body too big to be read whole: written from a thread of its own while the answer is
/// read (the server answers before the body has all come, and then closes). Returns the status
/// and the answer's body.
fn post_raw(s: &Server, body: String) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = s.url.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "POST /api/v1/jobs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        s.token,
        body.len()
    )
    .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        // The server may stop reading (and reset the connection) once over its limit.
        let _ = writer.write_all(body.as_bytes());
    });
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    sender.join().unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|st| st.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Posts `body` as a tree; returns the status, the error body's length and its JSON.
fn post_tree(s: &Server, body: String, content_type: &str) -> (u16, usize, Value) {
    let (st, text) = s.raw(
        Some(&s.token),
        "POST",
        "/api/v1/jobs",
        Some(body),
        &[("content-type", content_type)],
    );
    let v = serde_json::from_str(&text).unwrap_or(Value::Null);
    (st, text.len(), v)
}

#[test]
fn oversized_inputs_are_refused_with_short_errors_and_change_nothing() {
    let s = Server::start();
    let big = "x".repeat(10 << 20);
    let cases: Vec<(String, &str, u16, &str)> = vec![
        // Well under the body limit, over a job's command limit (256 KiB).
        (json!({"name": "r", "shell": big}).to_string(), "application/json", 400, "at most 262144"),
        (json!({"name": "r", "exec": ["echo", "a".repeat(100 << 10), "b".repeat(100 << 10), "c".repeat(100 << 10)]}).to_string(), "application/json", 400, "at most 262144"),
        (json!({"name": big, "noop": true}).to_string(), "application/json", 400, "job name"),
        (json!({"name": "r", "children": [{"name": "a", "key": big, "noop": true}]}).to_string(), "application/json", 400, "job key"),
        (json!({"name": "r", "children": [{"name": "a", "needs": [big], "noop": true}]}).to_string(), "application/json", 400, "no key"),
        (json!({"name": "r", "node": big, "exec": ["true"]}).to_string(), "application/json", 400, "node"),
        (json!({"name": "r", "node_selector": {big.clone(): "v"}, "exec": ["true"]}).to_string(), "application/json", 400, "node_selector"),
        (json!({"name": "r", "node_selector": {"k": big}, "exec": ["true"]}).to_string(), "application/json", 400, "node_selector"),
        (json!({"name": "r", "tags": {"workspace": big}}).to_string(), "application/json", 400, "workspace"),
        (json!({"name": "r", big.clone(): 1}).to_string(), "application/json", 400, "unknown field"),
        (json!({"name": "r", "timeout_s": big}).to_string(), "application/json", 400, "invalid JSON"),
        (format!("name = \"{big}\"\nnoop = true\n"), "application/toml", 400, "job name"),
        (format!("name = \"r\"\n{big} = 1\n"), "application/toml", 400, "TOML"),
    ];
    for (body, ct, want, why) in cases {
        let (st, len, v) = post_tree(&s, body, ct);
        assert_eq!(st, want, "{why}: {v}");
        assert!(len < 600, "{why}: an error body of {len} bytes");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(why), "{why}: {msg}");
    }
    // Over the whole body's limit (16 MiB): refused before it is parsed.
    let huge = format!(
        "{{\"name\": \"r\", \"shell\": \"{}\"}}",
        "y".repeat(20 << 20)
    );
    let (st, answer) = post_raw(&s, huge);
    assert_eq!(st, 413, "{answer}");
    assert!(
        answer.len() < 600,
        "an error body of {} bytes",
        answer.len()
    );
    let (_, list) = s.call("GET", "/api/v1/jobs", None);
    assert_eq!(list["items"].as_array().unwrap().len(), 0, "{list}");
    // Query strings too.
    let (st, text) = s.raw(
        Some(&s.token),
        "GET",
        &format!("/api/v1/jobs?state={}", "z".repeat(10_000)),
        None,
        &[],
    );
    assert_eq!(st, 400);
    assert!(text.len() < 600, "{} bytes", text.len());
}

#[test]
fn trees_that_could_never_run_are_refused_at_submit() {
    let s = Server::start();
    // The embedded node is node-1, labelled workspaces=*.
    for (tree, code) in [
        (
            json!({"name": "r", "node": "elsewhere", "exec": ["true"]}),
            "unknown_node",
        ),
        (
            json!({"name": "r", "children": [{"name": "a", "node_selector": {"type": "tpu"}, "exec": ["true"]}]}),
            "no_matching_node",
        ),
        (
            json!({"name": "r", "node_selector": {"workspaces": "*", "type": "tpu"}, "exec": ["true"]}),
            "no_matching_node",
        ),
        (
            json!({"name": "r", "tags": {"workspace": "nowhere"}, "noop": true}),
            "unknown_workspace",
        ),
    ] {
        let (st, body) = s.call("POST", "/api/v1/jobs", Some(tree.clone()));
        assert_eq!((st, error_code(&body)), (422, code), "{tree}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.len() < 200, "{msg}");
    }
    let (_, list) = s.call("GET", "/api/v1/jobs", None);
    assert_eq!(list["items"].as_array().unwrap().len(), 0, "{list}");
    // What some registered node can run is taken, by name, id or labels.
    let (_, nodes) = s.call("GET", "/api/v1/nodes", None);
    let node_id = nodes["items"][0]["id"].as_str().unwrap().to_string();
    for tree in [
        json!({"name": "by-name", "node": "node-1", "exec": ["true"]}),
        json!({"name": "by-id", "node": node_id, "exec": ["true"]}),
        json!({"name": "by-label", "node_selector": {"workspaces": "*"}, "exec": ["true"]}),
    ] {
        let (id, _) = s.create(tree);
        assert_eq!(
            s.wait_tree(&id, std::time::Duration::from_secs(20))["tree_state"],
            "succeeded"
        );
    }
}

#[test]
fn listing_filters_by_tags_and_pages_newest_first() {
    let s = Server::start();
    let mut ids = Vec::new();
    for i in 0..7 {
        let app = if i % 2 == 0 { "web" } else { "db" };
        let (id, _) = s.create(json!({"name": format!("t{i}"), "noop": true, "tags": {"workspace": "admin", "application": app, "version": format!("{i}")}}));
        ids.push(id);
    }
    for id in &ids {
        s.wait_tree(id, std::time::Duration::from_secs(10));
    }
    let (_, web) = s.call("GET", "/api/v1/jobs?application=web", None);
    let names: Vec<&str> = web["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["t6", "t4", "t2", "t0"]);
    let (_, v3) = s.call("GET", "/api/v1/jobs?version=3&state=succeeded", None);
    assert_eq!(v3["items"].as_array().unwrap().len(), 1);
    let (_, none) = s.call("GET", "/api/v1/jobs?state=failed", None);
    assert_eq!(none["items"].as_array().unwrap().len(), 0);
    let (_, on_node) = s.call("GET", "/api/v1/jobs?node=node-1", None);
    assert_eq!(on_node["items"].as_array().unwrap().len(), 7);
    // Pages of 3: 3 + 3 + 1, no repeats, newest first.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/jobs?limit=3&cursor={c}"),
            None => "/api/v1/jobs?limit=3".to_string(),
        };
        let (st, page) = s.call("GET", &path, None);
        assert_eq!(st, 200, "{page}");
        for t in page["items"].as_array().unwrap() {
            seen.push(t["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(seen, expected);
}

#[test]
fn a_tree_comes_as_json_or_toml() {
    let s = Server::start();
    let toml = "name = \"from toml\"\nshell = \"echo root\"\n[tags]\napplication = \"web\"\n\
                [[children]]\nname = \"a\"\nkey = \"a\"\nshell = \"echo a\"\ntimeout_s = 9\n\
                [[children]]\nname = \"b\"\nkey = \"b\"\nexec = [\"true\"]\nneeds = [\"a\"]\n";
    let (st, body) = s.call_as(
        Some(&s.token),
        "POST",
        "/api/v1/jobs",
        Some(toml.to_string()),
        &[("content-type", "application/toml")],
    );
    assert_eq!(st, 201, "{body}");
    let id = body["id"].as_str().unwrap();
    let t = s.wait_tree(id, std::time::Duration::from_secs(20));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    assert_eq!(t["tags"]["application"], "web");
    assert_eq!(t["children"][0]["timeout_s"], 9);
    assert_eq!(t["children"][1]["needs"], json!([t["children"][0]["id"]]));

    // Mistakes: where, and what, without the text sent.
    for (text, want) in [
        (
            "name = \"x\"\nsecret-value-123 = = 1\n",
            "invalid TOML body at line 2, column",
        ),
        ("name = \"x\"\nbogus = 1\n", "unknown field"),
        ("shell = \"no name\"\n", "missing field `name`"),
    ] {
        let before = s
            .app
            .store
            .list_trees(&Default::default(), None, 100)
            .unwrap()
            .len();
        let (st, body) = s.call_as(
            Some(&s.token),
            "POST",
            "/api/v1/jobs",
            Some(text.to_string()),
            &[("content-type", "application/toml; charset=utf-8")],
        );
        assert_eq!(
            (st, error_code(&body)),
            (400, "bad_request"),
            "{text}: {body}"
        );
        let m = body["error"]["message"].as_str().unwrap();
        assert!(m.contains(want), "{text}: {m}");
        assert!(!m.contains("secret-value-123") && !m.contains('\n'), "{m}");
        let after = s
            .app
            .store
            .list_trees(&Default::default(), None, 100)
            .unwrap()
            .len();
        assert_eq!(before, after, "a refused tree was stored");
    }
    let (st, _) = s.call_as(
        Some(&s.token),
        "POST",
        "/api/v1/jobs",
        Some("name: x".into()),
        &[("content-type", "text/yaml")],
    );
    assert_eq!(st, 415);
}
