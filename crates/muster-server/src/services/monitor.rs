//! Monitors on the pulse (SPEC §6): the `services` watcher, on the leader. A recorded service
//! with a `monitor` action gets a tree running it (as a one-verb action plan) when due — every
//! pulse, or every `monitor_every` — and never while its last one runs; the action's result sets
//! the status (`active | maintenance | waiting | blocked | error`), message and time. A
//! `[process]` service without one takes its status from its process: healthy is `active`,
//! starting or restarting `waiting`, unhealthy `maintenance`, failed `error`, stopped `blocked`.

use super::{ServiceRecord, SERVICES};
use crate::hq::pulse::{Tick, Watcher};
use crate::App;
use muster_core::process::ProcState;
use muster_core::TreeState;
use muster_wire::util::now;
use std::sync::Arc;

pub struct MonitorWatcher;

fn status_of(state: ProcState) -> &'static str {
    match state {
        ProcState::Healthy => "active",
        ProcState::Pending | ProcState::Starting | ProcState::Restarting => "waiting",
        ProcState::Unhealthy => "maintenance",
        ProcState::Stopped => "blocked",
        _ => "error",
    }
}

impl Watcher for MonitorWatcher {
    fn name(&self) -> &'static str {
        "services"
    }

    fn run(&mut self, app: &Arc<App>, _tick: &Tick) -> Result<String, String> {
        let records = app.services.records(app).map_err(|e| format!("{e:?}"))?;
        let every_pulse = app.config.pulse.interval.as_millis() as i64;
        let (mut started, mut statuses) = (0, 0);
        for (path, r) in records {
            if !r.recorded.installed {
                continue;
            }
            if r.actions.iter().any(|a| a == "monitor") {
                let every = r
                    .monitor_every
                    .as_ref()
                    .and_then(|e| {
                        muster_core::process::DurText::Text(e.clone())
                            .ms("monitor_every")
                            .ok()
                    })
                    .map_or(every_pulse, |ms| ms as i64);
                let due = r.monitored_at.is_none_or(|t| now().0 - t.0 >= every);
                let running = r.monitor_tree.is_some_and(|t| {
                    app.store
                        .tree(t)
                        .ok()
                        .flatten()
                        .is_some_and(|t| t.state == TreeState::Running)
                });
                if !due || running {
                    continue;
                }
                let by = app.services.first_admin(app)?;
                let plan = app
                    .services
                    .action_plan(app, &path, "monitor", &by)
                    .map_err(|e| format!("{e:?}"))?;
                let (_, tree) = tokio::runtime::Handle::current()
                    .block_on(app.services.apply(app, &plan.id, &by, true))
                    .map_err(|e| format!("{e:?}"))?;
                SERVICES
                    .update(&*app.store, &path, |rec| {
                        let mut rec = rec?;
                        rec.monitored_at = Some(now());
                        rec.monitor_tree = tree;
                        Some(rec)
                    })
                    .map_err(|e| e.to_string())?;
                started += 1;
            } else if let Some(id) = r.process {
                let Some(p) = app.processes.get(id).map_err(|e| e.to_string())? else {
                    continue;
                };
                let status = status_of(p.state);
                if r.status != status || r.message != p.reason {
                    SERVICES
                        .update(&*app.store, &path, |rec| {
                            let mut rec: ServiceRecord = rec?;
                            rec.status = status.to_string();
                            rec.message = p.reason.clone();
                            rec.monitored_at = Some(now());
                            Some(rec)
                        })
                        .map_err(|e| e.to_string())?;
                    statuses += 1;
                }
            }
        }
        Ok(format!(
            "{started} monitor(s) started, {statuses} status(es) from processes"
        ))
    }
}
