//! The consumer-facing side of the task: commands in (read marks, close),
//! events out (the [`Outlet`]), and the read marks in between — queued while
//! no session is open, in flight until the server answers, sent again on the
//! next session when one ends unanswered (marks are idempotent).

use std::collections::{HashMap, VecDeque};
use std::future::Future;

use herald_protocol::ReadMark;
use tokio::sync::{mpsc, oneshot};

use super::outlet::Outlet;
use super::Command;
use crate::Error;

/// Read marks queued or in flight at once; more wait in the command channel.
const MAX_READS: usize = 1024;

/// A mark waiting for a session, or for the server's answer.
pub(super) struct PendingRead {
    pub mark: ReadMark,
    pub reply: oneshot::Sender<Result<(), Error>>,
}

/// The consumer-facing side: commands in, events out, read marks in between.
pub(super) struct Control {
    pub commands: mpsc::Receiver<Command>,
    pub outlet: Outlet,
    /// Read marks not yet sent on the current session.
    pub reads: VecDeque<PendingRead>,
    /// Read marks sent, by `ref`, awaiting `ok` / `error`.
    pub sent: HashMap<u64, PendingRead>,
    closers: Vec<oneshot::Sender<()>>,
}

impl Control {
    pub fn new(commands: mpsc::Receiver<Command>, outlet: Outlet) -> Control {
        Control { commands, outlet, reads: VecDeque::new(), sent: HashMap::new(), closers: Vec::new() }
    }

    pub fn can_take(&self) -> bool {
        self.reads.len() + self.sent.len() < MAX_READS
    }

    /// Takes one command; `false` when the client is to stop.
    pub fn take(&mut self, command: Option<Command>) -> bool {
        match command {
            Some(Command::MarkRead(mark, reply)) => {
                self.reads.push_back(PendingRead { mark, reply });
                true
            }
            Some(Command::Close(reply)) => {
                self.closers.push(reply);
                false
            }
            None => false,
        }
    }

    /// Marks sent on a session that ended go out again on the next one.
    pub fn requeue_sent(&mut self) {
        let mut sent: Vec<_> = self.sent.drain().collect();
        sent.sort_by_key(|(reference, _)| std::cmp::Reverse(*reference));
        for (_, read) in sent {
            self.reads.push_front(read);
        }
    }

    /// Runs `fut` while taking commands and handing over queued events;
    /// `None` when the client is to stop.
    pub async fn during<T>(&mut self, fut: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(fut);
        let tx = self.outlet.sender();
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                permit = tx.reserve(), if self.outlet.has_pending() => self.outlet.send_pending(permit),
                command = self.commands.recv(), if self.can_take() => {
                    if !self.take(command) {
                        return None;
                    }
                }
            }
        }
    }

    /// The end: no more commands; every pending mark fails with
    /// [`Error::Stopped`]. Returns the outlet and the `close()` callers to let go.
    pub fn shut(self) -> (Outlet, Vec<oneshot::Sender<()>>) {
        let Control { mut commands, outlet, reads, sent, mut closers } = self;
        commands.close();
        let mut failed: Vec<_> = reads.into_iter().chain(sent.into_values()).map(|r| r.reply).collect();
        while let Ok(command) = commands.try_recv() {
            match command {
                Command::MarkRead(_, reply) => failed.push(reply),
                Command::Close(reply) => closers.push(reply),
            }
        }
        for reply in failed {
            let _ = reply.send(Err(Error::Stopped));
        }
        (outlet, closers)
    }
}
