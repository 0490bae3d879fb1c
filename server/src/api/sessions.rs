//! A user's open sessions, for backend services: how many
//! (`GET …/presence`), which (`GET …/sessions`), and closing them — all of
//! them, or one.
//!
//! Counts and listings come from the hub for this node and, with Redis,
//! from what the other nodes publish every maintenance tick (250 ms), so a
//! session opened or closed a moment ago may not show yet. Closing goes
//! through the broker: this node's sessions are told at once, the others'
//! through Redis.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use herald_protocol::http::UserSessions;
use serde::Serialize;

use super::error::ApiError;
use super::extract::{DisconnectKey, ReadKey, UserPath, UserSessionPath};
use crate::broker::{BrokerError, Event};
use crate::hub::Delivery;
use crate::AppState;

#[derive(Serialize)]
pub struct Presence {
    user_id: String,
    sessions: u64,
}

/// `GET /v1/users/{user_id}/presence`: the user's sessions on every node
/// (with Redis, from each live node's published counts).
pub async fn presence(
    State(state): State<AppState>,
    _: ReadKey,
    UserPath(user): UserPath,
) -> Result<Json<Presence>, ApiError> {
    let sessions = state.broker.presence(&user).await.map_err(|e| unavailable("presence", e))?;
    Ok(Json(Presence { user_id: user, sessions }))
}

/// `GET /v1/users/{user_id}/sessions`: the user's sessions on every node,
/// oldest first, each with its id, node, when it connected, the token it
/// runs on (`jti`, `exp`), its address and `User-Agent` — what a "your
/// devices" page shows, and what closing one session or revoking one token
/// needs. This node's from the hub; the others' as they last published
/// them. `count` is what presence answers.
pub async fn list(
    State(state): State<AppState>,
    _: ReadKey,
    UserPath(user): UserPath,
) -> Result<Json<UserSessions>, ApiError> {
    let elsewhere = state.broker.sessions_elsewhere(&user).await.map_err(|e| unavailable("the session listing", e))?;
    let mut sessions = state.hub.listing(&user, &state.settings.node_id);
    let count = state.hub.local_sessions(&user) as u64 + elsewhere.count;
    sessions.extend(elsewhere.sessions);
    // Session ids are UUIDv7: in the order they were made.
    sessions.sort_unstable_by(|a, b| (&a.connected_at, &a.session_id).cmp(&(&b.connected_at, &b.session_id)));
    Ok(Json(UserSessions { user_id: user, count: count.max(sessions.len() as u64), sessions }))
}

/// `what` cannot be read from Redis. The edge logs the 503 (sampled); the
/// broker logs the outage itself.
fn unavailable(what: &str, e: BrokerError) -> ApiError {
    tracing::debug!(error = %e, "{what} unavailable");
    let BrokerError::Unavailable(why) = e;
    ApiError::unavailable("broker_unavailable", format!("{what} is unavailable: {why}"))
}

/// `DELETE /v1/users/{user_id}/sessions`: closes every open session of the
/// user, on every node, with 4003 ("disconnected by the server"); 204.
/// It does not revoke tokens: a client that reconnects with a token still
/// valid gets a new session (the SDKs do not retry after 4003).
pub async fn disconnect(
    State(state): State<AppState>,
    _: DisconnectKey,
    UserPath(user): UserPath,
) -> Result<StatusCode, ApiError> {
    tracing::info!(user_id = %user, "a backend closes the user's sessions");
    close(&state, &user, Delivery::Disconnect, "this node's sessions of the user were closed").await
}

/// `DELETE /v1/users/{user_id}/sessions/{session_id}`: closes that one
/// session, wherever it runs, with 4003; the user's other sessions carry
/// on. 204 whether or not such a session is open (it may have closed a
/// moment ago): the listing says which are.
pub async fn disconnect_one(
    State(state): State<AppState>,
    _: DisconnectKey,
    UserSessionPath { user, session_id }: UserSessionPath,
) -> Result<StatusCode, ApiError> {
    tracing::info!(user_id = %user, %session_id, "a backend closes one session");
    close(&state, &user, Delivery::DisconnectSession { session_id }, "the session was closed if it runs on this node")
        .await
}

/// Nothing repairs a lost broker message here (as the store repairs lost
/// notifications), so the answer is 204 only when the broker took the
/// message and answers a ping after it; otherwise 503, and the caller
/// repeats the call (`done_here` says what happened already).
async fn close(state: &AppState, user: &str, delivery: Delivery, done_here: &str) -> Result<StatusCode, ApiError> {
    let event = Event { user_id: user.into(), id: None, delivery, trace: None };
    let carried = async {
        state.broker.publish(vec![event]).await?;
        state.broker.ping().await
    };
    carried.await.map_err(|e| {
        tracing::warn!(error = %e, "disconnect may not have reached other nodes");
        ApiError::unavailable("broker_unavailable", format!("{done_here}; other nodes may not have been told: retry"))
    })?;
    Ok(StatusCode::NO_CONTENT)
}
