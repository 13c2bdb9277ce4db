//! What happens to a model after its deploys: revert to a kept version, delete, the reaper's
//! clean-up, HQ's orders (`<ws>/models/<Model>/orders`: `deploy [VERSION]`, `revert VERSION`,
//! `delete`), and the leader's watch that settles a deploy whose tree ended unheard (a server
//! that died between the tree's end and its hook).

use super::upload::{self, Deployed, Scratch, POINTER_MAGIC};
use super::{Model, ModelError, VersionState, MODELS};
use crate::hq::orders::{OrderAt, Scope, Verb, Verbs};
use crate::hq::reaper::ReapTask;
use crate::hq::Author;
use crate::App;
use muster_core::orders::OrderLine;
use muster_core::spec::JobSpec;
use muster_core::{TreeState, Uuid};
use muster_wire::util::now;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn blocking_err(e: tokio::task::JoinError) -> ModelError {
    ModelError::Internal(e.to_string())
}

/// `revert VERSION`: a tree that starts the kept version's predictors again, checks them and
/// switches the live version back to it (then drains and stops the one that was live).
pub async fn revert(
    app: &Arc<App>,
    ws: &str,
    name: &str,
    n: u32,
    by: &str,
    admin: bool,
) -> Result<Deployed, ModelError> {
    let (a, ws2, name2) = (app.clone(), ws.to_string(), name.to_string());
    tokio::task::spawn_blocking(move || -> Result<(), ModelError> {
        a.models.edit(&ws2, &name2, |m| {
            if m.deleted {
                return Err(ModelError::NotFound(format!("model {ws2}/{name2} not found")));
            }
            if let Some(d) = m.versions.iter().find(|v| {
                v.state == VersionState::Deploying && upload::deploy_running(&a, v)
            }) {
                return Err(ModelError::Conflict(format!(
                    "version {} is being deployed; wait for its tree to end",
                    d.version
                )));
            }
            let live = m.live;
            let v = m
                .version_mut(n)
                .ok_or_else(|| ModelError::NotFound(format!("version {n} not found")))?;
            match v.state {
                VersionState::Stopped if !v.processes.is_empty() => {}
                VersionState::Live if live == Some(n) => {
                    return Err(ModelError::Conflict(format!("version {n} is live already")))
                }
                VersionState::Retired => {
                    return Err(ModelError::Conflict(format!(
                        "version {n} was retired (past [models] keep_versions): deploy its bundle again"
                    )))
                }
                s => {
                    return Err(ModelError::Conflict(format!(
                        "version {n} is {}: only a kept (stopped) version can be reverted to",
                        s.as_str()
                    )))
                }
            }
            v.state = VersionState::Deploying;
            v.reverting = true;
            v.error = None;
            v.tree = None;
            Ok(())
        })
        .map(|_| ())
    })
    .await
    .map_err(blocking_err)??;
    upload::start_tree(app, ws, name, n, by, admin).await
}

/// `DELETE`: the model serves nothing from now on (404), its predictors are stopped and a
/// running deploy aborted; the reaper removes the rest.
pub async fn delete(app: &Arc<App>, ws: &str, name: &str) -> Result<(), ModelError> {
    let (a, ws2, name2) = (app.clone(), ws.to_string(), name.to_string());
    let m = tokio::task::spawn_blocking(move || -> Result<Model, ModelError> {
        a.models.edit(&ws2, &name2, |m| {
            if m.deleted {
                return Err(ModelError::NotFound(format!(
                    "model {ws2}/{name2} not found"
                )));
            }
            m.deleted = true;
            m.live = None;
            for v in m.versions.iter_mut() {
                match v.state {
                    VersionState::Deploying => {
                        v.state = VersionState::Failed;
                        v.error = Some("the model was deleted".into());
                        v.reverting = false;
                    }
                    VersionState::Live | VersionState::Draining | VersionState::Stopped => {
                        v.state = VersionState::Retired;
                    }
                    _ => {}
                }
            }
            Ok(())
        })
    })
    .await
    .map_err(blocking_err)??;
    let trees: Vec<Uuid> = m.versions.iter().filter_map(|v| v.tree).collect();
    for t in trees {
        let _ = app.manager.abort(t).await;
    }
    let a = app.clone();
    tokio::task::spawn_blocking(move || {
        for v in &m.versions {
            for id in &v.processes {
                let _ = a.processes.stop(*id);
            }
        }
    })
    .await
    .map_err(blocking_err)?;
    Ok(())
}

