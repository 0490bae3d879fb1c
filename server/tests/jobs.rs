//! The worker pool's features against a real node, on SQLite and on
//! PostgreSQL: large-audience publishes (202 jobs) and digests, including
//! work interrupted by a restart.

mod common;
mod services;

use std::path::Path;
use std::time::Duration;

use common::*;
use herald_client::{Digest, PublishRequest, ServerFrame, Submitted};
use reqwest::StatusCode;
use serde_json::json;

/// Where a test's nodes keep their data.
enum Db {
    Sqlite,
    Postgres(services::TestDatabase),
}

impl Db {
    fn postgres() -> Db {
        Db::Postgres(services::TestDatabase::create())
    }

    fn vars(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if let Db::Postgres(db) = self {
            vars.push(("HERALD_DATABASE_URL".into(), db.url()));
        }
        vars
    }

    async fn start(&self, dir: &Path, extra: &[(&str, &str)]) -> TestServer {
        let vars = self.vars(extra);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        TestServer::start_in(dir, &vars).await
    }

    /// (notifications with `topic`, distinct users among them), read straight from the database.
    async fn count(&self, dir: &Path, topic: &str) -> (i64, i64) {
        let sql = format!("SELECT COUNT(*), COUNT(DISTINCT user_id) FROM notifications WHERE topic = '{topic}'");
        match self {
            Db::Sqlite => {
                let url = format!("sqlite://{}/herald.db", dir.display());
                let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
                let counts = sqlx::query_as(&sql).fetch_one(&pool).await.unwrap();
                pool.close().await;
                counts
            }
            Db::Postgres(db) => {
                let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();
                let counts = sqlx::query_as(&sql).fetch_one(&pool).await.unwrap();
                pool.close().await;
                counts
            }
        }
    }
}

fn audience(n: usize, tag: &str) -> Vec<String> {
    (0..n).map(|i| format!("{tag}-{i}")).collect()
}

fn request(users: Vec<String>, topic: &str, key: Option<&str>) -> PublishRequest {
    PublishRequest {
        user_id: None,
        user_ids: Some(users),
        topic: topic.into(),
        payload: json!({"hello": "everyone"}),
        idempotency_key: key.map(str::to_string),
        digest: None,
    }
}

async fn submit_job(server: &TestServer, request: &PublishRequest) -> String {
    match server.publisher().submit(request).await.unwrap() {
        (StatusCode::ACCEPTED, Submitted::Job(job)) => job.job_id,
        other => panic!("expected 202 with a job id, got {other:?}"),
    }
}

