//! `[build]` and the binary repository (SPEC §6): a build's inputs — its spec, its source's
//! content (an HQ directory's blob ids, or the commit a git rev names), its `actions/build` —
//! hash to its key (`Resolved::parts["build"]`); the artifacts it leaves are one `.tar.gz` in the
//! blob store, recorded under that key (kind [`BUILDS`]), so the same inputs never build twice.
//!
//! At plan time [`sources`] says what each build's source is and [`plan_build`] what the step
//! does (`cached`: the key has artifacts; `needed`: the step builds first). The step's job, on
//! the service's node, fetches the source ([`source_archive`] for an HQ directory; git itself
//! for a repository), runs the build, uploads the artifacts ([`keep`]) and unpacks them into
//! the service's state dir before `install`.

use super::{ServiceError, Snapshot};
use crate::App;
use muster_core::service::{Catalog, Problem};
use muster_core::{Ts, Uuid};
use muster_store::Docs;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The artifacts of each build, by build key.
pub const BUILDS: Docs<Built> = Docs::new("service_build");

/// A build's artifacts as kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Built {
    /// The `.tar.gz` of the artifacts in the blob store.
    pub blob: String,
    pub size: u64,
    pub at: Ts,
    /// The service and node that built it, and the step's job.
    pub by: String,
    pub node: Option<String>,
    pub job: Option<Uuid>,
}

/// Where a build's source comes from, as planned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// A directory of HQ at the plan's commit: each file's path (relative to the directory),
    /// blob id and git mode.
    Hq {
        dir: String,
        files: Vec<(String, String, String)>,
    },
    /// A git repository at a commit.
    Git { url: String, commit: String },
}

/// What a step does about its service's build.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedBuild {
    /// The build's input hash: its artifacts' key.
    pub key: String,
    /// `cached` or `needed`, when planned.
    pub status: String,
    pub source: Source,
    pub command: Option<String>,
    pub artifacts: Vec<String>,
}

/// Each build's source, by service path: the id that goes into its key (set on `cat`), and
/// the source itself for the plan. A source directory that HQ lacks, a link in it, or a rev
/// git cannot resolve is a problem naming the service's file.
pub fn sources(
    snap: &Snapshot,
    cat: &mut Catalog,
) -> Result<BTreeMap<String, Source>, ServiceError> {
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    // One `git ls-remote` per repository and rev in a plan, however many services build it.
    let mut revs: BTreeMap<(String, String), Result<String, String>> = BTreeMap::new();
    for (path, svc) in &cat.services {
        let Some(b) = &svc.meta.build else {
            continue;
        };
        let fail = |m: String| Problem {
            file: svc.file(),
            line: None,
            message: m,
        };
        if let Some(dir) = &b.source {
            let dir = dir.trim_end_matches('/');
            let prefix = if dir == "." {
                String::new()
            } else {
                format!("{dir}/")
            };
            let mut files = Vec::new();
            let mut links = Vec::new();
            for (p, (oid, mode)) in snap.tree.range(prefix.clone()..) {
                let Some(rel) = p.strip_prefix(&prefix) else {
                    break;
                };
                if mode == "120000" {
                    links.push(p.clone());
                } else {
                    files.push((rel.to_string(), oid.clone(), mode.clone()));
                }
            }
            if !links.is_empty() {
                problems.push(fail(format!(
                    "build.source {dir:?} holds a symlink ({}): a build's source holds files only",
                    links[0]
                )));
                continue;
            }
            if files.is_empty() {
                problems.push(fail(format!(
                    "build.source {dir:?} is no directory with files in HQ"
                )));
                continue;
            }
            let listing: String = files
                .iter()
                .map(|(p, oid, mode)| format!("{mode} {oid} {p}\n"))
                .collect();
            cat.build_sources.insert(
                path.clone(),
                muster_core::orders::sha256_hex(listing.as_bytes()),
            );
            out.insert(
                path.clone(),
                Source::Hq {
                    dir: dir.to_string(),
                    files,
                },
            );
        } else if let (Some(url), Some(rev)) = (&b.git, &b.rev) {
            let resolved = revs
                .entry((url.clone(), rev.clone()))
                .or_insert_with(|| resolve_rev(url, rev))
                .clone();
            match resolved {
                Ok(commit) => {
                    cat.build_sources.insert(path.clone(), commit.clone());
                    out.insert(
                        path.clone(),
                        Source::Git {
                            url: url.clone(),
                            commit,
                        },
                    );
                }
                Err(e) => problems.push(fail(e)),
            }
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(ServiceError::Invalid(problems))
    }
}

/// The commit `rev` names in the repository at `url` (a full commit id is taken as it is).
fn resolve_rev(url: &str, rev: &str) -> Result<String, String> {
    if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(rev.to_ascii_lowercase());
    }
    if url.starts_with('-') || rev.starts_with('-') {
        return Err("build: git and rev may not start with '-'".into());
    }
    let out = std::process::Command::new("git")
        .args(["ls-remote", "--", url, rev])
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("build: cannot run git ls-remote: {e}"))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let why = why.lines().next().unwrap_or("").trim();
        return Err(format!(
            "build: cannot read the git repository of [build] ({})",
            why.chars().take(120).collect::<String>()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // A tag's peeled commit (`^{}`) first, then the exact ref, then any.
    let lines: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once('\t')).collect();
    let pick = lines
        .iter()
        .find(|(_, r)| r.ends_with("^{}"))
        .or_else(|| lines.first())
        .map(|(c, _)| c.to_string());
    pick.ok_or_else(|| format!("build: rev {rev:?} names nothing in the git repository"))
}

