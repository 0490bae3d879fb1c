//! The demo inbox, built on the browser SDK:
//!
//! - `GET /demo` and its assets (`/demo/app.js`, `/demo/app.css`,
//!   `/demo/icon.svg`): static files embedded at build time, the page under a
//!   strict Content-Security-Policy (no inline script or style).
//! - `GET /sdk/herald.js`: the browser SDK (`clients/js/dist/herald.js`).
//! - `GET /demo/config`: `{"dev_mode":bool}`, so the page knows whether to
//!   offer its test-publish form.
//! - `POST /demo/publish`, in dev mode only (elsewhere the route does not
//!   exist: 404 `not_found`): the signed-in user publishes
//!   `{"topic","payload"}` to themselves, through the same path as
//!   `POST /v1/notifications`.
//!
//! The user token travels in the URL fragment, which browsers never send; the
//! page hands it to the SDK (WebSocket subprotocol, `Authorization` header).

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herald_protocol::http::PublishRequest;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::ApiError;
use super::extract::{JsonBody, User};
use super::publish::publish_request;
use crate::AppState;

/// The page's policy: its own origin only, plus WebSockets.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; style-src 'self'; script-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

static PAGE: Asset = Asset::new(include_str!("../../assets/demo/index.html"), "text/html; charset=utf-8");
static SCRIPT: Asset = Asset::new(include_str!("../../assets/demo/app.js"), "text/javascript; charset=utf-8");
static STYLE: Asset = Asset::new(include_str!("../../assets/demo/app.css"), "text/css; charset=utf-8");
static ICON: Asset = Asset::new(include_str!("../../assets/demo/icon.svg"), "image/svg+xml");
static SDK: Asset = Asset::new(include_str!("../../../clients/js/dist/herald.js"), "text/javascript; charset=utf-8");

/// The demo's routes; `POST /demo/publish` only in dev mode.
pub fn routes(dev_mode: bool) -> Router<AppState> {
    let routes = Router::new()
        .route("/demo", get(page))
        .route("/demo/app.js", get(|h: HeaderMap| async move { SCRIPT.respond(&h) }))
        .route("/demo/app.css", get(|h: HeaderMap| async move { STYLE.respond(&h) }))
        .route("/demo/icon.svg", get(|h: HeaderMap| async move { ICON.respond(&h) }))
        .route("/demo/config", get(config))
        .route("/sdk/herald.js", get(|h: HeaderMap| async move { SDK.respond(&h) }));
    if dev_mode {
        routes.route("/demo/publish", post(publish))
    } else {
        routes
    }
}

async fn page(headers: HeaderMap) -> Response {
    let mut response = PAGE.respond(&headers);
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

async fn config(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], Json(serde_json::json!({ "dev_mode": state.settings.dev_mode })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestPublish {
    topic: String,
    payload: Box<RawValue>,
}

/// `POST /demo/publish` (dev mode): a publish to the token's own user,
/// validated, stored and delivered like any other; answered like one (201).
async fn publish(
    State(state): State<AppState>,
    User(user): User,
    JsonBody(body): JsonBody<TestPublish>,
) -> Result<Response, ApiError> {
    let request = PublishRequest {
        user_id: Some(user.user_id.to_string()),
        user_ids: None,
        topic: body.topic,
        payload: body.payload,
        idempotency_key: None,
        digest: None,
    };
    publish_request(&state, request).await
}

/// A file embedded in the binary, revalidated by ETag on every use
/// (`Cache-Control: no-cache`), so a new build is picked up at once.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    hash: u64,
}

impl Asset {
    const fn new(body: &'static str, content_type: &'static str) -> Asset {
        Asset { body, content_type, hash: fnv1a(body.as_bytes()) }
    }

    fn respond(&self, request: &HeaderMap) -> Response {
        let etag = format!("\"{:016x}\"", self.hash);
        let headers = [
            (header::CONTENT_TYPE, self.content_type.to_owned()),
            (header::CACHE_CONTROL, "no-cache".to_owned()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (header::ETAG, etag.clone()),
        ];
        if if_none_match(request, &etag) {
            (StatusCode::NOT_MODIFIED, headers).into_response()
        } else {
            (headers, self.body).into_response()
        }
    }
}

/// Whether `If-None-Match` names `etag` (weak comparison) or is `*`.
fn if_none_match(request: &HeaderMap, etag: &str) -> bool {
    request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// 64-bit FNV-1a, at compile time: a stable content hash for the ETags.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn if_none_match_takes_lists_weak_tags_and_star() {
        let etag = "\"00000000000000ab\"";
        assert!(if_none_match(&with("\"00000000000000ab\""), etag));
        assert!(if_none_match(&with("\"x\", W/\"00000000000000ab\""), etag));
        assert!(if_none_match(&with("*"), etag));
        assert!(!if_none_match(&with("\"00000000000000ac\""), etag));
        assert!(!if_none_match(&HeaderMap::new(), etag));
    }

    #[test]
    fn the_etag_follows_the_content() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(b"export class Herald {}"), fnv1a(b"export class Herald { }"));
    }
}
