//! The hub: which sessions of which users live on this node, and the
//! hand-off of events to their outboxes.
//!
//! A session registers with a bounded [`Outbox`]. [`Hub::deliver`] never
//! waits: when a session's outbox is full, that session is marked lagging and
//! ends with 1013 — its client resumes with `since` and loses nothing, and no
//! other session is slowed down by it.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use herald_protocol::http::UserSession;
use herald_protocol::Seq;
use tokio::sync::Notify;

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
    /// A backend disconnected the user (`DELETE /v1/users/{id}/sessions`):
    /// the session closes with 4003.
    Disconnect,
    /// The user's tokens issued before `issued_before` (unix seconds) are
    /// revoked: a session whose token is one of them closes with 4001.
    /// After `expires_at` (`None`: never) the revocation may be forgotten.
    Revoke { issued_before: i64, expires_at: Option<i64> },
    /// One token of the user, the one whose `jti` this is, is revoked: a
    /// session running on it closes with 4001. After `expires_at` (`None`:
    /// never) the revocation may be forgotten.
    RevokeToken { jti: Arc<str>, expires_at: Option<i64> },
    /// A backend closed one session of the user (`DELETE
    /// /v1/users/{id}/sessions/{session_id}`): that session, and no other,
    /// closes with 4003.
    DisconnectSession { session_id: uuid::Uuid },
}

/// At most this many of one user's sessions are listed per node (the
/// newest): the per-user session cap's default, so only a cluster that
/// turned the cap off lists fewer sessions than it counts.
pub const LISTED_PER_NODE: usize = 100;

/// Who a session is, as `GET /v1/users/{id}/sessions` lists it: fixed at
/// the handshake, except for its token, which a `refresh` replaces. The
/// session and the hub share it.
#[derive(Debug)]
pub struct SessionInfo {
    /// A UUIDv7: the `welcome`'s `session_id`, ordered by when it was made.
    pub id: uuid::Uuid,
    pub connected_at_ms: i64,
    pub ip: Option<IpAddr>,
    pub user_agent: Option<Box<str>>,
    token: Mutex<SessionToken>,
}

/// What a session knows of the token it runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionToken {
    /// `exp`, unix seconds.
    pub expires_at: i64,
    /// `iat`, if it has one (checked against revocations).
    pub issued_at: Option<i64>,
    /// `jti`, if the token can be revoked alone.
    pub jti: Option<Arc<str>>,
}

impl SessionInfo {
    pub fn new(token: SessionToken, ip: Option<IpAddr>, user_agent: Option<Box<str>>) -> SessionInfo {
        SessionInfo {
            id: uuid::Uuid::now_v7(),
            connected_at_ms: crate::store::now_ms(),
            ip,
            user_agent,
            token: Mutex::new(token),
        }
    }

    /// The token the session runs on now.
    pub fn token(&self) -> SessionToken {
        self.token.lock().expect("session token").clone()
    }

    /// Its `exp` alone (read on every turn of the session's loop).
    pub fn expires_at(&self) -> i64 {
        self.token.lock().expect("session token").expires_at
    }

    fn listed(&self, node_id: &str) -> UserSession {
        let token = self.token();
        UserSession {
            session_id: self.id.to_string(),
            node_id: node_id.to_string(),
            connected_at: crate::store::rfc3339_ms(self.connected_at_ms),
            jti: token.jti.map(|jti| jti.to_string()),
            token_expires_at: token.expires_at,
            ip: self.ip.map(|ip| ip.to_string()),
            user_agent: self.user_agent.as_deref().map(str::to_string),
        }
    }
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

/// A session's queue of deliveries, bounded by `capacity`. Pushing never
/// waits: one delivery too many marks the outbox *lagged* (and drops what it
/// holds, since the session ends with 1013 and its client resumes with
/// `since`). Empty, it holds no buffer, so an idle session pays only for the
/// handle; a buffer grown by a burst is freed once drained.
///
/// One session reads it, from one task: [`recv`](Self::recv) in its loop,
/// [`lagged`](Self::lagged) while it writes.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<OutboxShared>,
}

