//! The HQ sync watcher (SPEC §7): with `[hq] remote` set, every pulse fetches the branch;
//! fast-forwards to the remote's commits, or rebases the server's own commits on top of them;
//! and pushes the server's commits. It never force-pushes and never drops a commit of either
//! side. A rebase that conflicts is aborted: the working copy stays on the last good commit
//! (which the server keeps serving), the conflict (files, both commits) is recorded for
//! `GET /api/v1/hq`, an `hq_conflict` alert goes out once per conflict, and the next pulse tries
//! again — a user's push that resolves it lets the sync resume.
//!
//! Servers that do not lead only fetch and fast-forward (they never commit), so their clone is
//! fresh when they take over.

use super::repo::Repo;
use super::{Conflict, SyncRun};
use crate::App;
use muster_wire::util::now;
use std::sync::Arc;

/// The sync watcher; it remembers the last conflict it alerted on.
#[derive(Default)]
pub struct SyncWatcher {
    alerted: Option<(String, String)>,
}

impl super::Watcher for SyncWatcher {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn leader_only(&self) -> bool {
        false
    }

    fn run(&mut self, app: &Arc<App>, tick: &super::pulse::Tick) -> Result<String, String> {
        if app.hq.remote().is_empty() {
            return Ok("no remote set".into());
        }
        let Some(repo) = app.hq.repo() else {
            return Err("HQ is not open".into());
        };
        let res = {
            let _w = app.hq.write_lock();
            sync(&repo, tick.leading)
        };
        let head = repo.head().ok().flatten();
        let at = now();
        match res {
            Ok(msg) => {
                self.alerted = None;
                app.hq.report(|s| {
                    s.head = head;
                    s.conflict = None;
                    s.last_sync = Some(SyncRun {
                        at,
                        ok: true,
                        message: msg.clone(),
                    });
                });
                Ok(msg)
            }
            Err(Failure::Conflict(c)) => {
                let msg = c.message.clone();
                let pair = (c.local.clone(), c.remote.clone());
                if self.alerted.as_ref() != Some(&pair) {
                    tracing::warn!("HQ sync: {msg}");
                    app.alerts.send(
                        "hq_conflict",
                        serde_json::json!({"files": c.files, "local": c.local, "remote": c.remote}),
                    );
                    self.alerted = Some(pair);
                }
                app.hq.report(|s| {
                    s.head = head;
                    let since = s
                        .conflict
                        .as_ref()
                        .filter(|o| o.local == c.local && o.remote == c.remote)
                        .map(|o| o.since);
                    s.conflict = Some(Conflict {
                        since: since.unwrap_or(at),
                        ..c
                    });
                    s.last_sync = Some(SyncRun {
                        at,
                        ok: false,
                        message: msg.clone(),
                    });
                });
                Err(msg)
            }
            Err(Failure::Other(msg)) => {
                app.hq.report(|s| {
                    s.head = head;
                    s.last_sync = Some(SyncRun {
                        at,
                        ok: false,
                        message: msg.clone(),
                    });
                });
                Err(msg)
            }
        }
    }
}

enum Failure {
    Conflict(Conflict),
    Other(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Failure {
        Failure::Other(s)
    }
}

fn rev(repo: &Repo, r: &str) -> Result<String, String> {
    repo.git()
        .run(&["rev-parse", "--verify", "-q", r])
        .map(|o| o.text())
        .map_err(|e| e.to_string())
}

fn is_ancestor(repo: &Repo, a: &str, b: &str) -> Result<bool, String> {
    let (code, _) = repo
        .git()
        .status(&["merge-base", "--is-ancestor", a, b])
        .map_err(|e| e.to_string())?;
    Ok(code == 0)
}

fn push(repo: &Repo) -> Result<(), String> {
    let dst = format!("HEAD:refs/heads/{}", repo.branch());
    repo.git()
        .run(&["push", "-q", "origin", &dst])
        .map(|_| ())
        .map_err(|e| format!("cannot push to the HQ remote: {e}"))
}

const COMMITTER: [(&str, &str); 2] = [
    ("GIT_COMMITTER_NAME", "muster"),
    ("GIT_COMMITTER_EMAIL", "muster@localhost"),
];

/// One sync; answers what it did.
fn sync(repo: &Repo, leading: bool) -> Result<String, Failure> {
    let branch = repo.branch().to_string();
    if !repo.fetch_branch()? {
        if !leading {
            return Ok("the remote has no branch yet".into());
        }
        push(repo)?;
        return Ok(format!("pushed {branch} to the empty remote"));
    }
    let theirs = format!("origin/{branch}");
    let local = rev(repo, "HEAD")?;
    let remote = rev(repo, &theirs)?;
    if local == remote {
        return Ok("up to date".into());
    }
    if is_ancestor(repo, &local, &remote)? {
        repo.git()
            .run(&["merge", "-q", "--ff-only", &theirs])
            .map_err(|e| format!("cannot fast-forward: {e}"))?;
        return Ok(format!("fast-forwarded to {}", &remote[..12]));
    }
    if !leading {
        return Ok("the server's own commits wait for the leader".into());
    }
    if is_ancestor(repo, &remote, &local)? {
        push(repo)?;
        return Ok(format!("pushed {}", &local[..12]));
    }
    // Both sides moved: the server's commits go on top of the remote's.
    let (code, out) = repo
        .git()
        .status_env(&["rebase", "-q", &theirs], &COMMITTER)
        .map_err(|e| e.to_string())?;
    if code != 0 {
        let files = repo
            .git()
            .run(&["diff", "--name-only", "--diff-filter=U"])
            .map(|o| o.text().lines().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default();
        let _ = repo.git().run(&["rebase", "--abort"]);
        let head = rev(repo, "HEAD").unwrap_or_default();
        if head != local {
            // Never lose the last good state: back to the server's commit.
            let _ = repo.git().run(&["reset", "-q", "--hard", &local]);
        }
        let why = out
            .stderr
            .lines()
            .find(|l| l.contains("CONFLICT"))
            .unwrap_or("")
            .trim()
            .to_string();
        return Err(Failure::Conflict(Conflict {
            message: format!(
                "the server's commits and the remote's conflict in {}: HQ stays on {} until the remote's side resolves it{}",
                if files.is_empty() { "some files".to_string() } else { files.join(", ") },
                &local[..12],
                if why.is_empty() { String::new() } else { format!(" ({why})") }
            ),
            files,
            local,
            remote,
            since: now(),
        }));
    }
    push(repo)?;
    let head = rev(repo, "HEAD")?;
    Ok(format!(
        "rebased the server's commits onto {} and pushed {}",
        &remote[..12],
        &head[..12]
    ))
}
