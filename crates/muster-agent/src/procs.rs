//! The agent's side of long-running processes (SPEC §5a): one directory per process
//! (`procs/<id>/`, see [`crate::procsup`]), its supervisor started through the launcher like a
//! job attempt's, its status read from `state.json` and reported (`ProcessStates`, and all of
//! them in `Hello`), re-adopted at agent start.
//!
//! Never two copies: one directory per process on a node, one `flock` on it, and a new
//! generation starts only once the supervisor of the previous one has ended. A supervisor that
//! died (`kill -9`) leaves `started.json` without `exit.json`: the agent kills what is left of
//! it (its session and cgroup) and only then starts a new supervisor for the same generation.

use crate::procsup::{self, Ended};
use crate::{supervisor, Agent, Internal};
use muster_core::process::{ProcState, ProcStatus};
use muster_core::Uuid;
use muster_wire::perms;
use muster_wire::protocol::{FromAgent, ProcessAssignment, ProcessReport};
use muster_wire::util::now;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// What the agent keeps about its processes.
#[derive(Default)]
pub(crate) struct Procs {
    /// The last status seen of each process directory, with its generation.
    pub(crate) known: HashMap<Uuid, (u32, ProcStatus)>,
    /// Processes whose supervisor runs (or was just handed over), by generation.
    pub(crate) live: HashMap<Uuid, u32>,
    /// Starts waiting for the previous generation's supervisor to end.
    pub(crate) next: HashMap<Uuid, ProcessAssignment>,
    /// Processes to forget once their supervisor has ended.
    pub(crate) remove: HashSet<Uuid>,
    /// Supervisors found dead, by process: how many times in a row (to give up on a loop).
    pub(crate) lost: HashMap<Uuid, u32>,
}

/// `<agent dir>/procs`.
pub fn procs_dir(dir: &Path) -> PathBuf {
    dir.join("procs")
}

/// Every process directory under `<dir>/procs`.
pub fn proc_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(procs_dir(dir))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Whether `dir` is a process directory (not a job attempt's).
pub fn is_proc_dir(dir: &Path) -> bool {
    dir.join(procsup::SPEC).exists()
        || dir
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n == "procs")
}

fn report(id: Uuid, gen: u32, status: &ProcStatus) -> ProcessReport {
    ProcessReport {
        id,
        gen,
        status: status.clone(),
    }
}

/// Reads the status of every process directory: `(id, gen, status)`.
pub(crate) fn scan(dir: &Path) -> Vec<(Uuid, u32, ProcStatus)> {
    proc_dirs(dir).iter().filter_map(|p| scan_one(p)).collect()
}

/// The status of one process directory, if it has one.
fn scan_one(path: &Path) -> Option<(Uuid, u32, ProcStatus)> {
    let id = path.file_name()?.to_str()?.parse::<Uuid>().ok()?;
    let spec = procsup::read_spec(path)?;
    let status = match procsup::read_ended(path) {
        Some(e) if e.gen >= spec.gen => e.status,
        _ => procsup::read_state(path)?,
    };
    Some((id, spec.gen, status))
}

impl Agent {
    fn proc_dir(&self, id: Uuid) -> PathBuf {
        procs_dir(&self.opts.dir).join(id.to_string())
    }

    /// At agent start: every process directory, re-adopted (a live supervisor is watched), its
    /// supervisor started again (one that died: after its leftovers are killed), or taken as
    /// ended.
    pub(crate) fn adopt_processes(&mut self) {
        let _ = perms::create_dir_all(&procs_dir(&self.opts.dir));
        for (id, gen, status) in scan(&self.opts.dir) {
            self.procs.known.insert(id, (gen, status));
        }
        let ids: Vec<(Uuid, u32)> = self
            .procs
            .known
            .iter()
            .map(|(id, (gen, _))| (*id, *gen))
            .collect();
        for (id, gen) in ids {
            let dir = self.proc_dir(id);
            if procsup::read_ended(&dir).is_some_and(|e| e.gen >= gen) {
                continue;
            }
            match supervisor::lock(&dir, false) {
                Ok(None) => {
                    // Its supervisor lives: wait for its end.
                    self.procs.live.insert(id, gen);
                    self.watch_process(id, gen, dir);
                }
                Ok(Some(lock)) => {
                    drop(lock);
                    self.supervisor_lost(id, gen, &dir);
                }
                Err(e) => tracing::warn!(%id, "cannot look at process {id}: {e}"),
            }
        }
    }

