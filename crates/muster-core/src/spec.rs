//! The job tree a client submits (SPEC §9) and its validation into stored [`Job`]s.
//!
//! Validation is all-or-nothing: a tree with any bad part is refused whole, with a message that
//! names the part.

use crate::job::{Job, JobState, OnFailure, Run, Tags, Tree, TreeState};
use crate::names::{check_job_name, check_name, quote};
use crate::time::Ts;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// The longest `timeout_s`: a year.
pub const MAX_TIMEOUT_S: u64 = 365 * 86_400;

/// The most jobs one tree may hold.
pub const MAX_TREE_JOBS: usize = 100_000;

/// The default most bytes of one job's command (`shell` text, or `exec`'s arguments together).
pub const DEFAULT_COMMAND_BYTES: usize = 256 << 10;

/// The most bytes of one `exec` argument: Linux refuses a longer one (`MAX_ARG_STRLEN`, with
/// its NUL). A `shell` text has no such limit: it reaches the shell as a file.
pub const MAX_ARG_BYTES: usize = (128 << 10) - 1;

/// The most entries of a `node_selector`, and bytes of each key and value.
pub const MAX_SELECTOR_LABELS: usize = 32;
pub const MAX_LABEL_BYTES: usize = 200;

/// Limits a server sets on what it accepts (`jobs.command_max`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most bytes of one job's command.
    pub command_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            command_bytes: DEFAULT_COMMAND_BYTES,
        }
    }
}

/// One job of a submitted tree, with its children nested.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub noop: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<JobSpec>,
    /// Only on the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
    /// Only on the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
}

/// A validated tree, ready to store.
#[derive(Clone, Debug)]
pub struct NewTree {
    pub tree: Tree,
    /// In pre-order: the root first.
    pub jobs: Vec<Job>,
}

/// [`build_tree_with`] under the default [`Limits`].
pub fn build_tree(
    spec: &JobSpec,
    default_workspace: &str,
    created_by: Option<&str>,
    now: Ts,
    new_id: &mut dyn FnMut() -> Uuid,
) -> Result<NewTree, String> {
    build_tree_with(
        spec,
        &Limits::default(),
        default_workspace,
        created_by,
        now,
        new_id,
    )
}

