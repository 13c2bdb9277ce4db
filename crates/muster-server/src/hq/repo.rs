//! The HQ working copy: made on first start (a fresh repository with a README and the reserved
//! directories, or a clone of `[hq] remote`), read at `HEAD` (trees and blobs come from git's
//! objects, so a symlink is never followed and a half-written file is never read), and written
//! only by commits of named paths.

use super::git::{Git, GitError};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The reserved top-level directories of HQ (SPEC §7); no workspace may take their names.
pub const RESERVED_DIRS: [&str; 5] = ["services", "interfaces", "scripts", "uploads", "deployer"];

/// The README of a new HQ.
const README: &str = "# Headquarters\n\n\
This repository is muster's desired state. The server reads it at every pulse and commits to it\n\
what is changed through its API, so it always holds what runs.\n\n\
```\n\
<workspace>/models/<Model>/   bundle.json, orders, model files\n\
services/<domain__name__instance>/   service.toml, actions/, child services\n\
interfaces/<name>.toml   typed producer/consumer interfaces\n\
scripts/<name>           node control scripts (executables)\n\
uploads/                 drop zone for large model bundles\n\
deployer/orders          cluster-wide orders, one per line, each run once\n\
```\n\n\
`services`, `interfaces`, `scripts`, `uploads` and `deployer` are reserved: no workspace may be\n\
named so. Orders files are append-only: add a line (`noop`, or `script NAME [KEY=VALUE ...]\n\
[-- ARGS]` to run `scripts/NAME` on the nodes whose labels match) and commit; the outcome of each\n\
order is appended to the `orders.log` beside it. Editing or removing a line that already ran\n\
stops that file until an admin runs `muster hq orders resolve FILE`.\n";

/// An entry of the tree at `HEAD`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// `100644`, `100755`, `120000` (a symlink), `040000`, `160000` (a submodule).
    pub mode: String,
    /// `blob`, `tree` or `commit`.
    pub kind: String,
    pub oid: String,
    pub path: String,
    /// A blob's size in bytes (`None` for a tree or a submodule).
    pub size: Option<u64>,
}

impl Entry {
    pub fn is_symlink(&self) -> bool {
        self.mode == "120000"
    }
}

/// A commit: its id and its subject line.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Commit {
    pub id: String,
    pub message: String,
}

/// A commit in HQ's history.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LogEntry {
    pub id: String,
    pub author: String,
    /// The author's time (ISO 8601).
    pub at: String,
    pub message: String,
}

/// Who a commit is by.
#[derive(Clone, Debug)]
pub struct Author {
    pub name: String,
    pub email: String,
}

impl Author {
    /// The server itself.
    pub fn server() -> Author {
        Author {
            name: "muster".into(),
            email: "muster@localhost".into(),
        }
    }

    /// A muster user.
    pub fn user(name: &str) -> Author {
        Author {
            name: name.into(),
            email: format!("{name}@muster"),
        }
    }
}

/// The working copy of HQ on the branch it follows.
#[derive(Clone, Debug)]
pub struct Repo {
    git: Git,
    branch: String,
}

/// What changes when a commit, a checkout or a reset happens: the stat of `.git/HEAD`, the
/// branch's ref, `packed-refs` and the index. Two equal fingerprints mean HEAD did not move, at
/// the cost of four `stat` calls and no process.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Fingerprint(Vec<Option<(u64, i64, i64, u64)>>);

