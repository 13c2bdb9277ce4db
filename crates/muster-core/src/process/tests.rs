use super::*;
use serde_json::json;

fn spec(v: serde_json::Value) -> Result<ProcessDef, String> {
    let s: ProcessSpec = serde_json::from_value(v).map_err(|e| e.to_string())?;
    validate(&s, "alice", Defaults::default())
}

#[test]
fn the_spec_example_validates_with_every_part() {
    let p = spec(json!({ "name": "web", "tags": {"workspace": "acme"}, "shell": "exec python3 -m http.server $PORT",
      "env": {"MODE": "prod"}, "node_selector": {"type": "web"}, "ports": ["http"],
      "restart": "always", "backoff_base": "100ms", "backoff_max": "30s", "max_restarts": 5, "restart_window": "5m",
      "health": {"http": "/", "port": "http", "interval": "2s", "timeout": "1s", "failures": 3, "grace": "5s"},
      "stop_signal": "TERM", "kill_grace": "10s", "limits": {"memory": "256M", "cpu": 0.5, "pids": 100} }))
    .unwrap();
    assert_eq!(p.tags.workspace, "acme");
    assert_eq!(p.restart.backoff_base_ms, 100);
    assert_eq!(p.restart.backoff_max_ms, 30_000);
    assert_eq!(p.restart.window_ms, 300_000);
    assert_eq!(p.restart.mode, RestartMode::Always);
    let h = p.health.unwrap();
    assert_eq!(
        h.check,
        Check::Http {
            path: "/".into(),
            port: "http".into()
        }
    );
    assert_eq!(
        (h.interval_ms, h.timeout_ms, h.failures, h.grace_ms),
        (2000, 1000, 3, 5000)
    );
    assert_eq!(p.limits.memory, Some(256 << 20));
    assert_eq!(p.limits.cpu, Some(0.5));
    assert_eq!(p.limits.pids, Some(100));
    assert_eq!(p.kill_grace_ms, 10_000);
    // The least: a program; the workspace defaults to the caller's.
    let p = spec(json!({"name": "w", "exec": ["sleep", "9"]})).unwrap();
    assert_eq!(p.tags.workspace, "alice");
    assert_eq!(p.stop_signal, "TERM");
    assert!(p.health.is_none() && p.limits.is_empty());
    assert_eq!(port_env("http"), "MUSTER_PORT_HTTP");
}

#[test]
fn bad_specs_are_refused_with_a_reason_that_does_not_quote_them() {
    let cases = [
        (json!({"name": "w"}), "exec or shell"),
        (
            json!({"name": "w", "exec": ["a"], "shell": "b"}),
            "not both",
        ),
        (json!({"name": "w", "exec": []}), "program"),
        (
            json!({"name": "w", "exec": ["a"], "ports": ["http", "http"]}),
            "twice",
        ),
        (
            json!({"name": "w", "exec": ["a"], "ports": ["Bad Name"]}),
            "port name",
        ),
        (
            json!({"name": "w", "exec": ["a"], "limits": {"memory": "lots"}}),
            "limits.memory",
        ),
        (
            json!({"name": "w", "exec": ["a"], "limits": {"cpu": 0}}),
            "limits.cpu",
        ),
        (
            json!({"name": "w", "exec": ["a"], "limits": {"pids": 0}}),
            "limits.pids",
        ),
        (
            json!({"name": "w", "exec": ["a"], "health": {}}),
            "one of tcp, http or exec",
        ),
        (
            json!({"name": "w", "exec": ["a"], "health": {"tcp": "x"}}),
            "does not have",
        ),
        (
            json!({"name": "w", "exec": ["a"], "ports": ["a", "b"], "health": {"http": "/"}}),
            "needs a port",
        ),
        (
            json!({"name": "w", "exec": ["a"], "health": {"tcp": "x", "exec": ["y"]}}),
            "one of",
        ),
        (
            json!({"name": "w", "exec": ["a"], "backoff_base": "soon"}),
            "backoff_base",
        ),
        (
            json!({"name": "w", "exec": ["a"], "backoff_base": "10s", "backoff_max": "1s"}),
            "backoff_max",
        ),
        (
            json!({"name": "w", "exec": ["a"], "stop_signal": "SIGFOO"}),
            "stop_signal",
        ),
        (
            json!({"name": "w", "exec": ["a"], "env": {"MUSTER_X": "1"}}),
            "MUSTER_",
        ),
        (
            json!({"name": "w", "exec": ["a"], "cwd": "rel"}),
            "absolute",
        ),
        (
            json!({"name": "w", "exec": ["a"], "node": "n", "node_selector": {"a": "b"}}),
            "not both",
        ),
        (json!({"name": "", "exec": ["a"]}), "name"),
    ];
    for (v, want) in cases {
        let e = spec(v.clone()).unwrap_err();
        assert!(e.contains(want), "{v}: {e}");
        assert!(
            !e.contains("lots") && !e.contains("soon") && !e.contains("SIGFOO"),
            "{e}"
        );
    }
    // An unknown health kind is refused by the parser.
    assert!(spec(json!({"name": "w", "exec": ["a"], "health": {"grpc": "x"}})).is_err());
    assert!(spec(json!({"name": "w", "exec": ["a"], "restart": "sometimes"})).is_err());
}

