//! The broker carries committed events to every node that holds sessions of
//! the event's user. [`memory`] is the one-node default.

use std::sync::Arc;

use async_trait::async_trait;
use herald_protocol::http::UserSession;

use crate::hub::Delivery;

pub mod memory;
pub mod redis;
pub mod sentinel;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// One event for one user.
#[derive(Debug, Clone)]
pub struct Event {
    pub user_id: Arc<str>,
    /// The notification's id, carried for tracing across nodes.
    pub id: Option<String>,
    pub delivery: Delivery,
    /// The W3C `traceparent` of the publish, when it is traced: the node that
    /// delivers continues the trace.
    pub trace: Option<String>,
}

/// A user's sessions on the other nodes: how many, and the listed ones (at
/// most [`crate::hub::LISTED_PER_NODE`] per node; none from a node that
/// predates listings).
#[derive(Debug, Default)]
pub struct Elsewhere {
    pub count: u64,
    pub sessions: Vec<UserSession>,
}

/// Fan-out of committed events.
///
/// **Guarantee: at most once, no order promised.** An event may be lost or
/// arrive late; sessions repair every gap from the store (a notification whose
/// `seq` is ahead of what a session has seen makes it fetch the missing ones),
/// so the broker never has to be reliable — only fast. Callers publish only
/// after the store committed.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    async fn publish(&self, events: Vec<Event>) -> Result<(), BrokerError>;

    /// Answers when the broker does.
    async fn ping(&self) -> Result<(), BrokerError>;

    /// Returns once this node receives the events of `user` (whose session
    /// has just registered in the hub), or after a short bound when the broker
    /// is down — the periodic repair covers that case.
    async fn subscribed(&self, user: &str);

    /// Sessions of `user` open on every node.
    async fn presence(&self, user: &str) -> Result<u64, BrokerError>;

    /// Sessions of `user` open on the other nodes, as each last published
    /// them (the presence counts' freshness). One node has no others.
    async fn sessions_elsewhere(&self, _user: &str) -> Result<Elsewhere, BrokerError> {
        Ok(Elsewhere::default())
    }

    /// Publishes what is queued (bounded in time) and withdraws this node.
    async fn close(&self) {}
}
