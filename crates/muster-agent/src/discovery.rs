//! Discovery, the agent's side (SPEC §5): the agent's own signed beacon, and finding a server by
//! its beacon when the agent has a join token and no `--server` (the token carries the server's
//! Ed25519 public key, so a forged beacon cannot steer it anywhere else). The datagram format is
//! `muster_wire::beacon`.

use muster_wire::beacon::{
    first_seq, now_ms, open_server, seal_node, send_every, NodeBeacon, VerifyingKey, MAX_DATAGRAM,
};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;

/// An agent's announcer: sends a fresh node beacon every `interval` to `dest`.
pub struct NodeAnnouncer {
    pub cluster_key: [u8; 32],
    pub node_id: String,
    pub name: String,
    pub api: String,
    pub labels: BTreeMap<String, String>,
    pub interval: Duration,
    pub dest: SocketAddr,
}

impl NodeAnnouncer {
    /// Beacons on `socket` (see [`bind_sender`]) until `shutdown` resolves.
    pub async fn run(self, socket: UdpSocket, shutdown: impl Future<Output = ()>) {
        let mut seq = first_seq();
        let mut b = NodeBeacon {
            node_id: self.node_id,
            name: self.name,
            api: self.api,
            version: env!("CARGO_PKG_VERSION").into(),
            labels: self.labels,
            ts: 0,
            seq: 0,
        };
        let key = self.cluster_key;
        send_every(socket, self.dest, self.interval, shutdown, move || {
            seq += 1;
            b.seq = seq;
            b.ts = now_ms();
            seal_node(&b, &key)
        })
        .await
    }
}

/// An agent with a join token and no server: waits on `socket` for a fresh server beacon signed
/// by `key` and returns its URL; `None` if `shutdown` came first. Other beacons are ignored.
pub async fn find_server(
    socket: &UdpSocket,
    key: &VerifyingKey,
    shutdown: impl Future<Output = ()>,
) -> Option<String> {
    tokio::pin!(shutdown);
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        tokio::select! {
            _ = &mut shutdown => return None,
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, _)) => {
                    if let Ok(b) = open_server(&buf[..n], key, now_ms()) {
                        return Some(b.url);
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_wire::beacon::{bind_listener, bind_sender, seal_server, ServerBeacon, SigningKey};

    #[tokio::test]
    async fn a_server_beacon_is_found_over_loopback_broadcast() {
        let sk = SigningKey::from_bytes(&[5; 32]);
        let rx = bind_listener(0).unwrap();
        let port = rx.local_addr().unwrap().port();
        let dest: SocketAddr = format!("127.255.255.255:{port}").parse().unwrap();
        let tx = bind_sender().unwrap();
        let beacon = |url: &str, key: &SigningKey| {
            seal_server(
                &ServerBeacon {
                    url: url.into(),
                    version: "x".into(),
                    ts: now_ms(),
                    seq: 1,
                },
                key,
            )
        };
        // A forged beacon first: it must not be taken.
        tx.send_to(
            &beacon("http://127.0.0.1:1", &SigningKey::from_bytes(&[6; 32])),
            dest,
        )
        .await
        .unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let good = beacon("http://127.0.0.1:7070", &sk);
        let announcer = tokio::spawn(send_every(
            tx,
            dest,
            Duration::from_millis(50),
            async {
                let _ = stop_rx.await;
            },
            move || good.clone(),
        ));
        let found = tokio::time::timeout(
            Duration::from_secs(5),
            find_server(&rx, &sk.verifying_key(), std::future::pending()),
        )
        .await
        .unwrap();
        assert_eq!(found.as_deref(), Some("http://127.0.0.1:7070"));
        let _ = stop_tx.send(());
        announcer.await.unwrap();
    }
}
