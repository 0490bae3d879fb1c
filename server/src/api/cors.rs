//! CORS for the user's own routes (`/v1/me/…`): browser apps call them with
//! the user's token from pages on their own origin, which is rarely Herald's.
//!
//! The Origins allowed are `HERALD_ALLOWED_ORIGINS`', as for WebSockets
//! (unset: any). A preflight from another Origin is refused with 403
//! `origin_not_allowed`; an actual request from one is answered without CORS
//! headers, so the browser keeps the answer from the page. The token travels
//! in `Authorization`, never in a cookie, so credentials mode stays off
//! (no `Access-Control-Allow-Credentials`). The backend routes (API keys)
//! get no CORS at all: an API key has no business in a browser.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::config::Settings;
use crate::AppState;

/// How long a browser may reuse a preflight's answer.
const MAX_AGE_SECS: &str = "600";

/// Whether `origin` may use this node from a browser (HERALD_ALLOWED_ORIGINS;
/// unset: any). Shared with the WebSocket handshake.
pub fn origin_allowed(settings: &Settings, origin: &str) -> bool {
    match &settings.allowed_origins {
        None => true,
        Some(allowed) => allowed.iter().any(|a| a == origin || a == "*"),
    }
}

pub async fn cors(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(origin) = request.headers().get(header::ORIGIN).cloned() else {
        return next.run(request).await;
    };
    let allowed = origin.to_str().is_ok_and(|o| origin_allowed(&state.settings, o));
    let preflight =
        request.method() == Method::OPTIONS && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        if !allowed {
            return ApiError::new(StatusCode::FORBIDDEN, "origin_not_allowed", "this Origin may not call this API")
                .into_response();
        }
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE_SECS));
        allow(&mut response, origin);
        return response;
    }
    let mut response = next.run(request).await;
    if allowed {
        response
            .headers_mut()
            .insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("retry-after, x-request-id"));
        allow(&mut response, origin);
    }
    response
}

/// The answer to an `OPTIONS` that is not a CORS preflight (those the layer
/// answers): 204 with the route's methods in `Allow`.
pub fn options(allow: &'static str) -> impl Fn() -> std::future::Ready<Response> + Clone + Send + Sync + 'static {
    move || std::future::ready((StatusCode::NO_CONTENT, [(header::ALLOW, allow)]).into_response())
}

/// Names `origin` as allowed; the answer depends on it, so caches key on it.
fn allow(response: &mut Response, origin: HeaderValue) {
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("origin"));
}
