//! The real `herald` binary: settings errors, dev mode, the CLI and SIGTERM.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use herald_client::{Connect, Publisher, ServerFrame};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_herald");

fn herald(dir: &Path, vars: &[(&str, &str)]) -> Command {
    with_settings(Command::new(BIN), dir, vars)
}

/// `cmd` with a node's environment: nothing inherited but `PATH`, a port of
/// its own, the SQLite store in `dir`, and `vars`.
fn with_settings(mut cmd: Command, dir: &Path, vars: &[(&str, &str)]) -> Command {
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HERALD_LISTEN", "127.0.0.1:0")
        .env("HERALD_DATABASE_URL", format!("sqlite://{}/herald.db", dir.display()));
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

struct Running {
    child: Child,
    port: u16,
    stdout: std::path::PathBuf,
}

/// Starts `herald serve`, waiting (with a deadline) for its `listening` line.
fn start(dir: &Path, vars: &[(&str, &str)]) -> Running {
    start_command(herald(dir, vars), dir)
}

/// Starts `cmd`, which runs `herald serve`, with its output in `logs`.
fn start_command(mut cmd: Command, logs: &Path) -> Running {
    let (out, err) = (logs.join("stdout"), logs.join("stderr"));
    let mut child =
        cmd.stdout(std::fs::File::create(&out).unwrap()).stderr(std::fs::File::create(&err).unwrap()).spawn().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let log = std::fs::read_to_string(&err).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains("listening")) {
            let port = line.split("addr=127.0.0.1:").nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
            return Running { child, port: port.parse().unwrap(), stdout: out };
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("herald did not start: {log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A test that fails half-way leaves no `herald` running behind it.
impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Running {
    fn signal(&self, sig: &str) {
        let status = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the exit, with a deadline; returns the exit code.
    fn wait(mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "herald did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn bad_settings_exit_2_naming_the_variable_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    for (var, value) in [
        ("HERALD_HEARTBEAT_SECS", "soon"),
        ("HERALD_JWT_PUBLIC_KEYS", "/nonexistent/keys.pem"),
        ("HERALD_MAX_SESSIONS", "lots"),
        // More than any open-file limit can hold.
        ("HERALD_MAX_CONNECTIONS", "4000000000"),
    ] {
        let out =
            herald(dir.path(), &[("HERALD_LISTEN", &listen), ("HERALD_API_KEYS", "k"), (var, value)]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(var), "{var}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(std::net::TcpStream::connect(&listen).is_err(), "something listened");
    assert!(!dir.path().join("herald.db").exists(), "the store was opened before validation");
    // A config file: an unknown key is refused by name.
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, "colour = \"red\"\n").unwrap();
    let out = herald(dir.path(), &[]).arg("--config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"));
    // Dev mode refuses a non-loopback address.
    let out = herald(dir.path(), &[("HERALD_LISTEN", "0.0.0.0:0")]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HERALD_LISTEN"));
}

#[tokio::test]
async fn dev_mode_prints_working_keys_and_a_demo_link() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let banner = std::fs::read_to_string(&server.stdout).unwrap();
    let field = |name: &str| {
        banner
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{banner}"))
    };
    let (api_key, token) = (field("API key:"), field("user token:"));
    assert!(banner.contains(&format!("/demo#token={token}")));
    let base = format!("127.0.0.1:{}", server.port);
    let mut alice = Connect::new(format!("ws://{base}"), &token).connect().await.unwrap();
    assert_eq!(alice.welcome().user_id, "alice");
    Publisher::new(format!("http://{base}"), &api_key).publish_one("alice", "hello", json!({"hi": 1})).await.unwrap();
    assert_eq!(next_notification(&mut alice).await.payload, json!({"hi": 1}));
    let demo = reqwest::get(format!("http://{base}/demo")).await.unwrap();
    assert_eq!(demo.status(), 200);
    server.signal("-INT");
    assert_eq!(server.wait(), 0);
}

#[tokio::test]
async fn the_cli_mints_tokens_migrates_and_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("HERALD_JWT_SECRET", SECRET), ("HERALD_API_KEYS", API_KEY)];
    for _ in 0..2 {
        let out = herald(dir.path(), &vars).arg("migrate").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(dir.path().join("herald.db").exists());
    let out = herald(dir.path(), &vars).args(["token", "--sub", "bob", "--ttl", "10m"]).output().unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let no_secret =
        herald(dir.path(), &[("HERALD_API_KEYS", API_KEY)]).args(["token", "--sub", "bob"]).output().unwrap();
    assert!(!no_secret.status.success());
    assert!(String::from_utf8_lossy(&no_secret.stderr).contains("HERALD_JWT_SECRET"));

    let server = start(dir.path(), &vars);
    let base = format!("127.0.0.1:{}", server.port);
    let mut bob = Connect::new(format!("ws://{base}"), &token).connect().await.unwrap();
    let expires_in = bob.welcome().token_expires_at - herald_server::auth::unix_now();
    assert!((590..=600).contains(&expires_in), "{expires_in}");
    let url = format!("http://{base}");
    let out = herald(dir.path(), &vars)
        .args(["publish", "--user", "bob", "--topic", "t", "--payload", r#"{"a":1}"#, "--url", &url])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"seq\": 1"));
    assert_eq!(next_notification(&mut bob).await.payload, json!({"a": 1}));
    let bad = herald(dir.path(), &vars)
        .args(["publish", "--user", "bob", "--topic", "t", "--payload", "{oops", "--url", &url])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    // `herald erase`: the user's one notification goes; the counter stays.
    let out = herald(dir.path(), &vars).args(["erase", "--user", "bob", "--url", &url]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let erased: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((erased["deleted"].as_u64(), erased["last_seq"].as_i64()), (Some(1), Some(1)), "{erased}");
    let history = Publisher::new(&url, API_KEY).history("bob", 0, 10).await.unwrap();
    assert!(history.notifications.is_empty());
    let refused =
        herald(dir.path(), &vars).args(["erase", "--user", "bob", "--url", &url, "--up-to-seq=-1"]).output().unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("invalid_query"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // `herald sessions` lists bob's sessions; `herald disconnect --session`
    // closes one of them alone.
    let mut second = Connect::new(format!("ws://{base}"), &token).connect().await.unwrap();
    let out = herald(dir.path(), &vars).args(["sessions", "--user", "bob", "--url", &url]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: herald_client::UserSessions = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<_> = listed.sessions.iter().map(|s| s.session_id.as_str()).collect();
    assert_eq!(ids, [bob.welcome().session_id.as_str(), second.welcome().session_id.as_str()]);
    let out = herald(dir.path(), &vars)
        .args(["disconnect", "--user", "bob", "--session", &second.welcome().session_id, "--url", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(close_code(&mut second).await, 4003);
    // The erase's `read` frame may still be queued for bob; then nothing.
    while let Some(frame) = bob.next_frame_within(Duration::from_millis(300)).await.expect("the other stays") {
        assert!(matches!(frame, ServerFrame::Read { .. }), "{frame:?}");
    }
    let bad = herald(dir.path(), &vars)
        .args(["disconnect", "--user", "bob", "--session", "not-a-uuid", "--url", &url])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid_session_id"));

    // `herald disconnect`: bob's session closes with 4003.
    let out = herald(dir.path(), &vars).args(["disconnect", "--user", "bob", "--url", &url]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(close_code(&mut bob).await, 4003);

    // `herald revoke`: bob's token from `herald token` is refused from now on.
    let out = herald(dir.path(), &vars).args(["revoke", "--user", "bob", "--url", &url]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let revoked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(revoked["issued_before"].as_i64().unwrap() > herald_server::auth::unix_now() - 60, "{revoked}");
    match Connect::new(format!("ws://{base}"), &token).connect().await {
        Err(herald_client::Error::Refused { status: 401, code, .. }) => assert_eq!(code, "token_revoked"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a revoked token opened a session"),
    }
    // `herald token` gives each token its own `jti` (or the one asked
    // for); `herald revoke --jti` refuses that one alone.
    let mint = |extra: &[&str]| {
        let out = herald(dir.path(), &vars).args(["token", "--sub", "cleo"]).args(extra).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let jti_of = |token: &str| {
        let key = jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes());
        let claims: serde_json::Value =
            jsonwebtoken::decode(token, &key, &jsonwebtoken::Validation::default()).unwrap().claims;
        claims["jti"].as_str().expect("a jti").to_string()
    };
    let (first, second, named) = (mint(&[]), mint(&[]), mint(&["--jti", "cleo-phone"]));
    let jti = jti_of(&first);
    assert_ne!(jti, jti_of(&second), "each token its own jti");
    assert_eq!(jti_of(&named), "cleo-phone");
    let bad = herald(dir.path(), &vars).args(["token", "--sub", "cleo", "--jti", ""]).output().unwrap();
    assert!(!bad.status.success(), "an empty jti is refused");
    let out =
        herald(dir.path(), &vars).args(["revoke", "--user", "cleo", "--jti", &jti, "--url", &url]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let revoked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(revoked, json!({"user_id": "cleo", "jti": jti}));
    assert!(Connect::new(format!("ws://{base}"), &first).connect().await.is_err(), "the revoked one");
    assert!(Connect::new(format!("ws://{base}"), &second).connect().await.is_ok(), "the other");
    let out =
        herald(dir.path(), &vars).args(["revoke", "--user", "cleo", "--jti", "cleo-phone", "--url", &url]).output();
    assert!(out.unwrap().status.success());
    assert!(Connect::new(format!("ws://{base}"), &named).connect().await.is_err(), "the named one");
    assert!(Connect::new(format!("ws://{base}"), &second).connect().await.is_ok(), "the other still");
    let both = herald(dir.path(), &vars)
        .args(["revoke", "--user", "cleo", "--jti", &jti, "--issued-before", "1", "--url", &url])
        .output()
        .unwrap();
    assert!(!both.status.success(), "--jti and --issued-before are one or the other");

    let ahead = (herald_server::auth::unix_now() + 86_400).to_string();
    let refused = herald(dir.path(), &vars)
        .args(["revoke", "--user", "bob", "--url", &url, "--issued-before", &ahead])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("invalid_issued_before"));

    // With scoped keys only, each command takes the first key with its scope:
    // the read key listed before the erase key is not the one `erase` sends,
    // and `publish` has no key to send.
    let scoped = [("HERALD_API_KEYS_READ", "a-read-key"), ("HERALD_API_KEYS_ERASE", API_KEY)];
    let out = herald(dir.path(), &scoped).args(["erase", "--user", "bob", "--url", &url]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let keyless = herald(dir.path(), &scoped)
        .args(["publish", "--user", "bob", "--topic", "t", "--payload", "{}", "--url", &url])
        .output()
        .unwrap();
    assert!(!keyless.status.success());
    let stderr = String::from_utf8_lossy(&keyless.stderr);
    assert!(stderr.contains("--api-key") && stderr.contains("publish scope"), "{stderr}");
    server.signal("-TERM");
    assert_eq!(server.wait(), 0);
}

#[tokio::test]
async fn sigterm_drains_with_1001_and_exits_0_and_history_survives() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("HERALD_JWT_SECRET", SECRET), ("HERALD_API_KEYS", API_KEY), ("HERALD_DRAIN_GRACE", "2s")];
    let server = start(dir.path(), &vars);
    let base = format!("127.0.0.1:{}", server.port);
    let publisher = Publisher::new(format!("http://{base}"), API_KEY);
    for i in 1..=5 {
        publisher.publish_one("alice", "t", json!(i)).await.unwrap();
    }
    let mut alice =
        Connect::new(format!("ws://{base}"), herald_server::auth::mint(SECRET, "alice", 3600)).connect().await.unwrap();
    server.signal("-TERM");
    assert_eq!(close_code(&mut alice).await, 1001);
    let ready = raw(reqwest::Client::new().get(format!("http://{base}/readyz"))).await;
    assert_eq!((ready.status, ready.error_code()), (503, "draining"));
    match Connect::new(format!("ws://{base}"), herald_server::auth::mint(SECRET, "alice", 3600)).connect().await {
        Err(herald_client::Error::Refused { status: 503, code, .. }) => assert_eq!(code, "draining"),
        other => panic!("expected 503 draining, got {:?}", other.map(|_| ())),
    }
    assert_eq!(server.wait(), 0);

    let server = start(dir.path(), &vars);
    let base = format!("127.0.0.1:{}", server.port);
    let mut alice = Connect::new(format!("ws://{base}"), herald_server::auth::mint(SECRET, "alice", 3600))
        .since(2)
        .connect()
        .await
        .unwrap();
    let seqs: Vec<_> = notifications(&mut alice, 3).await.iter().map(|n| n.seq).collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    Publisher::new(format!("http://{base}"), API_KEY).publish_one("alice", "t", json!(6)).await.unwrap();
    assert!(matches!(next(&mut alice).await, ServerFrame::Notification(n) if n.seq == 6));
    server.signal("-TERM");
    assert_eq!(server.wait(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_accepted_around_sigterm_are_all_stored_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("HERALD_JWT_SECRET", SECRET), ("HERALD_API_KEYS", API_KEY), ("HERALD_DRAIN_GRACE", "1s")];
    let server = start(dir.path(), &vars);
    let publisher = Publisher::new(format!("http://127.0.0.1:{}", server.port), API_KEY);
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let publisher = publisher.clone();
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for i in 0..100 {
                    match publisher.publish_one("carol", "t", json!(i)).await {
                        Ok(p) => acknowledged.push(p.seq),
                        Err(_) => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.signal("-TERM");
    let mut acknowledged = Vec::new();
    for task in burst {
        acknowledged.extend(task.await.unwrap());
    }
    assert_eq!(server.wait(), 0);
    assert!(!acknowledged.is_empty());

    let server = start(dir.path(), &vars);
    let history =
        Publisher::new(format!("http://127.0.0.1:{}", server.port), API_KEY).history("carol", 0, 500).await.unwrap();
    let mut stored: Vec<_> = history.notifications.iter().map(|n| n.seq).collect();
    let last = history.last_seq;
    if last > 500 {
        let more = Publisher::new(format!("http://127.0.0.1:{}", server.port), API_KEY)
            .history("carol", 500, 500)
            .await
            .unwrap();
        stored.extend(more.notifications.iter().map(|n| n.seq));
    }
    assert_eq!(stored, (1..=last).collect::<Vec<_>>(), "a gap in the stored seqs");
    for seq in &acknowledged {
        assert!(stored.contains(seq), "seq {seq} was acknowledged but not stored");
    }
    server.signal("-TERM");
    assert_eq!(server.wait(), 0);
}

/// `kill -9` of a SQLite node in the middle of a publishing burst: after a
/// restart every acknowledged notification is stored, with the id it was
/// acknowledged with, and each user's seqs run from 1 to the counter without
/// a gap. An acknowledgement means the commit was handed to the kernel (and
/// synced); nothing a publish waited for may still sit in the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_publishing_loses_no_acknowledged_notification() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("HERALD_JWT_SECRET", SECRET), ("HERALD_API_KEYS", API_KEY)];
    let server = start(dir.path(), &vars);
    let publisher = Publisher::new(format!("http://127.0.0.1:{}", server.port), API_KEY);
    let users = ["kim", "lee", "max"];
    let burst: Vec<_> = (0..9)
        .map(|task| {
            let (publisher, user) = (publisher.clone(), users[task % users.len()]);
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for i in 0.. {
                    // Payloads of a few pages' worth now and then, so commits span many WAL frames.
                    let payload = json!({"i": i, "pad": "x".repeat(if i % 5 == 0 { 9000 } else { 10 })});
                    match publisher.publish_one(user, "t", payload).await {
                        Ok(p) => acknowledged.push((user, p.seq, p.id)),
                        Err(_) => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    eventually("300 publishes acknowledged", || async {
        let mut count = 0;
        for user in users {
            count += publisher.history(user, 0, 1).await.map(|p| p.last_seq).unwrap_or(0);
        }
        count >= 300
    })
    .await;
    server.signal("-KILL");
    let mut acknowledged = Vec::new();
    for task in burst {
        acknowledged.extend(task.await.unwrap());
    }
    assert_ne!(server.wait(), 0);

    let server = start(dir.path(), &vars);
    let publisher = Publisher::new(format!("http://127.0.0.1:{}", server.port), API_KEY);
    for user in users {
        let (seqs, last) = stored_seqs(&publisher, user).await;
        assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "{user}: a gap in the stored seqs");
        let mut stored = Vec::new();
        while stored.len() < seqs.len() {
            let after = stored.last().map_or(0, |n: &herald_client::Notification| n.seq);
            stored.extend(publisher.history(user, after, 500).await.unwrap().notifications);
        }
        let mine: Vec<_> = acknowledged.iter().filter(|(u, ..)| *u == user).collect();
        assert!(!mine.is_empty(), "{user}: nothing acknowledged");
        for (_, seq, id) in mine {
            let found = stored.iter().find(|n| n.seq == *seq);
            assert_eq!(found.map(|n| &n.id), Some(id), "{user}: seq {seq} was acknowledged as {id}");
        }
    }
    server.signal("-TERM");
    assert_eq!(server.wait(), 0);
}

/// `herald check`, read-only, beside a running node and after it: a sound
/// store passes with its counts; a notification beyond its user's counter
/// and a zeroed page are each found (exit 1, the fault named on stderr).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_check_passes_a_sound_store_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [("HERALD_JWT_SECRET", SECRET), ("HERALD_API_KEYS", API_KEY)];
    let server = start(dir.path(), &vars);
    let publisher = Publisher::new(format!("http://127.0.0.1:{}", server.port), API_KEY);
    for i in 0..300 {
        let user = ["ann", "bob", "cat"][i % 3];
        publisher.publish_one(user, "t", json!({"i": i, "pad": "x".repeat(500)})).await.unwrap();
    }
    let check = || herald(dir.path(), &vars).arg("check").output().unwrap();
    let beside = check();
    assert!(beside.status.success(), "{}", String::from_utf8_lossy(&beside.stderr));
    assert!(String::from_utf8_lossy(&beside.stdout).contains("is sound: 300 notifications of 3 users"));
    server.signal("-TERM");
    assert_eq!(server.wait(), 0);
    let after = check();
    assert!(after.status.success(), "{}", String::from_utf8_lossy(&after.stderr));

    let file = dir.path().join("herald.db");
    let db = rusqlite::Connection::open(&file).unwrap();
    db.execute_batch(
        "INSERT INTO notifications (user_id, seq, id, topic, payload, created_at) VALUES ('ann', 999, 'x', 't', '{}', 0)",
    )
    .unwrap();
    let beyond = check();
    assert_eq!(beyond.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&beyond.stderr).contains("1 notifications beyond their user's counter"));
    db.execute_batch("DELETE FROM notifications WHERE seq = 999; PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
    let root: usize =
        db.query_row("SELECT rootpage FROM sqlite_master WHERE name = 'notifications'", [], |r| r.get(0)).unwrap();
    drop(db);
    assert!(check().status.success());

    // The notifications table's root page zeroed (pages count from 1).
    let mut torn = std::fs::read(&file).unwrap();
    torn[(root - 1) * 4096..root * 4096].fill(0);
    std::fs::write(&file, &torn).unwrap();
    let corrupt = check();
    assert_eq!(corrupt.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&corrupt.stderr).contains("failed its integrity check"));
    assert_eq!(std::fs::read(&file).unwrap(), torn, "the check wrote nothing");
}

/// Every seq stored for `user`, reading the history page by page.
async fn stored_seqs(publisher: &Publisher, user: &str) -> (Vec<i64>, i64) {
    let (mut seqs, mut after) = (Vec::new(), 0);
    loop {
        let page = publisher.history(user, after, 500).await.unwrap();
        let Some(last) = page.notifications.last() else { return (seqs, page.last_seq) };
        after = last.seq;
        seqs.extend(page.notifications.iter().map(|n| n.seq));
    }
}

/// `herald backup` beside a node that keeps publishing: the copy holds every
/// notification acknowledged before the backup began, each user's seqs
/// without a gap up to its counter, and a node started on it carries on from
/// there. Refusals write nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_publishing_is_consistent_and_a_node_runs_on_it() {
    let (dir, restored) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let vars = [("HERALD_JWT_SECRET", SECRET), ("HERALD_API_KEYS", API_KEY)];
    let server = start(dir.path(), &vars);
    let publisher = Publisher::new(format!("http://127.0.0.1:{}", server.port), API_KEY);
    let users = ["ann", "ben", "cat"];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = users
        .iter()
        .map(|user| {
            let (publisher, stop, user) = (publisher.clone(), stop.clone(), user.to_string());
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && acknowledged.len() < 2_000 {
                    let published = publisher.publish_one(&user, "t", json!({"n": acknowledged.len()})).await.unwrap();
                    acknowledged.push((Instant::now(), published.seq));
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let copy = restored.path().join("herald.db");
    let began = Instant::now();
    let out = {
        let mut backup = herald(dir.path(), &vars);
        backup.arg("backup").arg("--to").arg(&copy);
        tokio::task::spawn_blocking(move || backup.output().unwrap()).await.unwrap()
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for task in load {
        acknowledged.push(task.await.unwrap());
    }
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("backed up") && said.contains("checked and synced"), "{said}");
    for (user, acks) in users.iter().zip(&acknowledged) {
        let around = (acks.iter().any(|(at, _)| *at < began), acks.iter().any(|(at, _)| *at > began));
        assert_eq!(around, (true, true), "{user}: the node was not publishing when the backup began");
    }
    server.signal("-TERM");
    assert_eq!(server.wait(), 0);

    let node = start(restored.path(), &vars);
    let publisher = Publisher::new(format!("http://127.0.0.1:{}", node.port), API_KEY);
    for (user, acks) in users.iter().zip(&acknowledged) {
        let (stored, last_seq) = stored_seqs(&publisher, user).await;
        assert_eq!(stored, (1..=last_seq).collect::<Vec<_>>(), "{user}: the copy's seqs have a gap");
        for (at, seq) in acks {
            assert!(*at > began || *seq <= last_seq, "{user}: seq {seq}, acknowledged before the backup, is missing");
        }
        assert_eq!(publisher.publish_one(user, "t", json!("after")).await.unwrap().seq, last_seq + 1, "{user}");
    }
    node.signal("-TERM");
    assert_eq!(node.wait(), 0);

    // Refusals: an existing file is left as it was; PostgreSQL and a missing
    // database are named; no file is written.
    let mine = restored.path().join("mine.db");
    std::fs::write(&mine, b"keep").unwrap();
    let refused = herald(dir.path(), &vars).arg("backup").arg("--to").arg(&mine).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&mine).unwrap(), b"keep");
    let nowhere = restored.path().join("nowhere.db");
    let postgres = herald(dir.path(), &[("HERALD_DATABASE_URL", "postgres://127.0.0.1:1/none"), vars[0], vars[1]])
        .arg("backup")
        .arg("--to")
        .arg(&nowhere)
        .output()
        .unwrap();
    assert!(!postgres.status.success());
    assert!(
        String::from_utf8_lossy(&postgres.stderr).contains("pg_dump"),
        "{}",
        String::from_utf8_lossy(&postgres.stderr)
    );
    let missing = herald(dir.path(), &[("HERALD_DATABASE_URL", "sqlite:///nonexistent/herald.db"), vars[0], vars[1]])
        .arg("backup")
        .arg("--to")
        .arg(&nowhere)
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no database"));
    assert!(!nowhere.exists());
}

/// A restore from a backup: the notifications after the backup are lost and
/// their seqs handed out again. A client that saw them and resumes with the
/// epoch it was welcomed in goes back to the fork and gets the new ones; the
/// replaced files are kept aside.
#[tokio::test]
async fn after_herald_restore_a_client_from_before_resumes_from_the_fork() {
    let (dir, backups) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let vars = [("HERALD_JWT_SECRET", SECRET), ("HERALD_API_KEYS", API_KEY)];
    let token = herald_server::auth::mint(SECRET, "dan", 600);
    let server = start(dir.path(), &vars);
    let (ws, http) = (format!("ws://127.0.0.1:{}", server.port), format!("http://127.0.0.1:{}", server.port));
    let publisher = Publisher::new(&http, API_KEY);
    for i in 1..=5 {
        publisher.publish_one("dan", "t", json!(format!("old-{i}"))).await.unwrap();
    }
    let backup = backups.path().join("herald.db");
    let out = herald(dir.path(), &vars).arg("backup").arg("--to").arg(&backup).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for i in 6..=8 {
        publisher.publish_one("dan", "t", json!(format!("lost-{i}"))).await.unwrap();
    }
    let mut seen = Connect::new(&ws, &token).since(0).connect().await.unwrap();
    let e0 = seen.welcome().epoch.clone().expect("the welcome names the store's epoch");
    assert_eq!(notifications(&mut seen, 8).await.last().unwrap().payload, json!("lost-8"));
    let listing = || {
        let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        names
    };
    let before = listing();
    let refused = herald(dir.path(), &vars).arg("restore").arg("--from").arg(&backup).output().unwrap();
    assert!(!refused.status.success(), "restored under a running node");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(listing(), before, "a refused restore moved files");
    server.signal("-TERM");
    assert_eq!(server.wait(), 0);

    let out = herald(dir.path(), &vars).arg("restore").arg("--from").arg(&backup).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("5 notifications of 1 users") && said.contains("store epoch now"), "{said}");
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().ends_with(char::is_numeric))
        .expect("the replaced database is kept aside");
    assert!(aside.file_name().unwrap().to_string_lossy().starts_with("herald.db.replaced-"), "{aside:?}");
    let kept = rusqlite::Connection::open_with_flags(&aside, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let count: i64 = kept.query_row("SELECT COUNT(*) FROM notifications", [], |r| r.get(0)).unwrap();
    assert_eq!(count, 8, "the replaced database, lost notifications and all, still opens as it was");
    drop(kept);

    let server = start(dir.path(), &vars);
    let (ws, http) = (format!("ws://127.0.0.1:{}", server.port), format!("http://127.0.0.1:{}", server.port));
    let publisher = Publisher::new(&http, API_KEY);
    for i in 6..=9 {
        assert_eq!(publisher.publish_one("dan", "t", json!(format!("new-{i}"))).await.unwrap().seq, i);
    }
    // Saw up to 8 in epoch e0: resumes after 5, the fork, and gets 6..9, all new.
    let mut back = Connect::new(&ws, &token).since(8).epoch(&e0).connect().await.unwrap();
    let e1 = back.welcome().epoch.clone().unwrap();
    assert_ne!(e1, e0);
    assert_eq!((back.welcome().since, back.welcome().last_seq), (Some(5), 9));
    let got: Vec<_> = notifications(&mut back, 4).await.into_iter().map(|n| (n.seq, n.payload)).collect();
    assert_eq!(got, (6..=9).map(|i| (i, json!(format!("new-{i}")))).collect::<Vec<_>>());
    // A cursor of the current epoch, and one sent without an epoch, resume where they say.
    let current = Connect::new(&ws, &token).since(8).epoch(&e1).connect().await.unwrap();
    assert_eq!(current.welcome().since, Some(8));
    let unsaid = Connect::new(&ws, &token).since(8).connect().await.unwrap();
    assert_eq!(unsaid.welcome().since, Some(8));
    // An epoch of another store entirely: from the start.
    let mut stranger = Connect::new(&ws, &token).since(8).epoch("another-store").connect().await.unwrap();
    assert_eq!(stranger.welcome().since, Some(0));
    assert_eq!(notifications(&mut stranger, 9).await.first().unwrap().payload, json!("old-1"));
    // Two of those went back to a fork (after 5, and to the start); the other two did not.
    let metrics = reqwest::get(format!("{http}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "herald_fork_resumes_total 2"), "{metrics}");
    server.signal("-TERM");
    assert_eq!(server.wait(), 0);
}

/// `sh -c` script: mounts a 10 MiB tmpfs on `$1` (in the mount namespace
/// `unshare` made), fills part of it with three files an operator can delete
/// to make room, then runs the rest of its arguments.
const ON_A_SMALL_DISK: &str = r#"mount -t tmpfs -o size=10m herald-test-disk "$1" &&
head -c 65536 /dev/zero > "$1/room-for-a-job" &&
head -c 1048576 /dev/zero > "$1/room-for-attempts" &&
head -c 5242880 /dev/zero > "$1/room" &&
shift && exec "$@""#;

/// A SQLite store whose disk fills up. The real binary runs in a user and
/// mount namespace of its own (`unshare`, as root or not) with its database
/// on a 10 MiB tmpfs there, which this test reaches through
/// `/proc/<pid>/root`. While the disk is full (something else filled it to
/// the last block) every write is refused with 503 `store_unavailable` and
/// `Retry-After` (the HTTP API), an `error` frame (a session's `read`), or
/// a retry (a large-audience job: never failed for good, never worked on
/// unclaimed); the node keeps serving reads and sessions, and every
/// acknowledged notification stays stored and delivered. Once room is made, writes resume without a restart, seqs
/// carry on without a gap, the job completes, and `herald check` finds the
/// store sound. The writer logs the failures once, and their end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_with_503_loses_nothing_and_recovers_once_room_is_made() {
    let (logs, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let vars = [
        ("HERALD_JWT_SECRET", SECRET),
        ("HERALD_API_KEYS", API_KEY),
        ("HERALD_MAX_USER_IDS", "100"),
        // An attempt whose end could not be recorded is taken up again after this.
        ("HERALD_JOB_LEASE", "2s"),
    ];
    let mut unshare = with_settings(Command::new("unshare"), dir.path(), &vars);
    unshare.args([
        "--user",
        "--map-root-user",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        ON_A_SMALL_DISK,
        "sh",
    ]);
    unshare.arg(dir.path()).args([BIN, "serve"]);
    let server = start_command(unshare, logs.path());
    let disk =
        Path::new("/proc").join(server.child.id().to_string()).join("root").join(dir.path().strip_prefix("/").unwrap());
    assert!(disk.join("room").is_file(), "the node's tmpfs is not visible at {}", disk.display());

    let base = format!("127.0.0.1:{}", server.port);
    let http = reqwest::Client::new();
    let publish = |body: serde_json::Value| {
        raw(http.post(format!("http://{base}/v1/notifications")).bearer_auth(API_KEY).json(&body))
    };
    let refused_for_now = |answer: &Raw, what: &str| {
        assert_eq!(answer.status, 503, "{what}: {}", answer.body);
        assert_eq!(answer.error_code(), "store_unavailable", "{what}");
        assert!(answer.headers.contains_key("retry-after"), "{what}: 503 without Retry-After");
    };
    let token = herald_server::auth::mint(SECRET, "alice", 3600);
    let mut alice = Connect::new(format!("ws://{base}"), token.clone()).connect().await.unwrap();

    let pad = "x".repeat(1000);
    let mut acknowledged = Vec::new();
    for i in 0..30 {
        let answer = publish(json!({"user_id": "alice", "topic": "t", "payload": {"i": i, "pad": pad}})).await;
        assert_eq!(answer.status, 201, "{}", answer.body);
        acknowledged.push(answer.body["notifications"][0]["seq"].as_i64().unwrap());
    }
    let stored_before = acknowledged.len() as i64;

    // Something else fills the disk, to the last block.
    fill(&disk.join("filler"));

    // Every write is refused for now, and stores nothing.
    for i in 0..3 {
        let answer = publish(json!({"user_id": "alice", "topic": "t", "payload": {"refused": i}})).await;
        refused_for_now(&answer, "a publish on a full disk");
    }
    let marked = raw(http
        .post(format!("http://{base}/v1/me/notifications/read"))
        .bearer_auth(&token)
        .json(&json!({"up_to_seq": 1})))
    .await;
    refused_for_now(&marked, "a read mark on a full disk");
    let audience: Vec<String> = (0..600).map(|i| format!("fan{i:03}")).collect();
    let job = json!({"user_ids": audience, "topic": "fan", "payload": {"pad": pad}});
    refused_for_now(&publish(job.clone()).await, "a large publish on a full disk");
    let digest =
        json!({"user_id": "alice", "topic": "likes", "payload": {}, "digest": {"key": "k", "window_secs": 60}});
    refused_for_now(&publish(digest).await, "a digest entry on a full disk");
    let revoke =
        raw(http.post(format!("http://{base}/v1/users/mallory/tokens/revoke")).bearer_auth(API_KEY).json(&json!({})))
            .await;
    refused_for_now(&revoke, "a token revocation on a full disk");
    // Reads and sessions go on: everything acknowledged is stored and was
    // delivered, in order, and nothing refused was.
    for path in ["healthz", "readyz"] {
        assert_eq!(raw(http.get(format!("http://{base}/{path}"))).await.status, 200, "{path}");
    }
    let publisher = Publisher::new(format!("http://{base}"), API_KEY);
    assert_eq!(stored_seqs(&publisher, "alice").await, (acknowledged.clone(), stored_before));
    let delivered: Vec<_> = notifications(&mut alice, acknowledged.len()).await.iter().map(|n| n.seq).collect();
    assert_eq!(delivered, acknowledged);
    // A session's read mark gets an error frame, and the session stays.
    alice.send_text(r#"{"type":"read","up_to_seq":1,"ref":7}"#).await.unwrap();
    match next(&mut alice).await {
        ServerFrame::Error { reference, code, .. } => {
            assert_eq!((reference, code.as_str()), (Some(json!(7)), "unavailable"))
        }
        other => panic!("expected an error frame, got {other:?}"),
    }

    let unread = raw(http.get(format!("http://{base}/v1/me/unread")).bearer_auth(&token)).await;
    assert_eq!(unread.body["total"], stored_before, "a refused read mark was stored");
    let mut since =
        Connect::new(format!("ws://{base}"), token.clone()).since(stored_before - 2).connect().await.unwrap();
    let replayed: Vec<_> = notifications(&mut since, 2).await.iter().map(|n| n.seq).collect();
    assert_eq!(replayed, vec![stored_before - 1, stored_before]);

    // Room for the job's row and a claim or so, not for its 600
    // notifications: it is accepted, its attempts fail, then its claims do.
    // A claim is only made when it is recorded (the worker backs off
    // rather than working on a job it could not claim), and the job is
    // retried, not failed for good.
    std::fs::remove_file(disk.join("room-for-a-job")).unwrap();
    let accepted = publish(job).await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let job_id = accepted.body["job_id"].as_str().unwrap().to_string();
    let job_status =
        || async { raw(http.get(format!("http://{base}/v1/jobs/{job_id}")).bearer_auth(API_KEY)).await.body };
    let log = || std::fs::read_to_string(logs.path().join("stderr")).unwrap();
    let claims_logged = || log().lines().filter(|l| l.contains(job_id.as_str()) && l.contains("job claimed")).count();
    let job_not_done = |status: &serde_json::Value| {
        assert_ne!(status["state"], "failed", "a job failed for good on a full disk: {status}");
        assert_ne!(status["state"], "done", "the job fitted; the disk is larger than this test assumes");
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log().contains("cannot claim jobs") {
        job_not_done(&job_status().await);
        assert!(Instant::now() < deadline, "claims never failed for want of room");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = job_status().await;
    job_not_done(&status);
    assert_eq!(claims_logged() as u64, status["attempts"].as_u64().unwrap(), "a claim not recorded: {status}");

    // Room for claims, not for the notifications: the attempts go on past
    // the 5 claims a failure of another kind gets (8–15 s of backoff).
    std::fs::remove_file(disk.join("room-for-attempts")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let retrying = loop {
        let status = job_status().await;
        job_not_done(&status);
        if status["attempts"].as_u64().unwrap() > 5 {
            break status;
        }
        assert!(Instant::now() < deadline, "the job was not retried: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(retrying["progress"]["done"], 0, "{retrying}");
    assert_eq!(retrying["error"], "database or disk is full", "{retrying}");

    // The operator makes room: writes resume where they stopped.
    std::fs::remove_file(disk.join("room")).unwrap();
    let next_one = publish(json!({"user_id": "alice", "topic": "t", "payload": "after"})).await;
    assert_eq!(next_one.status, 201, "{}", next_one.body);
    assert_eq!(next_one.body["notifications"][0]["seq"], stored_before + 1, "a refused publish took a seq");
    assert!(matches!(next(&mut alice).await, ServerFrame::Notification(n) if n.seq == stored_before + 1));
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let status = job_status().await;
        if status["state"] == "done" {
            assert_eq!(status["progress"]["done"], 600, "{status}");
            assert_eq!(claims_logged() as u64, status["attempts"].as_u64().unwrap(), "{status}");
            break;
        }
        assert_ne!(status["state"], "failed", "{status}");
        assert!(Instant::now() < deadline, "the job did not finish once there was room: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for user in ["fan000", "fan299", "fan599"] {
        assert_eq!(stored_seqs(&publisher, user).await, (vec![1], 1), "{user}");
    }
    // In the node's namespaces: SQLite resolves `/proc/<pid>/root` to `/`.
    let pid = server.child.id().to_string();
    let check = with_settings(Command::new("nsenter"), dir.path(), &vars)
        .args(["--target", &pid, "--user", "--mount", BIN, "check"])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    server.signal("-TERM");
    assert_eq!(server.wait(), 0);
    let log = log();
    let failures: Vec<_> = log.lines().filter(|l| l.contains("group commit failed") && !l.contains("DEBUG")).collect();
    assert_eq!(failures.len(), 1, "the writer logs a run of failures once: {failures:#?}");
    assert!(failures[0].contains("WARN") && failures[0].contains("database or disk is full"), "{}", failures[0]);
    assert!(log.contains("group commits succeed again"), "the end of the failures is not logged");
}

/// A node whose process may open few files (256 here; the soft limit of
/// 200 is raised to the hard 256 at start) takes no more clients than it
/// can hold beside its own descriptors: sessions past its cap get 503
/// `node_full` with `Retry-After` before the upgrade, the HTTP API keeps
/// room beside a node full of sessions, connections past the connection cap
/// wait in the listen queue instead of taking the store's descriptors, and
/// the store keeps opening the connections it needs. Nothing ever meets
/// "Too many open files".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_short_of_file_descriptors_caps_its_clients_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("HERALD_JWT_SECRET", SECRET),
        ("HERALD_API_KEYS", API_KEY),
        ("HERALD_LIMIT_HANDSHAKES_PER_IP", "off"),
        ("HERALD_LIMIT_SESSIONS_PER_IP", "off"),
        // Connections that send nothing are closed after this.
        ("HERALD_HEADER_TIMEOUT", "1s"),
    ];
    let mut prlimit = with_settings(Command::new("prlimit"), dir.path(), &vars);
    prlimit.args(["--nofile=200:256", BIN, "serve"]);
    let server = start_command(prlimit, dir.path());
    let log = || std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    assert!(log().contains("raised the open-file limit"), "{}", log());

    let http = format!("http://127.0.0.1:{}", server.port);
    let ws = format!("ws://127.0.0.1:{}", server.port);
    let connections = 256 - herald_server::capacity::reserve(8);
    let sessions = connections - 64;
    assert_eq!(metric_at(&http, "herald_connections_max").await, connections as f64);
    assert_eq!(metric_at(&http, "herald_sessions_max").await, sessions as f64);

    // More sessions than the node takes: the last ones are refused, early.
    let users: Vec<String> = (0..sessions + 10).map(|i| format!("u{i:03}")).collect();
    let mut open = Vec::new();
    let mut refused = Vec::new();
    for user in &users {
        let token = herald_server::auth::mint(SECRET, user, 3600);
        match Connect::new(ws.clone(), token).connect().await {
            Ok(session) => open.push(session),
            Err(herald_client::Error::Refused { status, code, .. }) => refused.push((status, code)),
            Err(e) => panic!("{user}: neither a session nor a refusal: {e}"),
        }
    }
    assert_eq!(open.len(), sessions);
    assert!(refused.iter().all(|r| *r == (503, "node_full".to_string())), "{refused:?}");
    assert_eq!(refused.len(), 10);
    let answer = raw(reqwest::Client::new()
        .get(format!("{http}/v1/ws"))
        .query(&[("access_token", herald_server::auth::mint(SECRET, "late", 3600))]))
    .await;
    assert_eq!((answer.status, answer.error_code()), (503, "node_full"), "{}", answer.body);
    assert_eq!(answer.headers["retry-after"], "5");
    assert_eq!(metric_at(&http, "herald_handshakes_total{outcome=\"node_full\"}").await, 11.0);

    // A node full of sessions still takes publishes, and its store the
    // connections it opens under load.
    let publisher = Publisher::new(http.clone(), API_KEY);
    let batch = json!({"user_ids": users[..sessions], "topic": "t", "payload": {"full": true}});
    let answer =
        raw(reqwest::Client::new().post(format!("{http}/v1/notifications")).bearer_auth(API_KEY).json(&batch)).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    for session in &mut open {
        let n = next_notification(session).await;
        assert_eq!(n.payload, json!({"full": true}));
    }
    let reads = (0..32).map(|i| publisher.history(&users[i], 0, 10));
    for read in futures_util::future::join_all(reads).await {
        assert_eq!(read.unwrap().notifications.len(), 1);
    }

    // Connections that hold their slot and say nothing: past the cap the
    // rest wait in the listen queue; a publisher's connection waits behind
    // them, and is served once the silent ones are closed (after 1 s each).
    let silent: Vec<_> = futures_util::future::join_all(
        (0..120).map(|_| tokio::net::TcpStream::connect(format!("127.0.0.1:{}", server.port))),
    )
    .await;
    assert!(silent.iter().all(Result::is_ok));
    let late = Publisher::new(http.clone(), API_KEY);
    let published = tokio::time::timeout(Duration::from_secs(30), late.publish_one("u000", "t", json!("late")))
        .await
        .expect("the publish was never served")
        .unwrap();
    assert_eq!(published.seq, 2);
    assert_eq!(next_notification(&mut open[0]).await.seq, 2);
    assert!(metric_at(&http, "herald_accept_waits_total").await >= 1.0);
    assert!(log().contains("every connection slot is taken"), "{}", log());

    // A session that ends gives its place back.
    drop(open.pop());
    let token = herald_server::auth::mint(SECRET, "newcomer", 3600);
    let mut welcomed = false;
    let deadline = Instant::now() + WAIT;
    while !welcomed {
        match Connect::new(ws.clone(), token.clone()).connect().await {
            Ok(_) => welcomed = true,
            Err(herald_client::Error::Refused { status: 503, .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the place of a closed session was not given back: {e}"),
        }
    }
    drop(silent);
    server.signal("-TERM");
    assert_eq!(server.wait(), 0);
    let log = log();
    assert!(!log.contains("Too many open files") && !log.contains("accept failed"), "{log}");
    // Eleven refusals or more, within seconds: one warn line per 10 s (a
    // second only if the newcomer's retries came 10 s after the first).
    let lines = log.lines().filter(|l| l.contains("request refused: unavailable") && l.contains("node_full")).count();
    assert!((1..=2).contains(&lines), "a run of refusals is one warn line per 10 s, not one each: {log}");
}
