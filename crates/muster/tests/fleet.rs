//! Multi-host tests (SPEC §5, §14) with the real binaries, real UDP beacons and real agent
//! processes.
//!
//! - Over loopback: a `muster server` with discovery on its own free port beaconing to
//!   `127.255.255.255`, a `muster agent` given only a join token that finds it by its signed
//!   beacon, and forged, unsigned, replayed, stale and garbage beacons that the server ignores and
//!   counts.
//! - [`a_fleet_of_three_agents_across_hosts`]: one scenario over a [`Topology`]: a server and three
//!   agents on four hosts. The hosts are network namespaces the test makes (a bridge in a "switch"
//!   namespace of its own, hosts `10.200.0.1-4/24`, broadcast `10.200.0.255`); where namespaces
//!   cannot be made (not root, no `ip`), the same scenario runs on loopback (the server on
//!   `127.0.0.2`, broadcast `127.255.255.255`), saying so, unless `CI=true`: CI must run the
//!   namespace version, so there the test fails instead. `MUSTER_TEST_NO_NETNS=1` forces the
//!   loopback version (refused under `CI=true`).
//!
//! - [`the_example_services_run_across_three_agents`]: `examples/services` over the same
//!   topology, its store, app and backup each on an agent of its own (consuming that `node`).
//!
//! Broadcasts go only to `127.255.255.255` or inside the test's own namespaces, always to a free
//! port, never to a standard one. Every process the tests start, every job they leave running and
//! every namespace they make is ended on drop, even after a panic.

mod support;

use muster_wire::beacon::{self as d, NodeBeacon, ServerBeacon, SigningKey};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use support::{wait_until, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_muster");
const PASSWORD: &str = "correct horse battery staple";

/// A fresh temp dir, removed on drop after ending the jobs of any agent data dir in it (jobs
/// outlive their agents by design).
fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

fn call(url: &str, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let a = http();
    let u = format!("{url}{path}");
    let auth = format!("Bearer {token}");
    let resp = match (method, body) {
        ("GET", _) => a.get(&u).header("authorization", &auth).call(),
        ("DELETE", _) => a.delete(&u).header("authorization", &auth).call(),
        (_, b) => a
            .post(&u)
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .send(b.unwrap_or(json!({})).to_string()),
    };
    let mut resp = resp.unwrap_or_else(|e| panic!("{method} {u}: {e}"));
    let st = resp.status().as_u16();
    (
        st,
        resp.body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_string()
            .unwrap_or_default(),
    )
}

fn call_json(
    url: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let (st, t) = call(url, token, method, path, body);
    (st, serde_json::from_str(&t).unwrap_or(Value::Null))
}

/// A free UDP port (of the namespace this thread is in).
fn free_udp_port() -> u16 {
    UdpSocket::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The discovery interval the tests run with: agents heartbeat at it, and a connected node
/// silent for 3 × it is `down`.
const INTERVAL: Duration = Duration::from_millis(200);
/// `nodes.lost_after`: a node unheard of for this long is `lost`.
const LOST_AFTER: Duration = Duration::from_secs(3);

/// Where discovery runs: its port, broadcast address and, optionally, a network namespace.
#[derive(Clone)]
struct Net {
    port: u16,
    broadcast: String,
    netns: Option<String>,
    /// `muster agent --listen` for an agent on this host: where it serves its job logs (`None`:
    /// the default, any free port on the address it reaches the server from).
    agent_listen: Option<String>,
}

impl Net {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        c.args(args)
            .env_remove("MUSTER_URL")
            .env_remove("MUSTER_TOKEN")
            .env_remove("MUSTER_JOIN_TOKEN")
            .env_remove("MUSTER_DATA_DIR")
            .env("MUSTER_DISCOVERY__ENABLED", "true")
            .env("MUSTER_DISCOVERY__PORT", self.port.to_string())
            .env("MUSTER_DISCOVERY__BROADCAST", &self.broadcast)
            .env(
                "MUSTER_DISCOVERY__INTERVAL",
                format!("{}ms", INTERVAL.as_millis()),
            )
            .env(
                "MUSTER_NODES__LOST_AFTER",
                format!("{}ms", LOST_AFTER.as_millis()),
            )
            .env("MUSTER_JOBS__KILL_GRACE", "2s")
            .stdin(Stdio::null());
        c
    }
}

/// A child process ended on drop (SIGTERM, then SIGKILL after 3 s); its stdout lines arrive on
/// `lines`.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(mut c: Command, stderr: &Path) -> Proc {
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(stderr).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                let _ = tx.send(l);
            }
        });
        Proc { child, lines }
    }

    /// The first stdout line containing `what`, within `within`.
    fn line(&mut self, what: &str, within: Duration, log: &Path) -> String {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "no line with {what:?}; stderr:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                ),
            }
        }
    }

    /// SIGKILL, and reaped.
    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Never signal a pid that was reaped already (it may be someone else's by now).
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `muster server` with discovery on, set up with an admin token.
struct Server {
    url: String,
    token: String,
    data: PathBuf,
    _dir: TempDir,
    /// How HTTP calls reach it (inside its namespace, if any).
    netns: Option<String>,
    // Dropped before `dir`.
    proc: Option<Proc>,
}

impl Server {
    fn start(net: &Net, listen: &str) -> Server {
        let dir = TempDir::new("srv");
        let data = dir.0.join("data");
        let log = dir.0.join("server.stderr");
        let mut c = net.command(&["server", "--listen", listen, "--data-dir"]);
        c.arg(&data);
        let mut p = Proc::spawn(c, &log);
        let line = p.line("muster is up at ", Duration::from_secs(20), &log);
        let url = line
            .split("muster is up at ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .trim_end_matches('/')
            .to_string();
        let mut s = Server {
            url,
            token: String::new(),
            data,
            _dir: dir,
            netns: net.netns.clone(),
            proc: Some(p),
        };
        let code = std::fs::read_to_string(s.data.join("setup-code")).unwrap();
        let (st, body) = s.call(
            "POST",
            "/api/v1/setup",
            Some(json!({"setup_code": code.trim(), "username": "admin", "password": PASSWORD})),
        );
        assert_eq!(st, 201, "{body}");
        s.token = body["token"].as_str().unwrap().to_string();
        s
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (url, token) = (self.url.clone(), self.token.clone());
        let (m, p) = (method.to_string(), path.to_string());
        in_netns(self.netns.as_deref(), move || {
            call_json(&url, &token, &m, &p, body)
        })
    }

    fn text(&self, path: &str) -> String {
        let (url, token, path) = (self.url.clone(), self.token.clone(), path.to_string());
        let (st, t) = in_netns(self.netns.as_deref(), move || {
            call(&url, &token, "GET", &path, None)
        });
        assert_eq!(st, 200, "{t}");
        t
    }

    fn metrics(&self) -> String {
        self.text("/metrics")
    }

    /// `muster_discovery_beacons_total{result=...}`.
    fn beacons(&self, result: &str) -> u64 {
        beacon_count(&self.metrics(), result)
    }

    /// `muster_remote_log_streams_total{via="endpoint"}` and `{via="connection"}`: remote logs
    /// streamed straight from the node's own endpoint, and relayed over the agent's connection.
    fn log_streams(&self) -> (u64, u64) {
        let m = self.metrics();
        let count = |via: &str| {
            let want = format!("muster_remote_log_streams_total{{via=\"{via}\"}} ");
            m.lines()
                .find_map(|l| l.strip_prefix(&want).map(|n| n.trim().parse().unwrap()))
                .unwrap_or_else(|| panic!("no {want:?} in the metrics:\n{m}"))
        };
        (count("endpoint"), count("connection"))
    }

    fn join_token(&self) -> String {
        let (st, t) = self.call("POST", "/api/v1/nodes/join-token", Some(json!({"uses": 1})));
        assert_eq!(st, 201, "{t}");
        t["token"].as_str().unwrap().to_string()
    }

    fn node(&self, name: &str) -> Value {
        let (st, n) = self.call("GET", &format!("/api/v1/nodes/{name}"), None);
        assert_eq!(st, 200, "{n}");
        n
    }

    /// Waits until node `name` is in `state`; how long that took.
    fn wait_node(&self, name: &str, state: &str, within: Duration) -> Duration {
        let t0 = Instant::now();
        let mut last = Value::Null;
        let ok = wait_until(within, || {
            last = self.call("GET", &format!("/api/v1/nodes/{name}"), None).1;
            last["state"] == state
        });
        assert!(
            ok,
            "node {name} never became {state} within {within:?}: {last}"
        );
        t0.elapsed()
    }

    fn wait_ready(&self, name: &str, within: Duration) {
        self.wait_node(name, "ready", within);
    }

    fn cluster_key(&self) -> [u8; 32] {
        d::read_key(&self.data.join("cluster-key"))
            .unwrap()
            .unwrap()
    }

    /// Creates a tree; its id and the creation answer.
    fn create(&self, tree: Value) -> (String, Value) {
        let (st, body) = self.call("POST", "/api/v1/jobs", Some(tree));
        assert_eq!(st, 201, "{body}");
        (body["id"].as_str().unwrap().to_string(), body)
    }

    fn job(&self, id: &str) -> Value {
        let (st, j) = self.call("GET", &format!("/api/v1/jobs/{id}"), None);
        assert_eq!(st, 200, "{j}");
        j
    }

    /// Waits until the tree is no longer running; the nested tree.
    fn wait_tree(&self, id: &str, within: Duration) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(within, || {
            last = self.call("GET", &format!("/api/v1/jobs/{id}/tree"), None).1;
            last["tree_state"].is_string() && last["tree_state"] != "running"
        });
        assert!(ok, "tree {id} still running after {within:?}: {last:#}");
        last
    }

    fn log(&self, job: &str) -> String {
        self.text(&format!("/api/v1/jobs/{job}/log"))
    }

    /// Follows a job's log (`?follow=true`) from the server's host: its lines as they arrive;
    /// the channel closes when the log ends.
    fn follow_log(&self, job: &str) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel();
        let url = format!("{}/api/v1/jobs/{job}/log?follow=true", self.url);
        let auth = format!("Bearer {}", self.token);
        spawn_in_netns(self.netns.as_deref(), move || {
            let a: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(60)))
                .build()
                .into();
            let resp = match a.get(&url).header("authorization", &auth).call() {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(format!("ERROR {e}"));
                    return;
                }
            };
            if resp.status() != 200 {
                let _ = tx.send(format!("ERROR status {}", resp.status()));
                return;
            }
            for l in BufReader::new(resp.into_body().into_reader()).lines() {
                match l {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(format!("ERROR {e}"));
                        return;
                    }
                }
            }
        });
        rx
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.proc.take();
    }
}

