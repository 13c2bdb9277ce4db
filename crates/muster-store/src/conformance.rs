//! The storage conformance suite: the behaviour every [`Store`] engine must show.
//!
//! An engine's tests call [`run_all`] with a function making a fresh, empty store; each check gets
//! its own store and panics with a message naming the check and what differed. The checks are
//! also `pub`, one by one, for running a single one while working on an engine.
//!
//! Ids come from [`Uuid::now_v7`], so trees made later sort newer, as in the server.

use crate::{
    Change, Created, Doc, DocCond, DocWrite, Docs, Event, Node, Store, Token, TreeFilter, User,
    Version, SETUP_CODE_KEY,
};
use muster_core::{Job, JobState, OnFailure, Run, Tags, Tree, TreeState, Ts, Uuid};
use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// A check of the suite.
pub type Check = fn(&dyn Store);

/// Every check, by name, in the order [`run_all`] runs them.
pub const CHECKS: &[(&str, Check)] = &[
    ("create_and_read", create_and_read),
    ("idempotency_key", idempotency_key),
    ("apply_compare_and_set", apply_compare_and_set),
    ("apply_batch_visible", apply_batch_visible),
    ("tree_update_and_state_filter", tree_update_and_state_filter),
    ("list_filters", list_filters),
    ("list_paging", list_paging),
    ("running_trees", running_trees),
    ("log_blobs", log_blobs),
    ("purge_finished", purge_finished),
    ("setup_code", setup_code),
    ("setup_code_race", setup_code_race),
    ("users_crud", users_crud),
    ("tokens_crud", tokens_crud),
    ("meta_values", meta_values),
    ("nodes_crud", nodes_crud),
    ("documents", documents),
    ("document_versions", document_versions),
    ("document_put_if", document_put_if),
    ("document_create_if_absent", document_create_if_absent),
    ("document_delete_if", document_delete_if),
    ("typed_documents", typed_documents),
    ("document_counter_race", document_counter_race),
    ("document_spend_race", document_spend_race),
    ("leases", leases),
    ("events_in_order", events_in_order),
    ("ping", ping),
];

/// Runs every check of [`CHECKS`], each on a fresh store from `make`.
///
/// Panics on the first failing check, naming it.
pub fn run_all(make: &dyn Fn() -> Arc<dyn Store>) {
    for (name, check) in CHECKS {
        let store = make();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&*store)));
        if let Err(panic) = outcome {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            panic!("store conformance check `{name}` failed: {msg}");
        }
    }
}

/// Tags in workspace `ws` with no other tag.
pub fn tags(ws: &str) -> Tags {
    Tags {
        workspace: ws.to_string(),
        ..Tags::default()
    }
}

/// A running tree of `n` jobs (at least 1) with `tags`: the root, whose id names the tree, then
/// `n - 1` children of the root. The jobs are returned in creation order, which on purpose is
/// not the order of their ids (the children's ids decrease, and all are older than the root's).
pub fn fixture(tags: Tags, n: usize) -> (Tree, Vec<Job>) {
    let n = n.max(1);
    let mut ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let root = ids.pop().unwrap_or_else(Uuid::now_v7);
    ids.reverse();
    let now = Ts(1_800_000_000_000);
    let job = |id: Uuid, parent: Option<Uuid>, children: Vec<Uuid>, key: String| Job {
        id,
        tree: root,
        parent,
        children,
        needs: Vec::new(),
        name: key.clone(),
        key,
        state: JobState::Waiting,
        node: None,
        want_node: None,
        node_selector: BTreeMap::new(),
        run: Run::Noop,
        timeout_s: Some(60),
        retries: 0,
        created_at: now,
        started_at: None,
        finished_at: None,
        exit_code: None,
        error: None,
        attempt: 1,
        retry_at: None,
        result: None,
        hook: None,
    };
    let mut jobs = Vec::with_capacity(n);
    jobs.push(job(root, None, ids.clone(), "root".to_string()));
    for (i, id) in ids.iter().enumerate() {
        jobs.push(job(*id, Some(root), Vec::new(), format!("job-{i}")));
    }
    let tree = Tree {
        id: root,
        name: "root".to_string(),
        tags,
        on_failure: OnFailure::Abort,
        state: TreeState::Running,
        user_aborted: false,
        created_at: now,
        finished_at: None,
        jobs: n as u32,
        created_by: Some("tester".to_string()),
        nodes: Vec::new(),
        admin: false,
        request_digest: None,
    };
    (tree, jobs)
}

/// Creates a fixture tree of `n` jobs in `store` and returns it.
fn make_tree(store: &dyn Store, tags: Tags, n: usize) -> (Tree, Vec<Job>) {
    let (tree, jobs) = fixture(tags, n);
    assert_eq!(
        store.create_tree(&tree, &jobs, None).expect("create_tree"),
        Created::New
    );
    (tree, jobs)
}

/// Moves `tree` to `state`, finished at `at`, through [`Store::apply`].
fn finish(store: &dyn Store, tree: &Tree, state: TreeState, at: Ts) -> Tree {
    let mut t = tree.clone();
    t.state = state;
    t.finished_at = Some(at);
    assert_eq!(
        store.apply(&[Change::Tree(t.clone())]).expect("apply"),
        vec![true],
        "tree update not applied"
    );
    t
}

fn ids(trees: &[Tree]) -> Vec<Uuid> {
    trees.iter().map(|t| t.id).collect()
}

fn moved(job: &Job, state: JobState) -> Job {
    let mut j = job.clone();
    j.state = state;
    if state == JobState::Running {
        j.started_at = Some(Ts(1_800_000_001_000));
        j.node = Some("node-1".to_string());
    }
    if state.is_final() {
        j.finished_at = Some(Ts(1_800_000_002_000));
        j.exit_code = Some(0);
    }
    j
}

/// A tree and its jobs read back equal what was created; jobs come in creation order.
pub fn create_and_read(s: &dyn Store) {
    let (tree, jobs) = fixture(
        Tags {
            workspace: "ws".into(),
            application: Some("app".into()),
            version: Some("1.0".into()),
            instance: Some("prod".into()),
            labels: BTreeMap::from([("team".to_string(), "core".to_string())]),
        },
        6,
    );
    assert_eq!(s.create_tree(&tree, &jobs, None).unwrap(), Created::New);
    assert_eq!(
        s.tree(tree.id).unwrap().as_ref(),
        Some(&tree),
        "tree read back"
    );
    for j in &jobs {
        assert_eq!(s.job(j.id).unwrap().as_ref(), Some(j), "job read back");
    }
    assert_eq!(
        s.tree_jobs(tree.id).unwrap(),
        jobs,
        "tree_jobs must list the jobs in creation order"
    );
    let unknown = Uuid::now_v7();
    assert_eq!(s.tree(unknown).unwrap(), None, "unknown tree");
    assert_eq!(s.job(unknown).unwrap(), None, "unknown job");
    assert!(
        s.tree_jobs(unknown).unwrap().is_empty(),
        "jobs of an unknown tree"
    );
    // A second tree does not mix with the first.
    let (other, other_jobs) = make_tree(s, tags("ws"), 2);
    assert_eq!(s.tree_jobs(other.id).unwrap(), other_jobs);
    assert_eq!(s.tree_jobs(tree.id).unwrap(), jobs);
}

