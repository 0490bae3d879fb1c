//! A scripted Herald server for client tests: each test accepts connections
//! and plays the frames it needs — duplicates, silence, close codes — which a
//! real server will not produce on demand.
#![allow(dead_code)]
// tungstenite's handshake callback returns `Result<Response, ErrorResponse>`: not ours to shrink.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub const WAIT: Duration = Duration::from_secs(10);

pub struct Fake {
    listener: TcpListener,
    pub url: String,
}

/// One accepted session, with what its handshake carried.
pub struct Conn {
    pub ws: WebSocketStream<TcpStream>,
    pub since: Option<i64>,
    pub epoch: Option<String>,
    pub authorization: Option<String>,
}

impl Fake {
    pub async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        Fake { listener, url }
    }

    /// The next connection, upgraded; fails the test after [`WAIT`].
    pub async fn accept(&self) -> Conn {
        self.accept_within(WAIT).await.expect("the client connects")
    }

    pub async fn accept_within(&self, wait: Duration) -> Option<Conn> {
        let (tcp, _) = tokio::time::timeout(wait, self.listener.accept()).await.ok()?.unwrap();
        let mut seen = (None, None, None);
        let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
            seen = inspect(req);
            Ok::<_, ErrorResponse>(resp)
        })
        .await
        .unwrap();
        Some(Conn { ws, since: seen.0, epoch: seen.1, authorization: seen.2 })
    }

    /// Answers the next handshake with an HTTP error and the spec's body.
    pub async fn refuse(&self, status: u16, code: &str) {
        let (tcp, _) = tokio::time::timeout(WAIT, self.listener.accept()).await.expect("the client connects").unwrap();
        let body = json!({"error": {"code": code, "message": "refused by the test"}}).to_string();
        let _ = tokio_tungstenite::accept_hdr_async(tcp, move |_: &Request, _: Response| {
            let mut refusal = ErrorResponse::new(Some(body));
            *refusal.status_mut() = status.try_into().unwrap();
            Err(refusal)
        })
        .await;
    }
}

fn inspect(req: &Request) -> (Option<i64>, Option<String>, Option<String>) {
    let param = |name: &str| {
        let prefix = format!("{name}=");
        req.uri().query().and_then(|q| q.split('&').find_map(|p| p.strip_prefix(prefix.as_str()).map(str::to_string)))
    };
    let authorization = req.headers().get("authorization").map(|v| v.to_str().unwrap().to_string());
    (param("since").map(|s| s.parse().unwrap()), param("epoch"), authorization)
}

pub fn welcome(user: &str, last_seq: i64, heartbeat_secs: u64) -> Value {
    json!({"type": "welcome", "session_id": "s", "user_id": user, "node_id": "fake", "last_seq": last_seq,
           "heartbeat_secs": heartbeat_secs, "token_expires_at": 4_000_000_000i64})
}

pub fn note(seq: i64) -> Value {
    json!({"type": "notification", "seq": seq, "id": format!("id-{seq}"), "topic": "t", "payload": {"n": seq},
           "created_at": "2026-01-01T00:00:00.000Z", "read": false})
}

impl Conn {
    pub async fn send(&mut self, frame: Value) {
        self.ws.send(Message::Text(frame.to_string().into())).await.unwrap();
    }

    pub async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.to_string().into() };
        let _ = self.ws.send(Message::Close(Some(frame))).await;
        // Read the client's answer so the close completes.
        let _ = tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = self.ws.next().await {} }).await;
    }

    /// The next text frame as JSON (a close frame fails the test).
    pub async fn recv(&mut self) -> Value {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await.expect("a frame in time") {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
                Some(Ok(Message::Close(f))) => panic!("closed: {f:?}"),
                Some(Ok(_)) => continue,
                other => panic!("connection ended: {other:?}"),
            }
        }
    }

    /// The next text frame other than a ping.
    pub async fn recv_non_ping(&mut self) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] != "ping" {
                return frame;
            }
        }
    }

    /// The code of the client's close frame.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await.expect("a close in time") {
                Some(Ok(Message::Close(f))) => return f.map_or(1005, |f| f.code.into()),
                Some(Ok(_)) => continue,
                other => panic!("ended without a close frame: {other:?}"),
            }
        }
    }
}
