//! Discovery, the server's side (SPEC §5), apart from the HTTP app: the [`Listener`] that judges
//! and counts node beacons, the [`ServerAnnouncer`] that beacons the server's URL signed with its
//! Ed25519 key, and the key files. The datagram format is `muster_wire::beacon`.
//!
//! Beacons are hints only: the listener records when a node was last heard, but the server never
//! calls an address a beacon gave it, and a node's identity is always its credential.

use crate::config::Config;
use crate::metrics::DiscoveryStats;
use muster_wire::beacon::{
    first_seq, load_or_create_key, now_ms, open_node, seal_server, send_every, ServerBeacon,
    SigningKey, Verdict, MAX_DATAGRAM, MAX_SKEW_MS,
};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;

/// The server's side: checks node beacons, counts verdicts, remembers sequence numbers.
pub struct Listener {
    key: [u8; 32],
    stats: Arc<DiscoveryStats>,
    /// node id → (last sequence number, when heard in ms).
    last: HashMap<String, (u64, i64)>,
}

/// Above this many remembered nodes, ones not heard for 2 × [`MAX_SKEW_MS`] are forgotten
/// (their old beacons are stale by then anyway).
const REMEMBER: usize = 4096;

impl Listener {
    pub fn new(cluster_key: [u8; 32], stats: Arc<DiscoveryStats>) -> Listener {
        Listener {
            key: cluster_key,
            stats,
            last: HashMap::new(),
        }
    }

    /// Judges one datagram received at `now` (ms) and counts the verdict.
    pub fn check(&mut self, datagram: &[u8], now: i64) -> Verdict {
        let v = match open_node(datagram, &self.key, now) {
            Err(v) => v,
            Ok(b) => match self.last.get(&b.node_id) {
                Some((seq, _)) if b.seq <= *seq => Verdict::Replayed,
                _ => {
                    if self.last.len() >= REMEMBER {
                        self.last.retain(|_, (_, at)| now - *at < 2 * MAX_SKEW_MS);
                    }
                    self.last.insert(b.node_id.clone(), (b.seq, now));
                    self.stats.heard(&b.node_id, now);
                    Verdict::Ok
                }
            },
        };
        if v != Verdict::OtherKind {
            self.stats.count(v.label());
        }
        v
    }

    /// Hears node beacons on `socket` until `shutdown` resolves.
    pub async fn run(mut self, socket: UdpSocket, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                r = socket.recv_from(&mut buf) => match r {
                    Ok((n, _from)) => {
                        self.check(&buf[..n], now_ms());
                    }
                    // E.g. ICMP errors reported on the socket: keep listening.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
            }
        }
    }
}

/// A server's announcer: sends its URL, signed, every `interval` to `dest`.
pub struct ServerAnnouncer {
    pub key: SigningKey,
    pub url: String,
    pub interval: Duration,
    pub dest: SocketAddr,
}

impl ServerAnnouncer {
    /// Beacons on `socket` (see [`bind_sender`]) until `shutdown` resolves.
    pub async fn run(self, socket: UdpSocket, shutdown: impl Future<Output = ()>) {
        let mut b = ServerBeacon {
            url: self.url,
            version: env!("CARGO_PKG_VERSION").into(),
            ts: 0,
            seq: first_seq(),
        };
        let key = self.key;
        send_every(socket, self.dest, self.interval, shutdown, move || {
            b.seq += 1;
            b.ts = now_ms();
            seal_server(&b, &key)
        })
        .await
    }
}

/// The file of the cluster key: `discovery.cluster_key_file` (relative to the data dir), else
/// `<data-dir>/cluster-key`.
pub fn cluster_key_path(c: &Config) -> PathBuf {
    if c.discovery.cluster_key_file.is_empty() {
        c.data_dir.join("cluster-key")
    } else {
        c.data_dir.join(&c.discovery.cluster_key_file)
    }
}

/// The cluster key, made at first use.
pub fn cluster_key(c: &Config) -> io::Result<[u8; 32]> {
    load_or_create_key(&cluster_key_path(c))
}

