//! Public keys fetched from an identity provider's JWKS endpoint
//! (`HERALD_JWT_JWKS_URL`), so keys it rotates in are accepted without a
//! restart.
//!
//! The first fetch happens at start and must succeed (the node would
//! otherwise refuse every public-key token). After that the set is fetched
//! again every `HERALD_JWT_JWKS_REFRESH`, and at once when a token names a
//! `kid` the set does not hold — at most once per [`MIN_GAP`], so tokens
//! with made-up `kid`s cannot turn a node into a load on the provider; a
//! request that waits for such a fetch waits at most its timeout
//! ([`FETCH_TIMEOUT`]). A fetch that fails keeps the set in use; a fetched
//! set that does not parse is refused the same way.
//!
//! An `https://` endpoint is only ever fetched over TLS: a redirect to
//! `http://` is refused, not followed. Its certificate must chain to the
//! built-in web PKI roots, or to `HERALD_JWT_JWKS_CA` when that is set (a
//! provider inside the organisation, signed by its own CA).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use rustls_pki_types::CertificateDer;

use super::{KeyFileError, KeySet};
use crate::telemetry::{Metrics, Outcome};

/// Shortest time between two fetches asked for by unknown `kid`s.
pub const MIN_GAP: Duration = Duration::from_secs(1);
/// Longest a fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted.
const MAX_BYTES: usize = 1024 * 1024;

/// The key set in use and how to fetch it again. Cheap to share.
pub struct RemoteKeys {
    url: String,
    client: reqwest::Client,
    current: RwLock<Arc<KeySet>>,
    /// When the last fetch finished (successful or not); held while fetching,
    /// so concurrent callers wait for one fetch instead of each starting one.
    fetched: Mutex<Instant>,
    metrics: Arc<Metrics>,
}

impl RemoteKeys {
    /// Fetches the set once (an error if that fails) and starts refreshing
    /// it every `every` until `stop`. `ca`: the CA certificates an https
    /// endpoint's certificate must chain to (empty: the built-in roots).
    pub async fn start(
        url: &str,
        ca: &[CertificateDer<'static>],
        every: Duration,
        stop: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<RemoteKeys>, KeyFileError> {
        let client = client(url, ca).map_err(|e| KeyFileError::Fetch(url.into(), e.to_string()))?;
        let first = fetch(&client, url).await;
        count(&metrics, first.is_ok());
        let first = first?;
        let keys = Arc::new(RemoteKeys {
            url: url.into(),
            client,
            current: RwLock::new(Arc::new(first)),
            fetched: Mutex::new(Instant::now()),
            metrics,
        });
        tokio::spawn(refresh_loop(keys.clone(), every, stop));
        Ok(keys)
    }

    /// The set in use.
    pub fn current(&self) -> Arc<KeySet> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Fetches the set again unless another fetch finished less than
    /// [`MIN_GAP`] ago. `true` when the set may have changed since `asked`
    /// (this call or a concurrent one fetched): worth verifying again.
    pub async fn refresh_for_unknown_kid(&self, asked: Instant) -> bool {
        let mut fetched = self.fetched.lock().await;
        if *fetched > asked {
            return true;
        }
        if fetched.elapsed() < MIN_GAP {
            return false;
        }
        self.refresh(&mut fetched, "a token named a kid the key set does not hold").await;
        true
    }

    async fn refresh(&self, fetched: &mut Instant, why: &str) {
        let result = fetch(&self.client, &self.url).await;
        count(&self.metrics, result.is_ok());
        match result {
            Ok(set) => {
                let kids = set.kids();
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                tracing::debug!(url = %self.url, ?kids, why, "JWKS fetched");
            }
            Err(e) => tracing::warn!(error = %e, why, "JWKS fetch failed; the keys fetched before stay in use"),
        }
        *fetched = Instant::now();
    }
}

/// Whether `url` is an `https://` URL.
pub fn is_https(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| u.scheme() == "https")
}

/// The HTTP client for `url`: never leaves TLS once on it.
fn client(url: &str, ca: &[CertificateDer<'static>]) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().timeout(FETCH_TIMEOUT).https_only(is_https(url));
    if !ca.is_empty() {
        builder = builder.tls_built_in_root_certs(false);
        for cert in ca {
            builder = builder.add_root_certificate(reqwest::Certificate::from_der(cert)?);
        }
    }
    builder.build()
}

/// `error` and its sources, one after another: reqwest's own text names
/// only the URL, the cause (a certificate refused, a redirect to http) is
/// further down.
fn with_causes(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        text = format!("{text}: {e}");
        cause = e.source();
    }
    crate::tls::with_certificate_hint(text, "HERALD_JWT_JWKS_CA")
}

/// `herald_jwks_fetches_total{outcome}`.
fn count(metrics: &Metrics, ok: bool) {
    metrics.jwks_fetches.get_or_create(&Outcome { outcome: if ok { "ok" } else { "failed" } }).inc();
}

async fn refresh_loop(keys: Arc<RemoteKeys>, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let mut fetched = keys.fetched.lock().await;
        keys.refresh(&mut fetched, "periodic refresh").await;
    }
}

/// GETs and parses the JWKS at `url`.
async fn fetch(client: &reqwest::Client, url: &str) -> Result<KeySet, KeyFileError> {
    let failed = |why: String| KeyFileError::Fetch(url.into(), why);
    let mut response = client.get(url).send().await.map_err(|e| failed(with_causes(&e)))?;
    if !response.status().is_success() {
        return Err(failed(format!("answered {}", response.status())));
    }
    if response.content_length().is_some_and(|n| n > MAX_BYTES as u64) {
        return Err(failed(format!("the document is larger than {MAX_BYTES} bytes")));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(with_causes(&e)))? {
        if body.len() + chunk.len() > MAX_BYTES {
            return Err(failed(format!("the document is larger than {MAX_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(body).map_err(|_| failed("the document is not UTF-8".into()))?;
    let (keys, skipped) = KeySet::from_provider_jwks(&text).map_err(|e| failed(e.to_string()))?;
    if !skipped.is_empty() {
        tracing::debug!(url, ?skipped, "JWKS keys not used for verifying tokens");
    }
    Ok(keys)
}
