//! Reset by path, one action by hand, and HQ's `apply` order.
//!
//! A reset removes every trace of a service on its node (its `stop` and `reset` actions, its
//! state dir, its record). It refuses (409, naming them) while recorded consumers or children
//! depend on it, unless `cascade`: then they are reset first, leaf-first. Its dependencies that
//! nothing else uses any more go too (the count of each one's users comes from the records'
//! `deps`, which only compare-and-set writes change), unless `keep_deps`.

use super::{PlanStep, ServiceError, Services, StoredPlan, SERVICES};
use crate::hq::orders::{OrderAt, Verb};
use crate::App;
use muster_core::orders::OrderLine;
use muster_core::service_plan::{self, Action};
use muster_core::spec::JobSpec;
use muster_core::Uuid;
use muster_wire::util::now;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

type Result<T> = std::result::Result<T, ServiceError>;

impl Services {
    /// The stored plan that resets `path` (see the module doc).
    pub fn reset_plan(
        &self,
        app: &App,
        path: &str,
        cascade: bool,
        keep_deps: bool,
        by: &str,
    ) -> Result<StoredPlan> {
        let records = self.records(app)?;
        if !records.contains_key(path) {
            return Err(ServiceError::NotFound("service not found".into()));
        }
        let users = |p: &str, gone: &BTreeSet<String>| -> Vec<String> {
            records
                .values()
                .filter(|r| !gone.contains(&r.path) && r.recorded.deps.iter().any(|d| d == p))
                .map(|r| r.path.clone())
                .collect()
        };
        let mut gone: BTreeSet<String> = BTreeSet::new();
        gone.insert(path.to_string());
        // Its users, transitively.
        let direct = users(path, &BTreeSet::new());
        if !direct.is_empty() && !cascade {
            return Err(ServiceError::Conflict(format!(
                "services depend on {path}: {} (reset them first, or ask for a cascade)",
                direct.join(", ")
            )));
        }
        let mut todo = direct;
        while let Some(u) = todo.pop() {
            if gone.insert(u.clone()) {
                todo.extend(users(&u, &BTreeSet::new()));
            }
        }
        let consumers = gone.clone();
        // Dependencies nothing else uses any more, transitively.
        if !keep_deps {
            loop {
                let more: Vec<String> = gone
                    .iter()
                    .filter_map(|g| records.get(g))
                    .flat_map(|r| r.recorded.deps.iter().cloned())
                    .filter(|d| !gone.contains(d) && records.contains_key(d))
                    .filter(|d| users(d, &gone).is_empty())
                    .collect();
                if more.is_empty() {
                    break;
                }
                gone.extend(more);
            }
        }
        // Leaf-first: each after the services of the set that depend on it.
        let deps: BTreeMap<&str, BTreeSet<String>> = gone
            .iter()
            .map(|g| {
                let us: BTreeSet<String> = records
                    .values()
                    .filter(|r| gone.contains(&r.path) && r.recorded.deps.contains(g))
                    .map(|r| r.path.clone())
                    .collect();
                (g.as_str(), us)
            })
            .collect();
        let order =
            muster_core::service::topo(&deps).unwrap_or_else(|_| gone.iter().cloned().collect());
        let steps = order
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let rec = &records[p];
                PlanStep {
                    key: format!("s{}", i + 1),
                    step: service_plan::Step {
                        path: p.clone(),
                        action: Action::Reset,
                        reason: if p == path {
                            "asked for".into()
                        } else if consumers.contains(p) {
                            format!("it depends on {path} (cascade)")
                        } else {
                            format!("nothing else uses it once {path} is reset")
                        },
                        hash: None,
                        after: deps[p.as_str()].iter().cloned().collect(),
                    },
                    node: rec.node.clone(),
                    resolved: None,
                    node_data: Value::Null,
                    archive: rec.archive.clone(),
                    verbs: None,
                    import: None,
                    build: None,
                }
            })
            .collect();
        self.store_plan(app, "reset", steps, by)
    }

    /// The stored plan that runs `verb` of the recorded service `path` once.
    pub fn action_plan(&self, app: &App, path: &str, verb: &str, by: &str) -> Result<StoredPlan> {
        self.action_plan_with(app, path, verb, None, by)
    }

    /// [`Services::action_plan`], with the archive an `import` unpacks.
    pub fn action_plan_with(
        &self,
        app: &App,
        path: &str,
        verb: &str,
        import: Option<String>,
        by: &str,
    ) -> Result<StoredPlan> {
        muster_core::names::check_name("action", verb)
            .map_err(|e| ServiceError::Invalid(vec![problem(e)]))?;
        let rec = SERVICES
            .get(&*app.store, path)?
            .map(|(r, _)| r)
            .ok_or_else(|| ServiceError::NotFound("service not found".into()))?;
        let step = PlanStep {
            key: "s1".into(),
            step: service_plan::Step {
                path: path.to_string(),
                action: Action::Reconfigure,
                reason: format!("action {verb} asked for"),
                hash: None,
                after: vec![],
            },
            node: rec.node.clone(),
            resolved: None,
            node_data: Value::Null,
            archive: rec.archive.clone(),
            verbs: Some(vec![verb.to_string()]),
            import,
            build: None,
        };
        self.store_plan(app, "action", vec![step], by)
    }

    fn store_plan(
        &self,
        app: &App,
        kind: &str,
        steps: Vec<PlanStep>,
        by: &str,
    ) -> Result<StoredPlan> {
        let plan = StoredPlan {
            id: Uuid::now_v7().to_string(),
            commit: String::new(),
            created_at: now(),
            created_by: by.to_string(),
            steps,
            unchanged: vec![],
            kind: kind.to_string(),
            only: None,
            tree: None,
            applied_at: None,
        };
        super::PLANS.put(&*app.store, &plan.id, &plan)?;
        Ok(plan)
    }
}

