//! Property tests of the scheduling invariants over random trees and random event orders:
//! no job starts before all its deps succeeded; after a failure under `abort` (or a user abort)
//! nothing starts; every run ends with every job final and the tree state derived correctly.

use super::*;
use crate::job::Tags;
use crate::spec::{build_tree, JobSpec};

/// xorshift64*: small, seedable, good enough to explore event orders.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
}

fn random_spec(rng: &mut Rng) -> JobSpec {
    let n = 1 + rng.below(40);
    // Node i > 0 hangs under a random earlier node; keys are k<i>.
    let mut parents = vec![usize::MAX];
    for i in 1..n {
        parents.push(rng.below(i));
    }
    let mut specs: Vec<JobSpec> = (0..n)
        .map(|i| JobSpec {
            name: format!("job {i}"),
            key: Some(format!("k{i}")),
            noop: rng.chance(80),
            retries: if rng.chance(20) {
                Some(rng.below(3) as u32)
            } else {
                None
            },
            ..Default::default()
        })
        .collect();
    // needs only point to later jobs in pre-order that are not ancestors: always acyclic.
    #[allow(clippy::needless_range_loop)]
    for i in 0..n {
        if rng.chance(25) {
            let j = rng.below(n);
            let mut a = j;
            let mut is_ancestor_or_self = false;
            while a != usize::MAX {
                if a == i {
                    is_ancestor_or_self = true;
                }
                a = parents[a];
            }
            let mut b = i;
            let mut is_desc = false;
            while b != usize::MAX {
                if b == j {
                    is_desc = true;
                }
                b = parents[b];
            }
            if !is_ancestor_or_self && !is_desc && j > i {
                specs[i].needs.push(format!("k{j}"));
            }
        }
    }
    for s in specs.iter_mut() {
        if !s.noop && s.retries.is_some() {
            s.noop = true;
        }
    }
    // Assemble bottom-up.
    for i in (1..n).rev() {
        let child = std::mem::take(&mut specs[i]);
        specs[parents[i]].children.insert(0, child);
    }
    let mut root = std::mem::take(&mut specs[0]);
    root.on_failure = Some(if rng.chance(50) {
        OnFailure::Abort
    } else {
        OnFailure::Continue
    });
    root.tags = Some(Tags {
        workspace: "w".into(),
        ..Default::default()
    });
    root
}

