//! The observers every server runs (see [`super::hooks`]): the job token each tree's jobs get, and
//! the alerts of failed trees and lost nodes.

use super::hooks::Observer;
use muster_core::{Job, JobState, Tree, TreeState, Uuid};
use muster_store::{Node, Store};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Gives each tree's jobs a `MUSTER_TOKEN` acting in the tree's workspace (made again after a
/// restart: only its hash is stored), and deletes it when the tree ends.
pub struct JobTokens {
    store: Arc<dyn Store>,
    /// Each active tree's token id.
    tokens: HashMap<Uuid, String>,
}

impl JobTokens {
    pub fn new(store: Arc<dyn Store>) -> JobTokens {
        JobTokens {
            store,
            tokens: HashMap::new(),
        }
    }
}

impl Observer for JobTokens {
    fn started(&mut self, tree: &Tree) -> BTreeMap<String, String> {
        let user = tree.created_by.clone().unwrap_or_default();
        if user.is_empty() {
            return BTreeMap::new();
        }
        match crate::accounts::issue_job_token(
            &*self.store,
            &user,
            &tree.tags.workspace,
            &tree.id.to_string(),
            7 * 86_400_000,
        ) {
            Ok((id, text)) => {
                if let Some(old) = self.tokens.insert(tree.id, id) {
                    let _ = self.store.delete_token(&old);
                }
                [("MUSTER_TOKEN".to_string(), text)].into()
            }
            Err(e) => {
                tracing::error!(tree = %tree.id, "no job token for tree {}: {e}", tree.id);
                BTreeMap::new()
            }
        }
    }

    fn ended(&mut self, tree: &Tree, _jobs: &[Job]) {
        if let Some(id) = self.tokens.remove(&tree.id) {
            if let Err(e) = self.store.delete_token(&id) {
                tracing::warn!(tree = %tree.id, "cannot delete the job token of tree {}: {e}", tree.id);
            }
        }
    }
}

/// Sends `tree_failed` and `node_lost` to `[alerts] webhook_url`.
pub struct AlertOnFailure(pub Arc<crate::alerts::Alerts>);

impl Observer for AlertOnFailure {
    fn ended(&mut self, tree: &Tree, jobs: &[Job]) {
        if tree.state != TreeState::Failed {
            return;
        }
        let failed: Vec<String> = jobs
            .iter()
            .filter(|j| j.state == JobState::Failed)
            .map(|j| {
                format!(
                    "{}: {}",
                    j.key,
                    j.error
                        .clone()
                        .unwrap_or_else(|| format!("exit code {}", j.exit_code.unwrap_or(-1)))
                )
            })
            .collect();
        self.0.send(
            "tree_failed",
            serde_json::json!({"tree": tree.id, "name": tree.name, "workspace": tree.tags.workspace, "failed": failed}),
        );
    }

    fn node_lost(&mut self, node: &Node) {
        self.0.send(
            "node_lost",
            serde_json::json!({"node": node.name, "id": node.id}),
        );
    }
}
