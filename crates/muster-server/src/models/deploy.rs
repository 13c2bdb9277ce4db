//! A deploy's job tree (SPEC §8) and the steps the server carries out.
//!
//! The tree: a root (no command) over six jobs, each needing the one before:
//!
//! 1. `prepare` — on a node matching the bundle's `node_selector`: `muster models step prepare`
//!    fetches the version's archive from the server, unpacks it under the node's data dir and
//!    builds (or reuses) its Python environment, the build's progress in the job's log; its last
//!    line is the [`super::Placement`] as JSON (the job's result).
//! 2. `start` — the version's `replicas` predictors started as supervised processes (`muster
//!    predictor`, through the process layer) on that node, waited for until healthy.
//! 3. `health` — each replica's `/healthz`, which calls the bundle's `example`.
//! 4. `switch` — the live version changed by compare-and-set of the model's document; every
//!    server's routes follow (this one's before the step answers).
//! 5. `drain` — the old version's calls in flight on this server end (bounded by
//!    `[models] drain_timeout`).
//! 6. `stop` — the old version's predictors stopped (kept for a revert), versions past
//!    `[models] keep_versions` retired.
//!
//! Steps 2-6 are jobs too (`muster models step STEP`, on any node), so the tree shows each one's
//! state and log; each asks the server to do its step and prints what the server streams back.
//! A step that fails fails its job, the tree aborts the rest, and the root's hook
//! ([`super::DeployHook`]) marks the version failed: until `switch`, the old version serves.

use super::{Model, ModelVersion, Placement, VersionState};
use crate::config::ModelsConfig;
use crate::App;
use muster_core::process::{
    self, DurText, HealthSpec, LimitsSpec, ProcState, ProcessSpec, RestartMode,
};
use muster_core::spec::JobSpec;
use muster_core::{JobState, Tags, Uuid};
use muster_wire::util::now;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::Sender;

/// The steps, in order.
pub const STEPS: &[&str] = &["prepare", "start", "health", "switch", "drain", "stop"];

/// The steps the server carries out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Start,
    Health,
    Switch,
    Drain,
    Stop,
}

impl Step {
    pub fn parse(s: &str) -> Option<Step> {
        Some(match s {
            "start" => Step::Start,
            "health" => Step::Health,
            "switch" => Step::Switch,
            "drain" => Step::Drain,
            "stop" => Step::Stop,
            _ => return None,
        })
    }
}

/// A path in single quotes for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The deploy tree of version `v` of `ws/name`.
/// A revert's tree (`revert`) has no `prepare`: the version's files and predictors are there.
pub fn tree_spec(
    cfg: &ModelsConfig,
    ws: &str,
    name: &str,
    v: &ModelVersion,
    revert: bool,
) -> JobSpec {
    let n = v.version;
    let steps: &[&str] = if revert { &STEPS[1..] } else { STEPS };
    let mut labels = BTreeMap::new();
    labels.insert("kind".to_string(), super::KIND_DEPLOY.to_string());
    let mut children = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let mut shell = format!("exec \"$MUSTER_EXE\" models step {step} {ws} {name} {n}");
        if *step == "prepare" {
            if !cfg.envs_dir.is_empty() {
                shell.push_str(&format!(" --envs {}", sh_quote(&cfg.envs_dir)));
            }
            if !cfg.wheels_dir.is_empty() {
                shell.push_str(&format!(" --wheels {}", sh_quote(&cfg.wheels_dir)));
            }
            if !cfg.onnxruntime_lib.is_empty() {
                shell.push_str(&format!(
                    " --onnxruntime-lib {}",
                    sh_quote(&cfg.onnxruntime_lib)
                ));
            }
        }
        let timeout = match *step {
            "prepare" => 3600,
            "start" => cfg.start_timeout.as_secs() + 60,
            "health" => 2 * cfg.predict_timeout.as_secs() + 60,
            "drain" => cfg.drain_timeout.as_secs() + 60,
            _ => 300,
        };
        children.push(JobSpec {
            name: format!("{step} {ws}/{name} v{n}"),
            key: Some(step.to_string()),
            shell: Some(shell),
            node_selector: (*step == "prepare" && !v.node_selector.is_empty())
                .then(|| v.node_selector.clone()),
            timeout_s: Some(timeout),
            retries: Some(0),
            needs: if i == 0 {
                vec![]
            } else {
                vec![steps[i - 1].to_string()]
            },
            ..Default::default()
        });
    }
    JobSpec {
        name: if revert {
            format!("revert {ws}/{name} to v{n}")
        } else {
            format!("deploy {ws}/{name} v{n}")
        },
        tags: Some(Tags {
            workspace: ws.to_string(),
            application: Some(name.to_string()),
            version: Some(n.to_string()),
            instance: None,
            labels,
        }),
        children,
        ..Default::default()
    }
}

