//! End-to-end tests of the client commands against a real `muster up`.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_muster");
const PASSWORD: &str = "correct horse battery staple";

/// A fresh directory, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p =
            std::env::temp_dir().join(format!("muster-cli-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `muster up` child, stopped (SIGTERM, then SIGKILL) when dropped, also on panic.
struct Server {
    child: Child,
    url: String,
    data: PathBuf,
    config: PathBuf,
    // Last, so the directory goes after the server has stopped.
    dir: TempDir,
}

impl Server {
    fn start(name: &str) -> Server {
        let dir = TempDir::new(name);
        let data = dir.0.join("data");
        let config = dir.0.join("config");
        let log = std::fs::File::create(dir.0.join("server.stderr")).unwrap();
        let mut child = Command::new(BIN)
            .args(["up", "--data-dir"])
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .env_remove("MUSTER_URL")
            .env_remove("MUSTER_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("cannot start muster up");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Keeps draining stdout for the server's whole life.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut server = Server {
            child,
            url: String::new(),
            data,
            config,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("muster is up at ") {
                        let url = rest.split_whitespace().next().unwrap();
                        server.url = url.trim_end_matches('/').to_string();
                        return server;
                    }
                }
                Err(e) => panic!(
                    "muster up did not come up ({e}); stderr:\n{}",
                    server.stderr()
                ),
            }
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("server.stderr")).unwrap_or_default()
    }

    /// Runs a client command with this test's config dir; `stdin` is written to its stdin.
    fn muster(&self, args: &[&str], stdin: Option<&str>) -> Out {
        self.muster_env(args, stdin, &[])
    }

    /// [`Server::muster`] with more environment (which may replace MUSTER_CONFIG_DIR).
    fn muster_env(&self, args: &[&str], stdin: Option<&str>, envs: &[(&str, &str)]) -> Out {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("MUSTER_CONFIG_DIR", &self.config)
            .env_remove("MUSTER_URL")
            .env_remove("MUSTER_TOKEN")
            .env_remove("MUSTER_PASSWORD")
            .env_remove("MUSTER_DATA_DIR");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot run muster");
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        Out(child.wait_with_output().unwrap(), args.join(" "))
    }

    /// `muster setup` with the code file, then `muster login` (password on stdin).
    fn setup_and_login(&self) {
        let code_file = self.data.join("setup-code");
        assert!(
            code_file.exists(),
            "no setup code at {}",
            code_file.display()
        );
        let code_file = code_file.to_str().unwrap().to_string();
        let out = self.muster(
            &[
                "setup",
                "--server",
                &self.url,
                "--username",
                "admin",
                "--code-file",
                &code_file,
                "--password-stdin",
            ],
            Some(&format!("{PASSWORD}\n")),
        );
        out.ok();
        let creds = self.config.join("credentials.json");
        let meta = std::fs::metadata(&creds).expect("setup saved no credentials");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let saved: Value = serde_json::from_str(&std::fs::read_to_string(&creds).unwrap()).unwrap();
        assert_eq!(saved["server"], self.url.as_str());
        assert_eq!(saved["username"], "admin");

        // A wrong password is refused with the server's message.
        let bad = self.muster(
            &[
                "login",
                "--server",
                &self.url,
                "--username",
                "admin",
                "--password-stdin",
            ],
            Some("nope-nope-nope\n"),
        );
        bad.fails_with("wrong user name or password (HTTP 401)");

        // After a failure the server makes the next login wait a little (429 with Retry-After
        // until then): retry until it lets us in.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.muster(
                &[
                    "login",
                    "--server",
                    &self.url,
                    "--username",
                    "admin",
                    "--password-stdin",
                ],
                Some(&format!("{PASSWORD}\n")),
            );
            if out.stderr().contains("(HTTP 429)") && Instant::now() < deadline {
                assert!(out.stderr().contains("try again in"), "{}", out.stderr());
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            out.ok();
            break;
        }
        let again: Value = serde_json::from_str(&std::fs::read_to_string(&creds).unwrap()).unwrap();
        assert_ne!(
            again["token"], saved["token"],
            "login should save a new token"
        );
    }

    fn job(&self, id: &str) -> Value {
        let out = self.muster(&["jobs", "show", id, "--json"], None).ok();
        serde_json::from_str(&out).unwrap()
    }

    /// Polls `jobs show --json` until `done` holds for the job (20 s at most).
    fn wait_job(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let j = self.job(id);
            if done(&j) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never became {what}; last: {j:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `jobs tree --json` until the tree has ended; gives its state.
    fn wait_tree(&self, id: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.muster(&["jobs", "tree", id, "--json"], None).ok();
            let t: Value = serde_json::from_str(&out).unwrap();
            let s = t["tree_state"].as_str().unwrap().to_string();
            if s != "running" {
                return s;
            }
            assert!(Instant::now() < deadline, "tree {id} never ended: {t:#}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- muster up stderr ---\n{}", self.stderr());
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A finished client command.
struct Out(Output, String);

impl Out {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    /// Asserts success; gives stdout.
    fn ok(&self) -> String {
        assert!(
            self.0.status.success(),
            "`muster {}` failed ({}):\nstdout: {}\nstderr: {}",
            self.1,
            self.0.status,
            self.stdout(),
            self.stderr()
        );
        self.stdout()
    }
    /// Asserts failure with exit code 1 and a `muster: …message…` line on stderr.
    fn fails_with(&self, message: &str) {
        assert_eq!(
            self.0.status.code(),
            Some(1),
            "`muster {}` should fail:\nstdout: {}\nstderr: {}",
            self.1,
            self.stdout(),
            self.stderr()
        );
        assert!(
            self.stderr()
                .lines()
                .any(|l| l.starts_with("muster: ") && l.contains(message)),
            "`muster {}`: stderr lacks a `muster: …{message}…` line:\n{}",
            self.1,
            self.stderr()
        );
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn setup_login_run_list_tree_abort() {
    let s = Server::start("flow");
    s.setup_and_login();

    // One job from the command line.
    let id = s
        .muster(
            &["jobs", "run", "--", "sh", "-c", "echo hello-from-job"],
            None,
        )
        .ok()
        .trim()
        .to_string();
    assert_eq!(id.len(), 36, "not an id: {id:?}");
    let j = s.wait_job(&id, "finished", |j| {
        j["state"] != "waiting" && j["state"] != "running"
    });
    assert_eq!(j["state"], "succeeded", "{j:#}");
    assert_eq!(j["exit_code"], 0);
    let log = s.muster(&["jobs", "logs", &id], None).ok();
    assert!(log.contains("out hello-from-job"), "{log}");
    let show = s.muster(&["jobs", "show", &id], None).ok();
    assert!(show.contains("succeeded") && show.contains(&id), "{show}");

    let ls: Value = serde_json::from_str(&s.muster(&["jobs", "ls", "--json"], None).ok()).unwrap();
    assert!(
        ls["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == id.as_str()),
        "{ls:#}"
    );
    let table = s.muster(&["jobs", "ls"], None).ok();
    assert!(table.starts_with("ID ") && table.contains(&id), "{table}");

    // A two-level tree from TOML.
    let toml = write(
        &s.dir.0,
        "tree.toml",
        r#"
name = "build all"
key = "root"
[tags]
application = "demo"
[[children]]
name = "compile it"
key = "compile"
shell = "echo compiled"
[[children]]
name = "test it"
key = "test"
exec = ["sh", "-c", "echo tested"]
needs = ["compile"]
"#,
    );
    let tree = s
        .muster(&["jobs", "run", "--file", &toml, "--version", "1.2"], None)
        .ok()
        .trim()
        .to_string();
    assert_eq!(s.wait_tree(&tree), "succeeded");
    let drawn = s.muster(&["jobs", "tree", &tree], None).ok();
    assert!(drawn.contains("root [succeeded] build all"), "{drawn}");
    assert!(
        drawn.contains("├─ compile [succeeded] compile it"),
        "{drawn}"
    );
    assert!(drawn.contains("└─ test [succeeded] test it"), "{drawn}");
    let filtered: Value = serde_json::from_str(
        &s.muster(&["jobs", "ls", "--application", "demo", "--json"], None)
            .ok(),
    )
    .unwrap();
    let items = filtered["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{filtered:#}");
    assert_eq!(items[0]["tags"]["version"], "1.2");

    // A long job, aborted once it runs; a second abort is refused.
    let long = s
        .muster(&["jobs", "run", "--", "sleep", "30"], None)
        .ok()
        .trim()
        .to_string();
    s.wait_job(&long, "running", |j| j["state"] == "running");
    let out = s.muster(&["jobs", "abort", &long], None).ok();
    assert!(out.contains("aborting"), "{out}");
    assert_eq!(s.wait_tree(&long), "aborted");
    s.muster(&["jobs", "abort", &long], None)
        .fails_with("cannot abort: the tree has already aborted (HTTP 409)");

    // Bad input: the server's message comes through.
    let bad = write(
        &s.dir.0,
        "bad.json",
        r#"{"name": "x", "exec": ["true"], "bogus": 1}"#,
    );
    let out = s.muster(&["jobs", "run", "--file", &bad], None);
    out.fails_with("unknown field `bogus`");
    assert!(out.stderr().contains("(HTTP 400)"), "{}", out.stderr());
    s.muster(&["jobs", "show", "not-an-id"], None)
        .fails_with("(HTTP 400)");
}

#[test]
fn follow_logs_and_exit_codes() {
    let s = Server::start("follow");
    s.setup_and_login();

    let script = "for i in 1 2 3 4 5; do echo tick-$i; sleep 0.2; done";
    let id = s
        .muster(&["jobs", "run", "--shell", "--", script], None)
        .ok()
        .trim()
        .to_string();
    let t0 = Instant::now();
    let log = s.muster(&["jobs", "logs", "-f", &id], None).ok();
    for i in 1..=5 {
        assert!(
            log.contains(&format!("out tick-{i}\n")),
            "tick-{i} missing:\n{log}"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(15));
    // `logs -f` returns once the job has ended.
    let j = s.job(&id);
    assert_eq!(j["state"], "succeeded", "{j:#}");

    // `run -f`: the log, then the exit code of the tree.
    let out = s.muster(
        &["jobs", "run", "-f", "--", "sh", "-c", "echo ran-ok"],
        None,
    );
    assert!(out.ok().contains("out ran-ok"));
    let out = s.muster(
        &[
            "jobs",
            "run",
            "-f",
            "--",
            "sh",
            "-c",
            "echo ran-bad; exit 3",
        ],
        None,
    );
    assert!(out.stdout().contains("out ran-bad"), "{}", out.stdout());
    out.fails_with("ended failed");
}

#[test]
fn client_errors_are_clear() {
    let dir = TempDir::new("errors");
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("MUSTER_CONFIG_DIR", &dir.0)
            .env_remove("MUSTER_URL")
            .env_remove("MUSTER_TOKEN")
            .env_remove("MUSTER_PASSWORD");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Out(cmd.stdin(Stdio::null()).output().unwrap(), args.join(" "))
    };
    // Nothing listens on port 1.
    let out = run(
        &["jobs", "ls", "--server", "http://127.0.0.1:1"],
        &[("MUSTER_TOKEN", "x")],
    );
    out.fails_with("cannot reach the muster server at http://127.0.0.1:1");
    assert!(out.stderr().contains("muster up"), "{}", out.stderr());
    run(&["jobs", "ls"], &[]).fails_with("not logged in");
    run(&["login", "--username", "admin"], &[]).fails_with("--password-stdin");
}

/// The items of a `… ls --json` answer.
fn items(out: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["items"].as_array().unwrap().clone()
}

#[test]
fn users_workspaces_and_roles() {
    let s = Server::start("accounts");
    s.setup_and_login();

    // A weak password is refused with the server's message.
    s.muster(
        &["users", "add", "bob", "--password-stdin"],
        Some("short\n"),
    )
    .fails_with("the password must have at least 12 characters (HTTP 400)");
    s.muster_env(
        &["users", "add", "bobbobbobbobbob"],
        None,
        &[("MUSTER_PASSWORD", "BOBBOBBOBBOBBOB")],
    )
    .fails_with("the password must not be the user name");

    // Users: add, list, remove.
    let bob_pw = "bob's long enough password";
    let out = s
        .muster(
            &["users", "add", "bob", "--password-stdin"],
            Some(&format!("{bob_pw}\n")),
        )
        .ok();
    assert!(out.contains("\"bob\" added"), "{out}");
    s.muster_env(
        &["users", "add", "carol", "--admin"],
        None,
        &[("MUSTER_PASSWORD", PASSWORD)],
    )
    .ok();
    let users = items(&s.muster(&["users", "ls", "--json"], None).ok());
    let admin_of = |name: &str| {
        users
            .iter()
            .find(|u| u["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {users:?}"))["admin"]
            .clone()
    };
    assert_eq!(admin_of("admin"), true);
    assert_eq!(admin_of("bob"), false);
    assert_eq!(admin_of("carol"), true);
    let table = s.muster(&["users", "ls"], None).ok();
    assert!(table.starts_with("NAME "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["bob", "no"])),
        "{table}"
    );
    s.muster(&["users", "rm", "carol"], None).ok();
    let users = items(&s.muster(&["users", "ls", "--json"], None).ok());
    assert!(!users.iter().any(|u| u["name"] == "carol"), "{users:?}");
    s.muster(&["users", "rm", "carol"], None)
        .fails_with("(HTTP 404)");

    // Workspaces: add, grant, list, and what a viewer may not do.
    let out = s.muster(&["workspaces", "add", "team"], None).ok();
    assert!(out.contains("\"team\" added"), "{out}");
    s.muster(&["workspaces", "grant", "team", "bob", "viewer"], None)
        .ok();
    let ws = items(&s.muster(&["workspaces", "ls", "--json"], None).ok());
    let team = ws.iter().find(|w| w["name"] == "team").unwrap().clone();
    assert_eq!(team["role"], "admin", "{team:#}");
    assert_eq!(team["created_by"], "admin", "{team:#}");
    let members = team["members"].as_array().unwrap();
    assert!(
        members
            .iter()
            .any(|m| m["user"] == "bob" && m["role"] == "viewer"),
        "{team:#}"
    );
    let table = s.muster(&["workspaces", "ls"], None).ok();
    assert!(table.starts_with("NAME "), "{table}");
    assert!(table.contains("YOUR ROLE"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("team ")
            && l.contains("bob:viewer")
            && l.contains("admin:admin")),
        "{table}"
    );
    // A role that is not one is a usage error (clap's exit code 2), before any request.
    let out = s.muster(&["workspaces", "grant", "team", "bob", "boss"], None);
    assert_eq!(out.0.status.code(), Some(2), "{}", out.stderr());
    assert!(out.stderr().contains("operator"), "{}", out.stderr());
    s.muster(&["workspaces", "grant", "team", "nobody", "viewer"], None)
        .fails_with("(HTTP 404)");

    // Bob logs in with his own config dir.
    let bob_config = s.dir.0.join("bob-config");
    let bob_config = bob_config.to_str().unwrap();
    let bob = |args: &[&str], stdin: Option<&str>| {
        s.muster_env(args, stdin, &[("MUSTER_CONFIG_DIR", bob_config)])
    };
    bob(
        &[
            "login",
            "--server",
            &s.url,
            "--username",
            "bob",
            "--password-stdin",
        ],
        Some(&format!("{bob_pw}\n")),
    )
    .ok();
    let bob_ws = items(&bob(&["workspaces", "ls", "--json"], None).ok());
    let names: Vec<&str> = bob_ws.iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2, "{bob_ws:?}");
    assert!(
        names.contains(&"bob") && names.contains(&"team"),
        "{bob_ws:?}"
    );
    let out = bob(&["jobs", "run", "--workspace", "team", "--", "true"], None);
    out.fails_with("operator");
    assert!(out.stderr().contains("(HTTP 403)"), "{}", out.stderr());
    // In his own workspace he may run; a viewer may not manage members.
    let id = bob(&["jobs", "run", "--", "true"], None).ok();
    assert_eq!(id.trim().len(), 36, "{id}");
    bob(&["workspaces", "grant", "team", "bob", "admin"], None).fails_with("(HTTP 403)");
    // Bob sees only himself; he may not add users.
    let users = items(&bob(&["users", "ls", "--json"], None).ok());
    assert_eq!(users.len(), 1, "{users:?}");
    bob(&["users", "add", "eve"], None).fails_with("no password");
    bob(
        &["users", "add", "eve", "--password-stdin"],
        Some("eve's long password\n"),
    )
    .fails_with("only cluster admins manage users (HTTP 403)");

    // Once operator, bob may run in team.
    s.muster(&["workspaces", "grant", "team", "bob", "operator"], None)
        .ok();
    bob(&["jobs", "run", "--workspace", "team", "--", "true"], None).ok();

    // Revoke: bob no longer sees team.
    s.muster(&["workspaces", "revoke", "team", "bob"], None)
        .ok();
    let ws = items(&s.muster(&["workspaces", "ls", "--json"], None).ok());
    let team = ws.iter().find(|w| w["name"] == "team").unwrap();
    assert!(
        !team["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["user"] == "bob"),
        "{team:#}"
    );
    let bob_ws = items(&bob(&["workspaces", "ls", "--json"], None).ok());
    assert!(!bob_ws.iter().any(|w| w["name"] == "team"), "{bob_ws:?}");
    // The last admin of a workspace stays.
    s.muster(&["workspaces", "revoke", "team", "admin"], None)
        .fails_with("last admin");

    // Removing bob ends his session.
    s.muster(&["users", "rm", "bob"], None).ok();
    bob(&["jobs", "ls"], None).fails_with("(HTTP 401)");
}

#[test]
fn tokens_and_logout() {
    let s = Server::start("tokens");
    s.setup_and_login();

    // The secret alone on stdout; the details on stderr.
    let out = s.muster(
        &[
            "tokens",
            "create",
            "ci",
            "--scopes",
            "read",
            "--expires-in",
            "1h",
        ],
        None,
    );
    let token = out.ok();
    assert_eq!(token.lines().count(), 1, "{token:?}");
    let token = token.trim().to_string();
    assert!(token.len() >= 20, "{token:?}");
    assert!(out.stderr().contains("\"ci\""), "{}", out.stderr());
    assert!(out.stderr().contains("shown only once"), "{}", out.stderr());

    // It reads, but may not run.
    let with = |args: &[&str]| s.muster_env(args, None, &[("MUSTER_TOKEN", &token)]);
    with(&["jobs", "ls"]).ok();
    let out = with(&["jobs", "run", "--", "true"]);
    out.fails_with("operate");
    assert!(out.stderr().contains("(HTTP 403)"), "{}", out.stderr());
    // Nor make tokens of its own.
    with(&["tokens", "create", "x", "--scopes", "read"]).fails_with("admin");

    // Listed without its secret.
    let ls = s.muster(&["tokens", "ls", "--json"], None).ok();
    assert!(!ls.contains(&token), "{ls}");
    let list = items(&ls);
    let ci = list
        .iter()
        .find(|t| t["name"] == "ci")
        .unwrap_or_else(|| panic!("{ls}"))
        .clone();
    assert_eq!(ci["scopes"], serde_json::json!(["read"]), "{ci:#}");
    assert_eq!(ci["user"], "admin");
    assert!(ci.get("token").is_none(), "{ci:#}");
    assert!(token.starts_with(ci["prefix"].as_str().unwrap()), "{ci:#}");
    assert!(ci["expires_at"].is_string(), "{ci:#}");
    let id = ci["id"].as_str().unwrap().to_string();
    let table = s.muster(&["tokens", "ls"], None).ok();
    assert!(table.starts_with("ID "), "{table}");
    assert!(!table.contains(&token), "{table}");
    let row = table.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(row.contains(" ci ") && row.contains(" read "), "{row}");
    s.muster(&["tokens", "ls", "--all"], None).ok();

    // --json gives the whole answer; no expiry: never.
    let whole: Value = serde_json::from_str(
        &s.muster(
            &[
                "tokens",
                "create",
                "deploy",
                "--scopes",
                "read,operate",
                "--json",
            ],
            None,
        )
        .ok(),
    )
    .unwrap();
    assert!(whole["token"].is_string(), "{whole:#}");
    assert!(whole["expires_at"].is_null(), "{whole:#}");
    assert_eq!(whole["scopes"], serde_json::json!(["read", "operate"]));
    let deploy = whole["token"].as_str().unwrap();
    s.muster_env(
        &["jobs", "run", "--", "true"],
        None,
        &[("MUSTER_TOKEN", deploy)],
    )
    .ok();
    s.muster(&["tokens", "create", "bad", "--scopes", "root"], None)
        .fails_with("(HTTP 400)");
    let out = s.muster(
        &[
            "tokens",
            "create",
            "bad",
            "--scopes",
            "read",
            "--expires-in",
            "3x",
        ],
        None,
    );
    assert_eq!(out.0.status.code(), Some(2), "{}", out.stderr());
    assert!(out.stderr().contains("30d"), "{}", out.stderr());

    // Revoked: refused.
    s.muster(&["tokens", "revoke", &id], None).ok();
    with(&["jobs", "ls"]).fails_with("(HTTP 401)");
    s.muster(&["tokens", "revoke", &id], None)
        .fails_with("(HTTP 404)");

    // Logout revokes the saved login's token and forgets it.
    let creds = s.config.join("credentials.json");
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&creds).unwrap()).unwrap();
    let old = saved["token"].as_str().unwrap().to_string();
    let out = s.muster(&["logout"], None).ok();
    assert!(out.contains("logged out"), "{out}");
    assert!(!creds.exists());
    s.muster(&["jobs", "ls"], None).fails_with("not logged in");
    s.muster(&["jobs", "ls"], None).fails_with("muster login");
    s.muster_env(
        &["jobs", "ls", "--server", &s.url],
        None,
        &[("MUSTER_TOKEN", &old)],
    )
    .fails_with("(HTTP 401)");
    s.muster(&["logout"], None).fails_with("not logged in");
}

#[test]
fn perf_summary_of_a_data_dir() {
    let dir = TempDir::new("perf");
    let run = dir.0.join("perf/logs/1");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("123.log"),
        "2026-11-23T16:00:00.000Z GET /api/v1/jobs 200 1500\n\
         2026-11-23T16:00:01.000Z GET /api/v1/jobs 200 2500\n\
         2026-11-23T16:00:02.000Z GET /api/v1/jobs 200 3500\n\
         2026-11-23T16:00:03.000Z POST /api/v1/jobs 201 9000\n",
    )
    .unwrap();
    let perf = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_remove("MUSTER_DATA_DIR")
            .current_dir(&dir.0);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Out(cmd.stdin(Stdio::null()).output().unwrap(), args.join(" "))
    };
    let data = dir.0.to_str().unwrap();
    let check = |out: &str| {
        assert!(out.starts_with("perf run 1"), "{out}");
        let get = out
            .lines()
            .find(|l| l.starts_with("GET /api/v1/jobs "))
            .unwrap_or_else(|| panic!("{out}"));
        let cols: Vec<&str> = get.split_whitespace().collect();
        assert_eq!(
            &cols[2..],
            ["3", "2.500", "3.500", "3.500", "3.500"],
            "{get}"
        );
        let post = out
            .lines()
            .find(|l| l.starts_with("POST /api/v1/jobs "))
            .unwrap_or_else(|| panic!("{out}"));
        assert_eq!(post.split_whitespace().nth(2), Some("1"), "{post}");
    };
    check(&perf(&["perf", "summary", "--data-dir", data], &[]).ok());
    check(
        &perf(
            &["perf", "summary", "--run", "1"],
            &[("MUSTER_DATA_DIR", data)],
        )
        .ok(),
    );
    perf(&["perf", "summary", "--data-dir", data, "--run", "2"], &[]).fails_with("no perf run 2");
    // No data dir named: ./muster-data, which has no runs here.
    perf(&["perf", "summary"], &[]).fails_with("no perf runs");
}

#[test]
fn a_bad_agent_run_as_stops_the_agent_and_up_at_once() {
    let dir = TempDir::new("run-as");
    for args in [
        vec![
            "agent",
            "--server",
            "http://127.0.0.1:9",
            "--join-token",
            "mjt_00",
        ],
        vec!["up", "--listen", "127.0.0.1:0"],
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .arg("--data-dir")
            .arg(dir.0.join(args[0]))
            .env("MUSTER_AGENT__RUN_AS", "no-such-user-here")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("there is no user \"no-such-user-here\""),
            "{args:?}: {err}"
        );
    }
    // Root is not an unprivileged user.
    let out = Command::new(BIN)
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.0.join("root"))
        .env("MUSTER_AGENT__RUN_AS", "root")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is root; name an unprivileged user"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_tls_files_stop_the_server_at_once_with_their_names() {
    let dir = TempDir::new("tls-files");
    let missing = dir.0.join("missing.pem").display().to_string();
    for (cert, key, want) in [
        (
            missing.as_str(),
            "",
            "server.tls_cert and server.tls_key go together",
        ),
        (missing.as_str(), missing.as_str(), missing.as_str()),
    ] {
        let out = Command::new(BIN)
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.0.join("data"))
            .env("MUSTER_SERVER__TLS_CERT", cert)
            .env("MUSTER_SERVER__TLS_KEY", key)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{err}");
    }
}
