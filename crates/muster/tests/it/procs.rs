//! Long-running processes (SPEC §5a) with real programs: python3's http.server started,
//! healthy and reachable on its port; restarts after kill -9, a crash loop, a missing program,
//! an unhealthy check; stop ending a setsid daemon (with and without a cgroup); bad input.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub fn create(s: &Server, spec: Value) -> String {
    let (st, body) = s.call("POST", "/api/v1/processes", Some(spec));
    assert_eq!(st, 201, "{body}");
    body["id"].as_str().unwrap().to_string()
}

pub fn get(s: &Server, id: &str) -> Value {
    let (st, body) = s.call("GET", &format!("/api/v1/processes/{id}"), None);
    assert_eq!(st, 200, "{body}");
    body
}

/// Waits until the process satisfies `cond`; returns it.
pub fn wait_for(s: &Server, id: &str, within: Duration, cond: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(within, || {
        last = get(s, id);
        cond(&last)
    });
    assert!(
        ok,
        "process {id} never got there within {within:?}: {last:#}"
    );
    last
}

fn alive(pid: i64) -> bool {
    // A zombie is not alive: look at its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

fn http_get(port: u64, path: &str) -> Option<(u16, String)> {
    let mut resp = http()
        .get(&format!("http://127.0.0.1:{port}{path}"))
        .call()
        .ok()?;
    let st = resp.status().as_u16();
    Some((st, resp.body_mut().read_to_string().unwrap_or_default()))
}

/// The log of process `id` as it stands.
fn log_of(s: &Server, id: &str) -> String {
    let (st, log) = s.raw(
        Some(&s.token),
        "GET",
        &format!("/api/v1/processes/{id}/log"),
        None,
        &[],
    );
    assert_eq!(st, 200, "{log}");
    log
}

fn web(name: &str) -> Value {
    json!({"name": name, "exec": ["python3", "-m", "http.server", "$PORT", "--bind", "127.0.0.1"],
        "ports": ["http"], "restart": "always", "backoff_base": "50ms", "backoff_max": "200ms",
        "health": {"http": "/", "interval": "300ms", "timeout": "1s", "failures": 2, "grace": "10s"},
        "kill_grace": "2s"})
}

#[test]
fn an_http_server_gets_healthy_serves_on_its_port_and_stops() {
    let s = Server::start();
    let dir = TempDir::new("web-root");
    std::fs::write(dir.0.join("hello.txt"), "hello from muster\n").unwrap();
    let mut spec = web("web");
    spec["cwd"] = json!(dir.0.to_str().unwrap());
    let id = create(&s, spec);
    let p = wait_for(&s, &id, Duration::from_secs(20), |p| {
        p["state"] == "healthy"
    });
    assert_eq!(p["node"], "node-1");
    assert_eq!(p["address"], "127.0.0.1");
    assert_eq!(p["reason"], "health check passed");
    let port = p["ports"]["http"].as_u64().unwrap();
    assert!((20000..=29999).contains(&port), "{p:#}");
    let (st, text) = http_get(port, "/hello.txt").expect("the server answers");
    assert_eq!((st, text.as_str()), (200, "hello from muster\n"));
    // The list shows it; filters work.
    let (_, list) = s.call("GET", "/api/v1/processes?state=healthy&node=node-1", None);
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == id.as_str()),
        "{list:#}"
    );
    let (_, none) = s.call("GET", "/api/v1/processes?state=failed", None);
    assert!(none["items"].as_array().unwrap().is_empty());
    // Its log: typed, time-stamped lines, the request among them.
    let ok = wait_until(Duration::from_secs(10), || {
        let log = log_of(&s, &id);
        log.contains(" err ")
            && log.contains("GET /hello.txt")
            && log.contains(" sys healthy: health check passed")
    });
    assert!(ok, "the log never showed the request");
    let pid = p["pid"].as_i64().unwrap();
    assert!(alive(pid));
    // Stop: the process ends, the port closes, the state says so.
    let (st, body) = s.call("POST", &format!("/api/v1/processes/{id}/stop"), None);
    assert_eq!(st, 202, "{body}");
    let p = wait_for(&s, &id, Duration::from_secs(10), |p| {
        p["state"] == "stopped"
    });
    assert_eq!(p["reason"], "stopped");
    assert!(wait_until(Duration::from_secs(5), || !alive(pid)));
    assert!(http_get(port, "/").is_none(), "still serving after stop");
    // Start again: a new generation, healthy again.
    let (st, _) = s.call("POST", &format!("/api/v1/processes/{id}/start"), None);
    assert_eq!(st, 202);
    let p = wait_for(&s, &id, Duration::from_secs(20), |p| {
        p["state"] == "healthy"
    });
    assert_eq!(p["gen"], 2);
    // Remove: stopped and gone.
    let pid = p["pid"].as_i64().unwrap();
    let (st, _) = s.call("DELETE", &format!("/api/v1/processes/{id}"), None);
    assert_eq!(st, 202);
    assert!(wait_until(Duration::from_secs(10), || !alive(pid)));
    let (st, _) = s.call("GET", &format!("/api/v1/processes/{id}"), None);
    assert_eq!(st, 404);
}

