//! One error type at the HTTP edge: each variant a status and a stable code,
//! answered with the spec's body `{"error":{"code","message"}}`. Internal
//! details never reach the client; [`log_errors`] logs them.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_protocol::http::{ErrorBody, ErrorDetail};

use crate::auth::AuthError;
use crate::limit::Decision;
use crate::store::StoreError;
use crate::telemetry::LogSampler;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    /// A rate limit's state, sent as `X-RateLimit-*`.
    pub rate: Option<Box<Decision>>,
    /// Logged, never sent.
    internal: Option<String>,
}

/// Carried from [`ApiError::into_response`] to [`log_errors`].
#[derive(Clone)]
struct Logged {
    code: &'static str,
    internal: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after: None, rate: None, internal: None }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 503 with `Retry-After: 1`.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { retry_after: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message) }
    }

    pub fn draining() -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "this node is shutting down; connect to another")
        }
    }

    /// 429 `rate_limited`, with `Retry-After` and, for a rate, `X-RateLimit-*`.
    pub fn rate_limited(message: impl Into<String>, retry_after_secs: u64, rate: Option<Decision>) -> ApiError {
        ApiError {
            retry_after: Some(retry_after_secs),
            rate: rate.map(Box::new),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        }
    }

    /// The same error, with `Retry-After: secs`.
    pub fn with_retry_after(self, secs: u64) -> ApiError {
        ApiError { retry_after: Some(secs), ..self }
    }

    /// The same error, carrying `rate`'s headers.
    pub fn with_rate(self, rate: Option<Decision>) -> ApiError {
        ApiError { rate: rate.map(Box::new).or(self.rate), ..self }
    }

    pub fn internal(detail: impl Into<String>) -> ApiError {
        ApiError {
            internal: Some(detail.into()),
            ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "something went wrong on our side")
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(detail) => ApiError {
                retry_after: Some(1),
                internal: Some(detail),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store is not answering; nothing was changed, retry",
                )
            },
            StoreError::Internal(detail) => Self::internal(detail),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing => Self::unauthorized("missing_token", "a user token is required"),
            AuthError::Expired => Self::unauthorized("token_expired", e.to_string()),
            AuthError::Invalid(_) => Self::unauthorized("invalid_token", e.to_string()),
            AuthError::Revoked => Self::unauthorized("token_revoked", e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code.into(), message: self.message } };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(rate) = &self.rate {
            rate_headers(response.headers_mut(), rate);
        }
        response.extensions_mut().insert(Logged { code: self.code, internal: self.internal });
        response
    }
}

/// `X-RateLimit-Limit` (the burst), `-Remaining` and `-Reset` (seconds until
/// the bucket is full again), as GitHub and Stripe send them.
pub fn rate_headers(headers: &mut HeaderMap, rate: &Decision) {
    headers.insert("x-ratelimit-limit", HeaderValue::from(rate.limit));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(rate.remaining));
    headers.insert("x-ratelimit-reset", HeaderValue::from(rate.reset_after.as_secs_f64().ceil() as u64));
}

/// How often, at most, 503s of one code are logged at `warn`.
pub const UNAVAILABLE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Keeps a run of 503s from flooding the log: of each code, one line at
/// `warn` per [`UNAVAILABLE_LOG_EVERY`], carrying how many went to `debug`
/// since the line before. One per node; a cheap handle.
#[derive(Clone)]
pub struct UnavailableLog(LogSampler);

impl Default for UnavailableLog {
    fn default() -> Self {
        UnavailableLog(LogSampler::new(UNAVAILABLE_LOG_EVERY))
    }
}

/// Logs refusals: internal errors at `error` with their internal detail,
/// the other server errors (503: the store or broker away, a node draining
/// or full — states an operator expects and fixes elsewhere) at `warn`, one
/// line per code every [`UNAVAILABLE_LOG_EVERY`] (the rest at `debug`;
/// `herald_http_requests_total` counts each), client errors at `debug`.
/// Logs the route template, never the URI.
pub async fn log_errors(State(unavailable): State<UnavailableLog>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let method = request.method().clone();
    let response = next.run(request).await;
    if let Some(logged) = response.extensions().get::<Logged>() {
        let route = route.as_deref().unwrap_or("unmatched");
        let status = response.status().as_u16();
        if response.status() == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(%method, route, status, code = logged.code, detail = logged.internal.as_deref().unwrap_or(""), "request failed");
        } else if response.status().is_server_error() {
            match unavailable.0.sample(logged.code, Instant::now()) {
                Some(unlogged) => tracing::warn!(
                    %method,
                    route,
                    status,
                    code = logged.code,
                    unlogged,
                    "request refused: unavailable"
                ),
                None => tracing::debug!(%method, route, status, code = logged.code, "request refused: unavailable"),
            }
        } else {
            tracing::debug!(%method, route, status, code = logged.code, "request refused");
        }
    }
    response
}
