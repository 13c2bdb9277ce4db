//! Discovery beacons (SPEC §5): the datagram format both sides speak, its signing and checking,
//! the sockets, and the key files.
//!
//! Two kinds of beacon go to `discovery.broadcast:discovery.port` every `discovery.interval`:
//!
//! - **node beacons**, sent by agents: node id, name, API address, version, labels, a timestamp
//!   (Unix ms) and a per-node sequence number, signed with HMAC-SHA256 under the cluster key;
//! - **server beacons**, sent by a server: its URL, version, timestamp and sequence number, signed
//!   with the server's Ed25519 key, whose public half travels in join tokens
//!   (`mjt_<secret>.<public key hex>`), so an agent started with a join token and no `--server`
//!   finds its server and a forged beacon cannot steer it anywhere else.
//!
//! A datagram is one JSON object (the *envelope*):
//!
//! ```text
//! {"muster":"beacon/1","kind":"node"|"server","payload":"<JSON text>","sig":"<hex>"}
//! ```
//!
//! The signature covers `"muster beacon/1 <kind>\n"` followed by the exact bytes of `payload`,
//! so nothing is re-serialized before verifying and a node beacon can never pass for a server
//! one. The payload is parsed only after its signature is checked.
//!
//! The server's [`Listener`] ignores unsigned, wrongly signed, stale (timestamp outside ±30 s of
//! its clock) and replayed (sequence number not above the last one seen for that node id)
//! beacons, and counts every verdict in the server's discovery metrics
//! (`muster_discovery_beacons_total{result=...}`); no datagram can make it panic. Beacons are
//! hints only: the listener records when a node was last heard, but the server never calls an
//! address a beacon gave it, and a node's identity is always its credential.
//!
//! Sequence numbers start at the sender's clock in microseconds and count up by one per beacon,
//! so a restarted sender keeps going above its last number without storing it.
//!
//! Keys: the cluster key (32 random bytes, hex) lives in `<data-dir>/cluster-key` (or
//! `discovery.cluster_key_file`, relative to the data dir), the server's Ed25519 seed in
//! `<data-dir>/server-key`; both are made at first use with mode 0600. Agents get the cluster
//! key in the join response and keep it in `<data-dir>/agent/cluster-key`.
//!
//! Every piece takes the socket it runs on, so tests bind their own ports. The server's listener
//! and announcer live in `muster-server`'s `discovery`, the agent's in `muster-agent`'s.

use crate::util::{hex, unhex};
use ed25519_dalek::{Signature, Signer};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::UdpSocket;

/// The envelope's version tag.
pub const VERSION_TAG: &str = "beacon/1";
/// Beacons whose timestamp is further than this from the receiver's clock are stale.
pub const MAX_SKEW_MS: i64 = 30_000;
/// Larger datagrams are malformed.
pub const MAX_DATAGRAM: usize = 8192;

/// What an agent announces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeBeacon {
    pub node_id: String,
    pub name: String,
    /// Where the agent's own API would be reached (empty: none). A hint only.
    #[serde(default)]
    pub api: String,
    pub version: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Unix time in milliseconds.
    pub ts: i64,
    pub seq: u64,
}

/// What a server announces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerBeacon {
    pub url: String,
    pub version: String,
    /// Unix time in milliseconds.
    pub ts: i64,
    pub seq: u64,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    muster: String,
    kind: String,
    payload: String,
    #[serde(default)]
    sig: String,
}

/// Why a beacon was refused (or that it was fine).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Unsigned,
    BadSignature,
    Stale,
    Replayed,
    Malformed,
    /// Well formed, but of the other kind (a server hears its own beacons): not counted.
    OtherKind,
}

impl Verdict {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Unsigned => "unsigned",
            Verdict::BadSignature => "bad_signature",
            Verdict::Stale => "stale",
            Verdict::Replayed => "replayed",
            Verdict::Malformed => "malformed",
            Verdict::OtherKind => "other_kind",
        }
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A first sequence number: the clock in microseconds, above any number an earlier run of the
/// same sender used (it sends far less than once per microsecond).
pub fn first_seq() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn signed_text(kind: &str, payload: &str) -> Vec<u8> {
    let mut m = format!("muster {VERSION_TAG} {kind}\n").into_bytes();
    m.extend_from_slice(payload.as_bytes());
    m
}

fn hmac(key: &[u8; 32], msg: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(msg);
    mac
}

fn envelope(kind: &str, payload: String, sig: String) -> Vec<u8> {
    serde_json::to_vec(&Envelope {
        muster: VERSION_TAG.into(),
        kind: kind.into(),
        payload,
        sig,
    })
    .expect("serializable")
}

/// A node beacon signed with the cluster key.
pub fn seal_node(b: &NodeBeacon, cluster_key: &[u8; 32]) -> Vec<u8> {
    let payload = serde_json::to_string(b).expect("serializable");
    let sig = hmac(cluster_key, &signed_text("node", &payload))
        .finalize()
        .into_bytes();
    envelope("node", payload, hex(&sig))
}

