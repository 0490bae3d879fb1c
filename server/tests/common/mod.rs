//! Test harness: a real Herald node through the library's `run` on
//! 127.0.0.1:0, with a real SQLite file, and typed helpers around the real
//! Rust client. No sleeps wait for start-up: the listener is bound first.
#![allow(dead_code)]

pub mod nginx;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_client::{Connect, Inbox, Notification, Published, Publisher, ServerFrame, Session};
use herald_server::config::Settings;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-0123456789abcdef";
pub const API_KEY: &str = "test-api-key";
/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(10);

/// The store records every group commit in `metrics` (given in its
/// options): appends made one after another are a group each, appends made
/// at once share groups (each arrives while the one before commits), and
/// the sizes add up to the notifications committed. `metrics` is fresh.
pub async fn assert_group_commits_measured(
    store: std::sync::Arc<dyn herald_server::store::Store>,
    metrics: &herald_server::store::GroupCommits,
) {
    use herald_server::store::NewNotification;
    let note = |user: String| NewNotification {
        user_id: user.into(),
        id: uuid::Uuid::now_v7().to_string(),
        topic: "t".into(),
        payload: serde_json::value::RawValue::from_string("1".into()).expect("valid JSON").into(),
        created_at_ms: herald_server::store::now_ms(),
        idempotency_key: None,
    };
    for size in [1, 1, 5] {
        store.append((0..size).map(|i| note(format!("group-{i}"))).collect()).await.unwrap();
    }
    assert_eq!((metrics.size.count(), metrics.size.sum()), (3, 7.0), "one group per append, 7 notifications");
    assert_eq!(metrics.seconds.count(), 3);
    assert!(metrics.seconds.sum() > 0.0, "commits take time");

    // One task sends them all before any answer: the queue fills at once.
    let burst = (0..50).map(|i| store.append(vec![note(format!("burst-{i}"))]));
    for appended in futures_util::future::join_all(burst).await {
        appended.unwrap();
    }
    assert_eq!(metrics.size.sum(), 57.0, "every committed notification counted once");
    let groups = metrics.size.count() - 3;
    assert!((1..50).contains(&groups), "50 appends at once shared no group commit: {groups} groups");
    assert_eq!(metrics.seconds.count(), metrics.size.count());
    assert_eq!(metrics.failed.get(), 0);
}

/// `Store::resume` for `user` whose head is seq 5 with 1–3 purged (oldest
/// 4): the head, and from the oldest retained seq on whatever `since` says
/// (a `since` past the head resumes at the head). With `since` and a page,
/// the head's `oldest_seq` is the oldest retained seq after `since`
/// (`Head::resumed`), which resumes and truncates as the user's oldest does.
pub async fn assert_resume_at_head_5_oldest_4(store: &dyn herald_server::store::Store, user: &str) {
    use herald_server::store::Head;
    let head = Head { last_seq: 5, oldest_seq: 4 };
    for (since, limit, oldest, expected) in [
        (None, 10, 4, vec![]),
        (Some(0), 10, 4, vec![4, 5]),
        (Some(0), 1, 4, vec![4]),
        (Some(3), 10, 4, vec![4, 5]),
        (Some(4), 10, 5, vec![5]),
        (Some(5), 10, 6, vec![]),
        (Some(99), 10, 6, vec![]),
        (Some(0), 0, 4, vec![]),
    ] {
        let (found, page) = store.resume(user, since, limit).await.unwrap();
        let seqs: Vec<i64> = page.iter().map(|n| n.seq).collect();
        assert_eq!(
            (found, seqs),
            (Head { oldest_seq: oldest, ..head }, expected),
            "resume since {since:?}, limit {limit}"
        );
        assert_eq!(found.resume_after(since), head.resume_after(since), "resume since {since:?}");
        let truncated = |h: Head| since.is_some_and(|since| since < h.oldest_seq - 1);
        assert_eq!(truncated(found), truncated(head), "truncated since {since:?}");
    }
}

