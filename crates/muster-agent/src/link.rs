//! The agent's link to remote servers: a websocket (`/api/v1/agent/ws`) in TLS under the cluster
//! CA whose fingerprint the join token carried (`muster_wire::pki::PinnedCa`), authenticated by
//! the node's credential.

use muster_wire::protocol::{FromAgent, Link, ToAgent};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// A [`Link`] to remote servers over websockets (`/api/v1/agent/ws`) in TLS under the cluster CA
/// whose `fingerprint` the join token carried, authenticated by the node's credential. Each
/// connection tries the servers in turn, starting after the last one that worked, so an agent
/// whose server died carries on with another.
pub fn ws_link(servers: Vec<String>, credential: String, fingerprint: [u8; 32]) -> Link {
    let tls = muster_wire::pki::PinnedCa::client_config(fingerprint);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Arc::new(move || {
        let servers = servers.clone();
        let credential = credential.clone();
        let next = next.clone();
        let tls = tls.clone();
        Box::pin(async move {
            let mut last_err =
                std::io::Error::other("no server configured (agent.servers / --server)");
            for k in 0..servers.len() {
                let i = (next.load(std::sync::atomic::Ordering::Relaxed) + k) % servers.len();
                match ws_connect(&servers[i], &credential, tls.clone()).await {
                    Ok(link) => {
                        next.store(i, std::sync::atomic::Ordering::Relaxed);
                        return Ok(link);
                    }
                    Err(e) => last_err = std::io::Error::other(format!("{}: {e}", servers[i])),
                }
            }
            next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(last_err)
        })
    })
}

/// Opens the agent connection to one server: TLS (whatever the URL's scheme; the server serves
/// both on one port), then the websocket.
pub async fn ws_connect(
    server: &str,
    credential: &str,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<(UnboundedSender<FromAgent>, UnboundedReceiver<ToAgent>)> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let addr =
        muster_wire::pki::host_port(server.trim_end_matches('/')).map_err(std::io::Error::other)?;
    let url = format!("wss://{addr}/api/v1/agent/ws");
    let mut req = url.into_client_request().map_err(std::io::Error::other)?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {credential}")
            .parse()
            .map_err(std::io::Error::other)?,
    );
    let stream = muster_wire::pki::dial(
        &addr,
        tls,
        muster_wire::pki::SERVER_NAME,
        Duration::from_secs(10),
    )
    .await?;
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(req, stream),
    )
    .await
    .map_err(|_| std::io::Error::other("timed out"))?
    .map_err(std::io::Error::other)?;
    let (to_server, mut from_agent) = unbounded_channel::<FromAgent>();
    let (to_agent, from_server) = unbounded_channel::<ToAgent>();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                out = from_agent.recv() => match out {
                    Some(m) => {
                        let text = serde_json::to_string(&m).unwrap_or_default();
                        if ws.send(Message::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<ToAgent>(&t) {
                        Ok(m) => {
                            if to_agent.send(m).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::error!("the server sent a bad message: {e}");
                            break;
                        }
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        let _ = ws.close(None).await;
    });
    Ok((to_server, from_server))
}

/// The local address this machine reaches the first of `servers` from (a UDP "connect" picks
/// the route; nothing is sent): where the agent's log endpoint listens by default, so it is open
/// on the network the servers are on and no other.
pub fn local_addr_towards(servers: &[String]) -> std::io::Result<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let first = servers
        .first()
        .ok_or_else(|| std::io::Error::other("no server configured"))?;
    let hp =
        muster_wire::pki::host_port(first.trim_end_matches('/')).map_err(std::io::Error::other)?;
    let target = hp
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{first}: no address")))?;
    let any: std::net::SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("an address")
    } else {
        "[::]:0".parse().expect("an address")
    };
    let s = std::net::UdpSocket::bind(any)?;
    s.connect(target)?;
    Ok(s.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_log_endpoint_listens_where_the_server_is_reached_from() {
        let ip = super::local_addr_towards(&["http://127.0.0.1:7070".into()]).unwrap();
        assert!(ip.is_loopback(), "{ip}");
        let ip = super::local_addr_towards(&["https://127.0.0.3".into()]).unwrap();
        assert!(ip.is_loopback(), "{ip}");
        assert!(super::local_addr_towards(&[]).is_err());
        assert!(super::local_addr_towards(&["ftp://x".into()]).is_err());
    }
}
