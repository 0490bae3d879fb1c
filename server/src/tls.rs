//! Native TLS (`HERALD_TLS_CERT` / `HERALD_TLS_KEY`): https and wss on the
//! node's one port, with rustls.
//!
//! [`TlsListener`] feeds [`crate::listen::serve`] as the plain listener
//! does. One task accepts TCP connections (each taking its slot under
//! `HERALD_MAX_CONNECTIONS` first) and runs each TLS handshake in a task of its own,
//! bounded in number and in time, so a slow or silent client (slowloris)
//! never holds up the accept loop or anyone else's handshake. Finished
//! handshakes wait in a bounded queue for the server to take them.
//!
//! The certificate files are read again when they change (checked every
//! `HERALD_TLS_RELOAD_INTERVAL`), so a renewed certificate is served without
//! a restart; a renewal that cannot be read is logged and the old one kept.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::ring::default_provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::listen::{Accept, Listener, Slot};

/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; further connections wait to be accepted.
const HANDSHAKES: usize = 1024;
/// Finished handshakes waiting for the HTTP server.
const READY_QUEUE: usize = 256;

/// Where the certificate and key come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often the files are checked for a renewal.
    pub reload_every: Duration,
}

impl TlsFiles {
    /// Reads and checks both files: a PEM chain (leaf first) and a PEM
    /// private key (PKCS#8, PKCS#1 or SEC1) that belongs to the leaf.
    pub fn load(&self) -> Result<Arc<CertifiedKey>, String> {
        read_pair(&self.cert, &self.key)
    }

    fn modified(&self) -> Option<(SystemTime, SystemTime)> {
        let at = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((at(&self.cert)?, at(&self.key)?))
    }
}

/// The bytes of `path`.
pub fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The PEM certificates in `path`: at least one, every one readable.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    certificates(path, &read_file(path)?)
}

/// The PEM certificates in `pem`, read from `path`: at least one.
pub fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// A PEM chain (leaf first) in `cert` and the PEM private key (PKCS#8,
/// PKCS#1 or SEC1) in `key` that belongs to its leaf.
pub fn read_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    pair((cert, &read_file(cert)?), (key, &read_file(key)?))
}

/// [`read_pair`] on contents already read: each with the path it came from.
pub fn pair((cert, cert_pem): (&Path, &[u8]), (key, key_pem): (&Path, &[u8])) -> Result<Arc<CertifiedKey>, String> {
    let chain = certificates(cert, cert_pem)?;
    let private = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let certified = CertifiedKey::from_der(chain, private, &default_provider())
        .map_err(|e| format!("{} and {} do not form a usable pair: {e}", cert.display(), key.display()))?;
    Ok(Arc::new(certified))
}

/// `error` (a failed connection to PostgreSQL, Redis or the JWKS endpoint)
/// with what to do when it is a certificate this node cannot verify; `trust`
/// names the setting that makes it trust the server's CA. Their clients wrap
/// rustls' error in their own, so its text is what is left.
pub fn with_certificate_hint(error: String, trust: &str) -> String {
    if error.contains("UnknownIssuer") {
        format!("{error} (the server's certificate is not signed by a CA this node trusts: name the CA with {trust})")
    } else if error.contains("NotValidForName") {
        format!("{error} (the server's certificate does not name the host in the URL: connect by a name it lists)")
    } else {
        error
    }
}

/// The certificate being served, swapped when the files change.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// A TLS server configuration for `files`, and the task that reloads them.
pub struct Tls {
    config: Arc<ServerConfig>,
    current: Arc<Current>,
    files: TlsFiles,
}

impl Tls {
    pub fn new(files: &TlsFiles) -> Result<Tls, String> {
        let current = Arc::new(Current(RwLock::new(files.load()?)));
        let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls { config: Arc::new(config), current, files: files.clone() })
    }

    /// Wraps `accept`: the returned listener yields finished TLS streams.
    pub fn listen(self, accept: Accept) -> TlsListener {
        let (ready, rx) = mpsc::channel(READY_QUEUE);
        let acceptor = TlsAcceptor::from(self.config);
        tokio::spawn(accept_loop(accept, acceptor, ready.clone()));
        tokio::spawn(reload_loop(self.files, self.current, ready));
        TlsListener { ready: rx }
    }
}

/// A connection whose TLS handshake has finished, with its peer and slot.
type Ready = (TlsStream<TcpStream>, SocketAddr, Slot);

/// Yields TLS streams whose handshake has finished; see the module doc.
pub struct TlsListener {
    ready: mpsc::Receiver<Ready>,
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;

    async fn accept(&mut self) -> Ready {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept loop only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }
}

async fn accept_loop(mut accept: Accept, acceptor: TlsAcceptor, ready: mpsc::Sender<Ready>) {
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
    loop {
        let handshake = tokio::select! {
            _ = ready.closed() => return,
            handshake = handshakes.clone().acquire_owned() => handshake.expect("the semaphore is never closed"),
        };
        let (tcp, peer, slot) = tokio::select! {
            _ = ready.closed() => return,
            accepted = accept.next() => accepted,
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    drop(handshake);
                    let _ = ready.send((stream, peer, slot)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

async fn reload_loop(files: TlsFiles, current: Arc<Current>, ready: mpsc::Sender<Ready>) {
    let mut seen = files.modified();
    loop {
        tokio::select! {
            _ = ready.closed() => return,
            _ = tokio::time::sleep(files.reload_every) => {}
        }
        let now = files.modified();
        if now == seen {
            continue;
        }
        match files.load() {
            Ok(certified) => {
                *current.0.write().unwrap_or_else(|e| e.into_inner()) = certified;
                seen = now;
                tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "the TLS files changed but cannot be used; keeping the old certificate")
            }
        }
    }
}
