//! `POST /v1/users/{user_id}/tokens/revoke` (scope `disconnect`): the user's
//! tokens issued before a time are refused from then on — at the handshake,
//! on `refresh` and on the `/v1/me` routes — and their open sessions close
//! with 4001 "token revoked", on every node. Tokens issued at or after that
//! time keep working, so a client whose app hands it a new token carries
//! on; one whose app does not (the user was logged out) stays out.
//!
//! A revocation given `expires_at` — when the last token it covers expires —
//! is deleted once that time has passed (with the retention purge, every
//! `HERALD_PURGE_INTERVAL`); without it, it is kept for good.
//!
//! The revocation is stored first (the answer means it is durable), then
//! published; [`crate::auth::revocations`] explains how every node learns
//! of it, and why a lost broker message only delays that.

use axum::extract::State;
use axum::Json;
use herald_protocol::http::{RevokeTokens, TokensRevoked};

use super::error::ApiError;
use super::extract::{DisconnectKey, JsonBody, UserPath};
use crate::auth::unix_now;
use crate::broker::Event;
use crate::hub::Delivery;
use crate::store::Revocation;
use crate::AppState;

/// How far ahead of this node's clock `issued_before` may lie: room for a
/// backend's clock running ahead, not for refusing tokens not yet issued.
/// (A revocation never moves back, so one far ahead could not be undone.)
pub const MAX_AHEAD_SECS: i64 = 60;

pub async fn revoke(
    State(state): State<AppState>,
    _: DisconnectKey,
    UserPath(user): UserPath,
    JsonBody(body): JsonBody<RevokeTokens>,
) -> Result<Json<TokensRevoked>, ApiError> {
    let now = unix_now();
    let asked = body.issued_before.unwrap_or(now + 1);
    if !(0..=now + MAX_AHEAD_SECS).contains(&asked) {
        return Err(ApiError::unprocessable(
            "invalid_issued_before",
            format!(
                "issued_before is unix seconds, from 0 to at most {MAX_AHEAD_SECS} s ahead of this node's clock ({now})"
            ),
        ));
    }
    if body.expires_at.is_some_and(|at| at <= now) {
        return Err(ApiError::unprocessable(
            "invalid_expires_at",
            format!("expires_at is unix seconds after this node's clock ({now}): when the last token revoked expires"),
        ));
    }
    let asked = Revocation { user_id: user, issued_before: asked, expires_at: body.expires_at };
    let in_force = state.metrics.store_op("revoke", state.store.revoke(&asked)).await?;
    let event = Event {
        user_id: in_force.user_id.as_str().into(),
        id: None,
        delivery: Delivery::Revoke { issued_before: in_force.issued_before, expires_at: in_force.expires_at },
        trace: None,
    };
    // This node's sessions are told by the publish itself; the other nodes
    // read the stored row within a repair interval if the message is lost.
    if let Err(e) = state.broker.publish(vec![event]).await {
        tracing::warn!(error = %e, "revocation not published; other nodes read it from the store");
    }
    let Revocation { user_id, issued_before, expires_at } = in_force;
    Ok(Json(TokensRevoked { user_id, issued_before, expires_at }))
}
