//! Services (SPEC §6): a three-part environment in HQ (a key-value store on a node, an app
//! consuming it through a typed interface, a child of the app) planned and applied with real
//! bash and python actions that append to a file; planning again gives nothing; a param change
//! reconfigures only that service and its consumer; an old plan is refused once HQ moved; bad
//! service directories are 422 naming the file and line; a service gone from HQ is reset; an
//! `apply` order; one action by hand; reset refused while consumers depend on it, cascade,
//! dependencies reset once nothing uses them (or kept).

use crate::harness::{wait_until, Server};
use crate::support::git;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn write(hq: &Path, file: &str, text: &str, exec: bool) {
    use std::os::unix::fs::PermissionsExt;
    let p = hq.join(file);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    let mode = if exec { 0o755 } else { 0o644 };
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn commit(hq: &Path, msg: &str) {
    git(hq, &["add", "-A", "services", "interfaces"]);
    git(hq, &["commit", "-q", "-m", msg]);
}

fn kv_toml(port: u32, log: &Path) -> String {
    format!(
        r#"domain = "demo"
name = "kv"
instance = "main"
version = "1"

[params]
port = {port}
log = "{}"

[consumes.host]
interface = "node"

[provides.kv]
interface = "kv"
data = {{ host = "${{node.address}}", port = "${{params.port}}" }}
"#,
        log.display()
    )
}

fn setup(hq: &Path, log: &Path) {
    write(
        hq,
        "interfaces/kv.toml",
        "description = \"a key-value store\"\noptional = [\"token\"]\n[keys]\nhost = \"string\"\nport = \"integer\"\ntoken = \"string\"\n",
        false,
    );
    write(
        hq,
        "services/demo__kv__main/service.toml",
        &kv_toml(6400, log),
        false,
    );
    // bash: the context on stdin, the env, a JSON result as the last line.
    write(
        hq,
        "services/demo__kv__main/actions/install",
        r#"#!/bin/bash
set -e
ctx=$(cat)
port=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["params"]["port"])' "$ctx")
log=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["params"]["log"])' "$ctx")
echo "install $MUSTER_SERVICE $port node=$MUSTER_NODE_NAME action=$MUSTER_ACTION" >> "$log"
echo "kv installed in $MUSTER_STATE_DIR"
echo '{"published": {"token": "tok-'$port'"}, "state": {"port": '$port'}, "status": "active", "message": "serving"}'
"#,
        true,
    );
    write(
        hq,
        "services/demo__kv__main/actions/reset",
        "#!/bin/bash\nlog=$(python3 -c 'import json,sys; print(json.load(sys.stdin)[\"params\"][\"log\"])')\necho \"reset $MUSTER_SERVICE\" >> \"$log\"\n",
        true,
    );
    write(
        hq,
        "services/demo__app__web/service.toml",
        &format!(
            "domain = \"demo\"\nname = \"app\"\ninstance = \"web\"\nversion = \"1\"\n\n[params]\nlog = \"{}\"\nurl = \"kv://${{consumes.db.host}}:${{consumes.db.port}}\"\n\n[consumes.db]\ninterface = \"kv\"\n",
            log.display()
        ),
        false,
    );
    // python: the producer's planned data and what it published in this apply.
    write(
        hq,
        "services/demo__app__web/actions/install",
        r#"#!/usr/bin/env python3
import json, os, sys
ctx = json.load(sys.stdin)
db = ctx["consumes"]["db"]
with open(ctx["params"]["log"], "a") as f:
    f.write("install %s %s %s %s prev=%s\n" % (os.environ["MUSTER_SERVICE"], db["port"], db["token"], ctx["params"]["url"], json.dumps(ctx["state"])))
print(json.dumps({"state": {"seen": db["port"]}, "published": {"url": ctx["params"]["url"]}}))
"#,
        true,
    );
    write(
        hq,
        "services/demo__app__web/demo__cron__backup/service.toml",
        &format!(
            "domain = \"demo\"\nname = \"cron\"\ninstance = \"backup\"\n[params]\nlog = \"{}\"\n",
            log.display()
        ),
        false,
    );
    // The source design's own form: actions.py; the first try asks to be retried (exit 75).
    write(
        hq,
        "services/demo__app__web/demo__cron__backup/actions.py",
        r#"import os
def install(ctx):
    mark = os.path.join(os.environ["MUSTER_STATE_DIR"], "tried")
    if not os.path.exists(mark):
        open(mark, "w").close()
        raise RetryLater("not yet")
    with open(ctx["params"]["log"], "a") as f:
        f.write("install %s\n" % os.environ["MUSTER_SERVICE"])
    return {"status": "active", "message": "scheduled"}

def reset(ctx):
    with open(ctx["params"]["log"], "a") as f:
        f.write("reset %s\n" % os.environ["MUSTER_SERVICE"])
"#,
        false,
    );
    commit(hq, "a demo environment");
}

fn plan(s: &Server) -> Value {
    let (st, p) = s.call("POST", "/api/v1/services/plan", Some(json!({})));
    assert_eq!(st, 201, "{p}");
    p
}