struct OutboxShared {
    queue: Mutex<Queue>,
    /// Told after every push and at the overflow.
    ready: Notify,
}

struct Queue {
    items: VecDeque<Delivery>,
    capacity: usize,
    lagged: bool,
}

/// The outbox overflowed: the session must end with 1013.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged;

/// A drained buffer larger than this is freed rather than kept.
const KEEP_BUFFER: usize = 16;

impl Outbox {
    fn new(capacity: usize) -> Outbox {
        let queue = Queue { items: VecDeque::new(), capacity: capacity.max(1), lagged: false };
        Outbox { shared: Arc::new(OutboxShared { queue: Mutex::new(queue), ready: Notify::new() }) }
    }

    /// Queues `delivery`; `false` when the outbox is (or just became) lagged.
    fn push(&self, delivery: &Delivery) -> bool {
        let taken = {
            let mut q = self.shared.queue.lock().expect("outbox lock");
            if q.lagged {
                return false;
            }
            if q.items.len() < q.capacity {
                q.items.push_back(delivery.clone());
                true
            } else {
                q.lagged = true;
                q.items = VecDeque::new();
                false
            }
        };
        self.shared.ready.notify_one();
        taken
    }

    /// The next delivery, waiting for one; `Err(Lagged)` once it overflowed.
    pub async fn recv(&self) -> Result<Delivery, Lagged> {
        loop {
            if let Some(next) = self.try_recv()? {
                return Ok(next);
            }
            self.shared.ready.notified().await;
        }
    }

    /// The next delivery if one is queued.
    pub fn try_recv(&self) -> Result<Option<Delivery>, Lagged> {
        let mut q = self.shared.queue.lock().expect("outbox lock");
        if q.lagged {
            return Err(Lagged);
        }
        let next = q.items.pop_front();
        if q.items.is_empty() && q.items.capacity() > KEEP_BUFFER {
            q.items = VecDeque::new();
        }
        Ok(next)
    }

    /// Resolves once the outbox has overflowed. Every push wakes it to look
    /// again, so a session waiting here on a slow socket re-checks once per
    /// delivery; it reads nothing, so what is queued stays for `recv`.
    pub async fn lagged(&self) {
        while !self.is_lagged() {
            self.shared.ready.notified().await;
        }
    }

    pub fn is_lagged(&self) -> bool {
        self.shared.queue.lock().expect("outbox lock").lagged
    }
}

struct Subscriber {
    info: Arc<SessionInfo>,
    outbox: Outbox,
}

#[derive(Default)]
struct Local {
    sessions: Vec<Subscriber>,
    /// The highest seq handed to these sessions live (or announced by a `Head`).
    latest: Seq,
}

struct Shared {
    users: DashMap<Arc<str>, Local>,
    /// Token revocations this node knows of: user → (tokens issued before
    /// this are refused, until this expiry). Only ever raised.
    revoked: DashMap<Arc<str>, (i64, Option<i64>)>,
    /// Single tokens revoked: user → `jti` → expiry (`None`: never).
    revoked_tokens: DashMap<Arc<str>, HashMap<Arc<str>, Option<i64>>>,
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
    info: Arc<SessionInfo>,
    pub outbox: Outbox,
}

impl Hub {
    pub fn new(interest: Arc<dyn Interest>) -> Hub {
        Hub {
            shared: Arc::new(Shared {
                users: DashMap::new(),
                revoked: DashMap::new(),
                revoked_tokens: DashMap::new(),
                interest,
            }),
        }
    }

    /// Registers a session of `user` with an outbox of `capacity` deliveries.
    pub fn register(&self, user: &Arc<str>, info: Arc<SessionInfo>, capacity: usize) -> Registration {
        let outbox = Outbox::new(capacity);
        let subscriber = Subscriber { info: info.clone(), outbox: outbox.clone() };
        self.shared.users.entry(user.clone()).or_default().sessions.push(subscriber);
        self.shared.interest.changed(user);
        Registration { hub: self.clone(), user: user.clone(), info, outbox }
    }