/// The bundle of `ws/name` as committed in HQ, packed into `dest` (pointer files replaced by
/// their blobs).
fn pack_from_hq(app: &App, ws: &str, name: &str, dest: &Path) -> Result<(), ModelError> {
    let repo = app
        .hq
        .repo()
        .ok_or_else(|| ModelError::Unavailable("HQ is not open".into()))?;
    let src = repo.dir().join(upload::hq_dir(ws, name));
    if !src.join("bundle.json").is_file() {
        return Err(ModelError::Invalid(format!(
            "HQ {} has no bundle.json",
            upload::hq_dir(ws, name)
        )));
    }
    let stage = dest.with_extension("stage");
    copy_resolved(app, &src, &stage).map_err(ModelError::Invalid)?;
    let f = std::fs::File::create(dest).map_err(|e| ModelError::Internal(e.to_string()))?;
    let r =
        muster_models::archive::pack(&stage, f).map_err(|e| ModelError::Internal(e.to_string()));
    let _ = std::fs::remove_dir_all(&stage);
    r
}

/// Copies an HQ model directory, pointer files resolved from the blob store, orders left out.
fn copy_resolved(app: &App, from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
    for e in std::fs::read_dir(from).map_err(|e| e.to_string())? {
        let e = e.map_err(|e| e.to_string())?;
        let n = e.file_name();
        if n == "orders" || n == "orders.log" {
            continue;
        }
        let ft = e.file_type().map_err(|e| e.to_string())?;
        let (src, dst) = (e.path(), to.join(&n));
        if ft.is_symlink() {
            return Err(format!(
                "HQ {} is a symlink; it is not followed",
                src.display()
            ));
        } else if ft.is_dir() {
            copy_resolved(app, &src, &dst)?;
        } else {
            let head = std::fs::read(&src).map_err(|e| e.to_string())?;
            match pointer(&head) {
                Some(hash) => {
                    let mut b = app.blobs.open(&hash).map_err(|e| {
                        format!("{}: its blob {hash} is missing: {e}", n.to_string_lossy())
                    })?;
                    let mut out = std::fs::File::create(&dst).map_err(|e| e.to_string())?;
                    std::io::copy(&mut b, &mut out).map_err(|e| e.to_string())?;
                }
                None => std::fs::write(&dst, head).map_err(|e| e.to_string())?,
            }
        }
    }
    Ok(())
}

/// The blob a pointer file names.
fn pointer(text: &[u8]) -> Option<String> {
    if text.len() > 200 {
        return None;
    }
    let t = std::str::from_utf8(text).ok()?;
    let mut lines = t.lines();
    (lines.next()? == POINTER_MAGIC).then_some(())?;
    let hash = lines.next()?.strip_prefix("sha256 ")?.trim().to_string();
    (hash.len() == 64).then_some(hash)
}

/// Who deploys for HQ: the workspace's owner (its creator), with their admin flag.
fn deployer(app: &App, ws: &str) -> Result<(String, bool), String> {
    let w = crate::accounts::workspace(app.store.as_ref(), ws)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("workspace {ws:?} not found"))?;
    let admin = app
        .store
        .user(&w.created_by)
        .map_err(|e| e.to_string())?
        .is_some_and(|u| u.admin);
    Ok((w.created_by, admin))
}

