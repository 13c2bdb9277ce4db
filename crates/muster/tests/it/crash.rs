//! Crash safety with the real binary (SPEC §4, "at most once"): `kill -9` of `muster up` in the
//! middle of a running tree, a clean stop, and `kill -9` of a supervisor.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `muster up` as a child process; killed on drop.
pub struct Up {
    child: Child,
    pub url: String,
    /// Everything it wrote to stderr so far (its log; passed on to ours as well).
    pub stderr: Arc<Mutex<String>>,
}

impl Up {
    pub fn start(dir: &Path) -> Up {
        Self::start_env(dir, &[])
    }

    /// `muster up` with more environment variables.
    pub fn start_env(dir: &Path, env: &[(&str, &str)]) -> Up {
        let mut child = Command::new(env!("CARGO_BIN_EXE_muster"))
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .env("MUSTER_JOBS__KILL_GRACE", "2s")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (err, seen) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let mut s = seen.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let url = loop {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "muster up ended before it was up"
            );
            if let Some(rest) = line.strip_prefix("muster is up at ") {
                break rest.split('/').take(3).collect::<Vec<_>>().join("/");
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in out.lines() {});
        Up { child, url, stderr }
    }

    /// Waits for the process to end by itself (a failpoint's SIGKILL); answers whether it did.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        wait_until(within, || self.child.try_wait().unwrap().is_some())
    }

    /// The pid of the `muster up` process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn stop(&mut self) {
        // SAFETY: SIGTERM to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let ok = wait_until(Duration::from_secs(10), || {
            self.child.try_wait().unwrap().is_some()
        });
        assert!(ok, "muster up did not stop on SIGTERM");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn call(
    url: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let agent = http();
    let mut req = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{url}{path}"))
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let mut resp = agent
        .run(
            req.body(body.map(|b| b.to_string()).unwrap_or_default())
                .unwrap(),
        )
        .unwrap();
    let st = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (st, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub fn setup(up: &Up, dir: &Path) -> String {
    let code = std::fs::read_to_string(dir.join("setup-code")).unwrap();
    let (st, body) = call(
        &up.url,
        None,
        "POST",
        "/api/v1/setup",
        Some(
            json!({"setup_code": code.trim(), "username": "admin", "password": "correct horse battery"}),
        ),
    );
    assert_eq!(st, 201, "{body}");
    body["token"].as_str().unwrap().to_string()
}

pub fn wait_tree(url: &str, token: &str, id: &str, within: Duration) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(within, || {
        let (st, t) = call(
            url,
            Some(token),
            "GET",
            &format!("/api/v1/jobs/{id}/tree"),
            None,
        );
        last = t;
        st == 200 && last["tree_state"] != "running"
    });
    assert!(ok, "tree still running: {last:#}");
    last
}

/// A tree whose every job appends its name to `marks` once per run; some jobs outlast the kill.
fn marked_tree(marks: &Path, gate: &Path) -> Value {
    let m = marks.display();
    let g = gate.display();
    let mut children = Vec::new();
    for i in 0..4 {
        children.push(json!({"name": format!("slow-{i}"), "shell": format!("echo slow-{i} >> {m}; while [ ! -e {g} ]; do sleep 0.02; done; echo slow-{i}-done >> {m}")}));
    }
    for i in 0..3 {
        children
            .push(json!({"name": format!("fast-{i}"), "shell": format!("echo fast-{i} >> {m}")}));
    }
    json!({"name": "crashy", "shell": format!("echo root >> {m}"), "children": [
        {"name": "mid", "shell": format!("echo mid >> {m}"), "children": children}
    ]})
}

fn check_once(marks: &Path, expected: &[&str]) {
    let text = std::fs::read_to_string(marks).unwrap();
    for e in expected {
        let n = text.lines().filter(|l| l == e).count();
        assert_eq!(n, 1, "{e} ran {n} times: {text}");
    }
}

/// Asserts that no job of the tree `v` was run a second time.
fn all_first_attempt(v: &Value) {
    assert_eq!(v["attempt"], 1, "{} restarted", v["name"]);
    for c in v["children"].as_array().unwrap() {
        all_first_attempt(c);
    }
}

fn run_through_a_stop(kill: bool) {
    let dir = TempDir::new("crash");
    let marks = dir.0.join("marks");
    let gate = dir.0.join("gate");
    let mut up = Up::start(&dir.0);
    let token = setup(&up, &dir.0);
    let (st, body) = call(
        &up.url,
        Some(&token),
        "POST",
        "/api/v1/jobs",
        Some(marked_tree(&marks, &gate)),
    );
    assert_eq!(st, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    // Wait until the slow jobs run (their first mark is written).
    assert!(wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&marks)
            .map(|t| (0..4).all(|i| t.contains(&format!("slow-{i}\n"))))
            .unwrap_or(false)
    }));
    if kill {
        up.kill9();
    } else {
        up.stop();
    }
    // The jobs go on without the server: let them finish while it is down.
    std::fs::write(&gate, b"").unwrap();
    let up2 = Up::start(&dir.0);
    let t = wait_tree(&up2.url, &token, &id, Duration::from_secs(30));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let mut expected: Vec<String> = vec!["root".into(), "mid".into()];
    for i in 0..4 {
        expected.push(format!("slow-{i}"));
        expected.push(format!("slow-{i}-done"));
    }
    for i in 0..3 {
        expected.push(format!("fast-{i}"));
    }
    let refs: Vec<&str> = expected.iter().map(String::as_str).collect();
    check_once(&marks, &refs);
    all_first_attempt(&t);
}

