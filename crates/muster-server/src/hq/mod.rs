//! Headquarters (SPEC §7): the git repository of desired state, and the loops that act on it.
//!
//! - [`git`]: the `git` program run safely (timeout, no shell, no prompts, no hooks).
//! - [`repo`]: the working copy: made on first start, read at `HEAD`, written by commits.
//! - [`pulse`]: the main loop. Every `[pulse] interval` it runs the [`Watcher`]s in the order they
//!   were registered; a watcher that fails or is slow never stops the others, pulses never
//!   overlap, and each watcher's last run is kept for `GET /api/v1/hq` and `/metrics`. The
//!   reconcile at start-up is simply the first pulse.
//! - [`sync`]: the HQ sync watcher (fetch, fast-forward or rebase the server's commits, push).
//! - [`orders`]: the orders watcher: each line appended to an orders file runs once, as a job
//!   tree, through the verbs registered in [`Verbs`]; `noop` and `script` are this module's.
//! - [`scripts`]: node control scripts, kept in HQ `scripts/`.
//! - [`reaper`]: the reaper's frame: the clean-up tasks each part registers, run every
//!   `[reaper] interval`.
//!
//! [`Hq`] is the handle the rest of the server holds: what HQ is (path, remote, branch), the
//! registries later parts plug into (verbs, watchers, reaper tasks), and the status the loops
//! report. Its state is private; the loops and the API go through its methods.

pub mod git;
pub mod orders;
pub mod pulse;
pub mod reaper;
pub mod repo;
pub mod scripts;
pub mod sync;

pub use orders::{Verb, Verbs};
pub use pulse::{Watcher, WatcherRun};
pub use repo::{Author, Repo};

use crate::config::Config;
use muster_core::Ts;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long one git command may take.
pub const GIT_TIMEOUT: Duration = Duration::from_secs(60);

/// A conflict the sync watcher could not resolve by rebasing.
#[derive(Clone, Debug, Serialize)]
pub struct Conflict {
    /// The files both sides changed.
    pub files: Vec<String>,
    /// The server's commit (the last good state it keeps serving).
    pub local: String,
    /// The remote's commit.
    pub remote: String,
    pub since: Ts,
    pub message: String,
}

/// The last sync with the remote.
#[derive(Clone, Debug, Serialize)]
pub struct SyncRun {
    pub at: Ts,
    pub ok: bool,
    pub message: String,
}

/// Something wrong in HQ's content, as the part that found it says.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// The watcher (or part) that found it.
    pub source: &'static str,
    pub message: String,
}

/// What `GET /api/v1/hq` shows.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub path: PathBuf,
    pub remote: String,
    pub branch: String,
    /// Why HQ cannot be used now (not a repository, no `git`, …); the server keeps going on its
    /// last good state and tries again each pulse.
    pub error: Option<String>,
    pub head: Option<repo::Commit>,
    pub last_sync: Option<SyncRun>,
    pub conflict: Option<Conflict>,
    /// What is wrong in HQ's content (a reserved directory that is a file, a bad workspace
    /// name, a symlink, an orders file too large, a stopped orders file): reported, skipped.
    pub problems: Vec<Problem>,
    pub pulses: u64,
    pub watchers: Vec<WatcherRun>,
    pub reaper: Vec<reaper::TaskRun>,
}

/// The handle on HQ (see the module doc).
pub struct Hq {
    path: PathBuf,
    remote: String,
    branch: String,
    webhook_secret: String,
    repo: Mutex<Option<Repo>>,
    writing: Mutex<()>,
    status: Mutex<Status>,
    verbs: Verbs,
    watchers: Mutex<Vec<Box<dyn Watcher>>>,
    reaper: reaper::Reaper,
    wake: tokio::sync::Notify,
    /// Tickets of [`Hq::pulse_now`]: taken, and served by a pulse that began after.
    requested: std::sync::atomic::AtomicU64,
    served: tokio::sync::watch::Sender<u64>,
    /// Orders files an admin resolved, for the orders watcher to take up.
    resolved: Mutex<Vec<String>>,
}

impl Hq {
    /// HQ as `config` says, not opened yet ([`Hq::open`]).
    pub fn new(config: &Config) -> Hq {
        let path = if config.hq.path.is_empty() {
            config.data_dir.join("hq")
        } else {
            PathBuf::from(&config.hq.path)
        };
        let branch = if config.hq.branch.is_empty() {
            "main".to_string()
        } else {
            config.hq.branch.clone()
        };
        Hq {
            status: Mutex::new(Status {
                path: path.clone(),
                remote: redact_url(&config.hq.remote),
                branch: branch.clone(),
                error: Some("not opened yet".into()),
                head: None,
                last_sync: None,
                conflict: None,
                problems: Vec::new(),
                pulses: 0,
                watchers: Vec::new(),
                reaper: Vec::new(),
            }),
            path,
            remote: config.hq.remote.clone(),
            branch,
            webhook_secret: config.hq.webhook_secret.clone(),
            repo: Mutex::new(None),
            writing: Mutex::new(()),
            verbs: Verbs::default(),
            watchers: Mutex::new(Vec::new()),
            reaper: reaper::Reaper::default(),
            wake: tokio::sync::Notify::new(),
            requested: Default::default(),
            served: tokio::sync::watch::channel(0).0,
            resolved: Mutex::new(Vec::new()),
        }
    }

