//! Revoking a user's tokens (`POST /v1/users/{id}/tokens/revoke`,
//! `herald revoke`): tokens issued before the revocation are refused at the
//! handshake, on `refresh` and on the `/v1/me` routes, the sessions opened
//! with them close with 4001, newer tokens work, other users are untouched,
//! a revocation never moves back and survives a restart, and refused calls
//! change nothing. One token revoked alone by its `jti`
//! (`POST /v1/users/{id}/tokens/{jti}/revoke`): the same, for that token
//! only. Across nodes: broker_redis.rs.

mod common;

use std::time::Duration;

use common::*;
use herald_client::{
    ClientFrame, Connect, Error, Inbox, Publisher, RevokeToken, RevokeTokens, ServerFrame, TokenRevoked, TokensRevoked,
};
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

async fn revoke_one(server: &TestServer, key: &str, user: &str, jti: &str, body: Value) -> Raw {
    let url = format!("{}/v1/users/{user}/tokens/{jti}/revoke", server.http());
    raw(reqwest::Client::new().post(url).bearer_auth(key).json(&body)).await
}

/// `POST /v1/users/{id}/tokens/{jti}/revoke`: the one token is refused
/// everywhere and its sessions close with 4001; the user's other tokens,
/// tokens without a `jti` and another user's token with the same `jti` all
/// carry on. It is stored (a restart keeps it), merges to the later expiry,
/// and a session that refreshed away from the token is not closed.
#[tokio::test]
async fn one_revoked_token_is_refused_and_its_sessions_close_while_the_users_other_tokens_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), &[]).await;
    let phone = token_with_jti("ivy", json!("phone-1"));
    let laptop = token_with_jti("ivy", json!("laptop/2"));
    let no_jti = token_issued("ivy", Some(unix_now() - 100));
    let numeric = token_with_jti("ivy", json!(7));
    server.publish("ivy", "t", json!(1)).await;
    let mut on_phone = Connect::new(server.ws(), &phone).since(0).connect().await.unwrap();
    let mut phone_again = Connect::new(server.ws(), &phone).connect().await.unwrap();
    let mut on_laptop = Connect::new(server.ws(), &laptop).connect().await.unwrap();
    let mut without = Connect::new(server.ws(), &no_jti).connect().await.unwrap();
    let mut with_number = Connect::new(server.ws(), &numeric).connect().await.unwrap();
    let mut other_user = Connect::new(server.ws(), token_with_jti("jack", json!("phone-1"))).connect().await.unwrap();
    // A session opened on the phone's token that moved to a new one.
    let mut moved = Connect::new(server.ws(), &phone).connect().await.unwrap();
    moved
        .send(&ClientFrame::Refresh { token: token_with_jti("ivy", json!("phone-3")), reference: None })
        .await
        .unwrap();
    assert!(matches!(next(&mut moved).await, ServerFrame::Ok { .. }));
    assert_eq!(next_notification(&mut on_phone).await.seq, 1);

    let publisher = Publisher::new(server.http(), API_KEY);
    let answer = publisher.revoke_token("ivy", "phone-1", &RevokeToken::default()).await.unwrap();
    assert_eq!(answer, TokenRevoked { user_id: "ivy".into(), jti: "phone-1".into(), expires_at: None });
    for session in [&mut on_phone, &mut phone_again] {
        assert_eq!(closed(session).await, (4001, "token revoked".to_string()));
    }
    for (what, session) in [
        ("the laptop", &mut on_laptop),
        ("a token without jti", &mut without),
        ("a token with a numeric jti", &mut with_number),
        ("another user's token with the same jti", &mut other_user),
        ("a session refreshed to another token", &mut moved),
    ] {
        assert!(session.next_frame_within(Duration::from_millis(300)).await.unwrap().is_none(), "{what} stays");
    }
    assert_eq!(refused(&server, &phone).await, (401, "token_revoked".into()));
    assert_eq!(unread_status(&server, &phone).await, (401, "token_revoked".into()));
    assert_eq!(unread_status(&server, &laptop).await.0, 200);
    assert_eq!(server.metric("herald_revoked_tokens").await, 1.0);
    assert_eq!(server.metric("herald_revoked_users").await, 0.0, "no user-wide revocation");
    server.publish("ivy", "t", json!(2)).await;
    assert_eq!(next_notification(&mut on_laptop).await.seq, 2, "the other device gets live traffic");

    // A refresh onto the revoked token ends the session.
    on_laptop.send(&ClientFrame::Refresh { token: phone.clone(), reference: None }).await.unwrap();
    assert_eq!(closed(&mut on_laptop).await, (4001, "refresh refused".to_string()));

    // A jti with a `/` is named percent-encoded; it closes that session only.
    let answer = revoke_one(&server, API_KEY, "ivy", "laptop%2F2", json!({ "expires_at": unix_now() + 600 })).await;
    assert_eq!((answer.status, answer.body["jti"].as_str()), (200, Some("laptop/2")), "{}", answer.body);
    assert_eq!(refused(&server, &laptop).await, (401, "token_revoked".into()));
    // Merged: kept for good wins over an expiry, and an earlier expiry does
    // not shorten a later one.
    let again = revoke_one(&server, API_KEY, "ivy", "phone-1", json!({ "expires_at": unix_now() + 600 })).await;
    assert_eq!((again.status, again.body.get("expires_at")), (200, None), "{}", again.body);
    let shorter = revoke_one(&server, API_KEY, "ivy", "laptop%2F2", json!({ "expires_at": unix_now() + 60 })).await;
    assert!(shorter.body["expires_at"].as_i64().unwrap() > unix_now() + 300, "{}", shorter.body);
    assert_eq!(server.metric("herald_revoked_tokens").await, 2.0);
    drop((on_phone, phone_again, on_laptop, without, with_number, other_user, moved));

    // Stored: a restarted node refuses them before anyone asks again.
    server.stop().await;
    let server = TestServer::start_in(dir.path(), &[]).await;
    assert_eq!(refused(&server, &phone).await, (401, "token_revoked".into()));
    assert_eq!(refused(&server, &laptop).await, (401, "token_revoked".into()));
    assert_eq!(unread_status(&server, &no_jti).await.0, 200);
    assert_eq!(server.metric("herald_revoked_tokens").await, 2.0);
    server.stop().await;
}

