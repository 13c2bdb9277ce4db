//! The uploads watcher (SPEC §7): a bundle dropped in HQ `uploads/` — by a git push, or straight
//! into the working copy's directory — is validated and deployed, then moved to `uploads/done/`
//! (or `uploads/rejected/`, beside a `<name>.why` saying why) and the move committed.
//!
//! What is taken: `uploads/<workspace>/<file>.tar.gz` (or `.tgz`) — a bundle archive for that
//! workspace —, `uploads/<workspace>/<file>.yhat`, and `uploads/<file>.yhat` (the `yhat`
//! client's format; its bundle names the user, whose workspace it goes to). A file changed in
//! the last two seconds is left for the next pulse (it may still be being copied). The deploy
//! runs as the workspace's owner.
//!
//! Once only: before deploying, the file's hash is recorded in the store with what it made
//! ([`UPLOADS`]); a server that died before the move finds the record at the next pulse and
//! only moves the file.

use super::upload::{self, Deployed, POINTER_MAGIC};
use super::ModelError;
use crate::hq::{Author, Watcher};
use crate::App;
use muster_store::Docs;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What each upload made, by the SHA-256 of its bytes and its place (`HASH@uploads/...`).
pub const UPLOADS: Docs<UploadRecord> = Docs::new("model_upload");

/// The outcome of one upload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadRecord {
    /// Where it was found (relative to HQ).
    pub path: String,
    /// `deployed: ws/name vN (tree T)`, or why it was rejected.
    pub outcome: String,
    pub ok: bool,
}

/// The most uploads taken in one pulse (the rest wait for the next).
const PER_PULSE: usize = 4;

/// The watcher.
#[derive(Default)]
pub struct UploadsWatcher;

/// A file waiting in `uploads/`, and the workspace its place names.
struct Found {
    rel: String,
    path: PathBuf,
    workspace: Option<String>,
    yhat: bool,
}

fn is_archive(name: &str) -> bool {
    name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// The files waiting, oldest name first.
fn waiting(hq: &Path) -> Vec<Found> {
    let root = hq.join("uploads");
    let mut out = Vec::new();
    let fresh = |p: &Path| {
        std::fs::symlink_metadata(p)
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age.as_secs() < 2)
    };
    let mut look = |dir: &Path, ws: Option<String>| {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_file() || name.starts_with('.') || fresh(&e.path()) {
                continue;
            }
            let yhat = name.ends_with(".yhat");
            if !(yhat || is_archive(&name)) {
                continue;
            }
            let rel = match &ws {
                Some(w) => format!("uploads/{w}/{name}"),
                None => format!("uploads/{name}"),
            };
            out.push(Found {
                rel,
                path: e.path(),
                workspace: ws.clone(),
                yhat,
            });
        }
    };
    look(&root, None);
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "done" || name == "rejected" || name.starts_with('.') {
                continue;
            }
            if e.file_type().is_ok_and(|t| t.is_dir())
                && muster_core::names::check_name("workspace", &name).is_ok()
            {
                look(&e.path(), Some(name));
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    out
}

fn sha256_file(p: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The workspace's owner, who deploys an upload.
fn owner(app: &App, ws: &str) -> Result<(String, bool), String> {
    let w = crate::accounts::workspace(app.store.as_ref(), ws)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("workspace {ws:?} does not exist"))?;
    let admin = app
        .store
        .user(&w.created_by)
        .map_err(|e| e.to_string())?
        .is_some_and(|u| u.admin);
    Ok((w.created_by, admin))
}

/// Deploys one upload; answers what it made, or why not (`Busy`: try again next pulse).
enum Refused {
    Busy(String),
    Why(String),
}

impl From<String> for Refused {
    fn from(s: String) -> Refused {
        Refused::Why(s)
    }
}

impl From<ModelError> for Refused {
    fn from(e: ModelError) -> Refused {
        match e {
            ModelError::Conflict(m) if m.contains("being deployed") => Refused::Busy(m),
            ModelError::Unavailable(m) => Refused::Busy(m),
            e => Refused::Why(e.to_string()),
        }
    }
}

fn deploy(app: &Arc<App>, f: &Found) -> Result<Deployed, Refused> {
    let rt = tokio::runtime::Handle::current();
    if f.yhat {
        let zlib = std::fs::read(&f.path).map_err(|e| e.to_string())?;
        let ws = match &f.workspace {
            Some(w) => w.clone(),
            None => {
                let json = muster_models::yhat::decompress(&zlib, muster_models::yhat::MAX_BUNDLE)
                    .map_err(|e| e.to_string())?;
                muster_models::yhat::YhatBundle::parse(&json)
                    .map_err(|e| e.to_string())?
                    .username
            }
        };
        let (by, admin) = owner(app, &ws)?;
        return Ok(rt.block_on(upload::deploy_yhat(app, &ws, zlib, &by, admin))?);
    }
    let Some(ws) = &f.workspace else {
        return Err(Refused::Why(
            "a bundle archive goes in uploads/<workspace>/ (only .yhat files name their user)"
                .into(),
        ));
    };
    let (by, admin) = owner(app, ws)?;
    // The bundle's name is its model's: read it from the archive first.
    let scratch = upload::Scratch::new(app, "hq-upload").map_err(|e| e.to_string())?;
    let file = std::fs::File::open(&f.path).map_err(|e| e.to_string())?;
    let unpacked = muster_models::archive::unpack(
        std::io::BufReader::new(file),
        &scratch.0,
        &muster_models::archive::Limits::default(),
    )
    .map_err(|e| format!("the bundle archive was refused: {e}"))?;
    let bundle = muster_models::Bundle::load(&unpacked.root).map_err(|e| e.to_string())?;
    drop(scratch);
    let version = upload::accept(app, ws, &bundle.name, &f.path, &by, admin)?;
    Ok(rt.block_on(upload::start_tree(
        app,
        ws,
        &bundle.name,
        version,
        &by,
        admin,
    ))?)
}

