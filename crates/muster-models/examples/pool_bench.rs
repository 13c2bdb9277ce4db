//! Throughput of the worker pool alone: the iris LogisticRegression, one row per call, at
//! concurrency 1 and 32, two workers. Run: `cargo run --release -p muster-models --example
//! pool_bench [SECONDS]` (builds the test environment in the cache on first use).

#[path = "../tests/support/mod.rs"]
mod support;

use muster_models::{Pool, PoolConfig};
use std::time::{Duration, Instant};

async fn run(pool: &Pool, concurrency: usize, secs: f64) -> (f64, Duration, Duration) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let p = pool.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    let out = p.call("[[5.1, 3.5, 1.4, 0.2]]").await.unwrap();
                    assert_eq!(out, "[0]");
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    (all.len() as f64 / wall, pct(0.50), pct(0.99))
}

#[tokio::main]
async fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let env = support::sklearn_env();
    let dir = support::Scratch::new("bench");
    let bundle = support::iris_bundle(dir.path(), &env);
    let mut config = PoolConfig::new(&bundle, &env).unwrap();
    config.workers = 2;
    let pool = Pool::start(config).await.unwrap();
    run(&pool, 4, 1.0).await; // warm-up
    for c in [1, 32] {
        let (rps, p50, p99) = run(&pool, c, secs).await;
        println!("pool, 2 workers, c={c:>2}: {rps:>7.0} calls/s  p50 {p50:>9.2?}  p99 {p99:>9.2?}");
    }
    pool.stop().await;
}
