//! End-to-end tests of the client commands against a real `muster up`.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod support;
use support::{wait_until, TempDir};

#[path = "../../muster-models/tests/support/mod.rs"]
mod model_support;

const BIN: &str = env!("CARGO_BIN_EXE_muster");
const PASSWORD: &str = "correct horse battery staple";

/// A fresh directory, removed at the end.
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
        Self::start_env(name, &[])
    }

    /// With extra environment variables.
    fn start_env(name: &str, env: &[(&str, &str)]) -> Server {
        Self::start_listen(name, env, "127.0.0.1:0")
    }

    /// On a given address, with extra environment variables.
    fn start_listen(name: &str, env: &[(&str, &str)], listen: &str) -> Server {
        let dir = TempDir::new(name);
        let data = dir.0.join("data");
        let config = dir.0.join("config");
        let log = std::fs::File::create(dir.0.join("server.stderr")).unwrap();
        let mut child = Command::new(BIN)
            .args(["up", "--data-dir"])
            .arg(&data)
            .args(["--listen", listen])
            .env_remove("MUSTER_URL")
            .env_remove("MUSTER_TOKEN")
            .envs(env.iter().copied())
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
        // The token setup saved was replaced, and revoked: one session is left.
        let tokens = items(&self.muster(&["tokens", "ls", "--json"], None).ok());
        let names: Vec<&str> = tokens.iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["login"], "{tokens:#?}");
    }

    /// Starts a client command, its stdout and stderr piped.
    fn spawn(&self, args: &[&str]) -> Child {
        Command::new(BIN)
            .args(args)
            .env("MUSTER_CONFIG_DIR", &self.config)
            .env_remove("MUSTER_URL")
            .env_remove("MUSTER_TOKEN")
            .env_remove("MUSTER_PASSWORD")
            .env_remove("MUSTER_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run muster")
    }

    /// The name of the embedded agent's node.
    fn node_name(&self) -> String {
        let nodes = items(&self.muster(&["nodes", "ls", "--json"], None).ok());
        assert_eq!(nodes.len(), 1, "{nodes:#?}");
        nodes[0]["name"].as_str().unwrap().to_string()
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

#[test]
fn logs_are_text_by_default_json_on_request_and_a_bad_filter_is_refused() {
    let s = Server::start_env(
        "log-json",
        &[("MUSTER_LOG_FORMAT", "json"), ("RUST_LOG", "info")],
    );
    let line = s
        .stderr()
        .lines()
        .find(|l| l.contains("muster is up"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no start line in:\n{}", s.stderr()));
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON object a line");
    assert_eq!(v["level"], "INFO", "{line}");
    assert_eq!(v["url"].as_str(), Some(s.url.as_str()), "{line}");
    drop(s);
    let text = Server::start("log-text");
    let line = text
        .stderr()
        .lines()
        .find(|l| l.contains("muster is up"))
        .map(str::to_string)
        .unwrap();
    assert!(line.contains("INFO") && !line.starts_with('{'), "{line}");
    drop(text);
    let out = Command::new(BIN)
        .args(["config", "show"])
        .env("RUST_LOG", "warn,=bogus=")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a filter like"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The anonymous resident memory of a process, in bytes (`RssAnon`: what it allocated, without
/// the mapped binary, whose debug build alone is ~100 MB).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// A thousand live websocket follows of one log share one stream from the node: together they
/// add at most 20 MB to a server that already serves a hundred, and each gets every line and
/// its end.
#[test]
fn a_thousand_follows_of_one_log_cost_little_memory() {
    let s = Server::start("follows");
    s.setup_and_login();
    let creds: Value =
        serde_json::from_str(&std::fs::read_to_string(s.config.join("credentials.json")).unwrap())
            .unwrap();
    let token = creds["token"].as_str().unwrap().to_string();
    let gate = s.dir.0.join("gate");
    let body = serde_json::json!({"name": "watched", "shell": format!(
        "echo started; while [ ! -e {} ]; do sleep 0.05; done; echo ended", gate.display())});
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let text = agent
        .post(&format!("{}/api/v1/jobs", s.url))
        .header("authorization", &format!("Bearer {token}"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let resp: Value = serde_json::from_str(&text).unwrap();
    let job = resp["jobs"][0]["id"].as_str().unwrap().to_string();
    let ws_url = format!(
        "{}/api/v1/jobs/{job}/log/ws",
        s.url.replacen("http", "ws", 1)
    );
    let follow = || {
        use tungstenite::client::IntoClientRequest;
        let mut req = ws_url.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (mut ws, _) = tungstenite::connect(req).unwrap();
        // Until its first line: the follow is live.
        let mut text = String::new();
        while !text.contains(" out started") {
            match ws.read().unwrap() {
                tungstenite::Message::Text(t) => text.push_str(&t),
                tungstenite::Message::Close(_) => panic!("closed early: {text}"),
                _ => {}
            }
        }
        (ws, text)
    };
    let pid = s.child.id();
    // A hundred follows first, so the one-time costs of a server under load (worker and
    // blocking threads with their malloc arenas, lazily made pools) are paid before the
    // measure: what is measured is what a thousand more follows add.
    let mut follows: Vec<_> = (0..100).map(|_| follow()).collect();
    let before = rss(pid);
    for _ in 0..1000 {
        follows.push(follow());
    }
    let during = rss(pid);
    eprintln!(
        "server RSS: {} MB with 100 follows, {} MB with 1100",
        before >> 20,
        during >> 20
    );
    assert!(
        during.saturating_sub(before) <= 20 << 20,
        "1000 follows added {} MB (from {} MB)",
        (during - before) >> 20,
        before >> 20
    );
    std::fs::write(&gate, b"").unwrap();
    for (ws, text) in &mut follows {
        loop {
            match ws.read() {
                Ok(tungstenite::Message::Text(t)) => text.push_str(&t),
                Ok(tungstenite::Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        assert!(text.contains(" out ended"), "{text}");
        assert_eq!(text.matches(" out started").count(), 1, "{text}");
    }
}

/// Samples a process's anonymous RSS every 100 ms on a thread; `stop()` gives the highest seen.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0;
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                max = max.max(rss(pid));
                std::thread::sleep(Duration::from_millis(100));
            }
            max.max(rss(pid))
        });
        RssSampler { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// A job printing 200 MB (its log capped at 64 MiB): the log is streamed to the blob store and
/// back to a reader in bounded pieces, so the server with its embedded agent stays under 60 MB
/// of allocated memory at every moment (sampled every 100 ms), while writing and while serving.
#[test]
fn a_200_mb_output_keeps_the_server_small() {
    let s = Server::start("bigout");
    s.setup_and_login();
    let sampler = RssSampler::start(s.child.id());
    let out = s.muster(
        &[
            "jobs",
            "run",
            "-f",
            "--",
            "sh",
            "-c",
            "yes 0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567 | head -c 200000000",
        ],
        None,
    );
    // The follow printed it all: at most the cap.
    let printed = out.0.stdout.len();
    assert!(out.0.status.success(), "{}", out.stderr());
    assert!(
        printed > 60 << 20 && printed < 70 << 20,
        "{printed} bytes printed"
    );
    let during_run = sampler.stop();
    // Read back whole from the blob store.
    let sampler = RssSampler::start(s.child.id());
    let ls = s.muster(&["jobs", "ls", "--json"], None);
    let v: Value = serde_json::from_slice(&ls.0.stdout).unwrap();
    let tree = v["items"][0]["id"].as_str().unwrap().to_string();
    let log = s.muster(&["jobs", "logs", &tree], None);
    assert!(log.0.status.success(), "{}", log.stderr());
    let read = log.0.stdout.len();
    let during_read = sampler.stop();
    assert!(read > 60 << 20, "{read} bytes read back");
    assert!(
        String::from_utf8_lossy(&log.0.stdout[read - 200..]).contains("log capped at"),
        "the log ends with the cap's note"
    );
    eprintln!(
        "muster up RssAnon at most {} MB while the job ran, {} MB while its log was read",
        during_run >> 20,
        during_read >> 20
    );
    assert!(
        during_run < 60 << 20,
        "{} MB while running",
        during_run >> 20
    );
    assert!(
        during_read < 60 << 20,
        "{} MB while reading",
        during_read >> 20
    );
}

/// Reads a child's stream line by line on a thread; the lines arrive on the channel.
fn lines_of(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (20 s at most) for a line holding `want`; gives every line read meanwhile.
fn wait_line(rx: &mpsc::Receiver<String>, want: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = l.contains(want);
                seen.push(l);
                if hit {
                    return seen;
                }
            }
            Err(e) => panic!("no line with {want:?} ({e}); got:\n{}", seen.join("\n")),
        }
    }
}

/// Waits (20 s at most) for a child to exit; gives its status.
fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "the command did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn jobs_are_named_by_tree_and_key_and_every_id_is_shown() {
    let s = Server::start("names");
    s.setup_and_login();
    let toml = write(
        &s.dir.0,
        "tree.toml",
        r#"
name = "release"
key = "root"
shell = "echo root-ran"
[[children]]
name = "build a"
key = "a"
shell = "echo a-ran"
[[children]]
name = "ship b"
key = "b"
needs = ["a"]
[[children.children]]
name = "pack c"
key = "c"
exec = ["sh", "-c", "echo c-ran"]
"#,
    );
    // `run -f` names every job it made, with its id.
    let out = s.muster(&["jobs", "run", "-f", "--file", &toml], None);
    out.ok();
    let made: Vec<(String, String)> = out
        .stderr()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (id, key) = (w.next()?, w.next()?);
            (id.len() == 36 && id.matches('-').count() == 4).then(|| (id.into(), key.into()))
        })
        .collect();
    let keys: Vec<&str> = made.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(keys, ["root", "a", "b", "c"], "{}", out.stderr());
    let tree = made[0].0.clone();
    let id_of = |key: &str| made.iter().find(|(_, k)| k == key).unwrap().0.clone();

    // `jobs tree` shows each job's id beside it.
    let drawn = s.muster(&["jobs", "tree", &tree], None).ok();
    for (id, key) in &made {
        let line = drawn
            .lines()
            .find(|l| l.contains(&format!("{key} [succeeded]")))
            .unwrap_or_else(|| panic!("no {key} in\n{drawn}"));
        assert!(line.starts_with(&format!("{id}  ")), "{line}");
    }
    assert!(drawn.contains("   └─ c [succeeded] pack c"), "{drawn}");

    // TREE/KEY, TREE/KEY/KEY and the root's own key, wherever a job is taken.
    for (name, want) in [
        (format!("{tree}/a"), "out a-ran"),
        (format!("{tree}/b/c"), "out c-ran"),
        (format!("{tree}/c"), "out c-ran"),
        (format!("{tree}/root"), "out root-ran"),
    ] {
        let log = s.muster(&["jobs", "logs", &name], None).ok();
        assert!(log.contains(want), "{name}: {log}");
    }
    let j: Value = serde_json::from_str(
        &s.muster(&["jobs", "show", &format!("{tree}/b/c"), "--json"], None)
            .ok(),
    )
    .unwrap();
    assert_eq!(j["id"], id_of("c").as_str(), "{j:#}");
    s.muster(&["jobs", "logs", "-f", &format!("{tree}/a")], None)
        .ok();
    let sub = s.muster(&["jobs", "tree", &format!("{tree}/b")], None).ok();
    assert!(
        sub.lines()
            .nth(1)
            .unwrap()
            .starts_with(&format!("{}  b [succeeded]", id_of("b"))),
        "{sub}"
    );
    assert!(
        sub.contains(&format!("{}  └─ c [succeeded]", id_of("c"))),
        "{sub}"
    );

    // `jobs show` lists the children with their ids, and needs by key.
    let show = s.muster(&["jobs", "show", &tree], None).ok();
    assert!(show.contains("children:"), "{show}");
    for key in ["a", "b"] {
        assert!(
            show.lines()
                .any(|l| l.trim_start().starts_with(&id_of(key)) && l.contains(&format!(" {key} "))),
            "{key}: {show}"
        );
    }
    let show_b = s.muster(&["jobs", "show", &format!("{tree}/b")], None).ok();
    assert!(
        show_b
            .lines()
            .any(|l| l.starts_with("needs:") && l.ends_with(" a [succeeded]")),
        "{show_b}"
    );
    assert!(show_b.contains(&id_of("c")), "{show_b}");

    // A key the tree lacks, a bad path, and abort through a path.
    s.muster(&["jobs", "logs", &format!("{tree}/nope")], None)
        .fails_with("no job with key \"nope\" under root");
    s.muster(&["jobs", "logs", &format!("{tree}/a/c")], None)
        .fails_with("no job with key \"c\" under a");
    s.muster(&["jobs", "show", &format!("{tree}//a")], None)
        .fails_with("is not a job");
    s.muster(&["jobs", "abort", &format!("{tree}/a")], None)
        .fails_with("the tree has already succeeded (HTTP 409)");
    s.muster(&["jobs", "logs", "not-an-id/a"], None)
        .fails_with("(HTTP 400)");
}

#[test]
fn exit_codes_waiting_jobs_and_empty_listings() {
    let s = Server::start("exits");
    s.setup_and_login();

    // Empty listings say so.
    let out = s.muster(&["jobs", "ls"], None);
    assert_eq!(out.ok(), "");
    assert!(
        out.stderr().contains("no job trees yet"),
        "{}",
        out.stderr()
    );
    let out = s.muster(&["jobs", "ls", "--state", "failed"], None);
    assert!(
        out.stderr().contains("no job trees match"),
        "{}",
        out.stderr()
    );
    let out = s.muster(&["scripts", "ls"], None);
    assert!(
        out.stderr().contains("no node control scripts"),
        "{}",
        out.stderr()
    );

    // The codes are in --help.
    for args in [
        &["--help"][..],
        &["jobs", "logs", "--help"],
        &["jobs", "run", "--help"],
    ] {
        let help = s.muster(args, None).ok();
        assert!(
            help.contains("Exit status:") && help.contains("ended failed or aborted"),
            "{args:?}: {help}"
        );
    }

    // `logs -f` of a job that fails exits 1, like `run -f`.
    let id = s
        .muster(
            &["jobs", "run", "--", "sh", "-c", "echo bad-one; exit 3"],
            None,
        )
        .ok()
        .trim()
        .to_string();
    let out = s.muster(&["jobs", "logs", "-f", &id], None);
    assert!(out.stdout().contains("out bad-one"), "{}", out.stdout());
    out.fails_with(&format!("job {id} ended failed (exit 3)"));
    // Without -f the log is printed and that is all.
    s.muster(&["jobs", "logs", &id], None).ok();

    // A job that waits: on a drained node.
    let node = s.node_name();
    s.muster(&["nodes", "drain", &node], None).ok();
    let id = s
        .muster(
            &["jobs", "run", "--node", &node, "--", "echo", "pinned-ran"],
            None,
        )
        .ok()
        .trim()
        .to_string();
    let out = s.muster(&["jobs", "logs", &id], None);
    assert_eq!(out.ok(), "");
    let want = format!("queued for node {node}, which is draining");
    assert!(
        out.stderr().contains("is waiting") && out.stderr().contains(&want),
        "{}",
        out.stderr()
    );
    // `logs -f` waits for it, saying where and why, and follows it once it runs.
    let mut follow = s.spawn(&["jobs", "logs", "-f", &id]);
    let err = lines_of(follow.stderr.take().unwrap());
    let out = lines_of(follow.stdout.take().unwrap());
    wait_line(&err, &want);
    assert_eq!(s.job(&id)["state"], "waiting");
    s.muster(&["nodes", "undrain", &node], None).ok();
    wait_line(&out, "out pinned-ran");
    assert!(wait_exit(&mut follow).success());
    // A node that is not registered is refused at once, not queued for ever.
    s.muster(
        &["jobs", "run", "--node", "no-such-node", "--", "true"],
        None,
    )
    .fails_with("no node named \"no-such-node\"");

    // A job waiting for another one of its tree says which.
    let gate = s.dir.0.join("gate");
    let spec = write(
        &s.dir.0,
        "gated.json",
        &serde_json::json!({"name": "gated", "key": "top", "shell": "echo top-ran", "children": [
            {"name": "gate", "key": "gate", "shell": format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display())}
        ]})
        .to_string(),
    );
    let tree = s
        .muster(&["jobs", "run", "--file", &spec], None)
        .ok()
        .trim()
        .to_string();
    let mut follow = s.spawn(&["jobs", "logs", "-f", &format!("{tree}/top")]);
    let err = lines_of(follow.stderr.take().unwrap());
    let out = lines_of(follow.stdout.take().unwrap());
    wait_line(&err, "it starts once these succeed: gate [");
    std::fs::write(&gate, "").unwrap();
    wait_line(&out, "out top-ran");
    assert!(wait_exit(&mut follow).success());
}

#[test]
fn the_join_command_names_a_reachable_server_or_says_how() {
    // On loopback, with no advertise_url: the command, and how to make it work elsewhere.
    let s = Server::start("join-loopback");
    s.setup_and_login();
    let out = s.muster(&["nodes", "join-token"], None);
    let cmd = out.ok();
    assert!(
        cmd.starts_with(&format!(
            "muster agent --server {} --join-token mjt_",
            s.url
        )),
        "{cmd}"
    );
    assert!(
        out.stderr()
            .contains("only agents on this machine can reach")
            && out.stderr().contains("server.advertise_url")
            && out.stderr().contains("--listen 0.0.0.0:PORT"),
        "{}",
        out.stderr()
    );
    let v: Value =
        serde_json::from_str(&s.muster(&["nodes", "join-token", "--json"], None).ok()).unwrap();
    assert!(
        v["hint"].as_str().unwrap().contains("advertise_url"),
        "{v:#}"
    );
    drop(s);

    // With server.advertise_url: that URL, and no hint.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let advertised = format!("http://localhost:{port}");
    let s = Server::start_listen(
        "join-advertised",
        &[("MUSTER_SERVER__ADVERTISE_URL", &advertised)],
        &format!("127.0.0.1:{port}"),
    );
    assert_eq!(s.url, advertised);
    s.setup_and_login();
    let out = s.muster(&["nodes", "join-token"], None);
    assert!(
        out.ok()
            .starts_with(&format!("muster agent --server {advertised} --join-token ")),
        "{}",
        out.stdout()
    );
    assert!(!out.stderr().contains("advertise_url"), "{}", out.stderr());
}

/// The `sh` blocks of README.md's "A five-minute tour" section, in order, as one script.
fn readme_tour() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .expect("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("A five-minute tour"))
        .expect("README.md has no \"A five-minute tour\" section");
    let mut script = String::new();
    let mut in_block = false;
    for line in section.lines() {
        if in_block && line.trim_end() == "```" {
            in_block = false;
        } else if in_block {
            script.push_str(line);
            script.push('\n');
        } else if line.trim_end() == "```sh" {
            in_block = true;
        }
    }
    assert!(!in_block, "an sh block of the tour is not closed");
    script
}

/// Every process whose command line names `dir` (what the tour started: `muster up`, its
/// agent, their launchers and supervisors), by pid.
fn processes_under(dir: &Path) -> Vec<i32> {
    let needle = dir.to_str().unwrap().as_bytes().to_vec();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cwd = std::fs::read_link(e.path().join("cwd")).unwrap_or_default();
        if cmdline
            .windows(needle.len())
            .any(|w| w == needle.as_slice())
            || cwd.starts_with(dir)
        {
            pids.push(pid);
        }
    }
    pids.retain(|p| *p != std::process::id() as i32);
    pids
}

