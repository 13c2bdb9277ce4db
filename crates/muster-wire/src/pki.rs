//! The cluster's PKI and the TLS both sides speak (SPEC §5; the kubeadm pattern).
//!
//! - The cluster CA ([`ClusterCa`], ECDSA P-256) is made by the first server and kept in the
//!   store, so every server of a cluster shares it. Join tokens carry the SHA-256 fingerprint of
//!   the CA certificate: an agent trusts exactly the certificates that chain to it ([`PinnedCa`]).
//! - Each server makes a fresh certificate for itself at start and daily, named [`SERVER_NAME`]
//!   and good for both server and client authentication. Agents check that name, not the address
//!   they dialled: a server may be reached by any address (NAT, beacons, several names).
//! - Each agent makes its own key pair at every start and sends the public half in its `Hello`;
//!   the server signs a certificate for `<node id>.node.muster` (server authentication only), so
//!   an agent can never pass for a server. The agent serves its log files over TLS with it and
//!   accepts only clients with a server certificate of the cluster.

use crate::util::{hex, unhex};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};
use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpStream;

/// The name every server certificate carries, and what agents check.
pub const SERVER_NAME: &str = "server.muster";

/// The name in a node's certificate.
pub fn node_name(node_id: &str) -> String {
    format!("{node_id}.node.muster")
}

/// The one crypto provider (ring) every TLS config here uses.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The SHA-256 of a certificate (DER).
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    Sha256::digest(cert).into()
}

/// The cluster CA: its certificate and signing key. Servers keep it in their store (see
/// [`ClusterCa::to_stored`]); agents never hold it.
pub struct ClusterCa {
    cert: CertificateDer<'static>,
    key: rcgen::KeyPair,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredCa {
    /// Certificate, DER in hex.
    cert: String,
    /// PKCS#8 private key, DER in hex.
    key: String,
}

/// The CA's subject and key use; the issuer of every cluster certificate (the certificate itself
/// is made once, but its name and key are all that signing needs).
fn ca_params() -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "muster cluster CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn valid_for(p: &mut rcgen::CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back, for clocks a little behind.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
}

/// A P-256 public key as an agent sends it (the uncompressed point).
struct RawP256(Vec<u8>);

impl rcgen::PublicKeyData for RawP256 {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl ClusterCa {
    /// A new CA (ten years).
    pub fn generate() -> Result<ClusterCa, String> {
        let key = rcgen::KeyPair::generate().map_err(err)?;
        let mut p = ca_params();
        valid_for(&mut p, 3650);
        let cert = p.self_signed(&key).map_err(err)?;
        Ok(ClusterCa {
            cert: cert.der().clone(),
            key,
        })
    }

    /// The CA as kept in the store: certificate and PKCS#8 key, DER in hex, as JSON.
    pub fn to_stored(&self) -> String {
        serde_json::to_string(&StoredCa {
            cert: hex(&self.cert),
            key: hex(&self.key.serialize_der()),
        })
        .expect("serializable")
    }

    /// The CA from what [`ClusterCa::to_stored`] made.
    pub fn from_stored(text: &str) -> Result<ClusterCa, String> {
        let doc: StoredCa = serde_json::from_str(text).map_err(|e| format!("cluster CA: {e}"))?;
        let (Some(cert), Some(key)) = (unhex(&doc.cert), unhex(&doc.key)) else {
            return Err("the cluster CA in the store is damaged".into());
        };
        let key =
            rcgen::KeyPair::try_from(key.as_slice()).map_err(|e| format!("cluster CA: {e}"))?;
        Ok(ClusterCa {
            cert: CertificateDer::from(cert),
            key,
        })
    }

    /// The CA certificate (DER).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// What join tokens carry: the SHA-256 of the CA certificate, hex.
    pub fn fingerprint_hex(&self) -> String {
        hex(&fingerprint(&self.cert))
    }

