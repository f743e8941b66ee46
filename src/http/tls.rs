//! TLS for the HTTPS listeners and the HTTP/3 endpoint: certificate loading with rustls
//! (ring provider), ALPN (`h2`, `http/1.1` over TCP; `h3` over QUIC), and reloading the
//! certificate in place (SIGHUP) without dropping connections.
//!
//! Both protocol configurations are built once around one certificate resolver; a reload
//! swaps the resolver's certificate, so TCP and QUIC handshakes that start afterwards
//! present the new one and connections already open keep theirs.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The current TLS configuration; cheap to clone, reloadable.
#[derive(Clone)]
pub struct TlsSettings {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
}

/// Hands every handshake the certificate loaded last.
#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|k| Arc::clone(&k))
    }
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> io::Result<Arc<CertifiedKey>> {
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
    let certified = CertifiedKey::from_der(certs, key_der, provider)
        .map_err(|e| bad("certificate and key do not fit", cert, &e))?;
    Ok(Arc::new(certified))
}

impl TlsSettings {
    pub fn load(cert: &Path, key: &Path) -> io::Result<TlsSettings> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver = Arc::new(Resolver(RwLock::new(load(cert, key, &provider)?)));
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| io::Error::other(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsSettings {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider,
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Re-reads the certificate and key. On error the old ones stay in use.
    pub fn reload(&self) -> io::Result<()> {
        let fresh = load(&self.cert, &self.key, &self.provider)?;
        let mut cur = self
            .resolver
            .0
            .write()
            .map_err(|_| io::Error::other("TLS state poisoned"))?;
        *cur = fresh;
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// The TLS configuration of the HTTP/3 endpoint: TLS 1.3 only (QUIC requires it),
    /// ALPN `h3`, no 0-RTT (early data could be replayed), the same reloadable
    /// certificate.
    pub fn quic(&self) -> io::Result<quinn::crypto::rustls::QuicServerConfig> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| io::Error::other(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.resolver.clone());
        config.alpn_protocols = vec![b"h3".to_vec()];
        config.max_early_data_size = 0;
        quinn::crypto::rustls::QuicServerConfig::try_from(config)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}