fn beacon_count(metrics: &str, result: &str) -> u64 {
    let want = format!("muster_discovery_beacons_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&want).map(|n| n.trim().parse().unwrap()))
        .unwrap_or(0)
}

/// An agent with its data dir under `dir`, started with only a join token (no `--server`), or
/// with nothing at all (a restart).
fn start_agent(net: &Net, name: &str, token: Option<&str>, labels: &[&str], dir: &TempDir) -> Proc {
    let log = dir.0.join(format!("{name}.stderr"));
    let mut c = net.command(&["agent", "--name", name, "--data-dir"]);
    c.arg(dir.0.join(name));
    if let Some(t) = token {
        c.args(["--join-token", t]);
    }
    for l in labels {
        c.args(["--label", l]);
    }
    if let Some(l) = &net.agent_listen {
        c.args(["--listen", l]);
    }
    let mut p = Proc::spawn(c, &log);
    p.line("is running", Duration::from_secs(20), &log);
    p
}

/// Runs `f` on a thread inside network namespace `ns` (or on a plain thread, for `None`).
fn spawn_in_netns<T: Send + 'static>(
    ns: Option<&str>,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = ns.map(|ns| format!("/var/run/netns/{ns}"));
    std::thread::spawn(move || {
        if let Some(path) = path {
            let fd = std::fs::File::open(&path).unwrap();
            use std::os::fd::AsRawFd;
            assert_eq!(
                unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns {path}"
            );
        }
        f()
    })
}

/// Runs `f` inside network namespace `ns` (or here, for `None`).
fn in_netns<T: Send + 'static>(ns: Option<&str>, f: impl FnOnce() -> T + Send + 'static) -> T {
    match ns {
        None => f(),
        Some(_) => spawn_in_netns(ns, f).join().unwrap(),
    }
}

/// The IPv4 TCP addresses process `pid` listens on (read in its own network namespace).
fn listening(pid: u32) -> Vec<SocketAddr> {
    let mut inodes = std::collections::HashSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(l) = std::fs::read_link(e.path()) {
            let l = l.to_string_lossy();
            if let Some(i) = l.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.insert(i.to_string());
            }
        }
    }
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    tcp.lines()
        .skip(1)
        .filter_map(|l| {
            // sl local_address rem_address st ... inode; 0A: LISTEN.
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                return None;
            }
            let (ip, port) = f[1].split_once(':')?;
            let ip = std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes());
            Some(SocketAddr::from((ip, u16::from_str_radix(port, 16).ok()?)))
        })
        .collect()
}

/// An agent made silent while its connection to the server stays open: in a namespace its
/// host's link is cut (nothing goes in or out; the TCP connection just stalls), on loopback its
/// process is stopped (SIGSTOP: the kernel keeps the connection up, the agent sends nothing).
/// Ended by [`Silence::end`], or on drop (declared after the agent's [`Proc`], so before it
/// goes).
struct Silence(Option<Hush>);

enum Hush {
    Link(String),
    Stopped(i32),
}

impl Silence {
    fn start(host: &Host, agent: &Proc) -> Silence {
        Silence(Some(match &host.net.netns {
            Some(ns) => {
                Netns::ip(&["-n", ns, "link", "set", "eth0", "down"]).unwrap();
                Hush::Link(ns.clone())
            }
            None => {
                let pid = agent.child.id() as i32;
                assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
                Hush::Stopped(pid)
            }
        }))
    }

    fn end(&mut self) -> Result<(), String> {
        match self.0.take() {
            Some(Hush::Link(ns)) => Netns::ip(&["-n", &ns, "link", "set", "eth0", "up"]),
            Some(Hush::Stopped(pid)) => match unsafe { libc::kill(pid, libc::SIGCONT) } {
                0 => Ok(()),
                _ => Err(format!("SIGCONT: {}", std::io::Error::last_os_error())),
            },
            None => Ok(()),
        }
    }
}