#[test]
fn the_readme_tour_works_as_written() {
    let dir = TempDir::new("tour");
    let work = dir.0.join("work");
    let bin = dir.0.join("bin");
    let home = dir.0.join("home");
    for d in [&work, &bin, &home] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::os::unix::fs::symlink(BIN, bin.join("muster")).unwrap();
    // A user whose git knows who they are (the tour commits to HQ).
    std::fs::write(
        home.join(".gitconfig"),
        "[user]\n\tname = Tour\n\temail = tour@example.com\n",
    )
    .unwrap();
    // Its own port (muster's default, 7070, may be taken on a shared machine): the one thing
    // set apart from the README, through the environment.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = readme_tour();
    assert!(
        script.contains("muster up &") && script.contains("muster jobs abort"),
        "{script}"
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", &script])
        .current_dir(&work)
        .env_clear()
        .env("PATH", path)
        .env("HOME", &home)
        .env("MUSTER_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("MUSTER_URL", format!("http://127.0.0.1:{port}"))
        // What the build step of the README exports.
        .env(
            "MUSTER_EXAMPLES",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples"),
        )
        // No beacons from the tour's agent (other tests listen for them).
        .env("MUSTER_DISCOVERY__ENABLED", "false")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let mut child = cmd.spawn().unwrap();
    let pgid = child.id() as i32;
    let out = lines_of(child.stdout.take().unwrap());
    let err = lines_of(child.stderr.take().unwrap());
    // Nine steps, services on two nodes among them: a busy CI machine
    // takes a minute or more.
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // What the tour left running (muster up, the agent) stops with the process group; the
    // supervisors of jobs live in sessions of their own.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let gone = Instant::now() + Duration::from_secs(10);
    while unsafe { libc::kill(-pgid, 0) } == 0 && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in processes_under(&dir.0) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let stdout: Vec<String> = out.try_iter().collect();
    let stderr: Vec<String> = err.try_iter().collect();
    let shown = format!(
        "--- script ---\n{script}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        stdout.join("\n"),
        stderr.join("\n")
    );
    let status = status.unwrap_or_else(|| panic!("the tour did not end within 240 s\n{shown}"));
    assert!(status.success(), "the tour failed ({status})\n{shown}");
    let stdout = stdout.join("\n");
    for want in [
        "admin \"admin\" created",
        "out building a 3",
        "out tick 3",
        "out tock 3",
        "aborting tree",
        "node n1 is ready",
        "out Linux",
        "python3 -m http.server",
        "written to backup.tgz",
        "hello: visit 1, counted in the kv store at http://127.0.0.1:7379",
        "0 step(s)",
        "{\"visits\": \"1\"}",
    ] {
        assert!(
            stdout.contains(want),
            "no {want:?} in the tour's output\n{shown}"
        );
    }
    // Step 9: the store runs on n1, and the app counts in it.
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("reconfigure") && l.contains("demo__kv__main")),
        "the store was not reconfigured\n{shown}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("demo__kv__main") && l.split_whitespace().any(|w| w == "n1")),
        "the store is not on n1\n{shown}"
    );
    assert_eq!(
        stdout
            .matches("hello: visit 1, counted in the kv store at http://127.0.0.1:7379")
            .count(),
        2,
        "the app did not count in the new store\n{shown}"
    );
    // Nothing logged an error on the way.
    assert!(
        stderr.iter().all(|l| !l.contains(" ERROR ")),
        "an error was logged\n{shown}"
    );
}

