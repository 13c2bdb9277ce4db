//! Discovery (SPEC §5) with the real binaries and real UDP sockets: a `muster server` with
//! discovery on its own free port beaconing to `127.255.255.255`, a `muster agent` given only a
//! join token that finds it by its signed beacon, and forged, unsigned, replayed, stale and
//! garbage beacons that the server ignores and counts. One test runs the server and an agent in
//! network namespaces the test makes (a bridge in a namespace of its own, 10.200.0.0/24); it is
//! skipped, saying so, where namespaces cannot be made. Broadcasts go only to `127.255.255.255`
//! or inside those namespaces.

use muster_server::discovery::{self as d, NodeBeacon, ServerBeacon, SigningKey};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_muster");
const PASSWORD: &str = "correct horse battery staple";
static COUNTER: AtomicUsize = AtomicUsize::new(0);

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "muster-disc-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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
        (_, b) => a
            .post(&u)
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .send(b.unwrap_or(json!({})).to_string()),
    };
    let mut resp = resp.unwrap();
    let st = resp.status().as_u16();
    (st, resp.body_mut().read_to_string().unwrap_or_default())
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

fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// A free UDP port (of the namespace this thread is in).
fn free_udp_port() -> u16 {
    UdpSocket::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where discovery runs: its port, broadcast address and, optionally, a network namespace.
#[derive(Clone)]
struct Net {
    port: u16,
    broadcast: String,
    netns: Option<String>,
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
            .env("MUSTER_DISCOVERY__ENABLED", "true")
            .env("MUSTER_DISCOVERY__PORT", self.port.to_string())
            .env("MUSTER_DISCOVERY__BROADCAST", &self.broadcast)
            .env("MUSTER_DISCOVERY__INTERVAL", "200ms")
            .env("MUSTER_NODES__LOST_AFTER", "5s")
            .stdin(Stdio::null());
        c
    }
}

/// A child process killed on drop; its stdout lines arrive on `lines`.
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
}

impl Drop for Proc {
    fn drop(&mut self) {
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

    fn metrics(&self) -> String {
        let (url, token) = (self.url.clone(), self.token.clone());
        in_netns(self.netns.as_deref(), move || {
            call(&url, &token, "GET", "/metrics", None).1
        })
    }

    /// `muster_discovery_beacons_total{result=...}`.
    fn beacons(&self, result: &str) -> u64 {
        let want = format!("muster_discovery_beacons_total{{result=\"{result}\"}} ");
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(&want).map(|n| n.trim().parse().unwrap()))
            .unwrap_or(0)
    }

    fn join_token(&self) -> String {
        let (st, t) = self.call("POST", "/api/v1/nodes/join-token", Some(json!({"uses": 1})));
        assert_eq!(st, 201, "{t}");
        t["token"].as_str().unwrap().to_string()
    }

    fn wait_ready(&self, name: &str, within: Duration) {
        let mut last = Value::Null;
        let ok = wait_until(within, || {
            last = self.call("GET", &format!("/api/v1/nodes/{name}"), None).1;
            last["state"] == "ready"
        });
        assert!(ok, "node {name} never became ready: {last}");
    }

    fn cluster_key(&self) -> [u8; 32] {
        d::read_key(&self.data.join("cluster-key"))
            .unwrap()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.proc.take();
    }
}

/// An agent started with only a join token (no `--server`), or with nothing at all (a restart).
fn start_agent(net: &Net, name: &str, token: Option<&str>, dir: &TempDir) -> Proc {
    let log = dir.0.join(format!("{name}.stderr"));
    let mut c = net.command(&["agent", "--name", name, "--data-dir"]);
    c.arg(dir.0.join(name));
    if let Some(t) = token {
        c.args(["--join-token", t]);
    }
    let mut p = Proc::spawn(c, &log);
    p.line("is running", Duration::from_secs(20), &log);
    p
}

/// Runs `f` on a thread inside network namespace `ns` (or here, for `None`).
fn in_netns<T: Send + 'static>(ns: Option<&str>, f: impl FnOnce() -> T + Send + 'static) -> T {
    let Some(ns) = ns else { return f() };
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        assert_eq!(
            unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns {path}"
        );
        f()
    })
    .join()
    .unwrap()
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

