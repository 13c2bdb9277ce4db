//! Node control scripts (SPEC §5): executables in HQ `scripts/`, so HQ always holds what runs.
//! Writes through the API are commits with the caller as author (pushed by the next sync);
//! scripts a version before HQ kept in `<data-dir>/scripts` are moved in at first start.
//!
//! Running one makes a job tree with `on_failure = continue` and one child per matching node;
//! each child carries the script's text, so the node needs no copy of it.

use super::{Author, Hq};
use muster_core::spec::JobSpec;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The largest script accepted, in bytes.
pub const MAX_SCRIPT: usize = 1 << 20;

/// Why a script cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("{0}")]
    Invalid(String),
    #[error("script {0:?} not found in HQ scripts/")]
    NotFound(String),
    #[error("HQ is not available: {0}")]
    NoHq(String),
    #[error("{0}")]
    Failed(String),
}

/// The scripts directory of HQ (its working copy).
pub fn dir(hq: &Hq) -> Result<PathBuf, ScriptError> {
    hq.repo()
        .map(|r| r.dir().join("scripts"))
        .ok_or_else(|| ScriptError::NoHq(hq.status().error.unwrap_or_default()))
}

/// What is at `path` for running: the bytes of an executable regular file inside `root`
/// (a symlink is followed only when it stays inside `root`).
fn executable(root: &Path, path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if meta.file_type().is_symlink() {
        let target = std::fs::canonicalize(path).map_err(|e| e.to_string())?;
        let root = std::fs::canonicalize(root).map_err(|e| e.to_string())?;
        if !target.starts_with(&root) {
            return Err("it is a symlink pointing outside HQ; it is not followed".into());
        }
    }
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("it is not executable (chmod +x it and commit)".into());
    }
    if meta.len() > MAX_SCRIPT as u64 {
        return Err(format!("it is larger than {} KiB", MAX_SCRIPT >> 10));
    }
    std::fs::read(path).map_err(|e| e.to_string())
}

/// The scripts that can run: executable regular files with valid names.
pub fn list(hq: &Hq) -> Result<Vec<String>, ScriptError> {
    let d = dir(hq)?;
    let root = d.parent().unwrap_or(&d).to_path_buf();
    let mut out: Vec<String> = std::fs::read_dir(&d)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| muster_core::names::check_name("script", n).is_ok())
                .filter(|n| executable(&root, &d.join(n)).is_ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    Ok(out)
}

/// The text of script `name`, checked (exists, executable, inside HQ, text).
pub fn read(hq: &Hq, name: &str) -> Result<String, ScriptError> {
    muster_core::names::check_name("script", name).map_err(ScriptError::Invalid)?;
    let d = dir(hq)?;
    let root = d.parent().unwrap_or(&d).to_path_buf();
    let p = d.join(name);
    if std::fs::symlink_metadata(&p).is_err() {
        return Err(ScriptError::NotFound(name.to_string()));
    }
    let bytes = executable(&root, &p)
        .map_err(|e| ScriptError::Invalid(format!("script {name:?} cannot run: {e}")))?;
    String::from_utf8(bytes).map_err(|_| {
        ScriptError::Invalid(format!(
            "script {name:?} is not text; only text scripts (with a #! line) can be shipped to nodes"
        ))
    })
}

/// Writes script `name` (mode 0755) and commits it by `author`; answers the commit.
pub fn write(hq: &Hq, name: &str, bytes: &[u8], author: &str) -> Result<String, ScriptError> {
    muster_core::names::check_name("script", name).map_err(ScriptError::Invalid)?;
    if bytes.len() > MAX_SCRIPT {
        return Err(ScriptError::Invalid(format!(
            "a script may have at most {} KiB",
            MAX_SCRIPT >> 10
        )));
    }
    if std::str::from_utf8(bytes).is_err() {
        return Err(ScriptError::Invalid(
            "a script must be text (with a #! line): it is shipped to nodes in a shell".into(),
        ));
    }
    let d = dir(hq)?;
    let path = format!("scripts/{name}");
    hq.commit(
        &[&path],
        &format!("scripts: {name} written by {author}"),
        &Author::user(author),
        |_| {
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            let tmp = d.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, bytes).map_err(|e| e.to_string())?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, d.join(name)).map_err(|e| e.to_string())
        },
    )
    .map_err(ScriptError::Failed)
}

