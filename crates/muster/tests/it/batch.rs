//! Batch scoring (SPEC §8): a CSV through the real scikit-learn iris model (two replicas), in
//! chunks scored by a job tree, the result CSV in input order and equal to the model's own
//! predictions (scikit-learn run on the same file); the CLI; a bad row marked or failing the
//! batch; bad input refused.

use crate::model_support as models;

use crate::harness::Server;
use crate::support::http;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

fn server() -> Server {
    let cache = models::cache();
    Server::start_with(move |c| {
        c.models.envs_dir = cache.join("envs").to_string_lossy().into_owned();
        c.models.wheels_dir = cache.join("wheels").to_string_lossy().into_owned();
        c.models.predictor_host = "127.0.0.1".into();
        c.hq.max_file_size = 256;
        c.pulse.interval = Duration::from_millis(200);
    })
}

/// Deploys the iris bundle in `dir` as admin/Iris; waits until it is live.
fn deploy(s: &Server, dir: &Path) {
    let mut archive = Vec::new();
    muster_models::archive::pack(dir, &mut archive).unwrap();
    let req = ureq::http::Request::builder()
        .method("POST")
        .uri(format!("{}/api/v1/models/admin/Iris", s.url))
        .header("authorization", format!("Bearer {}", s.token))
        .header("content-type", "application/gzip")
        .body(archive)
        .unwrap();
    let mut resp = http().run(req).unwrap();
    let body: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(resp.status().as_u16(), 202, "{body}");
    let t = s.wait_tree(body["tree"].as_str().unwrap(), Duration::from_secs(600));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
}

/// POSTs `csv` to the batch route with `query`; the status and body.
fn post_batch(s: &Server, query: &str, csv: &str) -> (u16, Value) {
    s.call_raw_body(
        "POST",
        &format!("/api/v1/models/admin/Iris/batch{query}"),
        csv,
        "text/csv",
    )
}

trait RawBody {
    fn call_raw_body(&self, method: &str, path: &str, body: &str, ct: &str) -> (u16, Value);
}

