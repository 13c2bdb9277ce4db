//! The `onnx` runtime (SPEC §8): scikit-learn models converted by skl2onnx in the test's cached
//! venv (LogisticRegression with and without ZipMap, a RandomForest with string labels, a
//! scaler pipeline, a small MLP), deployed as `"runtime": "onnx"` bundles and served natively by
//! ONNX Runtime inside the predictor (`libonnxruntime.so` from the onnxruntime wheel, installed
//! by the deploy's environment step into the node's cache); muster's answers equal
//! onnxruntime's own to 1e-5; a wrong input name and a corrupt model give clear errors; a batch
//! runs through it.

use crate::harness::Server;
use crate::model_support as models;
use crate::support::http;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// What the test venv holds besides scikit-learn.
const CONVERT: &[&str] = &["skl2onnx==1.20.0", "onnxruntime==1.32.0"];

const MAKE: &str = r#"
import json, sys
import numpy as np
import onnxruntime as rt
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.ensemble import RandomForestClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skl2onnx import to_onnx

out = sys.argv[1]
X, y = load_iris(return_X_y=True)
X = X.astype(np.float32)
names = np.array(["setosa", "versicolor", "virginica"])[y]
lr = LogisticRegression(max_iter=1000).fit(X, y)
models = {
    "lrzip": to_onnx(lr, X[:1], target_opset=15),
    "lrplain": to_onnx(lr, X[:1], options={id(lr): {"zipmap": False}}, target_opset=15),
    "rf": to_onnx(RandomForestClassifier(n_estimators=10, random_state=0).fit(X, names), X[:1], target_opset=15),
    "scaled": to_onnx(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X, y), X[:1], target_opset=15),
    "mlp": to_onnx(MLPClassifier(hidden_layer_sizes=(8,), max_iter=2000, random_state=0).fit(X, y), X[:1], target_opset=15),
}
rows = X[[0, 60, 120, 149]]
own = {}
for k, m in models.items():
    open(f"{out}/{k}.onnx", "wb").write(m.SerializeToString())
    s = rt.InferenceSession(f"{out}/{k}.onnx")
    res = s.run(None, {"X": rows})
    own[k] = {o.name: (r.tolist() if hasattr(r, "tolist") else [{str(a): float(b) for a, b in d.items()} for d in r])
              for o, r in zip(s.get_outputs(), res)}
json.dump({"rows": rows.tolist(), "own": own}, open(f"{out}/own.json", "w"))
"#;

fn convert_env() -> muster_models::PythonEnv {
    let spec = muster_models::EnvSpec {
        requirements: std::iter::once(models::SKLEARN)
            .chain(CONVERT.iter().copied())
            .map(String::from)
            .collect(),
        no_deps: vec![],
    };
    models::envs()
        .ensure(&spec, &models::python(), &mut std::io::stderr())
        .expect("the skl2onnx environment")
}

fn upload(s: &Server, name: &str, dir: &Path) -> (u16, Value) {
    let mut archive = Vec::new();
    muster_models::archive::pack(dir, &mut archive).unwrap();
    let req = ureq::http::Request::builder()
        .method("POST")
        .uri(format!("{}/api/v1/models/admin/{name}", s.url))
        .header("authorization", format!("Bearer {}", s.token))
        .header("content-type", "application/gzip")
        .body(archive)
        .unwrap();
    let mut resp = http().run(req).unwrap();
    let st = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (st, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A bundle of `file` named `name`; deploys it and answers the ended tree.
fn deploy(s: &Server, name: &str, file: &Path) -> Value {
    let dir = models::Scratch::new("onnx-bundle");
    std::fs::copy(file, dir.path().join("model.onnx")).unwrap();
    std::fs::write(
        dir.path().join("bundle.json"),
        json!({"name": name, "runtime": "onnx", "model": "model.onnx", "workers": 2}).to_string(),
    )
    .unwrap();
    let (st, made) = upload(s, name, dir.path());
    assert_eq!(st, 202, "{made}");
    s.wait_tree(made["tree"].as_str().unwrap(), Duration::from_secs(900))
}

fn predict(s: &Server, name: &str, data: Value) -> (u16, Value) {
    s.call(
        "POST",
        &format!("/api/v1/models/admin/{name}/predict"),
        Some(json!({ "data": data })),
    )
}

/// Every number in `got` within 1e-5 of `want`, the rest equal.
fn close(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Number(a), Value::Number(b)) => {
            (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-5
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| close(x, y))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| close(v, w)))
        }
        (a, b) => a == b,
    }
}

