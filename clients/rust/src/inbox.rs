//! A user's inbox over HTTP with the user's token (spec §3, "The user's inbox").

use herald_protocol::http::{NotificationPage, UnreadCounts};
use herald_protocol::ReadMark;

use crate::http::{answer, no_content, trim_base};
use crate::{Error, TlsOptions};

/// A user's inbox over HTTP: pages of history, read marks, unread counts.
///
/// ```no_run
/// # async fn demo() -> Result<(), herald_client::Error> {
/// use herald_client::{Inbox, ReadMark};
///
/// let inbox = Inbox::new("https://herald.example.com", "<user jwt>");
/// let page = inbox.list(&[("limit", "20"), ("unread", "true")]).await?; // newest first
/// for n in &page.notifications {
///     println!("{} {} {}", n.seq, n.topic, n.payload);
/// }
/// inbox.mark_read(&ReadMark::UpTo { up_to_seq: page.last_seq }).await?;
/// assert_eq!(inbox.unread().await?.total, 0);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Inbox {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Inbox {
    /// `base` is the server's `http://host:port` or `https://host:port`.
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> Inbox {
        Inbox::with_tls(base, token, &TlsOptions::default()).expect("the default TLS options always build")
    }

    /// Like [`new`](Self::new), trusting what `tls` says.
    pub fn with_tls(base: impl Into<String>, token: impl Into<String>, tls: &TlsOptions) -> Result<Inbox, Error> {
        Ok(Inbox { http: tls.http_client()?, base: trim_base(base.into()), token: token.into() })
    }

    /// `GET /v1/me/notifications` with `(name, value)` query pairs, newest first.
    pub async fn list(&self, query: &[(&str, &str)]) -> Result<NotificationPage, Error> {
        let response = self
            .http
            .get(format!("{}/v1/me/notifications", self.base))
            .bearer_auth(&self.token)
            .query(query)
            .send()
            .await?;
        Ok(answer(response).await?.1)
    }

    /// `POST /v1/me/notifications/read`.
    pub async fn mark_read(&self, mark: &ReadMark) -> Result<(), Error> {
        let response = self
            .http
            .post(format!("{}/v1/me/notifications/read", self.base))
            .bearer_auth(&self.token)
            .json(mark)
            .send()
            .await?;
        no_content(response).await
    }

    /// `GET /v1/me/unread`.
    pub async fn unread(&self) -> Result<UnreadCounts, Error> {
        let response = self.http.get(format!("{}/v1/me/unread", self.base)).bearer_auth(&self.token).send().await?;
        Ok(answer(response).await?.1)
    }
}
