//! The high-level `Client` against a scripted server: duplicates, resuming,
//! close codes, dead connections, refresh, read marks, a slow consumer.
//! (The same client against the real server: `server/tests/rust_client.rs`.)

mod fake;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fake::{note, welcome, Fake, WAIT};
use futures_util::StreamExt as _;
use herald_client::{Client, ClientBuilder, Error, Event, ReadMark, State};
use serde_json::json;

fn builder(fake: &Fake) -> ClientBuilder {
    Client::builder(&fake.url).token("t").backoff(Duration::from_millis(10), Duration::from_millis(100))
}

/// A provider answering `tok-1`, `tok-2`, … and counting its calls.
fn counting() -> (Arc<AtomicUsize>, impl Fn() -> std::future::Ready<Result<String, Error>> + Send + Sync + 'static) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let provider = move || std::future::ready(Ok(format!("tok-{}", counter.fetch_add(1, Ordering::SeqCst) + 1)));
    (calls, provider)
}

async fn next(client: &Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event()).await.expect("an event in time").expect("the client runs")
}

async fn next_seq(client: &Client) -> i64 {
    match next(client).await {
        Event::Notification(n) => n.seq,
        other => panic!("expected a notification, got {other:?}"),
    }
}

async fn connected(client: &Client) {
    match next(client).await {
        Event::State(State::Connected(_)) => {}
        other => panic!("expected Connected, got {other:?}"),
    }
}

