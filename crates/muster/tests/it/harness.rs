//! The test harness: a server in this process on 127.0.0.1:0 with a SQLite store in a fresh temp
//! dir, an embedded agent that starts real supervisors, and a blocking HTTP client.

use muster_server::config::Config;
use muster_server::{auth, App};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use crate::support::{http, kill_supervisors, wait_until, Redis, TempDir};

/// A running server with its embedded agent and an admin token.
pub struct Server {
    pub url: String,
    pub token: String,
    pub app: Arc<App>,
    stop: tokio::sync::watch::Sender<bool>,
    rt: Option<tokio::runtime::Runtime>,
    pub dir: TempDir,
    /// The test's own redis-server when the tests run on Redis (`MUSTER_TEST_STORE=redis`).
    _redis: Option<Redis>,
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(|_| {})
    }

    pub fn start_with(tweak: impl FnOnce(&mut Config)) -> Server {
        Self::start_opts(tweak, true)
    }

    /// A server without an embedded agent (cluster mode: agents are remote).
    pub fn start_bare(tweak: impl FnOnce(&mut Config)) -> Server {
        Self::start_opts(tweak, false)
    }

    fn start_opts(tweak: impl FnOnce(&mut Config), embedded_agent: bool) -> Server {
        let dir = TempDir::new("srv");
        let mut config = Config {
            data_dir: dir.0.clone(),
            ..Config::default()
        };
        config.server.listen = "127.0.0.1:0".into();
        config.jobs.kill_grace = Duration::from_secs(2);
        config.jobs.backoff_base = Duration::from_millis(50);
        config.jobs.backoff_max = Duration::from_millis(200);
        config.agent.slots = 8;
        config.agent.labels.insert("workspaces".into(), "*".into());
        tweak(&mut config);
        // Engine-independent tests run on the engine MUSTER_TEST_STORE names (SQLite unless
        // told); a test that chose its store keeps it.
        let redis =
            (config.store.url.is_empty() && crate::support::test_store() == "redis").then(|| {
                let r = Redis::start();
                config.store.url = r.url();
                if config.hq.remote.is_empty() {
                    config.hq.remote = r.hq_remote();
                }
                r
            });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        // The same start as `muster up` (with its embedded agent) or `muster server`.
        let embedded = embedded_agent.then(|| muster_server::server::Embedded {
            name: "node-1".into(),
            exe: PathBuf::from(env!("CARGO_BIN_EXE_muster")),
        });
        let (url, app) = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut rx = stop_rx.clone();
            let server = muster_server::Server::start(
                config,
                listener,
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
                embedded,
            )
            .await
            .unwrap();
            (server.url.clone(), server.app.clone())
        });
        let code = "test-setup-code";
        let first = app.store.users().unwrap().is_empty();
        let mut s = Server {
            url,
            token: String::new(),
            app,
            stop,
            rt: Some(rt),
            dir,
            _redis: redis,
        };
        if !first {
            // Another server of a cluster made the admin already: log in.
            let (st, body) = s.call_as(
                None,
                "POST",
                "/api/v1/login",
                Some(json!({"username": "admin", "password": "correct horse battery"}).to_string()),
                &[],
            );
            assert_eq!(st, 200, "{body}");
            s.token = body["token"].as_str().unwrap().to_string();
            return s;
        }
        s.app
            .store
            .set_meta("setup_code_hash", Some(&auth::sha256_hex(code)))
            .unwrap();
        let (st, body) = s.call("POST", "/api/v1/setup", Some(json!({"setup_code": code, "username": "admin", "password": "correct horse battery"})));
        assert_eq!(st, 201, "{body}");
        s.token = body["token"].as_str().unwrap().to_string();
        if embedded_agent {
            // Tests start from a ready cluster: the embedded node has registered.
            let ok = wait_until(Duration::from_secs(10), || {
                let (_, nodes) = s.call("GET", "/api/v1/nodes", None);
                nodes["items"].as_array().is_some_and(|n| {
                    n.iter()
                        .any(|n| n["name"] == "node-1" && n["state"] == "ready")
                })
            });
            assert!(ok, "the embedded node never became ready");
        }
        s
    }

    /// A call with the admin token; returns the status and the JSON body (Null if not JSON).
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(
            Some(&self.token),
            method,
            path,
            body.map(|b| b.to_string()),
            &[],
        )
    }

    pub fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<String>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let (st, text) = self.raw(token, method, path, body, headers);
        (st, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn raw(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<String>,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let url = format!("{}{}", self.url, path);
        let agent = http();
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some()
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut resp = match body {
            Some(b) => agent.run(req.body(b).unwrap()),
            None => agent.run(req.body(()).unwrap()),
        }
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let st = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_string()
            .unwrap_or_default();
        (st, text)
    }

    /// Creates a tree; returns its id and the body.
    pub fn create(&self, tree: Value) -> (String, Value) {
        let (st, body) = self.call("POST", "/api/v1/jobs", Some(tree));
        assert_eq!(st, 201, "{body}");
        (body["id"].as_str().unwrap().to_string(), body)
    }

    pub fn job(&self, id: &str) -> Value {
        let (st, body) = self.call("GET", &format!("/api/v1/jobs/{id}"), None);
        assert_eq!(st, 200, "{body}");
        body
    }

    pub fn tree(&self, id: &str) -> Value {
        let (st, body) = self.call("GET", &format!("/api/v1/jobs/{id}/tree"), None);
        assert_eq!(st, 200, "{body}");
        body
    }

    /// Waits until the tree is no longer running; returns the nested tree.
    pub fn wait_tree(&self, id: &str, within: Duration) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(within, || {
            last = self.tree(id);
            last["tree_state"] != "running"
        });
        assert!(ok, "tree {id} still running after {within:?}: {last:#}");
        last
    }

    pub fn log(&self, id: &str) -> String {
        let (st, text) = self.raw(
            Some(&self.token),
            "GET",
            &format!("/api/v1/jobs/{id}/log"),
            None,
            &[],
        );
        assert_eq!(st, 200, "{text}");
        text
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.app.stop();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// The children of a nested tree by name.
pub fn child<'a>(tree: &'a Value, name: &str) -> &'a Value {
    tree["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no child {name} in {tree:#}"))
}
