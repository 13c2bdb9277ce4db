//! The Redis store under a real server (SPEC §3, issue 5 in part): a server on `redis://`, the
//! store going away and coming back with nothing lost, and `muster store migrate`.

use crate::harness::*;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

#[test]
fn a_server_on_redis_rides_out_a_redis_outage() {
    let mut redis = Redis::start();
    let url = redis.url();
    let remote = redis.hq_remote();
    let s = Server::start_with(|c| {
        c.store.url = url.clone();
        c.hq.remote = remote.clone();
        c.hq.remote = remote.clone();
    });
    let (id, _) = s.create(json!({"name": "before", "shell": "echo ok"}));
    assert_eq!(
        s.wait_tree(&id, Duration::from_secs(10))["tree_state"],
        "succeeded"
    );
    // A tree whose job runs through the outage.
    let gate = s.dir.0.join("gate");
    let (long, _) = s.create(json!({"name": "through", "shell": format!("while [ ! -e {} ]; do sleep 0.02; done; echo done", gate.display())}));
    assert!(wait_until(Duration::from_secs(10), || s.job(&long)
        ["state"]
        == "running"));
    redis.stop();
    // Writes get 503 with a clear error; health stays up; readiness goes down.
    let (st, body) = s.call(
        "POST",
        "/api/v1/jobs",
        Some(json!({"name": "during", "noop": true})),
    );
    assert_eq!(
        (st, body["error"]["message"].as_str()),
        (503, Some("store unavailable")),
        "{body}"
    );
    assert_eq!(s.call_as(None, "GET", "/healthz", None, &[]).0, 200);
    assert!(wait_until(Duration::from_secs(5), || s
        .call_as(None, "GET", "/readyz", None, &[])
        .0
        == 503));
    // The job ends while Redis is down: the agent keeps the report until it can be stored.
    std::fs::write(&gate, b"").unwrap();
    let agent_dir = s.dir.0.join("agent");
    assert!(
        wait_until(Duration::from_secs(10), || {
            muster_agent::attempt_dirs(&agent_dir)
                .iter()
                .any(|d| d.to_string_lossy().contains(&long) && d.join("exit.json").exists())
        }),
        "the job ends while the store is down"
    );
    redis.restart();
    assert!(wait_until(Duration::from_secs(10), || s
        .call_as(None, "GET", "/readyz", None, &[])
        .0
        == 200));
    let t = s.wait_tree(&long, Duration::from_secs(15));
    assert_eq!(t["tree_state"], "succeeded", "nothing lost: {t:#}");
    assert!(s.log(&long).contains("out done"));
    let (id2, _) = s.create(json!({"name": "after", "noop": true}));
    assert_eq!(
        s.wait_tree(&id2, Duration::from_secs(10))["tree_state"],
        "succeeded"
    );
}

#[test]
fn store_migrate_moves_a_sqlite_install_to_redis() {
    let redis = Redis::start();
    let dir = TempDir::new("migrate");
    let db = format!("sqlite://{}", dir.0.join("muster.db").display());
    {
        let src = muster_store::open(&db).unwrap();
        for i in 0..30 {
            let (tree, jobs) = muster_store::conformance::fixture(
                muster_store::conformance::tags(if i % 3 == 0 { "a" } else { "b" }),
                4,
            );
            src.create_tree(&tree, &jobs, None).unwrap();
        }
        src.set_meta("cluster_name", Some("prod")).unwrap();
    }
    // The cluster CA that agents pin moves too.
    let ca = {
        let src = muster_store::open(&db).unwrap();
        muster_server::tls::load_or_create_ca(&*src)
            .unwrap()
            .fingerprint_hex()
    };
    let out = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["store", "migrate", "--from", &db, "--to", &redis.url()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("migrated 30 trees (120 jobs"), "{stdout}");
    let dst = muster_store::open(&redis.url()).unwrap();
    let filter = muster_store::TreeFilter {
        workspace: Some("a".into()),
        ..Default::default()
    };
    assert_eq!(dst.list_trees(&filter, None, 100).unwrap().len(), 10);
    assert_eq!(dst.meta("cluster_name").unwrap().as_deref(), Some("prod"));
    assert_eq!(
        muster_server::tls::load_or_create_ca(&*dst)
            .unwrap()
            .fingerprint_hex(),
        ca
    );
    // Running it again changes nothing.
    let again = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["store", "migrate", "--from", &db, "--to", &redis.url()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("30 trees were there already"));
}