/// `deploy` from HQ: the committed bundle as the next version. `deploy N`: version N's archive
/// again as the next version. Blocking (the tree is made on the runtime of the caller).
pub fn deploy_blocking(
    app: &Arc<App>,
    ws: &str,
    name: &str,
    from: Option<u32>,
    by: &str,
    admin: bool,
) -> Result<Deployed, ModelError> {
    let scratch = Scratch::new(app, "redeploy").map_err(|e| ModelError::Internal(e.to_string()))?;
    std::fs::create_dir_all(&scratch.0).map_err(|e| ModelError::Internal(e.to_string()))?;
    let archive = scratch.0.join("bundle.tar.gz");
    match from {
        None => pack_from_hq(app, ws, name, &archive)?,
        Some(n) => {
            let m = app
                .models
                .get(ws, name)?
                .ok_or_else(|| ModelError::NotFound(format!("model {ws}/{name} not found")))?;
            let v = m
                .version(n)
                .ok_or_else(|| ModelError::NotFound(format!("version {n} not found")))?;
            let mut b = app
                .blobs
                .open(&v.blob)
                .map_err(|e| ModelError::Internal(e.to_string()))?;
            let mut f =
                std::fs::File::create(&archive).map_err(|e| ModelError::Internal(e.to_string()))?;
            std::io::copy(&mut b, &mut f).map_err(|e| ModelError::Internal(e.to_string()))?;
        }
    }
    let version = upload::accept(app, ws, name, &archive, by, admin)?;
    tokio::runtime::Handle::current()
        .block_on(upload::start_tree(app, ws, name, version, by, admin))
}

/// The model an orders file is for (`<ws>/models/<Model>/orders`).
fn model_of(at: &OrderAt<'_>) -> Result<(String, String), String> {
    let p: Vec<&str> = at.file.split('/').collect();
    match p.as_slice() {
        [ws, "models", name, "orders"] => Ok((ws.to_string(), name.to_string())),
        _ => Err("not a model's orders file".into()),
    }
}

