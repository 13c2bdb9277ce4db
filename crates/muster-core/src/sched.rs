//! [`TreeRun`]: the state machine of one job tree while it runs (SPEC §4).
//!
//! The job manager owns one `TreeRun` per active tree. Every call takes `now` and returns the
//! [`Effect`]s the caller must carry out: persist a changed job, start a job that became ready,
//! kill a running one, wake a retry later. The rules live here and nowhere else:
//!
//! - a job is ready when it waits and **all its children and needs succeeded**; leaves first;
//! - a job that fails with retries left waits again with `retry_at` (exponential backoff, jitter);
//! - a final failure under `on_failure = abort`, or a user abort of any job, *halts* the tree:
//!   running jobs are killed, waiting ones become `aborted`, and nothing starts afterwards;
//! - under `on_failure = continue` only the jobs that depend on the failed one are aborted;
//! - the tree's state is derived from its jobs once none waits or runs.

use crate::job::{Job, JobState, OnFailure, Run, Tree, TreeState};
use crate::time::Ts;
use std::collections::HashMap;
use uuid::Uuid;

/// What the caller must do after a transition. Indexes are positions in [`TreeRun::jobs`].
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// The job's fields changed: persist it.
    Changed(u32),
    /// The job may start now: place it on a node, or resolve it if it is a grouping job.
    Ready(u32),
    /// The job runs and must be killed (SIGTERM, then SIGKILL after the grace period).
    Kill(u32),
    /// The job waits to retry; call [`TreeRun::retry_due`] at this time.
    Retry(u32, Ts),
    /// The tree reached its final state: persist [`TreeRun::tree`].
    TreeDone,
}

/// How an attempt ended, as the agent reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// The JSON result the job printed last, if any.
    pub result: Option<serde_json::Value>,
}

impl Outcome {
    pub fn success() -> Outcome {
        Outcome {
            exit_code: Some(0),
            error: None,
            result: None,
        }
    }

    pub fn failure(exit_code: Option<i32>, error: Option<String>) -> Outcome {
        Outcome {
            exit_code,
            error,
            result: None,
        }
    }

    fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && self.error.is_none()
    }
}

/// Exponential backoff with "equal jitter": half the delay fixed, half random.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base_ms: u64,
    pub max_ms: u64,
}

impl Backoff {
    /// The delay before attempt `next_attempt` (2 for the first retry); `jitter` is in [0, 1).
    pub fn delay_ms(&self, next_attempt: u32, jitter: f64) -> u64 {
        let exp = next_attempt.saturating_sub(2).min(40);
        let full = self.base_ms.saturating_mul(1u64 << exp).min(self.max_ms);
        full / 2 + ((full as f64 / 2.0) * jitter.clamp(0.0, 1.0)) as u64
    }
}

/// Why a job cannot start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotStartable {
    NotWaiting,
    DepsPending,
    Halted,
    RetryLater,
}

/// The running state of one tree.
#[derive(Debug)]
pub struct TreeRun {
    pub tree: Tree,
    pub jobs: Vec<Job>,
    index: HashMap<Uuid, u32>,
    dependents: Vec<Vec<u32>>,
    /// Per job: how many of its deps have not succeeded yet.
    pending: Vec<u32>,
    kill_requested: Vec<bool>,
    /// Nothing starts in a halted tree.
    halted: bool,
    /// Jobs waiting or running.
    active: u32,
}