#[test]
fn two_servers_one_cluster_survive_the_leader_s_death() {
    use crate::nodes::{fast_nodes, wait_node, Agent};
    use std::io::{BufRead, BufReader};
    let redis = Redis::start();
    let blobs = TempDir::new("blobs");
    let tweak = |c: &mut muster_server::config::Config| {
        c.store.url = redis.url();
        c.hq.remote = redis.hq_remote();
        c.store.blob_dir = blobs.0.display().to_string();
        c.server.lease_ttl = Duration::from_secs(1);
        fast_nodes(c);
    };
    let a = Server::start_bare(tweak);
    assert!(
        wait_until(Duration::from_secs(5), || a.app.cluster.is_leader()),
        "the first server leads"
    );
    let b = Server::start_bare(tweak);
    assert!(!b.app.cluster.is_leader());
    let _agent = Agent::join_cluster(&a, &[&b], "worker", &[]);
    wait_node(&b, "worker", "ready", Duration::from_secs(10));
    // Every server sees the cluster's events (Redis pub/sub).
    let mut events = {
        use tungstenite::client::IntoClientRequest;
        let mut req = format!("{}/api/v1/events/ws", b.url.replace("http://", "ws://"))
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", b.token).parse().unwrap(),
        );
        tungstenite::connect(req).unwrap().0
    };
    // A tree made through B (a follower) runs; its log is followed live through B.
    let work = TempDir::new("work");
    let gate = work.0.join("gate");
    let marks = work.0.join("marks");
    let (id, _) = b.create(json!({"name": "via-b", "shell": format!("echo start >> {m}; echo first-line; while [ ! -e {g} ]; do sleep 0.02; done; echo end >> {m}; echo last-line", m = marks.display(), g = gate.display())}));
    let resp = http()
        .get(&format!("{}/api/v1/jobs/{id}/log?follow=true", b.url))
        .header("authorization", &format!("Bearer {}", b.token))
        .call()
        .unwrap();
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let mut line = String::new();
    while !line.contains("first-line") {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "the follow through B ended early"
        );
    }
    assert_eq!(a.job(&id)["state"], "running", "A sees the tree B made");
    // ... and over the log websocket through B too.
    {
        use tungstenite::client::IntoClientRequest;
        let mut req = format!(
            "{}/api/v1/jobs/{id}/log/ws",
            b.url.replace("http://", "ws://")
        )
        .into_client_request()
        .unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", b.token).parse().unwrap(),
        );
        let mut ws = tungstenite::connect(req).unwrap().0;
        let mut text = String::new();
        while !text.contains("first-line") {
            match ws.read().unwrap() {
                tungstenite::Message::Text(t) => text.push_str(&t),
                tungstenite::Message::Close(_) => panic!("closed early: {text}"),
                _ => {}
            }
        }
    }
    // A process made through B: its log followed over the websocket through B (relayed
    // from the leader, where its agent is connected).
    let (st, p) = b.call(
        "POST",
        "/api/v1/processes",
        Some(json!({"name": "talker", "shell": "echo proc-line; exec sleep 30"})),
    );
    assert_eq!(st, 201, "{p}");
    let pid = p["id"].as_str().unwrap().to_string();
    {
        use tungstenite::client::IntoClientRequest;
        let mut req = format!(
            "{}/api/v1/processes/{pid}/log/ws",
            b.url.replace("http://", "ws://")
        )
        .into_client_request()
        .unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", b.token).parse().unwrap(),
        );
        // The process may not be placed yet (409 not_placed): ask again until it is.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut ws = loop {
            match tungstenite::connect(req.clone()) {
                Ok((ws, _)) => break ws,
                Err(e) => assert!(
                    std::time::Instant::now() < deadline,
                    "the process log websocket through B: {e}"
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut text = String::new();
        while !text.contains("proc-line") {
            match ws.read().unwrap() {
                tungstenite::Message::Text(t) => text.push_str(&t),
                tungstenite::Message::Close(_) => panic!("closed early: {text}"),
                _ => {}
            }
        }
    }
    assert_eq!(
        b.call("DELETE", &format!("/api/v1/processes/{pid}"), None)
            .0,
        202
    );
    let mut saw_running = false;
    while !saw_running {
        if let tungstenite::Message::Text(t) = events.read().unwrap() {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            saw_running = v["type"] == "job" && v["id"] == id.as_str() && v["state"] == "running";
        }
    }
    // An abort through B reaches the leader.
    let (other, _) = b.create(json!({"name": "to-abort", "shell": "sleep 30"}));
    assert!(wait_until(Duration::from_secs(10), || b.job(&other)
        ["state"]
        == "running"));
    assert_eq!(
        b.call("POST", &format!("/api/v1/jobs/{other}/abort"), None)
            .0,
        202
    );
    assert_eq!(
        b.wait_tree(&other, Duration::from_secs(10))["tree_state"],
        "aborted"
    );
    // A result read through B is the leader's answer (forwarded: a batch's CSV is there).
    let (st, r) = b.call("GET", &format!("/api/v1/jobs/{other}/result"), None);
    assert_eq!((st, r["state"].clone()), (200, json!("aborted")), "{r}");
    // The leader dies in the middle of the first tree: B takes over, the agent follows, and
    // the tree completes without running its job twice.
    drop(a);
    assert!(
        wait_until(Duration::from_secs(10), || b.app.cluster.is_leader()),
        "B took over the lease"
    );
    wait_node(&b, "worker", "ready", Duration::from_secs(15));
    std::fs::write(&gate, b"").unwrap();
    let t = b.wait_tree(&id, Duration::from_secs(20));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap(),
        "start\nend\n",
        "ran once"
    );
    assert!(b.log(&id).contains("last-line"));
    let (late, _) = b.create(json!({"name": "after-failover", "exec": ["true"]}));
    assert_eq!(
        b.wait_tree(&late, Duration::from_secs(10))["tree_state"],
        "succeeded"
    );
}

