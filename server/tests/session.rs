//! Client frames, token expiry, liveness and slow clients (spec §2).

mod common;

use std::time::Duration;

use common::*;
use herald_client::{ClientFrame, Connect, ReadMark, ServerFrame};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn ping_gets_pong_with_the_ref() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.send(&ClientFrame::Ping { reference: Some(json!(7)) }).await.unwrap();
    assert_eq!(next(&mut alice).await, ServerFrame::Pong { reference: Some(json!(7)) });
    alice.send_text(r#"{"type":"ping"}"#).await.unwrap();
    assert_eq!(next(&mut alice).await, ServerFrame::Pong { reference: None });
    server.stop().await;
}

/// A WebSocket-level ping (RFC 6455 §5.5.2, what non-browser clients and
/// proxies send) is answered at once with its payload, with nothing else to
/// flush it out: the session's writes are buffered until a flush.
#[tokio::test]
async fn a_protocol_ping_gets_its_pong_at_once() {
    use futures_util::{SinkExt, StreamExt};
    let server = TestServer::start().await;
    let (mut ws, _welcome) = raw_session(&server, "alice", "").await;
    for payload in [&b"first"[..], &b"second"[..]] {
        ws.send(Message::Ping(payload.to_vec().into())).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
        let answer = answer.expect("no pong within 5 s").unwrap().unwrap();
        assert_eq!(answer, Message::Pong(payload.to_vec().into()));
    }
    server.stop().await;
}

