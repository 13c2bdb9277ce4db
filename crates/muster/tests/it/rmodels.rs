//! The `r` runtime (SPEC §8): a linear model trained and saved by the test with Debian's R,
//! deployed as a bundle (`"runtime": "r"`, `model.R` defining `execute(data)`), served by
//! persistent `Rscript` workers; its answers equal R's own `predict`; an R error is a 422 with
//! its type and message; a worker killed is replaced; a batch runs through it; a requirement
//! that is not a Debian package is refused.

use crate::harness::Server;
use crate::model_support::Scratch;
use crate::support::{http, wait_until};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const MODEL_R: &str = r#"fit <- readRDS("model.rds")
execute <- function(data) {
  if (is.list(data) && !is.data.frame(data) && !is.null(data$fail)) stop(data$fail)
  if (is.list(data) && !is.data.frame(data) && !is.null(data$pid)) return(Sys.getpid())
  predict(fit, newdata = as.data.frame(data))
}
"#;

const TRAIN_R: &str = r#"args <- commandArgs(trailingOnly = TRUE)
fit <- lm(dist ~ speed, data = cars)
saveRDS(fit, file.path(args[[1]], "model.rds"))
speeds <- c(4, 10, 17.5, 25, 31.25)
cat(sprintf("%.17g", predict(fit, newdata = data.frame(speed = speeds))), sep = "\n")
"#;