/// A tiny webhook receiver: collects the JSON bodies POSTed to it.
pub struct Hook {
    pub url: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Hook {
    pub fn start() -> Hook {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the head, then Content-Length bytes of body.
                let body = loop {
                    let Ok(n) = c.read(&mut chunk) else {
                        break None;
                    };
                    if n == 0 {
                        break None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(i) = text.find("\r\n\r\n") {
                        let len: usize = text[..i]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= i + 4 + len {
                            break Some(buf[i + 4..i + 4 + len].to_vec());
                        }
                    }
                };
                let _ = c.write_all(
                    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                if let Some(b) = body {
                    if let Ok(v) = serde_json::from_slice(&b) {
                        g.lock().unwrap().push(v);
                    }
                }
            }
        });
        Hook { url, got }
    }

    pub fn wait_for(&self, alert: &str) -> serde_json::Value {
        let mut found = None;
        let ok = wait_until(Duration::from_secs(15), || {
            found = self
                .got
                .lock()
                .unwrap()
                .iter()
                .find(|v| v["alert"] == alert)
                .cloned();
            found.is_some()
        });
        assert!(ok, "no {alert} alert; got {:?}", self.got.lock().unwrap());
        found.unwrap()
    }
}

#[test]
fn alerts_reach_the_webhook() {
    use crate::nodes::{fast_nodes, wait_node, Agent};
    let hook = Hook::start();
    let mut redis = Redis::start();
    let (url, hook_url) = (redis.url(), hook.url.clone());
    let remote = redis.hq_remote();
    let s = Server::start_with(|c| {
        c.store.url = url.clone();
        c.hq.remote = remote.clone();
        c.alerts.webhook_url = hook_url.clone();
        fast_nodes(c);
    });
    // A failed tree.
    let (id, _) = s.create(json!({"name": "broken", "exec": ["false"]}));
    s.wait_tree(&id, Duration::from_secs(10));
    let a = hook.wait_for("tree_failed");
    assert_eq!(
        (a["tree"].as_str(), a["name"].as_str()),
        (Some(id.as_str()), Some("broken"))
    );
    // A lost node.
    let mut agent = Agent::join(&s, "mortal", &[]);
    wait_node(&s, "mortal", "ready", Duration::from_secs(10));
    agent.kill9();
    wait_node(&s, "mortal", "lost", Duration::from_secs(15));
    assert_eq!(hook.wait_for("node_lost")["node"], "mortal");
    // The store going away and coming back.
    redis.stop();
    let down = hook.wait_for("store_unavailable");
    assert!(!down["store"].as_str().unwrap().is_empty());
    redis.restart();
    hook.wait_for("store_available");
}