    fn issue(
        &self,
        name: &str,
        usages: Vec<rcgen::ExtendedKeyUsagePurpose>,
        days: i64,
        public: &impl rcgen::PublicKeyData,
    ) -> Result<CertificateDer<'static>, String> {
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(err)?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.extended_key_usages = usages;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        valid_for(&mut p, days);
        let issuer = rcgen::Issuer::new(ca_params(), &self.key);
        Ok(p.signed_by(public, &issuer).map_err(err)?.der().clone())
    }

    /// A certificate for a node's log endpoint, for the public key its agent sent (a P-256 point).
    pub fn sign_node(
        &self,
        node_id: &str,
        public_key: &[u8],
    ) -> Result<CertificateDer<'static>, String> {
        if public_key.len() != 65 || public_key[0] != 4 {
            return Err("the agent's key is not an uncompressed P-256 point".into());
        }
        self.issue(
            &node_name(node_id),
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth],
            365,
            &RawP256(public_key.to_vec()),
        )
    }

    /// This server's TLS: a fresh certificate (a year) for serving agents and for dialling
    /// their log endpoints; `public` (from `server.tls_cert`) for every TLS client that does not
    /// ask for [`SERVER_NAME`].
    pub fn server_tls(&self, public: Option<Arc<CertifiedKey>>) -> Result<ServerTls, String> {
        let key = rcgen::KeyPair::generate().map_err(err)?;
        let leaf = self.issue(
            SERVER_NAME,
            vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ],
            365,
            &key,
        )?;
        let chain = vec![leaf, self.cert.clone()];
        let pkcs8 = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = provider()
            .key_provider
            .load_private_key(pkcs8())
            .map_err(err)?;
        let cluster = Arc::new(CertifiedKey::new(chain.clone(), signing));
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(err)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(ByName { cluster, public }));
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let dialer = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(err)?
            .with_root_certificates(roots(&self.cert)?)
            .with_client_auth_cert(chain, pkcs8())
            .map_err(err)?;
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            dialer: Arc::new(dialer),
            ca: self.cert.clone(),
        })
    }
}

/// A root store holding just the cluster CA.
pub fn roots(ca: &CertificateDer<'static>) -> Result<RootCertStore, String> {
    let mut r = RootCertStore::empty();
    r.add(ca.clone()).map_err(err)?;
    Ok(r)
}

/// Which certificate a TLS client gets: agents (and servers dialling each other) ask for
/// [`SERVER_NAME`] and get the cluster's; everyone else gets `server.tls_cert` when there is one.
#[derive(Debug)]
struct ByName {
    cluster: Arc<CertifiedKey>,
    public: Option<Arc<CertifiedKey>>,
}

impl rustls::server::ResolvesServerCert for ByName {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match (&self.public, hello.server_name()) {
            (Some(p), name) if name != Some(SERVER_NAME) => Some(p.clone()),
            _ => Some(self.cluster.clone()),
        }
    }
}

/// A server's TLS: what it serves agents with, and how it dials their log endpoints.
pub struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Presents the server's certificate; trusts only the cluster CA.
    pub dialer: Arc<ClientConfig>,
    pub ca: CertificateDer<'static>,
}

/// Checks a server's chain against the CA whose fingerprint the agent was given: the CA must be
/// in the chain the server sent, and the certificate must chain to it and carry the name asked.
#[derive(Debug)]
pub struct PinnedCa {
    fingerprint: [u8; 32],
}

impl PinnedCa {
    /// The client side of an agent: trusts the CA with this fingerprint, presents no certificate.
    pub fn client_config(fingerprint: [u8; 32]) -> Arc<ClientConfig> {
        let c = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCa { fingerprint }))
            .with_no_client_auth();
        Arc::new(c)
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
        else {
            return Err(rustls::Error::General(
                "the server's certificate is not of this cluster's CA (fingerprint in the join token)"
                    .into(),
            ));
        };
        let roots = roots(&ca.clone().into_owned()).map_err(rustls::Error::General)?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `host:port` of an `http://` or `https://` URL (the agent speaks TLS to either).
