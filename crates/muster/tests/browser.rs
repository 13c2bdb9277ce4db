//! Browser tests of the dashboards (SPEC §10): the real `muster up` on port 0, driven in Debian's
//! headless `chromium` through `chromedriver` (installed by `scripts/test`). Screenshots of each
//! page go to `test-output/screenshots/`.

mod webdriver;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use webdriver::{poll, Browser};

const WAIT: Duration = Duration::from_secs(20);
const PASSWORD: &str = "correct horse battery";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn temp_dir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "muster-browser-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn shots_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../test-output/screenshots")
}

/// `muster up` as a child with a fresh data dir; killed (and the dir removed) on drop.
struct Up {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Up {
    fn start() -> Up {
        let dir = temp_dir("data");
        let mut child = Command::new(env!("CARGO_BIN_EXE_muster"))
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .env("MUSTER_JOBS__KILL_GRACE", "2s")
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
        let code = std::fs::read_to_string(self.dir.join("setup-code")).unwrap();
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
        // End whatever jobs the test left behind (their supervisors outlive the server).
        for path in muster_server::agent::attempt_dirs(&self.dir.join("agent")) {
            if let Ok(s) = std::fs::read(path.join("started.json")) {
                if let Ok(v) = serde_json::from_slice::<Value>(&s) {
                    if let Some(sid) = v["sid"].as_i64() {
                        muster_server::agent::kill_session(sid as i32);
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn browser() -> Browser {
    Browser::start(temp_dir("chromium"), shots_dir())
}

fn login(b: &Browser, url: &str) {
    b.goto(&format!("{url}/"));
    b.wait_visible("#view-login", WAIT);
    b.fill("#login-username", "admin");
    b.fill("#login-password", PASSWORD);
    b.click("#login-submit");
    b.wait_visible("#nav", WAIT);
    b.wait_text("#live", WAIT, |t| t == "live");
}

#[test]
fn setup_flow_login_workspaces_and_tokens() {
    webdriver::require_browser();
    let up = Up::start();
    let b = browser();
    let code = std::fs::read_to_string(up.dir.join("setup-code"))
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
        up.dir.join("setup-code").exists(),
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
    assert!(up.dir.join("setup-code").exists());

    // The right code: the admin exists, the join command is shown, and on to the dashboard.
    b.fill("#setup-password2", PASSWORD);
    b.click("#setup-submit");
    b.wait_visible("#view-setup-done", WAIT);
    let cmd = b.wait_text("#join-command", WAIT, |t| t.contains("--join-token"));
    assert!(
        cmd.starts_with(&format!("muster agent --server {}", up.url)),
        "{cmd}"
    );
    assert!(!up.dir.join("setup-code").exists(), "the code is used up");
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
    let go = up.dir.join("go");
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

    // A node control script (an executable in <data-dir>/scripts) run from the form on the
    // nodes a label selector picks, with arguments.
    let scripts = up.dir.join("scripts");
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
    let all = names(&b);
    assert_eq!(all.as_array().unwrap().len(), 3, "{all}");
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