/// Validates `spec` and turns it into a tree. `default_workspace` fills a missing workspace tag;
/// `new_id` makes job ids (UUID v7 in the server), `now` stamps `created_at`. Error messages
/// quote at most [`crate::names::QUOTE_MAX`] characters of any input.
pub fn build_tree_with(
    spec: &JobSpec,
    limits: &Limits,
    default_workspace: &str,
    created_by: Option<&str>,
    now: Ts,
    new_id: &mut dyn FnMut() -> Uuid,
) -> Result<NewTree, String> {
    // Flatten in pre-order, iteratively (a tree may be 100,000 deep).
    let mut flat: Vec<(&JobSpec, Option<usize>)> = Vec::new();
    let mut stack: Vec<(&JobSpec, Option<usize>)> = vec![(spec, None)];
    while let Some((s, parent)) = stack.pop() {
        if flat.len() >= MAX_TREE_JOBS {
            return Err(format!("a tree may hold at most {MAX_TREE_JOBS} jobs"));
        }
        let me = flat.len();
        flat.push((s, parent));
        for c in s.children.iter().rev() {
            stack.push((c, Some(me)));
        }
    }

    let mut tags = spec.tags.clone().unwrap_or_default();
    if tags.workspace.is_empty() {
        tags.workspace = default_workspace.to_string();
    }
    check_name("workspace", &tags.workspace)?;
    for (what, v) in [
        ("application", &tags.application),
        ("version", &tags.version),
        ("instance", &tags.instance),
    ] {
        if let Some(v) = v {
            check_name(what, v)?;
        }
    }
    for (k, v) in &tags.labels {
        check_name("label key", k)?;
        if v.is_empty() || v.len() > 200 {
            return Err(format!("label {k:?} must have a value of 1-200 characters"));
        }
    }

    // Keys: the given ones must be valid and unique; the others are made up.
    let mut key_of: Vec<String> = Vec::with_capacity(flat.len());
    let mut by_key: HashMap<String, usize> = HashMap::with_capacity(flat.len());
    for (i, (s, _)) in flat.iter().enumerate() {
        if let Some(k) = &s.key {
            check_name("job key", k)?;
            if by_key.insert(k.clone(), i).is_some() {
                return Err(format!("job key {k:?} is used twice in the tree"));
            }
        }
    }
    let mut auto = 0usize;
    for (i, (s, _)) in flat.iter().enumerate() {
        let key = match &s.key {
            Some(k) => k.clone(),
            None => loop {
                auto += 1;
                let k = format!("job-{auto}");
                if !by_key.contains_key(&k) {
                    by_key.insert(k.clone(), i);
                    break k;
                }
            },
        };
        key_of.push(key);
    }

    let ids: Vec<Uuid> = (0..flat.len()).map(|_| new_id()).collect();
    let mut jobs = Vec::with_capacity(flat.len());
    for (i, (s, parent)) in flat.iter().enumerate() {
        let here = || format!("job {} ({})", quote(&s.name), key_of[i]);
        check_job_name(&s.name).map_err(|e| format!("{}: {e}", here()))?;
        if i > 0 && (s.tags.is_some() || s.on_failure.is_some()) {
            return Err(format!(
                "{}: tags and on_failure may only be set on the root",
                here()
            ));
        }
        let run = match (&s.exec, &s.shell, s.noop) {
            (Some(argv), None, false) => {
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(format!("{}: exec needs a program", here()));
                }
                if argv.iter().any(|a| a.len() > MAX_ARG_BYTES) {
                    return Err(format!(
                        "{}: an exec argument may hold at most {MAX_ARG_BYTES} bytes (use shell for a long script)",
                        here()
                    ));
                }
                let bytes: usize = argv.iter().map(|a| a.len() + 1).sum();
                if bytes > limits.command_bytes {
                    return Err(format!(
                        "{}: exec is {bytes} bytes; a job's command may hold at most {} (jobs.command_max)",
                        here(),
                        limits.command_bytes
                    ));
                }
                Run::Exec(argv.clone())
            }
            (None, Some(text), false) => {
                if text.len() > limits.command_bytes {
                    return Err(format!(
                        "{}: shell is {} bytes; a job's command may hold at most {} (jobs.command_max)",
                        here(),
                        text.len(),
                        limits.command_bytes
                    ));
                }
                Run::Shell(text.clone())
            }
            (None, None, true) => Run::Noop,
            (None, None, false) => Run::Group,
            _ => {
                return Err(format!(
                    "{}: set at most one of exec, shell and noop",
                    here()
                ))
            }
        };
        if let Some(n) = &s.node {
            check_name("node", n).map_err(|e| format!("{}: {e}", here()))?;
        }
        if let Some(sel) = &s.node_selector {
            if sel.len() > MAX_SELECTOR_LABELS {
                return Err(format!(
                    "{}: node_selector may name at most {MAX_SELECTOR_LABELS} labels",
                    here()
                ));
            }
            for (k, v) in sel {
                let ok = |t: &str| {
                    !t.is_empty() && t.len() <= MAX_LABEL_BYTES && !t.chars().any(char::is_control)
                };
                if !ok(k) || !ok(v) {
                    return Err(format!(
                        "{}: node_selector label {} must have a key and a value of 1-{MAX_LABEL_BYTES} printable characters",
                        here(),
                        quote(k)
                    ));
                }
            }
        }
        if s.node.is_some() && s.node_selector.is_some() {
            return Err(format!("{}: set node or node_selector, not both", here()));
        }
        if !run.needs_agent()
            && (s.node.is_some()
                || s.node_selector.is_some()
                || s.timeout_s.is_some()
                || s.retries.is_some())
        {
            return Err(format!("{}: a grouping job runs nothing, so node, node_selector, timeout_s and retries make no sense on it", here()));
        }
        if s.timeout_s.is_some_and(|t| t == 0 || t > MAX_TIMEOUT_S) {
            return Err(format!(
                "{}: timeout_s must be 1 to {MAX_TIMEOUT_S} (a year)",
                here()
            ));
        }
        let retries = s.retries.unwrap_or(0);
        if retries > 100 {
            return Err(format!("{}: retries must be at most 100", here()));
        }
        let mut needs = Vec::with_capacity(s.needs.len());
        for n in &s.needs {
            match by_key.get(n) {
                Some(&j) if j == i => return Err(format!("{}: a job cannot need itself", here())),
                Some(&j) => {
                    if !needs.contains(&ids[j]) {
                        needs.push(ids[j])
                    }
                }
                None => {
                    return Err(format!(
                        "{}: needs {}, which is no key in this tree",
                        here(),
                        quote(n)
                    ))
                }
            }
        }
        jobs.push(Job {
            id: ids[i],
            tree: ids[0],
            parent: parent.map(|p| ids[p]),
            children: Vec::new(),
            needs,
            name: s.name.clone(),
            key: key_of[i].clone(),
            state: JobState::Waiting,
            node: None,
            want_node: s.node.clone(),
            node_selector: s.node_selector.clone().unwrap_or_default(),
            run,
            timeout_s: s.timeout_s,
            retries,
            created_at: now,
            started_at: None,
            finished_at: None,
            exit_code: None,
            error: None,
            attempt: 1,
            retry_at: None,
            result: None,
            hook: None,
        });
    }
    for (i, (_, parent)) in flat.iter().enumerate() {
        if let Some(p) = parent {
            let id = jobs[i].id;
            jobs[*p].children.push(id);
        }
    }
    if let Some(cycle) = find_cycle(&jobs) {
        return Err(format!(
            "the tree's dependencies form a cycle through job {:?}",
            jobs[cycle].key
        ));
    }
    let tree = Tree {
        id: ids[0],
        name: spec.name.clone(),
        tags,
        on_failure: spec.on_failure.unwrap_or_default(),
        state: TreeState::Running,
        user_aborted: false,
        created_at: now,
        finished_at: None,
        jobs: jobs.len() as u32,
        created_by: created_by.map(str::to_string),
        nodes: Vec::new(),
        admin: false,
        request_digest: None,
    };
    Ok(NewTree { tree, jobs })
}