    /// A process's supervisor ended without recording an end: what it left is killed, then a
    /// new supervisor runs the same generation (a few times in a row at most).
    fn supervisor_lost(&mut self, id: Uuid, gen: u32, dir: &Path) {
        crate::kill_leftovers(dir);
        let n = self.procs.lost.entry(id).or_default();
        *n += 1;
        if *n > 5 {
            let status = ProcStatus::last(
                ProcState::Failed,
                "its supervisor kept dying",
                BTreeMap::new(),
                now(),
            );
            self.end_lost(id, gen, dir, status);
            return;
        }
        let needs_secrets = procsup::read_spec(dir).is_some_and(|s| s.def.secrets_of.is_some());
        if needs_secrets && !self.secrets.contains_key(&(id, gen)) {
            // Its secrets were in the memory of an agent and a supervisor that are both gone:
            // failed, for the server to start it anew (with them).
            let status = ProcStatus::last(
                ProcState::Failed,
                "its supervisor died while the agent was away, and its secrets live in memory only: restart it",
                BTreeMap::new(),
                now(),
            );
            self.end_lost(id, gen, dir, status);
            return;
        }
        tracing::warn!(%id, "the supervisor of process {id} is gone; starting it again");
        self.procs.live.insert(id, gen);
        self.launch_process(id, gen, dir.to_path_buf());
    }

    /// Records generation `gen` of a process whose supervisor is gone as ended with `status`.
    fn end_lost(&mut self, id: Uuid, gen: u32, dir: &Path, status: ProcStatus) {
        let ended = Ended {
            gen,
            status: status.clone(),
        };
        let _ = supervisor::write_durable(
            &dir.join("exit.json"),
            &serde_json::to_vec(&ended).unwrap_or_default(),
        );
        self.procs.known.insert(id, (gen, status));
        self.procs.live.remove(&id);
    }

    fn launch_process(&mut self, id: Uuid, gen: u32, dir: PathBuf) {
        if !self.launch(id, gen, &dir) {
            self.spawn_direct(id, gen, dir);
        }
    }

    /// Waits (in a thread) for a supervisor this agent did not start. A plain thread, not a
    /// blocking task: a process may outlive the agent, and the runtime's end must not wait
    /// for it.
    fn watch_process(&self, id: Uuid, gen: u32, dir: PathBuf) {
        let tx = self.internal_tx.clone();
        std::thread::spawn(move || {
            let _ = supervisor::lock(&dir, true);
            let _ = tx.send(Internal::ProcEnded { id, gen, dir });
        });
    }