#[test]
fn skl2onnx_models_are_served_natively_equal_to_onnxruntime() {
    let env = convert_env();
    let work = models::Scratch::new("onnx");
    let st = std::process::Command::new(env.python())
        .arg("-c")
        .arg(MAKE)
        .arg(work.path())
        .status()
        .unwrap();
    assert!(st.success(), "converting the models");
    let own: Value =
        serde_json::from_slice(&std::fs::read(work.path().join("own.json")).unwrap()).unwrap();
    let rows = own["rows"].clone();

    let cache = models::cache();
    let s = Server::start_with(move |c| {
        c.models.envs_dir = cache.join("envs").to_string_lossy().into_owned();
        c.models.wheels_dir = cache.join("wheels").to_string_lossy().into_owned();
        c.models.predictor_host = "127.0.0.1".into();
        c.hq.max_file_size = 1 << 20;
    });

    for (name, file) in [
        ("LrZip", "lrzip"),
        ("LrPlain", "lrplain"),
        ("Rf", "rf"),
        ("Scaled", "scaled"),
        ("Mlp", "mlp"),
    ] {
        let t = deploy(&s, name, &work.path().join(format!("{file}.onnx")));
        assert_eq!(t["tree_state"], "succeeded", "{name}: {t:#}");
        let (st, out) = predict(&s, name, rows.clone());
        assert_eq!(st, 200, "{name}: {out}");
        let want = &own["own"][file];
        assert!(
            close(&out["result"], want),
            "{name}: {} vs {want}",
            out["result"]
        );
    }
    // The prepare step says where ONNX Runtime came from.
    let (_, m) = s.call("GET", "/api/v1/models/admin/Rf", None);
    let tree = m["versions"][0]["tree"].as_str().unwrap().to_string();
    let t = s.tree(&tree);
    let log = s.log(
        crate::harness::child(&t, "prepare admin/Rf v1")["id"]
            .as_str()
            .unwrap(),
    );
    assert!(
        log.contains("ONNX Runtime: ") && log.contains("libonnxruntime.so"),
        "{log}"
    );
    // String labels and ZipMap maps by label.
    let (_, out) = predict(&s, "Rf", json!([[5.1, 3.5, 1.4, 0.2]]));
    assert_eq!(out["result"]["output_label"], json!(["setosa"]), "{out}");
    assert!(
        out["result"]["output_probability"][0]["setosa"].is_number(),
        "{out}"
    );

    // Records by input name; a wrong name or width is a clear 422.
    let (st, out) = predict(&s, "LrPlain", json!([{"X": [5.1, 3.5, 1.4, 0.2]}]));
    assert_eq!(st, 200, "{out}");
    assert_eq!(out["result"]["label"], json!([0]), "{out}");
    let (st, out) = predict(&s, "LrPlain", json!([{"features": [5.1, 3.5, 1.4, 0.2]}]));
    assert_eq!(st, 422, "{out}");
    let msg = out["error"]["message"].as_str().unwrap();
    assert!(msg.contains("not an input") && msg.contains("X"), "{msg}");
    let (st, out) = predict(&s, "LrPlain", json!([[5.1, 3.5]]));
    assert_eq!(st, 422, "{out}");
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("4 values"),
        "{out}"
    );

    // A batch through ONNX: per-row labels and probabilities as columns.
    let mut csv = String::from("a,b,c,d\n");
    for _ in 0..300 {
        csv.push_str("6.7,3.0,5.2,2.3\n5.1,3.5,1.4,0.2\n");
    }
    let (st, text) = s.raw(
        Some(&s.token),
        "POST",
        "/api/v1/models/admin/LrPlain/batch?chunk_rows=100",
        Some(csv),
        &[("content-type", "text/csv")],
    );
    assert_eq!(st, 202, "{text}");
    let made: Value = serde_json::from_str(&text).unwrap();
    let tree = made["tree"].as_str().unwrap();
    let t = s.wait_tree(tree, Duration::from_secs(300));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let (_, text) = s.raw(
        Some(&s.token),
        "GET",
        &format!("/api/v1/jobs/{tree}/result"),
        None,
        &[],
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 601);
    assert!(
        lines[0].starts_with("a,b,c,d,label,probabilities"),
        "{}",
        lines[0]
    );
    for (i, l) in lines[1..].iter().enumerate() {
        let label = if i % 2 == 0 { ",2," } else { ",0," };
        assert!(l.contains(label), "row {}: {l}", i + 1);
    }

    // A corrupt model: the deploy fails at start, with the reason in the predictor's log.
    let bad = work.path().join("corrupt.onnx");
    std::fs::write(&bad, b"this is not a protobuf").unwrap();
    let t = deploy(&s, "Corrupt", &bad);
    assert_eq!(t["tree_state"], "failed", "{t:#}");
    let (_, m) = s.call("GET", "/api/v1/models/admin/Corrupt", None);
    let err = m["versions"][0]["error"].as_str().unwrap_or_default();
    assert!(err.starts_with("start: "), "{m:#}");
}

