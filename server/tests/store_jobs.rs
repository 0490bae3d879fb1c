//! `JobStore` — durable jobs and digest windows — and the read state
//! (read marks, unread counts, unread-only pages) against both stores: each
//! scenario is written once and runs on a SQLite file and on a fresh
//! PostgreSQL database (`services`; an unreachable server fails the test, it
//! never skips). "Two nodes" are two store handles on one database, the way
//! two herald processes share a store.

mod common;
mod services;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use herald_protocol::ReadMark;
use herald_server::store::jobs::{DigestAdded, DigestEntry, DigestWindow, Job, JobOutcome, JobState, NewJob};
use herald_server::store::{now_ms, open, ListQuery, NewNotification, Store, StoreOptions};
use serde_json::value::RawValue;
use sqlx::{Connection, Row, SqliteConnection};

/// A lease nobody outlives in these tests.
const LONG: Duration = Duration::from_secs(60);
/// A lease a test waits out.
const SHORT: Duration = Duration::from_millis(300);
/// Comfortably past [`SHORT`], for a busy CI box.
const PAST_SHORT: Duration = Duration::from_millis(500);

/// Which store a scenario runs on.
#[derive(Clone, Copy)]
enum Db {
    Sqlite,
    Postgres,
}

/// A fresh, empty database for one test, removed when dropped.
struct TestDb {
    url: String,
    _dir: Option<tempfile::TempDir>,
    _database: Option<services::TestDatabase>,
}

impl TestDb {
    async fn create(db: Db) -> TestDb {
        match db {
            Db::Sqlite => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let url = format!("sqlite://{}/herald.db", dir.path().display());
                TestDb { url, _dir: Some(dir), _database: None }
            }
            Db::Postgres => {
                let db = tokio::task::spawn_blocking(services::TestDatabase::create).await.expect("a test database");
                TestDb { url: db.url(), _dir: None, _database: Some(db) }
            }
        }
    }

    /// One more store handle on this database: one more node.
    async fn open(&self) -> Arc<dyn Store> {
        let options = StoreOptions { pool_size: 4, ..StoreOptions::default() };
        open(&self.url, &options).await.expect("open the store")
    }
}

async fn close_all(stores: &[Arc<dyn Store>]) {
    for store in stores {
        store.close().await;
    }
}

