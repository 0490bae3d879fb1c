//! The client's task: connect, serve the session, and decide from how it
//! ended whether to reconnect (and when) or stop.
//!
//! | end | then |
//! |---|---|
//! | 1001 going away | reconnect promptly (jitter within `base`), with `since` |
//! | 4001 token expired / refresh refused | a new token from the provider, reconnect at once |
//! | 401 at the handshake with a cached token | the same |
//! | 1013, 1011, 1000, 4029, dropped, dead, refused 5xx/429/408, timeout | backoff (after the refusal's `Retry-After`, when it has one: a full or draining node, a rate limit), then reconnect with `since` |
//! | 4003, 1008, 1009, 1002, 1007, refused 4xx, TLS failure, 401 with a new token | stop with [`Event::Error`] |

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use herald_protocol::{close, Seq, Welcome};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;

use super::backoff::Backoff;
use super::connection::Outcome;
use super::control::Control;
use super::outlet::Outlet;
use super::{Command, Event, Shared, State, TokenProvider, NO_SEQ};
use crate::session::Ws;
use crate::{Connect, Error, TokenVia};

pub(crate) struct Settings {
    pub url: String,
    pub via: TokenVia,
    pub origin: Option<String>,
    pub user_agent: Option<String>,
    /// Built once for every connection (wss only).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub backoff: Backoff,
    pub connect_timeout: Duration,
}

enum Opened {
    Session(Box<Ws>, Welcome),
    Failed(Error),
    Stop,
}

/// What to do after a session or an attempt.
enum Next {
    Retry {
        delay: Duration,
        code: Option<u16>,
        reason: String,
    },
    /// `Some` is the error that ends the client.
    Stop(Option<Error>),
}

pub(crate) struct Driver {
    settings: Settings,
    pub(super) provider: Arc<dyn TokenProvider>,
    pub(super) ctl: Control,
    /// The last seq handed over (or started from); the next `since`.
    pub(super) cursor: Option<Seq>,
    shared: Arc<Shared>,
    pub(super) token: Option<String>,
    /// The token was fetched for this attempt: a 401 now is final.
    token_fresh: bool,
    /// The user of the first session; every later one must match.
    user: Option<String>,
    attempt: u32,
    next_ref: u64,
}

impl Driver {
    pub fn new(
        settings: Settings,
        provider: Arc<dyn TokenProvider>,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
    ) -> Driver {
        let ctl = Control::new(commands, Outlet::new(events));
        Driver {
            settings,
            provider,
            ctl,
            cursor: match shared.last_seq.load(Ordering::Acquire) {
                NO_SEQ => None,
                since => Some(since),
            },
            shared,
            token: None,
            token_fresh: false,
            user: None,
            attempt: 0,
            next_ref: 1,
        }
    }

    pub async fn run(mut self) {
        let end = self.run_sessions().await;
        if let Some(e) = &end {
            tracing::debug!(error = %e, "herald client stopped");
        }
        self.finish(end).await;
    }

    /// Connects, serves and reconnects until a stop; `Some` is the error that ended it.
    async fn run_sessions(&mut self) -> Option<Error> {
        let mut delay = Duration::ZERO;
        loop {
            if !delay.is_zero() && self.ctl.during(tokio::time::sleep(delay)).await.is_none() {
                return None;
            }
            let next = match self.open().await {
                Opened::Stop => return None,
                Opened::Failed(e) => self.after_failure(e),
                Opened::Session(ws, welcome) => {
                    let ws = *ws;
                    let started = Instant::now();
                    if let Err(e) = self.on_welcome(&welcome) {
                        super::connection::close_normally(ws).await;
                        return Some(e);
                    }
                    let outcome = self.serve(ws, welcome.heartbeat_secs).await;
                    if started.elapsed() >= self.settings.backoff.cap {
                        self.attempt = 0;
                    }
                    self.after_session(outcome)
                }
            };
            match next {
                Next::Stop(end) => return end,
                Next::Retry { delay: wait, code, reason } => {
                    tracing::debug!(?code, %reason, retry_in = ?wait, "herald session ended; reconnecting");
                    self.ctl.outlet.event(Event::State(State::Disconnected { code, reason, retry_in: wait }));
                    delay = wait;
                }
            }
        }
    }

    /// One attempt: a token if needed, then the handshake and the welcome.
    async fn open(&mut self) -> Opened {
        if self.token.is_none() {
            match self.ctl.during(self.provider.token()).await {
                None => return Opened::Stop,
                Some(Err(e)) => return Opened::Failed(Error::Token(e)),
                Some(Ok(token)) => {
                    self.token = Some(token);
                    self.token_fresh = true;
                }
            }
        }
        let token = self.token.clone().expect("fetched above");
        let mut connect = Connect::new(self.settings.url.clone(), token).token_via(self.settings.via);
        if let Some(origin) = &self.settings.origin {
            connect = connect.origin(origin.clone());
        }
        if let Some(user_agent) = &self.settings.user_agent {
            connect = connect.user_agent(user_agent.clone());
        }
        if let Some(tls) = &self.settings.tls {
            connect = connect.tls_config(tls.clone());
        }
        if let Some(since) = self.cursor {
            connect = connect.since(since);
            if let Some(epoch) = self.shared.epoch.lock().expect("the epoch lock is never poisoned").clone() {
                connect = connect.epoch(epoch);
            }
        }
        match self.ctl.during(tokio::time::timeout(self.settings.connect_timeout, connect.connect())).await {
            None => Opened::Stop,
            Some(Err(_)) => Opened::Failed(Error::Timeout),
            Some(Ok(Err(e))) => Opened::Failed(e),
            Some(Ok(Ok(session))) => {
                let (ws, welcome) = session.into_parts();
                Opened::Session(Box::new(ws), welcome)
            }
        }
    }

