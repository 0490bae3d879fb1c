//! Bodies of the HTTP API (spec §3 and §4).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Notification, Seq};

/// `POST /v1/notifications`. `P` is the payload's representation: clients use
/// [`Value`]; the server keeps it as raw JSON text.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest<P = Value> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_ids: Option<Vec<String>>,
    pub topic: String,
    pub payload: P,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Digest {
    pub key: String,
    pub window_secs: u64,
}

/// `201` (new) or `200` (idempotent repeat) answer to a publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishResponse {
    pub notifications: Vec<Published>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    pub user_id: String,
    pub id: String,
    pub seq: Seq,
}

/// A page of a user's history: `GET /v1/me/notifications`,
/// `GET /v1/users/{id}/notifications`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationPage {
    pub notifications: Vec<Notification>,
    /// The user's newest committed seq.
    pub last_seq: Seq,
}

/// `GET /v1/me/unread`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnreadCounts {
    pub total: i64,
    pub by_topic: BTreeMap<String, i64>,
}

/// Every non-2xx answer: `{"error":{"code","message"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}
