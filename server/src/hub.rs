//! The hub: which sessions of which users live on this node, and the
//! hand-off of events to their outboxes.
//!
//! A session registers with a bounded outbox. [`Hub::deliver`] never waits:
//! when a session's outbox is full, that session is marked lagging and ends
//! with 1013 — its client resumes with `since` and loses nothing, and no
//! other session is slowed down by it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use herald_protocol::Seq;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// An encoded text frame: cloning it shares the bytes.
pub type Frame = axum::extract::ws::Utf8Bytes;

/// What the hub hands a session. Frames are encoded once and shared.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A committed notification of the session's user.
    Notification { seq: Seq, frame: Frame },
    /// A `read` frame.
    Read { frame: Frame },
}

/// Told when a user's first local session arrives and after the last leaves,
/// so a broker can subscribe to exactly the users this node serves.
pub trait Interest: Send + Sync {
    fn subscribe(&self, user: &Arc<str>);
    fn unsubscribe(&self, user: &Arc<str>);
}

/// For the in-process broker, which needs no subscriptions.
pub struct NoInterest;

impl Interest for NoInterest {
    fn subscribe(&self, _: &Arc<str>) {}
    fn unsubscribe(&self, _: &Arc<str>) {}
}

struct Subscriber {
    id: u64,
    outbox: mpsc::Sender<Delivery>,
    lagged: CancellationToken,
}

struct Shared {
    users: DashMap<Arc<str>, Vec<Subscriber>>,
    next_id: AtomicU64,
    interest: Arc<dyn Interest>,
}

/// A cheap handle; clones share one registry.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

/// A session's place in the hub; leaving is dropping it.
pub struct Registration {
    hub: Hub,
    user: Arc<str>,
    id: u64,
    pub outbox: mpsc::Receiver<Delivery>,
    /// Cancelled when the outbox overflowed.
    pub lagged: CancellationToken,
}

impl Hub {
    pub fn new(interest: Arc<dyn Interest>) -> Hub {
        Hub { shared: Arc::new(Shared { users: DashMap::new(), next_id: AtomicU64::new(1), interest }) }
    }

    /// Registers a session of `user` with an outbox of `capacity` deliveries.
    pub fn register(&self, user: &Arc<str>, capacity: usize) -> Registration {
        let (tx, rx) = mpsc::channel(capacity);
        let lagged = CancellationToken::new();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let first = {
            let mut sessions = self.shared.users.entry(user.clone()).or_default();
            sessions.push(Subscriber { id, outbox: tx, lagged: lagged.clone() });
            sessions.len() == 1
        };
        if first {
            self.shared.interest.subscribe(user);
        }
        Registration { hub: self.clone(), user: user.clone(), id, outbox: rx, lagged }
    }

    /// Hands `delivery` to every local session of `user` without waiting.
    /// Returns how many sessions took it.
    pub fn deliver(&self, user: &str, delivery: &Delivery) -> usize {
        let Some(sessions) = self.shared.users.get(user) else { return 0 };
        let mut taken = 0;
        for s in sessions.iter() {
            match s.outbox.try_send(delivery.clone()) {
                Ok(()) => taken += 1,
                Err(mpsc::error::TrySendError::Full(_)) => s.lagged.cancel(),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        taken
    }

    /// Sessions of `user` on this node.
    pub fn local_sessions(&self, user: &str) -> usize {
        self.shared.users.get(user).map_or(0, |s| s.len())
    }

    fn leave(&self, user: &Arc<str>, id: u64) {
        let last = self
            .shared
            .users
            .remove_if_mut(user, |_, sessions| {
                sessions.retain(|s| s.id != id);
                sessions.is_empty()
            })
            .is_some();
        if last {
            self.shared.interest.unsubscribe(user);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.leave(&self.user, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, bool)>>);
    impl Interest for Recorder {
        fn subscribe(&self, user: &Arc<str>) {
            self.0.lock().unwrap().push((user.to_string(), true));
        }
        fn unsubscribe(&self, user: &Arc<str>) {
            self.0.lock().unwrap().push((user.to_string(), false));
        }
    }

    fn frame(seq: Seq) -> Delivery {
        Delivery::Notification { seq, frame: Frame::from(format!("{seq}")) }
    }

    #[tokio::test]
    async fn deliveries_reach_only_the_users_sessions_and_interest_follows_first_and_last() {
        let interest = Arc::new(Recorder::default());
        let hub = Hub::new(interest.clone());
        let alice: Arc<str> = "alice".into();
        let mut a1 = hub.register(&alice, 8);
        let mut a2 = hub.register(&alice, 8);
        let mut b = hub.register(&"bob".into(), 8);
        assert_eq!(hub.deliver("alice", &frame(1)), 2);
        assert!(matches!(a1.outbox.recv().await, Some(Delivery::Notification { seq: 1, .. })));
        assert!(matches!(a2.outbox.recv().await, Some(Delivery::Notification { seq: 1, .. })));
        assert!(b.outbox.try_recv().is_err());
        drop(a1);
        assert_eq!(hub.local_sessions("alice"), 1);
        drop(a2);
        assert_eq!(hub.local_sessions("alice"), 0);
        let log = interest.0.lock().unwrap().clone();
        assert_eq!(log, vec![("alice".into(), true), ("bob".into(), true), ("alice".into(), false)]);
    }

    #[tokio::test]
    async fn a_full_outbox_marks_only_that_session_lagging() {
        let hub = Hub::new(Arc::new(NoInterest));
        let user: Arc<str> = "alice".into();
        let slow = hub.register(&user, 2);
        let mut fast = hub.register(&user, 16);
        for seq in 1..=3 {
            hub.deliver("alice", &frame(seq));
            fast.outbox.recv().await.unwrap();
        }
        assert!(slow.lagged.is_cancelled());
        assert!(!fast.lagged.is_cancelled());
    }
}
