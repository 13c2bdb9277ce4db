//! Headquarters: the repository made at first start, the pulse and its watchers, orders run
//! once each, scripts committed to HQ, bad content reported while the server goes on — all with
//! the real `git`, a 200 ms pulse, and waits on conditions with deadlines.

use crate::harness::{wait_until, Server, TempDir};
use crate::support::git;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

pub fn fast_pulse(c: &mut muster_server::config::Config) {
    c.pulse.interval = Duration::from_millis(200);
}

/// Appends `text` to `file` in the working copy `dir` and commits it.
pub fn append_commit(dir: &Path, file: &str, text: &str) {
    use std::io::Write;
    let p = dir.join(file);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    git(dir, &["add", file]);
    git(
        dir,
        &["commit", "-q", "-m", &format!("{file}: {}", text.trim())],
    );
}

pub fn orders(s: &Server) -> Value {
    let (st, body) = s.call("GET", "/api/v1/hq/orders", None);
    assert_eq!(st, 200, "{body}");
    body
}

fn order(o: &Value, line: u64) -> Option<&Value> {
    o["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["line"] == line && i["file"] == "deployer/orders")
}

/// Waits until order `line` of deployer/orders is in `state`; returns it.
pub fn wait_order(s: &Server, line: u64, state: &str) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(WAIT, || {
        last = orders(s);
        order(&last, line).is_some_and(|o| o["state"] == state)
    });
    assert!(ok, "order {line} never became {state}: {last:#}");
    order(&last, line).unwrap().clone()
}

fn hq(s: &Server) -> Value {
    let (st, body) = s.call("GET", "/api/v1/hq", None);
    assert_eq!(st, 200, "{body}");
    body
}

fn watcher<'a>(h: &'a Value, name: &str) -> &'a Value {
    h["watchers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == name)
        .unwrap_or_else(|| panic!("no watcher {name}: {h:#}"))
}

#[test]
fn a_first_start_makes_hq_and_the_pulse_reports_every_watcher() {
    // Without a remote, which only a local store allows: this test keeps SQLite on the Redis
    // pass too.
    let s = Server::start_with(|c| {
        fast_pulse(c);
        c.store.url = format!("sqlite://{}", c.data_dir.join("muster.db").display());
    });
    let dir = s.dir.0.join("hq");
    let mut h = Value::Null;
    assert!(
        wait_until(WAIT, || {
            h = hq(&s);
            h["pulses"].as_u64().unwrap_or(0) >= 2
                && h["watchers"].as_array().is_some_and(|w| w.len() == 4)
        }),
        "{h:#}"
    );
    assert_eq!(h["path"], dir.to_string_lossy().as_ref());
    assert_eq!(h["branch"], "main");
    assert!(h["error"].is_null(), "{h:#}");
    assert!(
        h["head"]["message"].as_str().unwrap().contains("layout"),
        "{h:#}"
    );
    for d in ["services", "interfaces", "scripts", "uploads", "deployer"] {
        assert!(dir.join(d).is_dir(), "{d}");
    }
    assert!(std::fs::read_to_string(dir.join("README.md"))
        .unwrap()
        .contains("deployer/orders"));
    // The fixed order: sync, orders, then the models' uploads and the services' monitors.
    let names: Vec<&str> = h["watchers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sync", "orders", "uploads", "services"]);
    assert_eq!(
        watcher(&h, "uploads")["message"],
        "nothing to take",
        "{h:#}"
    );
    assert_eq!(watcher(&h, "sync")["outcome"], "ok");
    assert_eq!(watcher(&h, "sync")["message"], "no remote set");
    assert_eq!(watcher(&h, "orders")["outcome"], "ok", "{h:#}");
    assert!(h["problems"].as_array().unwrap().is_empty(), "{h:#}");
    // The reaper's frame ran its task once at start.
    assert!(wait_until(WAIT, || hq(&s)["reaper"]
        .as_array()
        .is_some_and(|r| r
            .iter()
            .any(|t| t["name"] == "expired_jobs" && t["ok"] == true))));
    let metrics = s.raw(Some(&s.token), "GET", "/metrics", None, &[]).1;
    for m in [
        "muster_pulses_total",
        "muster_pulse_duration_seconds",
        "muster_watcher_runs_total{watcher=\"orders\",outcome=\"ok\"}",
        "muster_pulse_overruns_total",
    ] {
        assert!(metrics.contains(m), "{m} missing");
    }
    // With nothing changed, a pulse costs next to nothing: the orders watcher read nothing.
    assert_eq!(watcher(&hq(&s), "orders")["message"], "nothing new");
}

