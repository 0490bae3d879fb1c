//! Every request runs in an `http.request` span carrying its request id, so
//! every log line it causes names it, and — with trace export on — the span
//! continues a W3C `traceparent` the caller sent.
//!
//! The id is the caller's `x-request-id` when it is a sane token (1–128
//! visible ASCII characters), else a new UUIDv7; the response echoes it.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::telemetry::{trace_export, HttpRequest, Metrics};

pub const REQUEST_ID: &str = "x-request-id";

/// The request's id, for handlers that hand work to other tasks (sessions).
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

pub async fn traced(State(metrics): State<Arc<Metrics>>, mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let method = request.method().clone();
    let span = tracing::info_span!(
        "http.request",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        request_id = %id,
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    trace_export::continue_from_headers(&span, request.headers());
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    metrics.http_requests.get_or_create(&HttpRequest { route, status: response.status().as_u16() }).inc();
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}