impl Drop for Silence {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

fn node_beacon(id: &str, seq: u64, ts: i64) -> NodeBeacon {
    NodeBeacon {
        node_id: id.into(),
        name: "intruder".into(),
        api: "http://127.0.0.1:1".into(),
        version: "0".into(),
        labels: Default::default(),
        ts,
        seq,
    }
}

/// Sends server beacons signed by a key nobody trusts, pointing at `decoy`, every 20 ms from
/// `from` (an address to bind, in namespace `ns`) until `stop`.
fn forge_server_beacons(
    ns: Option<&str>,
    from: &str,
    dest: SocketAddr,
    decoy: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let from = format!("{from}:0");
    spawn_in_netns(ns, move || {
        let forged_key = SigningKey::from_bytes(&[9; 32]);
        let sock = UdpSocket::bind(&from).unwrap();
        sock.set_broadcast(true).unwrap();
        let mut seq = d::first_seq();
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let b = ServerBeacon {
                url: decoy.clone(),
                version: "0".into(),
                ts: d::now_ms(),
                seq,
            };
            let _ = sock.send_to(&d::seal_server(&b, &forged_key), dest);
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

#[test]
fn an_agent_with_only_a_join_token_finds_the_server_by_its_beacon() {
    let net = Net {
        port: free_udp_port(),
        broadcast: "127.255.255.255".into(),
        netns: None,
        agent_listen: None,
    };
    let s = Server::start(&net, "127.0.0.1:0");
    let token = s.join_token();
    // The token carries the server's public key; the server keeps its key with mode 0600.
    let public = token.split('.').nth(1).expect("mjt_<secret>.<key>...");
    let key = SigningKey::from_bytes(&d::read_key(&s.data.join("server-key")).unwrap().unwrap());
    assert_eq!(
        public,
        muster_wire::util::hex(&key.verifying_key().to_bytes())
    );
    use std::os::unix::fs::PermissionsExt;
    for f in ["server-key", "cluster-key"] {
        let mode = std::fs::metadata(s.data.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }

    // A decoy "server" the forged beacons point at: nobody may ever connect to it.
    let decoy = TcpListener::bind("127.0.0.1:0").unwrap();
    decoy.set_nonblocking(true).unwrap();
    let decoy_url = format!("http://{}", decoy.local_addr().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let dest: SocketAddr = format!("127.255.255.255:{}", net.port).parse().unwrap();
    let forger = forge_server_beacons(None, "0.0.0.0", dest, decoy_url, stop.clone());

    let dir = TempDir::new("agents");
    let t0 = Instant::now();
    let agent = start_agent(&net, "disc-1", Some(&token), &[], &dir);
    s.wait_ready("disc-1", Duration::from_secs(10));
    eprintln!("agent found, joined and ready in {:?}", t0.elapsed());
    stop.store(true, Ordering::Relaxed);
    forger.join().unwrap();
    assert!(decoy.accept().is_err(), "a forged beacon steered the agent");

    let agent_dir = dir.0.join("disc-1").join("agent");
    let saved = std::fs::read_to_string(agent_dir.join("servers")).unwrap();
    assert_eq!(saved.trim(), s.url);
    assert_eq!(
        d::read_key(&agent_dir.join("cluster-key")).unwrap(),
        Some(s.cluster_key())
    );
    let mode = std::fs::metadata(agent_dir.join("cluster-key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The agent's own beacons reach the server's listener and count as good.
    assert!(
        wait_until(Duration::from_secs(5), || s.beacons("ok") >= 2),
        "{}",
        s.metrics()
    );
    assert_eq!(s.beacons("bad_signature"), 0);
    // The forged server beacons were never counted as node beacons.
    assert_eq!(s.beacons("malformed"), 0);
    // The node's last beacon shows as a hint.
    let n = s.node("disc-1");
    assert!(n["beacon_at"].is_string(), "{n}");

    // Restarted with neither a token nor a server, it goes back to the server it joined.
    drop(agent);
    let node_id = n["id"].as_str().unwrap().to_string();
    let before = s.beacons("ok");
    let _agent = start_agent(&net, "disc-1", None, &[], &dir);
    s.wait_ready("disc-1", Duration::from_secs(10));
    // Its fresh beacons are not taken for replays (sequence numbers start at the clock).
    assert!(wait_until(Duration::from_secs(5), || s.beacons("ok") >= before + 2));
    assert_eq!(s.beacons("replayed"), 0, "{}", s.metrics());
    assert_eq!(s.node("disc-1")["id"], node_id.as_str());
}

#[test]
fn forged_unsigned_replayed_stale_and_garbage_beacons_are_ignored_and_counted() {
    let net = Net {
        port: free_udp_port(),
        broadcast: "127.255.255.255".into(),
        netns: None,
        agent_listen: None,
    };
    let s = Server::start(&net, "127.0.0.1:0");
    let key = s.cluster_key();
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_broadcast(true).unwrap();
    let dest: SocketAddr = format!("127.255.255.255:{}", net.port).parse().unwrap();
    let now = d::now_ms();
    let id = "0190aaaa-0000-7000-8000-000000000001";
    let good = d::seal_node(&node_beacon(id, 10, now), &key);
    let mut garbage: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"hello".to_vec(),
        b"{\"muster\":\"beacon/1\",\"kind\":\"node\"}".to_vec(),
        vec![0xff; 3000],
        br#"{"muster":"beacon/1","kind":"ufo","payload":"{]","sig":"00"}"#.to_vec(),
    ];
    for i in 0..20u8 {
        let mut g = good.clone();
        g.truncate(good.len() / 2 + i as usize);
        garbage.push(g);
    }
    let sends: Vec<Vec<u8>> = [
        vec![good.clone(), good.clone()],
        vec![d::seal_node(&node_beacon(id, 9, now), &key)], // replayed (older seq)
        vec![d::unsigned_node(&node_beacon(id, 11, now))],
        vec![d::seal_node(&node_beacon(id, 12, now), &[1; 32])], // forged
        vec![d::seal_node(&node_beacon(id, 13, now - 31_000), &key)], // stale
        vec![d::seal_node(&node_beacon(id, 14, now + 31_000), &key)], // from the future
        garbage.clone(),
    ]
    .concat();
    for m in &sends {
        sock.send_to(m, dest).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let want = [
        ("ok", 1),
        ("replayed", 2),
        ("unsigned", 1),
        ("bad_signature", 1),
        ("stale", 2),
        ("malformed", garbage.len() as u64),
    ];
    let ok = wait_until(Duration::from_secs(5), || {
        want.iter().all(|(k, n)| s.beacons(k) == *n)
    });
    assert!(ok, "{}", s.metrics());
    // Still serving.
    let (st, _) = s.call("GET", "/api/v1/nodes", None);
    assert_eq!(st, 200);
    // A beacon is only a hint: no node came of it.
    let (_, nodes) = s.call("GET", "/api/v1/nodes", None);
    assert!(
        !nodes.to_string().contains("intruder"),
        "a beacon made a node: {nodes}"
    );
}

/// Network namespaces this test made: a "switch" with a bridge, and one per host, each with a
/// veth on the bridge. Deleted on drop.
struct Netns {
    names: Vec<String>,
}

impl Netns {
    fn ip(args: &[&str]) -> Result<(), String> {
        let o = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if o.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
    }

    /// Hosts `10.200.0.<i+1>/24` for each of `hosts`; `Err` if namespaces cannot be made here.
    fn make(tag: &str, hosts: &[&str]) -> Result<Netns, String> {
        let sw = format!("{tag}-sw");
        // Leftovers of an earlier run killed before it could clean up.
        for h in hosts {
            let _ = Self::ip(&["netns", "del", &format!("{tag}-{h}")]);
        }
        let _ = Self::ip(&["netns", "del", &sw]);
        let mut n = Netns { names: Vec::new() };
        Self::ip(&["netns", "add", &sw])?;
        n.names.push(sw.clone());
        Self::ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        Self::ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for (i, h) in hosts.iter().enumerate() {
            let ns = format!("{tag}-{h}");
            Self::ip(&["netns", "add", &ns])?;
            n.names.push(ns.clone());
            let port = format!("p{i}");
            Self::ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &sw,
            ])?;
            Self::ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            Self::ip(&["-n", &sw, "link", "set", &port, "up"])?;
            let addr = format!("10.200.0.{}/24", i + 1);
            Self::ip(&["-n", &ns, "addr", "add", &addr, "brd", "+", "dev", "eth0"])?;
            Self::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            Self::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }

    fn ns(&self, host: &str) -> String {
        self.names
            .iter()
            .find(|n| n.ends_with(&format!("-{host}")))
            .unwrap()
            .clone()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            let _ = Self::ip(&["netns", "del", n]);
        }
    }
}

/// One host of a [`Topology`]: how to run commands there, and the address its own sockets bind.
struct Host {
    net: Net,
    ip: String,
}

/// Four hosts, `srv` and agents `a1`..`a3`: network namespaces on a bridge, or loopback.
struct Topology {
    kind: &'static str,
    server: Host,
    agents: Vec<Host>,
    /// Where beacons go: the subnet's broadcast address and the discovery port.
    dest: SocketAddr,
    /// The server's listen address (port 0: any free port).
    listen: String,
    /// The agents' hosts' addresses as a job there sees them (namespaces only).
    agent_ips: Option<Vec<String>>,
    // Last: the namespaces go once everything in them is gone.
    _netns: Option<Netns>,
}

const AGENTS: [&str; 3] = ["a1", "a2", "a3"];

impl Topology {
    /// The server in namespace `srv` (10.200.0.1), agents in `a1`-`a3` (10.200.0.2-4).
    fn namespaces() -> Result<Topology, String> {
        // One tag per topology: the tests of this file run at once in one process, and a
        // shared tag made each delete the other's namespaces as "leftovers".
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tag = format!("mflt{}x{n}", std::process::id() % 100_000);
        let hosts = ["srv", "a1", "a2", "a3"];
        let nets = Netns::make(&tag, &hosts)?;
        let port = in_netns(Some(&nets.ns("srv")), free_udp_port);
        let broadcast = "10.200.0.255".to_string();
        let host = |i: usize| Host {
            net: Net {
                port,
                broadcast: broadcast.clone(),
                netns: Some(nets.ns(hosts[i])),
                // The server dials the address the agent's connection came from.
                agent_listen: None,
            },
            ip: format!("10.200.0.{}", i + 1),
        };
        Ok(Topology {
            kind: "network namespaces on a bridge (10.200.0.0/24)",
            server: host(0),
            agents: (1..4).map(host).collect(),
            dest: format!("{broadcast}:{port}").parse().unwrap(),
            listen: "10.200.0.1:0".into(),
            agent_ips: Some((2..5).map(|i| format!("10.200.0.{i}")).collect()),
            _netns: Some(nets),
        })
    }

    /// Everything on loopback: the server listens on 127.0.0.2; the agents serve their job logs
    /// on 127.0.0.3-5 (`--listen`), where the test's own sockets of their hosts bind too (their
    /// connections to the server come from 127.0.0.1: they have no address flag for those).
    fn loopback() -> Topology {
        let port = free_udp_port();
        let host = |i: usize| Host {
            net: Net {
                port,
                broadcast: "127.255.255.255".into(),
                netns: None,
                // Each agent's log endpoint on its host's own address.
                agent_listen: Some(format!("127.0.0.{}:0", i + 2)),
            },
            ip: format!("127.0.0.{}", i + 2),
        };
        Topology {
            kind: "loopback (127.0.0.x)",
            server: host(0),
            agents: (1..4).map(host).collect(),
            dest: format!("127.255.255.255:{port}").parse().unwrap(),
            listen: "127.0.0.2:0".into(),
            agent_ips: None,
            _netns: None,
        }
    }

    /// Namespaces if they can be made, else loopback; CI must run the namespace version.
    fn choose() -> Topology {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        let forced = std::env::var("MUSTER_TEST_NO_NETNS").is_ok_and(|v| !v.is_empty() && v != "0");
        if forced {
            assert!(
                !ci,
                "MUSTER_TEST_NO_NETNS is set, but CI=true: CI must run the multi-host tests in network namespaces"
            );
            eprintln!("MUSTER_TEST_NO_NETNS is set: running the fleet on loopback, not in network namespaces");
            return Topology::loopback();
        }
        match Topology::namespaces() {
            Ok(t) => t,
            Err(e) => {
                assert!(
                    !ci,
                    "cannot make network namespaces ({e}), and CI=true: CI must run the multi-host tests in network namespaces (as root, with iproute2's `ip`)"
                );
                eprintln!("cannot make network namespaces here ({e}): running the fleet on loopback (127.0.0.x) instead");
                Topology::loopback()
            }
        }
    }
}

/// The nested tree's child named `name`.
fn child<'a>(tree: &'a Value, name: &str) -> &'a Value {
    tree["children"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no child {name} in {tree:#}"))
}

/// Whether the attempt of `job` under the agent data dir `data` has ended (its supervisor wrote
/// `exit.json`); panics if the agent never had it.
fn attempt_ended(data: &Path, job: &str) -> bool {
    let attempt = muster_agent::attempt_dirs(&data.join("agent"))
        .into_iter()
        .find(|p| p.to_string_lossy().contains(job))
        .unwrap_or_else(|| panic!("no attempt of {job} under {}", data.display()));
    attempt.join("exit.json").exists()
        || muster_agent::done_dir(&attempt).join("exit.json").exists()
}

/// The next line of `rx` containing `what`, within `within`; panics with what came instead.
fn next_line_with(rx: &mpsc::Receiver<String>, what: &str, within: Duration) -> String {
    let end = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(what) => return l,
            Ok(l) => seen.push(l),
            Err(e) => panic!("no line with {what:?} within {within:?} ({e}); got {seen:?}"),
        }
    }
}

/// The multi-host scenario (issue 4), on network namespaces where they can be made, else on
/// loopback (see the module doc: `CI=true` demands namespaces; `MUSTER_TEST_NO_NETNS=1` forces
/// loopback). With real `muster server` / `muster agent` processes:
/// 1. agents with only a join token find the server by its beacon (while forged server beacons
///    point elsewhere) and become ready; their beacons count as good;
/// 2. jobs pinned to each node (and one by label) run there;
/// 3. a job's log on a2 is followed from the server's host, live, straight from a2's own log
///    endpoint (not relayed over its connection), then read whole;
/// 4. forged, unsigned, replayed, stale and garbage beacons from an agent's host are ignored
///    and counted;
/// 5. an agent killed with SIGKILL under a running job: its node goes down, then lost; its job
///    fails with `node lost`, its tree aborts (a running sibling is aborted, a waiting job never
///    starts); restarted, the node is ready again and the orphaned job's process is ended;
///    then (5b) a long-running process (restart `always`, no fixed node) whose agent is
///    killed: `lost`, then moved to another node, healthy and serving there; when the agent
///    is back, the server has it remove its copy;
/// 6. an agent stopped and restarted (same data dir, no token) keeps its running job, which
///    succeeds at attempt 1, run once;
/// 7. an agent falls silent with its connection open (its link cut in a namespace, its process
///    stopped on loopback): its node is down within 3 × the discovery interval (+ 1.5 s of
///    slack), gets no new job while down, and is ready again when the agent is back; its running
///    job carries on and succeeds at attempt 1;
/// 8. (namespaces only) a1 restarted with `--listen 127.0.0.1:0` offers an endpoint the server
///    cannot reach (its own loopback): a follow of a job on a1 is relayed over a1's connection,
///    live, and ends with the job; the endpoint then rests, so a second follow is relayed at
///    once, with no new dial.
#[test]
fn a_fleet_of_three_agents_across_hosts() {
    let t_all = Instant::now();
    let topo = Topology::choose();
    eprintln!("fleet topology: {}", topo.kind);
    let dir = TempDir::new("agents");
    let s = Server::start(&topo.server.net, &topo.listen);
    let server_ip = &topo.server.ip;
    assert!(
        s.url.starts_with(&format!("http://{server_ip}:")),
        "{}",
        s.url
    );
    let mut step = Instant::now();
    let mut done = |what: &str| {
        eprintln!("fleet: {what} in {:?}", step.elapsed());
        step = Instant::now();
    };

    // 1. Discovery. Meanwhile a forger on a1's host beacons a decoy "server" no agent may call.
    let decoy = {
        let ip = topo.agents[0].ip.clone();
        in_netns(topo.agents[0].net.netns.as_deref(), move || {
            TcpListener::bind(format!("{ip}:0")).unwrap()
        })
    };
    decoy.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let forger = forge_server_beacons(
        topo.agents[0].net.netns.as_deref(),
        &topo.agents[0].ip,
        topo.dest,
        format!("http://{}", decoy.local_addr().unwrap()),
        stop.clone(),
    );
    let labels = |i: usize| vec![format!("zone=z{}", i + 1)];
    let mut agents: Vec<Option<Proc>> = Vec::new();
    for (i, name) in AGENTS.iter().enumerate() {
        let token = s.join_token();
        let l = labels(i);
        let l: Vec<&str> = l.iter().map(String::as_str).collect();
        agents.push(Some(start_agent(
            &topo.agents[i].net,
            name,
            Some(&token),
            &l,
            &dir,
        )));
    }
    for name in AGENTS {
        s.wait_ready(name, Duration::from_secs(20));
    }
    // Each agent serves its job logs: on loopback on its host's own address (--listen
    // 127.0.0.3-5:0), in a namespace on the address it reaches the server from (the default,
    // `auto`: its own 10.200.0.x, not every address).
    for (i, a) in agents.iter().enumerate() {
        let pid = a.as_ref().unwrap().child.id();
        let want = match &topo.agents[i].net.agent_listen {
            Some(l) => l.parse::<SocketAddr>().unwrap().ip(),
            None => topo.agents[i].ip.parse().unwrap(),
        };
        let mut got = Vec::new();
        assert!(
            wait_until(Duration::from_secs(10), || {
                got = listening(pid);
                got.len() == 1 && got[0].ip() == want && got[0].port() != 0
            }),
            "{} should serve its logs on {want}: it listens on {got:?}",
            AGENTS[i]
        );
    }
    stop.store(true, Ordering::Relaxed);
    forger.join().unwrap();
    assert!(decoy.accept().is_err(), "a forged beacon steered an agent");
    for name in AGENTS {
        let saved = std::fs::read_to_string(dir.0.join(name).join("agent/servers")).unwrap();
        assert_eq!(saved.trim(), s.url, "{name} joined another server");
    }
    // Every agent's own beacons reach the server's listener (across the bridge) as good ones.
    let mut last = Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || AGENTS.iter().all(|n| {
            last = s.node(n);
            last["beacon_at"].is_string()
        })),
        "no beacon heard from a node: {last}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || s.beacons("ok") >= 6),
        "{}",
        s.metrics()
    );
    let m = s.metrics();
    for bad in [
        "bad_signature",
        "unsigned",
        "replayed",
        "stale",
        "malformed",
    ] {
        assert_eq!(beacon_count(&m, bad), 0, "{bad}: {m}");
    }
    done("1. three agents found the server by its beacon, joined and were ready");

    // 2. Jobs pinned to each node, and one placed by label, run there.
    let where_am_i = "echo on $MUSTER_NODE_NAME; ip -o -4 addr show 2>/dev/null | grep -o '10\\.200\\.0\\.[0-9]*' | sed 's/^/ip /'";
    let mut kids: Vec<Value> = AGENTS
        .iter()
        .map(|n| json!({"name": format!("on-{n}"), "node": n, "shell": where_am_i}))
        .collect();
    kids.push(json!({"name": "by-label", "node_selector": {"zone": "z3"}, "shell": where_am_i}));
    let (id, _) = s.create(json!({"name": "pinned", "children": kids}));
    let t = s.wait_tree(&id, Duration::from_secs(20));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    for (job, node, i) in [
        ("on-a1", "a1", 0),
        ("on-a2", "a2", 1),
        ("on-a3", "a3", 2),
        ("by-label", "a3", 2),
    ] {
        let j = child(&t, job);
        assert_eq!(j["node"], node, "{j:#}");
        let log = s.log(j["id"].as_str().unwrap());
        assert!(log.contains(&format!(" out on {node}")), "{job}: {log}");
        if let Some(ips) = &topo.agent_ips {
            // It ran on that host: in its network namespace.
            assert!(log.contains(&format!(" out ip {}", ips[i])), "{job}: {log}");
        }
    }
    done("2. pinned and selected jobs ran on their nodes");

    // 3. A log on a2 followed from the server's host: lines arrive while the job runs.
    let gate = dir.0.join("log-gate");
    let (id, body) = s.create(json!({"name": "chatty", "node": "a2", "shell": format!(
        "for i in 1 2; do echo line$i; sleep 0.2; done; while [ ! -e {} ]; do sleep 0.05; done; echo line3",
        gate.display()
    )}));
    let job = body["jobs"][0]["id"].as_str().unwrap().to_string();
    let (direct, relayed) = s.log_streams();
    let lines = s.follow_log(&job);
    for l in ["line1", "line2"] {
        let got = next_line_with(&lines, l, Duration::from_secs(20));
        assert!(got.ends_with(&format!(" out {l}")), "{got}");
    }
    // The job cannot end before the gate opens: the lines came live.
    assert_eq!(s.job(&job)["state"], "running");
    // Straight from a2's own log endpoint, not relayed over its connection.
    assert_eq!(
        s.log_streams(),
        (direct + 1, relayed),
        "the follow did not come from a2's log endpoint (via endpoint, via connection); server stderr:\n{}",
        std::fs::read_to_string(s._dir.0.join("server.stderr")).unwrap_or_default()
    );
    std::fs::write(&gate, b"").unwrap();
    next_line_with(&lines, " out line3", Duration::from_secs(20));
    // The follow ends with the job.
    let end = Instant::now() + Duration::from_secs(20);
    let mut rest = Vec::new();
    loop {
        match lines.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(l) => rest.push(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("the follow did not end with the job ({e}): {rest:?}"),
        }
    }
    assert!(!rest.iter().any(|l| l.starts_with("ERROR")), "{rest:?}");
    assert_eq!(s.log_streams(), (direct + 1, relayed), "{}", s.metrics());
    let t = s.wait_tree(&id, Duration::from_secs(20));
    assert_eq!(
        (t["tree_state"].as_str(), t["node"].as_str()),
        (Some("succeeded"), Some("a2")),
        "{t:#}"
    );
    let log = s.log(&job);
    for l in ["line1", "line2", "line3"] {
        assert!(log.contains(&format!(" out {l}")), "{log}");
    }
    done("3. a log on a2 was followed live from the server's host, from a2's endpoint");

    // 4. Forged, unsigned, replayed, stale and garbage beacons from a2's host.
    let key = s.cluster_key();
    let (from, dest) = (format!("{}:0", topo.agents[1].ip), topo.dest);
    in_netns(topo.agents[1].net.netns.as_deref(), move || {
        let sock = UdpSocket::bind(&from).unwrap();
        sock.set_broadcast(true).unwrap();
        let now = d::now_ms();
        let b = node_beacon("0190aaaa-0000-7000-8000-000000000002", 5, now);
        let sends = [
            d::seal_node(&b, &[2; 32]),                                    // forged
            d::unsigned_node(&b),                                          // unsigned
            d::seal_node(&b, &key),                                        // good, once
            d::seal_node(&b, &key),                                        // replayed
            d::seal_node(&node_beacon(&b.node_id, 6, now - 60_000), &key), // stale
            b"\x00garbage".to_vec(),                                       // malformed
        ];
        for m in sends {
            sock.send_to(&m, dest).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let want = [
        ("bad_signature", 1),
        ("unsigned", 1),
        ("replayed", 1),
        ("stale", 1),
        ("malformed", 1),
    ];
    let ok = wait_until(Duration::from_secs(10), || {
        let m = s.metrics();
        want.iter().all(|(k, n)| beacon_count(&m, k) == *n)
    });
    assert!(ok, "{}", s.metrics());
    let (_, nodes) = s.call("GET", "/api/v1/nodes", None);
    assert!(
        !nodes.to_string().contains("intruder"),
        "a beacon made a node: {nodes}"
    );
    done("4. forged, unsigned, replayed, stale and garbage beacons were ignored and counted");

    // 5. a3 killed under a running job: down, lost, the job fails, the tree aborts.
    let (long_mark, sib_mark) = (dir.0.join("long-started"), dir.0.join("sibling-started"));
    let (id, _) = s.create(json!({"name": "doomed", "children": [
        {"name": "long", "key": "long", "node": "a3", "shell": format!("touch {}; sleep 60", long_mark.display())},
        {"name": "sibling", "node": "a1", "shell": format!("touch {}; sleep 60", sib_mark.display())},
        {"name": "later", "node": "a2", "needs": ["long"], "shell": "echo never"}
    ]}));
    assert!(
        wait_until(Duration::from_secs(20), || long_mark.exists()
            && sib_mark.exists()),
        "the jobs never started: {:#}",
        s.call("GET", &format!("/api/v1/jobs/{id}/tree"), None).1
    );
    agents[2].take().unwrap().kill9();
    let down = s.wait_node("a3", "down", Duration::from_secs(10));
    let lost = down + s.wait_node("a3", "lost", Duration::from_secs(20));
    eprintln!("fleet: a3 killed: down after {down:?}, lost after {lost:?}");
    let t = s.wait_tree(&id, Duration::from_secs(20));
    assert_eq!(t["tree_state"], "failed", "{t:#}");
    let long = child(&t, "long");
    assert_eq!(long["state"], "failed", "{long:#}");
    assert!(
        long["error"].as_str().unwrap_or("").contains("node lost"),
        "{long:#}"
    );
    assert_eq!(child(&t, "sibling")["state"], "aborted", "{t:#}");
    let later = child(&t, "later");
    assert_eq!(later["state"], "aborted", "{later:#}");
    assert!(
        later["started_at"].is_null() && later["node"].is_null(),
        "a job after the failure started: {later:#}"
    );
    // The abort's kill crossed to a1: the sibling's process ended there.
    let sibling = child(&t, "sibling")["id"].as_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(20), || attempt_ended(
            &dir.0.join("a1"),
            &sibling
        )),
        "the aborted sibling on a1 was never ended"
    );
    // a3 comes back (same data dir, no token): ready again; the job the server ended is not
    // resurrected, and its process is ended.
    agents[2] = Some(start_agent(
        &topo.agents[2].net,
        "a3",
        None,
        &["zone=z3"],
        &dir,
    ));
    s.wait_ready("a3", Duration::from_secs(20));
    let long_id = long["id"].as_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(20), || attempt_ended(
            &dir.0.join("a3"),
            &long_id
        )),
        "the orphaned job on a3 was never ended"
    );
    assert_eq!(s.job(&long_id)["state"], "failed");
    done("5. a killed agent: node down, lost, job failed, tree aborted; back ready on restart");

    // 5b. A long-running process whose node is killed: lost, then moved to another node (it
    // restarts `always` and names no node), serving there; the node back is told to drop it.
    let (st, p) = s.call(
        "POST",
        "/api/v1/processes",
        Some(json!({"name": "mover", "exec": ["python3", "-m", "http.server", "$PORT"], "ports": ["http"],
            "health": {"tcp": "http", "interval": "200ms", "grace": "10s"}, "kill_grace": "1s"})),
    );
    assert_eq!(st, 201, "{p}");
    let pid_path = format!("/api/v1/processes/{}", p["id"].as_str().unwrap());
    let mut p = Value::Null;
    assert!(
        wait_until(Duration::from_secs(30), || {
            p = s.call("GET", &pid_path, None).1;
            p["state"] == "healthy"
        }),
        "the process never got healthy: {p:#}"
    );
    let first = p["node"].as_str().unwrap().to_string();
    let old_pid = p["pid"].as_i64().unwrap();
    let i = AGENTS.iter().position(|n| *n == first).unwrap();
    agents[i].take().unwrap().kill9();
    // Its `lost` mark lasts only until the same call places it on another node (a poll here
    // may miss it on a busy machine); a pinned process that stays `lost` is in it::nodes.
    assert!(
        wait_until(Duration::from_secs(40), || {
            p = s.call("GET", &pid_path, None).1;
            p["state"] == "healthy" && p["node"] != first.as_str()
        }),
        "the process was not moved off {first}: {p:#}"
    );
    assert_eq!(p["gen"], 2, "{p:#}");
    let (addr, port) = (
        p["address"].as_str().unwrap().to_string(),
        p["ports"]["http"].as_u64().unwrap() as u16,
    );
    let reachable = in_netns(topo.server.net.netns.as_deref(), move || {
        std::net::TcpStream::connect((addr.as_str(), port)).is_ok()
    });
    assert!(reachable, "the moved process does not serve: {p:#}");
    // The killed node's copy: its supervisor lived on without its agent; once the agent is
    // back, the server tells it to remove the copy it moved away.
    agents[i] = Some(start_agent(
        &topo.agents[i].net,
        &first,
        None,
        &[&format!("zone=z{}", i + 1)],
        &dir,
    ));
    s.wait_ready(&first, Duration::from_secs(20));
    let gone = |pid: i64| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|st| {
                st.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    };
    assert!(
        wait_until(Duration::from_secs(20), || gone(old_pid)),
        "the copy on {first} still runs after it came back"
    );
    let (st, _) = s.call("DELETE", &pid_path, None);
    assert_eq!(st, 202);
    done("5b. a process on a killed node: lost, moved and serving elsewhere; the old copy removed");

    // 6. a1 stopped and restarted under a running job: the job carries on and succeeds once.
    let (gate, marks) = (dir.0.join("restart-gate"), dir.0.join("restart-marks"));
    let (id, _) = s.create(json!({"name": "survivor", "node": "a1", "shell": format!(
        "echo run >> {}; while [ ! -e {} ]; do sleep 0.05; done; echo done",
        marks.display(),
        gate.display()
    )}));
    assert!(wait_until(Duration::from_secs(20), || marks.exists()));
    let replayed = s.beacons("replayed");
    drop(agents[0].take()); // SIGTERM, waited for
    agents[0] = Some(start_agent(
        &topo.agents[0].net,
        "a1",
        None,
        &["zone=z1"],
        &dir,
    ));
    s.wait_ready("a1", Duration::from_secs(20));
    std::fs::write(&gate, b"").unwrap();
    let t = s.wait_tree(&id, Duration::from_secs(20));
    assert_eq!(
        (
            t["tree_state"].as_str(),
            t["node"].as_str(),
            t["attempt"].as_u64()
        ),
        (Some("succeeded"), Some("a1"), Some(1)),
        "{t:#}"
    );
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap(),
        "run\n",
        "ran once"
    );
    assert!(s.log(&id).contains(" out done"));
    assert_eq!(s.node("a1")["state"], "ready");
    // The restarted agent's beacons are fresh, not replays.
    let before = s.beacons("ok");
    assert!(wait_until(Duration::from_secs(10), || s.beacons("ok") >= before + 3));
    assert_eq!(s.beacons("replayed"), replayed, "{}", s.metrics());
    done("6. a restarted agent kept its running job");

