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

/// `202` answer to a publish naming more users than the synchronous limit:
/// the worker pool stores and delivers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobAccepted {
    pub job_id: String,
}

/// `GET /v1/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job_id: String,
    /// `queued`, `running`, `done` or `failed`.
    pub state: String,
    pub progress: JobProgress,
    /// Claims so far.
    pub attempts: u32,
    /// The last failure's reason (while retrying, or when failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    /// Users stored and delivered so far.
    pub done: i64,
    pub total: i64,
}

/// `202` answer to a publish with `digest`: where each user's entry went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DigestAccepted {
    pub digests: Vec<DigestPending>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DigestPending {
    pub user_id: String,
    pub key: String,
    /// Entries in the window so far, this one included.
    pub count: i64,
    /// When the window closes into one notification (RFC 3339).
    pub closes_at: String,
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
pub struct NotificationPage<P = Value> {
    pub notifications: Vec<Notification<P>>,
    /// The user's newest committed seq.
    pub last_seq: Seq,
}

/// `DELETE /v1/users/{id}/notifications[?up_to_seq=N]`: what was erased.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Erased {
    pub user_id: String,
    /// Notifications deleted.
    pub deleted: u64,
    /// Digest windows deleted (only when everything was erased).
    pub digests: u64,
    /// The user's oldest kept seq (`last_seq + 1` when none is kept).
    pub oldest_seq: Seq,
    /// The user's newest committed seq: the counter stays, seqs are never reused.
    pub last_seq: Seq,
}

/// `POST /v1/users/{id}/tokens/revoke`: the body (`{}` revokes every token
/// issued up to now).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeTokens {
    /// Unix seconds: the user's tokens whose `iat` is before it (or that
    /// have no `iat`) are refused. Default: the server's next second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_before: Option<i64>,
    /// Unix seconds: when every token this revocation covers has expired
    /// (the longest lifetime your tokens have, after `issued_before`), so
    /// that Herald may forget it. Default: kept for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// `POST /v1/users/{id}/tokens/revoke`: the revocation in force, merged
/// with any earlier one: the later `issued_before` (it never moves back)
/// and the later `expires_at` (absent: kept for good).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokensRevoked {
    pub user_id: String,
    pub issued_before: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// `POST /v1/users/{id}/tokens/{jti}/revoke`: the body. One token — the
/// one whose `jti` claim is in the path — is refused from then on; the
/// user's other tokens keep working.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeToken {
    /// Unix seconds: when the token expires (its `exp`), after which Herald
    /// may forget the revocation. Default: kept for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// `POST /v1/users/{id}/tokens/{jti}/revoke`: the revocation in force,
/// merged with any earlier one of the same token (the later `expires_at`;
/// absent: kept for good).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRevoked {
    pub user_id: String,
    pub jti: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// `GET /v1/users/{id}/sessions`: the user's open sessions on every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserSessions {
    pub user_id: String,
    /// Sessions open across the cluster (what presence answers).
    pub count: u64,
    /// The sessions, oldest first: every one, except that a node lists at
    /// most 100 of one user's (the newest), so `sessions` may be shorter
    /// than `count` when the per-user session cap is off.
    pub sessions: Vec<UserSession>,
}

/// One open WebSocket session, as the handshake saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserSession {
    /// As the session's `welcome` gave it; `DELETE
    /// /v1/users/{id}/sessions/{session_id}` closes this session alone.
    pub session_id: String,
    /// The node serving it.
    pub node_id: String,
    /// RFC 3339, UTC, to the millisecond.
    pub connected_at: String,
    /// The `jti` of the token the session runs on now (after any `refresh`),
    /// when it has one Herald can revoke alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// `exp` of that token, unix seconds.
    pub token_expires_at: i64,
    /// The client's address, as the node resolved it (behind a trusted
    /// proxy, from its forwarding header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The handshake's `User-Agent`, at most 256 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
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