#[test]
fn kill_9_of_muster_up_mid_tree_loses_nothing_and_runs_nothing_twice() {
    run_through_a_stop(true);
}

#[test]
fn a_clean_stop_leaves_jobs_to_their_supervisors() {
    run_through_a_stop(false);
}

#[test]
fn kill_9_of_a_supervisor_fails_the_job_and_ends_its_processes() {
    let dir = TempDir::new("sup");
    let up = Up::start(&dir.0);
    let token = setup(&up, &dir.0);
    let pidfile = dir.0.join("pid");
    let (st, body) = call(
        &up.url,
        Some(&token),
        "POST",
        "/api/v1/jobs",
        Some(
            json!({"name": "victim", "shell": format!("echo $$ > {}.tmp; mv {0}.tmp {0}; exec sleep 30", pidfile.display())}),
        ),
    );
    assert_eq!(st, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    assert!(wait_until(Duration::from_secs(20), || pidfile.exists()));
    let child_pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let started: Value = serde_json::from_slice(
        &std::fs::read(
            dir.0
                .join("agent/jobs")
                .join(&id[id.len() - 2..])
                .join(format!("{id}.1"))
                .join("started.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let sid = started["sid"].as_i64().unwrap() as i32;
    // SAFETY: SIGKILL to the supervisor this test's server started.
    assert_eq!(unsafe { libc::kill(sid, libc::SIGKILL) }, 0);
    let t = wait_tree(&up.url, &token, &id, Duration::from_secs(20));
    assert_eq!(t["tree_state"], "failed");
    assert_eq!(t["error"], "supervisor lost");
    // The job's process went with its supervisor (a zombie until reaped counts as gone).
    let gone = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{child_pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    });
    assert!(
        gone,
        "the job's process {child_pid} survived its supervisor"
    );
}

/// Every process as (pid, parent pid, arguments).
fn processes() -> Vec<(i32, i32, Vec<String>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let (Ok(stat), Ok(cmdline)) = (
            std::fs::read_to_string(e.path().join("stat")),
            std::fs::read(e.path().join("cmdline")),
        ) else {
            continue;
        };
        let Some(ppid) = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        else {
            continue;
        };
        let args = String::from_utf8_lossy(&cmdline)
            .split('\0')
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        out.push((pid, ppid, args));
    }
    out
}

/// The supervisor launcher of the agent whose data dir is `agent`, if one runs.
fn launcher_of(agent: &Path) -> Option<i32> {
    let dir = agent.display().to_string();
    let found: Vec<i32> = processes()
        .into_iter()
        .filter(|(_, _, a)| {
            a.len() >= 4 && a[1] == "supervise" && a[2] == "--launcher" && a[3] == dir
        })
        .map(|(pid, _, _)| pid)
        .collect();
    assert!(found.len() <= 1, "two launchers for {dir}: {found:?}");
    found.first().copied()
}

#[test]
fn kill_9_of_the_supervisor_launcher_loses_nothing_and_runs_nothing_twice() {
    let dir = TempDir::new("launcher");
    let agent = dir.0.join("agent");
    let marks = dir.0.join("marks");
    let gate = dir.0.join("gate");
    let up = Up::start(&dir.0);
    let token = setup(&up, &dir.0);
    let (m, g) = (marks.display(), gate.display());
    // Two gated jobs run across the kill; ten more need them, so they start after it.
    let mut children = Vec::new();
    for i in 0..2 {
        children.push(json!({"name": format!("gated-{i}"), "key": format!("g{i}"), "shell": format!("echo gated-{i} >> {m}; while [ ! -e {g} ]; do sleep 0.02; done; echo gated-{i}-done >> {m}")}));
    }
    for i in 0..10 {
        children.push(json!({"name": format!("after-{i}"), "needs": ["g0", "g1"], "shell": format!("echo after-{i} >> {m}")}));
    }
    let (st, body) = call(
        &up.url,
        Some(&token),
        "POST",
        "/api/v1/jobs",
        Some(json!({"name": "final", "shell": format!("echo final >> {m}"), "children": children})),
    );
    assert_eq!(st, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    assert!(wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&marks)
            .map(|t| t.contains("gated-0\n") && t.contains("gated-1\n"))
            .unwrap_or(false)
    }));
    // The gated jobs' supervisors were forked by the launcher and show as `muster supervise DIR`.
    let launcher = launcher_of(&agent).expect("no supervisor launcher runs");
    let jobs_dir = agent.join("jobs").display().to_string();
    let forked = processes()
        .into_iter()
        .filter(|(_, ppid, a)| {
            *ppid == launcher && a.len() == 3 && a[1] == "supervise" && a[2].starts_with(&jobs_dir)
        })
        .count();
    assert_eq!(
        forked, 2,
        "the launcher should have forked both supervisors"
    );
    // SAFETY: SIGKILL to the launcher this test's server started.
    assert_eq!(unsafe { libc::kill(launcher, libc::SIGKILL) }, 0);
    std::fs::write(&gate, b"").unwrap();
    let t = wait_tree(&up.url, &token, &id, Duration::from_secs(30));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let mut expected = vec!["final".to_string()];
    for i in 0..2 {
        expected.push(format!("gated-{i}"));
        expected.push(format!("gated-{i}-done"));
    }
    for i in 0..10 {
        expected.push(format!("after-{i}"));
    }
    let refs: Vec<&str> = expected.iter().map(String::as_str).collect();
    check_once(&marks, &refs);
    all_first_attempt(&t);
    // The jobs after the kill went through a new launcher.
    let again = launcher_of(&agent).expect("no launcher after the kill");
    assert_ne!(again, launcher);
}