impl TreeRun {
    /// Builds the run from stored jobs (new or recovered after a restart). The returned effects
    /// start what is ready, re-arm retries and re-send kills of a halted tree.
    pub fn new(tree: Tree, jobs: Vec<Job>, now: Ts) -> (TreeRun, Vec<Effect>) {
        let index: HashMap<Uuid, u32> = jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (j.id, i as u32))
            .collect();
        let mut dependents = vec![Vec::new(); jobs.len()];
        let mut pending = vec![0u32; jobs.len()];
        for (i, j) in jobs.iter().enumerate() {
            for d in j.deps() {
                let di = index[d] as usize;
                dependents[di].push(i as u32);
                if jobs[di].state != JobState::Succeeded {
                    pending[i] += 1;
                }
            }
        }
        let active = jobs.iter().filter(|j| !j.state.is_final()).count() as u32;
        let halted = tree.user_aborted
            || (tree.on_failure == OnFailure::Abort
                && jobs.iter().any(|j| j.state == JobState::Failed));
        let n = jobs.len();
        let mut run = TreeRun {
            tree,
            jobs,
            index,
            dependents,
            pending,
            kill_requested: vec![false; n],
            halted,
            active,
        };
        let mut fx = Vec::new();
        if run.halted {
            run.halt(now, &mut fx);
        } else {
            for i in 0..n as u32 {
                let j = &run.jobs[i as usize];
                if j.state == JobState::Waiting && run.pending[i as usize] == 0 {
                    match j.retry_at {
                        Some(at) if at > now => fx.push(Effect::Retry(i, at)),
                        _ => fx.push(Effect::Ready(i)),
                    }
                }
            }
        }
        run.check_done(now, &mut fx);
        (run, fx)
    }

    /// The position of a job in [`TreeRun::jobs`].
    pub fn index_of(&self, id: &Uuid) -> Option<u32> {
        self.index.get(id).copied()
    }

    pub fn job(&self, i: u32) -> &Job {
        &self.jobs[i as usize]
    }

    pub fn is_halted(&self) -> bool {
        self.halted
    }

    /// Whether a kill was asked for this job.
    pub fn kill_requested(&self, i: u32) -> bool {
        self.kill_requested[i as usize]
    }

    /// Whether the job may start now.
    pub fn startable(&self, i: u32, now: Ts) -> Result<(), NotStartable> {
        let j = &self.jobs[i as usize];
        if j.state != JobState::Waiting {
            return Err(NotStartable::NotWaiting);
        }
        if self.halted {
            return Err(NotStartable::Halted);
        }
        if self.pending[i as usize] > 0 {
            return Err(NotStartable::DepsPending);
        }
        if j.retry_at.is_some_and(|at| at > now) {
            return Err(NotStartable::RetryLater);
        }
        Ok(())
    }

    /// `waiting` → `running` on `node`.
    pub fn start(&mut self, i: u32, node: &str, now: Ts) -> Result<Vec<Effect>, NotStartable> {
        self.startable(i, now)?;
        let j = &mut self.jobs[i as usize];
        j.state = JobState::Running;
        j.node = Some(node.to_string());
        j.started_at = Some(now);
        j.finished_at = None;
        j.exit_code = None;
        j.error = None;
        j.retry_at = None;
        if !self.tree.nodes.iter().any(|n| n == node) {
            self.tree.nodes.push(node.to_string());
        }
        Ok(vec![Effect::Changed(i)])
    }

    /// Resolves a ready grouping job on the server: it succeeds at once.
    pub fn resolve_group(&mut self, i: u32, now: Ts) -> Result<Vec<Effect>, NotStartable> {
        debug_assert!(matches!(self.jobs[i as usize].run, Run::Group));
        self.startable(i, now)?;
        let j = &mut self.jobs[i as usize];
        j.state = JobState::Running;
        j.started_at = Some(now);
        let mut fx = Vec::new();
        self.finish_into(i, Outcome::success(), now, None, &mut fx);
        Ok(fx)
    }

    /// A waiting job can never run (e.g. no node can ever match it): it fails at once, without
    /// retries, and the tree follows its `on_failure`.
    pub fn reject(&mut self, i: u32, error: String, now: Ts) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.jobs[i as usize].state != JobState::Waiting {
            return fx;
        }
        self.jobs[i as usize].state = JobState::Running;
        self.finish_into(i, Outcome::failure(None, Some(error)), now, None, &mut fx);
        fx
    }

    /// A running job's node was lost: the attempt ends with `error`; with `retry` it may be tried
    /// again (elsewhere), under the usual retry rules.
    pub fn lose(
        &mut self,
        i: u32,
        error: String,
        now: Ts,
        retry: Option<(Backoff, f64)>,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.jobs[i as usize].state != JobState::Running {
            return fx;
        }
        self.finish_into(i, Outcome::failure(None, Some(error)), now, retry, &mut fx);
        fx
    }

    /// A retry's time came: the job is ready if nothing changed meanwhile.
    pub fn retry_due(&mut self, i: u32, now: Ts) -> Vec<Effect> {
        if self.startable(i, now).is_ok() {
            vec![Effect::Ready(i)]
        } else {
            Vec::new()
        }
    }

    /// A running job's attempt ended. Reports for jobs that do not run (late duplicates, stale
    /// attempts) change nothing.
    pub fn finish(
        &mut self,
        i: u32,
        attempt: u32,
        outcome: Outcome,
        now: Ts,
        backoff: Backoff,
        jitter: f64,
    ) -> Vec<Effect> {
        let j = &self.jobs[i as usize];
        if j.state != JobState::Running || j.attempt != attempt {
            return Vec::new();
        }
        let mut fx = Vec::new();
        self.finish_into(i, outcome, now, Some((backoff, jitter)), &mut fx);
        fx
    }

    /// `retry`: the backoff and jitter when a failure may be retried, `None` when it may not.
    fn finish_into(
        &mut self,
        i: u32,
        outcome: Outcome,
        now: Ts,
        retry: Option<(Backoff, f64)>,
        fx: &mut Vec<Effect>,
    ) {
        let ok = outcome.succeeded();
        let killed = self.kill_requested[i as usize];
        let may_retry = !ok
            && !killed
            && !self.halted
            && self.jobs[i as usize].attempt <= self.jobs[i as usize].retries;
        let j = &mut self.jobs[i as usize];
        j.exit_code = outcome.exit_code;
        j.error = outcome.error;
        j.result = outcome.result;
        fx.push(Effect::Changed(i));
        if ok {
            j.state = JobState::Succeeded;
            j.finished_at = Some(now);
            self.active -= 1;
            for k in 0..self.dependents[i as usize].len() {
                let d = self.dependents[i as usize][k];
                self.pending[d as usize] -= 1;
                if self.pending[d as usize] == 0 && self.startable(d, now).is_ok() {
                    fx.push(Effect::Ready(d));
                }
            }
        } else if let Some((backoff, jitter)) = retry.filter(|_| may_retry) {
            j.attempt += 1;
            j.state = JobState::Waiting;
            let at = now.plus_ms(backoff.delay_ms(j.attempt, jitter) as i64);
            j.retry_at = Some(at);
            fx.push(Effect::Retry(i, at));
        } else if killed {
            j.state = JobState::Aborted;
            j.finished_at = Some(now);
            if j.error.is_none() {
                j.error = Some("aborted".into());
            }
            self.active -= 1;
        } else {
            j.state = JobState::Failed;
            j.finished_at = Some(now);
            self.active -= 1;
            if !self.halted {
                match self.tree.on_failure {
                    OnFailure::Abort => self.halt(now, fx),
                    OnFailure::Continue => self.abort_dependents(i, now, fx),
                }
            }
        }
        self.check_done(now, fx);
    }

    /// A user aborts job `i` (any job of the tree): like a failure under `abort`, whatever the
    /// tree's `on_failure`. Refused once the tree has finished.
    pub fn abort(&mut self, now: Ts) -> Result<Vec<Effect>, TreeState> {
        if self.tree.state != TreeState::Running {
            return Err(self.tree.state);
        }
        self.tree.user_aborted = true;
        let mut fx = Vec::new();
        self.halt(now, &mut fx);
        self.check_done(now, &mut fx);
        Ok(fx)
    }

    fn halt(&mut self, now: Ts, fx: &mut Vec<Effect>) {
        self.halted = true;
        for i in 0..self.jobs.len() {
            match self.jobs[i].state {
                JobState::Waiting => {
                    self.set_aborted(i, now);
                    fx.push(Effect::Changed(i as u32));
                }
                JobState::Running if !self.kill_requested[i] => {
                    self.kill_requested[i] = true;
                    fx.push(Effect::Kill(i as u32));
                }
                _ => {}
            }
        }
    }

    fn set_aborted(&mut self, i: usize, now: Ts) {
        let j = &mut self.jobs[i];
        j.state = JobState::Aborted;
        j.finished_at = Some(now);
        j.retry_at = None;
        j.error = Some("aborted".into());
        self.active -= 1;
    }

    /// Aborts every waiting job that depends, directly or not, on job `failed`.
    fn abort_dependents(&mut self, failed: u32, now: Ts, fx: &mut Vec<Effect>) {
        let mut stack = vec![failed];
        while let Some(i) = stack.pop() {
            for k in 0..self.dependents[i as usize].len() {
                let d = self.dependents[i as usize][k];
                if self.jobs[d as usize].state == JobState::Waiting {
                    self.set_aborted(d as usize, now);
                    fx.push(Effect::Changed(d));
                    stack.push(d);
                }
            }
        }
    }

    fn check_done(&mut self, now: Ts, fx: &mut Vec<Effect>) {
        if self.active > 0 || self.tree.state != TreeState::Running {
            return;
        }
        self.tree.state = if self.jobs[0].state == JobState::Succeeded {
            TreeState::Succeeded
        } else if self.tree.user_aborted {
            TreeState::Aborted
        } else {
            TreeState::Failed
        };
        self.tree.finished_at = Some(now);
        fx.push(Effect::TreeDone);
    }
}

/// The derived state of a tree from its jobs alone (used to check [`TreeRun`]).
pub fn derive_tree_state(jobs: &[Job], user_aborted: bool) -> TreeState {
    if jobs.iter().any(|j| !j.state.is_final()) {
        TreeState::Running
    } else if jobs[0].state == JobState::Succeeded {
        TreeState::Succeeded
    } else if user_aborted {
        TreeState::Aborted
    } else {
        TreeState::Failed
    }
}

#[cfg(test)]
mod tests;
