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