#[test]
fn a_missing_onnx_runtime_library_is_a_clear_error() {
    let e = muster_models::onnx::init(Path::new("/nonexistent/libonnxruntime.so.1"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot be used") && e.contains("ORT_DYLIB_PATH"),
        "{e}"
    );
    let not_ort = models::Scratch::new("not-ort");
    let fake = not_ort.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"\x7fELF garbage").unwrap();
    let e = muster_models::onnx::init(&fake).unwrap_err().to_string();
    assert!(e.contains("cannot be used"), "{e}");
}

#[test]
fn a_wrong_configured_onnx_runtime_library_fails_the_deploy_clearly() {
    // `[models] onnxruntime_lib` names the library every onnx deploy loads: a path that is
    // not one fails the environment step with the setting and the reason, before any
    // predictor starts (the model file is never looked at, so any bytes do).
    let not_ort = models::Scratch::new("not-ort-cfg");
    let fake = not_ort.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"\x7fELF garbage").unwrap();
    let lib = fake.to_string_lossy().into_owned();
    let cache = models::cache();
    let s = Server::start_with(move |c| {
        c.models.envs_dir = cache.join("envs").to_string_lossy().into_owned();
        c.models.wheels_dir = cache.join("wheels").to_string_lossy().into_owned();
        c.models.predictor_host = "127.0.0.1".into();
        c.models.onnxruntime_lib = lib;
    });
    let model = not_ort.path().join("model.onnx");
    std::fs::write(&model, b"never read").unwrap();
    let t = deploy(&s, "WrongLib", &model);
    assert_eq!(t["tree_state"], "failed", "{t:#}");
    let prepare = crate::harness::child(&t, "prepare admin/WrongLib v1");
    assert_eq!(prepare["state"], "failed", "{t:#}");
    let log = s.log(prepare["id"].as_str().unwrap());
    assert!(
        log.contains("[models] onnxruntime_lib")
            && log.contains(&*fake.to_string_lossy())
            && log.contains("cannot be used"),
        "{log}"
    );
    let (_, m) = s.call("GET", "/api/v1/models/admin/WrongLib", None);
    assert_eq!(m["versions"][0]["state"], "failed", "{m:#}");
    let err = m["versions"][0]["error"].as_str().unwrap_or_default();
    assert!(err.starts_with("prepare: "), "{m:#}");
    assert!(m["versions"][0]["processes"]
        .as_array()
        .is_none_or(|p| p.is_empty()));
}