fn problem(message: String) -> muster_core::service::Problem {
    muster_core::service::Problem {
        file: "request".into(),
        line: None,
        message,
    }
}

/// `apply [services/PATH]` in `deployer/orders`: plans HQ's services (or that one and what it
/// needs) and applies the plan, as the first cluster admin; the order's own tree is one no-op
/// job naming the plan and the apply tree it made.
pub struct ApplyVerb;

impl Verb for ApplyVerb {
    fn plan(
        &self,
        app: &App,
        at: &OrderAt<'_>,
        line: &OrderLine,
    ) -> std::result::Result<JobSpec, String> {
        if !line.params.is_empty() || !line.args.is_empty() || line.words.len() > 1 {
            return Err("usage: apply [services/PATH]".into());
        }
        let only = match line.words.first() {
            Some(w) => {
                let p = w
                    .strip_prefix("services/")
                    .unwrap_or(w)
                    .trim_end_matches('/');
                muster_core::service::check_path(p)?;
                Some(p.to_string())
            }
            None => None,
        };
        let arc = app
            .services
            .app
            .get()
            .and_then(|w| w.upgrade())
            .ok_or("the server is stopping")?;
        let by = app.services.first_admin(app)?;
        let text = |e: ServiceError| e.to_string();
        let plan = app.services.plan(app, &by, only.as_deref()).map_err(text)?;
        let (plan, tree) = tokio::runtime::Handle::current()
            .block_on(app.services.apply(&arc, &plan.id, &by, true))
            .map_err(text)?;
        let what = match tree {
            Some(t) => format!(
                "applied plan {} ({} steps) in tree {t}",
                plan.id,
                plan.steps.len()
            ),
            None => format!("plan {}: nothing to do", plan.id),
        };
        Ok(JobSpec {
            name: format!("order {}:{} {what}", at.file, at.line),
            noop: true,
            ..Default::default()
        })
    }
}

/// Registers `apply` for `deployer/orders`.
pub fn register_verbs(verbs: &crate::hq::orders::Verbs) {
    verbs.register(
        crate::hq::orders::Scope::Deployer,
        "apply",
        std::sync::Arc::new(ApplyVerb),
    );
}