/// A reused idempotency key returns the first tree and writes nothing.
pub fn idempotency_key(s: &dyn Store) {
    let (first, first_jobs) = fixture(tags("ws"), 3);
    assert_eq!(
        s.create_tree(&first, &first_jobs, Some("key-1")).unwrap(),
        Created::New
    );
    let (second, second_jobs) = fixture(tags("ws"), 3);
    assert_eq!(
        s.create_tree(&second, &second_jobs, Some("key-1")).unwrap(),
        Created::Existing(first.id),
        "a reused key must name the first tree"
    );
    assert_eq!(
        s.tree(second.id).unwrap(),
        None,
        "a reused key must not store the new tree"
    );
    for j in &second_jobs {
        assert_eq!(
            s.job(j.id).unwrap(),
            None,
            "a reused key must not store the new jobs"
        );
    }
    assert_eq!(
        ids(&s.list_trees(&TreeFilter::default(), None, 10).unwrap()),
        vec![first.id]
    );
    assert_eq!(
        s.create_tree(&second, &second_jobs, Some("key-2")).unwrap(),
        Created::New,
        "another key"
    );
    assert_eq!(s.tree_jobs(second.id).unwrap(), second_jobs);
}

/// Job writes are compare-and-set on the stored state.
pub fn apply_compare_and_set(s: &dyn Store) {
    let (tree, jobs) = make_tree(s, tags("ws"), 4);
    let (j1, j2, j3) = (&jobs[1], &jobs[2], &jobs[3]);
    let mut placed = tree.clone();
    placed.nodes = vec!["node-1".to_string()];
    let ghost = moved(&fixture(tags("ws"), 1).1[0], JobState::Running);
    let mut ghost_tree = fixture(tags("ws"), 1).0;
    ghost_tree.state = TreeState::Failed;
    let got = s
        .apply(&[
            Change::Job {
                job: moved(j1, JobState::Running),
                expect: JobState::Waiting,
            },
            Change::Job {
                job: moved(j2, JobState::Succeeded),
                expect: JobState::Running,
            },
            Change::Job {
                job: ghost.clone(),
                expect: JobState::Waiting,
            },
            Change::Log {
                job: j1.id,
                attempt: 1,
                blob: "logs/j1-1".to_string(),
            },
            Change::Tree(placed.clone()),
            Change::Tree(ghost_tree.clone()),
            Change::Job {
                job: moved(j3, JobState::Running),
                expect: JobState::Waiting,
            },
            Change::Job {
                job: moved(j3, JobState::Succeeded),
                expect: JobState::Running,
            },
        ])
        .unwrap();
    assert_eq!(
        got,
        vec![true, false, false, true, true, false, true, true],
        "matching expect applies; stale expect, unknown job and unknown tree do not"
    );
    assert_eq!(
        s.job(j1.id).unwrap(),
        Some(moved(j1, JobState::Running)),
        "applied job"
    );
    assert_eq!(
        s.job(j2.id).unwrap().as_ref(),
        Some(j2),
        "a stale write must leave the job as it was"
    );
    assert_eq!(
        s.job(ghost.id).unwrap(),
        None,
        "an unknown job must not be created"
    );
    assert_eq!(
        s.tree(ghost_tree.id).unwrap(),
        None,
        "an unknown tree must not be created"
    );
    assert_eq!(
        s.job(j3.id).unwrap(),
        Some(moved(j3, JobState::Succeeded)),
        "two steps in one batch"
    );
    assert_eq!(s.log_blob(j1.id, 1).unwrap().as_deref(), Some("logs/j1-1"));
    assert_eq!(s.tree(tree.id).unwrap(), Some(placed));
    // The stale writer's view is refused again; the fresh one applies.
    let again = s
        .apply(&[
            Change::Job {
                job: moved(j1, JobState::Failed),
                expect: JobState::Waiting,
            },
            Change::Job {
                job: moved(j1, JobState::Failed),
                expect: JobState::Running,
            },
        ])
        .unwrap();
    assert_eq!(again, vec![false, true]);
    assert_eq!(
        s.job(j1.id).unwrap().map(|j| j.state),
        Some(JobState::Failed)
    );
    assert!(s.apply(&[]).unwrap().is_empty(), "an empty batch");
}

/// Every change of an applied batch is readable afterwards.
pub fn apply_batch_visible(s: &dyn Store) {
    let (tree, jobs) = make_tree(s, tags("ws"), 300);
    let mut changes: Vec<Change> = jobs
        .iter()
        .map(|j| Change::Job {
            job: moved(j, JobState::Running),
            expect: JobState::Waiting,
        })
        .collect();
    changes.extend(jobs.iter().map(|j| Change::Log {
        job: j.id,
        attempt: 1,
        blob: format!("logs/{}", j.id),
    }));
    let mut placed = tree.clone();
    placed.nodes = vec!["node-1".to_string()];
    changes.push(Change::Tree(placed.clone()));
    let got = s.apply(&changes).unwrap();
    assert_eq!(got.len(), changes.len(), "one answer per change");
    assert!(got.iter().all(|a| *a), "every change applies");
    let stored = s.tree_jobs(tree.id).unwrap();
    let want: Vec<Job> = jobs.iter().map(|j| moved(j, JobState::Running)).collect();
    assert_eq!(
        stored, want,
        "every job of the batch is readable, in creation order"
    );
    for j in &jobs {
        assert_eq!(s.log_blob(j.id, 1).unwrap(), Some(format!("logs/{}", j.id)));
    }
    assert_eq!(s.tree(tree.id).unwrap(), Some(placed));
}

/// A tree update changes its state, as read and as filtered on.
pub fn tree_update_and_state_filter(s: &dyn Store) {
    let (a, _) = make_tree(s, tags("ws"), 1);
    let (b, _) = make_tree(s, tags("ws"), 1);
    let running = TreeFilter {
        state: Some(TreeState::Running),
        ..TreeFilter::default()
    };
    let succeeded = TreeFilter {
        state: Some(TreeState::Succeeded),
        ..TreeFilter::default()
    };
    assert_eq!(
        ids(&s.list_trees(&running, None, 10).unwrap()),
        vec![b.id, a.id]
    );
    assert!(s.list_trees(&succeeded, None, 10).unwrap().is_empty());
    let mut done = finish(s, &a, TreeState::Succeeded, Ts(1_800_000_100_000));
    assert_eq!(s.tree(a.id).unwrap().as_ref(), Some(&done));
    assert_eq!(ids(&s.list_trees(&running, None, 10).unwrap()), vec![b.id]);
    assert_eq!(
        s.list_trees(&succeeded, None, 10).unwrap(),
        vec![done.clone()]
    );
    assert_eq!(ids(&s.running_trees().unwrap()), vec![b.id]);
    done.user_aborted = true;
    done.state = TreeState::Aborted;
    s.apply(&[Change::Tree(done.clone())]).unwrap();
    assert!(
        s.list_trees(&succeeded, None, 10).unwrap().is_empty(),
        "state filter follows updates"
    );
    let aborted = TreeFilter {
        state: Some(TreeState::Aborted),
        ..TreeFilter::default()
    };
    assert_eq!(s.list_trees(&aborted, None, 10).unwrap(), vec![done]);
}

