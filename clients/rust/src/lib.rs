//! A small Tokio client for Herald.
//!
//! - [`Session`]: a WebSocket session — connect with a token and `since`,
//!   then read typed [`ServerFrame`]s.
//! - [`Publisher`]: publish and read history over HTTP with an API key.
//! - [`Inbox`]: a user's inbox over HTTP with the user's token.
//!
//! ```no_run
//! # async fn demo() -> Result<(), herald_client::Error> {
//! use herald_client::{Connect, Publisher, ServerFrame};
//! let publisher = Publisher::new("http://127.0.0.1:8080", "my-api-key");
//! let mut session = Connect::new("ws://127.0.0.1:8080", "<user jwt>").since(0).connect().await?;
//! publisher.publish_one("alice", "orders", serde_json::json!({"order": 42})).await?;
//! while let ServerFrame::Notification(n) = session.next_frame().await? {
//!     println!("{} {}", n.seq, n.payload);
//! }
//! # Ok(()) }
//! ```

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
pub use herald_protocol::http::{
    Digest, DigestAccepted, DigestPending, ErrorBody, JobAccepted, JobProgress, JobStatus, NotificationPage,
    PublishRequest, PublishResponse, Published, UnreadCounts,
};
pub use herald_protocol::{close, ClientFrame, Notification, ReadMark, Seq, ServerFrame, Welcome};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server refused the handshake or an HTTP call with the spec's error body.
    #[error("HTTP {status}: {code}: {message}")]
    Refused { status: u16, code: String, message: String },
    /// The server closed the session.
    #[error("closed with {code}: {reason}")]
    Closed { code: u16, reason: String },
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("unexpected frame: {0}")]
    Protocol(String),
}

/// How the token travels in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenVia {
    /// `Authorization: Bearer <jwt>` (the default for servers and tools).
    Header,
    /// `Sec-WebSocket-Protocol: herald.v1, herald.bearer.<jwt>` (what browsers do).
    Subprotocol,
    /// `?access_token=<jwt>`.
    Query,
}

/// Options of a WebSocket connection.
#[derive(Debug, Clone)]
pub struct Connect {
    base: String,
    token: String,
    since: Option<Seq>,
    via: TokenVia,
    origin: Option<String>,
}

impl Connect {
    /// `base` is the server's `ws://host:port` (or `wss://`).
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> Connect {
        Connect { base: base.into(), token: token.into(), since: None, via: TokenVia::Header, origin: None }
    }

    /// Resume after `seq`: the server first sends every notification after it.
    pub fn since(mut self, seq: Seq) -> Connect {
        self.since = Some(seq);
        self
    }

    pub fn token_via(mut self, via: TokenVia) -> Connect {
        self.via = via;
        self
    }

    pub fn origin(mut self, origin: impl Into<String>) -> Connect {
        self.origin = Some(origin.into());
        self
    }

    /// Opens the session and reads its `welcome`.
    pub async fn connect(self) -> Result<Session, Error> {
        let mut url = format!("{}/v1/ws", self.base.trim_end_matches('/'));
        let mut params = Vec::new();
        if let Some(since) = self.since {
            params.push(format!("since={since}"));
        }
        if self.via == TokenVia::Query {
            params.push(format!("access_token={}", self.token));
        }
        if !params.is_empty() {
            url = format!("{url}?{}", params.join("&"));
        }
        let mut request = url.into_client_request()?;
        let headers = request.headers_mut();
        match self.via {
            TokenVia::Header => {
                headers.insert("authorization", header(&format!("Bearer {}", self.token))?);
            }
            TokenVia::Subprotocol => {
                headers.insert("sec-websocket-protocol", header(&format!("herald.v1, herald.bearer.{}", self.token))?);
            }
            TokenVia::Query => {}
        }
        if let Some(origin) = &self.origin {
            headers.insert("origin", header(origin)?);
        }
        let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
        let (ws, response) = match tokio_tungstenite::connect_async_with_config(request, Some(config), false).await {
            Ok(ok) => ok,
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response.body().as_deref().unwrap_or_default();
                return Err(refusal(status, body));
            }
            Err(e) => return Err(e.into()),
        };
        let protocol =
            response.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut session = Session { ws, welcome: None, protocol };
        match session.next_frame().await? {
            ServerFrame::Welcome(w) => session.welcome = Some(w),
            other => return Err(Error::Protocol(format!("expected welcome, got {other:?}"))),
        }
        Ok(session)
    }
}

fn header(value: &str) -> Result<HeaderValue, Error> {
    HeaderValue::from_str(value).map_err(|e| Error::Protocol(format!("bad header value: {e}")))
}

