//! A full disk never turns into a wrong outcome: on a small tmpfs holding the whole data dir
//! (store, blobs, attempt directories), a job that exits 0 while the disk is full is recorded
//! `succeeded` once space is freed (its supervisor keeps the status and retries the write; the
//! agent waits for it), and the API and `/readyz` say the disk is full instead of answering 500.

use crate::harness::*;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A tmpfs of the test's own, mounted on a fresh directory; unmounted on drop (after the
/// processes of any data dir in it are ended), even when the test fails.
struct Tmpfs {
    path: PathBuf,
    _parent: TempDir,
}

impl Tmpfs {
    /// `None` (with the reason printed) where mounting is refused — except under CI, which
    /// runs as root and must run this test.
    fn mount(size: &str) -> Option<Tmpfs> {
        let parent = TempDir::new("tmpfs");
        let path = parent.0.join("disk");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs {
                path,
                _parent: parent,
            }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                };
                assert_ne!(
                    std::env::var("CI").as_deref(),
                    Ok("true"),
                    "CI must be able to mount a tmpfs (it runs as root): {why}"
                );
                eprintln!("SKIPPED: cannot mount a tmpfs here: {why}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Jobs outlive agents: nothing may keep the mount busy.
        kill_supervisors(&self.path);
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still has a file open there: detach it now, freed once closed.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Writes `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 512, 1] {
        let buf = vec![0u8; chunk];
        loop {
            match f.write(&buf) {
                Ok(n) if n > 0 => written += n as u64,
                _ => break,
            }
        }
    }
    let _ = f.sync_all();
    written
}

#[test]
fn a_job_ending_on_a_full_disk_is_recorded_once_there_is_room() {
    let Some(disk) = Tmpfs::mount("24m") else {
        return;
    };
    let data = disk.path.join("data");
    // The store on the full disk too: SQLite, whatever engine the other tests run on.
    let s = Server::start_with(|c| {
        c.data_dir = data.clone();
        c.store.url = format!("sqlite://{}", data.join("muster.db").display());
    });
    // The job's gate and pid live off the full disk.
    let outside = TempDir::new("disk-gate");
    let (gate, pidfile) = (outside.0.join("gate"), outside.0.join("pid"));
    let (g, p) = (gate.display(), pidfile.display());
    let (id, _) = s.create(json!({"name": "patient", "shell": format!(
        "echo $$ > {p}; while [ ! -e {g} ]; do sleep 0.02; done; echo done; exit 0"
    )}));
    assert!(wait_until(Duration::from_secs(20), || pidfile.exists()));
    let job_pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let attempt = data
        .join("agent/jobs")
        .join(&id[id.len() - 2..])
        .join(format!("{id}.1"));
    let started: serde_json::Value =
        serde_json::from_slice(&std::fs::read(attempt.join("started.json")).unwrap()).unwrap();
    let supervisor = started["sid"].as_i64().unwrap() as i32;

    let filler = disk.path.join("filler");
    assert!(fill(&filler) > 0);
    // A write of the API: a clear 507, not a 500.
    let (st, body) = s.call(
        "POST",
        "/api/v1/jobs",
        Some(json!({"name": "no-room", "children": (0..50).map(|i| json!({"name": format!("n{i}"), "noop": true})).collect::<Vec<_>>()})),
    );
    assert_eq!(st, 507, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_storage", "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("no space left") && !msg.contains(&*disk.path.to_string_lossy()),
        "{msg}"
    );
    let (st, body) = s.call("GET", "/readyz", None);
    assert_eq!(st, 503, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_storage", "{body}");

    // The job ends with 0 while its exit.json cannot be written.
    std::fs::write(&gate, b"").unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || !Path::new(&format!(
            "/proc/{job_pid}"
        ))
        .exists()),
        "the job did not end"
    );
    assert!(!attempt.join("exit.json").exists());
    // Its supervisor waits for room, holding the outcome; the job is not given up meanwhile.
    let lost = wait_until(Duration::from_secs(2), || {
        s.job(&id)["state"] != "running" || !Path::new(&format!("/proc/{supervisor}")).exists()
    });
    assert!(
        !lost,
        "the attempt was given up on a full disk: {:#}",
        s.job(&id)
    );

    std::fs::remove_file(&filler).unwrap();
    let t = s.wait_tree(&id, Duration::from_secs(30));
    assert_eq!(t["state"], "succeeded", "{t:#}");
    assert_eq!(t["exit_code"], 0, "{t:#}");
    assert!(s.log(&id).contains("out done"), "{}", s.log(&id));
    assert!(
        wait_until(Duration::from_secs(10), || s.call("GET", "/readyz", None).0
            == 200),
        "still not ready with room again: {:?}",
        s.call("GET", "/readyz", None)
    );
    let (st, body) = s.call(
        "POST",
        "/api/v1/jobs",
        Some(json!({"name": "room", "noop": true})),
    );
    assert_eq!(st, 201, "{body}");
    drop(s);
}