#[test]
fn kill_9_of_the_process_restarts_it_after_its_backoff_and_restart_restarts_it() {
    let s = Server::start();
    let id = create(&s, web("web"));
    let p = wait_for(&s, &id, Duration::from_secs(20), |p| {
        p["state"] == "healthy"
    });
    let pid = p["pid"].as_i64().unwrap();
    // SAFETY: SIGKILL to the test's own process's child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let p = wait_for(&s, &id, Duration::from_secs(20), |p| {
        p["state"] == "healthy" && p["pid"].as_i64().is_some_and(|n| n != pid)
    });
    assert_eq!(p["restarts"], 1, "{p:#}");
    assert!(!alive(pid));
    let port = p["ports"]["http"].as_u64().unwrap();
    assert_eq!(http_get(port, "/").map(|r| r.0), Some(200));
    let log = log_of(&s, &id);
    assert!(log.contains("restarting: killed by signal 9"), "{log}");
    // An asked-for restart: a new pid, same generation.
    let pid2 = p["pid"].as_i64().unwrap();
    let (st, _) = s.call("POST", &format!("/api/v1/processes/{id}/restart"), None);
    assert_eq!(st, 202);
    let p = wait_for(&s, &id, Duration::from_secs(20), |p| {
        p["state"] == "healthy" && p["pid"].as_i64().is_some_and(|n| n != pid2)
    });
    assert_eq!(p["gen"], 1);
    assert!(wait_until(Duration::from_secs(5), || !alive(pid2)));
}

#[test]
fn a_crash_loop_fails_after_max_restarts() {
    let s = Server::start();
    let t0 = Instant::now();
    let id = create(
        &s,
        json!({"name": "crasher", "shell": "echo starting; exit 3", "restart": "on-failure",
            "backoff_base": "50ms", "backoff_max": "100ms", "max_restarts": 3, "restart_window": "1m"}),
    );
    let p = wait_for(&s, &id, Duration::from_secs(20), |p| p["state"] == "failed");
    assert!(
        p["reason"]
            .as_str()
            .unwrap()
            .starts_with("exited 3 (restarted 3 times"),
        "{p:#}"
    );
    assert_eq!(p["restarts"], 3);
    // Backoff: at least 25 + 50 + 50 ms (jitter halves at most).
    assert!(t0.elapsed() >= Duration::from_millis(125));
    let log = log_of(&s, &id);
    assert_eq!(log.matches(" out starting").count(), 4, "{log}");
}

#[test]
fn a_missing_program_fails_with_no_such_file_after_the_policy_not_in_a_hot_loop() {
    let s = Server::start();
    let t0 = Instant::now();
    let id = create(
        &s,
        json!({"name": "ghost", "exec": ["/no/such/program"], "backoff_base": "100ms",
            "backoff_max": "1s", "max_restarts": 3}),
    );
    let p = wait_for(&s, &id, Duration::from_secs(20), |p| p["state"] == "failed");
    assert!(
        p["reason"].as_str().unwrap().starts_with("no such file"),
        "{p:#}"
    );
    assert_eq!(p["restarts"], 3);
    // 50 + 100 + 200 ms at the least: waited, not looped.
    assert!(
        t0.elapsed() >= Duration::from_millis(350),
        "{:?}",
        t0.elapsed()
    );
    let log = log_of(&s, &id);
    assert_eq!(log.matches("cannot start").count(), 4, "{log}");
}

