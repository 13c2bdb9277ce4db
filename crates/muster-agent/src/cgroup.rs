//! cgroup v2 for the processes of one supervised command: a cgroup of its own under a writable,
//! delegated part of the unified hierarchy, so every process the command starts — daemons that
//! left its session, double forks — can be found and killed in one step (`cgroup.kill`), even
//! after the supervisor itself died.
//!
//! [`base`] finds where such cgroups can go: the agent's own cgroup (`0::PATH` of
//! `/proc/self/cgroup`) under the cgroup2 mount, with a `muster` child made there. It refuses —
//! and the caller falls back to the subreaper alone ([`crate::reap`]) — where there is no cgroup2
//! mount (a cgroup v1 host), where it is read-only (`ProtectControlGroups=` under systemd, many
//! containers) or not ours to write (an unprivileged agent without `Delegate=`). Nothing here
//! needs a controller: creating a child, moving a process in, `cgroup.kill` and `rmdir` work on
//! a hierarchy with none enabled (the memory/CPU limits of SPEC §5a will add them).

use std::io::Write;
use std::path::{Path, PathBuf};

/// One cgroup of the unified hierarchy (a directory under the cgroup2 mount).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

/// Where this process may make cgroups for what it supervises: `<own cgroup>/muster`, made if
/// missing; the error says why there is none (it is logged, and jobs then rely on the
/// subreaper alone).
pub fn base() -> Result<PathBuf, String> {
    let own = own_cgroup()?;
    let base = own.join("muster");
    match std::fs::create_dir(&base) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot make the cgroup {}: {e}", base.display())),
    }
    // Moving a process from our cgroup into a child needs write access to both `cgroup.procs`
    // (the common ancestor's and the target's); a delegated or root-owned tree gives both.
    for file in [own.join("cgroup.procs"), base.join("cgroup.procs")] {
        let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(file.as_os_str()))
            .map_err(|_| format!("{} is not a path", file.display()))?;
        // SAFETY: access() on a NUL-terminated path we own.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
            return Err(format!(
                "cannot write {}: {}",
                file.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(base)
}

/// The directory of this process's own cgroup in the unified hierarchy.
fn own_cgroup() -> Result<PathBuf, String> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    // The unified hierarchy's line is `0::/PATH`; v1 hierarchies have other ids.
    let own = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 (this host has cgroup v1 only)")?;
    mounted(own, |fstype, _| fstype == "cgroup2").map_err(|ro| match ro {
        Some(d) => format!("the cgroup v2 hierarchy at {} is read-only", d.display()),
        None => "no cgroup v2 hierarchy is mounted".into(),
    })
}