#[test]
fn memory_sizes_parse_with_units() {
    for (v, n) in [
        (json!("64M"), 64u64 << 20),
        (json!("1G"), 1 << 30),
        (json!("1Gi"), 1 << 30),
        (json!("512MB"), 512 << 20),
        (json!(2097152), 2 << 20),
    ] {
        assert_eq!(parse_memory(&v).unwrap(), n, "{v}");
    }
    for v in [
        json!("lots"),
        json!("1X"),
        json!(-1),
        json!("100"),
        json!(true),
    ] {
        assert!(parse_memory(&v).is_err(), "{v}");
    }
}

fn policy(mode: RestartMode, max: u32) -> RestartPolicy {
    RestartPolicy {
        mode,
        backoff_base_ms: 100,
        backoff_max_ms: 1000,
        max_restarts: max,
        window_ms: 60_000,
    }
}

#[test]
fn backoff_doubles_to_its_cap_with_jitter_down_to_half() {
    let p = policy(RestartMode::Always, 5);
    assert_eq!(p.delay_ms(1, 0.999), 99);
    assert_eq!(p.delay_ms(1, 0.0), 50);
    assert_eq!(p.delay_ms(2, 0.0), 100);
    assert_eq!(p.delay_ms(3, 0.0), 200);
    assert_eq!(p.delay_ms(10, 0.0), 500);
    assert_eq!(p.delay_ms(40, 1.0), 1000);
    for n in 1..50 {
        for j in [0.0, 0.3, 0.99] {
            let d = p.delay_ms(n, j);
            assert!(d <= 1000 && d >= p.delay_ms(n, 0.0), "{n} {j} {d}");
        }
    }
    let zero = RestartPolicy {
        backoff_base_ms: 0,
        ..p
    };
    assert_eq!(zero.delay_ms(1, 0.5), 0);
}

#[test]
fn a_crash_loop_restarts_with_growing_backoff_then_fails_after_max_restarts() {
    let mut s = Supervision::new(policy(RestartMode::Always, 3), None);
    assert_eq!(s.state(), ProcState::Pending);
    let mut now = 0;
    let mut delays = Vec::new();
    loop {
        s.started(now);
        assert_eq!(s.state(), ProcState::Healthy);
        now += 10;
        match s.exited(Exit::Code(3), now, 0.0) {
            Next::RestartAt(t) => {
                assert_eq!(s.state(), ProcState::Restarting);
                assert_eq!(s.reason(), "exited 3");
                delays.push(t - now);
                now = t;
            }
            Next::Done => break,
        }
    }
    assert_eq!(delays, vec![50, 100, 200]);
    assert_eq!(s.state(), ProcState::Failed);
    assert!(
        s.reason().starts_with("exited 3 (restarted 3 times"),
        "{}",
        s.reason()
    );
    assert_eq!(s.restarts(), 3);
}

#[test]
fn restarts_outside_the_window_do_not_count_and_a_stable_run_resets_the_backoff() {
    let mut s = Supervision::new(policy(RestartMode::Always, 2), None);
    let mut now = 0;
    for _ in 0..10 {
        s.started(now);
        now += 40_000; // each run lasts longer than the window's half and than STABLE_MS
        match s.exited(Exit::Signal(9), now, 0.0) {
            Next::RestartAt(t) => {
                assert_eq!(t - now, 50, "a stable run restarts with the first delay");
                assert_eq!(s.reason(), "killed by signal 9");
                now = t;
            }
            Next::Done => panic!("restarts spread out never fail: {}", s.reason()),
        }
    }
}

