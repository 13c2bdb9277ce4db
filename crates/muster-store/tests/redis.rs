//! Runs the conformance suite against the Redis engine, on a real `redis-server` each test starts
//! on a free loopback port (never the machine's own Redis), plus Redis-only checks: an
//! unreachable Redis is `Unavailable` quickly and the store recovers once it is back, events
//! still arrive after a restart, a 100,000-job tree, and the time of a first listing page.
//!
//! `redis-server` must be installed (`scripts/test` installs it); these tests fail, not skip,
//! without it.

use muster_core::{JobState, TreeState, Ts};
use muster_store::conformance::{self, fixture, tags};
use muster_store::{
    open, Change, Created, Doc, DocCond, DocWrite, Docs, Event, RedisStore, Store, StoreError,
    TreeFilter, Version,
};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Where the Redis server binary is: `$REDIS_SERVER`, else `/usr/bin/redis-server`, else the
/// `PATH`.
fn redis_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("REDIS_SERVER") {
        return PathBuf::from(p);
    }
    let default = PathBuf::from("/usr/bin/redis-server");
    if default.exists() {
        return default;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("redis-server");
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "redis-server is not installed (looked at $REDIS_SERVER, /usr/bin/redis-server and PATH): \
         the Redis engine tests need it; scripts/test installs it (apt-get install redis-server)"
    );
}

/// A free loopback port (the OS picks it; the listener is closed again at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

/// A throwaway `redis-server` on 127.0.0.1, without persistence, killed on drop.
struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> RedisServer {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "muster-redis-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = RedisServer {
            port: free_port(),
            dir,
            child: None,
        };
        s.run();
        s
    }

    /// Starts the server on `self.port` and waits until it answers PING.
    fn run(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::File::create(self.dir.join("redis.log")).unwrap();
        let child = Command::new(redis_binary())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if raw_command(self.port, "PING").as_deref() == Some("+PONG") {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "redis-server exited ({status}) on port {}: {}",
                    self.port,
                    std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn flushall(&self) {
        assert_eq!(raw_command(self.port, "FLUSHALL").as_deref(), Some("+OK"));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends a one-word command and returns the first reply line, `None` when nothing answers.
fn raw_command(port: u16, cmd: &str) -> Option<String> {
    let addr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("*1\r\n${}\r\n{cmd}\r\n", cmd.len()).as_bytes())
        .ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    Some(line.trim_end().to_string())
}

/// Sends one command of several words and returns the first reply line.
fn raw_args(port: u16, parts: &[&str]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut cmd = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        cmd.extend_from_slice(format!("${}\r\n{p}\r\n", p.len()).as_bytes());
    }
    s.write_all(&cmd).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

fn node_event(n: usize) -> Event {
    Event::Node {
        id: format!("n{n}"),
        name: "host".into(),
        state: "ready".into(),
        at: Ts(n as i64),
    }
}

/// Waits up to `wait` for the next event.
fn next_event(rx: &mut tokio::sync::broadcast::Receiver<Event>, wait: Duration) -> Option<Event> {
    let deadline = Instant::now() + wait;
    loop {
        match rx.try_recv() {
            Ok(e) => return Some(e),
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Err(_) => return None,
        }
    }
}

#[test]
fn redis_conforms() {
    let server = RedisServer::start();
    conformance::run_all(&|| {
        server.flushall();
        open(&server.url()).unwrap()
    });
}

#[test]
fn redis_urls() {
    let server = RedisServer::start();
    for bad in ["redis://", "redis://host:notaport", "redis://host/db"] {
        assert!(
            matches!(open(bad), Err(StoreError::Invalid(_))),
            "{bad} must be refused"
        );
    }
    // Databases are apart, and so are key prefixes in one database.
    let db1 = open(&format!("redis://127.0.0.1:{}/1", server.port)).unwrap();
    let db2 = open(&format!("redis://127.0.0.1:{}/2", server.port)).unwrap();
    let other = RedisStore::open_with_prefix(&server.url(), "other:").unwrap();
    let db0 = open(&server.url()).unwrap();
    let (tree, jobs) = fixture(tags("ws"), 2);
    db1.create_tree(&tree, &jobs, Some("k")).unwrap();
    assert_eq!(db1.tree(tree.id).unwrap(), Some(tree.clone()));
    assert_eq!(db2.tree(tree.id).unwrap(), None);
    assert_eq!(db0.tree(tree.id).unwrap(), None);
    other.create_tree(&tree, &jobs, None).unwrap();
    assert_eq!(db0.tree(tree.id).unwrap(), None, "another prefix");
    assert_eq!(
        db0.list_trees(&TreeFilter::default(), None, 10)
            .unwrap()
            .len(),
        0
    );
    // A URL with a password against a Redis without one: refused, as unavailable.
    let with_pw = format!("redis://:secret@127.0.0.1:{}/0", server.port);
    assert!(matches!(open(&with_pw), Err(StoreError::Unavailable(_))));
}

#[test]
fn redis_unavailable_quickly_then_recovers() {
    let mut server = RedisServer::start();
    let s = open(&server.url()).unwrap();
    let (tree, jobs) = fixture(tags("ws"), 3);
    s.create_tree(&tree, &jobs, None).unwrap();
    server.stop();
    let started = Instant::now();
    let err = s.ping().unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "ping: {err:?}");
    let err = s.tree(tree.id).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "tree: {err:?}");
    let change = Change::Job {
        job: jobs[1].clone(),
        expect: JobState::Waiting,
    };
    let err = s.apply(std::slice::from_ref(&change)).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "apply: {err:?}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "three calls against a stopped Redis took {took:?}"
    );
    s.publish(&[node_event(1)]); // silently lost, never blocks
    assert!(matches!(
        open(&server.url()),
        Err(StoreError::Unavailable(_))
    ));

    // Back on the same port (empty: the test Redis keeps nothing).
    server.run();
    s.ping().expect("ping after the restart");
    assert_eq!(s.tree(tree.id).unwrap(), None);
    assert_eq!(s.create_tree(&tree, &jobs, None).unwrap(), Created::New);
    assert_eq!(s.apply(&[change]).unwrap(), vec![true], "scripts reloaded");
    assert_eq!(s.tree_jobs(tree.id).unwrap().len(), 3);
}