/// Where the cgroup `own` (a path as `/proc/self/cgroup` gives it) is, under the first writable
/// mount `pick(fstype, super_options)` chooses; the error holds a read-only one, if any.
fn mounted(own: &str, pick: impl Fn(&str, &str) -> bool) -> Result<PathBuf, Option<PathBuf>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|_| None)?;
    // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`
    let mut read_only = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let r: Vec<&str> = right.split_whitespace().collect();
        if !pick(
            r.first().copied().unwrap_or(""),
            r.get(2).copied().unwrap_or(""),
        ) {
            continue;
        }
        let f: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(mountpoint), Some(opts)) = (f.get(3), f.get(4), f.get(5)) else {
            continue;
        };
        // A mount of a sub-tree (in a container) shows our cgroup relative to its root.
        let Some(rel) = Path::new(own).strip_prefix(unescape(root)).ok() else {
            continue;
        };
        let dir = PathBuf::from(unescape(mountpoint)).join(rel);
        if opts.split(',').any(|o| o == "ro") {
            read_only = Some(dir);
            continue;
        }
        return Ok(dir);
    }
    Err(read_only)
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let n = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(n);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Cgroup {
    /// Makes the cgroup `name` under `parent` (a [`base`]); an existing one is taken as it is.
    pub fn create(parent: &Path, name: &str) -> std::io::Result<Cgroup> {
        let path = parent.join(name);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(Cgroup { path })
    }

    /// The cgroup at `path`, made earlier (by a supervisor that has died since, say).
    pub fn at(path: PathBuf) -> Cgroup {
        Cgroup { path }
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its `cgroup.procs`, open for writing: writing `0` to it moves the writer in.
    pub fn procs_for_writing(&self) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
    }

    /// Moves the process `pid` in.
    pub fn add(&self, pid: i32) -> std::io::Result<()> {
        self.procs_for_writing()?
            .write_all(pid.to_string().as_bytes())
    }

    /// The processes in it now.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether any live process is in it (or in a cgroup below it).
    pub fn populated(&self) -> bool {
        match std::fs::read_to_string(self.path.join("cgroup.events")) {
            Ok(events) => events.lines().any(|l| l.trim() == "populated 1"),
            Err(_) => !self.pids().is_empty(),
        }
    }

    /// Sends `sig` to every process in it; returns how many it was sent to.
    pub fn signal(&self, sig: i32) -> Vec<i32> {
        let pids = self.pids();
        for &pid in &pids {
            // SAFETY: a signal to a process of this cgroup (pids read just now).
            unsafe { libc::kill(pid, sig) };
        }
        pids
    }

    /// SIGKILLs every process in it at once (`cgroup.kill`, Linux 5.14), so nothing can fork
    /// its way out between a read of the list and the kill; on older kernels, each listed one.
    pub fn kill(&self) {
        let killed = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.kill"))
            .and_then(|mut f| f.write_all(b"1"));
        if killed.is_err() {
            self.signal(libc::SIGKILL);
        }
    }

    /// Sets `memory.max`, `cpu.max` and `pids.max` as `limits` asks, first enabling those
    /// controllers for the children of `parent` (where this cgroup is); the error says why a
    /// limit cannot be set (a controller the hierarchy does not offer, say).
    pub fn limit(
        &self,
        parent: &Path,
        limits: &muster_core::process::Limits,
    ) -> Result<(), String> {
        let mut want = Vec::new();
        if limits.memory.is_some() {
            want.push("memory");
        }
        if limits.cpu.is_some() {
            want.push("cpu");
        }
        if limits.pids.is_some() {
            want.push("pids");
        }
        let offered =
            std::fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
        for c in &want {
            if !offered.split_whitespace().any(|o| o == *c) {
                return Err(format!(
                    "the cgroup v2 hierarchy here has no {c} controller (it offers: {})",
                    if offered.trim().is_empty() {
                        "none"
                    } else {
                        offered.trim()
                    }
                ));
            }
        }
        let write = |dir: &Path, file: &str, value: &str| -> Result<(), String> {
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(file))
                .and_then(|mut f| f.write_all(value.as_bytes()))
                .map_err(|e| format!("cannot write {}: {e}", dir.join(file).display()))
        };
        let enable: Vec<String> = want.iter().map(|c| format!("+{c}")).collect();
        write(parent, "cgroup.subtree_control", &enable.join(" "))?;
        if let Some(m) = limits.memory {
            write(&self.path, "memory.max", &m.to_string())?;
            // No swap to escape the limit into (absent without swap accounting: fine).
            let _ = write(&self.path, "memory.swap.max", "0");
        }
        if let Some(c) = limits.cpu {
            let period = 100_000u64;
            let quota = ((c * period as f64).round() as u64).max(1000);
            write(&self.path, "cpu.max", &format!("{quota} {period}"))?;
        }
        if let Some(p) = limits.pids {
            write(&self.path, "pids.max", &p.to_string())?;
        }
        Ok(())
    }

    /// How many times the kernel's OOM killer has killed a process of it (`memory.events`).
    pub fn oom_kills(&self) -> u64 {
        oom_kill_count(&self.path.join("memory.events"))
    }

    /// Removes it; it must be empty (an error otherwise, `EBUSY`).
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_dir(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

/// Limits through cgroup v1 controllers, for a host whose unified hierarchy does not offer them
/// (systemd's "hybrid" layout: an empty cgroup2 beside v1 `memory`, `cpu`, `pids`). The
/// unified cgroup still holds and kills the processes; these groups only limit them. One group
/// per controller, at `<our own group of that controller>/muster/<name>`.
#[derive(Debug)]
pub struct V1Limits {
    dirs: Vec<PathBuf>,
    memory: Option<PathBuf>,
}

impl V1Limits {
    /// Makes the groups `name` for the limits `limits` asks and sets them; the error says why
    /// one cannot be (no such v1 hierarchy, read-only, ...), and then nothing is left behind.
    pub fn create(name: &str, limits: &muster_core::process::Limits) -> Result<V1Limits, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let mut made = V1Limits {
            dirs: Vec::new(),
            memory: None,
        };
        let mut wanted: Vec<(&str, Vec<(&str, String)>)> = Vec::new();
        if let Some(m) = limits.memory {
            // Also the limit of memory + swap, where swap is accounted (no escape into swap).
            wanted.push((
                "memory",
                // Each limit must stay at most memory + swap: a group made before with other
                // values takes them in whichever order works, so the first two may fail.
                vec![
                    ("?memory.limit_in_bytes", m.to_string()),
                    ("?memory.memsw.limit_in_bytes", m.to_string()),
                    ("memory.limit_in_bytes", m.to_string()),
                ],
            ));
        }
        if let Some(c) = limits.cpu {
            let period = 100_000u64;
            let quota = ((c * period as f64).round() as u64).max(1000);
            wanted.push((
                "cpu",
                vec![
                    ("cpu.cfs_period_us", period.to_string()),
                    ("cpu.cfs_quota_us", quota.to_string()),
                ],
            ));
        }
        if let Some(p) = limits.pids {
            wanted.push(("pids", vec![("pids.max", p.to_string())]));
        }
        for (controller, files) in wanted {
            // `ID:CONTROLLER[,CONTROLLER]:PATH`
            let path = own.lines().find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, names, path) = (f.next()?, f.next()?, f.next()?);
                names.split(',').any(|n| n == controller).then_some(path)
            });
            let Some(path) = path else {
                made.remove();
                return Err(format!("no cgroup v1 {controller} hierarchy either"));
            };
            let dir = match mounted(path, |fstype, opts| {
                fstype == "cgroup" && opts.split(',').any(|o| o == controller)
            }) {
                Ok(d) => d,
                Err(ro) => {
                    made.remove();
                    return Err(match ro {
                        Some(d) => format!(
                            "the cgroup v1 {controller} hierarchy at {} is read-only",
                            d.display()
                        ),
                        None => format!("the cgroup v1 {controller} hierarchy is not mounted"),
                    });
                }
            };
            let group = dir.join("muster").join(name);
            if let Err(e) = std::fs::create_dir_all(&group) {
                made.remove();
                return Err(format!("cannot make the cgroup {}: {e}", group.display()));
            }
            made.dirs.push(group.clone());
            if controller == "memory" {
                made.memory = Some(group.clone());
            }
            for (file, value) in files {
                let (optional, file) = match file.strip_prefix('?') {
                    Some(f) => (true, f),
                    None => (false, file),
                };
                let written = std::fs::OpenOptions::new()
                    .write(true)
                    .open(group.join(file))
                    .and_then(|mut f| f.write_all(value.as_bytes()));
                if let Err(e) = written {
                    if !optional {
                        made.remove();
                        return Err(format!("cannot write {}: {e}", group.join(file).display()));
                    }
                }
            }
        }
        Ok(made)
    }

    /// The groups' directories (kept in `started.json`, so they can be removed after a crash).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// How many times the OOM killer has killed a process of the memory group
    /// (`oom_kill` of `memory.oom_control`, Linux 4.13).
    pub fn oom_kills(&self) -> u64 {
        self.memory
            .as_ref()
            .map_or(0, |m| oom_kill_count(&m.join("memory.oom_control")))
    }

    /// Removes the groups (each must be empty: one that is not stays, harmless).
    pub fn remove(&self) {
        remove_v1(&self.dirs);
    }
}