/// Every refused single-token revocation has the spec's error body and
/// revokes nothing: not the named token, and above all not the user's
/// other tokens (a body meant for the user-wide revocation is refused, not
/// read as one).
#[tokio::test]
async fn refused_single_token_revocations_change_nothing() {
    let server = TestServer::start_with(&[("HERALD_API_KEYS_PUBLISH", "publish-only")]).await;
    let token = token_with_jti("kim", json!("tablet"));
    let mut kim = Connect::new(server.ws(), &token).connect().await.unwrap();
    let url = format!("{}/v1/users/kim/tokens/tablet/revoke", server.http());
    let post = |url: &str| reqwest::Client::new().post(url.to_string());
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "expired already",
            post(&url).bearer_auth(API_KEY).json(&json!({"expires_at": unix_now() - 1})),
            422,
            "invalid_expires_at",
        ),
        (
            "expires_at not a number",
            post(&url).bearer_auth(API_KEY).json(&json!({"expires_at": "soon"})),
            422,
            "invalid_request",
        ),
        (
            "a user-wide field",
            post(&url).bearer_auth(API_KEY).json(&json!({"issued_before": unix_now()})),
            422,
            "invalid_request",
        ),
        ("no body", post(&url).bearer_auth(API_KEY), 400, "bad_request"),
        ("publish scope", post(&url).bearer_auth("publish-only").json(&json!({})), 403, "insufficient_scope"),
        ("no key", post(&url).json(&json!({})), 401, "missing_api_key"),
        ("a user token", post(&url).bearer_auth(&token).json(&json!({})), 401, "invalid_api_key"),
        (
            "a jti too long",
            post(&format!("{}/v1/users/kim/tokens/{}/revoke", server.http(), "j".repeat(257)))
                .bearer_auth(API_KEY)
                .json(&json!({})),
            400,
            "invalid_jti",
        ),
        (
            "a control character in the jti",
            post(&format!("{}/v1/users/kim/tokens/tab%0Alet/revoke", server.http()))
                .bearer_auth(API_KEY)
                .json(&json!({})),
            400,
            "invalid_jti",
        ),
        (
            "a jti not UTF-8 once decoded",
            post(&format!("{}/v1/users/kim/tokens/%FF/revoke", server.http())).bearer_auth(API_KEY).json(&json!({})),
            400,
            "invalid_path",
        ),
        (
            "a bad user id",
            post(&format!("{}/v1/users/{}/tokens/tablet/revoke", server.http(), "x".repeat(257)))
                .bearer_auth(API_KEY)
                .json(&json!({})),
            400,
            "invalid_user_id",
        ),
        ("GET", reqwest::Client::new().get(&url).bearer_auth(API_KEY), 405, "method_not_allowed"),
    ];
    for (what, request, status, code) in cases {
        let answer = raw(request).await;
        assert_eq!((answer.status, answer.error_code()), (status, code), "{what}: {}", answer.body);
    }
    assert!(kim.next_frame_within(Duration::from_millis(300)).await.unwrap().is_none(), "kim stays open");
    assert_eq!(unread_status(&server, &token).await.0, 200, "kim's token still works");
    assert_eq!(server.metric("herald_revoked_tokens").await, 0.0);
    assert_eq!(server.metric("herald_revoked_users").await, 0.0);
    assert_eq!(server.metric(r#"herald_sessions_closed_total{code="4001"}"#).await, 0.0);
    drop(kim);
    server.stop().await;
}

/// A single token's revocation given `expires_at` (the token's `exp`) is
/// forgotten after it, in memory and in the store; one without is kept.
#[tokio::test]
async fn a_single_token_revocation_is_forgotten_after_its_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("HERALD_PURGE_INTERVAL", "200ms")];
    let server = TestServer::start_in(dir.path(), &vars).await;
    let soon = token_with_jti("lee", json!("soon"));
    let kept = token_with_jti("lee", json!("kept"));
    let answer = revoke_one(&server, API_KEY, "lee", "soon", json!({ "expires_at": unix_now() + 2 })).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(revoke_one(&server, API_KEY, "lee", "kept", json!({})).await.status, 200);
    assert_eq!(refused(&server, &soon).await.1, "token_revoked");
    assert_eq!(server.metric("herald_revoked_tokens").await, 2.0);
    // (The caller said the token would have expired by then; this one lives
    // on, which shows the revocation is gone.)
    eventually("the expired revocation forgotten", || async { server.metric("herald_revoked_tokens").await == 1.0 })
        .await;
    assert_eq!(unread_status(&server, &soon).await.0, 200);
    assert_eq!(refused(&server, &kept).await.1, "token_revoked", "the other is kept");
    server.stop().await;
    let server = TestServer::start_in(dir.path(), &vars).await;
    assert_eq!(server.metric("herald_revoked_tokens").await, 1.0, "deleted from the store too");
    assert_eq!(unread_status(&server, &soon).await.0, 200);
    server.stop().await;
}
