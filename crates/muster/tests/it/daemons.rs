//! A job's escaped daemons (`setsid` after a double fork: outside its process group and session)
//! end with the job, under the real supervisor: when its main process exits and when it is
//! aborted, with a cgroup of its own where this host has a writable cgroup v2 and with the
//! subreaper alone (`agent.cgroups = false`).

use crate::harness::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The directory of a job's attempt (renamed `.done` once acknowledged).
pub fn attempt_dir(s: &Server, job: &str, attempt: u32) -> PathBuf {
    let d = s
        .dir
        .0
        .join("agent/jobs")
        .join(&job[job.len() - 2..])
        .join(format!("{job}.{attempt}"));
    let done = PathBuf::from(format!("{}.done", d.display()));
    if done.exists() {
        done
    } else {
        d
    }
}

/// (state, session id) of a live process; `None` when it is gone or a zombie.
fn live(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    (state != 'Z').then_some(())?;
    Some((state, f.get(3)?.parse().ok()?))
}

/// A shell snippet that starts a daemon the way daemons leave: a subshell forks it and exits
/// (so it is orphaned), and it calls setsid (a session and group of its own). It keeps the
/// job's stdout open. It writes its pid to `pidfile` and, with `ignore_term`, ignores SIGTERM.
fn daemon(pidfile: &Path, ignore_term: bool) -> String {
    let p = pidfile.display();
    let trap = if ignore_term { "trap \"\" TERM; " } else { "" };
    format!(
        "(setsid sh -c '{trap}echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 1000' &); \
         while [ ! -e {p} ]; do sleep 0.01; done"
    )
}

fn read_pid(pidfile: &Path) -> i32 {
    assert!(
        wait_until(Duration::from_secs(20), || pidfile.exists()),
        "the job never started its daemon"
    );
    std::fs::read_to_string(pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Whether this host lets the agent give attempts cgroups; `None` (with the reason printed)
/// where it does not, e.g. a cgroup v1 host or a read-only /sys/fs/cgroup.
fn cgroups_here() -> Option<PathBuf> {
    match muster_agent::cgroup::base() {
        Ok(b) => Some(b),
        Err(why) => {
            eprintln!("SKIPPED (the cgroup variant): no writable cgroup v2 here: {why}");
            None
        }
    }
}

fn escaped_daemon_ends_with_its_job(cgroups: bool, abort: bool) {
    if cgroups && cgroups_here().is_none() {
        return;
    }
    let s = Server::start_with(|c| c.agent.cgroups = cgroups);
    let pidfile = s.dir.0.join("daemon.pid");
    // On a normal end the daemon ignores SIGTERM, so it takes the SIGKILL after the grace
    // period; the main process's own status (3) is what is recorded, not the daemon's.
    let shell = if abort {
        format!("{}; exec sleep 1000", daemon(&pidfile, false))
    } else {
        format!("{}; echo main done; exit 3", daemon(&pidfile, true))
    };
    let (id, _) = s.create(json!({"name": "daemonic", "shell": shell}));
    let pid = read_pid(&pidfile);
    let started: Value = serde_json::from_slice(
        &std::fs::read(attempt_dir(&s, &id, 1).join("started.json")).unwrap(),
    )
    .unwrap();
    let sid = started["sid"].as_i64().unwrap() as i32;
    let (_, daemon_sid) = live(pid).expect("the daemon runs");
    assert_ne!(
        daemon_sid, sid,
        "the daemon should have left the supervisor's session"
    );
    match (cgroups, started["cgroup"].as_str()) {
        (true, Some(cg)) => {
            let procs = std::fs::read_to_string(Path::new(cg).join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|l| l.trim() == pid.to_string()),
                "the daemon {pid} is not in the attempt's cgroup {cg}: {procs}"
            );
        }
        (false, None) => {}
        (_, cg) => panic!("cgroups = {cgroups} but started.json names cgroup {cg:?}"),
    }
    if abort {
        let (st, body) = s.call("POST", &format!("/api/v1/jobs/{id}/abort"), None);
        assert_eq!(st, 202, "{body}");
    }
    let t = s.wait_tree(&id, Duration::from_secs(30));
    // Recorded only once nothing of the job was left.
    assert!(
        live(pid).is_none(),
        "the daemon {pid} outlived its job: {t:#}"
    );
    if abort {
        assert_eq!(t["state"], "aborted", "{t:#}");
        assert_eq!(t["error"], "killed by signal 15", "{t:#}");
    } else {
        assert_eq!(t["state"], "failed", "{t:#}");
        assert_eq!(t["exit_code"], 3, "the main process's status: {t:#}");
        let log = s.log(&id);
        assert!(log.contains("out main done"), "{log}");
        assert!(log.contains("process(es) it left running"), "{log}");
        assert!(log.contains("grace period over: SIGKILL"), "{log}");
    }
    // Reaped, not left a zombie.
    assert!(
        wait_until(Duration::from_secs(5), || !Path::new(&format!(
            "/proc/{pid}"
        ))
        .exists()),
        "the daemon {pid} was left a zombie"
    );
    if let Some(cg) = started["cgroup"].as_str() {
        assert!(
            wait_until(Duration::from_secs(5), || !Path::new(cg).exists()),
            "the attempt's cgroup {cg} was not removed"
        );
    }
}

#[test]
fn an_escaped_daemon_ends_with_its_job_in_a_cgroup() {
    escaped_daemon_ends_with_its_job(true, false);
}

#[test]
fn an_escaped_daemon_ends_with_its_aborted_job_in_a_cgroup() {
    escaped_daemon_ends_with_its_job(true, true);
}

#[test]
fn an_escaped_daemon_ends_with_its_job_without_cgroups() {
    escaped_daemon_ends_with_its_job(false, false);
}

#[test]
fn an_escaped_daemon_ends_with_its_aborted_job_without_cgroups() {
    escaped_daemon_ends_with_its_job(false, true);
}
