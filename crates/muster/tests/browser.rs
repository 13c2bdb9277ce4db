//! Browser tests of the dashboards (SPEC §10): the real `muster up` on port 0, driven in Debian's
//! headless `chromium` through `chromedriver` (installed by `scripts/test`). Screenshots of each
//! page go to `test-output/screenshots/`.

mod support;
mod webdriver;

#[path = "../../muster-models/tests/support/mod.rs"]
mod model_support;

use support::{temp_path, TempDir};

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use webdriver::{poll, Browser};

const WAIT: Duration = Duration::from_secs(20);
const PASSWORD: &str = "correct horse battery";

fn shots_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../test-output/screenshots")
}

/// `muster up` as a child with a fresh data dir; killed (and the dir removed) on drop.
struct Up {
    child: Child,
    url: String,
    dir: TempDir,
}

impl Up {
    fn start() -> Up {
        Self::start_env(&[])
    }

    /// With more environment (config overrides).
    fn start_env(env: &[(&str, &str)]) -> Up {
        let dir = TempDir::new("data");
        let mut child = Command::new(env!("CARGO_BIN_EXE_muster"))
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir.0)
            .env("MUSTER_JOBS__KILL_GRACE", "2s")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
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
        std::thread::spawn(move || for _ in out.lines() {});
        Up { child, url, dir }
    }

    fn call(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        let url = format!("{}{path}", self.url);
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = match body {
            Some(b) => agent.run(
                req.header("content-type", "application/json")
                    .body(b.to_string())
                    .unwrap(),
            ),
            None => agent.run(req.body(()).unwrap()),
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let st = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        (st, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates the admin through the API with the code `muster up` wrote; returns a token.
    fn setup(&self) -> String {
        let code = std::fs::read_to_string(self.dir.0.join("setup-code")).unwrap();
        let (st, body) = self.call(
            None,
            "POST",
            "/api/v1/setup",
            Some(json!({"setup_code": code.trim(), "username": "admin", "password": PASSWORD})),
        );
        assert_eq!(st, 201, "{body}");
        body["token"].as_str().unwrap().to_string()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The dir ends whatever jobs the test left behind (their supervisors outlive the
        // server) when it goes.
    }
}

fn browser() -> Browser {
    Browser::start(temp_path("chromium"), shots_dir())
}

fn login(b: &Browser, url: &str) {
    login_as(b, url, "admin", PASSWORD);
}

fn login_as(b: &Browser, url: &str, user: &str, password: &str) {
    b.goto(&format!("{url}/"));
    b.wait_visible("#view-login", WAIT);
    b.fill("#login-username", user);
    b.fill("#login-password", password);
    b.click("#login-submit");
    b.wait_visible("#nav", WAIT);
    b.wait_text("#live", WAIT, |t| t == "live");
}

#[test]
fn setup_flow_login_workspaces_and_tokens() {
    webdriver::require_browser();
    let up = Up::start();
    let b = browser();
    let code = std::fs::read_to_string(up.dir.0.join("setup-code"))
        .unwrap()
        .trim()
        .to_string();

    // The setup page, while no user exists.
    b.goto(&format!("{}/", up.url));
    b.wait_visible("#view-setup", WAIT);
    assert_eq!(b.attr("body", "data-mode").as_deref(), Some("setup"));
    b.screenshot("01-setup");

    // A wrong code: a clear message, nothing created.
    b.fill("#setup-code", "not-the-code");
    b.fill("#setup-username", "admin");
    b.fill("#setup-password", PASSWORD);
    b.fill("#setup-password2", PASSWORD);
    b.fill("#setup-cluster", "lab");
    b.click("#setup-submit");
    let msg = b.wait_text("#setup-error", WAIT, |t| !t.is_empty());
    assert!(
        msg.contains("setup code is wrong") && msg.contains("nothing was created"),
        "{msg}"
    );
    b.screenshot("02-setup-wrong-code");
    assert!(
        up.dir.0.join("setup-code").exists(),
        "the code must still be valid"
    );
    let (st, _) = up.call(
        None,
        "POST",
        "/api/v1/login",
        Some(json!({"username": "admin", "password": PASSWORD})),
    );
    assert_eq!(st, 401, "no user may exist after a refused setup");

    // A weak password, and two passwords that differ: messages, nothing created.
    b.fill("#setup-code", &code);
    b.fill("#setup-password", "short");
    b.fill("#setup-password2", "short");
    b.click("#setup-submit");
    let msg = b.wait_text("#setup-error", WAIT, |t| t.contains("12 characters"));
    assert!(msg.contains("Nothing was created"), "{msg}");
    b.fill("#setup-password", PASSWORD);
    b.fill("#setup-password2", "correct horse battery staple");
    b.click("#setup-submit");
    b.wait_text("#setup-error", WAIT, |t| t.contains("passwords differ"));
    assert!(up.dir.0.join("setup-code").exists());

    // The right code: the admin exists, the join command is shown, and on to the dashboard.
    b.fill("#setup-password2", PASSWORD);
    b.click("#setup-submit");
    b.wait_visible("#view-setup-done", WAIT);
    let cmd = b.wait_text("#join-command", WAIT, |t| t.contains("--join-token"));
    assert!(
        cmd.starts_with(&format!("muster agent --server {}", up.url)),
        "{cmd}"
    );
    // The server listens on loopback: the page says what other machines need.
    let hint = b.wait_text("#join-hint", WAIT, |t| t.contains("advertise_url"));
    assert!(hint.contains("only agents on this machine"), "{hint}");
    assert!(!up.dir.0.join("setup-code").exists(), "the code is used up");
    b.screenshot("03-setup-done");
    b.click("#setup-continue");
    b.wait_visible("#view-nodes", WAIT);
    b.wait_visible("#nodes-body tr[data-node] .state-ready", WAIT);
    b.wait_text("#live", WAIT, |t| t == "live");
    assert_eq!(b.text("#whoami").as_deref(), Some("admin (admin)"));
    b.screenshot("04-nodes");
    // The setup token was revoked: only the page's session remains.
    let (st, v) = up.call(
        None,
        "POST",
        "/api/v1/login",
        Some(json!({"username": "admin", "password": PASSWORD})),
    );
    assert_eq!(st, 200, "{v}");
    let api_token = v["token"].as_str().unwrap().to_string();
    let (_, tokens) = up.call(Some(&api_token), "GET", "/api/v1/tokens", None);
    let names: Vec<&str> = tokens["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        !names.contains(&"setup"),
        "the setup token is revoked: {names:?}"
    );

    // Drain and undrain the node from the page; the change shows without a reload.
    b.js("window.__noReload = true;", json!([]));
    b.click("#nodes-body button[data-action=drain]");
    b.wait_visible("#nodes-body .state-draining", WAIT);
    b.click("#nodes-body button[data-action=undrain]");
    b.wait_visible("#nodes-body .state-ready", WAIT);
    b.click("#add-node");
    b.wait_text("#node-join-command", WAIT, |t| t.contains("--join-token"));

    // Log out, a wrong password, then log in.
    b.click("#logout");
    b.wait_visible("#view-login", WAIT);
    b.fill("#login-username", "admin");
    b.fill("#login-password", "wrong password!");
    b.click("#login-submit");
    b.wait_text("#login-error", WAIT, |t| {
        t.contains("Wrong user name or password")
    });
    b.screenshot("05-login-failed");
    // Failed logins slow down (429 with Retry-After): the page says when to try again.
    b.fill("#login-password", PASSWORD);
    b.click("#login-submit");
    let ok = poll(Duration::from_secs(30), || {
        if b.visible("#nav") {
            return Some(());
        }
        let slow = b.visible("#login-error")
            && b.text("#login-error")
                .is_some_and(|t| t.contains("try again"));
        if slow && b.attr("#login-submit", "disabled").is_none() {
            b.click("#login-submit");
        }
        None
    });
    assert!(ok.is_some(), "logging in failed: {}", b.page_text());
    // Back where the page was before logging out.
    b.wait_visible("#view-nodes", WAIT);

    // Workspaces: create one, add a member, change the role, remove them.
    let (st, body) = up.call(
        Some(&api_token),
        "POST",
        "/api/v1/users",
        Some(json!({"username": "bob", "password": "bob's long password"})),
    );
    assert!(st == 201 || st == 200, "{st} {body}");
    b.click("#nav a[data-view=workspaces]");
    b.wait_visible("#view-workspaces", WAIT);
    b.fill("#ws-name", "acme");
    b.click("#ws-create");
    b.wait_visible(".ws[data-workspace=acme]", WAIT);
    b.fill(".ws[data-workspace=acme] input[name=user]", "bob");
    b.select(".ws[data-workspace=acme] form select", "operator");
    b.click(".ws[data-workspace=acme] form button[type=submit]");
    b.wait_visible(".ws[data-workspace=acme] tr[data-member=bob]", WAIT);
    let role = b.js(
        "return document.querySelector('.ws[data-workspace=acme] tr[data-member=bob] select').value;",
        json!([]),
    );
    assert_eq!(role, "operator");
    b.select(
        ".ws[data-workspace=acme] tr[data-member=bob] select",
        "viewer",
    );
    let (_, ws) = poll(WAIT, || {
        let (st, ws) = up.call(Some(&api_token), "GET", "/api/v1/workspaces", None);
        let acme = ws["items"]
            .as_array()?
            .iter()
            .find(|w| w["name"] == "acme")?
            .clone();
        acme["members"]
            .as_array()?
            .iter()
            .any(|m| m["user"] == "bob" && m["role"] == "viewer")
            .then_some((st, acme))
    })
    .expect("the role change reached the server");
    assert_eq!(ws["name"], "acme");
    b.screenshot("06-workspaces");
    b.click(".ws[data-workspace=acme] tr[data-member=bob] button");
    b.click(".ws[data-workspace=acme] tr[data-member=bob] button");
    let gone = poll(WAIT, || {
        (!b.visible(".ws[data-workspace=acme] tr[data-member=bob]")).then_some(())
    });
    assert!(gone.is_some(), "bob was not removed");

    // Tokens: create one with scopes and an expiry, see it once, revoke it.
    b.click("#nav a[data-view=tokens]");
    b.wait_visible("#view-tokens", WAIT);
    b.fill("#token-name", "ci-token");
    b.click("#token-form input[value=operate]");
    b.select("#token-expiry", "86400");
    b.click("#token-create");
    let secret = b.wait_text("#token-secret", WAIT, |t| t.len() > 20);
    let (st, _) = up.call(Some(&secret), "GET", "/api/v1/jobs", None);
    assert_eq!(st, 200, "the new token works");
    let row = poll(WAIT, || {
        b.js(
            "const r = [...document.querySelectorAll('#tokens-body tr')].find(r => r.children[1].textContent === 'ci-token');\
             return r ? r.textContent : null;",
            json!([]),
        )
        .as_str()
        .map(str::to_string)
    })
    .expect("the token is listed");
    assert!(
        row.contains("read") && row.contains("operate") && !row.contains("never"),
        "{row}"
    );
    b.screenshot("07-tokens");
    let id = b.js(
        "const r = [...document.querySelectorAll('#tokens-body tr')].find(r => r.children[1].textContent === 'ci-token');\
         r.setAttribute('data-test', 'ci'); return r.dataset.token;",
        json!([]),
    );
    b.click("#tokens-body tr[data-test=ci] button[data-action=revoke]");
    b.click("#tokens-body tr[data-test=ci] button[data-action=revoke]");
    let gone = poll(WAIT, || {
        (!b.visible(&format!(
            "#tokens-body tr[data-token=\"{}\"]",
            id.as_str().unwrap()
        )))
        .then_some(())
    });
    assert!(gone.is_some(), "the token row is gone");
    let (st, _) = up.call(Some(&secret), "GET", "/api/v1/jobs", None);
    assert_eq!(st, 401, "the revoked token no longer works");
    assert_eq!(
        b.js("return window.__noReload === true;", json!([])),
        json!(true),
        "the page was never reloaded"
    );
}

#[test]
fn a_tree_runs_live_with_its_log_and_an_abort() {
    webdriver::require_browser();
    let up = Up::start();
    let token = up.setup();
    let b = browser();
    login(&b, &up.url);
    b.screenshot("10-jobs-empty");

    // A tree whose first job waits for a file this test creates; the second needs it.
    let go = up.dir.0.join("go");
    let tree = json!({
        "name": "release", "tags": {"workspace": "admin", "application": "web", "version": "12"},
        "children": [
            {"name": "gate", "key": "gate", "shell": format!(
                "echo gate-started; while [ ! -f '{}' ]; do sleep 0.05; done; echo gate-released", go.display())},
            {"name": "after", "key": "after", "shell": "echo after-ran", "needs": ["gate"]},
        ],
    });
    let (st, created) = up.call(Some(&token), "POST", "/api/v1/jobs", Some(tree));
    assert_eq!(st, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();

    // The jobs list shows it (it arrived live over the events feed, or on load).
    b.click("#nav a[data-view=jobs]");
    let row = format!("#jobs-body tr[data-tree=\"{id}\"]");
    b.wait_visible(&row, WAIT);
    b.wait_state(&format!("{row} .state"), "running", WAIT);
    b.click(&format!("{row} a"));
    b.wait_visible("#view-tree", WAIT);
    b.js("window.__noReload = true;", json!([]));
    let gate = "#tree .job[data-key=gate]";
    let after = "#tree .job[data-key=after]";
    b.wait_state(&format!("{gate} .state"), "running", WAIT);
    assert_eq!(
        b.attr(&format!("{after} .state"), "data-state").as_deref(),
        Some("waiting")
    );
    // The gate's log follows live.
    b.click(gate);
    b.wait_text("#log", WAIT, |t| t.contains("gate-started"));
    assert_eq!(b.attr("#log", "data-status").as_deref(), Some("following"));
    b.screenshot("11-tree-running");
    // Release the gate: states change on the page, the log goes on, the tree ends.
    std::fs::write(&go, "").unwrap();
    b.wait_text("#log", WAIT, |t| t.contains("gate-released"));
    b.wait_state(&format!("{gate} .state"), "succeeded", WAIT);
    b.wait_state(&format!("{after} .state"), "succeeded", WAIT);
    b.wait_state("#tree-state", "succeeded", WAIT);
    b.wait_text("#log-status", WAIT, |t| t.contains("complete"));
    assert!(!b.visible("#tree-abort"));
    b.click(after);
    b.wait_text("#log", WAIT, |t| t.contains("after-ran"));
    b.screenshot("12-tree-succeeded");

    // Run a command from the form; it opens its tree; then abort it from the page.
    b.click("#nav a[data-view=run]");
    b.wait_visible("#view-run", WAIT);
    b.wait_visible("#run-workspace option[value=admin]", WAIT);
    b.fill("#run-name", "long one");
    b.fill(
        "#run-shell",
        "for i in $(seq 1 600); do echo tick $i; sleep 0.5; done",
    );
    b.click("#view-run details summary");
    b.fill("#run-application", "web");
    b.screenshot("13-run-form");
    b.click("#run-submit");
    b.wait_visible("#view-tree", WAIT);
    b.wait_text("#tree-name", WAIT, |t| t == "long one");
    b.wait_state("#tree .job .state", "running", WAIT);
    b.wait_text("#log", WAIT, |t| t.contains("tick 2"));
    b.click("#tree-abort");
    b.wait_text("#tree-abort", WAIT, |t| t.contains("again"));
    b.click("#tree-abort");
    b.wait_state("#tree-state", "aborted", WAIT);
    b.wait_state("#tree .job .state", "aborted", WAIT);
    b.wait_text("#log-status", WAIT, |t| t.contains("complete"));
    b.screenshot("14-tree-aborted");

    // A node control script (an executable in HQ scripts/, here <data-dir>/hq/scripts) run
    // from the form on the nodes a label selector picks, with arguments.
    let scripts = up.dir.0.join("hq").join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    let script = scripts.join("hello");
    std::fs::write(&script, "#!/bin/sh\necho \"hello-script args: $*\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    b.click("#nav a[data-view=run]");
    b.wait_visible("#script-name option[value=hello]", WAIT);
    b.fill("#script-nodes", "workspaces=*");
    b.fill("#script-args", "one\ntwo");
    b.click("#script-submit");
    b.wait_visible("#view-tree", WAIT);
    b.wait_state("#tree-state", "succeeded", WAIT);
    b.click("#tree ul .job");
    b.wait_text("#log", WAIT, |t| t.contains("hello-script args: one two"));
    b.screenshot("15-script-ran");

    // The jobs list, filtered by state and by tag, newest first; paginated.
    b.click("#nav a[data-view=jobs]");
    b.wait_visible(&row, WAIT);
    let names = |b: &Browser| {
        b.js(
            "return [...document.querySelectorAll('#jobs-body tr td:first-child')].map(t => t.textContent);",
            json!([]),
        )
    };
    // The list shown before may still be the one from the first visit: wait for the reload.
    poll(WAIT, || {
        (names(&b).as_array().map(Vec::len) == Some(3)).then_some(())
    })
    .unwrap_or_else(|| panic!("the jobs list never showed the three trees: {}", names(&b)));
    let all = names(&b);
    assert_eq!(all[1], "long one", "newest first: {all}");
    assert_eq!(all[2], "release", "newest first: {all}");
    b.select("#filter-state", "aborted");
    b.click("#jobs-filter button[type=submit]");
    poll(WAIT, || (names(&b) == json!(["long one"])).then_some(()))
        .unwrap_or_else(|| panic!("state filter: {}", names(&b)));
    b.fill("#filter-version", "12");
    b.select("#filter-state", "");
    b.click("#jobs-filter button[type=submit]");
    poll(WAIT, || (names(&b) == json!(["release"])).then_some(()))
        .unwrap_or_else(|| panic!("tag filter: {}", names(&b)));
    b.screenshot("16-jobs-filtered");
    b.click("#filter-clear");
    for i in 0..26 {
        let (st, _) = up.call(
            Some(&token),
            "POST",
            "/api/v1/jobs",
            Some(
                json!({"name": format!("noop {i}"), "noop": true, "tags": {"workspace": "admin"}}),
            ),
        );
        assert_eq!(st, 201);
    }
    poll(WAIT, || (names(&b)[0] == "noop 25").then_some(()))
        .unwrap_or_else(|| panic!("new trees arrive live: {}", names(&b)));
    poll(WAIT, || {
        (names(&b).as_array().unwrap().len() == 25 && b.visible("#jobs-older")).then_some(())
    });
    b.click("#jobs-older");
    poll(WAIT, || {
        let n = names(&b);
        (n.as_array().unwrap().len() == 4 && n[3] == "release").then_some(())
    })
    .unwrap_or_else(|| panic!("page 2: {}", names(&b)));
    b.screenshot("17-jobs-page-2");
    b.click("#jobs-newer");
    poll(WAIT, || (names(&b)[0] == "noop 25").then_some(()))
        .unwrap_or_else(|| panic!("back to page 1: {}", names(&b)));
    b.screenshot("18-jobs");

    assert_eq!(
        b.js("return window.__noReload === true;", json!([])),
        json!(true),
        "every change above arrived without reloading the page"
    );

    // A phone-width screen.
    b.resize(390, 844);
    b.goto(&format!("{}/#/tree/{id}", up.url));
    b.wait_state("#tree-state", "succeeded", WAIT);
    b.wait_text("#log", WAIT, |t| {
        t.contains("gate-released") || t.contains("after-ran")
    });
    b.screenshot("19-tree-phone");
    b.click("#nav a[data-view=nodes]");
    b.wait_visible("#nodes-body tr[data-node]", WAIT);
    b.screenshot("20-nodes-phone");
}

/// Polls the API until the tree of `id` has ended; gives it.
fn wait_tree_ended(up: &Up, token: &str, id: &str) -> Value {
    poll(WAIT, || {
        let (_, t) = up.call(Some(token), "GET", &format!("/api/v1/jobs/{id}/tree"), None);
        (t["tree_state"] != "running" && !t["tree_state"].is_null()).then_some(t)
    })
    .unwrap_or_else(|| panic!("tree {id} did not end"))
}

#[test]
fn a_viewer_sees_only_what_a_viewer_may_do() {
    webdriver::require_browser();
    let up = Up::start();
    let admin = up.setup();
    let vera_pw = "vera's long password";
    let (st, v) = up.call(
        Some(&admin),
        "POST",
        "/api/v1/users",
        Some(json!({"username": "vera", "password": vera_pw})),
    );
    assert_eq!(st, 201, "{v}");
    let (st, v) = up.call(
        Some(&admin),
        "POST",
        "/api/v1/workspaces",
        Some(json!({"name": "acme"})),
    );
    assert_eq!(st, 201, "{v}");
    let (st, v) = up.call(
        Some(&admin),
        "PUT",
        "/api/v1/workspaces/acme/members/vera",
        Some(json!({"role": "viewer"})),
    );
    assert_eq!(st, 200, "{v}");
    // What /api/v1/me says of her: not an admin, a viewer in acme, admin of her own workspace.
    let (st, v) = up.call(
        None,
        "POST",
        "/api/v1/login",
        Some(json!({"username": "vera", "password": vera_pw})),
    );
    assert_eq!(st, 200, "{v}");
    let (st, me) = up.call(v["token"].as_str(), "GET", "/api/v1/me", None);
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["user"], "vera");
    assert_eq!(me["admin"], false);
    assert_eq!(
        me["workspaces"],
        json!([{"name": "acme", "role": "viewer"}, {"name": "vera", "role": "admin"}])
    );
    let (_, me_admin) = up.call(Some(&admin), "GET", "/api/v1/me", None);
    assert_eq!(me_admin["admin"], true, "{me_admin}");
    assert!(
        me_admin["workspaces"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["role"] == "admin"),
        "{me_admin}"
    );

    // A tree of acme that runs while she looks.
    let go = up.dir.0.join("go");
    let (st, created) = up.call(
        Some(&admin),
        "POST",
        "/api/v1/jobs",
        Some(json!({"name": "acme job", "tags": {"workspace": "acme"},
            "shell": format!("echo acme-started; while [ ! -f '{}' ]; do sleep 0.05; done", go.display())})),
    );
    assert_eq!(st, 201, "{created}");
    let tree = created["id"].as_str().unwrap().to_string();

    let b = browser();
    login_as(&b, &up.url, "vera", vera_pw);
    b.wait_text("#whoami", WAIT, |t| t == "vera");

    // Nodes: listed, but no drain and no joining for a non-admin.
    b.click("#nav a[data-view=nodes]");
    b.wait_visible("#nodes-body tr[data-node] .state-ready", WAIT);
    assert!(!b.visible("#nodes-body button"), "{}", b.page_text());
    assert!(!b.visible("#add-node"));

    // The acme tree: visible and live, but no Abort.
    b.goto(&format!("{}/#/tree/{tree}", up.url));
    b.wait_state("#tree .job .state", "running", WAIT);
    b.wait_text("#log", WAIT, |t| t.contains("acme-started"));
    assert_eq!(
        b.attr("#tree-state", "data-state").as_deref(),
        Some("running")
    );
    assert!(!b.visible("#tree-abort"), "a viewer is offered Abort");
    b.screenshot("30-viewer-tree");

    // Run: only the workspaces where she is an operator (her own), never acme.
    b.click("#nav a[data-view=run]");
    b.wait_visible("#run-workspace option[value=vera]", WAIT);
    let offered = b.js(
        "return [...document.querySelectorAll('#run-workspace option')].map(o => o.value);",
        json!([]),
    );
    assert_eq!(offered, json!(["vera"]));
    assert!(b.text("#tree-workspaces").unwrap() == "vera");

    // Workspaces: she manages her own members, not acme's.
    b.click("#nav a[data-view=workspaces]");
    b.wait_visible(".ws[data-workspace=acme] tr[data-member=vera]", WAIT);
    assert!(!b.visible(".ws[data-workspace=acme] form"));
    assert!(!b.visible(".ws[data-workspace=acme] select"));
    assert!(!b.visible(".ws[data-workspace=acme] button"));
    assert!(b.visible(".ws[data-workspace=vera] form"));
    b.screenshot("31-viewer-workspaces");

    // The tree ends while she watches; still nothing to press.
    std::fs::write(&go, "").unwrap();
    wait_tree_ended(&up, &admin, &tree);
    b.goto(&format!("{}/#/tree/{tree}", up.url));
    b.wait_state("#tree-state", "succeeded", WAIT);
    assert!(!b.visible("#tree-abort"));

    // The admin, for contrast, is offered Abort on a running acme tree and the node controls.
    let go2 = up.dir.0.join("go2");
    let (_, created) = up.call(
        Some(&admin),
        "POST",
        "/api/v1/jobs",
        Some(json!({"name": "acme two", "tags": {"workspace": "acme"},
            "shell": format!("while [ ! -f '{}' ]; do sleep 0.05; done", go2.display())})),
    );
    let two = created["id"].as_str().unwrap().to_string();
    let a = browser();
    login(&a, &up.url);
    a.wait_text("#whoami", WAIT, |t| t == "admin (admin)");
    a.goto(&format!("{}/#/tree/{two}", up.url));
    a.wait_state("#tree .job .state", "running", WAIT);
    a.wait_visible("#tree-abort", WAIT);
    a.click("#nav a[data-view=nodes]");
    a.wait_visible("#nodes-body button[data-action=drain]", WAIT);
    std::fs::write(&go2, "").unwrap();
    wait_tree_ended(&up, &admin, &two);
}

#[test]
fn a_failed_tree_opens_on_its_cause_with_needs_details_and_a_log_from_its_end() {
    webdriver::require_browser();
    let up = Up::start();
    let token = up.setup();
    // build fails (twice: it has one retry); deploy, which needs it, is aborted.
    let (st, created) = up.call(
        Some(&token),
        "POST",
        "/api/v1/jobs",
        Some(json!({"name": "pipeline", "tags": {"workspace": "admin"}, "children": [
            {"name": "prepare", "key": "prep", "shell": "echo prepared"},
            {"name": "build", "key": "build", "shell": "echo building; exit 3", "needs": ["prep"], "retries": 1},
            {"name": "deploy", "key": "deploy", "shell": "echo deploying", "needs": ["build"]},
        ]})),
    );
    assert_eq!(st, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(wait_tree_ended(&up, &token, &id)["tree_state"], "failed");

    let b = browser();
    login(&b, &up.url);
    b.goto(&format!("{}/#/tree/{id}", up.url));
    b.wait_state("#tree-state", "failed", WAIT);
    // It opens on the failed job, with what it ran, where, when, its attempts and its error.
    b.wait_visible("#tree .job.selected[data-key=build]", WAIT);
    b.wait_text("#log", WAIT, |t| t.contains("exited with code 3"));
    let field = |f: &str| {
        b.text(&format!("#job-details dd[data-field={f}]"))
            .unwrap_or_default()
    };
    assert_eq!(field("key"), "build");
    assert_eq!(field("attempt"), "2 of 2");
    assert_eq!(field("exit-code"), "3");
    assert!(
        field("runs").contains("echo building; exit 3"),
        "{}",
        field("runs")
    );
    assert!(!field("node").is_empty() && field("node") != "—");
    for f in ["started", "finished"] {
        let title = b
            .attr(&format!("#job-details dd[data-field={f}] time"), "title")
            .unwrap_or_default();
        assert!(!title.is_empty(), "{f} has no absolute time on hover");
    }
    // The needs, drawn as edges from the job needed to the one that needs it.
    for (from, to) in [("prep", "build"), ("build", "deploy")] {
        assert!(
            b.visible(&format!(
                "#tree-edges path.need[data-from={from}][data-to={to}]"
            )),
            "no edge {from} -> {to}"
        );
    }
    // One time format: every time shown is relative, with the absolute one on hover.
    let odd = b.js(
        "return [...document.querySelectorAll('time')].filter(t => !t.classList.contains('rel') || !t.title).length;",
        json!([]),
    );
    assert_eq!(odd, json!(0));
    b.screenshot("32-tree-failed");
    // Another job of the tree, and its error.
    b.click("#tree .job[data-key=deploy]");
    b.wait_text("#job-details dd[data-field=error]", WAIT, |t| {
        t == "aborted"
    });

    // A bad id clears the tree that was shown.
    for bad in ["not-a-tree", "01a23300-0000-7000-8000-000000000000"] {
        b.goto(&format!("{}/#/tree/{id}", up.url));
        // Shown once the page has put the job it opened on into the address.
        poll(WAIT, || {
            b.js("return location.hash;", json!([]))
                .as_str()
                .is_some_and(|h| h.starts_with(&format!("#/tree/{id}/")))
                .then_some(())
        })
        .expect("the tree did not open");
        b.wait_visible("#tree .job.selected[data-key=build]", WAIT);
        b.js(
            "location.hash = arguments[0];",
            json!([format!("#/tree/{bad}")]),
        );
        b.wait_visible("#tree-error", WAIT);
        assert_eq!(
            b.js(
                "return document.querySelectorAll('#tree .job, #tree-edges > path.need').length;",
                json!([])
            ),
            json!(0)
        );
        assert_eq!(b.text("#tree-name").as_deref(), Some(""));
        assert_eq!(b.text("#log").as_deref(), Some(""));
        assert_eq!(b.text("#job-details").as_deref(), Some(""));
    }

    // A big log opens at its end (not sent whole), earlier parts on demand, the whole as a download.
    let (_, created) = up.call(
        Some(&token),
        "POST",
        "/api/v1/jobs",
        Some(json!({"name": "chatty", "tags": {"workspace": "admin"}, "shell": "seq 1 40000"})),
    );
    let chatty = created["id"].as_str().unwrap().to_string();
    assert_eq!(
        wait_tree_ended(&up, &token, &chatty)["tree_state"],
        "succeeded"
    );
    b.goto(&format!("{}/#/tree/{chatty}", up.url));
    b.wait_visible(&format!("#log[data-job=\"{chatty}\"]"), WAIT);
    b.wait_text("#log", WAIT, |t| t.contains(" out 40000\n"));
    b.wait_text("#log-status", WAIT, |t| t.contains("complete"));
    let shown = |b: &Browser| b.text("#log").unwrap_or_default();
    let first_number = |t: &str| -> u64 {
        t.lines()
            .next()
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "the log does not start with a whole line: {:?}",
                    &t[..80.min(t.len())]
                )
            })
    };
    let text = shown(&b);
    assert!(
        text.len() < 100_000,
        "{} characters on the page",
        text.len()
    );
    let first = first_number(&text);
    assert!(
        first > 37_000,
        "it should open near the end, not at line {first}"
    );
    let asked: Value = b.js(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => n.includes('/log?'));",
        json!([]),
    );
    assert!(
        asked
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("tail=")),
        "{asked}"
    );
    b.click("#log-earlier");
    let earlier = poll(WAIT, || {
        let t = shown(&b);
        let n = first_number(&t);
        (n < first).then_some((n, t))
    })
    .expect("Load earlier added nothing");
    assert!(
        earlier.1.contains(&format!(" out {}\n", first - 1)),
        "a gap before line {first}"
    );
    assert!(earlier.1.contains(" out 40000\n"));
    let href = b.attr("#log-download", "href").unwrap();
    assert!(href.ends_with("/log?attempt=1"), "{href}");
    assert!(b.attr("#log-download", "download").is_some());
    let whole = b.js_async(
        "const done = arguments[arguments.length - 1];\
         fetch(arguments[0]).then(r => r.text()).then(t => done([t.length, t.includes(' out 1\\n'), t.includes(' out 40000\\n')]));",
        json!([href]),
    );
    assert!(whole[0].as_u64().unwrap() > 40_000 * 30, "{whole}");
    assert_eq!(whole[1], true, "the download lacks the start");
    assert_eq!(whole[2], true, "the download lacks the end");

    // A big log followed live keeps its end on the page, the rest a click away.
    let go = up.dir.0.join("go-live");
    let (_, created) = up.call(
        Some(&token),
        "POST",
        "/api/v1/jobs",
        Some(json!({"name": "chatty live", "tags": {"workspace": "admin"},
            "shell": format!("seq 1 40000; while [ ! -f '{}' ]; do sleep 0.05; done; echo live-done", go.display())})),
    );
    let live = created["id"].as_str().unwrap().to_string();
    b.goto(&format!("{}/#/tree/{live}", up.url));
    // (The page stays: only its hash changed. Wait for this job's log, not the last one.)
    b.wait_visible(&format!("#log[data-job=\"{live}\"]"), WAIT);
    let text = b.wait_text("#log", WAIT, |t| t.contains(" out 40000\n"));
    assert_eq!(b.attr("#log", "data-status").as_deref(), Some("following"));
    assert!(
        text.len() < 700_000,
        "{} characters on the page",
        text.len()
    );
    assert!(first_number(&text) > 1, "the whole log is on the page");
    assert!(b.visible("#log-earlier"));
    std::fs::write(&go, "").unwrap();
    b.wait_text("#log", WAIT, |t| t.contains("out live-done"));
    b.wait_text("#log-status", WAIT, |t| t.contains("complete"));
    b.screenshot("33-big-log");
}

