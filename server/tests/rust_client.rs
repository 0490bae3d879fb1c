//! The Rust SDK's high-level `Client` against the real server: the stream,
//! a node restart on the same port, in-band token refresh, a refused refresh
//! (4001), wss with a self-signed certificate, and read marks over the socket.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use herald_client::{Client, ClientBuilder, Connect, Error, Event, Inbox, Publisher, ReadMark, State};
use serde_json::json;
use tokio::sync::{mpsc, Mutex};

fn quick(url: String) -> ClientBuilder {
    Client::builder(url).backoff(Duration::from_millis(50), Duration::from_millis(500))
}

/// A token provider fed by the test: each call waits for the next token sent
/// on the returned channel, so the test decides what each call gets, and when.
/// Also answers how many calls the provider has had.
fn fed_provider() -> (mpsc::Sender<String>, Arc<AtomicUsize>, impl herald_client::TokenProvider) {
    let (feed, tokens) = mpsc::channel::<String>(8);
    let tokens = Arc::new(Mutex::new(tokens));
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let provider = move || {
        counter.fetch_add(1, Ordering::SeqCst);
        let tokens = tokens.clone();
        async move { tokens.lock().await.recv().await.ok_or("no more tokens") }
    };
    (feed, calls, provider)
}

async fn next(client: &Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event()).await.expect("an event in time").expect("the client runs")
}

/// Reads events until a notification, failing on anything but `State` events
/// (which are returned alongside, in order).
async fn next_notification_of(client: &Client) -> (i64, Vec<State>) {
    let mut states = Vec::new();
    loop {
        match next(client).await {
            Event::Notification(n) => return (n.seq, states),
            Event::State(s) => states.push(s),
            other => panic!("unexpected event: {other:?}"),
        }
    }
}

async fn until_connected(client: &Client) -> Vec<State> {
    let mut states = Vec::new();
    loop {
        match next(client).await {
            Event::State(s @ State::Connected(_)) => {
                states.push(s);
                return states;
            }
            Event::State(s) => states.push(s),
            other => panic!("unexpected event: {other:?}"),
        }
    }
}

fn is_disconnect(state: &State) -> bool {
    matches!(state, State::Disconnected { .. })
}

/// A full node refuses with 503 `node_full` and `Retry-After: 5`: the client
/// waits at least that long (not its own 50 ms backoff) before trying again,
/// and gets in once a place is free.
#[tokio::test]
async fn a_full_node_is_tried_again_after_its_retry_after_and_lets_the_client_in_once_a_place_frees() {
    let server = TestServer::start_with(&[("HERALD_MAX_SESSIONS", "1")]).await;
    let alice = server.connect("alice").await;
    let client = quick(server.ws()).token(server.token("bob")).build().unwrap();
    let retry_in = loop {
        match next(&client).await {
            Event::State(State::Disconnected { reason, retry_in, .. }) => {
                assert!(reason.contains("node_full"), "{reason}");
                break retry_in;
            }
            Event::State(_) => {}
            other => panic!("unexpected event: {other:?}"),
        }
    };
    assert!(retry_in >= Duration::from_secs(5), "retrying in {retry_in:?}, before the node's Retry-After");
    assert!(retry_in <= Duration::from_millis(5_500), "{retry_in:?}: Retry-After plus the backoff's jitter");
    alice.close().await.unwrap();
    let states = until_connected(&client).await;
    assert!(!states.iter().any(is_disconnect), "refused again once alice had left: {states:?}");
    assert_eq!(server.metric("herald_handshakes_total{outcome=\"node_full\"}").await, 1.0);
    client.close().await;
    server.stop().await;
}

