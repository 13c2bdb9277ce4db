//! Unpacking an uploaded bundle (`.tar.gz`) safely, as a stream.
//!
//! [`unpack`] reads the gzip'd tar once, entry by entry, into a fresh temporary directory beside
//! the destination and renames it into place only when every entry passed; on any refusal the
//! temporary directory is removed, so nothing is left behind. Refused: paths that are absolute or
//! climb with `..`, entries that would be written through a link, symlinks and hard links that
//! point out of the bundle (checked by name, then once more by resolving every symlink at the
//! end), devices, fifos and sparse files, a second entry of one path, and archive bombs: more
//! than [`Limits::entries`] entries, a file over [`Limits::file_bytes`], more than
//! [`Limits::total_bytes`] in all, or more than [`Limits::ratio`] unpacked bytes per compressed
//! byte once past [`Limits::ratio_floor`]. Ownership, times and special mode bits are not kept:
//! files are 0644, or 0755 when the archive marks them executable.

use crate::{Error, Result};
use muster_core::names::quote;
use std::cell::Cell;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What an archive may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most unpacked bytes of all files together.
    pub total_bytes: u64,
    /// The most bytes of one file.
    pub file_bytes: u64,
    /// The most entries (files, directories, links).
    pub entries: u64,
    /// The most unpacked bytes per compressed byte, checked once `ratio_floor` bytes are out.
    pub ratio: u64,
    /// Below this many unpacked bytes the ratio is not checked (small files of zeros are fine).
    pub ratio_floor: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            total_bytes: 2 << 30,
            file_bytes: 1 << 30,
            entries: 10_000,
            ratio: 200,
            ratio_floor: 16 << 20,
        }
    }
}

/// What [`unpack`] made.
#[derive(Clone, Debug)]
pub struct Unpacked {
    /// The destination directory.
    pub dir: PathBuf,
    /// Where `bundle.json` is: the destination itself, or its one top-level directory when the
    /// archive holds a single directory (as `tar czf x.tgz Iris/` makes).
    pub root: PathBuf,
    /// Entries unpacked and bytes written.
    pub entries: u64,
    pub bytes: u64,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Unpacks the gzip'd tar read from `input` into `dest`, which must not exist (its parent must).
pub fn unpack(input: impl Read, dest: &Path, limits: &Limits) -> Result<Unpacked> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .ok_or_else(|| Error::Archive("the destination has no name".into()))?;
    if fs::symlink_metadata(dest).is_ok() {
        return Err(Error::Archive(format!(
            "the destination {} exists already",
            dest.display()
        )));
    }
    let tmp = parent.join(format!(
        ".{}.partial-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&tmp).map_err(Error::io(format!("creating {}", tmp.display())))?;
    let guard = RemoveOnDrop(Some(tmp.clone()));
    let (entries, bytes) = unpack_into(input, &tmp, limits)?;
    fs::rename(&tmp, dest).map_err(Error::io(format!("renaming into {}", dest.display())))?;
    std::mem::forget(guard);
    let root = bundle_root(dest);
    Ok(Unpacked {
        dir: dest.to_path_buf(),
        root,
        entries,
        bytes,
    })
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

/// Counts the compressed bytes read.
struct Counting<R> {
    inner: R,
    n: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.set(self.n.get() + k as u64);
        Ok(k)
    }
}

fn refuse(path: &str, why: impl std::fmt::Display) -> Error {
    Error::Archive(format!("archive entry {}: {why}", quote(path)))
}

/// An entry's path as normal components (`.` dropped), or why it is refused.
fn normal(path: &Path, shown: &str) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse(shown, "climbs out of the bundle with ..")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(shown, "is an absolute path"))
            }
        }
    }
    Ok(out)
}