impl RawBody for Server {
    fn call_raw_body(&self, method: &str, path: &str, body: &str, ct: &str) -> (u16, Value) {
        let (st, text) = self.raw(
            Some(&self.token),
            method,
            path,
            Some(body.to_string()),
            &[("content-type", ct)],
        );
        (st, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// `n` iris-like rows (deterministic), with the header.
fn iris_csv(n: usize) -> String {
    let mut out = String::from("sepal_length,sepal_width,petal_length,petal_width\n");
    let mut x: u64 = 12345;
    let mut next = |lo: f64, hi: f64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let f = (x >> 11) as f64 / (1u64 << 53) as f64;
        ((lo + f * (hi - lo)) * 10.0).round() / 10.0
    };
    for _ in 0..n {
        out.push_str(&format!(
            "{},{},{},{}\n",
            next(4.3, 7.9),
            next(2.0, 4.4),
            next(1.0, 6.9),
            next(0.1, 2.5)
        ));
    }
    out
}

/// The model's own predictions of `csv` (scikit-learn on the same file, in the test's env).
fn own_predictions(env: &muster_models::PythonEnv, bundle: &Path, csv: &Path) -> Vec<String> {
    let script = "import csv, pickle, sys\n\
        m = pickle.load(open(sys.argv[1], 'rb'))\n\
        rows = list(csv.reader(open(sys.argv[2])))[1:]\n\
        X = [[float(v) for v in r] for r in rows]\n\
        print('\\n'.join(str(p) for p in m.predict(X).tolist()))\n";
    let out = std::process::Command::new(env.python())
        .arg("-c")
        .arg(script)
        .arg(bundle.join("model.pkl"))
        .arg(csv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn result_csv(s: &Server, tree: &str) -> (u16, String) {
    s.raw(
        Some(&s.token),
        "GET",
        &format!("/api/v1/jobs/{tree}/result"),
        None,
        &[],
    )
}

#[test]
fn a_csv_is_scored_in_chunks_across_replicas_in_input_order() {
    let env = models::sklearn_env();
    let s = server();
    let dir = models::Scratch::new("batch");
    models::iris_bundle(dir.path(), &env);
    // Two replicas: the chunks are spread across both.
    let bundle_json = dir.path().join("bundle.json");
    let mut b: Value = serde_json::from_slice(&std::fs::read(&bundle_json).unwrap()).unwrap();
    b["replicas"] = json!(2);
    std::fs::write(&bundle_json, b.to_string()).unwrap();
    deploy(&s, dir.path());

    // Bad input first: each a 4xx with a short message that does not echo the input.
    let (st, out) = post_batch(&s, "", "");
    assert_eq!(st, 400, "{out}");
    let (st, out) = post_batch(&s, "", "a,b\n1,2\n3\n");
    assert_eq!(st, 400, "{out}");
    assert!(
        out["error"]["message"].as_str().unwrap().contains("row 2"),
        "{out}"
    );
    let (st, out) = post_batch(&s, "", "a,b\n");
    assert_eq!(st, 400, "{out}");
    let (st, out) = post_batch(&s, "?on_error=ignore-it", "a\n1\n");
    assert_eq!(st, 400, "{out}");
    assert!(!out.to_string().contains("ignore-it"), "{out}");
    let (st, out) = post_batch(&s, "?chunk_rows=0", "a\n1\n");
    assert_eq!(st, 400, "{out}");
    let (st, out) = s.call_raw_body(
        "POST",
        "/api/v1/models/admin/NoSuch/batch",
        "a\n1\n",
        "text/csv",
    );
    assert_eq!(st, 404, "{out}");

    // 25,000 rows in chunks of 3,000: nine chunk jobs and a merge.
    let rows = 25_000;
    let csv = iris_csv(rows);
    let input = dir.path().join("input.csv");
    std::fs::write(&input, &csv).unwrap();
    let expected = own_predictions(&env, dir.path(), &input);
    assert_eq!(expected.len(), rows);
    let (st, made) = post_batch(&s, "?chunk_rows=3000", &csv);
    assert_eq!(st, 202, "{made}");
    assert_eq!(made["batch"]["rows_total"], rows);
    assert_eq!(made["batch"]["chunks"], 9);
    let tree = made["tree"].as_str().unwrap().to_string();
    let t = s.wait_tree(&tree, Duration::from_secs(600));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let keys: Vec<&str> = t["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 10, "{keys:?}");
    assert_eq!(keys[9], "merge");
    // Each chunk job's result is its rows and the batch's progress.
    let chunk0 = crate::harness::child(&t, "score admin/Iris rows 1-3000");
    let (_, j) = s.call(
        "GET",
        &format!("/api/v1/jobs/{}", chunk0["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(j["result"]["rows"], 3000, "{j:#}");
    assert_eq!(j["result"]["rows_total"], rows, "{j:#}");
    // Progress on the batch.
    let (st, b) = s.call(
        "GET",
        &format!("/api/v1/models/admin/Iris/batches/{tree}"),
        None,
    );
    assert_eq!(st, 200, "{b}");
    assert_eq!(
        (b["rows_done"].clone(), b["state"].clone()),
        (json!(rows), json!("done"))
    );
    assert_eq!(b["chunks_done"], 9);

    // The result: the input rows in order, each beside the model's own prediction.
    let (st, text) = result_csv(&s, &tree);
    assert_eq!(st, 200, "{text}");
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "sepal_length,sepal_width,petal_length,petal_width,prediction"
    );
    let got: Vec<&str> = lines.collect();
    assert_eq!(got.len(), rows);
    for (i, (line, input)) in got.iter().zip(csv.lines().skip(1)).enumerate() {
        assert_eq!(*line, format!("{input},{}", expected[i]), "row {}", i + 1);
    }
    // Both replicas took chunks.
    let (_, m) = s.call("GET", "/api/v1/models/admin/Iris", None);
    let reqs: Vec<u64> = m["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requests"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(reqs.len(), 2, "{m:#}");
    assert!(reqs.iter().sum::<u64>() >= 9, "{m:#}");

    // The CLI: the same file, the result to a file; with a row number instead of the input.
    let out = dir.path().join("out.csv");
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["models", "batch", "admin/Iris"])
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .args(["--chunk-rows", "10000", "--columns", "id"])
        .env("MUSTER_URL", &s.url)
        .env("MUSTER_TOKEN", &s.token)
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), "row,prediction");
    for (i, line) in lines.enumerate() {
        assert_eq!(line, format!("{},{}", i + 1, expected[i]));
    }
    assert_eq!(text.lines().count(), rows + 1);

    // A bad row: marked in the `errors` column (the rest scored), or failing the batch.
    let mut small = String::from("sepal_length,sepal_width,petal_length,petal_width\n");
    for i in 0..30 {
        if i == 16 {
            small.push_str("5.1,abc,1.4,0.2\n");
        } else {
            small.push_str("6.7,3.0,5.2,2.3\n");
        }
    }
    let (st, made) = post_batch(&s, "?chunk_rows=10&on_error=mark", &small);
    assert_eq!(st, 202, "{made}");
    let tree = made["tree"].as_str().unwrap().to_string();
    let t = s.wait_tree(&tree, Duration::from_secs(300));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let (_, text) = result_csv(&s, &tree);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "sepal_length,sepal_width,petal_length,petal_width,prediction,errors"
    );
    assert_eq!(lines.len(), 31);
    for (i, l) in lines[1..].iter().enumerate() {
        if i == 16 {
            assert!(l.starts_with("5.1,abc,1.4,0.2,,ValueError: "), "{l}");
        } else {
            assert_eq!(*l, "6.7,3.0,5.2,2.3,2,", "row {}", i + 1);
        }
    }
    let (_, b) = s.call(
        "GET",
        &format!("/api/v1/models/admin/Iris/batches/{tree}"),
        None,
    );
    assert_eq!(b["errors"], 1, "{b}");
    let (st, made) = post_batch(&s, "?chunk_rows=10", &small);
    assert_eq!(st, 202, "{made}");
    let tree = made["tree"].as_str().unwrap().to_string();
    let t = s.wait_tree(&tree, Duration::from_secs(300));
    assert_eq!(t["tree_state"], "failed", "{t:#}");
    let failed = crate::harness::child(&t, "score admin/Iris rows 11-20");
    assert_eq!(failed["state"], "failed", "{t:#}");
    let log = s.log(failed["id"].as_str().unwrap());
    assert!(
        log.contains("rows 11-20") && log.contains("ValueError"),
        "{log}"
    );
    let (st, out) = result_csv(&s, &tree);
    assert_eq!(st, 409, "{out}");

    // An HQ order: `batch PATH` scores a CSV committed in HQ; a path outside the workspace is
    // rejected.
    let hq = s.dir.0.join("hq");
    let data = hq.join("admin/data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("small.csv"), iris_csv(50)).unwrap();
    crate::support::git(&hq, &["add", "admin/data/small.csv"]);
    crate::support::git(&hq, &["commit", "-q", "-m", "data"]);
    crate::hq::append_commit(
        &hq,
        "admin/models/Iris/orders",
        "batch admin/data/small.csv chunk_rows=7 output=id\nbatch ../etc/passwd\n",
    );
    let mut order = Value::Null;
    let mut rejected = Value::Null;
    assert!(
        crate::support::wait_until(Duration::from_secs(60), || {
            let o = crate::hq::orders(&s);
            let find = |line: u64| {
                o["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|i| i["file"] == "admin/models/Iris/orders" && i["line"] == line)
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            order = find(1);
            rejected = find(2);
            order["state"] == "succeeded" && rejected["state"] == "rejected"
        }),
        "{order:#} {rejected:#}"
    );
    let t = s.tree(order["tree"].as_str().unwrap());
    let name = t["name"].as_str().unwrap_or_default().to_string();
    let batch_tree = name
        .split("(tree ")
        .nth(1)
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{t:#}"))
        .to_string();
    let t = s.wait_tree(&batch_tree, Duration::from_secs(300));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let (st, text) = result_csv(&s, &batch_tree);
    assert_eq!(st, 200);
    assert_eq!(text.lines().count(), 51, "{text}");
    assert!(text.starts_with("row,prediction\n1,"), "{text}");
}

#[test]
fn an_expired_batch_loses_its_blobs_and_document() {
    let env = models::sklearn_env();
    let cache = models::cache();
    // Every finished tree is past retention at once; the reaper runs only when called here.
    let s = Server::start_with(move |c| {
        c.models.envs_dir = cache.join("envs").to_string_lossy().into_owned();
        c.models.wheels_dir = cache.join("wheels").to_string_lossy().into_owned();
        c.models.predictor_host = "127.0.0.1".into();
        c.hq.max_file_size = 256;
        c.jobs.retention = Duration::from_millis(1);
        c.reaper.interval = Duration::from_secs(3600);
    });
    let dir = models::Scratch::new("batch-reap");
    models::iris_bundle(dir.path(), &env);
    deploy(&s, dir.path());
    let csv = iris_csv(2_000);
    let (st, made) = post_batch(&s, "?chunk_rows=500", &csv);
    assert_eq!(st, 202, "{made}");
    let tree = made["tree"].as_str().unwrap().to_string();
    let id: muster_core::Uuid = tree.parse().unwrap();
    let t = s.wait_tree(&tree, Duration::from_secs(300));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let (st, text) = result_csv(&s, &tree);
    assert_eq!((st, text.lines().count()), (200, 2_001));
    let b = muster_server::models::batch::get(&s.app, id)
        .unwrap()
        .expect("the batch document");
    let result = b.result.clone().expect("the result blob");
    assert!(s.app.blobs.get(&result).is_ok(), "the result blob is there");
    // A second batch of the same file: its result is the same blob (named by content), and
    // stays while that batch does.
    let (st, made2) = post_batch(&s, "?chunk_rows=500", &csv);
    assert_eq!(st, 202, "{made2}");
    let tree2 = made2["tree"].as_str().unwrap().to_string();
    assert_eq!(
        s.wait_tree(&tree2, Duration::from_secs(300))["tree_state"],
        "succeeded"
    );
    let b2 = muster_server::models::batch::get(&s.app, tree2.parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(b2.result.as_deref(), Some(result.as_str()));
    // Only the first tree is purged here (the store's purge is what expiry does).
    let purged = vec![id];
    assert_eq!(
        muster_server::models::batch::reap(&s.app, &purged).unwrap(),
        1
    );
    assert!(muster_server::models::batch::get(&s.app, id)
        .unwrap()
        .is_none());
    assert!(s.app.blobs.get(&result).is_ok(), "still the second batch's");
    for c in b.chunks.iter().chain(&b2.chunks) {
        assert!(
            s.app.blobs.get(&c.input).is_err(),
            "chunk blobs go at merge"
        );
    }
    // Expiry: the reaper purges both trees and removes what is left of the batches.
    assert!(crate::support::wait_until(Duration::from_secs(30), || {
        muster_server::reap_once(&s.app);
        muster_server::models::batch::get(&s.app, tree2.parse().unwrap())
            .unwrap()
            .is_none()
    }));
    assert!(s.app.blobs.get(&result).is_err(), "the result blob is gone");
    let (st, _) = result_csv(&s, &tree2);
    assert_eq!(st, 404);
}

#[test]
fn a_replica_killed_during_a_batch_loses_and_repeats_no_row() {
    let env = models::sklearn_env();
    let s = server();
    let dir = models::Scratch::new("batch-kill");
    models::iris_bundle(dir.path(), &env);
    let bundle_json = dir.path().join("bundle.json");
    let mut b: Value = serde_json::from_slice(&std::fs::read(&bundle_json).unwrap()).unwrap();
    b["replicas"] = json!(2);
    std::fs::write(&bundle_json, b.to_string()).unwrap();
    deploy(&s, dir.path());
    let rows = 40_000;
    let csv = iris_csv(rows);
    let input = dir.path().join("input.csv");
    std::fs::write(&input, &csv).unwrap();
    let expected = own_predictions(&env, dir.path(), &input);
    let (_, m) = s.call("GET", "/api/v1/models/admin/Iris", None);
    let victim = m["versions"][0]["processes"][0]
        .as_str()
        .unwrap()
        .to_string();
    let (_, p) = s.call("GET", &format!("/api/v1/processes/{victim}"), None);
    let pid = p["pid"].as_i64().unwrap() as i32;

    let (st, made) = post_batch(&s, "?chunk_rows=1000&output=id", &csv);
    assert_eq!(st, 202, "{made}");
    let tree = made["tree"].as_str().unwrap().to_string();
    // Once some chunks are scored, one replica is killed -9 (its predictor and so its workers).
    assert!(crate::support::wait_until(Duration::from_secs(120), || {
        let (_, b) = s.call(
            "GET",
            &format!("/api/v1/models/admin/Iris/batches/{tree}"),
            None,
        );
        b["chunks_done"].as_u64().unwrap_or(0) >= 3
    }));
    // SAFETY: a signal to a predictor this test's server started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = s.wait_tree(&tree, Duration::from_secs(600));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let (st, text) = result_csv(&s, &tree);
    assert_eq!(st, 200);
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), "row,prediction");
    let got: Vec<&str> = lines.collect();
    assert_eq!(got.len(), rows, "no row lost or repeated");
    for (i, l) in got.iter().enumerate() {
        assert_eq!(*l, format!("{},{}", i + 1, expected[i]));
    }
}

#[test]
fn a_million_rows_through_the_python_runtime_keep_order_and_the_model_s_answers() {
    let env = models::sklearn_env();
    let s = server();
    let dir = models::Scratch::new("batch-1m");
    models::iris_bundle(dir.path(), &env);
    let bundle_json = dir.path().join("bundle.json");
    let mut b: Value = serde_json::from_slice(&std::fs::read(&bundle_json).unwrap()).unwrap();
    b["replicas"] = json!(2);
    std::fs::write(&bundle_json, b.to_string()).unwrap();
    deploy(&s, dir.path());
    let rows = 1_000_000;
    let csv = iris_csv(rows);
    let input = dir.path().join("input.csv");
    std::fs::write(&input, &csv).unwrap();
    let expected = own_predictions(&env, dir.path(), &input);
    assert_eq!(expected.len(), rows);
    let t0 = std::time::Instant::now();
    let (st, made) = post_batch(&s, "?output=id", &csv);
    assert_eq!(st, 202, "{made}");
    assert_eq!(made["batch"]["chunks"], 100);
    let tree = made["tree"].as_str().unwrap().to_string();
    let t = s.wait_tree(&tree, Duration::from_secs(600));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let (st, text) = result_csv(&s, &tree);
    assert_eq!(st, 200);
    eprintln!("1M rows through python: {:?}", t0.elapsed());
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("row,prediction"));
    let mut n = 0;
    for (i, line) in lines.enumerate() {
        assert_eq!(line, format!("{},{}", i + 1, expected[i]), "row {}", i + 1);
        n += 1;
    }
    assert_eq!(n, rows);
}

/// The rows of a ~1 GB CSV, made as they are read (never whole in memory): `id,payload` with a
/// 1,000-byte payload.
struct WideRows {
    next: usize,
    rows: usize,
    buf: Vec<u8>,
    at: usize,
}

impl std::io::Read for WideRows {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
            if self.next == 0 {
                self.buf.extend_from_slice(b"id,payload\n");
            }
            while self.next < self.rows && self.buf.len() < 64 << 10 {
                let c = b'a' + (self.next % 26) as u8;
                self.buf
                    .extend_from_slice(format!("{},", self.next).as_bytes());
                self.buf.extend(std::iter::repeat_n(c, 1000));
                self.buf.push(b'\n');
                self.next += 1;
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The resident set of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb << 10
}

#[test]
fn a_1gb_csv_is_scored_in_bounded_server_and_agent_memory() {
    // Its own `muster up` (the server and its embedded agent in one process), so the RSS
    // sampled is theirs alone and not that of the other tests running in this process.
    let data = crate::harness::TempDir::new("batch-1gb-up");
    let cache = models::cache();
    let (envs, wheels) = (cache.join("envs"), cache.join("wheels"));
    let up = crate::crash::Up::start_env(
        &data.0,
        &[
            ("MUSTER_MODELS__ENVS_DIR", envs.to_str().unwrap()),
            ("MUSTER_MODELS__WHEELS_DIR", wheels.to_str().unwrap()),
            ("MUSTER_MODELS__PREDICTOR_HOST", "127.0.0.1"),
        ],
    );
    let token = crate::crash::setup(&up, &data.0);
    let (url, pid) = (up.url.clone(), up.pid());
    let dir = models::Scratch::new("batch-1gb");
    // A trivial model (no requirements): each row's payload length.
    std::fs::write(
        dir.path().join("bundle.json"),
        json!({"name": "Wide", "runtime": "python", "entrypoint": "model.py:Wide", "workers": 2,
               "replicas": 2, "example": {"data": [[1, "xy"]]}})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model.py"),
        "class Wide:\n    def execute(self, data):\n        return [len(r[1]) for r in data]\n",
    )
    .unwrap();
    let mut archive = Vec::new();
    muster_models::archive::pack(dir.path(), &mut archive).unwrap();
    let req = ureq::http::Request::builder()
        .method("POST")
        .uri(format!("{}/api/v1/models/admin/Wide", url))
        .header("authorization", format!("Bearer {}", token))
        .header("content-type", "application/gzip")
        .body(archive)
        .unwrap();
    let mut resp = http().run(req).unwrap();
    let body: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(resp.status().as_u16(), 202, "{body}");
    let t = crate::crash::wait_tree(
        &url,
        &token,
        body["tree"].as_str().unwrap(),
        Duration::from_secs(600),
    );
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");

    // RSS sampled every 100 ms from before the upload to after the result is read.
    let base = rss(pid);
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        let mut samples = 0;
        loop {
            peak = peak.max(rss(pid));
            samples += 1;
            match stopped.recv_timeout(Duration::from_millis(100)) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => return (peak, samples),
            }
        }
    });
    let rows = 1_000_000;
    let t0 = std::time::Instant::now();
    let mut gen = WideRows {
        next: 0,
        rows,
        buf: Vec::new(),
        at: 0,
    };
    let mut resp = http()
        .post(&format!(
            "{}/api/v1/models/admin/Wide/batch?chunk_rows=2000&output=id",
            url
        ))
        .header("authorization", &format!("Bearer {}", token))
        .header("content-type", "text/csv")
        .send(ureq::SendBody::from_reader(&mut gen))
        .unwrap();
    let made: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(resp.status().as_u16(), 202, "{made}");
    assert_eq!(made["batch"]["rows_total"], rows);
    let tree = made["tree"].as_str().unwrap().to_string();
    let t = crate::crash::wait_tree(&url, &token, &tree, Duration::from_secs(600));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    // The result, read as a stream and checked line by line.
    let resp = http()
        .get(&format!("{}/api/v1/jobs/{tree}/result", url))
        .header("authorization", &format!("Bearer {}", token))
        .call()
        .unwrap();
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(resp.into_body().into_reader()));
    assert_eq!(lines.next().unwrap().unwrap(), "row,prediction");
    let mut n = 0;
    for (i, line) in lines.enumerate() {
        assert_eq!(line.unwrap(), format!("{},1000", i + 1));
        n += 1;
    }
    assert_eq!(n, rows);
    let took = t0.elapsed();
    stop.send(()).unwrap();
    let (peak, samples) = sampler.join().unwrap();
    eprintln!(
        "1 GB ({} bytes) through a batch in {took:?}: RSS {} MB before, peak {} MB ({samples} samples)",
        gen.next * 1000,
        base >> 20,
        peak >> 20
    );
    assert!(samples >= 10, "{samples}");
    // The file is ~1 GB: the server and the agent hold a few chunks at a time, never the file.
    // (Measured: 42 -> 93 MB; holding the file would be +1 GB.)
    assert!(
        peak.saturating_sub(base) < 256 << 20,
        "RSS grew from {} MB to {} MB",
        base >> 20,
        peak >> 20
    );
}
