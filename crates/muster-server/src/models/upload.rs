//! A bundle upload made into a new version: the archive (already on disk, streamed there by
//! the API under `[models] upload_max`) unpacked with every check of
//! [`muster_models::archive`], its `bundle.json` validated ([`muster_models::Bundle`]), the
//! archive kept in the blob store, the bundle's files committed to HQ under
//! `<workspace>/models/<Model>/` (a file over `[hq] max_file_size` goes to the blob store and
//! HQ gets a pointer naming its hash), the next version number taken, and its deploy tree
//! created (idempotently: the tree's key is the model and version).

use super::{key, Model, ModelError, ModelVersion, VersionState, DEPLOY_HOOK, MODELS};
use crate::hq::Author;
use crate::App;
use muster_core::names::check_name;
use muster_core::{TreeState, Uuid};
use muster_models::{archive, Bundle};
use muster_wire::util::now;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a deploy request made.
#[derive(Clone, Debug)]
pub struct Deployed {
    pub workspace: String,
    pub model: String,
    pub version: u32,
    pub tree: Uuid,
}

/// The first line of a pointer file in HQ (the rest: `sha256 HEX`, `size N`).
pub const POINTER_MAGIC: &str = "muster-blob v1";

/// The HQ directory of a model.
pub fn hq_dir(ws: &str, name: &str) -> String {
    format!("{ws}/models/{name}")
}

/// Files of a model's HQ directory that are not the bundle's (kept across deploys).
const HQ_OWN: &[&str] = &["orders", "orders.log"];

/// A scratch directory under the data dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(app: &App, tag: &str) -> std::io::Result<Scratch> {
        let base = app.config.data_dir.join("models").join("tmp");
        muster_wire::perms::create_dir_all(&base)?;
        let dir = base.join(format!("{tag}-{}", Uuid::now_v7()));
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deploys the `.tar.gz` at `archive` as the next version of `ws/name`, by `by`.
pub async fn deploy_archive(
    app: &Arc<App>,
    ws: &str,
    name: &str,
    archive: PathBuf,
    by: &str,
    admin: bool,
) -> Result<Deployed, ModelError> {
    let (a, ws2, name2, by2) = (
        app.clone(),
        ws.to_string(),
        name.to_string(),
        by.to_string(),
    );
    let version =
        tokio::task::spawn_blocking(move || accept(&a, &ws2, &name2, &archive, &by2, admin))
            .await
            .map_err(|e| ModelError::Internal(e.to_string()))??;
    start_tree(app, ws, name, version, by, admin).await
}

