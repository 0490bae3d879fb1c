//! Publishing over HTTP with an API key (spec §3, "Publishing").

use herald_protocol::http::{
    DigestAccepted, Erased, JobAccepted, JobStatus, NotificationPage, PublishRequest, PublishResponse, Published,
    RevokeToken, RevokeTokens, TokenRevoked, TokensRevoked, UnreadCounts, UserSessions,
};
use herald_protocol::{ReadMark, Seq};
use reqwest::StatusCode;

use crate::http::{answer, encode_segment, no_content, trim_base};
use crate::{Error, TlsOptions};

/// Publishes and reads history with an API key. A cheap [`Clone`] handle over
/// one connection pool.
///
/// ```no_run
/// # async fn demo() -> Result<(), herald_client::Error> {
/// use herald_client::{PublishRequest, Publisher, Submitted};
/// use serde_json::json;
///
/// let publisher = Publisher::new("https://herald.example.com", "<api key>");
///
/// // One user: the answer carries the notification's id and seq.
/// let published = publisher.publish_one("alice", "orders", json!({"order": 42})).await?;
/// println!("stored as seq {}", published.seq);
///
/// // Several users, at most once per idempotency key.
/// let request = PublishRequest {
///     user_id: None,
///     user_ids: Some(vec!["alice".into(), "bob".into()]),
///     topic: "orders".into(),
///     payload: json!({"order": 43, "status": "shipped"}),
///     idempotency_key: Some("order-43-shipped".into()),
///     digest: None,
/// };
/// let (status, answer) = publisher.publish(&request).await?; // 201 stored, 200 a repeat
/// println!("{status}: {:?}", answer.notifications);
///
/// // Any audience size: large ones become a job (202).
/// if let (_, Submitted::Job(job)) = publisher.submit(&request).await? {
///     println!("job {}: {}", job.job_id, publisher.job(&job.job_id).await?.state);
/// }
///
/// // A user's history, oldest first.
/// let page = publisher.history("alice", 0, 100).await?;
/// println!("{} of {}", page.notifications.len(), page.last_seq);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Publisher {
    http: reqwest::Client,
    base: String,
    api_key: String,
    /// `{base}/v1/notifications`, parsed once (`None` if `base` does not
    /// parse: the request then fails as it is sent, with reqwest's error).
    /// Parsing it per publish was ≈7% of the load generator's publishing CPU
    /// in user space (docs/BENCHMARKS.md).
    notifications: Option<reqwest::Url>,
}

impl Publisher {
    /// `base` is the server's `http://host:port` or `https://host:port`
    /// (trusting the `webpki-roots` certificates).
    pub fn new(base: impl Into<String>, api_key: impl Into<String>) -> Publisher {
        Publisher::with_tls(base, api_key, &TlsOptions::default()).expect("the default TLS options always build")
    }

    /// Like [`new`](Self::new), trusting what `tls` says.
    pub fn with_tls(base: impl Into<String>, api_key: impl Into<String>, tls: &TlsOptions) -> Result<Publisher, Error> {
        let base = trim_base(base.into());
        let notifications = reqwest::Url::parse(&format!("{base}/v1/notifications")).ok();
        Ok(Publisher { http: tls.http_client()?, base, api_key: api_key.into(), notifications })
    }

    /// Like [`new`](Self::new), also trusting the certificates in `pem` (a private CA).
    pub fn with_root_certificate(
        base: impl Into<String>,
        api_key: impl Into<String>,
        pem: impl Into<Vec<u8>>,
    ) -> Result<Publisher, Error> {
        Publisher::with_tls(base, api_key, &TlsOptions::new().root_certificate(pem))
    }

    /// `POST /v1/notifications`; the status tells 201 (stored) from 200 (idempotent repeat).
    pub async fn publish(&self, request: &PublishRequest) -> Result<(StatusCode, PublishResponse), Error> {
        answer(self.post_notification(request).send().await?).await
    }

    /// `POST /v1/notifications` with any answer: stored (201/200), a job for a
    /// large audience (202 `job_id`), or digest entries (202 `digests`; 200
    /// when the `idempotency_key` had added every user's entry already).
    pub async fn submit(&self, request: &PublishRequest) -> Result<(StatusCode, Submitted), Error> {
        answer(self.post_notification(request).send().await?).await
    }

    fn post_notification(&self, request: &PublishRequest) -> reqwest::RequestBuilder {
        let post = match &self.notifications {
            Some(url) => self.http.post(url.clone()),
            None => self.http.post(format!("{}/v1/notifications", self.base)),
        };
        post.bearer_auth(&self.api_key).json(request)
    }

    /// `GET /v1/jobs/{id}`.
    pub async fn job(&self, id: &str) -> Result<JobStatus, Error> {
        let url = format!("{}/v1/jobs/{}", self.base, encode_segment(id));
        let response = self.http.get(url).bearer_auth(&self.api_key).send().await?;
        Ok(answer(response).await?.1)
    }