/// Stores seqs 1–5 for `user` in an otherwise empty `store` and purges 2 on
/// its own (as a retention purge does when it was stored while the clock
/// stood earlier); then `Store::resume`: a session that saw 1 is told seq 2
/// is gone (`oldest_seq` 3, so the welcome says `truncated`, spec §2); one
/// that saw 0 or 2 missed nothing it can be told of.
pub async fn assert_resume_reports_a_hole_after_since(store: &dyn herald_server::store::Store, user: &str) {
    use herald_server::store::{Head, NewNotification};
    for i in 1..=5 {
        let note = NewNotification {
            user_id: user.into(),
            id: format!("{user}-{i}"),
            topic: "t".into(),
            payload: serde_json::value::RawValue::from_string(i.to_string()).unwrap().into(),
            created_at_ms: if i == 2 { 1_000 } else { herald_server::store::now_ms() },
            idempotency_key: None,
        };
        store.append(vec![note]).await.unwrap();
    }
    assert_eq!(store.purge(2_000).await.unwrap(), 1);
    for (since, oldest, expected) in
        [(0, 1, vec![1, 3, 4, 5]), (1, 3, vec![3, 4, 5]), (2, 3, vec![3, 4, 5]), (3, 4, vec![4, 5])]
    {
        let (found, page) = store.resume(user, Some(since), 10).await.unwrap();
        let seqs: Vec<i64> = page.iter().map(|n| n.seq).collect();
        assert_eq!((found, seqs), (Head { last_seq: 5, oldest_seq: oldest }, expected), "resume since {since}");
    }
    assert_eq!(store.head(user).await.unwrap(), Head { last_seq: 5, oldest_seq: 1 }, "the user's oldest");
}

/// Sends only the head of a POST to `path` declaring a `declared`-byte JSON
/// body with `Expect: 100-continue` (authorized with `bearer`), and returns
/// the first bytes the node answers — without a byte of the body sent.
pub async fn post_head_only(addr: &str, path: &str, bearer: &str, declared: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: application/json\r\nContent-Length: {declared}\r\nExpect: 100-continue\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut answer)).await.expect("an answer to the head alone").unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    _tmp: Option<tempfile::TempDir>,
}

/// Records in sqlx's table a migration no build of this repository has, as
/// a newer build would leave the database (bind the checksum as bytes).
pub const NEWER_MIGRATION_SQL: &str =
    "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
     VALUES (99999999, 'from a newer build', true, $1, 0)";

/// A token of `user` issued at `iat` (none: no `iat` claim), valid an hour.
pub fn token_issued(user: &str, iat: Option<i64>) -> String {
    use herald_server::auth::{mint_claims, unix_now, Claims};
    mint_claims(SECRET, &Claims { sub: user.into(), exp: unix_now() + 3600, iat, jti: None })
}

/// Writes `file` until its disk is full, to the last block.
pub fn fill(file: &Path) {
    let mut filler = std::fs::File::create(file).unwrap();
    let block = vec![0u8; 64 << 10];
    loop {
        match std::io::Write::write(&mut filler, &block) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
}

/// A token of `user` issued 100 s ago with this `jti` claim (any JSON value).
pub fn token_with_jti(user: &str, jti: serde_json::Value) -> String {
    use herald_server::auth::{mint_claims, unix_now, Claims};
    mint_claims(
        SECRET,
        &Claims { sub: user.into(), exp: unix_now() + 3600, iat: Some(unix_now() - 100), jti: Some(jti) },
    )
}

/// The refusal a handshake at `ws` (a node's `ws://` base) with `token`
/// gets, with the spec's error body; `None` when the session opened.
pub async fn handshake_refusal(ws: &str, token: &str) -> Option<(u16, String)> {
    match Connect::new(ws, token).connect().await {
        Ok(_) => None,
        Err(herald_client::Error::Refused { status, code, .. }) => Some((status, code)),
        Err(e) => panic!("not a refusal with an error body: {e}"),
    }
}

/// The value of one metric line (`name` with its labels, as exposed) of the
/// node at `http` (its `http://` base); 0 when the line is not there.
pub async fn metric_at(http: &str, line_prefix: &str) -> f64 {
    let text = reqwest::get(format!("{http}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with(line_prefix) && l[line_prefix.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Settings as the server would read them, from `HERALD_*` pairs.
pub fn settings(db_dir: &Path, vars: &[(&str, &str)]) -> Settings {
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("HERALD_DATABASE_URL".into(), format!("sqlite://{}/herald.db", db_dir.display()));
    env.insert("HERALD_JWT_SECRET".into(), SECRET.into());
    env.insert("HERALD_API_KEYS".into(), API_KEY.into());
    env.insert("HERALD_DRAIN_GRACE".into(), "0s".into());
    env.insert("HERALD_NODE_ID".into(), "test-node".into());
    for (k, v) in vars {
        env.insert(k.to_string(), v.to_string());
    }
    Settings::load(&env, None).expect("test settings are valid")
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(&[]).await
    }

    pub async fn start_with(vars: &[(&str, &str)]) -> TestServer {
        let tmp = tempfile::tempdir().expect("a temp dir");
        let mut server = Self::start_in(tmp.path(), vars).await;
        server._tmp = Some(tmp);
        server
    }

    /// Starts on the database in `dir` (kept by the caller, for restarts).
    pub async fn start_in(dir: &Path, vars: &[(&str, &str)]) -> TestServer {
        let settings = settings(dir, vars);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { herald_server::run(settings, listener, shutdown).await.expect("the server runs") }
        });
        TestServer { addr, dir: dir.to_path_buf(), shutdown, task, _tmp: None }
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn token(&self, user: &str) -> String {
        herald_server::auth::mint(SECRET, user, 3600)
    }

    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.http(), API_KEY)
    }

    pub fn inbox(&self, user: &str) -> Inbox {
        Inbox::new(self.http(), self.token(user))
    }

    pub async fn publish(&self, user: &str, topic: &str, payload: serde_json::Value) -> Published {
        self.publisher().publish_one(user, topic, payload).await.expect("publish")
    }

    pub async fn connect(&self, user: &str) -> Session {
        Connect::new(self.ws(), self.token(user)).connect().await.expect("connect")
    }

    pub async fn connect_since(&self, user: &str, since: i64) -> Session {
        Connect::new(self.ws(), self.token(user)).since(since).connect().await.expect("connect")
    }

    /// The value of one metric line (`name` with its labels, as exposed).
    pub async fn metric(&self, line_prefix: &str) -> f64 {
        metric_at(&self.http(), line_prefix).await
    }

    /// Starts draining (as SIGTERM does).
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and waits until the node has drained.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.expect("drains in time").expect("no panic");
    }
}