    /// The server wants generation `p.gen` of a process running here.
    pub(crate) fn start_process(
        &mut self,
        mut p: ProcessAssignment,
        tx: &UnboundedSender<FromAgent>,
    ) {
        p.run_as = self.opts.run_as.clone();
        p.cgroup = self.cgroup_base.clone();
        p.log_max = self.opts.process_log_max;
        p.log_keep = self.opts.process_log_keep;
        self.node_env(&mut p.env);
        let (id, gen) = (p.id, p.gen);
        self.procs.remove.remove(&id);
        match self.procs.live.get(&id) {
            Some(&g) if g >= gen => {
                // Already running it: say how it is.
                if let Some((g, st)) = self.procs.known.get(&id) {
                    let _ = tx.send(FromAgent::ProcessStates {
                        states: vec![report(id, *g, st)],
                    });
                }
                return;
            }
            Some(_) => {
                // An older generation still runs: it stops first.
                self.procs.next.insert(id, p);
                self.signal_process(id, "stop", libc::SIGTERM);
                return;
            }
            None => {}
        }
        let dir = self.proc_dir(id);
        if procsup::read_ended(&dir).is_some_and(|e| e.gen >= gen) {
            if let Some((g, st)) = self.procs.known.get(&id) {
                let _ = tx.send(FromAgent::ProcessStates {
                    states: vec![report(id, *g, st)],
                });
            }
            return;
        }
        let _ = perms::create_dir_all(&dir);
        for f in ["stop", "restart", "exit.json", "state.json", "started.json"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        // The env vars that hold secrets stay in memory (the agent's, then the supervisor's):
        // never in process.json.
        let secret_env = std::mem::take(&mut p.secret_env);
        match self.pick_ports(&p) {
            Ok(ports) => p.ports = ports,
            Err(why) => {
                let status = ProcStatus {
                    state: ProcState::Failed,
                    reason: why,
                    restarts: 0,
                    pid: None,
                    ports: BTreeMap::new(),
                    started_at: None,
                    limits: String::new(),
                    seq: 1,
                    at: now(),
                };
                let _ = write_spec(&dir, &p);
                let ended = Ended {
                    gen,
                    status: status.clone(),
                };
                let _ = supervisor::write_durable(
                    &dir.join("exit.json"),
                    &serde_json::to_vec(&ended).unwrap_or_default(),
                );
                self.procs.known.insert(id, (gen, status.clone()));
                let _ = tx.send(FromAgent::ProcessStates {
                    states: vec![report(id, gen, &status)],
                });
                return;
            }
        }
        if let Err(e) = write_spec(&dir, &p) {
            tracing::error!(%id, "cannot write the spec of process {id}: {e}");
            return;
        }
        self.procs.lost.remove(&id);
        self.procs.live.insert(id, gen);
        self.secrets.retain(|(j, _), _| *j != id);
        if !secret_env.is_empty() {
            self.secrets.insert((id, gen), secret_env);
        }
        self.launch_process(id, gen, dir);
    }

    /// Free ports from `agent.port_range` for each name: not given to another process here,
    /// and bindable now.
    fn pick_ports(&self, p: &ProcessAssignment) -> Result<BTreeMap<String, u16>, String> {
        let mut taken: HashSet<u16> = self
            .procs
            .known
            .iter()
            .filter(|(id, (_, st))| **id != p.id && !st.state.is_final())
            .flat_map(|(_, (_, st))| st.ports.values().copied())
            .collect();
        let (lo, hi) = self.opts.port_range;
        let span = (hi - lo) as u32 + 1;
        let mut out = BTreeMap::new();
        // Start somewhere in the range that moves with the process, so restarts elsewhere
        // don't all try the same ports first.
        let offset = (p.id.as_u128() % span as u128) as u32;
        for name in &p.def.ports {
            let mut found = None;
            for k in 0..span {
                let port = lo + ((offset + k) % span) as u16;
                if taken.contains(&port) {
                    continue;
                }
                if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
                    found = Some(port);
                    break;
                }
            }
            let Some(port) = found else {
                return Err(format!(
                    "port range exhausted: no free port in agent.port_range {lo}-{hi}"
                ));
            };
            taken.insert(port);
            out.insert(name.clone(), port);
        }
        Ok(out)
    }