#[test]
fn a_failing_health_check_makes_it_unhealthy_and_restarts_it() {
    let s = Server::start();
    let mut spec = web("web");
    spec["health"] = json!({"http": "/missing", "interval": "200ms", "failures": 2, "timeout": "1s", "grace": "3s"});
    spec["max_restarts"] = json!(100);
    let id = create(&s, spec);
    let p = wait_for(&s, &id, Duration::from_secs(30), |p| {
        p["restarts"].as_u64().is_some_and(|n| n >= 1)
    });
    let log = log_of(&s, &id);
    assert!(
        log.contains("unhealthy: health check failed: HTTP 404"),
        "{p:#}\n{log}"
    );
    // A tcp check on a port nothing listens on: connection refused.
    let id = create(
        &s,
        json!({"name": "deaf", "exec": ["sleep", "1000"], "ports": ["p"], "max_restarts": 100,
            "health": {"tcp": "p", "interval": "100ms", "failures": 1}}),
    );
    wait_for(&s, &id, Duration::from_secs(30), |p| {
        p["restarts"].as_u64().is_some_and(|n| n >= 1)
    });
    let log = log_of(&s, &id);
    assert!(
        log.contains("health check failed: connection refused"),
        "{log}"
    );
}

fn setsid_daemon_ends_with_stop(cgroups: bool) {
    let s = Server::start_with(|c| c.agent.cgroups = cgroups);
    let dir = TempDir::new("daemon");
    let pidfile = dir.0.join("daemon.pid");
    let id = create(
        &s,
        json!({"name": "forker", "shell": format!("setsid sh -c 'echo $$ > {}; exec sleep 1000' & exec sleep 1000", pidfile.display()),
            "kill_grace": "1s"}),
    );
    let p = wait_for(&s, &id, Duration::from_secs(20), |p| {
        p["state"] == "healthy"
    });
    assert!(wait_until(Duration::from_secs(10), || pidfile.exists()));
    let daemon: i64 = wait_read(&pidfile);
    let main = p["pid"].as_i64().unwrap();
    assert!(alive(daemon) && alive(main));
    s.call("POST", &format!("/api/v1/processes/{id}/stop"), None);
    wait_for(&s, &id, Duration::from_secs(15), |p| {
        p["state"] == "stopped"
    });
    assert!(
        wait_until(Duration::from_secs(5), || !alive(daemon) && !alive(main)),
        "the daemon survived the stop"
    );
}

fn wait_read(path: &std::path::Path) -> i64 {
    let mut n = 0;
    assert!(wait_until(Duration::from_secs(5), || {
        n = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        n > 0
    }));
    n
}

#[test]
fn stop_ends_a_setsid_daemon_with_a_cgroup() {
    setsid_daemon_ends_with_stop(true);
}

#[test]
fn stop_ends_a_setsid_daemon_with_the_process_group_fallback() {
    setsid_daemon_ends_with_stop(false);
}

#[test]
fn limits_are_applied_or_reported_unavailable_and_a_memory_hog_ends_as_oom() {
    let s = Server::start();
    let id = create(
        &s,
        json!({"name": "hog", "exec": ["python3", "-c", "import time\nx = bytearray(256 << 20)\nfor i in range(0, len(x), 4096): x[i] = 1\ntime.sleep(1000)"],
            "restart": "never", "limits": {"memory": "64M", "pids": 50}}),
    );
    let p = wait_for(&s, &id, Duration::from_secs(30), |p| {
        p["limits"]["status"] != "pending" && p["state"] != "pending"
    });
    let status = p["limits"]["status"].as_str().unwrap().to_string();
    let v1_group = memory_v1_group().map(|g| g.join("muster").join(format!("proc-{id}")));
    if memory_controller_here() {
        assert_eq!(
            status, "applied",
            "this host has a memory controller: {p:#}"
        );
    }
    if status == "applied" {
        let p = wait_for(&s, &id, Duration::from_secs(30), |p| p["state"] == "failed");
        assert_eq!(p["reason"], "oom", "{p:#}");
        // On a hybrid host (memory on cgroup v1 only) a v1 group holds the limit, and goes
        // with the process.
        let hybrid = !v2_offers("memory");
        let calm = create(
            &s,
            json!({"name": "calm", "exec": ["sleep", "1000"], "restart": "never",
                "limits": {"memory": "64M", "pids": 50}}),
        );
        let p = wait_for(&s, &calm, Duration::from_secs(30), |p| {
            p["state"] == "healthy"
        });
        assert_eq!(p["limits"]["status"], "applied", "{p:#}");
        let calm_group = memory_v1_group().map(|g| g.join("muster").join(format!("proc-{calm}")));
        if let (true, Some(g)) = (hybrid, &calm_group) {
            let limit = std::fs::read_to_string(g.join("memory.limit_in_bytes")).unwrap();
            assert_eq!(limit.trim(), (64u64 << 20).to_string());
        }
        let (st, _) = s.call("DELETE", &format!("/api/v1/processes/{calm}"), None);
        assert!(st < 300, "{st}");
        for g in [v1_group, calm_group].into_iter().flatten() {
            assert!(
                wait_until(Duration::from_secs(10), || !g.exists()),
                "{} is still there",
                g.display()
            );
        }
    } else {
        // This host has no memory controller to give: the process runs anyway, and says why.
        assert!(status.starts_with("unavailable: "), "{p:#}");
        assert!(status.len() > "unavailable: ".len() + 5, "{status}");
        wait_for(&s, &id, Duration::from_secs(30), |p| {
            p["state"] == "healthy"
        });
        s.call("POST", &format!("/api/v1/processes/{id}/stop"), None);
    }
}

