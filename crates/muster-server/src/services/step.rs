//! What a step's job (`muster services step PLAN KEY`, on the service's node) asks the server:
//! the verbs to run, the JSON context each action gets on stdin, and the service's archive.
//!
//! The context: `service` (its path), `action` (set by the node per verb), `params`, `consumes`
//! (each role's producer data as planned, with what the producer published — in this apply if
//! its step ran, else as recorded — laid over it), `node` (the node's published data),
//! `state` (what its actions returned last), `published` (its own, as recorded), `plan`,
//! `dry_run`.

use super::{ServiceError, StoredPlan, SERVICES};
use crate::App;
use muster_core::service_plan::Action;
use muster_core::JobState;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// The verbs a step runs, in order (a missing action is the built-in default on the node).
pub fn verbs(action: Action) -> &'static [&'static str] {
    match action {
        Action::Install => &["install", "start"],
        Action::Reconfigure => &["install", "restart"],
        Action::Reset => &["stop", "reset"],
    }
}

/// `b`'s keys laid over `a` (objects); otherwise `a`.
fn overlay(a: &Value, b: Option<&Value>) -> Value {
    match (a, b) {
        (Value::Object(a), Some(Value::Object(b))) => {
            let mut out = a.clone();
            for (k, v) in b {
                out.insert(k.clone(), v.clone());
            }
            Value::Object(out)
        }
        _ => a.clone(),
    }
}

/// The step `key` of `plan`: path, action, verbs, node, archive and context (blocking).
pub fn info(app: &App, plan: &StoredPlan, key: &str) -> Result<Value, ServiceError> {
    let s = plan
        .steps
        .iter()
        .find(|s| s.key == key)
        .ok_or_else(|| ServiceError::NotFound("step not found".into()))?;
    let path = &s.step.path;
    let record = SERVICES.get(&*app.store, path)?.map(|(r, _)| r);
    // What producers published in this apply: their steps' results.
    let mut fresh: BTreeMap<String, Value> = BTreeMap::new();
    if let Some(tree) = plan.tree {
        for j in app.store.tree_jobs(tree)? {
            if j.state != JobState::Succeeded {
                continue;
            }
            if let Some(p) = plan.steps.iter().find(|p| p.key == j.key) {
                if let Some(pubd) = j.result.as_ref().and_then(|r| r.get("published")) {
                    fresh.insert(p.step.path.clone(), pubd.clone());
                }
            }
        }
    }
    let mut consumes = Map::new();
    // A reset's service is gone from HQ: its params as last installed.
    let mut params = record
        .as_ref()
        .map(|r| r.params.clone())
        .filter(|p| p.is_object())
        .unwrap_or_else(|| Value::Object(Map::new()));
    let mut actions: Vec<String> = Vec::new();
    let mut has_process = false;
    if let Some(r) = &s.resolved {
        params = r.params.clone();
        actions = r.actions.iter().cloned().collect();
        has_process = r.process.is_some();
        for (role, bind) in &r.consumes {
            let planned = r.consumed.get(role).cloned().unwrap_or(Value::Null);
            let published = |p: &str| -> Option<Value> {
                if p.starts_with("node:") {
                    return None;
                }
                fresh.get(p).cloned().or_else(|| {
                    SERVICES
                        .get(&*app.store, p)
                        .ok()
                        .flatten()
                        .map(|(r, _)| r.published)
                })
            };
            let v = if bind.many {
                let list = planned.as_array().cloned().unwrap_or_default();
                Value::Array(
                    list.iter()
                        .zip(&bind.producers)
                        .map(|(d, p)| overlay(d, published(p).as_ref()))
                        .collect(),
                )
            } else {
                match bind.producers.first() {
                    Some(p) => overlay(&planned, published(p).as_ref()),
                    None => planned,
                }
            };
            consumes.insert(role.clone(), v);
        }
    }
    // The secrets its params refer to (resolved on the node: the values come from
    // `GET …/steps/{key}/secrets`, for this step's own job only).
    let mut secret_keys = std::collections::BTreeSet::new();
    secret_refs(&params, &mut secret_keys);
    if let Some(r) = &s.resolved {
        secret_keys.extend(r.secrets.iter().cloned());
    }
    let context = json!({
        "service": path,
        "params": params,
        "consumes": consumes,
        "node": s.node_data,
        "state": record.as_ref().map(|r| r.state.clone()).unwrap_or(Value::Null),
        "published": record.as_ref().map(|r| r.published.clone()).unwrap_or(Value::Null),
        "plan": plan.id,
        "reason": s.step.reason,
        "dry_run": false,
    });
    Ok(json!({
        "plan": plan.id,
        "key": s.key,
        "path": path,
        "action": s.step.action.as_str(),
        "verbs": s.verbs.clone().unwrap_or_else(|| verbs(s.step.action).iter().map(|v| v.to_string()).collect()),
        "node": s.node,
        "archive": s.archive,
        "import": s.import.is_some(),
        "actions": actions,
        "process": has_process || record.as_ref().is_some_and(|r| r.process.is_some()),
        "secrets": secret_keys,
        "context": context,
        "build": build_json(app, s)?,
    }))
}

/// A step's build, for its job: the key, where the source is, the command, the artifact
/// globs, and the artifacts' blob when the key is built (now, not as planned).
fn build_json(app: &App, s: &super::PlanStep) -> Result<Value, ServiceError> {
    let Some(b) = &s.build else {
        return Ok(Value::Null);
    };
    let cached = super::build::cached(app, &b.key)?;
    let source = match &b.source {
        super::build::Source::Hq { dir, .. } => json!({"kind": "hq", "dir": dir}),
        super::build::Source::Git { url, commit } => {
            json!({"kind": "git", "url": url, "commit": commit})
        }
    };
    Ok(json!({
        "key": b.key,
        "source": source,
        "command": b.command,
        "artifacts": b.artifacts,
        "cached": cached.map(|c| c.blob),
    }))
}

pub use muster_core::service::secret_refs;
