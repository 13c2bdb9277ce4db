//! The content-addressed blob store under `<data_dir>/blobs`: a file is named by the SHA-256 of
//! its bytes, written to a temp name and renamed, so a reader never sees half a blob.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Blobs in one directory.
#[derive(Clone, Debug)]
pub struct Blobs {
    dir: PathBuf,
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

impl Blobs {
    pub fn new(dir: &Path) -> std::io::Result<Blobs> {
        std::fs::create_dir_all(dir)?;
        Ok(Blobs {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, name: &str) -> Option<PathBuf> {
        let ok = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| self.dir.join(&name[..2]).join(name))
    }

    /// Stores `data`; returns its name.
    pub fn put(&self, data: &[u8]) -> std::io::Result<String> {
        let name = hex(&Sha256::digest(data));
        let path = self.path(&name).expect("a sha256 name");
        if path.exists() {
            return Ok(name);
        }
        std::fs::create_dir_all(path.parent().expect("nested"))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &path)?;
        Ok(name)
    }

    pub fn get(&self, name: &str) -> std::io::Result<Vec<u8>> {
        match self.path(name) {
            Some(p) => std::fs::read(p),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a blob name",
            )),
        }
    }

    pub fn delete(&self, name: &str) -> std::io::Result<()> {
        match self.path(name) {
            Some(p) => match std::fs::remove_file(p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }
}
