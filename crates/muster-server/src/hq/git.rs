//! The real `git` program, run the way HQ needs it: never through a shell, with a timeout, with
//! `GIT_TERMINAL_PROMPT=0` (a remote that wants a password fails instead of waiting for one),
//! with repository hooks off (nothing in HQ runs on the server by being committed), in the C
//! locale. The user's own git and ssh configuration applies (keys, known hosts, credential
//! helpers), as it would for `git` at a terminal.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Why a git command failed, as a sentence for the operator.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("the `git` program cannot be run ({0}): install git")]
    Missing(String),
    #[error("`git {cmd}` took longer than {secs} s and was stopped")]
    Timeout { cmd: String, secs: u64 },
    #[error("`git {cmd}` failed: {msg}")]
    Failed { cmd: String, msg: String },
}

/// A working copy and how long each git command may take.
#[derive(Clone, Debug)]
pub struct Git {
    dir: PathBuf,
    timeout: Duration,
}

/// What a git command printed.
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    /// Standard output as text, trimmed.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }
}

impl Git {
    pub fn new(dir: &Path, timeout: Duration) -> Git {
        Git {
            dir: dir.to_path_buf(),
            timeout,
        }
    }

    /// The working copy.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("git");
        c.arg("-c")
            .arg("core.hooksPath=/dev/null")
            .arg("-c")
            .arg("core.quotePath=false")
            // Housekeeping after a commit or a fetch runs before git exits, never left behind
            // in the background holding git's pipes (and a pulse) open.
            .arg("-c")
            .arg("gc.autoDetach=false")
            .arg("-c")
            .arg("maintenance.autoDetach=false")
            .args(args)
            .current_dir(&self.dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS", "/bin/false")
            .env("GCM_INTERACTIVE", "never")
            .env("LC_ALL", "C")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .env_remove("GIT_INDEX_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Batch mode for ssh remotes: fail rather than ask.
        if std::env::var_os("GIT_SSH_COMMAND").is_none() {
            c.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
        }
        c
    }

    /// Runs `git ARGS`; a non-zero exit is [`GitError::Failed`] with git's message.
    pub fn run(&self, args: &[&str]) -> Result<Output, GitError> {
        self.run_env(args, &[])
    }

    /// Runs `git ARGS` with extra environment variables.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Output, GitError> {
        let (code, out) = self.status_env(args, env)?;
        if code == 0 {
            Ok(out)
        } else {
            Err(GitError::Failed {
                cmd: args.first().copied().unwrap_or_default().to_string(),
                msg: first_lines(&out.stderr, &out.stdout),
            })
        }
    }

    /// Runs `git ARGS` and answers its exit code with what it printed (for commands whose
    /// non-zero exit is an answer, like `diff --quiet`).
    pub fn status(&self, args: &[&str]) -> Result<(i32, Output), GitError> {
        self.status_env(args, &[])
    }

    /// [`Git::status`] with extra environment variables.
    pub fn status_env(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(i32, Output), GitError> {
        self.status_input(args, env, None)
    }

    /// Runs `git ARGS` with `input` on its standard input (written on a thread of its own, so
    /// a git answering as it reads never blocks on a full pipe); a non-zero exit is
    /// [`GitError::Failed`].
    pub fn run_input(&self, args: &[&str], input: Vec<u8>) -> Result<Output, GitError> {
        let (code, out) = self.status_input(args, &[], Some(input))?;
        if code == 0 {
            Ok(out)
        } else {
            Err(GitError::Failed {
                cmd: args.first().copied().unwrap_or_default().to_string(),
                msg: first_lines(&out.stderr, &out.stdout),
            })
        }
    }

    fn status_input(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        input: Option<Vec<u8>>,
    ) -> Result<(i32, Output), GitError> {
        let mut c = self.command(args);
        for (k, v) in env {
            c.env(k, v);
        }
        if input.is_some() {
            c.stdin(Stdio::piped());
        }
        let mut child = c.spawn().map_err(|e| GitError::Missing(e.to_string()))?;
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(&data);
            });
        }
        let deadline = std::time::Instant::now() + self.timeout;
        // Each pipe is drained on a thread of its own into a buffer: once git has exited, what it
        // wrote is taken after a short grace, even if a process it left behind still holds a
        // pipe open.
        let drain = |mut r: Box<dyn Read + Send>| {
            let buf = std::sync::Arc::new(std::sync::Mutex::new((Vec::new(), false)));
            let b = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    match r.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => b
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                            .extend_from_slice(&chunk[..n]),
                    }
                }
                b.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
            });
            buf
        };
        let out_buf = drain(Box::new(child.stdout.take().expect("piped")));
        let err_buf = drain(Box::new(child.stderr.take().expect("piped")));
        // The waiter owns the child; this thread waits for its answer at most `timeout`.
        let pid = child.id() as libc::pid_t;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(self.timeout) {
            Ok(s) => s.map_err(|e| GitError::Missing(e.to_string()))?,
            Err(_) => {
                // SAFETY: kill(2) on the pid of our own child, not yet reaped (the waiter
                // thread reaps it only after it exits, which is what this asks for).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                return Err(GitError::Timeout {
                    cmd: args.first().copied().unwrap_or_default().to_string(),
                    secs: self.timeout.as_secs(),
                });
            }
        };
        let take = |buf: &std::sync::Arc<std::sync::Mutex<(Vec<u8>, bool)>>| {
            let grace = std::time::Instant::now() + Duration::from_millis(500);
            loop {
                let mut g = buf.lock().unwrap_or_else(|e| e.into_inner());
                if g.1 || std::time::Instant::now() >= grace.min(deadline) {
                    return std::mem::take(&mut g.0);
                }
                drop(g);
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let stdout = take(&out_buf);
        let stderr = String::from_utf8_lossy(&take(&err_buf)).into_owned();
        Ok((status.code().unwrap_or(-1), Output { stdout, stderr }))
    }
}

/// The first lines of git's message (stderr, else stdout), for an error.
fn first_lines(stderr: &str, stdout: &[u8]) -> String {
    let text = if stderr.trim().is_empty() {
        String::from_utf8_lossy(stdout).into_owned()
    } else {
        stderr.to_string()
    };
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("hint:"))
        .take(4)
        .collect();
    let s = lines.join("; ");
    if s.len() > 600 {
        format!("{}…", &s[..s.floor_char_boundary(600)])
    } else {
        s
    }
}