#[test]
fn aborting_a_100k_job_tree_does_not_block_redis() {
    let redis = Redis::start();
    let url = redis.url();
    let remote = redis.hq_remote();
    let s = Server::start_with(|c| {
        c.store.url = url.clone();
        c.hq.remote = remote.clone();
        c.hq.remote = remote.clone();
    });
    // 99,999 jobs wait behind one that runs until told.
    let gate = s.dir.0.join("gate");
    let mut children = vec![
        json!({"name": "first", "key": "first", "shell": format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display())}),
    ];
    children.extend(
        (0..99_998).map(|i| json!({"name": format!("w{i}"), "noop": true, "needs": ["first"]})),
    );
    let (id, _) = s.create(json!({"name": "huge", "children": children}));
    let first = s.tree(&id)["children"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(wait_until(Duration::from_secs(30), || s.job(&first)
        ["state"]
        == "running"));
    // Redis's own slow log times every command it runs: none of the abort's may hold it long.
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli (redis-tools) is installed with redis-server");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // Every command goes to the slow log (threshold 0), with how many arguments it had: the
    // abort's writes must come in chunks (a few thousand arguments each), never one command over
    // the whole tree (hundreds of thousands) — a count, not a time, so a busy machine cannot
    // fool it either way. The log must hold every command of the abort: besides its scripts
    // there is one PUBLISH per aborted job's event (100,000), which a shorter log would keep
    // in place of the scripts.
    cli(&["CONFIG", "SET", "slowlog-log-slower-than", "0"]);
    cli(&["CONFIG", "SET", "slowlog-max-len", "2000000"]);
    cli(&["SLOWLOG", "RESET"]);
    let (st, body) = s.call("POST", &format!("/api/v1/jobs/{id}/abort"), None);
    assert_eq!(st, 202, "{body}");
    let t = s.wait_tree(&id, Duration::from_secs(120));
    let log = cli(&["SLOWLOG", "GET", "2000000"]);
    cli(&["CONFIG", "SET", "slowlog-log-slower-than", "10000"]);
    // redis-cli's plain output gives an entry's first 31 arguments, then `... (N more
    // arguments)`.
    let widest = log
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("... (")?
                .strip_suffix(" more arguments)")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0)
        + 31;
    let scripts = log.lines().filter(|l| l.trim() == "EVALSHA").count();
    assert!(
        widest < 20_000,
        "one Redis command had {widest} arguments during the abort"
    );
    assert!(
        scripts >= 10,
        "the abort of 100,000 jobs ran in {scripts} scripts: not in chunks"
    );
    let probe = muster_store::open(&redis.url()).unwrap();
    assert_eq!(t["tree_state"], "aborted");
    let waiting = muster_store::TreeFilter {
        state: Some(muster_core::TreeState::Running),
        ..Default::default()
    };
    assert!(probe.list_trees(&waiting, None, 10).unwrap().is_empty());
    std::fs::write(&gate, b"").unwrap();
}