pub fn host_port(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .map(|r| (r, 80))
        .or_else(|| url.strip_prefix("https://").map(|r| (r, 443)));
    let Some((rest, default_port)) = rest else {
        return Err(format!("{url:?} is not an http:// or https:// URL"));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    let has_port = match authority.rfind(']') {
        Some(i) => authority[i..].contains(':'),
        None => authority.contains(':'),
    };
    Ok(if has_port {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    })
}

/// Dials `addr` and speaks TLS with `config`, expecting a certificate named `name`; the
/// connection and the handshake each get `within`.
pub async fn dial(
    addr: &str,
    config: Arc<ClientConfig>,
    name: &str,
    within: Duration,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(within, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::other("timed out connecting"))??;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(name.to_string()).map_err(io::Error::other)?;
    tokio::time::timeout(
        within,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| io::Error::other("timed out in the TLS handshake"))?
}

/// One HTTP/1.1 request over TLS to a server of the cluster; the status and body.
pub async fn request(
    url: &str,
    fingerprint: [u8; 32],
    method: &str,
    path: &str,
    body: String,
) -> io::Result<(u16, Vec<u8>)> {
    use http_body_util::BodyExt;
    let addr = host_port(url).map_err(io::Error::other)?;
    let tls = dial(
        &addr,
        PinnedCa::client_config(fingerprint),
        SERVER_NAME,
        Duration::from_secs(10),
    )
    .await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(io::Error::other)?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
        .map_err(io::Error::other)?;
    let resp = sender.send_request(req).await.map_err(io::Error::other)?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(io::Error::other)?
        .to_bytes()
        .to_vec();
    driver.abort();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_of_urls() {
        assert_eq!(host_port("http://a:7070").unwrap(), "a:7070");
        assert_eq!(host_port("https://a/x").unwrap(), "a:443");
        assert_eq!(host_port("http://[::1]:9/").unwrap(), "[::1]:9");
        assert_eq!(host_port("http://[::1]").unwrap(), "[::1]:80");
        assert!(host_port("ftp://a").is_err());
        assert!(host_port("http://").is_err());
    }

    #[test]
    fn node_certificates_chain_to_the_ca_and_cannot_pass_for_a_server() {
        let ca = ClusterCa::generate().unwrap();
        // The same CA comes back from what the store keeps.
        let again = ClusterCa::from_stored(&ca.to_stored()).unwrap();
        assert_eq!(ca.fingerprint_hex(), again.fingerprint_hex());
        let server = ca.server_tls(None).unwrap();
        let node_key = rcgen::KeyPair::generate().unwrap();
        let node_cert = ca.sign_node("n1", node_key.public_key_raw()).unwrap();
        let v = PinnedCa {
            fingerprint: fingerprint(ca.cert()),
        };
        let now = UnixTime::now();
        let name = |n: &str| ServerName::try_from(n.to_string()).unwrap();
        let cas = [ca.cert().clone()];
        // A node's certificate verifies under its own name, never as the server.
        assert!(v
            .verify_server_cert(&node_cert, &cas, &name(&node_name("n1")), &[], now)
            .is_ok());
        assert!(v
            .verify_server_cert(&node_cert, &cas, &name(SERVER_NAME), &[], now)
            .is_err());
        // A CA other than the pinned one is refused.
        let other = ClusterCa::generate().unwrap();
        let stranger = other.sign_node("n1", node_key.public_key_raw()).unwrap();
        assert!(v
            .verify_server_cert(
                &stranger,
                &[other.cert().clone()],
                &name(&node_name("n1")),
                &[],
                now
            )
            .is_err());
        assert!(ca.sign_node("n1", b"short").is_err());
        assert!(ClusterCa::from_stored("{}").is_err());
        drop(server);
    }
}