fn new_job(total: i64, key: Option<&str>) -> NewJob {
    NewJob {
        id: uuid::Uuid::now_v7().to_string(),
        kind: "fanout".into(),
        payload: format!(r#"{{"total":{total}}}"#),
        total,
        idempotency_key: key.map(Into::into),
    }
}

fn raw(json: &str) -> Arc<RawValue> {
    RawValue::from_string(json.into()).expect("valid JSON").into()
}

fn entry(user_key_topic: (&str, &str, &str), payload: &str, at_ms: i64, window_ms: i64) -> DigestEntry {
    let (user, key, topic) = user_key_topic;
    DigestEntry {
        user_id: user.into(),
        key: key.into(),
        topic: topic.into(),
        payload: raw(payload),
        at_ms,
        window_ms,
        idempotency_key: None,
    }
}

fn texts(window: &DigestWindow) -> Vec<&str> {
    window.items.iter().map(|item| item.get()).collect()
}

async fn job(store: &Arc<dyn Store>, id: &str) -> Job {
    store.job(id).await.unwrap().unwrap_or_else(|| panic!("job {id} is stored"))
}

/// The first job `owner` can claim, polling until `wait` has passed.
async fn claim_within(store: &Arc<dyn Store>, owner: &str, wait: Duration) -> Job {
    let until = Instant::now() + wait;
    loop {
        if let Some(job) = store.claim(owner, LONG).await.unwrap() {
            return job;
        }
        assert!(Instant::now() < until, "{owner} found nothing to claim within {wait:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `$scenario` as one test per store.
macro_rules! on_both {
    ($scenario:ident => $on_sqlite:ident, $on_postgres:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $on_sqlite() {
            $scenario(Db::Sqlite).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $on_postgres() {
            $scenario(Db::Postgres).await;
        }
    };
}

on_both!(enqueue_is_idempotent_by_key =>
    enqueue_is_idempotent_by_key_on_sqlite,
    enqueue_is_idempotent_by_key_on_postgres);
on_both!(each_job_is_claimed_once =>
    each_job_is_claimed_once_on_sqlite,
    each_job_is_claimed_once_on_postgres);
on_both!(an_expired_lease_passes_the_job_on =>
    an_expired_lease_passes_the_job_on_on_sqlite,
    an_expired_lease_passes_the_job_on_on_postgres);
on_both!(retries_wait_and_failures_stay =>
    retries_wait_and_failures_stay_on_sqlite,
    retries_wait_and_failures_stay_on_postgres);
on_both!(a_repeat_of_a_failed_job_queues_it_again =>
    a_repeat_of_a_failed_job_queues_it_again_on_sqlite,
    a_repeat_of_a_failed_job_queues_it_again_on_postgres);
on_both!(digest_windows_collect_and_close =>
    digest_windows_collect_and_close_on_sqlite,
    digest_windows_collect_and_close_on_postgres);
on_both!(concurrent_digest_adds_count_each_once =>
    concurrent_digest_adds_count_each_once_on_sqlite,
    concurrent_digest_adds_count_each_once_on_postgres);
on_both!(a_digest_entry_key_adds_its_entry_once =>
    a_digest_entry_key_adds_its_entry_once_on_sqlite,
    a_digest_entry_key_adds_its_entry_once_on_postgres);
on_both!(racing_adds_under_one_entry_key_add_one_entry =>
    racing_adds_under_one_entry_key_add_one_entry_on_sqlite,
    racing_adds_under_one_entry_key_add_one_entry_on_postgres);
on_both!(an_expired_digest_lease_passes_the_window_on =>
    an_expired_digest_lease_passes_the_window_on_on_sqlite,
    an_expired_digest_lease_passes_the_window_on_on_postgres);

async fn enqueue_is_idempotent_by_key(db: Db) {
    let db = TestDb::create(db).await;
    let nodes = [db.open().await, db.open().await];

    let first = new_job(7, Some("publish:abc"));
    let again = new_job(7, Some("publish:abc"));
    assert_eq!(nodes[0].enqueue(first.clone()).await.unwrap(), (first.id.clone(), true));
    // A retry through another node finds the first job and stores nothing.
    assert_eq!(nodes[1].enqueue(again.clone()).await.unwrap(), (first.id.clone(), false));
    assert!(nodes[0].job(&again.id).await.unwrap().is_none(), "the duplicate was stored");

    let (a, b) = (new_job(3, None), new_job(3, None));
    assert_eq!(nodes[0].enqueue(a.clone()).await.unwrap(), (a.id.clone(), true));
    assert_eq!(nodes[0].enqueue(b.clone()).await.unwrap(), (b.id.clone(), true));
    assert_ne!(a.id, b.id);
    assert_eq!(job(&nodes[1], &b.id).await.id, b.id);

    let stored = job(&nodes[1], &first.id).await;
    assert_eq!(stored.state, JobState::Queued);
    assert_eq!((stored.attempts, stored.done, stored.total), (0, 0, 7));
    assert_eq!((stored.kind.as_str(), stored.payload.as_str()), ("fanout", first.payload.as_str()));
    assert_eq!(stored.error, None);
    assert!(nodes[0].job("no-such-job").await.unwrap().is_none());
    close_all(&nodes).await;
}

async fn each_job_is_claimed_once(db: Db) {
    let db = TestDb::create(db).await;
    let nodes = [db.open().await, db.open().await];
    let mut queued = HashSet::new();
    for total in 1..=40 {
        queued.insert(nodes[0].enqueue(new_job(total, None)).await.unwrap().0);
    }

    // 8 workers, 4 on each node, each claiming until nothing is left.
    let workers = (0..8).map(|n| {
        let store = nodes[n % 2].clone();
        tokio::spawn(async move {
            let owner = format!("worker-{n}");
            let mut claimed = Vec::new();
            while let Some(job) = store.claim(&owner, LONG).await.unwrap() {
                assert_eq!((job.state, job.attempts), (JobState::Running, 1), "{job:?}");
                store.finish(&job.id, &owner, JobOutcome::Done).await.unwrap();
                claimed.push((job.id, owner.clone()));
            }
            claimed
        })
    });
    let claims: Vec<(String, String)> =
        join_all(workers).await.into_iter().flat_map(|w| w.expect("a worker panicked")).collect();

    let mut owners: HashMap<&str, Vec<&str>> = HashMap::new();
    for (id, owner) in &claims {
        owners.entry(id.as_str()).or_default().push(owner.as_str());
    }
    let twice: Vec<_> = owners.iter().filter(|(_, by)| by.len() > 1).collect();
    assert!(twice.is_empty(), "claimed more than once: {twice:?}");
    assert_eq!(owners.keys().map(|id| id.to_string()).collect::<HashSet<_>>(), queued);
    for id in &queued {
        let done = job(&nodes[1], id).await;
        assert_eq!((done.state, done.done, done.attempts), (JobState::Done, done.total, 1), "{done:?}");
    }
    close_all(&nodes).await;
}

async fn an_expired_lease_passes_the_job_on(db: Db) {
    let db = TestDb::create(db).await;
    let nodes = [db.open().await, db.open().await];
    let (a, b) = (&nodes[0], &nodes[1]);
    let id = a.enqueue(new_job(10, None)).await.unwrap().0;

    let started = Instant::now();
    let held = a.claim("A", SHORT).await.unwrap().expect("A claims the job");
    assert_eq!((held.id.as_str(), held.attempts), (id.as_str(), 1));
    let early = b.claim("B", LONG).await.unwrap();
    assert!(early.is_none() || started.elapsed() >= SHORT, "B took a job A still held: {early:?}");
    assert!(a.progress(&id, "A", 4, SHORT).await.unwrap(), "A still holds its job");

    // A stalls past its lease (extended by the progress just now).
    tokio::time::sleep(PAST_SHORT).await;
    let taken = b.claim("B", LONG).await.unwrap().expect("B takes the job over");
    assert_eq!((taken.id.as_str(), taken.attempts, taken.state), (id.as_str(), 2, JobState::Running));
    assert_eq!(taken.done, 4, "the progress A recorded is kept");

    assert!(!a.progress(&id, "A", 9, LONG).await.unwrap(), "A must learn it lost the job");
    a.finish(&id, "A", JobOutcome::Done).await.unwrap();
    let now = job(b, &id).await;
    assert_eq!((now.state, now.done, now.attempts), (JobState::Running, 4, 2), "A's late finish changed the job");
    assert!(b.progress(&id, "B", 6, LONG).await.unwrap(), "B still holds the job");

    b.finish(&id, "B", JobOutcome::Done).await.unwrap();
    let done = job(a, &id).await;
    assert_eq!((done.state, done.done), (JobState::Done, 10));
    assert!(a.claim("A", LONG).await.unwrap().is_none(), "a done job was claimed");
    close_all(&nodes).await;
}

async fn retries_wait_and_failures_stay(db: Db) {
    let db = TestDb::create(db).await;
    let store = db.open().await;
    let id = store.enqueue(new_job(5, None)).await.unwrap().0;
    store.claim("A", LONG).await.unwrap().expect("A claims the job");

    let due = now_ms() + 800;
    store.finish(&id, "A", JobOutcome::Retry { at_ms: due, error: "boom".into() }).await.unwrap();
    let queued = job(&store, &id).await;
    assert_eq!((queued.state, queued.error.as_deref(), queued.attempts), (JobState::Queued, Some("boom"), 1));
    let early = store.claim("B", LONG).await.unwrap();
    assert!(early.is_none() || now_ms() >= due, "a retry was claimed before it was due: {early:?}");

    let retried = claim_within(&store, "B", common::WAIT).await;
    assert_eq!((retried.id.as_str(), retried.attempts), (id.as_str(), 2));
    assert!(retried.updated_at_ms >= due, "claimed at {} before due at {due}", retried.updated_at_ms);
    assert_eq!(retried.error.as_deref(), Some("boom"), "the last reason is kept while it runs again");

    store.finish(&id, "B", JobOutcome::Failed { error: "bad".into() }).await.unwrap();
    let failed = job(&store, &id).await;
    assert_eq!((failed.state, failed.error.as_deref()), (JobState::Failed, Some("bad")));
    assert!(store.claim("C", LONG).await.unwrap().is_none(), "a failed job was claimed");
    store.close().await;
}

/// The same idempotency key again answers the job; once it has failed, it
/// also queues it again, due now with fresh attempts and its progress kept,
/// and only once however many repeats race (two nodes).
async fn a_repeat_of_a_failed_job_queues_it_again(db: Db) {
    let db = TestDb::create(db).await;
    let nodes = [db.open().await, db.open().await];
    let first = new_job(3000, Some("publish:failing"));
    let id = first.id.clone();
    assert_eq!(nodes[0].enqueue(first).await.unwrap(), (id.clone(), true));
    assert_eq!(nodes[0].claim("A", LONG).await.unwrap().expect("A claims it").id, id);
    assert!(nodes[0].progress(&id, "A", 1000, LONG).await.unwrap());
    assert_eq!(nodes[1].enqueue(new_job(3000, Some("publish:failing"))).await.unwrap(), (id.clone(), false));
    assert_eq!(job(&nodes[1], &id).await.state, JobState::Running, "a repeat of a running job changed it");
    nodes[0].finish(&id, "A", JobOutcome::Failed { error: "gave up".into() }).await.unwrap();

    let repeats = nodes.iter().map(|node| node.enqueue(new_job(3000, Some("publish:failing"))));
    let answers: Vec<_> = join_all(repeats).await.into_iter().map(Result::unwrap).collect();
    assert!(answers.iter().all(|(answered, _)| *answered == id), "{answers:?}");
    assert_eq!(answers.iter().filter(|(_, queued)| *queued).count(), 1, "queued again by each repeat: {answers:?}");
    let queued = job(&nodes[0], &id).await;
    assert_eq!((queued.state, queued.attempts, queued.done), (JobState::Queued, 0, 1000));
    assert_eq!(queued.error.as_deref(), Some("gave up"), "the last reason is kept");
    let resumed = claim_within(&nodes[1], "B", common::WAIT).await;
    assert_eq!((resumed.id.as_str(), resumed.attempts, resumed.done), (id.as_str(), 1, 1000));
    close_all(&nodes).await;
}

async fn digest_windows_collect_and_close(db: Db) {
    const WINDOW: i64 = 1000;
    let db = TestDb::create(db).await;
    let store = db.open().await;

    // 15 entries for (u1, k), one for (u2, k) and one for (u1, other) among
    // them, in one call; odd spacing shows whether payloads stay byte-exact.
    let base = now_ms();
    let (mut entries, mut payloads, mut u1k) = (Vec::new(), Vec::new(), Vec::new());
    for n in 1..=15 {
        let payload = format!("{{ \"n\" :  {n} }}");
        let at = base + entries.len() as i64;
        u1k.push(entries.len());
        entries.push(entry(("u1", "k", &format!("topic-{n}")), &payload, at, WINDOW));
        payloads.push(payload);
        if n == 3 {
            entries.push(entry(("u2", "k", "u2-topic"), r#"{"u": 2}"#, base + entries.len() as i64, WINDOW));
        }
        if n == 8 {
            entries.push(entry(("u1", "other", "other-topic"), r#"{"o" :1}"#, base + entries.len() as i64, WINDOW));
        }
    }
    let (u2k, u1other) = (3, 9);
    let last_at = entries[*u1k.last().unwrap()].at_ms;
    let added = store.digest_add(entries).await.unwrap();

    assert_eq!(added.len(), 17);
    let closes = base + WINDOW;
    let window = added[0].window_id.clone();
    let counts: Vec<DigestAdded> = u1k.iter().map(|&i| added[i].clone()).collect();
    let expected: Vec<DigestAdded> = (1..=15)
        .map(|count| DigestAdded { window_id: window.clone(), count, closes_at_ms: closes, repeated: false })
        .collect();
    assert_eq!(counts, expected, "answers for (u1, k), in input order");
    assert_eq!((added[u2k].count, added[u2k].closes_at_ms), (1, base + 3 + WINDOW));
    assert_eq!((added[u1other].count, added[u1other].closes_at_ms), (1, base + 9 + WINDOW));
    let ids: HashSet<&str> = [u2k, u1other, 0].iter().map(|&i| added[i].window_id.as_str()).collect();
    assert_eq!(ids.len(), 3, "three (user, key) pairs, three windows");

    assert!(store.digest_claim_due("A", closes - 1, LONG, 100).await.unwrap().is_empty(), "claimed before closing");
    assert_eq!(store.digest_next_close().await.unwrap(), Some(closes));

    let after = closes + 100;
    let claimed = store.digest_claim_due("A", after, LONG, 100).await.unwrap();
    let ids_claimed: HashSet<&str> = claimed.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids_claimed, ids);
    let first = claimed.iter().find(|w| w.id == window).unwrap();
    assert_eq!((&*first.user_id, first.key.as_str(), &*first.topic), ("u1", "k", "topic-1"));
    assert_eq!((first.count, first.first_at_ms, first.last_at_ms, first.closes_at_ms), (15, base, last_at, closes));
    assert_eq!(texts(first), payloads[..10].iter().map(String::as_str).collect::<Vec<_>>());
    let other = claimed.iter().find(|w| w.key == "other").unwrap();
    assert_eq!((&*other.topic, other.count, texts(other)), ("other-topic", 1, vec![r#"{"o" :1}"#]));
    assert!(store.digest_claim_due("B", after, LONG, 100).await.unwrap().is_empty(), "a held window was claimed");

    // The entry's own time is still inside the claimed window (nodes' clocks
    // differ): only the claim's seal sends it to a new window.
    let late =
        store.digest_add(vec![entry(("u1", "k", "late"), r#"{"late":true}"#, closes - 1, WINDOW)]).await.unwrap();
    assert_ne!(late[0].window_id, window, "an add joined a window being closed");
    assert_eq!((late[0].count, late[0].closes_at_ms), (1, closes - 1 + WINDOW));

    store.digest_delete(&window).await.unwrap();
    let later = store.digest_claim_due("B", after + LONG.as_millis() as i64 + 1, LONG, 100).await.unwrap();
    let ids_later: HashSet<&str> = later.iter().map(|w| w.id.as_str()).collect();
    let expected: HashSet<&str> = [&added[u2k].window_id, &added[u1other].window_id, &late[0].window_id]
        .into_iter()
        .map(String::as_str)
        .collect();
    assert_eq!(ids_later, expected, "the deleted window came back, or another went missing");
    let fresh = later.iter().find(|w| w.id == late[0].window_id).unwrap();
    assert_eq!((&*fresh.topic, fresh.count, texts(fresh)), ("late", 1, vec![r#"{"late":true}"#]));
    store.close().await;
}

async fn concurrent_digest_adds_count_each_once(db: Db) {
    const WINDOW: i64 = 3_600_000;
    let db = TestDb::create(db).await;
    let nodes = [db.open().await, db.open().await];

    let tasks = (0..8).map(|t| {
        let store = nodes[t % 2].clone();
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..25 {
                let payload = format!(r#"{{"t":{t}, "i":{i}}}"#);
                let at = now_ms();
                let added = store.digest_add(vec![entry(("u", "k", "busy"), &payload, at, WINDOW)]).await.unwrap();
                assert_eq!(added.len(), 1);
                answers.push((added[0].clone(), payload, at));
            }
            answers
        })
    });
    let answers: Vec<(DigestAdded, String, i64)> =
        join_all(tasks).await.into_iter().flat_map(|t| t.expect("an adder panicked")).collect();

    let mut counts: Vec<i64> = answers.iter().map(|(added, _, _)| added.count).collect();
    counts.sort_unstable();
    assert_eq!(counts, (1..=200).collect::<Vec<_>>(), "an entry was lost or counted twice");
    let windows: HashSet<(&str, i64)> =
        answers.iter().map(|(added, _, _)| (added.window_id.as_str(), added.closes_at_ms)).collect();
    assert_eq!(windows.len(), 1, "one window for one (user, key): {windows:?}");

    let claimed = nodes[0].digest_claim_due("A", now_ms() + 10 * WINDOW, LONG, 100).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let window = &claimed[0];
    assert_eq!((window.count, window.id.as_str()), (200, answers[0].0.window_id.as_str()));
    let mut by_count: Vec<&(DigestAdded, String, i64)> = answers.iter().collect();
    by_count.sort_by_key(|(added, _, _)| added.count);
    let first_ten: Vec<&str> = by_count[..10].iter().map(|(_, payload, _)| payload.as_str()).collect();
    assert_eq!(texts(window), first_ten, "the items are the entries counted 1 to 10");
    let ats = answers.iter().map(|(_, _, at)| *at);
    assert_eq!((window.first_at_ms, window.last_at_ms), (ats.clone().min().unwrap(), ats.max().unwrap()));
    close_all(&nodes).await;
}

fn keyed(user_key_topic: (&str, &str, &str), payload: &str, at_ms: i64, window_ms: i64, key: &str) -> DigestEntry {
    DigestEntry { idempotency_key: Some(key.into()), ..entry(user_key_topic, payload, at_ms, window_ms) }
}

async fn a_digest_entry_key_adds_its_entry_once(db: Db) {
    const WINDOW: i64 = 1000;
    let db = TestDb::create(db).await;
    let store = db.open().await;
    let base = now_ms();

    let first = store
        .digest_add(vec![
            keyed(("u1", "d", "t"), r#"{"n":1}"#, base, WINDOW, "k1"),
            keyed(("u2", "d", "t"), r#"{"n":1}"#, base, WINDOW, "k1"),
        ])
        .await
        .unwrap();
    assert!(first.iter().all(|a| !a.repeated && a.count == 1), "{first:?}");
    let unkeyed = store.digest_add(vec![entry(("u1", "d", "t"), r#"{"n":2}"#, base + 1, WINDOW)]).await.unwrap();
    assert_eq!((unkeyed[0].count, unkeyed[0].repeated), (2, false));

    // The same key again, for u1 with a new user beside it; later, and with
    // another payload: u1's answer is its first, and nothing is added.
    let again = store
        .digest_add(vec![
            keyed(("u3", "d", "t"), r#"{"n":3}"#, base + 2, WINDOW, "k1"),
            keyed(("u1", "d", "t"), r#"{"n":3}"#, base + 2, WINDOW, "k1"),
        ])
        .await
        .unwrap();
    assert_eq!(again[1], DigestAdded { repeated: true, ..first[0].clone() }, "u1's repeat answers its first entry");
    assert_eq!((again[0].count, again[0].repeated), (1, false), "the key is per user: u3's entry is new");
    // Another key is another entry.
    let other = store.digest_add(vec![keyed(("u1", "d", "t"), r#"{"n":4}"#, base + 3, WINDOW, "k2")]).await.unwrap();
    assert_eq!((other[0].count, other[0].repeated), (3, false));

    let claimed = store.digest_claim_due("A", base + 2 * WINDOW, LONG, 100).await.unwrap();
    let u1 = claimed.iter().find(|w| &*w.user_id == "u1").unwrap();
    assert_eq!((u1.count, texts(u1)), (3, vec![r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":4}"#]));
    store.digest_delete(&u1.id).await.unwrap();

    // Once its window is closed and delivered the key still answers: a
    // retry that comes late adds nothing to the next window.
    let late =
        store.digest_add(vec![keyed(("u1", "d", "t"), r#"{"n":5}"#, base + 3 * WINDOW, WINDOW, "k1")]).await.unwrap();
    assert_eq!(late[0], DigestAdded { repeated: true, ..first[0].clone() });

    // Retention: keys whose window closed before the bound go. u1's k1
    // and k2 and u2's k1 closed at base + WINDOW; u3's at base + 2 + WINDOW.
    assert_eq!(store.digest_purge_keys(base + WINDOW + 1).await.unwrap(), 3, "u1's k1, k2 and u2's k1");
    assert_eq!(store.digest_purge_keys(base + WINDOW + 1).await.unwrap(), 0);
    let reused =
        store.digest_add(vec![keyed(("u1", "d", "t"), r#"{"n":6}"#, base + 3 * WINDOW, WINDOW, "k1")]).await.unwrap();
    assert_eq!((reused[0].count, reused[0].repeated), (1, false), "a purged key names a new entry");

    // Erasure: the user's keys go with the user's windows; others' stay.
    assert_eq!(store.digest_erase("u3").await.unwrap(), 1);
    let u3 =
        store.digest_add(vec![keyed(("u3", "d", "t"), r#"{"n":7}"#, base + 3 * WINDOW, WINDOW, "k1")]).await.unwrap();
    assert_eq!((u3[0].count, u3[0].repeated), (1, false), "an erased user's key still answered");
    let u1 =
        store.digest_add(vec![keyed(("u1", "d", "t"), r#"{"n":8}"#, base + 3 * WINDOW, WINDOW, "k1")]).await.unwrap();
    assert!(u1[0].repeated, "erasing u3 took u1's key");
    store.close().await;
}

async fn racing_adds_under_one_entry_key_add_one_entry(db: Db) {
    const WINDOW: i64 = 3_600_000;
    let db = TestDb::create(db).await;
    let nodes = [db.open().await, db.open().await];
    let at = now_ms();

    // Every round, 6 adders on two nodes send the same entry key at once.
    for round in 0..10 {
        let key = format!("retry-{round}");
        let tasks = (0..6).map(|t| {
            let (store, key) = (nodes[t % 2].clone(), key.clone());
            tokio::spawn(async move {
                store.digest_add(vec![keyed(("u", "d", "t"), r#"{"x":1}"#, at, WINDOW, &key)]).await.unwrap().remove(0)
            })
        });
        let answers: Vec<DigestAdded> =
            join_all(tasks).await.into_iter().map(|t| t.expect("an adder panicked")).collect();
        let firsts: Vec<&DigestAdded> = answers.iter().filter(|a| !a.repeated).collect();
        assert_eq!(firsts.len(), 1, "round {round}: {answers:?}");
        assert_eq!(firsts[0].count, round + 1, "round {round}: one entry per key so far");
        for a in &answers {
            assert_eq!(
                DigestAdded { repeated: false, ..a.clone() },
                *firsts[0],
                "round {round}: a repeat answered differently"
            );
        }
    }
    let claimed = nodes[0].digest_claim_due("A", at + 2 * WINDOW, LONG, 100).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].count, 10, "one entry per key");
    close_all(&nodes).await;
}

async fn an_expired_digest_lease_passes_the_window_on(db: Db) {
    let db = TestDb::create(db).await;
    let nodes = [db.open().await, db.open().await];
    let (a, b) = (&nodes[0], &nodes[1]);
    let opened = now_ms() - 2000;
    a.digest_add(vec![entry(("u", "k", "t"), r#"{"x":1}"#, opened, 1000)]).await.unwrap();

    let (started, at) = (Instant::now(), now_ms());
    let held = a.digest_claim_due("A", at, SHORT, 10).await.unwrap();
    assert_eq!(held.len(), 1, "the window is due");
    // A closer sleeps until the holder's lease runs out, in case it died.
    assert_eq!(a.digest_next_close().await.unwrap(), Some(at + SHORT.as_millis() as i64));
    let early = b.digest_claim_due("B", now_ms(), LONG, 10).await.unwrap();
    assert!(early.is_empty() || started.elapsed() >= SHORT, "B took a window A still held: {early:?}");

    // A dies without deleting the window.
    tokio::time::sleep(PAST_SHORT).await;
    let taken = b.digest_claim_due("B", now_ms(), LONG, 10).await.unwrap();
    assert_eq!(taken.len(), 1, "B takes the window over");
    assert_eq!((taken[0].id.as_str(), taken[0].count), (held[0].id.as_str(), 1));
    assert_eq!(texts(&taken[0]), vec![r#"{"x":1}"#]);
    close_all(&nodes).await;
}

/// Unread counts read the user's counters (migration 0009), never the
/// notifications: the plan of the very statement the store runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_read_counters_on_sqlite() {
    let db = TestDb::create(Db::Sqlite).await;
    let store = db.open().await; // creates and migrates the file
    let mut conn = SqliteConnection::connect(&db.url).await.expect("open the SQLite file");
    let plan = sqlx::query(&format!("EXPLAIN QUERY PLAN {}", herald_server::store::sqlite::UNREAD_SQL))
        .bind("u1")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let plan: Vec<String> = plan.iter().map(|row| row.get::<String, _>("detail")).collect();
    let plan = plan.join("\n");
    assert!(plan.contains("SEARCH unread_counts USING PRIMARY KEY (user_id=?)"), "the plan:\n{plan}");
    assert!(!plan.contains("notifications"), "the plan reads the notifications:\n{plan}");
    conn.close().await.unwrap();
    store.close().await;
}

on_both!(read_state_agrees_with_a_model =>
    read_state_agrees_with_a_model_on_sqlite,
    read_state_agrees_with_a_model_on_postgres);

const TOPICS: [&str; 3] = ["alpha", "beta", "gamma"];

/// One user's notifications as the model keeps them: seq → (topic, read,
/// created_at_ms).
type Model = BTreeMap<i64, (&'static str, bool, i64)>;

/// A small deterministic generator (xorshift), so a failure repeats.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Read marks, unread counts and unread-only pages against a model, through
/// random publishes over three topics (repeats of an idempotency key among
/// them), marks of every kind, retention and erasure. After every step each
/// mark changed exactly the seqs the model says, and every user's counts
/// and unread-only pages (whole, by topic, and between random bounds) agree
/// with the model. Two users, so one's marks never move the other's state.
async fn read_state_agrees_with_a_model(db: Db) {
    let test = TestDb::create(db).await;
    let store = test.open().await;
    let users = ["ann", "bob"];
    let mut models: HashMap<&str, Model> = users.iter().map(|u| (*u, Model::new())).collect();
    let mut last_seq: HashMap<&str, i64> = users.iter().map(|u| (*u, 0)).collect();
    let mut dice = Dice(0x9E37_79B9_7F4A_7C15);
    let mut clock = 1_000_000;
    let mut keys: Vec<(&str, String)> = Vec::new();
    // What the walk did, so that it cannot pass by doing little.
    let (mut marked_in_all, mut repeats, mut unread_deleted) = (0, 0, 0);
    for step in 0..300 {
        let user = users[dice.below(2) as usize];
        let last = last_seq[user];
        let context = format!("step {step}, {user}");
        match dice.below(10) {
            0..=3 => {
                let mut batch = Vec::new();
                for _ in 0..=dice.below(4) {
                    clock += 1;
                    let topic = TOPICS[dice.below(3) as usize];
                    let key = match dice.below(4) {
                        0 if !keys.is_empty() => Some(keys[dice.below(keys.len() as u64) as usize].clone()),
                        1 => Some((user, format!("k{step}-{}", batch.len()))),
                        _ => None,
                    }
                    .filter(|(owner, _)| *owner == user)
                    .map(|(_, key)| key);
                    batch.push((topic, key));
                }
                let stored = store
                    .append(
                        batch
                            .iter()
                            .map(|(topic, key)| NewNotification {
                                user_id: user.into(),
                                id: uuid::Uuid::now_v7().to_string(),
                                topic: (*topic).into(),
                                payload: raw("{}"),
                                created_at_ms: clock,
                                idempotency_key: key.as_deref().map(Into::into),
                            })
                            .collect(),
                    )
                    .await
                    .unwrap();
                for ((topic, key), appended) in batch.iter().zip(&stored) {
                    repeats += usize::from(!appended.created);
                    if appended.created {
                        let seq = appended.notification.seq;
                        assert_eq!(seq, last_seq[user] + 1, "{context}");
                        *last_seq.get_mut(user).unwrap() = seq;
                        models.get_mut(user).unwrap().insert(seq, (topic, false, clock));
                        if let Some(key) = key {
                            keys.push((user, key.clone()));
                        }
                    }
                }
            }
            4 | 5 => {
                let seqs: Vec<i64> = (0..=dice.below(5)).map(|_| dice.below(last as u64 + 3) as i64).collect();
                let expected = mark(&mut models, user, |seq, _| seqs.contains(&seq));
                let marked = store.mark_read(user, &ReadMark::Seqs { seqs }).await.unwrap();
                assert_eq!(marked, expected, "{context}: a mark of seqs");
                marked_in_all += marked.len();
            }
            6 | 7 => {
                let up_to_seq = dice.below(last as u64 + 3) as i64;
                let expected = mark(&mut models, user, |seq, _| seq <= up_to_seq);
                let marked = store.mark_read(user, &ReadMark::UpTo { up_to_seq }).await.unwrap();
                assert_eq!(marked, expected, "{context}: a mark up to {up_to_seq}");
                marked_in_all += marked.len();
            }
            8 => {
                let topic = TOPICS[dice.below(3) as usize];
                let up_to_seq = (dice.below(2) == 0).then(|| dice.below(last as u64 + 3) as i64);
                let expected = mark(&mut models, user, |seq, t| t == topic && up_to_seq.is_none_or(|up| seq <= up));
                let marked = store.mark_read(user, &ReadMark::Topic { topic: topic.into(), up_to_seq }).await.unwrap();
                assert_eq!(marked, expected, "{context}: a mark of {topic} up to {up_to_seq:?}");
                marked_in_all += marked.len();
            }
            _ if dice.below(2) == 0 => {
                // Retention: the oldest few of both users.
                let before = clock - 60 + dice.below(20) as i64;
                let expected: usize = models.values().map(|m| m.values().filter(|n| n.2 < before).count()).sum();
                unread_deleted +=
                    models.values().map(|m| m.values().filter(|n| n.2 < before && !n.1).count()).sum::<usize>();
                for model in models.values_mut() {
                    model.retain(|_, n| n.2 >= before);
                }
                assert_eq!(store.purge(before).await.unwrap(), expected as u64, "{context}: retention");
            }
            _ => {
                let up_to = dice.below(last as u64 + 1) as i64;
                let model = models.get_mut(user).unwrap();
                let expected = model.range(..=up_to).count();
                unread_deleted += model.range(..=up_to).filter(|(_, n)| !n.1).count();
                model.retain(|seq, _| *seq > up_to);
                assert_eq!(store.erase(user, up_to).await.unwrap(), expected as u64, "{context}: erasure");
            }
        }
        for user in users {
            let (ann, bounds) = (&models[user], (dice.below(last as u64 + 3) as i64, dice.below(4) as i64));
            agrees(&*store, user, ann, bounds, &format!("after step {step}, {user}")).await;
        }
    }
    let did = (marked_in_all, repeats, unread_deleted);
    assert!(did.0 > 50 && did.1 > 5 && did.2 > 10, "the walk did too little to mean anything: {did:?}");
    store.close().await;
}

/// Marks the model's unread notifications that `hit` picks; their seqs, ascending.
fn mark(models: &mut HashMap<&str, Model>, user: &str, hit: impl Fn(i64, &str) -> bool) -> Vec<i64> {
    let mut marked = Vec::new();
    for (seq, (topic, read, _)) in models.get_mut(user).unwrap().iter_mut() {
        if !*read && hit(*seq, topic) {
            *read = true;
            marked.push(*seq);
        }
    }
    marked
}

/// The store's unread counts and unread-only pages for `user` are the model's.
async fn agrees(store: &dyn Store, user: &str, model: &Model, (before, after): (i64, i64), context: &str) {
    let unread: Vec<(i64, &str)> = model.iter().rev().filter(|(_, n)| !n.1).map(|(seq, n)| (*seq, n.0)).collect();
    let counts = store.unread(user).await.unwrap();
    let mut by_topic = counts.by_topic.clone();
    by_topic.sort();
    let expected: Vec<(String, i64)> = TOPICS
        .iter()
        .map(|t| (t.to_string(), unread.iter().filter(|(_, topic)| topic == t).count() as i64))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!((counts.total, by_topic), (unread.len() as i64, expected), "{context}: unread counts");

    let page = |topic: Option<&str>, before_seq: Option<i64>, after_seq: Option<i64>, limit: u32| ListQuery {
        before_seq,
        after_seq,
        limit,
        unread_only: true,
        topic: topic.map(Into::into),
    };
    let seqs = |found: Vec<herald_server::store::StoredNotification>| found.iter().map(|n| n.seq).collect::<Vec<_>>();
    let all = seqs(store.list(user, &page(None, None, None, 1000)).await.unwrap());
    assert_eq!(all, unread.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), "{context}: the unread page");
    for topic in TOPICS {
        let found = seqs(store.list(user, &page(Some(topic), None, None, 1000)).await.unwrap());
        let expected: Vec<i64> = unread.iter().filter(|(_, t)| *t == topic).map(|(seq, _)| *seq).collect();
        assert_eq!(found, expected, "{context}: the unread page of {topic}");
    }
    let found = seqs(store.list(user, &page(None, Some(before), Some(after), 3)).await.unwrap());
    let expected: Vec<i64> =
        unread.iter().map(|(seq, _)| *seq).filter(|seq| *seq < before && *seq > after).take(3).collect();
    assert_eq!(found, expected, "{context}: the unread page between {after} and {before}");
}
