//! The agent's log endpoint (SPEC §5): each agent serves its job log files on its own websocket
//! endpoint, `wss://ADDR/logs/{job}/{attempt}?follow=true`, so a server streams a remote job's
//! log straight from the node that runs it.
//!
//! TLS both ways under the cluster CA: the agent makes a key pair at every start and offers the
//! public half in its `Hello`; the server answers with a certificate for `<node id>.node.muster`
//! (see `muster_wire::pki`). Only clients with a server certificate of the cluster (client
//! authentication, which node certificates lack) are served. The address the server dials comes
//! from the agent's authenticated connection, never from a beacon.

use super::{attempt_dir, stream_log};
use futures_util::{SinkExt, StreamExt};
use muster_core::Uuid;
use muster_wire::protocol::{FromAgent, LogOffer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// How long a connection made before the endpoint is certified waits for the certificate.
const CERTIFICATE_WAIT: Duration = Duration::from_secs(2);

/// A running log endpoint.
pub struct LogServer {
    addr: SocketAddr,
    key: rcgen::KeyPair,
    /// The CA fingerprint the agent joined with: a certificate offered under another CA is refused.
    fingerprint: [u8; 32],
    /// Set once a server has certified the key.
    config: tokio::sync::watch::Sender<Option<tokio_rustls::TlsAcceptor>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LogServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LogServer {
    /// Listens on `listen` for the job logs under the agent's data dir `dir`.
    pub async fn start(
        listen: SocketAddr,
        dir: PathBuf,
        fingerprint: [u8; 32],
    ) -> std::io::Result<LogServer> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let key = rcgen::KeyPair::generate().map_err(std::io::Error::other)?;
        let config = tokio::sync::watch::Sender::new(None::<tokio_rustls::TlsAcceptor>);
        let acceptor = config.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let mut certified = acceptor.subscribe();
                let dir = dir.clone();
                tokio::spawn(async move {
                    // Not certified yet: a server that dials right after the agent connected
                    // (before its certificate arrived) waits for it a little; without one,
                    // nobody is served.
                    let tls =
                        tokio::time::timeout(CERTIFICATE_WAIT, certified.wait_for(|c| c.is_some()))
                            .await
                            .ok()
                            .and_then(|r| r.ok().and_then(|c| c.clone()));
                    drop(certified);
                    let Some(tls) = tls else { return };
                    let _ = tcp.set_nodelay(true);
                    if let Err(e) = serve(tcp, tls, dir).await {
                        tracing::warn!("log endpoint: {e}");
                    }
                });
            }
        });
        Ok(LogServer {
            addr,
            key,
            fingerprint,
            config,
            task,
        })
    }

    /// What the agent's `Hello` offers.
    pub fn offer(&self) -> LogOffer {
        LogOffer {
            addr: self.addr,
            key: muster_wire::util::hex(self.key.public_key_raw()),
        }
    }

    /// Takes the certificate a server made for the key (DER hex) with the CA that signed it.
    pub fn certify(&self, cert: &str, ca: &str) -> Result<(), String> {
        let (Some(cert), Some(ca)) = (muster_wire::util::unhex(cert), muster_wire::util::unhex(ca))
        else {
            return Err("the certificate is not hex".into());
        };
        if muster_wire::pki::fingerprint(&ca) != self.fingerprint {
            return Err("the server's CA is not the one this agent joined".into());
        }
        let ca = CertificateDer::from(ca);
        let roots = muster_wire::pki::roots(&ca)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            muster_wire::pki::provider(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(muster_wire::pki::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![CertificateDer::from(cert), ca], key)
            .map_err(|e| e.to_string())?;
        self.config
            .send_replace(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))));
        Ok(())
    }
}

/// `/logs/{job}/{attempt}` with `follow` and `from` in the query.
fn parse_target(target: &str) -> Option<(Uuid, u32, bool, u64, Option<u64>)> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut parts = path.strip_prefix("/logs/")?.split('/');
    let job = parts.next()?.parse().ok()?;
    let attempt = parts.next()?.parse().ok()?;
    if parts.next().is_some() || attempt == 0 {
        return None;
    }
    let (mut follow, mut from, mut limit) = (false, 0, None);
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=')? {
            ("follow", v) => follow = v.parse().ok()?,
            ("from", v) => from = v.parse().ok()?,
            ("limit", v) => limit = Some(v.parse().ok()?),
            _ => return None,
        }
    }
    Some((job, attempt, follow, from, limit))
}

