//! Perf logs (SPEC §11): with `[perf] enabled = true`, every server run gets its own directory
//! `perf/logs/<n>/` (higher n = newer; made with an atomic `mkdir`, so two servers never share
//! one) holding `<pid>.log`, one line per timed call: `time route status micros`. A writer
//! thread does the file I/O, so a request only sends a line down a channel.

use muster_wire::util::now;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::time::Duration;

/// The perf log of this server run.
pub struct PerfLog {
    tx: Mutex<Sender<String>>,
    /// The run's directory.
    pub dir: PathBuf,
}

impl PerfLog {
    /// Makes the next run directory under `<data_dir>/perf/logs` and starts the writer.
    pub fn start(data_dir: &Path) -> std::io::Result<PerfLog> {
        let logs = data_dir.join("perf").join("logs");
        muster_wire::perms::create_dir_all(&logs)?;
        let mut n = runs(&logs).last().copied().unwrap_or(0) + 1;
        let dir = loop {
            let d = logs.join(n.to_string());
            match muster_wire::perms::create_dir(&d) {
                Ok(()) => break d,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(e),
            }
        };
        let file = muster_wire::perms::create(&dir.join(format!("{}.log", std::process::id())))?;
        let (tx, rx) = channel::<String>();
        std::thread::Builder::new()
            .name("perf-log".into())
            .spawn(move || {
                // Wakes every 50 ms and writes what came, rather than once per request: a
                // request then costs a channel send, never a context switch.
                let mut w = std::io::BufWriter::with_capacity(1 << 16, file);
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    loop {
                        match rx.try_recv() {
                            Ok(line) => {
                                let _ = w.write_all(line.as_bytes());
                            }
                            Err(std::sync::mpsc::TryRecvError::Empty) => break,
                            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                                let _ = w.flush();
                                return;
                            }
                        }
                    }
                    let _ = w.flush();
                }
            })?;
        Ok(PerfLog {
            tx: Mutex::new(tx),
            dir,
        })
    }

    /// One timed call.
    pub fn record(&self, route: &str, status: u16, took: Duration) {
        let line = format!("{} {route} {status} {}\n", now(), took.as_micros());
        let _ = self.tx.lock().unwrap_or_else(|e| e.into_inner()).send(line);
    }
}

/// The run numbers under `logs`, ascending.
fn runs(logs: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(logs)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// `muster perf summary [--run N]`: count, p50, p95, p99 and max (ms) per route of a run (the
/// newest by default), over every process's log in it.
pub fn summary(data_dir: &Path, run: Option<u64>) -> Result<String, String> {
    let logs = data_dir.join("perf").join("logs");
    let all = runs(&logs);
    let n = match run {
        Some(n) if all.contains(&n) => n,
        Some(n) => {
            return Err(format!(
                "no perf run {n} in {} (runs: {all:?})",
                logs.display()
            ))
        }
        None => *all.last().ok_or_else(|| {
            format!(
                "no perf runs in {}: set [perf] enabled = true",
                logs.display()
            )
        })?,
    };
    let dir = logs.join(n.to_string());
    let mut by_route: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let rd = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in rd.flatten() {
        let text = std::fs::read_to_string(e.path())
            .map_err(|err| format!("{}: {err}", e.path().display()))?;
        for line in text.lines() {
            // time ROUTE... status micros — the route may hold spaces ("GET /x").
            let mut parts: Vec<&str> = line.split(' ').collect();
            if parts.len() < 4 {
                continue;
            }
            let Ok(us) = parts.pop().unwrap_or("").parse::<u64>() else {
                continue;
            };
            let _status = parts.pop();
            let route = parts[1..].join(" ");
            by_route.entry(route).or_default().push(us);
        }
    }
    let mut out = format!(
        "perf run {n} ({})\n{:<48} {:>8} {:>9} {:>9} {:>9} {:>9}\n",
        dir.display(),
        "ROUTE",
        "COUNT",
        "P50 ms",
        "P95 ms",
        "P99 ms",
        "MAX ms"
    );
    for (route, mut v) in by_route {
        v.sort_unstable();
        let pct = |p: f64| {
            v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1] as f64 / 1000.0
        };
        out.push_str(&format!(
            "{:<48} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>9.3}\n",
            route,
            v.len(),
            pct(0.50),
            pct(0.95),
            pct(0.99),
            *v.last().unwrap_or(&0) as f64 / 1000.0
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_a_known_log() {
        let d = std::env::temp_dir().join(format!("muster-perf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let run = d.join("perf/logs/3");
        std::fs::create_dir_all(&run).unwrap();
        let mut text = String::new();
        for i in 1..=100u64 {
            text.push_str(&format!(
                "2026-11-23T16:00:00.000Z GET /api/v1/jobs/{{id}} 200 {}\n",
                i * 1000
            ));
        }
        text.push_str("2026-11-23T16:00:00.000Z POST /api/v1/jobs 201 500\n");
        std::fs::write(run.join("42.log"), text).unwrap();
        std::fs::create_dir_all(d.join("perf/logs/1")).unwrap();
        let s = summary(&d, None).unwrap();
        assert!(s.starts_with("perf run 3"), "{s}");
        let line = s
            .lines()
            .find(|l| l.starts_with("GET /api/v1/jobs/{id}"))
            .unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            &cols[2..],
            ["100", "50.000", "95.000", "99.000", "100.000"],
            "{line}"
        );
        assert!(s.contains("POST /api/v1/jobs"));
        assert!(summary(&d, Some(2)).is_err());
        assert!(summary(&d, Some(1)).unwrap().lines().count() == 2);
        // Two servers starting at once get two run directories.
        let a = PerfLog::start(&d).unwrap();
        let b = PerfLog::start(&d).unwrap();
        assert_ne!(a.dir, b.dir);
        assert!(a.dir.ends_with("4") && b.dir.ends_with("5"));
        std::fs::remove_dir_all(&d).ok();
    }
}