    // 7. a2 falls silent with its connection left open (its host's link cut; on loopback, its
    // process stopped): without heartbeats it is down within 3 × the interval, and gets no new
    // job; back, it is ready again on the same connection, and the job it was running carries
    // on (the silence is shorter than lost_after).
    let (gate, marks) = (dir.0.join("silent-gate"), dir.0.join("silent-marks"));
    let (held_tree, body) = s.create(json!({"name": "held", "node": "a2", "shell": format!(
        "echo run >> {}; while [ ! -e {} ]; do sleep 0.05; done; echo done",
        marks.display(),
        gate.display()
    )}));
    let held = body["jobs"][0]["id"].as_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(20), || marks.exists()),
        "the job on a2 never started: {:#}",
        s.job(&held)
    );
    let a2_log = dir.0.join("a2.stderr");
    let reconnects = || {
        std::fs::read_to_string(&a2_log)
            .unwrap_or_default()
            .matches("lost the server")
            .count()
    };
    let reconnects_before = reconnects();
    let mut silence = Silence::start(&topo.agents[1], agents[1].as_ref().unwrap());
    let cut = Instant::now();
    s.wait_node("a2", "down", Duration::from_secs(10));
    let down = cut.elapsed();
    let bound = INTERVAL * 3 + Duration::from_millis(1500);
    assert!(
        down <= bound,
        "a2 went down {down:?} after it fell silent, want at most {bound:?}"
    );
    // Down: a job pinned to it waits.
    let (later_tree, body) =
        s.create(json!({"name": "while-down", "node": "a2", "shell": "echo late"}));
    let later = body["jobs"][0]["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(400));
    let j = s.job(&later);
    assert!(
        j["state"] != "running" && j["started_at"].is_null() && j["node"].is_null(),
        "a job went to a node that is down: {j:#}"
    );
    assert_eq!(s.node("a2")["state"], "down");
    assert_eq!(s.job(&held)["state"], "running");
    let silent = cut.elapsed();
    assert!(silent < LOST_AFTER, "silent for {silent:?}: too long");
    silence.end().unwrap();
    let ready = s.wait_node("a2", "ready", LOST_AFTER);
    eprintln!(
        "fleet: a2 silent for {silent:?}: down after {down:?} (at most {bound:?}), ready again {ready:?} after"
    );
    // It went down for want of heartbeats, not because its connection broke.
    assert_eq!(
        reconnects(),
        reconnects_before,
        "a2 lost its connection: {}",
        std::fs::read_to_string(&a2_log).unwrap_or_default()
    );
    // Ready, it gets the waiting job.
    let t = s.wait_tree(&later_tree, Duration::from_secs(20));
    assert_eq!(
        (t["tree_state"].as_str(), t["node"].as_str()),
        (Some("succeeded"), Some("a2")),
        "{t:#}"
    );
    std::fs::write(&gate, b"").unwrap();
    let t = s.wait_tree(&held_tree, Duration::from_secs(20));
    assert_eq!(
        (
            t["tree_state"].as_str(),
            t["node"].as_str(),
            t["attempt"].as_u64()
        ),
        (Some("succeeded"), Some("a2"), Some(1)),
        "{t:#}"
    );
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap(),
        "run\n",
        "ran once"
    );
    assert!(s.log(&held).contains(" out done"));
    drop(silence);
    done("7. a silent node: down, no new jobs; back, ready again, its job carried on");

    // 8. A log endpoint the server cannot reach (namespaces only): a1 restarted with `--listen
    // 127.0.0.1:0` advertises 127.0.0.1:PORT, which from the server's host is the server's own
    // loopback, where nothing listens. A follow of a job on a1 is relayed over a1's connection,
    // live; the endpoint then rests (30 s), so a second follow goes over the connection at once,
    // with no dial at all.
    if topo.agents[0].net.netns.is_none() {
        eprintln!(
            "fleet: 8. skipped on loopback: every address is reachable there, so the relay over an agent's connection cannot be provoked"
        );
    } else {
        let mut net = topo.agents[0].net.clone();
        net.agent_listen = Some("127.0.0.1:0".into());
        drop(agents[0].take()); // SIGTERM, waited for
        agents[0] = Some(start_agent(&net, "a1", None, &["zone=z1"], &dir));
        let pid = agents[0].as_ref().unwrap().child.id();
        let mut got = Vec::new();
        assert!(
            wait_until(Duration::from_secs(10), || {
                got = listening(pid);
                got.len() == 1 && got[0].ip().is_loopback() && got[0].port() != 0
            }),
            "a1 should serve its logs on 127.0.0.1 only: it listens on {got:?}"
        );
        s.wait_ready("a1", Duration::from_secs(20));
        let srv_log = s._dir.0.join("server.stderr");
        let srv_stderr = || std::fs::read_to_string(&srv_log).unwrap_or_default();
        let dials_failed = || {
            srv_stderr()
                .matches("cannot reach the log endpoint of node \"a1\" at 127.0.0.1:")
                .count()
        };
        let failed_before = dials_failed();
        for follow in 1..=2 {
            let tag = format!("unreachable{follow}");
            let [mark, gate1, gate2] =
                ["mark", "gate1", "gate2"].map(|g| dir.0.join(format!("{tag}-{g}")));
            let wait = |g: &Path| format!("while [ ! -e {} ]; do sleep 0.05; done", g.display());
            let (id, body) = s.create(json!({"name": tag, "node": "a1", "shell": format!(
                "touch {}; {}; echo {tag}-1; {}; echo {tag}-2",
                mark.display(),
                wait(&gate1),
                wait(&gate2)
            )}));
            let job = body["jobs"][0]["id"].as_str().unwrap().to_string();
            // Running on a1: its connection (and the endpoint it offered) is the new one.
            assert!(
                wait_until(Duration::from_secs(20), || mark.exists()),
                "{tag} never started: {:#}",
                s.job(&job)
            );
            let (direct, relayed) = s.log_streams();
            let t0 = Instant::now();
            let lines = s.follow_log(&job);
            std::fs::write(&gate1, b"").unwrap();
            let got = next_line_with(&lines, &format!(" out {tag}-1"), Duration::from_secs(20));
            let first = t0.elapsed();
            assert!(got.ends_with(&format!(" out {tag}-1")), "{got}");
            // The job cannot end before gate2 opens: the line came live.
            assert_eq!(s.job(&job)["state"], "running");
            assert_eq!(
                s.log_streams(),
                (direct, relayed + 1),
                "follow {follow} on a1 was not relayed over its connection (via endpoint, via connection); server stderr:\n{}",
                srv_stderr()
            );
            // The server tried the endpoint once, for the first follow, failed and said so; the
            // second follow made no dial.
            assert_eq!(
                dials_failed(),
                failed_before + 1,
                "after follow {follow}: server stderr:\n{}",
                srv_stderr()
            );
            if follow == 2 {
                // No dial's delay either.
                assert!(
                    first < Duration::from_secs(2),
                    "the second follow's first line came {first:?} after the follow began"
                );
            }
            std::fs::write(&gate2, b"").unwrap();
            next_line_with(&lines, &format!(" out {tag}-2"), Duration::from_secs(20));
            // The follow ends with the job.
            let end = Instant::now() + Duration::from_secs(20);
            let mut rest = Vec::new();
            loop {
                match lines.recv_timeout(end.saturating_duration_since(Instant::now())) {
                    Ok(l) => rest.push(l),
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(e) => panic!("follow {follow} did not end with the job ({e}): {rest:?}"),
                }
            }
            assert!(!rest.iter().any(|l| l.starts_with("ERROR")), "{rest:?}");
            let t = s.wait_tree(&id, Duration::from_secs(20));
            assert_eq!(
                (t["tree_state"].as_str(), t["node"].as_str()),
                (Some("succeeded"), Some("a1")),
                "{t:#}"
            );
            assert_eq!(s.log_streams(), (direct, relayed + 1), "{}", s.metrics());
            let log = s.log(&job);
            assert!(
                log.contains(&format!(" out {tag}-1")) && log.contains(&format!(" out {tag}-2")),
                "{log}"
            );
            eprintln!("fleet: follow {follow} of a job on a1 via its connection: first line {first:?} after the follow began");
        }
        done("8. an unreachable log endpoint: follows relayed live over the agent's connection, the endpoint resting");
    }
    eprintln!("fleet on {}: all in {:?}", topo.kind, t_all.elapsed());
    // Drop order: agents, the server, the agents' dir (their jobs), then the namespaces.
    drop(agents);
    drop(s);
    drop(dir);
}