async fn wait_done(server: &TestServer, job_id: &str) {
    let publisher = server.publisher();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = publisher.job(job_id).await.unwrap();
        match status.state.as_str() {
            "done" => {
                assert_eq!(status.progress.done, status.progress.total);
                return;
            }
            "failed" => panic!("job failed: {status:?}"),
            _ => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "job not done in time: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_large_audience_is_a_job_that_reaches_connected_users_in_order(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let server = db.start(dir.path(), &[("HERALD_MAX_USER_IDS", "100")]).await;
    let mut alice = server.connect("alice").await;
    assert_eq!(server.publish("alice", "before", json!({})).await.seq, 1);
    let mut users = audience(1500, "fan");
    users.insert(700, "alice".into());
    let job_id = submit_job(&server, &request(users.clone(), "fanout", Some("launch"))).await;
    // The same key again: the same job, nothing queued twice.
    assert_eq!(submit_job(&server, &request(users, "fanout", Some("launch"))).await, job_id);
    server.publish("alice", "during", json!({})).await;
    wait_done(&server, &job_id).await;
    server.publish("alice", "after", json!({})).await;

    let got = notifications(&mut alice, 4).await;
    assert_eq!(got.iter().map(|n| n.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(got.iter().filter(|n| n.topic == "fanout").count(), 1);
    assert_eq!(got[3].topic, "after");
    assert_eq!(db.count(dir.path(), "fanout").await, (1501, 1501), "each user exactly once");
    let status = server.publisher().job(&job_id).await.unwrap();
    assert_eq!((status.progress.done, status.progress.total), (1501, 1501));
    // Unread counts include what the job stored.
    assert_eq!(server.inbox("alice").unread().await.unwrap().total, 4);
    assert_eq!(server.inbox("fan-3").unread().await.unwrap().total, 1);
    // The pool and the jobs are measured; the lag probe has been sampling.
    assert_eq!(server.metric("herald_jobs_done_total").await, 1.0);
    assert_eq!(server.metric("herald_job_seconds_count").await, 1.0);
    assert_eq!(server.metric("herald_jobs_running").await, 0.0);
    assert_eq!(server.metric("herald_worker_queue_depth").await, 0.0);
    // It samples every 100 ms; on a fast machine all of the above can take less.
    eventually("the lag probe has sampled", || async { server.metric("herald_runtime_lag_seconds_count").await > 0.0 })
        .await;
    server.stop().await;
}

#[tokio::test]
async fn a_large_audience_is_a_job_that_reaches_connected_users_in_order_on_sqlite() {
    a_large_audience_is_a_job_that_reaches_connected_users_in_order(Db::Sqlite).await;
}

#[tokio::test]
async fn a_large_audience_is_a_job_that_reaches_connected_users_in_order_on_postgres() {
    a_large_audience_is_a_job_that_reaches_connected_users_in_order(Db::postgres()).await;
}

async fn a_job_interrupted_by_a_restart_finishes_each_user_once(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("HERALD_MAX_USER_IDS", "10"), ("HERALD_WORKERS", "1")];
    let server = db.start(dir.path(), &vars).await;
    let users = audience(30_000, "big");
    let job_id = submit_job(&server, &request(users, "restart", None)).await;
    eventually("the job has made progress", || async {
        server.publisher().job(&job_id).await.unwrap().progress.done > 0
    })
    .await;
    server.stop().await;
    let status_between = db.count(dir.path(), "restart").await;
    assert!(status_between.0 < 30_000, "the job finished before the restart; make it bigger");

    let server = db.start(dir.path(), &vars).await;
    wait_done(&server, &job_id).await;
    assert_eq!(db.count(dir.path(), "restart").await, (30_000, 30_000), "each user exactly once");
    let status = server.publisher().job(&job_id).await.unwrap();
    assert!(status.attempts >= 2, "the job was resumed, not restarted from nothing: {status:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_job_interrupted_by_a_restart_finishes_each_user_once_on_sqlite() {
    a_job_interrupted_by_a_restart_finishes_each_user_once(Db::Sqlite).await;
}

#[tokio::test]
async fn a_job_interrupted_by_a_restart_finishes_each_user_once_on_postgres() {
    a_job_interrupted_by_a_restart_finishes_each_user_once(Db::postgres()).await;
}

fn digest_request(user: &str, key: &str, window_secs: u64, n: i64) -> PublishRequest {
    PublishRequest {
        user_id: Some(user.into()),
        user_ids: None,
        topic: "likes".into(),
        payload: json!({"like": n}),
        idempotency_key: None,
        digest: Some(Digest { key: key.into(), window_secs }),
    }
}

async fn digest(server: &TestServer, user: &str, key: &str, window_secs: u64, n: i64) -> i64 {
    match server.publisher().submit(&digest_request(user, key, window_secs, n)).await.unwrap() {
        (StatusCode::ACCEPTED, Submitted::Digest(d)) => d.digests[0].count,
        other => panic!("expected 202 with digests, got {other:?}"),
    }
}

async fn digests_become_one_notification_when_the_window_closes(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let server = db.start(dir.path(), &[]).await;
    let mut bob = server.connect("bob").await;
    for n in 1..=12 {
        assert_eq!(digest(&server, "bob", "post:9", 2, n).await, n);
    }
    digest(&server, "bob", "post:10", 2, 100).await;
    digest(&server, "carol", "post:9", 2, 200).await;
    let got = notifications(&mut bob, 2).await;
    let by_key =
        |key: &str| got.iter().find(|n| n.payload["digest"]["key"] == key).unwrap_or_else(|| panic!("no {key}"));
    let first = &by_key("post:9").payload["digest"];
    assert_eq!(first["count"], 12);
    let items: Vec<i64> = first["items"].as_array().unwrap().iter().map(|i| i["like"].as_i64().unwrap()).collect();
    assert_eq!(items, (1..=10).collect::<Vec<_>>());
    assert!(first["first_at"].as_str().unwrap() <= first["last_at"].as_str().unwrap());
    assert_eq!(by_key("post:9").topic, "likes");
    assert_eq!(by_key("post:10").payload["digest"]["count"], 1);
    // Nothing more for bob; a later publish opens a new window.
    let extra = bob.next_frame_within(Duration::from_millis(300)).await;
    assert!(!matches!(extra, Ok(Some(ServerFrame::Notification(_)))), "{extra:?}");
    assert_eq!(digest(&server, "bob", "post:9", 1, 13).await, 1);
    assert_eq!(next_notification(&mut bob).await.payload["digest"]["count"], 1);
    server.stop().await;
}

#[tokio::test]
async fn digests_become_one_notification_when_the_window_closes_on_sqlite() {
    digests_become_one_notification_when_the_window_closes(Db::Sqlite).await;
}

#[tokio::test]
async fn digests_become_one_notification_when_the_window_closes_on_postgres() {
    digests_become_one_notification_when_the_window_closes(Db::postgres()).await;
}

/// A retried digest publish (a lost answer, a timeout) carries its
/// `idempotency_key` again: the entry is in the window once, and the retry
/// gets the first answer with 200.
async fn a_retried_digest_entry_is_counted_once(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let server = db.start(dir.path(), &[]).await;
    let mut bob = server.connect("bob").await;
    let keyed = |users: &[&str], n: i64, key: &str| PublishRequest {
        user_id: None,
        user_ids: Some(users.iter().map(|u| u.to_string()).collect()),
        idempotency_key: Some(key.into()),
        ..digest_request("-", "post:9", 2, n)
    };
    let publisher = server.publisher();
    let submit = |request: PublishRequest| {
        let publisher = publisher.clone();
        async move {
            match publisher.submit(&request).await.unwrap() {
                (status, Submitted::Digest(d)) => (status, d.digests),
                other => panic!("expected digests, got {other:?}"),
            }
        }
    };

    let (status, first) = submit(keyed(&["bob"], 1, "like-1")).await;
    assert_eq!((status, first[0].count), (StatusCode::ACCEPTED, 1));
    let (status, again) = submit(keyed(&["bob"], 1, "like-1")).await;
    assert_eq!(status, StatusCode::OK, "a repeat of every entry is 200");
    assert_eq!(again, first, "the repeat answers what the first publish did");
    let (status, second) = submit(keyed(&["bob"], 2, "like-2")).await;
    assert_eq!((status, second[0].count), (StatusCode::ACCEPTED, 2));
    // One repeated entry beside a new one: 202, each user's own answer.
    let (status, mixed) = submit(keyed(&["carol", "bob"], 1, "like-1")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!((mixed[0].user_id.as_str(), mixed[0].count), ("carol", 1));
    assert_eq!(mixed[1], first[0]);

    let digest = next_notification(&mut bob).await.payload["digest"].clone();
    assert_eq!(digest["count"], 2, "{digest}");
    assert_eq!(digest["items"], json!([{"like": 1}, {"like": 2}]));
    let extra = bob.next_frame_within(Duration::from_millis(300)).await;
    assert!(!matches!(extra, Ok(Some(ServerFrame::Notification(_)))), "{extra:?}");
    // After the window closed the key still answers, and opens nothing.
    let (status, late) = submit(keyed(&["bob"], 1, "like-1")).await;
    assert_eq!((status, late), (StatusCode::OK, first));
    server.stop().await;
}

#[tokio::test]
async fn a_retried_digest_entry_is_counted_once_on_sqlite() {
    a_retried_digest_entry_is_counted_once(Db::Sqlite).await;
}

#[tokio::test]
async fn a_retried_digest_entry_is_counted_once_on_postgres() {
    a_retried_digest_entry_is_counted_once(Db::postgres()).await;
}

/// Retention forgets a digest entry's key once the digest it went into is
/// as old as `HERALD_RETENTION`: the same key then names a new entry.
#[tokio::test]
async fn retention_forgets_a_digest_entry_key_with_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    // The window closes after 1 s and its key goes 3 s later: time enough
    // for the delivery and the repeat below on a busy box.
    let vars = [("HERALD_RETENTION", "3s"), ("HERALD_PURGE_INTERVAL", "200ms")];
    let server = Db::Sqlite.start(dir.path(), &vars).await;
    let mut erin = server.connect("erin").await;
    let request = PublishRequest { idempotency_key: Some("like-1".into()), ..digest_request("erin", "post:1", 1, 1) };
    let publisher = server.publisher();
    let submit = || async { publisher.submit(&request).await.unwrap().0 };

    assert_eq!(submit().await, StatusCode::ACCEPTED);
    assert_eq!(next_notification(&mut erin).await.payload["digest"]["count"], 1);
    assert_eq!(submit().await, StatusCode::OK, "the key went before its digest");
    eventually("the key is purged and names a new entry", || async { submit().await == StatusCode::ACCEPTED }).await;
    assert_eq!(next_notification(&mut erin).await.payload["digest"]["count"], 1);
    server.stop().await;
}

async fn a_digest_window_open_across_a_restart_still_closes_once(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let server = db.start(dir.path(), &[]).await;
    for n in 1..=3 {
        digest(&server, "dave", "k", 3, n).await;
    }
    server.stop().await;
    let server = db.start(dir.path(), &[]).await;
    digest(&server, "dave", "k", 3, 4).await;
    let mut dave = server.connect_since("dave", 0).await;
    let n = next_notification(&mut dave).await;
    assert_eq!(n.payload["digest"]["count"], 4);
    let extra = dave.next_frame_within(Duration::from_millis(500)).await;
    assert!(!matches!(extra, Ok(Some(ServerFrame::Notification(_)))), "{extra:?}");
    assert_eq!(db.count(dir.path(), "likes").await, (1, 1));
    server.stop().await;
}

#[tokio::test]
async fn a_digest_window_open_across_a_restart_still_closes_once_on_sqlite() {
    a_digest_window_open_across_a_restart_still_closes_once(Db::Sqlite).await;
}

#[tokio::test]
async fn a_digest_window_open_across_a_restart_still_closes_once_on_postgres() {
    a_digest_window_open_across_a_restart_still_closes_once(Db::postgres()).await;
}

#[tokio::test]
async fn job_refusals_have_the_spec_body() {
    let server = TestServer::start_with(&[("HERALD_MAX_USER_IDS", "2"), ("HERALD_MAX_AUDIENCE", "5")]).await;
    let http = reqwest::Client::new();
    for id in ["nope", "%FF", "%00", &"x".repeat(65)] {
        let answer = raw(http.get(format!("{}/v1/jobs/{id}", server.http())).bearer_auth(API_KEY)).await;
        assert_eq!((answer.status, answer.error_code()), (404, "job_not_found"), "{id:.10}");
    }
    let answer = raw(http.get(format!("{}/v1/jobs/nope", server.http()))).await;
    assert_eq!((answer.status, answer.error_code()), (401, "missing_api_key"));
    let answer = raw(http.post(format!("{}/v1/notifications", server.http())).bearer_auth(API_KEY).json(&request(
        audience(6, "x"),
        "t",
        None,
    )))
    .await;
    assert_eq!((answer.status, answer.error_code()), (422, "too_many_users"));
    let mut digest_many = request(audience(3, "x"), "t", None);
    digest_many.digest = Some(Digest { key: "k".into(), window_secs: 5 });
    let answer =
        raw(http.post(format!("{}/v1/notifications", server.http())).bearer_auth(API_KEY).json(&digest_many)).await;
    assert_eq!((answer.status, answer.error_code()), (422, "too_many_users"));
    server.stop().await;
}