fn simulate(seed: u64) {
    let mut rng = Rng(seed | 1);
    let spec = random_spec(&mut rng);
    let mut n = 0u128;
    let new = build_tree(&spec, "w", None, Ts(0), &mut || {
        n += 1;
        Uuid::from_u128(n)
    })
    .expect("random trees are valid");
    let mut now = Ts(1_000);
    let (mut run, fx) = TreeRun::new(new.tree, new.jobs, now);
    let backoff = Backoff {
        base_ms: 10,
        max_ms: 100,
    };
    let mut ready: Vec<u32> = Vec::new();
    let mut retries: Vec<(u32, Ts)> = Vec::new();
    let mut kills: Vec<u32> = Vec::new();
    let absorb = |fx: Vec<Effect>,
                  ready: &mut Vec<u32>,
                  retries: &mut Vec<(u32, Ts)>,
                  kills: &mut Vec<u32>| {
        for e in fx {
            match e {
                Effect::Ready(i) => ready.push(i),
                Effect::Retry(i, at) => retries.push((i, at)),
                Effect::Kill(i) => kills.push(i),
                _ => {}
            }
        }
    };
    absorb(fx, &mut ready, &mut retries, &mut kills);
    let mut failed_for_good = false;
    for _step in 0..10_000 {
        if run.tree.state != TreeState::Running {
            break;
        }
        now = now.plus_ms(1 + rng.below(20) as i64);
        let running: Vec<u32> = (0..run.jobs.len() as u32)
            .filter(|&i| run.job(i).state == JobState::Running)
            .collect();
        match rng.below(10) {
            // Start a ready job.
            0..=3 if !ready.is_empty() => {
                let i = ready.swap_remove(rng.below(ready.len()));
                let deps_ok = run
                    .job(i)
                    .deps()
                    .all(|d| run.job(run.index_of(d).unwrap()).state == JobState::Succeeded);
                let res = if matches!(run.job(i).run, Run::Group) {
                    run.resolve_group(i, now)
                } else {
                    run.start(i, "n1", now)
                };
                if let Ok(fx) = res {
                    assert!(
                        deps_ok,
                        "seed {seed}: job {i} started before its deps succeeded"
                    );
                    assert!(
                        !failed_for_good || run.tree.on_failure == OnFailure::Continue,
                        "seed {seed}: start after failure"
                    );
                    assert!(
                        !run.tree.user_aborted,
                        "seed {seed}: start after user abort"
                    );
                    absorb(fx, &mut ready, &mut retries, &mut kills);
                }
            }
            // Finish a running job.
            4..=7 if !running.is_empty() => {
                let i = running[rng.below(running.len())];
                let attempt = run.job(i).attempt;
                let outcome = if rng.chance(80) {
                    Outcome::success()
                } else {
                    Outcome::failure(Some(1), None)
                };
                let will_fail_for_good = outcome != Outcome::success()
                    && attempt > run.job(i).retries
                    && !run.kill_requested(i);
                let fx = run.finish(i, attempt, outcome, now, backoff, 0.5);
                if will_fail_for_good {
                    failed_for_good = true;
                }
                absorb(fx, &mut ready, &mut retries, &mut kills);
            }
            // A retry's time comes.
            8 if !retries.is_empty() => {
                let k = rng.below(retries.len());
                let (i, at) = retries.swap_remove(k);
                now = now.max(at);
                let fx = run.retry_due(i, now);
                absorb(fx, &mut ready, &mut retries, &mut kills);
            }
            // Rarely, a user abort.
            9 if rng.chance(10) => {
                if let Ok(fx) = run.abort(now) {
                    absorb(fx, &mut ready, &mut retries, &mut kills);
                }
            }
            _ => {
                // Deliver kills: the killed job reports a signal death.
                if let Some(i) = kills.pop() {
                    let attempt = run.job(i).attempt;
                    let fx = run.finish(
                        i,
                        attempt,
                        Outcome::failure(None, Some("killed by signal 15".into())),
                        now,
                        backoff,
                        0.5,
                    );
                    assert!(
                        run.job(i).state.is_final(),
                        "seed {seed}: killed job not final"
                    );
                    absorb(fx, &mut ready, &mut retries, &mut kills);
                } else if ready.is_empty() && running.is_empty() && retries.is_empty() {
                    panic!(
                        "seed {seed}: tree stuck in {:?}",
                        run.jobs.iter().map(|j| j.state).collect::<Vec<_>>()
                    );
                }
            }
        }
        // After a halt, no job waits.
        if run.is_halted() {
            assert!(
                run.jobs.iter().all(|j| j.state != JobState::Waiting),
                "seed {seed}: waiting job in a halted tree"
            );
        }
    }
    assert_ne!(
        run.tree.state,
        TreeState::Running,
        "seed {seed}: tree never finished"
    );
    assert!(run.jobs.iter().all(|j| j.state.is_final()));
    assert_eq!(
        run.tree.state,
        derive_tree_state(&run.jobs, run.tree.user_aborted),
        "seed {seed}"
    );
    if run.tree.state == TreeState::Succeeded {
        assert!(
            run.jobs.iter().all(|j| j.state == JobState::Succeeded),
            "seed {seed}: succeeded tree with unfinished jobs"
        );
    }
}

