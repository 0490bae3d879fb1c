//! A node's own connections over TLS: PostgreSQL (`sslmode` and
//! `sslrootcert` in `HERALD_DATABASE_URL`) and Redis (`rediss://`, with
//! `HERALD_REDIS_TLS_CA` and a client certificate from
//! `HERALD_REDIS_TLS_CERT` / `_KEY`). Real `herald` processes against a
//! private PostgreSQL with `ssl=on` and a private Redis that speaks only
//! TLS, with certificates from a throwaway CA; a certificate the node does
//! not trust stops it at start with a clear error.

mod common;
mod services;

use std::collections::HashMap;
use std::time::Duration;

use common::tls::TestCerts;
use common::*;
use herald_server::config::Settings;
use serde_json::json;
use services::*;
use sqlx::Connection;

/// Longest wait for notifications that should arrive; only a failure limit.
const DEADLINE: Duration = Duration::from_secs(20);

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars =
        vec![("HERALD_JWT_SECRET".to_string(), SECRET.to_string()), ("HERALD_API_KEYS".into(), API_KEY.into())];
    vars.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    vars
}

/// Starts a node that must fail to start; its exit code and log.
async fn failed_start(name: &str, pairs: &[(&str, &str)]) -> (i32, String) {
    let mut node = Node::spawn(name, &vars(pairs));
    let code = node.wait_exit().await;
    (code, node.log())
}

