//! The content-addressed blob store under `<data_dir>/blobs`: a file is named by the SHA-256 of
//! its bytes. Blobs are written as streams ([`BlobWriter`]: a temp file with a unique name,
//! hashed while written, fsynced, then renamed to its name), so a reader never sees half a blob
//! and nothing needs the whole blob in memory; they are read as files ([`Blobs::open`]), from
//! any offset.
//!
//! Logs, bundles, service archives and batch inputs and outputs all travel this way. Blobs hold
//! job logs: directories 0700, files 0600. A write that finds the disk full says so
//! ([`BlobError::NoSpace`]) and leaves no partial file behind.

use muster_wire::perms;
use muster_wire::util::hex;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a blob could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No space left on the blob store's disk (or its quota): the API answers 507.
    #[error("the blob store is full: {0}")]
    NoSpace(std::io::Error),
    /// Any other I/O failure.
    #[error("blob store: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for BlobError {
    fn from(e: std::io::Error) -> BlobError {
        if no_space(&e) {
            BlobError::NoSpace(e)
        } else {
            BlobError::Io(e)
        }
    }
}

/// Whether an I/O error means "no space left" (ENOSPC, EDQUOT).
pub fn no_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Whether the file system holding `path` has (next to) no space left for this process: less
/// than 1 MiB it may use (root may use the blocks reserved for it). `false` when it cannot tell.
pub fn disk_full(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
    else {
        return false;
    };
    // SAFETY: statvfs into a zeroed struct we own, on a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    let blocks = if unsafe { libc::geteuid() } == 0 {
        st.f_bfree
    } else {
        st.f_bavail
    };
    (blocks as u128) * (st.f_frsize as u128) < 1 << 20
}

/// Blobs in one directory.
#[derive(Clone, Debug)]
pub struct Blobs {
    dir: PathBuf,
}

/// Temp files get `<pid>.<n>`: unique among the processes sharing the directory.
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

impl Blobs {
    /// The blob store in `dir`, made if missing (its mode repaired if open to other users).
    pub fn new(dir: &Path) -> io::Result<Blobs> {
        perms::create_dir_all(&dir.join("tmp"))?;
        perms::repair_all([dir]);
        Ok(Blobs {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory it keeps blobs in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> Option<PathBuf> {
        let ok = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| self.dir.join(&name[..2]).join(name))
    }

    /// A writer for a new blob; [`BlobWriter::finish`] names and keeps it.
    pub fn writer(&self) -> io::Result<BlobWriter> {
        let tmp = self.dir.join("tmp").join(format!(
            "{}.{}",
            std::process::id(),
            NEXT_TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let file = perms::create(&tmp)?;
        Ok(BlobWriter {
            blobs: self.clone(),
            tmp: Some(tmp),
            file: Some(file),
            hash: Sha256::new(),
            len: 0,
        })
    }

    /// Stores `data`; returns its name.
    pub fn put(&self, data: &[u8]) -> Result<String, BlobError> {
        let mut w = self.writer()?;
        w.write_all(data)?;
        Ok(w.finish()?)
    }

    /// Opens a blob for reading (seek for an offset).
    pub fn open(&self, name: &str) -> io::Result<File> {
        match self.path(name) {
            Some(p) => File::open(p),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a blob name",
            )),
        }
    }

    /// A whole blob in memory: for small ones only.
    pub fn get(&self, name: &str) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        io::Read::read_to_end(&mut self.open(name)?, &mut out)?;
        Ok(out)
    }

    pub fn delete(&self, name: &str) -> io::Result<()> {
        match self.path(name) {
            Some(p) => match std::fs::remove_file(p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }
}

/// A blob being written. Dropped unfinished, its temp file is removed.
pub struct BlobWriter {
    blobs: Blobs,
    tmp: Option<PathBuf>,
    file: Option<File>,
    hash: Sha256,
    len: u64,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the blob durable and gives it its name (the SHA-256 of its bytes, hex). A blob of
    /// that name already there is kept, and this copy dropped.
    pub fn finish(mut self) -> io::Result<String> {
        let file = self.file.take().expect("finished once");
        file.sync_data()?;
        drop(file);
        let name = hex(&std::mem::take(&mut self.hash).finalize());
        let path = self.blobs.path(&name).expect("a sha256 name");
        let tmp = self.tmp.take().expect("finished once");
        if path.exists() {
            let _ = std::fs::remove_file(&tmp);
            return Ok(name);
        }
        perms::create_dir_all(path.parent().expect("nested"))?;
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(name)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.as_mut().expect("not finished").write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("not finished").flush()
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    fn temp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "muster-blobs-{}-{}",
            std::process::id(),
            NEXT_TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_streamed_blob_is_named_by_its_hash_and_read_from_any_offset() {
        let dir = temp();
        let b = Blobs::new(&dir).unwrap();
        let mut w = b.writer().unwrap();
        for i in 0..1000u32 {
            writeln!(w, "line {i}").unwrap();
        }
        let len = w.len();
        let name = w.finish().unwrap();
        let whole: Vec<u8> = (0..1000u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        assert_eq!(len, whole.len() as u64);
        assert_eq!(name, hex(&Sha256::digest(&whole)));
        assert_eq!(
            b.put(&whole).unwrap(),
            name,
            "the same bytes, the same blob"
        );
        let mut f = b.open(&name).unwrap();
        f.seek(SeekFrom::Start(5)).unwrap();
        let mut rest = String::new();
        f.read_to_string(&mut rest).unwrap();
        assert!(rest.starts_with("0\nline 1\n"), "{}", &rest[..20]);
        // Unfinished writers leave nothing behind; no temp file is left by finished ones.
        let mut w = b.writer().unwrap();
        w.write_all(b"half").unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        assert!(b.open("../../etc/passwd").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
