//! `muster predictor`, the real binary: the iris model (real scikit-learn, the environment kept
//! between runs by muster-models' test support) served on port 0 through its worker pool.

use crate::model_support as models;

use crate::support::{http, wait_until};
use serde_json::{json, Value};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn post(addr: &str, body: &str) -> (u16, Option<String>, Value) {
    let req = ureq::http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/predict"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .unwrap();
    let mut resp = http().run(req).unwrap();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (
        resp.status().as_u16(),
        retry,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

#[test]
fn the_predictor_serves_iris_with_a_bounded_queue_and_a_timeout() {
    let env = models::sklearn_env();
    let dir = models::Scratch::new("predictor");
    models::iris_bundle(dir.path(), &env);
    let mut child = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args([
            "predictor",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--queue",
            "1",
        ])
        .args(["--timeout", "8"])
        .arg("--bundle")
        .arg(dir.path())
        .arg("--env")
        .arg(&env.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the address");
    let addr = line.strip_prefix("listening on ").expect(&line).to_string();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );

    // The health check calls the bundle's example.
    let mut health = http().get(format!("http://{addr}/healthz")).call().unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(health.body_mut().read_to_string().unwrap(), "ok\n");
    let (st, _, v) = post(
        &addr,
        r#"{"data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}"#,
    );
    assert_eq!((st, v), (200, json!({"result": [0, 2]})));
    let (st, _, v) = post(
        &addr,
        r#"{"data": {"test": "raise", "message": "petal too long"}}"#,
    );
    assert_eq!(st, 422, "{v}");
    assert_eq!(
        v["error"]["exception"],
        json!({"type": "ValueError", "message": "petal too long"})
    );
    assert!(!v.to_string().contains("Traceback"), "{v}");
    let (st, _, v) = post(&addr, r#"{"rows": []}"#);
    assert_eq!(st, 400, "{v}");

    // The one worker busy: of three calls sent meanwhile, one waits in the queue (answered
    // later) and two are refused at once with Retry-After.
    let marks = models::Scratch::new("predictor-marks");
    let busy = json!({"data": {"test": "sleep", "seconds": 3, "mark": marks.path()}}).to_string();
    let a = addr.clone();
    let first = std::thread::spawn(move || post(&a, &busy));
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_dir(marks.path()).unwrap().next().is_some()
    }));
    let probes: Vec<_> = (0..3)
        .map(|_| {
            let a = addr.clone();
            std::thread::spawn(move || post(&a, r#"{"data": [[5.1, 3.5, 1.4, 0.2]]}"#))
        })
        .collect();
    let mut got: Vec<_> = probes
        .into_iter()
        .map(|p| {
            let (st, retry, _) = p.join().unwrap();
            (st, retry)
        })
        .collect();
    got.sort();
    let refused = (503, Some("1".to_string()));
    assert_eq!(got, vec![(200, None), refused.clone(), refused]);
    assert_eq!(first.join().unwrap().0, 200);

    // No answer in time: 504, and the stuck worker is replaced.
    let (st, _, v) = post(&addr, r#"{"data": {"test": "sleep", "seconds": 60}}"#);
    assert_eq!(st, 504, "{v}");
    assert!(wait_until(Duration::from_secs(30), || {
        post(&addr, r#"{"data": [[5.1, 3.5, 1.4, 0.2]]}"#).0 == 200
    }));

    // SAFETY: a signal to the test's own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut status = None;
    assert!(wait_until(Duration::from_secs(15), || {
        status = child.try_wait().unwrap();
        status.is_some()
    }));
    assert!(status.unwrap().success(), "{status:?}");
}
