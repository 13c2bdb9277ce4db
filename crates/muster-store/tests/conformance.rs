//! Runs the conformance suite against the memory and SQLite engines, plus SQLite-only checks:
//! data survives reopening the file, and a 100,000-job tree is stored and read back.

use muster_store::conformance::{self, fixture, tags};
use muster_store::{open, Change, Created, Store, TreeFilter};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "muster-store-{what}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn url(&self, file: &str) -> String {
        format!("sqlite://{}", self.0.join(file).display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn memory_conforms() {
    conformance::run_all(&|| open("memory://").unwrap());
}

#[test]
fn sqlite_conforms() {
    let dir = TempDir::new("conformance");
    let n = AtomicUsize::new(0);
    conformance::run_all(&|| {
        let i = n.fetch_add(1, Ordering::Relaxed);
        // A subdirectory that does not exist yet: open creates it.
        open(&dir.url(&format!("db{i}/muster.db"))).unwrap()
    });
}

#[test]
fn unknown_urls_are_refused() {
    assert!(open("postgres://x").is_err());
    assert!(open("sqlite://").is_err());
}

#[test]
fn sqlite_survives_reopening() {
    let dir = TempDir::new("reopen");
    let url = dir.url("data/muster.db");
    let (tree, jobs) = fixture(tags("ws"), 5);
    {
        let s = open(&url).unwrap();
        assert_eq!(
            s.create_tree(&tree, &jobs, Some("key")).unwrap(),
            Created::New
        );
        let mut running = jobs[1].clone();
        running.state = muster_core::JobState::Running;
        let got = s
            .apply(&[
                Change::Job {
                    job: running,
                    expect: muster_core::JobState::Waiting,
                },
                Change::Log {
                    job: jobs[1].id,
                    attempt: 1,
                    blob: "logs/1".into(),
                },
            ])
            .unwrap();
        assert_eq!(got, vec![true, true]);
        s.set_meta("cluster", Some("c1")).unwrap();
    }
    let s = open(&url).unwrap();
    assert_eq!(s.tree(tree.id).unwrap(), Some(tree.clone()));
    let stored = s.tree_jobs(tree.id).unwrap();
    assert_eq!(stored.len(), 5);
    assert_eq!(stored[1].state, muster_core::JobState::Running);
    assert_eq!(
        s.log_blob(jobs[1].id, 1).unwrap().as_deref(),
        Some("logs/1")
    );
    assert_eq!(s.meta("cluster").unwrap().as_deref(), Some("c1"));
    let (other, other_jobs) = fixture(tags("ws"), 1);
    assert_eq!(
        s.create_tree(&other, &other_jobs, Some("key")).unwrap(),
        Created::Existing(tree.id)
    );
    assert_eq!(
        s.list_trees(&TreeFilter::default(), None, 10)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn sqlite_stores_a_100k_job_tree() {
    let dir = TempDir::new("big");
    let s: Arc<dyn Store> = open(&dir.url("muster.db")).unwrap();
    let (tree, jobs) = fixture(tags("ws"), 100_000);
    let started = Instant::now();
    assert_eq!(s.create_tree(&tree, &jobs, None).unwrap(), Created::New);
    let created = started.elapsed();
    let started = Instant::now();
    let back = s.tree_jobs(tree.id).unwrap();
    let read = started.elapsed();
    assert_eq!(back.len(), 100_000);
    assert_eq!(back[0], jobs[0]);
    assert_eq!(back[99_999], jobs[99_999]);
    // Move them all in batches of 5,000, as the job manager would.
    let started = Instant::now();
    for chunk in jobs.chunks(5_000) {
        let changes: Vec<Change> = chunk
            .iter()
            .map(|j| {
                let mut moved = j.clone();
                moved.state = muster_core::JobState::Running;
                Change::Job {
                    job: moved,
                    expect: muster_core::JobState::Waiting,
                }
            })
            .collect();
        assert!(s.apply(&changes).unwrap().iter().all(|a| *a));
    }
    let applied = started.elapsed();
    eprintln!(
        "100k-job tree: create {created:?}, read {read:?}, apply 100k job changes {applied:?}"
    );
}

#[test]
fn migrate_copies_everything_and_is_idempotent() {
    use muster_store::conformance::{fixture, tags};
    use muster_store::migrate::migrate;
    use muster_store::{Change, User};
    let from = open("memory://").unwrap();
    let dir = TempDir::new("migrate");
    let to = open(&dir.url("to.db")).unwrap();
    let mut ids = Vec::new();
    for i in 0..1203 {
        let (tree, jobs) = fixture(tags(if i % 2 == 0 { "a" } else { "b" }), 3);
        from.create_tree(&tree, &jobs, None).unwrap();
        ids.push((tree.id, jobs[1].id));
    }
    from.apply(&[Change::Log {
        job: ids[7].1,
        attempt: 1,
        blob: "ab".repeat(32),
    }])
    .unwrap();
    from.put_user(&User {
        name: "ann".into(),
        password_hash: "$argon2id$x".into(),
        admin: true,
        created_at: muster_core::Ts(1),
    })
    .unwrap();
    from.put_doc("member", "a/ann", Some("\"admin\"")).unwrap();
    from.set_meta("cluster_name", Some("prod")).unwrap();
    let m = migrate(&*from, &*to, |_| {}).unwrap();
    assert_eq!(
        (m.trees, m.jobs, m.logs, m.users, m.docs),
        (1203, 3609, 1, 1, 1)
    );
    assert_eq!(to.tree_jobs(ids[1000].0).unwrap().len(), 3);
    assert_eq!(to.log_blob(ids[7].1, 1).unwrap(), Some("ab".repeat(32)));
    assert_eq!(to.meta("cluster_name").unwrap().as_deref(), Some("prod"));
    assert_eq!(
        to.doc("member", "a/ann")
            .unwrap()
            .map(|d| d.value)
            .as_deref(),
        Some("\"admin\"")
    );
    let again = migrate(&*from, &*to, |_| {}).unwrap();
    assert_eq!((again.trees, again.skipped_trees), (0, 1203));
}

/// A database of schema version 1 (documents without versions), as the previous muster wrote
/// it: opening it keeps every document, each at version 1, and writes move on from there.
#[test]
fn sqlite_version_1_documents_get_versions() {
    use muster_store::{DocCond, DocWrite, Version};
    let dir = TempDir::new("schema1");
    let path = dir.0.join("old.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE docs (kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
                 PRIMARY KEY (kind, key)) WITHOUT ROWID;
             INSERT INTO docs VALUES ('member', 'acme/ann', '\"admin\"');
             INSERT INTO docs VALUES ('member', 'acme/bob', '\"viewer\"');
             INSERT INTO docs VALUES ('join_token', 'abc', '{}');
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let url = format!("sqlite://{}", path.display());
    let s = open(&url).unwrap();
    let members = s.docs("member", "acme/").unwrap();
    assert_eq!(
        members
            .iter()
            .map(|(k, d)| (k.as_str(), d.value.as_str(), d.version))
            .collect::<Vec<_>>(),
        [
            ("acme/ann", "\"admin\"", Version(1)),
            ("acme/bob", "\"viewer\"", Version(1))
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
    // A deleted old document that comes back does not show version 1 again.
    assert!(s.delete_doc_if("join_token", "abc", Version(1)).unwrap());
    match s
        .write_doc("join_token", "abc", Some("{}"), DocCond::Absent)
        .unwrap()
    {
        DocWrite::Done(Some(v)) => assert!(v > Version(1), "{v}"),
        other => panic!("{other:?}"),
    }
    drop(s);
    // Reopening a version-2 file changes nothing.
    let s = open(&url).unwrap();
    assert_eq!(
        s.doc("member", "acme/ann").unwrap().unwrap().version,
        Version(2)
    );
    assert_eq!(
        s.doc("member", "acme/bob").unwrap().unwrap().version,
        Version(1)
    );
    let v: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 2);
}

/// Two stores on one file (as two processes would be), each with threads, increment one
/// counter through the compare-and-set loop: nothing is lost across connections.
#[test]
fn sqlite_counter_race_across_two_stores() {
    use muster_store::Docs;
    const N: Docs<u64> = Docs::new("counter");
    let dir = TempDir::new("race");
    let url = dir.url("shared.db");
    let stores = [open(&url).unwrap(), open(&url).unwrap()];
    let (threads, each) = (8, 50);
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|scope| {
        for i in 0..threads {
            let (s, barrier) = (&stores[i % 2], &barrier);
            scope.spawn(move || {
                barrier.wait();
                for _ in 0..each {
                    N.update(&**s, "c", |n| Some(n.unwrap_or(0) + 1)).unwrap();
                }
            });
        }
    });
    for s in &stores {
        assert_eq!(
            N.get(&**s, "c").unwrap().map(|(n, _)| n),
            Some((threads * each) as u64)
        );
    }
}