/// The order verbs of a model's orders file. Each acts when planned (once per order: the
/// version and its tree are made then) and its own tree is one no-op job naming what it made;
/// the deploy's outcome is the version's state (`GET /api/v1/models/{ws}/{model}`) and, on
/// failure, a `deploy_failed` alert.
struct ModelVerb(&'static str);

impl Verb for ModelVerb {
    fn plan(&self, app: &App, at: &OrderAt<'_>, line: &OrderLine) -> Result<JobSpec, String> {
        let (ws, name) = model_of(at)?;
        if !line.params.is_empty() || !line.args.is_empty() {
            return Err(format!("{} takes no KEY=VALUE and no -- ARGS", self.0));
        }
        let number = |w: &str| {
            w.parse::<u32>()
                .map_err(|_| format!("{} VERSION: the version must be a number", self.0))
        };
        let app = app_arc(app)?;
        let (by, admin) = deployer(&app, &ws)?;
        let done = match (self.0, line.words.as_slice()) {
            ("deploy", []) => deploy_blocking(&app, &ws, &name, None, &by, admin)
                .map(|d| format!("deployed {ws}/{name} v{} (tree {})", d.version, d.tree)),
            ("deploy", [n]) => {
                let n = number(n)?;
                deploy_blocking(&app, &ws, &name, Some(n), &by, admin).map(|d| {
                    format!(
                        "deployed v{n}'s bundle as {ws}/{name} v{} (tree {})",
                        d.version, d.tree
                    )
                })
            }
            ("revert", [n]) => {
                let n = number(n)?;
                tokio::runtime::Handle::current()
                    .block_on(revert(&app, &ws, &name, n, &by, admin))
                    .map(|d| format!("reverting {ws}/{name} to v{n} (tree {})", d.tree))
            }
            ("delete", []) => tokio::runtime::Handle::current()
                .block_on(delete(&app, &ws, &name))
                .map(|_| format!("deleted {ws}/{name}")),
            _ => {
                return Err(match self.0 {
                    "deploy" => "usage: deploy [VERSION]".into(),
                    "revert" => "usage: revert VERSION".into(),
                    _ => "usage: delete".into(),
                })
            }
        };
        let what = done.map_err(|e| e.to_string())?;
        Ok(JobSpec {
            name: format!("order {}:{} {what}", at.file, at.line),
            noop: true,
            ..Default::default()
        })
    }
}

/// `batch PATH [chunk_rows=N] [on_error=fail|mark] [shape=rows|records|columns]
/// [output=input|id]`: the CSV at PATH in HQ (under the model's workspace; a blob pointer
/// resolved) scored as a batch of the model's live version; the order's job names the batch's
/// tree (its result CSV: `GET /api/v1/jobs/{tree}/result`).
struct BatchVerb;

impl Verb for BatchVerb {
    fn plan(&self, app: &App, at: &OrderAt<'_>, line: &OrderLine) -> Result<JobSpec, String> {
        use super::batch::{self, OnError, Output, Shape};
        let (ws, name) = model_of(at)?;
        let [path] = line.words.as_slice() else {
            return Err("usage: batch PATH-IN-HQ [chunk_rows=N] [on_error=fail|mark] [shape=rows|records|columns] [output=input|id]".into());
        };
        if !line.args.is_empty() {
            return Err("batch takes no -- ARGS".into());
        }
        let rel = Path::new(path);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            || !rel.starts_with(&ws)
        {
            return Err(format!(
                "the CSV must be a path in HQ under the workspace's directory {ws}/"
            ));
        }
        let mut chunk_rows = app.config.models.batch_chunk_rows;
        let (mut on_error, mut shape, mut output) = (OnError::Fail, Shape::Rows, Output::Input);
        for (k, v) in &line.params {
            match (k.as_str(), v.as_str()) {
                ("chunk_rows", n) => {
                    chunk_rows = n
                        .parse()
                        .ok()
                        .filter(|n| (1..=1_000_000).contains(n))
                        .ok_or("chunk_rows must be between 1 and 1000000")?
                }
                ("on_error", "fail") => on_error = OnError::Fail,
                ("on_error", "mark") => on_error = OnError::Mark,
                ("shape", "rows") => shape = Shape::Rows,
                ("shape", "records") => shape = Shape::Records,
                ("shape", "columns") => shape = Shape::Columns,
                ("output", "input") => output = Output::Input,
                ("output", "id") => output = Output::Id,
                _ => {
                    return Err(format!(
                        "batch does not take {k}={}",
                        v.chars().take(20).collect::<String>()
                    ))
                }
            }
        }
        let app = app_arc(app)?;
        let (by, admin) = deployer(&app, &ws)?;
        let m = app
            .models
            .get(&ws, &name)
            .map_err(|e| e.to_string())?
            .filter(|m| !m.deleted && m.live.is_some())
            .ok_or_else(|| format!("model {ws}/{name} has no live version"))?;
        let repo = app.hq.repo().ok_or("HQ is not open")?;
        let file = repo.dir().join(rel);
        let mut f = std::fs::File::open(&file).map_err(|_| format!("{path} is not in HQ"))?;
        // A large file is committed as a pointer to the blob store.
        let mut head = [0u8; 15];
        let n = std::io::Read::read(&mut f, &mut head).unwrap_or(0);
        let input: Box<dyn std::io::Read> = if head[..n].starts_with(POINTER_MAGIC.as_bytes()) {
            let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
            let hash = text
                .lines()
                .find_map(|l| l.strip_prefix("sha256 "))
                .ok_or_else(|| format!("{path} is a bad blob pointer"))?;
            Box::new(
                app.blobs
                    .open(hash.trim())
                    .map_err(|_| format!("the blob of {path} is missing"))?,
            )
        } else {
            Box::new(std::io::Read::chain(&head[..n], f))
        };
        let id = Uuid::now_v7();
        let split = batch::split(&app, id, input, chunk_rows).map_err(|e| match e {
            batch::SplitError::Bad(m) | batch::SplitError::Io(m) => format!("{path}: {m}"),
        })?;
        if split.rows == 0 {
            return Err(format!("{path} has a header but no rows"));
        }
        let b = batch::Batch {
            id,
            workspace: ws.clone(),
            model: name.clone(),
            version: None,
            columns: split.columns,
            chunk_rows,
            on_error,
            shape,
            output,
            rows_total: split.rows,
            rows_done: 0,
            chunks: split.chunks,
            result: None,
            result_size: 0,
            created_at: now(),
            created_by: by,
        };
        let rows = b.rows_total;
        let _ = m;
        let tree = tokio::runtime::Handle::current().block_on(batch::start(&app, b, admin))?;
        Ok(JobSpec {
            name: format!(
                "order {}:{} batch of {path} ({rows} rows) through {ws}/{name} (tree {tree})",
                at.file, at.line
            ),
            noop: true,
            ..Default::default()
        })
    }
}

/// The server's own `Arc<App>` (the verbs get `&App`).
fn app_arc(app: &App) -> Result<Arc<App>, String> {
    app.models
        .app()
        .ok_or_else(|| "the server is stopping".to_string())
}

/// Registers the model verbs of orders files.
pub fn register_verbs(verbs: &Verbs) {
    for v in ["deploy", "revert", "delete"] {
        verbs.register(Scope::Model, v, Arc::new(ModelVerb(v)));
    }
    verbs.register(Scope::Model, "batch", Arc::new(BatchVerb));
}

/// The reaper's task: the predictors, node files, HQ files and blobs of deleted models and of
/// retired or failed versions; a deleted model's document last.
pub struct DeletedModels;

impl ReapTask for DeletedModels {
    fn name(&self) -> &'static str {
        "deleted_models"
    }

    fn reap(&self, app: &App) -> Result<String, String> {
        let all: Vec<Model> = MODELS
            .list(app.store.as_ref(), "")
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(_, m, _)| m)
            .collect();
        // What nodes still need: every environment of a version that is not cleaned up.
        let cleanable = |m: &Model, v: &super::ModelVersion| {
            !v.files_removed
                && (m.deleted || matches!(v.state, VersionState::Retired | VersionState::Failed))
                && !(v.state == VersionState::Deploying)
        };
        let mut needed: BTreeSet<(String, String)> = BTreeSet::new();
        let mut blobs_needed: BTreeSet<String> = BTreeSet::new();
        for m in &all {
            for v in &m.versions {
                if cleanable(m, v) || v.files_removed {
                    continue;
                }
                blobs_needed.insert(v.blob.clone());
                if let Some(p) = &v.placement {
                    needed.insert((p.node.clone(), p.env_dir.clone()));
                }
            }
        }
        let mut per_node: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let (mut procs, mut versions, mut models) = (0, 0, 0);
        for m in &all {
            let todo: Vec<u32> = m
                .versions
                .iter()
                .filter(|v| cleanable(m, v))
                .map(|v| v.version)
                .collect();
            for n in &todo {
                let v = m.version(*n).expect("listed");
                for id in &v.processes {
                    if app.processes.delete(*id).is_ok() {
                        procs += 1;
                    }
                }
                if let Some(p) = &v.placement {
                    let paths = per_node.entry(p.node.clone()).or_default();
                    paths.insert(p.bundle_dir.clone());
                    if !needed.contains(&(p.node.clone(), p.env_dir.clone())) {
                        paths.insert(p.env_dir.clone());
                    }
                }
                if !blobs_needed.contains(&v.blob) {
                    let _ = app.blobs.delete(&v.blob);
                }
                versions += 1;
            }
            if !todo.is_empty() {
                let _ = app.models.update(&m.workspace, &m.name, |mm| {
                    for n in &todo {
                        if let Some(v) = mm.version_mut(*n) {
                            v.files_removed = true;
                        }
                    }
                    Ok::<_, ()>(())
                });
            }
            if m.deleted
                && m.versions
                    .iter()
                    .all(|v| v.files_removed || todo.contains(&v.version))
            {
                // Its HQ files go (the orders files stay: their processed lines are history).
                let rel = upload::hq_dir(&m.workspace, &m.name);
                let _ = app.hq.commit(
                    &[&rel],
                    &format!("models: {}/{} deleted", m.workspace, m.name),
                    &Author::server(),
                    |dir| {
                        let d = dir.join(&rel);
                        if let Ok(rd) = std::fs::read_dir(&d) {
                            for e in rd.flatten() {
                                let n = e.file_name();
                                if n == "orders" || n == "orders.log" {
                                    continue;
                                }
                                let p = e.path();
                                let _ = if p.is_dir() {
                                    std::fs::remove_dir_all(&p)
                                } else {
                                    std::fs::remove_file(&p)
                                };
                            }
                        }
                        Ok(())
                    },
                );
                let key = m.key();
                if let Ok(Some((cur, ver))) = MODELS.get(app.store.as_ref(), &key) {
                    if cur.deleted
                        && MODELS
                            .delete_if(app.store.as_ref(), &key, ver)
                            .unwrap_or(false)
                    {
                        models += 1;
                    }
                }
            }
        }
        let mut trees = 0;
        for (node, paths) in per_node {
            if gc_tree(app, &node, &paths).is_ok() {
                trees += 1;
            }
        }
        Ok(format!(
            "{models} deleted model(s) removed; {versions} version(s) cleaned, {procs} predictor(s) removed, {trees} node clean-up tree(s)"
        ))
    }
}