fn refusal(status: u16, body: &[u8]) -> Error {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => Error::Refused { status, code: b.error.code, message: b.error.message },
        Err(_) => Error::Refused { status, code: String::new(), message: String::from_utf8_lossy(body).into_owned() },
    }
}

/// An open WebSocket session.
pub struct Session {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    welcome: Option<Welcome>,
    protocol: Option<String>,
}

impl Session {
    /// The `welcome` frame the session opened with.
    pub fn welcome(&self) -> &Welcome {
        self.welcome.as_ref().expect("connect reads the welcome")
    }

    /// The subprotocol the server chose, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// The next frame. WebSocket pings are answered on the way; a close frame
    /// becomes [`Error::Closed`] with its code.
    pub async fn next_frame(&mut self) -> Result<ServerFrame, Error> {
        loop {
            match self.ws.next().await {
                None => return Err(Error::Closed { code: 1006, reason: "connection dropped".into() }),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(&t).map_err(|e| Error::Protocol(format!("{e}: {}", t.as_str())));
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame.map_or((1005, String::new()), |f| (f.code.into(), f.reason.to_string()));
                    return Err(Error::Closed { code, reason });
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Like [`Session::next_frame`], giving up after `wait`.
    pub async fn next_frame_within(&mut self, wait: Duration) -> Result<Option<ServerFrame>, Error> {
        match tokio::time::timeout(wait, self.next_frame()).await {
            Ok(frame) => frame.map(Some),
            Err(_) => Ok(None),
        }
    }

    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), Error> {
        let text = serde_json::to_string(frame).map_err(|e| Error::Protocol(e.to_string()))?;
        self.send_text(text).await
    }

    /// Sends any text frame, well-formed or not.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<(), Error> {
        Ok(self.ws.send(Message::Text(text.into().into())).await?)
    }

    /// Sends raw WebSocket messages (binary, oversized, …).
    pub async fn send_message(&mut self, message: Message) -> Result<(), Error> {
        Ok(self.ws.send(message).await?)
    }

    /// Closes with 1000.
    pub async fn close(mut self) -> Result<(), Error> {
        self.ws.close(None).await?;
        while let Some(Ok(_)) = self.ws.next().await {}
        Ok(())
    }
}

async fn answer<T: DeserializeOwned>(response: reqwest::Response) -> Result<(StatusCode, T), Error> {
    let status = response.status();
    let body = response.bytes().await?;
    if !status.is_success() {
        return Err(refusal(status.as_u16(), &body));
    }
    let value = serde_json::from_slice(&body).map_err(|e| Error::Protocol(format!("bad response body: {e}")))?;
    Ok((status, value))
}

async fn no_content(response: reqwest::Response) -> Result<(), Error> {
    let status = response.status();
    let body = response.bytes().await?;
    if !status.is_success() {
        return Err(refusal(status.as_u16(), &body));
    }
    Ok(())
}

/// Publishes and reads history with an API key.
#[derive(Clone)]
pub struct Publisher {
    http: reqwest::Client,
    base: String,
    api_key: String,
}

impl Publisher {
    /// `base` is the server's `http://host:port`.
    pub fn new(base: impl Into<String>, api_key: impl Into<String>) -> Publisher {
        Publisher {
            http: reqwest::Client::new(),
            base: base.into().trim_end_matches('/').to_string(),
            api_key: api_key.into(),
        }
    }

    /// `POST /v1/notifications`; the status tells 201 (stored) from 200 (idempotent repeat).
    pub async fn publish(&self, request: &PublishRequest) -> Result<(StatusCode, PublishResponse), Error> {
        let response = self
            .http
            .post(format!("{}/v1/notifications", self.base))
            .bearer_auth(&self.api_key)
            .json(request)
            .send()
            .await?;
        answer(response).await
    }

    /// `POST /v1/notifications` with any answer: stored (201/200), a job for a
    /// large audience (202 `job_id`), or digest entries (202 `digests`).
    pub async fn submit(&self, request: &PublishRequest) -> Result<(StatusCode, Submitted), Error> {
        let response = self
            .http
            .post(format!("{}/v1/notifications", self.base))
            .bearer_auth(&self.api_key)
            .json(request)
            .send()
            .await?;
        answer(response).await
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

    /// `GET /v1/users/{user}/notifications?after_seq=&limit=`.
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

/// A user's inbox over HTTP.
#[derive(Clone)]
pub struct Inbox {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Inbox {
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> Inbox {
        Inbox { http: reqwest::Client::new(), base: base.into().trim_end_matches('/').to_string(), token: token.into() }
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

fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
