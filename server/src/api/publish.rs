//! `POST /v1/notifications`: validate, store (which assigns seqs), and only
//! then hand the committed notifications to the broker. A 2xx means durable.
//!
//! Three answers: `201`/`200` when the notifications are stored; `202
//! {"job_id"}` when the publish names more users than `max_user_ids` — a
//! durable job that the worker pool stores and delivers; `202
//! {"digests"}` when it carries `digest` — each user's entry is durably
//! added to the open window, which closes into one notification (`200` with
//! the same body when every entry's `idempotency_key` was used already).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_protocol::http::{DigestAccepted, DigestPending, JobAccepted, PublishRequest, PublishResponse, Published};
use serde_json::value::RawValue;
use tokio::time::Instant;
use tracing::Instrument;

use super::error::{rate_headers, ApiError};
use super::extract::{JsonBody, Publisher};
use crate::broker::Event;
use crate::config::Settings;
use crate::hub::Delivery;
use crate::store::jobs::{DigestEntry, NewJob};
use crate::store::{now_ms, rfc3339_ms, NewNotification};
use crate::telemetry::trace_export;
use crate::worker::jobs::{Fanout, FANOUT};
use crate::AppState;

const MAX_TOPIC_CHARS: usize = 128;
const MAX_KEY_BYTES: usize = 256;
/// Longest digest window: a week.
const MAX_WINDOW_SECS: u64 = 7 * 24 * 3600;

pub async fn publish(
    State(state): State<AppState>,
    Publisher(rate): Publisher,
    JsonBody(request): JsonBody<PublishRequest<Box<RawValue>>>,
) -> Result<Response, ApiError> {
    let mut response = publish_request(&state, request).await.map_err(|e| e.with_rate(rate))?;
    if let Some(rate) = &rate {
        rate_headers(response.headers_mut(), rate);
    }
    Ok(response)
}