#[tokio::test]
async fn malformed_and_unknown_frames_get_an_error_and_the_session_stays() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let cases = [
        (r#"{"type":"dance","ref":1}"#, Some(json!(1)), "unknown_type"),
        (r#"{"type":"read","ref":"two"}"#, Some(json!("two")), "bad_frame"),
        (r#"{"type":"refresh","ref":3}"#, Some(json!(3)), "bad_frame"),
        (r#"{"ref":4}"#, Some(json!(4)), "bad_frame"),
        ("not json at all", None, "bad_frame"),
    ];
    for (text, reference, code) in cases {
        alice.send_text(text).await.unwrap();
        match next(&mut alice).await {
            ServerFrame::Error { reference: r, code: c, message } => {
                assert_eq!((r, c.as_str()), (reference, code), "for {text}");
                assert!(!message.is_empty());
            }
            other => panic!("for {text}: {other:?}"),
        }
    }
    alice.send_message(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert!(matches!(next(&mut alice).await, ServerFrame::Error { ref code, .. } if code == "bad_frame"));
    // Still alive, and still delivering.
    server.publish("alice", "t", json!(1)).await;
    assert_eq!(next_notification(&mut alice).await.seq, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_keeps_sending_garbage_is_closed_with_1008() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    for i in 0..20 {
        if alice.send_text(format!("garbage {i}")).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut alice).await, 1008);
    server.stop().await;
}

#[tokio::test]
async fn a_frame_over_the_limit_is_closed_with_1009() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let huge = format!(r#"{{"type":"ping","ref":"{}"}}"#, "x".repeat(64 * 1024));
    alice.send_text(huge).await.unwrap();
    assert_eq!(close_code(&mut alice).await, 1009);
    // A frame just under the limit is fine.
    let mut bob = server.connect("bob").await;
    let fits = format!(r#"{{"type":"ping","ref":"{}"}}"#, "x".repeat(60 * 1024));
    bob.send_text(fits).await.unwrap();
    assert!(matches!(next(&mut bob).await, ServerFrame::Pong { .. }));
    server.stop().await;
}

#[tokio::test]
async fn a_read_frame_is_persisted_acknowledged_and_told_to_the_other_sessions() {
    let server = TestServer::start().await;
    for i in 1..=3 {
        server.publish("alice", "t", json!(i)).await;
    }
    let mut phone = server.connect("alice").await;
    let mut laptop = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    phone
        .send(&ClientFrame::Read { seqs: Some(vec![1, 2]), up_to_seq: None, topic: None, reference: Some(json!(9)) })
        .await
        .unwrap();
    let mut got_ok = false;
    let mut got_read = false;
    for _ in 0..2 {
        match next(&mut phone).await {
            ServerFrame::Ok { reference } => got_ok = reference == json!(9),
            ServerFrame::Read(ReadMark::Seqs { seqs }) => got_read = seqs == vec![1, 2],
            other => panic!("{other:?}"),
        }
    }
    assert!(got_ok && got_read);
    assert_eq!(next(&mut laptop).await, ServerFrame::Read(ReadMark::Seqs { seqs: vec![1, 2] }));
    assert!(bob.next_frame_within(Duration::from_millis(200)).await.unwrap().is_none(), "another user was told");
    let unread = server.inbox("alice").unread().await.unwrap();
    assert_eq!(unread.total, 1);
    // Replay shows the read state.
    let mut again = server.connect_since("alice", 0).await;
    let replayed = notifications(&mut again, 3).await;
    assert_eq!(replayed.iter().map(|n| n.read).collect::<Vec<_>>(), vec![true, true, false]);
    // up_to_seq, and an invalid mark.
    phone
        .send(&ClientFrame::Read { seqs: None, up_to_seq: Some(3), topic: None, reference: Some(json!(10)) })
        .await
        .unwrap();
    assert_eq!(next(&mut laptop).await, ServerFrame::Read(ReadMark::UpTo { up_to_seq: 3 }));
    assert_eq!(server.inbox("alice").unread().await.unwrap().total, 0);
    laptop.send_text(r#"{"type":"read","seqs":[0],"ref":11}"#).await.unwrap();
    assert!(matches!(next(&mut laptop).await, ServerFrame::Error { reference: Some(r), .. } if r == json!(11)));
    server.stop().await;
}

#[tokio::test]
async fn a_short_token_gets_token_expiring_then_4001_at_exp() {
    let server = TestServer::start().await;
    let token = herald_server::auth::mint(SECRET, "alice", 3);
    let mut alice = Connect::new(server.ws(), token).connect().await.unwrap();
    let expires_at = alice.welcome().token_expires_at;
    assert_eq!(next(&mut alice).await, ServerFrame::TokenExpiring { expires_at });
    assert_eq!(close_code(&mut alice).await, 4001);
    server.stop().await;
}

/// An `exp` far beyond any clock (up to `i64::MAX` seconds) is simply a long
/// life, not an overflow that ends the session at once.
#[tokio::test]
async fn a_token_expiring_in_the_far_future_keeps_its_session() {
    let server = TestServer::start().await;
    for exp in [10_i64.pow(16), i64::MAX / 1000 + 1, i64::MAX] {
        let claims = json!({"sub": "alice", "exp": exp});
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap();
        let mut alice = Connect::new(server.ws(), token).connect().await.unwrap();
        assert_eq!(alice.welcome().token_expires_at, exp);
        let quiet = alice.next_frame_within(Duration::from_secs(1)).await;
        assert!(matches!(quiet, Ok(None)), "exp {exp}: {quiet:?}");
        alice.send(&ClientFrame::Ping { reference: None }).await.unwrap();
        assert!(matches!(next(&mut alice).await, ServerFrame::Pong { .. }), "exp {exp}");
    }
    server.stop().await;
}

/// A client's close frame is answered with the server's (RFC 6455 §5.5.1),
/// so the client sees a clean close, not 1006.
#[tokio::test]
async fn a_clients_close_is_echoed() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let server = TestServer::start().await;
    let (mut ws, _welcome) = raw_session(&server, "alice", "").await;
    ws.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() }))).await.unwrap();
    let echo = tokio::time::timeout(WAIT, ws.next()).await.expect("an answer to the close");
    match echo {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the close echoed, got {other:?}"),
    }
    server.stop().await;
}

/// Frames that break the WebSocket protocol itself close the session with
/// the RFC's codes — 1007 for text that is not UTF-8, 1002 for the rest —
/// instead of dropping the connection; the node goes on serving.
#[tokio::test]
async fn protocol_violations_close_with_1002_or_1007() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let server = TestServer::start().await;
    let cases = [
        (
            "text that is not UTF-8",
            Frame::message(&b"{\"type\":\"ping\",\"x\":\"\xff\"}"[..], OpCode::Data(Data::Text), true),
            1007,
        ),
        ("a reserved opcode", Frame::message(&b"x"[..], OpCode::Data(Data::Reserved(3)), true), 1002),
        ("a control frame over 125 bytes", Frame::ping(vec![b'p'; 126]), 1002),
        (
            "a continuation with nothing to continue",
            Frame::message(&b"x"[..], OpCode::Data(Data::Continue), true),
            1002,
        ),
    ];
    for (what, frame, code) in cases {
        let (mut ws, _welcome) = raw_session(&server, "alice", "").await;
        ws.send(Message::Frame(frame)).await.unwrap();
        let answer = tokio::time::timeout(WAIT, ws.next()).await.expect("an answer");
        match answer {
            Some(Ok(Message::Close(Some(close)))) => assert_eq!(u16::from(close.code), code, "{what}"),
            other => panic!("{what}: expected close {code}, got {other:?}"),
        }
    }
    let mut alice = server.connect("alice").await;
    alice.send(&ClientFrame::Ping { reference: None }).await.unwrap();
    assert!(matches!(next(&mut alice).await, ServerFrame::Pong { .. }));
    server.stop().await;
}

