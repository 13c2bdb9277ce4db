//! Models end to end (SPEC §8): a real scikit-learn iris bundle uploaded as a `.tar.gz`,
//! deployed as a job tree (its environment from muster-models' test cache, kept between runs),
//! its predictors started as real processes by the embedded agent, predict through the server;
//! a redeploy under a steady load, a broken version, bad bundles.

use crate::model_support as models;

use crate::cluster::Hook;
use crate::harness::Server;
use crate::support::{http, wait_until};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A server whose nodes build model environments in the test cache.
fn server(hook: Option<&Hook>) -> Server {
    let cache = models::cache();
    let hook_url = hook.map(|h| h.url.clone());
    Server::start_with(move |c| {
        c.models.envs_dir = cache.join("envs").to_string_lossy().into_owned();
        c.models.wheels_dir = cache.join("wheels").to_string_lossy().into_owned();
        c.models.predictor_host = "127.0.0.1".into();
        c.models.drain_timeout = Duration::from_secs(10);
        c.hq.max_file_size = 256;
        if let Some(u) = hook_url {
            c.alerts.webhook_url = u;
        }
    })
}

fn pack(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    muster_models::archive::pack(dir, &mut out).unwrap();
    out
}

/// Uploads a bundle archive; returns the status and body.
fn upload(s: &Server, ws: &str, name: &str, archive: Vec<u8>) -> (u16, Value) {
    let req = ureq::http::Request::builder()
        .method("POST")
        .uri(format!("{}/api/v1/models/{ws}/{name}", s.url))
        .header("authorization", format!("Bearer {}", s.token))
        .header("content-type", "application/gzip")
        .body(archive)
        .unwrap();
    let mut resp = http().run(req).unwrap();
    let st = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (st, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Deploys `dir` and waits for its tree; returns the version and the ended tree.
fn deploy(s: &Server, dir: &Path) -> (u64, Value) {
    let (st, body) = upload(s, "admin", "Iris", pack(dir));
    assert_eq!(st, 202, "{body}");
    let tree = body["tree"].as_str().unwrap().to_string();
    let t = s.wait_tree(&tree, Duration::from_secs(600));
    (body["version"].as_u64().unwrap(), t)
}

/// The logs of every step of a deploy tree, for a failure's message.
fn step_logs(s: &Server, tree: &Value) -> String {
    let mut out = String::new();
    for c in tree["children"].as_array().into_iter().flatten() {
        let id = c["id"].as_str().unwrap_or_default();
        out.push_str(&format!(
            "--- {} ({})\n{}\n",
            c["key"],
            c["state"],
            s.log(id)
        ));
    }
    out
}

fn predict(s: &Server, query: &str, data: Value) -> (u16, Value) {
    s.call(
        "POST",
        &format!("/api/v1/models/admin/Iris/predict{query}"),
        Some(json!({ "data": data })),
    )
}

fn model(s: &Server) -> Value {
    let (st, m) = s.call("GET", "/api/v1/models/admin/Iris", None);
    assert_eq!(st, 200, "{m}");
    m
}

fn version(m: &Value, n: u64) -> &Value {
    m["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"].as_u64() == Some(n))
        .unwrap_or_else(|| panic!("no version {n}: {m:#}"))
}

/// The processes whose parent is `pid`.
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out.sort();
    out
}

fn process_state(s: &Server, id: &Value) -> String {
    let (_, p) = s.call(
        "GET",
        &format!("/api/v1/processes/{}", id.as_str().unwrap()),
        None,
    );
    p["state"].as_str().unwrap_or_default().to_string()
}