/// Removes script `name` and commits that by `author`.
pub fn delete(hq: &Hq, name: &str, author: &str) -> Result<String, ScriptError> {
    muster_core::names::check_name("script", name).map_err(ScriptError::Invalid)?;
    let d = dir(hq)?;
    let p = d.join(name);
    if std::fs::symlink_metadata(&p).is_err() {
        return Err(ScriptError::NotFound(name.to_string()));
    }
    let path = format!("scripts/{name}");
    hq.commit(
        &[&path],
        &format!("scripts: {name} removed by {author}"),
        &Author::user(author),
        |_| std::fs::remove_file(&p).map_err(|e| e.to_string()),
    )
    .map_err(ScriptError::Failed)
}

/// Moves the scripts of `<data-dir>/scripts` (where they were kept before HQ) into HQ
/// `scripts/` and commits them, once; the old directory is removed when empty.
pub fn move_old(hq: &Hq, data_dir: &Path) {
    let old = data_dir.join("scripts");
    let Ok(rd) = std::fs::read_dir(&old) else {
        return;
    };
    let Ok(d) = dir(hq) else { return };
    let names: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    if names.is_empty() {
        let _ = std::fs::remove_dir(&old);
        return;
    }
    let mut moved = Vec::new();
    let res = hq.commit(
        &["scripts"],
        "scripts: moved in from the data dir",
        &Author::server(),
        |_| {
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            for n in &names {
                let (from, to) = (old.join(n), d.join(n));
                if to.exists() {
                    tracing::warn!(
                        "script {n}: HQ has one of that name; {} is left where it is",
                        from.display()
                    );
                    continue;
                }
                if std::fs::rename(&from, &to).is_err() {
                    std::fs::copy(&from, &to).map_err(|e| e.to_string())?;
                    let _ = std::fs::remove_file(&from);
                }
                moved.push(n.clone());
            }
            Ok(())
        },
    );
    match res {
        Ok(_) if !moved.is_empty() => tracing::info!(
            "moved {} node control script(s) from {} into HQ {}: {}",
            moved.len(),
            old.display(),
            d.display(),
            moved.join(", ")
        ),
        Ok(_) => {}
        Err(e) => tracing::error!("cannot move the scripts of {} into HQ: {e}", old.display()),
    }
    let _ = std::fs::remove_dir(&old);
}

/// Single-quotes a word for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A shell text that writes the script to a temporary file and runs it with `args`.
pub fn wrapper(text: &str, args: &[String]) -> String {
    let delim = format!("MUSTER_SCRIPT_{}", crate::auth::random_hex(8));
    let body = if text.ends_with('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    };
    let args: Vec<String> = args.iter().map(|a| sh_quote(a)).collect();
    format!(
        "f=\"$(mktemp)\" || exit 1\ntrap 'rm -f \"$f\"' EXIT\ncat > \"$f\" <<'{delim}'\n{body}{delim}\nchmod +x \"$f\"\n\"$f\" {}\n",
        args.join(" ")
    )
}

/// The tree that runs script `name` (text `text`) with `args` on each of `nodes`.
pub fn tree(name: &str, text: &str, args: &[String], nodes: &[String]) -> JobSpec {
    let shell = wrapper(text, args);
    JobSpec {
        name: format!("script {name}"),
        on_failure: Some(muster_core::OnFailure::Continue),
        children: nodes
            .iter()
            .map(|n| JobSpec {
                name: format!("{name} on {n}"),
                node: Some(n.clone()),
                shell: Some(shell.clone()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The ready nodes whose labels match `selector` (all of them when it is empty).
pub fn targets(
    store: &dyn muster_store::Store,
    selector: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<String>, muster_store::StoreError> {
    Ok(store
        .nodes()?
        .iter()
        .filter(|n| n.state == "ready" && selector.iter().all(|(k, v)| n.labels.get(k) == Some(v)))
        .map(|n| n.name.clone())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrapper_runs_the_script_with_its_arguments() {
        let w = wrapper(
            "#!/bin/sh\necho \"got: $1|$2\"",
            &["a b".into(), "it's".into()],
        );
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&w)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "got: a b|it's\n",
            "{w}"
        );
    }
}