#[test]
fn orders_run_once_each_in_line_order_with_outcomes_logged_and_committed() {
    let s = Server::start_with(fast_pulse);
    let dir = s.dir.0.join("hq");
    let out = TempDir::new("hq-out");
    let mark = out.0.join("ran");
    let script = format!("#!/bin/sh\necho \"$1\" >> {}\n", mark.display());
    let (st, body) = s.call_as(
        Some(&s.token),
        "PUT",
        "/api/v1/scripts/mark",
        Some(script),
        &[("content-type", "application/octet-stream")],
    );
    assert_eq!(st, 200, "{body}");
    // The write is a commit by the caller.
    assert_eq!(
        git(&dir, &["log", "-1", "--format=%an %s"]),
        "admin scripts: mark written by admin"
    );
    append_commit(
        &dir,
        "deployer/orders",
        "noop\n# a comment, no order\nfrobnicate now\nscript mark -- one\nscript missing\nscript mark 'unclosed\nscript mark -- two\n",
    );
    assert_eq!(wait_order(&s, 1, "succeeded")["text"], "noop");
    let bad = wait_order(&s, 3, "rejected");
    assert!(
        bad["message"].as_str().unwrap().contains("unknown verb"),
        "{bad}"
    );
    let one = wait_order(&s, 4, "succeeded");
    assert!(one["tree"].is_string());
    let missing = wait_order(&s, 5, "rejected");
    assert!(
        missing["message"].as_str().unwrap().contains("not found"),
        "{missing}"
    );
    let unclosed = wait_order(&s, 6, "rejected");
    assert!(
        unclosed["message"].as_str().unwrap().contains("malformed"),
        "{unclosed}"
    );
    wait_order(&s, 7, "succeeded");
    assert!(order(&orders(&s), 2).is_none(), "a comment is no order");
    assert_eq!(std::fs::read_to_string(&mark).unwrap(), "one\ntwo\n");
    // orders.log beside the file, committed: one line per order.
    let mut log = String::new();
    assert!(
        wait_until(WAIT, || {
            log = git(&dir, &["show", "HEAD:deployer/orders.log"]);
            log.lines().count() == 6
        }),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("line 4 succeeded") && l.contains("script mark -- one")),
        "{log}"
    );
    assert!(git(&dir, &["status", "--porcelain"]).is_empty());
    // A new line runs, the old ones never again.
    append_commit(&dir, "deployer/orders", "script mark -- three\n");
    wait_order(&s, 8, "succeeded");
    assert_eq!(std::fs::read_to_string(&mark).unwrap(), "one\ntwo\nthree\n");

    // An edit of the processed part stops the file: reported, nothing of it runs.
    let p = dir.join("deployer/orders");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replacen("noop\n", "noop # edited\n", 1);
    std::fs::write(&p, format!("{text}script mark -- four\n")).unwrap();
    git(&dir, &["commit", "-q", "-am", "edit a processed order"]);
    let mut h = Value::Null;
    assert!(
        wait_until(WAIT, || {
            h = hq(&s);
            h["problems"]
                .to_string()
                .contains("deployer/orders is stopped")
        }),
        "{h:#}"
    );
    assert!(
        h["problems"].to_string().contains("hq orders resolve"),
        "{h:#}"
    );
    let files = orders(&s)["files"].clone();
    assert!(
        files[0]["stopped"].as_str().unwrap().contains("edited"),
        "{files}"
    );
    assert!(order(&orders(&s), 9).is_none());
    // Only admins resolve; then the new line runs, once.
    let (st, _) = s.call(
        "POST",
        "/api/v1/hq/orders/resolve",
        Some(json!({"file": "services/x"})),
    );
    assert_eq!(st, 400);
    let (st, body) = s.call(
        "POST",
        "/api/v1/hq/orders/resolve",
        Some(json!({"file": "deployer/orders"})),
    );
    assert_eq!(st, 200, "{body}");
    wait_order(&s, 9, "succeeded");
    assert_eq!(
        std::fs::read_to_string(&mark).unwrap(),
        "one\ntwo\nthree\nfour\n"
    );
    assert!(!hq(&s)["problems"].to_string().contains("stopped"));
    let (st, _) = s.call(
        "POST",
        "/api/v1/hq/orders/resolve",
        Some(json!({"file": "deployer/orders"})),
    );
    assert_eq!(st, 409, "not stopped");
    // Filters.
    let (st, body) = s.call("GET", "/api/v1/hq/orders?state=rejected", None);
    assert_eq!(st, 200);
    assert_eq!(body["items"].as_array().unwrap().len(), 3, "{body:#}");
    assert_eq!(s.call("GET", "/api/v1/hq/orders?state=bogus", None).0, 400);
}

