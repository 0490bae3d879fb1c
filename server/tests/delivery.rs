//! Publishing and delivery (spec §3 publishing, §2 sessions, §5 guarantees)
//! against a real node.

mod common;

use common::*;
use herald_client::ServerFrame;
use serde_json::json;

#[tokio::test]
async fn a_publish_reaches_the_users_session_with_seq_1_2_3() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    assert_eq!(alice.welcome().user_id, "alice");
    assert_eq!(alice.welcome().last_seq, 0);
    assert_eq!(alice.welcome().node_id, "test-node");
    for i in 1..=3 {
        let published = server.publish("alice", "orders", json!({"order": i})).await;
        assert_eq!(published.seq, i);
    }
    let got = notifications(&mut alice, 3).await;
    assert_eq!(got.iter().map(|n| n.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(got[2].payload, json!({"order": 3}));
    assert_eq!(got[0].topic, "orders");
    assert!(!got[0].read);
    assert!(got[0].created_at.ends_with('Z') && got[0].created_at.len() == 24, "{}", got[0].created_at);
    server.stop().await;
}

#[tokio::test]
async fn since_replays_what_was_missed_then_live_ones_follow() {
    let server = TestServer::start().await;
    for i in 1..=5 {
        server.publish("alice", "t", json!(i)).await;
    }
    let mut alice = server.connect_since("alice", 2).await;
    assert_eq!(alice.welcome().last_seq, 5);
    assert!(!alice.welcome().truncated);
    let replayed = notifications(&mut alice, 3).await;
    assert_eq!(replayed.iter().map(|n| n.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
    server.publish("alice", "t", json!(6)).await;
    assert_eq!(next_notification(&mut alice).await.seq, 6);
    server.stop().await;
}

#[tokio::test]
async fn without_since_only_notifications_after_last_seq_come() {
    let server = TestServer::start().await;
    for i in 1..=3 {
        server.publish("alice", "t", json!(i)).await;
    }
    let mut alice = server.connect("alice").await;
    assert_eq!(alice.welcome().last_seq, 3);
    server.publish("alice", "t", json!(4)).await;
    let n = next_notification(&mut alice).await;
    assert_eq!((n.seq, n.payload), (4, json!(4)));
    server.stop().await;
}

#[tokio::test]
async fn a_since_beyond_the_newest_seq_resumes_from_the_newest() {
    let server = TestServer::start().await;
    server.publish("alice", "t", json!(1)).await;
    let mut alice = server.connect_since("alice", 50).await;
    assert_eq!(alice.welcome().last_seq, 1);
    server.publish("alice", "t", json!(2)).await;
    assert_eq!(next_notification(&mut alice).await.seq, 2);
    // The largest `since` there is: nothing was lost, so nothing is truncated.
    let mut again = server.connect_since("alice", i64::MAX).await;
    let welcome = again.welcome();
    assert_eq!((welcome.last_seq, welcome.truncated, welcome.oldest_seq), (2, false, None));
    server.publish("alice", "t", json!(3)).await;
    assert_eq!(next_notification(&mut again).await.seq, 3);
    server.stop().await;
}

/// The hand-over from replay to live delivery, under publishes racing the
/// connect: every session sees since+1 .. N, each once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_racing_the_connect_are_neither_lost_nor_doubled() {
    const PER_ROUND: i64 = 120;
    let server = TestServer::start().await;
    for round in 0..15 {
        let user = format!("race-{round}");
        let publishers: Vec<_> = (0..4)
            .map(|p| {
                let publisher = server.publisher();
                let user = user.clone();
                tokio::spawn(async move {
                    for i in 0..PER_ROUND / 4 {
                        publisher.publish_one(&user, "race", json!({"p": p, "i": i})).await.expect("publish");
                    }
                })
            })
            .collect();
        // Sessions join at different points of the burst, with and without since.
        let mut sessions = Vec::new();
        for k in 0..4i64 {
            tokio::time::sleep(std::time::Duration::from_millis(3 * k as u64)).await;
            let session = if k % 2 == 0 {
                let since = k * 7;
                let s =
                    herald_client::Connect::new(server.ws(), server.token(&user)).since(since).connect().await.unwrap();
                let start = since.min(s.welcome().last_seq);
                (s, start)
            } else {
                let s = server.connect(&user).await;
                let start = s.welcome().last_seq;
                (s, start)
            };
            sessions.push(session);
        }
        for p in publishers {
            p.await.unwrap();
        }
        for (mut session, start) in sessions {
            let mut expected = start + 1;
            while expected <= PER_ROUND {
                let n = next_notification(&mut session).await;
                assert_eq!(n.seq, expected, "round {round}: a gap or a duplicate (session started after {start})");
                expected += 1;
            }
            // Nothing after the last one.
            assert!(session.next_frame_within(std::time::Duration::from_millis(50)).await.unwrap().is_none());
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_user_receives_only_their_own_notifications() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    server.publish("bob", "t", json!("for bob")).await;
    server.publish("alice", "t", json!("for alice")).await;
    assert_eq!(next_notification(&mut alice).await.payload, json!("for alice"));
    assert_eq!(next_notification(&mut bob).await.payload, json!("for bob"));
    assert!(alice.next_frame_within(std::time::Duration::from_millis(200)).await.unwrap().is_none());
    server.stop().await;
}

#[tokio::test]
async fn user_ids_publish_once_per_distinct_user_each_with_its_own_seq() {
    let server = TestServer::start().await;
    server.publish("bob", "t", json!("first")).await;
    let mut bob = server.connect("bob").await;
    let request = herald_client::PublishRequest {
        user_id: None,
        user_ids: Some(vec!["alice".into(), "bob".into(), "alice".into()]),
        topic: "group".into(),
        payload: json!({"x": 1}),
        idempotency_key: None,
        digest: None,
    };
    let (status, answer) = server.publisher().publish(&request).await.unwrap();
    assert_eq!(status.as_u16(), 201);
    let seqs: Vec<_> = answer.notifications.iter().map(|p| (p.user_id.as_str(), p.seq)).collect();
    assert_eq!(seqs, vec![("alice", 1), ("bob", 2)]);
    assert_eq!(next_notification(&mut bob).await.seq, 2);
    server.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_stores_once_and_answers_200_with_the_first_answer() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let request = herald_client::PublishRequest {
        user_id: None,
        user_ids: Some(vec!["alice".into(), "bob".into()]),
        topic: "orders".into(),
        payload: json!({"order": 42}),
        idempotency_key: Some("order-42-shipped".into()),
        digest: None,
    };
    let (first_status, first) = server.publisher().publish(&request).await.unwrap();
    let (again_status, again) = server.publisher().publish(&request).await.unwrap();
    assert_eq!((first_status.as_u16(), again_status.as_u16()), (201, 200));
    assert_eq!(first, again);
    assert_eq!(next_notification(&mut alice).await.seq, 1);
    assert!(alice.next_frame_within(std::time::Duration::from_millis(300)).await.unwrap().is_none(), "delivered twice");
    let history = server.publisher().history("alice", 0, 100).await.unwrap();
    assert_eq!(history.notifications.len(), 1);
    assert_eq!(history.last_seq, 1);
    // The same key for another user is another notification.
    let other = herald_client::PublishRequest { user_ids: Some(vec!["carol".into()]), ..request };
    let (status, _) = server.publisher().publish(&other).await.unwrap();
    assert_eq!(status.as_u16(), 201);
    server.stop().await;
}

#[tokio::test]
async fn bad_publishes_get_the_spec_error_and_store_nothing() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/notifications", server.http());
    let post =
        |body: String| http.post(&url).bearer_auth(API_KEY).header("content-type", "application/json").body(body);
    let big = "x".repeat(64 * 1024 + 1);
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "bad_request"),
        (r#"{"user_id":"alice","payload":{}}"#.into(), 422, "invalid_request"),
        (r#"{"topic":"t","payload":{}}"#.into(), 422, "invalid_request"),
        (r#"{"user_id":"alice","user_ids":["bob"],"topic":"t","payload":{}}"#.into(), 422, "invalid_request"),
        (r#"{"user_ids":[],"topic":"t","payload":{}}"#.into(), 422, "invalid_user_id"),
        (format!(r#"{{"user_id":"{}","topic":"t","payload":{{}}}}"#, "u".repeat(257)), 422, "invalid_user_id"),
        (r#"{"user_id":"","topic":"t","payload":{}}"#.into(), 422, "invalid_user_id"),
        (r#"{"user_ids":["alice","nul\u0000"],"topic":"t","payload":{}}"#.into(), 422, "invalid_user_id"),
        (r#"{"user_id":"alice","topic":"t\u0000","payload":{}}"#.into(), 422, "invalid_topic"),
        (r#"{"user_id":"alice","topic":"t","payload":{},"idempotency_key":"k\n"}"#.into(), 422, "invalid_request"),
        (r#"{"user_id":"alice","topic":"","payload":{}}"#.into(), 422, "invalid_topic"),
        (format!(r#"{{"user_id":"alice","topic":"{}","payload":{{}}}}"#, "t".repeat(129)), 422, "invalid_topic"),
        (r#"{"user_id":"alice","topic":"t","payload":{},"colour":"red"}"#.into(), 422, "invalid_request"),
        (r#"{"user_id":"alice","topic":"t","payload":null}"#.into(), 422, "invalid_request"),
        (r#"{"user_id":"alice","topic":"t","payload":{},"idempotency_key":""}"#.into(), 422, "invalid_request"),
        (
            r#"{"user_id":"alice","topic":"t","payload":{},"digest":{"key":"","window_secs":60}}"#.into(),
            422,
            "invalid_digest",
        ),
        (
            r#"{"user_id":"alice","topic":"t","payload":{},"digest":{"key":"k","window_secs":0}}"#.into(),
            422,
            "invalid_digest",
        ),
        (
            r#"{"user_id":"alice","topic":"t","payload":{},"digest":{"key":"k","window_secs":604801}}"#.into(),
            422,
            "invalid_digest",
        ),
        (r#"{"user_id":"alice","topic":"t","payload":{},"digest":{"key":"k"}}"#.into(), 422, "invalid_request"),
        // JSON, but not readable back by serde_json (the Rust client): a
        // number beyond a double, lone surrogates, nesting past 128.
        (r#"{"user_id":"alice","topic":"t","payload":{"n":1e400}}"#.into(), 422, "invalid_payload"),
        (r#"{"user_id":"alice","topic":"t","payload":[-1E+999]}"#.into(), 422, "invalid_payload"),
        (r#"{"user_id":"alice","topic":"t","payload":{"s":"\ud800"}}"#.into(), 422, "invalid_payload"),
        (r#"{"user_id":"alice","topic":"t","payload":"\udc00 trail first"}"#.into(), 422, "invalid_payload"),
        (r#"{"user_id":"alice","topic":"t","payload":{"\ud83dx":1}}"#.into(), 422, "invalid_payload"),
        (
            format!(r#"{{"user_id":"alice","topic":"t","payload":{}{}}}"#, "[".repeat(200), "]".repeat(200)),
            422,
            "invalid_payload",
        ),
        (format!(r#"{{"user_id":"alice","topic":"t","payload":"{big}"}}"#), 413, "payload_too_large"),
        (format!(r#"{{"user_id":"alice","topic":"t","payload":"{}"}}"#, "y".repeat(4 << 20)), 413, "payload_too_large"),
    ];
    for (body, status, code) in cases {
        let answer = raw(post(body.clone())).await;
        assert_eq!((answer.status, answer.error_code()), (status, code), "for body {:.80}", body);
    }
    let answer =
        raw(http.post(&url).bearer_auth(API_KEY).body(r#"{"user_id":"alice","topic":"t","payload":{}}"#)).await;
    assert_eq!((answer.status, answer.error_code()), (400, "bad_request"), "no content type");
    let answer = raw(http.post(&url).header("content-type", "application/json").body("{}")).await;
    assert_eq!((answer.status, answer.error_code()), (401, "missing_api_key"));
    let answer = raw(http.post(&url).bearer_auth("wrong").header("content-type", "application/json").body("{}")).await;
    assert_eq!((answer.status, answer.error_code()), (401, "invalid_api_key"));
    // A user's token is not an API key.
    let answer = raw(http
        .post(&url)
        .bearer_auth(server.token("alice"))
        .json(&json!({"user_id":"alice","topic":"t","payload":{}})))
    .await;
    assert_eq!((answer.status, answer.error_code()), (401, "invalid_api_key"));

    let history = server.publisher().history("alice", 0, 100).await.unwrap();
    assert!(history.notifications.is_empty());
    assert_eq!(history.last_seq, 0, "a refused publish used a seq");
    assert_eq!(server.publish("alice", "t", json!({})).await.seq, 1);
    server.stop().await;
}

#[tokio::test]
async fn payloads_come_back_byte_for_byte_in_frames_and_in_the_history() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    // What a `Value` would rewrite: a big integer, -0, exponents, key order,
    // spacing, an escaped surrogate pair, nesting up to serde_json's limit.
    let payloads = [
        r#"{"z":1,"a":[123456789012345678901234567890, -0, 1.0e2, 0.1]}"#.to_string(),
        r#"{ "emoji" : "\ud83d\ude00", "esc":"\u00e9\n" }"#.to_string(),
        format!("{}1{}", "[".repeat(127), "]".repeat(127)),
    ];
    for payload in &payloads {
        let body = format!(r#"{{"user_id":"alice","topic":"t","payload":{payload}}}"#);
        let answer = http
            .post(format!("{}/v1/notifications", server.http()))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 201, "{payload:.60}");
    }
    let text = |path: &str, bearer: String| {
        let request = http.get(format!("{}{path}", server.http())).bearer_auth(bearer);
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    let history = text("/v1/users/alice/notifications", API_KEY.into()).await;
    let inbox = text("/v1/me/notifications", server.token("alice")).await;
    let (mut alice, _welcome) = raw_session(&server, "alice", "since=0").await;
    for payload in &payloads {
        let frame = raw_text(&mut alice).await;
        let field = format!(r#""payload":{payload},"#);
        assert!(history.contains(&field), "history rewrote {payload:.60}: {history:.300}");
        assert!(inbox.contains(&field), "inbox rewrote {payload:.60}");
        assert!(frame.contains(&field), "the frame rewrote {payload:.60}: {frame:.300}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_payload_of_exactly_the_limit_is_accepted() {
    let server = TestServer::start().await;
    // The payload's JSON text is the string with its two quotes.
    let payload = json!("z".repeat(64 * 1024 - 2));
    assert_eq!(server.publish("alice", "t", payload.clone()).await.seq, 1);
    let mut alice = server.connect_since("alice", 0).await;
    assert_eq!(next_notification(&mut alice).await.payload, payload);
    server.stop().await;
}

#[tokio::test]
async fn retention_purges_old_notifications_and_since_below_them_is_truncated() {
    let server = TestServer::start_with(&[("HERALD_RETENTION", "2s"), ("HERALD_PURGE_INTERVAL", "200ms")]).await;
    for i in 1..=3 {
        server.publish("alice", "t", json!(i)).await;
    }
    eventually("a purge of 3", || async { server.metric("herald_notifications_purged_total").await >= 3.0 }).await;
    assert_eq!(server.publish("alice", "t", json!(4)).await.seq, 4, "seqs are never reused after a purge");
    let mut alice = server.connect_since("alice", 1).await;
    let welcome = alice.welcome().clone();
    assert!(welcome.truncated);
    assert_eq!((welcome.oldest_seq, welcome.last_seq), (Some(4), 4));
    assert_eq!(next_notification(&mut alice).await.seq, 4);
    let caught_up = server.connect_since("alice", 3).await;
    assert!(!caught_up.welcome().truncated, "since just below the oldest kept is not truncated");
    assert_eq!(server.metric("herald_truncations_total").await, 1.0);
    server.stop().await;
}

#[tokio::test]
async fn history_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), &[]).await;
    for i in 1..=3 {
        server.publish("alice", "t", json!(i)).await;
    }
    server.stop().await;
    let server = TestServer::start_in(dir.path(), &[]).await;
    let mut alice = server.connect_since("alice", 1).await;
    assert_eq!(notifications(&mut alice, 2).await.iter().map(|n| n.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(server.publish("alice", "t", json!(4)).await.seq, 4);
    assert_eq!(next_notification(&mut alice).await.seq, 4);
    server.stop().await;
}

#[tokio::test]
async fn metrics_count_publishes_deliveries_and_sessions() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    assert_eq!(server.metric("herald_sessions_active").await, 1.0);
    server.publish("alice", "t", json!(1)).await;
    next_notification(&mut alice).await;
    assert_eq!(server.metric("herald_notifications_published_total").await, 1.0);
    assert_eq!(server.metric("herald_notifications_delivered_total").await, 1.0);
    assert_eq!(server.metric("herald_publish_commit_seconds_count").await, 1.0);
    alice.close().await.unwrap();
    eventually("no session left", || async { server.metric("herald_sessions_active").await == 0.0 }).await;
    assert_eq!(server.metric(r#"herald_sessions_closed_total{code="1000"}"#).await, 1.0);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sessions_with_1001_and_they_resume_elsewhere_losing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), &[]).await;
    let mut alice = server.connect("alice").await;
    server.publish("alice", "t", json!(1)).await;
    let seen = next_notification(&mut alice).await.seq;
    server.publish("alice", "t", json!(2)).await;
    server.begin_shutdown();
    // The session may or may not get seq 2 before the 1001.
    let mut last = seen;
    let code = loop {
        match alice.next_frame_within(WAIT).await {
            Ok(Some(ServerFrame::Notification(n))) => last = n.seq,
            Ok(Some(_)) => {}
            Ok(None) => panic!("not closed"),
            Err(herald_client::Error::Closed { code, .. }) => break code,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, 1001);
    server.stop().await;
    let server = TestServer::start_in(dir.path(), &[]).await;
    let mut alice = server.connect_since("alice", last).await;
    if last < 2 {
        assert_eq!(next_notification(&mut alice).await.seq, 2);
    }
    server.publish("alice", "t", json!(3)).await;
    assert_eq!(next_notification(&mut alice).await.seq, 3);
    server.stop().await;
}
