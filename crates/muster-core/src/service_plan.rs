//! The plan of services (SPEC §6): HQ's services resolved ([`crate::service::Graph`]) compared
//! with what was recorded of each, giving per service `install`, `reconfigure` (an input
//! changed: which ones, by the hash of each kind), `reset` (gone from HQ) or `unchanged`, with
//! the reason, in dependency order (installs after what they need, resets leaf-first).

use crate::service::Graph;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What was recorded of a service after its last action.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    /// The input hash it was installed (or reconfigured) with.
    pub hash: String,
    #[serde(default)]
    pub parts: BTreeMap<String, String>,
    /// Its last install or reconfigure succeeded.
    pub installed: bool,
    /// What it depended on then (its parent, its producer services).
    #[serde(default)]
    pub deps: Vec<String>,
}

/// What an apply does to a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Install,
    Reconfigure,
    Reset,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Install => "install",
            Action::Reconfigure => "reconfigure",
            Action::Reset => "reset",
        }
    }
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub path: String,
    pub action: Action,
    pub reason: String,
    /// The new input hash (none for a reset).
    pub hash: Option<String>,
    /// The steps of this plan it must wait for (by path).
    pub after: Vec<String>,
}

/// A plan: the steps in order, and what stays as it is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub unchanged: Vec<String>,
}

/// The plan that takes `recorded` to `graph`.
pub fn plan(graph: &Graph, recorded: &BTreeMap<String, Recorded>) -> Plan {
    let mut out = Plan::default();
    let mut changing: BTreeSet<String> = BTreeSet::new();
    for path in &graph.order {
        let r = &graph.services[path];
        let (action, reason) = match recorded.get(path) {
            None => (Action::Install, "new in HQ".to_string()),
            Some(rec) if !rec.installed && rec.hash.is_empty() => {
                (Action::Install, "its last install failed".to_string())
            }
            Some(rec) if !rec.installed => (
                Action::Reconfigure,
                "its last install or reconfigure failed".to_string(),
            ),
            Some(rec) if rec.hash != r.hash => {
                let changed: Vec<&str> = r
                    .parts
                    .iter()
                    .filter(|(k, v)| rec.parts.get(*k) != Some(*v))
                    .map(|(k, _)| k.as_str())
                    .collect();
                let why = if changed.is_empty() {
                    "its inputs changed".to_string()
                } else {
                    format!(
                        "changed: {}",
                        changed
                            .iter()
                            .map(|k| match *k {
                                "files" => "action files",
                                "producers" => "producer data",
                                other => other,
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                (Action::Reconfigure, why)
            }
            Some(_) => {
                out.unchanged.push(path.clone());
                continue;
            }
        };
        let after = r
            .deps
            .iter()
            .filter(|d| changing.contains(*d))
            .cloned()
            .collect();
        changing.insert(path.clone());
        out.steps.push(Step {
            path: path.clone(),
            action,
            reason,
            hash: Some(r.hash.clone()),
            after,
        });
    }
    // Resets: what is recorded and gone, each before what it depended on.
    let gone: BTreeMap<&str, BTreeSet<String>> = recorded
        .iter()
        .filter(|(p, _)| !graph.services.contains_key(*p))
        .map(|(p, r)| (p.as_str(), r.deps.iter().cloned().collect()))
        .collect();
    // Reverse edges: a service's "dependencies" for the reset order are its users.
    let mut users: BTreeMap<&str, BTreeSet<String>> =
        gone.keys().map(|k| (*k, BTreeSet::new())).collect();
    for (p, d) in &gone {
        for x in d {
            if let Some(u) = users.get_mut(x.as_str()) {
                u.insert(p.to_string());
            }
        }
    }
    let order = crate::service::topo(&users)
        .unwrap_or_else(|_| gone.keys().map(|s| s.to_string()).collect());
    for p in order {
        // After its users that are gone, and after those staying that used it (re-pointed now).
        let mut after: Vec<String> = users[p.as_str()].iter().cloned().collect();
        for s in &out.steps {
            if s.action != Action::Reset
                && recorded.get(&s.path).is_some_and(|r| r.deps.contains(&p))
            {
                after.push(s.path.clone());
            }
        }
        out.steps.push(Step {
            path: p,
            action: Action::Reset,
            reason: "gone from HQ".to_string(),
            hash: None,
            after,
        });
    }
    out
}
