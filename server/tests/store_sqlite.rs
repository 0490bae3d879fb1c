//! The embedded SQLite store on a real file: the reader threads beside the
//! writer, and closing.

mod common;

use std::sync::Arc;

use herald_protocol::ReadMark;
use herald_server::store::{open, GroupCommits, ListQuery, NewNotification, Store, StoreError, StoreOptions, Unread};
use serde_json::value::RawValue;

fn options() -> StoreOptions {
    StoreOptions { pool_size: 4, ..StoreOptions::default() }
}

fn note(user: &str, payload: &str, key: Option<&str>) -> NewNotification {
    NewNotification {
        user_id: user.into(),
        id: uuid::Uuid::now_v7().to_string(),
        topic: "t".into(),
        payload: RawValue::from_string(payload.into()).expect("valid JSON").into(),
        created_at_ms: herald_server::store::now_ms(),
        idempotency_key: key.map(Into::into),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_gives_the_head_and_the_first_page_in_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("herald.db").display());
    let store = open(&url, &options()).await.unwrap();
    let (head, page) = store.resume("alice", Some(0), 10).await.unwrap();
    assert_eq!((head.last_seq, head.oldest_seq, page.len()), (0, 1, 0));
    for i in 0..5 {
        let mut n = note("alice", &i.to_string(), None);
        n.created_at_ms = if i < 3 { 1_000 } else { herald_server::store::now_ms() };
        store.append(vec![n]).await.unwrap();
    }
    store.append(vec![note("bob", "1", None)]).await.unwrap();
    assert_eq!(store.purge(2_000).await.unwrap(), 3);
    common::assert_resume_at_head_5_oldest_4(&*store, "alice").await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_measures_each_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("herald.db").display());
    let metrics = GroupCommits::default();
    let store = open(&url, &StoreOptions { group_commits: metrics.clone(), ..options() }).await.unwrap();
    common::assert_group_commits_measured(store.clone(), &metrics).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_purged_out_of_order_is_reported_to_a_session_that_missed_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("herald.db").display());
    let store = open(&url, &options()).await.unwrap();
    common::assert_resume_reports_a_hole_after_since(&*store, "holly").await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_every_commit_in_order_while_the_writer_runs() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/herald.db", dir.path().display());
    let store: Arc<dyn Store> = open(&url, &options()).await.unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                store.append((0..10).map(|u| note(&format!("u{u}"), &i.to_string(), None)).collect()).await.unwrap();
            }
        })
    };
    // Whatever a reader sees is a prefix: every seq up to the head, none missing.
    while !writer.is_finished() {
        for u in 0..10 {
            let user = format!("u{u}");
            let head = store.head(&user).await.unwrap();
            let seen = store.after(&user, 0, Some(head.last_seq), 1_000).await.unwrap();
            assert_eq!(seen.iter().map(|n| n.seq).collect::<Vec<_>>(), (1..=head.last_seq).collect::<Vec<_>>());
        }
    }
    writer.await.unwrap();
    let users: Vec<Arc<str>> = (0..10).map(|u| format!("u{u}").into()).collect();
    assert_eq!(store.last_seqs(&users).await.unwrap(), vec![200; 10]);
    store.append(vec![note("u1", "200", None)]).await.unwrap();
    let asked: Vec<Arc<str>> = vec!["u1".into(), "nobody".into(), "u2".into()];
    assert_eq!(store.last_seqs(&asked).await.unwrap(), [201, 0, 200], "answered in the order asked");
    let all = store.after("u3", 0, None, 1_000).await.unwrap();
    assert_eq!(
        all.iter().map(|n| n.payload.get().parse::<i64>().unwrap()).collect::<Vec<_>>(),
        (0..200).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_store_refuses_reads_as_unavailable_and_lets_go_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herald.db");
    let url = format!("sqlite://{}", path.display());
    let store = open(&url, &options()).await.unwrap();
    store.append(vec![note("alice", "1", None)]).await.unwrap();
    store.close().await;
    assert!(matches!(store.head("alice").await, Err(StoreError::Unavailable(_))));
    assert!(matches!(store.after("alice", 0, None, 10).await, Err(StoreError::Unavailable(_))));
    // Every connection is closed: the last one checkpointed the WAL away.
    assert!(!dir.path().join("herald.db-wal").exists(), "a connection still holds the database open");
    // And the committed notification is in the file, for the next open.
    let again = open(&url, &options()).await.unwrap();
    assert_eq!(again.head("alice").await.unwrap().last_seq, 1);
    again.close().await;
}