/// Validates one publish, then stores and delivers it (or queues it as a job
/// or digest entries): the whole path behind `POST /v1/notifications`, for
/// any caller that has already authorized it (also `POST /demo/publish`).
pub(crate) async fn publish_request(
    state: &AppState,
    request: PublishRequest<Box<RawValue>>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let users = validate(&state.settings, &request)?;
    if request.digest.is_some() {
        return digest(state, request, users).await;
    }
    if users.len() > state.settings.max_user_ids {
        return enqueue(state, request, users).await;
    }
    let n_users = users.len();
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
    let appended = state.store.append(batch).instrument(tracing::info_span!("store.append", users = n_users)).await?;
    state.metrics.publish_commit_seconds.observe(received.elapsed().as_secs_f64());

    let span = tracing::info_span!("broker.publish", events = tracing::field::Empty);
    let trace = span.in_scope(trace_export::current);
    let events: Vec<Event> = appended
        .iter()
        .filter(|a| a.created)
        .map(|a| Event {
            user_id: a.notification.user_id.clone(),
            id: Some(a.notification.id.clone()),
            delivery: Delivery::Notification { seq: a.notification.seq, frame: a.notification.frame().into() },
            trace: trace.clone(),
        })
        .collect();
    let created = events.len();
    span.record("events", created);
    state.metrics.notifications_published.inc_by(created as u64);
    if !events.is_empty() {
        if let Err(e) = state.broker.publish(events).instrument(span).await {
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
    Ok((status, Json(PublishResponse { notifications })).into_response())
}

/// A large audience: one durable job; 202 once it is stored.
async fn enqueue(
    state: &AppState,
    request: PublishRequest<Box<RawValue>>,
    users: Vec<String>,
) -> Result<Response, ApiError> {
    let total = users.len() as i64;
    let idempotency_key = request.idempotency_key.clone();
    let spec = Fanout {
        user_ids: users,
        topic: request.topic,
        payload: request.payload,
        idempotency_key: request.idempotency_key,
        created_at_ms: now_ms(),
    };
    let payload = state
        .pool
        .run(move || serde_json::to_string(&spec))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let job = NewJob {
        id: uuid::Uuid::now_v7().to_string(),
        kind: FANOUT.into(),
        payload,
        total,
        idempotency_key: idempotency_key.map(|k| format!("fanout:{k}")),
    };
    let (job_id, created) = state.store.enqueue(job).await?;
    if created {
        state.work.notify_one();
        tracing::info!(%job_id, users = total, "large-audience publish queued");
    }
    Ok((StatusCode::ACCEPTED, Json(JobAccepted { job_id })).into_response())
}

/// Digest entries: durably added to each user's open window; 202.
async fn digest(
    state: &AppState,
    request: PublishRequest<Box<RawValue>>,
    users: Vec<String>,
) -> Result<Response, ApiError> {
    let digest = request.digest.expect("checked by the caller");
    let key: Arc<str> = digest.key.into();
    let topic: Arc<str> = request.topic.into();
    let payload: Arc<RawValue> = Arc::from(request.payload);
    let idempotency_key: Option<Arc<str>> = request.idempotency_key.map(Into::into);
    let at_ms = now_ms();
    let entries = users
        .into_iter()
        .map(|user| DigestEntry {
            user_id: user.into(),
            key: key.clone(),
            topic: topic.clone(),
            payload: payload.clone(),
            at_ms,
            window_ms: digest.window_secs as i64 * 1000,
            idempotency_key: idempotency_key.clone(),
        })
        .collect::<Vec<_>>();
    let users: Vec<String> = entries.iter().map(|e| e.user_id.to_string()).collect();
    let added = state.store.digest_add(entries).await?;
    // As for notifications: 200 when every entry was already there.
    let status = if added.iter().all(|a| a.repeated) { StatusCode::OK } else { StatusCode::ACCEPTED };
    let digests = users
        .into_iter()
        .zip(added)
        .map(|(user_id, a)| DigestPending {
            user_id,
            key: key.to_string(),
            count: a.count,
            closes_at: rfc3339_ms(a.closes_at_ms),
        })
        .collect();
    Ok((status, Json(DigestAccepted { digests })).into_response())
}

/// Checks a publish; returns its distinct user ids in request order.
/// A publish body as `POST /v1/notifications` reads it: JSON into the
/// request type, then [`validate`]. The fuzz targets and property tests
/// drive this; it never panics, whatever the bytes.
pub fn parse_body(settings: &Settings, body: &[u8]) -> Result<(PublishRequest<Box<RawValue>>, Vec<String>), ApiError> {
    let request: PublishRequest<Box<RawValue>> = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("bad_request", format!("the body is not a publish request: {e}")))?;
    let users = validate(settings, &request)?;
    Ok((request, users))
}

/// Checks a publish against the spec and the settings; the de-duplicated users.
pub fn validate(settings: &Settings, request: &PublishRequest<Box<RawValue>>) -> Result<Vec<String>, ApiError> {
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
    if users.len() > settings.max_audience {
        return Err(invalid("too_many_users", format!("at most {} user ids per publish", settings.max_audience)));
    }
    if request.digest.is_some() && users.len() > settings.max_user_ids {
        return Err(invalid(
            "too_many_users",
            format!("a digest publish names at most {} user ids", settings.max_user_ids),
        ));
    }
    check_topic(&request.topic).map_err(|m| invalid("invalid_topic", m))?;
    if request.payload.get().len() > settings.max_payload_bytes {
        return Err(ApiError::too_large(format!("`payload` is larger than {} bytes", settings.max_payload_bytes)));
    }
    if request.payload.get() == "null" {
        return Err(invalid("invalid_request", "`payload` is required".into()));
    }
    if let Err(e) = serde_json::from_str::<Portable>(request.payload.get()) {
        return Err(invalid("invalid_payload", format!("`payload` is JSON that clients cannot read back: {e}")));
    }
    if let Some(key) = &request.idempotency_key {
        if !is_plain_name(key, MAX_KEY_BYTES) {
            return Err(invalid(
                "invalid_request",
                format!("`idempotency_key` is 1 to {MAX_KEY_BYTES} bytes, without control characters"),
            ));
        }
    }
    if let Some(digest) = &request.digest {
        if !is_plain_name(&digest.key, MAX_KEY_BYTES) {
            return Err(invalid(
                "invalid_digest",
                format!("`digest.key` is 1 to {MAX_KEY_BYTES} bytes, without control characters"),
            ));
        }
        if digest.window_secs == 0 || digest.window_secs > MAX_WINDOW_SECS {
            return Err(invalid("invalid_digest", format!("`digest.window_secs` is 1 to {MAX_WINDOW_SECS}")));
        }
    }
    Ok(users)
}

/// A payload every client can parse as it was sent. JSON allows numbers no
/// double holds (`1e400`), strings with a lone UTF-16 surrogate (`"\ud800"`)
/// and nesting of any depth; serde_json (the Rust client, and the server's
/// own reader) refuses all three, so a notification carrying one would stop
/// that user's Rust client at every replay. `deserialize_any` makes
/// serde_json parse each number and string (where skipping would not), and
/// its recursion limit bounds the nesting (127 levels); nothing is allocated.
struct Portable;

impl<'de> serde::Deserialize<'de> for Portable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Portable, D::Error> {
        deserializer.deserialize_any(Portable)
    }
}

