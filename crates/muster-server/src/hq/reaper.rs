//! The reaper's frame (SPEC §7): one loop, every `[reaper] interval` (and once at start), run
//! by the leader, that runs each clean-up task a part registered: jobs past `jobs.retention`
//! here; the processes and files of deleted models and services in the parts that make them.
//! Each task's last run is in `GET /api/v1/hq`.

use crate::App;
use muster_core::Ts;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One kind of clean-up.
pub trait ReapTask: Send + Sync {
    /// Its name in the status.
    fn name(&self) -> &'static str;
    /// One pass; `Ok` with what it removed, `Err` with why it failed. Blocking.
    fn reap(&self, app: &App) -> Result<String, String>;
}

/// A task's last run.
#[derive(Clone, Debug, Serialize)]
pub struct TaskRun {
    pub name: &'static str,
    pub started_at: Ts,
    pub duration_ms: u64,
    pub ok: bool,
    pub message: String,
}

/// The registered tasks and their last runs.
#[derive(Default)]
pub struct Reaper {
    tasks: Mutex<Vec<Arc<dyn ReapTask>>>,
    runs: Mutex<Vec<TaskRun>>,
}

impl Reaper {
    /// Adds a task (run after those registered before it).
    pub fn register(&self, task: Arc<dyn ReapTask>) {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
    }

    /// The last run of each task.
    pub fn runs(&self) -> Vec<TaskRun> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs every task once, one after another; a failing one does not stop the others.
    pub fn reap_once(&self, app: &App) {
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for t in tasks {
            let (started_at, t0) = (muster_wire::util::now(), Instant::now());
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.reap(app)))
                .unwrap_or_else(|_| Err("the task panicked (the server's log has it)".into()));
            if let Err(e) = &res {
                tracing::error!("reaper: {}: {e}", t.name());
            }
            let run = TaskRun {
                name: t.name(),
                started_at,
                duration_ms: t0.elapsed().as_millis() as u64,
                ok: res.is_ok(),
                message: res.unwrap_or_else(|e| e),
            };
            let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
            match runs.iter_mut().find(|r| r.name == run.name) {
                Some(r) => *r = run,
                None => runs.push(run),
            }
        }
    }
}

/// Jobs past `jobs.retention`: finished trees, their records and their unused log blobs.
pub struct ExpiredJobs;

impl ReapTask for ExpiredJobs {
    fn name(&self) -> &'static str {
        "expired_jobs"
    }

    fn reap(&self, app: &App) -> Result<String, String> {
        let n = crate::reap_once(app);
        Ok(format!("{n} finished tree(s) past retention removed"))
    }
}

/// Runs the reaper of `app` forever (only while this server leads).
pub async fn run(app: Arc<App>) {
    let mut tick = tokio::time::interval(app.config.reaper.interval);
    loop {
        tick.tick().await;
        if !app.cluster.is_leader() {
            // Not leading (yet): look again shortly rather than wait a whole interval.
            if wait_leading(&app).await {
                tick.reset();
            } else {
                continue;
            }
        }
        let a = app.clone();
        let _ = tokio::task::spawn_blocking(move || a.hq.reaper().reap_once(&a)).await;
    }
}

/// Waits up to a few seconds for this server to lead; answers whether it does.
async fn wait_leading(app: &App) -> bool {
    for _ in 0..50 {
        if app.cluster.is_leader() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}
