//! The inbox API, backend history, presence and operations endpoints (spec §3).

mod common;

use common::*;
use herald_client::{ReadMark, ServerFrame};
use serde_json::json;

fn seqs(page: &herald_client::NotificationPage) -> Vec<i64> {
    page.notifications.iter().map(|n| n.seq).collect()
}

#[tokio::test]
async fn the_inbox_lists_newest_first_with_filters() {
    let server = TestServer::start().await;
    for (i, topic) in ["orders", "likes", "orders", "likes", "orders"].iter().enumerate() {
        server.publish("alice", topic, json!({"n": i + 1})).await;
    }
    let inbox = server.inbox("alice");
    let all = inbox.list(&[]).await.unwrap();
    assert_eq!(seqs(&all), vec![5, 4, 3, 2, 1]);
    assert_eq!(all.last_seq, 5);
    assert_eq!(all.notifications[0].payload, json!({"n": 5}));
    assert_eq!(seqs(&inbox.list(&[("limit", "2")]).await.unwrap()), vec![5, 4]);
    assert_eq!(seqs(&inbox.list(&[("before_seq", "4")]).await.unwrap()), vec![3, 2, 1]);
    assert_eq!(seqs(&inbox.list(&[("after_seq", "3")]).await.unwrap()), vec![5, 4]);
    assert_eq!(
        seqs(&inbox.list(&[("after_seq", "1"), ("before_seq", "5"), ("limit", "2")]).await.unwrap()),
        vec![4, 3]
    );

    inbox.mark_read(&ReadMark::Seqs { seqs: vec![1, 2, 5] }).await.unwrap();
    assert_eq!(seqs(&inbox.list(&[("unread", "true")]).await.unwrap()), vec![4, 3]);
    let unread = inbox.unread().await.unwrap();
    assert_eq!(unread.total, 2);
    assert_eq!(unread.by_topic.get("orders"), Some(&1));
    assert_eq!(unread.by_topic.get("likes"), Some(&1));
    inbox.mark_read(&ReadMark::UpTo { up_to_seq: 3 }).await.unwrap();
    let unread = inbox.unread().await.unwrap();
    assert_eq!((unread.total, unread.by_topic.len()), (1, 1));
    assert!(inbox.list(&[]).await.unwrap().notifications.iter().all(|n| n.read == (n.seq != 4)));
    server.stop().await;
}