fn steps(p: &Value) -> Vec<(String, String)> {
    p["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["action"].as_str().unwrap().to_string(),
                s["path"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Applies plan `p`, waits for its tree to succeed and for every step to be recorded.
fn apply(s: &Server, p: &Value) -> Value {
    let (st, a) = s.call(
        "POST",
        "/api/v1/services/apply",
        Some(json!({"plan": p["id"]})),
    );
    assert_eq!(st, 202, "{a}");
    let tree = a["tree"].as_str().unwrap().to_string();
    let t = s.wait_tree(&tree, WAIT);
    if t["tree_state"] != "succeeded" {
        let mut logs = String::new();
        let mut todo = vec![t.clone()];
        while let Some(j) = todo.pop() {
            if j["state"] == "failed" && j["exit_code"].is_number() {
                logs.push_str(&s.log(j["id"].as_str().unwrap()));
            }
            todo.extend(j["children"].as_array().cloned().unwrap_or_default());
        }
        panic!("apply tree {tree} did not succeed:\n{logs}");
    }
    let id = p["id"].as_str().unwrap().to_string();
    let want: Vec<(String, String)> = steps(p);
    let ok = wait_until(WAIT, || {
        let (_, l) = s.call("GET", "/api/v1/services", None);
        let items = l["items"].as_array().cloned().unwrap_or_default();
        want.iter().all(|(action, path)| {
            let rec = items.iter().find(|i| i["path"] == path.as_str());
            if action == "reset" {
                rec.is_none()
            } else {
                rec.is_some_and(|r| r["last_plan"] == id.as_str())
            }
        })
    });
    assert!(ok, "the steps of plan {id} were never all recorded");
    t
}

fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn plan_apply_replan_reconfigure_and_reset() {
    // HQ without a remote, which only a local store allows: SQLite on the Redis pass too.
    let s = Server::start_with(|c| {
        c.store.url = format!("sqlite://{}", c.data_dir.join("muster.db").display());
    });
    let hq = s.dir.0.join("hq");
    assert!(wait_until(WAIT, || hq.join(".git").is_dir()));
    let log = s.dir.0.join("actions.log");
    setup(&hq, &log);

    // The first plan installs all three, producers and parents first.
    let p = plan(&s);
    assert_eq!(
        steps(&p),
        vec![
            ("install".into(), "demo__kv__main".into()),
            ("install".into(), "demo__app__web".into()),
            ("install".into(), "demo__app__web/demo__cron__backup".into()),
        ]
    );
    assert_eq!(p["steps"][0]["node"], "node-1");
    assert_eq!(p["steps"][1]["after"], json!(["demo__kv__main"]));
    let t = apply(&s, &p);
    // One tree: the producer is a child of the app's step, the app's a child of its child's.
    let backup = &t["children"][0];
    assert_eq!(
        backup["name"], "install demo__app__web/demo__cron__backup",
        "{t:#}"
    );
    assert_eq!(backup["children"][0]["name"], "install demo__app__web");
    assert_eq!(
        backup["children"][0]["children"][0]["name"],
        "install demo__kv__main"
    );
    assert_eq!(
        lines(&log),
        vec![
            "install demo__kv__main 6400 node=node-1 action=install".to_string(),
            "install demo__app__web 6400 tok-6400 kv://127.0.0.1:6400 prev=null".to_string(),
            "install demo__app__web/demo__cron__backup".to_string(),
        ]
    );
    let (st, kv) = s.call("GET", "/api/v1/services/demo__kv__main", None);
    assert_eq!(st, 200, "{kv}");
    assert_eq!(kv["status"], "active");
    assert_eq!(kv["message"], "serving");
    assert_eq!(kv["node"], "node-1");
    assert_eq!(kv["published"], json!({"token": "tok-6400"}));
    assert_eq!(kv["state"], json!({"port": 6400}));
    let (st, b) = s.call(
        "GET",
        "/api/v1/services/demo__app__web%2Fdemo__cron__backup",
        None,
    );
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["message"], "scheduled");

    // Nothing changed: an empty plan, and applying it does nothing.
    let again = plan(&s);
    assert!(steps(&again).is_empty(), "{again:#}");
    assert_eq!(again["unchanged"].as_array().unwrap().len(), 3);
    let (st, a) = s.call(
        "POST",
        "/api/v1/services/apply",
        Some(json!({"plan": again["id"]})),
    );
    assert_eq!(st, 200, "{a}");
    assert!(a["tree"].is_null());
    assert_eq!(lines(&log).len(), 3);

    // A param of the producer: it and its consumer reconfigure, not the app's child.
    let stale = plan(&s);
    write(
        &hq,
        "services/demo__kv__main/service.toml",
        &kv_toml(6401, &log),
        false,
    );
    commit(&hq, "kv on 6401");
    // A plan made before HQ moved is refused.
    let (st, e) = s.call(
        "POST",
        "/api/v1/services/apply",
        Some(json!({"plan": stale["id"]})),
    );
    assert_eq!(st, 200, "an empty plan does nothing even when stale: {e}");
    let p = plan(&s);
    assert_eq!(
        steps(&p),
        vec![
            ("reconfigure".into(), "demo__kv__main".into()),
            ("reconfigure".into(), "demo__app__web".into()),
        ]
    );
    assert!(
        p["steps"][0]["reason"].as_str().unwrap().contains("params"),
        "{p:#}"
    );
    assert!(
        p["steps"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("producer data"),
        "{p:#}"
    );
    write(&hq, "README-services.md", "moved\n", false);
    git(&hq, &["add", "README-services.md"]);
    git(&hq, &["commit", "-q", "-m", "HQ moves"]);
    let (st, e) = s.call(
        "POST",
        "/api/v1/services/apply",
        Some(json!({"plan": p["id"]})),
    );
    assert_eq!(st, 409, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("plan again"),
        "{e}"
    );
    let p = plan(&s);
    assert_eq!(steps(&p).len(), 2);
    apply(&s, &p);
    assert_eq!(
        lines(&log)[3..],
        [
            "install demo__kv__main 6401 node=node-1 action=install".to_string(),
            "install demo__app__web 6401 tok-6401 kv://127.0.0.1:6401 prev={\"seen\": 6400}"
                .to_string(),
        ]
    );
    assert!(steps(&plan(&s)).is_empty());

    // Bad service directories: 422 naming the file and line; nothing planned.
    for (file, text, want) in [
        (
            "services/demo__bad__one/service.toml",
            "domain = \"demo\"\nname = \"bad\"\ninstance = \"one\"\ncolour = \"red\"\n",
            "services/demo__bad__one/service.toml:4:",
        ),
        (
            "services/demo__bad__one/service.toml",
            "domain = \"demo\"\nname = \"bad\"\ninstance = \"two\"\n",
            "do not match the directory name",
        ),
        (
            "services/demo__bad__one/service.toml",
            "domain = \"demo\"\nname = \"bad\"\ninstance = \"one\"\n[params]\nx = 1\n[process]\nexec = [\"${params.nope}\"]\n",
            "service.toml:7: ${params.nope} names nothing",
        ),
        (
            "services/demo__bad__one/service.toml",
            "domain = \"demo\"\nname = \"bad\"\ninstance = \"one\"\n[consumes.db]\ninterface = \"nosuch\"\n",
            "no interface",
        ),
    ] {
        write(&hq, file, text, false);
        commit(&hq, "a bad service");
        let (st, e) = s.call("POST", "/api/v1/services/plan", Some(json!({})));
        assert_eq!(st, 422, "{e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{want}: {msg}");
    }
    // Two producers of kv now: the app's choice is ambiguous, both named.
    write(
        &hq,
        "services/demo__bad__one/service.toml",
        "domain = \"demo\"\nname = \"bad\"\ninstance = \"one\"\n[provides.kv]\ninterface = \"kv\"\ndata = { host = \"h\", port = 1 }\n",
        false,
    );
    commit(&hq, "a second kv");
    let (st, e) = s.call("POST", "/api/v1/services/plan", Some(json!({})));
    assert_eq!(st, 422, "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("ambiguous")
            && msg.contains("demo__bad__one")
            && msg.contains("demo__kv__main"),
        "{msg}"
    );
    git(&hq, &["rm", "-q", "-r", "services/demo__bad__one"]);
    git(&hq, &["commit", "-q", "-m", "no bad service"]);

    // The app's child gone from HQ: reset (its reset action runs, its record goes).
    git(
        &hq,
        &[
            "rm",
            "-q",
            "-r",
            "services/demo__app__web/demo__cron__backup",
        ],
    );
    git(&hq, &["commit", "-q", "-m", "no backup"]);
    let p = plan(&s);
    assert_eq!(
        steps(&p),
        vec![("reset".into(), "demo__app__web/demo__cron__backup".into())]
    );
    apply(&s, &p);
    assert_eq!(
        lines(&log).last().unwrap(),
        "reset demo__app__web/demo__cron__backup"
    );
    let (st, _) = s.call(
        "GET",
        "/api/v1/services/demo__app__web%2Fdemo__cron__backup",
        None,
    );
    assert_eq!(st, 404);
    assert!(steps(&plan(&s)).is_empty());
    // Every action ran once (the retried one counted once: its first try did nothing).
    assert_eq!(lines(&log).len(), 6, "{:#?}", lines(&log));
}

fn reset(s: &Server, path: &str, body: Value) -> (u16, Value) {
    s.call(
        "POST",
        &format!("/api/v1/services/{}/reset", path.replace('/', "%2F")),
        Some(body),
    )
}

/// Waits for the tree of a reset, action or apply answer to succeed.
fn wait_done(s: &Server, answer: &Value) {
    let tree = answer["tree"].as_str().expect("a tree").to_string();
    let t = s.wait_tree(&tree, WAIT);
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
}

fn recorded(s: &Server) -> Vec<String> {
    let (_, l) = s.call("GET", "/api/v1/services", None);
    l["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn orders_apply_actions_and_reset_with_refcounts() {
    let s = Server::start_with(|c| {
        c.store.url = format!("sqlite://{}", c.data_dir.join("muster.db").display());
        crate::hq::fast_pulse(c);
    });
    let hq = s.dir.0.join("hq");
    assert!(wait_until(WAIT, || hq.join(".git").is_dir()));
    let log = s.dir.0.join("actions.log");
    let action = format!(
        "#!/bin/bash\ncat > /dev/null\necho \"$MUSTER_ACTION $MUSTER_SERVICE\" >> '{}'\n\
         if [ \"$MUSTER_ACTION\" = check ]; then echo '{{\"status\": \"maintenance\", \"message\": \"checking\"}}'; fi\n",
        log.display()
    );
    write(
        &hq,
        "interfaces/db.toml",
        "[keys]\nport = \"integer\"\n",
        false,
    );
    let svc = |dir: &str, body: &str| {
        let (d, rest) = dir.split_once("__").unwrap();
        let (n, i) = rest.split_once("__").unwrap();
        write(
            &hq,
            &format!("services/{dir}/service.toml"),
            &format!("domain = \"{d}\"\nname = \"{n}\"\ninstance = \"{i}\"\n{body}"),
            false,
        );
        for verb in ["install", "reset", "check"] {
            write(
                &hq,
                &format!("services/{dir}/actions/{verb}"),
                &action,
                true,
            );
        }
    };
    svc(
        "x__db__main",
        "[provides.db]\ninterface = \"db\"\ndata = { port = 5432 }\n",
    );
    svc("x__app__a", "[consumes.db]\ninterface = \"db\"\n");
    svc("x__app__b", "[consumes.db]\ninterface = \"db\"\n");
    svc("x__lone__one", "");
    commit(&hq, "four services");

    // An `apply` order in deployer/orders plans and applies.
    crate::hq::append_commit(&hq, "deployer/orders", "apply\n");
    crate::hq::wait_order(&s, 1, "succeeded");
    let all = ["x__app__a", "x__app__b", "x__db__main", "x__lone__one"];
    assert!(
        wait_until(WAIT, || recorded(&s) == all),
        "{:?}",
        recorded(&s)
    );
    assert!(wait_until(WAIT, || lines(&log).len() == 4));
    // The producer before its consumers (x__lone__one may come anywhere).
    let l = lines(&log);
    let at = |x: &str| l.iter().position(|y| y == x).unwrap();
    assert!(
        at("install x__db__main") < at("install x__app__a"),
        "{l:#?}"
    );
    assert!(
        at("install x__db__main") < at("install x__app__b"),
        "{l:#?}"
    );
    // `apply services/PATH`: that one and what it needs; nothing left to do here.
    crate::hq::append_commit(&hq, "deployer/orders", "apply services/x__app__a\n");
    crate::hq::wait_order(&s, 2, "succeeded");
    crate::hq::append_commit(&hq, "deployer/orders", "apply services/x__nope__no\n");
    crate::hq::wait_order(&s, 3, "rejected");

    // One action by hand: its result is the service's status.
    let (st, a) = s.call(
        "POST",
        "/api/v1/services/x__app__a/actions/check",
        Some(json!({})),
    );
    assert_eq!(st, 202, "{a}");
    wait_done(&s, &a);
    let mut last = Value::Null;
    assert!(
        wait_until(WAIT, || {
            last = s.call("GET", "/api/v1/services/x__app__a", None).1;
            last["status"] == "maintenance" && last["message"] == "checking"
        }),
        "{last:#}\n{}",
        lines(&log).join("\n")
    );

    // Refused while consumers depend on it, naming them.
    let (st, e) = reset(&s, "x__db__main", json!({}));
    assert_eq!(st, 409, "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("x__app__a") && msg.contains("x__app__b"),
        "{msg}"
    );
    // One consumer goes; the producer stays (still used by the other).
    let (st, r) = reset(&s, "x__app__a", json!({}));
    assert_eq!(st, 202, "{r}");
    assert_eq!(steps(&r), vec![("reset".into(), "x__app__a".into())]);
    wait_done(&s, &r);
    assert!(wait_until(WAIT, || !recorded(&s).contains(&"x__app__a".to_string())));
    assert!(recorded(&s).contains(&"x__db__main".to_string()));
    // The last consumer goes: the producer nothing uses any more goes after it.
    let (st, r) = reset(&s, "x__app__b", json!({}));
    assert_eq!(st, 202, "{r}");
    assert_eq!(
        steps(&r),
        vec![
            ("reset".into(), "x__app__b".into()),
            ("reset".into(), "x__db__main".into())
        ]
    );
    wait_done(&s, &r);
    assert!(wait_until(WAIT, || recorded(&s) == ["x__lone__one"]));

    // Back again by a plan; then keep_deps keeps the producer, and a cascade resets its
    // remaining consumer first.
    let p = plan(&s);
    assert_eq!(steps(&p).len(), 3, "{p:#}");
    apply(&s, &p);
    let (_, r) = reset(&s, "x__app__b", json!({"keep_deps": true}));
    assert_eq!(steps(&r), vec![("reset".into(), "x__app__b".into())]);
    wait_done(&s, &r);
    assert!(wait_until(WAIT, || !recorded(&s).contains(&"x__app__b".to_string())));
    let (st, r) = reset(&s, "x__db__main", json!({"cascade": true}));
    assert_eq!(st, 202, "{r}");
    assert_eq!(
        steps(&r),
        vec![
            ("reset".into(), "x__app__a".into()),
            ("reset".into(), "x__db__main".into())
        ]
    );
    wait_done(&s, &r);
    assert!(wait_until(WAIT, || recorded(&s) == ["x__lone__one"]));
    let (st, _) = reset(&s, "x__nope__no", json!({}));
    assert_eq!(st, 404);
    // Every action ran once per request: 4 + 1 installs, 1 check, resets a, b, db, b, a, db,
    // and 3 installs again.
    let l = lines(&log);
    assert_eq!(
        l.iter().filter(|x| x.starts_with("install")).count(),
        7,
        "{l:#?}"
    );
    assert_eq!(
        l.iter().filter(|x| x.starts_with("check")).count(),
        1,
        "{l:#?}"
    );
    assert_eq!(
        l.iter()
            .filter(|x| x.starts_with("reset"))
            .cloned()
            .collect::<Vec<_>>(),
        [
            "reset x__app__a",
            "reset x__app__b",
            "reset x__db__main",
            "reset x__app__b",
            "reset x__app__a",
            "reset x__db__main"
        ]
    );
}

#[test]
fn a_process_service_runs_through_the_process_layer() {
    let s = Server::start_with(|c| {
        c.store.url = format!("sqlite://{}", c.data_dir.join("muster.db").display());
    });
    let hq = s.dir.0.join("hq");
    assert!(wait_until(WAIT, || hq.join(".git").is_dir()));
    // No actions at all: start, stop and reset are the built-in ones of [process].
    write(
        &hq,
        "services/web__static__one/service.toml",
        "domain = \"web\"\nname = \"static\"\ninstance = \"one\"\n[params]\ndir = \"/\"\n\
         [process]\nshell = \"exec python3 -m http.server --bind 127.0.0.1 --directory ${params.dir} $PORT\"\nports = [\"http\"]\n\
         [process.health]\ntcp = \"http\"\ninterval = \"200ms\"\n",
        false,
    );
    commit(&hq, "a static web server");
    let p = plan(&s);
    assert_eq!(
        steps(&p),
        vec![("install".into(), "web__static__one".into())]
    );
    apply(&s, &p);
    let (_, r) = s.call("GET", "/api/v1/services/web__static__one", None);
    let id = r["process"].as_str().expect("a process").to_string();
    let (st, proc_) = s.call("GET", &format!("/api/v1/processes/{id}"), None);
    assert_eq!(st, 200, "{proc_}");
    assert_eq!(proc_["state"], "healthy", "{proc_:#}");
    // Its status on the pulse: its process's health.
    assert!(wait_until(WAIT, || {
        let (_, r) = s.call("GET", "/api/v1/services/web__static__one", None);
        r["status"] == "active"
    }));
    let port = proc_["ports"]["http"].as_u64().unwrap();
    let resp = crate::harness::http()
        .get(format!("http://127.0.0.1:{port}/"))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(steps(&plan(&s)).is_empty());
    // A param change: a new process with the new spec, the old one gone.
    write(
        &hq,
        "services/web__static__one/service.toml",
        "domain = \"web\"\nname = \"static\"\ninstance = \"one\"\n[params]\ndir = \"/tmp\"\n\
         [process]\nshell = \"exec python3 -m http.server --bind 127.0.0.1 --directory ${params.dir} $PORT\"\nports = [\"http\"]\n\
         [process.health]\ntcp = \"http\"\ninterval = \"200ms\"\n",
        false,
    );
    commit(&hq, "bind elsewhere");
    let p = plan(&s);
    assert_eq!(
        steps(&p),
        vec![("reconfigure".into(), "web__static__one".into())]
    );
    apply(&s, &p);
    let (_, r) = s.call("GET", "/api/v1/services/web__static__one", None);
    let id2 = r["process"].as_str().unwrap().to_string();
    assert_ne!(id, id2);
    let gone = |id: &str| {
        let (st, p) = s.call("GET", &format!("/api/v1/processes/{id}"), None);
        st == 404 || p["state"] == "stopped"
    };
    assert!(wait_until(WAIT, || gone(&id)), "the old process still runs");
    // Reset: the process goes with the record.
    let (st, r) = reset(&s, "web__static__one", json!({}));
    assert_eq!(st, 202, "{r}");
    wait_done(&s, &r);
    assert!(
        wait_until(WAIT, || gone(&id2)),
        "the process still runs after the reset"
    );
    assert!(wait_until(WAIT, || recorded(&s).is_empty()));
}

#[test]
fn monitors_run_on_the_pulse() {
    let s = Server::start_with(|c| {
        c.store.url = format!("sqlite://{}", c.data_dir.join("muster.db").display());
        crate::hq::fast_pulse(c);
    });
    let hq = s.dir.0.join("hq");
    assert!(wait_until(WAIT, || hq.join(".git").is_dir()));
    let log = s.dir.0.join("monitor.log");
    let monitor = format!(
        "#!/bin/bash\ncat > /dev/null\necho \"$MUSTER_SERVICE\" >> '{}'\n\
         n=$(grep -c \"^$MUSTER_SERVICE\\$\" '{}')\n\
         echo '{{\"status\": \"active\", \"message\": \"check '$n'\"}}'\n",
        log.display(),
        log.display()
    );
    for (dir, extra) in [
        ("m__every__pulse", ""),
        ("m__every__hour", "monitor_every = \"1h\"\n"),
    ] {
        let (d, rest) = dir.split_once("__").unwrap();
        let (n, i) = rest.split_once("__").unwrap();
        write(
            &hq,
            &format!("services/{dir}/service.toml"),
            &format!("domain = \"{d}\"\nname = \"{n}\"\ninstance = \"{i}\"\n{extra}"),
            false,
        );
        write(
            &hq,
            &format!("services/{dir}/actions/monitor"),
            &monitor,
            true,
        );
    }
    commit(&hq, "two monitored services");
    let p = plan(&s);
    apply(&s, &p);
    // Every pulse: its message counts up; every hour: once.
    let count = |who: &str| lines(&log).iter().filter(|l| *l == who).count();
    assert!(
        wait_until(WAIT, || count("m__every__pulse") >= 3),
        "{:?}",
        lines(&log)
    );
    assert!(wait_until(WAIT, || {
        let (_, r) = s.call("GET", "/api/v1/services/m__every__pulse", None);
        r["status"] == "active"
            && r["message"]
                .as_str()
                .and_then(|m| m.strip_prefix("check "))
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n >= 2)
            && r["last_action"] == "monitor"
    }));
    assert_eq!(count("m__every__hour"), 1, "{:?}", lines(&log));
    // A monitor never changes what is installed: nothing to plan.
    assert!(steps(&plan(&s)).is_empty());
}

#[test]
fn kill_9_of_the_server_mid_apply_finishes_the_tree_with_every_action_once() {
    use crate::crash::{call, setup, Up};
    let dir = crate::harness::TempDir::new("svc-crash");
    let out = crate::harness::TempDir::new("svc-crash-out");
    let (marks, gate) = (out.0.join("marks"), out.0.join("gate"));
    let mut up = Up::start(&dir.0);
    let token = setup(&up, &dir.0);
    let hq = dir.0.join("hq");
    assert!(wait_until(WAIT, || hq.join(".git").is_dir()));
    // A chain by nesting: a, then a/b (which waits for the gate), then a/b/c.
    let action = format!(
        "#!/bin/bash\ncat > /dev/null\necho \"install $MUSTER_SERVICE\" >> '{m}'\n\
         if [ \"$MUSTER_SERVICE\" = x__a__a/x__b__b ]; then\n\
           for i in $(seq 600); do [ -e '{g}' ] && break; sleep 0.1; done\nfi\n\
         echo \"done $MUSTER_SERVICE\" >> '{m}'\n",
        m = marks.display(),
        g = gate.display()
    );
    let mut at = String::from("services");
    for n in ["a", "b", "c"] {
        at = format!("{at}/x__{n}__{n}");
        write(
            &hq,
            &format!("{at}/service.toml"),
            &format!("domain = \"x\"\nname = \"{n}\"\ninstance = \"{n}\"\n"),
            false,
        );
        write(&hq, &format!("{at}/actions/install"), &action, true);
    }
    commit(&hq, "a chain");
    let (st, p) = call(
        &up.url,
        Some(&token),
        "POST",
        "/api/v1/services/plan",
        Some(json!({})),
    );
    assert_eq!(st, 201, "{p}");
    let (st, a) = call(
        &up.url,
        Some(&token),
        "POST",
        "/api/v1/services/apply",
        Some(json!({"plan": p["id"]})),
    );
    assert_eq!(st, 202, "{a}");
    let tree = a["tree"].as_str().unwrap().to_string();
    assert!(wait_until(WAIT, || lines(&marks)
        .contains(&"install x__a__a/x__b__b".to_string())));
    up.kill9();
    // The middle action finishes while the server is down.
    std::fs::write(&gate, b"").unwrap();
    let up = Up::start(&dir.0);
    let t = crate::crash::wait_tree(&up.url, &token, &tree, WAIT);
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let paths = ["x__a__a", "x__a__a/x__b__b", "x__a__a/x__b__b/x__c__c"];
    let mut want = Vec::new();
    for p in paths {
        want.push(format!("install {p}"));
        want.push(format!("done {p}"));
    }
    assert_eq!(lines(&marks), want, "every action ran once, in order");
    // Every step is recorded, the one that ended while the server was down too.
    let id = p["id"].as_str().unwrap().to_string();
    assert!(
        wait_until(WAIT, || {
            let (_, l) = call(&up.url, Some(&token), "GET", "/api/v1/services", None);
            let items = l["items"].as_array().cloned().unwrap_or_default();
            paths.iter().all(|p| {
                items.iter().any(|i| {
                    i["path"] == *p && i["last_plan"] == id.as_str() && i["installed"] == true
                })
            })
        }),
        "not every step was recorded"
    );
    let (_, again) = call(
        &up.url,
        Some(&token),
        "POST",
        "/api/v1/services/plan",
        Some(json!({})),
    );
    assert_eq!(again["steps"], json!([]), "{again:#}");
}

#[test]
fn export_and_import_move_a_services_data_as_archives() {
    let s = Server::start_with(|c| {
        c.store.url = format!("sqlite://{}", c.data_dir.join("muster.db").display());
    });
    let hq = s.dir.0.join("hq");
    assert!(wait_until(WAIT, || hq.join(".git").is_dir()));
    let d = "services/data__kv__main";
    write(
        &hq,
        &format!("{d}/service.toml"),
        "domain = \"data\"\nname = \"kv\"\ninstance = \"main\"\n",
        false,
    );
    write(
        &hq,
        &format!("{d}/actions/install"),
        "#!/bin/bash\ncat > /dev/null\necho one > \"$MUSTER_STATE_DIR/data.txt\"\n",
        true,
    );
    write(
        &hq,
        &format!("{d}/actions/export"),
        "#!/bin/bash\ncat > /dev/null\ncp \"$MUSTER_STATE_DIR/data.txt\" \"$MUSTER_EXPORT_DIR/\"\necho '{\"message\": \"exported\"}'\n",
        true,
    );
    write(
        &hq,
        &format!("{d}/actions/import"),
        "#!/bin/bash\ncat > /dev/null\ncp \"$MUSTER_IMPORT_DIR/data.txt\" \"$MUSTER_STATE_DIR/data.txt\"\necho '{\"message\": \"imported\"}'\n",
        true,
    );
    commit(&hq, "a kv with its data");
    apply(&s, &plan(&s));
    let state = s.dir.0.join("agent/services/state/data__kv__main/data.txt");
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "one\n");
    // Export: the directory the action filled, kept as an archive.
    let (st, a) = s.call(
        "POST",
        "/api/v1/services/data__kv__main/actions/export",
        Some(json!({})),
    );
    assert_eq!(st, 202, "{a}");
    wait_done(&s, &a);
    let mut rec = Value::Null;
    assert!(
        wait_until(WAIT, || {
            rec = s.call("GET", "/api/v1/services/data__kv__main", None).1;
            rec["exports"].as_array().is_some_and(|e| e.len() == 1) && rec["message"] == "exported"
        }),
        "{rec:#}"
    );
    let id = rec["exports"][0]["id"].as_str().unwrap().to_string();
    let resp = crate::harness::http()
        .get(format!(
            "{}/api/v1/services/data__kv__main/exports/{id}",
            s.url
        ))
        .header("authorization", &format!("Bearer {}", s.token))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let tgz = s.dir.0.join("export.tgz");
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_body().into_reader(), &mut body).unwrap();
    std::fs::write(&tgz, &body).unwrap();
    let listed = std::process::Command::new("python3")
        .args(["-c", "import sys,tarfile\nt=tarfile.open(sys.argv[1])\nf=[m for m in t.getmembers() if m.name.endswith('data.txt')][0]\nprint(t.extractfile(f).read().decode(), end='')"])
        .arg(&tgz)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "one\n",
        "{listed:?}"
    );
    let (st, _) = s.call("GET", "/api/v1/services/data__kv__main/exports/nope", None);
    assert_eq!(st, 404);
    // Import: an archive (made by python's tarfile) unpacked for the action.
    let make = |name: &str, member: &str, text: &str| {
        let p = s.dir.0.join(name);
        let ok = std::process::Command::new("python3")
            .args([
                "-c",
                "import io,sys,tarfile\nt=tarfile.open(sys.argv[1],'w:gz')\nb=sys.argv[3].encode()\ni=tarfile.TarInfo(sys.argv[2]); i.size=len(b)\nt.addfile(i,io.BytesIO(b)); t.close()",
            ])
            .arg(&p)
            .args([member, text])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        std::fs::read(p).unwrap()
    };
    let import = |data: Vec<u8>| {
        let resp = crate::harness::http()
            .post(format!("{}/api/v1/services/data__kv__main/import", s.url))
            .header("authorization", &format!("Bearer {}", s.token))
            .header("content-type", "application/gzip")
            .send(&data[..])
            .unwrap();
        let st = resp.status().as_u16();
        let v: Value = serde_json::from_str(&resp.into_body().read_to_string().unwrap()).unwrap();
        (st, v)
    };
    let (st, a) = import(make("good.tgz", "data.txt", "two\n"));
    assert_eq!(st, 202, "{a}");
    wait_done(&s, &a);
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "two\n");
    // A path out of the directory: refused on the node, nothing imported.
    let (st, a) = import(make("evil.tgz", "../../evil.txt", "evil\n"));
    assert_eq!(st, 202, "{a}");
    let t = s.wait_tree(a["tree"].as_str().unwrap(), WAIT);
    assert_eq!(t["tree_state"], "failed", "{t:#}");
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "two\n");
    assert!(!s.dir.0.join("agent/services/evil.txt").exists());
    assert!(!s.dir.0.join("agent/evil.txt").exists());
    // Not an archive at all: 400.
    let (st, _) = import(b"hello".to_vec());
    assert_eq!(st, 400);
}

