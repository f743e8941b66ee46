//! TLS for the HTTPS listeners: certificate loading with rustls (ring provider), ALPN for
//! HTTP/2, and reloading certificates in place (SIGHUP) without dropping connections.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The current TLS configuration; cheap to clone, reloadable.
#[derive(Clone)]
pub struct TlsSettings {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<RwLock<TlsAcceptor>>,
}

fn load(cert: &Path, key: &Path) -> io::Result<TlsAcceptor> {
    let bad = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} {}: {e}", p.display()),
        )
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("cannot read certificate", cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad("invalid certificate", cert, &e))?;
    if certs.is_empty() {
        return Err(bad("no certificate in", cert, &"empty file"));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| bad("cannot read private key", key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::other(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| bad("certificate and key do not fit", cert, &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl TlsSettings {
    pub fn load(cert: &Path, key: &Path) -> io::Result<TlsSettings> {
        Ok(TlsSettings {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: Arc::new(RwLock::new(load(cert, key)?)),
        })
    }

    /// Re-reads the certificate and key. On error the old ones stay in use.
    pub fn reload(&self) -> io::Result<()> {
        let fresh = load(&self.cert, &self.key)?;
        let mut cur = self
            .current
            .write()
            .map_err(|_| io::Error::other("TLS state poisoned"))?;
        *cur = fresh;
        Ok(())
    }

    pub fn acceptor(&self) -> Option<TlsAcceptor> {
        self.current.read().ok().map(|a| a.clone())
    }
}
