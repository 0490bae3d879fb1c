//! A Tokio client for Herald, the real-time notification server.
//!
//! - [`Client`]: the notification stream an application wants — it connects,
//!   reconnects with full-jitter backoff, resumes with `since` so each
//!   notification arrives once and in order, refreshes its token in band,
//!   detects dead connections and marks notifications read.
//! - [`Publisher`]: publish, job status and history over HTTP with an API key.
//! - [`Inbox`]: a user's inbox over HTTP with the user's token.
//! - [`Connect`] / [`Session`]: one WebSocket session, frame by frame, no
//!   reconnects (tests and tools).
//! - [`TlsOptions`]: `wss://` and `https://` with rustls (*ring*), trusting
//!   `webpki-roots` and any root certificate you add.
//!
//! Wire types ([`Notification`], [`ServerFrame`], …) come from `herald-protocol`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), herald_client::Error> {
//! use herald_client::{Client, Event, Publisher};
//!
//! let client = Client::builder("wss://herald.example.com").token("<alice's jwt>").build()?;
//! let publisher = Publisher::new("https://herald.example.com", "<api key>");
//! publisher.publish_one("alice", "orders", serde_json::json!({"order": 42})).await?;
//! while let Some(event) = client.next_event().await {
//!     match event {
//!         Event::Notification(n) => println!("#{} {}: {}", n.seq, n.topic, n.payload),
//!         Event::Error(e) => return Err(e),
//!         other => println!("{other:?}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The low-level session, as the server's tests use it:
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

mod client;
mod error;
mod http;
mod inbox;
mod publisher;
mod session;
mod tls;

pub use client::{Client, ClientBuilder, Event, Events, State, TokenFuture, TokenProvider};
pub use error::{BoxError, Error};
pub use herald_protocol::http::{
    Digest, DigestAccepted, DigestPending, ErrorBody, JobAccepted, JobProgress, JobStatus, NotificationPage,
    PublishRequest, PublishResponse, Published, RevokeToken, RevokeTokens, TokenRevoked, TokensRevoked, UnreadCounts,
    UserSession, UserSessions,
};
pub use herald_protocol::{close, ClientFrame, Notification, ReadMark, Seq, ServerFrame, Welcome};
pub use inbox::Inbox;
pub use publisher::{Publisher, Submitted};
pub use session::{Connect, Session, TokenVia, DEFAULT_USER_AGENT};
pub use tls::TlsOptions;
