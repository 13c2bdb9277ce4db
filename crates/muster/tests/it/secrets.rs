//! The node's secrets stay private: the data dir and what muster keeps in it are its user's
//! alone (0700 directories, 0600 files) from creation, loosened modes are repaired at start with
//! a warning, and a job's `MUSTER_TOKEN` reaches the job but no file on the node.

use crate::crash::{call, setup, wait_tree, Up};
use crate::harness::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn set_mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// Every directory and file under `dir` (itself included), with what is not private.
fn open_to_others(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if mode(&d) & 0o077 != 0 {
            out.push((d.clone(), mode(&d)));
        }
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let t = e.file_type().unwrap();
            if t.is_dir() && d == dir && e.file_name() == "hq" {
                // Headquarters is a git repository meant to be cloned and pushed (desired
                // state, no secrets; git writes it with the usual modes): private by its own
                // directory, which no other user may enter.
                if mode(&p) & 0o077 != 0 {
                    out.push((p.clone(), mode(&p)));
                }
            } else if t.is_dir() {
                todo.push(p);
            } else if t.is_file() && mode(&p) & 0o077 != 0 {
                out.push((p.clone(), mode(&p)));
            }
        }
    }
    out
}

/// The first (and here only) attempt directory of `job` under the data dir `data`.
fn attempt(data: &Path, job: &str) -> PathBuf {
    let d = data
        .join("agent/jobs")
        .join(&job[job.len() - 2..])
        .join(format!("{job}.1"));
    let done = PathBuf::from(format!("{}.done", d.display()));
    if done.exists() {
        done
    } else {
        d
    }
}

#[test]
fn the_data_dir_and_its_secrets_are_private_and_repaired_at_start() {
    let dir = TempDir::new("modes");
    let data = dir.0.join("data");
    let gate = dir.0.join("gate");
    let mut up = Up::start(&data);
    // (The embedded agent makes its directory as it starts, beside the server.)
    assert!(wait_until(Duration::from_secs(10), || data
        .join("agent/jobs")
        .exists()));
    // What the first start made, before anything else touches it.
    for (p, m) in [
        ("", 0o700),
        ("setup-code", 0o600),
        ("server-key", 0o600),
        ("server-id", 0o600),
        ("muster.db", 0o600),
        ("muster.db-wal", 0o600),
        ("muster.db-shm", 0o600),
        ("blobs", 0o700),
        ("agent", 0o700),
        ("agent/jobs", 0o700),
    ] {
        assert_eq!(mode(&data.join(p)), m, "{p}: {:o}", mode(&data.join(p)));
    }
    let token = setup(&up, &data);
    let create = |url: &str, body: Value| {
        let (st, body) = call(url, Some(&token), "POST", "/api/v1/jobs", Some(body));
        assert_eq!(st, 201, "{body}");
        body["id"].as_str().unwrap().to_string()
    };
    let done = create(&up.url, json!({"name": "hello", "shell": "echo hi"}));
    let t = wait_tree(&up.url, &token, &done, Duration::from_secs(20));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    // A job that runs across the restart below: its attempt is not acknowledged then.
    let g = gate.display();
    let held = create(
        &up.url,
        json!({"name": "held", "shell": format!("while [ ! -e {g} ]; do sleep 0.02; done")}),
    );
    let held_dir = attempt(&data, &held);
    assert!(wait_until(Duration::from_secs(20), || held_dir
        .join("started.json")
        .exists()));
    let done_dir = attempt(&data, &done);
    for f in ["spec.json", "started.json", "exit.json", "log", "lock"] {
        assert_eq!(mode(&done_dir.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&done_dir), 0o700);
    assert_eq!(mode(done_dir.parent().unwrap()), 0o700, "the shard");
    // Everything, blobs (job logs) included, is private.
    let open = open_to_others(&data);
    assert!(open.is_empty(), "open to other users: {open:?}");

    // Loosened by hand (or made by an older version) while it is stopped: repaired at start.
    up.stop();
    let loosened = [
        (data.clone(), 0o755),
        (data.join("muster.db"), 0o644),
        (data.join("server-key"), 0o644),
        (data.join("setup-code"), 0o644),
        (data.join("agent"), 0o755),
        (data.join("agent/jobs"), 0o755),
        (held_dir.clone(), 0o755),
        (held_dir.join("spec.json"), 0o644),
        (data.join("blobs"), 0o755),
    ];
    for (p, m) in &loosened {
        if p.exists() {
            set_mode(p, *m);
        }
    }
    let up2 = Up::start(&data);
    let fixed: Vec<&PathBuf> = loosened
        .iter()
        .map(|(p, _)| p)
        .filter(|p| p.exists())
        .collect();
    let all_warned = wait_until(Duration::from_secs(10), || {
        let log = up2.stderr.lock().unwrap();
        fixed
            .iter()
            .all(|p| log.contains(&format!("{} was open to other users", p.display())))
    });
    assert!(
        all_warned,
        "a warning naming each repaired path: {}",
        up2.stderr.lock().unwrap()
    );
    let open = open_to_others(&data);
    assert!(open.is_empty(), "still open to other users: {open:?}");
    std::fs::write(&gate, b"").unwrap();
    let t = wait_tree(&up2.url, &token, &held, Duration::from_secs(20));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    kill_supervisors(&data);
}

#[test]
fn a_job_gets_its_token_but_no_file_on_the_node_holds_it() {
    let s = Server::start();
    let seen = s.dir.0.join("seen-token");
    let exe = env!("CARGO_BIN_EXE_muster");
    // The job keeps what it got (outside the agent's directory) and calls the API with it.
    let (id, _) = s.create(json!({"name": "caller", "shell": format!(
        "printf %s \"$MUSTER_TOKEN\" > {}; {exe} jobs show $MUSTER_JOB_ID",
        seen.display()
    )}));
    let t = s.wait_tree(&id, Duration::from_secs(20));
    assert_eq!(
        t["tree_state"],
        "succeeded",
        "the job's API call failed: {t:#}\n{}",
        s.log(&id)
    );
    let token = std::fs::read_to_string(&seen).unwrap();
    assert!(token.len() >= 20, "the job got no token: {token:?}");
    assert!(s.log(&id).contains(&id), "{}", s.log(&id));
    let dir = attempt(&s.dir.0, &id);
    let spec: Value =
        serde_json::from_slice(&std::fs::read(dir.join("spec.json")).unwrap()).unwrap();
    assert_eq!(spec["env"]["MUSTER_URL"], s.url.as_str(), "{spec:#}");
    assert!(spec["env"].get("MUSTER_TOKEN").is_none(), "{spec:#}");
    // No file the agent keeps holds the token.
    let mut todo = vec![s.dir.0.join("agent")];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                let text = String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned();
                assert!(
                    !text.contains(&token),
                    "{} holds the job's token",
                    e.path().display()
                );
            }
        }
    }
}
