//! Erasing a user's notifications (`DELETE /v1/users/{id}/notifications`),
//! on SQLite and on a real PostgreSQL: what goes (notifications, read state,
//! idempotency keys, digest windows still collecting), what stays (the seq
//! counter: seqs are never reused), what sessions see (a `read` frame, then
//! `truncated` on resuming), and that bad requests change nothing.

mod common;
mod services;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use herald_client::ServerFrame;
use herald_protocol::http::Erased;
use herald_protocol::ReadMark;
use serde_json::json;

/// A node on SQLite in a temp dir, or on a fresh PostgreSQL database.
struct Node {
    server: TestServer,
    _db: Option<services::TestDatabase>,
}

async fn sqlite() -> Node {
    Node { server: TestServer::start().await, _db: None }
}

async fn postgres() -> Node {
    let db = tokio::task::spawn_blocking(services::TestDatabase::create).await.unwrap();
    let server = TestServer::start_with(&[("HERALD_DATABASE_URL", &db.url())]).await;
    Node { server, _db: Some(db) }
}

fn url(server: &TestServer, user: &str) -> String {
    format!("{}/v1/users/{user}/notifications", server.http())
}

/// `POST /v1/notifications` with `body`, as a backend does.
async fn post_notifications(server: &TestServer, body: &serde_json::Value) -> Raw {
    raw(reqwest::Client::new().post(format!("{}/v1/notifications", server.http())).bearer_auth(API_KEY).json(body))
        .await
}

async fn publish_keyed(server: &TestServer, user: &str, key: &str) -> (u16, serde_json::Value) {
    let body = json!({ "user_id": user, "topic": "orders", "payload": { "key": key }, "idempotency_key": key });
    let answer = post_notifications(server, &body).await;
    (answer.status, answer.body)
}

async fn history_seqs(server: &TestServer, user: &str) -> (Vec<i64>, i64) {
    let page = server.publisher().history(user, 0, 500).await.unwrap();
    (page.notifications.iter().map(|n| n.seq).collect(), page.last_seq)
}

async fn everything_goes_and_the_counter_stays(node: Node) {
    let server = &node.server;
    for i in 1..=4 {
        server.publish("alice", "orders", json!({ "i": i })).await;
    }
    assert_eq!(publish_keyed(server, "alice", "order-5").await.0, 201);
    server.publish("bob", "orders", json!({ "i": 1 })).await;
    let alice = server.inbox("alice");
    alice.mark_read(&ReadMark::Seqs { seqs: vec![2] }).await.unwrap();
    // A digest window still collecting for alice (it would close in an hour).
    let digest = json!({ "user_id": "alice", "topic": "likes", "payload": { "by": "carol" },
                         "digest": { "key": "post:9:likes", "window_secs": 3600 } });
    let accepted = post_notifications(server, &digest).await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let mut open = server.connect_since("alice", 5).await;

    let erased = server.publisher().erase("alice", None).await.unwrap();
    assert_eq!(
        erased,
        Erased { user_id: "alice".into(), deleted: 5, digests: 1, oldest_seq: 6, last_seq: 5 },
        "the answer"
    );

    // The open session hears it as everything up to 5 read.
    match next(&mut open).await {
        ServerFrame::Read(mark) => assert_eq!(mark, ReadMark::UpTo { up_to_seq: 5 }),
        other => panic!("expected a read frame, got {other:?}"),
    }
    assert_eq!(history_seqs(server, "alice").await, (vec![], 5));
    assert!(alice.list(&[]).await.unwrap().notifications.is_empty());
    assert_eq!(alice.unread().await.unwrap().total, 0);

    // Resuming from before: truncated, nothing replayed.
    let mut resumed = server.connect_since("alice", 0).await;
    let welcome = resumed.welcome().clone();
    assert!(welcome.truncated && welcome.oldest_seq == Some(6) && welcome.last_seq == 5, "{welcome:?}");

    // Seqs go on from the counter; the idempotency key is free again.
    let (status, body) = publish_keyed(server, "alice", "order-5").await;
    assert_eq!((status, body["notifications"][0]["seq"].as_i64()), (201, Some(6)), "{body}");
    assert_eq!(next_notification(&mut open).await.seq, 6);
    assert_eq!(next_notification(&mut resumed).await.seq, 6);

    // Bob is untouched; erasing again, or a user with nothing, deletes nothing.
    assert_eq!(history_seqs(server, "bob").await, (vec![1], 1));
    let again = server.publisher().erase("nobody", None).await.unwrap();
    assert_eq!((again.deleted, again.digests, again.oldest_seq, again.last_seq), (0, 0, 1, 0));
    assert_eq!(server.metric("herald_notifications_erased_total").await, 5.0);
}

