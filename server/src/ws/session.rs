//! One session: one `select!` loop over shutdown, the outbox, client frames,
//! the heartbeat and token expiry. Each arm calls a named helper; the loop
//! returns a [`SessionEnd`] that picks the close code.
//!
//! **Hand-over from the store to live delivery.** The session registers in the
//! hub *before* it reads the user's head from the store, so nothing committed
//! after that read can be missed: it is queued in the outbox while the replay
//! runs. From then on `cursor` is the last seq sent, and every notification
//! goes through [`Session::take`]: a seq at or below `cursor` is a duplicate
//! and dropped; `cursor + 1` is sent; anything further ahead means the broker
//! lost or reordered something, and the missing seqs are fetched from the
//! store first. So a session sees strictly increasing seqs, each once, no gap.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use herald_protocol::{ClientFrame, ReadMark, Seq, ServerFrame, Welcome};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::time::{interval_at, sleep, sleep_until, timeout, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

use super::close::SessionEnd;
use super::protocol::{self, BadFrame};
use super::stream::FlushBuffered;
use crate::broker::Event;
use crate::hub::{Delivery, Outbox, SessionInfo};
use crate::limit::SessionPermits;
use crate::store::StoredNotification;
use crate::telemetry::{FrameKind, Limit};
use crate::AppState;

/// Notifications read from the store per query while catching up.
const REPLAY_PAGE: u32 = 500;
/// Deliveries gathered from the outbox into one socket flush.
const WRITE_BATCH: usize = 64;
/// Bad frames tolerated per [`STRIKE_WINDOW`] before closing with 1008.
const MAX_STRIKES: u32 = 10;
const STRIKE_WINDOW: Duration = Duration::from_secs(60);
/// `token_expiring` is sent this long before `exp`.
const EXPIRY_WARNING: Duration = Duration::from_secs(60);
/// A token expiring later than this (ten years) is treated as expiring then:
/// a far `exp` must not overflow the instant the session waits for.
const MAX_EXPIRY_WAIT_MS: i64 = 10 * 365 * 24 * 3600 * 1000;
/// How long a close frame may take to go out, and the peer's close to come back.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The same while the node drains: the 1001 is out, the peer's answer is a courtesy.
const CLOSE_TIMEOUT_DRAINING: Duration = Duration::from_secs(1);

/// The upgraded connection, as a session reads and writes it.
pub type WebSocket = WebSocketStream<FlushBuffered<TokioIo<Upgraded>>>;

/// What the handshake verified; the only input a session trusts.
#[derive(Debug, Clone)]
pub struct SessionContext {
    pub user: Arc<str>,
    /// Its id, when and where from, and the token it runs on now: shared
    /// with the hub, which lists it.
    pub session: Arc<SessionInfo>,
    pub since: Option<Seq>,
    /// The store epoch the client's `since` belongs to, when it said.
    pub epoch: Option<String>,
    /// The handshake request's id, on every log line of the session.
    pub request_id: String,
}

struct Session {
    ws: WebSocket,
    ctx: SessionContext,
    state: AppState,
    /// Where the hub queues this session's deliveries.
    outbox: Outbox,
    /// The last seq sent to the client.
    cursor: Seq,
    last_heard: Instant,
    heartbeat: Duration,
    warned: bool,
    strikes: u32,
    strike_window_start: Instant,
    /// Client frames allowed per second (close 4029 above); `None`: unlimited.
    frames: Option<governor::DefaultDirectRateLimiter>,
}

/// Runs a session to its end and closes the socket with the matching code.
/// `permits` hold the session's places under the caps until it ends.
pub async fn run(ws: WebSocket, ctx: SessionContext, permits: SessionPermits, state: AppState) {
    let span = tracing::debug_span!("ws_session", request_id = %ctx.request_id, session_id = %ctx.session.id, user_id = %ctx.user);
    async move {
        let registration = state.hub.register(&ctx.user, ctx.session.clone(), state.settings.outbox_capacity);
        state.metrics.sessions_active.inc();
        let mut session = Session {
            ws,
            outbox: registration.outbox.clone(),
            cursor: 0,
            last_heard: Instant::now(),
            heartbeat: Duration::from_secs(state.settings.heartbeat_secs),
            warned: false,
            strikes: 0,
            strike_window_start: Instant::now(),
            frames: state.limits.frame_limiter(),
            ctx,
            state: state.clone(),
        };
        tracing::debug!("session open");
        let end = match Box::pin(session.start()).await {
            Ok(()) => session.serve().await,
            Err(end) => end,
        };
        drop(registration);
        if end == SessionEnd::Lagged {
            state.metrics.outbox_overflows.inc();
        }
        session.close(end).await;
        drop(permits);
        state.metrics.sessions_active.dec();
        state.metrics.sessions_closed.get_or_create(&crate::telemetry::CloseCode { code: end.metric_code() }).inc();
        tracing::debug!(?end, "session closed");
    }
    .instrument(span)
    .await
}