/// Whether a root agent here can limit memory: the unified hierarchy offers the controller, or
/// a cgroup v1 memory hierarchy is mounted writable (the hybrid layout).
fn memory_controller_here() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    v2_offers("memory")
        || memory_v1_group().is_some_and(|g| {
            let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
            mounts.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(2) == Some(&"cgroup")
                    && f.get(3).is_some_and(|o| {
                        o.split(',').any(|x| x == "memory") && o.split(',').any(|x| x == "rw")
                    })
                    && g.starts_with(f[1])
            })
        })
}

/// Whether the unified hierarchy's root offers `controller`.
fn v2_offers(controller: &str) -> bool {
    [
        "/sys/fs/cgroup/cgroup.controllers",
        "/sys/fs/cgroup/unified/cgroup.controllers",
    ]
    .iter()
    .any(|f| {
        std::fs::read_to_string(f).is_ok_and(|c| c.split_whitespace().any(|x| x == controller))
    })
}

/// This process's own cgroup v1 memory group (under /sys/fs/cgroup/memory), if it has one.
fn memory_v1_group() -> Option<std::path::PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, names, path) = (f.next()?, f.next()?, f.next()?);
        names
            .split(',')
            .any(|n| n == "memory")
            .then_some(path.to_string())
    })?;
    let dir = std::path::Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