impl Watcher for UploadsWatcher {
    fn name(&self) -> &'static str {
        "uploads"
    }

    fn run(&mut self, app: &Arc<App>, _tick: &crate::hq::pulse::Tick) -> Result<String, String> {
        let Some(repo) = app.hq.repo() else {
            return Ok("HQ is not open".into());
        };
        let found = waiting(repo.dir());
        if found.is_empty() {
            return Ok("nothing to take".into());
        }
        let mut said = Vec::new();
        for f in found.into_iter().take(PER_PULSE) {
            // The same bytes dropped at another place are another upload.
            let hash = sha256_file(&f.path).map_err(|e| format!("{}: {e}", f.rel))?;
            let hash = format!("{hash}@{}", f.rel);
            let record = match UPLOADS
                .get(app.store.as_ref(), &hash)
                .map_err(|e| e.to_string())?
            {
                Some((r, _)) => r,
                None => {
                    let r = match deploy(app, &f) {
                        Ok(d) => UploadRecord {
                            path: f.rel.clone(),
                            outcome: format!(
                                "deployed as {}/{} v{} (tree {})",
                                d.workspace, d.model, d.version, d.tree
                            ),
                            ok: true,
                        },
                        Err(Refused::Busy(why)) => {
                            said.push(format!("{}: waits ({why})", f.rel));
                            continue;
                        }
                        Err(Refused::Why(why)) => UploadRecord {
                            path: f.rel.clone(),
                            outcome: why,
                            ok: false,
                        },
                    };
                    UPLOADS
                        .put(app.store.as_ref(), &hash, &r)
                        .map_err(|e| e.to_string())?;
                    r
                }
            };
            move_aside(app, &repo, &f, &record)?;
            said.push(format!("{}: {}", f.rel, record.outcome));
        }
        Ok(said.join("; "))
    }
}

/// Moves the upload to `uploads/done/` or `uploads/rejected/` (with its `.why`) and commits.
fn move_aside(
    app: &App,
    repo: &crate::hq::Repo,
    f: &Found,
    r: &UploadRecord,
) -> Result<(), String> {
    let name = f
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sub = if r.ok { "done" } else { "rejected" };
    let prefix = f
        .workspace
        .as_ref()
        .map(|w| format!("{w}__"))
        .unwrap_or_default();
    let dest_rel = format!("uploads/{sub}/{prefix}{name}");
    let why_rel = format!("{dest_rel}.why");
    let tracked = repo
        .git()
        .status(&["ls-files", "--error-unmatch", "--", &f.rel])
        .map(|(code, _)| code == 0)
        .unwrap_or(false);
    let max = match app.config.hq.max_file_size {
        0 => 1 << 20,
        n => n,
    };
    let mut paths = vec![dest_rel.clone()];
    if tracked {
        paths.push(f.rel.clone());
    }
    if !r.ok {
        paths.push(why_rel.clone());
    }
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let message = if r.ok {
        format!("uploads: {} {}", f.rel, r.outcome)
    } else {
        format!("uploads: {} rejected", f.rel)
    };
    app.hq.commit(&refs, &message, &Author::server(), |dir| {
        let dest = dir.join(&dest_rel);
        std::fs::create_dir_all(dest.parent().expect("nested")).map_err(|e| e.to_string())?;
        let size = std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0);
        if size > max {
            // Large: into the blob store, HQ keeps a pointer.
            let mut w = app.blobs.writer().map_err(|e| e.to_string())?;
            let mut src = std::fs::File::open(&f.path).map_err(|e| e.to_string())?;
            std::io::copy(&mut src, &mut w).map_err(|e| e.to_string())?;
            let hash = w.finish().map_err(|e| e.to_string())?;
            let mut out = std::fs::File::create(&dest).map_err(|e| e.to_string())?;
            writeln!(out, "{POINTER_MAGIC}\nsha256 {hash}\nsize {size}")
                .map_err(|e| e.to_string())?;
            std::fs::remove_file(&f.path).map_err(|e| e.to_string())?;
        } else {
            std::fs::rename(&f.path, &dest).map_err(|e| e.to_string())?;
        }
        if !r.ok {
            std::fs::write(dir.join(&why_rel), format!("{}\n", r.outcome))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })?;
    Ok(())
}
