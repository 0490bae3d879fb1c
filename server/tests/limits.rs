//! Abuse limits against a real node: handshake rate per IP (through a trusted
//! proxy's X-Forwarded-For), session caps per IP and per user, the frame rate
//! per session (4029), the publish rate per API key (429 with Retry-After and
//! X-RateLimit-*, nothing stored), shared across nodes through Redis and
//! falling back to each node's own limiter when Redis is gone; and the
//! connection limits (header timeout, header size).

mod common;
mod services;

use common::*;
use herald_client::{ClientFrame, Connect, ServerFrame};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A raw upgrade request, as a browser behind the proxy at 127.0.0.1 would send it.
fn upgrade(server: &TestServer, user: &str, forwarded_for: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .get(format!("{}/v1/ws", server.http()))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("authorization", format!("Bearer {}", server.token(user)))
        .header("x-forwarded-for", forwarded_for)
}

fn assert_rate_limited(raw: &Raw) -> u64 {
    assert_eq!(raw.status, 429, "{}", raw.body);
    assert_eq!(raw.error_code(), "rate_limited");
    let retry: u64 = raw.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "Retry-After {retry}");
    retry
}

#[tokio::test]
async fn handshakes_per_ip_are_limited_before_the_token_is_read_and_per_forwarded_client() {
    let server =
        TestServer::start_with(&[("HERALD_LIMIT_HANDSHAKES_PER_IP", "3/min"), ("HERALD_TRUSTED_PROXIES", "127.0.0.1")])
            .await;
    for _ in 0..3 {
        let raw = raw(upgrade(&server, "alice", "203.0.113.1")).await;
        assert_eq!(raw.status, 101, "{}", raw.body);
    }
    let refused = raw(upgrade(&server, "alice", "203.0.113.1")).await;
    let retry = assert_rate_limited(&refused);
    assert!((15..=20).contains(&retry), "one handshake every 20 s: Retry-After {retry}");
    // Refused before the token: even a garbage token gets 429, not 401.
    let garbage = raw(upgrade(&server, "alice", "203.0.113.1").header("authorization", "Bearer nonsense")).await;
    assert_rate_limited(&garbage);
    // Another client behind the same proxy has its own allowance.
    assert_eq!(raw(upgrade(&server, "alice", "203.0.113.2")).await.status, 101);
    // An address the proxy did not add is not believed: the forwarded chain's
    // right-most untrusted hop is the client.
    assert_rate_limited(&raw(upgrade(&server, "alice", "198.51.100.9, 203.0.113.1")).await);
    assert_eq!(server.metric("herald_handshakes_total{outcome=\"rate_limited\"}").await, 3.0);
    assert_eq!(server.metric("herald_rate_limited_total{limit=\"handshakes_per_ip\"}").await, 3.0);
    server.stop().await;
}

#[tokio::test]
async fn session_caps_per_user_and_per_ip_refuse_the_next_session_until_one_ends() {
    let server =
        TestServer::start_with(&[("HERALD_LIMIT_SESSIONS_PER_USER", "2"), ("HERALD_LIMIT_SESSIONS_PER_IP", "3")]).await;
    let first = server.connect("alice").await;
    let _second = server.connect("alice").await;
    let refused = raw(upgrade(&server, "alice", "ignored")).await;
    assert_rate_limited(&refused);
    assert!(refused.body["error"]["message"].as_str().unwrap().contains("user"), "{}", refused.body);
    // Bob is another user, on the same IP: the third session of 127.0.0.1.
    let _bob = server.connect("bob").await;
    let refused = raw(upgrade(&server, "carol", "ignored")).await;
    assert_rate_limited(&refused);
    assert!(refused.body["error"]["message"].as_str().unwrap().contains("address"), "{}", refused.body);
    // A session that ends gives its place back.
    first.close().await.unwrap();
    eventually("alice's place is free again", || async {
        Connect::new(server.ws(), server.token("alice")).connect().await.is_ok()
    })
    .await;
    assert_eq!(server.metric("herald_rate_limited_total{limit=\"sessions_per_user\"}").await, 1.0);
    assert_eq!(server.metric("herald_rate_limited_total{limit=\"sessions_per_ip\"}").await, 1.0);
    server.stop().await;
}