#[test]
fn scripts_live_in_hq_and_old_ones_move_in_at_first_start() {
    let data = TempDir::new("hq-move");
    let old = data.0.join("scripts");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("legacy"), "#!/bin/sh\necho legacy\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(old.join("legacy"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = data.0.clone();
    let s = Server::start_with(move |c| {
        fast_pulse(c);
        c.data_dir = path;
    });
    let dir = data.0.join("hq");
    assert!(dir.join("scripts/legacy").is_file());
    assert!(!old.exists(), "the old directory is gone");
    assert!(git(&dir, &["log", "--format=%s"]).contains("moved in from the data dir"));
    let (_, list) = s.call("GET", "/api/v1/scripts", None);
    assert_eq!(list["items"], json!([{"name": "legacy"}]));
    // Bad writes change nothing.
    let put = |name: &str, body: &str| {
        s.call_as(
            Some(&s.token),
            "PUT",
            &format!("/api/v1/scripts/{name}"),
            Some(body.to_string()),
            &[("content-type", "application/octet-stream")],
        )
    };
    let head = git(&dir, &["rev-parse", "HEAD"]);
    let (st, body) = put("a__b", "#!/bin/sh\n");
    assert_eq!(st, 400, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().len() < 200,
        "{body}"
    );
    assert_eq!(s.call("DELETE", "/api/v1/scripts/nope", None).0, 404);
    // A removal is a commit too.
    let (st, body) = s.call("DELETE", "/api/v1/scripts/legacy", None);
    assert_eq!(st, 200, "{body}");
    assert_ne!(git(&dir, &["rev-parse", "HEAD"]), head);
    assert_eq!(
        git(&dir, &["log", "-1", "--format=%an %s"]),
        "admin scripts: legacy removed by admin"
    );
    assert!(!dir.join("scripts/legacy").exists());
}

#[test]
fn bad_hq_content_is_reported_and_nothing_of_it_runs() {
    let s = Server::start_with(fast_pulse);
    let dir = s.dir.0.join("hq");
    // A reserved directory that is a file, a workspace directory with a bad name, a symlink
    // outside HQ, a script that is not executable.
    std::fs::remove_dir_all(dir.join("uploads")).unwrap();
    std::fs::write(dir.join("uploads"), "not a dir").unwrap();
    std::fs::create_dir_all(dir.join("api/models")).unwrap();
    std::fs::write(dir.join("api/models/x"), "").unwrap();
    std::fs::create_dir_all(dir.join("bad__name")).unwrap();
    std::fs::write(dir.join("bad__name/x"), "").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("scripts/passwd")).unwrap();
    std::fs::write(dir.join("scripts/plain"), "#!/bin/sh\necho hi\n").unwrap();
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-q", "-m", "bad things"]);
    append_commit(
        &dir,
        "deployer/orders",
        "script plain\nscript passwd\nnoop\n",
    );
    let plain = wait_order(&s, 1, "rejected");
    assert!(
        plain["message"]
            .as_str()
            .unwrap()
            .contains("not executable"),
        "{plain}"
    );
    let link = wait_order(&s, 2, "rejected");
    assert!(
        link["message"].as_str().unwrap().contains("outside HQ"),
        "{link}"
    );
    wait_order(&s, 3, "succeeded");
    let h = hq(&s);
    let p = h["problems"].to_string();
    for want in [
        "uploads must be a directory",
        "directory api/ is ignored",
        "directory bad__name/ is ignored",
        "scripts/passwd is a symlink pointing outside HQ",
    ] {
        assert!(p.contains(want), "{want}: {h:#}");
    }
    // An orders file too large to read: reported, nothing of it runs, the server goes on.
    let big = "noop\n".repeat(4 << 20);
    std::fs::write(
        dir.join("deployer/orders"),
        format!("script plain\nscript passwd\nnoop\n{big}"),
    )
    .unwrap();
    git(&dir, &["commit", "-q", "-am", "a huge orders file"]);
    let mut h = Value::Null;
    assert!(
        wait_until(WAIT, || {
            h = hq(&s);
            h["problems"].to_string().contains("more than the 16 MB")
        }),
        "{h:#}"
    );
    assert!(order(&orders(&s), 4).is_none());
    assert_eq!(s.call("GET", "/healthz", None).0, 200);
}

