//! What a [`Client`](crate::Client) yields.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use herald_protocol::{Notification, ReadMark, Seq, Welcome};

use crate::Error;

/// One event of a [`Client`](crate::Client)'s stream.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A notification, in strictly increasing `seq`, each seq once.
    Notification(Notification),
    /// Read state changed, by this or another device of the user.
    Read(ReadMark),
    /// The connection's life: connected, token refreshed, disconnected.
    State(State),
    /// The server no longer holds seqs `since + 1 .. oldest_seq - 1`: they
    /// were deleted by retention while this client was away and will not come.
    Truncated { since: Seq, oldest_seq: Seq },
    /// The server resumed below the seq this client gave: its store was
    /// restored from a backup (the client's epoch is an earlier one, and seqs
    /// after `last_seq` were lost there and handed out again) or replaced.
    /// The client continues after `last_seq`; what follows is new to it even
    /// where it reuses seqs it has seen.
    Rewound { since: Seq, last_seq: Seq },
    /// The client stopped for good; the last event of the stream.
    Error(Error),
}

/// The connection's life.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum State {
    /// A session opened (first connect or a reconnect), with its `welcome`.
    Connected(Welcome),
    /// The token was refreshed in band: the session lives on.
    Refreshed,
    /// The connection ended, or an attempt failed; the next attempt starts
    /// after `retry_in`. `code` is the server's close code when it sent one.
    Disconnected { code: Option<u16>, reason: String, retry_in: Duration },
}

/// A [`Client`](crate::Client)'s events as a [`Stream`]; see [`Client::events`](crate::Client::events).
pub struct Events {
    pub(crate) inner: Pin<Box<dyn Stream<Item = Event> + Send>>,
}

impl Events {
    /// The next event; `None` once the client has stopped.
    pub async fn next(&mut self) -> Option<Event> {
        futures_util::StreamExt::next(self).await
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.inner.as_mut().poll_next(cx)
    }
}
