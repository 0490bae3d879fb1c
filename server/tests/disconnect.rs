//! Closing a user's sessions from the backend (`DELETE /v1/users/{id}/sessions`,
//! `herald disconnect`): every open session of that user closes with 4003
//! and its reason, other users' sessions carry on, and nothing stored is
//! touched. Across nodes: broker_redis.rs.

mod common;

use std::time::Duration;

use common::*;
use herald_client::Publisher;
use serde_json::json;

async fn disconnect(server: &TestServer, key: &str, user: &str) -> Raw {
    raw(reqwest::Client::new().delete(format!("{}/v1/users/{user}/sessions", server.http())).bearer_auth(key)).await
}

#[tokio::test]
async fn every_session_of_the_user_closes_with_4003_and_nothing_else_changes() {
    let server = TestServer::start().await;
    server.publish("alice", "orders", json!(1)).await;
    let mut phone = server.connect_since("alice", 1).await;
    let mut laptop = server.connect_since("alice", 1).await;
    let mut bob = server.connect("bob").await;

    let answer = disconnect(&server, API_KEY, "alice").await;
    assert_eq!(answer.status, 204, "{}", answer.body);
    for session in [&mut phone, &mut laptop] {
        assert_eq!(closed(session).await, (4003, "disconnected by the server".to_string()));
    }
    // Gone (the server waits a while for the close handshake otherwise).
    drop((phone, laptop));
    eventually("alice's sessions to be gone", || async {
        let url = format!("{}/v1/users/alice/presence", server.http());
        raw(reqwest::Client::new().get(url).bearer_auth(API_KEY)).await.body["sessions"] == 0
    })
    .await;
    eventually("two sessions counted as closed with 4003", || async {
        server.metric(r#"herald_sessions_closed_total{code="4003"}"#).await == 2.0
    })
    .await;

    // Bob's session carries on; alice's history is untouched.
    server.publish("bob", "t", json!("still here")).await;
    assert_eq!(next_notification(&mut bob).await.payload, json!("still here"));
    assert_eq!(server.publisher().history("alice", 0, 10).await.unwrap().last_seq, 1);

    // Tokens are not revoked: alice may connect again and resume.
    server.publish("alice", "orders", json!(2)).await;
    let mut again = server.connect_since("alice", 1).await;
    assert_eq!(next_notification(&mut again).await.seq, 2);

    // A user without sessions, and one never seen: 204 all the same.
    assert_eq!(disconnect(&server, API_KEY, "nobody").await.status, 204);
    assert_eq!(disconnect(&server, API_KEY, "alice").await.status, 204);
    assert_eq!(closed(&mut again).await.0, 4003);
    assert!(bob.next_frame_within(Duration::from_millis(300)).await.unwrap().is_none(), "bob stays open");
    drop((again, bob));
    server.stop().await;
}

#[tokio::test]
async fn refusals_close_nothing() {
    let server = TestServer::start_with(&[("HERALD_API_KEYS_PUBLISH", "publish-only")]).await;
    let mut alice = server.connect("alice").await;
    let refused = disconnect(&server, "publish-only", "alice").await;
    assert_eq!((refused.status, refused.error_code()), (403, "insufficient_scope"));
    assert_eq!(disconnect(&server, "nope", "alice").await.status, 401);
    assert_eq!(disconnect(&server, &server.token("alice"), "alice").await.status, 401, "a user token is no API key");
    let bad = raw(reqwest::Client::new()
        .delete(format!("{}/v1/users/{}/sessions", server.http(), "x".repeat(257)))
        .bearer_auth(API_KEY))
    .await;
    assert_eq!(bad.status / 100, 4, "{}", bad.body);
    assert!(alice.next_frame_within(Duration::from_millis(300)).await.unwrap().is_none(), "alice stays open");
    assert_eq!(server.metric(r#"herald_sessions_closed_total{code="4003"}"#).await, 0.0);
    // The Rust client's call.
    Publisher::new(server.http(), API_KEY).disconnect("alice").await.unwrap();
    assert_eq!(closed(&mut alice).await.0, 4003);
    drop(alice);
    server.stop().await;
}
