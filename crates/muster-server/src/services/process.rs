//! The built-in `start`, `stop`, `restart` and the removal at reset of a service with a
//! `[process]` and no action of its own for the verb: the process layer
//! ([`crate::processes::Processes`]) runs it on the service's node as `service PATH` in
//! workspace `hq`; `start` waits until it is healthy (or running, without a health check).
//! The record keeps the process's id.

use super::{ServiceError, ServiceRecord, StoredPlan, SERVICES};
use crate::App;
use muster_core::process::{Defaults, ProcState};
use muster_wire::util::now;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

type Result<T> = std::result::Result<T, ServiceError>;

/// How long `start` waits for the process to be healthy.
const START_WAIT: Duration = Duration::from_secs(120);

fn proc_err(e: crate::processes::ProcError) -> ServiceError {
    match e {
        crate::processes::ProcError::NotFound => ServiceError::NotFound("process not found".into()),
        crate::processes::ProcError::NodeUnavailable(n) => {
            ServiceError::Unavailable(format!("node {n} is not connected"))
        }
        crate::processes::ProcError::Store(e) => ServiceError::Store(e),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))?
}

/// Carries out `verb` (`start`, `stop`, `restart`, `remove`) of step `key`'s service process.
pub async fn run(app: &Arc<App>, plan: &StoredPlan, key: &str, verb: &str) -> Result<Value> {
    let s = plan
        .steps
        .iter()
        .find(|s| s.key == key)
        .cloned()
        .ok_or_else(|| ServiceError::NotFound("step not found".into()))?;
    let path = s.step.path.clone();
    let (a, p2) = (app.clone(), path.clone());
    let rec = blocking(move || Ok(SERVICES.get(&*a.store, &p2)?.map(|(r, _)| r))).await?;
    let old = rec.as_ref().and_then(|r| r.process);
    let procs = app.processes.clone();
    match verb {
        "start" | "restart" => {
            let Some(table) = s.resolved.as_ref().and_then(|r| r.process.clone()) else {
                // By hand (no resolved spec): the recorded process.
                let id =
                    old.ok_or_else(|| ServiceError::NotFound("the service has no process".into()))?;
                let restart = verb == "restart";
                let p = blocking(move || {
                    if restart {
                        procs.restart(id).map_err(proc_err)
                    } else {
                        procs.resume(id).map_err(proc_err)
                    }
                })
                .await?;
                return Ok(json!({"process": p.id, "state": p.state.as_str()}));
            };
            let mut spec = muster_core::service::process_spec(&path, &table).map_err(|e| {
                ServiceError::Invalid(vec![muster_core::service::Problem {
                    file: format!("services/{path}/service.toml"),
                    line: None,
                    message: format!("[process]: {e}"),
                }])
            })?;
            if spec.node.is_none() {
                spec.node = s.node.clone();
            }
            let defaults = Defaults {
                kill_grace_ms: app.config.jobs.kill_grace.as_millis() as u64,
                ..Defaults::default()
            };
            let mut def = muster_core::process::validate(&spec, "hq", defaults)
                .map_err(ServiceError::Internal)?;
            // Its env's `${secrets.KEY}` stay as they are in the record: the values go to the
            // node at each start (see `Processes::secret_env`).
            let mut named = std::collections::BTreeSet::new();
            for v in def.env.values() {
                muster_core::service::secret_refs(&Value::String(v.clone()), &mut named);
            }
            if !named.is_empty() {
                def.secrets_of = Some(path.clone());
            }
            // A new spec each install or reconfigure: the old process goes, the new one starts.
            // The old run ends before the new one starts: never two copies of a service's
            // process (they would share its port, and a check could pass on the old one).
            if let Some(id) = old {
                let (p, links) = (procs.clone(), app.links.clone());
                // A node that is away stops it when it is back (the record is gone by then):
                // nothing to wait for.
                let stopping = blocking(move || match p.stop(id) {
                    Ok(q) => Ok(q.node.is_some_and(|n| links.is_connected(&n))),
                    Err(crate::processes::ProcError::NotFound) => Ok(false),
                    Err(e) => Err(proc_err(e)),
                })
                .await?;
                if stopping {
                    let ended = procs
                        .wait_for(id, START_WAIT, |p| p.state.is_final())
                        .await?;
                    if let Some(p) = ended.filter(|p| !p.state.is_final()) {
                        return Err(ServiceError::Conflict(format!(
                            "the old process {} did not stop ({}): try again",
                            p.id, p.reason
                        )));
                    }
                }
            }
            let (a, by, p2) = (app.clone(), plan.created_by.clone(), path.clone());
            let started = blocking(move || {
                if let Some(id) = old {
                    let _ = a.processes.delete(id);
                }
                let p = a.processes.start(def, &by, true)?;
                let id = p.id;
                SERVICES.update(&*a.store, &p2, |r| {
                    let mut r = r.unwrap_or_else(|| ServiceRecord {
                        path: p2.clone(),
                        node: p.node.clone(),
                        status: "waiting".into(),
                        updated_at: now(),
                        ..Default::default()
                    });
                    r.process = Some(id);
                    Some(r)
                })?;
                Ok(p)
            })
            .await?;
            let health = spec.health.is_some();
            let seen = app
                .processes
                .wait_for(started.id, START_WAIT, |p| {
                    p.state == ProcState::Healthy
                        || (!health && p.state == ProcState::Starting)
                        || p.state.is_final()
                })
                .await?
                .ok_or_else(|| ServiceError::NotFound("the process vanished".into()))?;
            let up =
                seen.state == ProcState::Healthy || (!health && seen.state == ProcState::Starting);
            if !up {
                return Err(ServiceError::Conflict(format!(
                    "process {} is {} ({})",
                    seen.id,
                    seen.state.as_str(),
                    seen.reason
                )));
            }
            Ok(
                json!({"process": seen.id, "state": seen.state.as_str(), "node": seen.node,
                      "address": seen.address, "ports": seen.ports}),
            )
        }
        "stop" => match old {
            Some(id) => {
                let p = blocking(move || procs.stop(id).map_err(proc_err)).await?;
                Ok(json!({"process": p.id, "state": p.state.as_str()}))
            }
            None => Ok(json!({"process": null})),
        },
        "remove" => match old {
            Some(id) => {
                let a = app.clone();
                blocking(move || {
                    match a.processes.delete(id) {
                        Ok(_) | Err(crate::processes::ProcError::NotFound) => {}
                        Err(e) => return Err(proc_err(e)),
                    }
                    SERVICES.update(&*a.store, &path, |r| {
                        let mut r = r?;
                        r.process = None;
                        Some(r)
                    })?;
                    Ok(())
                })
                .await?;
                Ok(json!({"process": id, "state": "removed"}))
            }
            None => Ok(json!({"process": null})),
        },
        _ => Err(ServiceError::NotFound("no such process verb".into())),
    }
}