    fn on_welcome(&mut self, welcome: &Welcome) -> Result<(), Error> {
        match &self.user {
            Some(user) if *user != welcome.user_id => {
                return Err(Error::Protocol("the token provider gave a token for another user".into()));
            }
            Some(_) => {}
            None => self.user = Some(welcome.user_id.clone()),
        }
        self.token_fresh = false;
        self.ctl.outlet.reset_lag();
        self.ctl.outlet.event(Event::State(State::Connected(welcome.clone())));
        // Where the server resumed: `welcome.since` (servers before store
        // epochs said only `last_seq`, which mattered when below ours).
        let resumed = welcome.since.unwrap_or(welcome.last_seq);
        match self.cursor {
            None => self.set_cursor(welcome.last_seq),
            // Below our cursor (a restore, or another database): follow it,
            // or what the server sends up to our old seq would be dropped.
            // Checked before truncation: after a restore the resume point
            // may also have been raised to the oldest retained seq.
            Some(since) if resumed < since => {
                self.ctl.outlet.event(Event::Rewound { since, last_seq: resumed });
                self.set_cursor(resumed);
            }
            Some(since) if welcome.truncated => {
                let oldest_seq = welcome.oldest_seq.unwrap_or(since + 1);
                self.ctl.outlet.event(Event::Truncated { since, oldest_seq });
            }
            Some(_) => {}
        }
        if let Some(epoch) = &welcome.epoch {
            *self.shared.epoch.lock().expect("the epoch lock is never poisoned") = Some(epoch.clone());
        }
        Ok(())
    }

    pub(super) fn set_cursor(&mut self, seq: Seq) {
        self.cursor = Some(seq);
        self.shared.last_seq.store(seq, Ordering::Release);
    }

    pub(super) fn next_ref(&mut self) -> u64 {
        let reference = self.next_ref;
        self.next_ref += 1;
        reference
    }

    fn after_failure(&mut self, e: Error) -> Next {
        match &e {
            Error::Refused { status: 401, .. } if !self.token_fresh => {
                self.token = None;
                Next::Retry { delay: Duration::ZERO, code: None, reason: e.to_string() }
            }
            Error::Refused { status: 408 | 429 | 500.., retry_after, .. } => {
                let at_least = retry_after.unwrap_or_default();
                let mut next = self.backoff(None, e.to_string());
                if let Next::Retry { delay, .. } = &mut next {
                    *delay += at_least;
                }
                next
            }
            Error::Refused { .. } | Error::Tls(_) | Error::Config(_) => Next::Stop(Some(e)),
            Error::WebSocket(tungstenite::Error::Url(_)) => Next::Stop(Some(e)),
            Error::Closed { code, reason } => self.after_close(*code, reason.clone()),
            _ => self.backoff(None, e.to_string()),
        }
    }

    fn after_session(&mut self, outcome: Outcome) -> Next {
        match outcome {
            Outcome::Stop => Next::Stop(None),
            Outcome::CaughtUp => Next::Retry {
                delay: Duration::ZERO,
                code: None,
                reason: "resuming after the consumer caught up".into(),
            },
            Outcome::Closed { code, reason } => self.after_close(code, reason),
            Outcome::Dropped(reason) => self.backoff(None, reason),
            Outcome::Dead => self.backoff(None, "no traffic for three heartbeats".into()),
        }
    }

    /// The spec's close codes: whom to blame and when to come back.
    fn after_close(&mut self, code: u16, reason: String) -> Next {
        match code {
            close::FORBIDDEN
            | close::POLICY_VIOLATION
            | close::TOO_LARGE
            | close::PROTOCOL_ERROR
            | close::INVALID_DATA => Next::Stop(Some(Error::Closed { code, reason })),
            close::GOING_AWAY => {
                self.attempt = 0;
                self.backoff(Some(code), reason)
            }
            close::TOKEN_EXPIRED => {
                self.token = None;
                if self.attempt == 0 {
                    self.attempt = 1;
                    return Next::Retry { delay: Duration::ZERO, code: Some(code), reason };
                }
                self.backoff(Some(code), reason)
            }
            _ => self.backoff(Some(code), reason),
        }
    }

    fn backoff(&mut self, code: Option<u16>, reason: String) -> Next {
        let delay = self.settings.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        Next::Retry { delay, code, reason }
    }

    /// Fails what is pending, answers `close()` callers, hands over the last events.
    async fn finish(self, end: Option<Error>) {
        let (outlet, closers) = self.ctl.shut();
        // A clean close hands over what fits at once; an error waits for the
        // consumer to take it (after `close()` callers were let go).
        let last = match end {
            None => {
                outlet.finish_now();
                None
            }
            Some(e) => Some((outlet, e)),
        };
        for closer in closers {
            let _ = closer.send(());
        }
        if let Some((outlet, e)) = last {
            outlet.finish(Some(Event::Error(e))).await;
        }
    }
}
