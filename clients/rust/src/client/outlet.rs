//! Handing events to the consumer without ever blocking the session loop.
//!
//! The loop must keep reading the socket whatever the consumer does: the
//! answers to `mark_read` and `refresh` arrive there, and a consumer awaiting
//! `mark_read` instead of draining events would otherwise deadlock with us.
//! So events go into a bounded channel with `try_send`, and when it is full:
//!
//! - a notification is dropped and the outlet is *lagging*: every later
//!   notification of this connection is dropped too, and the cursor stays at
//!   the last one handed over. Once half the channel is free again the
//!   driver reconnects with `since` = cursor — the server replays what was
//!   dropped, so nothing is lost (the same rule as the server's outbox, 1013);
//! - other events wait in a short queue, drained as room appears; past
//!   [`PENDING_MAX`] the oldest is dropped. Read marks lost that way are
//!   documented: refetch read state on [`State::Connected`](super::State).

use std::collections::VecDeque;

use herald_protocol::Notification;
use tokio::sync::mpsc::error::{SendError, TrySendError};
use tokio::sync::mpsc::{self, Permit};

use super::Event;

/// Non-notification events held while the channel is full.
const PENDING_MAX: usize = 64;

pub(crate) struct Outlet {
    tx: mpsc::Sender<Event>,
    pending: VecDeque<Event>,
    /// A notification of this connection was dropped (resume once there is room).
    lagging: bool,
    /// Free slots that end lagging: half the channel.
    room: usize,
}

impl Outlet {
    pub fn new(tx: mpsc::Sender<Event>) -> Outlet {
        let room = (tx.max_capacity() / 2).max(1);
        Outlet { tx, pending: VecDeque::new(), lagging: false, room }
    }

    /// Hands a notification over; `false` when it was dropped.
    pub fn notification(&mut self, n: Notification) -> bool {
        if self.lagging || !self.pending.is_empty() {
            self.lagging = true;
            return false;
        }
        match self.tx.try_send(Event::Notification(n)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                tracing::debug!("event channel full: dropping notifications until the consumer catches up");
                self.lagging = true;
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    /// Hands over any other event, in order, queueing it while the channel is full.
    pub fn event(&mut self, event: Event) {
        let event = match self.pending.is_empty() {
            true => match self.tx.try_send(event) {
                Ok(()) | Err(TrySendError::Closed(_)) => return,
                Err(TrySendError::Full(event)) => event,
            },
            false => event,
        };
        if self.pending.len() == PENDING_MAX {
            let dropped = self.pending.pop_front();
            tracing::warn!(?dropped, "event channel full: dropping the oldest queued event");
        }
        self.pending.push_back(event);
    }

    pub fn is_lagging(&self) -> bool {
        self.lagging
    }

    /// A new connection starts without lag (it resumes from the cursor).
    pub fn reset_lag(&mut self) {
        self.lagging = false;
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A handle to wait for room with, without borrowing the outlet.
    pub fn sender(&self) -> mpsc::Sender<Event> {
        self.tx.clone()
    }

    /// Sends the oldest queued event into a reserved slot; with the receiver
    /// gone, nobody will read them: drops them all.
    pub fn send_pending(&mut self, permit: Result<Permit<'_, Event>, SendError<()>>) {
        match permit {
            Ok(permit) => {
                if let Some(event) = self.pending.pop_front() {
                    permit.send(event);
                }
            }
            Err(_) => self.pending.clear(),
        }
    }

    /// Resolves when the consumer has drained enough to resume a lagging connection.
    pub async fn room(tx: &mpsc::Sender<Event>, room: usize) {
        // The permits go back to the channel when dropped.
        let _ = tx.reserve_many(room).await;
    }

    pub fn room_needed(&self) -> usize {
        self.room
    }

    /// The end: queued events and then `last` (if any), waiting for the
    /// consumer, which may also drop its receiver.
    pub async fn finish(mut self, last: Option<Event>) {
        self.pending.extend(last);
        for event in self.pending.drain(..) {
            if self.tx.send(event).await.is_err() {
                return;
            }
        }
    }

    /// The end of a clean close: hands over what fits, without waiting.
    pub fn finish_now(mut self) {
        for event in self.pending.drain(..) {
            if self.tx.try_send(event).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::State;

    fn note(seq: i64) -> Notification {
        Notification {
            seq,
            id: seq.to_string(),
            topic: "t".into(),
            payload: serde_json::Value::Null,
            created_at: String::new(),
            read: false,
        }
    }

    #[tokio::test]
    async fn a_full_channel_drops_notifications_until_there_is_room_and_queues_the_rest() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut outlet = Outlet::new(tx);
        for seq in 1..=4 {
            assert!(outlet.notification(note(seq)));
        }
        assert!(!outlet.notification(note(5)));
        assert!(outlet.is_lagging());
        outlet.event(Event::State(State::Refreshed));
        assert!(outlet.has_pending());
        // Lagging holds even when one slot frees up.
        rx.recv().await.unwrap();
        assert!(!outlet.notification(note(6)));
        let sender = outlet.sender();
        outlet.send_pending(sender.reserve().await);
        assert!(!outlet.has_pending());
        let mut seen = Vec::new();
        while let Ok(event) = rx.try_recv() {
            seen.push(match event {
                Event::Notification(n) => n.seq.to_string(),
                Event::State(s) => format!("{s:?}"),
                other => panic!("{other:?}"),
            });
        }
        assert_eq!(seen, ["2", "3", "4", "Refreshed"]);
        Outlet::room(&sender, outlet.room_needed()).await;
        outlet.reset_lag();
        assert!(outlet.notification(note(5)));
    }
}