#[tokio::test]
async fn a_session_sending_too_many_frames_is_closed_with_4029_and_others_are_not() {
    let server = TestServer::start_with(&[("HERALD_LIMIT_FRAMES_PER_SESSION", "5/s")]).await;
    let mut calm = server.connect("alice").await;
    let mut flood = server.connect("alice").await;
    for i in 0..50 {
        if flood.send(&ClientFrame::Ping { reference: Some(json!(i)) }).await.is_err() {
            break;
        }
    }
    let mut pongs = 0;
    let code = loop {
        match tokio::time::timeout(WAIT, flood.next_frame()).await.expect("the flood is answered") {
            Ok(ServerFrame::Pong { .. }) => pongs += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(herald_client::Error::Closed { code, .. }) => break code,
            Err(e) => panic!("ended without a close frame: {e}"),
        }
    };
    assert_eq!(code, 4029);
    assert!((1..=6).contains(&pongs), "the burst of 5 was answered before the close, got {pongs}");
    // The calm session on the same user is untouched and still delivers.
    calm.send(&ClientFrame::Ping { reference: Some(json!("calm")) }).await.unwrap();
    assert!(matches!(next(&mut calm).await, ServerFrame::Pong { .. }));
    let published = server.publish("alice", "t", json!(1)).await;
    assert_eq!(next_notification(&mut calm).await.seq, published.seq);
    eventually("the close is counted", || async {
        server.metric("herald_sessions_closed_total{code=\"4029\"}").await == 1.0
    })
    .await;
    assert_eq!(server.metric("herald_rate_limited_total{limit=\"frames_per_session\"}").await, 1.0);
    server.stop().await;
}

fn publish_request(server: &TestServer, user: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(format!("{}/v1/notifications", server.http()))
        .bearer_auth(API_KEY)
        .json(&json!({"user_id": user, "topic": "t", "payload": {"n": 1}}))
}