/// A node beacon with no signature (for tests: it must be refused).
pub fn unsigned_node(b: &NodeBeacon) -> Vec<u8> {
    envelope(
        "node",
        serde_json::to_string(b).expect("serializable"),
        String::new(),
    )
}

/// A server beacon signed with the server's key.
pub fn seal_server(b: &ServerBeacon, key: &SigningKey) -> Vec<u8> {
    let payload = serde_json::to_string(b).expect("serializable");
    let sig = key.sign(&signed_text("server", &payload));
    envelope("server", payload, hex(&sig.to_bytes()))
}

/// Checks the envelope, kind and signature; the payload text when they hold.
fn open<'a>(
    env: &'a Envelope,
    want: &str,
    verify: impl FnOnce(&[u8], &[u8]) -> bool,
) -> Result<&'a str, Verdict> {
    if env.muster != VERSION_TAG {
        return Err(Verdict::Malformed);
    }
    if env.kind != want {
        return Err(if env.kind == "node" || env.kind == "server" {
            Verdict::OtherKind
        } else {
            Verdict::Malformed
        });
    }
    if env.sig.is_empty() {
        return Err(Verdict::Unsigned);
    }
    let Some(sig) = unhex(&env.sig) else {
        return Err(Verdict::BadSignature);
    };
    if !verify(&signed_text(want, &env.payload), &sig) {
        return Err(Verdict::BadSignature);
    }
    Ok(&env.payload)
}

fn parse_envelope(datagram: &[u8]) -> Result<Envelope, Verdict> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(Verdict::Malformed);
    }
    serde_json::from_slice(datagram).map_err(|_| Verdict::Malformed)
}

fn fresh(ts: i64, now: i64) -> bool {
    now.checked_sub(ts)
        .is_some_and(|d| (-MAX_SKEW_MS..=MAX_SKEW_MS).contains(&d))
}

/// Verifies a node beacon's signature and freshness (not replay: see [`Listener`]).
pub fn open_node(datagram: &[u8], cluster_key: &[u8; 32], now: i64) -> Result<NodeBeacon, Verdict> {
    let env = parse_envelope(datagram)?;
    let payload = open(&env, "node", |msg, sig| {
        hmac(cluster_key, msg).verify_slice(sig).is_ok()
    })?;
    let b: NodeBeacon = serde_json::from_str(payload).map_err(|_| Verdict::Malformed)?;
    if !fresh(b.ts, now) {
        return Err(Verdict::Stale);
    }
    Ok(b)
}

/// Verifies a server beacon's signature (by the key a join token carries) and freshness.
pub fn open_server(datagram: &[u8], key: &VerifyingKey, now: i64) -> Result<ServerBeacon, Verdict> {
    let env = parse_envelope(datagram)?;
    let payload = open(&env, "server", |msg, sig| {
        let Ok(sig) = <[u8; 64]>::try_from(sig) else {
            return false;
        };
        key.verify_strict(msg, &Signature::from_bytes(&sig)).is_ok()
    })?;
    let b: ServerBeacon = serde_json::from_str(payload).map_err(|_| Verdict::Malformed)?;
    if !fresh(b.ts, now) {
        return Err(Verdict::Stale);
    }
    if !(b.url.starts_with("http://") || b.url.starts_with("https://")) || b.url.len() > 2000 {
        return Err(Verdict::Malformed);
    }
    Ok(b)
}

/// Sends `next()` to `dest` every `interval` until `shutdown` resolves (the first failure to
/// send is logged once).
pub async fn send_every(
    socket: UdpSocket,
    dest: SocketAddr,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
    mut next: impl FnMut() -> Vec<u8>,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut complained = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {
                if let Err(e) = socket.send_to(&next(), dest).await {
                    if !complained {
                        tracing::warn!("cannot send a discovery beacon to {dest}: {e}");
                        complained = true;
                    }
                }
            }
        }
    }
}

/// A socket that hears beacons on `port` of every address, shared with other listeners on the
/// same host (`SO_REUSEADDR`: each gets every broadcast).
pub fn bind_listener(port: u16) -> io::Result<UdpSocket> {
    bind(SocketAddr::from(([0, 0, 0, 0], port)), true)
}

/// A socket that sends beacons (`SO_BROADCAST`, any local port).
pub fn bind_sender() -> io::Result<UdpSocket> {
    bind(SocketAddr::from(([0, 0, 0, 0], 0)), false)
}

fn bind(addr: SocketAddr, reuse: bool) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    if reuse {
        s.set_reuse_address(true)?;
    }
    s.set_broadcast(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Where beacons go: `discovery.broadcast:discovery.port`.
pub fn destination(broadcast: &str, port: u16) -> io::Result<SocketAddr> {
    let ip: IpAddr = broadcast.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("discovery.broadcast {broadcast:?} is not an IP address"),
        )
    })?;
    Ok(SocketAddr::new(ip, port))
}