/// A session over a bare tokio-tungstenite socket, for frames the Rust
/// client would not send or would parse away; `query` is added to the URL
/// (`since=0`, say). Returns the socket and the welcome frame's text.
pub async fn raw_session(server: &TestServer, user: &str, query: &str) -> (RawSession, String) {
    let url = format!("{}/v1/ws?access_token={}&{query}", server.ws(), server.token(user));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("the upgrade succeeds");
    let welcome = raw_text(&mut ws).await;
    assert!(welcome.contains(r#""type":"welcome""#), "{welcome}");
    (ws, welcome)
}

pub type RawSession = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next message of a raw session, which must be text.
pub async fn raw_text(ws: &mut RawSession) -> String {
    use futures_util::StreamExt;
    let message = tokio::time::timeout(WAIT, ws.next()).await.expect("a message in time");
    match message {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => text.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// The next frame, failing the test after [`WAIT`].
pub async fn next(session: &mut Session) -> ServerFrame {
    match session.next_frame_within(WAIT).await {
        Ok(Some(frame)) => frame,
        Ok(None) => panic!("no frame within {WAIT:?}"),
        Err(e) => panic!("session ended: {e}"),
    }
}

/// The next frame, which must be a notification.
pub async fn next_notification(session: &mut Session) -> Notification {
    match next(session).await {
        ServerFrame::Notification(n) => n,
        other => panic!("expected a notification, got {other:?}"),
    }
}

/// Reads notifications until `count` arrived; fails on any other frame.
pub async fn notifications(session: &mut Session, count: usize) -> Vec<Notification> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        out.push(next_notification(session).await);
    }
    out
}

/// Reads until the server closes; returns the close code.
pub async fn close_code(session: &mut Session) -> u16 {
    closed(session).await.0
}

/// Reads until the server closes; returns the close code and reason.
pub async fn closed(session: &mut Session) -> (u16, String) {
    loop {
        match session.next_frame_within(WAIT).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("not closed within {WAIT:?}"),
            Err(herald_client::Error::Closed { code, reason }) => return (code, reason),
            Err(e) => panic!("ended without a close frame: {e}"),
        }
    }
}

/// Polls `check` until it holds, failing the test after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw HTTP response: status, headers and the JSON body (Null when empty).
pub struct Raw {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
}

impl Raw {
    /// The spec's error code, asserting the error body's shape.
    pub fn error_code(&self) -> &str {
        let err = &self.body["error"];
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "error body without message: {}", self.body);
        err["code"].as_str().unwrap_or_else(|| panic!("not an error body: {}", self.body))
    }
}

pub async fn raw(request: reqwest::RequestBuilder) -> Raw {
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    let body = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
    };
    Raw { status, headers, body }
}