// The handshake callback's error type is tungstenite's.
#[allow(clippy::result_large_err)]
async fn serve(
    tcp: tokio::net::TcpStream,
    tls: tokio_rustls::TlsAcceptor,
    dir: PathBuf,
) -> std::io::Result<()> {
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    let stream = tokio::time::timeout(std::time::Duration::from_secs(10), tls.accept(tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
    let mut target = None;
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        match parse_target(&req.uri().to_string()) {
            Some(t) => {
                target = Some(t);
                Ok(resp)
            }
            None => {
                let mut e = ErrorResponse::new(Some(
                    "expected /logs/{job}/{attempt}?follow=true|false&from=N&limit=N".into(),
                ));
                *e.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::NOT_FOUND;
                Err(e)
            }
        }
    };
    let mut ws = tokio_tungstenite::accept_hdr_async(stream, check)
        .await
        .map_err(std::io::Error::other)?;
    let Some((job, attempt, follow, from, limit)) = target else {
        return Ok(());
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(stream_log(
        attempt_dir(&dir, job, attempt),
        0,
        from,
        follow,
        limit,
        tx,
    ));
    let _reader = super::AbortOnDrop(reader);
    loop {
        tokio::select! {
            chunk = rx.recv() => match chunk {
                Some(FromAgent::LogChunk { data, eof, .. }) => {
                    if !data.is_empty() && ws.send(Message::Text(data.into())).await.is_err() {
                        return Ok(());
                    }
                    if eof {
                        let _ = ws.close(None).await;
                        return Ok(());
                    }
                }
                Some(_) => {}
                None => return Ok(()),
            },
            // The follower went away (or sent something): stop reading.
            msg = ws.next() => match msg {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                _ => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_wire::pki::{dial, node_name, ClusterCa};

    /// Reads one log over the endpoint with `client`; the text or why it failed.
    async fn read_log(
        addr: SocketAddr,
        client: Arc<rustls::ClientConfig>,
        node: &str,
        job: Uuid,
    ) -> Result<String, String> {
        let tls = dial(
            &addr.to_string(),
            client,
            &node_name(node),
            std::time::Duration::from_secs(5),
        )
        .await
        .map_err(|e| e.to_string())?;
        let url = format!("wss://{addr}/logs/{job}/1?follow=false");
        let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
            .await
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        while let Some(m) = ws.next().await {
            match m.map_err(|e| e.to_string())? {
                Message::Text(t) => text.push_str(&t),
                Message::Close(_) => break,
                _ => {}
            }
        }
        Ok(text)
    }

    #[tokio::test]
    async fn only_servers_of_the_cluster_read_logs_from_a_certified_node() {
        let ca = ClusterCa::generate().unwrap();
        let fp = muster_wire::pki::fingerprint(ca.cert());
        let dir = std::env::temp_dir().join(format!("muster-logs-{}", std::process::id()));
        let job: Uuid = "0190aaaa-0000-7000-8000-000000000002".parse().unwrap();
        let adir = attempt_dir(&dir, job, 1);
        std::fs::create_dir_all(&adir).unwrap();
        std::fs::write(adir.join("log"), "1 out hello\n").unwrap();
        std::fs::write(adir.join("exit.json"), "{}").unwrap();
        let server = LogServer::start("127.0.0.1:0".parse().unwrap(), dir.clone(), fp)
            .await
            .unwrap();
        let addr = server.addr;
        let dialer = ca.server_tls(None).unwrap().dialer;
        // Not certified yet: nothing is served.
        assert!(read_log(addr, dialer.clone(), "n1", job).await.is_err());
        let offer = server.offer();
        let key = muster_wire::util::unhex(&offer.key).unwrap();
        let cert = ca.sign_node("n1", &key).unwrap();
        let hex = muster_wire::util::hex;
        // A certificate under another CA is refused.
        let other = ClusterCa::generate().unwrap();
        assert!(server.certify(&hex(&cert), &hex(other.cert())).is_err());
        // A server that dials before the certificate arrives (right after the agent connected)
        // is served once it does.
        let early = tokio::spawn(read_log(addr, dialer.clone(), "n1", job));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while server.config.receiver_count() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the early dial never arrived"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        server.certify(&hex(&cert), &hex(ca.cert())).unwrap();
        assert_eq!(early.await.unwrap().unwrap(), "1 out hello\n");
        // A server of the cluster reads the log, checking the node's name.
        let text = read_log(addr, dialer.clone(), "n1", job).await.unwrap();
        assert_eq!(text, "1 out hello\n");
        assert!(read_log(addr, dialer.clone(), "n2", job).await.is_err());
        // No client certificate, or a node's own (server authentication only): refused.
        let roots = muster_wire::pki::roots(ca.cert()).unwrap();
        let anon = rustls::ClientConfig::builder_with_provider(muster_wire::pki::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        assert!(read_log(addr, Arc::new(anon), "n1", job).await.is_err());
        let node_key = rcgen::KeyPair::generate().unwrap();
        let node_cert = ca.sign_node("n3", node_key.public_key_raw()).unwrap();
        let as_node = rustls::ClientConfig::builder_with_provider(muster_wire::pki::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![node_cert],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(node_key.serialize_der())),
            )
            .unwrap();
        assert!(read_log(addr, Arc::new(as_node), "n1", job).await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn targets() {
        let j = "0190aaaa-0000-7000-8000-000000000002";
        assert_eq!(
            parse_target(&format!("/logs/{j}/2?follow=true&from=5")),
            Some((j.parse().unwrap(), 2, true, 5, None))
        );
        assert_eq!(
            parse_target(&format!("/logs/{j}/1")),
            Some((j.parse().unwrap(), 1, false, 0, None))
        );
        assert_eq!(
            parse_target(&format!("/logs/{j}/1?from=3&limit=10")),
            Some((j.parse().unwrap(), 1, false, 3, Some(10)))
        );
        assert_eq!(parse_target(&format!("/logs/{j}/0")), None);
        assert_eq!(parse_target(&format!("/logs/{j}/1/x")), None);
        assert_eq!(parse_target("/logs/../1"), None);
        assert_eq!(parse_target(&format!("/logs/{j}/1?evil=1")), None);
    }
}