#[test]
fn a_stopped_supervisor_launcher_is_given_up_and_its_jobs_run_once() {
    let dir = TempDir::new("stuck");
    let agent = dir.0.join("agent");
    let marks = dir.0.join("marks");
    let up = Up::start(&dir.0);
    let token = setup(&up, &dir.0);
    let m = marks.display();
    // Each job marks its run only if its token works (it reaches the job through the launcher's
    // pipe, or, for the held one, the environment of a directly started supervisor).
    let exe = env!("CARGO_BIN_EXE_muster");
    let run = |name: &str| {
        let (st, body) = call(
            &up.url,
            Some(&token),
            "POST",
            "/api/v1/jobs",
            Some(
                json!({"name": name, "shell": format!("{exe} jobs show $MUSTER_JOB_ID > /dev/null && echo {name} >> {m}")}),
            ),
        );
        assert_eq!(st, 201, "{body}");
        body["id"].as_str().unwrap().to_string()
    };
    // A first job starts the launcher.
    let first = run("first");
    let t = wait_tree(&up.url, &token, &first, Duration::from_secs(20));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let stuck = launcher_of(&agent).expect("no supervisor launcher runs");
    // SAFETY: stopping the launcher this test's server started.
    assert_eq!(unsafe { libc::kill(stuck, libc::SIGSTOP) }, 0);
    let t0 = std::time::Instant::now();
    let held = run("held");
    let t = wait_tree(&up.url, &token, &held, Duration::from_secs(40));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    assert!(
        t0.elapsed() >= Duration::from_secs(9),
        "the job ran before the launcher was given up ({:?}): it was not handed to it",
        t0.elapsed()
    );
    // Let it go: it forks a supervisor for the request it held, which finds the attempt done,
    // and ends at the end of its input.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(stuck, libc::SIGCONT) }, 0);
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(format!("/proc/{stuck}/cmdline")).map_or(true, |c| c.is_empty())
        }),
        "the given-up launcher did not end"
    );
    let after = run("after");
    let t = wait_tree(&up.url, &token, &after, Duration::from_secs(20));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    check_once(&marks, &["first", "held", "after"]);
    let again = launcher_of(&agent).expect("no launcher for the later job");
    assert_ne!(again, stuck);
}