#[tokio::test]
async fn the_stream_yields_notifications_in_order_and_close_sends_1000() {
    let server = TestServer::start().await;
    let client = Client::builder(server.ws()).token(server.token("alice")).build().unwrap();
    let states = until_connected(&client).await;
    assert!(!states.iter().any(is_disconnect), "{states:?}");
    for i in 1..=5 {
        server.publish("alice", "orders", json!({"i": i})).await;
    }
    server.publish("bob", "orders", json!({"not": "alice's"})).await;
    let mut seen = Vec::new();
    for _ in 1..=5 {
        match next(&client).await {
            Event::Notification(n) => seen.push((n.seq, n.payload["i"].as_i64().unwrap())),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, (1..=5).map(|i| (i, i)).collect::<Vec<_>>());
    assert_eq!(client.last_seq(), Some(5));

    client.close().await;
    assert!(client.next_event().await.is_none(), "the stream ends after close");
    eventually("the session closed with 1000", || async {
        server.metric("herald_sessions_closed_total{code=\"1000\"}").await == 1.0
    })
    .await;
    server.stop().await;
}

/// A `herald` process on a fixed port.
struct Node {
    child: Child,
}

impl Node {
    fn start(dir: &Path, port: u16, name: &str) -> Node {
        let log = dir.join(format!("{name}.stderr"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HERALD_LISTEN", format!("127.0.0.1:{port}"))
            .env("HERALD_DATABASE_URL", format!("sqlite://{}/herald.db", dir.display()))
            .env("HERALD_JWT_SECRET", SECRET)
            .env("HERALD_API_KEYS", API_KEY)
            .env("HERALD_DRAIN_GRACE", "0s")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("listening") {
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                panic!("herald did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Node { child }
    }

    /// SIGTERM, then waits for the exit.
    async fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "herald did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn after_a_restart_on_the_same_port_every_notification_arrives_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let node = Node::start(dir.path(), port, "first");
    let publisher = |port: u16| Publisher::new(format!("http://127.0.0.1:{port}"), API_KEY);
    let token = herald_server::auth::mint(SECRET, "alice", 3600);
    let client = quick(format!("ws://127.0.0.1:{port}")).token(token).build().unwrap();
    until_connected(&client).await;
    let mut seqs = Vec::new();
    for i in 1..=3 {
        publisher(port).publish_one("alice", "t", json!(i)).await.unwrap();
        seqs.push(next_notification_of(&client).await.0);
    }

    node.stop().await;
    match next(&client).await {
        Event::State(State::Disconnected { code: Some(1001), .. }) => {}
        other => panic!("expected a 1001 disconnect, got {other:?}"),
    }
    // While the client is away (its port is down), another node on the same
    // database takes publishes 4..=6.
    let other_port = free_port();
    let other = Node::start(dir.path(), other_port, "other");
    for i in 4..=6 {
        publisher(other_port).publish_one("alice", "t", json!(i)).await.unwrap();
    }
    other.stop().await;

    let _node = Node::start(dir.path(), port, "restarted");
    let mut states = Vec::new();
    while seqs.len() < 6 {
        let (seq, s) = next_notification_of(&client).await;
        seqs.push(seq);
        states.extend(s);
    }
    publisher(port).publish_one("alice", "t", json!(7)).await.unwrap();
    let (seq, s) = next_notification_of(&client).await;
    seqs.push(seq);
    states.extend(s);
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>(), "each once, in order");
    let connects = states.iter().filter(|s| matches!(s, State::Connected(_))).count();
    assert_eq!(connects, 1, "one reconnect: {states:?}");
    assert!(states.iter().any(is_disconnect), "attempts failed while the node was down: {states:?}");
    assert_eq!(client.last_seq(), Some(7));
    client.close().await;
}

/// `token_expiring` comes 60 s before `exp`; the client answers it with a
/// `refresh` and the session outlives the first token. (About 65 s.)
#[tokio::test]
async fn token_expiring_is_answered_in_band_and_the_session_outlives_the_first_token() {
    let server = TestServer::start().await;
    let (feed, calls, provider) = fed_provider();
    let minted_at = herald_server::auth::unix_now();
    // Under 60 s left: `token_expiring` comes right after `welcome`.
    feed.send(herald_server::auth::mint(SECRET, "alice", 4)).await.unwrap();
    feed.send(herald_server::auth::mint(SECRET, "alice", 3600)).await.unwrap();
    let client = quick(server.ws()).token_provider(provider).build().unwrap();
    let welcome = match next(&client).await {
        Event::State(State::Connected(w)) => w,
        other => panic!("{other:?}"),
    };
    let first_exp = welcome.token_expires_at;
    assert!((minted_at + 4..=minted_at + 5).contains(&first_exp), "{first_exp} vs {minted_at}");
    match tokio::time::timeout(Duration::from_secs(15), client.next_event()).await {
        Ok(Some(Event::State(State::Refreshed))) => {}
        other => panic!("expected a refresh, got {other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Past the first token's expiry, the same session still delivers.
    let now = herald_server::auth::unix_now();
    tokio::time::sleep(Duration::from_secs((first_exp + 2 - now).max(0) as u64)).await;
    let published = server.publish("alice", "t", json!("after expiry")).await;
    match tokio::time::timeout(WAIT, client.next_event()).await {
        Ok(Some(Event::Notification(n))) => assert_eq!(n.seq, published.seq),
        other => panic!("expected the notification on the same session, got {other:?}"),
    }
    assert_eq!(server.metric("herald_sessions_closed_total{code=\"4001\"}").await, 0.0);
    assert_eq!(server.metric("herald_sessions_active").await, 1.0);
    client.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_refused_refresh_4001_gets_a_new_token_and_resumes_after_the_last_seq() {
    let server = TestServer::start().await;
    let (feed, calls, provider) = fed_provider();
    // Less than 60 s left: the server sends token_expiring at once.
    feed.send(herald_server::auth::mint(SECRET, "alice", 30)).await.unwrap();
    let client = quick(server.ws()).token_provider(provider).build().unwrap();
    until_connected(&client).await;
    for i in 1..=2 {
        server.publish("alice", "t", json!(i)).await;
        assert_eq!(next_notification_of(&client).await.0, i);
    }
    // The refresh carries another user's token: the server closes with 4001.
    feed.send(herald_server::auth::mint(SECRET, "bob", 3600)).await.unwrap();
    match next(&client).await {
        Event::State(State::Disconnected { code: Some(4001), .. }) => {}
        other => panic!("expected a 4001 disconnect, got {other:?}"),
    }
    // The client now waits on the provider for a new token: publish meanwhile.
    server.publish("alice", "t", json!(3)).await;
    feed.send(herald_server::auth::mint(SECRET, "alice", 3600)).await.unwrap();
    let (seq, states) = next_notification_of(&client).await;
    assert_eq!(seq, 3, "resumed with since=2: {states:?}");
    assert!(matches!(states.as_slice(), [State::Connected(w)] if w.user_id == "alice"), "{states:?}");
    server.publish("alice", "t", json!(4)).await;
    assert_eq!(next_notification_of(&client).await, (4, vec![]));
    assert_eq!(calls.load(Ordering::SeqCst), 3, "first token, the refused refresh, the reconnect");
    client.close().await;
    server.stop().await;
}

#[tokio::test]
async fn wss_with_a_self_signed_certificate_is_trusted_only_when_given() {
    let dir = tempfile::tempdir().unwrap();
    let self_signed = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_pem = self_signed.cert.pem();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, self_signed.signing_key.serialize_pem()).unwrap();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let server = TestServer::start_in(dir.path(), &[("HERALD_TLS_CERT", &cert), ("HERALD_TLS_KEY", &key)]).await;
    let (wss, https) =
        (format!("wss://localhost:{}", server.addr.port()), format!("https://localhost:{}", server.addr.port()));

    let client = Client::builder(&wss).token(server.token("alice")).root_certificate(cert_pem.clone()).build().unwrap();
    until_connected(&client).await;
    let publisher = Publisher::with_root_certificate(&https, API_KEY, cert_pem.clone()).unwrap();
    let published = publisher.publish_one("alice", "tls", json!({"over": "wss"})).await.unwrap();
    assert_eq!(next_notification_of(&client).await.0, published.seq);
    let inbox =
        Inbox::with_tls(&https, server.token("alice"), &herald_client::TlsOptions::new().root_certificate(cert_pem))
            .unwrap();
    assert_eq!(inbox.unread().await.unwrap().total, 1);
    client.close().await;

    // Without the certificate: a TLS error, not a retry loop.
    let untrusting = quick(wss.clone()).token(server.token("alice")).build().unwrap();
    match next(&untrusting).await {
        Event::Error(Error::Tls(message)) => assert!(message.contains("UnknownIssuer"), "{message}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert!(untrusting.next_event().await.is_none());
    match Connect::new(&wss, server.token("alice")).connect().await {
        Err(Error::Tls(message)) => assert!(message.contains("certificate"), "{message}"),
        other => panic!("expected a TLS error, got {:?}", other.map(|_| ())),
    }
    match Publisher::new(&https, API_KEY).publish_one("alice", "tls", json!(1)).await {
        Err(Error::Tls(message)) => assert!(message.contains("certificate"), "{message}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn mark_read_over_the_socket_updates_the_unread_count() {
    let server = TestServer::start().await;
    let client = Client::builder(server.ws()).token(server.token("alice")).build().unwrap();
    until_connected(&client).await;
    for i in 1..=3 {
        server.publish("alice", "orders", json!(i)).await;
        assert_eq!(next_notification_of(&client).await.0, i);
    }
    assert_eq!(server.inbox("alice").unread().await.unwrap().total, 3);

    client.mark_read(ReadMark::UpTo { up_to_seq: 2 }).await.unwrap();
    let unread = server.inbox("alice").unread().await.unwrap();
    assert_eq!((unread.total, unread.by_topic.get("orders").copied()), (1, Some(1)));
    match next(&client).await {
        Event::Read(ReadMark::UpTo { up_to_seq: 2 }) => {}
        other => panic!("expected the read echo, got {other:?}"),
    }
    client.mark_read(ReadMark::Seqs { seqs: vec![3] }).await.unwrap();
    assert_eq!(server.inbox("alice").unread().await.unwrap().total, 0);
    match next(&client).await {
        Event::Read(ReadMark::Seqs { seqs }) => assert_eq!(seqs, [3]),
        other => panic!("expected the read echo, got {other:?}"),
    }

    // By topic: the client sends `topic`; the echo names the seqs it marked.
    server.publish("alice", "likes", json!(4)).await;
    server.publish("alice", "orders", json!(5)).await;
    for _ in 0..2 {
        next_notification_of(&client).await;
    }
    client.mark_read(ReadMark::Topic { topic: "likes".into(), up_to_seq: None }).await.unwrap();
    match next(&client).await {
        Event::Read(ReadMark::Seqs { seqs }) => assert_eq!(seqs, [4]),
        other => panic!("expected the read echo, got {other:?}"),
    }
    let unread = server.inbox("alice").unread().await.unwrap();
    assert_eq!((unread.total, unread.by_topic.get("orders").copied()), (1, Some(1)));

    // A mark the server refuses comes back as its error.
    match client.mark_read(ReadMark::Seqs { seqs: vec![] }).await {
        Err(Error::Rejected { code, .. }) => assert_eq!(code, "bad_frame"),
        other => panic!("expected bad_frame, got {other:?}"),
    }
    client.close().await;
    server.stop().await;
}
