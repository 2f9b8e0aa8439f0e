//! TLS for tests: a certificate authority and broker certificates made
//! fresh for each run, and a TLS-terminating proxy in front of a plaintext
//! broker, as a load balancer or a broker's own TLS listener would be. The
//! broker behind it must advertise the proxy's address, so clients come
//! back through it after bootstrap.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// A certificate authority, and the PEM files of what it signed, in a
/// directory of their own.
pub struct TestPki {
    dir: PathBuf,
    ca_key: KeyPair,
    ca_params: CertificateParams,
    ca_pem: String,
}

/// A certificate and its key, as PEM text and as files.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestPki {
    pub fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("bridge-pki-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, name);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca_pem = ca_params.clone().self_signed(&ca_key)?.pem();
        std::fs::write(dir.join("ca.pem"), &ca_pem)?;
        Ok(Self { dir, ca_key, ca_params, ca_pem })
    }

    /// The CA certificate's PEM file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A server certificate for `names` (DNS names, or IP addresses).
    pub fn server(&self, file_stem: &str, names: &[&str]) -> Result<Issued> {
        self.issue(file_stem, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate (mutual TLS) with `name` as its common name.
    pub fn client(&self, file_stem: &str, name: &str) -> Result<Issued> {
        self.issue(file_stem, &[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, file_stem: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Result<Issued> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or(file_stem));
        for name in names {
            params.subject_alt_names.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into()?),
            });
        }
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert_pem = params.signed_by(&key, &issuer)?.pem();
        let key_pem = key.serialize_pem();
        let cert_file = self.dir.join(format!("{file_stem}.pem"));
        let key_file = self.dir.join(format!("{file_stem}.key"));
        std::fs::write(&cert_file, &cert_pem)?;
        std::fs::write(&key_file, &key_pem)?;
        Ok(Issued { cert_pem, key_pem, cert_file, key_file })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Accepts TLS on a port and forwards the plaintext to `upstream`.
pub struct TlsProxy {
    pub address: SocketAddr,
    token: CancellationToken,
}

impl TlsProxy {
    /// Serves `server` on 127.0.0.1:`port`; with `client_ca`, a client must
    /// present a certificate that CA signed (mutual TLS).
    pub async fn start(port: u16, upstream: SocketAddr, server: &Issued, client_ca: Option<&str>) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(server.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes())?;
        let builder =
            rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let config = match client_ca {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    roots.add(cert?)?;
                }
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
                builder.with_client_cert_verifier(verifier).with_single_cert(certs, key)?
            }
            None => builder.with_no_client_auth().with_single_cert(certs, key)?,
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
            .await
            .with_context(|| format!("Failed to listen on port {port}"))?;
        let address = listener.local_addr()?;
        let token = CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move {
            loop {
                let (socket, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let acceptor = acceptor.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    // A handshake the client gives up on (a certificate it
                    // does not trust) just ends the connection.
                    let mut tls = match acceptor.accept(socket).await {
                        Ok(tls) => tls,
                        Err(error) => {
                            tracing::info!(error = %error, "TLS proxy: handshake refused");
                            return;
                        }
                    };
                    let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut tls, &mut plain) => {}
                    }
                });
            }
        });
        Ok(Self { address, token })
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.token.cancel();
    }
}
