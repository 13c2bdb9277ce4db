//! The worker pool: persistent Python processes that load a model once and answer its calls.
//!
//! [`Pool::start`] writes the embedded worker module ([`WORKER_PY`], `worker.py`) into the
//! environment and starts [`PoolConfig::workers`] processes of it, each with one end of a unix
//! socket pair as its fd 3 (no path on disk, and the worker sees the end of the pool as the end of
//! its socket); it returns once every worker has loaded the model, or with the Python exception
//! that stopped the first one that could not. Each worker is served by one task. A call goes into
//! one bounded queue ([`PoolConfig::queue`]; full → [`Error::Overloaded`] at once, never an
//! unbounded backlog) and the first idle worker's task takes it. When a worker dies — idle or
//! mid-call — its task starts a replacement (with backoff if it keeps dying at start); a call
//! whose worker died goes back, ahead of the queue, to be tried once more on another worker
//! (predict is idempotent), and fails with [`Error::WorkerDied`] if that one dies too. A worker
//! that has not answered within [`PoolConfig::timeout`] is killed and replaced, and its call ends
//! in [`Error::Timeout`]. A Python exception is [`Error::Model`] with its type and message; its
//! traceback, and everything the workers print, go to [`PoolConfig::log`].

use crate::env::PythonEnv;
use crate::{Bundle, Error, Result, Runtime};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};

/// The worker module, embedded in the binary and written into each environment.
pub const WORKER_PY: &str = include_str!("worker.py");
/// Its file name inside the environment.
pub const WORKER_FILE: &str = "muster_worker.py";
/// The largest answer a worker may send.
pub const MAX_FRAME: usize = 256 << 20;

/// Where the workers' output and the models' tracebacks go: one line per `write`.
pub type Log = Arc<Mutex<dyn Write + Send>>;

/// A log that drops everything.
pub fn no_log() -> Log {
    Arc::new(Mutex::new(std::io::sink()))
}

/// How to run a pool.
#[derive(Clone)]
pub struct PoolConfig {
    /// The environment's interpreter (`<env>/bin/python`).
    pub python: PathBuf,
    /// Where the worker module is written (the environment's directory).
    pub env_dir: PathBuf,
    /// The bundle's directory: the workers' working directory and first `sys.path` entry.
    pub bundle_dir: PathBuf,
    /// The entrypoint file, relative to the bundle, and the class in it.
    pub entry_file: String,
    pub class: String,
    /// How many worker processes.
    pub workers: usize,
    /// How many calls may wait for a worker.
    pub queue: usize,
    /// How long a worker may take over one call before it is killed.
    pub timeout: Duration,
    /// How long a worker may take to load the model.
    pub start_timeout: Duration,
    pub log: Log,
    /// Which worker: Python's (`python` is the venv's interpreter) or R's (`python` is
    /// `Rscript`, `class` empty).
    pub runtime: Runtime,
}

impl PoolConfig {
    /// A pool for a Python bundle in its environment: `workers` from the bundle, a queue of 64
    /// calls per worker, 30 s per call, 120 s to load.
    pub fn new(bundle: &Bundle, env: &PythonEnv) -> Result<PoolConfig> {
        if bundle.runtime == Runtime::R {
            let e = bundle
                .entrypoint
                .as_ref()
                .ok_or_else(|| Error::Bundle("an R bundle needs an entrypoint".into()))?;
            return Ok(PoolConfig {
                python: crate::r::rscript()?,
                env_dir: env.dir.clone(),
                bundle_dir: bundle.dir.clone(),
                entry_file: e.file.clone(),
                class: String::new(),
                workers: bundle.workers as usize,
                queue: 64 * bundle.workers as usize,
                timeout: Duration::from_secs(30),
                start_timeout: Duration::from_secs(120),
                log: no_log(),
                runtime: Runtime::R,
            });
        }
        let e = bundle
            .entrypoint
            .as_ref()
            .filter(|e| e.class.is_some())
            .ok_or_else(|| Error::Bundle("only a python bundle runs in a worker pool".into()))?;
        Ok(PoolConfig {
            python: env.python(),
            env_dir: env.dir.clone(),
            bundle_dir: bundle.dir.clone(),
            entry_file: e.file.clone(),
            class: e.class.clone().unwrap_or_default(),
            workers: bundle.workers as usize,
            queue: 64 * bundle.workers as usize,
            timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(120),
            log: no_log(),
            runtime: Runtime::Python,
        })
    }
}