/// The `CREATE TABLE` statement SQLite keeps for `table`.
async fn table_sql(pool: &sqlx::SqlitePool, table: &str) -> String {
    let (sql,): (String,) = sqlx::query_as("SELECT sql FROM sqlite_master WHERE name = ?")
        .bind(table)
        .fetch_one(pool)
        .await
        .expect("the table exists");
    sql
}

/// A database in a temporary folder, made by only the `migrations` named,
/// as an older release left it: the folder (keep it alive), its URL, and a
/// pool on it to fill it with.
async fn migrated_up_to(migrations: &[&str]) -> (tempfile::TempDir, String, sqlx::SqlitePool) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/herald.db?mode=rwc", dir.path().display());
    let earlier = dir.path().join("earlier-migrations");
    std::fs::create_dir(&earlier).unwrap();
    for name in migrations {
        let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/sqlite").join(name);
        std::fs::copy(from, earlier.join(name)).unwrap();
    }
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::migrate::Migrator::new(earlier.as_path()).await.unwrap().run(&pool).await.unwrap();
    (dir, url, pool)
}

/// A database made before the counters were clustered (migration 0003)
/// keeps every user's counter through the upgrade, and seqs go on from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_the_upgrade_to_a_clustered_users_table() {
    let (_dir, url, pool) = migrated_up_to(&["0001_notifications.sql", "0002_jobs.sql"]).await;
    // alice's notifications were purged (her counter stays); bob has two.
    sqlx::query("INSERT INTO users (user_id, last_seq) VALUES ('alice', 7), ('bob', 2)").execute(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO notifications (user_id, seq, id, topic, payload, created_at)
         VALUES ('bob', 1, 'b1', 't', '1', 0), ('bob', 2, 'b2', 't', '2', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let store = open(&url, &options()).await.unwrap();
    let asked: Vec<Arc<str>> = vec!["alice".into(), "bob".into(), "carol".into()];
    assert_eq!(store.last_seqs(&asked).await.unwrap(), [7, 2, 0]);
    assert_eq!(store.head("alice").await.unwrap().last_seq, 7);
    let out =
        store.append(vec![note("alice", "8", None), note("bob", "3", None), note("carol", "1", None)]).await.unwrap();
    assert_eq!(out.iter().map(|a| a.notification.seq).collect::<Vec<_>>(), [8, 3, 1]);
    assert_eq!(store.after("bob", 0, None, 10).await.unwrap().iter().map(|n| n.seq).collect::<Vec<_>>(), [1, 2, 3]);
    store.close().await;

    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let sql = table_sql(&pool, "users").await;
    assert!(sql.contains("WITHOUT ROWID"), "{sql}");
    pool.close().await;
}

/// A database made before the notifications were clustered by user
/// (migration 0004) keeps every row, with its read state and idempotency
/// key, through the upgrade; seqs go on, repeats are still recognised, and
/// retention still purges by age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_survive_the_upgrade_to_a_clustered_table() {
    let (_dir, url, pool) =
        migrated_up_to(&["0001_notifications.sql", "0002_jobs.sql", "0003_users_without_rowid.sql"]).await;
    sqlx::query("INSERT INTO users (user_id, last_seq) VALUES ('alice', 3), ('bob', 1)").execute(&pool).await.unwrap();
    // Interleaved as commits would leave them: alice 1, bob 1, alice 2, alice 3.
    sqlx::query(
        "INSERT INTO notifications (user_id, seq, id, topic, payload, created_at, read, idempotency_key) VALUES
         ('alice', 1, 'a1', 'old', '{\"n\":1}', 1000, 1, NULL),
         ('bob',   1, 'b1', 't',   '[1]',        5000, 0, 'bob-key'),
         ('alice', 2, 'a2', 't',   '\"two\"',   5000, 0, 'alice-key'),
         ('alice', 3, 'a3', 'u',   '3',          5000, 0, NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let store = open(&url, &options()).await.unwrap();
    let alice = store.after("alice", 0, None, 10).await.unwrap();
    let rows: Vec<_> = alice.iter().map(|n| (n.seq, n.id.as_str(), &*n.topic, n.payload.get(), n.read)).collect();
    assert_eq!(
        rows,
        [(1, "a1", "old", r#"{"n":1}"#, true), (2, "a2", "t", r#""two""#, false), (3, "a3", "u", "3", false)]
    );
    assert_eq!(store.unread("alice").await.unwrap().total, 2);
    // A repeat of a stored idempotency key answers with the stored row.
    let repeat = store.append(vec![note("alice", "9", Some("alice-key"))]).await.unwrap();
    assert_eq!((repeat[0].notification.seq, repeat[0].notification.id.as_str()), (2, "a2"));
    let next = store.append(vec![note("alice", "4", None), note("bob", "2", Some("bob-key-2"))]).await.unwrap();
    assert_eq!(next.iter().map(|a| a.notification.seq).collect::<Vec<_>>(), [4, 2]);
    // Retention: only alice's first notification is older than 2 s.
    assert_eq!(store.purge(2000).await.unwrap(), 1);
    assert_eq!(store.after("alice", 0, None, 10).await.unwrap().iter().map(|n| n.seq).collect::<Vec<_>>(), [2, 3, 4]);
    store.close().await;

    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let sql = table_sql(&pool, "notifications").await;
    assert!(sql.contains("WITHOUT ROWID"), "{sql}");
    let (indexes,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'notifications'
           AND name IN ('notifications_idempotency', 'notifications_created_at')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(indexes, 2);
    pool.close().await;
}

/// A database made before the unread counters (migration 0009) gets them
/// counted from its rows — by user and topic, read ones left out — and
/// loses the unread index they replace; from then on publishes, read marks,
/// retention and erasure move them (the model walk in `store_jobs.rs` checks
/// every kind of change on a new database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_are_counted_on_the_upgrade_to_counters() {
    let (_dir, url, pool) = migrated_up_to(&[
        "0001_notifications.sql",
        "0002_jobs.sql",
        "0003_users_without_rowid.sql",
        "0004_notifications_clustered.sql",
        "0005_revocations.sql",
        "0006_store_epochs.sql",
        "0007_digest_entry_keys.sql",
        "0008_token_revocations.sql",
    ])
    .await;
    sqlx::query("INSERT INTO users (user_id, last_seq) VALUES ('alice', 5), ('bob', 2), ('carol', 1)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO notifications (user_id, seq, id, topic, payload, created_at, read) VALUES
         ('alice', 1, 'a1', 'orders', '1', 1000, 1),
         ('alice', 2, 'a2', 'orders', '2', 5000, 0),
         ('alice', 3, 'a3', 'chat',   '3', 5000, 0),
         ('alice', 4, 'a4', 'orders', '4', 5000, 0),
         ('alice', 5, 'a5', 'chat',   '5', 5000, 1),
         ('bob',   1, 'b1', 'chat',   '1', 1000, 0),
         ('bob',   2, 'b2', 'chat',   '2', 5000, 1),
         ('carol', 1, 'c1', 'chat',   '1', 5000, 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let store = open(&url, &options()).await.unwrap();
    let counts = |total: i64, by_topic: &[(&str, i64)]| Unread {
        total,
        by_topic: by_topic.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
    };
    assert_eq!(store.unread("alice").await.unwrap(), counts(3, &[("chat", 1), ("orders", 2)]));
    assert_eq!(store.unread("bob").await.unwrap(), counts(1, &[("chat", 1)]));
    assert_eq!(store.unread("carol").await.unwrap(), counts(0, &[]));
    // The counters move from here on: a publish, a mark, retention.
    store.append(vec![note("carol", "2", None)]).await.unwrap();
    assert_eq!(store.unread("carol").await.unwrap(), counts(1, &[("t", 1)]));
    assert_eq!(store.mark_read("alice", &ReadMark::UpTo { up_to_seq: 3 }).await.unwrap(), [2, 3]);
    assert_eq!(store.unread("alice").await.unwrap(), counts(1, &[("orders", 1)]));
    assert_eq!(store.purge(2000).await.unwrap(), 2, "alice's 1 and bob's 1");
    assert_eq!(store.unread("bob").await.unwrap(), counts(0, &[]));
    // A mark that reads a topic's last one, and an erasure, leave no counter
    // at 0 behind (an erased user's topics are not kept); retention does.
    assert_eq!(store.mark_read("alice", &ReadMark::UpTo { up_to_seq: 4 }).await.unwrap(), [4]);
    assert_eq!(store.erase("carol", 2).await.unwrap(), 2);
    store.close().await;

    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let kept: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT user_id, topic, n FROM unread_counts ORDER BY user_id, topic")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(kept, [("bob".to_string(), "chat".to_string(), 0)]);
    let (unread_index,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM sqlite_master WHERE name = 'notifications_unread'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unread_index, 0, "the index the counters replace is gone");
    pool.close().await;
}

/// Two stores on one file, as two processes sharing it: each writer must
/// build on the counters the other committed (a writer that kept its own
/// copy of them would have to notice the other's commits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_one_file_never_hand_out_a_seq_twice() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/herald.db", dir.path().display());
    let a = open(&url, &options()).await.unwrap();
    let b = open(&url, &options()).await.unwrap();
    let mut seqs = Vec::new();
    for round in 0..5 {
        for store in [&a, &b] {
            let out =
                store.append(vec![note("alice", &round.to_string(), None), note("bob", "0", None)]).await.unwrap();
            seqs.push(out[0].notification.seq);
        }
    }
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    assert_eq!(a.head("bob").await.unwrap().last_seq, 10);
    a.close().await;
    b.close().await;
}

/// During a rolling upgrade a node of the older build must still start on a
/// database the newer build migrated further.
#[tokio::test]
async fn a_database_migrated_by_a_newer_build_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/herald.db", dir.path().display());
    let store = open(&url, &options()).await.unwrap();
    store.append(vec![note("alice", "1", None)]).await.unwrap();
    store.close().await;
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(common::NEWER_MIGRATION_SQL).bind(vec![0u8; 48]).execute(&pool).await.unwrap();
    pool.close().await;
    let store = open(&url, &options()).await.expect("opens on the newer schema");
    assert_eq!(store.head("alice").await.unwrap().last_seq, 1);
    store.close().await;
}

/// "Mark everything read" over a backlog longer than one transaction's
/// chunk (1,000) marks all of it and nothing after it: every seq once, in
/// order, the counters and the unread page agree, and a notification
/// published afterwards stays unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_of_everything_over_several_chunks_marks_every_one() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/herald.db", dir.path().display());
    let store = open(&url, &options()).await.unwrap();
    let topic = |i: usize| if i.is_multiple_of(3) { "a" } else { "b" };
    let backlog: Vec<NewNotification> =
        (0..2_500).map(|i| NewNotification { topic: topic(i).into(), ..note("dana", "{}", None) }).collect();
    store.append(backlog).await.unwrap();
    // A topic mark first, so that the chunks walk past read rows too.
    let a = store.mark_read("dana", &ReadMark::Topic { topic: "a".into(), up_to_seq: Some(1_200) }).await.unwrap();
    assert_eq!(a, (1..=1_200).filter(|s| s % 3 == 1).collect::<Vec<_>>());

    let marked = store.mark_read("dana", &ReadMark::UpTo { up_to_seq: 2_490 }).await.unwrap();
    let expected: Vec<i64> = (1..=2_490).filter(|s| !a.contains(s)).collect();
    assert_eq!(marked, expected, "each unread seq up to 2,490 once, in order");
    let left = store.unread("dana").await.unwrap();
    assert_eq!(left.total, 10);
    let unread_page = ListQuery { limit: 100, unread_only: true, ..ListQuery::default() };
    let page: Vec<i64> = store.list("dana", &unread_page).await.unwrap().iter().map(|n| n.seq).collect();
    assert_eq!(page, (2_491..=2_500).rev().collect::<Vec<_>>());

    // Beyond the newest seq: everything now, and a later publish stays unread.
    assert_eq!(store.mark_read("dana", &ReadMark::UpTo { up_to_seq: i64::MAX }).await.unwrap().len(), 10);
    store.append(vec![note("dana", "{}", None)]).await.unwrap();
    assert_eq!(store.unread("dana").await.unwrap().total, 1);
    let page: Vec<i64> = store.list("dana", &unread_page).await.unwrap().iter().map(|n| n.seq).collect();
    assert_eq!(page, [2_501]);
    store.close().await;
}