#[tokio::test]
async fn sqlite_erasure_deletes_everything_and_keeps_the_counter() {
    everything_goes_and_the_counter_stays(sqlite().await).await;
}

#[tokio::test]
async fn postgres_erasure_deletes_everything_and_keeps_the_counter() {
    everything_goes_and_the_counter_stays(postgres().await).await;
}

/// The digest window is gone with the erasure: when its time comes, no
/// digest of what was erased is stored.
#[tokio::test]
async fn an_erased_digest_window_never_closes_into_a_notification() {
    let node = sqlite().await;
    let server = &node.server;
    let digest = json!({ "user_id": "dora", "topic": "likes", "payload": { "by": "carol" },
                         "digest": { "key": "k", "window_secs": 2 } });
    assert_eq!(post_notifications(server, &digest).await.status, 202);
    assert_eq!(server.publisher().erase("dora", None).await.unwrap().digests, 1);
    // A second user's window of the same length closes as usual: proof
    // that the closer ran.
    let other = json!({ "user_id": "eve", "topic": "likes", "payload": { "by": "carol" },
                        "digest": { "key": "k", "window_secs": 2 } });
    let posted = post_notifications(server, &other).await;
    assert_eq!(posted.status, 202);
    eventually("eve's digest closes", || async { history_seqs(server, "eve").await.1 == 1 }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(history_seqs(server, "dora").await, (vec![], 0));
}

/// `up_to_seq`: the oldest go, the rest is a contiguous tail.
async fn a_prefix_goes(node: Node) {
    let server = &node.server;
    // More than one chunk of the store's deletes (1,000 rows a statement).
    let publisher = server.publisher();
    let publishes = (0..2_500).map(|i| {
        let publisher = publisher.clone();
        async move { publisher.publish_one("frank", "bulk", json!({ "i": i })).await.unwrap() }
    });
    futures_util::stream::iter(publishes).buffer_unordered(16).collect::<Vec<_>>().await;
    let erased = publisher.erase("frank", Some(2_300)).await.unwrap();
    assert_eq!((erased.deleted, erased.oldest_seq, erased.last_seq), (2_300, 2_301, 2_500));
    let page = publisher.history("frank", 0, 500).await.unwrap();
    let seqs: Vec<i64> = page.notifications.iter().map(|n| n.seq).collect();
    assert_eq!(seqs, (2_301..=2_500).collect::<Vec<_>>());
    let mut session = server.connect_since("frank", 2_000).await;
    assert_eq!(session.welcome().oldest_seq, Some(2_301));
    assert_eq!(next_notification(&mut session).await.seq, 2_301);

    // A bound beyond the newest seq erases what there is, no more.
    let rest = publisher.erase("frank", Some(1_000_000)).await.unwrap();
    assert_eq!((rest.deleted, rest.oldest_seq, rest.last_seq, rest.digests), (200, 2_501, 2_500, 0));
}

#[tokio::test]
async fn sqlite_erasure_up_to_a_seq_keeps_the_tail() {
    a_prefix_goes(sqlite().await).await;
}

#[tokio::test]
async fn postgres_erasure_up_to_a_seq_keeps_the_tail() {
    a_prefix_goes(postgres().await).await;
}

#[tokio::test]
async fn a_refused_erasure_changes_nothing() {
    let node = sqlite().await;
    let server = &node.server;
    server.publish("gina", "orders", json!({})).await;
    let client = reqwest::Client::new();
    let refused = [
        (raw(client.delete(url(server, "gina"))).await, 401, "missing_api_key"),
        (raw(client.delete(url(server, "gina")).bearer_auth("wrong")).await, 401, "invalid_api_key"),
        // The user's own token is not an API key: users cannot erase.
        (raw(client.delete(url(server, "gina")).bearer_auth(server.token("gina"))).await, 401, "invalid_api_key"),
        (
            raw(client.delete(format!("{}?up_to_seq=-1", url(server, "gina"))).bearer_auth(API_KEY)).await,
            400,
            "invalid_query",
        ),
        (
            raw(client.delete(format!("{}?up_to_seq=x", url(server, "gina"))).bearer_auth(API_KEY)).await,
            400,
            "invalid_query",
        ),
        (
            raw(client.delete(format!("{}?everything=1", url(server, "gina"))).bearer_auth(API_KEY)).await,
            400,
            "invalid_query",
        ),
    ];
    for (answer, status, code) in refused {
        assert_eq!((answer.status, answer.error_code()), (status, code), "{}", answer.body);
    }
    let too_long = "x".repeat(257);
    let answer = raw(client.delete(url(server, &too_long)).bearer_auth(API_KEY)).await;
    assert_eq!((answer.status, answer.error_code()), (400, "invalid_user_id"));
    assert_eq!(history_seqs(server, "gina").await, (vec![1], 1));
}
