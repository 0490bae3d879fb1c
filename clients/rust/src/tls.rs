//! TLS for `wss://` and `https://`: rustls with the *ring* provider, chosen
//! explicitly so that no process-wide provider has to be installed.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::Error;

/// Which certificates a client trusts.
///
/// By default: the Mozilla roots of `webpki-roots`. Add a private CA (or a
/// self-signed server certificate) with [`root_certificate`](Self::root_certificate).
/// The PEM is checked when a connection or an HTTP client is built.
///
/// ```
/// use herald_client::{Connect, Publisher, TlsOptions};
/// # fn demo() -> Result<(), herald_client::Error> {
/// let ca = b"-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n".to_vec();
/// let tls = TlsOptions::new().root_certificate(ca);
/// let connect = Connect::new("wss://herald.internal", "<user jwt>").tls(tls.clone());
/// let publisher = Publisher::with_tls("https://herald.internal", "<api key>", &tls)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TlsOptions {
    extra_roots: Vec<Vec<u8>>,
    default_roots: bool,
}

impl Default for TlsOptions {
    fn default() -> TlsOptions {
        TlsOptions { extra_roots: Vec::new(), default_roots: true }
    }
}

impl TlsOptions {
    pub fn new() -> TlsOptions {
        TlsOptions::default()
    }

    /// Also trusts the certificates in `pem` (one or more `CERTIFICATE` blocks).
    pub fn root_certificate(mut self, pem: impl Into<Vec<u8>>) -> TlsOptions {
        self.extra_roots.push(pem.into());
        self
    }

    /// Whether the `webpki-roots` certificates are trusted (default `true`).
    /// Turn them off to trust only the certificates you add.
    pub fn default_roots(mut self, on: bool) -> TlsOptions {
        self.default_roots = on;
        self
    }

    /// The rustls configuration these options describe.
    pub(crate) fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        let mut roots = RootCertStore::empty();
        if self.default_roots {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for pem in &self.extra_roots {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Tls(format!("root certificate: {e}")))?;
            if certs.is_empty() {
                return Err(Error::Tls("root certificate: no CERTIFICATE block in the PEM".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| Error::Tls(format!("root certificate: {e}")))?;
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// An HTTP client using the same trust.
    pub(crate) fn http_client(&self) -> Result<reqwest::Client, Error> {
        let config = (*self.client_config()?).clone();
        reqwest::Client::builder().use_preconfigured_tls(config).build().map_err(Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_options_build() {
        TlsOptions::new().client_config().unwrap();
        TlsOptions::new().http_client().unwrap();
    }

    #[test]
    fn a_root_that_is_not_pem_is_a_tls_error() {
        let err = TlsOptions::new().root_certificate("not a certificate").client_config().unwrap_err();
        assert!(matches!(&err, Error::Tls(m) if m.contains("no CERTIFICATE")), "{err}");
        let garbled = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = TlsOptions::new().root_certificate(garbled).client_config().unwrap_err();
        assert!(matches!(err, Error::Tls(_)), "{err}");
    }
}