#[test]
fn an_agent_with_only_a_join_token_finds_the_server_by_its_beacon() {
    let net = Net {
        port: free_udp_port(),
        broadcast: "127.255.255.255".into(),
        netns: None,
    };
    let s = Server::start(&net, "127.0.0.1:0");
    let token = s.join_token();
    // The token carries the server's public key; the server keeps its key with mode 0600.
    let (_, public) = token.split_once('.').expect("mjt_<secret>.<key>");
    let key = SigningKey::from_bytes(&d::read_key(&s.data.join("server-key")).unwrap().unwrap());
    assert_eq!(public, d::hex(&key.verifying_key().to_bytes()));
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
    let forger = {
        let (stop, port) = (stop.clone(), net.port);
        let forged_key = SigningKey::from_bytes(&[9; 32]);
        std::thread::spawn(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_broadcast(true).unwrap();
            let dest: SocketAddr = format!("127.255.255.255:{port}").parse().unwrap();
            let mut seq = d::first_seq();
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let b = ServerBeacon {
                    url: decoy_url.clone(),
                    version: "0".into(),
                    ts: d::now_ms(),
                    seq,
                };
                let _ = sock.send_to(&d::seal_server(&b, &forged_key), dest);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let dir = TempDir::new("agents");
    let t0 = Instant::now();
    let agent = start_agent(&net, "disc-1", Some(&token), &dir);
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
    let (_, n) = s.call("GET", "/api/v1/nodes/disc-1", None);
    assert!(n["beacon_at"].is_string(), "{n}");

    // Restarted with neither a token nor a server, it goes back to the server it joined.
    drop(agent);
    let node_id = n["id"].as_str().unwrap().to_string();
    let before = s.beacons("ok");
    let _agent = start_agent(&net, "disc-1", None, &dir);
    s.wait_ready("disc-1", Duration::from_secs(10));
    // Its fresh beacons are not taken for replays (sequence numbers start at the clock).
    assert!(wait_until(Duration::from_secs(5), || s.beacons("ok") >= before + 2));
    assert_eq!(s.beacons("replayed"), 0, "{}", s.metrics());
    let (_, n) = s.call("GET", "/api/v1/nodes/disc-1", None);
    assert_eq!(n["id"], node_id.as_str());
}

#[test]
fn forged_unsigned_replayed_stale_and_garbage_beacons_are_ignored_and_counted() {
    let net = Net {
        port: free_udp_port(),
        broadcast: "127.255.255.255".into(),
        netns: None,
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
            .map_err(|e| e.to_string())?;
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
        let mut n = Netns {
            names: vec![sw.clone()],
        };
        Self::ip(&["netns", "add", &sw])?;
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

#[test]
fn discovery_across_network_namespaces() {
    let tag = format!("mdisc{}", std::process::id() % 100_000);
    let nets = match Netns::make(&tag, &["srv", "a1", "a2"]) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("SKIPPED: cannot make network namespaces here ({e}); the loopback tests cover discovery");
            return;
        }
    };
    let srv_ns = nets.ns("srv");
    let port = in_netns(Some(&srv_ns), free_udp_port);
    let at = |host: &str| Net {
        port,
        broadcast: "10.200.0.255".into(),
        netns: Some(nets.ns(host)),
    };
    let s = Server::start(&at("srv"), "10.200.0.1:0");
    assert!(s.url.starts_with("http://10.200.0.1:"), "{}", s.url);
    let dir = TempDir::new("ns-agents");
    let t1 = s.join_token();
    let t2 = s.join_token();
    let _a1 = start_agent(&at("a1"), "ns-a1", Some(&t1), &dir);
    let _a2 = start_agent(&at("a2"), "ns-a2", Some(&t2), &dir);
    s.wait_ready("ns-a1", Duration::from_secs(10));
    s.wait_ready("ns-a2", Duration::from_secs(10));
    for a in ["ns-a1", "ns-a2"] {
        let saved = std::fs::read_to_string(dir.0.join(a).join("agent/servers")).unwrap();
        assert_eq!(saved.trim(), s.url);
    }
    // Both agents' beacons cross the bridge to the server.
    assert!(
        wait_until(Duration::from_secs(5), || s.beacons("ok") >= 4),
        "{}",
        s.metrics()
    );
    // Forged and garbage beacons from another host of the subnet are ignored and counted.
    let key = s.cluster_key();
    in_netns(Some(&nets.ns("a2")), move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_broadcast(true).unwrap();
        let dest = format!("10.200.0.255:{port}");
        let b = node_beacon("0190aaaa-0000-7000-8000-000000000002", 5, d::now_ms());
        sock.send_to(&d::seal_node(&b, &[2; 32]), &dest).unwrap();
        sock.send_to(&d::unsigned_node(&b), &dest).unwrap();
        sock.send_to(&d::seal_node(&b, &key), &dest).unwrap();
        sock.send_to(&d::seal_node(&b, &key), &dest).unwrap();
        sock.send_to(b"\x00garbage", &dest).unwrap();
    });
    let ok = wait_until(Duration::from_secs(5), || {
        s.beacons("bad_signature") == 1
            && s.beacons("unsigned") == 1
            && s.beacons("replayed") == 1
            && s.beacons("malformed") == 1
    });
    assert!(ok, "{}", s.metrics());
}
