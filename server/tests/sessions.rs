//! A user's sessions for backend services, on one node: listed (`GET
//! /v1/users/{id}/sessions`, `herald sessions`) with what the handshake
//! saw, and closed one at a time (`DELETE /v1/users/{id}/sessions/{session_id}`,
//! `herald disconnect --session`). Across nodes: broker_redis.rs and
//! cluster.rs.

mod common;

use std::time::Duration;

use common::*;
use herald_client::{Connect, Session, UserSessions};
use herald_server::auth::unix_now;
use serde_json::json;

async fn list(server: &TestServer, key: &str, user: &str) -> Raw {
    raw(reqwest::Client::new().get(format!("{}/v1/users/{user}/sessions", server.http())).bearer_auth(key)).await
}

async fn listed(server: &TestServer, user: &str) -> UserSessions {
    server.publisher().sessions(user).await.expect("a listing")
}

async fn close_one(server: &TestServer, key: &str, user: &str, session: &str) -> Raw {
    let url = format!("{}/v1/users/{user}/sessions/{session}", server.http());
    raw(reqwest::Client::new().delete(url).bearer_auth(key)).await
}

async fn connect_as(server: &TestServer, token: &str, user_agent: &str) -> Session {
    Connect::new(server.ws(), token).user_agent(user_agent).connect().await.expect("the session opens")
}

fn session_id(session: &Session) -> String {
    session.welcome().session_id.clone()
}