    /// A session of `user` now runs on `token` (a `refresh`): its listing
    /// changes, so the broker is told as for a session arriving.
    pub fn set_token(&self, user: &Arc<str>, info: &SessionInfo, token: SessionToken) {
        *info.token.lock().expect("session token") = token;
        self.shared.interest.changed(user);
    }

    /// Hands `delivery` to every local session of `user` without waiting.
    /// Returns how many sessions took it.
    ///
    /// A [`Delivery::Revoke`] or [`Delivery::RevokeToken`] first raises
    /// what [`is_revoked`](Self::is_revoked) answers, and goes to no session
    /// when it raises nothing (this node knew already). A session checks
    /// `is_revoked` once registered, so one registering meanwhile is refused
    /// either way.
    pub fn deliver(&self, user: &str, delivery: &Delivery) -> usize {
        let news = match delivery {
            Delivery::Revoke { issued_before, expires_at } => self.raise_revocation(user, *issued_before, *expires_at),
            Delivery::RevokeToken { jti, expires_at } => self.add_token_revocation(user, jti, *expires_at),
            _ => true,
        };
        if !news {
            return 0;
        }
        let Some(mut local) = self.shared.users.get_mut(user) else { return 0 };
        if let Delivery::Notification { seq, .. } | Delivery::Head { seq } = delivery {
            local.latest = local.latest.max(*seq);
        }
        if let Delivery::DisconnectSession { session_id } = delivery {
            return local.sessions.iter().filter(|s| s.info.id == *session_id && s.outbox.push(delivery)).count();
        }
        local.sessions.iter().filter(|s| s.outbox.push(delivery)).count()
    }

    /// True when a revocation covers a token of `user` issued at `issued_at`
    /// (a token without `iat` is covered by any revocation of its user), or
    /// the token with this `jti` was revoked alone.
    pub fn is_revoked(&self, user: &str, issued_at: Option<i64>, jti: Option<&str>) -> bool {
        self.shared.revoked.get(user).is_some_and(|known| crate::auth::revokes(known.0, issued_at))
            || jti
                .is_some_and(|jti| self.shared.revoked_tokens.get(user).is_some_and(|tokens| tokens.contains_key(jti)))
    }

    /// Users with a revocation this node knows of.
    pub fn revocation_count(&self) -> usize {
        self.shared.revoked.len()
    }

    /// Single tokens revoked that this node knows of.
    pub fn token_revocation_count(&self) -> usize {
        self.shared.revoked_tokens.iter().map(|tokens| tokens.len()).sum()
    }

    /// Forgets the revocations that expired before `now_secs` (every token
    /// they covered has expired too), single tokens' among them; how many.
    pub fn forget_expired_revocations(&self, now_secs: i64) -> usize {
        let live = |expires_at: &Option<i64>| expires_at.is_none_or(|at| at >= now_secs);
        let before = self.shared.revoked.len();
        self.shared.revoked.retain(|_, (_, expires_at)| live(expires_at));
        let mut forgotten = before - self.shared.revoked.len();
        self.shared.revoked_tokens.retain(|_, tokens| {
            let before = tokens.len();
            tokens.retain(|_, expires_at| live(expires_at));
            forgotten += before - tokens.len();
            !tokens.is_empty()
        });
        forgotten
    }

    /// Records a single token's revocation (merged with one known: the
    /// later expiry, `None` the latest); true when the token was not known
    /// revoked.
    fn add_token_revocation(&self, user: &str, jti: &Arc<str>, expires_at: Option<i64>) -> bool {
        let mut tokens = self.shared.revoked_tokens.entry(user.into()).or_default();
        match tokens.get_mut(jti) {
            Some(known) => {
                *known = known.zip(expires_at).map(|(a, b)| a.max(b));
                false
            }
            None => {
                tokens.insert(jti.clone(), expires_at);
                true
            }
        }
    }