/// A tree of one job on `node` that removes `paths` there (`muster models step gc`, which
/// removes only paths under the node's model directories).
fn gc_tree(app: &App, node: &str, paths: &BTreeSet<String>) -> Result<(), String> {
    let mut shell = String::from("exec \"$MUSTER_EXE\" models step gc - - 0");
    if !app.config.models.envs_dir.is_empty() {
        shell.push_str(&format!(
            " --envs {}",
            sh_quote(&app.config.models.envs_dir)
        ));
    }
    for p in paths {
        shell.push_str(&format!(" --remove {}", sh_quote(p)));
    }
    let spec = JobSpec {
        name: format!("remove model files on {node}"),
        shell: Some(shell),
        node: Some(node.to_string()),
        timeout_s: Some(600),
        tags: Some(muster_core::Tags {
            workspace: crate::hq::orders::ORDERS_WORKSPACE.to_string(),
            application: Some("models-reaper".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut new = muster_core::spec::build_tree(
        &spec,
        crate::hq::orders::ORDERS_WORKSPACE,
        None,
        now(),
        &mut Uuid::now_v7,
    )?;
    new.tree.admin = true;
    tokio::runtime::Handle::current()
        .block_on(app.manager.create(new, None))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// On the leader, every few seconds: a deploying version whose tree ended without its hook
/// being heard (the server died between) is settled as the hook would have; one whose tree was
/// never made (the server died before) is failed after ten minutes.
pub async fn watch(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        if !app.cluster.is_leader() {
            continue;
        }
        let a = app.clone();
        let _ = tokio::task::spawn_blocking(move || settle(&a)).await;
    }
}

fn settle(app: &App) {
    let Ok(all) = MODELS.list(app.store.as_ref(), "") else {
        return;
    };
    for (_, m, _) in all {
        for v in m
            .versions
            .iter()
            .filter(|v| v.state == VersionState::Deploying)
        {
            match v.tree {
                Some(t) => {
                    let Ok(Some(tree)) = app.store.tree(t) else {
                        continue;
                    };
                    if tree.state == TreeState::Running
                        || now().0 - tree.finished_at.map_or(now().0, |f| f.0) < 10_000
                    {
                        continue;
                    }
                    if let Ok(jobs) = app.store.tree_jobs(t) {
                        app.models.deploy_ended(&tree, &jobs, &app.alerts);
                    }
                }
                None if now().0 - v.created_at.0 > 600_000 => {
                    upload::fail(
                        app,
                        &m.workspace,
                        &m.name,
                        v.version,
                        "its deploy tree was never made",
                    );
                }
                None => {}
            }
        }
    }
}
