//! TLS on both sides of the sidecar, interoperable with QEMU's `tls-creds-x509`
//! (protocol-spec/tls.md).
//!
//! Towards the source the sidecar is the TLS server QEMU's `migrate` expects: it loads a
//! credentials directory in QEMU's layout (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`, optionally `ca-crl.pem`), requires a client certificate signed by that
//! CA (QEMU's `verify-peer=on`) and can restrict the certificate's distinguished name like
//! QEMU's `tls-authz`. Towards a destination that itself expects TLS (libvirt's `--tls`)
//! it is the client, with `client-cert.pem`/`client-key.pem` from the host's QEMU
//! credentials. The sidecar decrypts in between because it must parse the stream; nothing
//! leaves it unencrypted on a network.
//!
//! QEMU closes its TLS channels without a `close_notify` alert: [`EofAsEnd`] turns that
//! into a plain end of stream. A truncation cannot pass for a complete migration: the
//! stream itself says when it ends (its `EOF` section), and an end anywhere else is a cut.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::session::admission::DistinguishedName;

/// Where libvirt keeps QEMU's migration credentials unless `migrate_tls_x509_cert_dir`
/// says otherwise (libvirt's qemu.conf default).
pub const LIBVIRT_QEMU_CREDS: &str = "/etc/pki/qemu";

/// Why TLS credentials could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file is missing or unreadable.
    #[error("TLS credentials: reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A credentials file is not what it should hold.
    #[error("TLS credentials: {path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// rustls refused the combination (key not matching the certificate, ...).
    #[error("TLS credentials in {dir}: {why}")]
    Config {
        /// The credentials directory.
        dir: PathBuf,
        /// rustls's reason.
        why: String,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let v = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_path_buf(),
            why: format!("not PEM certificates: {e}"),
        })?;
    if v.is_empty() {
        return Err(TlsError::Invalid {
            path: path.to_path_buf(),
            why: "no certificate in it".into(),
        });
    }
    Ok(v)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read_file(path)?).map_err(|e| TlsError::Invalid {
        path: path.to_path_buf(),
        why: format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store.add(c).map_err(|e| TlsError::Invalid {
            path: path.to_path_buf(),
            why: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(store))
}

/// The sidecar's TLS server towards the source.
#[derive(Clone)]
pub struct SourceTls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// Client names allowed to be the source (QEMU's `tls-authz`); any name the CA
    /// signed, if empty.
    pub allowed: Vec<DistinguishedName>,
    /// Whether the source must present a certificate (QEMU's `verify-peer`).
    pub verify_peer: bool,
}

impl std::fmt::Debug for SourceTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceTls")
            .field("allowed", &self.allowed)
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

impl SourceTls {
    /// Loads a server credentials directory in QEMU's `tls-creds-x509 endpoint=server`
    /// layout. With `verify_peer`, a client certificate signed by `ca-cert.pem` (and not
    /// revoked by `ca-crl.pem`, when present) is required.
    pub fn load(
        dir: &Path,
        verify_peer: bool,
        allowed: Vec<DistinguishedName>,
    ) -> Result<SourceTls, TlsError> {
        let chain = certs(&dir.join("server-cert.pem"))?;
        let key = key(&dir.join("server-key.pem"))?;
        let verifier = if verify_peer {
            let mut b = WebPkiClientVerifier::builder_with_provider(
                roots(&dir.join("ca-cert.pem"))?,
                provider(),
            );
            let crl = dir.join("ca-crl.pem");
            if crl.exists() {
                let pem = read_file(&crl)?;
                let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| TlsError::Invalid {
                        path: crl.clone(),
                        why: format!("not PEM CRLs: {e}"),
                    })?;
                b = b.with_crls(crls);
            }
            b.build().map_err(|e| TlsError::Config {
                dir: dir.to_path_buf(),
                why: e.to_string(),
            })?
        } else {
            WebPkiClientVerifier::no_client_auth()
        };
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                dir: dir.to_path_buf(),
                why: e.to_string(),
            })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config {
                dir: dir.to_path_buf(),
                why: e.to_string(),
            })?;
        // QEMU never resumes a TLS session; tickets would only sit unread in the socket of a
        // channel the source never reads (the preempt channel).
        config.send_tls13_tickets = 0;
        Ok(SourceTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            allowed,
            verify_peer,
        })
    }

    /// Runs the server handshake on an accepted connection. `Ok` carries the stream and
    /// the client certificate's subject; `Err` says why the peer is refused (a failed
    /// handshake, or a name not in the allowed list).
    pub async fn accept<S>(
        &self,
        stream: S,
    ) -> Result<
        (
            tokio_rustls::server::TlsStream<S>,
            Option<DistinguishedName>,
        ),
        String,
    >
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = self
            .acceptor
            .accept(stream)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let name = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => Some(subject(cert).map_err(|e| format!("its certificate: {e}"))?),
            None => None,
        };
        if !self.allowed.is_empty() {
            match &name {
                Some(n) if self.allowed.iter().any(|a| a.matches(n)) => {}
                Some(n) => return Err(format!("its certificate's name {n} is not allowed")),
                None => return Err("no client certificate, and names are restricted".into()),
            }
        }
        Ok((tls, name))
    }
}

