//! Deciding what a group commit stores, shared by both stores: with the
//! group's counter rows locked (their `last_seq` read) and the stored
//! notifications it repeats by idempotency key looked up, [`Plan::new`]
//! gives each new notification its user's next seq in request order and
//! answers repeats with the earlier notification.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Appended, NewNotification, StoredNotification};

/// (user, idempotency key).
pub(crate) type Key = (Arc<str>, Arc<str>);

/// The new rows, column by column (PostgreSQL binds each column as an array).
#[derive(Default)]
pub(crate) struct Rows<'a> {
    pub(crate) users: Vec<&'a str>,
    pub(crate) seqs: Vec<i64>,
    pub(crate) ids: Vec<&'a str>,
    pub(crate) topics: Vec<&'a str>,
    pub(crate) payloads: Vec<&'a str>,
    pub(crate) created: Vec<i64>,
    pub(crate) keys: Vec<Option<&'a str>>,
}

/// What the group stores and answers, decided in Rust with the locks held.
pub(crate) struct Plan<'a> {
    pub(crate) outcomes: Vec<Vec<Appended>>,
    pub(crate) rows: Rows<'a>,
    /// The new `last_seq` of every user that got a notification.
    pub(crate) counters: HashMap<&'a str, i64>,
}

impl<'a> Plan<'a> {
    /// Gives each new notification its user's next seq, in request order;
    /// a key already stored, or seen earlier in the group, gets that
    /// notification back with `created = false`.
    pub(crate) fn new(
        batches: &'a [Vec<NewNotification>],
        mut last_seqs: HashMap<String, i64>,
        mut known: HashMap<Key, StoredNotification>,
    ) -> Result<Self, sqlx::Error> {
        let mut plan =
            Plan { outcomes: Vec::with_capacity(batches.len()), rows: Rows::default(), counters: HashMap::new() };
        for batch in batches {
            let mut out = Vec::with_capacity(batch.len());
            for n in batch {
                let key = n.idempotency_key.as_ref().map(|k| (n.user_id.clone(), k.clone()));
                if let Some(earlier) = key.as_ref().and_then(|k| known.get(k)) {
                    out.push(Appended { notification: earlier.clone(), created: false });
                    continue;
                }
                let last = last_seqs
                    .get_mut(&*n.user_id)
                    .ok_or_else(|| sqlx::Error::Protocol(format!("no counter row locked for {}", n.user_id)))?;
                *last += 1;
                plan.counters.insert(&n.user_id, *last);
                let stored = StoredNotification {
                    user_id: n.user_id.clone(),
                    seq: *last,
                    id: n.id.clone(),
                    topic: n.topic.clone(),
                    payload: n.payload.clone(),
                    created_at_ms: n.created_at_ms,
                    read: false,
                };
                plan.rows.push(n, *last);
                if let Some(key) = key {
                    known.insert(key, stored.clone());
                }
                out.push(Appended { notification: stored, created: true });
            }
            plan.outcomes.push(out);
        }
        Ok(plan)
    }
}

impl<'a> Rows<'a> {
    pub(crate) fn push(&mut self, n: &'a NewNotification, seq: i64) {
        self.users.push(&n.user_id);
        self.seqs.push(seq);
        self.ids.push(&n.id);
        self.topics.push(&n.topic);
        self.payloads.push(n.payload.get());
        self.created.push(n.created_at_ms);
        self.keys.push(n.idempotency_key.as_deref());
    }
}