impl Repo {
    /// Opens the repository at `path`, making it first when `path` is missing or empty: a clone
    /// of `remote` when one is set, else a new repository. Either way it gets the layout (README,
    /// reserved directories) when its branch has no commit yet.
    pub fn open_or_create(
        path: &Path,
        remote: &str,
        branch: &str,
        timeout: Duration,
    ) -> Result<(Repo, Vec<String>), String> {
        let mut notes = Vec::new();
        let empty = match std::fs::read_dir(path) {
            Ok(mut rd) => rd.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(format!("HQ {}: {e}", path.display())),
        };
        let repo = Repo {
            git: Git::new(path, timeout),
            branch: branch.to_string(),
        };
        if empty {
            muster_wire::perms::create_dir_all(path)
                .map_err(|e| format!("cannot make HQ at {}: {e}", path.display()))?;
            if remote.is_empty() {
                repo.git
                    .run(&["init", "-q", "-b", branch])
                    .map_err(|e| e.to_string())?;
                notes.push(format!("made a new HQ repository at {}", path.display()));
            } else {
                let parent = path.parent().unwrap_or(Path::new("."));
                Git::new(parent, timeout)
                    .run(&["clone", "-q", "--", remote, &path.to_string_lossy()])
                    .map_err(|e| format!("cannot clone the HQ remote: {e}"))?;
                // An empty remote leaves an unborn branch of git's default name.
                let _ = repo
                    .git
                    .run(&["symbolic-ref", "HEAD", &format!("refs/heads/{branch}")]);
                notes.push(format!("cloned the HQ remote into {}", path.display()));
            }
        } else {
            let top = repo.git.run(&["rev-parse", "--show-toplevel"]).map_err(|e| match e {
                GitError::Missing(_) => e.to_string(),
                _ => format!(
                    "HQ {} is not a git repository (make it one with `git init`, or point [hq] path elsewhere)",
                    path.display()
                ),
            })?;
            let top = PathBuf::from(top.text());
            let canon = std::fs::canonicalize(path).unwrap_or(path.to_path_buf());
            if std::fs::canonicalize(&top).unwrap_or(top) != canon {
                return Err(format!(
                    "HQ {} is inside another git repository but not one itself (run `git init` there)",
                    path.display()
                ));
            }
            if !remote.is_empty() {
                repo.set_remote(remote)?;
            }
        }
        if repo.head()?.is_none() {
            if !remote.is_empty() && repo.fetch_branch().is_ok_and(|has| has) {
                repo.git
                    .run(&["reset", "-q", "--hard", &format!("origin/{branch}")])
                    .map_err(|e| e.to_string())?;
            } else {
                repo.write_layout()?;
                repo.commit(
                    &["."],
                    "HQ: the layout (README and reserved directories)",
                    &Author::server(),
                )?;
                notes.push("committed the HQ layout".into());
            }
        }
        Ok((repo, notes))
    }

    fn set_remote(&self, remote: &str) -> Result<(), String> {
        let now = self
            .git
            .run(&["remote", "get-url", "origin"])
            .ok()
            .map(|o| o.text());
        match now {
            Some(u) if u == remote => Ok(()),
            Some(_) => self
                .git
                .run(&["remote", "set-url", "origin", remote])
                .map(|_| ()),
            None => self
                .git
                .run(&["remote", "add", "origin", remote])
                .map(|_| ()),
        }
        .map_err(|e| e.to_string())
    }

    /// Fetches the branch from `origin`; `false` when the remote does not have it (yet).
    pub fn fetch_branch(&self) -> Result<bool, String> {
        let (code, out) = self
            .git
            .status(&["fetch", "-q", "origin", &self.branch])
            .map_err(|e| e.to_string())?;
        if code == 0 {
            return Ok(true);
        }
        if out.stderr.contains("couldn't find remote ref") {
            return Ok(false);
        }
        Err(format!(
            "cannot fetch from the HQ remote: {}",
            out.stderr
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("git fetch failed")
        ))
    }