#[tokio::test]
async fn publishes_per_api_key_get_429_with_rate_headers_and_nothing_is_stored() {
    let server = TestServer::start_with(&[("HERALD_LIMIT_PUBLISHES_PER_KEY", "3/min")]).await;
    for remaining in [2, 1, 0] {
        let ok = raw(publish_request(&server, "alice")).await;
        assert_eq!(ok.status, 201, "{}", ok.body);
        assert_eq!(ok.headers["x-ratelimit-limit"], "3");
        assert_eq!(ok.headers["x-ratelimit-remaining"], remaining.to_string().as_str());
        let reset: u64 = ok.headers["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&reset), "reset {reset}");
    }
    let refused = raw(publish_request(&server, "alice")).await;
    let retry = assert_rate_limited(&refused);
    assert!((15..=20).contains(&retry), "Retry-After {retry}");
    assert_eq!(refused.headers["x-ratelimit-remaining"], "0");
    let history = server.publisher().history("alice", 0, 100).await.unwrap();
    assert_eq!(history.notifications.len(), 3, "the refused publish stored nothing");
    // Reading is not publishing: the history call above was not limited.
    assert_eq!(server.metric("herald_rate_limited_total{limit=\"publishes_per_key\"}").await, 1.0);
    server.stop().await;
}

#[tokio::test]
async fn the_publish_rate_is_shared_through_redis_and_falls_back_per_node_when_redis_is_gone() {
    let mut redis = services::PrivateRedis::start();
    let url = redis.url();
    let prefix = services::unique_prefix();
    let dir = tempfile::tempdir().unwrap();
    let vars = |node: &'static str| {
        vec![
            ("HERALD_REDIS_URL", url.clone()),
            ("HERALD_REDIS_PREFIX", prefix.clone()),
            ("HERALD_NODE_ID", node.to_string()),
            ("HERALD_LIMIT_PUBLISHES_PER_KEY", "4/min".to_string()),
        ]
    };
    let start = |vars: Vec<(&'static str, String)>| {
        let dir = dir.path().to_owned();
        async move {
            let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            TestServer::start_in(&dir, &vars).await
        }
    };
    let a = start(vars("a")).await;
    let b = start(vars("b")).await;
    for node in [&a, &b, &a, &b] {
        assert_eq!(raw(publish_request(node, "alice")).await.status, 201);
    }
    // The key's four are used up across the cluster, whichever node is asked.
    assert_rate_limited(&raw(publish_request(&a, "alice")).await);
    assert_rate_limited(&raw(publish_request(&b, "alice")).await);
    assert_eq!(a.metric("herald_rate_limit_fallbacks_total{limit=\"publishes_per_key\"}").await, 0.0);

    // Redis gone: each node decides alone — publishes still answer, and the
    // node's own limiter (4/min, unused so far) still holds.
    redis.stop();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(raw(publish_request(&a, "alice")).await.status);
    }
    assert_eq!(statuses, vec![201, 201, 201, 201, 429], "fails open to the node's own limit");
    assert!(a.metric("herald_rate_limit_fallbacks_total{limit=\"publishes_per_key\"}").await >= 1.0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_client_that_sends_its_headers_too_slowly_is_disconnected() {
    let server = TestServer::start_with(&[("HERALD_HEADER_TIMEOUT", "500ms")]).await;
    let mut tcp = tokio::net::TcpStream::connect(server.http().trim_start_matches("http://")).await.unwrap();
    tcp.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // Never finish the head: the node hangs up on its own (the bound here is
    // only how long the test waits, far above the setting).
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was still open after {WAIT:?}");
    // A prompt client on the same node is served.
    assert_eq!(reqwest::get(format!("{}/healthz", server.http())).await.unwrap().status(), 200);
    server.stop().await;
}

/// A connection that never sends a byte is closed after the header timeout
/// too (before the first byte, hyper's own timeout is not running yet).
#[tokio::test]
async fn a_client_that_connects_and_says_nothing_is_disconnected() {
    let server = TestServer::start_with(&[("HERALD_HEADER_TIMEOUT", "500ms")]).await;
    let mut silent = tokio::net::TcpStream::connect(server.http().trim_start_matches("http://")).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, silent.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the silent connection was still open after {WAIT:?}");
    // One that waits less than the timeout, then asks, is served.
    let mut prompt = tokio::net::TcpStream::connect(server.http().trim_start_matches("http://")).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    prompt.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, prompt.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    server.stop().await;
}

/// HTTP/2 has no "next request's headers" for hyper's header timeout to
/// time: a connection with no request in flight for `HERALD_HEADER_TIMEOUT`
/// is closed (one that sent the preface and nothing more would otherwise
/// hold its socket, and its connection slot, for ever), but never while a
/// request is in flight, however slowly its body comes.
#[tokio::test]
async fn an_http2_connection_is_closed_once_idle_for_the_header_timeout_never_mid_request() {
    let server = TestServer::start_with(&[("HERALD_HEADER_TIMEOUT", "500ms")]).await;
    let mut preface_only = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    preface_only.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, preface_only.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "an idle HTTP/2 connection was still open after {WAIT:?}");

    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = axum::http::Request::post(format!("{}/v1/notifications", server.http()))
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    // Four chunks 400 ms apart: the request is in flight for more than
    // three times the timeout.
    let json = br#"{"user_id":"alice","topic":"t","payload":{"slow":true}}"#;
    for chunk in json.chunks(json.len() / 4 + 1) {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        body.send_data(bytes::Bytes::copy_from_slice(chunk), false).unwrap();
    }
    body.send_data(bytes::Bytes::new(), true).unwrap();
    let response = tokio::time::timeout(WAIT, response).await.expect("answered").unwrap();
    assert_eq!(response.status(), 201);
    // Idle again: closed.
    let ended = tokio::time::timeout(WAIT, connection).await;
    assert!(ended.is_ok(), "the HTTP/2 connection was still open {WAIT:?} after its last request");
    assert_eq!(server.publisher().history("alice", 0, 10).await.unwrap().last_seq, 1);
    server.stop().await;
}