#[test]
fn hq_status_sync_orders_and_log() {
    let s = Server::start_env("hq", &[("MUSTER_PULSE__INTERVAL", "200ms")]);
    s.setup_and_login();
    let hq = s.data.join("hq");
    let out = s.muster(&["hq", "status"], None).ok();
    assert!(out.contains("branch   main"), "{out}");
    assert!(out.contains("remote   (none)"), "{out}");
    assert!(out.contains("HQ: the layout"), "{out}");
    let out = s.muster(&["hq", "sync"], None).ok();
    assert!(out.contains("no remote set"), "{out}");
    let out = s.muster(&["hq", "orders"], None);
    assert!(out.stderr().contains("no orders yet"), "{}", out.stderr());
    std::fs::write(hq.join("deployer/orders"), "noop\nnope\n").unwrap();
    support::git(&hq, &["commit", "-q", "-am", "two orders"]);
    let ok = support::wait_until(Duration::from_secs(20), || {
        let out = s.muster(&["hq", "orders"], None).ok();
        out.contains("deployer/orders:1     succeeded") && out.contains("rejected")
    });
    assert!(ok, "{}", s.muster(&["hq", "orders"], None).ok());
    let out = s
        .muster(&["hq", "orders", "--state", "rejected", "--json"], None)
        .ok();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 1, "{v:#}");
    assert!(support::wait_until(Duration::from_secs(20), || s
        .muster(&["hq", "log"], None)
        .ok()
        .contains("orders: deployer/orders line 2 rejected")));
    let out = s.muster(&["hq", "log", "--limit", "50"], None).ok();
    assert!(out.contains("ann") && out.contains("two orders"), "{out}");
    // An edit stops the file; resolve takes it up again.
    std::fs::write(hq.join("deployer/orders"), "noop # again\nnope\nnoop\n").unwrap();
    support::git(&hq, &["commit", "-q", "-am", "an edit"]);
    assert!(support::wait_until(Duration::from_secs(20), || s
        .muster(&["hq", "orders"], None)
        .stderr()
        .contains("is STOPPED")));
    assert!(s
        .muster(&["hq", "status"], None)
        .ok()
        .contains("problem  deployer/orders is stopped"));
    s.muster(&["hq", "orders", "resolve", "deployer/orders"], None)
        .ok();
    assert!(support::wait_until(Duration::from_secs(20), || s
        .muster(&["hq", "orders"], None)
        .ok()
        .contains("deployer/orders:3     succeeded")));
    s.muster(&["hq", "orders", "bogus"], None)
        .fails_with("usage: muster hq orders");
}

