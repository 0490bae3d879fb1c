//! The high-level client: one background task keeps a session open, resumes
//! it after every disconnect, refreshes its token, and yields [`Event`]s.
//!
//! - `driver` — the task: connect, serve, decide what a close code means, back off.
//! - `connection` — one connected session: one `select!` over the socket,
//!   commands, the token refresh, pings and the dead-connection deadline.
//! - `control` — commands in, events out, read marks queued and in flight.
//! - `outlet` — handing events over without ever blocking that loop.
//! - `backoff` — full-jitter exponential backoff.

mod backoff;
mod connection;
mod control;
mod driver;
mod event;
mod outlet;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald_protocol::{ReadMark, Seq};
use tokio::sync::{mpsc, oneshot, Mutex};

pub use event::{Event, Events, State};

use crate::error::BoxError;
use crate::{Error, TlsOptions, TokenVia};
use backoff::Backoff;
use driver::{Driver, Settings};

/// Mark-read and close requests waiting for the task.
const COMMANDS: usize = 64;
const DEFAULT_EVENT_CAPACITY: usize = 256;

/// What a [`TokenProvider`] returns.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send + 'static>>;

/// Where the [`Client`] gets user tokens (JWTs): before the first connect,
/// when the server warns that the token expires (`token_expiring`, answered
/// with an in-band `refresh`), and after the server refused one (close 4001,
/// or a 401 at the handshake).
///
/// Any `Fn() -> impl Future<Output = Result<String, E>>` is a provider:
///
/// ```
/// # fn demo(builder: herald_client::ClientBuilder) -> herald_client::ClientBuilder {
/// let auth = reqwest::Client::new();
/// builder.token_provider(move || {
///     let auth = auth.clone();
///     async move { auth.post("https://app.example.com/herald-token").send().await?.text().await }
/// })
/// # }
/// ```
pub trait TokenProvider: Send + Sync + 'static {
    fn token(&self) -> TokenFuture;
}

impl<F, Fut, E> TokenProvider for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    fn token(&self) -> TokenFuture {
        let fut = self();
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

/// A token that never changes.
struct Fixed(String);

impl TokenProvider for Fixed {
    fn token(&self) -> TokenFuture {
        let token = self.0.clone();
        Box::pin(async move { Ok(token) })
    }
}

/// Settings of a [`Client`]; from [`Client::builder`].
pub struct ClientBuilder {
    url: String,
    provider: Option<Arc<dyn TokenProvider>>,
    since: Option<Seq>,
    epoch: Option<String>,
    tls: TlsOptions,
    via: TokenVia,
    origin: Option<String>,
    user_agent: Option<String>,
    backoff: Backoff,
    connect_timeout: Duration,
    event_capacity: usize,
}

impl ClientBuilder {
    /// A token that never changes (it cannot be refreshed: the session ends
    /// with an error when it expires). Prefer [`token_provider`](Self::token_provider).
    pub fn token(mut self, jwt: impl Into<String>) -> ClientBuilder {
        self.provider = Some(Arc::new(Fixed(jwt.into())));
        self
    }

    /// Where tokens come from; see [`TokenProvider`].
    pub fn token_provider(mut self, provider: impl TokenProvider) -> ClientBuilder {
        self.provider = Some(Arc::new(provider));
        self
    }

    /// Start after `seq` — the last seq the application processed (persisted
    /// from [`Event::Notification`]s or [`Client::last_seq`]). Without it the
    /// client starts with what is committed after it first connects.
    pub fn since(mut self, seq: Seq) -> ClientBuilder {
        self.since = Some(seq);
        self
    }

    /// The store epoch the `since` belongs to (persisted from
    /// [`Client::epoch`] with the seq). If the server's store was restored
    /// from a backup meanwhile, the client resumes from where the two
    /// histories part ([`Event::Rewound`]) instead of skipping the
    /// notifications stored under seqs it saw before the restore.
    pub fn epoch(mut self, epoch: impl Into<String>) -> ClientBuilder {
        self.epoch = Some(epoch.into());
        self
    }

    /// Which certificates `wss://` trusts (default: `webpki-roots`).
    pub fn tls(mut self, tls: TlsOptions) -> ClientBuilder {
        self.tls = tls;
        self
    }