#[test]
fn scheduling_invariants_hold_for_random_trees() {
    for seed in 1..3_000u64 {
        simulate(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
}

fn tree_of(json: &str) -> TreeRun {
    let spec: JobSpec = serde_json::from_str(json).unwrap();
    let mut n = 0u128;
    let new = build_tree(&spec, "w", None, Ts(0), &mut || {
        n += 1;
        Uuid::from_u128(n)
    })
    .unwrap();
    TreeRun::new(new.tree, new.jobs, Ts(0)).0
}

const B: Backoff = Backoff {
    base_ms: 1000,
    max_ms: 60_000,
};

#[test]
fn leaves_first_then_parent() {
    let (mut run, fx) = {
        let spec: JobSpec = serde_json::from_str(r#"{"name":"r","noop":true,"children":[{"name":"a","noop":true},{"name":"b","noop":true}]}"#).unwrap();
        let mut n = 0u128;
        let new = build_tree(&spec, "w", None, Ts(0), &mut || {
            n += 1;
            Uuid::from_u128(n)
        })
        .unwrap();
        TreeRun::new(new.tree, new.jobs, Ts(0))
    };
    assert_eq!(fx, vec![Effect::Ready(1), Effect::Ready(2)]);
    assert_eq!(run.start(0, "n", Ts(1)), Err(NotStartable::DepsPending));
    run.start(1, "n", Ts(1)).unwrap();
    run.start(2, "n", Ts(1)).unwrap();
    assert_eq!(
        run.finish(1, 1, Outcome::success(), Ts(2), B, 0.0),
        vec![Effect::Changed(1)]
    );
    assert_eq!(
        run.finish(2, 1, Outcome::success(), Ts(3), B, 0.0),
        vec![Effect::Changed(2), Effect::Ready(0)]
    );
    run.start(0, "n", Ts(4)).unwrap();
    let fx = run.finish(0, 1, Outcome::success(), Ts(5), B, 0.0);
    assert_eq!(fx.last(), Some(&Effect::TreeDone));
    assert_eq!(run.tree.state, TreeState::Succeeded);
    assert_eq!(run.abort(Ts(6)), Err(TreeState::Succeeded));
}

#[test]
fn failure_under_abort_kills_and_aborts() {
    let mut run = tree_of(
        r#"{"name":"r","noop":true,"children":[{"name":"a","noop":true},{"name":"b","noop":true},{"name":"c","noop":true,"children":[{"name":"d","noop":true}]}]}"#,
    );
    run.start(1, "n", Ts(1)).unwrap();
    run.start(2, "n", Ts(1)).unwrap();
    let fx = run.finish(1, 1, Outcome::failure(Some(3), None), Ts(2), B, 0.0);
    assert!(fx.contains(&Effect::Kill(2)));
    assert_eq!(run.job(4).state, JobState::Aborted);
    assert_eq!(run.job(0).state, JobState::Aborted);
    assert_eq!(run.start(4, "n", Ts(3)), Err(NotStartable::NotWaiting));
    let fx = run.finish(
        2,
        1,
        Outcome::failure(None, Some("killed by signal 15".into())),
        Ts(3),
        B,
        0.0,
    );
    assert_eq!(run.job(2).state, JobState::Aborted);
    assert_eq!(fx.last(), Some(&Effect::TreeDone));
    assert_eq!(run.tree.state, TreeState::Failed);
}

#[test]
fn failure_under_continue_spares_independent_branches() {
    let mut run = tree_of(
        r#"{"name":"r","on_failure":"continue","children":[{"name":"a","key":"a","noop":true},{"name":"b","noop":true,"needs":["a"]},{"name":"c","noop":true}]}"#,
    );
    run.start(1, "n", Ts(1)).unwrap();
    run.finish(1, 1, Outcome::failure(Some(1), None), Ts(2), B, 0.0);
    assert_eq!(run.job(2).state, JobState::Aborted);
    assert_eq!(run.job(0).state, JobState::Aborted);
    assert_eq!(run.job(3).state, JobState::Waiting);
    run.start(3, "n", Ts(3)).unwrap();
    run.finish(3, 1, Outcome::success(), Ts(4), B, 0.0);
    assert_eq!(run.tree.state, TreeState::Failed);
}

#[test]
fn retries_back_off_then_run_again() {
    let mut run = tree_of(r#"{"name":"r","noop":true,"retries":2}"#);
    run.start(0, "n", Ts(0)).unwrap();
    let fx = run.finish(0, 1, Outcome::failure(Some(1), None), Ts(10), B, 0.0);
    assert_eq!(fx, vec![Effect::Changed(0), Effect::Retry(0, Ts(510))]);
    assert_eq!(run.job(0).attempt, 2);
    assert_eq!(run.start(0, "n", Ts(100)), Err(NotStartable::RetryLater));
    assert_eq!(run.retry_due(0, Ts(510)), vec![Effect::Ready(0)]);
    run.start(0, "n", Ts(510)).unwrap();
    // A late report of attempt 1 changes nothing.
    assert!(run
        .finish(0, 1, Outcome::success(), Ts(511), B, 0.0)
        .is_empty());
    run.finish(0, 2, Outcome::failure(Some(1), None), Ts(600), B, 0.0);
    assert_eq!(run.job(0).retry_at, Some(Ts(600 + 1000)));
    run.start(0, "n", Ts(1600)).unwrap();
    run.finish(0, 3, Outcome::failure(Some(1), None), Ts(1700), B, 0.0);
    assert_eq!(run.tree.state, TreeState::Failed);
}

#[test]
fn user_abort_and_recovery() {
    let mut run = tree_of(
        r#"{"name":"r","on_failure":"continue","children":[{"name":"a","noop":true},{"name":"b","noop":true}]}"#,
    );
    run.start(1, "n", Ts(1)).unwrap();
    let fx = run.abort(Ts(2)).unwrap();
    assert!(fx.contains(&Effect::Kill(1)));
    // A restart in the middle re-sends the kill and starts nothing.
    let (mut again, fx) = TreeRun::new(run.tree.clone(), run.jobs.clone(), Ts(3));
    assert_eq!(fx, vec![Effect::Kill(1)]);
    again.finish(
        1,
        1,
        Outcome::failure(None, Some("killed by signal 15".into())),
        Ts(4),
        B,
        0.0,
    );
    assert_eq!(again.tree.state, TreeState::Aborted);
}

#[test]
fn backoff_grows_and_caps() {
    let b = Backoff {
        base_ms: 1000,
        max_ms: 60_000,
    };
    assert_eq!(b.delay_ms(2, 0.0), 500);
    assert_eq!(b.delay_ms(2, 0.999), 999);
    assert_eq!(b.delay_ms(3, 0.0), 1000);
    assert_eq!(b.delay_ms(30, 1.0), 60_000);
}

#[test]
fn a_rejected_job_fails_without_retry_and_halts() {
    let mut run = tree_of(
        r#"{"name":"r","children":[{"name":"a","noop":true,"retries":3},{"name":"b","noop":true}]}"#,
    );
    run.start(2, "n", Ts(1)).unwrap();
    let fx = run.reject(1, "no node matches".into(), Ts(2));
    assert!(fx.contains(&Effect::Kill(2)));
    assert_eq!(run.job(1).state, JobState::Failed);
    assert_eq!(run.job(1).error.as_deref(), Some("no node matches"));
}

#[test]
fn a_lost_node_retries_elsewhere_or_fails() {
    let mut run = tree_of(
        r#"{"name":"r","on_failure":"continue","children":[{"name":"a","noop":true,"retries":1},{"name":"b","noop":true,"retries":1}]}"#,
    );
    run.start(1, "n1", Ts(1)).unwrap();
    run.start(2, "n1", Ts(1)).unwrap();
    let fx = run.lose(1, "node lost".into(), Ts(2), Some((B, 0.0)));
    assert!(matches!(fx[1], Effect::Retry(1, _)), "{fx:?}");
    assert_eq!(
        (run.job(1).state, run.job(1).attempt),
        (JobState::Waiting, 2)
    );
    run.lose(2, "node lost".into(), Ts(2), None);
    assert_eq!(run.job(2).state, JobState::Failed);
    assert_eq!(run.job(2).error.as_deref(), Some("node lost"));
}
