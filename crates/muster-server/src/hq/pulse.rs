//! The pulse: the server's main loop (SPEC §7). Every `[pulse] interval` it runs each
//! [`Watcher`] in the order they were registered, one after another, each on a blocking thread of
//! its own:
//!
//! - a watcher that fails, panics or takes longer than `[pulse] watcher_timeout` is recorded so
//!   and the pulse goes on with the next one; a slow one keeps running in the background and is
//!   skipped (`busy`) by later pulses until it ends, so it never runs twice at once;
//! - pulses never overlap: the next starts one interval after the last began, or at once when
//!   the last took longer than that (`muster_pulse_overruns_total` counts those);
//! - in cluster mode only the leader runs the watchers that act (the default): the others run
//!   only those that keep their own copy fresh ([`Watcher::leader_only`] false).

use crate::App;
use muster_core::Ts;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What a watcher is told about the pulse it runs in.
#[derive(Clone, Debug)]
pub struct Tick {
    /// The pulse's number (from 1).
    pub n: u64,
    /// Whether this server leads the cluster now.
    pub leading: bool,
    /// Whether this watcher ran in the previous pulse too (false at the first pulse, and after a
    /// pulse it was skipped in, as when this server was not leading): state kept in memory since
    /// then may be stale and must be read again.
    pub continued: bool,
}

/// One of the pulse's watchers.
pub trait Watcher: Send {
    /// Its name in the status and the metrics (`sync`, `orders`, …).
    fn name(&self) -> &'static str;

    /// Whether only the leader runs it (the default: it acts on the cluster).
    fn leader_only(&self) -> bool {
        true
    }

    /// One run; `Ok` with a short message of what it did, `Err` with why it failed. It runs on a
    /// blocking thread and may block (git, the store).
    fn run(&mut self, app: &Arc<App>, tick: &Tick) -> Result<String, String>;
}

/// A watcher's last run.
#[derive(Clone, Debug, Serialize)]
pub struct WatcherRun {
    pub name: &'static str,
    pub started_at: Ts,
    pub duration_ms: u64,
    /// `ok`, `failed`, `slow` (still running past the timeout), `busy` (a slow run is still
    /// going, so this pulse skipped it), `running`.
    pub outcome: &'static str,
    pub message: String,
    /// CPU time its thread spent in the run (user + system), in microseconds.
    pub cpu_us: u64,
}

/// The CPU time (user + system) the calling thread has used, in microseconds.
fn thread_cpu_us() -> u64 {
    // SAFETY: getrusage(2) fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0;
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

struct Slot {
    name: &'static str,
    leader_only: bool,
    watcher: Arc<Mutex<Box<dyn Watcher>>>,
    /// Set while a run is going (on its blocking thread, maybe past the timeout).
    busy: Arc<AtomicBool>,
    last_pulse: u64,
}

fn record(app: &App, run: WatcherRun) {
    app.metrics
        .pulse
        .watcher(run.name, run.outcome, run.duration_ms);
    app.hq.report(
        |s| match s.watchers.iter_mut().find(|w| w.name == run.name) {
            Some(w) => *w = run,
            None => s.watchers.push(run),
        },
    );
}

/// Runs the pulse of `app` forever.
pub async fn run(app: Arc<App>, watchers: Vec<Box<dyn Watcher>>) {
    let interval = app.config.pulse.interval;
    let mut slots: Vec<Slot> = watchers
        .into_iter()
        .map(|w| Slot {
            name: w.name(),
            leader_only: w.leader_only(),
            watcher: Arc::new(Mutex::new(w)),
            busy: Arc::default(),
            last_pulse: 0,
        })
        .collect();
    let mut n = 0u64;
    loop {
        n += 1;
        let began = Instant::now();
        let tickets = app.hq.began();
        let cpu_us = pulse_once(&app, &mut slots, n).await;
        let took = began.elapsed();
        app.metrics.pulse.pulsed(took, took > interval, cpu_us);
        app.hq.ended(n, tickets);
        let next = if took > interval {
            Instant::now()
        } else {
            began + interval
        };
        if app.hq.asked() {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = app.hq.woken() => {}
        }
    }
}

/// One pulse; answers the CPU time its watchers' runs took (those that ended in it).
async fn pulse_once(app: &Arc<App>, slots: &mut [Slot], n: u64) -> u64 {
    let leading = app.cluster.is_leader();
    let mut cpu_total = 0;
    if app.hq.repo().is_none() {
        let a = app.clone();
        if tokio::task::spawn_blocking(move || a.hq.open())
            .await
            .ok()
            .flatten()
            .is_none()
        {
            return 0;
        }
    }
    let timeout = app.config.pulse.watcher_timeout;
    for slot in slots.iter_mut() {
        if slot.leader_only && !leading {
            continue;
        }
        let tick = Tick {
            n,
            leading,
            continued: slot.last_pulse + 1 == n,
        };
        slot.last_pulse = n;
        let started_at = muster_wire::util::now();
        let t0 = Instant::now();
        if slot.busy.swap(true, Ordering::SeqCst) {
            record(
                app,
                WatcherRun {
                    name: slot.name,
                    started_at,
                    duration_ms: 0,
                    outcome: "busy",
                    message: "its previous run is still going; skipped".into(),
                    cpu_us: 0,
                },
            );
            // Whatever it kept in memory is stale by the time it ends.
            slot.last_pulse = 0;
            continue;
        }
        let (a, name) = (app.clone(), slot.name);
        let (watcher, busy) = (slot.watcher.clone(), slot.busy.clone());
        let task = tokio::task::spawn_blocking(move || {
            let cpu0 = thread_cpu_us();
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut w = watcher.lock().unwrap_or_else(|e| e.into_inner());
                w.run(&a, &tick)
            }));
            busy.store(false, Ordering::SeqCst);
            let duration_ms = t0.elapsed().as_millis() as u64;
            let cpu_us = thread_cpu_us().saturating_sub(cpu0);
            let (outcome, message) = match res {
                Ok(Ok(m)) => ("ok", m),
                Ok(Err(m)) => ("failed", m),
                Err(_) => (
                    "failed",
                    "the watcher panicked (the server's log has it)".into(),
                ),
            };
            if outcome == "failed" {
                tracing::warn!("watcher {name}: {message}");
            }
            record(
                &a,
                WatcherRun {
                    name,
                    started_at,
                    duration_ms,
                    outcome,
                    message,
                    cpu_us,
                },
            );
            cpu_us
        });
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(cpu)) => {
                cpu_total += cpu;
                continue;
            }
            Ok(Err(_)) => continue,
            Err(_) => {}
        }
        {
            record(
                app,
                WatcherRun {
                    name: slot.name,
                    started_at,
                    duration_ms: t0.elapsed().as_millis() as u64,
                    outcome: "slow",
                    message: format!(
                        "still running after {} s; later pulses skip it until it ends",
                        timeout.as_secs_f64()
                    ),
                    cpu_us: 0,
                },
            );
            slot.last_pulse = 0;
        }
    }
    cpu_total
}