    /// Writes a request file (`stop`, `restart`) and signals the supervisor.
    fn signal_process(&self, id: Uuid, file: &str, sig: i32) -> bool {
        let dir = self.proc_dir(id);
        let _ = perms::write(&dir.join(file), b"");
        let started: Option<procsup::Started> = std::fs::read(dir.join("started.json"))
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok());
        match started {
            Some(s) if s.sid > 0 => {
                // SAFETY: a signal to the process's supervisor (its pid is its session id).
                unsafe { libc::kill(s.sid, sig) };
                true
            }
            _ => false,
        }
    }

    pub(crate) fn stop_process(
        &mut self,
        id: Uuid,
        gen: u32,
        remove: bool,
        tx: &UnboundedSender<FromAgent>,
    ) {
        self.procs.next.remove(&id);
        if remove {
            self.procs.remove.insert(id);
        }
        if self.procs.live.contains_key(&id) {
            self.signal_process(id, "stop", libc::SIGTERM);
            return;
        }
        let dir = self.proc_dir(id);
        if remove {
            let _ = std::fs::remove_dir_all(&dir);
            self.procs.known.remove(&id);
            self.procs.remove.remove(&id);
            return;
        }
        // Not running here: say it is stopped, for that generation.
        let status = match self.procs.known.get(&id) {
            Some((_, st)) if st.state.is_final() => st.clone(),
            _ => ProcStatus {
                state: ProcState::Stopped,
                reason: "stopped".into(),
                restarts: 0,
                pid: None,
                ports: BTreeMap::new(),
                started_at: None,
                limits: String::new(),
                seq: 1,
                at: now(),
            },
        };
        let _ = tx.send(FromAgent::ProcessStates {
            states: vec![report(id, gen, &status)],
        });
    }

    pub(crate) fn restart_process(&mut self, id: Uuid, gen: u32) {
        if self.procs.live.contains_key(&id) {
            if !self.signal_process(id, "restart", libc::SIGHUP) {
                tracing::warn!(%id, "restart of process {id}: no supervisor pid to signal; it sees the request file within a second");
            }
        } else {
            tracing::warn!(%id, gen, "restart of process {id} asked, but no supervisor of it runs here");
        }
    }

    /// Every process, for the `Hello`.
    pub(crate) fn process_reports(&self) -> Vec<ProcessReport> {
        self.procs
            .known
            .iter()
            .map(|(id, (gen, st))| report(*id, *gen, st))
            .collect()
    }

    /// A process's supervisor ended.
    pub(crate) fn process_ended(
        &mut self,
        id: Uuid,
        gen: u32,
        dir: PathBuf,
        tx: &UnboundedSender<FromAgent>,
    ) {
        if self.procs.live.get(&id) != Some(&gen) {
            return;
        }
        let ended = procsup::read_ended(&dir).filter(|e| e.gen >= gen);
        if ended.is_none() && !self.procs.remove.contains(&id) {
            if dir.join("stop").exists() {
                // Told to stop and killed before it could record it: stopped it is.
                crate::kill_leftovers(&dir);
            } else {
                self.supervisor_lost(id, gen, &dir);
                return;
            }
        }
        self.procs.live.remove(&id);
        self.secrets.remove(&(id, gen));
        crate::kill_leftovers(&dir);
        let status = ended.map(|e| e.status).unwrap_or_else(|| {
            ProcStatus::last(ProcState::Stopped, "stopped", BTreeMap::new(), now())
        });
        if self.procs.remove.remove(&id) {
            let _ = std::fs::remove_dir_all(&dir);
            self.procs.known.remove(&id);
        } else {
            self.procs.known.insert(id, (gen, status.clone()));
            let _ = tx.send(FromAgent::ProcessStates {
                states: vec![report(id, gen, &status)],
            });
        }
        if let Some(p) = self.procs.next.remove(&id) {
            self.start_process(p, tx);
        }
    }

    /// New statuses read from the process directories.
    pub(crate) fn process_states(
        &mut self,
        states: Vec<(Uuid, u32, ProcStatus)>,
        tx: &UnboundedSender<FromAgent>,
    ) {
        let mut changed = Vec::new();
        for (id, gen, st) in states {
            if self.procs.remove.contains(&id) {
                continue;
            }
            let newer = match self.procs.known.get(&id) {
                Some((g, old)) => *g < gen || (*g == gen && old.seq < st.seq),
                None => true,
            };
            if newer {
                changed.push(report(id, gen, &st));
                self.procs.known.insert(id, (gen, st));
            }
        }
        if !changed.is_empty() {
            let _ = tx.send(FromAgent::ProcessStates { states: changed });
        }
    }

    /// The agent stops with `--stop-processes`: every process is stopped, and waited for a
    /// while (their kill grace, at most 30 s).
    pub(crate) fn stop_all_processes(&mut self) {
        let ids: Vec<Uuid> = self.procs.live.keys().copied().collect();
        for id in &ids {
            self.signal_process(*id, "stop", libc::SIGTERM);
        }
        let end = std::time::Instant::now() + Duration::from_secs(30);
        for id in ids {
            let dir = self.proc_dir(id);
            while std::time::Instant::now() < end {
                match supervisor::lock(&dir, false) {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// Writes a process's `process.json` whole or not at all.
fn write_spec(dir: &Path, p: &ProcessAssignment) -> std::io::Result<()> {
    let data = serde_json::to_vec(p).map_err(std::io::Error::other)?;
    let tmp = dir.join("process.tmp");
    perms::write(&tmp, data)?;
    std::fs::rename(&tmp, dir.join(procsup::SPEC))
}

/// Hands the agent every process's status as it changes: an inotify watch on each process
/// directory sees `state.json` / `exit.json` renamed in (no timer, no `stat`s while nothing
/// changes), on a thread of its own. It returns when the agent is gone; an error (no inotify)
/// leaves [`poll_states`] alone at its quick pace.
pub(crate) fn watch_states(
    dir: &Path,
    tx: &UnboundedSender<Internal>,
    ready: &std::sync::mpsc::Sender<bool>,
) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let procs = procs_dir(dir);
    perms::create_dir_all(&procs)?;
    // SAFETY: a new inotify descriptor, owned from here on.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just opened, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let add = |p: &Path, mask: u32| -> std::io::Result<i32> {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("a path with a NUL"))?;
        // SAFETY: a watch on our own descriptor, for a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(wd)
    };
    let one = libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE | libc::IN_ONLYDIR;
    let top = add(
        &procs,
        libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ONLYDIR,
    )?;
    let mut dirs: HashMap<i32, PathBuf> = HashMap::new();
    let mut first = Vec::new();
    for p in proc_dirs(dir) {
        if let Ok(wd) = add(&p, one) {
            dirs.insert(wd, p.clone());
        }
        first.extend(scan_one(&p));
    }
    let _ = ready.send(true);
    if !first.is_empty() && tx.send(Internal::ProcStates(first)).is_err() {
        return Ok(());
    }
    let mut buf = vec![0u8; 64 * 1024];
    let head = std::mem::size_of::<libc::inotify_event>();
    loop {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling our own descriptor; the second's timeout only looks for the end.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        if tx.is_closed() {
            return Ok(());
        }
        // SAFETY: reading into a buffer we own, at most its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        let mut seen: HashSet<PathBuf> = HashSet::new();
        let mut at = 0usize;
        while at + head <= n as usize {
            // SAFETY: the kernel wrote whole events; read_unaligned copes with the offset.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            let name_bytes = &buf[at + head..(at + head + ev.len as usize).min(n as usize)];
            let name = name_bytes.split(|&b| b == 0).next().unwrap_or_default();
            at += head + ev.len as usize;
            let name = std::ffi::OsStr::from_bytes(name);
            if ev.wd == top {
                if ev.mask & libc::IN_ISDIR != 0 {
                    let p = procs.join(name);
                    if let Ok(wd) = add(&p, one) {
                        dirs.insert(wd, p.clone());
                    }
                    seen.insert(p);
                }
            } else if ev.mask & libc::IN_IGNORED != 0 {
                dirs.remove(&ev.wd);
            } else if let Some(p) = dirs.get(&ev.wd) {
                if name == "state.json" || name == "exit.json" || name == procsup::SPEC {
                    seen.insert(p.clone());
                }
            }
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                seen.extend(dirs.values().cloned());
            }
        }
        let changed: Vec<_> = seen.iter().filter_map(|p| scan_one(p)).collect();
        if !changed.is_empty() && tx.send(Internal::ProcStates(changed)).is_err() {
            return Ok(());
        }
    }
}