/// A certificate's subject, as a [`DistinguishedName`].
pub fn subject(cert: &CertificateDer<'_>) -> Result<DistinguishedName, String> {
    use x509_parser::prelude::*;
    let (_, c) = X509Certificate::from_der(cert.as_ref()).map_err(|e| e.to_string())?;
    let registry = x509_parser::objects::oid_registry();
    let mut pairs = Vec::new();
    for attr in c.subject().iter_attributes() {
        let ty = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
            .map(str::to_owned)
            .unwrap_or_else(|_| attr.attr_type().to_id_string());
        let value = attr
            .as_str()
            .map(str::to_owned)
            .map_err(|_| format!("a {ty} attribute that is not a string"))?;
        pairs.push((ty, value));
    }
    Ok(DistinguishedName::from_pairs(pairs))
}

/// The sidecar's TLS client towards a destination QEMU that expects TLS.
#[derive(Clone)]
pub struct DestinationTls {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for DestinationTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationTls")
            .field("name", &self.name)
            .finish()
    }
}

impl DestinationTls {
    /// Loads client credentials in QEMU's `tls-creds-x509 endpoint=client` layout
    /// (`ca-cert.pem`, and `client-cert.pem` + `client-key.pem` when present). The
    /// destination's certificate is checked against `name`; without one, against the name
    /// in this host's own `server-cert.pem` in the same directory, which is the
    /// certificate a local destination QEMU presents.
    pub fn load(dir: &Path, name: Option<&str>) -> Result<DestinationTls, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                dir: dir.to_path_buf(),
                why: e.to_string(),
            })?
            .with_root_certificates(roots(&dir.join("ca-cert.pem"))?);
        let cert = dir.join("client-cert.pem");
        let config = if cert.exists() {
            builder
                .with_client_auth_cert(certs(&cert)?, key(&dir.join("client-key.pem"))?)
                .map_err(|e| TlsError::Config {
                    dir: dir.to_path_buf(),
                    why: e.to_string(),
                })?
        } else {
            builder.with_no_client_auth()
        };
        let name = match name {
            Some(n) => n.to_string(),
            None => server_cert_name(&dir.join("server-cert.pem"))?,
        };
        let name = ServerName::try_from(name.clone()).map_err(|e| TlsError::Config {
            dir: dir.to_path_buf(),
            why: format!("{name:?} is not a server name: {e}"),
        })?;
        Ok(DestinationTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            name,
        })
    }

    /// Runs the client handshake over a connection to the destination.
    pub async fn connect<S>(&self, stream: S) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.connector.connect(self.name.clone(), stream).await
    }
}

/// The first name a server certificate is valid for: a DNS name, else an IP address,
/// else its common name.
fn server_cert_name(path: &Path) -> Result<String, TlsError> {
    use x509_parser::prelude::*;
    let invalid = |why: String| TlsError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    let first = certs(path)?.remove(0);
    let (_, c) = X509Certificate::from_der(first.as_ref()).map_err(|e| invalid(e.to_string()))?;
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => return Ok(d.to_string()),
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    let a: [u8; 4] = (*b).try_into().expect("length checked");
                    return Ok(std::net::Ipv4Addr::from(a).to_string());
                }
                GeneralName::IPAddress(b) if b.len() == 16 => {
                    let a: [u8; 16] = (*b).try_into().expect("length checked");
                    return Ok(std::net::Ipv6Addr::from(a).to_string());
                }
                _ => {}
            }
        }
    }
    c.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| invalid("no DNS name, address or common name to check the destination against; give --destination-tls-name".into()))
}

/// Reads a TLS stream whose peer (QEMU) ends it without `close_notify`: that end is an end
/// of stream like a TCP FIN, judged by the stream's content above.
pub struct EofAsEnd<R>(pub R);

impl<R: AsyncRead + Unpin> AsyncRead for EofAsEnd<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.0).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
            other => other,
        }
    }
}