/// Publishes `count` notifications to `user` through `node`; asserts seqs `1..=count`.
async fn publish_n(node: &Node, user: &str, count: i64) {
    let publisher = node.publisher();
    for i in 1..=count {
        let published = publish_within(&publisher, user, json!({ "i": i })).await.expect("a publish");
        assert_eq!(published.seq, i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_verified_tls_stores_and_replays_and_an_unknown_ca_stops_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let ca = certs.ca_file(dir.path(), "ca.pem");
    let other = TestCerts::create_named(dir.path(), "other", "Other");
    let other_ca = other.ca_file(dir.path(), "other-ca.pem");
    let pg = PrivatePostgres::start_with_tls(&certs.cert, &certs.key);
    let db = TestDatabase::create_on(&pg.url());
    let verified = format!("{}?sslmode=verify-full&sslrootcert={}", db.url(), ca.display());

    let cluster = Cluster::build().nodes(1).postgres_admin(pg.url()).env("HERALD_DATABASE_URL", &verified).start();
    let node = cluster.node(0);
    let live = Reader::spawn(node.connect("alice", None).await, None);
    publish_n(node, "alice", 3).await;
    live.until(3, DEADLINE).await.assert_exactly("alice, live", 3);
    let replay = Reader::spawn(node.connect("alice", Some(1)).await, None);
    let replayed = replay.until(3, DEADLINE).await;
    assert_eq!(replayed.seqs, vec![2, 3], "the replay after since=1");

    // Every connection the node holds to this database is encrypted.
    let mut admin = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    let (connections, all_tls): (i64, Option<bool>) = sqlx::query_as(
        "SELECT count(*), bool_and(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid
         WHERE a.application_name = 'herald' AND a.datname = $1",
    )
    .bind(db.name())
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(connections > 0, "the node holds no connection to {}", db.name());
    assert_eq!(all_tls, Some(true), "{connections} connections, not all over TLS");
    admin.close().await.ok();
    drop(cluster);

    // A server certificate no trusted CA signed: the node does not start.
    let untrusted = format!("{}?sslmode=verify-full&sslrootcert={}", db.url(), other_ca.display());
    let (code, log) = failed_start("pg-untrusted", &[("HERALD_DATABASE_URL", &untrusted)]).await;
    assert_ne!(code, 0, "a node trusting another CA started:\n{log}");
    assert!(log.contains("UnknownIssuer") && log.contains("name the CA with sslrootcert=PATH"), "no hint:\n{log}");
}

/// Two nodes on `redis` (TLS; `extra` settings on top), the periodic repair
/// (which reads the store) pushed out of the way, so a notification
/// published on node 0 can only reach node 1 through Redis; presence too.
async fn nodes_fan_out_through(redis_url: String, extra: &[(&str, &str)]) {
    let mut build = Cluster::build().nodes(2).redis(redis_url).env("HERALD_REPAIR_INTERVAL", "1h");
    for (key, value) in extra {
        build = build.env(key, value);
    }
    let cluster = build.start();
    let reader = Reader::spawn(cluster.node(1).connect("alice", None).await, None);
    publish_n(cluster.node(0), "alice", 5).await;

    let client = reqwest::Client::new();
    let url = format!("{}/v1/users/alice/presence", cluster.node(0).http());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let answer = client.get(&url).bearer_auth(API_KEY).timeout(DEADLINE).send().await.unwrap();
        let presence: serde_json::Value = answer.json().await.unwrap();
        if presence["sessions"] == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "node 0 never saw alice's session: {presence}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reader.until(5, DEADLINE).await.assert_exactly("alice on node-1, published on node-0", 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_fan_out_through_redis_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let ca = certs.ca_file(dir.path(), "ca.pem");
    let redis = TlsRedis::start(&certs.cert, &certs.key, &ca, true);
    let (ca, cert, key) = (ca.to_str().unwrap(), certs.cert.to_str().unwrap(), certs.key.to_str().unwrap());
    let client = [("HERALD_REDIS_TLS_CERT", cert), ("HERALD_REDIS_TLS_KEY", key)];
    nodes_fan_out_through(redis.url(), &[("HERALD_REDIS_TLS_CA", ca), client[0], client[1]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_fan_out_through_a_redis_cluster_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let ca = certs.ca_file(dir.path(), "ca.pem");
    let redis = RedisCluster::start_tls(&certs.cert, &certs.key, &ca);
    assert!(redis.url().starts_with("rediss+cluster://"));
    nodes_fan_out_through(redis.url(), &[("HERALD_REDIS_TLS_CA", ca.to_str().unwrap())]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_refuses_an_unknown_ca_and_a_missing_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let ca = certs.ca_file(dir.path(), "ca.pem");
    let redis = TlsRedis::start(&certs.cert, &certs.key, &ca, true);
    let db = TestDatabase::create();
    let (cert, key) = (certs.cert.to_str().unwrap(), certs.key.to_str().unwrap());
    let base = [("HERALD_DATABASE_URL", db.url()), ("HERALD_REDIS_URL", redis.url())];
    let with = |extra: &[(&'static str, &str)]| {
        let mut pairs: Vec<(&str, String)> = base.to_vec();
        pairs.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        pairs
    };
    let run = |name: &'static str, pairs: Vec<(&'static str, String)>| async move {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        failed_start(name, &pairs).await
    };

    // The built-in roots do not know the test CA.
    let (code, log) = run("redis-no-ca", with(&[("HERALD_REDIS_TLS_CERT", cert), ("HERALD_REDIS_TLS_KEY", key)])).await;
    assert_ne!(code, 0, "a node without the CA connected:\n{log}");
    assert!(log.contains("HERALD_REDIS_URL") && log.contains("name the CA with HERALD_REDIS_TLS_CA"), "{log}");

    // The server requires a client certificate.
    let ca = ca.to_str().unwrap();
    let (code, log) = run("redis-no-client-cert", with(&[("HERALD_REDIS_TLS_CA", ca)])).await;
    assert_ne!(code, 0, "a node without a client certificate connected:\n{log}");
    assert!(log.contains("HERALD_REDIS_URL"), "{log}");
}

#[test]
fn redis_tls_settings_are_checked_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let other = TestCerts::create_named(dir.path(), "other", "Other");
    let ca = certs.ca_file(dir.path(), "ca.pem");
    let (ca, cert, key) = (ca.to_str().unwrap(), certs.cert.to_str().unwrap(), certs.key.to_str().unwrap());
    let load = |pairs: &[(&str, &str)]| {
        let mut env: HashMap<&str, &str> = HashMap::from([("HERALD_JWT_SECRET", SECRET), ("HERALD_API_KEYS", API_KEY)]);
        env.extend(pairs.iter().copied());
        Settings::load(&env, None)
    };
    let tls_url = ("HERALD_REDIS_URL", "rediss://127.0.0.1:6380");

    let settings =
        load(&[tls_url, ("HERALD_REDIS_TLS_CA", ca), ("HERALD_REDIS_TLS_CERT", cert), ("HERALD_REDIS_TLS_KEY", key)])
            .expect("a CA and a client pair for rediss://");
    assert!(!settings.redis_tls.is_empty());
    let shown = format!("{settings:?}");
    assert!(shown.contains("client_certificate: true") && !shown.contains("BEGIN"), "{shown}");
    assert!(load(&[tls_url]).unwrap().redis_tls.is_empty(), "rediss:// alone: the built-in roots");
    assert!(load(&[
        ("HERALD_REDIS_URL", "rediss+cluster://127.0.0.1:7000,127.0.0.1:7001"),
        ("HERALD_REDIS_TLS_CA", ca)
    ])
    .is_ok());

    let error = |pairs: &[(&str, &str)]| load(pairs).expect_err("refused").to_string();
    let plain = error(&[("HERALD_REDIS_URL", "redis://127.0.0.1:6379"), ("HERALD_REDIS_TLS_CA", ca)]);
    assert!(plain.starts_with("HERALD_REDIS_TLS_CA") && plain.contains("rediss://"), "{plain}");
    let no_url = error(&[("HERALD_REDIS_TLS_CERT", cert), ("HERALD_REDIS_TLS_KEY", key)]);
    assert!(no_url.starts_with("HERALD_REDIS_TLS_CERT") && no_url.contains("rediss://"), "{no_url}");
    let only_cert = error(&[tls_url, ("HERALD_REDIS_TLS_CERT", cert)]);
    assert!(only_cert.starts_with("HERALD_REDIS_TLS_KEY"), "{only_cert}");
    let only_key = error(&[tls_url, ("HERALD_REDIS_TLS_KEY", key)]);
    assert!(only_key.starts_with("HERALD_REDIS_TLS_CERT"), "{only_key}");
    let not_pem = error(&[tls_url, ("HERALD_REDIS_TLS_CA", key)]);
    assert!(not_pem.starts_with("HERALD_REDIS_TLS_CA") && not_pem.contains("no PEM certificate"), "{not_pem}");
    let missing = error(&[tls_url, ("HERALD_REDIS_TLS_CA", "/nonexistent/ca.pem")]);
    assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
    let other_key = other.key.to_str().unwrap();
    let mismatched = error(&[tls_url, ("HERALD_REDIS_TLS_CERT", cert), ("HERALD_REDIS_TLS_KEY", other_key)]);
    assert!(mismatched.contains("do not form a usable pair"), "{mismatched}");
    let insecure = error(&[("HERALD_REDIS_URL", "rediss://127.0.0.1:6380/#insecure")]);
    assert!(insecure.starts_with("HERALD_REDIS_URL") && insecure.contains("HERALD_REDIS_TLS_CA"), "{insecure}");
}

/// Listens on `port` in place of PostgreSQL and declines TLS (`N` to the
/// SSLRequest), as a server restarted without `ssl` would. Ends when dropped.
struct NoTls {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NoTls {
    fn listen(port: u16) -> NoTls {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the stopped database's port");
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut ssl_request = [0u8; 8];
                        if conn.read_exact(&mut ssl_request).is_ok() {
                            let _ = conn.write_all(b"N");
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        NoTls { stop, thread: Some(thread) }
    }
}

impl Drop for NoTls {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A publish's status and body.
async fn publish_status(node: &Node) -> (u16, serde_json::Value) {
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/notifications", node.http()))
        .bearer_auth(API_KEY)
        .json(&json!({ "user_id": "alice", "topic": "t", "payload": {} }))
        .timeout(DEADLINE)
        .send()
        .await
        .expect("an answer");
    (answer.status().as_u16(), answer.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_offering_tls_answers_503_not_500() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let pg = PrivatePostgres::start_with_tls(&certs.cert, &certs.key);
    let db = TestDatabase::create_on(&pg.url());
    let url = format!("{}?sslmode=require", db.url());
    let cluster = Cluster::build()
        .nodes(1)
        .postgres_admin(pg.url())
        .env("HERALD_DATABASE_URL", &url)
        .env("HERALD_DB_CONNECT_TIMEOUT", "2s")
        .start();
    let node = cluster.node(0);
    assert_eq!(publish_status(node).await.0, 201);

    // The database goes away and what answers on its port declines TLS,
    // which `sslmode=require` refuses: every new connection fails.
    pg.stop();
    let broken = NoTls::listen(pg.port());
    for _ in 0..3 {
        let (status, body) = publish_status(node).await;
        assert_eq!(status, 503, "a publish while the database declines TLS: {body}");
        assert!(body["error"]["code"].as_str().is_some_and(|c| !c.is_empty()), "not the spec's error body: {body}");
    }
    drop(broken);

    pg.start_again();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while publish_status(node).await.0 != 201 {
        assert!(tokio::time::Instant::now() < deadline, "publishes still fail after the database is back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