/// Reads every process's status every `every` and hands the changes to the agent. Only the
/// directories whose `state.json` or `exit.json` changed (by size and time) are read: with
/// hundreds of idle processes a pass is a few `stat`s each.
pub(crate) async fn poll_states(dir: PathBuf, tx: UnboundedSender<Internal>, every: Duration) {
    // Each write is a new file renamed in (`write_durable`): its inode tells it apart even
    // within one tick of the file system's clock.
    type Stamp = Option<(u64, u64, std::time::SystemTime)>;
    let mut seen: HashMap<PathBuf, (Stamp, Stamp)> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let d = dir.clone();
        let mut known = std::mem::take(&mut seen);
        let Ok((changed, known)) = tokio::task::spawn_blocking(move || {
            let stamp = |p: PathBuf| -> Stamp {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(p).ok()?;
                Some((m.ino(), m.len(), m.modified().ok()?))
            };
            let mut changed = Vec::new();
            let mut next = HashMap::new();
            for p in proc_dirs(&d) {
                let now = (stamp(p.join("state.json")), stamp(p.join("exit.json")));
                if known.remove(&p).as_ref() != Some(&now) {
                    changed.extend(scan_one(&p));
                }
                next.insert(p, now);
            }
            (changed, next)
        })
        .await
        else {
            continue;
        };
        seen = known;
        if !changed.is_empty() && tx.send(Internal::ProcStates(changed)).is_err() {
            return;
        }
    }
}