    fn write_layout(&self) -> Result<(), String> {
        let d = self.git.dir();
        let w = |p: PathBuf, text: &str| {
            if !p.exists() {
                std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            Ok::<_, String>(())
        };
        w(d.join("README.md"), README)?;
        for r in RESERVED_DIRS {
            let dir = d.join(r);
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            if r == "deployer" {
                w(dir.join("orders"), "")?;
            } else {
                w(dir.join(".gitkeep"), "")?;
            }
        }
        Ok(())
    }

    /// The working copy's directory.
    pub fn dir(&self) -> &Path {
        self.git.dir()
    }

    /// The branch HQ follows.
    pub fn branch(&self) -> &str {
        &self.branch
    }

    /// The git runner of this working copy.
    pub fn git(&self) -> &Git {
        &self.git
    }

    /// The commit at HEAD; `None` on an unborn branch.
    pub fn head(&self) -> Result<Option<Commit>, String> {
        let (code, out) = self
            .git
            .status(&["log", "-1", "--format=%H%n%s"])
            .map_err(|e| e.to_string())?;
        if code != 0 {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.lines();
        match it.next() {
            Some(id) if !id.is_empty() => Ok(Some(Commit {
                id: id.to_string(),
                message: it.next().unwrap_or("").to_string(),
            })),
            _ => Ok(None),
        }
    }

    /// The last `n` commits from HEAD, newest first: id, author, time, subject.
    pub fn log(&self, n: usize) -> Result<Vec<LogEntry>, String> {
        let (code, out) = self
            .git
            .status(&["log", &format!("-{n}"), "--format=%H%x1f%an%x1f%aI%x1f%s"])
            .map_err(|e| e.to_string())?;
        if code != 0 {
            return Ok(Vec::new());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\u{1f}');
                Some(LogEntry {
                    id: f.next()?.to_string(),
                    author: f.next()?.to_string(),
                    at: f.next()?.to_string(),
                    message: f.next().unwrap_or("").to_string(),
                })
            })
            .collect())
    }

    /// The stat fingerprint of HEAD (see [`Fingerprint`]).
    pub fn fingerprint(&self) -> Fingerprint {
        use std::os::unix::fs::MetadataExt;
        let g = self.git.dir().join(".git");
        let paths = [
            g.join("HEAD"),
            g.join("refs").join("heads").join(&self.branch),
            g.join("packed-refs"),
            g.join("index"),
        ];
        Fingerprint(
            paths
                .iter()
                .map(|p| {
                    std::fs::metadata(p)
                        .ok()
                        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
                })
                .collect(),
        )
    }

    /// Every entry of the tree at HEAD, recursively (trees themselves included).
    pub fn ls_tree(&self) -> Result<Vec<Entry>, String> {
        let out = self
            .git
            .run(&["ls-tree", "-r", "-t", "-l", "-z", "HEAD"])
            .map_err(|e| e.to_string())?;
        let mut v = Vec::new();
        for rec in out.stdout.split(|b| *b == 0) {
            let rec = String::from_utf8_lossy(rec);
            let Some((meta, path)) = rec.split_once('\t') else {
                continue;
            };
            // `<mode> <type> <oid> <size, padded; - for a tree>`.
            let mut m = meta.split_whitespace();
            let (Some(mode), Some(kind), Some(oid)) = (m.next(), m.next(), m.next()) else {
                continue;
            };
            v.push(Entry {
                mode: mode.into(),
                kind: kind.into(),
                oid: oid.into(),
                path: path.into(),
                size: m.next().and_then(|n| n.parse().ok()),
            });
        }
        Ok(v)
    }

    /// The bytes of many blobs with two git processes in all (`cat-file --batch-check` for
    /// the sizes, then `cat-file --batch` for the contents), in the order of `oids`; a blob
    /// larger than `max` is refused (with its size) and none is read.
    pub fn blobs(&self, oids: &[&str], max: u64) -> Result<Vec<Result<Vec<u8>, String>>, String> {
        let sized: Vec<(&str, Option<u64>)> = oids.iter().map(|o| (*o, None)).collect();
        self.blobs_sized(&sized, max)
    }

