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
//! `POST /v1/users/{user_id}/tokens/{jti}/revoke` (scope `disconnect`)
//! revokes one token, the one whose `jti` claim is in the path — a device
//! signed out, a token known stolen — and closes the sessions running on
//! it; the user's other tokens and sessions carry on. A token without a
//! `jti` can only be revoked with the others issued before a time.
//!
//! Either revocation is stored first (the answer means it is durable), then
//! published; [`crate::auth::revocations`] explains how every node learns
//! of it, and why a lost broker message only delays that.

use axum::extract::State;
use axum::Json;
use herald_protocol::http::{RevokeToken, RevokeTokens, TokenRevoked, TokensRevoked};

use super::error::ApiError;
use super::extract::{DisconnectKey, JsonBody, UserPath, UserTokenPath};
use crate::auth::unix_now;
use crate::broker::Event;
use crate::hub::Delivery;
use crate::store::{Revocation, TokenRevocation};
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
    check_expires_at(body.expires_at, now)?;
    let asked = Revocation { user_id: user, issued_before: asked, expires_at: body.expires_at };
    let in_force = state.metrics.store_op("revoke", state.store.revoke(&asked)).await?;
    tracing::info!(
        user_id = %in_force.user_id,
        issued_before = in_force.issued_before,
        expires_at = in_force.expires_at,
        "tokens revoked"
    );
    let delivery = Delivery::Revoke { issued_before: in_force.issued_before, expires_at: in_force.expires_at };
    tell_every_node(&state, &in_force.user_id, delivery).await;
    let Revocation { user_id, issued_before, expires_at } = in_force;
    Ok(Json(TokensRevoked { user_id, issued_before, expires_at }))
}

pub async fn revoke_token(
    State(state): State<AppState>,
    _: DisconnectKey,
    UserTokenPath { user, jti }: UserTokenPath,
    JsonBody(body): JsonBody<RevokeToken>,
) -> Result<Json<TokenRevoked>, ApiError> {
    check_expires_at(body.expires_at, unix_now())?;
    let asked = TokenRevocation { user_id: user, jti, expires_at: body.expires_at };
    let in_force = state.metrics.store_op("revoke_token", state.store.revoke_token(&asked)).await?;
    tracing::info!(user_id = %in_force.user_id, jti = %in_force.jti, expires_at = in_force.expires_at, "token revoked");
    let delivery = Delivery::RevokeToken { jti: in_force.jti.as_str().into(), expires_at: in_force.expires_at };
    tell_every_node(&state, &in_force.user_id, delivery).await;
    let TokenRevocation { user_id, jti, expires_at } = in_force;
    Ok(Json(TokenRevoked { user_id, jti, expires_at }))
}

/// A revocation's `expires_at` lies after this node's clock (`now`): one
/// already past would be forgotten at once.
fn check_expires_at(expires_at: Option<i64>, now: i64) -> Result<(), ApiError> {
    if expires_at.is_some_and(|at| at <= now) {
        return Err(ApiError::unprocessable(
            "invalid_expires_at",
            format!("expires_at is unix seconds after this node's clock ({now}): when the last token revoked expires"),
        ));
    }
    Ok(())
}

/// Publishes a stored revocation. This node's sessions are told by the
/// publish itself; the other nodes read the stored row within a repair
/// interval if the message is lost, so a failure is only logged.
async fn tell_every_node(state: &AppState, user: &str, delivery: Delivery) {
    let event = Event { user_id: user.into(), id: None, delivery, trace: None };
    if let Err(e) = state.broker.publish(vec![event]).await {
        tracing::warn!(error = %e, "revocation not published; other nodes read it from the store");
    }
}
