//! Every process a supervised command starts, reaped and, at its end, killed.
//!
//! A command's process group is not all of it: a daemon that calls `setsid` (or forks twice)
//! leaves the group and the session, and a kill of the group misses it. So the supervisor is a
//! **child subreaper** (`PR_SET_CHILD_SUBREAPER`): an orphan anywhere below it is re-parented to
//! it rather than to init. That gives two facts this module builds on:
//! - every live descendant has a chain of parents up to a child of ours, so *we have no child
//!   left* means *nothing the command started is left*; a `waitid(WNOWAIT)` says so without
//!   scanning anything;
//! - the descendants are found by walking `/proc` down from our pid, wherever their sessions
//!   and groups went.
//!
//! Where a writable cgroup v2 exists ([`crate::cgroup`]), the command is also put in a cgroup of
//! its own: `cgroup.kill` ends it in one step, and the cgroup still holds the processes if the
//! supervisor itself dies (the subreaper's orphans would go to init then). Both mechanisms are
//! always used together; the subreaper alone is the fallback on hosts without a usable cgroup.
//!
//! [`Reaper`] reaps and signals; [`Ending`] is the end itself (SIGTERM, SIGKILL after the grace
//! period, until none is left). Jobs use them in `supervisor.rs`; long-running processes (SPEC
//! §5a) are meant to use the same.

use crate::cgroup::Cgroup;
use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// After SIGKILL, how long to wait for the last descendants before giving up on them (a
/// process in uninterruptible sleep on a dead NFS server ignores even SIGKILL).
pub const STUCK_AFTER: Duration = Duration::from_secs(5);

/// The reaper of this process's descendants (one per supervisor).
#[derive(Debug)]
pub struct Reaper {
    me: i32,
    cgroup: Option<Cgroup>,
}

impl Reaper {
    /// Makes this process the child subreaper of whatever it starts from now on, and tracks
    /// those processes in `cgroup` too when given.
    pub fn new(cgroup: Option<Cgroup>) -> std::io::Result<Reaper> {
        // SAFETY: prctl with an integer argument.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Reaper {
            // SAFETY: getpid has no preconditions.
            me: unsafe { libc::getpid() },
            cgroup,
        })
    }

    /// The cgroup the descendants are in, if any.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// Stops using the cgroup (moving the command into it failed) and removes it.
    pub fn drop_cgroup(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.remove();
        }
    }

    /// Reaps every child that has ended, without blocking: the command's main process and any
    /// orphan re-parented to us. Nothing else may wait for our children (so no zombie is
    /// left); the caller picks its main process's status out of these.
    pub fn reap(&self) -> Vec<(i32, ExitStatus)> {
        let mut out = Vec::new();
        loop {
            let mut status = 0;
            // SAFETY: waitpid without blocking, on any child of ours.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return out;
            }
            out.push((pid, ExitStatus::from_raw(status)));
        }
    }

    /// Whether anything the command started is still there: a child of ours (see the module
    /// comment: no child, no descendant), or a process in its cgroup.
    pub fn any_left(&self) -> bool {
        // SAFETY: waitid with WNOWAIT only looks; the siginfo is ours.
        let have_child = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            ) == 0
        };
        have_child || self.cgroup.as_ref().is_some_and(Cgroup::populated)
    }

    /// Sends `sig` to every live descendant and every process of the cgroup; returns how many
    /// processes that was.
    pub fn signal_all(&self, sig: i32) -> usize {
        let mut hit: HashSet<i32> = HashSet::new();
        if let Some(cg) = &self.cgroup {
            if sig == libc::SIGKILL {
                hit.extend(cg.pids());
                cg.kill();
            } else {
                hit.extend(cg.signal(sig));
            }
        }
        if self.any_left() {
            for pid in descendants(self.me) {
                if signal_descendant(self.me, pid, sig) {
                    hit.insert(pid);
                }
            }
        }
        hit.len()
    }
}

/// Every live (not zombie) descendant of `ancestor`, from `/proc`.
pub fn descendants(ancestor: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    let mut zombies: HashSet<i32> = HashSet::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Some((state, ppid)) = stat(pid) else {
            continue;
        };
        if state == 'Z' {
            zombies.insert(pid);
        }
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    let mut todo = vec![ancestor];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if !zombies.contains(&c) {
                out.push(c);
            }
            todo.push(c);
        }
    }
    out
}