/// Counters of a pool's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Calls answered (with a result or a model error).
    pub answered: u64,
    /// Workers started after the first ones (replacements).
    pub restarts: u64,
    /// Calls sent to a second worker after theirs died.
    pub failovers: u64,
    /// Calls waiting in the queue now.
    pub queued: u64,
}

struct Call {
    data: Vec<u8>,
    reply: oneshot::Sender<Result<String>>,
    retried: bool,
}

struct Queues {
    retry: mpsc::UnboundedReceiver<Call>,
    main: mpsc::Receiver<Call>,
}

#[derive(Default)]
struct Counters {
    answered: AtomicU64,
    restarts: AtomicU64,
    failovers: AtomicU64,
}

/// A running pool; cheap to clone. The workers end when the last clone is dropped or on
/// [`Pool::stop`].
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Call>,
    counters: Arc<Counters>,
    pids: Arc<Mutex<Vec<Option<u32>>>>,
    capacity: usize,
    stop: watch::Sender<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Pool {
    /// Starts the workers and waits until each has loaded the model.
    pub async fn start(config: PoolConfig) -> Result<Pool> {
        if config.workers == 0 {
            return Err(Error::Start("a pool needs at least one worker".into()));
        }
        match config.runtime {
            Runtime::R => crate::r::install_worker(&config.env_dir)?,
            _ => install_worker(&config.env_dir)?,
        }
        let config = Arc::new(config);
        let mut starting = tokio::task::JoinSet::new();
        for i in 0..config.workers {
            let c = config.clone();
            starting.spawn(async move { (i, Worker::spawn(&c, i).await) });
        }
        let mut workers: Vec<Option<Worker>> = (0..config.workers).map(|_| None).collect();
        let mut failed = None;
        while let Some(r) = starting.join_next().await {
            match r {
                Ok((i, Ok(w))) => workers[i] = Some(w),
                Ok((_, Err(e))) => failed = failed.or(Some(e)),
                Err(e) => failed = failed.or(Some(Error::Start(e.to_string()))),
            }
        }
        if let Some(e) = failed {
            for w in workers.into_iter().flatten() {
                w.kill().await;
            }
            return Err(e);
        }
        let (tx, main) = mpsc::channel(config.queue.max(1));
        let (retry_tx, retry) = mpsc::unbounded_channel();
        let queues = Arc::new(tokio::sync::Mutex::new(Queues { retry, main }));
        let (stop, stop_rx) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let pids = Arc::new(Mutex::new(
            workers.iter().map(|w| w.as_ref().map(|w| w.pid)).collect(),
        ));
        for (i, w) in workers.into_iter().enumerate() {
            let serve = Serve {
                index: i,
                config: config.clone(),
                queues: queues.clone(),
                retry: retry_tx.clone(),
                counters: counters.clone(),
                pids: pids.clone(),
                stop: stop_rx.clone(),
            };
            tokio::spawn(serve.run(w));
        }
        Ok(Pool {
            inner: Arc::new(Inner {
                tx,
                counters,
                pids,
                capacity: config.queue.max(1),
                stop,
            }),
        })
    }

    /// Calls the model's `execute` with `data` (JSON text); answers the result as JSON text.
    pub async fn call(&self, data: &str) -> Result<String> {
        let (reply, rx) = oneshot::channel();
        let call = Call {
            data: data.as_bytes().to_vec(),
            reply,
            retried: false,
        };
        match self.inner.tx.try_send(call) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(Error::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Error::Closed),
        }
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// The process ids of the live workers.
    pub fn pids(&self) -> Vec<u32> {
        self.inner
            .pids
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .copied()
            .collect()
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        PoolStats {
            answered: c.answered.load(Ordering::Relaxed),
            restarts: c.restarts.load(Ordering::Relaxed),
            failovers: c.failovers.load(Ordering::Relaxed),
            queued: (self.inner.capacity - self.inner.tx.capacity()) as u64,
        }
    }

    /// Ends every worker (calls still queued fail with [`Error::Closed`]) and waits until the
    /// processes are gone.
    pub async fn stop(&self) {
        let _ = self.inner.stop.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.pids().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Writes the worker module into the environment, unless it is there with the same text.
fn install_worker(env_dir: &Path) -> Result<()> {
    let path = env_dir.join(WORKER_FILE);
    if std::fs::read_to_string(&path).is_ok_and(|t| t == WORKER_PY) {
        return Ok(());
    }
    let tmp = env_dir.join(format!(".{WORKER_FILE}.{}", std::process::id()));
    std::fs::write(&tmp, WORKER_PY).map_err(Error::io("writing the worker module"))?;
    std::fs::rename(&tmp, &path).map_err(Error::io("writing the worker module"))
}

/// One worker process and its end of the socket.
struct Worker {
    child: tokio::process::Child,
    pid: u32,
    read: BufReader<Box<dyn tokio::io::AsyncRead + Send + Unpin>>,
    write: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
}

enum Failure {
    Died(String),
    TimedOut,
}

impl Worker {
    async fn spawn(config: &PoolConfig, index: usize) -> Result<Worker> {
        let (mut child, read, write) = match config.runtime {
            Runtime::R => Self::spawn_r(config)?,
            _ => Self::spawn_python(config)?,
        };
        let pid = child.id().unwrap_or(0);
        for out in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let log = config.log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(mut w) = log.lock() {
                        let _ = writeln!(w, "worker {index} (pid {pid}): {line}");
                    }
                }
            });
        }
        let mut w = Worker {
            child,
            pid,
            read: BufReader::with_capacity(1 << 16, read),
            write,
        };

        let hello = tokio::time::timeout(config.start_timeout, w.read_frame()).await;
        let fail = |why: String| Error::Start(why);
        match hello {
            Err(_) => {
                w.kill().await;
                Err(fail(format!(
                    "the model did not load within {:?}",
                    config.start_timeout
                )))
            }
            Ok(Err(why)) => {
                let status = w.child.wait().await.ok();
                Err(fail(format!(
                    "the worker exited before loading the model ({why}{}); see the model's log",
                    status.map(|s| format!(", {s}")).unwrap_or_default()
                )))
            }
            Ok(Ok((b'R', _))) => Ok(w),
            Ok(Ok((b'F', body))) => {
                let _ = w.child.wait().await;
                let (kind, message) = exception(&body);
                Err(fail(format!("{kind}: {message}")))
            }
            Ok(Ok((k, _))) => {
                w.kill().await;
                Err(fail(format!(
                    "the worker said {:?} instead of hello",
                    k as char
                )))
            }
        }
    }

    /// The common parts of a worker's command: its own process group, output piped to the log.
    fn command(config: &PoolConfig) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&config.python);
        cmd.current_dir(&config.bundle_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        cmd
    }

    fn started(config: &PoolConfig, e: std::io::Error) -> Error {
        Error::Start(format!(
            "the worker ({}) cannot be started: {e}",
            config.python.display()
        ))
    }

    /// A Python worker: one end of a socket pair as its fd 3.
    fn spawn_python(config: &PoolConfig) -> Result<Spawned> {
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(Error::io("making a socket pair"))?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Self::command(config);
        cmd.arg("-u")
            .arg(config.env_dir.join(WORKER_FILE))
            .arg("3")
            .arg(&config.bundle_dir)
            .arg(&config.entry_file)
            .arg(&config.class)
            .env("PYTHONNOUSERSITE", "1");
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if fd == 3 {
                    let flags = libc::fcntl(3, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| Self::started(config, e))?;
        drop(theirs);
        ours.set_nonblocking(true)
            .map_err(Error::io("setting up the socket"))?;
        let stream =
            tokio::net::UnixStream::from_std(ours).map_err(Error::io("setting up the socket"))?;
        let (read, write) = stream.into_split();
        Ok((child, Box::new(read), Box::new(write)))
    }

    /// An R worker (`Rscript`): requests on a pipe at its fd 3, answers on one at its fd 4.
    fn spawn_r(config: &PoolConfig) -> Result<Spawned> {
        let (req_r, req_w) = pipe()?;
        let (ans_r, ans_w) = pipe()?;
        let (a, b) = (req_r.as_raw_fd(), ans_w.as_raw_fd());
        let mut cmd = Self::command(config);
        cmd.arg("--vanilla")
            .arg(config.env_dir.join(crate::r::WORKER_R_FILE))
            .arg("3")
            .arg("4")
            .arg(&config.bundle_dir)
            .arg(&config.entry_file);
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Out of the way of 3 and 4 first, then into place (dup2 clears close-on-exec).
                let a2 = libc::fcntl(a, libc::F_DUPFD_CLOEXEC, 10);
                let b2 = libc::fcntl(b, libc::F_DUPFD_CLOEXEC, 10);
                if a2 < 0 || b2 < 0 || libc::dup2(a2, 3) < 0 || libc::dup2(b2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| Self::started(config, e))?;
        drop((req_r, ans_w));
        let write = tokio::net::unix::pipe::Sender::from_owned_fd(req_w)
            .map_err(Error::io("setting up the worker's pipe"))?;
        let read = tokio::net::unix::pipe::Receiver::from_owned_fd(ans_r)
            .map_err(Error::io("setting up the worker's pipe"))?;
        Ok((child, Box::new(read), Box::new(write)))
    }

    /// Reads one frame: its kind byte and the rest.
    async fn read_frame(&mut self) -> std::result::Result<(u8, Vec<u8>), String> {
        let n = self.read.read_u32().await.map_err(|e| e.to_string())? as usize;
        if n == 0 || n > MAX_FRAME {
            return Err(format!("a frame of {n} bytes"));
        }
        let mut body = vec![0u8; n];
        self.read
            .read_exact(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        let kind = body.remove(0);
        Ok((kind, body))
    }

    async fn exchange(&mut self, data: &[u8]) -> std::result::Result<(u8, Vec<u8>), String> {
        let mut frame = Vec::with_capacity(4 + data.len());
        frame.extend_from_slice(&(data.len() as u32).to_be_bytes());
        frame.extend_from_slice(data);
        self.write
            .write_all(&frame)
            .await
            .map_err(|e| e.to_string())?;
        self.read_frame().await
    }

    /// One call: the result as JSON text, a model error, or why the worker failed.
    async fn call(
        &mut self,
        data: &[u8],
        timeout: Duration,
    ) -> std::result::Result<Result<String>, Failure> {
        match tokio::time::timeout(timeout, self.exchange(data)).await {
            Err(_) => Err(Failure::TimedOut),
            Ok(Err(why)) => Err(Failure::Died(why)),
            Ok(Ok((b'O', body))) => match String::from_utf8(body) {
                Ok(s) => Ok(Ok(s)),
                Err(_) => Ok(Err(Error::Protocol(
                    "the model's answer is not UTF-8".into(),
                ))),
            },
            Ok(Ok((b'E', body))) => {
                let (kind, message) = exception(&body);
                Ok(Err(Error::Model { kind, message }))
            }
            Ok(Ok((k, _))) => Err(Failure::Died(format!("an unknown frame {:?}", k as char))),
        }
    }

    /// Kills the worker's process group and reaps it.
    async fn kill(mut self) {
        if self.pid > 0 {
            // SAFETY: a signal to the worker's own process group.
            unsafe {
                libc::kill(-(self.pid as i32), libc::SIGKILL);
            }
        }
        let _ = self.child.kill().await;
    }
}

/// A started worker process and the pool's ends of its channel.
type Spawned = (
    tokio::process::Child,
    Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
);

/// A pipe, both ends close-on-exec: (read, write).
fn pipe() -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(Error::io("making a pipe")(std::io::Error::last_os_error()));
    }
    // SAFETY: both were just made and are owned by nothing else.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// A Python exception's type and message from an `E`/`F` frame.