/// Services across hosts (SPEC §6, issue 15 point 3): the example environment of
/// `examples/services` with its store placed on agent a2, the app on a1 and the backup on a3 (each
/// consuming that `node`). Each service's directory goes to its node as an archive and its
/// actions run there; the app's context carries a2's address, and the app on a1 really reaches
/// the store over the hosts' network; the backup on a3 exports the store's keys.
#[test]
fn the_example_services_run_across_three_agents() {
    let topo = Topology::choose();
    eprintln!("services topology: {}", topo.kind);
    let dir = TempDir::new("svc-agents");
    let s = Server::start(&topo.server.net, &topo.listen);
    let mut agents = Vec::new();
    for (i, name) in AGENTS.iter().enumerate() {
        let token = s.join_token();
        agents.push(start_agent(
            &topo.agents[i].net,
            name,
            Some(&token),
            &[],
            &dir,
        ));
    }
    for name in AGENTS {
        s.wait_ready(name, Duration::from_secs(20));
    }
    // The example, each part given a node.
    let hq = s.data.join("hq");
    assert!(wait_until(Duration::from_secs(20), || hq
        .join(".git")
        .is_dir()));
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/services/hq/.");
    assert!(Command::new("cp")
        .arg("-r")
        .arg(&example)
        .arg(&hq)
        .status()
        .unwrap()
        .success());
    let edit = |file: &str, f: &dyn Fn(String) -> String| {
        let p = hq.join("services").join(file).join("service.toml");
        let text = std::fs::read_to_string(&p).unwrap();
        let new = f(text.clone());
        assert_ne!(new, text, "{file}: the edit changed nothing");
        std::fs::write(&p, new).unwrap();
    };
    let on =
        |node: &str| format!("[consumes.host]\ninterface = \"node\"\ninstance = \"{node}\"\n\n");
    // Free ports rather than the example's 7379 and 7380 (on loopback, other tests may run at
    // once).
    let free = || {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (kv_port, app_port) = (free(), free());
    edit("demo__kv__main", &|t| {
        t.replace("port = 7379", &format!("port = {kv_port}"))
            .replace("host = \"127.0.0.1\"", "host = \"0.0.0.0\"")
            .replace(
                "data = { host = \"${params.host}\"",
                "data = { host = \"${node.address}\"",
            )
            .replace("[provides.kv]", &format!("{}[provides.kv]", on("a2")))
    });
    edit("demo__app__web", &|t| {
        t.replace("port = 7380", &format!("port = {app_port}"))
            .replace("[consumes.db]", &format!("{}[consumes.db]", on("a1")))
    });
    edit("demo__backup__nightly", &|t| {
        t.replace("[consumes.db]", &format!("{}[consumes.db]", on("a3")))
    });
    support::git(&hq, &["add", "-A"]);
    support::git(
        &hq,
        &["commit", "-q", "-m", "the example across three hosts"],
    );

    let (st, plan) = s.call("POST", "/api/v1/services/plan", Some(json!({})));
    assert_eq!(st, 201, "{plan:#}");
    let nodes: Vec<(String, String)> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["path"].as_str().unwrap().to_string(),
                x["node"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        vec![
            ("demo__kv__main".to_string(), "a2".to_string()),
            ("demo__app__web".to_string(), "a1".to_string()),
            ("demo__backup__nightly".to_string(), "a3".to_string()),
        ],
        "{plan:#}"
    );
    let (st, a) = s.call(
        "POST",
        "/api/v1/services/apply",
        Some(json!({"plan": plan["id"]})),
    );
    assert_eq!(st, 202, "{a}");
    let t = s.wait_tree(a["tree"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    // The app's context: the store at a2's address (in namespaces, a2's own 10.200.0.3), in
    // the command line of its process on a1.
    let (_, app) = s.call("GET", "/api/v1/services/demo__app__web", None);
    assert_eq!(app["node"], "a1", "{app:#}");
    let (_, proc_) = s.call(
        "GET",
        &format!("/api/v1/processes/{}", app["process"].as_str().unwrap()),
        None,
    );
    assert_eq!(proc_["node"], "a1", "{proc_:#}");
    let want = match &topo.agent_ips {
        Some(ips) => format!("http://{}:{kv_port}", ips[1]),
        None => "http://".to_string(),
    };
    assert!(proc_.to_string().contains(&want), "{proc_:#}");
    // The app on a1, asked there, counts its visit in the store on a2.
    let (job, _) = s.create(json!({"name": "visit", "node": "a1", "exec": ["python3", "-c",
        format!("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{app_port}/', timeout=10).read().decode())")]}));
    let j = s.wait_tree(&job, Duration::from_secs(60));
    let log = s.log(&job);
    assert_eq!(j["tree_state"], "succeeded", "{j:#}\n{log}");
    assert!(
        log.contains(&format!(
            "hello: visit 1, counted in the kv store at {want}"
        )),
        "{log}"
    );
    // The backup on a3 exports the store's keys, reached over the network too.
    let (st, e) = s.call(
        "POST",
        "/api/v1/services/demo__backup__nightly/actions/export",
        Some(json!({})),
    );
    assert_eq!(st, 202, "{e}");
    let t = s.wait_tree(e["tree"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(t["tree_state"], "succeeded", "{t:#}");
    let mut rec = Value::Null;
    assert!(
        wait_until(Duration::from_secs(30), || {
            rec = s
                .call("GET", "/api/v1/services/demo__backup__nightly", None)
                .1;
            rec["message"] == "exported 1 keys" && rec["node"] == "a3"
        }),
        "{rec:#}"
    );
    drop(agents);
}