#[tokio::test]
async fn sessions_are_listed_with_what_the_handshake_saw_and_closed_one_at_a_time() {
    let server = TestServer::start().await;
    let before = unix_now();
    let phone_token = token_with_jti("alice", json!("phone-token"));
    let mut phone = connect_as(&server, &phone_token, "HeraldDemo/1.0 (Android 14)").await;
    let laptop_token = token_issued("alice", Some(unix_now() - 10)); // no jti
    let mut laptop = connect_as(&server, &laptop_token, "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0").await;
    let mut bob = server.connect("bob").await;

    let alice = listed(&server, "alice").await;
    assert_eq!((alice.user_id.as_str(), alice.count, alice.sessions.len()), ("alice", 2, 2));
    let (first, second) = (&alice.sessions[0], &alice.sessions[1]);
    assert_eq!(first.session_id, session_id(&phone), "oldest first");
    assert_eq!(second.session_id, session_id(&laptop));
    assert_eq!(first.node_id, phone.welcome().node_id);
    assert_eq!(first.jti.as_deref(), Some("phone-token"));
    assert_eq!(second.jti, None, "a token without jti");
    assert_eq!(first.token_expires_at, phone.welcome().token_expires_at);
    assert_eq!(first.user_agent.as_deref(), Some("HeraldDemo/1.0 (Android 14)"));
    assert_eq!(second.user_agent.as_deref(), Some("Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0"));
    assert_eq!(first.ip.as_deref(), Some("127.0.0.1"));
    let connected = time::OffsetDateTime::parse(&first.connected_at, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339")
        .unix_timestamp();
    assert!((before..=unix_now()).contains(&connected), "{} not within the test", first.connected_at);

    // A refresh moves the listing to the new token.
    let fresh = token_with_jti("alice", json!("laptop-token-2"));
    laptop.send_text(json!({"type": "refresh", "token": fresh, "ref": 1}).to_string()).await.unwrap();
    assert!(matches!(next(&mut laptop).await, herald_client::ServerFrame::Ok { .. }));
    let alice = listed(&server, "alice").await;
    assert_eq!(alice.sessions[1].jti.as_deref(), Some("laptop-token-2"));

    // Closing the phone closes it alone.
    let answer = close_one(&server, API_KEY, "alice", &session_id(&phone)).await;
    assert_eq!(answer.status, 204, "{}", answer.body);
    assert_eq!(closed(&mut phone).await, (4003, "disconnected by the server".to_string()));
    drop(phone);
    assert!(laptop.next_frame_within(Duration::from_millis(300)).await.unwrap().is_none(), "the laptop stays");
    eventually("the phone to leave the listing", || async {
        let alice = listed(&server, "alice").await;
        alice.count == 1 && alice.sessions.len() == 1 && alice.sessions[0].session_id == session_id(&laptop)
    })
    .await;

    // Another user's session id under alice's name closes nothing; neither
    // does an id no session has. Both are 204: the listing says what is open.
    assert_eq!(close_one(&server, API_KEY, "alice", &session_id(&bob)).await.status, 204);
    assert_eq!(close_one(&server, API_KEY, "alice", &uuid::Uuid::now_v7().to_string()).await.status, 204);
    assert!(bob.next_frame_within(Duration::from_millis(300)).await.unwrap().is_none(), "bob stays");
    assert!(laptop.next_frame_within(Duration::from_millis(100)).await.unwrap().is_none(), "the laptop stays");
    assert_eq!(server.metric(r#"herald_sessions_closed_total{code="4003"}"#).await, 1.0);
    server.publish("bob", "t", json!("still here")).await;
    assert_eq!(next_notification(&mut bob).await.payload, json!("still here"));

    // Nobody: an empty listing.
    let nobody = list(&server, API_KEY, "nobody").await;
    assert_eq!(nobody.body, json!({"user_id": "nobody", "count": 0, "sessions": []}));

    // The Rust client's calls.
    let publisher = server.publisher();
    let bobs = publisher.sessions("bob").await.unwrap();
    assert_eq!(bobs.sessions[0].user_agent.as_deref(), Some(herald_client::DEFAULT_USER_AGENT));
    publisher.disconnect_session("bob", &session_id(&bob)).await.unwrap();
    assert_eq!(close_code(&mut bob).await, 4003);
    drop((laptop, bob));
    server.stop().await;
}

/// A `User-Agent` is kept to 256 bytes, cut at a character; none is
/// listed as absent, as is one that is not UTF-8.
#[tokio::test]
async fn a_long_user_agent_is_cut_and_a_missing_one_left_out() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server = TestServer::start().await;
    let long = format!("Agent/{}", "x".repeat(400));
    let _long = connect_as(&server, &server.token("carol"), &long).await;
    let _none = connect_as(&server, &server.token("carol"), "").await;
    // 255 bytes, then a two-byte character across the cut.
    let accented = format!("App/{}é", "y".repeat(251));
    let _accented = connect_as(&server, &server.token("carol"), &accented).await;
    let url = format!("{}/v1/ws?access_token={}", server.ws(), server.token("carol"));
    let mut latin1 = url.into_client_request().unwrap();
    let bytes = tokio_tungstenite::tungstenite::http::HeaderValue::from_bytes(b"Caf\xe9/1").unwrap();
    latin1.headers_mut().insert("user-agent", bytes);
    let (_latin1, _) = tokio_tungstenite::connect_async(latin1).await.expect("the upgrade succeeds");
    eventually("carol's four sessions", || async { listed(&server, "carol").await.count == 4 }).await;
    let carol = listed(&server, "carol").await;
    assert_eq!(carol.sessions[0].user_agent.as_deref(), Some(&long[..256]));
    assert_eq!(carol.sessions[1].user_agent, None);
    assert_eq!(carol.sessions[2].user_agent.as_deref(), Some(&accented[..255]), "cut before the é");
    assert_eq!(carol.sessions[3].user_agent, None, "not UTF-8");
    let raw_listing = list(&server, API_KEY, "carol").await.body;
    assert!(raw_listing["sessions"][1].get("user_agent").is_none(), "absent, not null: {raw_listing}");
    server.stop().await;
}

/// The Rust client's reconnecting `Client` says what app it is when told.
#[tokio::test]
async fn the_rust_client_names_its_app_in_the_listing() {
    let server = TestServer::start().await;
    let client = herald_client::Client::builder(server.ws())
        .token(server.token("fay"))
        .user_agent("MyApp/3.2 (Linux)")
        .build()
        .unwrap();
    eventually("fay's session to be listed", || async { listed(&server, "fay").await.count == 1 }).await;
    assert_eq!(listed(&server, "fay").await.sessions[0].user_agent.as_deref(), Some("MyApp/3.2 (Linux)"));
    client.close().await;
    server.stop().await;
}

/// Behind a trusted proxy a session is listed with the client's address
/// from `X-Forwarded-For`, as the limits see it.
#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_listed() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server = TestServer::start_with(&[("HERALD_TRUSTED_PROXIES", "127.0.0.1")]).await;
    let url = format!("{}/v1/ws?access_token={}", server.ws(), server.token("dave"));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("x-forwarded-for", "198.51.100.7".parse().unwrap());
    let (_ws, _) = tokio_tungstenite::connect_async(request).await.expect("the upgrade succeeds");
    eventually("dave's session to be listed", || async { listed(&server, "dave").await.count == 1 }).await;
    assert_eq!(listed(&server, "dave").await.sessions[0].ip.as_deref(), Some("198.51.100.7"));
    server.stop().await;
}

/// Every refusal has the spec's body and closes nothing.
#[tokio::test]
async fn refusals_list_and_close_nothing() {
    let server = TestServer::start_with(&[
        ("HERALD_API_KEYS_READ", "read-only"),
        ("HERALD_API_KEYS_PUBLISH", "publish-only"),
        ("HERALD_API_KEYS_DISCONNECT", "disconnect-only"),
    ])
    .await;
    let mut erin = server.connect("erin").await;
    let id = session_id(&erin);

    let refused = close_one(&server, API_KEY, "erin", "not-a-uuid").await;
    assert_eq!((refused.status, refused.error_code()), (400, "invalid_session_id"), "{}", refused.body);
    let refused = close_one(&server, API_KEY, &"x".repeat(257), &id).await;
    assert_eq!((refused.status, refused.error_code()), (400, "invalid_user_id"), "{}", refused.body);
    let refused = close_one(&server, API_KEY, "erin", "%FF").await;
    assert_eq!((refused.status, refused.error_code()), (400, "invalid_path"), "{}", refused.body);
    let refused = close_one(&server, "read-only", "erin", &id).await;
    assert_eq!((refused.status, refused.error_code()), (403, "insufficient_scope"));
    assert_eq!(close_one(&server, "nope", "erin", &id).await.status, 401);
    assert_eq!(close_one(&server, &server.token("erin"), "erin", &id).await.status, 401, "a user token is no API key");
    let url = format!("{}/v1/users/erin/sessions/{id}", server.http());
    let wrong_method = raw(reqwest::Client::new().post(url).bearer_auth(API_KEY)).await;
    assert_eq!((wrong_method.status, wrong_method.error_code()), (405, "method_not_allowed"));

    let refused = list(&server, "publish-only", "erin").await;
    assert_eq!((refused.status, refused.error_code()), (403, "insufficient_scope"));
    let refused = list(&server, "disconnect-only", "erin").await;
    assert_eq!((refused.status, refused.error_code()), (403, "insufficient_scope"));
    let refused = list(&server, "nope", "erin").await;
    assert_eq!((refused.status, refused.error_code()), (401, "invalid_api_key"));
    let refused = list(&server, API_KEY, &"x".repeat(257)).await;
    assert_eq!((refused.status, refused.error_code()), (400, "invalid_user_id"));
    assert_eq!(list(&server, "read-only", "erin").await.body["count"], 1, "the read scope lists");

    assert!(erin.next_frame_within(Duration::from_millis(300)).await.unwrap().is_none(), "erin stays open");
    assert_eq!(server.metric(r#"herald_sessions_closed_total{code="4003"}"#).await, 0.0);
    assert_eq!(close_one(&server, "disconnect-only", "erin", &id).await.status, 204);
    assert_eq!(close_code(&mut erin).await, 4003);
    drop(erin);
    server.stop().await;
}