/// The `oom_kill N` line of `file` (`memory.events` in v2, `memory.oom_control` in v1).
fn oom_kill_count(file: &Path) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|e| {
            e.lines()
                .find_map(|l| l.strip_prefix("oom_kill ").map(|n| n.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

/// Removes the cgroup v1 groups `dirs` made by [`V1Limits::create`] (empty ones; after a
/// supervisor died too).
pub fn remove_v1(dirs: &[PathBuf]) {
    for d in dirs {
        let _ = std::fs::remove_dir(d);
    }
}

/// At most this many cgroups to move a child into: the unified one and three v1 controllers.
const MAX_MOVES: usize = 4;

/// The descriptors [`Mover::move_child`] writes to (copied into the child): each cgroup's
/// `cgroup.procs` (`-1` for none) and the report pipe.
#[derive(Clone, Copy, Debug)]
pub struct MoveFds {
    procs: [i32; MAX_MOVES],
    report: i32,
}

/// Moves a child into a cgroup between fork and exec — so the command and everything it starts
/// are inside from their first instruction — and tells the parent whether that worked: a failed
/// move does not stop the command (the subreaper still tracks it), it is reported through a pipe
/// instead, read once the child has exec'd.
#[derive(Debug)]
pub struct Mover {
    /// The `cgroup.procs` of each cgroup to move into: the unified one, then v1 ones.
    procs: Vec<std::fs::File>,
    report_r: std::os::fd::OwnedFd,
    report_w: std::os::fd::OwnedFd,
}

impl Mover {
    /// Opens what the child needs, in the parent.
    pub fn new(cg: &Cgroup) -> std::io::Result<Mover> {
        Mover::into_all(cg, None)
    }

    /// A mover into `cg` and also into the cgroup v1 groups of `v1`, if given.
    pub fn into_all(cg: &Cgroup, v1: Option<&V1Limits>) -> std::io::Result<Mover> {
        use std::os::fd::FromRawFd;
        let mut procs = vec![cg.procs_for_writing()?];
        for dir in v1.map_or(&[][..], |v| &v.dirs[..]) {
            if procs.len() == MAX_MOVES {
                break;
            }
            procs.push(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))?,
            );
        }
        let mut fds = [0; 2];
        // SAFETY: pipe2 into an array of two descriptors, which we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just made and belong to nothing else.
        let (report_r, report_w) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        Ok(Mover {
            procs,
            report_r,
            report_w,
        })
    }

    /// What the child's hook needs (copied into it): see [`Mover::move_child`].
    pub fn fds(&self) -> MoveFds {
        use std::os::fd::AsRawFd;
        let mut procs = [-1; MAX_MOVES];
        for (slot, f) in procs.iter_mut().zip(&self.procs) {
            *slot = f.as_raw_fd();
        }
        MoveFds {
            procs,
            report: self.report_w.as_raw_fd(),
        }
    }

    /// In the child, between fork and exec: moves it in, or writes the errno to the report pipe.
    ///
    /// # Safety
    /// Only in a `pre_exec` hook, with the descriptors of [`Mover::fds`] of a `Mover` the parent
    /// still holds. It makes only async-signal-safe system calls.
    pub unsafe fn move_child(fds: MoveFds) {
        for procs in fds.procs {
            if procs >= 0 && libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                let errno = *libc::__errno_location();
                libc::write(fds.report, (&errno as *const i32).cast(), 4);
                return;
            }
        }
    }

    /// In the parent, once the child has exec'd (or failed to): whether the move worked.
    pub fn result(self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // The child's copy of the write end closed at exec (or its exit); ours closes here, so
        // the read below returns at once.
        drop(self.report_w);
        let mut errno = 0i32;
        // SAFETY: reading at most 4 bytes into an i32 we own.
        let n = unsafe {
            libc::read(
                self.report_r.as_raw_fd(),
                (&mut errno as *mut i32).cast(),
                4,
            )
        };
        if n == 4 {
            Err(std::io::Error::from_raw_os_error(errno))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A move that fails (the cgroup is gone) is reported, and the command runs anyway.
    #[test]
    fn a_failed_move_is_reported_and_the_command_still_runs() {
        let base = match base() {
            Ok(b) => b,
            Err(why) => {
                eprintln!("SKIPPED: no writable cgroup v2 here: {why}");
                return;
            }
        };
        let cg = Cgroup::create(&base, &format!("unit-gone-{}", std::process::id())).unwrap();
        let mover = Mover::new(&cg).unwrap();
        cg.remove().unwrap();
        let fds = mover.fds();
        let mut cmd = std::process::Command::new("/bin/true");
        // SAFETY: the hook is Mover::move_child, made for it.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                Mover::move_child(fds);
                Ok(())
            })
        };
        let mut child = cmd.spawn().unwrap();
        assert!(
            mover.result().is_err(),
            "the move into a removed cgroup worked"
        );
        assert!(child.wait().unwrap().success());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\\"), r"/x\\");
    }

    /// A real cgroup where this host has a writable one: a process and its setsid'd child are
    /// both in it, and `kill` ends them.
    #[test]
    fn a_cgroup_holds_and_kills_a_daemon() {
        let base = match base() {
            Ok(b) => b,
            Err(why) => {
                eprintln!("SKIPPED: no writable cgroup v2 here: {why}");
                return;
            }
        };
        let cg = Cgroup::create(&base, &format!("unit-{}", std::process::id())).unwrap();
        let mover = Mover::new(&cg).unwrap();
        let fds = mover.fds();
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c").arg("setsid sleep 1000 & exec sleep 1000");
        // SAFETY: the hook is Mover::move_child, made for it.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                Mover::move_child(fds);
                Ok(())
            })
        };
        let mut child = cmd.spawn().unwrap();
        mover.result().unwrap();
        // Moved in before exec, so the daemon the shell forks is inside too.
        let end = Instant::now() + Duration::from_secs(10);
        while cg.pids().len() < 2 {
            assert!(
                Instant::now() < end,
                "the daemon never showed up: {:?}",
                cg.pids()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(cg.populated());
        cg.kill();
        child.wait().unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while cg.populated() {
            assert!(Instant::now() < end, "still populated: {:?}", cg.pids());
            std::thread::sleep(Duration::from_millis(10));
        }
        cg.remove().unwrap();
        assert!(!cg.path().exists());
    }
}
