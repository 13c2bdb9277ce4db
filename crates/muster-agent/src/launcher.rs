//! The supervisor launcher: `muster supervise --launcher AGENT_DIR`, one small single-threaded
//! process per agent that forks a supervisor for each attempt.
//!
//! Starting the muster binary anew for every attempt (loading and relocating it, starting its
//! runtime) cost about as much CPU as the job `true` itself. The launcher is started once; for each
//! attempt it forks (a small, single-threaded process: the fork is cheap) and the child runs
//! [`super::supervisor`] directly, in a session of its own, exactly as `muster supervise DIR`
//! would. Supervisors outlive the launcher as they outlive the agent.
//!
//! Protocol on the launcher's standard input and output, each message ending in a NUL byte:
//! - agent → launcher: `DIR`, an attempt directory with its `spec.json` written, followed by
//!   the job's secret environment as `\x1eKEY=VALUE` fields (see [`super::supervisor::Secrets`]:
//!   the job's token travels over this pipe, never through a file);
//! - launcher → agent: `E DIR`, that attempt's supervisor process ended (its `exit.json` says how,
//!   or it was lost); `R DIR`, the launcher could not fork for it: start `muster supervise DIR`.
//!
//! Nothing depends on the launcher for safety: if it dies, or leaves an attempt unstarted for
//! 10 s (stopped, say), the agent starts `muster supervise DIR` for every attempt it had handed
//! over and not heard the end of. A supervisor the launcher did
//! fork holds the attempt's lock, so the second one waits for it and then finds the attempt
//! started and does nothing (at most once, as ever); its end is the first one's end.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// The body of `muster supervise --launcher`; returns the process exit code.
pub fn main() -> i32 {
    match run() {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("muster supervise --launcher: {e}");
            1
        }
    }
}

fn run() -> std::io::Result<()> {
    // SIGCHLD is taken from a signalfd, so one poll() waits for requests and ends.
    // SAFETY: plain signal-set manipulation on values we own.
    let (old, sfd) = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
        (
            old,
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK),
        )
    };
    if sfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Shown by ps and top (each forked supervisor takes back `muster`).
    // SAFETY: PR_SET_NAME with a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"muster-launcher".as_ptr()) };
    let mut stdout = std::io::stdout().lock();
    let mut input = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut children: HashMap<i32, Vec<u8>> = HashMap::new();
    loop {
        let mut fds = [
            libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polling two descriptors we own.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut out = Vec::new();
        if fds[1].revents != 0 {
            let mut info = [0u8; 128];
            // SAFETY: reading whole signalfd_siginfo records into a buffer of that size.
            while unsafe { libc::read(sfd, info.as_mut_ptr().cast(), info.len()) } > 0 {}
            loop {
                let mut status = 0;
                // SAFETY: reaping any ended child without blocking.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if let Some(dir) = children.remove(&pid) {
                    out.extend_from_slice(b"E ");
                    out.extend_from_slice(&dir);
                    out.push(0);
                }
            }
        }
        if fds[0].revents != 0 {
            // SAFETY: reading into a buffer we own, at most its length.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                // The agent is gone: the supervisors carry on without us.
                return Ok(());
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            } else {
                input.extend_from_slice(&buf[..n as usize]);
            }
            while let Some(end) = input.iter().position(|&b| b == 0) {
                let msg: Vec<u8> = input.drain(..=end).take(end).collect();
                let mut fields = msg.split(|&b| b == SEPARATOR);
                let dir = fields.next().unwrap_or_default().to_vec();
                let secrets: Vec<(String, String)> = fields
                    .filter_map(|f| {
                        let (k, v) = std::str::from_utf8(f).ok()?.split_once('=')?;
                        Some((k.to_string(), v.to_string()))
                    })
                    .collect();
                match fork_supervisor(&dir, secrets, &old, sfd) {
                    Ok(pid) => {
                        children.insert(pid, dir);
                    }
                    Err(e) => {
                        tracing::error!(
                            "muster supervise --launcher: cannot fork for {}: {e}",
                            String::from_utf8_lossy(&dir)
                        );
                        out.extend_from_slice(b"R ");
                        out.extend_from_slice(&dir);
                        out.push(0);
                    }
                }
            }
        }
        if !out.is_empty() {
            // The agent reads all the time; if it is gone, so are we.
            stdout.write_all(&out)?;
            stdout.flush()?;
        }
    }
}

/// Separates the fields of a request (the directory, then each secret); a directory holding it
/// is never handed to the launcher.
pub const SEPARATOR: u8 = 0x1e;

/// Forks a supervisor for `dir`: the child runs it and exits with its code.
fn fork_supervisor(
    dir: &[u8],
    secrets: Vec<(String, String)>,
    old: &libc::sigset_t,
    sfd: i32,
) -> std::io::Result<i32> {
    let path = PathBuf::from(OsStr::from_bytes(dir));
    // SAFETY: this process has one thread, so the child may go on running Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid > 0 {
        return Ok(pid);
    }
    // The child: the launcher's signal mask, signalfd and pipes are not the supervisor's.
    // SAFETY: restoring the mask the launcher started with, closing and reopening our own
    // descriptors.
    unsafe {
        libc::sigprocmask(libc::SIG_SETMASK, old, std::ptr::null_mut());
        libc::close(sfd);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            if null > 2 {
                libc::close(null);
            }
        }
    }
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"muster".as_ptr()) };
    show_as_supervisor(dir);
    let code = super::supervisor::main(path, secrets);
    // SAFETY: leaving at once, without the launcher's buffered output or exit handlers.
    unsafe { libc::_exit(code) }
}

/// Rewrites this process's command line (what ps shows, read from its own memory) to
/// `muster supervise DIR`, as a supervisor started directly shows, so tools that look for the
/// supervisors of a data dir find forked ones too. The agent starts the launcher with a last
/// argument of spaces to make room; without room, the line is left as it is.
fn show_as_supervisor(dir: &[u8]) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // The fields after the command name, which is in parentheses: field 3 first; arg_start and
    // arg_end are fields 48 and 49.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (Some(Ok(start)), Some(Ok(end))) = (
        fields.get(48 - 3).map(|f| f.parse::<usize>()),
        fields.get(49 - 3).map(|f| f.parse::<usize>()),
    ) else {
        return;
    };
    if start == 0 || end <= start {
        return;
    }
    // SAFETY: [start, end) is this process's own argument area (on its stack, writable, and after
    // the fork this child's alone); nothing reads the arguments after this.
    let area = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    let argv0 = area.iter().position(|&b| b == 0).unwrap_or(area.len());
    let mut line = area[..argv0].to_vec();
    line.push(0);
    line.extend_from_slice(b"supervise\0");
    line.extend_from_slice(dir);
    line.push(0);
    if line.len() > area.len() {
        return;
    }
    area[..line.len()].copy_from_slice(&line);
    area[line.len()..].fill(0);
}