#[test]
fn restart_modes_decide_what_an_exit_means() {
    let mut s = Supervision::new(policy(RestartMode::OnFailure, 5), None);
    s.started(0);
    assert_eq!(s.exited(Exit::Code(0), 5, 0.0), Next::Done);
    assert_eq!((s.state(), s.reason()), (ProcState::Stopped, "exited 0"));
    let mut s = Supervision::new(policy(RestartMode::OnFailure, 5), None);
    s.started(0);
    assert!(matches!(s.exited(Exit::Oom, 5, 0.0), Next::RestartAt(_)));
    assert_eq!(s.reason(), "oom");
    let mut s = Supervision::new(policy(RestartMode::Never, 5), None);
    s.started(0);
    assert_eq!(s.exited(Exit::Code(2), 5, 0.0), Next::Done);
    assert_eq!((s.state(), s.reason()), (ProcState::Failed, "exited 2"));
    let mut s = Supervision::new(policy(RestartMode::Always, 5), None);
    s.started(0);
    assert!(matches!(
        s.exited(Exit::Code(0), 5, 0.0),
        Next::RestartAt(_)
    ));
}

#[test]
fn a_program_that_cannot_start_fails_after_the_policy_without_a_hot_loop() {
    let mut s = Supervision::new(policy(RestartMode::Always, 4), None);
    let mut now = 0;
    let mut starts = 0;
    while let Next::RestartAt(t) = s.exited(Exit::CannotStart("no such file".into()), now, 0.5) {
        assert!(t > now, "every restart waits");
        now = t;
        starts += 1;
        assert!(starts < 100);
    }
    assert_eq!(s.state(), ProcState::Failed);
    assert!(s.reason().starts_with("no such file"), "{}", s.reason());
    assert_eq!(starts, 4);
}

#[test]
fn health_checks_make_it_healthy_then_unhealthy_after_failures_in_a_row() {
    let h = Health {
        check: Check::Tcp { port: "p".into() },
        interval_ms: 100,
        timeout_ms: 50,
        failures: 2,
        grace_ms: 1000,
    };
    let mut s = Supervision::new(policy(RestartMode::Always, 5), Some(&h));
    s.started(0);
    assert_eq!(s.state(), ProcState::Starting);
    // Within the grace, failures do not count.
    assert!(!s.health_failed("connection refused", 500));
    assert!(!s.health_failed("connection refused", 900));
    assert_eq!(s.state(), ProcState::Starting);
    s.health_ok();
    assert_eq!(s.state(), ProcState::Healthy);
    assert!(!s.health_failed("connection refused", 1100));
    s.health_ok(); // the count starts over
    assert!(!s.health_failed("connection refused", 1200));
    assert!(s.health_failed("connection refused", 1300));
    assert_eq!(s.state(), ProcState::Unhealthy);
    assert_eq!(s.reason(), "health check failed: connection refused");
    // Killed for it: the exit keeps the health reason and restarts.
    assert!(matches!(
        s.exited(Exit::Signal(15), 1400, 0.0),
        Next::RestartAt(_)
    ));
    assert_eq!(s.state(), ProcState::Restarting);
    assert_eq!(s.reason(), "health check failed: connection refused");
}

#[test]
fn stop_and_restart_requests() {
    let mut s = Supervision::new(policy(RestartMode::Always, 1), None);
    s.started(0);
    assert!(s.restart(), "a running process is killed first");
    assert_eq!(s.exited(Exit::Signal(15), 10, 0.0), Next::RestartAt(10));
    assert_eq!(
        (s.state(), s.reason()),
        (ProcState::Restarting, "restart asked")
    );
    s.started(10);
    // An asked-for restart does not count against max_restarts.
    assert!(matches!(
        s.exited(Exit::Code(1), 20, 0.0),
        Next::RestartAt(_)
    ));
    assert!(!s.stop(), "nothing runs while it waits to restart");
    assert_eq!((s.state(), s.reason()), (ProcState::Stopped, "stopped"));
    let mut s = Supervision::new(policy(RestartMode::Always, 1), None);
    s.started(0);
    assert!(s.stop());
    assert_eq!(s.exited(Exit::Signal(15), 10, 0.0), Next::Done);
    assert_eq!(s.state(), ProcState::Stopped);
    assert!(!s.restart(), "no restart once stopping");
    for st in [ProcState::Stopped, ProcState::Failed, ProcState::Lost] {
        assert!(st.is_final());
        assert_eq!(ProcState::parse(st.as_str()), Some(st));
    }
}
