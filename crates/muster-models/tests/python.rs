//! The Python runtime for real: environments built with the node's python3 and pip, and worker
//! pools serving a scikit-learn iris model (the environment and wheels are kept between runs).

mod support;

use muster_models::bundle::PythonConstraint;
use muster_models::pool::{Log, PoolConfig};
use muster_models::{EnvSpec, Envs, Error, Pool};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

#[test]
fn envs_are_built_once_under_a_lock_and_a_second_one_needs_no_network() {
    let py = python();
    let spec = EnvSpec {
        requirements: vec!["six==1.17.0".into()],
        no_deps: vec![],
    };
    let wheels = cache().join("wheels");
    let a = Scratch::new("envs-a");
    let envs_a = Envs::new(a.path().join("envs"), &wheels);
    // Two builds of one environment at once: one builds, the other waits and reuses it.
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut progress = Vec::new();
                    let env = envs_a.ensure(&spec, &py, &mut progress).unwrap();
                    (env, String::from_utf8(progress).unwrap())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results[0].0.dir, results[1].0.dir);
    let built: Vec<_> = results.iter().filter(|(e, _)| !e.reused).collect();
    assert_eq!(built.len(), 1, "{results:?}");
    assert!(
        built[0].1.contains("creating a venv with Python"),
        "{}",
        built[0].1
    );
    let leftovers: Vec<_> = std::fs::read_dir(a.path().join("envs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".build"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Another root, same wheel cache, pip's index unreachable: built from the cache alone.
    let b = Scratch::new("envs-b");
    let mut envs_b = Envs::new(b.path().join("envs"), &wheels);
    envs_b.pip_env = vec![("PIP_INDEX_URL".into(), "http://127.0.0.1:9/simple".into())];
    let t = Instant::now();
    let mut progress = Vec::new();
    let env = envs_b.ensure(&spec, &py, &mut progress).unwrap();
    let progress = String::from_utf8(progress).unwrap();
    assert!(!env.reused);
    assert!(
        progress.contains("from the wheel cache (no network)"),
        "{progress}"
    );
    assert!(!progress.contains("fetching wheels"), "{progress}");
    eprintln!(
        "a second environment from the wheel cache: {:?}",
        t.elapsed()
    );
    let out = std::process::Command::new(env.python())
        .args(["-c", "import six, sys; print(six.__version__, sys.prefix)"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.starts_with("1.17.0"), "{text}");
    assert!(
        text.contains(&env.key),
        "the renamed venv knows its place: {text}"
    );
    let activate = std::fs::read_to_string(env.dir.join("bin/activate")).unwrap();
    assert!(
        !activate.contains(".build-") && activate.contains(&env.key),
        "{activate}"
    );
    let mut again = Vec::new();
    assert!(envs_b.ensure(&spec, &py, &mut again).unwrap().reused);

    // The bundle's python constraint, against this interpreter, before anything is built.
    let dir = Scratch::new("constraint");
    std::fs::write(dir.path().join("model.py"), "class M:\n    pass\n").unwrap();
    std::fs::write(
        dir.path().join("bundle.json"),
        r#"{"name": "m", "runtime": "python", "entrypoint": "model.py:M", "python": ">=4"}"#,
    )
    .unwrap();
    let bundle = muster_models::Bundle::load(dir.path()).unwrap();
    let e = envs_b
        .ensure_bundle(&bundle, &py, &mut Vec::new())
        .unwrap_err();
    assert!(e.to_string().contains("the model needs Python >=4"), "{e}");
    py.check(&PythonConstraint::parse(">=3.8").unwrap())
        .unwrap();
    let e = py
        .check(&PythonConstraint::parse(">=4").unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("needs Python >=4") && e.contains(&py.version_text()),
        "{e}"
    );
}

fn config(
    bundle: &muster_models::Bundle,
    env: &muster_models::PythonEnv,
    log: &Captured,
) -> PoolConfig {
    let mut c = PoolConfig::new(bundle, env).unwrap();
    c.log = Arc::new(Mutex::new(log.clone())) as Log;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iris_pool_predicts_in_parallel_and_maps_python_errors() {
    let env = sklearn_env();
    let dir = Scratch::new("iris");
    let bundle = iris_bundle(dir.path(), &env);
    let log = Captured::default();
    let pool = Pool::start(config(&bundle, &env, &log)).await.unwrap();
    assert_eq!(pool.pids().len(), 2);
    assert_eq!(pool.call("[[5.1, 3.5, 1.4, 0.2]]").await.unwrap(), "[0]");
    assert_eq!(
        pool.call("[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]")
            .await
            .unwrap(),
        "[0,2]"
    );
    // Many calls at once, spread over both workers.
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let p = pool.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    p.call("[[6.7, 3.0, 5.2, 2.3]]").await.unwrap()
                } else {
                    p.call(r#"{"test": "pid"}"#).await.unwrap()
                }
            })
        })
        .collect();
    let mut pids = std::collections::BTreeSet::new();
    for (i, c) in calls.into_iter().enumerate() {
        let out = c.await.unwrap();
        if i % 2 == 0 {
            assert_eq!(out, "[2]");
        } else {
            pids.insert(out);
        }
    }
    assert!(!pids.is_empty() && pids.len() <= 2, "{pids:?}");
    // numpy values, NaN: made JSON.
    let v: serde_json::Value =
        serde_json::from_str(&pool.call(r#"{"test": "numpy"}"#).await.unwrap()).unwrap();
    assert_eq!(v["a"], serde_json::json!([0, 1, 2]));
    assert_eq!(v["f"], serde_json::json!(1.5));
    assert_eq!(v["nan"], serde_json::Value::Null);
    assert_eq!(v["p"].as_array().unwrap().len(), 3);
    // An exception: its type and message to the caller, its traceback to the log.
    match pool
        .call(r#"{"test": "raise", "message": "petal too long"}"#)
        .await
    {
        Err(Error::Model { kind, message }) => {
            assert_eq!(
                (kind.as_str(), message.as_str()),
                ("ValueError", "petal too long")
            );
        }
        other => panic!("{other:?}"),
    }
    let e = pool.call("[[1, 2]]").await.unwrap_err();
    assert!(
        matches!(&e, Error::Model { kind, .. } if kind == "ValueError"),
        "{e}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || log.text().contains("Traceback")).await,
        "{}",
        log.text()
    );
    assert!(log.text().contains("ValueError: petal too long"));
    let stats = pool.stats();
    assert_eq!((stats.restarts, stats.failovers), (0, 0));
    pool.stop().await;
    assert!(pool.pids().is_empty());
    assert!(matches!(
        pool.call("[[1, 2, 3, 4]]").await,
        Err(Error::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_call_is_replaced_and_its_call_fails_over_once() {
    let env = sklearn_env();
    let dir = Scratch::new("failover");
    let bundle = iris_bundle(dir.path(), &env);
    let log = Captured::default();
    let pool = Pool::start(config(&bundle, &env, &log)).await.unwrap();
    let marks = Scratch::new("marks");
    let data =
        serde_json::json!({"test": "sleep", "seconds": 0.3, "mark": marks.path()}).to_string();
    let p = pool.clone();
    let call = tokio::spawn(async move { p.call(&data).await });
    let first_pid = || -> Option<u32> {
        std::fs::read_dir(marks.path())
            .ok()?
            .flatten()
            .next()?
            .file_name()
            .to_str()?
            .parse()
            .ok()
    };
    assert!(wait_until(Duration::from_secs(10), || first_pid().is_some()).await);
    let victim = first_pid().unwrap();
    // SAFETY: a signal to the pool's own worker.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let answer = call.await.unwrap().unwrap();
    assert_ne!(answer, victim.to_string(), "answered by another worker");
    let stats = pool.stats();
    assert_eq!(stats.failovers, 1);
    assert!(
        wait_until(Duration::from_secs(20), || pool.pids().len() == 2
            && !pool.pids().contains(&victim))
        .await,
        "the dead worker is replaced: {:?}",
        pool.pids()
    );
    assert_eq!(pool.stats().restarts, 1);
    // A call that kills every worker it meets: tried twice, then the error.
    let e = pool.call(r#"{"test": "exit"}"#).await.unwrap_err();
    assert!(matches!(e, Error::WorkerDied(_)), "{e}");
    assert_eq!(pool.stats().failovers, 2);
    assert!(wait_until(Duration::from_secs(20), || pool.pids().len() == 2).await);
    assert_eq!(pool.call("[[5.1, 3.5, 1.4, 0.2]]").await.unwrap(), "[0]");
    // A worker that dies while idle is replaced too.
    let idle = pool.pids()[0];
    unsafe { libc::kill(idle as i32, libc::SIGKILL) };
    assert!(
        wait_until(Duration::from_secs(20), || pool.pids().len() == 2
            && !pool.pids().contains(&idle))
        .await
    );
    assert!(log.text().contains("died while idle"), "{}", log.text());
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_worker_times_out_and_a_full_queue_refuses_at_once() {
    let env = sklearn_env();
    let dir = Scratch::new("queue");
    let bundle = iris_bundle(dir.path(), &env);
    let log = Captured::default();
    let mut c = config(&bundle, &env, &log);
    c.workers = 1;
    c.queue = 1;
    c.timeout = Duration::from_millis(1500);
    let pool = Pool::start(c).await.unwrap();
    let t = Instant::now();
    let e = pool
        .call(r#"{"test": "sleep", "seconds": 60}"#)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(20), || pool.pids().len() == 1).await);
    assert_eq!(pool.stats().restarts, 1);
    // One call busy in the worker, one waiting: the third is refused at once.
    let marks = Scratch::new("queue-marks");
    let busy = serde_json::json!({"test": "sleep", "seconds": 1, "mark": marks.path()}).to_string();
    let p = pool.clone();
    let first = tokio::spawn(async move { p.call(&busy).await });
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_dir(marks.path())
            .unwrap()
            .next()
            .is_some())
        .await
    );
    let p = pool.clone();
    let second = tokio::spawn(async move { p.call("[[5.1, 3.5, 1.4, 0.2]]").await });
    assert!(wait_until(Duration::from_secs(5), || pool.stats().queued == 1).await);
    assert!(matches!(
        pool.call("[[5.1, 3.5, 1.4, 0.2]]").await,
        Err(Error::Overloaded)
    ));
    first.await.unwrap().unwrap();
    assert_eq!(second.await.unwrap().unwrap(), "[0]");
    pool.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_cannot_import_fails_to_start_with_its_python_error() {
    let env = sklearn_env();
    let dir = Scratch::new("broken");
    std::fs::write(
        dir.path().join("bundle.json"),
        r#"{"name": "Broken", "runtime": "python", "entrypoint": "model.py:Broken", "workers": 2}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model.py"),
        "import muster_no_such_module\n\nclass Broken:\n    def execute(self, data):\n        return data\n",
    )
    .unwrap();
    let bundle = muster_models::Bundle::load(dir.path()).unwrap();
    let log = Captured::default();
    let e = match Pool::start(config(&bundle, &env, &log)).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("started"),
    };
    assert!(
        e.contains("ModuleNotFoundError") && e.contains("muster_no_such_module"),
        "{e}"
    );
    assert!(!e.contains("Traceback"), "{e}");
    assert!(wait_until(Duration::from_secs(5), || log.text().contains("Traceback")).await);
}

fn yhat_capture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/yhat")
            .join(name),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_from_the_real_yhat_client_run_with_yhat_and_terragon_importable() {
    use muster_models::yhat::{decompress, model_part, YhatBundle, MAX_BUNDLE};
    // The deploy as the client sent it, multipart and zlib.
    let req: serde_json::Value =
        serde_json::from_slice(&yhat_capture("deploy_request.json")).unwrap();
    let body = yhat_capture("deploy_body.bin");
    let part = model_part(req["headers"]["Content-Type"].as_str().unwrap(), &body).unwrap();
    let greeter = decompress(part, MAX_BUNDLE).unwrap();
    let dirs: Vec<_> = (0..4).map(|i| Scratch::new(&format!("yhat-{i}"))).collect();
    let bundles: Vec<_> = [
        greeter,
        yhat_capture("deploy_body_py27.json"),
        yhat_capture("deploy_body_numpy.json"),
        yhat_capture("deploy_body_dfgreeter.json"),
    ]
    .iter()
    .zip(&dirs)
    .map(|(json, dir)| YhatBundle::parse(json).unwrap().write(dir.path()).unwrap())
    .collect();
    // The DataFrame model's environment (pandas, numpy, the yhat client's packages) serves all.
    let spec = EnvSpec::for_bundle(&bundles[3]);
    assert!(
        spec.no_deps.iter().any(|r| r.starts_with("yhat==")),
        "{spec:?}"
    );
    let env = envs()
        .ensure(&spec, &python(), &mut std::io::stderr())
        .unwrap();
    let json_response: serde_json::Value =
        serde_json::from_slice(&yhat_capture("predict_json_response.json")).unwrap();
    let df_response: serde_json::Value =
        serde_json::from_slice(&yhat_capture("predict_dataframe_response.json")).unwrap();
    let cases = [
        (
            r#"{"name": "Bea", "lang": "fr"}"#,
            &json_response["body"]["result"],
        ),
        (
            r#"{"name": "Bea", "lang": "fr"}"#,
            &json_response["body"]["result"],
        ),
        (
            r#"{"name": "Bea", "lang": "fr"}"#,
            &json_response["body"]["result"],
        ),
        (r#"{"name": ["Cy", "Di"]}"#, &df_response["body"]["result"]),
    ];
    for (bundle, (data, want)) in bundles.iter().zip(cases) {
        let log = Captured::default();
        let mut c = config(bundle, &env, &log);
        c.workers = 1;
        let pool = match Pool::start(c).await {
            Ok(p) => p,
            Err(e) => panic!("{}: {e}\n{}", bundle.name, log.text()),
        };
        let got: serde_json::Value = serde_json::from_str(&pool.call(data).await.unwrap()).unwrap();
        assert_eq!(&got, want, "{}", bundle.name);
        pool.stop().await;
    }
}