/// Reads 32 bytes kept as hex; `Ok(None)` when the file does not exist.
pub fn read_key(path: &Path) -> io::Result<Option<[u8; 32]>> {
    match std::fs::read_to_string(path) {
        Ok(s) => parse_key(s.trim()).map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} does not hold a 32-byte hex key", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// 64 hex digits as 32 bytes.
pub fn parse_key(s: &str) -> Option<[u8; 32]> {
    unhex(s)?.try_into().ok()
}

/// Reads the key at `path`, or makes a random one there (mode 0600; two processes racing get
/// the same key).
pub fn load_or_create_key(path: &Path) -> io::Result<[u8; 32]> {
    if let Some(k) = read_key(path)? {
        return Ok(k);
    }
    let key: [u8; 32] = rand::random();
    match write_secret(path, &hex(&key)) {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            read_key(path)?.ok_or_else(|| io::Error::other("the key file vanished"))
        }
        Err(e) => Err(e),
    }
}

/// Writes `text` to a new file at `path`, mode 0600, complete or not at all; `AlreadyExists`
/// if it is there.
pub fn write_secret(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!(
        "tmp-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(f, "{text}")?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    res
}

/// The server's public key a join token carries (`mjt_<secret>.<public key>.<CA fingerprint>`,
/// both hex).
pub fn token_server_key(token: &str) -> Option<VerifyingKey> {
    let k = token.trim().split('.').nth(1)?;
    VerifyingKey::from_bytes(&parse_key(k)?).ok()
}

/// The SHA-256 fingerprint of the cluster CA a join token carries (see [`crate::tls`]).
pub fn token_ca_fingerprint(token: &str) -> Option<[u8; 32]> {
    parse_key(token.trim().split('.').nth(2)?)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn node_beacons_sign_and_verify() {
        let now = now_ms();
        let b = beacon("a", 1, now);
        let d = seal_node(&b, &KEY);
        assert_eq!(open_node(&d, &KEY, now).unwrap(), b);
        assert_eq!(open_node(&d, &[8; 32], now), Err(Verdict::BadSignature));
        assert_eq!(
            open_node(&unsigned_node(&b), &KEY, now),
            Err(Verdict::Unsigned)
        );
        // A changed payload no longer matches its signature.
        let mut env: serde_json::Value = serde_json::from_slice(&d).unwrap();
        env["payload"] = env["payload"]
            .as_str()
            .unwrap()
            .replace("n-a", "n-b")
            .into();
        let tampered = serde_json::to_vec(&env).unwrap();
        assert_eq!(open_node(&tampered, &KEY, now), Err(Verdict::BadSignature));
        // A node beacon never passes for a server beacon and back.
        let sk = SigningKey::from_bytes(&[3; 32]);
        assert_eq!(
            open_server(&d, &sk.verifying_key(), now),
            Err(Verdict::OtherKind)
        );
    }

    #[test]
    fn server_beacons_need_the_pinned_key_and_freshness() {
        let now = now_ms();
        let sk = SigningKey::from_bytes(&[3; 32]);
        let other = SigningKey::from_bytes(&[4; 32]);
        let b = ServerBeacon {
            url: "http://127.0.0.1:7070".into(),
            version: "0.1.0".into(),
            ts: now,
            seq: 9,
        };
        let d = seal_server(&b, &sk);
        assert_eq!(open_server(&d, &sk.verifying_key(), now).unwrap(), b);
        assert_eq!(
            open_server(&seal_server(&b, &other), &sk.verifying_key(), now),
            Err(Verdict::BadSignature)
        );
        assert_eq!(
            open_server(&d, &sk.verifying_key(), now + MAX_SKEW_MS + 1),
            Err(Verdict::Stale)
        );
        let bad_url = ServerBeacon {
            url: "file:///etc/passwd".into(),
            ..b
        };
        assert_eq!(
            open_server(&seal_server(&bad_url, &sk), &sk.verifying_key(), now),
            Err(Verdict::Malformed)
        );
        let token = format!(
            "mjt_{}.{}.{}",
            hex(&[1; 16]),
            hex(&sk.verifying_key().to_bytes()),
            hex(&[7; 32])
        );
        assert_eq!(token_server_key(&token), Some(sk.verifying_key()));
        assert_eq!(token_ca_fingerprint(&token), Some([7; 32]));
        assert_eq!(token_ca_fingerprint("mjt_00.11"), None);
        assert_eq!(token_server_key("mjt_0011"), None);
        assert_eq!(token_server_key("mjt_00.zz"), None);
    }

    #[test]
    fn keys_are_made_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!(
            "muster-discovery-keys-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let a = load_or_create_key(&dir.join("server-key")).unwrap();
        let b = load_or_create_key(&dir.join("server-key")).unwrap();
        assert_eq!(a, b);
        let mode = std::fs::metadata(dir.join("server-key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let k = load_or_create_key(&dir.join("cluster-key")).unwrap();
        assert_eq!(read_key(&dir.join("cluster-key")).unwrap(), Some(k));
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            2,
            "no temp files left"
        );
        std::fs::write(dir.join("bad"), "nothex").unwrap();
        assert!(load_or_create_key(&dir.join("bad")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