#[test]
fn redis_events_cross_stores_and_survive_a_restart() {
    let mut server = RedisServer::start();
    let a = open(&server.url()).unwrap();
    let b = open(&server.url()).unwrap();
    let mut rx = a.subscribe();
    b.publish(&[node_event(1)]);
    assert_eq!(
        next_event(&mut rx, Duration::from_secs(5)),
        Some(node_event(1)),
        "an event of another store (process)"
    );

    server.stop();
    std::thread::sleep(Duration::from_millis(200));
    server.run();
    // The subscriber reconnects with backoff; publish until one arrives.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 100;
    let got = loop {
        b.publish(&[node_event(n)]);
        if let Some(e) = next_event(&mut rx, Duration::from_millis(100)) {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "no event reached the subscriber within 10 s of the restart"
        );
        n += 1;
    };
    assert!(matches!(got, Event::Node { .. }));
    // And from then on, in order.
    while next_event(&mut rx, Duration::from_millis(200)).is_some() {}
    let events: Vec<Event> = (1000..1010).map(node_event).collect();
    b.publish(&events);
    let back: Vec<Event> = (0..events.len())
        .map(|_| next_event(&mut rx, Duration::from_secs(5)).expect("event"))
        .collect();
    assert_eq!(back, events);
}

#[test]
fn redis_compare_and_set_race() {
    let server = RedisServer::start();
    let s = open(&server.url()).unwrap();
    let (t, jobs) = fixture(tags("ws"), 2);
    s.create_tree(&t, &jobs, None).unwrap();
    let barrier = Barrier::new(16);
    let wins: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let (s, barrier, job) = (&s, &barrier, &jobs[1]);
                scope.spawn(move || {
                    let mut j = job.clone();
                    j.state = JobState::Running;
                    j.node = Some(format!("node-{i}"));
                    barrier.wait();
                    s.apply(&[Change::Job {
                        job: j,
                        expect: JobState::Waiting,
                    }])
                    .unwrap()[0] as usize
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(wins, 1, "exactly one racer moves the job");
}

#[test]
fn redis_stores_a_100k_job_tree() {
    let server = RedisServer::start();
    let s: Arc<dyn Store> = open(&server.url()).unwrap();
    let (tree, jobs) = fixture(tags("ws"), 100_000);
    let started = Instant::now();
    assert_eq!(s.create_tree(&tree, &jobs, None).unwrap(), Created::New);
    let created = started.elapsed();
    let started = Instant::now();
    let back = s.tree_jobs(tree.id).unwrap();
    let read = started.elapsed();
    assert_eq!(back.len(), 100_000);
    assert_eq!(back, jobs);
    let started = Instant::now();
    for chunk in jobs.chunks(5_000) {
        let changes: Vec<Change> = chunk
            .iter()
            .map(|j| {
                let mut moved = j.clone();
                moved.state = JobState::Running;
                Change::Job {
                    job: moved,
                    expect: JobState::Waiting,
                }
            })
            .collect();
        assert!(s.apply(&changes).unwrap().iter().all(|a| *a));
    }
    let applied = started.elapsed();
    assert_eq!(
        s.job(jobs[77_777].id).unwrap().unwrap().state,
        JobState::Running
    );
    let mut done = tree.clone();
    done.state = TreeState::Succeeded;
    done.finished_at = Some(Ts(1_800_000_000_000));
    s.apply(&[Change::Tree(done)]).unwrap();
    let started = Instant::now();
    let (purged, _) = s.purge_finished(Ts(1_900_000_000_000), 10).unwrap();
    let purge = started.elapsed();
    assert_eq!(purged, vec![tree.id]);
    assert!(s.tree_jobs(tree.id).unwrap().is_empty());
    assert_eq!(s.job(jobs[1].id).unwrap(), None);
    eprintln!(
        "redis 100k-job tree: create {created:?}, read {read:?}, apply 100k job changes \
         {applied:?}, purge {purge:?}"
    );
}

#[test]
fn redis_first_listing_page_timing() {
    let server = RedisServer::start();
    let s: Arc<dyn Store> = open(&server.url()).unwrap();
    let started = Instant::now();
    for i in 0..200 {
        let mut t = tags(["a", "b", "c", "d"][i % 4]);
        t.application = Some(format!("app{}", i % 10));
        let (mut tree, jobs) = fixture(t, 500);
        tree.nodes = vec![format!("n{}", i % 5)];
        if i % 3 == 0 {
            tree.state = TreeState::Succeeded;
            tree.finished_at = Some(Ts(1_800_000_000_000));
        }
        s.create_tree(&tree, &jobs, None).unwrap();
    }
    eprintln!(
        "redis: stored 200 trees × 500 jobs in {:?}",
        started.elapsed()
    );
    let filters = [
        ("all", TreeFilter::default()),
        (
            "workspace",
            TreeFilter {
                workspace: Some("b".into()),
                ..TreeFilter::default()
            },
        ),
        (
            "workspace set",
            TreeFilter {
                workspaces: Some(vec!["a".into(), "c".into()]),
                ..TreeFilter::default()
            },
        ),
        (
            "application+state",
            TreeFilter {
                application: Some("app7".into()),
                state: Some(TreeState::Running),
                ..TreeFilter::default()
            },
        ),
        (
            "node",
            TreeFilter {
                node: Some("n3".into()),
                ..TreeFilter::default()
            },
        ),
    ];
    for (name, f) in filters {
        let started = Instant::now();
        let page = s.list_trees(&f, None, 50).unwrap();
        let first = started.elapsed();
        let cursor = page.last().map(|t| t.id);
        let started = Instant::now();
        let next = s.list_trees(&f, cursor, 50).unwrap();
        let second = started.elapsed();
        eprintln!(
            "redis listing {name}: first page ({} trees) {first:?}, next page ({}) {second:?}",
            page.len(),
            next.len()
        );
        assert!(!page.is_empty(), "{name}");
        assert!(
            page.windows(2).all(|w| w[0].id > w[1].id),
            "{name}: newest first"
        );
    }
}

#[test]
fn redis_documents() {
    let server = RedisServer::start();
    let s = open(&server.url()).unwrap();
    let text = |kind: &str, key: &str| s.doc(kind, key).unwrap().map(|d| d.value);
    assert_eq!(s.doc("ws", "a").unwrap(), None);
    assert!(s.create_doc("ws", "a", "1").unwrap());
    assert!(
        !s.create_doc("ws", "a", "2").unwrap(),
        "create keeps the first"
    );
    assert_eq!(text("ws", "a").as_deref(), Some("1"));
    s.put_doc("ws", "a", Some("3")).unwrap();
    s.put_doc("ws", "ab", Some("4")).unwrap();
    s.put_doc("ws", "b", Some("5")).unwrap();
    s.put_doc("member", "a/x", Some("6")).unwrap();
    s.put_doc("member", "é/x", Some("7")).unwrap();
    let pairs = |v: Vec<(String, Doc)>| -> Vec<(String, String)> {
        v.into_iter().map(|(k, d)| (k, d.value)).collect()
    };
    let want = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        pairs(s.docs("ws", "").unwrap()),
        want(&[("a", "3"), ("ab", "4"), ("b", "5")])
    );
    assert_eq!(
        pairs(s.docs("ws", "a").unwrap()),
        want(&[("a", "3"), ("ab", "4")])
    );
    assert_eq!(pairs(s.docs("member", "é").unwrap()), want(&[("é/x", "7")]));
    assert!(s.docs("ws", "c").unwrap().is_empty());
    s.put_doc("ws", "a", None).unwrap();
    s.put_doc("ws", "zz", None).unwrap();
    assert_eq!(s.doc("ws", "a").unwrap(), None);
    assert_eq!(pairs(s.docs("ws", "a").unwrap()), want(&[("ab", "4")]));
    assert!(
        s.create_doc("ws", "a", "8").unwrap(),
        "a deleted key is free again"
    );
}

/// Documents an earlier muster wrote (a value in `docs:<kind>`, no version): they read as they
/// did, at version 1, and compare-and-set works on them from there.
#[test]
fn redis_documents_written_before_versions() {
    let server = RedisServer::start();
    let s = open(&server.url()).unwrap();
    let hset = |key: &str, field: &str, value: &str| {
        let r = raw_args(server.port, &["HSET", key, field, value]);
        assert!(r.starts_with(':'), "{r}");
    };
    let zadd = |key: &str, member: &str| {
        let r = raw_args(server.port, &["ZADD", key, "0", member]);
        assert!(r.starts_with(':'), "{r}");
    };
    hset("muster:docs:member", "acme/ann", "\"admin\"");
    zadd("muster:dockeys:member", "acme/ann");
    hset("muster:docs:member", "acme/bob", "\"viewer\"");
    zadd("muster:dockeys:member", "acme/bob");
    assert_eq!(
        s.doc("member", "acme/ann").unwrap(),
        Some(Doc {
            value: "\"admin\"".into(),
            version: Version(1)
        })
    );
    assert_eq!(
        s.docs("member", "acme/")
            .unwrap()
            .into_iter()
            .map(|(k, d)| (k, d.version))
            .collect::<Vec<_>>(),
        [
            ("acme/ann".to_string(), Version(1)),
            ("acme/bob".to_string(), Version(1))
        ]
    );
    assert!(!s
        .put_doc_if("member", "acme/ann", "\"x\"", Version(2))
        .unwrap());
    assert_eq!(
        s.write_doc(
            "member",
            "acme/ann",
            Some("\"operator\""),
            DocCond::At(Version(1))
        )
        .unwrap(),
        DocWrite::Done(Some(Version(2)))
    );
    // Deleted and created again: never version 1 again.
    assert!(s.delete_doc_if("member", "acme/bob", Version(1)).unwrap());
    match s
        .write_doc("member", "acme/bob", Some("\"viewer\""), DocCond::Absent)
        .unwrap()
    {
        DocWrite::Done(Some(v)) => assert!(v > Version(1), "{v}"),
        other => panic!("{other:?}"),
    }
}

/// Several stores (separate clients, as several servers are) on one Redis: a counter
/// incremented through the compare-and-set loop from all of them loses nothing, and a
/// single-use document raced from two of them is spent exactly once, round after round.
#[test]
fn redis_compare_and_set_documents_across_clients() {
    const COUNTER: Docs<u64> = Docs::new("counter");
    const USES: Docs<u32> = Docs::new("uses");
    let server = RedisServer::start();
    let stores: Vec<Arc<dyn Store>> = (0..4).map(|_| open(&server.url()).unwrap()).collect();
    let (threads, each) = (8, 100);
    let barrier = Barrier::new(threads);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for i in 0..threads {
            let (s, barrier) = (&stores[i % stores.len()], &barrier);
            scope.spawn(move || {
                barrier.wait();
                for _ in 0..each {
                    COUNTER
                        .update(&**s, "c", |n| Some(n.unwrap_or(0) + 1))
                        .unwrap();
                }
            });
        }
    });
    eprintln!(
        "redis: {} CAS increments over {} clients in {:?}",
        threads * each,
        stores.len(),
        started.elapsed()
    );
    for s in &stores {
        assert_eq!(
            COUNTER.get(&**s, "c").unwrap().map(|(n, _)| n),
            Some((threads * each) as u64)
        );
    }
    // Single use, two clients, several racers on each, 20 rounds.
    let (a, b) = (&stores[0], &stores[1]);
    for round in 0..20 {
        let key = format!("token-{round}");
        assert!(USES.create(&**a, &key, &1).unwrap().is_some());
        let barrier = Barrier::new(6);
        let wins: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..6)
                .map(|i| {
                    let (s, barrier, key) = (if i % 2 == 0 { a } else { b }, &barrier, &key);
                    scope.spawn(move || {
                        barrier.wait();
                        let mut spent = false;
                        USES.update(&**s, key, |left| {
                            spent = left.is_some_and(|n| n > 0);
                            left.filter(|n| *n > 1).map(|n| n - 1)
                        })
                        .unwrap();
                        usize::from(spent)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1, "round {round}: a single use is spent exactly once");
        assert_eq!(USES.get(&**b, &key).unwrap(), None);
    }
}