/// Every filter of a listing, alone and combined, newest first.
pub fn list_filters(s: &dyn Store) {
    let t = |ws: &str, app: Option<&str>, ver: Option<&str>, inst: Option<&str>| Tags {
        workspace: ws.into(),
        application: app.map(Into::into),
        version: ver.map(Into::into),
        instance: inst.map(Into::into),
        labels: BTreeMap::new(),
    };
    let specs = [
        (t("a", Some("x"), Some("1"), Some("i1")), vec!["n1"]),
        (t("b", Some("x"), Some("2"), Some("i2")), vec!["n2"]),
        (t("a", Some("y"), Some("1"), Some("i1")), vec!["n1"]),
        (t("c", None, None, None), vec![]),
        (t("a", Some("x"), Some("2"), Some("i2")), vec!["n2"]),
        (t("b", Some("y"), Some("1"), None), vec![]),
    ];
    let mut trees = Vec::new();
    for (tags, nodes) in specs {
        let (mut tree, jobs) = fixture(tags, 2);
        tree.nodes = nodes.into_iter().map(String::from).collect();
        assert_eq!(s.create_tree(&tree, &jobs, None).unwrap(), Created::New);
        trees.push(tree);
    }
    // Node lists and states set after creation too.
    let mut t2 = trees[2].clone();
    t2.nodes.push("n2".into());
    t2.state = TreeState::Succeeded;
    t2.finished_at = Some(Ts(1_800_000_100_000));
    let mut t5 = trees[5].clone();
    t5.nodes.push("n1".into());
    t5.state = TreeState::Aborted;
    t5.finished_at = Some(Ts(1_800_000_100_000));
    let mut t3 = trees[3].clone();
    t3.state = TreeState::Failed;
    t3.finished_at = Some(Ts(1_800_000_100_000));
    assert_eq!(
        s.apply(&[
            Change::Tree(t2.clone()),
            Change::Tree(t5.clone()),
            Change::Tree(t3.clone())
        ])
        .unwrap(),
        vec![true; 3]
    );
    trees[2] = t2;
    trees[5] = t5;
    trees[3] = t3;
    let id = |i: usize| trees[i].id;
    let f = TreeFilter::default;
    let s_ = |v: &str| Some(v.to_string());
    // (name, filter, cursor, limit, the indexes of the trees expected, in order)
    type Case = (&'static str, TreeFilter, Option<Uuid>, usize, Vec<usize>);
    let cases: Vec<Case> = vec![
        ("no filter", f(), None, 100, vec![5, 4, 3, 2, 1, 0]),
        ("limit", f(), None, 2, vec![5, 4]),
        ("limit 0", f(), None, 0, vec![]),
        ("cursor", f(), Some(id(3)), 100, vec![2, 1, 0]),
        ("cursor and limit", f(), Some(id(4)), 2, vec![3, 2]),
        (
            "workspace",
            TreeFilter {
                workspace: s_("a"),
                ..f()
            },
            None,
            100,
            vec![4, 2, 0],
        ),
        (
            "unknown workspace",
            TreeFilter {
                workspace: s_("zz"),
                ..f()
            },
            None,
            100,
            vec![],
        ),
        (
            "workspace and cursor",
            TreeFilter {
                workspace: s_("a"),
                ..f()
            },
            Some(id(3)),
            100,
            vec![2, 0],
        ),
        (
            "workspaces",
            TreeFilter {
                workspaces: Some(vec!["a".into(), "b".into()]),
                ..f()
            },
            None,
            100,
            vec![5, 4, 2, 1, 0],
        ),
        (
            "workspaces, limit",
            TreeFilter {
                workspaces: Some(vec!["b".into(), "a".into()]),
                ..f()
            },
            None,
            3,
            vec![5, 4, 2],
        ),
        (
            "workspaces and cursor",
            TreeFilter {
                workspaces: Some(vec!["a".into(), "b".into()]),
                ..f()
            },
            Some(id(3)),
            100,
            vec![2, 1, 0],
        ),
        (
            "no workspaces",
            TreeFilter {
                workspaces: Some(vec![]),
                ..f()
            },
            None,
            100,
            vec![],
        ),
        (
            "workspaces and workspace",
            TreeFilter {
                workspaces: Some(vec!["b".into(), "c".into()]),
                workspace: s_("b"),
                ..f()
            },
            None,
            100,
            vec![5, 1],
        ),
        (
            "workspace outside workspaces",
            TreeFilter {
                workspaces: Some(vec!["b".into()]),
                workspace: s_("a"),
                ..f()
            },
            None,
            100,
            vec![],
        ),
        (
            "application",
            TreeFilter {
                application: s_("x"),
                ..f()
            },
            None,
            100,
            vec![4, 1, 0],
        ),
        (
            "version",
            TreeFilter {
                version: s_("1"),
                ..f()
            },
            None,
            100,
            vec![5, 2, 0],
        ),
        (
            "instance",
            TreeFilter {
                instance: s_("i2"),
                ..f()
            },
            None,
            100,
            vec![4, 1],
        ),
        (
            "node n1",
            TreeFilter {
                node: s_("n1"),
                ..f()
            },
            None,
            100,
            vec![5, 2, 0],
        ),
        (
            "node n2",
            TreeFilter {
                node: s_("n2"),
                ..f()
            },
            None,
            100,
            vec![4, 2, 1],
        ),
        (
            "node and cursor",
            TreeFilter {
                node: s_("n1"),
                ..f()
            },
            Some(id(5)),
            100,
            vec![2, 0],
        ),
        (
            "node and limit",
            TreeFilter {
                node: s_("n2"),
                ..f()
            },
            None,
            1,
            vec![4],
        ),
        (
            "unknown node",
            TreeFilter {
                node: s_("n9"),
                ..f()
            },
            None,
            100,
            vec![],
        ),
        (
            "state running",
            TreeFilter {
                state: Some(TreeState::Running),
                ..f()
            },
            None,
            100,
            vec![4, 1, 0],
        ),
        (
            "state failed",
            TreeFilter {
                state: Some(TreeState::Failed),
                ..f()
            },
            None,
            100,
            vec![3],
        ),
        (
            "workspace and application",
            TreeFilter {
                workspace: s_("a"),
                application: s_("x"),
                ..f()
            },
            None,
            100,
            vec![4, 0],
        ),
        (
            "node and workspace",
            TreeFilter {
                node: s_("n2"),
                workspace: s_("a"),
                ..f()
            },
            None,
            100,
            vec![4, 2],
        ),
        (
            "workspaces and state",
            TreeFilter {
                workspaces: Some(vec!["a".into(), "b".into()]),
                state: Some(TreeState::Running),
                ..f()
            },
            None,
            100,
            vec![4, 1, 0],
        ),
        (
            "every filter",
            TreeFilter {
                workspaces: Some(vec!["a".into()]),
                workspace: s_("a"),
                application: s_("x"),
                version: s_("2"),
                instance: s_("i2"),
                node: s_("n2"),
                state: Some(TreeState::Running),
            },
            None,
            100,
            vec![4],
        ),
    ];
    for (name, filter, cursor, limit, want) in cases {
        let got = s.list_trees(&filter, cursor, limit).unwrap();
        let want_ids: Vec<Uuid> = want.iter().map(|i| id(*i)).collect();
        assert_eq!(ids(&got), want_ids, "list_trees, {name}: {filter:?}");
        for tree in &got {
            let i = trees.iter().position(|t| t.id == tree.id).unwrap();
            assert_eq!(
                tree, &trees[i],
                "list_trees, {name}: the listed tree is the stored one"
            );
        }
    }
}

/// Paging with the last id as cursor visits every tree once, newest first.
pub fn list_paging(s: &dyn Store) {
    let mut p = Vec::new();
    let mut all = Vec::new();
    for i in 0..23 {
        let (tree, _) = make_tree(s, tags("p"), 1);
        p.push(tree.id);
        all.push(tree.id);
        if i % 3 == 0 {
            let (other, _) = make_tree(s, tags("q"), 1);
            all.push(other.id);
        }
    }
    p.reverse();
    all.reverse();
    let page_through = |filter: &TreeFilter, limit: usize| {
        let mut seen = Vec::new();
        let mut cursor = None;
        for _ in 0..100 {
            let page = s.list_trees(filter, cursor, limit).unwrap();
            assert!(page.len() <= limit, "a page longer than the limit");
            seen.extend(ids(&page));
            if page.len() < limit {
                return seen;
            }
            cursor = page.last().map(|t| t.id);
        }
        panic!("paging does not end");
    };
    assert_eq!(
        page_through(&TreeFilter::default(), 7),
        all,
        "paging every tree"
    );
    assert_eq!(
        page_through(&TreeFilter::default(), 1),
        all,
        "paging one by one"
    );
    let wp = TreeFilter {
        workspace: Some("p".into()),
        ..TreeFilter::default()
    };
    assert_eq!(page_through(&wp, 5), p, "paging one workspace");
    let wpq = TreeFilter {
        workspaces: Some(vec!["q".into(), "p".into()]),
        ..TreeFilter::default()
    };
    assert_eq!(page_through(&wpq, 4), all, "paging a workspace set");
    assert_eq!(
        page_through(&TreeFilter::default(), all.len()),
        all,
        "a page exactly as long as the list"
    );
}

/// `running_trees` lists exactly the running trees.
pub fn running_trees(s: &dyn Store) {
    assert!(s.running_trees().unwrap().is_empty());
    let (a, _) = make_tree(s, tags("ws"), 2);
    let (b, _) = make_tree(s, tags("other"), 2);
    let (c, _) = make_tree(s, tags("ws"), 2);
    finish(s, &b, TreeState::Failed, Ts(1_800_000_100_000));
    let mut got = ids(&s.running_trees().unwrap());
    got.sort();
    assert_eq!(got, vec![a.id, c.id]);
    let t = s
        .running_trees()
        .unwrap()
        .into_iter()
        .find(|t| t.id == a.id)
        .unwrap();
    assert_eq!(t, a);
}

/// Log records are per job and attempt; a later record of the same attempt replaces it.
pub fn log_blobs(s: &dyn Store) {
    let (_, jobs) = make_tree(s, tags("ws"), 2);
    let j = jobs[1].id;
    assert_eq!(s.log_blob(j, 1).unwrap(), None);
    let log = |attempt, blob: &str| Change::Log {
        job: j,
        attempt,
        blob: blob.to_string(),
    };
    assert_eq!(
        s.apply(&[log(1, "b1"), log(2, "b2")]).unwrap(),
        vec![true, true]
    );
    assert_eq!(s.apply(&[log(1, "b1x")]).unwrap(), vec![true]);
    assert_eq!(s.log_blob(j, 1).unwrap().as_deref(), Some("b1x"));
    assert_eq!(s.log_blob(j, 2).unwrap().as_deref(), Some("b2"));
    assert_eq!(s.log_blob(j, 3).unwrap(), None);
    assert_eq!(s.log_blob(jobs[0].id, 1).unwrap(), None);
}

/// Purging removes only finished trees older than the cutoff, with everything of theirs, and
/// reports only the blobs no remaining job uses.
pub fn purge_finished(s: &dyn Store) {
    let cutoff = Ts(1_800_000_050_000);
    let old = Ts(1_800_000_010_000);
    let recent = Ts(1_800_000_090_000);
    let mk = |key: Option<&str>, nodes: &[&str]| {
        let (mut tree, jobs) = fixture(tags("ws"), 3);
        tree.nodes = nodes.iter().map(|n| n.to_string()).collect();
        assert_eq!(s.create_tree(&tree, &jobs, key).unwrap(), Created::New);
        (tree, jobs)
    };
    let log = |job: &Job, attempt: u32, blob: &str| Change::Log {
        job: job.id,
        attempt,
        blob: blob.into(),
    };
    let (a, a_jobs) = mk(Some("key-a"), &["n1"]);
    let (b, b_jobs) = mk(None, &["n1"]);
    let (c, c_jobs) = mk(None, &["n1"]);
    let (d, d_jobs) = mk(None, &["n1"]);
    s.apply(&[
        log(&a_jobs[0], 1, "a1"),
        log(&a_jobs[1], 1, "shared"),
        log(&a_jobs[1], 2, "a2"),
        log(&a_jobs[2], 1, "ab"),
        log(&b_jobs[1], 1, "b1"),
        log(&b_jobs[2], 1, "ab"),
        log(&c_jobs[1], 1, "shared"),
        log(&d_jobs[1], 1, "d1"),
    ])
    .unwrap();
    let a = finish(s, &a, TreeState::Succeeded, old);
    let b = finish(s, &b, TreeState::Failed, Ts(old.0 + 1));
    let c = finish(s, &c, TreeState::Succeeded, recent);
    // d keeps running.

    let (none, none_blobs) = s.purge_finished(Ts(old.0 - 1), 10).unwrap();
    assert!(
        none.is_empty() && none_blobs.is_empty(),
        "nothing finished before the cutoff"
    );

    let (mut purged, mut blobs) = s.purge_finished(cutoff, 10).unwrap();
    purged.sort();
    blobs.sort();
    let mut want = vec![a.id, b.id];
    want.sort();
    assert_eq!(
        purged, want,
        "only the finished trees older than the cutoff"
    );
    assert_eq!(
        blobs,
        vec!["a1", "a2", "ab", "b1"],
        "only the blobs no remaining job uses"
    );
    for (tree, jobs) in [(&a, &a_jobs), (&b, &b_jobs)] {
        assert_eq!(s.tree(tree.id).unwrap(), None, "purged tree");
        assert!(
            s.tree_jobs(tree.id).unwrap().is_empty(),
            "jobs of a purged tree"
        );
        for j in jobs {
            assert_eq!(s.job(j.id).unwrap(), None, "job of a purged tree");
            assert_eq!(
                s.log_blob(j.id, 1).unwrap(),
                None,
                "log record of a purged job"
            );
        }
    }
    let node = TreeFilter {
        node: Some("n1".into()),
        ..TreeFilter::default()
    };
    assert_eq!(
        ids(&s.list_trees(&node, None, 10).unwrap()),
        vec![d.id, c.id],
        "node index after purge"
    );
    assert_eq!(
        ids(&s.list_trees(&TreeFilter::default(), None, 10).unwrap()),
        vec![d.id, c.id]
    );
    assert_eq!(s.tree(c.id).unwrap(), Some(c.clone()));
    assert_eq!(s.tree_jobs(d.id).unwrap(), d_jobs);
    assert_eq!(
        s.log_blob(c_jobs[1].id, 1).unwrap().as_deref(),
        Some("shared")
    );
    assert_eq!(s.log_blob(d_jobs[1].id, 1).unwrap().as_deref(), Some("d1"));
    // The idempotency key went with its tree.
    let (again, again_jobs) = fixture(tags("ws"), 1);
    assert_eq!(
        s.create_tree(&again, &again_jobs, Some("key-a")).unwrap(),
        Created::New,
        "key of a purged tree"
    );
    assert_eq!(
        s.purge_finished(cutoff, 10).unwrap(),
        (vec![], vec![]),
        "a second purge finds nothing"
    );

    // The limit.
    let (e, _) = mk(None, &[]);
    let (f, _) = mk(None, &[]);
    finish(s, &e, TreeState::Failed, old);
    finish(s, &f, TreeState::Aborted, old);
    let (first, _) = s.purge_finished(cutoff, 1).unwrap();
    assert_eq!(first.len(), 1, "purge honours its limit");
    let (second, _) = s.purge_finished(cutoff, 1).unwrap();
    assert_eq!(second.len(), 1);
    let mut both = [first[0], second[0]];
    both.sort();
    let mut want = [e.id, f.id];
    want.sort();
    assert_eq!(both, want);
    assert_eq!(s.purge_finished(cutoff, 0).unwrap(), (vec![], vec![]));
}

fn user(name: &str, admin: bool) -> User {
    User {
        name: name.into(),
        password_hash: format!("$argon2id$v=19${name}"),
        admin,
        created_at: Ts(1_800_000_000_000),
    }
}

/// The setup code creates the first user once, only with the right code and no user yet.
pub fn setup_code(s: &dyn Store) {
    let admin = user("admin", true);
    assert!(
        !s.consume_setup_code("h1", &admin).unwrap(),
        "no setup code stored"
    );
    s.set_meta(SETUP_CODE_KEY, Some("h1")).unwrap();
    assert!(!s.consume_setup_code("h2", &admin).unwrap(), "a wrong code");
    assert_eq!(
        s.user("admin").unwrap(),
        None,
        "a wrong code creates nobody"
    );
    assert_eq!(
        s.meta(SETUP_CODE_KEY).unwrap().as_deref(),
        Some("h1"),
        "a wrong code keeps the code"
    );
    assert!(
        s.consume_setup_code("h1", &admin).unwrap(),
        "the right code"
    );
    assert_eq!(s.user("admin").unwrap(), Some(admin.clone()));
    assert_eq!(
        s.meta(SETUP_CODE_KEY).unwrap(),
        None,
        "the code is consumed"
    );
    assert!(
        !s.consume_setup_code("h1", &user("second", true)).unwrap(),
        "a used code"
    );
    // A new code while a user exists.
    s.set_meta(SETUP_CODE_KEY, Some("h3")).unwrap();
    assert!(
        !s.consume_setup_code("h3", &user("third", true)).unwrap(),
        "a user exists"
    );
    assert_eq!(s.users().unwrap(), vec![admin], "only the first user");
}

/// Eight racing setups: exactly one wins.
pub fn setup_code_race(s: &dyn Store) {
    s.set_meta(SETUP_CODE_KEY, Some("race")).unwrap();
    let barrier = Barrier::new(8);
    let wins: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    s.consume_setup_code("race", &user(&format!("admin{i}"), true))
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        wins.iter().filter(|w| **w).count(),
        1,
        "exactly one racer wins: {wins:?}"
    );
    let users = s.users().unwrap();
    assert_eq!(users.len(), 1, "one user: {users:?}");
    let winner = wins.iter().position(|w| *w).unwrap();
    assert_eq!(users[0].name, format!("admin{winner}"));
}