/// Checks the archive and takes the next version (blocking): answers the version.
pub fn accept(
    app: &App,
    ws: &str,
    name: &str,
    archive: &Path,
    by: &str,
    admin: bool,
) -> Result<u32, ModelError> {
    check_name("workspace", ws).map_err(ModelError::Invalid)?;
    check_name("model", name).map_err(ModelError::Invalid)?;
    if crate::accounts::workspace(app.store.as_ref(), ws)
        .map_err(|e| ModelError::Internal(e.to_string()))?
        .is_none()
    {
        return Err(ModelError::NotFound(format!("workspace {ws:?} not found")));
    }
    let scratch = Scratch::new(app, "upload").map_err(|e| ModelError::Internal(e.to_string()))?;
    let file = std::fs::File::open(archive).map_err(|e| ModelError::Internal(e.to_string()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let unpacked = archive::unpack(
        std::io::BufReader::new(file),
        &scratch.0,
        &archive::Limits::default(),
    )
    .map_err(|e| ModelError::Invalid(format!("the bundle archive was refused: {e}")))?;
    let bundle = Bundle::load(&unpacked.root).map_err(|e| ModelError::Invalid(e.to_string()))?;
    if bundle.name != name {
        return Err(ModelError::Invalid(format!(
            "bundle.json names the model {:?}, but it is uploaded as {name:?}",
            bundle.name
        )));
    }
    // The archive, as uploaded, in the blob store: what the node's prepare step fetches.
    let blob = {
        let mut w = app
            .blobs
            .writer()
            .map_err(|e| ModelError::Internal(e.to_string()))?;
        let mut f =
            std::fs::File::open(archive).map_err(|e| ModelError::Internal(e.to_string()))?;
        std::io::copy(&mut f, &mut w).map_err(|e| ModelError::Internal(e.to_string()))?;
        w.finish()
            .map_err(|e| ModelError::Internal(e.to_string()))?
    };
    let version = take_version(app, ws, name, &bundle, &blob, size, by, admin)?;
    // HQ holds what runs: the bundle's files, committed by the uploader.
    match commit_files(app, ws, name, version, &unpacked.root, by) {
        Ok(commit) => {
            let _ = app.models.update(ws, name, |m| {
                if let Some(v) = m.version_mut(version) {
                    v.commit = Some(commit.clone());
                }
                Ok::<_, ()>(())
            });
        }
        Err(e) => {
            fail(app, ws, name, version, &format!("commit to HQ: {e}"));
            return Err(ModelError::Unavailable(format!(
                "the bundle could not be committed to HQ: {e}"
            )));
        }
    }
    Ok(version)
}

/// Marks `version` failed with `error` (before its tree ran).
pub(super) fn fail(app: &App, ws: &str, name: &str, version: u32, error: &str) {
    let _ = app.models.update(ws, name, |m| {
        if let Some(v) = m.version_mut(version) {
            if v.state == VersionState::Deploying {
                v.state = VersionState::Failed;
                v.error = Some(error.to_string());
            }
        }
        Ok::<_, ()>(())
    });
}

/// Whether a deploying version still holds the model (its tree runs, or it was taken moments
/// ago and its tree is being made).
pub(super) fn deploy_running(app: &App, v: &ModelVersion) -> bool {
    match v.tree {
        Some(t) => match app.store.tree(t) {
            Ok(Some(tree)) => tree.state == TreeState::Running,
            Ok(None) => false,
            Err(_) => true,
        },
        None => now().0 - v.created_at.0 < 120_000,
    }
}

#[allow(clippy::too_many_arguments)]
fn take_version(
    app: &App,
    ws: &str,
    name: &str,
    bundle: &Bundle,
    blob: &str,
    size: u64,
    by: &str,
    admin: bool,
) -> Result<u32, ModelError> {
    let t = now();
    let mut taken = 0;
    let mut refused: Option<ModelError> = None;
    let written = MODELS.update(app.store.as_ref(), &key(ws, name), |cur| {
        refused = None;
        let mut m = cur.unwrap_or_else(|| Model {
            workspace: ws.to_string(),
            name: name.to_string(),
            runtime: bundle.runtime.as_str().to_string(),
            live: None,
            last_version: 0,
            deleted: false,
            created_at: t,
            updated_at: t,
            versions: Vec::new(),
        });
        if m.deleted {
            refused = Some(ModelError::Conflict(format!(
                "model {ws}/{name} was deleted; deploy it again once the reaper has removed it"
            )));
            return Some(m);
        }
        if let Some(v) = m
            .versions
            .iter()
            .find(|v| v.state == VersionState::Deploying && deploy_running(app, v))
        {
            refused = Some(ModelError::Conflict(format!(
                "version {} of {ws}/{name} is being deployed; wait for its tree to end",
                v.version
            )));
            return Some(m);
        }
        m.last_version += 1;
        taken = m.last_version;
        m.updated_at = t;
        m.versions.push(ModelVersion {
            version: taken,
            state: VersionState::Deploying,
            created_at: t,
            created_by: by.to_string(),
            blob: blob.to_string(),
            size,
            runtime: bundle.runtime.as_str().to_string(),
            replicas: bundle.replicas,
            workers: bundle.workers,
            requirements: bundle.requirements.clone(),
            node_selector: bundle.node_selector.clone(),
            limits: bundle.limits.clone(),
            has_example: bundle.example.is_some(),
            tree: None,
            commit: None,
            error: None,
            placement: None,
            processes: Vec::new(),
            live_at: None,
            admin,
            reverting: false,
            files_removed: false,
        });
        Some(m)
    })?;
    if let Some(e) = refused {
        return Err(e);
    }
    if let Some((m, _)) = written {
        app.models.changed(&m);
    }
    Ok(taken)
}

/// Writes the bundle's files into the model's HQ directory (what was there before goes, but
/// the orders files) and commits them; answers the commit.
fn commit_files(
    app: &App,
    ws: &str,
    name: &str,
    version: u32,
    root: &Path,
    by: &str,
) -> Result<String, String> {
    let rel = hq_dir(ws, name);
    let max = match app.config.hq.max_file_size {
        0 => 1 << 20,
        n => n,
    };
    app.hq.commit(
        &[&rel],
        &format!("models: {ws}/{name} version {version} deployed by {by}"),
        &Author::user(by),
        |hq| {
            let dir = hq.join(&rel);
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            for e in std::fs::read_dir(&dir).map_err(|e| e.to_string())? {
                let e = e.map_err(|e| e.to_string())?;
                let n = e.file_name();
                if HQ_OWN.iter().any(|o| n == *o) {
                    continue;
                }
                let p = e.path();
                let r = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                r.map_err(|e| e.to_string())?;
            }
            copy_tree(app, root, &dir, max)
        },
    )
}

/// Copies the bundle at `from` into `to`: regular files (symlinks, all inside the bundle, as
/// the files they name), those over `max` bytes as pointers to the blob store.
fn copy_tree(app: &App, from: &Path, to: &Path, max: u64) -> Result<(), String> {
    for e in std::fs::read_dir(from).map_err(|e| e.to_string())? {
        let e = e.map_err(|e| e.to_string())?;
        let n = e.file_name();
        if HQ_OWN.iter().any(|o| n == *o) {
            continue;
        }
        let src = e.path();
        let dst = to.join(&n);
        let meta = std::fs::metadata(&src).map_err(|e| e.to_string())?;
        if meta.is_dir() {
            std::fs::create_dir_all(&dst).map_err(|e| e.to_string())?;
            copy_tree(app, &src, &dst, max)?;
        } else if meta.len() > max {
            let mut w = app.blobs.writer().map_err(|e| e.to_string())?;
            let mut f = std::fs::File::open(&src).map_err(|e| e.to_string())?;
            std::io::copy(&mut f, &mut w).map_err(|e| e.to_string())?;
            let hash = w.finish().map_err(|e| e.to_string())?;
            let mut out = std::fs::File::create(&dst).map_err(|e| e.to_string())?;
            writeln!(out, "{POINTER_MAGIC}\nsha256 {hash}\nsize {}", meta.len())
                .map_err(|e| e.to_string())?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Creates the deploy tree of `version` (idempotent: a retry gets the same tree) and records
/// it on the version.
pub async fn start_tree(
    app: &Arc<App>,
    ws: &str,
    name: &str,
    version: u32,
    by: &str,
    admin: bool,
) -> Result<Deployed, ModelError> {
    let m = app
        .models
        .get(ws, name)?
        .ok_or_else(|| ModelError::NotFound(format!("model {ws}/{name} not found")))?;
    let v = m
        .version(version)
        .ok_or_else(|| ModelError::NotFound(format!("version {version} not found")))?;
    let spec = super::deploy::tree_spec(&app.config.models, ws, name, v, v.reverting);
    let mut new = muster_core::spec::build_tree(&spec, ws, Some(by), now(), &mut Uuid::now_v7)
        .map_err(ModelError::Internal)?;
    new.tree.admin = admin;
    if let Some(root) = new.jobs.first_mut() {
        root.hook = Some(DEPLOY_HOOK.to_string());
    }
    // One tree per deploy of a version; a revert to it is a new one each time.
    let idem = if v.reverting {
        format!(
            "model-revert:{ws}/{name}:{version}:{}",
            v.created_at.0 ^ now().0
        )
    } else {
        format!("model-deploy:{ws}/{name}:{version}")
    };
    let tree = match app.manager.create(new.clone(), Some(idem)).await {
        Ok(muster_store::Created::New) => new.tree.id,
        Ok(muster_store::Created::Existing(id)) => id,
        Err(e) => {
            let a = app.clone();
            let (ws2, n2) = (ws.to_string(), name.to_string());
            let msg = format!("the deploy tree could not be made: {e}");
            let _ = tokio::task::spawn_blocking(move || fail(&a, &ws2, &n2, version, &msg)).await;
            return Err(ModelError::Store(e));
        }
    };
    let a = app.clone();
    let (ws2, n2) = (ws.to_string(), name.to_string());
    tokio::task::spawn_blocking(move || {
        a.models.update(&ws2, &n2, |m| {
            if let Some(v) = m.version_mut(version) {
                v.tree = Some(tree);
            }
            Ok::<_, ()>(())
        })
    })
    .await
    .map_err(|e| ModelError::Internal(e.to_string()))??
    .ok();
    Ok(Deployed {
        workspace: ws.to_string(),
        model: name.to_string(),
        version,
        tree,
    })
}

/// A `yhat` client's deploy (`POST /deployer/model/large`): the zlib'd JSON bundle of the
/// `model_name` part made into a bundle directory (muster_models::yhat), packed, and deployed
/// like an upload as the next version of `<ws>/<modelname>`. Blocking but for the tree.
pub async fn deploy_yhat(
    app: &Arc<App>,
    ws: &str,
    zlib: Vec<u8>,
    by: &str,
    admin: bool,
) -> Result<Deployed, ModelError> {
    let (a, ws2, by2) = (app.clone(), ws.to_string(), by.to_string());
    let (name, version) =
        tokio::task::spawn_blocking(move || -> Result<(String, u32), ModelError> {
            use muster_models::yhat;
            let json = yhat::decompress(&zlib, yhat::MAX_BUNDLE)
                .map_err(|e| ModelError::Invalid(e.to_string()))?;
            let b =
                yhat::YhatBundle::parse(&json).map_err(|e| ModelError::Invalid(e.to_string()))?;
            let scratch =
                Scratch::new(&a, "yhat").map_err(|e| ModelError::Internal(e.to_string()))?;
            let dir = scratch.0.join("bundle");
            std::fs::create_dir_all(&dir).map_err(|e| ModelError::Internal(e.to_string()))?;
            let bundle = b
                .write(&dir)
                .map_err(|e| ModelError::Invalid(e.to_string()))?;
            let archive = scratch.0.join("bundle.tar.gz");
            let f =
                std::fs::File::create(&archive).map_err(|e| ModelError::Internal(e.to_string()))?;
            archive::pack(&dir, f).map_err(|e| ModelError::Internal(e.to_string()))?;
            let v = accept(&a, &ws2, &bundle.name, &archive, &by2, admin)?;
            Ok((bundle.name, v))
        })
        .await
        .map_err(|e| ModelError::Internal(e.to_string()))??;
    start_tree(app, ws, &name, version, by, admin).await
}

/// The job name of a yhat batch job (`POST /batch/deploy`) named `job_name`.
pub fn yhat_batch_job_name(job_name: &str) -> String {
    format!("yhat batch {job_name}")
}

/// A yhat batch job (`POST /batch/deploy`, PROTOCOL.md §5) made into a muster job of workspace
/// `ws`: the client's archive (a `.tar.gz` of `bundle.json`, maybe `requirements.txt` and
/// `yhat.yaml`) unpacked with the archive checks, its bundle checked and laid out
/// ([`muster_models::yhat::YhatBundle::write_batch`]) and packed again into the job's command
/// (`muster models yhat-batch-run`, which builds the bundle's environment on its node like a
/// deploy's `prepare` and runs `execute()` once, its output in the job's log). Answers the job.
pub async fn yhat_batch(
    app: &Arc<App>,
    ws: &str,
    job_name: &str,
    tar_gz: Vec<u8>,
    by: &str,
) -> Result<Uuid, ModelError> {
    let (a, job_name2) = (app.clone(), job_name.to_string());
    let packed = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ModelError> {
        use muster_models::yhat;
        let scratch =
            Scratch::new(&a, "yhat-batch").map_err(|e| ModelError::Internal(e.to_string()))?;
        muster_wire::perms::create_dir_all(&scratch.0)
            .map_err(|e| ModelError::Internal(e.to_string()))?;
        let limits = archive::Limits {
            total_bytes: yhat::MAX_BUNDLE,
            ..archive::Limits::default()
        };
        let got = archive::unpack(&tar_gz[..], &scratch.0.join("job"), &limits)
            .map_err(|e| ModelError::Invalid(format!("the job archive: {e}")))?;
        let bundle_json = std::fs::read(got.root.join("bundle.json"))
            .map_err(|_| ModelError::Invalid("the job archive holds no bundle.json".into()))?;
        let reqs = std::fs::read_to_string(got.root.join("requirements.txt")).unwrap_or_default();
        let b = yhat::YhatBundle::from_batch(&job_name2, &bundle_json, &reqs)
            .map_err(|e| ModelError::Invalid(e.to_string()))?;
        let dir = scratch.0.join("bundle");
        std::fs::create_dir_all(&dir).map_err(|e| ModelError::Internal(e.to_string()))?;
        b.write_batch(&dir)
            .map_err(|e| ModelError::Invalid(e.to_string()))?;
        let mut packed = Vec::new();
        archive::pack(&dir, &mut packed).map_err(|e| ModelError::Internal(e.to_string()))?;
        Ok(packed)
    })
    .await
    .map_err(|e| ModelError::Internal(e.to_string()))??;
    let b64 = base64_encode(&packed);
    let mut shell = String::from("exec \"$MUSTER_EXE\" models yhat-batch-run");
    let cfg = &app.config.models;
    if !cfg.envs_dir.is_empty() {
        shell.push_str(&format!(" --envs {}", sh_quote(&cfg.envs_dir)));
    }
    if !cfg.wheels_dir.is_empty() {
        shell.push_str(&format!(" --wheels {}", sh_quote(&cfg.wheels_dir)));
    }
    // The packed bundle reaches the step on its standard input (an argument is capped at
    // 128 KiB by Linux).
    shell.push_str(" <<'MUSTER_BUNDLE_END'\n");
    for line in b64.as_bytes().chunks(76) {
        shell.push_str(std::str::from_utf8(line).unwrap_or_default());
        shell.push('\n');
    }
    shell.push_str("MUSTER_BUNDLE_END\n");
    if shell.len() > app.config.jobs.command_max {
        return Err(ModelError::TooLarge(format!(
            "the batch job's bundle is {} bytes packed; a job's command may hold at most {} ([jobs] command_max)",
            packed.len(),
            app.config.jobs.command_max
        )));
    }
    let spec = muster_core::spec::JobSpec {
        name: yhat_batch_job_name(job_name),
        shell: Some(shell),
        timeout_s: Some(24 * 3600),
        tags: Some(muster_core::Tags {
            workspace: ws.to_string(),
            application: Some(job_name.to_string()),
            labels: [("kind".to_string(), "yhat-batch".to_string())].into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let limits = muster_core::spec::Limits {
        command_bytes: app.config.jobs.command_max,
    };
    let new =
        muster_core::spec::build_tree_with(&spec, &limits, ws, Some(by), now(), &mut Uuid::now_v7)
            .map_err(ModelError::Invalid)?;
    let id = new.tree.id;
    app.manager
        .create(new, None)
        .await
        .map_err(ModelError::Store)?;
    Ok(id)
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn base64_encode(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Waits until version `n` of `ws/name` is no longer deploying (at most `within`); its state.
pub async fn wait_deployed(
    app: &Arc<App>,
    ws: &str,
    name: &str,
    n: u32,
    within: std::time::Duration,
) -> Result<ModelVersion, ModelError> {
    let end = tokio::time::Instant::now() + within;
    let mut events = app.store.subscribe();
    loop {
        let (a, ws2, name2) = (app.clone(), ws.to_string(), name.to_string());
        let m = tokio::task::spawn_blocking(move || a.models.get(&ws2, &name2))
            .await
            .map_err(|e| ModelError::Internal(e.to_string()))??;
        let v = m
            .and_then(|m| m.version(n).cloned())
            .ok_or_else(|| ModelError::NotFound(format!("version {n} of {ws}/{name} not found")))?;
        if v.state != VersionState::Deploying || tokio::time::Instant::now() >= end {
            return Ok(v);
        }
        // The model's events say when to look again; a second at most between looks.
        let _ = tokio::time::timeout_at(
            end.min(tokio::time::Instant::now() + std::time::Duration::from_secs(1)),
            async {
                loop {
                    match events.recv().await {
                        Ok(muster_store::Event::Model {
                            workspace,
                            name: n2,
                            ..
                        }) if workspace == ws && n2 == name => return,
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            },
        )
        .await;
    }
}