    /// [`Repo::blobs`], with the sizes where known (from [`Repo::ls_tree`]): when all are, git's
    /// `--batch-check` is skipped (one process in all).
    pub fn blobs_sized(
        &self,
        oids: &[(&str, Option<u64>)],
        max: u64,
    ) -> Result<Vec<Result<Vec<u8>, String>>, String> {
        if oids.is_empty() {
            return Ok(Vec::new());
        }
        let sizes: Vec<u64> = match oids.iter().map(|(_, s)| *s).collect::<Option<Vec<u64>>>() {
            Some(known) => known,
            None => {
                let mut input = Vec::new();
                for (o, _) in oids {
                    input.extend_from_slice(o.as_bytes());
                    input.push(b'\n');
                }
                let check = self
                    .git
                    .run_input(&["cat-file", "--batch-check"], input)
                    .map_err(|e| e.to_string())?;
                let text = String::from_utf8_lossy(&check.stdout);
                text.lines()
                    .map(|line| {
                        line.split(' ')
                            .nth(2)
                            .and_then(|s| s.parse::<u64>().ok())
                            .ok_or_else(|| format!("git cat-file --batch-check: {line}"))
                    })
                    .collect::<Result<Vec<u64>, String>>()?
            }
        };
        let mut out: Vec<Result<Vec<u8>, String>> = Vec::with_capacity(oids.len());
        let mut wanted = Vec::new();
        for (i, size) in sizes.into_iter().enumerate() {
            if size > max {
                out.push(Err(format!(
                    "it is {} MB, more than the {} MB an HQ file may have",
                    size >> 20,
                    max >> 20
                )));
            } else {
                out.push(Ok(Vec::new()));
                wanted.push(i);
            }
        }
        if out.len() != oids.len() {
            return Err("git cat-file --batch-check answered too few lines".into());
        }
        let mut input = Vec::new();
        for i in &wanted {
            input.extend_from_slice(oids[*i].0.as_bytes());
            input.push(b'\n');
        }
        let all = self
            .git
            .run_input(&["cat-file", "--batch"], input)
            .map_err(|e| e.to_string())?
            .stdout;
        // Each answer: `<oid> <type> <size>\n<bytes>\n`.
        let mut at = 0usize;
        for i in wanted {
            let nl = all[at..]
                .iter()
                .position(|b| *b == b'\n')
                .ok_or("git cat-file --batch answered short")?;
            let head = String::from_utf8_lossy(&all[at..at + nl]).into_owned();
            let size: usize = head
                .split(' ')
                .nth(2)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("git cat-file --batch: {head}"))?;
            let start = at + nl + 1;
            let end = start + size;
            if end > all.len() {
                return Err("git cat-file --batch answered short".into());
            }
            out[i] = Ok(all[start..end].to_vec());
            at = end + 1;
        }
        Ok(out)
    }

    /// A blob's bytes, refused (with its size) when larger than `max`.
    pub fn blob(&self, oid: &str, max: u64) -> Result<Vec<u8>, String> {
        let size: u64 = self
            .git
            .run(&["cat-file", "-s", oid])
            .map_err(|e| e.to_string())?
            .text()
            .parse()
            .map_err(|_| "git cat-file -s gave no size".to_string())?;
        if size > max {
            return Err(format!(
                "it is {} MB, more than the {} MB an HQ file may have",
                size >> 20,
                max >> 20
            ));
        }
        Ok(self
            .git
            .run(&["cat-file", "blob", oid])
            .map_err(|e| e.to_string())?
            .stdout)
    }

    /// Commits what changed under `paths` (added, changed or removed) by `author`; `None` when
    /// nothing did. Only those paths go into the commit, whatever else is staged.
    pub fn commit(
        &self,
        paths: &[&str],
        message: &str,
        author: &Author,
    ) -> Result<Option<String>, String> {
        let mut add = vec!["add", "-A", "--"];
        add.extend_from_slice(paths);
        self.git.run(&add).map_err(|e| e.to_string())?;
        let mut diff = vec!["diff", "--cached", "--quiet", "--"];
        diff.extend_from_slice(paths);
        let (code, _) = self.git.status(&diff).map_err(|e| e.to_string())?;
        let unborn = self.head()?.is_none();
        if code == 0 && !unborn {
            return Ok(None);
        }
        let server = Author::server();
        let env = [
            ("GIT_AUTHOR_NAME", author.name.as_str()),
            ("GIT_AUTHOR_EMAIL", author.email.as_str()),
            ("GIT_COMMITTER_NAME", server.name.as_str()),
            ("GIT_COMMITTER_EMAIL", server.email.as_str()),
        ];
        let mut commit = vec!["commit", "-q", "--no-verify", "-m", message];
        if !unborn {
            commit.push("--");
            commit.extend_from_slice(paths);
        }
        self.git.run_env(&commit, &env).map_err(|e| e.to_string())?;
        Ok(self.head()?.map(|c| c.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "muster-hq-{name}-{}-{}",
            std::process::id(),
            muster_core::Uuid::now_v7()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_new_hq_has_the_layout_committed() {
        let d = temp("new");
        let (repo, notes) = Repo::open_or_create(&d, "", "main", Duration::from_secs(20)).unwrap();
        assert!(!notes.is_empty());
        let head = repo.head().unwrap().unwrap();
        assert!(head.message.contains("layout"), "{head:?}");
        let entries = repo.ls_tree().unwrap();
        for r in RESERVED_DIRS {
            assert!(
                entries.iter().any(|e| e.path == r && e.kind == "tree"),
                "{r}"
            );
        }
        assert!(entries.iter().any(|e| e.path == "deployer/orders"));
        // Opened again: the same commit, nothing new.
        let f = repo.fingerprint();
        let (again, notes) = Repo::open_or_create(&d, "", "main", Duration::from_secs(20)).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(again.head().unwrap().unwrap(), head);
        assert_eq!(again.fingerprint(), f);
        // A commit moves the fingerprint; one that changes nothing is no commit.
        std::fs::write(d.join("scripts/a"), "#!/bin/sh\n").unwrap();
        let c = repo
            .commit(&["scripts"], "a script", &Author::user("ann"))
            .unwrap();
        assert!(c.is_some());
        assert_ne!(repo.fingerprint(), f);
        assert_eq!(
            repo.commit(&["scripts"], "again", &Author::server())
                .unwrap(),
            None
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn many_blobs_are_read_in_one_batch_in_order() {
        let d = temp("batch");
        let (repo, _) = Repo::open_or_create(&d, "", "main", Duration::from_secs(20)).unwrap();
        std::fs::create_dir_all(d.join("services")).unwrap();
        // Binary content with newlines, an empty file, the same content twice, a large one.
        let files: Vec<(String, Vec<u8>)> = (0..300)
            .map(|i| {
                (
                    format!("services/f{i:03}"),
                    format!("a\n{i}\0\nb").into_bytes(),
                )
            })
            .chain([
                ("services/empty".to_string(), Vec::new()),
                ("services/dup".to_string(), b"a\n7\0\nb".to_vec()),
                ("services/big".to_string(), vec![b'x'; 5000]),
            ])
            .collect();
        for (p, data) in &files {
            std::fs::write(d.join(p), data).unwrap();
        }
        repo.commit(&["services"], "files", &Author::server())
            .unwrap();
        let entries: Vec<Entry> = repo
            .ls_tree()
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "blob" && files.iter().any(|(p, _)| *p == e.path))
            .collect();
        assert_eq!(entries.len(), files.len());
        let oids: Vec<&str> = entries.iter().map(|e| e.oid.as_str()).collect();
        let got = repo.blobs(&oids, 4096).unwrap();
        for (e, g) in entries.iter().zip(&got) {
            let want = &files.iter().find(|(p, _)| *p == e.path).unwrap().1;
            if e.path == "services/big" {
                assert!(g.as_ref().unwrap_err().contains("more than"), "{g:?}");
            } else {
                assert_eq!(g.as_ref().unwrap(), want, "{}", e.path);
            }
        }
        assert!(repo.blobs(&[], 10).unwrap().is_empty());
        // With the sizes ls-tree gave (one git process): the same answers.
        for e in &entries {
            let want = files.iter().find(|(p, _)| *p == e.path).unwrap().1.len();
            assert_eq!(e.size, Some(want as u64), "{}", e.path);
        }
        let sized: Vec<(&str, Option<u64>)> =
            entries.iter().map(|e| (e.oid.as_str(), e.size)).collect();
        let again = repo.blobs_sized(&sized, 4096).unwrap();
        assert_eq!(format!("{again:?}"), format!("{got:?}"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_directory_that_is_not_a_repository_is_refused_clearly() {
        let d = temp("plain");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("x"), "x").unwrap();
        let e = Repo::open_or_create(&d, "", "main", Duration::from_secs(20)).unwrap_err();
        assert!(e.contains("not a git repository"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
