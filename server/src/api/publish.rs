//! `POST /v1/notifications`: validate, store (which assigns seqs), and only
//! then hand the committed notifications to the broker. A 2xx means durable.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use herald_protocol::http::{PublishRequest, PublishResponse, Published};
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::error::ApiError;
use super::extract::{ApiKey, JsonBody};
use crate::broker::Event;
use crate::hub::Delivery;
use crate::store::{now_ms, NewNotification};
use crate::AppState;

const MAX_TOPIC_CHARS: usize = 128;
const MAX_KEY_BYTES: usize = 256;

pub async fn publish(
    State(state): State<AppState>,
    _: ApiKey,
    JsonBody(request): JsonBody<PublishRequest<Box<RawValue>>>,
) -> Result<(StatusCode, Json<PublishResponse>), ApiError> {
    let received = Instant::now();
    let users = validate(&state, &request)?;
    let topic: Arc<str> = request.topic.into();
    let payload: Arc<RawValue> = Arc::from(request.payload);
    let key: Option<Arc<str>> = request.idempotency_key.map(Arc::from);
    let created_at_ms = now_ms();
    let batch = users
        .into_iter()
        .map(|user| NewNotification {
            user_id: user.into(),
            id: uuid::Uuid::now_v7().to_string(),
            topic: topic.clone(),
            payload: payload.clone(),
            created_at_ms,
            idempotency_key: key.clone(),
        })
        .collect();
    let appended = state.store.append(batch).await?;
    state.metrics.publish_commit_seconds.observe(received.elapsed().as_secs_f64());

    let events: Vec<Event> = appended
        .iter()
        .filter(|a| a.created)
        .map(|a| Event {
            user_id: a.notification.user_id.clone(),
            delivery: Delivery::Notification { seq: a.notification.seq, frame: a.notification.frame().into() },
        })
        .collect();
    let created = events.len();
    state.metrics.notifications_published.inc_by(created as u64);
    if !events.is_empty() {
        if let Err(e) = state.broker.publish(events).await {
            // Committed all the same: sessions repair the gap from the store.
            tracing::warn!(error = %e, "broker publish failed after commit");
        }
    }
    let status = if created > 0 { StatusCode::CREATED } else { StatusCode::OK };
    let notifications = appended
        .into_iter()
        .map(|a| Published {
            user_id: a.notification.user_id.to_string(),
            id: a.notification.id,
            seq: a.notification.seq,
        })
        .collect();
    Ok((status, Json(PublishResponse { notifications })))
}

/// Checks a publish; returns its distinct user ids in request order.
fn validate(state: &AppState, request: &PublishRequest<Box<RawValue>>) -> Result<Vec<String>, ApiError> {
    let settings = &state.settings;
    let invalid = |code, message: String| ApiError::unprocessable(code, message);
    let users: Vec<String> = match (&request.user_id, &request.user_ids) {
        (Some(one), None) => vec![one.clone()],
        (None, Some(many)) if !many.is_empty() => many.clone(),
        (None, Some(_)) => return Err(invalid("invalid_user_id", "`user_ids` is empty".into())),
        (Some(_), Some(_)) => return Err(invalid("invalid_request", "give `user_id` or `user_ids`, not both".into())),
        (None, None) => return Err(invalid("invalid_request", "`user_id` or `user_ids` is required".into())),
    };
    for user in &users {
        check_user_id(user).map_err(|m| invalid("invalid_user_id", m))?;
    }
    let mut seen = std::collections::HashSet::with_capacity(users.len());
    let users: Vec<String> = users.into_iter().filter(|u| seen.insert(u.clone())).collect();
    if users.len() > settings.max_user_ids {
        return Err(invalid(
            "too_many_users",
            format!(
                "at most {} user ids per publish (large audiences arrive with the worker pool)",
                settings.max_user_ids
            ),
        ));
    }
    let topic_chars = request.topic.chars().count();
    if topic_chars == 0 || topic_chars > MAX_TOPIC_CHARS {
        return Err(invalid("invalid_topic", format!("`topic` is 1 to {MAX_TOPIC_CHARS} characters")));
    }
    if request.payload.get().len() > settings.max_payload_bytes {
        return Err(ApiError::too_large(format!("`payload` is larger than {} bytes", settings.max_payload_bytes)));
    }
    if request.payload.get() == "null" {
        return Err(invalid("invalid_request", "`payload` is required".into()));
    }
    if let Some(key) = &request.idempotency_key {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(invalid("invalid_request", format!("`idempotency_key` is 1 to {MAX_KEY_BYTES} bytes")));
        }
    }
    if request.digest.is_some() {
        return Err(invalid(
            "digest_unsupported",
            "digests arrive with the worker pool; this node cannot aggregate yet".into(),
        ));
    }
    Ok(users)
}

/// A user id: 1 to 256 bytes of UTF-8 (spec §2, the `sub` claim).
pub fn check_user_id(user: &str) -> Result<(), String> {
    if user.is_empty() || user.len() > 256 {
        Err("a user id is 1 to 256 bytes".into())
    } else {
        Ok(())
    }
}
