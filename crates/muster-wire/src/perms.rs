//! The modes of muster's own files: the data dir holds secrets (the store with the cluster CA's
//! private key and password hashes, keys, node credentials, job logs, attempt directories), so
//! everything muster makes there is private to its user — directories 0700, files 0600 — from
//! the moment it is created, and what an older version (or a hand) left open to other users is
//! closed again at start, with a warning naming it. Server and agent both use these.
//!
//! Modes are set on each path rather than through the process umask, which every job would
//! inherit.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The mode of a directory muster makes.
pub const DIR_MODE: u32 = 0o700;
/// The mode of a file muster makes.
pub const FILE_MODE: u32 = 0o600;

/// `mkdir` with [`DIR_MODE`] (fails if it exists, as `std::fs::create_dir` does).
pub fn create_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(path)
}

/// `mkdir -p` with [`DIR_MODE`] for every directory it makes.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// Options that make a missing file with [`FILE_MODE`].
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Creates (or truncates) a file for writing; a new one gets [`FILE_MODE`].
pub fn create(path: &Path) -> io::Result<File> {
    options().write(true).create(true).truncate(true).open(path)
}

/// `std::fs::write`, a new file getting [`FILE_MODE`].
pub fn write(path: &Path, data: impl AsRef<[u8]>) -> io::Result<()> {
    use io::Write;
    create(path)?.write_all(data.as_ref())
}

/// Takes group and other permissions off `path` (not following a symlink) if it has any; says
/// so with a warning. Returns whether it changed anything; a missing path is not an error.
pub fn repair(path: &Path) -> io::Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if meta.file_type().is_symlink() {
        return Ok(false);
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(false);
    }
    let tight = mode & !0o077;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(tight))?;
    tracing::warn!(
        path = %path.display(),
        "{} was open to other users (mode {mode:o}); made it {tight:o}: it holds secrets",
        path.display()
    );
    Ok(true)
}

/// [`repair`]s each path, logging what it cannot fix rather than failing (a start is not
/// refused for it); returns how many it fixed.
pub fn repair_all<'a>(paths: impl IntoIterator<Item = &'a Path>) -> usize {
    let mut fixed = 0;
    for p in paths {
        match repair(p) {
            Ok(true) => fixed += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(path = %p.display(), "cannot tighten the mode of {}: {e}", p.display())
            }
        }
    }
    fixed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_private_and_repaired() {
        let d = std::env::temp_dir().join(format!("muster-perms-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        create_dir_all(&d.join("a/b")).unwrap();
        write(&d.join("a/f"), "x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d.join("a/b")), 0o700);
        assert_eq!(mode(&d.join("a/f")), 0o600);
        std::fs::set_permissions(d.join("a/f"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(repair(&d.join("a/f")).unwrap());
        assert_eq!(mode(&d.join("a/f")), 0o600);
        assert!(!repair(&d.join("a/f")).unwrap(), "nothing left to fix");
        assert!(!repair(&d.join("missing")).unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
