//! One connected session: a single `select!` over the socket, commands from
//! the handles, the token provider (answering `token_expiring`), handing
//! queued events over, our pings, and the dead-connection deadline. Each arm
//! calls a named helper; the loop returns an [`Outcome`] for the driver.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_protocol::{ClientFrame, Notification, ReadMark, Ref, ServerFrame};
use tokio::time::{interval_at, sleep_until, timeout, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use super::driver::Driver;
use super::outlet::Outlet;
use super::{Command, Event, State, TokenFuture};
use crate::error::BoxError;
use crate::session::Ws;
use crate::Error;

/// How long our close frame and the server's answer may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to keep reading after the server's close, so our answer goes out.
const CLOSE_ECHO_TIMEOUT: Duration = Duration::from_secs(1);
/// A `token_expiring` this soon after a refresh is not answered: the provider
/// handed out a token with less than a minute left, and answering again would
/// loop. The session then ends with 4001 at expiry and reconnects.
const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(5);

/// How a session ended.
pub(super) enum Outcome {
    /// The server closed with a code.
    Closed { code: u16, reason: String },
    /// The connection failed or dropped without a close frame.
    Dropped(String),
    /// No traffic for three heartbeats.
    Dead,
    /// The consumer drained a backlog: reconnect at once with `since`.
    CaughtUp,
    /// `close()`, or every handle dropped.
    Stop,
}

/// The state of one connection.
struct Conn {
    ws: Ws,
    heartbeat: Duration,
    last_heard: Instant,
    /// The provider's answer to `token_expiring`, while it runs.
    refresh: Option<TokenFuture>,
    /// The `ref` of the `refresh` frame awaiting `ok`.
    refresh_ref: Option<u64>,
    last_refresh: Option<Instant>,
}

impl Conn {
    /// Sends one frame; a write that stalls for three heartbeats means a dead connection.
    async fn send(&mut self, frame: &ClientFrame) -> Result<(), Outcome> {
        let text = serde_json::to_string(frame).expect("client frames always serialize");
        match timeout(self.heartbeat * 3, self.ws.send(Message::Text(text.into()))).await {
            Err(_) => Err(Outcome::Dead),
            Ok(Err(e)) => Err(Outcome::Dropped(Error::from(e).to_string())),
            Ok(Ok(())) => Ok(()),
        }
    }
}

impl Driver {
    /// Serves one session until it ends.
    pub(super) async fn serve(&mut self, ws: Ws, heartbeat_secs: u64) -> Outcome {
        let heartbeat = Duration::from_secs(heartbeat_secs.max(1));
        let mut conn =
            Conn { ws, heartbeat, last_heard: Instant::now(), refresh: None, refresh_ref: None, last_refresh: None };
        let outcome = match self.send_reads(&mut conn).await {
            Ok(()) => self.serve_loop(&mut conn).await,
            Err(outcome) => outcome,
        };
        self.ctl.requeue_sent();
        match outcome {
            Outcome::Stop | Outcome::CaughtUp => close_normally(conn.ws).await,
            Outcome::Closed { .. } => {
                // Reading on sends the close answer tungstenite queued.
                let _ = timeout(CLOSE_ECHO_TIMEOUT, async { while conn.ws.next().await.is_some() {} }).await;
            }
            Outcome::Dropped(_) | Outcome::Dead => {}
        }
        outcome
    }

    async fn serve_loop(&mut self, conn: &mut Conn) -> Outcome {
        let mut ping = interval_at(Instant::now() + conn.heartbeat, conn.heartbeat);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let events = self.ctl.outlet.sender();
        let room = self.ctl.outlet.room_needed();
        loop {
            let dead_at = conn.last_heard + conn.heartbeat * 3;
            let step = tokio::select! {
                message = conn.ws.next() => self.on_message(conn, message).await,
                command = self.ctl.commands.recv(), if self.ctl.can_take() => self.on_command(conn, command).await,
                token = refreshed(&mut conn.refresh), if conn.refresh.is_some() => self.on_token(conn, token).await,
                permit = events.reserve(), if self.ctl.outlet.has_pending() => {
                    self.ctl.outlet.send_pending(permit);
                    Ok(())
                }
                _ = Outlet::room(&events, room), if self.ctl.outlet.is_lagging() && !self.ctl.outlet.has_pending() => {
                    Err(Outcome::CaughtUp)
                }
                _ = ping.tick() => conn.send(&ClientFrame::Ping { reference: None }).await,
                _ = sleep_until(dead_at) => Err(Outcome::Dead),
            };
            if let Err(outcome) = step {
                return outcome;
            }
        }
    }

    async fn on_message(
        &mut self,
        conn: &mut Conn,
        message: Option<Result<Message, tungstenite::Error>>,
    ) -> Result<(), Outcome> {
        conn.last_heard = Instant::now();
        match message {
            None => Err(Outcome::Dropped("connection dropped".into())),
            Some(Err(e)) => Err(Outcome::Dropped(Error::from(e).to_string())),
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                Ok(frame) => self.on_frame(conn, frame).await,
                Err(e) => {
                    // Frames this version does not know are skipped: the server may add some.
                    tracing::debug!(error = %e, "skipping a frame this client does not understand");
                    Ok(())
                }
            },
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| (f.code.into(), f.reason.to_string()));
                Err(Outcome::Closed { code, reason })
            }
            // Pings (answered by tungstenite), pongs, binary: traffic all the same.
            Some(Ok(_)) => Ok(()),
        }
    }

    async fn on_frame(&mut self, conn: &mut Conn, frame: ServerFrame) -> Result<(), Outcome> {
        match frame {
            ServerFrame::Notification(n) => self.deliver(n),
            ServerFrame::Read(mark) => self.ctl.outlet.event(Event::Read(mark)),
            ServerFrame::TokenExpiring { .. } => self.on_expiring(conn),
            ServerFrame::Ok { reference } => self.on_answer(conn, Some(reference), Ok(())),
            ServerFrame::Error { reference, code, message } => {
                self.on_answer(conn, reference, Err(Error::Rejected { code, message }))
            }
            ServerFrame::Pong { .. } | ServerFrame::Welcome(_) => {}
        }
        Ok(())
    }

    /// The duplicate rule: a seq at or below the cursor was handed over already.
    fn deliver(&mut self, n: Notification) {
        let seq = n.seq;
        if self.cursor.is_some_and(|cursor| seq <= cursor) {
            tracing::debug!(seq, "dropping a duplicate notification");
            return;
        }
        if self.ctl.outlet.notification(n) {
            self.set_cursor(seq);
        }
    }

    /// `ok` / `error` for a frame of ours.
    fn on_answer(&mut self, conn: &mut Conn, reference: Option<Ref>, result: Result<(), Error>) {
        let Some(reference) = reference.as_ref().and_then(Ref::as_u64) else {
            tracing::debug!(?result, "answer without a ref of ours");
            return;
        };
        if conn.refresh_ref == Some(reference) {
            conn.refresh_ref = None;
            match result {
                Ok(()) => self.ctl.outlet.event(Event::State(State::Refreshed)),
                Err(e) => tracing::warn!(error = %e, "token refresh refused"),
            }
        } else if let Some(read) = self.ctl.sent.remove(&reference) {
            let _ = read.reply.send(result);
        }
    }

    async fn on_command(&mut self, conn: &mut Conn, command: Option<Command>) -> Result<(), Outcome> {
        if !self.ctl.take(command) {
            return Err(Outcome::Stop);
        }
        self.send_reads(conn).await
    }

    /// Sends every queued read mark, each with its own `ref`.
    async fn send_reads(&mut self, conn: &mut Conn) -> Result<(), Outcome> {
        while let Some(read) = self.ctl.reads.pop_front() {
            if read.reply.is_closed() {
                continue; // the caller gave up
            }
            let reference = self.next_ref();
            let (seqs, up_to_seq, topic) = match &read.mark {
                ReadMark::Seqs { seqs } => (Some(seqs.clone()), None, None),
                ReadMark::UpTo { up_to_seq } => (None, Some(*up_to_seq), None),
                ReadMark::Topic { topic, up_to_seq } => (None, *up_to_seq, Some(topic.clone())),
            };
            self.ctl.sent.insert(reference, read);
            conn.send(&ClientFrame::Read { seqs, up_to_seq, topic, reference: Some(reference.into()) }).await?;
        }
        Ok(())
    }

    /// `token_expiring`: ask the provider (the answer comes back through `select!`).
    fn on_expiring(&mut self, conn: &mut Conn) {
        if conn.refresh.is_some() || conn.refresh_ref.is_some() {
            return;
        }
        if conn.last_refresh.is_some_and(|at| at.elapsed() < REFRESH_MIN_INTERVAL) {
            tracing::warn!("the refreshed token expires within a minute; not refreshing again");
            return;
        }
        conn.refresh = Some(self.provider.token());
    }

    /// The provider answered `token_expiring`: refresh in band.
    async fn on_token(&mut self, conn: &mut Conn, token: Result<String, BoxError>) -> Result<(), Outcome> {
        conn.refresh = None;
        match token {
            Ok(token) if self.token.as_deref() == Some(token.as_str()) => {
                // A fixed or cached token: refreshing with it changes nothing.
                tracing::debug!("the provider returned the current token; not refreshing");
                Ok(())
            }
            Ok(token) => {
                let reference = self.next_ref();
                conn.refresh_ref = Some(reference);
                conn.last_refresh = Some(Instant::now());
                self.token = Some(token.clone());
                conn.send(&ClientFrame::Refresh { token, reference: Some(reference.into()) }).await
            }
            Err(e) => {
                // The server ends the session with 4001 at expiry; the reconnect asks again.
                tracing::warn!(error = %e, "token provider failed; no refresh");
                Ok(())
            }
        }
    }
}

/// The provider's future, polled in place so `select!` can come back to it.
async fn refreshed(refresh: &mut Option<TokenFuture>) -> Result<String, BoxError> {
    refresh.as_mut().expect("polled only while a refresh runs").await
}

/// Our close (1000), then the server's answer, within [`CLOSE_TIMEOUT`].
pub(super) async fn close_normally(mut ws: Ws) {
    let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
    let _ = timeout(CLOSE_TIMEOUT, async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}