/// Writes the bundle into `dir`, trains the model with R; answers R's own predictions of the
/// speeds in TRAIN_R.
fn cars_bundle(dir: &Path, requirements: Value) -> Vec<f64> {
    std::fs::write(
        dir.join("bundle.json"),
        json!({"name": "Cars", "runtime": "r", "entrypoint": "model.R", "workers": 2,
               "requirements": requirements, "example": {"data": [{"speed": 10}]}})
        .to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("model.R"), MODEL_R).unwrap();
    let train = dir.join("train.R");
    std::fs::write(&train, TRAIN_R).unwrap();
    let out = std::process::Command::new("Rscript")
        .arg("--vanilla")
        .arg(&train)
        .arg(dir)
        .output()
        .expect("Rscript (scripts/test installs r-base-core and r-cran-jsonlite)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&train).unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

fn upload(s: &Server, dir: &Path) -> (u16, Value) {
    let mut archive = Vec::new();
    muster_models::archive::pack(dir, &mut archive).unwrap();
    let req = ureq::http::Request::builder()
        .method("POST")
        .uri(format!("{}/api/v1/models/admin/Cars", s.url))
        .header("authorization", format!("Bearer {}", s.token))
        .header("content-type", "application/gzip")
        .body(archive)
        .unwrap();
    let mut resp = http().run(req).unwrap();
    let st = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (st, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn predict(s: &Server, data: Value) -> (u16, Value) {
    s.call(
        "POST",
        "/api/v1/models/admin/Cars/predict",
        Some(json!({ "data": data })),
    )
}

#[test]
fn an_r_linear_model_is_served_by_persistent_rscript_workers() {
    let dir = Scratch::new("r-cars");
    let own = cars_bundle(dir.path(), json!([]));
    let envs = Scratch::new("r-envs");
    let envs_dir = envs.path().to_string_lossy().into_owned();
    let s = Server::start_with(move |c| {
        c.models.envs_dir = envs_dir;
        c.models.predictor_host = "127.0.0.1".into();
        c.hq.max_file_size = 256;
    });

    // A requirement that is not a Debian package: refused at upload.
    let bad = Scratch::new("r-bad");
    cars_bundle(bad.path(), json!(["randomForest"]));
    let (st, out) = upload(&s, bad.path());
    assert_eq!(st, 422, "{out}");
    let msg = out["error"]["message"].as_str().unwrap();
    assert!(msg.contains("Debian") && msg.contains("CRAN"), "{msg}");

    let (st, made) = upload(&s, dir.path());
    assert_eq!(st, 202, "{made}");
    let t = s.wait_tree(made["tree"].as_str().unwrap(), Duration::from_secs(300));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let prepare = s.log(
        crate::harness::child(&t, "prepare admin/Cars v1")["id"]
            .as_str()
            .unwrap(),
    );
    assert!(
        prepare.contains("R: ") && prepare.contains("environment r-"),
        "{prepare}"
    );

    // Records, as R's predict sees a data.frame; equal to R's own predict.
    let speeds = [4.0, 10.0, 17.5, 25.0, 31.25];
    let records: Vec<Value> = speeds.iter().map(|v| json!({"speed": v})).collect();
    let (st, out) = predict(&s, json!(records));
    assert_eq!(st, 200, "{out}");
    assert_eq!(out["version"], 1);
    let got: Vec<f64> = out["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), own.len());
    for (g, o) in got.iter().zip(&own) {
        assert!(
            (g - o).abs() <= 1e-9 * o.abs().max(1.0),
            "{got:?} vs {own:?}"
        );
    }
    // Columns too; one row is still a list.
    let (st, out) = predict(&s, json!({"speed": [10]}));
    assert_eq!(st, 200, "{out}");
    assert!(
        (out["result"][0].as_f64().unwrap() - own[1]).abs() < 1e-9,
        "{out}"
    );

    // An R error: 422 with its type and message.
    let (st, out) = predict(&s, json!({"fail": "speed out of range"}));
    assert_eq!(st, 422, "{out}");
    assert_eq!(out["error"]["exception"]["type"], "Error", "{out}");
    assert_eq!(out["error"]["exception"]["message"], "speed out of range");

    // The workers persist (the same pids answer), and one killed is replaced.
    let pid_of = || {
        let (st, out) = predict(&s, json!({"pid": true}));
        assert_eq!(st, 200, "{out}");
        out["result"][0].as_i64().unwrap() as i32
    };
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..20 {
        pids.insert(pid_of());
    }
    assert!(!pids.is_empty() && pids.len() <= 2, "{pids:?}");
    let victim = *pids.iter().next().unwrap();
    // SAFETY: a signal to a worker process this test's server started.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(60), || {
        let p = pid_of();
        p != victim && !pids.contains(&p)
    }));
    let (st, _) = predict(&s, json!(records));
    assert_eq!(st, 200);

    // A batch through R: records shape, the input order kept.
    let mut csv = String::from("speed\n");
    for i in 0..500 {
        csv.push_str(&format!("{}\n", 4 + i % 22));
    }
    let (st, text) = s.raw(
        Some(&s.token),
        "POST",
        "/api/v1/models/admin/Cars/batch?chunk_rows=120&shape=records",
        Some(csv.clone()),
        &[("content-type", "text/csv")],
    );
    assert_eq!(st, 202, "{text}");
    let made: Value = serde_json::from_str(&text).unwrap();
    let tree = made["tree"].as_str().unwrap();
    let t = s.wait_tree(tree, Duration::from_secs(300));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let (st, text) = s.raw(
        Some(&s.token),
        "GET",
        &format!("/api/v1/jobs/{tree}/result"),
        None,
        &[],
    );
    assert_eq!(st, 200, "{text}");
    let (b0, b1) = (
        own[0] - 4.0 * (own[1] - own[0]) / 6.0,
        (own[1] - own[0]) / 6.0,
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "speed,prediction");
    assert_eq!(lines.len(), 501);
    for (i, l) in lines[1..].iter().enumerate() {
        let (sp, p) = l.split_once(',').unwrap();
        let sp: f64 = sp.parse().unwrap();
        assert_eq!(sp, (4 + i % 22) as f64, "row {}", i + 1);
        let p: f64 = p.parse().unwrap();
        assert!((p - (b0 + b1 * sp)).abs() < 1e-6, "row {}: {l}", i + 1);
    }
}

#[test]
fn a_million_rows_through_the_r_runtime_keep_order_and_r_s_own_predictions() {
    let dir = Scratch::new("r-cars-1m");
    cars_bundle(dir.path(), json!([]));
    let rows = 1_000_000;
    let mut csv = String::with_capacity(rows * 6 + 8);
    csv.push_str("speed\n");
    for i in 0..rows {
        csv.push_str(&format!("{}.{}\n", 1 + i % 40, i % 10));
    }
    let input = dir.path().join("input.csv");
    std::fs::write(&input, &csv).unwrap();
    // R's own predict on the same file.
    let own_r = dir.path().join("own.R");
    std::fs::write(
        &own_r,
        "args <- commandArgs(trailingOnly = TRUE)\n\
         fit <- readRDS(file.path(args[[1]], 'model.rds'))\n\
         d <- read.csv(args[[2]])\n\
         writeLines(sprintf('%.17g', predict(fit, newdata = d)), args[[3]])\n",
    )
    .unwrap();
    let own_file = dir.path().join("own.txt");
    let out = std::process::Command::new("Rscript")
        .arg("--vanilla")
        .arg(&own_r)
        .arg(dir.path())
        .arg(&input)
        .arg(&own_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&own_r).unwrap();
    let own: Vec<f64> = std::fs::read_to_string(&own_file)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    std::fs::remove_file(&own_file).unwrap();
    std::fs::remove_file(&input).unwrap();
    assert_eq!(own.len(), rows);
    let envs = Scratch::new("r-envs-1m");
    let envs_dir = envs.path().to_string_lossy().into_owned();
    let s = Server::start_with(move |c| {
        c.models.envs_dir = envs_dir;
        c.models.predictor_host = "127.0.0.1".into();
        c.hq.max_file_size = 256;
    });
    let (st, made) = upload(&s, dir.path());
    assert_eq!(st, 202, "{made}");
    let t = s.wait_tree(made["tree"].as_str().unwrap(), Duration::from_secs(300));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let t0 = std::time::Instant::now();
    let (st, text) = s.raw(
        Some(&s.token),
        "POST",
        "/api/v1/models/admin/Cars/batch?shape=columns&output=id",
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
    eprintln!("1M rows through r: {:?}", t0.elapsed());
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("row,prediction"));
    let mut n = 0;
    for (i, line) in lines.enumerate() {
        let (row, p) = line.split_once(',').unwrap();
        assert_eq!(row, (i + 1).to_string(), "{line}");
        let p: f64 = p.parse().unwrap();
        assert!(
            (p - own[i]).abs() <= 1e-9 * own[i].abs().max(1.0),
            "row {}: {p} vs {}",
            i + 1,
            own[i]
        );
        n += 1;
    }
    assert_eq!(n, rows);
}