/// A publisher that sends its headers and then stalls the body gets 408
/// with the error body after `HERALD_BODY_TIMEOUT`, and nothing is stored.
#[tokio::test]
async fn a_body_that_stalls_gets_408_and_stores_nothing() {
    let server = TestServer::start_with(&[("HERALD_BODY_TIMEOUT", "500ms")]).await;
    let mut tcp = tokio::net::TcpStream::connect(server.http().trim_start_matches("http://")).await.unwrap();
    let body = r#"{"user_id":"alice","topic":"t","payload":{}}"#;
    let head = format!(
        "POST /v1/notifications HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body.as_bytes()[..10]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer)).await.expect("answered and closed").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert_eq!(server.publisher().history("alice", 0, 10).await.unwrap().last_seq, 0);
    server.stop().await;
}

/// A body declared larger than the limit is refused from its headers: a
/// client that asks `Expect: 100-continue` is not told to go on and send
/// it, it gets 413 with the error body at once; nothing is stored.
#[tokio::test]
async fn a_body_declared_too_large_is_refused_before_it_is_sent() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    for (path, declared) in [("/v1/notifications", 64 << 20), ("/v1/me/notifications/read", 4 << 20)] {
        let answer = post_head_only(&addr, path, API_KEY, declared).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(answer.contains(r#""code":"payload_too_large""#), "{path}: {answer}");
    }
    assert_eq!(server.publisher().history("alice", 0, 10).await.unwrap().last_seq, 0);
    server.stop().await;
}

#[tokio::test]
async fn oversized_headers_get_431_with_the_error_body() {
    let server = TestServer::start_with(&[("HERALD_MAX_HEADER_BYTES", "8192")]).await;
    let big = "x".repeat(10_000);
    let refused = raw(reqwest::Client::new().get(format!("{}/healthz", server.http())).header("x-big", &big)).await;
    assert_eq!(refused.status, 431);
    assert_eq!(refused.error_code(), "headers_too_large");
    // Far above the limit, hyper refuses before a request exists.
    let huge = "x".repeat(40_000);
    let response = reqwest::Client::new().get(format!("{}/healthz", server.http())).header("x-big", &huge).send().await;
    assert!(response.map_or(true, |r| r.status() == 431), "a huge head was served");
    let ok = reqwest::Client::new().get(format!("{}/healthz", server.http())).header("x-small", "y").send().await;
    assert_eq!(ok.unwrap().status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn with_redis_the_sessions_per_user_cap_counts_every_node() {
    let url = services::redis_url();
    let prefix = services::unique_prefix();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for node in ["a", "b"] {
        let vars = [
            ("HERALD_REDIS_URL", url.as_str()),
            ("HERALD_REDIS_PREFIX", prefix.as_str()),
            ("HERALD_NODE_ID", node),
            ("HERALD_LIMIT_SESSIONS_PER_USER", "2"),
        ];
        nodes.push(TestServer::start_in(dir.path(), &vars).await);
    }
    let _one = nodes[0].connect("alice").await;
    let _two = nodes[0].connect("alice").await;
    // Node b learns of node a's sessions through the presence counts.
    eventually("node b refuses a third session of alice", || async {
        raw(upgrade(&nodes[1], "alice", "ignored")).await.status == 429
    })
    .await;
    assert_eq!(nodes[1].metric("herald_rate_limited_total{limit=\"sessions_per_user\"}").await, 1.0);
    // Other users are not affected.
    let _bob = nodes[1].connect("bob").await;
    for node in nodes {
        node.stop().await;
    }
    services::delete_prefix(&url, &prefix);
}
