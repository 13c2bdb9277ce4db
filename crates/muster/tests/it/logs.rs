//! Logs and live feeds: typed lines, live follow over HTTP and websocket, the cap, the event
//! feed, retention.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::time::Duration;
use tungstenite::client::IntoClientRequest;

#[test]
fn logs_are_typed_lines_and_follow_is_live() {
    let s = Server::start();
    let go = s.dir.0.join("go");
    let (id, _) = s.create(json!({"name": "talker", "shell": format!("echo first; echo oops >&2; while [ ! -e {} ]; do sleep 0.02; done; echo second", go.display())}));
    let url = format!("{}/api/v1/jobs/{id}/log?follow=true", s.url);
    let resp = http()
        .get(&url)
        .header("authorization", &format!("Bearer {}", s.token))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut lines = Vec::new();
    // The first line arrives while the job still runs (it waits for `go`).
    loop {
        let mut l = String::new();
        assert!(
            reader.read_line(&mut l).unwrap() > 0,
            "stream ended early: {lines:?}"
        );
        lines.push(l.trim_end().to_string());
        if l.contains(" out first") {
            break;
        }
    }
    assert_eq!(s.job(&id)["state"], "running");
    std::fs::write(&go, b"").unwrap();
    for l in reader.lines() {
        lines.push(l.unwrap());
    }
    let kinds: Vec<&str> = lines
        .iter()
        .map(|l| l.split(' ').nth(1).unwrap_or(""))
        .collect();
    assert!(
        lines.iter().any(|l| l.ends_with(" out second")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.ends_with(" err oops")), "{lines:?}");
    assert!(
        lines.last().unwrap().contains(" sys exited with code 0"),
        "{lines:?}"
    );
    assert!(
        kinds.iter().all(|k| ["out", "err", "sys"].contains(k)),
        "{kinds:?}"
    );
    for l in &lines {
        assert!(
            muster_core::Ts::parse(l.split(' ').next().unwrap()).is_some(),
            "untimed line {l:?}"
        );
    }
    // After the end the uploaded log is served whole.
    s.wait_tree(&id, Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(5), || s
        .app
        .store
        .log_blob(id.parse().unwrap(), 1)
        .unwrap()
        .is_some()));
    let stored = s.log(&id);
    assert_eq!(stored.lines().count(), lines.len(), "{stored}");
}

fn ws_connect(
    s: &Server,
    path: &str,
) -> tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>> {
    let url = format!("{}{}", s.url.replace("http://", "ws://"), path);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", s.token).parse().unwrap(),
    );
    let (ws, _) = tungstenite::connect(req).unwrap();
    ws
}

