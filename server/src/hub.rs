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
pub type Frame = tokio_tungstenite::tungstenite::Utf8Bytes;

/// What the hub hands a session. Frames are encoded once and shared.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// A committed notification of the session's user.
    Notification { seq: Seq, frame: Frame },
    /// A `read` frame.
    Read { frame: Frame },
    /// The store holds the user's notifications up to `seq`: a session that
    /// has seen less fetches the rest (the broker lost them).
    Head { seq: Seq },
}

/// Told whenever the number of a user's local sessions changes (the first
/// arrives, one more, the last leaves), so a broker can subscribe to exactly
/// the users this node serves and publish presence. Must not block: it is
/// called on the connection path.
pub trait Interest: Send + Sync {
    fn changed(&self, user: &Arc<str>);
}

/// For the in-process broker, which needs no subscriptions.
pub struct NoInterest;

impl Interest for NoInterest {
    fn changed(&self, _: &Arc<str>) {}
}

struct Subscriber {
    id: u64,
    outbox: mpsc::Sender<Delivery>,
    lagged: CancellationToken,
}

#[derive(Default)]
struct Local {
    sessions: Vec<Subscriber>,
    /// The highest seq handed to these sessions live (or announced by a `Head`).
    latest: Seq,
}

struct Shared {
    users: DashMap<Arc<str>, Local>,
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
        self.shared.users.entry(user.clone()).or_default().sessions.push(Subscriber {
            id,
            outbox: tx,
            lagged: lagged.clone(),
        });
        self.shared.interest.changed(user);
        Registration { hub: self.clone(), user: user.clone(), id, outbox: rx, lagged }
    }

    /// Hands `delivery` to every local session of `user` without waiting.
    /// Returns how many sessions took it.
    pub fn deliver(&self, user: &str, delivery: &Delivery) -> usize {
        let Some(mut local) = self.shared.users.get_mut(user) else { return 0 };
        if let Delivery::Notification { seq, .. } | Delivery::Head { seq } = delivery {
            local.latest = local.latest.max(*seq);
        }
        let mut taken = 0;
        for s in local.sessions.iter() {
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
        self.shared.users.get(user).map_or(0, |l| l.sessions.len())
    }

    /// Every user with a session here, with the highest seq handed to them.
    pub fn users(&self) -> Vec<(Arc<str>, Seq)> {
        self.shared.users.iter().map(|e| (e.key().clone(), e.value().latest)).collect()
    }

    /// Sessions on this node.
    pub fn session_count(&self) -> usize {
        self.shared.users.iter().map(|e| e.value().sessions.len()).sum()
    }

    fn leave(&self, user: &Arc<str>, id: u64) {
        if let Some(mut local) = self.shared.users.get_mut(user) {
            local.sessions.retain(|s| s.id != id);
        }
        self.shared.users.remove_if(user, |_, local| local.sessions.is_empty());
        self.shared.interest.changed(user);
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

    /// Records (user, local sessions) at each change.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, usize)>>, std::sync::OnceLock<Hub>);
    impl Interest for Recorder {
        fn changed(&self, user: &Arc<str>) {
            let count = self.1.get().map_or(0, |hub| hub.local_sessions(user));
            self.0.lock().unwrap().push((user.to_string(), count));
        }
    }

    fn frame(seq: Seq) -> Delivery {
        Delivery::Notification { seq, frame: Frame::from(format!("{seq}")) }
    }

    #[tokio::test]
    async fn deliveries_reach_only_the_users_sessions_and_interest_hears_every_change() {
        let interest = Arc::new(Recorder::default());
        let hub = Hub::new(interest.clone());
        let _ = interest.1.set(hub.clone());
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
        assert_eq!(
            log,
            vec![("alice".into(), 1), ("alice".into(), 2), ("bob".into(), 1), ("alice".into(), 1), ("alice".into(), 0)]
        );
        assert_eq!(hub.users().len(), 1);
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
