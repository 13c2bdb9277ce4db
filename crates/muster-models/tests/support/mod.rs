//! What the tests of muster-models and its bench share: the cache of Python environments and
//! wheels kept between runs (`MUSTER_TEST_CACHE`, else `muster-models-cache` in cargo's target
//! tmp dir), the iris bundle trained with real scikit-learn, scratch dirs, waiting on a
//! condition with a deadline.
#![allow(dead_code)]

use muster_models::{Bundle, EnvSpec, Envs, Interpreter, PythonEnv};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The requirements of the iris bundle (`tests/data/iris/bundle.json`).
pub const SKLEARN: &str = "scikit-learn==1.9.1";

pub fn cache() -> PathBuf {
    match std::env::var_os("MUSTER_TEST_CACHE") {
        Some(d) => PathBuf::from(d).join("muster-models"),
        None => match option_env!("CARGO_TARGET_TMPDIR") {
            Some(t) => PathBuf::from(t).join("muster-models-cache"),
            // An example (the bench) has no CARGO_TARGET_TMPDIR: it runs from
            // <target>/<profile>/examples/.
            None => std::env::current_exe()
                .unwrap()
                .ancestors()
                .nth(3)
                .unwrap()
                .join("tmp/muster-models-cache"),
        },
    }
}

/// The environments and wheel cache kept between runs.
pub fn envs() -> Envs {
    let c = cache();
    Envs::new(c.join("envs"), c.join("wheels"))
}

pub fn python() -> Interpreter {
    Interpreter::probe(Path::new("python3")).expect("python3 with venv")
}

/// The scikit-learn environment, built (once, in the cache) on first use.
pub fn sklearn_env() -> PythonEnv {
    static ENV: OnceLock<PythonEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        let spec = EnvSpec {
            requirements: vec![SKLEARN.into()],
            no_deps: vec![],
        };
        envs()
            .ensure(&spec, &python(), &mut std::io::stderr())
            .expect("the scikit-learn environment")
    })
    .clone()
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!(
            "muster-models-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The iris bundle in `dir`, its LogisticRegression trained now with the env's scikit-learn.
pub fn iris_bundle(dir: &Path, env: &PythonEnv) -> Bundle {
    // Through the crates dir, so the binary crate's tests find it too.
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../muster-models/tests/data/iris");
    for f in ["bundle.json", "model.py"] {
        std::fs::copy(data.join(f), dir.join(f)).unwrap();
    }
    let status = std::process::Command::new(env.python())
        .arg(data.join("train.py"))
        .arg(dir.join("model.pkl"))
        .status()
        .unwrap();
    assert!(status.success(), "training the iris model");
    Bundle::load(dir).unwrap()
}

/// Polls `cond` every 10 ms until it holds or `within` passes.
pub async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A log the test can read.
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
