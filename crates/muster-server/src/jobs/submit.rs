//! What a validated tree is checked against before the manager takes it, so a tree that could
//! never run is refused at submit instead of failing later:
//!
//! - its workspace exists;
//! - every `node` names a registered node (by name or id), and every `node_selector` matches the
//!   labels of at least one registered node.
//!
//! "Registered" means in the store's node registry in any state — `down`, `draining` and `lost`
//! included, since such a node may come back — with the labels it last said it had. A node that
//! has not joined yet is not registered: pin jobs to it once it has (`muster nodes` lists it).
//! A node removed after the submit still fails its jobs at placement (`no node named ...`).
//!
//! And [`digest`]: what tells a retried request from another one under the same idempotency key.

use muster_core::names::quote;
use muster_core::spec::{JobSpec, NewTree};
use muster_store::{Node, Store, StoreError};

/// Why a tree was refused at submit.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("workspace {} does not exist", quote(.0))]
    NoWorkspace(String),
    #[error("job {job}: no node named {} is registered (see muster nodes)", quote(.node))]
    NoNode { job: String, node: String },
    #[error("job {job}: no registered node has the labels of its node_selector")]
    NoMatch { job: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks that `new` could run here (see the module's doc).
pub fn check(store: &dyn Store, new: &NewTree) -> Result<(), Refused> {
    let ws = &new.tree.tags.workspace;
    match crate::accounts::workspace(store, ws) {
        Ok(Some(_)) => {}
        Ok(None) => return Err(Refused::NoWorkspace(ws.clone())),
        Err(crate::accounts::AccountError::Store(e)) => return Err(e.into()),
        Err(_) => return Err(Refused::NoWorkspace(ws.clone())),
    }
    let placed = |j: &&muster_core::Job| j.want_node.is_some() || !j.node_selector.is_empty();
    if !new.jobs.iter().any(|j| placed(&j)) {
        return Ok(());
    }
    let nodes: Vec<Node> = store.nodes()?;
    for j in new.jobs.iter().filter(placed) {
        let job = format!("{} ({})", quote(&j.name), j.key);
        if let Some(want) = &j.want_node {
            if !nodes.iter().any(|n| n.name == *want || n.id == *want) {
                return Err(Refused::NoNode {
                    job,
                    node: want.clone(),
                });
            }
        } else if !nodes.iter().any(|n| {
            j.node_selector
                .iter()
                .all(|(k, v)| n.labels.get(k) == Some(v))
        }) {
            return Err(Refused::NoMatch { job });
        }
    }
    Ok(())
}

/// The digest of a submitted tree: SHA-256 of its JSON form, the same whether it came as JSON
/// or TOML, whatever its spacing or key order.
pub fn digest(spec: &JobSpec) -> String {
    crate::auth::sha256_hex(&serde_json::to_string(spec).expect("a spec serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_core::spec::build_tree;
    use muster_core::{Ts, Uuid};

    fn tree(spec: serde_json::Value) -> NewTree {
        let spec: JobSpec = serde_json::from_value(spec).unwrap();
        build_tree(&spec, "team", None, Ts(0), &mut Uuid::now_v7).unwrap()
    }

    fn node(name: &str, state: &str, labels: &[(&str, &str)]) -> Node {
        Node {
            id: format!("id-{name}"),
            name: name.into(),
            state: state.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            slots: 1,
            last_seen: Ts(0),
            version: String::new(),
        }
    }

    #[test]
    fn a_tree_is_checked_against_the_workspaces_and_the_registered_nodes() {
        let store = muster_store::open("memory://").unwrap();
        let s = &*store;
        let run = |t: serde_json::Value| check(s, &tree(t)).map_err(|e| e.to_string());
        let e = run(serde_json::json!({"name": "r", "noop": true})).unwrap_err();
        assert!(e.contains("workspace \"team\" does not exist"), "{e}");
        crate::accounts::create_workspace(s, "team", "ann").unwrap();
        assert!(run(serde_json::json!({"name": "r", "noop": true})).is_ok());
        // No node has joined yet: a pinned or selecting job could not run.
        let pinned = serde_json::json!({"name": "r", "node": "gpu-1", "exec": ["true"]});
        let selecting = serde_json::json!({"name": "r", "children": [
            {"name": "a", "node_selector": {"type": "gpu", "rack": "2"}, "exec": ["true"]}]});
        assert!(run(pinned.clone())
            .unwrap_err()
            .contains("no node named \"gpu-1\""));
        assert!(run(selecting.clone())
            .unwrap_err()
            .contains("node_selector"));
        // A registered node counts in any state (a lost one may come back), by name or id,
        // and a selector needs all its labels on one node.
        s.put_node(&node("gpu-1", "lost", &[("type", "gpu")]))
            .unwrap();
        s.put_node(&node("cpu-1", "ready", &[("rack", "2")]))
            .unwrap();
        assert!(run(pinned).is_ok());
        assert!(
            run(serde_json::json!({"name": "r", "node": "id-cpu-1", "exec": ["true"]})).is_ok()
        );
        assert!(
            run(selecting.clone()).is_err(),
            "no one node has both labels"
        );
        s.put_node(&node("gpu-2", "down", &[("type", "gpu"), ("rack", "2")]))
            .unwrap();
        assert!(run(selecting).is_ok());
    }

    #[test]
    fn the_digest_is_the_tree_s_whatever_its_form() {
        let a: JobSpec = serde_json::from_str(
            r#"{"noop": true,   "name": "x", "tags": {"labels": {"b": "1", "a": "2"}}}"#,
        )
        .unwrap();
        let b: JobSpec =
            toml::from_str("name = \"x\"\nnoop = true\n[tags.labels]\na = \"2\"\nb = \"1\"\n")
                .unwrap();
        let c: JobSpec = serde_json::from_str(r#"{"name": "y", "noop": true}"#).unwrap();
        assert_eq!(digest(&a), digest(&b));
        assert_ne!(digest(&a), digest(&c));
    }
}