/// A step's progress line.
async fn say(out: &Sender<String>, line: impl Into<String>) {
    let mut l = line.into();
    l.push('\n');
    let _ = out.send(l).await;
}

/// Runs a blocking closure off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}

/// The model and version a step is for, checked to be deploying.
async fn deploying(
    app: &Arc<App>,
    ws: &str,
    name: &str,
    n: u32,
) -> Result<(Model, ModelVersion), String> {
    let (a, ws2, name2) = (app.clone(), ws.to_string(), name.to_string());
    let m = blocking(move || a.models.get(&ws2, &name2).map_err(|e| e.to_string()))
        .await?
        .ok_or_else(|| format!("model {ws}/{name} not found"))?;
    if m.deleted {
        return Err(format!("model {ws}/{name} was deleted"));
    }
    let v = m
        .version(n)
        .cloned()
        .ok_or_else(|| format!("model {ws}/{name} has no version {n}"))?;
    Ok((m, v))
}

/// Records `error` on the version (the hook reports it when the tree ends).
async fn record_error(app: &Arc<App>, ws: &str, name: &str, n: u32, step: &str, error: &str) {
    let (a, ws, name, msg) = (
        app.clone(),
        ws.to_string(),
        name.to_string(),
        format!("{step}: {error}"),
    );
    let _ = blocking(move || {
        a.models
            .update(&ws, &name, |m| {
                if let Some(v) = m.version_mut(n) {
                    if v.state == VersionState::Deploying && v.error.is_none() {
                        v.error = Some(msg.clone());
                    }
                }
                Ok::<_, ()>(())
            })
            .map_err(|e| e.to_string())
            .map(|_| ())
    })
    .await;
}

/// Carries out `step` of the deploy of version `n` of `ws/name`; progress lines go to `out`.
pub async fn run_step(
    app: &Arc<App>,
    ws: &str,
    name: &str,
    n: u32,
    step: Step,
    out: &Sender<String>,
) -> Result<(), String> {
    let res = match step {
        Step::Start => start(app, ws, name, n, out).await,
        Step::Health => health(app, ws, name, n, out).await,
        Step::Switch => switch(app, ws, name, n, out).await,
        Step::Drain => drain(app, ws, name, n, out).await,
        Step::Stop => stop(app, ws, name, n, out).await,
    };
    if let Err(e) = &res {
        let label = format!("{step:?}").to_lowercase();
        record_error(app, ws, name, n, &label, e).await;
    }
    res
}

/// Where `prepare` put the version: its job's result, and the node it ran on.
async fn placement(app: &Arc<App>, v: &ModelVersion) -> Result<Placement, String> {
    let tree = v.tree.ok_or("the version has no deploy tree")?;
    let a = app.clone();
    let jobs = blocking(move || a.store.tree_jobs(tree).map_err(|e| e.to_string())).await?;
    let job = jobs
        .iter()
        .find(|j| j.key == "prepare")
        .ok_or("the deploy tree has no prepare job")?;
    if job.state != JobState::Succeeded {
        return Err(format!("prepare is {}", job.state.as_str()));
    }
    let result = job
        .result
        .clone()
        .ok_or("prepare printed no result (its last line)")?;
    let mut p: Placement = serde_json::from_value(result)
        .map_err(|e| format!("prepare's result is not a placement: {e}"))?;
    p.node = job.node.clone().ok_or("prepare ran on no node")?;
    Ok(p)
}