/// The directory of attempt 1 of `job` under the data dir `dir`, while not acknowledged.
fn first_attempt(dir: &Path, job: &str) -> std::path::PathBuf {
    dir.join("agent/jobs")
        .join(&job[job.len() - 2..])
        .join(format!("{job}.1"))
}

/// An attempt handed over but never started when the agent died has no token on disk: the
/// restarted agent gets its assignment again from the server and runs it once, with its token.
#[test]
fn a_never_started_attempt_runs_once_with_its_token_after_a_crash() {
    let dir = TempDir::new("unstarted");
    let agent = dir.0.join("agent");
    let marks = dir.0.join("marks");
    let mut up = Up::start(&dir.0);
    let token = setup(&up, &dir.0);
    let m = marks.display();
    let exe = env!("CARGO_BIN_EXE_muster");
    let run = |url: &str, name: &str| {
        let (st, body) = call(
            url,
            Some(&token),
            "POST",
            "/api/v1/jobs",
            Some(
                json!({"name": name, "shell": format!("{exe} jobs show $MUSTER_JOB_ID > /dev/null && echo {name} >> {m}")}),
            ),
        );
        assert_eq!(st, 201, "{body}");
        body["id"].as_str().unwrap().to_string()
    };
    let first = run(&up.url, "first");
    let t = wait_tree(&up.url, &token, &first, Duration::from_secs(20));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    // A stopped launcher takes the next attempt and starts nothing.
    let stuck = launcher_of(&agent).expect("no supervisor launcher runs");
    // SAFETY: stopping the launcher this test's server started.
    assert_eq!(unsafe { libc::kill(stuck, libc::SIGSTOP) }, 0);
    let late = run(&up.url, "late");
    let attempt = first_attempt(&dir.0, &late);
    assert!(
        wait_until(Duration::from_secs(5), || attempt
            .join("spec.json")
            .exists()),
        "the attempt was never handed over"
    );
    // Both die before the agent gives the launcher up (10 s): the attempt never started.
    up.kill9();
    // SAFETY: as above (SIGKILL ends a stopped process too).
    assert_eq!(unsafe { libc::kill(stuck, libc::SIGKILL) }, 0);
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{stuck}/stat")).map_or(true, |s| s.contains(") Z "))
    }));
    assert!(!attempt.join("started.json").exists());
    let spec = std::fs::read_to_string(attempt.join("spec.json")).unwrap();
    assert!(!spec.contains("MUSTER_TOKEN"), "{spec}");
    let up2 = Up::start(&dir.0);
    let t = wait_tree(&up2.url, &token, &late, Duration::from_secs(30));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    all_first_attempt(&t);
    check_once(&marks, &["first", "late"]);
}