#[test]
fn log_websocket_and_event_feed() {
    let s = Server::start();
    let mut events = ws_connect(&s, "/api/v1/events/ws");
    let go = s.dir.0.join("go");
    let (id, _) = s.create(json!({"name": "ws", "shell": format!("echo hello-ws; while [ ! -e {} ]; do sleep 0.02; done; echo bye-ws", go.display())}));
    let mut log = ws_connect(&s, &format!("/api/v1/jobs/{id}/log/ws"));
    let mut text = String::new();
    while !text.contains("hello-ws") {
        match log.read().unwrap() {
            tungstenite::Message::Text(t) => text.push_str(&t),
            other => panic!("unexpected {other:?}"),
        }
    }
    std::fs::write(&go, b"").unwrap();
    loop {
        match log.read() {
            Ok(tungstenite::Message::Text(t)) => text.push_str(&t),
            Ok(tungstenite::Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    assert!(
        text.contains("bye-ws") && text.contains("sys exited with code 0"),
        "{text}"
    );
    // The event feed saw the job run and the tree end.
    let mut seen = Vec::new();
    loop {
        let msg = events.read().unwrap();
        let tungstenite::Message::Text(t) = msg else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        seen.push(format!(
            "{} {}",
            v["type"].as_str().unwrap(),
            v["state"].as_str().unwrap()
        ));
        if v["type"] == "tree" && v["id"] == id.as_str() {
            break;
        }
    }
    assert!(
        seen.contains(&"job running".to_string()) && seen.contains(&"job succeeded".to_string()),
        "{seen:?}"
    );
    assert_eq!(seen.last().unwrap(), "tree succeeded");
}

#[test]
fn logs_are_capped_with_a_note() {
    let s = Server::start_with(|c| c.jobs.log_max = 4096);
    let (id, _) = s.create(json!({"name": "chatty", "shell": "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done"}));
    let t = s.wait_tree(&id, Duration::from_secs(20));
    assert_eq!(t["tree_state"], "succeeded");
    let log = s.log(&id);
    assert!(log.len() < 4096 + 200, "{} bytes", log.len());
    assert!(log.contains("log capped at 4096 bytes"), "{log}");
    assert!(!log.contains("line-1999"));
}

#[test]
fn retention_removes_old_trees_and_their_logs() {
    let s = Server::start_with(|c| c.jobs.retention = Duration::from_millis(1));
    let (id, _) = s.create(json!({"name": "old", "shell": "echo bygone"}));
    s.wait_tree(&id, Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(5), || s
        .app
        .store
        .log_blob(id.parse().unwrap(), 1)
        .unwrap()
        .is_some()));
    let blob = s
        .app
        .store
        .log_blob(id.parse().unwrap(), 1)
        .unwrap()
        .unwrap();
    // Retention is 1 ms: the next passes of the reaper remove the tree.
    let mut reaped = 0;
    assert!(wait_until(Duration::from_secs(5), || {
        reaped += muster_server::reap_once(&s.app);
        reaped >= 1
    }));
    assert_eq!(reaped, 1);
    assert_eq!(s.call("GET", &format!("/api/v1/jobs/{id}"), None).0, 404);
    assert!(s.app.blobs.get(&blob).is_err(), "the log blob is gone");
    // The agent's copy goes too once acknowledged and past retention.
    let removed = muster_agent::sweep(&s.dir.0.join("agent"), Duration::from_millis(1));
    assert_eq!(removed, 1);
}

/// A GET of a log with a query; gives the status, the X-Log-Offset and X-Log-Size headers and
/// the body.
fn log_part(s: &Server, id: &str, query: &str) -> (u16, Option<u64>, Option<u64>, String) {
    let mut resp = http()
        .get(&format!("{}/api/v1/jobs/{id}/log?{query}", s.url))
        .header("authorization", &format!("Bearer {}", s.token))
        .call()
        .unwrap();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    let (offset, size) = (header("x-log-offset"), header("x-log-size"));
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap();
    (status, offset, size, body)
}

#[test]
fn a_log_is_read_by_parts_from_its_end_or_an_offset() {
    let s = Server::start();
    // While it runs (the live log, from the node) ...
    let go = s.dir.0.join("go");
    let (id, _) = s.create(json!({"name": "parts", "shell": format!(
        "seq 1 3000; while [ ! -e {} ]; do sleep 0.02; done; echo last-line", go.display())}));
    let mut part = (0, None, None, String::new());
    assert!(wait_until(Duration::from_secs(20), || {
        part = log_part(&s, &id, "tail=200");
        part.3.contains(" out 3000\n")
    }));
    let (st, offset, size, body) = part;
    assert_eq!(st, 200);
    assert_eq!(body.len(), 200);
    assert_eq!(offset.unwrap() + 200, size.unwrap());
    assert_eq!(s.job(&id)["state"], "running");
    // ... and once it has ended (the stored log).
    std::fs::write(&go, b"").unwrap();
    s.wait_tree(&id, Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(5), || s
        .app
        .store
        .log_blob(id.parse().unwrap(), 1)
        .unwrap()
        .is_some()));
    let whole = s.log(&id);
    let n = whole.len() as u64;
    let (st, offset, size, body) = log_part(&s, &id, "tail=100");
    assert_eq!((st, offset, size), (200, Some(n - 100), Some(n)));
    assert_eq!(body, whole[whole.len() - 100..]);
    assert!(body.contains("out last-line"), "{body}");
    let (_, offset, _, body) = log_part(&s, &id, "offset=10&limit=25");
    assert_eq!((offset, body.as_str()), (Some(10), &whole[10..35]));
    let (_, offset, _, body) = log_part(&s, &id, "offset=40");
    assert_eq!((offset, body.as_str()), (Some(40), &whole[40..]));
    let (_, _, _, body) = log_part(&s, &id, &format!("tail={}", n * 2));
    assert_eq!(body, whole);
    let (st, offset, size, body) = log_part(&s, &id, &format!("offset={}&attempt=1", n + 5));
    assert_eq!(
        (st, offset, size, body.as_str()),
        (200, Some(n), Some(n), "")
    );

    // Nonsense is refused, briefly, without the input.
    for q in [
        "tail=0",
        "limit=0",
        "tail=5&offset=1",
        "tail=5&limit=1",
        "tail=5&follow=true",
        "tail=-1",
        "tail=lots-and-lots",
        "offset=1e9",
    ] {
        let (st, _, _, body) = log_part(&s, &id, q);
        assert_eq!(st, 400, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{q}: {body}"));
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.len() < 200 && !m.contains("lots-and-lots"), "{q}: {m}");
    }
    // The websocket follows whole logs only.
    let url = format!(
        "{}/api/v1/jobs/{id}/log/ws?tail=10",
        s.url.replace("http://", "ws://")
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", s.token).parse().unwrap(),
    );
    match tungstenite::connect(req) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 400),
        other => panic!(
            "the websocket took a part of a log: {:?}",
            other.map(|_| ())
        ),
    }
}