fn text(frame: &ServerFrame) -> Message {
    Message::Text(serde_json::to_string(frame).expect("server frames always serialize").into())
}

impl Session {
    /// Welcome, then replay from `since`: the welcome and the first page of
    /// the replay come from one store request and go out in one flush.
    async fn start(&mut self) -> Result<(), SessionEnd> {
        // Registered before this check, so a revocation that arrived after
        // the handshake's is seen here or delivered to the outbox.
        let token = self.ctx.session.token();
        if self.state.hub.is_revoked(&self.ctx.user, token.issued_at, token.jti.as_deref()) {
            return Err(SessionEnd::TokenRevoked);
        }
        // With Redis: wait (bounded) until this node hears the user's channel,
        // so what commits after the head read below arrives live.
        self.state.broker.subscribed(&self.ctx.user).await;
        let since = self.since().await?;
        let read = self.state.store.resume(&self.ctx.user, since, REPLAY_PAGE);
        let (head, page) = self.state.metrics.store_op("resume", read).await.map_err(|e| self.failed(e))?;
        let truncated = since.is_some_and(|since| since < head.oldest_seq - 1);
        if truncated {
            self.state.metrics.truncations.inc();
        }
        let welcome = ServerFrame::Welcome(Welcome {
            session_id: self.ctx.session.id.to_string(),
            user_id: self.ctx.user.to_string(),
            node_id: self.state.settings.node_id.clone(),
            last_seq: head.last_seq,
            heartbeat_secs: self.state.settings.heartbeat_secs,
            token_expires_at: token.expires_at,
            truncated,
            oldest_seq: truncated.then_some(head.oldest_seq),
            epoch: Some(self.state.epoch.clone()),
            since: since.map(|since| head.resume_after(Some(since))),
        });
        self.cursor = head.resume_after(since);
        let mut frames = Vec::with_capacity(1 + page.len());
        frames.push(text(&welcome));
        let more = self.add_page(page, &mut frames);
        self.send(frames).await?;
        if more {
            self.replay_to(None).await?;
        }
        Ok(())
    }

    /// The client's `since`, moved back to the fork when its cursor belongs
    /// to an earlier epoch of the store (a restore since): the seqs after
    /// the fork that it saw were lost, and the ones stored under them now
    /// are new to it.
    async fn since(&mut self) -> Result<Option<Seq>, SessionEnd> {
        let (Some(since), Some(epoch)) = (self.ctx.since, self.ctx.epoch.as_deref()) else {
            return Ok(self.ctx.since);
        };
        if epoch == self.state.epoch {
            return Ok(Some(since));
        }
        let fork = self.state.store.fork(&self.ctx.user, epoch);
        let fork = self.state.metrics.store_op("fork", fork).await.map_err(|e| self.failed(e))?;
        if let Some(fork) = fork.filter(|fork| *fork < since) {
            tracing::info!(since, fork, "a cursor from an earlier store epoch resumes from the fork");
            self.state.metrics.fork_resumes.inc();
            return Ok(Some(fork));
        }
        Ok(Some(since))
    }