impl<'de> serde::de::Visitor<'de> for Portable {
    type Value = Portable;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Portable, E> {
        Ok(Portable)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Portable, E> {
        Ok(Portable)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Portable, E> {
        Ok(Portable)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Portable, E> {
        Ok(Portable)
    }

    fn visit_str<E>(self, _: &str) -> Result<Portable, E> {
        Ok(Portable)
    }

    fn visit_unit<E>(self) -> Result<Portable, E> {
        Ok(Portable)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<Portable, A::Error> {
        while items.next_element::<Portable>()?.is_some() {}
        Ok(Portable)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut entries: A) -> Result<Portable, A::Error> {
        while entries.next_entry::<Portable, Portable>()?.is_some() {}
        Ok(Portable)
    }
}

/// A topic as publishing accepts it (and as the inbox filters and read
/// marks by topic take it): 1 to 128 characters, no control characters.
pub fn check_topic(topic: &str) -> Result<(), String> {
    let chars = topic.chars().count();
    if chars == 0 || chars > MAX_TOPIC_CHARS || topic.contains(char::is_control) {
        Err(format!("`topic` is 1 to {MAX_TOPIC_CHARS} characters, without control characters"))
    } else {
        Ok(())
    }
}

/// A user id: 1 to 256 bytes of UTF-8 (spec §2, the `sub` claim), without
/// control characters (PostgreSQL text cannot hold NUL, and no real id has them).
pub fn check_user_id(user: &str) -> Result<(), String> {
    if is_plain_name(user, 256) {
        Ok(())
    } else {
        Err("a user id is 1 to 256 bytes, without control characters".into())
    }
}

/// The rule for the names a client gives Herald (user ids, `jti`s, keys, job
/// ids): 1 to `max_bytes` bytes, without control characters.
pub fn is_plain_name(name: &str, max_bytes: usize) -> bool {
    !name.is_empty() && name.len() <= max_bytes && !name.contains(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::Portable;

    fn portable(json: &str) -> bool {
        serde_json::from_str::<Portable>(json).is_ok()
    }

    /// Portable accepts exactly what a `serde_json::Value` (the Rust
    /// client's reading) accepts.
    #[test]
    fn portable_payloads_are_those_serde_json_reads_back() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let cases = [
            r#"{"a":[1,-0,1.5e308,18446744073709551615,123456789012345678901234567890,true,null,"x"]}"#.to_string(),
            r#""\ud83d\ude00 a pair""#.into(),
            r#"{"k":"v","k":"w"}"#.into(),
            "1e400".into(),
            "[-1e309]".into(),
            r#""\ud800""#.into(),
            r#""\udc00""#.into(),
            r#"{"\ud83d x":1}"#.into(),
            r#""\ud83d\u0041""#.into(),
            deep(127),
            deep(128),
            deep(10_000),
        ];
        for json in &cases {
            let value = serde_json::from_str::<serde_json::Value>(json).is_ok();
            assert_eq!(portable(json), value, "{json:.60}");
        }
        assert!(portable(&deep(127)) && !portable(&deep(128)));
        assert!(!portable("1e400") && !portable(r#""\ud800""#));
    }
}