/// The process spec of replica `r` of a version placed at `p`.
fn predictor_spec(
    cfg: &ModelsConfig,
    ws: &str,
    name: &str,
    v: &ModelVersion,
    p: &Placement,
    r: u32,
) -> ProcessSpec {
    let host = &cfg.predictor_host;
    let listen = if host.contains(':') {
        format!("[{host}]:$PORT")
    } else {
        format!("{host}:$PORT")
    };
    let mut labels = BTreeMap::new();
    labels.insert("kind".to_string(), super::KIND_PREDICTOR.to_string());
    let timeout = cfg.predict_timeout.as_secs_f64().max(1.0);
    ProcessSpec {
        name: format!("model {ws}/{name} v{} r{r}", v.version),
        tags: Some(Tags {
            workspace: ws.to_string(),
            application: Some(name.to_string()),
            version: Some(v.version.to_string()),
            instance: Some(format!("r{r}")),
            labels,
        }),
        // The node's own muster binary, whatever its PATH ($MUSTER_EXE is set by the agent).
        exec: Some(
            [
                "/bin/sh",
                "-c",
                "exec \"$MUSTER_EXE\" predictor \"$@\"",
                "predictor",
                "--bundle",
                &p.bundle_dir,
                "--env",
                &p.env_dir,
                "--listen",
                &listen,
                "--workers",
                &v.workers.to_string(),
                "--timeout",
                &format!("{timeout}"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ),
        node: Some(p.node.clone()),
        ports: vec!["http".into()],
        restart: Some(RestartMode::Always),
        // The port opens once the model has loaded (which may take a while): failed checks
        // count only after the start timeout.
        health: Some(HealthSpec {
            tcp: Some("http".into()),
            interval: Some(DurText::Text("1s".into())),
            grace: Some(DurText::Secs(cfg.start_timeout.as_secs_f64())),
            ..Default::default()
        }),
        kill_grace: Some(DurText::Text("30s".into())),
        limits: (!v.limits.is_empty()).then(|| LimitsSpec {
            memory: v.limits.memory.map(|m| serde_json::json!(m)),
            cpu: v.limits.cpu,
            pids: v.limits.pids,
        }),
        ..Default::default()
    }
}

async fn start(
    app: &Arc<App>,
    ws: &str,
    name: &str,
    n: u32,
    out: &Sender<String>,
) -> Result<(), String> {
    let (_, v) = deploying(app, ws, name, n).await?;
    if v.state != VersionState::Deploying {
        return Err(format!(
            "version {n} is {}, not deploying",
            v.state.as_str()
        ));
    }
    if v.reverting {
        return resume(app, &v, out).await;
    }
    let p = placement(app, &v).await?;
    say(
        out,
        format!(
            "bundle at {} on node {}, environment {} ({})",
            p.bundle_dir,
            p.node,
            p.env_key,
            if p.env_reused { "reused" } else { "built" }
        ),
    )
    .await;
    let mut ids = v.processes.clone();
    if ids.is_empty() {
        // Started once: a step run again finds them recorded.
        let cfg = app.config.models.clone();
        let defaults = process::Defaults {
            backoff_base_ms: 500,
            backoff_max_ms: 10_000,
            kill_grace_ms: 30_000,
        };
        let (a, ws2, name2, v2, p2) = (
            app.clone(),
            ws.to_string(),
            name.to_string(),
            v.clone(),
            p.clone(),
        );
        ids = blocking(move || {
            let mut ids = Vec::new();
            for r in 1..=v2.replicas.max(1) {
                let spec = predictor_spec(&cfg, &ws2, &name2, &v2, &p2, r);
                let def = process::validate(&spec, &ws2, defaults)?;
                let proc = a
                    .processes
                    .start(def, &v2.created_by, v2.admin)
                    .map_err(|e| e.to_string())?;
                ids.push(proc.id);
            }
            let keep = ids.clone();
            let p3 = p2.clone();
            a.models
                .update(&ws2, &name2, |m| {
                    if let Some(v) = m.version_mut(v2.version) {
                        v.processes = keep.clone();
                        v.placement = Some(p3.clone());
                    }
                    Ok::<_, ()>(())
                })
                .map_err(|e| e.to_string())?
                .ok();
            Ok(ids)
        })
        .await?;
    }
    wait_healthy(app, &ids, out).await
}

/// A revert's start: the kept version's predictors started again (on their node, where its
/// files are), then waited for.
async fn resume(app: &Arc<App>, v: &ModelVersion, out: &Sender<String>) -> Result<(), String> {
    if v.processes.is_empty() {
        return Err(format!("version {} has no predictors to start", v.version));
    }
    let (a, ids) = (app.clone(), v.processes.clone());
    blocking(move || {
        for id in &ids {
            a.processes
                .resume(*id)
                .map_err(|e| format!("cannot start predictor {id}: {e:?}"))?;
        }
        Ok(())
    })
    .await?;
    say(
        out,
        format!(
            "v{}: {} predictor(s) started again",
            v.version,
            v.processes.len()
        ),
    )
    .await;
    wait_healthy(app, &v.processes, out).await
}

/// Waits until every process of `ids` is healthy; one that exits (a restart) or ends first
/// fails the step with its reason.
async fn wait_healthy(app: &Arc<App>, ids: &[Uuid], out: &Sender<String>) -> Result<(), String> {
    let timeout = app.config.models.start_timeout;
    for (i, id) in ids.iter().enumerate() {
        say(out, format!("replica r{}: process {id} starting", i + 1)).await;
        let (a, id2) = (app.clone(), *id);
        let before = blocking(move || a.processes.get(id2).map_err(|e| e.to_string()))
            .await?
            .map_or(0, |p| p.restarts);
        let got = app
            .processes
            .wait_for(*id, timeout, |p| {
                p.state == ProcState::Healthy
                    || p.restarts > before
                    || matches!(
                        p.state,
                        ProcState::Failed | ProcState::Stopped | ProcState::Lost
                    )
            })
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("process {id} is gone"))?;
        if got.state != ProcState::Healthy {
            let why = if got.reason.is_empty() {
                got.state.as_str().to_string()
            } else {
                got.reason.clone()
            };
            return Err(format!(
                "replica r{} did not start: {why} (its log: muster procs logs {id})",
                i + 1
            ));
        }
        say(
            out,
            format!(
                "replica r{}: healthy on node {} port {}",
                i + 1,
                got.node.as_deref().unwrap_or("?"),
                got.ports.get("http").copied().unwrap_or(0)
            ),
        )
        .await;
    }
    Ok(())
}

async fn health(
    app: &Arc<App>,
    ws: &str,
    name: &str,
    n: u32,
    out: &Sender<String>,
) -> Result<(), String> {
    let (_, v) = deploying(app, ws, name, n).await?;
    if v.processes.is_empty() {
        return Err("the version has no predictors".into());
    }
    let timeout = app.config.models.predict_timeout + Duration::from_secs(5);
    for (i, id) in v.processes.iter().enumerate() {
        let a = app.clone();
        let id2 = *id;
        let addr = blocking(move || a.processes.address(id2).map_err(|e| e.to_string()))
            .await?
            .ok_or_else(|| format!("replica r{} has no address", i + 1))?;
        let port = addr
            .ports
            .get("http")
            .ok_or_else(|| format!("replica r{} has no http port", i + 1))?;
        let host = if addr.host.contains(':') {
            format!("[{}]:{port}", addr.host)
        } else {
            format!("{}:{port}", addr.host)
        };
        let replica = super::routes::Replica::probe(*id, host.clone());
        let what = if v.has_example {
            "the bundle's example"
        } else {
            "a call"
        };
        let reply = tokio::time::timeout(
            timeout,
            replica.call(hyper::Method::GET, "/healthz", Default::default()),
        )
        .await
        .map_err(|_| {
            format!(
                "replica r{}: /healthz did not answer within {timeout:?}",
                i + 1
            )
        })?
        .map_err(|(_, e)| format!("replica r{}: /healthz: {e}", i + 1))?;
        if reply.status != 200 {
            let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
            let msg = body["error"]["message"]
                .as_str()
                .unwrap_or("no reason given")
                .to_string();
            return Err(format!(
                "replica r{}: {what} failed ({}): {msg}",
                i + 1,
                reply.status
            ));
        }
        say(
            out,
            format!("replica r{} at {host}: {what} answered", i + 1),
        )
        .await;
    }
    Ok(())
}

async fn switch(
    app: &Arc<App>,
    ws: &str,
    name: &str,
    n: u32,
    out: &Sender<String>,
) -> Result<(), String> {
    let (a, ws2, name2) = (app.clone(), ws.to_string(), name.to_string());
    let (m, before) = blocking(move || {
        let mut before = None;
        let r = a
            .models
            .update(&ws2, &name2, |m| {
                if m.deleted {
                    return Err(format!("model {}/{} was deleted", m.workspace, m.name));
                }
                let Some(v) = m.version(n) else {
                    return Err(format!("no version {n}"));
                };
                match v.state {
                    VersionState::Deploying => {}
                    VersionState::Live if m.live == Some(n) => return Ok(()),
                    s => return Err(format!("version {n} is {}, not deploying", s.as_str())),
                }
                before = m.live;
                if let Some(old) = m.live.and_then(|o| m.version_mut(o)) {
                    old.state = VersionState::Draining;
                }
                let v = m.version_mut(n).expect("checked");
                v.state = VersionState::Live;
                v.live_at = Some(now());
                v.error = None;
                m.live = Some(n);
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        Ok(r.map(|m| (m, before)))
    })
    .await??;
    match before {
        Some(old) => say(out, format!("v{n} is live (was v{old})")).await,
        None => say(out, format!("v{n} is live")).await,
    }
    debug_assert_eq!(m.live, Some(n));
    Ok(())
}

async fn drain(
    app: &Arc<App>,
    ws: &str,
    name: &str,
    n: u32,
    out: &Sender<String>,
) -> Result<(), String> {
    let (m, _) = deploying(app, ws, name, n).await?;
    let draining: Vec<u32> = m
        .versions
        .iter()
        .filter(|v| v.state == VersionState::Draining)
        .map(|v| v.version)
        .collect();
    if draining.is_empty() {
        say(out, "nothing to drain").await;
        return Ok(());
    }
    // Other servers of a cluster switch on the model's event: a moment for it to reach them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = tokio::time::Instant::now() + app.config.models.drain_timeout;
    for old in draining {
        loop {
            let left = app.models.routes().inflight(ws, name, old);
            if left == 0 {
                say(out, format!("v{old}: no call in flight")).await;
                break;
            }
            if tokio::time::Instant::now() >= end {
                say(
                    out,
                    format!("v{old}: {left} call(s) still in flight after the drain timeout"),
                )
                .await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

async fn stop(
    app: &Arc<App>,
    ws: &str,
    name: &str,
    n: u32,
    out: &Sender<String>,
) -> Result<(), String> {
    let keep = app.config.models.keep_versions as usize;
    let (a, ws2, name2) = (app.clone(), ws.to_string(), name.to_string());
    let (stopped, retired) = blocking(move || {
        let mut stopped = Vec::new();
        let mut retired = Vec::new();
        let m = a
            .models
            .update(&ws2, &name2, |m| {
                stopped.clear();
                retired.clear();
                for v in m.versions.iter_mut() {
                    if v.state == VersionState::Draining {
                        v.state = VersionState::Stopped;
                        stopped.push((v.version, v.processes.clone()));
                    }
                }
                // The live version and the newest kept ones stay; older ones are retired.
                let mut kept = 0;
                for v in m.versions.iter_mut().rev() {
                    match v.state {
                        VersionState::Live | VersionState::Stopped => {
                            kept += 1;
                            if kept > keep && v.state == VersionState::Stopped {
                                v.state = VersionState::Retired;
                                retired.push((v.version, v.processes.clone()));
                            }
                        }
                        _ => {}
                    }
                }
                Ok::<_, String>(())
            })
            .map_err(|e| e.to_string())??;
        let _ = m;
        for (_, ids) in &stopped {
            for id in ids {
                let _ = a.processes.stop(*id);
            }
        }
        for (_, ids) in &retired {
            for id in ids {
                let _ = a.processes.delete(*id);
            }
        }
        Ok((stopped, retired))
    })
    .await?;
    if stopped.is_empty() {
        say(out, "no older version was running").await;
    }
    for (v, ids) in stopped {
        say(
            out,
            format!("v{v}: {} predictor(s) stopped (kept)", ids.len()),
        )
        .await;
    }
    for (v, _) in retired {
        say(out, format!("v{v}: retired (past keep_versions = {keep})")).await;
    }
    let _ = n;
    Ok(())
}

/// The id of a deploy's step job, for logs and links.
pub fn step_job(jobs: &[muster_core::Job], step: &str) -> Option<Uuid> {
    jobs.iter().find(|j| j.key == step).map(|j| j.id)
}