/// Users: put, read, list, replace, delete.
pub fn users_crud(s: &dyn Store) {
    assert!(s.users().unwrap().is_empty());
    let (a, b) = (user("alice", false), user("bob", true));
    s.put_user(&b).unwrap();
    s.put_user(&a).unwrap();
    assert_eq!(s.user("alice").unwrap(), Some(a.clone()));
    assert_eq!(s.user("carol").unwrap(), None);
    let mut all = s.users().unwrap();
    all.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(all, vec![a.clone(), b.clone()]);
    let a2 = User {
        admin: true,
        password_hash: "new".into(),
        ..a
    };
    s.put_user(&a2).unwrap();
    assert_eq!(s.user("alice").unwrap(), Some(a2), "put replaces");
    assert_eq!(s.users().unwrap().len(), 2);
    assert!(s.delete_user("alice").unwrap());
    assert!(!s.delete_user("alice").unwrap(), "deleting twice");
    assert_eq!(s.user("alice").unwrap(), None);
    assert_eq!(s.users().unwrap(), vec![b]);
}

/// Tokens: put, find by hash, list by user or all, delete.
pub fn tokens_crud(s: &dyn Store) {
    let token = |id: &str, user: &str| Token {
        id: id.into(),
        hash: format!("hash-{id}"),
        prefix: format!("mst_{id}"),
        user: user.into(),
        name: format!("token {id}"),
        scopes: vec!["read".into(), "write".into()],
        created_at: Ts(1_800_000_000_000),
        expires_at: if id == "t1" {
            Some(Ts(1_900_000_000_000))
        } else {
            None
        },
        workspace: (id == "t3").then(|| "acme".to_string()),
    };
    let (t1, t2, t3) = (
        token("t1", "alice"),
        token("t2", "alice"),
        token("t3", "bob"),
    );
    for t in [&t1, &t2, &t3] {
        s.put_token(t).unwrap();
    }
    assert_eq!(s.token_by_hash("hash-t2").unwrap(), Some(t2.clone()));
    assert_eq!(s.token_by_hash("hash-none").unwrap(), None);
    let sorted = |mut v: Vec<Token>| {
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    };
    assert_eq!(
        sorted(s.tokens(Some("alice")).unwrap()),
        vec![t1.clone(), t2.clone()]
    );
    assert_eq!(sorted(s.tokens(Some("bob")).unwrap()), vec![t3.clone()]);
    assert!(s.tokens(Some("carol")).unwrap().is_empty());
    assert_eq!(
        sorted(s.tokens(None).unwrap()),
        vec![t1.clone(), t2.clone(), t3.clone()]
    );
    let t2b = Token {
        name: "renamed".into(),
        ..t2
    };
    s.put_token(&t2b).unwrap();
    assert_eq!(
        s.token_by_hash("hash-t2").unwrap(),
        Some(t2b.clone()),
        "put replaces"
    );
    assert!(s.delete_token("t1").unwrap());
    assert!(!s.delete_token("t1").unwrap(), "deleting twice");
    assert_eq!(s.token_by_hash("hash-t1").unwrap(), None);
    assert_eq!(sorted(s.tokens(None).unwrap()), vec![t2b, t3]);
}

