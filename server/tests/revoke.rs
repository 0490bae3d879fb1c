//! Revoking a user's tokens (`POST /v1/users/{id}/tokens/revoke`,
//! `herald revoke`): tokens issued before the revocation are refused at the
//! handshake, on `refresh` and on the `/v1/me` routes, the sessions opened
//! with them close with 4001, newer tokens work, other users are untouched,
//! a revocation never moves back and survives a restart, and refused calls
//! change nothing. Across nodes: broker_redis.rs.

mod common;

use std::time::Duration;

use common::*;
use herald_client::{ClientFrame, Connect, Error, Inbox, Publisher, RevokeTokens, ServerFrame, TokensRevoked};
use herald_server::auth::unix_now;
use serde_json::{json, Value};

async fn revoke(server: &TestServer, key: &str, user: &str, body: Value) -> Raw {
    let url = format!("{}/v1/users/{user}/tokens/revoke", server.http());
    raw(reqwest::Client::new().post(url).bearer_auth(key).json(&body)).await
}

/// The refusal a handshake with `token` gets: status and code.
async fn refused(server: &TestServer, token: &str) -> (u16, String) {
    handshake_refusal(&server.ws(), token).await.expect("the handshake was refused")
}

async fn unread_status(server: &TestServer, token: &str) -> (u16, String) {
    match Inbox::new(server.http(), token).unread().await {
        Ok(_) => (200, String::new()),
        Err(Error::Refused { status, code, .. }) => (status, code),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn revoked_tokens_are_refused_everywhere_and_their_sessions_close_with_4001() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), &[]).await;
    let old = token_issued("alice", Some(unix_now() - 100));
    server.publish("alice", "orders", json!(1)).await;
    let mut phone = Connect::new(server.ws(), &old).since(0).connect().await.unwrap();
    let mut laptop = Connect::new(server.ws(), &old).connect().await.unwrap();
    let mut bob = server.connect("bob").await;
    assert_eq!(next_notification(&mut phone).await.seq, 1);

    let before = unix_now();
    let answer = revoke(&server, API_KEY, "alice", json!({})).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let in_force = answer.body["issued_before"].as_i64().unwrap();
    assert_eq!(answer.body["user_id"], "alice");
    assert!((before + 1..=unix_now() + 1).contains(&in_force), "every token issued up to now: {in_force}");
    for session in [&mut phone, &mut laptop] {
        assert_eq!(closed(session).await, (4001, "token revoked".to_string()));
    }
    drop((phone, laptop));

    // The old token, and any without `iat`, are refused with the spec's body.
    assert_eq!(refused(&server, &old).await, (401, "token_revoked".into()));
    assert_eq!(refused(&server, &token_issued("alice", None)).await, (401, "token_revoked".into()));
    assert_eq!(unread_status(&server, &old).await, (401, "token_revoked".into()));
    assert_eq!(unread_status(&server, &token_issued("alice", Some(in_force - 1))).await.0, 401);

    // Bob is untouched; so is alice's history.
    server.publish("bob", "t", json!("still here")).await;
    assert_eq!(next_notification(&mut bob).await.payload, json!("still here"));
    assert_eq!(unread_status(&server, &token_issued("bob", None)).await.0, 200, "bob has no revocation");

    // A token issued at the revocation's second or later works, resumes,
    // and a refresh back to a revoked token ends the session.
    let fresh = token_issued("alice", Some(in_force));
    assert_eq!(unread_status(&server, &fresh).await.0, 200);
    let mut again = Connect::new(server.ws(), &fresh).since(0).connect().await.unwrap();
    assert_eq!(next_notification(&mut again).await.seq, 1);
    again.send(&ClientFrame::Refresh { token: old.clone(), reference: Some(json!(1)) }).await.unwrap();
    assert_eq!(closed(&mut again).await, (4001, "refresh refused".to_string()));
    drop(again);

    // It never moves back: an earlier time leaves the later one in force.
    let earlier = revoke(&server, API_KEY, "alice", json!({"issued_before": in_force - 1000})).await;
    assert_eq!((earlier.status, earlier.body["issued_before"].as_i64()), (200, Some(in_force)));
    assert_eq!(refused(&server, &old).await.1, "token_revoked");

    // A later one closes the sessions of tokens issued before it, not the others.
    let mut newer = Connect::new(server.ws(), token_issued("alice", Some(in_force + 10))).connect().await.unwrap();
    let mut fresh_session = Connect::new(server.ws(), &fresh).connect().await.unwrap();
    let later = RevokeTokens { issued_before: Some(in_force + 5), expires_at: None };
    let later: TokensRevoked = Publisher::new(server.http(), API_KEY).revoke_tokens("alice", &later).await.unwrap();
    assert_eq!(later, TokensRevoked { user_id: "alice".into(), issued_before: in_force + 5, expires_at: None });
    assert_eq!(closed(&mut fresh_session).await.0, 4001);
    assert!(
        newer.next_frame_within(Duration::from_millis(300)).await.unwrap().is_none(),
        "a newer token's session stays"
    );
    drop((newer, fresh_session, bob));

    // Stored: a restarted node refuses the same tokens before anyone asks again.
    server.stop().await;
    let server = TestServer::start_in(dir.path(), &[]).await;
    assert_eq!(refused(&server, &fresh).await, (401, "token_revoked".into()));
    assert_eq!(unread_status(&server, &token_issued("alice", Some(in_force + 5))).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn refused_revocations_change_nothing() {
    let server = TestServer::start_with(&[("HERALD_API_KEYS_PUBLISH", "publish-only")]).await;
    let old = token_issued("carol", Some(unix_now() - 100));
    let mut carol = Connect::new(server.ws(), &old).connect().await.unwrap();
    let url = format!("{}/v1/users/carol/tokens/revoke", server.http());
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "far ahead",
            reqwest::Client::new().post(&url).bearer_auth(API_KEY).json(&json!({"issued_before": unix_now() + 3600})),
            422,
            "invalid_issued_before",
        ),
        (
            "milliseconds",
            reqwest::Client::new().post(&url).bearer_auth(API_KEY).json(&json!({"issued_before": unix_now() * 1000})),
            422,
            "invalid_issued_before",
        ),
        (
            "negative",
            reqwest::Client::new().post(&url).bearer_auth(API_KEY).json(&json!({"issued_before": -1})),
            422,
            "invalid_issued_before",
        ),
        (
            "expired already",
            reqwest::Client::new().post(&url).bearer_auth(API_KEY).json(&json!({"expires_at": unix_now() - 1})),
            422,
            "invalid_expires_at",
        ),
        (
            "not a number",
            reqwest::Client::new().post(&url).bearer_auth(API_KEY).json(&json!({"issued_before": "now"})),
            422,
            "invalid_request",
        ),
        (
            "unknown field",
            reqwest::Client::new().post(&url).bearer_auth(API_KEY).json(&json!({"before": 1})),
            422,
            "invalid_request",
        ),
        (
            "not JSON",
            reqwest::Client::new().post(&url).bearer_auth(API_KEY).header("content-type", "application/json").body("{"),
            400,
            "bad_request",
        ),
        ("no body", reqwest::Client::new().post(&url).bearer_auth(API_KEY), 400, "bad_request"),
        (
            "publish scope",
            reqwest::Client::new().post(&url).bearer_auth("publish-only").json(&json!({})),
            403,
            "insufficient_scope",
        ),
        ("no key", reqwest::Client::new().post(&url).json(&json!({})), 401, "missing_api_key"),
        ("a user token", reqwest::Client::new().post(&url).bearer_auth(&old).json(&json!({})), 401, "invalid_api_key"),
        (
            "bad user id",
            reqwest::Client::new()
                .post(format!("{}/v1/users/{}/tokens/revoke", server.http(), "x".repeat(257)))
                .bearer_auth(API_KEY)
                .json(&json!({})),
            400,
            "invalid_user_id",
        ),
    ];
    for (what, request, status, code) in cases {
        let answer = raw(request).await;
        assert_eq!((answer.status, answer.error_code()), (status, code), "{what}: {}", answer.body);
    }
    assert!(carol.next_frame_within(Duration::from_millis(300)).await.unwrap().is_none(), "carol stays open");
    assert_eq!(unread_status(&server, &old).await.0, 200, "carol's token still works");
    assert_eq!(server.metric(r#"herald_sessions_closed_total{code="4001"}"#).await, 0.0);

    // A revocation reaching exactly the limit ahead is taken.
    let limit = unix_now() + 60;
    let answer = revoke(&server, API_KEY, "carol", json!({"issued_before": limit})).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(closed(&mut carol).await.0, 4001);
    eventually("one session counted as closed with 4001", || async {
        server.metric(r#"herald_sessions_closed_total{code="4001"}"#).await == 1.0
    })
    .await;
    drop(carol);
    server.stop().await;
}

#[tokio::test]
async fn a_refresh_to_a_newer_token_keeps_the_session_through_a_revocation() {
    let server = TestServer::start().await;
    let mut session = Connect::new(server.ws(), token_issued("dana", Some(unix_now() - 100))).connect().await.unwrap();
    let fresh = token_issued("dana", Some(unix_now() + 30));
    session.send(&ClientFrame::Refresh { token: fresh, reference: Some(json!(7)) }).await.unwrap();
    match next(&mut session).await {
        ServerFrame::Ok { reference } => assert_eq!(reference, json!(7)),
        other => panic!("expected ok, got {other:?}"),
    }
    assert_eq!(revoke(&server, API_KEY, "dana", json!({})).await.status, 200);
    server.publish("dana", "t", json!("after the revocation")).await;
    assert_eq!(next_notification(&mut session).await.payload, json!("after the revocation"));
    drop(session);
    server.stop().await;
}

/// A revocation given `expires_at` (when its last token expires) is
/// forgotten after it, in memory and in the store; one without is kept,
/// and merging keeps the later expiry.
#[tokio::test]
async fn a_revocation_with_an_expiry_is_forgotten_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("HERALD_PURGE_INTERVAL", "200ms")];
    let server = TestServer::start_in(dir.path(), &vars).await;
    let old = token_issued("erin", Some(unix_now() - 100));
    let kept = token_issued("fay", Some(unix_now() - 100));
    // Seconds apart, so a slow machine's clock passing a second between the
    // calls cannot make the earlier expiry one in the past (a 422).
    let soon = unix_now() + 5;
    let answer = revoke(&server, API_KEY, "erin", json!({ "expires_at": soon })).await;
    assert_eq!((answer.status, answer.body["expires_at"].as_i64()), (200, Some(soon)), "{}", answer.body);
    // An earlier expiry does not shorten it.
    let again = revoke(&server, API_KEY, "erin", json!({ "expires_at": soon - 3 })).await;
    assert_eq!(again.body["expires_at"].as_i64(), Some(soon), "{}", again.body);
    let forever = revoke(&server, API_KEY, "fay", json!({})).await;
    assert_eq!(forever.body.get("expires_at"), None, "kept for good: {}", forever.body);
    assert_eq!(refused(&server, &old).await.1, "token_revoked");
    assert_eq!(server.metric("herald_revoked_users").await, 2.0);

    // (The caller said every token it covers would have expired by then; this
    // one lives on, which shows the revocation is gone.)
    eventually("erin's revocation forgotten", || async { server.metric("herald_revoked_users").await == 1.0 }).await;
    assert_eq!(unread_status(&server, &old).await.0, 200);
    assert_eq!(refused(&server, &kept).await.1, "token_revoked", "fay's is kept");
    server.stop().await;
    let server = TestServer::start_in(dir.path(), &vars).await;
    assert_eq!(server.metric("herald_revoked_users").await, 1.0, "deleted from the store too");
    assert_eq!(unread_status(&server, &old).await.0, 200);
    server.stop().await;
}
