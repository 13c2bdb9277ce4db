//! Moving a store's contents to another engine (`muster store migrate --from URL --to URL`): an
//! embedded SQLite install grows into Redis. Run it with the servers stopped.

use crate::{Change, Created, Store, StoreError, TreeFilter};

/// The kinds of documents muster keeps (see the accounts, nodes and tls modules of the server;
/// `cluster` holds the cluster CA, which agents pin).
pub const DOC_KINDS: &[&str] = &["workspace", "member", "join_token", "node_cred", "cluster"];
/// The meta keys muster keeps.
pub const META_KEYS: &[&str] = &["cluster_name", "setup_code_hash"];

/// What a migration copied.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    pub trees: usize,
    pub jobs: usize,
    /// Trees the destination had already (left as they were).
    pub skipped_trees: usize,
    pub logs: usize,
    pub users: usize,
    pub tokens: usize,
    pub nodes: usize,
    pub docs: usize,
}

/// Copies everything from `from` to `to`. Idempotent: trees already in `to` are skipped, the
/// rest is overwritten with `from`'s records. (Idempotency keys are not carried over.)
pub fn migrate(
    from: &dyn Store,
    to: &dyn Store,
    mut progress: impl FnMut(&Migrated),
) -> Result<Migrated, StoreError> {
    let mut m = Migrated::default();
    for u in from.users()? {
        to.put_user(&u)?;
        m.users += 1;
    }
    for t in from.tokens(None)? {
        to.put_token(&t)?;
        m.tokens += 1;
    }
    for n in from.nodes()? {
        to.put_node(&n)?;
        m.nodes += 1;
    }
    for k in META_KEYS {
        if let Some(v) = from.meta(k)? {
            to.set_meta(k, Some(&v))?;
        }
    }
    for kind in DOC_KINDS {
        // Values only: versions are the destination's own (they only order writes, and the
        // servers that read the old ones are stopped).
        for (key, doc) in from.docs(kind, "")? {
            to.put_doc(kind, &key, Some(&doc.value))?;
            m.docs += 1;
        }
    }
    let filter = TreeFilter::default();
    let mut cursor = None;
    loop {
        let page = from.list_trees(&filter, cursor, 500)?;
        for tree in &page {
            if to.tree(tree.id)?.is_some() {
                m.skipped_trees += 1;
                continue;
            }
            let jobs = from.tree_jobs(tree.id)?;
            match to.create_tree(tree, &jobs, None)? {
                Created::New => {}
                Created::Existing(_) => unreachable!("no idempotency key was given"),
            }
            let mut logs = Vec::new();
            for j in &jobs {
                for attempt in 1..=j.attempt {
                    if let Some(blob) = from.log_blob(j.id, attempt)? {
                        logs.push(Change::Log {
                            job: j.id,
                            attempt,
                            blob,
                        });
                    }
                }
            }
            m.logs += logs.len();
            if !logs.is_empty() {
                to.apply(&logs)?;
            }
            m.trees += 1;
            m.jobs += jobs.len();
        }
        progress(&m);
        match page.last() {
            Some(t) if page.len() == 500 => cursor = Some(t.id),
            _ => break,
        }
    }
    Ok(m)
}