/// What the step of `path` does about its build (`None`: it has none).
pub fn plan_build(
    app: &App,
    resolved: &muster_core::service::Resolved,
    sources: &BTreeMap<String, Source>,
) -> Result<Option<PlannedBuild>, ServiceError> {
    let (Some(b), Some(source)) = (&resolved.build, sources.get(&resolved.path)) else {
        return Ok(None);
    };
    let key = resolved.parts.get("build").cloned().unwrap_or_default();
    let status = if BUILDS.get(&*app.store, &key)?.is_some() {
        "cached"
    } else {
        "needed"
    };
    Ok(Some(PlannedBuild {
        key,
        status: status.to_string(),
        source: source.clone(),
        command: b
            .get("command")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        artifacts: b
            .get("artifacts")
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    }))
}

/// The `.tar.gz` of an HQ source directory (its files as planned, read from git's objects),
/// kept in the blob store (content-addressed: the same source is one blob).
pub fn source_archive(
    app: &App,
    files: &[(String, String, String)],
) -> Result<String, ServiceError> {
    let repo = app.hq.repo().ok_or_else(|| {
        ServiceError::Unavailable("HQ is not available (GET /api/v1/hq says why)".into())
    })?;
    let ids: Vec<&str> = files.iter().map(|(_, oid, _)| oid.as_str()).collect();
    let max = match app.config.hq.max_file_size {
        0 => 1 << 20,
        n => n,
    };
    let datas = repo.blobs(&ids, max).map_err(ServiceError::Internal)?;
    let tmp = app
        .config
        .data_dir
        .join("tmp")
        .join(format!("build-source-{}", Uuid::now_v7()));
    let write = || -> Result<Vec<u8>, String> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
        for ((rel, _, mode), data) in files.iter().zip(datas) {
            let data = data?;
            let dst = tmp.join(rel);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::fs::write(&dst, data).map_err(|e| e.to_string())?;
            let m = if mode == "100755" { 0o755 } else { 0o644 };
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(m))
                .map_err(|e| e.to_string())?;
        }
        let mut out = Vec::new();
        muster_models::archive::pack(&tmp, &mut out).map_err(|e| e.to_string())?;
        Ok(out)
    };
    let packed = write();
    let _ = std::fs::remove_dir_all(&tmp);
    let packed =
        packed.map_err(|e| ServiceError::Internal(format!("packing a build source: {e}")))?;
    app.blobs
        .put(&packed)
        .map_err(|e| ServiceError::Internal(format!("keeping a build source: {e}")))
}

/// Keeps the artifacts `blob` (already in the blob store) as build `key`'s; a key built
/// meanwhile by another step keeps its first artifacts. Returns what is kept.
pub fn keep(app: &App, key: &str, built: Built) -> Result<Built, ServiceError> {
    if BUILDS.create(&*app.store, key, &built)?.is_some() {
        return Ok(built);
    }
    Ok(BUILDS
        .get(&*app.store, key)?
        .map(|(b, _)| b)
        .unwrap_or(built))
}

/// The artifacts kept for build `key`.
pub fn cached(app: &App, key: &str) -> Result<Option<Built>, ServiceError> {
    Ok(BUILDS.get(&*app.store, key)?.map(|(b, _)| b))
}