#[test]
fn an_iris_bundle_deploys_serves_and_is_replaced_under_load_with_no_failed_call() {
    let env = models::sklearn_env();
    let hook = Hook::start();
    let s = server(Some(&hook));
    let dir = models::Scratch::new("deploy-v1");
    models::iris_bundle(dir.path(), &env);

    // v1: the tree's six steps, then predict through the server.
    let (v1, tree) = deploy(&s, dir.path());
    assert_eq!(v1, 1);
    assert_eq!(tree["tree_state"], "succeeded", "{}", step_logs(&s, &tree));
    let keys: Vec<&str> = tree["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["prepare", "start", "health", "switch", "drain", "stop"]
    );
    let prepare = s.log(
        crate::harness::child(&tree, "prepare admin/Iris v1")["id"]
            .as_str()
            .unwrap_or_default(),
    );
    assert!(prepare.contains("environment"), "{prepare}");
    let m = model(&s);
    assert_eq!(m["live"], 1, "{m:#}");
    assert_eq!(version(&m, 1)["state"], "live");
    let (st, out) = predict(&s, "", json!([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]));
    assert_eq!((st, out), (200, json!({"result": [0, 2], "version": 1})));
    // A model error is the predictor's 422, type and message, no traceback.
    let (st, out) = predict(
        &s,
        "",
        json!({"test": "raise", "message": "petal too long"}),
    );
    assert_eq!(st, 422, "{out}");
    assert_eq!(out["error"]["exception"]["type"], "ValueError");
    // The replica's figures.
    let m = model(&s);
    let r = &m["replicas"][0];
    assert_eq!(
        (r["version"].clone(), r["state"].clone()),
        (json!(1), json!("healthy")),
        "{m:#}"
    );
    assert!(r["requests"].as_u64().unwrap() >= 2, "{m:#}");
    assert!(r["p50_ms"].as_f64().is_some(), "{m:#}");

    // /metrics: calls by model, version and status; the latency; replicas by state.
    let (st, metrics) = s.raw(Some(&s.token), "GET", "/metrics", None, &[]);
    assert_eq!(st, 200);
    for line in [
        "muster_predict_requests_total{model=\"admin/Iris\",version=\"1\",status=\"200\"} 1",
        "muster_predict_requests_total{model=\"admin/Iris\",version=\"1\",status=\"422\"} 1",
        "muster_predict_duration_seconds_count{model=\"admin/Iris\",version=\"1\"} 2",
        "muster_predict_inflight{model=\"admin/Iris\"} 0",
        "muster_model_replicas{model=\"admin/Iris\",state=\"healthy\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }

    // HQ holds what runs: bundle.json as is, the pickle as a pointer to the blob store.
    let hq = s.dir.0.join("hq/admin/models/Iris");
    assert_eq!(
        std::fs::read(hq.join("bundle.json")).unwrap(),
        std::fs::read(dir.path().join("bundle.json")).unwrap()
    );
    let pointer = std::fs::read_to_string(hq.join("model.pkl")).unwrap();
    assert!(pointer.starts_with("muster-blob v1\nsha256 "), "{pointer}");
    let log = crate::support::git(&s.dir.0.join("hq"), &["log", "-1", "--format=%an %s"]);
    assert_eq!(log, "admin models: admin/Iris version 1 deployed by admin");

    // v2 (other code, same requirements: the same environment) under a steady load.
    std::fs::write(
        dir.path().join("model.py"),
        std::fs::read_to_string(dir.path().join("model.py")).unwrap() + "\n# v2\n",
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let url = s.url.clone();
    let token = s.token.clone();
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, url, token) = (stop.clone(), url.clone(), token.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let req = ureq::http::Request::builder()
                        .method("POST")
                        .uri(format!("{url}/api/v1/models/admin/Iris/predict"))
                        .header("authorization", format!("Bearer {token}"))
                        .header("content-type", "application/json")
                        .body(r#"{"data": [[5.1, 3.5, 1.4, 0.2]]}"#.to_string())
                        .unwrap();
                    let mut resp = http().run(req).unwrap();
                    let st = resp.status().as_u16();
                    let v: Value =
                        serde_json::from_str(&resp.body_mut().read_to_string().unwrap_or_default())
                            .unwrap_or(Value::Null);
                    seen.push((st, v["version"].as_u64(), v));
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // A Python worker of v1's replica killed -9 under the load: replaced, its call retried on
    // the other worker, no call lost.
    let replica_pid = {
        let id = version(&model(&s), 1)["processes"][0]
            .as_str()
            .unwrap()
            .to_string();
        let (_, p) = s.call("GET", &format!("/api/v1/processes/{id}"), None);
        p["pid"].as_i64().unwrap() as i32
    };
    let workers = children(replica_pid);
    assert_eq!(workers.len(), 2, "the replica's workers: {workers:?}");
    // SAFETY: a signal to a process this test's server started.
    unsafe { libc::kill(workers[0], libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(30), || {
        let now = children(replica_pid);
        now.len() == 2 && !now.contains(&workers[0])
    }));
    std::thread::sleep(Duration::from_millis(300));
    let (v2, tree) = deploy(&s, dir.path());
    assert_eq!(v2, 2);
    assert_eq!(tree["tree_state"], "succeeded", "{}", step_logs(&s, &tree));
    let prepare = s.log(
        crate::harness::child(&tree, "prepare admin/Iris v2")["id"]
            .as_str()
            .unwrap_or_default(),
    );
    assert!(prepare.contains("reused"), "{prepare}");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for t in load {
        let seen = t.join().unwrap();
        total += seen.len();
        let failed: Vec<_> = seen.iter().filter(|(st, _, _)| *st != 200).collect();
        assert!(
            failed.is_empty(),
            "failed calls during the redeploy: {failed:?}"
        );
        // Each client's answers go from v1 to v2 and never back.
        let versions: Vec<u64> = seen.iter().map(|(_, v, _)| v.unwrap()).collect();
        let first_v2 = versions.iter().position(|v| *v == 2).expect("v2 answered");
        assert!(versions[first_v2..].iter().all(|v| *v == 2), "{versions:?}");
        assert!(seen.iter().all(|(_, _, v)| v["result"] == json!([0])));
    }
    assert!(total > 20, "the load made only {total} calls");
    let m = model(&s);
    assert_eq!(m["live"], 2, "{m:#}");
    assert_eq!(version(&m, 1)["state"], "stopped");
    for id in version(&m, 1)["processes"].as_array().unwrap() {
        assert_eq!(process_state(&s, id), "stopped");
    }
    // The kept version is not running: ?version=1 says so.
    let (st, out) = predict(&s, "?version=1", json!([[5.1, 3.5, 1.4, 0.2]]));
    assert_eq!(st, 404, "{out}");

    // v3 cannot import: its deploy fails at start, v2 keeps serving, an alert goes out.
    std::fs::write(dir.path().join("model.py"), "import no_such_module\n\nclass IrisModel:\n    def execute(self, data):\n        return data\n").unwrap();
    let (v3, tree) = deploy(&s, dir.path());
    assert_eq!(v3, 3);
    assert_eq!(tree["tree_state"], "failed", "{tree:#}");
    let m = model(&s);
    assert_eq!(m["live"], 2, "{m:#}");
    let v = version(&m, 3);
    assert_eq!(v["state"], "failed", "{m:#}");
    assert!(v["error"].as_str().unwrap().starts_with("start: "), "{v:#}");
    for id in v["processes"].as_array().unwrap() {
        assert!(wait_until(Duration::from_secs(30), || process_state(
            &s, id
        ) == "stopped"));
    }
    let alert = hook.wait_for("deploy_failed");
    assert_eq!(
        (alert["model"].clone(), alert["version"].clone()),
        (json!("Iris"), json!(3))
    );
    let (st, out) = predict(&s, "", json!([[6.7, 3.0, 5.2, 2.3]]));
    assert_eq!((st, out), (200, json!({"result": [2], "version": 2})));
    // Clean up the predictors (they outlive nothing: the harness ends the supervisors too).
    for v in m["versions"].as_array().unwrap() {
        for id in v["processes"].as_array().unwrap() {
            s.call(
                "DELETE",
                &format!("/api/v1/processes/{}", id.as_str().unwrap()),
                None,
            );
        }
    }
}

#[test]
fn bad_bundles_and_bad_calls_are_refused_clearly() {
    let s = server(None);
    let dir = models::Scratch::new("bad-bundles");
    let write = |files: &[(&str, &str)]| {
        let d = dir.path().join(muster_core::Uuid::now_v7().to_string());
        std::fs::create_dir_all(&d).unwrap();
        for (f, text) in files {
            std::fs::write(d.join(f), text).unwrap();
        }
        d
    };
    let model_py = "class IrisModel:\n    def execute(self, data):\n        return data\n";
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not an archive".to_vec(), "archive"),
        (
            pack(&write(&[
                (
                    "bundle.json",
                    r#"{"name": "Iris", "runtime": "cobol", "entrypoint": "model.py:IrisModel"}"#,
                ),
                ("model.py", model_py),
            ])),
            "runtime",
        ),
        (
            pack(&write(&[
                (
                    "bundle.json",
                    r#"{"name": "Iris", "runtime": "python", "entrypoint": "model.py:Nope"}"#,
                ),
                ("model.py", model_py),
            ])),
            "Nope",
        ),
        (
            pack(&write(&[
                (
                    "bundle.json",
                    r#"{"name": "Other", "runtime": "python", "entrypoint": "model.py:IrisModel"}"#,
                ),
                ("model.py", model_py),
            ])),
            "Other",
        ),
        (
            pack(&write(&[
                (
                    "bundle.json",
                    r#"{"name": "Iris", "runtime": "python", "entrypoint": "model.py:IrisModel", "colour": 1}"#,
                ),
                ("model.py", model_py),
            ])),
            "unknown key",
        ),
    ];
    for (archive, says) in cases {
        let (st, body) = upload(&s, "admin", "Iris", archive);
        assert_eq!(st, 422, "{says}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{says}: {msg}");
    }
    // Nothing was made of them.
    let (st, _) = s.call("GET", "/api/v1/models/admin/Iris", None);
    assert_eq!(st, 404);
    let (_, list) = s.call("GET", "/api/v1/models", None);
    assert_eq!(list["items"], json!([]));
    // Revert and delete of a model that does not exist: 404, not a store error.
    let (st, body) = s.call("DELETE", "/api/v1/models/admin/Iris", None);
    assert_eq!(st, 404, "{body}");
    let (st, body) = s.call(
        "POST",
        "/api/v1/models/admin/Iris/revert",
        Some(json!({"version": 1})),
    );
    assert_eq!(st, 404, "{body}");
    let (st, _) = upload(
        &s,
        "nowhere",
        "Iris",
        pack(&write(&[("bundle.json", "{}")])),
    );
    assert_eq!(st, 404);
    let (st, body) = predict(&s, "", json!([[1, 2, 3, 4]]));
    assert_eq!(st, 404, "{body}");
    let (st, body) = s.call_as(
        Some(&s.token),
        "POST",
        "/api/v1/models/admin/Iris/predict",
        Some("[1, 2]".into()),
        &[],
    );
    assert_eq!(st, 400, "{body}");
    // A token without predict (or operate) scope may not call predict.
    let (st, t) = s.call(
        "POST",
        "/api/v1/tokens",
        Some(json!({"name": "reader", "scopes": ["read"]})),
    );
    assert_eq!(st, 201, "{t}");
    let (st, body) = s.call_as(
        t["token"].as_str(),
        "POST",
        "/api/v1/models/admin/Iris/predict",
        Some(json!({"data": [[1, 2, 3, 4]]}).to_string()),
        &[],
    );
    assert_eq!(st, 403, "{body}");
}

/// Waits until order `line` of `file` is in `state`; returns it.
fn wait_order(s: &Server, file: &str, line: u64, state: &str) -> Value {
    let mut last = Value::Null;
    let found = |o: &Value| {
        o["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["line"] == line && i["file"] == file)
            .cloned()
    };
    let ok = wait_until(Duration::from_secs(60), || {
        last = crate::hq::orders(s);
        found(&last).is_some_and(|o| o["state"] == state)
    });
    assert!(ok, "order {file}:{line} never became {state}: {last:#}");
    found(&last).unwrap()
}

/// Waits until the model's live version is `n` and its last tree ended.
fn wait_live(s: &Server, n: u64) -> Value {
    let mut m = Value::Null;
    let ok = wait_until(Duration::from_secs(300), || {
        m = model(s);
        m["live"] == n
            && m["versions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|v| v["state"] != "deploying" && v["state"] != "draining")
    });
    assert!(ok, "v{n} never became live: {m:#}");
    m
}

#[test]
fn revert_orders_delete_and_the_reaper_leave_nothing_behind() {
    let env = models::sklearn_env();
    let own = crate::support::TempDir::new("model-envs");
    let envs = own.0.join("envs");
    let wheels = models::cache().join("wheels");
    let s = Server::start_with(|c| {
        c.models.envs_dir = envs.to_string_lossy().into_owned();
        c.models.wheels_dir = wheels.to_string_lossy().into_owned();
        c.models.predictor_host = "127.0.0.1".into();
        c.pulse.interval = Duration::from_millis(200);
        c.reaper.interval = Duration::from_secs(1);
    });
    let dir = models::Scratch::new("lifecycle");
    models::iris_bundle(dir.path(), &env);
    let (v1, tree) = deploy(&s, dir.path());
    assert_eq!(tree["tree_state"], "succeeded", "{}", step_logs(&s, &tree));
    assert_eq!(v1, 1);
    // Its environment was built in this server's own envs dir (the wheels came from the cache).
    let built: Vec<_> = std::fs::read_dir(&envs)
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(built.len(), 1, "{built:?}");

    // HQ orders: `deploy 1` makes v2 of v1's bundle; `revert 1` goes back; a bad line is
    // rejected with its reason.
    let hq = s.dir.0.join("hq");
    crate::hq::append_commit(&hq, "admin/models/Iris/orders", "deploy 1\n");
    let o = wait_order(&s, "admin/models/Iris/orders", 1, "succeeded");
    assert!(o["tree"].is_string(), "{o:#}");
    wait_live(&s, 2);
    crate::hq::append_commit(&hq, "admin/models/Iris/orders", "revert\nrevert 1\n");
    let bad = wait_order(&s, "admin/models/Iris/orders", 2, "rejected");
    assert!(
        bad["message"]
            .as_str()
            .unwrap()
            .contains("usage: revert VERSION"),
        "{bad:#}"
    );
    wait_order(&s, "admin/models/Iris/orders", 3, "succeeded");
    let m = wait_live(&s, 1);
    assert_eq!(version(&m, 2)["state"], "stopped", "{m:#}");
    let (st, out) = predict(&s, "", json!([[5.1, 3.5, 1.4, 0.2]]));
    assert_eq!((st, out), (200, json!({"result": [0], "version": 1})));

    // The API's revert: to v2 again; a version that is live or unknown is refused.
    let (st, body) = s.call(
        "POST",
        "/api/v1/models/admin/Iris/revert",
        Some(json!({"version": 1})),
    );
    assert_eq!(st, 409, "{body}");
    let (st, body) = s.call(
        "POST",
        "/api/v1/models/admin/Iris/revert",
        Some(json!({"version": 9})),
    );
    assert_eq!(st, 404, "{body}");
    let (st, body) = s.call(
        "POST",
        "/api/v1/models/admin/Iris/revert",
        Some(json!({"version": 2})),
    );
    assert_eq!(st, 202, "{body}");
    let t = s.wait_tree(body["tree"].as_str().unwrap(), Duration::from_secs(300));
    assert_eq!(t["tree_state"], "succeeded", "{}", step_logs(&s, &t));
    let keys: Vec<&str> = t["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["start", "health", "switch", "drain", "stop"]);
    let m = wait_live(&s, 2);
    let (st, out) = predict(&s, "", json!([[5.1, 3.5, 1.4, 0.2]]));
    assert_eq!((st, out), (200, json!({"result": [0], "version": 2})));

    // Delete: 404 at once; the reaper removes the predictors, the node's files, the HQ files
    // (the orders stay) and, last, the model.
    let procs: Vec<String> = m["versions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| {
            v["processes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(procs.len(), 2, "{m:#}");
    let (st, body) = s.call("DELETE", "/api/v1/models/admin/Iris", None);
    assert_eq!(st, 202, "{body}");
    let (st, _) = predict(&s, "", json!([[5.1, 3.5, 1.4, 0.2]]));
    assert_eq!(st, 404);
    let (st, _) = s.call("GET", "/api/v1/models/admin/Iris", None);
    assert_eq!(st, 404);
    let bundles = s.dir.0.join("agent/models/bundles/admin/Iris");
    let gone = wait_until(Duration::from_secs(60), || {
        let procs_gone = procs
            .iter()
            .all(|id| s.call("GET", &format!("/api/v1/processes/{id}"), None).0 == 404);
        let envs_gone = std::fs::read_dir(&envs)
            .unwrap()
            .flatten()
            .all(|e| e.file_name().to_string_lossy().starts_with('.'));
        let bundles_gone = !bundles.exists()
            || std::fs::read_dir(&bundles).unwrap().flatten().all(|e| {
                std::fs::read_dir(e.path())
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(true)
            });
        procs_gone
            && envs_gone
            && bundles_gone
            && !hq.join("admin/models/Iris/bundle.json").exists()
    });
    let (_, h) = s.call("GET", "/api/v1/hq", None);
    assert!(gone, "the reaper left things behind: {:#}", h["reaper"]);
    assert!(hq.join("admin/models/Iris/orders").exists());
    assert!(wait_until(Duration::from_secs(30), || {
        s.app.store.doc("model", "admin/Iris").unwrap().is_none()
    }));
}

/// The `yhat` 1.10.0 client from PyPI with the "modern deps" of PROTOCOL.md §0, in the cache.
fn yhat_client_env() -> muster_models::PythonEnv {
    let spec = muster_models::EnvSpec {
        requirements: muster_models::env::YHAT_DEPS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        no_deps: muster_models::env::YHAT_NO_DEPS
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    models::envs()
        .ensure(&spec, &models::python(), &mut std::io::stderr())
        .expect("the yhat client's environment")
}

const YHAT_SESSION: &str = r#"
import json, sys
from yhat import Yhat, YhatModel


class HelloWorld(YhatModel):
    def execute(self, data):
        me = data["name"]
        return {"greeting": "Hello %s!" % me, "n": len(me)}


yh = Yhat(sys.argv[1], sys.argv[2], sys.argv[3])
print("DEPLOYED " + json.dumps(yh.deploy("HelloWorld", HelloWorld, globals(), sure=True)))
print("FORM " + json.dumps(yh.predict("HelloWorld", {"name": "Bea"})))
print("JSON " + json.dumps(yh.predict("HelloWorld", '{"name": "Cy"}')))
"#;

#[test]
fn the_real_yhat_client_deploys_a_model_and_predicts_through_the_yhat_routes() {
    let client = yhat_client_env();
    let s = server(None);
    let (st, t) = s.call(
        "POST",
        "/api/v1/tokens",
        Some(json!({"name": "yhat", "scopes": ["read", "operate", "predict"]})),
    );
    assert_eq!(st, 201, "{t}");
    let key = t["token"].as_str().unwrap().to_string();
    let dir = models::Scratch::new("yhat-session");
    let script = dir.path().join("session.py");
    std::fs::write(&script, YHAT_SESSION).unwrap();
    let run = |user: &str, key: &str| {
        std::process::Command::new(client.python())
            .arg(&script)
            .args([user, key, &format!("{}/", s.url)])
            .current_dir(dir.path())
            .env("NO_PROXY", "127.0.0.1")
            .output()
            .unwrap()
    };
    let out = run("admin", &key);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let line = |tag: &str| -> Value {
        let l = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{tag} ")))
            .unwrap_or_else(|| panic!("no {tag} line: {stdout}\n{stderr}"));
        serde_json::from_str(l).unwrap()
    };
    // The client answers with its own message (it discards the server's).
    let deployed = line("DEPLOYED");
    assert_eq!(deployed["status"], "OK", "{deployed}");
    // Without pandas the client form-encodes a dict: the server reads the form.
    let form = line("FORM");
    assert_eq!(
        form["result"],
        json!({"greeting": "Hello Bea!", "n": 3}),
        "{form}"
    );
    assert_eq!(form["yhat_model"], "HelloWorld");
    assert!(form["yhat_id"].is_string());
    let j = line("JSON");
    assert_eq!(j["result"], json!({"greeting": "Hello Cy!", "n": 2}), "{j}");
    // The model is a muster model like any other: version 1 of admin/HelloWorld, live.
    let (st, m) = s.call("GET", "/api/v1/models/admin/HelloWorld", None);
    assert_eq!((st, m["live"].clone()), (200, json!(1)), "{m:#}");
    // A wrong apikey: /verify is 401 and the client's constructor raises.
    let out = run("admin", "not-a-token");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to authenticate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (st, _) = s.call_as(
        None,
        "POST",
        "/verify?username=admin&apikey=nope",
        None,
        &[],
    );
    assert_eq!(st, 401);
    // Another user's name with this key: refused too.
    let (st, _) = s.call_as(
        None,
        "POST",
        &format!("/verify?username=bob&apikey={key}"),
        None,
        &[],
    );
    assert_eq!(st, 401);
    for v in m["versions"].as_array().unwrap() {
        for id in v["processes"].as_array().unwrap() {
            s.call(
                "DELETE",
                &format!("/api/v1/processes/{}", id.as_str().unwrap()),
                None,
            );
        }
    }
}

/// Writes `bytes` at `path` dated a minute ago (the watcher leaves files changed in the last two
/// seconds for the next pulse).
fn drop_old(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))
        .unwrap();
}

#[test]
fn bundles_dropped_in_hq_uploads_are_deployed_and_moved_aside() {
    let env = models::sklearn_env();
    let s = {
        let cache = models::cache();
        Server::start_with(move |c| {
            c.models.envs_dir = cache.join("envs").to_string_lossy().into_owned();
            c.models.wheels_dir = cache.join("wheels").to_string_lossy().into_owned();
            c.models.predictor_host = "127.0.0.1".into();
            c.pulse.interval = Duration::from_millis(200);
        })
    };
    let hq = s.dir.0.join("hq");
    // The yhat client's own .yhat (a capture), its user changed to ours.
    let capture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/yhat/captures/HelloWorld.yhat");
    let yhat = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, zlib\nb = json.loads(zlib.decompress(open(sys.argv[1], 'rb').read()))\nb['username'] = 'admin'\nsys.stdout.buffer.write(zlib.compress(json.dumps(b).encode()))",
        ])
        .arg(&capture)
        .output()
        .unwrap();
    assert!(
        yhat.status.success(),
        "{}",
        String::from_utf8_lossy(&yhat.stderr)
    );
    drop_old(&hq.join("uploads/HelloWorld.yhat"), &yhat.stdout);
    let dir = models::Scratch::new("uploads-iris");
    models::iris_bundle(dir.path(), &env);
    drop_old(&hq.join("uploads/admin/iris.tar.gz"), &pack(dir.path()));
    drop_old(&hq.join("uploads/admin/broken.tgz"), b"not an archive");
    drop_old(&hq.join("uploads/lonely.tar.gz"), &pack(dir.path()));

    let mut m = Value::Null;
    let live = wait_until(Duration::from_secs(300), || {
        let (_, l) = s.call("GET", "/api/v1/models", None);
        m = l.clone();
        let items = l["items"].as_array().cloned().unwrap_or_default();
        ["HelloWorld", "Iris"]
            .iter()
            .all(|n| items.iter().any(|i| i["name"] == *n && i["live"] == 1))
    });
    assert!(
        live,
        "the uploads were not deployed: {m:#}\n{:#}",
        s.call("GET", "/api/v1/hq", None).1
    );
    let moved = wait_until(Duration::from_secs(60), || {
        [
            "done/HelloWorld.yhat",
            "done/admin__iris.tar.gz",
            "rejected/admin__broken.tgz",
            "rejected/lonely.tar.gz",
        ]
        .iter()
        .all(|f| hq.join("uploads").join(f).exists())
    });
    assert!(moved, "{:#}", s.call("GET", "/api/v1/hq", None).1);
    let why = std::fs::read_to_string(hq.join("uploads/rejected/admin__broken.tgz.why")).unwrap();
    assert!(why.contains("archive"), "{why}");
    let why = std::fs::read_to_string(hq.join("uploads/rejected/lonely.tar.gz.why")).unwrap();
    assert!(why.contains("uploads/<workspace>/"), "{why}");
    for f in [
        "HelloWorld.yhat",
        "admin/iris.tar.gz",
        "admin/broken.tgz",
        "lonely.tar.gz",
    ] {
        assert!(!hq.join("uploads").join(f).exists(), "{f} is still there");
    }
    // The moves are committed: nothing left over in uploads/.
    assert!(
        wait_until(Duration::from_secs(30), || {
            crate::support::git(&hq, &["status", "--porcelain", "--", "uploads"])
                .trim()
                .is_empty()
        }),
        "{}",
        crate::support::git(&hq, &["status", "--porcelain"])
    );
    let log = crate::support::git(&hq, &["log", "--format=%s", "--", "uploads"]);
    assert!(
        log.contains("uploads: uploads/HelloWorld.yhat deployed as admin/HelloWorld v1"),
        "{log}"
    );
    // The yhat model answers through the yhat route, the iris one through the API.
    let (st, t) = s.call(
        "POST",
        "/api/v1/tokens",
        Some(json!({"name": "p", "scopes": ["predict"]})),
    );
    assert_eq!(st, 201, "{t}");
    let key = t["token"].as_str().unwrap();
    let (st, out) = s.call_as(
        None,
        "POST",
        &format!("/admin/models/HelloWorld/?username=admin&apikey={key}"),
        Some("name=Bea".into()),
        &[("content-type", "application/json")],
    );
    assert_eq!(st, 200, "{out}");
    assert!(
        out["result"]["greeting"].as_str().unwrap().contains("Bea"),
        "{out}"
    );
    let (st, out) = predict(&s, "", json!([[6.7, 3.0, 5.2, 2.3]]));
    assert_eq!((st, out), (200, json!({"result": [2], "version": 1})));
    let (_, all) = s.call("GET", "/api/v1/processes", None);
    for p in all["items"].as_array().unwrap() {
        s.call(
            "DELETE",
            &format!("/api/v1/processes/{}", p["id"].as_str().unwrap()),
            None,
        );
    }
}

#[test]
fn a_full_replica_refuses_at_once_with_retry_after_and_a_slow_call_times_out() {
    let env = models::sklearn_env();
    let cache = models::cache();
    let s = Server::start_with(move |c| {
        c.models.envs_dir = cache.join("envs").to_string_lossy().into_owned();
        c.models.wheels_dir = cache.join("wheels").to_string_lossy().into_owned();
        c.models.predictor_host = "127.0.0.1".into();
        c.models.replica_max_inflight = 1;
        c.models.predict_timeout = Duration::from_secs(4);
    });
    let dir = models::Scratch::new("full");
    models::iris_bundle(dir.path(), &env);
    let (_, tree) = deploy(&s, dir.path());
    assert_eq!(tree["tree_state"], "succeeded", "{}", step_logs(&s, &tree));
    // One call in flight fills the replica: the next is refused at once, never queued.
    let marks = models::Scratch::new("full-marks");
    let slow = json!({"test": "sleep", "seconds": 2, "mark": marks.path()});
    let (url, token) = (s.url.clone(), s.token.clone());
    let first = std::thread::spawn(move || {
        let req = ureq::http::Request::builder()
            .method("POST")
            .uri(format!("{url}/api/v1/models/admin/Iris/predict"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(json!({ "data": slow }).to_string())
            .unwrap();
        http().run(req).unwrap().status().as_u16()
    });
    assert!(wait_until(Duration::from_secs(30), || {
        std::fs::read_dir(marks.path()).unwrap().next().is_some()
    }));
    let req = ureq::http::Request::builder()
        .method("POST")
        .uri(format!("{}/api/v1/models/admin/Iris/predict", s.url))
        .header("authorization", format!("Bearer {}", s.token))
        .header("content-type", "application/json")
        .body(json!({"data": [[5.1, 3.5, 1.4, 0.2]]}).to_string())
        .unwrap();
    let resp = http().run(req).unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
    assert_eq!(first.join().unwrap(), 200);
    let (st, _) = predict(&s, "", json!([[5.1, 3.5, 1.4, 0.2]]));
    assert_eq!(st, 200);
    // Past [models] predict_timeout: 504.
    let (st, out) = predict(&s, "", json!({"test": "sleep", "seconds": 10}));
    assert_eq!(st, 504, "{out}");
    let (_, m) = s.call("GET", "/api/v1/models/admin/Iris", None);
    for v in m["versions"].as_array().unwrap() {
        for id in v["processes"].as_array().unwrap() {
            s.call(
                "DELETE",
                &format!("/api/v1/processes/{}", id.as_str().unwrap()),
                None,
            );
        }
    }
}

/// Calls predict on `s` until it answers `version` (the follower's routes follow the store's
/// events); the answer.
fn predict_on(s: &Server, version: u64) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(30), || {
        let (st, out) = predict(s, "", json!([[5.1, 3.5, 1.4, 0.2]]));
        last = json!({"status": st, "body": out});
        st == 200 && last["body"]["version"] == version
    });
    assert!(ok, "{} never answered v{version}: {last}", s.url);
    last["body"].clone()
}

#[test]
fn in_cluster_mode_every_server_serves_predict_and_switches_with_a_deploy() {
    use crate::nodes::{fast_nodes, wait_node, Agent};
    let env = models::sklearn_env();
    let redis = crate::support::Redis::start();
    let blobs = crate::support::TempDir::new("model-blobs");
    let cache = models::cache();
    let tweak = |c: &mut muster_server::config::Config| {
        c.store.url = redis.url();
        c.hq.remote = redis.hq_remote();
        c.store.blob_dir = blobs.0.display().to_string();
        c.server.lease_ttl = Duration::from_secs(1);
        c.models.envs_dir = cache.join("envs").to_string_lossy().into_owned();
        c.models.wheels_dir = cache.join("wheels").to_string_lossy().into_owned();
        c.models.predictor_host = "127.0.0.1".into();
        fast_nodes(c);
    };
    let a = Server::start_bare(tweak);
    assert!(wait_until(Duration::from_secs(5), || a
        .app
        .cluster
        .is_leader()));
    let b = Server::start_bare(tweak);
    let _agent = Agent::join_cluster(&a, &[&b], "worker", &[]);
    wait_node(&b, "worker", "ready", Duration::from_secs(10));
    let dir = models::Scratch::new("cluster-iris");
    models::iris_bundle(dir.path(), &env);
    // The upload through the follower is sent on to the leader, whose agent runs the tree.
    let (st, body) = upload(&b, "admin", "Iris", pack(dir.path()));
    assert_eq!(st, 202, "{body}");
    let t = b.wait_tree(body["tree"].as_str().unwrap(), Duration::from_secs(300));
    assert_eq!(t["tree_state"], "succeeded", "{}", step_logs(&b, &t));
    assert_eq!(predict_on(&a, 1)["result"], json!([0]));
    assert_eq!(predict_on(&b, 1)["result"], json!([0]));
    // v2 through the leader: the follower switches too.
    let (st, body) = upload(&a, "admin", "Iris", pack(dir.path()));
    assert_eq!(st, 202, "{body}");
    let t = a.wait_tree(body["tree"].as_str().unwrap(), Duration::from_secs(300));
    assert_eq!(t["tree_state"], "succeeded", "{}", step_logs(&a, &t));
    predict_on(&b, 2);
    predict_on(&a, 2);
    let (_, m) = a.call("GET", "/api/v1/models/admin/Iris", None);
    for v in m["versions"].as_array().unwrap() {
        for id in v["processes"].as_array().unwrap() {
            a.call(
                "DELETE",
                &format!("/api/v1/processes/{}", id.as_str().unwrap()),
                None,
            );
        }
    }
}

const YHAT_BATCH: &str = r#"
import sys
from yhat.batch import BatchJob

GREETINGS = {"en": "Hello", "de": "Hallo"}
WEIGHTS = [1.5, 2.5, 3.0]


class HelloJob(BatchJob):
    def execute(self):
        print("batch job says: %s, total %s" % (GREETINGS["de"], sum(WEIGHTS)))


HelloJob("hello_job", username=sys.argv[1], apikey=sys.argv[2], url=sys.argv[3]).deploy(globals(), sure=True)
print("SENT")
"#;

#[test]
fn the_real_yhat_client_runs_a_batch_job_as_a_muster_job() {
    let client = yhat_client_env();
    let s = server(None);
    let (st, t) = s.call(
        "POST",
        "/api/v1/tokens",
        Some(json!({"name": "yhat", "scopes": ["read", "operate", "predict"]})),
    );
    assert_eq!(st, 201, "{t}");
    let key = t["token"].as_str().unwrap().to_string();
    let dir = models::Scratch::new("yhat-batch");
    let script = dir.path().join("job.py");
    std::fs::write(&script, YHAT_BATCH).unwrap();
    // The client adds these from its working directory; `six` is one of its own packages.
    std::fs::write(dir.path().join("requirements.txt"), "six\n").unwrap();
    std::fs::write(dir.path().join("yhat.yaml"), "echo 'nothing'\n").unwrap();
    let out = std::process::Command::new(client.python())
        .arg(&script)
        .args(["admin", &key, &format!("{}/", s.url)])
        .current_dir(dir.path())
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success() && stdout.contains("SENT") && !stderr.contains("Server error"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    // The job is a muster job of the user's workspace, named after job_name.
    let (st, list) = s.call(
        "GET",
        "/api/v1/jobs?workspace=admin&application=hello_job",
        None,
    );
    assert_eq!(st, 200, "{list}");
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list:#}");
    let id = items[0]["id"].as_str().unwrap().to_string();
    let t = s.wait_tree(&id, Duration::from_secs(900));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    assert_eq!(t["name"], "yhat batch hello_job", "{t:#}");
    let log = s.log(&id);
    assert!(log.contains("batch job says: Hallo, total 7.0"), "{log}");

    // Bad requests: clear 4xx, nothing made.
    let post = |ct: &str, body: &[u8]| {
        let req = ureq::http::Request::builder()
            .method("POST")
            .uri(format!(
                "{}/batch/deploy?username=admin&apikey={key}",
                s.url
            ))
            .header("content-type", ct)
            .body(body.to_vec())
            .unwrap();
        let mut resp = http().run(req).unwrap();
        let st = resp.status().as_u16();
        (st, resp.body_mut().read_to_string().unwrap_or_default())
    };
    let (st, body) = post("application/json", b"{}");
    assert!((400..500).contains(&st), "{st} {body}");
    let mp = |parts: &[(&str, &[u8])]| {
        let mut b = Vec::new();
        for (name, content) in parts {
            b.extend_from_slice(
                format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n")
                    .as_bytes(),
            );
            b.extend_from_slice(content);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b
    };
    let ct = "multipart/form-data; boundary=XyZ";
    let (st, body) = post(ct, &mp(&[("job_name", b"j2")]));
    assert_eq!(st, 422, "{body}");
    assert!(body.contains("no part named job"), "{body}");
    let (st, body) = post(ct, &mp(&[("job_name", b"j2"), ("job", b"not a tar.gz")]));
    assert_eq!(st, 422, "{body}");
    assert!(body.contains("job archive"), "{body}");
    assert!(!body.contains("not a tar.gz"), "{body}");
    let (_, list) = s.call("GET", "/api/v1/jobs?workspace=admin&application=j2", None);
    assert_eq!(list["items"], json!([]), "{list:#}");
}