/// Whether `target`, read from the directory `from` (both relative to the root), stays inside.
fn stays_inside(from: &Path, target: &Path) -> bool {
    let mut depth: Vec<&std::ffi::OsStr> = from.iter().collect();
    for c in target.components() {
        match c {
            Component::Normal(p) => depth.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Makes the parent directories of `rel` under `root`, refusing any that is a link or a file.
fn make_parents(root: &Path, rel: &Path, shown: &str) -> Result<()> {
    let mut at = root.to_path_buf();
    let n = rel.components().count();
    for c in rel.components().take(n.saturating_sub(1)) {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(refuse(shown, "would be written through a link"))
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(refuse(shown, "is below a file")),
            Err(_) => {
                fs::create_dir(&at).map_err(Error::io(format!("creating {}", at.display())))?
            }
        }
    }
    Ok(())
}

fn unpack_into(input: impl Read, root: &Path, limits: &Limits) -> Result<(u64, u64)> {
    let compressed = Rc::new(Cell::new(0u64));
    let reader = Counting {
        inner: input,
        n: compressed.clone(),
    };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let broken = |e: io::Error| Error::Archive(format!("the archive cannot be read: {e}"));
    let mut entries = 0u64;
    let mut total = 0u64;
    let mut symlinks = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    for entry in archive.entries().map_err(broken)? {
        let mut entry = entry.map_err(broken)?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        entries += 1;
        if entries > limits.entries {
            return Err(Error::Archive(format!(
                "the archive holds more than {} entries",
                limits.entries
            )));
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let rel = normal(&entry.path().map_err(broken)?, &shown)?;
        if rel.as_os_str().is_empty() {
            if kind.is_dir() {
                continue;
            }
            return Err(refuse(&shown, "has no name"));
        }
        if rel.as_os_str().len() > 1024 {
            return Err(refuse(&shown, "has a path over 1024 bytes"));
        }
        make_parents(root, &rel, &shown)?;
        let path = root.join(&rel);
        let existing = fs::symlink_metadata(&path).ok();
        if kind.is_dir() {
            match existing {
                Some(m) if m.is_dir() => {}
                Some(_) => return Err(refuse(&shown, "appears twice")),
                None => fs::create_dir(&path)
                    .map_err(Error::io(format!("creating {}", path.display())))?,
            }
            continue;
        }
        if existing.is_some() {
            return Err(refuse(&shown, "appears twice"));
        }
        if kind.is_file() || kind == tar::EntryType::Continuous {
            let size = entry.header().size().map_err(broken)?;
            if size > limits.file_bytes {
                return Err(refuse(
                    &shown,
                    format!(
                        "is {size} bytes, over the {} allowed for a file",
                        limits.file_bytes
                    ),
                ));
            }
            let executable = entry
                .header()
                .mode()
                .map(|m| m & 0o111 != 0)
                .unwrap_or(false);
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if executable { 0o755 } else { 0o644 })
                .open(&path)
                .map_err(Error::io(format!("creating {}", path.display())))?;
            let mut written = 0u64;
            loop {
                let k = entry.read(&mut buf).map_err(broken)?;
                if k == 0 {
                    break;
                }
                written += k as u64;
                total += k as u64;
                if written > limits.file_bytes {
                    return Err(refuse(
                        &shown,
                        format!("is over the {} bytes allowed for a file", limits.file_bytes),
                    ));
                }
                if total > limits.total_bytes {
                    return Err(Error::Archive(format!(
                        "the archive unpacks to more than the {} bytes allowed",
                        limits.total_bytes
                    )));
                }
                if total > limits.ratio_floor && total / compressed.get().max(1) > limits.ratio {
                    return Err(Error::Archive(format!(
                        "the archive unpacks to more than {} times its compressed size (an archive bomb?)",
                        limits.ratio
                    )));
                }
                out.write_all(&buf[..k])
                    .map_err(Error::io(format!("writing {}", path.display())))?;
            }
        } else if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(broken)?
                .ok_or_else(|| refuse(&shown, "is a link without a target"))?
                .into_owned();
            if target.as_os_str().is_empty() {
                return Err(refuse(&shown, "is a link without a target"));
            }
            if kind.is_symlink() {
                let from = rel.parent().unwrap_or(Path::new(""));
                if target.is_absolute() || !stays_inside(from, &target) {
                    return Err(refuse(&shown, "is a symlink pointing out of the bundle"));
                }
                std::os::unix::fs::symlink(&target, &path)
                    .map_err(Error::io(format!("creating {}", path.display())))?;
                symlinks.push((path, shown));
            } else {
                let t = normal(&target, &shown)
                    .map_err(|_| refuse(&shown, "is a hard link pointing out of the bundle"))?;
                let tp = root.join(&t);
                // Not through a symlink either: the links are resolved for real only at the end.
                let through_link = t.ancestors().skip(1).any(|a| {
                    !a.as_os_str().is_empty()
                        && fs::symlink_metadata(root.join(a))
                            .is_ok_and(|m| m.file_type().is_symlink())
                });
                if through_link {
                    return Err(refuse(&shown, "is a hard link through a symlink"));
                }
                match fs::symlink_metadata(&tp) {
                    Ok(m) if m.is_file() => {}
                    _ => {
                        return Err(refuse(
                            &shown,
                            "is a hard link to something that is not a file unpacked before it",
                        ))
                    }
                }
                make_parents(root, &t, &shown)?;
                fs::hard_link(&tp, &path)
                    .map_err(Error::io(format!("linking {}", path.display())))?;
            }
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            return Err(refuse(&shown, "is a device or a fifo"));
        } else {
            return Err(refuse(
                &shown,
                format!("is of a kind not allowed ({kind:?})"),
            ));
        }
    }
    // Each symlink resolved for real: a chain of links can lead out where each one alone does not.
    let real_root = root
        .canonicalize()
        .map_err(Error::io("resolving the bundle"))?;
    for (link, shown) in symlinks {
        match link.canonicalize() {
            Ok(p) if p.starts_with(&real_root) => {}
            Ok(_) => return Err(refuse(&shown, "is a symlink leading out of the bundle")),
            Err(_) => return Err(refuse(&shown, "is a symlink to nothing in the bundle")),
        }
    }
    Ok((entries, total))
}

/// The directory holding `bundle.json`: `dir`, or its single subdirectory that holds it.
fn bundle_root(dir: &Path) -> PathBuf {
    if dir.join("bundle.json").exists() {
        return dir.to_path_buf();
    }
    let children: Vec<_> = fs::read_dir(dir)
        .map(|rd| rd.flatten().collect())
        .unwrap_or_default();
    if let [only] = children.as_slice() {
        let p = only.path();
        if only.file_type().map(|t| t.is_dir()).unwrap_or(false) && p.join("bundle.json").exists() {
            return p;
        }
    }
    dir.to_path_buf()
}

/// Packs the bundle directory `dir` as a `.tar.gz` into `out` (what `muster models deploy DIR`
/// uploads): its files with their modes, symlinks kept as links, paths relative to `dir`.
pub fn pack(dir: &Path, out: impl Write) -> Result<()> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.append_dir_all(".", dir)
        .map_err(Error::io(format!("packing {}", dir.display())))?;
    let gz = tar
        .into_inner()
        .map_err(Error::io("finishing the archive"))?;
    gz.finish().map_err(Error::io("finishing the archive"))?;
    Ok(())
}

#[cfg(test)]
mod tests;