/// The state and parent pid of `pid`, from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(char, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces and parentheses) start after the
    // last ')': state, ppid, ...
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Signals `pid` if it is still below `ancestor`: the pid is pinned with a pidfd first and its
/// ancestry checked again, so a pid freed and reused since the scan is never signalled.
fn signal_descendant(ancestor: i32, pid: i32, sig: i32) -> bool {
    // SAFETY: pidfd_open on a pid; the descriptor is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return false; // Gone already (or a kernel before 5.3, where the cgroup is the answer).
    }
    let mut below = false;
    let mut p = pid;
    for _ in 0..4096 {
        match stat(p) {
            Some((_, ppid)) if ppid == ancestor => {
                below = true;
                break;
            }
            Some((_, ppid)) if ppid > 1 => p = ppid,
            _ => break,
        }
    }
    let sent = below
        // SAFETY: a signal through the pidfd we hold, to the process checked just now.
        && unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        } == 0;
    // SAFETY: closing the pidfd we opened.
    unsafe { libc::close(fd) };
    sent
}

/// Ending every descendant: SIGTERM, SIGKILL once `grace` is over (again while any is left: a
/// process may fork while dying), until none is left.
#[derive(Debug)]
pub struct Ending {
    grace: Duration,
    term_at: Instant,
    kill_at: Option<Instant>,
}

/// What one [`Ending::step`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Some are left; within the grace period, or killed and dying.
    Waiting,
    /// The grace period is over: SIGKILL went to this many.
    Killed(usize),
    /// None is left.
    Done,
    /// Still some left `STUCK_AFTER` the SIGKILL: they are given up.
    Stuck,
}

impl Ending {
    /// Starts the end: SIGTERM to every descendant. Returns it with how many were signalled.
    pub fn start(reaper: &Reaper, grace: Duration) -> (Ending, usize) {
        Self::start_with(reaper, libc::SIGTERM, grace)
    }

    /// Starts the end with `sig` instead of SIGTERM (a process's `stop_signal`).
    pub fn start_with(reaper: &Reaper, sig: i32, grace: Duration) -> (Ending, usize) {
        let n = reaper.signal_all(sig);
        let e = Ending {
            grace,
            term_at: Instant::now(),
            kill_at: None,
        };
        (e, n)
    }

    /// One step (call it often, after [`Reaper::reap`]).
    pub fn step(&mut self, reaper: &Reaper) -> Step {
        if !reaper.any_left() {
            return Step::Done;
        }
        match self.kill_at {
            None if self.term_at.elapsed() >= self.grace => {
                self.kill_at = Some(Instant::now());
                Step::Killed(reaper.signal_all(libc::SIGKILL))
            }
            None => Step::Waiting,
            // Their SIGKILL is pending: nothing more to send (and no /proc scan every tick for
            // as long as they are stuck).
            Some(t) if t.elapsed() >= STUCK_AFTER => Step::Stuck,
            Some(_) => {
                reaper.signal_all(libc::SIGKILL);
                Step::Waiting
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grandchild in a session of its own is still found below us (no subreaper needed while
    /// its parent lives); it is gone from the list once killed.
    #[test]
    fn descendants_are_found_whatever_their_session() {
        let mut child = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg("setsid sleep 1000 & exec sleep 1000")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        let end = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let d = descendants(me);
            let below: Vec<i32> = d
                .iter()
                .copied()
                .filter(|&p| {
                    p == child.id() as i32 || stat(p).is_some_and(|(_, pp)| pp == child.id() as i32)
                })
                .collect();
            if below.len() == 2 {
                break below;
            }
            assert!(Instant::now() < end, "never saw both: {d:?}");
            std::thread::sleep(Duration::from_millis(10));
        };
        // The grandchild first: once the child is gone, the grandchild is re-parented away from
        // us (this test process is no subreaper) and no longer "below" it.
        let mut order = found.clone();
        order.sort_by_key(|&p| p == child.id() as i32);
        for &p in &order {
            assert!(signal_descendant(me, p, libc::SIGKILL));
        }
        child.wait().unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while descendants(me).iter().any(|p| found.contains(p)) {
            assert!(Instant::now() < end, "still there: {:?}", descendants(me));
            std::thread::sleep(Duration::from_millis(10));
        }
        // Not below us: never signalled.
        assert!(!signal_descendant(me, 1, 0));
    }
}
