//! The user's inbox (user JWT) and a user's history for backend services
//! (API key). A user only ever reaches their own data: `/v1/me/*` takes the
//! user from the verified token, never from the request.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use herald_protocol::http::{Erased, NotificationPage, UnreadCounts};
use herald_protocol::{ReadMark, Seq};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::ApiError;
use super::extract::{EraseKey, JsonBody, PublishKey, QueryParams, ReadKey, User, UserPath};
use super::publish::check_topic;
use crate::store::ListQuery;
use crate::ws::protocol::read_mark;
use crate::AppState;

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

/// A page as it is sent: payloads as stored, byte for byte.
type Page = NotificationPage<Box<RawValue>>;

/// A seq bound in a query: seqs start at 1, so a negative one is a mistake
/// (as a negative `since` is at the handshake), not "no bound".
fn seq_bound(name: &str, raw: Option<Seq>) -> Result<Option<Seq>, ApiError> {
    match raw {
        Some(n) if n < 0 => Err(ApiError::bad_request("invalid_query", format!("`{name}` is 0 or more"))),
        other => Ok(other),
    }
}

fn limit(raw: Option<u32>) -> Result<u32, ApiError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::bad_request("invalid_query", format!("`limit` is 1 to {MAX_LIMIT}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    before_seq: Option<Seq>,
    after_seq: Option<Seq>,
    limit: Option<u32>,
    unread: Option<bool>,
    topic: Option<String>,
}

/// `GET /v1/me/notifications`: newest first.
pub async fn list(
    State(state): State<AppState>,
    User(user): User,
    QueryParams(p): QueryParams<ListParams>,
) -> Result<Json<Page>, ApiError> {
    let query = ListQuery {
        before_seq: seq_bound("before_seq", p.before_seq)?,
        after_seq: seq_bound("after_seq", p.after_seq)?,
        limit: limit(p.limit)?,
        unread_only: p.unread.unwrap_or(false),
        topic: p
            .topic
            .map(|t| check_topic(&t).map(|()| t))
            .transpose()
            .map_err(|m| ApiError::bad_request("invalid_query", m))?,
    };
    let found = state.metrics.store_op("list", state.store.list(&user.user_id, &query)).await?;
    let head = state.metrics.store_op("head", state.store.head(&user.user_id)).await?;
    Ok(Json(NotificationPage { notifications: found.iter().map(|n| n.to_api()).collect(), last_seq: head.last_seq }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryParams {
    after_seq: Option<Seq>,
    limit: Option<u32>,
}

/// `GET /v1/users/{user_id}/notifications`: oldest first, after `after_seq`.
pub async fn user_history(
    State(state): State<AppState>,
    _: ReadKey,
    UserPath(user): UserPath,
    QueryParams(p): QueryParams<HistoryParams>,
) -> Result<Json<Page>, ApiError> {
    let after = seq_bound("after_seq", p.after_seq)?.unwrap_or(0);
    let read = state.store.after(&user, after, None, limit(p.limit)?);
    let found = state.metrics.store_op("after", read).await?;
    let head = state.metrics.store_op("head", state.store.head(&user)).await?;
    Ok(Json(NotificationPage { notifications: found.iter().map(|n| n.to_api()).collect(), last_seq: head.last_seq }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EraseParams {
    up_to_seq: Option<Seq>,
}

/// `DELETE /v1/users/{user_id}/notifications[?up_to_seq=N]`: erases what
/// the user has stored, committed before the request (all of it, or up to
/// `up_to_seq`): notifications, their read state and idempotency keys and,
/// when everything goes, the digest windows still collecting and the
/// user's digest entry keys. The counter
/// stays, so seqs are never reused; a session resuming below what is left
/// gets `truncated`, and open sessions get a `read` frame up to the erased
/// seq, so badges agree with `GET /v1/me/unread`.
pub async fn erase(
    State(state): State<AppState>,
    _: EraseKey,
    UserPath(user): UserPath,
    QueryParams(p): QueryParams<EraseParams>,
) -> Result<Json<Erased>, ApiError> {
    let up_to = seq_bound("up_to_seq", p.up_to_seq)?;
    let before = state.metrics.store_op("head", state.store.head(&user)).await?;
    let bound = up_to.map_or(before.last_seq, |n| n.min(before.last_seq));
    let deleted = state.metrics.store_op("erase", state.store.erase(&user, bound)).await?;
    let digests = match up_to {
        None => state.metrics.store_op("digest_erase", state.store.digest_erase(&user)).await?,
        Some(_) => 0,
    };
    let head = state.metrics.store_op("head", state.store.head(&user)).await?;
    state.metrics.notifications_erased.inc_by(deleted);
    tracing::info!(user_id = %user, deleted, digests, up_to_seq = bound, "notifications erased");
    if deleted > 0 {
        crate::ws::session::broadcast_read(&state, &user.as_str().into(), vec![ReadMark::UpTo { up_to_seq: bound }])
            .await;
    }
    Ok(Json(Erased { user_id: user, deleted, digests, oldest_seq: head.oldest_seq, last_seq: head.last_seq }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadBody {
    seqs: Option<Vec<Seq>>,
    up_to_seq: Option<Seq>,
    topic: Option<String>,
}

/// `POST /v1/me/notifications/read`: 204; every session of the user gets a `read` frame.
pub async fn mark_read(
    State(state): State<AppState>,
    User(user): User,
    JsonBody(body): JsonBody<ReadBody>,
) -> Result<StatusCode, ApiError> {
    mark_read_of(&state, &user.user_id, body).await
}

/// `POST /v1/users/{user_id}/notifications/read` (API key, scope `publish`):
/// the same, for a backend (the user read it in an email, say).
pub async fn user_mark_read(
    State(state): State<AppState>,
    _: PublishKey,
    UserPath(user): UserPath,
    JsonBody(body): JsonBody<ReadBody>,
) -> Result<StatusCode, ApiError> {
    mark_read_of(&state, &user.as_str().into(), body).await
}

async fn mark_read_of(state: &AppState, user: &Arc<str>, body: ReadBody) -> Result<StatusCode, ApiError> {
    let mark =
        read_mark(body.seqs, body.up_to_seq, body.topic).map_err(|m| ApiError::unprocessable("invalid_request", m))?;
    crate::ws::session::mark_read(state, user, mark).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/me/unread`.
pub async fn unread(State(state): State<AppState>, User(user): User) -> Result<Json<UnreadCounts>, ApiError> {
    unread_of(&state, &user.user_id).await
}

/// `GET /v1/users/{user_id}/unread` (API key, scope `read`): the same, for a
/// backend (a digest email's "you have 3 unread", say).
pub async fn user_unread(
    State(state): State<AppState>,
    _: ReadKey,
    UserPath(user): UserPath,
) -> Result<Json<UnreadCounts>, ApiError> {
    unread_of(&state, &user).await
}

async fn unread_of(state: &AppState, user: &str) -> Result<Json<UnreadCounts>, ApiError> {
    let counts = state.metrics.store_op("unread", state.store.unread(user)).await?;
    Ok(Json(UnreadCounts { total: counts.total, by_topic: counts.by_topic.into_iter().collect() }))
}