/// A LogisticRegression as ONNX (no ZipMap), a 1M-row CSV of iris-like rows and onnxruntime's
/// own labels for it.
const MAKE_1M: &str = r#"
import sys
import numpy as np
import onnxruntime as rt
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from skl2onnx import to_onnx

out = sys.argv[1]
X, y = load_iris(return_X_y=True)
X = X.astype(np.float32)
lr = LogisticRegression(max_iter=1000).fit(X, y)
m = to_onnx(lr, X[:1], options={id(lr): {"zipmap": False}}, target_opset=15)
open(f"{out}/lr.onnx", "wb").write(m.SerializeToString())
rng = np.random.default_rng(7)
lo, hi = X.min(axis=0), X.max(axis=0)
rows = np.round(lo + rng.random((1_000_000, 4)) * (hi - lo), 1).astype(np.float32)
with open(f"{out}/input.csv", "w") as f:
    f.write("a,b,c,d\n")
    np.savetxt(f, rows, fmt="%.1f", delimiter=",")
# What muster sends is the CSV's text parsed again: score that, not the array in memory.
back = np.loadtxt(f"{out}/input.csv", delimiter=",", skiprows=1, dtype=np.float32)
labels = rt.InferenceSession(f"{out}/lr.onnx").run(["label"], {"X": back})[0]
open(f"{out}/own.txt", "w").write("\n".join(str(int(v)) for v in labels))
"#;

#[test]
fn a_million_rows_through_the_onnx_runtime_keep_order_and_onnxruntime_s_answers() {
    let env = convert_env();
    let work = models::Scratch::new("onnx-1m");
    let st = std::process::Command::new(env.python())
        .arg("-c")
        .arg(MAKE_1M)
        .arg(work.path())
        .status()
        .unwrap();
    assert!(st.success(), "making the model and the CSV");
    let own = std::fs::read_to_string(work.path().join("own.txt")).unwrap();
    let own: Vec<&str> = own.lines().collect();
    assert_eq!(own.len(), 1_000_000);
    let cache = models::cache();
    let s = Server::start_with(move |c| {
        c.models.envs_dir = cache.join("envs").to_string_lossy().into_owned();
        c.models.wheels_dir = cache.join("wheels").to_string_lossy().into_owned();
        c.models.predictor_host = "127.0.0.1".into();
    });
    let t = deploy(&s, "Lr1m", &work.path().join("lr.onnx"));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let csv = std::fs::read_to_string(work.path().join("input.csv")).unwrap();
    let t0 = std::time::Instant::now();
    let (st, text) = s.raw(
        Some(&s.token),
        "POST",
        "/api/v1/models/admin/Lr1m/batch?output=id",
        Some(csv),
        &[("content-type", "text/csv")],
    );
    assert_eq!(st, 202, "{text}");
    let made: Value = serde_json::from_str(&text).unwrap();
    let tree = made["tree"].as_str().unwrap();
    let t = s.wait_tree(tree, Duration::from_secs(600));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let (st, text) = s.raw(
        Some(&s.token),
        "GET",
        &format!("/api/v1/jobs/{tree}/result"),
        None,
        &[],
    );
    assert_eq!(st, 200);
    eprintln!("1M rows through onnx: {:?}", t0.elapsed());
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("row,label,probabilities"));
    let mut n = 0;
    for (i, line) in lines.enumerate() {
        let mut f = line.splitn(3, ',');
        assert_eq!(f.next(), Some((i + 1).to_string().as_str()), "{line}");
        assert_eq!(f.next(), Some(own[i]), "row {}: {line}", i + 1);
        n += 1;
    }
    assert_eq!(n, own.len());
}
