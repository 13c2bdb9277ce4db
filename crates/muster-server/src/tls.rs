//! The server's TLS (SPEC §5): the cluster CA kept in the store, the server's certificates
//! renewed daily, the operator's own certificate for browsers (`server.tls_cert`), and the
//! listener that serves plain HTTP and TLS on one port ([`Sniff`]): browsers and the CLI keep
//! `http://`, agents always speak TLS, and the agent routes refuse anything else. The PKI itself
//! (certificates, the pinned-CA verifier agents use) is `muster_wire::pki`.

use muster_store::Store;
use muster_wire::pki::{provider, ClusterCa, ServerTls};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Where the CA lives in the store: (kind, key) of its document.
const CA_DOC: (&str, &str) = ("cluster", "ca");

/// The cluster's CA from the store; made (once, whoever comes first) when there is none.
pub fn load_or_create_ca(store: &dyn Store) -> Result<ClusterCa, String> {
    let err = |e: muster_store::StoreError| e.to_string();
    if store.doc(CA_DOC.0, CA_DOC.1).map_err(err)?.is_none() {
        // Another server may make one meanwhile: then that one counts.
        let ca = ClusterCa::generate()?;
        store
            .create_doc(CA_DOC.0, CA_DOC.1, &ca.to_stored())
            .map_err(err)?;
    }
    let text = store
        .doc(CA_DOC.0, CA_DOC.1)
        .map_err(err)?
        .ok_or("the cluster CA vanished from the store")?;
    ClusterCa::from_stored(&text.value)
}

/// Reads `server.tls_cert` and `server.tls_key` (PEM).
pub fn load_public(cert: &str, key: &str) -> Result<Arc<CertifiedKey>, String> {
    use rustls::pki_types::pem::PemObject;
    let read = |p: &str| std::fs::read(p).map_err(|e| format!("{p}: {e}"));
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{cert}: {e:?}"))?;
    if chain.is_empty() {
        return Err(format!("{cert}: no certificate in it (PEM expected)"));
    }
    let key_der =
        PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| format!("{key}: {e:?}"))?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("{key}: {e}"))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| format!("{key} is not the key of {cert}: {e}"))?;
    Ok(Arc::new(ck))
}

/// A server's current TLS, renewed while it runs (see [`CurrentTls::renew_daily`]).
pub struct CurrentTls(std::sync::RwLock<Arc<ServerTls>>);

impl CurrentTls {
    pub fn new(tls: ServerTls) -> CurrentTls {
        CurrentTls(std::sync::RwLock::new(Arc::new(tls)))
    }

    pub fn get(&self) -> Arc<ServerTls> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes a fresh certificate every day, so a server that runs for years never serves an
    /// expired one (each is good for a year), and reads `server.tls_cert` again (renewed files).
    pub async fn renew_daily(
        self: Arc<Self>,
        ca: impl std::ops::Deref<Target = ClusterCa>,
        public: (String, String),
    ) {
        let day = Duration::from_secs(86_400);
        loop {
            tokio::time::sleep(day).await;
            let p = if public.0.is_empty() {
                Ok(None)
            } else {
                load_public(&public.0, &public.1).map(Some)
            };
            match p.and_then(|p| ca.server_tls(p)) {
                Ok(t) => *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(t),
                Err(e) => tracing::error!("cannot renew the server certificate: {e}"),
            }
        }
    }
}

/// Who is on the other end of a connection, and whether it speaks TLS.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: bool,
}

/// A connection that is plain TCP or TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A listener serving plain HTTP and TLS on one port: a connection whose first byte is a TLS
/// handshake record (0x16) gets TLS, any other is plain. Handshakes run on their own tasks, so a
/// slow client never holds up the others.
pub struct Sniff {
    rx: tokio::sync::mpsc::Receiver<(Conn, Peer)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Sniff {
    pub fn new(listener: TcpListener, tls: Arc<CurrentTls>) -> io::Result<Sniff> {
        let local = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let task = tokio::spawn(async move {
            loop {
                let (tcp, addr) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: wait a moment rather than spin.
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (tx, acceptor) = (tx.clone(), tls.get().acceptor.clone());
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    let peeked =
                        tokio::time::timeout(Duration::from_secs(30), tcp.peek(&mut first)).await;
                    let conn = match peeked {
                        Ok(Ok(1)) if first[0] == 0x16 => {
                            match tokio::time::timeout(
                                Duration::from_secs(10),
                                acceptor.accept(tcp),
                            )
                            .await
                            {
                                Ok(Ok(s)) => (Conn::Tls(Box::new(s)), Peer { addr, tls: true }),
                                _ => return,
                            }
                        }
                        Ok(Ok(1)) => (Conn::Plain(tcp), Peer { addr, tls: false }),
                        _ => return,
                    };
                    let _ = tx.send(conn).await;
                });
            }
        });
        Ok(Sniff { rx, local, task })
    }
}

impl Drop for Sniff {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for Sniff {
    type Io = Conn;
    type Addr = Peer;

    async fn accept(&mut self) -> (Conn, Peer) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task never ends while this listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Peer> {
        Ok(Peer {
            addr: self.local,
            tls: false,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Sniff>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Sniff>) -> Peer {
        *stream.remote_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_made_once_and_kept_in_the_store() {
        let store = muster_store::open("memory://").unwrap();
        let ca = load_or_create_ca(&*store).unwrap();
        let again = load_or_create_ca(&*store).unwrap();
        assert_eq!(ca.fingerprint_hex(), again.fingerprint_hex());
        let other = load_or_create_ca(&*muster_store::open("memory://").unwrap()).unwrap();
        assert_ne!(ca.fingerprint_hex(), other.fingerprint_hex());
    }
}
