//! The upgrade: every refusal happens here, before the socket exists, with
//! the same error type and body as the HTTP API.
//!
//! Order: draining → origin → handshake rate per IP → token (header, then
//! subprotocol, then query) → `since` → session caps per IP and per user →
//! a well-formed upgrade request. The rate comes before the token so a flood
//! costs no signature checks.

use std::collections::HashMap;
use std::net::IpAddr;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use herald_protocol::Seq;

use super::session::{self, SessionContext};
use crate::api::error::ApiError;
use crate::api::extract::ClientIp;
use crate::api::request::RequestId;
use crate::auth::{bearer, AuthError};
use crate::limit::{Refusal, SessionPermits};
use crate::telemetry::Limit;
use crate::telemetry::Outcome;
use crate::AppState;

/// The subprotocol the server speaks, and answers with.
pub const SUBPROTOCOL: &str = "herald.v1";
/// Prefix of the subprotocol entry that carries the token.
pub const BEARER_PREFIX: &str = "herald.bearer.";

/// `Retry-After` when a session cap is full: a place frees when a session ends.
const CAP_RETRY_AFTER_SECS: u64 = 5;

/// tungstenite's read buffer: small, because it is allocated per connection
/// (its 128 KiB default would cost ~136 KiB per idle connection). Client
/// frames are small; a large one just takes several reads.
const READ_BUFFER: usize = 1024;
/// Outgoing frames are gathered up to this size before a socket write.
const WRITE_BUFFER: usize = 8 * 1024;

pub async fn upgrade(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let query = query.map(|Query(q)| q).unwrap_or_default();
    let checked = check(&state, ip, &headers, &query).await;
    let outcome = match &checked {
        Ok(_) => "accepted",
        Err(e) => e.code,
    };
    state.metrics.handshakes.get_or_create(&Outcome { outcome }).inc();
    let (mut ctx, permits) = checked?;
    ctx.request_id = request_id.map(|Extension(RequestId(id))| id).unwrap_or_default();
    let ws =
        ws.map_err(|e| ApiError::bad_request("not_websocket", format!("not a WebSocket upgrade: {}", e.body_text())))?;

    let max_frame = state.settings.max_frame_bytes;
    let max_out = state.settings.max_payload_bytes + 16 * 1024;
    let sessions = state.sessions.clone();
    Ok(ws
        .protocols([SUBPROTOCOL])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + 2 * max_out)
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "upgrade failed"))
        .on_upgrade(move |socket| sessions.track_future(session::run(socket, ctx, permits, state))))
}

async fn check(
    state: &AppState,
    ip: Option<IpAddr>,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<(SessionContext, SessionPermits), ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::draining());
    }
    check_origin(state, headers)?;
    state.limits.handshake_rate(ip).await.map_err(refused)?;
    let token = token(headers, query).ok_or(AuthError::Missing)?;
    let user = state.verifier.verify(token)?;
    let since =
        match query.get("since") {
            None => None,
            Some(raw) => Some(raw.parse::<Seq>().ok().filter(|s| *s >= 0).ok_or_else(|| {
                ApiError::bad_request("invalid_since", "`since` is a seq: a whole number, 0 or more")
            })?),
        };
    let permits = state.limits.admit(ip, &user.user_id).map_err(refused)?;
    cluster_sessions_per_user(state, &user.user_id).await.map_err(refused)?;
    let ctx = SessionContext {
        session_id: uuid::Uuid::now_v7().to_string(),
        user: user.user_id,
        expires_at: user.expires_at,
        since,
        request_id: String::new(),
    };
    Ok((ctx, permits))
}

/// With Redis, the per-user cap also counts the user's sessions on the other
/// nodes (the presence counts, refreshed every 250 ms, so a burst across
/// nodes may overshoot briefly). Fails open when Redis is slow or down.
async fn cluster_sessions_per_user(state: &AppState, user: &str) -> Result<(), Refusal> {
    let (Some(max), Some(_)) = (state.settings.limits.sessions_per_user, &state.settings.redis_url) else {
        return Ok(());
    };
    match tokio::time::timeout(crate::limit::SHARED_TIMEOUT, state.broker.presence(user)).await {
        Ok(Ok(open)) if open as usize >= max => {
            state.metrics.rate_limited.get_or_create(&Limit { limit: "sessions_per_user" }).inc();
            Err(Refusal::SessionsPerUser(max))
        }
        Ok(Ok(_)) => Ok(()),
        _ => {
            state.metrics.rate_limit_fallbacks.get_or_create(&Limit { limit: "sessions_per_user" }).inc();
            Ok(())
        }
    }
}

fn refused(refusal: Refusal) -> ApiError {
    match refusal {
        Refusal::HandshakeRate(d) => ApiError::rate_limited(
            "too many connection attempts from this address; retry after Retry-After seconds",
            d.retry_after_secs(),
            Some(d),
        ),
        Refusal::SessionsPerIp(max) => ApiError::rate_limited(
            format!("this address already has {max} open sessions on this node"),
            CAP_RETRY_AFTER_SECS,
            None,
        ),
        Refusal::SessionsPerUser(max) => {
            ApiError::rate_limited(format!("this user already has {max} open sessions"), CAP_RETRY_AFTER_SECS, None)
        }
    }
}

fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let (Some(allowed), Some(origin)) = (&state.settings.allowed_origins, headers.get(header::ORIGIN)) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    if allowed.iter().any(|a| a == origin || a == "*") {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::FORBIDDEN, "origin_not_allowed", "this Origin may not open a WebSocket here"))
    }
}

/// The token, from (in this order) `Authorization: Bearer`, the
/// `herald.bearer.<jwt>` subprotocol, or the `access_token` query parameter.
fn token<'a>(headers: &'a HeaderMap, query: &'a HashMap<String, String>) -> Option<&'a str> {
    if let Some(t) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer) {
        return Some(t);
    }
    let from_protocol = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(BEARER_PREFIX))
        .filter(|t| !t.is_empty());
    from_protocol.or_else(|| query.get("access_token").map(String::as_str).filter(|t| !t.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_header_wins_then_the_subprotocol_then_the_query() {
        let mut headers = HeaderMap::new();
        let mut query = HashMap::new();
        assert_eq!(token(&headers, &query), None);
        query.insert("access_token".to_string(), "q".to_string());
        assert_eq!(token(&headers, &query), Some("q"));
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("herald.v1, herald.bearer.p"));
        assert_eq!(token(&headers, &query), Some("p"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer h"));
        assert_eq!(token(&headers, &query), Some("h"));
    }
}