/// Meta values: set, replace, clear.
pub fn meta_values(s: &dyn Store) {
    assert_eq!(s.meta("cluster").unwrap(), None);
    s.set_meta("cluster", Some("one")).unwrap();
    s.set_meta("other", Some("x")).unwrap();
    assert_eq!(s.meta("cluster").unwrap().as_deref(), Some("one"));
    s.set_meta("cluster", Some("two")).unwrap();
    assert_eq!(s.meta("cluster").unwrap().as_deref(), Some("two"));
    s.set_meta("cluster", None).unwrap();
    assert_eq!(s.meta("cluster").unwrap(), None);
    s.set_meta("cluster", None).unwrap();
    assert_eq!(s.meta("other").unwrap().as_deref(), Some("x"));
}

/// Nodes: put, list, replace, delete.
pub fn nodes_crud(s: &dyn Store) {
    let node = |id: &str, state: &str| Node {
        id: id.into(),
        name: format!("host-{id}"),
        state: state.into(),
        labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
        slots: 4,
        last_seen: Ts(1_800_000_000_000),
        version: "0.1.0".into(),
    };
    assert!(s.nodes().unwrap().is_empty());
    let sorted = |mut v: Vec<Node>| {
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    };
    s.put_node(&node("n2", "ready")).unwrap();
    s.put_node(&node("n1", "ready")).unwrap();
    assert_eq!(
        sorted(s.nodes().unwrap()),
        vec![node("n1", "ready"), node("n2", "ready")]
    );
    s.put_node(&node("n1", "draining")).unwrap();
    assert_eq!(
        sorted(s.nodes().unwrap()),
        vec![node("n1", "draining"), node("n2", "ready")],
        "put replaces"
    );
    assert!(s.delete_node("n1").unwrap());
    assert!(!s.delete_node("n1").unwrap(), "deleting twice");
    assert_eq!(s.nodes().unwrap(), vec![node("n2", "ready")]);
}