fn exception(body: &[u8]) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let kind = s("type");
    (
        if kind.is_empty() {
            "Exception".into()
        } else {
            kind
        },
        s("message"),
    )
}

/// The task that serves one worker slot for the pool's life.
struct Serve {
    index: usize,
    config: Arc<PoolConfig>,
    queues: Arc<tokio::sync::Mutex<Queues>>,
    retry: mpsc::UnboundedSender<Call>,
    counters: Arc<Counters>,
    pids: Arc<Mutex<Vec<Option<u32>>>>,
    stop: watch::Receiver<bool>,
}

impl Serve {
    fn set_pid(&self, pid: Option<u32>) {
        self.pids.lock().unwrap()[self.index] = pid;
    }

    fn log(&self, line: String) {
        if let Ok(mut w) = self.config.log.lock() {
            let _ = writeln!(w, "worker {}: {line}", self.index);
        }
    }

    async fn run(mut self, mut worker: Option<Worker>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *self.stop.borrow() {
                break;
            }
            let Some(w) = worker.as_mut() else {
                match Worker::spawn(&self.config, self.index).await {
                    Ok(w) => {
                        self.counters.restarts.fetch_add(1, Ordering::Relaxed);
                        self.set_pid(Some(w.pid));
                        self.log(format!("replaced (pid {})", w.pid));
                        worker = Some(w);
                        backoff = Duration::from_millis(100);
                    }
                    Err(e) => {
                        self.log(format!("could not be replaced: {e}; again in {backoff:?}"));
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = self.stop.changed() => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
                continue;
            };
            // Wait for a call, or for the worker to die while idle (also while another idle
            // worker holds the queue), or for the end.
            let queues = self.queues.clone();
            let take = async move {
                let mut q = queues.lock().await;
                let q = &mut *q;
                tokio::select! {
                    biased;
                    c = q.retry.recv() => c,
                    c = q.main.recv() => c,
                }
            };
            let next = tokio::select! {
                biased;
                _ = self.stop.changed() => None,
                status = w.child.wait() => {
                    Some(Err(status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())))
                }
                c = take => c.map(Ok),
            };
            let call = match next {
                None => break,
                Some(Err(status)) => {
                    self.log(format!("died while idle ({status})"));
                    self.set_pid(None);
                    worker = None;
                    continue;
                }
                Some(Ok(call)) => call,
            };
            if call.reply.is_closed() {
                continue;
            }
            match w.call(&call.data, self.config.timeout).await {
                Ok(answer) => {
                    self.counters.answered.fetch_add(1, Ordering::Relaxed);
                    let _ = call.reply.send(answer);
                }
                Err(failure) => {
                    let w = worker.take().expect("a worker");
                    self.set_pid(None);
                    let pid = w.pid;
                    w.kill().await;
                    match failure {
                        Failure::TimedOut => {
                            self.log(format!(
                                "pid {pid} killed: no answer within {:?}",
                                self.config.timeout
                            ));
                            let _ = call.reply.send(Err(Error::Timeout(self.config.timeout)));
                        }
                        Failure::Died(why) => {
                            self.log(format!("pid {pid} died during a call ({why})"));
                            if call.retried {
                                let _ = call.reply.send(Err(Error::WorkerDied(why)));
                            } else {
                                self.counters.failovers.fetch_add(1, Ordering::Relaxed);
                                let _ = self.retry.send(Call {
                                    retried: true,
                                    ..call
                                });
                            }
                        }
                    }
                }
            }
        }
        if let Some(w) = worker {
            w.kill().await;
        }
        self.set_pid(None);
    }
}