/// A single-use join token redeemed at once through two stores on one Redis (two clients, as
/// two servers have): exactly one redemption succeeds, round after round; a three-use token
/// raced by eight gives exactly three. Nothing process-local serializes them: only the store's
/// compare-and-set does.
#[test]
fn a_join_token_is_spent_once_across_two_stores_on_one_redis() {
    use muster_server::nodes::{create_join_token, redeem_join_token};
    use std::sync::Barrier;
    let redis = Redis::start();
    let stores = [
        muster_store::open(&redis.url()).unwrap(),
        muster_store::open(&redis.url()).unwrap(),
    ];
    let race = |uses: u32, racers: usize| -> (usize, Vec<String>) {
        let (token, _) = create_join_token(&*stores[0], 60_000, uses, &[7; 32], "ca").unwrap();
        let barrier = Barrier::new(racers);
        let outcomes: Vec<Result<(), String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..racers)
                .map(|i| {
                    let (store, barrier, token) = (&stores[i % 2], &barrier, &token);
                    scope.spawn(move || {
                        barrier.wait();
                        redeem_join_token(&**store, token).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let wins = outcomes.iter().filter(|o| o.is_ok()).count();
        let refusals = outcomes.into_iter().filter_map(Result::err).collect();
        // Spent out: a later redemption through either store is refused, and the token's
        // document is gone.
        for s in &stores {
            assert!(redeem_join_token(&**s, &token).unwrap().is_err());
        }
        (wins, refusals)
    };
    for round in 0..20 {
        let (wins, refusals) = race(1, 8);
        assert_eq!(wins, 1, "round {round}: a single-use token is spent once");
        assert!(
            refusals.iter().all(|r| r.contains("not valid")),
            "{refusals:?}"
        );
    }
    assert_eq!(race(3, 8).0, 3, "a three-use token is spent three times");
    assert!(
        stores[0].docs("join_token", "").unwrap().is_empty(),
        "spent tokens leave nothing behind"
    );
}

/// `POST /api/v1/nodes/join` with `body` over a TLS connection to `s` made (handshake done)
/// before `go` opens, so racers released together hit the servers within microseconds, not
/// a handshake's jitter apart. Returns the status.
fn join_when(s: &Server, fingerprint: [u8; 32], body: String, go: &std::sync::Barrier) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let addr = muster_wire::pki::host_port(&s.url).unwrap();
        let mut tls = muster_wire::pki::dial(
            &addr,
            muster_wire::pki::PinnedCa::client_config(fingerprint),
            muster_wire::pki::SERVER_NAME,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let request = format!(
            "POST /api/v1/nodes/join HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        // Nothing else runs on this runtime: blocking on the barrier here is fine.
        go.wait();
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        // The server closes after the answer (connection: close); a TLS close without
        // close_notify still leaves the answer read.
        let _ = tls.read_to_end(&mut answer).await;
        let text = String::from_utf8_lossy(&answer);
        text.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {text:?}"))
    })
}

/// Two servers of one cluster (one Redis) get `POST /api/v1/nodes/join` with the same
/// single-use token at the same moment, several times each: exactly one join succeeds (201),
/// every other is refused (401), round after round.
#[test]
fn two_servers_racing_one_single_use_join_token_admit_one_node() {
    use crate::nodes::fast_nodes;
    use std::sync::Barrier;
    let redis = Redis::start();
    let blobs = TempDir::new("blobs");
    let tweak = |c: &mut muster_server::config::Config| {
        c.store.url = redis.url();
        c.hq.remote = redis.hq_remote();
        c.store.blob_dir = blobs.0.display().to_string();
        fast_nodes(c);
    };
    let a = Server::start_bare(tweak);
    let b = Server::start_bare(tweak);
    const PER_SERVER: usize = 3;
    for round in 0..10 {
        let (st, t) = a.call(
            "POST",
            "/api/v1/nodes/join-token",
            Some(json!({"uses": 1, "ttl_s": 60})),
        );
        assert_eq!(st, 201, "{t}");
        let token = t["token"].as_str().unwrap().to_string();
        let fingerprint = muster_wire::beacon::token_ca_fingerprint(&token).unwrap();
        let go = Barrier::new(2 * PER_SERVER);
        let mut statuses: Vec<u16> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2 * PER_SERVER)
                .map(|i| {
                    let s = if i % 2 == 0 { &a } else { &b };
                    let body = json!({"join_token": token, "name": format!("racer-{round}-{i}")});
                    let go = &go;
                    scope.spawn(move || join_when(s, fingerprint, body.to_string(), go))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        statuses.sort();
        let mut want = vec![201];
        want.extend([401; 2 * PER_SERVER - 1]);
        assert_eq!(statuses, want, "round {round}: one join, the rest refused");
    }
}