    /// Publishes one notification to one user and returns it.
    pub async fn publish_one(&self, user: &str, topic: &str, payload: serde_json::Value) -> Result<Published, Error> {
        let request = PublishRequest {
            user_id: Some(user.into()),
            user_ids: None,
            topic: topic.into(),
            payload,
            idempotency_key: None,
            digest: None,
        };
        let (_, mut answer) = self.publish(&request).await?;
        answer.notifications.pop().ok_or_else(|| Error::Protocol("empty publish answer".into()))
    }

    /// `DELETE /v1/users/{user}/notifications`: erases the user's stored
    /// notifications (all of them, or those up to `up_to_seq`).
    pub async fn erase(&self, user: &str, up_to_seq: Option<Seq>) -> Result<Erased, Error> {
        let url = format!("{}/v1/users/{}/notifications", self.base, encode_segment(user));
        let mut request = self.http.delete(url).bearer_auth(&self.api_key);
        if let Some(up_to) = up_to_seq {
            request = request.query(&[("up_to_seq", up_to)]);
        }
        Ok(answer(request.send().await?).await?.1)
    }

    /// `POST /v1/users/{user}/notifications/read`: marks the user's
    /// notifications read, as the user would; their sessions get a `read` frame.
    pub async fn mark_read(&self, user: &str, mark: &ReadMark) -> Result<(), Error> {
        let url = format!("{}/v1/users/{}/notifications/read", self.base, encode_segment(user));
        no_content(self.http.post(url).bearer_auth(&self.api_key).json(mark).send().await?).await
    }

    /// `GET /v1/users/{user}/unread`: the user's unread counts.
    pub async fn unread(&self, user: &str) -> Result<UnreadCounts, Error> {
        let url = format!("{}/v1/users/{}/unread", self.base, encode_segment(user));
        Ok(answer(self.http.get(url).bearer_auth(&self.api_key).send().await?).await?.1)
    }

    /// `DELETE /v1/users/{user}/sessions`: closes every open session of the
    /// user, on every node, with 4003.
    pub async fn disconnect(&self, user: &str) -> Result<(), Error> {
        let url = format!("{}/v1/users/{}/sessions", self.base, encode_segment(user));
        no_content(self.http.delete(url).bearer_auth(&self.api_key).send().await?).await
    }

    /// `GET /v1/users/{user}/sessions`: the user's open sessions on every
    /// node, oldest first (id, node, when, token `jti` and `exp`, address,
    /// `User-Agent`).
    pub async fn sessions(&self, user: &str) -> Result<UserSessions, Error> {
        let url = format!("{}/v1/users/{}/sessions", self.base, encode_segment(user));
        Ok(answer(self.http.get(url).bearer_auth(&self.api_key).send().await?).await?.1)
    }

    /// `DELETE /v1/users/{user}/sessions/{session_id}`: closes that one
    /// session of the user, wherever it runs, with 4003; the others carry on.
    pub async fn disconnect_session(&self, user: &str, session_id: &str) -> Result<(), Error> {
        let url = format!("{}/v1/users/{}/sessions/{}", self.base, encode_segment(user), encode_segment(session_id));
        no_content(self.http.delete(url).bearer_auth(&self.api_key).send().await?).await
    }

    /// `POST /v1/users/{user}/tokens/revoke`: the user's tokens issued before
    /// `revocation.issued_before` (unix seconds; `None`: every token issued
    /// up to now) are refused from then on, and their sessions close with
    /// 4001, on every node. `RevokeTokens::default()` revokes every token
    /// issued so far, for good. Answers the revocation in force.
    pub async fn revoke_tokens(&self, user: &str, revocation: &RevokeTokens) -> Result<TokensRevoked, Error> {
        let url = format!("{}/v1/users/{}/tokens/revoke", self.base, encode_segment(user));
        Ok(answer(self.http.post(url).bearer_auth(&self.api_key).json(revocation).send().await?).await?.1)
    }

    /// `POST /v1/users/{user}/tokens/{jti}/revoke`: the one token of `user`
    /// whose `jti` claim is `jti` is refused from then on, and its sessions
    /// close with 4001, on every node; the user's other tokens keep working.
    /// Give `revocation.expires_at` the token's `exp`, so the revocation is
    /// forgotten once the token has expired. Answers the revocation in force.
    pub async fn revoke_token(&self, user: &str, jti: &str, revocation: &RevokeToken) -> Result<TokenRevoked, Error> {
        let url = format!("{}/v1/users/{}/tokens/{}/revoke", self.base, encode_segment(user), encode_segment(jti));
        Ok(answer(self.http.post(url).bearer_auth(&self.api_key).json(revocation).send().await?).await?.1)
    }

    /// `GET /v1/users/{user}/notifications?after_seq=&limit=`, oldest first.
    pub async fn history(&self, user: &str, after_seq: Seq, limit: u32) -> Result<NotificationPage, Error> {
        let url = format!("{}/v1/users/{}/notifications", self.base, encode_segment(user));
        let response = self
            .http
            .get(url)
            .bearer_auth(&self.api_key)
            .query(&[("after_seq", after_seq), ("limit", limit as i64)])
            .send()
            .await?;
        Ok(answer(response).await?.1)
    }
}

/// Any answer to a publish.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum Submitted {
    Stored(PublishResponse),
    Job(JobAccepted),
    Digest(DigestAccepted),
}