/// Every file under `dir` (recursively) whose bytes contain `needle`, but `except`.
fn files_with(dir: &Path, needle: &[u8], except: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                todo.push(p);
            } else if ft.is_file() && p != except {
                let data = std::fs::read(&p).unwrap_or_default();
                if data.windows(needle.len()).any(|w| w == needle) {
                    found.push(p.display().to_string());
                }
            }
        }
    }
    found
}

#[test]
fn secrets_resolve_on_the_node_only_and_never_show() {
    use std::os::unix::fs::PermissionsExt;
    // SQLite on the Redis pass too: the store's raw files are read below.
    let s = Server::start_with(|c| {
        c.store.url = format!("sqlite://{}", c.data_dir.join("muster.db").display());
    });
    let hq = s.dir.0.join("hq");
    assert!(wait_until(WAIT, || hq.join(".git").is_dir()));
    let value = "hunter2-Zq9x/\"pw\"";
    write(
        &hq,
        "services/demo__db__main/service.toml",
        "domain = \"demo\"\nname = \"db\"\ninstance = \"main\"\n\n[params]\npassword = \"${secrets.pw}\"\n\
         dsn = \"db://u:${secrets.pw}@h\"\n\n[secrets]\npw = \"the database password\"\n",
        false,
    );
    // The action gets the value in its context, keeps it in its state dir, and prints it on
    // stdout, on stderr and in its result.
    write(
        &hq,
        "services/demo__db__main/actions/install",
        r#"#!/bin/bash
set -e
ctx=$(cat)
pw=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["params"]["password"], end="")' "$ctx")
dsn=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["params"]["dsn"], end="")' "$ctx")
printf '%s' "$pw" > "$MUSTER_STATE_DIR/pw"
echo "the password is $pw"
echo "dsn $dsn" >&2
python3 -c 'import json,sys; print(json.dumps({"message": "pw " + sys.argv[1], "state": {"pw": sys.argv[1]}}))' "$pw"
"#,
        true,
    );
    commit(&hq, "a database with a secret");

    // Not set yet: the plan names the service and the key.
    let (st, e) = s.call("POST", "/api/v1/services/plan", Some(json!({})));
    assert_eq!(st, 422, "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("demo__db__main") && msg.contains("secret pw is not set"),
        "{msg}"
    );

    // Bad input: clear 4xx without the value echoed.
    let (st, e) = s.call(
        "PUT",
        "/api/v1/services/demo__db__main/secrets/pw",
        Some(json!({"value": ""})),
    );
    assert_eq!(st, 400, "{e}");
    let (st, e) = s.call(
        "PUT",
        "/api/v1/services/demo__db__main/secrets/bad%20key",
        Some(json!({"value": value})),
    );
    assert_eq!(st, 400, "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");

    let mut bodies: Vec<String> = Vec::new();
    let (st, set) = s.call(
        "PUT",
        "/api/v1/services/demo__db__main/secrets/pw",
        Some(json!({"value": value})),
    );
    assert_eq!(st, 200, "{set}");
    bodies.push(set.to_string());
    // The key file: apart from the store, 0600.
    let key_file = s.dir.0.join("secrets.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let p = plan(&s);
    assert_eq!(
        steps(&p),
        vec![("install".to_string(), "demo__db__main".to_string())]
    );
    bodies.push(p.to_string());
    let t = apply(&s, &p);
    let state_file = s.dir.0.join("node/services/state/demo__db__main/pw");
    let state_file = if state_file.exists() {
        state_file
    } else {
        // Wherever the embedded node keeps its data dir.
        let mut found = None;
        let mut todo = vec![s.dir.0.clone()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.ends_with("state/demo__db__main/pw") {
                    found = Some(p.clone());
                }
                if p.is_dir() {
                    todo.push(p);
                }
            }
        }
        found.expect("the action kept the password in its state dir")
    };
    // The action had the value itself.
    assert_eq!(std::fs::read_to_string(&state_file).unwrap(), value);
    // The job log masks it, on stdout, stderr and in the result.
    let job = t["children"][0]["id"].as_str().unwrap().to_string();
    let log = s.log(&job);
    assert!(log.contains("the password is ***"), "{log}");
    assert!(log.contains("dsn db://u:***@h"), "{log}");
    assert!(!log.contains("hunter2"), "{log}");
    bodies.push(log);
    // Only the step's own job may ask for the values: not even a cluster admin.
    let plan_id = p["id"].as_str().unwrap();
    let (st, e) = s.call(
        "GET",
        &format!("/api/v1/services/plans/{plan_id}/steps/s1/secrets"),
        None,
    );
    assert_eq!(st, 403, "{e}");
    bodies.push(e.to_string());
    // No API answer holds it.
    for path in [
        "/api/v1/services".to_string(),
        "/api/v1/services/demo__db__main".to_string(),
        "/api/v1/services/demo__db__main/secrets".to_string(),
        format!("/api/v1/services/plans/{plan_id}"),
        format!("/api/v1/services/plans/{plan_id}/steps/s1"),
        format!("/api/v1/jobs/{job}"),
        format!("/api/v1/jobs/{}/tree", t["id"].as_str().unwrap()),
    ] {
        let (st, text) = s.raw(Some(&s.token), "GET", &path, None, &[]);
        assert_eq!(st, 200, "{path}: {text}");
        bodies.push(text);
    }
    let (_, rec) = s.call("GET", "/api/v1/services/demo__db__main", None);
    assert_eq!(rec["message"], "pw ***");
    let (_, list) = s.call("GET", "/api/v1/services/demo__db__main/secrets", None);
    assert_eq!(list["items"][0]["key"], "pw");
    for b in &bodies {
        assert!(!b.contains("hunter2"), "an answer holds the secret: {b}");
    }
    // Nor does any file under the data dir (the store, the logs, the blobs, the node's
    // files) but the action's own.
    let found = files_with(&s.dir.0, b"hunter2", &state_file);
    assert!(found.is_empty(), "the secret is in {found:?}");

    // A new value: the service reconfigures (its secrets changed), and the action has it.
    let (st, _) = s.call(
        "PUT",
        "/api/v1/services/demo__db__main/secrets/pw",
        Some(json!({"value": "second-Qx7"})),
    );
    assert_eq!(st, 200);
    let p = plan(&s);
    assert_eq!(
        steps(&p),
        vec![("reconfigure".to_string(), "demo__db__main".to_string())]
    );
    assert!(
        p["steps"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("secrets"),
        "{p}"
    );
    apply(&s, &p);
    assert_eq!(std::fs::read_to_string(&state_file).unwrap(), "second-Qx7");
    assert!(files_with(&s.dir.0, b"second-Qx7", &state_file).is_empty());

    // Removed: the next plan names it again.
    let (st, _) = s.call("DELETE", "/api/v1/services/demo__db__main/secrets/pw", None);
    assert_eq!(st, 204);
    let (st, _) = s.call("DELETE", "/api/v1/services/demo__db__main/secrets/pw", None);
    assert_eq!(st, 404);
    let (st, e) = s.call("POST", "/api/v1/services/plan", Some(json!({})));
    assert_eq!(st, 422, "{e}");
}