    /// Merges a revocation into the user's (the later `issued_before`, the
    /// later expiry, `None` the latest); true when `issued_before` moved.
    fn raise_revocation(&self, user: &str, issued_before: i64, expires_at: Option<i64>) -> bool {
        let mut known = self.shared.revoked.entry(user.into()).or_insert((i64::MIN, Some(i64::MIN)));
        let raised = issued_before > known.0;
        known.0 = known.0.max(issued_before);
        known.1 = known.1.zip(expires_at).map(|(a, b)| a.max(b));
        raised
    }

    /// Sessions of `user` on this node.
    pub fn local_sessions(&self, user: &str) -> usize {
        self.shared.users.get(user).map_or(0, |l| l.sessions.len())
    }

    /// `user`'s sessions on this node, oldest first: the newest
    /// [`LISTED_PER_NODE`] of them, with `node_id` as their node.
    pub fn listing(&self, user: &str, node_id: &str) -> Vec<UserSession> {
        let Some(local) = self.shared.users.get(user) else { return Vec::new() };
        let mut infos: Vec<&Arc<SessionInfo>> = local.sessions.iter().map(|s| &s.info).collect();
        let skip = infos.len().saturating_sub(LISTED_PER_NODE);
        if skip > 0 {
            // A user with thousands of sessions here (the cap off): no full sort each time.
            infos.select_nth_unstable_by_key(skip, |info| info.id);
        }
        let newest = &mut infos[skip..];
        newest.sort_unstable_by_key(|info| info.id);
        newest.iter().map(|info| info.listed(node_id)).collect()
    }

    /// Every user with a session here, with the highest seq handed to them.
    pub fn users(&self) -> Vec<(Arc<str>, Seq)> {
        self.shared.users.iter().map(|e| (e.key().clone(), e.value().latest)).collect()
    }

    /// Sessions on this node.
    pub fn session_count(&self) -> usize {
        self.shared.users.iter().map(|e| e.value().sessions.len()).sum()
    }