    /// Also trusts the certificates in `pem` (a private CA or a self-signed server).
    pub fn root_certificate(mut self, pem: impl Into<Vec<u8>>) -> ClientBuilder {
        self.tls = self.tls.root_certificate(pem);
        self
    }

    /// How the token travels in the handshake (default: the `Authorization` header).
    pub fn token_via(mut self, via: TokenVia) -> ClientBuilder {
        self.via = via;
        self
    }

    /// An `Origin` header for servers that check it.
    pub fn origin(mut self, origin: impl Into<String>) -> ClientBuilder {
        self.origin = Some(origin.into());
        self
    }

    /// The handshake's `User-Agent`, which a backend sees in the user's
    /// session listing (default `herald-client-rust/<version>`): name the
    /// app and device.
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> ClientBuilder {
        self.user_agent = Some(user_agent.into());
        self
    }

    /// Reconnect backoff: attempt `n` waits a random time in
    /// `0 ..= min(cap, base · 2ⁿ)`. Default 500 ms and 30 s. A session that
    /// stayed up for at least `cap` starts the count again.
    pub fn backoff(mut self, base: Duration, cap: Duration) -> ClientBuilder {
        self.backoff = Backoff { base, cap };
        self
    }

    /// How long one connection attempt (TCP, TLS, upgrade, welcome) may take. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.connect_timeout = timeout;
        self
    }

    /// Events buffered for the consumer (default 256). A consumer further
    /// behind than this costs a reconnect with `since`, not a notification.
    pub fn event_capacity(mut self, capacity: usize) -> ClientBuilder {
        self.event_capacity = capacity;
        self
    }

    /// Starts the client's task (call it inside a Tokio runtime). It connects
    /// in the background; the first event is [`State::Connected`] or, if the
    /// server cannot be reached, [`State::Disconnected`].
    pub fn build(self) -> Result<Client, Error> {
        let provider =
            self.provider.ok_or_else(|| Error::Config("no token: call token() or token_provider()".into()))?;
        let secure = match self.url.split_once("://").map(|(scheme, _)| scheme) {
            Some("ws" | "http") => false,
            Some("wss" | "https") => true,
            _ => return Err(Error::Config("the URL must start with ws://, wss://, http:// or https://".into())),
        };
        if self.backoff.base.is_zero() || self.backoff.cap < self.backoff.base {
            return Err(Error::Config("backoff needs 0 < base <= cap".into()));
        }
        if self.event_capacity == 0 {
            return Err(Error::Config("event_capacity must be at least 1".into()));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Config("build() must be called inside a Tokio runtime".into()))?;
        let settings = Settings {
            url: self.url,
            via: self.via,
            origin: self.origin,
            user_agent: self.user_agent,
            tls: if secure { Some(self.tls.client_config()?) } else { None },
            backoff: self.backoff,
            connect_timeout: self.connect_timeout,
        };
        let (events_tx, events_rx) = mpsc::channel(self.event_capacity);
        let (commands_tx, commands_rx) = mpsc::channel(COMMANDS);
        let shared = Arc::new(Shared {
            last_seq: AtomicI64::new(self.since.unwrap_or(NO_SEQ)),
            epoch: std::sync::Mutex::new(self.epoch),
        });
        let driver = Driver::new(settings, provider, shared.clone(), commands_rx, events_tx);
        runtime.spawn(driver.run());
        Ok(Client { inner: Arc::new(Inner { commands: commands_tx, events: Mutex::new(events_rx), shared }) })
    }
}

