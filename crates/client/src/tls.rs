//! TLS for `tls://` and `wss://`: which roots to trust (the system's by default, or a
//! private CA's) and the connector built from them, made once per builder and shared by its
//! reconnects. Nothing here knows about frames.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::{Error, ErrorKind};

/// The roots a builder trusts, with the connector made from them on first use.
#[derive(Clone, Default)]
pub(crate) struct Roots {
    /// A PEM file of CA certificates; `None`: the system's roots.
    ca: Option<PathBuf>,
    connector: Arc<OnceLock<Result<TlsConnector, String>>>,
}

impl std::fmt::Debug for Roots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Roots").field("ca", &self.ca).finish()
    }
}

impl Roots {
    pub(crate) fn from_file(ca: PathBuf) -> Roots {
        Roots {
            ca: Some(ca),
            connector: Default::default(),
        }
    }

    /// TLS over `sock`, checking the certificate against `host`.
    pub(crate) async fn connect(
        &self,
        host: &str,
        sock: TcpStream,
    ) -> Result<TlsStream<TcpStream>, Error> {
        let connector = self
            .connector
            .get_or_init(|| self.make().map_err(|e| e.to_string()))
            .clone()
            .map_err(|e| Error::new(ErrorKind::Config, e))?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| Error::new(ErrorKind::Config, format!("bad TLS name {host:?}: {e}")))?;
        connector
            .connect(name, sock)
            .await
            .map_err(|e| Error::new(ErrorKind::Connect, format!("TLS with {host}: {e}")))
    }

    fn make(&self) -> Result<TlsConnector, Error> {
        let config_err = |what: String| Error::new(ErrorKind::Config, what);
        let mut roots = RootCertStore::empty();
        match &self.ca {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| config_err(format!("reading CA {}: {e}", path.display())))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(config_err(format!(
                        "no CA certificate in {}",
                        path.display()
                    )));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(config_err(format!(
                        "no system root certificates found ({:?}); name a CA file",
                        found.errors
                    )));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config_err(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsConnector::from(Arc::new(config)))
    }
}
