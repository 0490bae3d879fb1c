//! The crate's one error type, and how transport errors are sorted into it.

use herald_protocol::http::ErrorBody;
use tokio_tungstenite::tungstenite;

/// A boxed error, as returned by a [`TokenProvider`](crate::TokenProvider).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server refused the handshake or an HTTP call with the spec's error
    /// body; `retry_after` is its `Retry-After` (429 and 503 carry one), which
    /// [`Client`](crate::Client) waits at least before trying again.
    #[error("HTTP {status}: {code}: {message}")]
    #[non_exhaustive]
    Refused { status: u16, code: String, message: String, retry_after: Option<std::time::Duration> },
    /// The server closed the session.
    #[error("closed with {code}: {reason}")]
    Closed { code: u16, reason: String },
    #[error("websocket: {0}")]
    WebSocket(#[source] tungstenite::Error),
    #[error("http: {0}")]
    Http(#[source] reqwest::Error),
    #[error("unexpected frame: {0}")]
    Protocol(String),
    /// TLS failed: an untrusted or invalid server certificate, a bad root
    /// certificate given to [`TlsOptions`](crate::TlsOptions), or a handshake error.
    #[error("TLS: {0}")]
    Tls(String),
    /// The server answered a frame of ours with an `error` frame
    /// (e.g. `unavailable` for a read mark it could not store; retry).
    #[error("rejected: {code}: {message}")]
    Rejected { code: String, message: String },
    /// The token provider failed.
    #[error("token provider: {0}")]
    Token(#[source] BoxError),
    /// A [`ClientBuilder`](crate::ClientBuilder) setting is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Connecting took longer than the connect timeout.
    #[error("timed out connecting")]
    Timeout,
    /// The [`Client`](crate::Client) has stopped: closed, or ended by an error.
    #[error("the client has stopped")]
    Stopped,
}

impl From<tungstenite::Error> for Error {
    fn from(e: tungstenite::Error) -> Error {
        match &e {
            tungstenite::Error::Tls(tls) => Error::Tls(tls.to_string()),
            tungstenite::Error::Io(io) => match rustls_cause(io) {
                Some(tls) => Error::Tls(describe(tls)),
                None => Error::WebSocket(e),
            },
            _ => Error::WebSocket(e),
        }
    }
}

impl From<reqwest::Error> for Error {
    fn from(e: reqwest::Error) -> Error {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = cause {
            if let Some(tls) = as_rustls(err) {
                return Error::Tls(describe(tls));
            }
            cause = err.source();
        }
        Error::Http(e)
    }
}

/// A rustls error, directly or inside an `io::Error` (whose `source()` skips
/// the error it wraps, so the chain walk has to look inside).
fn as_rustls<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    err.downcast_ref::<std::io::Error>().and_then(rustls_cause)
}

/// Looks inside an `io::Error`, through any nesting (hyper wraps tokio-rustls's `io::Error` in another).
fn rustls_cause(io: &std::io::Error) -> Option<&rustls::Error> {
    let inner: &(dyn std::error::Error + 'static) = io.get_ref()?;
    as_rustls(inner).or_else(|| inner.source().and_then(as_rustls))
}

fn describe(tls: &rustls::Error) -> String {
    match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            format!(
                "{tls} (the server's certificate is not signed by a trusted root; add its CA with root_certificate)"
            )
        }
        _ => tls.to_string(),
    }
}

/// An error answer: the spec's body when it parses, else the raw text, with
/// its `Retry-After` in seconds (an HTTP date is not read).
pub(crate) fn refusal(status: u16, headers: &tungstenite::http::HeaderMap, body: &[u8]) -> Error {
    let retry_after = headers
        .get(tungstenite::http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(std::time::Duration::from_secs);
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => Error::Refused { status, code: b.error.code, message: b.error.message, retry_after },
        Err(_) => Error::Refused {
            status,
            code: String::new(),
            message: String::from_utf8_lossy(body).into_owned(),
            retry_after,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[test]
    fn tls_failures_are_found_inside_nested_io_errors() {
        let unknown = || rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let direct = Error::from(tungstenite::Error::Io(io::Error::new(io::ErrorKind::InvalidData, unknown())));
        assert!(matches!(&direct, Error::Tls(m) if m.contains("root_certificate")), "{direct}");
        let nested = io::Error::other(io::Error::new(io::ErrorKind::InvalidData, unknown()));
        assert!(matches!(Error::from(tungstenite::Error::Io(nested)), Error::Tls(_)));
        let plain = Error::from(tungstenite::Error::Io(io::Error::from(io::ErrorKind::ConnectionRefused)));
        assert!(matches!(plain, Error::WebSocket(_)));
    }

    #[test]
    fn refusals_read_the_spec_body_and_retry_after() {
        let none = tungstenite::http::HeaderMap::new();
        let e = refusal(401, &none, br#"{"error":{"code":"token_expired","message":"expired"}}"#);
        assert!(matches!(e, Error::Refused { status: 401, code, retry_after: None, .. } if code == "token_expired"));
        let e = refusal(502, &none, b"bad gateway");
        assert!(
            matches!(e, Error::Refused { status: 502, code, message, .. } if code.is_empty() && message == "bad gateway")
        );
        let mut headers = tungstenite::http::HeaderMap::new();
        headers.insert(tungstenite::http::header::RETRY_AFTER, tungstenite::http::HeaderValue::from_static("5"));
        let e = refusal(503, &headers, br#"{"error":{"code":"node_full","message":"full"}}"#);
        assert!(matches!(e, Error::Refused { retry_after: Some(d), .. } if d == std::time::Duration::from_secs(5)));
        headers.insert(
            tungstenite::http::header::RETRY_AFTER,
            tungstenite::http::HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert!(matches!(refusal(503, &headers, b""), Error::Refused { retry_after: None, .. }));
    }
}