/// `muster procs`: the one-liner of the issue starts python3's http.server on a free port,
/// healthy; ls/show/logs show it; stop, start, restart and rm act on it.
#[test]
fn procs_run_ls_show_logs_stop_start_restart_rm() {
    let s = Server::start("procs");
    s.setup_and_login();
    let id = s
        .muster(
            &[
                "procs",
                "run",
                "--port",
                "http",
                "--health-http",
                "/",
                "--",
                "python3",
                "-m",
                "http.server",
                "$PORT",
                "--bind",
                "127.0.0.1",
            ],
            None,
        )
        .ok()
        .trim()
        .to_string();
    let show = |id: &str| -> Value {
        serde_json::from_str(&s.muster(&["procs", "show", id, "--json"], None).ok()).unwrap()
    };
    let mut p = Value::Null;
    assert!(
        wait_until(Duration::from_secs(30), || {
            p = show(&id);
            p["state"] == "healthy"
        }),
        "never healthy: {p:#}"
    );
    let port = p["ports"]["http"].as_u64().unwrap();
    let body = ureq::get(&format!("http://127.0.0.1:{port}/"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(body.contains("Directory listing"), "{body}");
    let ls = s.muster(&["procs", "ls"], None).ok();
    assert!(
        ls.contains(&id) && ls.contains("healthy") && ls.contains(&format!("http={port}")),
        "{ls}"
    );
    let shown = s.muster(&["procs", "show", &id], None).ok();
    assert!(shown.contains("healthy (health check passed)"), "{shown}");
    let log = s.muster(&["procs", "logs", &id], None).ok();
    assert!(log.contains("sys healthy: health check passed"), "{log}");
    // logs -f ends when the process stops.
    let mut follow = Command::new(BIN)
        .args(["procs", "logs", "-f", &id])
        .env("MUSTER_CONFIG_DIR", &s.config)
        .env("MUSTER_URL", &s.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(s
        .muster(&["procs", "stop", &id], None)
        .ok()
        .contains("stopping"));
    let status = wait_exit(&mut follow);
    assert!(status.success());
    let mut followed = String::new();
    follow
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut followed)
        .unwrap();
    assert!(followed.contains("stop asked"), "{followed}");
    assert!(wait_until(Duration::from_secs(10), || show(&id)["state"] == "stopped"));
    s.muster(&["procs", "start", &id], None).ok();
    assert!(wait_until(Duration::from_secs(30), || show(&id)["state"] == "healthy"));
    s.muster(&["procs", "restart", &id], None).ok();
    s.muster(&["procs", "rm", &id], None).ok();
    s.muster(&["procs", "show", &id], None)
        .fails_with("not found");
    s.muster(
        &["procs", "run", "--port", "a", "--port", "a", "--", "true"],
        None,
    )
    .fails_with("twice");
}

#[test]
fn models_deploy_ls_show_predict_revert_logs_rm() {
    let env = model_support::sklearn_env();
    let cache = model_support::cache();
    let (envs, wheels) = (cache.join("envs"), cache.join("wheels"));
    let s = Server::start_env(
        "models",
        &[
            ("MUSTER_MODELS__ENVS_DIR", envs.to_str().unwrap()),
            ("MUSTER_MODELS__WHEELS_DIR", wheels.to_str().unwrap()),
            ("MUSTER_MODELS__PREDICTOR_HOST", "127.0.0.1"),
        ],
    );
    s.setup_and_login();
    let dir = TempDir::new("models-bundle");
    model_support::iris_bundle(&dir.0, &env);
    let bundle = dir.0.to_str().unwrap();
    // Not a terminal: no progress bar, only the outcome.
    let out = s.muster(&["models", "deploy", bundle], None).ok();
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    assert!(out.starts_with("admin/Iris v1 is live (tree "), "{out}");
    // --json prints the model as the server shows it.
    let out = s.muster(&["models", "deploy", bundle, "--json"], None).ok();
    let m: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["live"], 2, "{m:#}");
    let ls = s.muster(&["models", "ls"], None).ok();
    assert!(ls.contains("admin/Iris") && ls.contains("v2"), "{ls}");
    let show = s.muster(&["models", "show", "Iris"], None).ok();
    assert!(
        show.contains("live v2") && show.contains("stopped") && show.contains("healthy"),
        "{show}"
    );
    let out = s
        .muster(
            &[
                "models",
                "predict",
                "Iris",
                "--data",
                "[[6.7, 3.0, 5.2, 2.3]]",
            ],
            None,
        )
        .ok();
    assert_eq!(out.trim(), "[2]");
    let data = write(&dir.0, "rows.json", "[[5.1, 3.5, 1.4, 0.2]]");
    let out = s
        .muster(
            &[
                "models",
                "predict",
                "admin/Iris",
                "--data",
                &format!("@{data}"),
            ],
            None,
        )
        .ok();
    assert_eq!(out.trim(), "[0]");
    s.muster(&["models", "predict", "Iris", "--data", "{not json"], None)
        .fails_with("--data is not JSON");
    let out = s.muster(&["models", "revert", "Iris", "1"], None).ok();
    assert!(out.starts_with("admin/Iris v1 is live again"), "{out}");
    s.muster(&["models", "revert", "Iris", "1"], None)
        .fails_with("live already");
    let logs = s.muster(&["models", "logs", "Iris"], None).ok();
    assert!(
        logs.contains("predictor ready") || logs.contains("listening"),
        "{logs}"
    );
    let out = s.muster(&["models", "rm", "Iris"], None).ok();
    assert!(out.contains("deleted"), "{out}");
    s.muster(&["models", "show", "Iris"], None)
        .fails_with("not found");
    s.muster(&["models", "deploy", "/nonexistent/bundle"], None)
        .fails_with("cannot be read");
}

#[test]
fn services_plan_apply_ls_show_action_reset() {
    let s = Server::start("cli-services");
    s.setup_and_login();
    let hq = s.data.join("hq");
    assert!(wait_until(Duration::from_secs(20), || hq
        .join(".git")
        .is_dir()));
    let marks = s.dir.0.join("marks");
    let action = format!(
        "#!/bin/sh\ncat > /dev/null\necho \"$MUSTER_ACTION $MUSTER_SERVICE\" >> '{}'\n\
         [ \"$MUSTER_ACTION\" = check ] && echo '{{\"status\": \"maintenance\", \"message\": \"looked\"}}'\nexit 0\n",
        marks.display()
    );
    for (dir, toml) in [
        (
            "demo__db__main",
            "[provides.db]\ninterface = \"db\"\ndata = { port = 1 }\n",
        ),
        ("demo__app__web", "[consumes.db]\ninterface = \"db\"\n"),
    ] {
        let d = hq.join("services").join(dir);
        std::fs::create_dir_all(d.join("actions")).unwrap();
        let parts: Vec<&str> = dir.split("__").collect();
        std::fs::write(
            d.join("service.toml"),
            format!(
                "domain = \"{}\"\nname = \"{}\"\ninstance = \"{}\"\n{toml}",
                parts[0], parts[1], parts[2]
            ),
        )
        .unwrap();
        for verb in ["install", "reset", "check"] {
            use std::os::unix::fs::PermissionsExt;
            let f = d.join("actions").join(verb);
            std::fs::write(&f, &action).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    std::fs::create_dir_all(hq.join("interfaces")).unwrap();
    std::fs::write(
        hq.join("interfaces/db.toml"),
        "[keys]\nport = \"integer\"\n",
    )
    .unwrap();
    support::git(&hq, &["add", "-A", "services", "interfaces"]);
    support::git(&hq, &["commit", "-q", "-m", "two services"]);

    let out = s.muster(&["services", "plan"], None).ok();
    assert!(out.contains("2 step(s)"), "{out}");
    assert!(
        out.contains("install") && out.contains("demo__db__main") && out.contains("new in HQ"),
        "{out}"
    );
    let id = s.muster(&["services", "plan", "--json"], None).ok();
    let id = serde_json::from_str::<Value>(&id).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = s.muster(&["services", "apply", &id], None).ok();
    assert!(out.contains("install demo__app__web"), "{out}");
    let ls = s.muster(&["services", "ls"], None).ok();
    assert!(
        ls.contains("demo__app__web") && ls.contains("demo__db__main") && ls.contains("active"),
        "{ls}"
    );
    let show = s.muster(&["services", "show", "demo__db__main"], None).ok();
    let show: Value = serde_json::from_str(&show).unwrap();
    assert_eq!(show["installed"], true);
    assert!(s
        .muster(&["services", "apply"], None)
        .ok()
        .contains("nothing to do"));
    s.muster(&["services", "action", "demo__app__web", "check"], None)
        .ok();
    assert!(wait_until(Duration::from_secs(20), || {
        s.muster(&["services", "status"], None)
            .ok()
            .contains("looked")
    }));
    // Refused while the app depends on it; with --cascade the app goes first.
    s.muster(&["services", "reset", "demo__db__main"], None)
        .fails_with("demo__app__web");
    s.muster(&["services", "reset", "demo__db__main", "--cascade"], None)
        .ok();
    assert!(wait_until(Duration::from_secs(20), || {
        items(&s.muster(&["services", "ls", "--json"], None).ok()).is_empty()
    }));
    let m = std::fs::read_to_string(&marks).unwrap();
    let l: Vec<&str> = m.lines().collect();
    assert_eq!(
        l,
        [
            "install demo__db__main",
            "install demo__app__web",
            "check demo__app__web",
            "reset demo__app__web",
            "reset demo__db__main"
        ]
    );
}

#[test]
fn services_secret_set_ls_rm() {
    let s = Server::start("cli-secrets");
    s.setup_and_login();
    let out = s
        .muster(
            &["services", "secret", "set", "demo__db__main", "pw"],
            Some("hunter2-cli\n"),
        )
        .ok();
    assert!(out.contains("secret pw of demo__db__main set"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    let ls = s
        .muster(&["services", "secret", "ls", "demo__db__main"], None)
        .ok();
    assert!(ls.starts_with("pw\t"), "{ls}");
    assert!(!ls.contains("hunter2"), "{ls}");
    s.muster(&["services", "secret", "rm", "demo__db__main", "pw"], None)
        .ok();
    s.muster(&["services", "secret", "rm", "demo__db__main", "pw"], None)
        .fails_with("not found");
    let ls = s
        .muster(&["services", "secret", "ls", "demo__db__main"], None)
        .ok();
    assert!(ls.trim().is_empty(), "{ls}");
}