#[test]
fn a_directory_that_is_no_repository_is_reported_and_the_server_keeps_going() {
    let other = TempDir::new("not-a-repo");
    std::fs::write(other.0.join("file"), "x").unwrap();
    let p = other.0.to_string_lossy().into_owned();
    let s = Server::start_with(move |c| {
        fast_pulse(c);
        c.hq.path = p;
    });
    let h = hq(&s);
    assert!(
        h["error"]
            .as_str()
            .unwrap()
            .contains("is not a git repository"),
        "{h:#}"
    );
    // Jobs still run.
    let (id, _) = s.create(json!({"name": "still", "shell": "true"}));
    assert_eq!(s.wait_tree(&id, WAIT)["tree_state"], "succeeded");
    let (st, body) = s.call("GET", "/api/v1/scripts", None);
    assert_eq!(st, 503, "{body}");
    // Once it is one, the next pulse takes it up.
    // (Made aside and moved in at once, so no pulse sees it half made.)
    let staging = TempDir::new("staging");
    git(&staging.0, &["init", "-q", "-b", "main"]);
    std::fs::write(staging.0.join("file"), "x").unwrap();
    git(&staging.0, &["add", "-A"]);
    git(&staging.0, &["commit", "-q", "-m", "now a repository"]);
    std::fs::rename(staging.0.join(".git"), other.0.join(".git")).unwrap();
    assert!(
        wait_until(WAIT, || hq(&s)["error"].is_null()),
        "{:#}",
        hq(&s)
    );
    assert_eq!(hq(&s)["head"]["message"], "now a repository");
}

/// A bare repository in `dir` (the HQ remote of a test).
pub fn bare(dir: &Path) -> String {
    let p = dir.join("remote.git");
    git(
        dir,
        &["init", "-q", "--bare", "-b", "main", &p.to_string_lossy()],
    );
    p.display().to_string()
}

fn remote_has(remote: &str, path: &str) -> bool {
    let out = std::process::Command::new("git")
        .args([
            "--git-dir",
            remote,
            "cat-file",
            "-e",
            &format!("main:{path}"),
        ])
        .output()
        .unwrap();
    out.status.success()
}

fn put_script(s: &Server, name: &str, text: &str) -> Value {
    let (st, body) = s.call_as(
        Some(&s.token),
        "PUT",
        &format!("/api/v1/scripts/{name}"),
        Some(text.to_string()),
        &[("content-type", "application/octet-stream")],
    );
    assert_eq!(st, 200, "{body}");
    body
}

