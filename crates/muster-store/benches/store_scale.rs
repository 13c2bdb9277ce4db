//! Store scale benchmark (`cargo bench -p muster-store --bench store_scale`): the first page of a
//! tree listing with 1M jobs stored (10,000 trees of 100 jobs) on SQLite, p50 and p99 per filter.
//! SPEC §4 target: p99 ≤ 20 ms.

use muster_store::conformance::{fixture, tags};
use muster_store::{open, Store, TreeFilter};
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let dir = std::env::temp_dir().join(format!("muster-store-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let s: Arc<dyn Store> = open(&format!("sqlite://{}", dir.join("muster.db").display())).unwrap();
    let started = Instant::now();
    for i in 0..10_000 {
        let mut t = tags(["a", "b", "c", "d"][i % 4]);
        t.application = Some(format!("app{}", i % 50));
        let (mut tree, jobs) = fixture(t, 100);
        tree.nodes = vec![format!("n{}", i % 20)];
        if i % 3 == 0 {
            tree.state = muster_core::TreeState::Succeeded;
        }
        s.create_tree(&tree, &jobs, None).unwrap();
    }
    eprintln!("stored 1M jobs in {:?}", started.elapsed());
    let filters = [
        TreeFilter::default(),
        TreeFilter {
            workspace: Some("b".into()),
            ..TreeFilter::default()
        },
        TreeFilter {
            workspaces: Some(vec!["a".into(), "c".into()]),
            ..TreeFilter::default()
        },
        TreeFilter {
            application: Some("app7".into()),
            ..TreeFilter::default()
        },
        TreeFilter {
            node: Some("n3".into()),
            ..TreeFilter::default()
        },
        TreeFilter {
            state: Some(muster_core::TreeState::Running),
            ..TreeFilter::default()
        },
    ];
    for f in &filters {
        let mut times: Vec<_> = (0..200)
            .map(|_| {
                let t = Instant::now();
                assert_eq!(s.list_trees(f, None, 50).unwrap().len(), 50);
                t.elapsed()
            })
            .collect();
        times.sort();
        eprintln!("{f:?}: p50 {:?}, p99 {:?}", times[100], times[198]);
    }
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
