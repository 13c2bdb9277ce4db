//! What an environment costs: the iris bundle's (scikit-learn) built in a fresh directory from
//! the test wheel cache with pip's index unreachable (so: no network), then found again. Run:
//! `cargo run --release -p muster-models --example env_bench` (fills the cache on first use).

#[path = "../tests/support/mod.rs"]
mod support;

use muster_models::{EnvSpec, Envs};
use std::time::Instant;

fn main() {
    support::sklearn_env(); // the wheels are in the cache
    let python = support::python();
    let spec = EnvSpec {
        requirements: vec![support::SKLEARN.into()],
        no_deps: vec![],
    };
    let root = support::Scratch::new("env-bench");
    let mut envs = Envs::new(root.path().join("envs"), support::cache().join("wheels"));
    envs.pip_env = vec![("PIP_INDEX_URL".into(), "http://127.0.0.1:9/simple".into())];
    let mut log = Vec::new();
    let t = Instant::now();
    let env = envs.ensure(&spec, &python, &mut log).unwrap();
    let built = t.elapsed();
    let t = Instant::now();
    assert!(envs.ensure(&spec, &python, &mut log).unwrap().reused);
    let found = t.elapsed();
    println!(
        "scikit-learn env from the wheel cache, offline: built {built:.2?}, found again {found:.2?} ({})",
        env.dir.display()
    );
}
