//! TLS for the listeners (docs/protocol.md, "TLS and slow clients"): the certificate chain
//! and private key from PEM files, re-read on SIGHUP so a renewed certificate is served
//! without a restart.
//!
//! Connections opened before a reload keep the certificate they shook hands with; only new
//! handshakes see the new one. A reload that fails (a missing file, a key that does not
//! match) keeps the certificate in use and says why. This module knows nothing of what runs
//! inside the TLS stream.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the TLS certificate {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("reading the TLS key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the TLS key {key} does not belong to the certificate {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The TLS side of both listeners: one acceptor, one reloadable certificate.
pub struct Tls {
    certs: Arc<Reloadable>,
    acceptor: TlsAcceptor,
}

impl Tls {
    /// Loads `cert` (a PEM chain, leaf first) and `key` (a PEM private key: PKCS#8, PKCS#1 or
    /// SEC1), checking that they belong together.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = certified_key(&provider, cert, key)?;
        let certs = Arc::new(Reloadable {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider: provider.clone(),
            current: RwLock::new(Arc::new(current)),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        // HTTP/1.1 only: WebSocket upgrades and SSE are HTTP/1.1 here (decisions.md).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            certs,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Reads both files again; new handshakes use them from now on.
    pub fn reload(&self) -> Result<(), TlsError> {
        let c = &self.certs;
        let fresh = certified_key(&c.provider, &c.cert, &c.key)?;
        *c.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(())
    }

    /// The server side of the handshake on `sock`, within `timeout`; `None` (logged at
    /// debug) when it fails or takes longer.
    pub async fn accept<S>(&self, sock: S, timeout: Duration) -> Option<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(timeout, self.acceptor.accept(sock)).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "tls handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!("tls handshake timed out");
                None
            }
        }
    }
}

/// The certificate in use, swapped by a reload.
#[derive(Debug)]
struct Reloadable {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn certified_key(
    provider: &CryptoProvider,
    cert: &Path,
    key: &Path,
) -> Result<CertifiedKey, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: cert.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no CERTIFICATE block in it".into()));
    }
    let key_err = |reason: String| TlsError::Key {
        path: key.to_owned(),
        reason,
    };
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| key_err(e.to_string()))?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| key_err(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError::Mismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(certified)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn a_pair_loads_and_bad_files_say_which_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "a");
        let (_, other_key) = write_pair(dir.path(), "b");
        assert!(Tls::load(&cert, &key).is_ok());

        let missing = dir.path().join("missing.crt");
        let e = Tls::load(&missing, &key).err().unwrap();
        assert!(matches!(e, TlsError::Cert { .. }), "{e}");
        assert!(e.to_string().contains("missing.crt"), "{e}");

        let e = Tls::load(&key, &key).err().unwrap();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");

        let e = Tls::load(&cert, &cert).err().unwrap();
        assert!(matches!(e, TlsError::Key { .. }), "{e}");

        let e = Tls::load(&cert, &other_key).err().unwrap();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
    }

    #[test]
    fn a_failed_reload_keeps_the_certificate_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "a");
        let tls = Tls::load(&cert, &key).unwrap();
        let before = tls.certs.current.read().unwrap().cert.clone();
        std::fs::write(&cert, "not a certificate").unwrap();
        assert!(tls.reload().is_err());
        assert_eq!(tls.certs.current.read().unwrap().cert, before);

        let (new_cert, new_key) = write_pair(dir.path(), "b");
        std::fs::rename(new_cert, &cert).unwrap();
        std::fs::rename(new_key, &key).unwrap();
        tls.reload().unwrap();
        assert_ne!(tls.certs.current.read().unwrap().cert, before);
    }
}