    /// Opens the working copy (making it on first start); on failure the reason is kept in the
    /// status and [`Hq::repo`] answers `None` until a later pulse opens it. Blocking.
    pub fn open(&self) -> Option<Repo> {
        if let Some(r) = self.repo() {
            return Some(r);
        }
        match Repo::open_or_create(&self.path, &self.remote, &self.branch, GIT_TIMEOUT) {
            Ok((repo, notes)) => {
                for n in notes {
                    tracing::info!("{n}");
                }
                let head = repo.head().ok().flatten();
                {
                    let mut s = self.lock();
                    s.error = None;
                    s.head = head;
                }
                *self.repo.lock().unwrap_or_else(|e| e.into_inner()) = Some(repo.clone());
                Some(repo)
            }
            Err(e) => {
                let mut s = self.lock();
                if s.error.as_deref() != Some(&e) {
                    tracing::error!("HQ: {e}");
                }
                s.error = Some(e);
                None
            }
        }
    }

    /// The working copy, once opened.
    pub fn repo(&self) -> Option<Repo> {
        self.repo.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The remote as configured (empty: none).
    pub fn remote(&self) -> &str {
        &self.remote
    }

    /// `[hq] webhook_secret` (empty: none).
    pub fn webhook_secret(&self) -> &str {
        &self.webhook_secret
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the status.
    pub fn status(&self) -> Status {
        let mut s = self.lock().clone();
        s.reaper = self.reaper.runs();
        s
    }

    /// Changes the status (the loops report through this).
    pub fn report(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.lock())
    }

    /// Replaces the problems `source` found.
    pub fn set_problems(&self, source: &'static str, found: Vec<String>) {
        let mut s = self.lock();
        s.problems.retain(|p| p.source != source);
        s.problems
            .extend(found.into_iter().map(|message| Problem { source, message }));
    }

    /// Sets the head commit shown.
    pub fn set_head(&self, head: Option<repo::Commit>) {
        self.lock().head = head;
    }

    /// The order verbs.
    pub fn verbs(&self) -> &Verbs {
        &self.verbs
    }

    /// The reaper's tasks.
    pub fn reaper(&self) -> &reaper::Reaper {
        &self.reaper
    }

    /// Adds a watcher after those registered before; the pulse runs them in this order. Register
    /// before the server starts serving.
    pub fn add_watcher(&self, w: Box<dyn Watcher>) {
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(w);
    }

    fn take_watchers(&self) -> Vec<Box<dyn Watcher>> {
        std::mem::take(&mut *self.watchers.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Asks for a pulse now (`POST /api/v1/hq/sync`, a resolve) and waits until one that began
    /// after this call has ended, at most `timeout`; answers whether one did. Each call takes a
    /// ticket; a pulse serves every ticket taken before it began.
    pub async fn pulse_now(&self, timeout: Duration) -> bool {
        use std::sync::atomic::Ordering;
        let mut rx = self.served.subscribe();
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.wake.notify_one();
        tokio::time::timeout(timeout, rx.wait_for(|served| *served >= ticket))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The pulse loop's marks: a pulse begins (it will serve the tickets taken so far), a pulse
    /// ended (the `n`th, serving `tickets`).
    fn began(&self) -> u64 {
        self.requested.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn ended(&self, n: u64, tickets: u64) {
        self.lock().pulses = n;
        self.served.send_replace(tickets);
    }

    /// Whether a pulse was asked for that no pulse has begun to serve.
    fn asked(&self) -> bool {
        self.requested.load(std::sync::atomic::Ordering::SeqCst) > *self.served.borrow()
    }

    /// Marks an orders file resolved by an admin: the orders watcher takes its current content as
    /// the processed part at its next pulse.
    pub fn resolve(&self, file: &str) {
        self.resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(file.to_string());
    }

    /// Writes into the working copy (`prepare`, given its directory) and commits what changed
    /// under `paths` by `author`, under the one lock of HQ's writers (API writes, the watchers'
    /// commits, the sync's rebase); answers the commit now at HEAD.
    pub fn commit(
        &self,
        paths: &[&str],
        message: &str,
        author: &Author,
        prepare: impl FnOnce(&std::path::Path) -> Result<(), String>,
    ) -> Result<String, String> {
        let repo = self.repo().ok_or_else(|| {
            self.status()
                .error
                .unwrap_or_else(|| "HQ is not open".into())
        })?;
        let _w = self.write_lock();
        prepare(repo.dir())?;
        repo.commit(paths, message, author)?;
        let head = repo.head()?;
        let id = head.as_ref().map(|c| c.id.clone()).unwrap_or_default();
        self.lock().head = head;
        Ok(id)
    }

    /// The lock every writer of the working copy holds.
    pub fn write_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves when [`Hq::pulse_now`] asks for a pulse.
    async fn woken(&self) {
        self.wake.notified().await
    }

    fn take_resolved(&self) -> Vec<String> {
        std::mem::take(&mut *self.resolved.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A remote URL without a password (`https://user:secret@host` → `https://user:***@host`).
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(i), Some(j)) if j > i => {
            let creds = &url[i + 3..j];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}://{user}:***{}", &url[..i], &url[j..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Starts the pulse and the reaper of `app` (the caller aborts them at shutdown).
pub fn start(app: Arc<crate::App>) -> Vec<tokio::task::JoinHandle<()>> {
    let watchers = app.hq.take_watchers();
    vec![
        tokio::spawn(pulse::run(app.clone(), watchers)),
        tokio::spawn(reaper::run(app)),
    ]
}
