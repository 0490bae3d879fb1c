//! The upgrade: every refusal happens here, before the socket exists, with
//! the same error type and body as the HTTP API.
//!
//! Order: draining → the node's session cap → origin → handshake rate per
//! IP → token (header, then subprotocol, then query) → `since` → session caps
//! per IP and per user → a well-formed upgrade request. The node's cap and
//! the rate come before the token so a full node and a flood cost no
//! signature checks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Version};
use axum::response::Response;
use axum::Extension;
use herald_protocol::Seq;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::session::{self, SessionContext};
use super::stream::{self, FlushBuffered};
use crate::api::error::ApiError;
use crate::api::extract::ClientIp;
use crate::api::request::RequestId;
use crate::auth::{bearer, AuthError};
use crate::hub::SessionInfo;
use crate::limit::{Refusal, SessionPermits};
use crate::telemetry::Limit;
use crate::telemetry::Outcome;
use crate::AppState;

/// The subprotocol the server speaks, and answers with.
pub const SUBPROTOCOL: &str = "herald.v1";
/// Prefix of the subprotocol entry that carries the token.
pub const BEARER_PREFIX: &str = "herald.bearer.";

/// How much of a `User-Agent` a session keeps, for listings.
const USER_AGENT_BYTES: usize = 256;

/// `Retry-After` when a session cap is full: a place frees when a session ends.
const CAP_RETRY_AFTER_SECS: u64 = 5;

/// tungstenite's read buffer: small, because it is allocated per connection
/// (its 128 KiB default would cost ~136 KiB per idle connection). Client
/// frames are small; a large one just takes several reads.
const READ_BUFFER: usize = 1024;

pub async fn upgrade(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    request_id: Option<Extension<RequestId>>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let query = query.map(|Query(q)| q).unwrap_or_default();
    let checked = check(&state, ip, request.headers(), &query).await.and_then(|admitted| {
        let upgrade = Upgrade::from_request(&mut request)
            .map_err(|why| ApiError::bad_request("not_websocket", format!("not a WebSocket upgrade: {why}")))?;
        Ok((admitted, upgrade))
    });
    let outcome = match &checked {
        Ok(_) => "accepted",
        Err(e) => e.code,
    };
    state.metrics.handshakes.get_or_create(&Outcome { outcome }).inc();
    let ((mut ctx, permits), upgrade) = checked?;
    ctx.request_id = request_id.map(|Extension(RequestId(id))| id).unwrap_or_default();

    let max_frame = state.settings.max_frame_bytes;
    let max_out = state.settings.max_payload_bytes + 16 * 1024;
    // Frames go straight through to `FlushBuffered`, which gathers a flush's
    // worth and lets it go afterwards (see `stream`).
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(stream::MAX_BUFFER + 2 * max_out)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame));
    let sessions = state.sessions.clone();
    let response = upgrade.response();
    tokio::spawn(sessions.track_future(async move {
        let upgraded = match upgrade.on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!(error = %e, "upgrade failed"),
        };
        let io = FlushBuffered::new(TokioIo::new(upgraded));
        let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        session::run(socket, ctx, permits, state).await
    }));
    Ok(response)
}

/// A well-formed HTTP/1.1 upgrade request (RFC 6455 §4.2.1), taken apart.
struct Upgrade {
    key: HeaderValue,
    /// Whether the client offered [`SUBPROTOCOL`], which the answer then names.
    herald_protocol: bool,
    on_upgrade: OnUpgrade,
}

impl Upgrade {
    fn from_request(request: &mut Request) -> Result<Upgrade, &'static str> {
        let headers = request.headers();
        if request.version() != Version::HTTP_11 {
            return Err("WebSocket needs HTTP/1.1");
        }
        let has = |name, token: &str| list(headers, name).any(|t| t.eq_ignore_ascii_case(token));
        if !has(header::CONNECTION, "upgrade") {
            return Err("the Connection header does not include `upgrade`");
        }
        if !has(header::UPGRADE, "websocket") {
            return Err("the Upgrade header is not `websocket`");
        }
        if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
            return Err("Sec-WebSocket-Version must be 13");
        }
        let key = headers.get(header::SEC_WEBSOCKET_KEY).ok_or("Sec-WebSocket-Key is missing")?.clone();
        let herald_protocol = has(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL);
        let on_upgrade = request.extensions_mut().remove::<OnUpgrade>().ok_or("this connection cannot be upgraded")?;
        Ok(Upgrade { key, herald_protocol, on_upgrade })
    }

    /// `101 Switching Protocols`, with the accept key and our subprotocol.
    fn response(&self) -> Response {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let accept = derive_accept_key(self.key.as_bytes());
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).expect("base64 is a valid header"));
        if self.herald_protocol {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));
        }
        response
    }
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
    let permits = state.limits.node_place().map_err(refused)?;
    check_origin(state, headers)?;
    state.limits.handshake_rate(ip).await.map_err(refused)?;
    let token = token(headers, query).ok_or(AuthError::Missing)?;
    let user = state.authenticate(token).await?;
    let since =
        match query.get("since") {
            None => None,
            Some(raw) => Some(raw.parse::<Seq>().ok().filter(|s| *s >= 0).ok_or_else(|| {
                ApiError::bad_request("invalid_since", "`since` is a seq: a whole number, 0 or more")
            })?),
        };
    let epoch = match query.get("epoch") {
        None => None,
        Some(raw) if is_epoch(raw) => Some(raw.clone()),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_epoch",
                "`epoch` is the welcome's `epoch`: 1 to 64 letters, digits, `-` or `_`",
            ))
        }
    };
    let permits = state.limits.admit(permits, ip, &user.user_id).map_err(refused)?;
    cluster_sessions_per_user(state, &user.user_id).await.map_err(refused)?;
    let session = SessionInfo::new(user.session_token(), ip, user_agent(headers));
    let ctx =
        SessionContext { user: user.user_id, session: Arc::new(session), since, epoch, request_id: String::new() };
    Ok((ctx, permits))
}

/// The handshake's `User-Agent`, as sessions are listed with it: at most
/// [`USER_AGENT_BYTES`] (cut at a character), absent when empty or not
/// UTF-8.
fn user_agent(headers: &HeaderMap) -> Option<Box<str>> {
    let agent = std::str::from_utf8(headers.get(header::USER_AGENT)?.as_bytes()).ok()?.trim();
    let mut end = agent.len().min(USER_AGENT_BYTES);
    while !agent.is_char_boundary(end) {
        end -= 1;
    }
    (end > 0).then(|| agent[..end].into())
}

/// An epoch as welcomes carry them (any this shape is accepted; one the
/// store never had resumes from 0).
fn is_epoch(raw: &str) -> bool {
    (1..=64).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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
        Refusal::NodeFull(max) => ApiError::unavailable(
            "node_full",
            format!("this node is full ({max} sessions); retry after Retry-After seconds, or connect to another node"),
        )
        .with_retry_after(CAP_RETRY_AFTER_SECS),
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
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    if crate::api::cors::origin_allowed(&state.settings, origin.to_str().unwrap_or("")) {
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
    let from_protocol = list(headers, header::SEC_WEBSOCKET_PROTOCOL)
        .find_map(|p| p.strip_prefix(BEARER_PREFIX))
        .filter(|t| !t.is_empty());
    from_protocol.or_else(|| query.get("access_token").map(String::as_str).filter(|t| !t.is_empty()))
}

/// The trimmed elements of a comma-separated header, over all its lines
/// (`Connection`, `Upgrade`, `Sec-WebSocket-Protocol`).
fn list(headers: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    headers.get_all(name).into_iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
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