/// A notification stream that stays up: it reconnects with full-jitter
/// backoff, resumes with `since` so every notification arrives once and in
/// order, refreshes its token in band, and detects dead connections.
///
/// `Client` is a cheap [`Clone`] handle; the task stops on [`close`](Self::close),
/// on an error it cannot recover from (the last event is then
/// [`Event::Error`]), or when every handle (and every [`Events`]) is dropped.
///
/// ```no_run
/// # async fn demo() -> Result<(), herald_client::Error> {
/// use futures_util::StreamExt;
/// use herald_client::{Client, Event, ReadMark, State};
///
/// let client = Client::builder("wss://herald.example.com")
///     .token_provider(|| async { Ok::<_, std::io::Error>(fetch_token().await) })
///     .since(load_last_seq())
///     .epoch(load_epoch())
///     .build()?;
/// let mut events = client.events();
/// while let Some(event) = events.next().await {
///     match event {
///         Event::Notification(n) => {
///             println!("#{} {}: {}", n.seq, n.topic, n.payload);
///             client.mark_read(ReadMark::Seqs { seqs: vec![n.seq] }).await?;
///             save_last_seq(n.seq, client.epoch());
///         }
///         Event::State(State::Disconnected { code, retry_in, .. }) => {
///             println!("disconnected ({code:?}); retrying in {retry_in:?}");
///         }
///         Event::Error(e) => return Err(e),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// # async fn fetch_token() -> String { String::new() }
/// # fn load_last_seq() -> i64 { 0 }
/// # fn load_epoch() -> String { String::new() }
/// # fn save_last_seq(_: i64, _: Option<String>) {}
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    /// One consumer at a time; a tokio mutex, held across the `recv`.
    events: Mutex<mpsc::Receiver<Event>>,
    shared: Arc<Shared>,
}

/// What the task and the handles share.
pub(crate) struct Shared {
    /// The cursor: the last seq handed to the consumer, [`NO_SEQ`] before any.
    pub last_seq: AtomicI64,
    /// The store epoch the cursor belongs to (from the last welcome).
    pub epoch: std::sync::Mutex<Option<String>>,
}

pub(crate) const NO_SEQ: i64 = i64::MIN;

pub(crate) enum Command {
    MarkRead(ReadMark, oneshot::Sender<Result<(), Error>>),
    Close(oneshot::Sender<()>),
}

impl Client {
    /// `url` is the server's `wss://host[:port]` (or `ws://`; `https://` and
    /// `http://` mean the same). The path `/v1/ws` is added.
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            provider: None,
            since: None,
            epoch: None,
            tls: TlsOptions::default(),
            via: TokenVia::Header,
            origin: None,
            user_agent: None,
            backoff: Backoff { base: Duration::from_millis(500), cap: Duration::from_secs(30) },
            connect_timeout: Duration::from_secs(10),
            event_capacity: DEFAULT_EVENT_CAPACITY,
        }
    }

    /// The next event; `None` once the client has stopped and every event was taken.
    /// Events are meant for one consumer: concurrent callers share them out.
    pub async fn next_event(&self) -> Option<Event> {
        self.inner.events.lock().await.recv().await
    }

    /// The events as a [`Stream`](futures_util::Stream) (it keeps the client alive).
    pub fn events(&self) -> Events {
        let stream = futures_util::stream::unfold(self.clone(), |client| async move {
            let event = client.next_event().await?;
            Some((event, client))
        });
        Events { inner: Box::pin(stream) }
    }

    /// Marks notifications read over the socket and waits for the server's
    /// answer. Across a reconnect the mark is sent again on the new session
    /// (marks are idempotent), so this waits through outages: wrap it in a
    /// timeout if it must not. Every session of the user also gets an
    /// [`Event::Read`].
    pub async fn mark_read(&self, mark: ReadMark) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.inner.commands.send(Command::MarkRead(mark, reply)).await.map_err(|_| Error::Stopped)?;
        answer.await.unwrap_or(Err(Error::Stopped))
    }

    /// The seq the client would resume after: the last notification handed to
    /// the event stream (or the `since` it started with, or the server's
    /// newest at the first connect). Persist the seqs you *processed* instead
    /// when events may still be queued.
    pub fn last_seq(&self) -> Option<Seq> {
        match self.inner.shared.last_seq.load(Ordering::Acquire) {
            NO_SEQ => None,
            seq => Some(seq),
        }
    }

    /// The store epoch the seqs belong to, from the last welcome (or the
    /// one the client was built with): persist it with the seq and give it
    /// back to [`ClientBuilder::epoch`]. `None` from a server that does not
    /// send one.
    pub fn epoch(&self) -> Option<String> {
        self.inner.shared.epoch.lock().expect("the epoch lock is never poisoned").clone()
    }

    /// Closes the session with 1000 and stops the task. Events already
    /// queued can still be read; then the stream ends. Pending `mark_read`s
    /// fail with [`Error::Stopped`].
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.inner.commands.send(Command::Close(reply)).await.is_ok() {
            let _ = done.await;
        }
    }
}