    /// Sends every stored notification after `cursor`, up to `up_to`.
    async fn replay_to(&mut self, up_to: Option<Seq>) -> Result<(), SessionEnd> {
        loop {
            if self.state.shutdown.is_cancelled() {
                return Err(SessionEnd::Shutdown);
            }
            let read = self.state.store.after(&self.ctx.user, self.cursor, up_to, REPLAY_PAGE);
            let page = self.state.metrics.store_op("after", read).await.map_err(|e| self.failed(e))?;
            let mut frames = Vec::with_capacity(page.len());
            let more = self.add_page(page, &mut frames);
            if !frames.is_empty() {
                self.send(frames).await?;
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Adds a replay page's frames to `frames` and moves `cursor` to its
    /// last seq. True when the page was full: more may follow.
    fn add_page(&mut self, page: Vec<StoredNotification>, frames: &mut Vec<Message>) -> bool {
        let Some(last) = page.last() else { return false };
        self.cursor = last.seq;
        self.state.metrics.notifications_replayed.inc_by(page.len() as u64);
        self.state.metrics.notifications_delivered.inc_by(page.len() as u64);
        frames.extend(page.iter().map(|n| Message::Text(n.frame().into())));
        page.len() as u32 == REPLAY_PAGE
    }

    async fn serve(&mut self) -> SessionEnd {
        let shutdown = self.state.shutdown.clone();
        let outbox = self.outbox.clone();
        let mut heartbeat = interval_at(Instant::now() + self.heartbeat, self.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let (warn_at, expire_at) = self.expiry_instants();
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Err(SessionEnd::Shutdown),
                _ = sleep_until(expire_at) => Err(SessionEnd::TokenExpired),
                // The handlers' futures are boxed: inline, the largest of
                // them would size every idle session's task.
                _ = sleep_until(warn_at), if !self.warned => Box::pin(self.warn_expiry()).await,
                _ = heartbeat.tick() => Box::pin(self.on_heartbeat()).await,
                delivery = outbox.recv() => match delivery {
                    Ok(d) => Box::pin(self.forward(d)).await,
                    Err(_) => Err(SessionEnd::Lagged),
                },
                message = self.ws.next() => Box::pin(self.on_message(message)).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Deadlines from the token's `exp` (plus the configured leeway).
    fn expiry_instants(&self) -> (Instant, Instant) {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        // Saturating: a token may say it expires in the year 300 million.
        let leeway = i64::try_from(self.state.settings.jwt.leeway_secs).unwrap_or(i64::MAX);
        let exp_ms = self.ctx.session.expires_at().saturating_add(leeway).saturating_mul(1000);
        let wait = Duration::from_millis(exp_ms.saturating_sub(now_ms).clamp(0, MAX_EXPIRY_WAIT_MS) as u64);
        let expire_at = Instant::now() + wait;
        (expire_at.checked_sub(EXPIRY_WARNING).unwrap_or_else(Instant::now), expire_at)
    }

    async fn warn_expiry(&mut self) -> Result<(), SessionEnd> {
        self.warned = true;
        self.send(vec![text(&ServerFrame::TokenExpiring { expires_at: self.ctx.session.expires_at() })]).await
    }

    async fn on_heartbeat(&mut self) -> Result<(), SessionEnd> {
        if self.last_heard.elapsed() > self.heartbeat * 3 {
            return Err(SessionEnd::HeartbeatTimeout);
        }
        self.send(vec![Message::Ping(Default::default())]).await
    }

    /// Sends `first` and whatever else is queued, in one flush.
    async fn forward(&mut self, first: Delivery) -> Result<(), SessionEnd> {
        let mut batch = Vec::new();
        self.take(first, &mut batch).await?;
        while batch.len() < WRITE_BATCH {
            match self.outbox.try_recv().map_err(|_| SessionEnd::Lagged)? {
                Some(d) => self.take(d, &mut batch).await?,
                None => break,
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.send(batch).await
    }

    /// The gap/duplicate rule of the module docs.
    async fn take(&mut self, delivery: Delivery, batch: &mut Vec<Message>) -> Result<(), SessionEnd> {
        match delivery {
            Delivery::Read { frame } => batch.push(Message::Text(frame)),
            Delivery::Notification { seq, .. } if seq <= self.cursor => {}
            Delivery::Notification { seq, frame } if seq == self.cursor + 1 => {
                self.cursor = seq;
                self.state.metrics.notifications_delivered.inc();
                batch.push(Message::Text(frame));
            }
            Delivery::Notification { seq, frame } => {
                let before = self.cursor;
                self.catch_up(seq, batch).await?;
                if self.cursor < seq {
                    // Purged by retention meanwhile: nothing more to fetch.
                    tracing::debug!(before, seq, "gap not in the store; sending the live frame");
                    self.cursor = seq;
                    batch.push(Message::Text(frame));
                }
            }
            Delivery::Head { seq } if seq <= self.cursor => {}
            Delivery::Head { seq } => self.catch_up(seq, batch).await?,
            // The hub hands a `DisconnectSession` to the session it names only.
            Delivery::Disconnect | Delivery::DisconnectSession { .. } => return Err(SessionEnd::Disconnected),
            Delivery::Revoke { issued_before, .. }
                if crate::auth::revokes(issued_before, self.ctx.session.token().issued_at) =>
            {
                return Err(SessionEnd::TokenRevoked)
            }
            Delivery::Revoke { .. } => {}
            Delivery::RevokeToken { jti, .. } if self.ctx.session.token().jti.as_ref() == Some(&jti) => {
                return Err(SessionEnd::TokenRevoked)
            }
            Delivery::RevokeToken { .. } => {}
        }
        Ok(())
    }

    /// Something up to `seq` never arrived live: flush what is batched, then
    /// fetch the missing seqs from the store.
    async fn catch_up(&mut self, seq: Seq, batch: &mut Vec<Message>) -> Result<(), SessionEnd> {
        self.state.metrics.gap_repairs.inc();
        tracing::debug!(cursor = self.cursor, seq, "repairing a gap from the store");
        let pending = std::mem::take(batch);
        self.send(pending).await?;
        self.replay_to(Some(seq)).await
    }

    async fn on_message(&mut self, message: Option<Result<Message, WsError>>) -> Result<(), SessionEnd> {
        self.last_heard = Instant::now();
        if let (Some(Ok(m)), Some(frames)) = (&message, &self.frames) {
            if !matches!(m, Message::Close(_)) && frames.check().is_err() {
                self.state.metrics.rate_limited.get_or_create(&Limit { limit: "frames_per_session" }).inc();
                return Err(SessionEnd::RateLimited);
            }
        }
        match message {
            None => Err(SessionEnd::ClientGone),
            Some(Err(e)) => Err(read_failure(e)),
            Some(Ok(Message::Close(_))) => Err(SessionEnd::ClientClosed),
            // tungstenite answers pings itself; raw frames only exist on the way out.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                self.frame_seen("control");
                Ok(())
            }
            Some(Ok(Message::Binary(_))) => {
                self.frame_seen("bad");
                self.refuse(BadFrame { reference: None, code: "bad_frame", message: "frames are JSON text".into() })
                    .await
            }
            Some(Ok(Message::Text(t))) => match protocol::parse(&t) {
                Ok(frame) => {
                    self.frame_seen(match &frame {
                        ClientFrame::Ping { .. } => "ping",
                        ClientFrame::Read { .. } => "read",
                        ClientFrame::Refresh { .. } => "refresh",
                    });
                    self.on_frame(frame).await
                }
                Err(bad) => {
                    self.frame_seen("bad");
                    self.refuse(bad).await
                }
            },
        }
    }

    fn frame_seen(&self, kind: &'static str) {
        self.state.metrics.frames_received.get_or_create(&FrameKind { kind }).inc();
    }

    async fn on_frame(&mut self, frame: ClientFrame) -> Result<(), SessionEnd> {
        match frame {
            ClientFrame::Ping { reference } => self.send(vec![text(&ServerFrame::Pong { reference })]).await,
            ClientFrame::Refresh { token, reference } => self.refresh(&token, reference).await,
            ClientFrame::Read { seqs, up_to_seq, topic, reference } => {
                let mark = protocol::read_mark(seqs, up_to_seq, topic).expect("parse validated the read mark");
                self.mark_read(mark, reference).await
            }
        }
    }

    /// A new token for the same user. Verified like a handshake's (a revoked
    /// one is refused too): a `kid`
    /// the fetched JWKS does not hold makes it be fetched again first (rare,
    /// rate-limited; the session waits for it as it waits for a read mark).
    async fn refresh(&mut self, token: &str, reference: Option<serde_json::Value>) -> Result<(), SessionEnd> {
        match self.state.authenticate(token).await {
            Ok(t) if t.user_id == self.ctx.user => {
                self.state.hub.set_token(&self.ctx.user, &self.ctx.session, t.session_token());
                self.warned = false;
                tracing::debug!(expires_at = t.expires_at, "token refreshed");
                self.send(vec![text(&ok(reference))]).await
            }
            _ => Err(SessionEnd::RefreshRefused),
        }
    }

    async fn mark_read(&mut self, mark: ReadMark, reference: Option<serde_json::Value>) -> Result<(), SessionEnd> {
        match mark_read(&self.state, &self.ctx.user, mark).await {
            Ok(()) => self.send(vec![text(&ok(reference))]).await,
            Err(e) => {
                tracing::warn!(error = %e, "marking read failed");
                let refusal = ServerFrame::Error {
                    reference,
                    code: "unavailable".into(),
                    message: "could not mark read; retry".into(),
                };
                self.send(vec![text(&refusal)]).await
            }
        }
    }

    /// Answers a bad frame; too many within a window closes with 1008.
    async fn refuse(&mut self, bad: BadFrame) -> Result<(), SessionEnd> {
        if self.strike_window_start.elapsed() > STRIKE_WINDOW {
            self.strike_window_start = Instant::now();
            self.strikes = 0;
        }
        self.strikes += 1;
        if self.strikes > MAX_STRIKES {
            return Err(SessionEnd::PolicyViolation);
        }
        let frame = ServerFrame::Error { reference: bad.reference, code: bad.code.into(), message: bad.message };
        self.send(vec![text(&frame)]).await
    }

    /// Writes frames and flushes once. A write that stalls past three
    /// heartbeats, or an outbox overflow while it waits, ends the session.
    async fn send(&mut self, messages: Vec<Message>) -> Result<(), SessionEnd> {
        let Session { ws, outbox, state, heartbeat, .. } = self;
        state.metrics.frames_sent.inc_by(messages.len() as u64);
        let write = async {
            for m in messages {
                ws.feed(m).await?;
            }
            ws.flush().await
        };
        tokio::select! {
            result = write => result.map_err(|_| SessionEnd::ClientGone),
            _ = outbox.lagged() => Err(SessionEnd::Lagged),
            _ = state.shutdown.cancelled() => Err(SessionEnd::Shutdown),
            _ = sleep(*heartbeat * 3) => Err(SessionEnd::Lagged),
        }
    }

    /// The closing handshake: send our close frame, then wait (bounded) for
    /// the peer's, so the TCP close cannot reset away the frame it has not read.
    async fn close(&mut self, end: SessionEnd) {
        if end == SessionEnd::ClientClosed {
            // tungstenite has queued the echo of the client's close frame
            // (RFC 6455 §5.5.1). Its flush writes the echo into our buffer
            // and, the handshake being over, skips flushing the socket; so
            // flush that too, or the client sees 1006, not its clean close.
            let _ = timeout(CLOSE_TIMEOUT, async {
                let _ = self.ws.flush().await;
                let _ = tokio::io::AsyncWriteExt::flush(self.ws.get_mut()).await;
            })
            .await;
            return;
        }
        let Some((code, reason)) = end.close_frame() else { return };
        let frame = CloseFrame { code: code.into(), reason: Utf8Bytes::from_static(reason) };
        let wait = if end == SessionEnd::Shutdown { CLOSE_TIMEOUT_DRAINING } else { CLOSE_TIMEOUT };
        let _ = timeout(wait, async {
            if self.ws.send(Message::Close(Some(frame))).await.is_ok() {
                while let Some(Ok(message)) = self.ws.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            }
        })
        .await;
    }

    fn failed(&self, e: crate::store::StoreError) -> SessionEnd {
        tracing::warn!(error = %e, "store failed during a session");
        match e {
            crate::store::StoreError::Unavailable(_) => SessionEnd::StoreUnavailable,
            crate::store::StoreError::Internal(_) => SessionEnd::Internal,
        }
    }
}

fn ok(reference: Option<serde_json::Value>) -> ServerFrame {
    ServerFrame::Ok { reference: reference.unwrap_or(serde_json::Value::Null) }
}

/// Why a read failed, as the close the client is owed: a frame over the
/// limit, a protocol violation or text that is not UTF-8 get their close
/// code; anything else (the connection reset, the stream ended) means
/// nobody is left to tell.
fn read_failure(e: WsError) -> SessionEnd {
    use tokio_tungstenite::tungstenite::error::CapacityError;
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => SessionEnd::TooLarge,
        WsError::Protocol(_) => SessionEnd::ProtocolError,
        WsError::Utf8(_) => SessionEnd::InvalidUtf8,
        _ => SessionEnd::ClientGone,
    }
}

/// Persists a read mark, then tells every session of the user (on any node):
/// a mark by seqs or up to a seq as it was given; a mark by topic as the
/// seqs it changed (in frames of at most [`protocol::MAX_READ_SEQS`]), since
/// a session knows its notifications by seq. A topic mark that changed
/// nothing sends nothing.
pub async fn mark_read(state: &AppState, user: &Arc<str>, mark: ReadMark) -> Result<(), crate::store::StoreError> {
    let marked = state.metrics.store_op("mark_read", state.store.mark_read(user, &mark)).await?;
    let frames = match mark {
        ReadMark::Topic { .. } => {
            marked.chunks(protocol::MAX_READ_SEQS).map(|seqs| ReadMark::Seqs { seqs: seqs.to_vec() }).collect()
        }
        given => vec![given],
    };
    broadcast_read(state, user, frames).await;
    Ok(())
}

/// Sends a `read` frame for each of `marks` to every session of `user`, on
/// every node.
pub async fn broadcast_read(state: &AppState, user: &Arc<str>, marks: Vec<ReadMark>) {
    if marks.is_empty() {
        return;
    }
    let events = marks
        .into_iter()
        .map(|mark| {
            let frame = serde_json::to_string(&ServerFrame::Read(mark)).expect("read frames always serialize");
            Event { user_id: user.clone(), id: None, delivery: Delivery::Read { frame: frame.into() }, trace: None }
        })
        .collect();
    if let Err(e) = state.broker.publish(events).await {
        tracing::warn!(error = %e, "read mark stored but not broadcast");
    }
}