/// Waits up to 5 s for the next event.
fn next_event(rx: &mut tokio::sync::broadcast::Receiver<Event>) -> Event {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match rx.try_recv() {
            Ok(e) => return e,
            Err(tokio::sync::broadcast::error::TryRecvError::Empty)
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("no event: {e}"),
        }
    }
}

/// Published events reach every subscriber, in order.
pub fn events_in_order(s: &dyn Store) {
    s.publish(&[Event::Node {
        id: "nobody".into(),
        name: "listens".into(),
        state: "ready".into(),
        at: Ts(1),
    }]);
    let mut rx1 = s.subscribe();
    let mut rx2 = s.subscribe();
    let (tree, job) = (Uuid::now_v7(), Uuid::now_v7());
    let events = vec![
        Event::Job {
            id: job,
            tree,
            workspace: "w".into(),
            key: "build".into(),
            state: JobState::Running,
            attempt: 1,
            node: Some("n1".into()),
            at: Ts(1_800_000_000_000),
        },
        Event::Job {
            id: job,
            tree,
            workspace: "w".into(),
            key: "build".into(),
            state: JobState::Succeeded,
            attempt: 1,
            node: Some("n1".into()),
            at: Ts(1_800_000_000_001),
        },
        Event::Tree {
            id: tree,
            workspace: "w".into(),
            state: TreeState::Succeeded,
            at: Ts(1_800_000_000_002),
        },
        Event::Node {
            id: "n1".into(),
            name: "host-1".into(),
            state: "draining".into(),
            at: Ts(1_800_000_000_003),
        },
    ];
    s.publish(&events[..2]);
    s.publish(&events[2..]);
    for rx in [&mut rx1, &mut rx2] {
        let got: Vec<Event> = (0..events.len()).map(|_| next_event(rx)).collect();
        assert_eq!(got, events, "events in publishing order");
    }
}

/// The store answers a ping.
pub fn ping(s: &dyn Store) {
    s.ping().expect("ping");
}

/// Small documents: put, get, create-if-absent (atomic), prefix listings sorted by key, delete.
pub fn documents(s: &dyn Store) {
    s.put_doc("member", "acme/ann", Some("\"admin\"")).unwrap();
    s.put_doc("member", "acme/bob", Some("\"viewer\"")).unwrap();
    s.put_doc("member", "acmex/cid", Some("\"viewer\""))
        .unwrap();
    s.put_doc("workspace", "acme/ann", Some("other kind"))
        .unwrap();
    assert_eq!(text(s, "member", "acme/bob").as_deref(), Some("\"viewer\""));
    assert_eq!(s.doc("member", "acme/zed").unwrap(), None);
    let keys: Vec<String> = s
        .docs("member", "acme/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        keys,
        ["acme/ann", "acme/bob"],
        "prefix listing, sorted, one kind only"
    );
    assert_eq!(s.docs("member", "").unwrap().len(), 3);
    assert!(s.create_doc("workspace", "beta", "{}").unwrap());
    assert!(
        !s.create_doc("workspace", "beta", "{\"x\":1}").unwrap(),
        "create_doc must not overwrite"
    );
    assert_eq!(text(s, "workspace", "beta").as_deref(), Some("{}"));
    s.put_doc("member", "acme/bob", Some("\"operator\""))
        .unwrap();
    assert_eq!(
        text(s, "member", "acme/bob").as_deref(),
        Some("\"operator\"")
    );
    s.put_doc("member", "acme/bob", None).unwrap();
    assert_eq!(s.doc("member", "acme/bob").unwrap(), None);
    assert_eq!(s.docs("member", "acme/").unwrap().len(), 1);
}

/// The text of a document, without its version.
fn text(s: &dyn Store, kind: &str, key: &str) -> Option<String> {
    s.doc(kind, key).unwrap().map(|d| d.value)
}