/// Two plans made at the same state: only one apply runs. While one runs, the other is 409
/// naming it; two applies at once give one tree; once it ended, the other plan is stale (409),
/// and a new plan applies (the claim is let go).
#[test]
fn two_applies_of_one_state_never_both_run() {
    let s = Server::start_with(|c| {
        c.store.url = format!("sqlite://{}", c.data_dir.join("muster.db").display());
    });
    let hq = s.dir.0.join("hq");
    assert!(wait_until(WAIT, || hq.join(".git").is_dir()));
    let (marks, gate) = (s.dir.0.join("marks"), s.dir.0.join("gate"));
    let action = |svc: &str| {
        format!(
            "#!/bin/bash\ncat > /dev/null\necho \"install {svc}\" >> '{m}'\n\
             for i in $(seq 600); do [ -e '{g}' ] && break; sleep 0.1; done\n",
            m = marks.display(),
            g = gate.display()
        )
    };
    let svc = |n: &str| {
        write(
            &hq,
            &format!("services/x__{n}__{n}/service.toml"),
            &format!("domain = \"x\"\nname = \"{n}\"\ninstance = \"{n}\"\n"),
            false,
        );
        write(
            &hq,
            &format!("services/x__{n}__{n}/actions/install"),
            &action(n),
            true,
        );
    };
    svc("a");
    commit(&hq, "one service");
    let (p1, p2) = (plan(&s), plan(&s));
    assert_eq!(steps(&p1), steps(&p2));
    let (st, a1) = s.call(
        "POST",
        "/api/v1/services/apply",
        Some(json!({"plan": p1["id"]})),
    );
    assert_eq!(st, 202, "{a1}");
    assert!(wait_until(WAIT, || lines(&marks).len() == 1));
    let (st, a2) = s.call(
        "POST",
        "/api/v1/services/apply",
        Some(json!({"plan": p2["id"]})),
    );
    assert_eq!(st, 409, "{a2}");
    let msg = a2["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        msg.contains(p1["id"].as_str().unwrap()) && msg.contains("being applied"),
        "{a2}"
    );
    // The same plan again is the same tree.
    let (st, again) = s.call(
        "POST",
        "/api/v1/services/apply",
        Some(json!({"plan": p1["id"]})),
    );
    assert_eq!(st, 202, "{again}");
    assert_eq!(again["tree"], a1["tree"]);
    std::fs::write(&gate, b"").unwrap();
    wait_done(&s, &a1);
    let (st, a2) = s.call(
        "POST",
        "/api/v1/services/apply",
        Some(json!({"plan": p2["id"]})),
    );
    assert_eq!(st, 409, "a plan made before the apply is stale: {a2}");
    assert_eq!(lines(&marks), vec!["install a".to_string()]);

    // Two applies at once of two plans of one new state: one tree, one 409.
    svc("b");
    commit(&hq, "a second service");
    let (p3, p4) = (plan(&s), plan(&s));
    let answers: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let hs: Vec<_> = [&p3, &p4]
            .into_iter()
            .map(|p| {
                let s = &s;
                sc.spawn(move || {
                    s.call(
                        "POST",
                        "/api/v1/services/apply",
                        Some(json!({"plan": p["id"]})),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut codes: Vec<u16> = answers.iter().map(|(st, _)| *st).collect();
    codes.sort();
    assert_eq!(codes, vec![202, 409], "{answers:?}");
    let won = &answers.iter().find(|(st, _)| *st == 202).unwrap().1;
    wait_done(&s, won);
    assert_eq!(
        lines(&marks),
        vec!["install a".to_string(), "install b".to_string()],
        "b installed once"
    );
    // Nothing left to do: the claim of the ended apply does not hold a new one back.
    svc("c");
    commit(&hq, "a third service");
    let p5 = plan(&s);
    let (st, a5) = s.call(
        "POST",
        "/api/v1/services/apply",
        Some(json!({"plan": p5["id"]})),
    );
    assert_eq!(st, 202, "{a5}");
    wait_done(&s, &a5);
    assert_eq!(lines(&marks).len(), 3);
}

/// The plan route's body: none or `{}` plans everything, `only` one service (and what it
/// waits for), unknown keys and bad paths are 400, a path HQ does not hold is 404.
#[test]
fn the_plan_route_takes_only_what_it_knows() {
    let s = Server::start_with(|c| {
        c.store.url = format!("sqlite://{}", c.data_dir.join("muster.db").display());
    });
    let hq = s.dir.0.join("hq");
    assert!(wait_until(WAIT, || hq.join(".git").is_dir()));
    setup(&hq, &s.dir.0.join("actions.log"));
    let all = steps(&plan(&s));
    assert_eq!(all.len(), 3, "{all:?}");
    let (st, p) = s.call("POST", "/api/v1/services/plan", None);
    assert_eq!(st, 201, "{p}");
    assert_eq!(steps(&p), all);
    let (st, p) = s.call(
        "POST",
        "/api/v1/services/plan",
        Some(json!({"only": "services/demo__app__web"})),
    );
    assert_eq!(st, 201, "{p}");
    assert_eq!(
        steps(&p),
        all.clone(),
        "the app, the child under it and the store it waits for"
    );
    let (st, p) = s.call(
        "POST",
        "/api/v1/services/plan",
        Some(json!({"only": "demo__kv__main"})),
    );
    assert_eq!(st, 201, "{p}");
    assert_eq!(
        steps(&p),
        vec![("install".to_string(), "demo__kv__main".to_string())]
    );
    for bad in [
        json!({"only": "../../etc"}),
        json!({"only": 3}),
        json!({"everything": true}),
        json!([]),
    ] {
        let (st, e) = s.call("POST", "/api/v1/services/plan", Some(bad.clone()));
        assert_eq!(st, 400, "{bad} -> {e}");
        assert!(e["error"]["message"].is_string(), "{e}");
        assert!(!e.to_string().contains("../../etc"), "{e}");
    }
    let (st, e) = s.call(
        "POST",
        "/api/v1/services/plan",
        Some(json!({"only": "demo__nope__x"})),
    );
    assert_eq!(st, 404, "{e}");
    // Nothing was applied by any of it.
    assert!(recorded(&s).is_empty());
}

/// `[build]`: a source directory in HQ and a git repository at a rev, built on the node by a
/// command that counts its runs; the same inputs never build twice (`build: cached` in the
/// plan, the count unchanged, the artifacts still installed); a changed source builds again;
/// a bad glob is refused at plan time; an artifact that is a link fails the step.
#[test]
fn builds_run_once_per_input_and_install_fetches_the_artifacts() {
    let s = Server::start_with(|c| {
        c.store.url = format!("sqlite://{}", c.data_dir.join("muster.db").display());
    });
    let hq = s.dir.0.join("hq");
    assert!(wait_until(WAIT, || hq.join(".git").is_dir()));
    let (counter, marks) = (s.dir.0.join("builds"), s.dir.0.join("marks"));
    let commit_all = |msg: &str| {
        git(&hq, &["add", "-A"]);
        git(&hq, &["commit", "-q", "-m", msg]);
    };
    write(
        &hq,
        "src/hello/greet.sh",
        "#!/bin/sh\necho hello v1\n",
        true,
    );
    let tool = |n: u32| {
        format!(
            "domain = \"x\"\nname = \"tool\"\ninstance = \"main\"\n[params]\nn = {n}\n\
             [build]\nsource = \"src/hello\"\n\
             command = \"echo tool >> '{c}'; mkdir -p out/bin; cp greet.sh out/bin/greet; echo junk > out/skip.tmp\"\n\
             artifacts = [\"out/bin/*\"]\n",
            c = counter.display()
        )
    };
    write(&hq, "services/x__tool__main/service.toml", &tool(1), false);
    let install = format!(
        "#!/bin/bash\nset -e\ncat > /dev/null\n\"$MUSTER_ARTIFACTS_DIR/out/bin/greet\" >> '{m}'\n\
         ls \"$MUSTER_ARTIFACTS_DIR/out\" >> '{m}'\n",
        m = marks.display()
    );
    write(
        &hq,
        "services/x__tool__main/actions/install",
        &install,
        true,
    );
    commit_all("a tool built from HQ");
    let builds = |p: &Value| -> Vec<Value> {
        p["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["build"].clone())
            .collect()
    };
    let count = || lines(&counter).len();

    let p = plan(&s);
    assert_eq!(builds(&p), vec![json!("needed")], "{p:#}");
    apply(&s, &p);
    assert_eq!(count(), 1);
    assert_eq!(lines(&marks), vec!["hello v1", "bin"]);

    // A param change: reconfigured, but the build's inputs are the same.
    write(&hq, "services/x__tool__main/service.toml", &tool(2), false);
    commit_all("n = 2");
    let p = plan(&s);
    assert_eq!(steps(&p)[0].0, "reconfigure");
    assert_eq!(builds(&p), vec![json!("cached")], "{p:#}");
    apply(&s, &p);
    assert_eq!(count(), 1, "the same inputs built twice");
    assert_eq!(lines(&marks)[2..], ["hello v1", "bin"]);

    // The source changed: built again, and the new artifacts installed.
    write(
        &hq,
        "src/hello/greet.sh",
        "#!/bin/sh\necho hello v2\n",
        true,
    );
    commit_all("v2");
    let p = plan(&s);
    assert_eq!(
        steps(&p),
        vec![("reconfigure".to_string(), "x__tool__main".to_string())]
    );
    assert_eq!(builds(&p), vec![json!("needed")]);
    apply(&s, &p);
    assert_eq!(count(), 2);
    assert_eq!(lines(&marks)[4..], ["hello v2", "bin"]);

    // A git repository at a branch: the rev resolves to a commit at plan time.
    let remote = s.dir.0.join("remote.git");
    let work = s.dir.0.join("work");
    git(
        &s.dir.0,
        &["init", "-q", "--bare", "-b", "main", "remote.git"],
    );
    git(&s.dir.0, &["init", "-q", "-b", "main", "work"]);
    let push = |text: &str| {
        std::fs::write(work.join("mk.sh"), text).unwrap();
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "mk"]);
        git(&work, &["push", "-q", remote.to_str().unwrap(), "main"]);
    };
    push("mkdir -p out && echo from git one > out/a.txt\n");
    write(
        &hq,
        "services/x__gitb__main/service.toml",
        &format!(
            "domain = \"x\"\nname = \"gitb\"\ninstance = \"main\"\n[build]\ngit = \"{}\"\nrev = \"main\"\n\
             command = \"echo gitb >> '{}'; sh mk.sh\"\nartifacts = [\"out/*.txt\"]\n",
            remote.display(),
            counter.display()
        ),
        false,
    );
    write(
        &hq,
        "services/x__gitb__main/actions/install",
        &format!(
            "#!/bin/bash\ncat > /dev/null\ncat \"$MUSTER_ARTIFACTS_DIR/out/a.txt\" >> '{}'\n",
            marks.display()
        ),
        true,
    );
    commit_all("a build from git");
    let p = plan(&s);
    assert_eq!(
        steps(&p),
        vec![("install".to_string(), "x__gitb__main".to_string())]
    );
    apply(&s, &p);
    assert_eq!(lines(&marks).last().unwrap(), "from git one");
    assert_eq!(count(), 3);
    assert_eq!(plan(&s)["steps"], json!([]), "nothing changed");
    // A new commit on the branch is a new input.
    push("mkdir -p out && echo from git two > out/a.txt\n");
    let p = plan(&s);
    assert_eq!(
        steps(&p),
        vec![("reconfigure".to_string(), "x__gitb__main".to_string())]
    );
    assert_eq!(builds(&p), vec![json!("needed")]);
    apply(&s, &p);
    assert_eq!(lines(&marks).last().unwrap(), "from git two");
    assert_eq!(count(), 4);

    // A glob out of the source: refused at plan time, naming the file.
    write(
        &hq,
        "services/x__bad__main/service.toml",
        "domain = \"x\"\nname = \"bad\"\ninstance = \"main\"\n[build]\nsource = \"src/hello\"\n\
         command = \"true\"\nartifacts = [\"../../etc/*\"]\n",
        false,
    );
    commit_all("a bad glob");
    let (st, e) = s.call("POST", "/api/v1/services/plan", Some(json!({})));
    assert_eq!(st, 422, "{e}");
    assert!(
        e.to_string().contains("services/x__bad__main/service.toml"),
        "{e}"
    );
    // An artifact that is a link: the step fails and says why; nothing is kept.
    write(
        &hq,
        "services/x__bad__main/service.toml",
        "domain = \"x\"\nname = \"bad\"\ninstance = \"main\"\n[build]\nsource = \"src/hello\"\n\
         command = \"mkdir -p out && ln -s /etc/passwd out/pw\"\nartifacts = [\"out/*\"]\n",
        false,
    );
    commit_all("a link as an artifact");
    let p = plan(&s);
    let (st, a) = s.call(
        "POST",
        "/api/v1/services/apply",
        Some(json!({"plan": p["id"]})),
    );
    assert_eq!(st, 202, "{a}");
    let t = s.wait_tree(a["tree"].as_str().unwrap(), WAIT);
    assert_eq!(t["tree_state"], "failed", "{t:#}");
    let job = t["children"][0]["id"].as_str().unwrap().to_string();
    let log = s.log(&job);
    assert!(log.contains("is a symbolic link"), "{log}");
}

/// `${secrets.KEY}` in a `[process]`'s env: the process has the value, its log masks it, and
/// no API answer, record or file of muster holds it (the env keeps the reference). Elsewhere in
/// `[process]`, or inside a longer string, it is refused at plan time.
#[test]
fn a_process_service_gets_its_secret_in_env_on_the_node_only() {
    let s = Server::start_with(|c| {
        c.store.url = format!("sqlite://{}", c.data_dir.join("muster.db").display());
    });
    let hq = s.dir.0.join("hq");
    assert!(wait_until(WAIT, || hq.join(".git").is_dir()));
    let out = crate::harness::TempDir::new("svc-proc-secret");
    let seen = out.0.join("token");
    let value = "tok-Vb81/\"z\"";
    let toml = |env: &str, args: &str| {
        format!(
            "domain = \"demo\"\nname = \"web\"\ninstance = \"sec\"\n\n[secrets]\ntoken = \"an API token\"\n\n\
             [process]\nexec = [\"python3\", \"-c\", \"import os, sys, time; open(sys.argv[1], 'w').write(os.environ['API_TOKEN']); print('token is', os.environ['API_TOKEN'], flush=True); time.sleep(3600)\", \"{}\"{args}]\n\
             env = {{ API_TOKEN = \"{env}\" }}\n",
            seen.display()
        )
    };
    let (st, set) = s.call(
        "PUT",
        "/api/v1/services/demo__web__sec/secrets/token",
        Some(json!({"value": value})),
    );
    assert_eq!(st, 200, "{set}");
    let svc = "services/demo__web__sec/service.toml";
    // Refused: in the arguments, or inside a longer value.
    for (env, args, want) in [
        ("${secrets.token}", ", \"${secrets.token}\"", "env only"),
        ("Bearer ${secrets.token}", "", "whole value"),
    ] {
        write(&hq, svc, &toml(env, args), false);
        commit(&hq, "a bad secret");
        let (st, e) = s.call("POST", "/api/v1/services/plan", Some(json!({})));
        assert_eq!(st, 422, "{e}");
        let msg = e["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(want) && msg.contains(svc), "{msg}");
    }
    write(&hq, svc, &toml("${secrets.token}", ""), false);
    commit(&hq, "a process with a secret in its env");
    let p = plan(&s);
    apply(&s, &p);
    assert!(wait_until(WAIT, || std::fs::read_to_string(&seen)
        .is_ok_and(|t| t == value)));
    let (_, rec) = s.call("GET", "/api/v1/services/demo__web__sec", None);
    let pid = rec["process"].as_str().expect("a process").to_string();
    let (_, proc) = s.call("GET", &format!("/api/v1/processes/{pid}"), None);
    assert_eq!(proc["env"]["API_TOKEN"], "${secrets.token}", "{proc:#}");
    let log_path = format!("/api/v1/processes/{pid}/log");
    let mut log = String::new();
    assert!(wait_until(WAIT, || {
        log = s.raw(Some(&s.token), "GET", &log_path, None, &[]).1;
        log.contains("token is")
    }));
    assert!(log.contains("token is ***"), "{log}");
    let mut bodies = vec![log, rec.to_string(), proc.to_string()];
    for path in [
        "/api/v1/services".to_string(),
        "/api/v1/processes".to_string(),
        format!("/api/v1/services/plans/{}", p["id"].as_str().unwrap()),
    ] {
        let (st, text) = s.raw(Some(&s.token), "GET", &path, None, &[]);
        assert_eq!(st, 200, "{path}: {text}");
        bodies.push(text);
    }
    for b in &bodies {
        assert!(!b.contains("tok-Vb81"), "an answer holds the secret: {b}");
    }
    let found = files_with(&s.dir.0, b"tok-Vb81", &seen);
    assert!(found.is_empty(), "the secret is in {found:?}");
}