#[test]
fn bad_input_is_refused_and_nothing_is_made() {
    let s = Server::start();
    let bad = [
        json!({"name": "x", "exec": ["a"], "health": {"grpc": "p"}}),
        json!({"name": "x", "exec": ["a"], "ports": ["http", "http"]}),
        json!({"name": "x", "exec": ["a"], "limits": {"memory": "lots"}}),
        json!({"name": "x"}),
        json!({"name": "x", "exec": ["a"], "restart": "sometimes"}),
    ];
    for b in bad {
        let (st, body) = s.call("POST", "/api/v1/processes", Some(b.clone()));
        assert_eq!(st, 400, "{b}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(!msg.contains("lots") && msg.len() < 300, "{msg}");
    }
    let (_, list) = s.call("GET", "/api/v1/processes", None);
    assert!(list["items"].as_array().unwrap().is_empty(), "{list:#}");
    let (st, _) = s.call("GET", "/api/v1/processes/nope", None);
    assert_eq!(st, 400);
    let (st, _) = s.call(
        "GET",
        "/api/v1/processes/0193a000-0000-7000-8000-000000000000",
        None,
    );
    assert_eq!(st, 404);
}

#[test]
fn an_exhausted_port_range_fails_the_process_with_a_clear_reason() {
    let port = crate::support::free_port();
    let s = Server::start_with(|c| c.agent.port_range = format!("{port}-{port}"));
    let id = create(
        &s,
        json!({"name": "two", "exec": ["sleep", "100"], "ports": ["a", "b"]}),
    );
    let p = wait_for(&s, &id, Duration::from_secs(20), |p| p["state"] == "failed");
    assert!(
        p["reason"]
            .as_str()
            .unwrap()
            .starts_with("port range exhausted"),
        "{p:#}"
    );
}

fn call_up(
    up: &crate::crash::Up,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    crate::crash::call(&up.url, Some(token), method, path, body)
}

fn wait_up(
    up: &crate::crash::Up,
    token: &str,
    id: &str,
    within: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(within, || {
        last = call_up(up, token, "GET", &format!("/api/v1/processes/{id}"), None).1;
        cond(&last)
    });
    if !ok {
        // What the node saw, for the one who reads this: the supervisor's log and files.
        let log = ureq::get(format!("{}/api/v1/processes/{id}/log", up.url))
            .header("authorization", &format!("Bearer {token}"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default();
        let server = up.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let tail = |t: &str| {
            t.lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "process {id} never got there: {last:#}\n--- its log ---\n{}\n--- muster up ---\n{}",
            tail(&log),
            tail(&server)
        );
    }
    last
}

fn starts(counter: &std::path::Path) -> usize {
    std::fs::read_to_string(counter)
        .unwrap_or_default()
        .lines()
        .count()
}

/// `kill -9` of `muster up` (its embedded agent with it) and a clean stop: the process keeps
/// serving under its supervisor, the next `muster up` re-adopts it, and it ran once (its pid and
/// a counter file say so). `kill -9` of its supervisor: the agent kills what it left before it
/// starts it again, so there are never two copies.
#[test]
fn the_process_outlives_muster_up_and_is_adopted_never_running_twice() {
    let dir = TempDir::new("up-procs");
    let counter = dir.0.join("starts");
    let mut up = crate::crash::Up::start(&dir.0);
    let token = crate::crash::setup(&up, &dir.0);
    let (st, body) = call_up(
        &up,
        &token,
        "POST",
        "/api/v1/processes",
        Some(json!({"name": "web", "ports": ["http"],
            "shell": format!("echo start >> {}; exec python3 -m http.server $PORT --bind 127.0.0.1", counter.display()),
            "health": {"tcp": "http", "interval": "200ms", "grace": "10s"}, "kill_grace": "2s"})),
    );
    assert_eq!(st, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let p = wait_up(&up, &token, &id, Duration::from_secs(30), |p| {
        p["state"] == "healthy"
    });
    let (pid, port) = (
        p["pid"].as_i64().unwrap(),
        p["ports"]["http"].as_u64().unwrap(),
    );
    up.kill9();
    assert_eq!(
        http_get(port, "/").map(|r| r.0),
        Some(200),
        "not serving after kill -9 of muster up"
    );
    assert!(alive(pid));
    let mut up = crate::crash::Up::start(&dir.0);
    // Re-adopted: the new agent reports it (a fresh update), with the same pid.
    let before = p["updated_at"].clone();
    let p = wait_up(&up, &token, &id, Duration::from_secs(30), |p| {
        p["state"] == "healthy" && p["updated_at"] != before
    });
    assert_eq!(p["pid"].as_i64(), Some(pid), "{p:#}");
    // A clean stop leaves it running too.
    up.stop();
    assert_eq!(http_get(port, "/").map(|r| r.0), Some(200));
    let up = crate::crash::Up::start(&dir.0);
    let before = p["updated_at"].clone();
    let p = wait_up(&up, &token, &id, Duration::from_secs(30), |p| {
        p["state"] == "healthy" && p["updated_at"] != before
    });
    assert_eq!(p["pid"].as_i64(), Some(pid));
    assert_eq!(starts(&counter), 1, "ran more than once");
    // The adopted supervisor takes requests: a restart runs it a second time, in place.
    let (st, _) = call_up(
        &up,
        &token,
        "POST",
        &format!("/api/v1/processes/{id}/restart"),
        None,
    );
    assert_eq!(st, 202);
    let p = wait_up(&up, &token, &id, Duration::from_secs(30), |p| {
        p["state"] == "healthy" && p["pid"].as_i64().is_some_and(|n| n != pid)
    });
    assert!(!alive(pid));
    assert_eq!(starts(&counter), 2);
    // kill -9 of the supervisor: what it ran is killed, then it starts again, once.
    let pid = p["pid"].as_i64().unwrap();
    let started: Value = serde_json::from_slice(
        &std::fs::read(dir.0.join("agent/procs").join(&id).join("started.json")).unwrap(),
    )
    .unwrap();
    let sup = started["sid"].as_i64().unwrap();
    // SAFETY: SIGKILL to the supervisor this test's muster up started.
    unsafe { libc::kill(sup as i32, libc::SIGKILL) };
    let p = wait_up(&up, &token, &id, Duration::from_secs(30), |p| {
        p["state"] == "healthy" && p["pid"].as_i64().is_some_and(|n| n != pid)
    });
    assert!(!alive(pid), "the old copy still runs");
    assert_eq!(starts(&counter), 3);
    let new_pid = p["pid"].as_i64().unwrap();
    call_up(
        &up,
        &token,
        "DELETE",
        &format!("/api/v1/processes/{id}"),
        None,
    );
    assert!(wait_until(Duration::from_secs(10), || !alive(new_pid)));
}

/// The internal API the services and models use: start a process, health-watch it, learn its
/// address, stop it — no HTTP.
#[test]
fn the_internal_api_starts_watches_addresses_and_stops_a_process() {
    let s = Server::start();
    let spec: muster_core::process::ProcessSpec = serde_json::from_value(web("internal")).unwrap();
    let def = muster_core::process::validate(&spec, "admin", Default::default()).unwrap();
    let procs = s.app.processes.clone();
    let p = procs.start(def, "admin", true).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let healthy = rt
        .block_on(procs.wait_for(p.id, Duration::from_secs(20), |p| {
            p.state == muster_core::process::ProcState::Healthy
        }))
        .unwrap()
        .unwrap();
    assert_eq!(
        healthy.state,
        muster_core::process::ProcState::Healthy,
        "{healthy:?}"
    );
    let addr = procs
        .address(p.id)
        .unwrap()
        .expect("an address once it runs");
    assert_eq!(addr.host, "127.0.0.1");
    let port = addr.ports["http"];
    assert_eq!(http_get(port as u64, "/").map(|r| r.0), Some(200));
    procs.stop(p.id).unwrap();
    let stopped = rt
        .block_on(procs.wait_for(p.id, Duration::from_secs(20), |p| p.state.is_final()))
        .unwrap()
        .unwrap();
    assert_eq!(stopped.state, muster_core::process::ProcState::Stopped);
    assert!(http_get(port as u64, "/").is_none());
}

/// With `agent.stop_processes` (`muster agent --stop-processes`), a clean stop of `muster up`
/// stops its processes too; without it they run on (the test above).
#[test]
fn stop_processes_stops_them_with_the_agent() {
    let dir = TempDir::new("up-stop-procs");
    let mut up = crate::crash::Up::start_env(&dir.0, &[("MUSTER_AGENT__STOP_PROCESSES", "true")]);
    let token = crate::crash::setup(&up, &dir.0);
    let mut spec = web("web");
    spec["kill_grace"] = json!("1s");
    let (st, body) = call_up(&up, &token, "POST", "/api/v1/processes", Some(spec));
    assert_eq!(st, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let p = wait_up(&up, &token, &id, Duration::from_secs(30), |p| {
        p["state"] == "healthy"
    });
    let pid = p["pid"].as_i64().unwrap();
    up.stop();
    assert!(!alive(pid), "still running after muster up stopped");
    let ended: Value = serde_json::from_slice(
        &std::fs::read(dir.0.join("agent/procs").join(&id).join("exit.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ended["status"]["state"], "stopped", "{ended:#}");
}

/// The CPU time (utime + stime, in clock ticks) `pid` has used.
fn cpu_ticks(pid: i64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap()
}

/// The supervisor of process `id` on the server's embedded agent.
fn supervisor_of(s: &Server, id: &str) -> i64 {
    let path = s.dir.0.join("agent/procs").join(id).join("started.json");
    assert!(wait_until(Duration::from_secs(20), || path.exists()));
    let started: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    started["sid"].as_i64().unwrap()
}

#[test]
fn an_idle_supervisor_sleeps_with_no_check_and_while_it_waits_to_restart() {
    let s = Server::start();
    // No health check at all, and a check whose process waits out a long backoff: neither has
    // a timer due, so their supervisors must sleep in their poll, not spin on a past deadline.
    let quiet = create(&s, json!({"name": "quiet", "exec": ["sleep", "infinity"]}));
    let waiting = create(
        &s,
        json!({"name": "waiting", "shell": "exit 1", "restart": "always",
            "backoff_base": "1m", "backoff_max": "1m",
            "health": {"exec": ["true"], "interval": "50ms", "timeout": "1s"}}),
    );
    wait_for(&s, &quiet, Duration::from_secs(20), |p| {
        p["state"] == "healthy"
    });
    wait_for(&s, &waiting, Duration::from_secs(20), |p| {
        p["state"] == "restarting"
    });
    let sups = [supervisor_of(&s, &quiet), supervisor_of(&s, &waiting)];
    let before = sups.map(cpu_ticks);
    let t0 = Instant::now();
    // A spinning supervisor uses a whole core, even a loaded machine gives it far more than the
    // bound below; a sleeping one wakes about once a second.
    std::thread::sleep(Duration::from_secs(2));
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for (i, sup) in sups.iter().enumerate() {
        let used = (cpu_ticks(*sup) - before[i]) as f64 / hz;
        let share = used / t0.elapsed().as_secs_f64();
        assert!(
            share < 0.1,
            "supervisor {sup} used {:.0} % of a core while idle",
            share * 100.0
        );
    }
}