/// The version a write that must succeed gave.
fn written(w: DocWrite, what: &str) -> Version {
    match w {
        DocWrite::Done(Some(v)) => v,
        other => panic!("{what}: expected a write with a version, got {other:?}"),
    }
}

/// Versions: a created document has one, every write gives a greater one, reads and listings
/// show the stored one, and a key deleted and created again never shows an old version.
pub fn document_versions(s: &dyn Store) {
    let v1 = written(
        s.write_doc("order", "a", Some("1"), DocCond::Absent)
            .unwrap(),
        "create",
    );
    assert!(v1 >= Version(1), "versions start at 1 or more: {v1}");
    assert_eq!(
        s.doc("order", "a").unwrap(),
        Some(Doc {
            value: "1".into(),
            version: v1
        })
    );
    let v2 = written(
        s.write_doc("order", "a", Some("2"), DocCond::Any).unwrap(),
        "put",
    );
    assert!(v2 > v1, "a put gives a greater version: {v1} then {v2}");
    // The plain put_doc bumps the version too.
    s.put_doc("order", "a", Some("3")).unwrap();
    let v3 = s.doc("order", "a").unwrap().unwrap().version;
    assert!(v3 > v2, "put_doc gives a greater version: {v2} then {v3}");
    // Writing the same text again is still a write.
    s.put_doc("order", "a", Some("3")).unwrap();
    let v4 = s.doc("order", "a").unwrap().unwrap().version;
    assert!(v4 > v3, "an identical put still bumps: {v3} then {v4}");
    // Other documents and kinds do not disturb this one.
    s.put_doc("order", "b", Some("x")).unwrap();
    s.put_doc("other", "a", Some("y")).unwrap();
    assert_eq!(s.doc("order", "a").unwrap().unwrap().version, v4);
    let listed = s.docs("order", "").unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|(k, d)| (k.as_str(), d.value.as_str()))
            .collect::<Vec<_>>(),
        [("a", "3"), ("b", "x")]
    );
    for (k, d) in &listed {
        assert_eq!(
            s.doc("order", k).unwrap().as_ref(),
            Some(d),
            "a listing shows the stored version of {k}"
        );
    }
    // Deleted and created again: a version past every one it had.
    s.put_doc("order", "a", None).unwrap();
    assert_eq!(s.doc("order", "a").unwrap(), None);
    let again = written(
        s.write_doc("order", "a", Some("new"), DocCond::Absent)
            .unwrap(),
        "create again",
    );
    assert!(
        again > v4,
        "a recreated document must not reuse an old version: {again} after {v4}"
    );
    // So a compare-and-set against the old document's version cannot hit the new one.
    assert!(!s.put_doc_if("order", "a", "stale", v1).unwrap());
    assert_eq!(text(s, "order", "a").as_deref(), Some("new"));
}

/// put_if: the current version writes and moves the version on; a stale version or an absent
/// document writes nothing.
pub fn document_put_if(s: &dyn Store) {
    let v1 = written(
        s.write_doc("order", "k", Some("one"), DocCond::Absent)
            .unwrap(),
        "create",
    );
    let v2 = written(
        s.write_doc("order", "k", Some("two"), DocCond::At(v1))
            .unwrap(),
        "put_if at the current version",
    );
    assert!(v2 > v1);
    assert_eq!(
        s.write_doc("order", "k", Some("late"), DocCond::At(v1))
            .unwrap(),
        DocWrite::Conflict(Some(v2)),
        "a stale version conflicts and names the current one"
    );
    assert_eq!(
        s.doc("order", "k").unwrap(),
        Some(Doc {
            value: "two".into(),
            version: v2
        }),
        "a failed put_if changes nothing, not even the version"
    );
    assert!(!s.put_doc_if("order", "k", "late", v1).unwrap());
    assert!(s.put_doc_if("order", "k", "three", v2).unwrap());
    assert_eq!(text(s, "order", "k").as_deref(), Some("three"));
    assert_eq!(
        s.write_doc("order", "ghost", Some("x"), DocCond::At(v1))
            .unwrap(),
        DocWrite::Conflict(None),
        "put_if on an absent document"
    );
    assert_eq!(
        s.doc("order", "ghost").unwrap(),
        None,
        "put_if creates nothing"
    );
    assert_eq!(s.docs("order", "").unwrap().len(), 1);
}

/// create-if-absent: the first create wins, the second changes nothing.
pub fn document_create_if_absent(s: &dyn Store) {
    let v = written(
        s.write_doc("order", "k", Some("first"), DocCond::Absent)
            .unwrap(),
        "first create",
    );
    assert_eq!(
        s.write_doc("order", "k", Some("second"), DocCond::Absent)
            .unwrap(),
        DocWrite::Conflict(Some(v)),
        "a second create conflicts"
    );
    assert!(!s.create_doc("order", "k", "third").unwrap());
    assert_eq!(
        s.doc("order", "k").unwrap(),
        Some(Doc {
            value: "first".into(),
            version: v
        }),
        "the first create stays, at its version"
    );
    // A create that is a delete (nothing to store) on an absent key does nothing.
    assert_eq!(
        s.write_doc("order", "none", None, DocCond::Absent).unwrap(),
        DocWrite::Done(None)
    );
    assert_eq!(s.docs("order", "").unwrap().len(), 1);
}

/// delete_if: a stale version deletes nothing; the current one deletes; absent conflicts.
pub fn document_delete_if(s: &dyn Store) {
    let v1 = written(
        s.write_doc("order", "k", Some("a"), DocCond::Any).unwrap(),
        "put",
    );
    let v2 = written(
        s.write_doc("order", "k", Some("b"), DocCond::Any).unwrap(),
        "put",
    );
    assert_eq!(
        s.write_doc("order", "k", None, DocCond::At(v1)).unwrap(),
        DocWrite::Conflict(Some(v2)),
        "delete_if with a stale version"
    );
    assert!(!s.delete_doc_if("order", "k", v1).unwrap());
    assert_eq!(
        s.doc("order", "k").unwrap().map(|d| d.version),
        Some(v2),
        "still there, unchanged"
    );
    assert_eq!(
        s.write_doc("order", "k", None, DocCond::At(v2)).unwrap(),
        DocWrite::Done(None)
    );
    assert_eq!(s.doc("order", "k").unwrap(), None);
    assert!(
        s.docs("order", "").unwrap().is_empty(),
        "gone from listings"
    );
    assert_eq!(
        s.write_doc("order", "k", None, DocCond::At(v2)).unwrap(),
        DocWrite::Conflict(None),
        "deleting twice"
    );
    assert_eq!(
        s.write_doc("order", "k", None, DocCond::Any).unwrap(),
        DocWrite::Done(None),
        "an unconditional delete of nothing"
    );
}

/// A document type for the typed checks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Counter {
    n: u64,
    by: String,
}

const COUNTERS: Docs<Counter> = Docs::new("counter");