/// Kahn's algorithm over the dependency edges (children and needs): returns a job on a cycle.
pub fn find_cycle(jobs: &[Job]) -> Option<usize> {
    let index: HashMap<Uuid, usize> = jobs.iter().enumerate().map(|(i, j)| (j.id, i)).collect();
    let mut pending: Vec<usize> = jobs.iter().map(|j| j.deps().count()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); jobs.len()];
    for (i, j) in jobs.iter().enumerate() {
        for d in j.deps() {
            dependents[index[d]].push(i);
        }
    }
    let mut queue: Vec<usize> = (0..jobs.len()).filter(|&i| pending[i] == 0).collect();
    let mut done = 0;
    while let Some(i) = queue.pop() {
        done += 1;
        for &p in &dependents[i] {
            pending[p] -= 1;
            if pending[p] == 0 {
                queue.push(p);
            }
        }
    }
    if done == jobs.len() {
        None
    } else {
        (0..jobs.len()).find(|&i| pending[i] > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(json: &str) -> Result<NewTree, String> {
        let spec: JobSpec = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let mut n = 0u128;
        build_tree(&spec, "me", None, Ts(0), &mut || {
            n += 1;
            Uuid::from_u128(n)
        })
    }

    #[test]
    fn builds_the_spec_example() {
        let t = build(
            r#"{ "name": "release", "tags": {"workspace": "acme", "application": "web", "version": "12", "instance": "main"},
            "on_failure": "abort", "exec": ["sh", "-c", "echo packaging"], "node": "web-1", "timeout_s": 600, "retries": 0,
            "children": [ {"name": "build-a", "key": "a", "shell": "make a"},
                {"name": "build-b", "exec": ["make", "b"], "needs": ["a"]},
                {"name": "probe", "noop": true, "node_selector": {"type": "gpu"}} ] }"#,
        )
        .unwrap();
        assert_eq!(t.jobs.len(), 4);
        assert_eq!(t.tree.tags.workspace, "acme");
        assert_eq!(t.jobs[0].children.len(), 3);
        assert_eq!(t.jobs[2].needs, vec![t.jobs[1].id]);
        assert_eq!(t.jobs[1].key, "a");
        assert!(t.jobs.iter().all(|j| j.tree == t.tree.id));
        assert_eq!(build(r#"{"name":"x"}"#).unwrap().tree.tags.workspace, "me");
    }

    #[test]
    fn refuses_bad_trees() {
        for (bad, why) in [
            (
                r#"{"name":"r","children":[{"name":"a","key":"a","needs":["b"]},{"name":"b","key":"b","needs":["a"]}]}"#,
                "cycle",
            ),
            (
                r#"{"name":"r","key":"r","children":[{"name":"a","needs":["r"]}]}"#,
                "cycle",
            ),
            (
                r#"{"name":"r","children":[{"name":"a","key":"a","needs":["a"]}]}"#,
                "itself",
            ),
            (
                r#"{"name":"r","children":[{"name":"a","needs":["zz"]}]}"#,
                "no key",
            ),
            (
                r#"{"name":"r","children":[{"name":"a","key":"x"},{"name":"b","key":"x"}]}"#,
                "twice",
            ),
            (
                r#"{"name":"r","children":[{"name":"a","key":"bad key"}]}"#,
                "job key",
            ),
            (r#"{"name":"r","exec":["a"],"shell":"b"}"#, "at most one"),
            (r#"{"name":"r","exec":[]}"#, "program"),
            (r#"{"name":"","noop":true}"#, "printable"),
            (
                r#"{"name":"r","children":[{"name":"a","tags":{"workspace":"x"}}]}"#,
                "root",
            ),
            (r#"{"name":"r","tags":{"workspace":"a__b"}}"#, "__"),
            (r#"{"name":"r","bogus":1}"#, "unknown field"),
        ] {
            let e = build(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn commands_are_capped_and_errors_quote_little_of_the_input() {
        let big = "x".repeat(10 << 20);
        let limits = Limits {
            command_bytes: 1000,
        };
        let try_build = |spec: serde_json::Value| {
            let spec: JobSpec = serde_json::from_value(spec).unwrap();
            let mut n = 0u128;
            build_tree_with(&spec, &limits, "me", None, Ts(0), &mut || {
                n += 1;
                Uuid::from_u128(n)
            })
        };
        let at_limit = "y".repeat(1000);
        assert!(try_build(serde_json::json!({"name": "r", "shell": at_limit})).is_ok());
        for (spec, why) in [
            (
                serde_json::json!({"name": "r", "shell": "y".repeat(1001)}),
                "at most 1000",
            ),
            (
                serde_json::json!({"name": "r", "exec": ["echo", "y".repeat(995)]}),
                "at most 1000",
            ),
            (serde_json::json!({"name": big, "noop": true}), "job name"),
            (
                serde_json::json!({"name": "r", "key": big, "noop": true}),
                "job key",
            ),
            (
                serde_json::json!({"name": "r", "children": [{"name": "a", "needs": [big], "noop": true}]}),
                "no key",
            ),
            (
                serde_json::json!({"name": "r", "node": big, "exec": ["true"]}),
                "node",
            ),
            (
                serde_json::json!({"name": "r", "node_selector": {big.clone(): "v"}, "exec": ["true"]}),
                "node_selector",
            ),
            (
                serde_json::json!({"name": "r", "node_selector": {"k": big}, "exec": ["true"]}),
                "node_selector",
            ),
            (
                serde_json::json!({"name": "r", "tags": {"workspace": big}}),
                "workspace",
            ),
            (
                serde_json::json!({"name": "r", "tags": {"workspace": "w", "application": big}}),
                "application",
            ),
        ] {
            let e = try_build(spec).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
            assert!(e.len() < 400, "{why}: an error of {} bytes", e.len());
        }
        // One exec argument may not exceed what Linux takes, whatever the limit.
        let e = build(
            &serde_json::json!({"name": "r", "exec": ["echo", "z".repeat(MAX_ARG_BYTES + 1)]})
                .to_string(),
        )
        .unwrap_err();
        assert!(e.contains("use shell"), "{e}");
    }

    #[test]
    fn refuses_more_than_the_limit() {
        let spec = JobSpec {
            name: "r".into(),
            children: vec![
                JobSpec {
                    name: "c".into(),
                    noop: true,
                    ..Default::default()
                };
                MAX_TREE_JOBS
            ],
            ..Default::default()
        };
        let mut n = 0u128;
        let e = build_tree(&spec, "me", None, Ts(0), &mut || {
            n += 1;
            Uuid::from_u128(n)
        })
        .unwrap_err();
        assert!(e.contains("at most"), "{e}");
    }
}