async fn disconnected(client: &Client) -> (Option<u16>, String) {
    match next(client).await {
        Event::State(State::Disconnected { code, reason, .. }) => (code, reason),
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

#[tokio::test]
async fn duplicates_are_dropped_and_a_reconnect_resumes_after_the_last_seq() {
    let fake = Fake::start().await;
    let client = builder(&fake).build().unwrap();
    let mut conn = fake.accept().await;
    assert_eq!(conn.since, None);
    conn.send(welcome("alice", 0, 25)).await;
    for seq in [1, 2, 2, 1, 3] {
        conn.send(note(seq)).await;
    }
    connected(&client).await;
    for seq in 1..=3 {
        assert_eq!(next_seq(&client).await, seq);
    }
    conn.close(1013, "try again later").await;
    assert_eq!(disconnected(&client).await.0, Some(1013));

    let mut conn = fake.accept().await;
    assert_eq!(conn.since, Some(3), "resumes after the last seq handed over");
    conn.send(welcome("alice", 4, 25)).await;
    conn.send(note(3)).await;
    conn.send(note(4)).await;
    connected(&client).await;
    assert_eq!(next_seq(&client).await, 4);
    assert_eq!(client.last_seq(), Some(4));
}

#[tokio::test]
async fn without_since_a_reconnect_resumes_from_the_first_welcome() {
    let fake = Fake::start().await;
    let client = builder(&fake).build().unwrap();
    let mut conn = fake.accept().await;
    conn.send(welcome("alice", 41, 25)).await;
    connected(&client).await;
    assert_eq!(client.last_seq(), Some(41));
    conn.close(1001, "going away").await;
    assert_eq!(disconnected(&client).await.0, Some(1001));
    assert_eq!(fake.accept().await.since, Some(41));
}

/// The store epoch comes with the welcome and goes back with `since`; a
/// welcome resuming below the client's cursor (a restore) moves it back and
/// says so, and what follows is delivered though its seqs were seen.
#[tokio::test]
async fn the_epoch_is_sent_back_and_a_restore_rewinds_to_the_fork() {
    let fake = Fake::start().await;
    let client = builder(&fake).since(8).epoch("e0").build().unwrap();
    let mut conn = fake.accept().await;
    assert_eq!((conn.since, conn.epoch.as_deref()), (Some(8), Some("e0")));
    let mut w = welcome("alice", 7, 25);
    w["epoch"] = json!("e1");
    w["since"] = json!(5);
    conn.send(w).await;
    conn.send(note(6)).await;
    connected(&client).await;
    match next(&client).await {
        Event::Rewound { since: 8, last_seq: 5 } => {}
        other => panic!("expected Rewound from 8 to 5, got {other:?}"),
    }
    assert_eq!(next_seq(&client).await, 6);
    assert_eq!((client.last_seq(), client.epoch().as_deref()), (Some(6), Some("e1")));
    conn.close(1013, "try again later").await;
    assert_eq!(disconnected(&client).await.0, Some(1013));
    let conn = fake.accept().await;
    assert_eq!((conn.since, conn.epoch.as_deref()), (Some(6), Some("e1")));
    client.close().await;
    drop(conn);

    // A cursor of 9 from before a restore whose fork retention has since
    // purged past: the server resumes after the oldest retained seq less one
    // (7), still below 9, and says truncated. The client follows it.
    let client = builder(&fake).since(9).epoch("e1").build().unwrap();
    let mut conn = fake.accept().await;
    let mut w = welcome("alice", 12, 25);
    (w["epoch"], w["since"], w["truncated"], w["oldest_seq"]) = (json!("e2"), json!(7), json!(true), json!(8));
    conn.send(w).await;
    conn.send(note(8)).await;
    connected(&client).await;
    match next(&client).await {
        Event::Rewound { since: 9, last_seq: 7 } => {}
        other => panic!("expected Rewound from 9 to 7, got {other:?}"),
    }
    assert_eq!(next_seq(&client).await, 8, "seq 8 of the new history is delivered");
}

#[tokio::test]
async fn a_starting_seq_is_sent_and_truncation_is_reported() {
    let fake = Fake::start().await;
    let client = builder(&fake).since(5).build().unwrap();
    let mut conn = fake.accept().await;
    assert_eq!(conn.since, Some(5));
    let mut w = welcome("alice", 30, 25);
    w["truncated"] = json!(true);
    w["oldest_seq"] = json!(20);
    conn.send(w).await;
    conn.send(note(20)).await;
    connected(&client).await;
    assert!(matches!(next(&client).await, Event::Truncated { since: 5, oldest_seq: 20 }));
    assert_eq!(next_seq(&client).await, 20);
}

#[tokio::test]
async fn a_silent_connection_is_found_dead_and_replaced() {
    let fake = Fake::start().await;
    let client = builder(&fake).build().unwrap();
    let mut conn = fake.accept().await;
    conn.send(welcome("alice", 0, 1)).await;
    connected(&client).await;
    // The client pings every heartbeat; nobody answers.
    assert_eq!(conn.recv().await["type"], "ping");
    let started = tokio::time::Instant::now();
    let (code, reason) = disconnected(&client).await;
    assert_eq!(code, None);
    assert!(reason.contains("three heartbeats"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    fake.accept().await;
}

#[tokio::test]
async fn forbidden_stops_the_client_with_an_error() {
    let fake = Fake::start().await;
    let client = builder(&fake).build().unwrap();
    let mut conn = fake.accept().await;
    conn.send(welcome("alice", 0, 25)).await;
    connected(&client).await;
    conn.close(4003, "forbidden").await;
    match next(&client).await {
        Event::Error(Error::Closed { code: 4003, .. }) => {}
        other => panic!("expected the 4003 error, got {other:?}"),
    }
    assert!(client.next_event().await.is_none(), "the stream ends");
    assert!(fake.accept_within(Duration::from_millis(500)).await.is_none(), "no reconnect");
    assert!(matches!(client.mark_read(ReadMark::UpTo { up_to_seq: 1 }).await, Err(Error::Stopped)));
}

#[tokio::test]
async fn a_401_with_a_new_token_stops_but_a_503_is_retried() {
    let fake = Fake::start().await;
    let client = builder(&fake).build().unwrap();
    fake.refuse(503, "draining").await;
    let (_, reason) = disconnected(&client).await;
    assert!(reason.contains("draining"), "{reason}");
    fake.refuse(401, "token_expired").await;
    match next(&client).await {
        Event::Error(Error::Refused { status: 401, code, .. }) => assert_eq!(code, "token_expired"),
        other => panic!("expected the 401, got {other:?}"),
    }
    assert!(client.next_event().await.is_none());
}

#[tokio::test]
async fn close_4001_fetches_a_new_token_and_resumes() {
    let fake = Fake::start().await;
    let (calls, provider) = counting();
    let client = builder(&fake).token_provider(provider).build().unwrap();
    let mut conn = fake.accept().await;
    assert_eq!(conn.authorization.as_deref(), Some("Bearer tok-1"));
    conn.send(welcome("alice", 0, 25)).await;
    conn.send(note(1)).await;
    connected(&client).await;
    assert_eq!(next_seq(&client).await, 1);
    conn.close(4001, "token expired").await;
    assert_eq!(disconnected(&client).await.0, Some(4001));
    let conn = fake.accept().await;
    assert_eq!((conn.authorization.as_deref(), conn.since), (Some("Bearer tok-2"), Some(1)));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn token_expiring_is_answered_with_an_in_band_refresh() {
    let fake = Fake::start().await;
    let (calls, provider) = counting();
    let client = builder(&fake).token_provider(provider).build().unwrap();
    let mut conn = fake.accept().await;
    conn.send(welcome("alice", 0, 25)).await;
    connected(&client).await;
    conn.send(json!({"type": "token_expiring", "expires_at": 1})).await;
    let refresh = conn.recv_non_ping().await;
    assert_eq!((refresh["type"].as_str(), refresh["token"].as_str()), (Some("refresh"), Some("tok-2")));
    conn.send(json!({"type": "ok", "ref": refresh["ref"]})).await;
    assert!(matches!(next(&client).await, Event::State(State::Refreshed)));
    conn.send(note(1)).await;
    assert_eq!(next_seq(&client).await, 1, "the same session goes on");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// No refresh loop: not with the current token, not twice within seconds.
#[tokio::test]
async fn token_expiring_is_not_answered_in_a_loop() {
    let fake = Fake::start().await;
    let client = builder(&fake).build().unwrap(); // a fixed token
    let mut conn = fake.accept().await;
    conn.send(welcome("alice", 0, 25)).await;
    connected(&client).await;
    conn.send(json!({"type": "token_expiring", "expires_at": 1})).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), conn.recv()).await.is_err(),
        "refreshed with the same token"
    );

    let fake = Fake::start().await;
    let (calls, provider) = counting();
    let client = builder(&fake).token_provider(provider).build().unwrap();
    let mut conn = fake.accept().await;
    conn.send(welcome("alice", 0, 25)).await;
    connected(&client).await;
    conn.send(json!({"type": "token_expiring", "expires_at": 1})).await;
    let refresh = conn.recv_non_ping().await;
    conn.send(json!({"type": "ok", "ref": refresh["ref"]})).await;
    assert!(matches!(next(&client).await, Event::State(State::Refreshed)));
    // The new token expires within a minute too: the server warns again at once.
    conn.send(json!({"type": "token_expiring", "expires_at": 2})).await;
    assert!(tokio::time::timeout(Duration::from_millis(300), conn.recv()).await.is_err(), "refreshed again");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn mark_read_awaits_its_answer_and_is_sent_again_after_a_reconnect() {
    let fake = Fake::start().await;
    let client = builder(&fake).build().unwrap();
    let mut conn = fake.accept().await;
    conn.send(welcome("alice", 3, 25)).await;
    connected(&client).await;

    let marking = tokio::spawn({
        let client = client.clone();
        async move { client.mark_read(ReadMark::UpTo { up_to_seq: 2 }).await }
    });
    let read = conn.recv_non_ping().await;
    assert_eq!((read["type"].as_str(), read["up_to_seq"].as_i64()), (Some("read"), Some(2)));
    conn.send(json!({"type": "ok", "ref": read["ref"]})).await;
    marking.await.unwrap().unwrap();

    // Unanswered when the session ends: sent again on the next one.
    let marking = tokio::spawn({
        let client = client.clone();
        async move { client.mark_read(ReadMark::Seqs { seqs: vec![3] }).await }
    });
    assert_eq!(conn.recv_non_ping().await["seqs"], json!([3]));
    conn.close(1013, "try again later").await;
    let mut conn = fake.accept().await;
    conn.send(welcome("alice", 3, 25)).await;
    let again = conn.recv_non_ping().await;
    assert_eq!(again["seqs"], json!([3]));
    conn.send(json!({"type": "error", "ref": again["ref"], "code": "unavailable", "message": "retry"})).await;
    match marking.await.unwrap() {
        Err(Error::Rejected { code, .. }) => assert_eq!(code, "unavailable"),
        other => panic!("expected the rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn close_sends_1000_and_ends_the_stream() {
    let fake = Fake::start().await;
    let client = builder(&fake).build().unwrap();
    let mut conn = fake.accept().await;
    conn.send(welcome("alice", 0, 25)).await;
    connected(&client).await;
    let closing = tokio::spawn({
        let client = client.clone();
        async move { client.close().await }
    });
    assert_eq!(conn.close_code().await, 1000);
    drop(conn);
    tokio::time::timeout(WAIT, closing).await.expect("close returns").unwrap();
    assert!(client.next_event().await.is_none());
}

/// A consumer far behind costs a reconnect with `since`, never a notification.
#[tokio::test]
async fn a_slow_consumer_gets_every_notification_once_in_order() {
    const LAST: i64 = 200;
    let fake = Fake::start().await;
    let client = builder(&fake).since(0).event_capacity(8).build().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let server = tokio::spawn({
        let connections = connections.clone();
        async move {
            loop {
                let mut conn = fake.accept().await;
                connections.fetch_add(1, Ordering::SeqCst);
                let since = conn.since.expect("always resumes");
                conn.send(welcome("alice", LAST, 25)).await;
                for seq in since + 1..=LAST {
                    conn.send(note(seq)).await;
                }
                tokio::spawn(async move { while conn.ws.next().await.is_some() {} });
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await; // let the channel overflow
    let mut seqs = Vec::new();
    while seqs.last() != Some(&LAST) {
        match next(&client).await {
            Event::Notification(n) => seqs.push(n.seq),
            Event::State(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seqs, (1..=LAST).collect::<Vec<_>>());
    client.close().await;
    server.abort();
    assert!(connections.load(Ordering::SeqCst) >= 2, "the overflow cost at least one reconnect");
}
