//! One error type at the HTTP edge: each variant a status and a stable code,
//! answered with the spec's body `{"error":{"code","message"}}`. Internal
//! details never reach the client; [`log_errors`] logs them.

use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_protocol::http::{ErrorBody, ErrorDetail};

use crate::auth::AuthError;
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
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
        ApiError { status, code, message: message.into(), retry_after: None, internal: None }
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
        response.extensions_mut().insert(Logged { code: self.code, internal: self.internal });
        response
    }
}

/// Logs refusals: server errors at `error` with their internal detail,
/// client errors at `debug`. Logs the route template, never the URI.
pub async fn log_errors(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let method = request.method().clone();
    let response = next.run(request).await;
    if let Some(logged) = response.extensions().get::<Logged>() {
        let route = route.as_deref().unwrap_or("unmatched");
        let status = response.status().as_u16();
        if response.status().is_server_error() {
            tracing::error!(%method, route, status, code = logged.code, detail = logged.internal.as_deref().unwrap_or(""), "request failed");
        } else {
            tracing::debug!(%method, route, status, code = logged.code, "request refused");
        }
    }
    response
}
