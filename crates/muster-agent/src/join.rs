//! Joining a cluster (SPEC §5): an agent trades a join token for its node credential once, over
//! TLS under the cluster CA whose fingerprint the token carries, and keeps what it got in its data
//! dir: `credential` (mode 0600), `node-id`, `ca-fingerprint`, `servers` (the server that
//! answered) and `cluster-key` (for its beacons, mode 0600).

use muster_wire::beacon::{parse_key, write_secret};
use muster_wire::util::hex;
use std::path::Path;

/// What a server gave for a join token.
#[derive(Clone, Debug)]
pub struct Joined {
    pub node_id: String,
    pub credential: String,
    /// The cluster key (hex), for the agent's signed beacons.
    pub cluster_key: Option<String>,
    /// The server that answered.
    pub server: String,
}

/// Trades a join token for the node's credential at the first server that answers.
pub async fn join(
    servers: &[String],
    token: &str,
    fingerprint: [u8; 32],
    name: &str,
) -> Result<Joined, String> {
    let mut last = "no server to join: give --server".to_string();
    for s in servers {
        let body = serde_json::json!({"join_token": token, "name": name}).to_string();
        match muster_wire::pki::request(s, fingerprint, "POST", "/api/v1/nodes/join", body).await {
            Ok((status, body)) => {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if status == 201 {
                    let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                    return Ok(Joined {
                        node_id: field("node_id"),
                        credential: field("credential"),
                        cluster_key: v["cluster_key"].as_str().map(str::to_string),
                        server: s.clone(),
                    });
                }
                return Err(format!(
                    "{s} refused the join: {} (HTTP {status})",
                    v["error"]["message"].as_str().unwrap_or("?")
                ));
            }
            Err(e) => last = format!("cannot reach {s}: {e}"),
        }
    }
    Err(last)
}

/// Keeps what a join gave in the agent's data dir `dir`.
pub fn save(dir: &Path, joined: &Joined, fingerprint: [u8; 32]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join("credential"))?;
    writeln!(f, "{}", joined.credential)?;
    use muster_wire::perms;
    perms::write(&dir.join("node-id"), &joined.node_id)?;
    perms::write(
        &dir.join("ca-fingerprint"),
        format!("{}\n", hex(&fingerprint)),
    )?;
    perms::write(&dir.join("servers"), format!("{}\n", joined.server))?;
    if let Some(k) = &joined.cluster_key {
        let path = dir.join("cluster-key");
        let _ = std::fs::remove_file(&path);
        write_secret(&path, k)?;
    }
    Ok(())
}

/// The node credential kept by an earlier join, if any.
pub fn credential(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("credential"))
        .ok()
        .map(|c| c.trim().to_string())
}

/// The servers an earlier join saved (the one found by its beacon, say).
pub fn saved_servers(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("servers"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The fingerprint of the cluster CA this agent joined under.
pub fn ca_fingerprint(dir: &Path) -> Result<[u8; 32], String> {
    std::fs::read_to_string(dir.join("ca-fingerprint"))
        .ok()
        .and_then(|s| parse_key(s.trim()))
        .ok_or_else(|| {
            format!(
                "{} is missing or damaged: this agent joined before TLS; remove {} and join again with a new join token",
                dir.join("ca-fingerprint").display(),
                dir.join("credential").display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_join_gave_is_kept_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!(
            "muster-join-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(credential(&dir), None);
        assert!(ca_fingerprint(&dir).unwrap_err().contains("join again"));
        let joined = Joined {
            node_id: "n-1".into(),
            credential: "mnc_x".into(),
            cluster_key: Some(hex(&[9; 32])),
            server: "http://127.0.0.1:7070".into(),
        };
        save(&dir, &joined, [3; 32]).unwrap();
        assert_eq!(credential(&dir).as_deref(), Some("mnc_x"));
        assert_eq!(ca_fingerprint(&dir).unwrap(), [3; 32]);
        assert_eq!(saved_servers(&dir), ["http://127.0.0.1:7070"]);
        for f in ["credential", "cluster-key"] {
            let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        // A second save never overwrites a credential.
        assert!(save(&dir, &joined, [3; 32]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn rand_suffix() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }
}