/// The typed layer: values in, values out, with versions; update retries, deletes, skips
/// no-op writes.
pub fn typed_documents(s: &dyn Store) {
    let c = |n: u64| Counter { n, by: "t".into() };
    assert_eq!(COUNTERS.kind(), "counter");
    assert_eq!(COUNTERS.get(s, "a").unwrap(), None);
    let v1 = COUNTERS.create(s, "a", &c(1)).unwrap().expect("created");
    assert_eq!(COUNTERS.create(s, "a", &c(9)).unwrap(), None, "exists");
    assert_eq!(COUNTERS.get(s, "a").unwrap(), Some((c(1), v1)));
    let v2 = COUNTERS.put_if(s, "a", &c(2), v1).unwrap().expect("put_if");
    assert!(v2 > v1);
    assert_eq!(COUNTERS.put_if(s, "a", &c(3), v1).unwrap(), None, "stale");
    assert_eq!(COUNTERS.get(s, "a").unwrap(), Some((c(2), v2)));
    let v3 = COUNTERS.put(s, "b", &c(7)).unwrap();
    assert_eq!(
        COUNTERS.list(s, "").unwrap(),
        vec![("a".to_string(), c(2), v2), ("b".to_string(), c(7), v3)]
    );
    // update: read, modify, write.
    let (got, v4) = COUNTERS
        .update(s, "a", |old| Some(c(old.expect("a exists").n + 10)))
        .unwrap()
        .expect("updated");
    assert_eq!(got, c(12));
    assert!(v4 > v2);
    assert_eq!(COUNTERS.get(s, "a").unwrap(), Some((c(12), v4)));
    // An update that changes nothing writes nothing: the version stays.
    let same = COUNTERS.update(s, "a", |old| old).unwrap();
    assert_eq!(same, Some((c(12), v4)));
    // An update of an absent document creates it; returning None deletes.
    let (fresh, _) = COUNTERS
        .update(s, "new", |old| {
            assert_eq!(old, None);
            Some(c(1))
        })
        .unwrap()
        .unwrap();
    assert_eq!(fresh, c(1));
    assert_eq!(COUNTERS.update(s, "new", |_| None).unwrap(), None);
    assert_eq!(COUNTERS.get(s, "new").unwrap(), None);
    assert_eq!(COUNTERS.update(s, "nothing", |_| None).unwrap(), None);
    assert_eq!(COUNTERS.get(s, "nothing").unwrap(), None);
    // update retries after a conflict: a writer sneaks in after the first read.
    let mut calls = 0;
    let (after, _) = COUNTERS
        .update(s, "b", |old| {
            calls += 1;
            if calls == 1 {
                COUNTERS.put(s, "b", &c(100)).unwrap();
            }
            Some(c(old.unwrap().n + 1))
        })
        .unwrap()
        .unwrap();
    assert_eq!(calls, 2, "one conflict, one retry");
    assert_eq!(
        after,
        c(101),
        "the retry starts from what the other writer left"
    );
    // delete_if and delete.
    let (_, vb) = COUNTERS.get(s, "b").unwrap().unwrap();
    assert!(!COUNTERS.delete_if(s, "b", v1).unwrap(), "stale");
    assert!(COUNTERS.delete_if(s, "b", vb).unwrap());
    COUNTERS.delete(s, "a").unwrap();
    COUNTERS.delete(s, "a").unwrap();
    assert!(COUNTERS.list(s, "").unwrap().is_empty());
    // A document that is not a `Counter` is an error, not a silent None.
    s.put_doc("counter", "bad", Some("not json")).unwrap();
    assert!(COUNTERS.get(s, "bad").is_err());
    assert!(COUNTERS.list(s, "").is_err());
    assert!(COUNTERS.update(s, "bad", |_| None).is_err());
    assert_eq!(text(s, "counter", "bad").as_deref(), Some("not json"));
}

/// How many threads, and increments per thread, the counter race runs.
const RACERS: usize = 8;
const INCREMENTS: usize = 50;

/// `RACERS` threads each add 1 to one counter `INCREMENTS` times through [`Docs::update`]: no
/// increment is lost, and every successful write got its own, greater version.
pub fn document_counter_race(s: &dyn Store) {
    let barrier = Barrier::new(RACERS);
    let versions: Vec<Vec<Version>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..RACERS)
            .map(|i| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let mut seen = Vec::with_capacity(INCREMENTS);
                    for _ in 0..INCREMENTS {
                        let (_, v) = COUNTERS
                            .update(s, "hits", |old| {
                                Some(Counter {
                                    n: old.map_or(0, |c| c.n) + 1,
                                    by: format!("racer-{i}"),
                                })
                            })
                            .unwrap()
                            .unwrap();
                        seen.push(v);
                    }
                    seen
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (last, _) = COUNTERS.get(s, "hits").unwrap().unwrap();
    assert_eq!(
        last.n,
        (RACERS * INCREMENTS) as u64,
        "every increment counts once"
    );
    for seen in &versions {
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "one thread's writes get increasing versions"
        );
    }
    let mut all: Vec<Version> = versions.into_iter().flatten().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), RACERS * INCREMENTS, "no version was given twice");
}

/// A single-use-style document: `uses` uses, spent by racers that delete it on the last one
/// (as join tokens are). Exactly `uses` racers succeed and the document is gone.
pub fn document_spend_race(s: &dyn Store) {
    const TOKENS: Docs<u32> = Docs::new("token");
    for uses in [1u32, 3] {
        let key = format!("t{uses}");
        assert!(TOKENS.create(s, &key, &uses).unwrap().is_some());
        let barrier = Barrier::new(RACERS);
        let wins: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..RACERS)
                .map(|_| {
                    let (barrier, key) = (&barrier, &key);
                    scope.spawn(move || {
                        barrier.wait();
                        let mut spent = false;
                        TOKENS
                            .update(s, key, |left| {
                                // The last call is the one whose write counted.
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
        assert_eq!(wins, uses as usize, "exactly {uses} racers spend a use");
        assert_eq!(
            TOKENS.get(s, &key).unwrap(),
            None,
            "spent documents are deleted"
        );
    }
}

/// Leases: one holder at a time; the holder renews; another takes it only after it expires.
pub fn leases(s: &dyn Store) {
    assert_eq!(s.lease("leader", "a", 300).unwrap(), "a");
    assert_eq!(s.lease("leader", "b", 300).unwrap(), "a", "held by a");
    assert_eq!(
        s.lease("other", "b", 300).unwrap(),
        "b",
        "leases are by name"
    );
    assert_eq!(s.lease("leader", "a", 300).unwrap(), "a", "a renews");
    let t0 = std::time::Instant::now();
    loop {
        let h = s.lease("leader", "b", 300).unwrap();
        if h == "b" {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "the lease never expired"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        t0.elapsed() >= std::time::Duration::from_millis(250),
        "b took it before it expired"
    );
    assert_eq!(s.lease("leader", "a", 300).unwrap(), "b");
}