#[test]
fn a_script_pushed_to_the_remote_runs_through_orders_and_api_writes_reach_the_remote() {
    let work = TempDir::new("hq-remote");
    let remote = bare(&work.0);
    let r = remote.clone();
    let s = Server::start_with(move |c| {
        fast_pulse(c);
        c.hq.remote = r;
    });
    // The first pulse pushes the new HQ to the empty remote.
    assert!(
        wait_until(WAIT, || remote_has(&remote, "deployer/orders")),
        "{:#}",
        hq(&s)
    );
    let user = work.0.join("user");
    git(&work.0, &["clone", "-q", &remote, &user.to_string_lossy()]);
    let mark = work.0.join("ran");
    std::fs::write(
        user.join("scripts/mark"),
        format!("#!/bin/sh\necho \"$1\" >> {}\n", mark.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        user.join("scripts/mark"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    git(&user, &["add", "scripts/mark"]);
    append_commit(&user, "deployer/orders", "script mark -- pushed\n");
    let t0 = std::time::Instant::now();
    git(&user, &["push", "-q", "origin", "main"]);
    wait_order(&s, 1, "running")
        .as_object()
        .map(|_| ())
        .unwrap_or(());
    let took = t0.elapsed();
    wait_order(&s, 1, "succeeded");
    assert!(
        took < Duration::from_secs(3),
        "the order started {took:?} after the push"
    );
    assert_eq!(std::fs::read_to_string(&mark).unwrap(), "pushed\n");
    let h = hq(&s);
    assert_eq!(h["last_sync"]["ok"], true, "{h:#}");
    // The server's orders.log commit and an API write reach the remote.
    put_script(&s, "from-api", "#!/bin/sh\necho api\n");
    assert!(wait_until(WAIT, || remote_has(&remote, "scripts/from-api")
        && remote_has(&remote, "deployer/orders.log")));
    let log = git(
        &user,
        &["log", "--format=%an %s", "-1", "--", "scripts/from-api"],
    );
    assert!(log.is_empty(), "(not fetched yet)");
    git(&user, &["pull", "-q", "--rebase", "origin", "main"]);
    assert_eq!(
        git(
            &user,
            &["log", "-1", "--format=%an %s", "--", "scripts/from-api"]
        ),
        "admin scripts: from-api written by admin"
    );
}

#[test]
fn both_sides_commit_and_are_rebased_a_conflict_is_reported_and_a_user_push_resolves_it() {
    let work = TempDir::new("hq-rebase");
    let remote = bare(&work.0);
    let hook = crate::cluster::Hook::start();
    let (r, hook_url) = (remote.clone(), hook.url.clone());
    // Pulses only when asked (POST /api/v1/hq/sync), so each side's commits land in between.
    let s = Server::start_with(move |c| {
        c.pulse.interval = Duration::from_secs(3600);
        c.hq.remote = r;
        c.alerts.webhook_url = hook_url;
    });
    let sync = |s: &Server| {
        let (st, body) = s.call("POST", "/api/v1/hq/sync", None);
        assert_eq!(st, 200, "{body} {:#}", hq(s));
        body
    };
    sync(&s);
    assert!(remote_has(&remote, "README.md"));
    let user = work.0.join("user");
    git(&work.0, &["clone", "-q", &remote, &user.to_string_lossy()]);
    // Both sides commit: the user's is pushed, the server's is on top, both kept.
    append_commit(&user, "acme/notes.txt", "from the user\n");
    git(&user, &["push", "-q", "origin", "main"]);
    put_script(&s, "both", "#!/bin/sh\necho server\n");
    let body = sync(&s);
    assert_eq!(body["last_sync"]["ok"], true, "{body:#}");
    assert!(
        body["last_sync"]["message"]
            .as_str()
            .unwrap()
            .contains("rebased"),
        "{body:#}"
    );
    git(&user, &["pull", "-q", "--ff-only", "origin", "main"]);
    assert_eq!(
        git(&user, &["log", "-2", "--format=%an %s"]),
        "admin scripts: both written by admin\nann acme/notes.txt: from the user"
    );
    // A real conflict: both change scripts/both.
    std::fs::write(user.join("scripts/both"), "#!/bin/sh\necho user\n").unwrap();
    git(&user, &["commit", "-q", "-am", "the user's both"]);
    git(&user, &["push", "-q", "origin", "main"]);
    put_script(&s, "both", "#!/bin/sh\necho server again\n");
    let server_head = hq(&s)["head"]["id"].as_str().unwrap().to_string();
    let body = sync(&s);
    assert_eq!(body["last_sync"]["ok"], false, "{body:#}");
    let c = &body["conflict"];
    assert_eq!(c["files"], json!(["scripts/both"]), "{body:#}");
    assert_eq!(c["local"], server_head.as_str());
    assert_eq!(c["remote"], git(&user, &["rev-parse", "HEAD"]).as_str());
    // The last good state is kept and served.
    let hqdir = s.dir.0.join("hq");
    assert_eq!(
        std::fs::read_to_string(hqdir.join("scripts/both")).unwrap(),
        "#!/bin/sh\necho server again\n"
    );
    assert_eq!(hq(&s)["head"]["id"], server_head.as_str());
    assert!(git(&hqdir, &["status", "--porcelain"]).is_empty());
    let alert = hook.wait_for("hq_conflict");
    assert_eq!(alert["files"], json!(["scripts/both"]));
    // Still in conflict on the next try; then the user takes their change back and pushes.
    assert_eq!(sync(&s)["last_sync"]["ok"], false);
    git(&user, &["revert", "--no-edit", "HEAD"]);
    git(&user, &["push", "-q", "origin", "main"]);
    let body = sync(&s);
    assert_eq!(body["last_sync"]["ok"], true, "{body:#}");
    assert!(body["conflict"].is_null());
    git(&user, &["pull", "-q", "--ff-only", "origin", "main"]);
    assert_eq!(
        std::fs::read_to_string(user.join("scripts/both")).unwrap(),
        "#!/bin/sh\necho server again\n"
    );
    // Nothing was ever force-pushed: the user's commits are all there.
    let log = git(&user, &["log", "--format=%s"]);
    for s in ["the user's both", "acme/notes.txt: from the user", "Revert"] {
        assert!(log.contains(s), "{s}: {log}");
    }
}

#[test]
fn the_webhook_may_trigger_a_sync_with_its_signature_instead_of_a_token() {
    use hmac::{Hmac, KeyInit, Mac};
    let work = TempDir::new("hq-hook");
    let remote = bare(&work.0);
    let r = remote.clone();
    let s = Server::start_with(move |c| {
        c.pulse.interval = Duration::from_secs(3600);
        c.hq.remote = r;
        c.hq.webhook_secret = "hook-secret".into();
    });
    let body = r#"{"ref":"refs/heads/main"}"#;
    let mut m = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(b"hook-secret").unwrap();
    m.update(body.as_bytes());
    let sig = format!(
        "sha256={}",
        muster_wire::util::hex(&m.finalize().into_bytes())
    );
    let (st, out) = s.call_as(
        None,
        "POST",
        "/api/v1/hq/sync",
        Some(body.into()),
        &[("x-hub-signature-256", &sig)],
    );
    assert_eq!(st, 200, "{out}");
    assert!(remote_has(&remote, "README.md"));
    let (st, out) = s.call_as(
        None,
        "POST",
        "/api/v1/hq/sync",
        Some(body.into()),
        &[("x-hub-signature-256", "sha256=00")],
    );
    assert_eq!(st, 401, "{out}");
    assert_eq!(
        s.call_as(None, "POST", "/api/v1/hq/sync", Some(body.into()), &[])
            .0,
        401
    );
}

/// deployer/orders.log at HEAD ("" before it is committed).
fn committed_log(hq: &Path) -> String {
    let out = std::process::Command::new("git")
        .args(["show", "HEAD:deployer/orders.log"])
        .current_dir(hq)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Counts the lines of `file` equal to `word`.
fn count(file: &Path, word: &str) -> usize {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == word)
        .count()
}

#[test]
fn an_order_runs_once_through_kill_9_after_its_tree_is_made_and_before_its_outcome() {
    use crate::crash::{call, setup, Up};
    let dir = TempDir::new("hq-crash");
    let out = TempDir::new("hq-crash-out");
    let mark = out.0.join("ran");
    let fast = ("MUSTER_PULSE__INTERVAL", "200ms");
    let mut up = Up::start_env(&dir.0, &[fast]);
    let token = setup(&up, &dir.0);
    let put = |url: &str| {
        let resp = crate::harness::http()
            .put(&format!("{url}/api/v1/scripts/mark"))
            .header("authorization", &format!("Bearer {token}"))
            .send(format!("#!/bin/sh\necho \"$1\" >> {}\n", mark.display()))
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
    };
    put(&up.url);
    up.stop();
    let hqdir = dir.0.join("hq");
    let state = |url: &str, line: u64| {
        let (_, o) = call(url, Some(&token), "GET", "/api/v1/hq/orders", None);
        o["items"]
            .as_array()
            .and_then(|i| i.iter().find(|i| i["line"] == line).cloned())
    };
    for (line, word, at) in [
        (1u64, "one", "order_tree_made"),
        (2, "two", "order_before_outcome"),
    ] {
        // The server kills itself (-9) at that point of the order...
        let mut up = Up::start_env(&dir.0, &[fast, ("MUSTER_TEST_KILL_AT", at)]);
        append_commit(
            &hqdir,
            "deployer/orders",
            &format!("script mark -- {word}\n"),
        );
        assert!(up.wait_exit(WAIT), "the server did not reach {at}");
        // ... and once started again, the order ends, having run once.
        let up = Up::start_env(&dir.0, &[fast]);
        let mut last = None;
        assert!(
            wait_until(WAIT, || {
                last = state(&up.url, line);
                last.as_ref().is_some_and(|o| o["state"] == "succeeded")
            }),
            "{at}: {last:#?}"
        );
        assert!(wait_until(WAIT, || committed_log(&hqdir).lines().count()
            == line as usize));
        assert_eq!(count(&mark, word), 1, "{at}: the order ran once");
        let (_, trees) = call(&up.url, Some(&token), "GET", "/api/v1/jobs?limit=100", None);
        let made = trees["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| {
                t["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&format!("order deployer/orders:{line} ")))
            })
            .count();
        assert_eq!(made, 1, "{at}: one tree: {trees:#}");
        drop(up);
    }
    let log = committed_log(&hqdir);
    assert_eq!(
        log.lines().filter(|l| l.contains(" succeeded ")).count(),
        2,
        "{log}"
    );
}

#[test]
fn orders_run_once_each_across_a_failover_between_two_servers() {
    use crate::harness::Redis;
    use crate::nodes::{fast_nodes, wait_node, Agent};
    let redis = Redis::start();
    let blobs = TempDir::new("blobs");
    let remote = redis.hq_remote();
    let tweak = |c: &mut muster_server::config::Config| {
        c.store.url = redis.url();
        c.store.blob_dir = blobs.0.display().to_string();
        c.server.lease_ttl = Duration::from_secs(1);
        c.hq.remote = remote.clone();
        fast_pulse(c);
        fast_nodes(c);
    };
    let a = Server::start_bare(tweak);
    assert!(wait_until(WAIT, || a.app.cluster.is_leader()));
    let b = Server::start_bare(tweak);
    let _agent = Agent::join_cluster(&a, &[&b], "worker", &[]);
    wait_node(&a, "worker", "ready", WAIT);
    let work = TempDir::new("hq-failover");
    let mark = work.0.join("ran");
    let gate = work.0.join("gate");
    put_script(&a, "mark", &format!("#!/bin/sh\nwhile [ \"$1\" = wait ] && [ ! -e {g} ]; do sleep 0.02; done\necho \"$2\" >> {m}\n", g = gate.display(), m = mark.display()));
    assert!(wait_until(WAIT, || remote_has(&remote, "scripts/mark")));
    let user = work.0.join("user");
    git(&work.0, &["clone", "-q", &remote, &user.to_string_lossy()]);
    let push = |text: &str| {
        append_commit(&user, "deployer/orders", text);
        for _ in 0..20 {
            let out = std::process::Command::new("git")
                .args(["push", "-q", "origin", "main"])
                .current_dir(&user)
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            git(&user, &["pull", "-q", "--rebase", "origin", "main"]);
        }
        panic!("cannot push");
    };
    push("script mark -- go a1\nscript mark -- go a2\nscript mark -- wait a3\n");
    // A's third order waits on the gate when A dies.
    let mut last = Value::Null;
    assert!(
        wait_until(WAIT, || {
            last = orders(&b);
            order(&last, 3).is_some_and(|o| o["state"] == "running")
        }),
        "{last:#}"
    );
    assert_eq!(order(&last, 1).unwrap()["state"], "succeeded");
    push("script mark -- go b4\nnoop\n");
    drop(a);
    assert!(
        wait_until(WAIT, || b.app.cluster.is_leader()),
        "B took over"
    );
    wait_node(&b, "worker", "ready", WAIT);
    std::fs::write(&gate, "").unwrap();
    push("script mark -- go b5\n");
    wait_order(&b, 6, "succeeded");
    for w in ["a1", "a2", "a3", "b4", "b5"] {
        assert_eq!(
            count(&mark, w),
            1,
            "{w} ran once: {}",
            std::fs::read_to_string(&mark).unwrap()
        );
    }
    let o = orders(&b);
    assert_eq!(o["items"].as_array().unwrap().len(), 6, "{o:#}");
    assert!(
        o["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["state"] == "succeeded"),
        "{o:#}"
    );
}

#[test]
fn cluster_mode_refuses_to_start_without_a_remote_and_says_why() {
    let redis = crate::harness::Redis::start();
    let dir = TempDir::new("hq-cluster");
    let config = muster_server::config::Config {
        data_dir: dir.0.clone(),
        store: muster_server::config::StoreConfig {
            url: redis.url(),
            ..Default::default()
        },
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt
        .block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            muster_server::Server::start(config, l, std::future::pending(), None).await
        })
        .err()
        .expect("no start without a remote");
    assert!(err.contains("needs [hq] remote"), "{err}");
}