/// The server's Ed25519 key (`<data-dir>/server-key`), made at first use.
pub fn server_key(data_dir: &Path) -> io::Result<SigningKey> {
    Ok(SigningKey::from_bytes(&load_or_create_key(
        &data_dir.join("server-key"),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_wire::beacon::{open_server, seal_node, unsigned_node, NodeBeacon};
    use rand::RngCore;

    const KEY: [u8; 32] = [7; 32];

    fn beacon(id: &str, seq: u64, ts: i64) -> NodeBeacon {
        NodeBeacon {
            node_id: id.into(),
            name: format!("n-{id}"),
            api: String::new(),
            version: "0.1.0".into(),
            labels: [("type".to_string(), "gpu".to_string())].into(),
            ts,
            seq,
        }
    }

    fn listener() -> (Listener, Arc<DiscoveryStats>) {
        let stats = Arc::new(DiscoveryStats::default());
        (Listener::new(KEY, stats.clone()), stats)
    }

    #[test]
    fn listener_refuses_stale_and_replayed_beacons_and_counts() {
        let (mut l, stats) = listener();
        let now = now_ms();
        assert_eq!(
            l.check(&seal_node(&beacon("a", 5, now), &KEY), now),
            Verdict::Ok
        );
        // The same beacon again, and an older sequence number.
        assert_eq!(
            l.check(&seal_node(&beacon("a", 5, now), &KEY), now),
            Verdict::Replayed
        );
        assert_eq!(
            l.check(&seal_node(&beacon("a", 4, now), &KEY), now),
            Verdict::Replayed
        );
        // Sequence numbers are per node.
        assert_eq!(
            l.check(&seal_node(&beacon("b", 1, now), &KEY), now),
            Verdict::Ok
        );
        assert_eq!(
            l.check(&seal_node(&beacon("a", 6, now), &KEY), now),
            Verdict::Ok
        );
        for ts in [
            now - MAX_SKEW_MS - 1,
            now + MAX_SKEW_MS + 1,
            i64::MIN,
            i64::MAX,
        ] {
            assert_eq!(
                l.check(&seal_node(&beacon("a", 100, ts), &KEY), now),
                Verdict::Stale
            );
        }
        // Stale ones did not move the sequence on.
        assert_eq!(
            l.check(&seal_node(&beacon("a", 7, now), &KEY), now),
            Verdict::Ok
        );
        assert_eq!(
            l.check(&unsigned_node(&beacon("a", 8, now)), now),
            Verdict::Unsigned
        );
        assert_eq!(
            l.check(&seal_node(&beacon("a", 9, now), &[1; 32]), now),
            Verdict::BadSignature
        );
        assert_eq!(l.check(b"hello", now), Verdict::Malformed);
        for (k, n) in [
            ("ok", 4),
            ("replayed", 2),
            ("stale", 4),
            ("unsigned", 1),
            ("bad_signature", 1),
            ("malformed", 1),
        ] {
            assert_eq!(stats.counted(k), n, "{k}");
        }
        assert_eq!(stats.last_heard("b"), Some(now));
    }

    #[test]
    fn garbage_never_panics() {
        let (mut l, stats) = listener();
        let sk = SigningKey::from_bytes(&[3; 32]);
        let vk = sk.verifying_key();
        let now = now_ms();
        let good = seal_node(&beacon("a", 1, now), &KEY);
        let mut rng = rand::rng();
        let mut n = 0;
        for i in 0..5000 {
            let mut d = if i % 2 == 0 {
                let mut d = vec![0u8; (rng.next_u32() % 600) as usize];
                rng.fill_bytes(&mut d);
                d
            } else {
                // Mutations of a good beacon: flipped bytes, truncation.
                let mut d = good.clone();
                for _ in 0..=(rng.next_u32() % 4) {
                    let at = rng.next_u32() as usize % d.len();
                    d[at] = rng.next_u32() as u8;
                }
                d.truncate(rng.next_u32() as usize % (d.len() + 1));
                d
            };
            if i % 7 == 0 {
                d.splice(
                    0..0,
                    br#"{"muster":"beacon/1","kind":"node","payload":"#.to_vec(),
                );
            }
            if l.check(&d, now) != Verdict::Ok {
                n += 1;
            }
            let _ = open_server(&d, &vk, now);
        }
        for d in [
            &b""[..],
            b"{}",
            b"null",
            br#"{"muster":"beacon/1","kind":"node","payload":"{}","sig":"00"}"#,
            br#"{"muster":"beacon/1","kind":"node","payload":"x","sig":"zz"}"#,
            br#"{"muster":"beacon/1","kind":"node","payload":"x","sig":"abc"}"#,
            br#"{"muster":"beacon/1","kind":"ufo","payload":"x","sig":"00"}"#,
            br#"{"muster":"beacon/2","kind":"node","payload":"x","sig":"00"}"#,
            br#"{"muster":"beacon/1","kind":"server","payload":"x","sig":"00"}"#,
        ] {
            assert_ne!(l.check(d, now), Verdict::Ok);
            assert!(open_server(d, &vk, now).is_err());
        }
        assert!(n > 4900);
        assert_eq!(
            l.check(&vec![b' '; MAX_DATAGRAM + 1], now),
            Verdict::Malformed
        );
        assert!(stats.counted("malformed") > 0);
    }

    #[test]
    fn the_server_and_cluster_keys_are_kept_in_the_data_dir() {
        let dir = std::env::temp_dir().join(format!(
            "muster-discovery-keys-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let a = server_key(&dir).unwrap();
        assert_eq!(a.to_bytes(), server_key(&dir).unwrap().to_bytes());
        let c = Config {
            data_dir: dir.clone(),
            ..Config::default()
        };
        let k = cluster_key(&c).unwrap();
        assert_eq!(cluster_key(&c).unwrap(), k);
        assert!(dir.join("cluster-key").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