#[tokio::test]
async fn one_topic_is_listed_and_marked_read_on_its_own() {
    let server = TestServer::start().await;
    for (i, topic) in ["orders", "likes", "orders", "likes", "orders", "chat"].iter().enumerate() {
        server.publish("alice", topic, json!({"n": i + 1})).await;
    }
    server.publish("bob", "orders", json!("bob's")).await;
    let inbox = server.inbox("alice");
    let orders = |extra: &[(&'static str, &'static str)]| {
        let mut query = vec![("topic", "orders")];
        query.extend_from_slice(extra);
        let inbox = inbox.clone();
        async move { seqs(&inbox.list(&query).await.unwrap()) }
    };
    assert_eq!(orders(&[]).await, vec![5, 3, 1]);
    assert_eq!(orders(&[("limit", "2")]).await, vec![5, 3]);
    assert_eq!(orders(&[("before_seq", "5")]).await, vec![3, 1]);
    assert_eq!(orders(&[("after_seq", "1"), ("unread", "true")]).await, vec![5, 3]);
    assert!(inbox.list(&[("topic", "nothing")]).await.unwrap().notifications.is_empty());

    let mut phone = server.connect_since("alice", 6).await;
    let mut laptop = server.connect_since("alice", 6).await;
    // Over HTTP, up to a seq: the sessions hear which seqs changed.
    inbox.mark_read(&ReadMark::Topic { topic: "orders".into(), up_to_seq: Some(3) }).await.unwrap();
    for session in [&mut phone, &mut laptop] {
        assert_eq!(next(session).await, ServerFrame::Read(ReadMark::Seqs { seqs: vec![1, 3] }));
    }
    assert_eq!(orders(&[("unread", "true")]).await, vec![5]);
    assert_eq!(orders(&[]).await, vec![5, 3, 1], "read ones stay listed");
    // Over the socket, the whole topic: `ok` to the sender, the seqs to all.
    phone.send_text(r#"{"type":"read","topic":"likes","ref":"m1"}"#).await.unwrap();
    assert_eq!(next(&mut phone).await, ServerFrame::Ok { reference: json!("m1") });
    for session in [&mut phone, &mut laptop] {
        assert_eq!(next(session).await, ServerFrame::Read(ReadMark::Seqs { seqs: vec![2, 4] }));
    }
    let unread = inbox.unread().await.unwrap();
    assert_eq!(unread.total, 2);
    assert_eq!((unread.by_topic.get("orders"), unread.by_topic.get("chat")), (Some(&1), Some(&1)));
    assert_eq!(unread.by_topic.get("likes"), None);
    // A topic with nothing unread changes nothing and tells no one.
    inbox.mark_read(&ReadMark::Topic { topic: "likes".into(), up_to_seq: None }).await.unwrap();
    assert_eq!(phone.next_frame_within(std::time::Duration::from_millis(300)).await.unwrap(), None);
    assert_eq!(server.inbox("bob").unread().await.unwrap().total, 1, "bob's orders are his own");

    // Refusals change nothing: 422 over HTTP, `bad_frame` on the socket.
    let url = format!("{}/v1/me/notifications/read", server.http());
    let http = reqwest::Client::new();
    for body in [
        json!({"topic": ""}),
        json!({"topic": "x".repeat(129)}),
        json!({"topic": "orders", "seqs": [5]}),
        json!({"topic": "orders", "up_to_seq": 0}),
        json!({"topic": 5}),
    ] {
        let answer = raw(http.post(&url).bearer_auth(server.token("alice")).json(&body)).await;
        assert_eq!(answer.status / 100, 4, "{body}: {}", answer.body);
        assert!(matches!(answer.error_code(), "invalid_request" | "bad_request"), "{body}: {}", answer.body);
    }
    phone.send_text(r#"{"type":"read","topic":"orders","seqs":[5],"ref":2}"#).await.unwrap();
    match next(&mut phone).await {
        ServerFrame::Error { code, reference, .. } => {
            assert_eq!((code.as_str(), reference), ("bad_frame", Some(json!(2))))
        }
        other => panic!("expected bad_frame, got {other:?}"),
    }
    for bad in ["", "%07"] {
        let answer = raw(http
            .get(format!("{}/v1/me/notifications?topic={bad}", server.http()))
            .bearer_auth(server.token("alice")))
        .await;
        assert_eq!((answer.status, answer.error_code()), (400, "invalid_query"), "{bad:?}");
    }
    assert_eq!(inbox.unread().await.unwrap().total, 2);
    server.stop().await;
}

#[tokio::test]
async fn a_backend_reads_unread_counts_and_marks_read_for_a_user() {
    let server = TestServer::start().await;
    for topic in ["orders", "likes", "orders"] {
        server.publish("alice", topic, json!({})).await;
    }
    server.publish("bob", "orders", json!({})).await;
    let backend = server.publisher();
    let counts = backend.unread("alice").await.unwrap();
    assert_eq!(counts, server.inbox("alice").unread().await.unwrap(), "the user's own view");
    assert_eq!((counts.total, counts.by_topic.get("orders")), (3, Some(&2)));

    let mut phone = server.connect_since("alice", 3).await;
    backend.mark_read("alice", &ReadMark::Topic { topic: "orders".into(), up_to_seq: None }).await.unwrap();
    assert_eq!(next(&mut phone).await, ServerFrame::Read(ReadMark::Seqs { seqs: vec![1, 3] }));
    backend.mark_read("alice", &ReadMark::UpTo { up_to_seq: 2 }).await.unwrap();
    assert_eq!(next(&mut phone).await, ServerFrame::Read(ReadMark::UpTo { up_to_seq: 2 }));
    assert_eq!(backend.unread("alice").await.unwrap().total, 0);
    assert_eq!(backend.unread("bob").await.unwrap().total, 1, "bob's are his own");
    assert_eq!(backend.unread("nobody").await.unwrap().total, 0);

    // Refusals: a bad mark is 422 and changes nothing; a user token is no API key.
    server.publish("alice", "orders", json!({})).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/users/alice/notifications/read", server.http());
    let bad = raw(http.post(&url).bearer_auth(API_KEY).json(&json!({"seqs": []}))).await;
    assert_eq!((bad.status, bad.error_code()), (422, "invalid_request"));
    let token = raw(http.post(&url).bearer_auth(server.token("alice")).json(&json!({"up_to_seq": 9}))).await;
    assert_eq!((token.status, token.error_code()), (401, "invalid_api_key"));
    let unread = format!("{}/v1/users/alice/unread", server.http());
    assert_eq!(raw(http.get(&unread).bearer_auth(server.token("alice"))).await.status, 401);
    assert_eq!(backend.unread("alice").await.unwrap().total, 1);
    drop(phone);
    server.stop().await;
}

#[tokio::test]
async fn marking_read_over_http_tells_every_open_session() {
    let server = TestServer::start().await;
    server.publish("alice", "t", json!(1)).await;
    let mut phone = server.connect("alice").await;
    let mut laptop = server.connect("alice").await;
    server.inbox("alice").mark_read(&ReadMark::UpTo { up_to_seq: 1 }).await.unwrap();
    for session in [&mut phone, &mut laptop] {
        assert_eq!(next(session).await, ServerFrame::Read(ReadMark::UpTo { up_to_seq: 1 }));
    }
    server.stop().await;
}

#[tokio::test]
async fn a_user_only_ever_sees_their_own_data() {
    let server = TestServer::start().await;
    server.publish("alice", "secret", json!("alice's")).await;
    server.publish("bob", "t", json!("bob's")).await;
    let bob = server.inbox("bob");
    let page = bob.list(&[]).await.unwrap();
    assert_eq!(page.notifications.len(), 1);
    assert_eq!(page.notifications[0].payload, json!("bob's"));
    assert_eq!(bob.unread().await.unwrap().total, 1);
    // Marking alice's seq 1 as bob changes only bob's seq 1.
    bob.mark_read(&ReadMark::Seqs { seqs: vec![1] }).await.unwrap();
    assert_eq!(server.inbox("alice").unread().await.unwrap().total, 1);
    // The backend history needs an API key: a user's token is refused.
    let http = reqwest::Client::new();
    let url = format!("{}/v1/users/alice/notifications", server.http());
    let answer = raw(http.get(&url).bearer_auth(server.token("bob"))).await;
    assert_eq!((answer.status, answer.error_code()), (401, "invalid_api_key"));
    let answer = raw(http.get(&url)).await;
    assert_eq!((answer.status, answer.error_code()), (401, "missing_api_key"));
    // And /v1/me needs a user token: an API key is refused.
    let answer = raw(http.get(format!("{}/v1/me/notifications", server.http())).bearer_auth(API_KEY)).await;
    assert_eq!((answer.status, answer.error_code()), (401, "invalid_token"));
    let answer = raw(http.get(format!("{}/v1/me/unread", server.http()))).await;
    assert_eq!((answer.status, answer.error_code()), (401, "missing_token"));
    let expired = herald_server::auth::mint(SECRET, "alice", -10);
    let answer = raw(http.get(format!("{}/v1/me/unread", server.http())).bearer_auth(expired)).await;
    assert_eq!((answer.status, answer.error_code()), (401, "token_expired"));
    server.stop().await;
}

#[tokio::test]
async fn backend_history_pages_forward_from_after_seq() {
    let server = TestServer::start().await;
    for i in 1..=5 {
        server.publish("user with spaces/and slash", "t", json!(i)).await;
    }
    let publisher = server.publisher();
    let page = publisher.history("user with spaces/and slash", 2, 2).await.unwrap();
    assert_eq!(seqs(&page), vec![3, 4]);
    assert_eq!(page.last_seq, 5);
    assert!(publisher.history("nobody", 0, 10).await.unwrap().notifications.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn bad_inbox_requests_get_the_spec_error() {
    let server = TestServer::start().await;
    server.publish("alice", "t", json!(1)).await;
    let http = reqwest::Client::new();
    let token = server.token("alice");
    let list = |q: &str| http.get(format!("{}/v1/me/notifications?{q}", server.http())).bearer_auth(&token);
    for q in [
        "limit=0",
        "limit=501",
        "limit=abc",
        "before_seq=x",
        "before_seq=-1",
        "after_seq=-5",
        "unread=maybe",
        "colour=red",
    ] {
        let answer = raw(list(q)).await;
        assert_eq!((answer.status, answer.error_code()), (400, "invalid_query"), "for {q}");
    }
    let history =
        |q: &str| http.get(format!("{}/v1/users/alice/notifications?{q}", server.http())).bearer_auth(API_KEY);
    for q in ["after_seq=-1", "limit=0"] {
        let answer = raw(history(q)).await;
        assert_eq!((answer.status, answer.error_code()), (400, "invalid_query"), "history {q}");
    }
    let read = |body: &'static str| {
        http.post(format!("{}/v1/me/notifications/read", server.http()))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
    };
    for body in ["{}", r#"{"seqs":[]}"#, r#"{"seqs":[1],"up_to_seq":1}"#, r#"{"up_to_seq":0}"#, r#"{"seqs":"1"}"#] {
        let answer = raw(read(body)).await;
        assert_eq!((answer.status, answer.error_code()), (422, "invalid_request"), "for {body}");
    }
    let answer = raw(read("{oops")).await;
    assert_eq!((answer.status, answer.error_code()), (400, "bad_request"));
    assert_eq!(server.inbox("alice").unread().await.unwrap().total, 1, "a refused mark changed something");
    server.stop().await;
}

#[tokio::test]
async fn presence_counts_the_users_open_sessions() {
    let server = TestServer::start().await;
    let presence = |user: &str| {
        let url = format!("{}/v1/users/{user}/presence", server.http());
        async move { raw(reqwest::Client::new().get(url).bearer_auth(API_KEY)).await.body["sessions"].as_u64() }
    };
    assert_eq!(presence("alice").await, Some(0));
    let a = server.connect("alice").await;
    let _b = server.connect("alice").await;
    assert_eq!(presence("alice").await, Some(2));
    a.close().await.unwrap();
    eventually("one session left", || async { presence("alice").await == Some(1) }).await;
    server.stop().await;
}

#[tokio::test]
async fn operations_endpoints_answer() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{}{path}", server.http()));
    assert_eq!(raw(get("/healthz")).await.status, 200);
    let ready = raw(get("/readyz")).await;
    assert_eq!((ready.status, ready.body["status"].as_str()), (200, Some("ready")));
    let response = get("/metrics").send().await.unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for name in [
        "herald_sessions_active",
        "herald_notifications_published_total",
        "herald_notifications_delivered_total",
        "herald_publish_commit_seconds",
    ] {
        assert!(text.contains(&format!("# TYPE {name}")) || text.contains(name), "{name} missing");
    }
    let missing = raw(get("/v2/nothing")).await;
    assert_eq!((missing.status, missing.error_code()), (404, "not_found"));
    let wrong_method = raw(http.delete(format!("{}/v1/notifications", server.http()))).await;
    assert_eq!((wrong_method.status, wrong_method.error_code()), (405, "method_not_allowed"));
    server.stop().await;
}

#[tokio::test]
async fn readyz_turns_503_when_draining() {
    let server = TestServer::start_with(&[("HERALD_DRAIN_GRACE", "2s")]).await;
    server.begin_shutdown();
    let ready = raw(reqwest::Client::new().get(format!("{}/readyz", server.http()))).await;
    assert_eq!((ready.status, ready.error_code()), (503, "draining"));
    assert!(ready.headers.contains_key("retry-after"));
    assert_eq!(raw(reqwest::Client::new().get(format!("{}/healthz", server.http()))).await.status, 200);
    server.stop().await;
}

// ---------------------------------------------------------------- CORS

const APP: &str = "https://app.example.com";

/// A browser's preflight from `origin` for `method` on `path`.
async fn preflight(server: &TestServer, path: &str, origin: &str, method: &str) -> Raw {
    let request = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, format!("{}{path}", server.http()))
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header("access-control-request-headers", "authorization,content-type");
    raw(request).await
}

fn header<'a>(raw: &'a Raw, name: &str) -> Option<&'a str> {
    raw.headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn browser_apps_on_other_origins_may_call_the_users_routes() {
    let server = TestServer::start().await;
    for (path, method) in
        [("/v1/me/unread", "GET"), ("/v1/me/notifications", "GET"), ("/v1/me/notifications/read", "POST")]
    {
        let answer = preflight(&server, path, APP, method).await;
        assert_eq!(answer.status, 204, "preflight of {method} {path}");
        assert_eq!(header(&answer, "access-control-allow-origin"), Some(APP));
        assert!(header(&answer, "access-control-allow-methods").unwrap().contains(method));
        assert!(header(&answer, "access-control-allow-headers").unwrap().contains("authorization"));
        assert_eq!(header(&answer, "vary"), Some("origin"));
        assert_eq!(header(&answer, "access-control-allow-credentials"), None, "tokens, not cookies");
    }

    // The actual requests carry the header too, refusals included, so the
    // page can read what went wrong.
    server.publish("alice", "orders", json!({})).await;
    let from_app = |path: &str| reqwest::Client::new().get(format!("{}{path}", server.http())).header("origin", APP);
    let answer = raw(from_app("/v1/me/unread").bearer_auth(server.token("alice"))).await;
    assert_eq!((answer.status, answer.body["total"].as_i64()), (200, Some(1)));
    assert_eq!(header(&answer, "access-control-allow-origin"), Some(APP));
    assert!(header(&answer, "access-control-expose-headers").unwrap().contains("retry-after"));
    let answer = raw(from_app("/v1/me/unread")).await;
    assert_eq!((answer.status, answer.error_code()), (401, "missing_token"));
    assert_eq!(header(&answer, "access-control-allow-origin"), Some(APP));
    let answer = raw(reqwest::Client::new()
        .post(format!("{}/v1/me/notifications/read", server.http()))
        .header("origin", APP)
        .bearer_auth(server.token("alice"))
        .json(&json!({"up_to_seq": 1})))
    .await;
    assert_eq!((answer.status, header(&answer, "access-control-allow-origin")), (204, Some(APP)));

    // Backend routes (API keys) get no CORS: an API key has no place in a browser.
    assert_ne!(preflight(&server, "/v1/notifications", APP, "POST").await.status, 204);
    let answer = raw(from_app("/v1/users/alice/presence").bearer_auth(API_KEY)).await;
    assert_eq!((answer.status, header(&answer, "access-control-allow-origin")), (200, None));
    // An OPTIONS that is not a preflight learns the methods.
    let answer =
        raw(reqwest::Client::new().request(reqwest::Method::OPTIONS, format!("{}/v1/me/unread", server.http()))).await;
    assert_eq!((answer.status, header(&answer, "allow")), (204, Some("GET, HEAD, OPTIONS")));
    // Without an Origin (not a browser), nothing changes.
    let answer =
        raw(reqwest::Client::new().get(format!("{}/v1/me/unread", server.http())).bearer_auth(server.token("alice")))
            .await;
    assert_eq!((answer.status, header(&answer, "access-control-allow-origin")), (200, None));
    server.stop().await;
}

#[tokio::test]
async fn only_the_allowed_origins_may_call_the_users_routes_when_they_are_set() {
    let server = TestServer::start_with(&[("HERALD_ALLOWED_ORIGINS", APP)]).await;
    assert_eq!(preflight(&server, "/v1/me/unread", APP, "GET").await.status, 204);
    let refused = preflight(&server, "/v1/me/unread", "https://evil.example", "GET").await;
    assert_eq!((refused.status, refused.error_code()), (403, "origin_not_allowed"));
    assert_eq!(header(&refused, "access-control-allow-origin"), None);
    // An actual request from elsewhere is answered (it changes nothing), but
    // without CORS headers, so the browser keeps the answer from that page.
    let answer = raw(reqwest::Client::new()
        .get(format!("{}/v1/me/unread", server.http()))
        .header("origin", "https://evil.example")
        .bearer_auth(server.token("alice")))
    .await;
    assert_eq!((answer.status, header(&answer, "access-control-allow-origin")), (200, None));
    server.stop().await;
}