    fn leave(&self, user: &Arc<str>, info: &Arc<SessionInfo>) {
        if let Some(mut local) = self.shared.users.get_mut(user) {
            local.sessions.retain(|s| !Arc::ptr_eq(&s.info, info));
        }
        self.shared.users.remove_if(user, |_, local| local.sessions.is_empty());
        self.shared.interest.changed(user);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.leave(&self.user, &self.info);
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

    fn session() -> Arc<SessionInfo> {
        Arc::new(SessionInfo::new(SessionToken { expires_at: 2_000_000_000, issued_at: None, jti: None }, None, None))
    }

    /// A hub with one session, alice's, with an outbox of `capacity`.
    fn alice_alone(capacity: usize) -> (Hub, Registration) {
        let hub = Hub::new(Arc::new(NoInterest));
        let reg = hub.register(&"alice".into(), session(), capacity);
        (hub, reg)
    }

    fn frame(seq: Seq) -> Delivery {
        Delivery::Notification { seq, frame: Frame::from(format!("{seq}")) }
    }

    /// A single token's revocation reaches the user's sessions once (a
    /// repeat, as the store's re-read brings, is news to nobody), names
    /// only that token of that user, and is forgotten after its expiry
    /// unless one of them said never.
    #[test]
    fn single_token_revocations_are_told_once_and_forgotten_after_their_expiry() {
        let (hub, reg) = alice_alone(8);
        let revoke = |jti: &str, expires_at| Delivery::RevokeToken { jti: jti.into(), expires_at };
        assert_eq!(hub.deliver("alice", &revoke("phone", Some(100))), 1);
        assert_eq!(hub.deliver("alice", &revoke("phone", Some(50))), 0, "known already");
        assert_eq!(hub.deliver("bob", &revoke("phone", Some(100))), 0, "bob has no session here");
        assert_eq!(hub.deliver("alice", &revoke("watch", None)), 1);
        let mut told = Vec::new();
        while let Some(Delivery::RevokeToken { jti, .. }) = reg.outbox.try_recv().unwrap() {
            told.push(jti.to_string());
        }
        assert_eq!(told, ["phone", "watch"]);
        assert!(hub.is_revoked("alice", Some(1), Some("phone")));
        assert!(hub.is_revoked("bob", Some(1), Some("phone")), "learned though no session took it");
        assert!(!hub.is_revoked("alice", Some(1), Some("laptop")));
        assert!(!hub.is_revoked("alice", None, None), "a token without jti is not one of them");
        assert!(!hub.is_revoked("carol", None, Some("phone")));
        assert_eq!(hub.token_revocation_count(), 3);
        // A later expiry wins when merged: alice's phone is kept to 200.
        assert_eq!(hub.deliver("alice", &revoke("phone", Some(200))), 0);
        assert_eq!(hub.forget_expired_revocations(150), 1, "bob's phone (100) goes");
        assert!(hub.is_revoked("alice", Some(1), Some("phone")));
        assert!(!hub.is_revoked("bob", Some(1), Some("phone")));
        assert_eq!(hub.forget_expired_revocations(i64::MAX), 1, "alice's phone goes; her watch is kept for good");
        assert!(hub.is_revoked("alice", Some(1), Some("watch")));
        assert_eq!(hub.token_revocation_count(), 1);
    }

    #[tokio::test]
    async fn deliveries_reach_only_the_users_sessions_and_interest_hears_every_change() {
        let interest = Arc::new(Recorder::default());
        let hub = Hub::new(interest.clone());
        let _ = interest.1.set(hub.clone());
        let alice: Arc<str> = "alice".into();
        let a1 = hub.register(&alice, session(), 8);
        let a2 = hub.register(&alice, session(), 8);
        let b = hub.register(&"bob".into(), session(), 8);
        assert_eq!(hub.deliver("alice", &frame(1)), 2);
        assert!(matches!(a1.outbox.recv().await, Ok(Delivery::Notification { seq: 1, .. })));
        assert!(matches!(a2.outbox.recv().await, Ok(Delivery::Notification { seq: 1, .. })));
        assert!(matches!(b.outbox.try_recv(), Ok(None)));
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

    /// Closing one session by its id reaches that session alone; a listing
    /// shows a node's newest sessions of the user, oldest first, with the
    /// token each runs on now.
    #[test]
    fn one_session_is_closed_by_its_id_and_listed_with_its_current_token() {
        let interest = Arc::new(Recorder::default());
        let hub = Hub::new(interest.clone());
        let _ = interest.1.set(hub.clone());
        let alice: Arc<str> = "alice".into();
        let phone = session();
        let laptop = Arc::new(SessionInfo::new(
            SessionToken { expires_at: 1_900_000_000, issued_at: Some(5), jti: Some("t-1".into()) },
            Some("203.0.113.9".parse().unwrap()),
            Some("Firefox".into()),
        ));
        let a1 = hub.register(&alice, phone.clone(), 8);
        let a2 = hub.register(&alice, laptop.clone(), 8);
        let b = hub.register(&"bob".into(), session(), 8);
        let close_laptop = Delivery::DisconnectSession { session_id: laptop.id };
        assert_eq!(hub.deliver("bob", &close_laptop), 0, "bob has no such session");
        assert_eq!(hub.deliver("alice", &close_laptop), 1);
        assert!(matches!(a2.outbox.try_recv(), Ok(Some(Delivery::DisconnectSession { .. }))));
        assert!(matches!(a1.outbox.try_recv(), Ok(None)));
        assert!(matches!(b.outbox.try_recv(), Ok(None)));

        let listed = hub.listing("alice", "n1");
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].session_id, phone.id.to_string(), "oldest first");
        assert_eq!(listed[1].session_id, laptop.id.to_string());
        assert_eq!(listed[1].node_id, "n1");
        assert_eq!(listed[1].jti.as_deref(), Some("t-1"));
        assert_eq!(listed[1].token_expires_at, 1_900_000_000);
        assert_eq!(listed[1].ip.as_deref(), Some("203.0.113.9"));
        assert_eq!(listed[1].user_agent.as_deref(), Some("Firefox"));
        assert_eq!(listed[0].jti, None);
        assert_eq!(listed[0].ip, None);
        assert!(hub.listing("carol", "n1").is_empty());

        interest.0.lock().unwrap().clear();
        let refreshed = SessionToken { expires_at: 2_100_000_000, issued_at: Some(9), jti: Some("t-2".into()) };
        hub.set_token(&alice, &laptop, refreshed.clone());
        assert_eq!(laptop.token(), refreshed);
        assert_eq!(hub.listing("alice", "n1")[1].jti.as_deref(), Some("t-2"));
        assert_eq!(interest.0.lock().unwrap().clone(), vec![("alice".to_string(), 2)], "the broker hears of it");

        // Past the bound, the newest are listed.
        let more: Vec<_> = (0..LISTED_PER_NODE).map(|_| hub.register(&alice, session(), 1)).collect();
        let listed = hub.listing("alice", "n1");
        assert_eq!(listed.len(), LISTED_PER_NODE);
        assert_eq!(hub.local_sessions("alice"), LISTED_PER_NODE + 2);
        assert!(listed.iter().all(|l| l.session_id != phone.id.to_string() && l.session_id != laptop.id.to_string()));
        assert!(listed.windows(2).all(|w| w[0].session_id < w[1].session_id));
        drop(more);
        drop(a2);
        assert_eq!(hub.listing("alice", "n1").len(), 1, "a session that left is not listed");
    }