#[tokio::test]
async fn refresh_with_the_same_sub_extends_the_session() {
    let server = TestServer::start().await;
    let mut alice = Connect::new(server.ws(), herald_server::auth::mint(SECRET, "alice", 2)).connect().await.unwrap();
    assert!(matches!(next(&mut alice).await, ServerFrame::TokenExpiring { .. }));
    let fresh = herald_server::auth::mint(SECRET, "alice", 3600);
    alice.send(&ClientFrame::Refresh { token: fresh, reference: Some(json!(1)) }).await.unwrap();
    assert_eq!(next(&mut alice).await, ServerFrame::Ok { reference: json!(1) });
    // Past the first token's exp, the session lives on.
    assert!(alice.next_frame_within(Duration::from_secs(3)).await.unwrap().is_none());
    alice.send(&ClientFrame::Ping { reference: None }).await.unwrap();
    assert!(matches!(next(&mut alice).await, ServerFrame::Pong { .. }));
    server.stop().await;
}

#[tokio::test]
async fn refresh_for_another_sub_or_with_a_bad_token_closes_with_4001() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.send(&ClientFrame::Refresh { token: server.token("mallory"), reference: None }).await.unwrap();
    assert_eq!(close_code(&mut alice).await, 4001);
    let mut alice = server.connect("alice").await;
    alice.send(&ClientFrame::Refresh { token: "not.a.jwt".into(), reference: None }).await.unwrap();
    assert_eq!(close_code(&mut alice).await, 4001);
    let mut alice = server.connect("alice").await;
    let expired = herald_server::auth::mint(SECRET, "alice", -5);
    alice.send(&ClientFrame::Refresh { token: expired, reference: None }).await.unwrap();
    assert_eq!(close_code(&mut alice).await, 4001);
    server.stop().await;
}

#[tokio::test]
async fn a_silent_peer_is_closed_after_three_heartbeats_and_a_live_one_is_not() {
    let server = TestServer::start_with(&[("HERALD_HEARTBEAT_SECS", "1")]).await;
    let mut silent = server.connect("alice").await;
    let mut live = server.connect("bob").await;
    assert_eq!(live.welcome().heartbeat_secs, 1);
    // `live` reads (and so answers the server's pings); `silent` does not read at all.
    assert!(live.next_frame_within(Duration::from_secs(5)).await.unwrap().is_none());
    live.send(&ClientFrame::Ping { reference: None }).await.unwrap();
    assert!(matches!(next(&mut live).await, ServerFrame::Pong { .. }));
    assert_eq!(close_code(&mut silent).await, 1013);
    server.stop().await;
}

/// A client that stops reading is closed with 1013; reconnecting with
/// `since` it gets everything it had not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_gets_1013_and_loses_nothing() {
    let server = TestServer::start_with(&[("HERALD_OUTBOX_CAPACITY", "8")]).await;
    let mut slow = server.connect("alice").await;
    let mut fast = server.connect("bob").await;
    let payload = json!({"blob": "b".repeat(32 * 1024)});
    let mut published = 0;
    while server.metric("herald_outbox_overflows_total").await < 1.0 {
        for _ in 0..20 {
            server.publish("alice", "bulk", payload.clone()).await;
            published += 1;
        }
        assert!(published < 4000, "the slow session never overflowed");
    }
    // The other user's session was not slowed down.
    server.publish("bob", "t", json!("hi")).await;
    assert_eq!(next_notification(&mut fast).await.payload, json!("hi"));

    let mut last = 0;
    let code = loop {
        match slow.next_frame_within(WAIT).await {
            Ok(Some(ServerFrame::Notification(n))) => {
                assert_eq!(n.seq, last + 1);
                last = n.seq;
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("not closed"),
            Err(herald_client::Error::Closed { code, .. }) => break code,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, 1013);
    assert!(last < published, "the slow client was not behind");
    let mut resumed = server.connect_since("alice", last).await;
    let rest = notifications(&mut resumed, (published - last) as usize).await;
    assert_eq!(rest.first().map(|n| n.seq), Some(last + 1));
    assert_eq!(rest.last().map(|n| n.seq), Some(published));
    server.stop().await;
}