#[test]
fn the_run_form_takes_a_toml_tree_a_timeout_and_retries() {
    webdriver::require_browser();
    let up = Up::start();
    let token = up.setup();
    let b = browser();
    login(&b, &up.url);
    let trees = || {
        let (_, l) = up.call(Some(&token), "GET", "/api/v1/jobs", None);
        l["items"].as_array().unwrap().len()
    };

    // A whole tree in TOML, as `muster jobs run --file` takes it.
    b.click("#nav a[data-view=run]");
    b.wait_visible("#view-run", WAIT);
    b.click("#run-tab-tree");
    b.wait_visible("#tree-text", WAIT);
    b.fill(
        "#tree-text",
        r#"name = "from the form"
[tags]
application = "formtest"
[[children]]
name = "first"
key = "first"
shell = "echo first-ran"
[[children]]
name = "second"
key = "second"
exec = ["sh", "-c", "echo second-ran"]
needs = ["first"]
timeout_s = 30
retries = 2
"#,
    );
    b.screenshot("34-run-tree-form");
    b.click("#tree-submit");
    b.wait_visible("#view-tree", WAIT);
    b.wait_text("#tree-name", WAIT, |t| t == "from the form");
    b.wait_state("#tree-state", "succeeded", WAIT);
    b.wait_visible(
        "#tree-edges path.need[data-from=first][data-to=second]",
        WAIT,
    );
    b.click("#tree .job[data-key=second]");
    b.wait_text("#log", WAIT, |t| t.contains("out second-ran"));
    let id = b.text("#tree-id").unwrap();
    let (_, t) = up.call(
        Some(&token),
        "GET",
        &format!("/api/v1/jobs/{id}/tree"),
        None,
    );
    assert_eq!(t["tags"]["application"], "formtest", "{t:#}");
    let second = t["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == "second")
        .unwrap()
        .clone();
    assert_eq!(second["timeout_s"], 30, "{second:#}");
    assert_eq!(second["retries"], 2, "{second:#}");
    b.screenshot("35-run-tree-ran");

    // A mistake in the TOML: its line, and nothing runs.
    let before = trees();
    b.click("#nav a[data-view=run]");
    b.click("#run-tab-tree");
    b.fill("#tree-text", "name = \"broken\"\nshell = = \"x\"\n");
    b.click("#tree-submit");
    let msg = b.wait_text("#tree-form-error", WAIT, |t| !t.is_empty());
    assert!(
        msg.contains("invalid TOML body at line 2") && msg.contains("Nothing was run"),
        "{msg}"
    );
    // JSON works too; its mistakes are caught before sending.
    b.select("#tree-format", "json");
    b.fill("#tree-text", "{\"name\": ");
    b.click("#tree-submit");
    b.wait_text("#tree-form-error", WAIT, |t| t.contains("not valid JSON"));
    assert_eq!(trees(), before, "a refused tree made a tree");
    b.fill(
        "#tree-text",
        r#"{"name": "json tree", "children": [{"name": "only", "key": "only", "shell": "echo json-ran"}]}"#,
    );
    b.click("#tree-submit");
    b.wait_text("#tree-name", WAIT, |t| t == "json tree");
    b.wait_state("#tree-state", "succeeded", WAIT);

    // One command, with a timeout and retries.
    b.click("#nav a[data-view=run]");
    b.click("#run-tab-command");
    b.wait_visible("#run-workspace option[value=admin]", WAIT);
    b.fill("#run-name", "with limits");
    b.fill("#run-shell", "echo limited");
    b.fill("#run-timeout", "45");
    b.fill("#run-retries", "1");
    b.click("#run-submit");
    b.wait_text("#tree-name", WAIT, |t| t == "with limits");
    b.wait_state("#tree-state", "succeeded", WAIT);
    let id = b.text("#tree-id").unwrap();
    let (_, j) = up.call(Some(&token), "GET", &format!("/api/v1/jobs/{id}"), None);
    assert_eq!(j["timeout_s"], 45, "{j:#}");
    assert_eq!(j["retries"], 1, "{j:#}");
}

#[test]
fn the_hq_view_shows_the_head_the_watchers_and_the_orders_with_their_trees() {
    webdriver::require_browser();
    let up = Up::start();
    let _token = up.setup();
    let b = browser();
    login(&b, &up.url);
    let hq = up.dir.0.join("hq");
    std::fs::write(hq.join("deployer/orders"), "noop\nfrobnicate now\n").unwrap();
    support::git(
        &hq,
        &["commit", "-q", "-am", "two orders from the browser test"],
    );
    b.click("#nav a[data-view=hq]");
    b.wait_visible("#view-hq", WAIT);
    b.wait_text("#hq-branch", WAIT, |t| t == "main");
    assert!(b.text("#hq-remote").unwrap().contains("none"));
    // "Sync now" runs a pulse: the orders are taken up (the next pulse sees the noop's end).
    let done = poll(WAIT, || {
        b.click("#hq-sync");
        b.wait_visible("#hq-orders-body tr", WAIT);
        (b.attr("#hq-orders-body tr[data-line='1'] .state", "data-state")
            .as_deref()
            == Some("succeeded"))
        .then_some(())
    });
    assert!(done.is_some(), "{}", b.page_text());
    b.wait_text("#hq-head-message", WAIT, |t| {
        t.starts_with("orders: deployer/orders line")
    });
    b.wait_state("#hq-orders-body tr[data-line='2'] .state", "rejected", WAIT);
    assert!(b
        .text("#hq-orders-body tr[data-line='2']")
        .unwrap()
        .contains("unknown verb"));
    b.wait_state("#hq-watchers-body tr[data-watcher=sync] .state", "ok", WAIT);
    b.wait_state(
        "#hq-watchers-body tr[data-watcher=orders] .state",
        "ok",
        WAIT,
    );
    assert!(b
        .text("#hq-watchers-body")
        .unwrap()
        .contains("no remote set"));
    b.screenshot("40-hq");
    // An order links to its tree.
    b.click("#hq-orders-body tr[data-line='1'] a");
    b.wait_visible("#view-tree", WAIT);
    b.wait_text("#tree-name", WAIT, |t| {
        t.contains("order deployer/orders:1 noop")
    });
    b.wait_state("#tree-state", "succeeded", WAIT);
    // A reserved directory that is a file is reported there.
    std::fs::remove_dir_all(hq.join("uploads")).unwrap();
    std::fs::write(hq.join("uploads"), "x").unwrap();
    support::git(&hq, &["add", "-A"]);
    support::git(&hq, &["commit", "-q", "-m", "uploads as a file"]);
    b.click("#nav a[data-view=hq]");
    let seen = poll(WAIT, || {
        b.click("#hq-sync");
        b.text("#hq-problems")
            .filter(|t| t.contains("uploads must be a directory"))
    });
    assert!(seen.is_some(), "{}", b.page_text());
    b.screenshot("41-hq-problem");
}

#[test]
fn the_processes_view_lists_a_process_follows_its_log_and_stops_it() {
    webdriver::require_browser();
    let up = Up::start();
    let token = up.setup();
    let (st, p) = up.call(
        Some(&token),
        "POST",
        "/api/v1/processes",
        Some(json!({"name": "web", "exec": ["python3", "-m", "http.server", "$PORT", "--bind", "127.0.0.1"],
            "ports": ["http"], "health": {"tcp": "http", "interval": "200ms", "grace": "10s"}, "kill_grace": "2s"})),
    );
    assert_eq!(st, 201, "{p}");
    let id = p["id"].as_str().unwrap().to_string();
    let b = browser();
    login(&b, &up.url);
    b.click("#nav a[data-view=procs]");
    b.wait_visible("#view-procs", WAIT);
    let row = format!("#procs-body tr[data-proc='{id}']");
    b.wait_state(&format!("{row} .state"), "healthy", WAIT);
    assert!(b
        .text(&format!("{row} .ports"))
        .unwrap()
        .starts_with("http="));
    assert_eq!(b.text(&format!("{row} .restarts")).unwrap(), "0");
    assert!(b
        .text(&format!("{row} .reason"))
        .unwrap()
        .contains("health check passed"));
    // Its log, followed live.
    b.click(&format!("{row} a"));
    b.wait_text("#proc-log", WAIT, |t| {
        t.contains("sys healthy: health check passed")
    });
    b.screenshot("50-processes");
    // Stop from the page: the state and the log say so.
    b.click(&format!("{row} button[data-action=stop]"));
    b.wait_state(&format!("{row} .state"), "stopped", WAIT);
    b.wait_text("#proc-log", WAIT, |t| t.contains("stop asked"));
    b.wait_visible(&format!("{row} button[data-action=start]"), WAIT);
}

/// Deploys the bundle at `dir` as admin/Iris through the API; waits until `version` is live.
fn deploy_iris(up: &Up, token: &str, dir: &Path, version: u64) {
    let mut archive = Vec::new();
    muster_models::archive::pack(dir, &mut archive).unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .into();
    let req = ureq::http::Request::builder()
        .method("POST")
        .uri(format!("{}/api/v1/models/admin/Iris", up.url))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/gzip")
        .body(archive)
        .unwrap();
    let mut resp = agent.run(req).unwrap();
    assert_eq!(
        resp.status().as_u16(),
        202,
        "{}",
        resp.body_mut().read_to_string().unwrap_or_default()
    );
    let live = poll(Duration::from_secs(300), || {
        let (_, m) = up.call(Some(token), "GET", "/api/v1/models/admin/Iris", None);
        (m["live"] == version
            && m["versions"]
                .as_array()?
                .iter()
                .all(|v| v["state"] != "deploying" && v["state"] != "draining"))
        .then_some(())
    });
    assert!(live.is_some(), "v{version} never became live");
}

#[test]
fn the_models_view_shows_versions_replicas_and_history_predicts_and_reverts() {
    webdriver::require_browser();
    let env = model_support::sklearn_env();
    let cache = model_support::cache();
    let (envs, wheels) = (cache.join("envs"), cache.join("wheels"));
    let up = Up::start_env(&[
        ("MUSTER_MODELS__ENVS_DIR", envs.to_str().unwrap()),
        ("MUSTER_MODELS__WHEELS_DIR", wheels.to_str().unwrap()),
        ("MUSTER_MODELS__PREDICTOR_HOST", "127.0.0.1"),
    ]);
    let token = up.setup();
    let bundle = TempDir::new("iris");
    model_support::iris_bundle(&bundle.0, &env);
    deploy_iris(&up, &token, &bundle.0, 1);
    deploy_iris(&up, &token, &bundle.0, 2);
    let b = browser();
    login(&b, &up.url);
    b.click("#nav a[data-view=models]");
    b.wait_visible("#view-models", WAIT);
    let row = "#models-body tr[data-model='admin/Iris']";
    b.wait_text(&format!("{row} .live-version"), WAIT, |t| t == "v2");
    b.click(&format!("{row} a"));
    b.wait_visible("#model-box", WAIT);
    b.wait_text("#model-live", WAIT, |t| t == "v2");
    b.wait_state(
        "#model-versions-body tr[data-version='2'] .vstate .state",
        "live",
        WAIT,
    );
    b.wait_state(
        "#model-versions-body tr[data-version='1'] .vstate .state",
        "stopped",
        WAIT,
    );
    // The deploy history links to each version's tree.
    assert!(b.visible("#model-versions-body tr[data-version='1'] a.tree"));
    b.wait_state(
        "#model-replicas-body tr[data-version='2'] .rstate .state",
        "healthy",
        WAIT,
    );
    // The predict form.
    b.fill("#predict-data", "[[6.7, 3.0, 5.2, 2.3]]");
    b.click("#predict-submit");
    b.wait_text("#predict-result", WAIT, |t| t == "[2]  (v2)");
    b.screenshot("60-models");
    // Revert from the page: v1 live again, shown live.
    b.click("#model-versions-body tr[data-version='1'] button[data-action=revert]");
    b.wait_text("#model-live", Duration::from_secs(120), |t| t == "v1");
    b.wait_state(
        "#model-versions-body tr[data-version='2'] .vstate .state",
        "stopped",
        Duration::from_secs(60),
    );
    b.fill("#predict-data", "{not json");
    b.click("#predict-submit");
    b.wait_text("#predict-error", WAIT, |t| t.contains("not JSON"));
    let (_, m) = up.call(Some(&token), "GET", "/api/v1/models/admin/Iris", None);
    for v in m["versions"].as_array().unwrap() {
        for id in v["processes"].as_array().unwrap() {
            up.call(
                Some(&token),
                "DELETE",
                &format!("/api/v1/processes/{}", id.as_str().unwrap()),
                None,
            );
        }
    }
}

/// The services view: the example environment of `examples/services` committed to HQ, planned
/// and applied from the page; the tree shows each service with its status, the plan its steps,
/// and a service's last action its log.
#[test]
fn the_services_view_plans_applies_and_shows_statuses_and_action_logs() {
    webdriver::require_browser();
    let up = Up::start();
    let token = up.setup();
    let hq = up.dir.0.join("hq");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/services/hq/.");
    let ok = Command::new("cp")
        .arg("-r")
        .arg(&example)
        .arg(&hq)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    // Free ports rather than the example's 7379 and 7380 (other tests may run at once).
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (kv_port, app_port) = (free(), free());
    for (dir, from, to) in [
        ("demo__kv__main", "port = 7379", kv_port),
        ("demo__app__web", "port = 7380", app_port),
    ] {
        let p = hq.join("services").join(dir).join("service.toml");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(from), "{text}");
        std::fs::write(&p, text.replace(from, &format!("port = {to}"))).unwrap();
    }
    support::git(&hq, &["add", "-A"]);
    support::git(&hq, &["commit", "-q", "-m", "the example environment"]);
    let b = browser();
    login(&b, &up.url);
    b.click("#nav a[data-view=services]");
    b.wait_visible("#view-services", WAIT);
    b.wait_visible("#services-empty", WAIT);
    b.click("#svc-plan");
    b.wait_visible("#svc-plan-box", WAIT);
    let plan = b.wait_text("#svc-plan-body", WAIT, |t| {
        t.contains("demo__backup__nightly")
    });
    assert!(
        plan.contains("install") && plan.contains("demo__kv__main"),
        "{plan}"
    );
    b.screenshot("60-services-plan");
    b.click("#svc-apply");
    b.wait_visible("#svc-apply-tree", WAIT);
    let long = Duration::from_secs(90);
    for path in ["demo__kv__main", "demo__app__web", "demo__backup__nightly"] {
        b.wait_state(
            &format!("#services-body tr[data-service='{path}'] .state"),
            "active",
            long,
        );
    }
    assert_eq!(
        b.text("#services-body tr[data-service='demo__kv__main'] .last")
            .unwrap(),
        "install"
    );
    // The app really serves, through the store.
    let body = ureq::get(format!("http://127.0.0.1:{app_port}/"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        body.contains(&format!(
            "visit 1, counted in the kv store at http://127.0.0.1:{kv_port}"
        )),
        "{body}"
    );
    // A service's last action, with its log.
    b.click("#services-body tr[data-service='demo__kv__main'] a");
    b.wait_visible("#svc-log-box", WAIT);
    b.wait_text("#svc-log", WAIT, |t| {
        t.contains("service demo__kv__main: install")
    });
    b.screenshot("61-services-applied");
    // Its recent actions: a restart by hand comes first, and the install's log is a click away.
    let (st, a) = up.call(
        Some(&token),
        "POST",
        "/api/v1/services/demo__kv__main/actions/restart",
        Some(json!({})),
    );
    assert_eq!(st, 202, "{a}");
    b.wait_text("#svc-history li:first-child", long, |t| {
        t.contains("restart") && t.contains("succeeded")
    });
    b.wait_text("#svc-log", WAIT, |t| t.contains("action restart asked for"));
    let install = b.wait_text("#svc-history li:nth-child(2)", WAIT, |t| {
        t.contains("install")
    });
    assert!(install.contains("succeeded"), "{install}");
    b.click("#svc-history li:nth-child(2) a");
    b.wait_text("#svc-log", WAIT, |t| {
        t.contains("service demo__kv__main: install")
    });
    b.screenshot("62-services-history");
    // Planning again: nothing to do, no apply button.
    b.click("#svc-plan");
    b.wait_visible("#svc-plan-empty", WAIT);
    assert!(!b.visible("#svc-apply"));
}