    #[tokio::test]
    async fn a_full_outbox_marks_only_that_session_lagging() {
        let hub = Hub::new(Arc::new(NoInterest));
        let user: Arc<str> = "alice".into();
        let slow = hub.register(&user, session(), 2);
        let fast = hub.register(&user, session(), 16);
        for seq in 1..=3 {
            hub.deliver("alice", &frame(seq));
            fast.outbox.recv().await.unwrap();
        }
        assert!(slow.outbox.is_lagged());
        assert!(!fast.outbox.is_lagged());
        assert_eq!(slow.outbox.recv().await.unwrap_err(), Lagged);
        // Lagged is for good: later deliveries are refused, not queued.
        assert_eq!(hub.deliver("alice", &frame(4)), 1);
        assert!(matches!(fast.outbox.recv().await, Ok(Delivery::Notification { seq: 4, .. })));
    }

    #[tokio::test]
    async fn an_outbox_keeps_order_wakes_its_reader_and_frees_a_drained_burst() {
        let (hub, reg) = alice_alone(1024);
        let reader = {
            let outbox = reg.outbox.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                while seqs.len() < 3 {
                    if let Ok(Delivery::Notification { seq, .. }) = outbox.recv().await {
                        seqs.push(seq);
                    }
                }
                seqs
            })
        };
        tokio::task::yield_now().await;
        for seq in 1..=3 {
            hub.deliver("alice", &frame(seq));
        }
        assert_eq!(reader.await.unwrap(), vec![1, 2, 3]);

        for seq in 4..=500 {
            hub.deliver("alice", &frame(seq));
        }
        assert!(reg.outbox.shared.queue.lock().unwrap().items.capacity() >= 497);
        let mut next = 4;
        while let Some(d) = reg.outbox.try_recv().unwrap() {
            assert!(matches!(d, Delivery::Notification { seq, .. } if seq == next));
            next += 1;
        }
        assert_eq!(next, 501);
        assert_eq!(reg.outbox.shared.queue.lock().unwrap().items.capacity(), 0, "the burst's buffer is freed");
    }

    #[tokio::test]
    async fn a_writer_waiting_on_lagged_wakes_at_the_overflow_and_not_before() {
        let (hub, reg) = alice_alone(2);
        let waiter = {
            let outbox = reg.outbox.clone();
            tokio::spawn(async move { outbox.lagged().await })
        };
        hub.deliver("alice", &frame(1));
        hub.deliver("alice", &frame(2));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        hub.deliver("alice", &frame(3));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
    }
}
