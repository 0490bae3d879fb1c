//! Herald behind the repo's own nginx config (`deploy/nginx/herald.conf`):
//! the real nginx terminating TLS in front of two real `herald` nodes that
//! share PostgreSQL and Redis. The client speaks wss and the publisher https,
//! both only to nginx.
//!
//! The node holding the session is stopped with SIGTERM while publishing
//! through nginx goes on: the client is closed with 1001, resumes through
//! nginx with `since` (nginx passes it to the node that is not stopping), and
//! receives every notification exactly once, in order. Deadlines are only
//! "it never happened" limits.

mod common;
mod services;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::nginx::Nginx;
use common::tls::TestCerts;
use common::API_KEY;
use herald_client::{Connect, PublishRequest, Publisher, Seq, Session, Welcome};
use serde_json::json;
use services::*;

const USER: &str = "alice";
/// Notifications published through nginx in all.
const TOTAL: Seq = 240;
/// The node is stopped once the client has received this many.
const BEFORE_STOP: Seq = 80;
/// Longest wait for something that should happen; only a failure limit.
const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_behind_nginx_moves_the_session_and_loses_nothing() {
    common::nginx::binary();
    let mut cluster = Cluster::build().nodes(2).env("HERALD_TRUSTED_PROXIES", "127.0.0.1").start();
    let tmp = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(tmp.path());
    let nginx = Nginx::start(&certs, &[cluster.node(0).addr(), cluster.node(1).addr()]);
    edge_answers(&nginx, &certs).await;

    let session = connect(&nginx, &certs, 0).await;
    let on = node_of(&cluster, session.welcome());
    let other = 1 - on;
    assert_eq!(sessions_active(cluster.node(on)).await, 1, "herald_sessions_active on the welcome's node");
    assert_eq!(sessions_active(cluster.node(other)).await, 0, "herald_sessions_active on the other node");

    let reader = Reader::spawn(session, None);
    let acked = Arc::new(AtomicI64::new(0));
    let publishing = tokio::spawn(publish_all(publisher(&nginx, &certs), acked.clone()));
    wait_for("the client received the first notifications", || reader.last_seen() >= BEFORE_STOP).await;

    cluster.node(on).sigterm();
    let acked_at_stop = acked.load(Ordering::SeqCst);
    let before = reader.ended(DEADLINE).await;
    match &before.ended {
        Some(herald_client::Error::Closed { code: 1001, .. }) => {}
        ended => panic!("expected close 1001 through nginx on SIGTERM, got {ended:?}\n{}", nginx.logs()),
    }
    let last_seen = *before.seqs.last().expect("notifications before SIGTERM");
    assert_exactly_once("alice before SIGTERM", &before.seqs, 1, last_seen);

    let resumed = connect(&nginx, &certs, last_seen).await;
    assert_eq!(node_of(&cluster, resumed.welcome()), other, "nginx sent the resumed session to the stopping node");
    let after = Reader::spawn(resumed, None);

    let (acknowledged, retries) = publishing.await.expect("the publisher panicked");
    assert!(acked_at_stop < TOTAL - 20, "publishing had (almost) finished before SIGTERM: {acked_at_stop} of {TOTAL}");
    eprintln!(
        "{retries} publish attempts through nginx failed while {} stopped, and were retried",
        cluster.node(on).name
    );
    assert_exactly_once("the seqs of the HTTP answers through nginx", &acknowledged, 1, TOTAL);

    let after = after.until(TOTAL, DEADLINE).await;
    assert!(after.ended.is_none(), "the resumed session ended: {:?}", after.ended);
    assert_exactly_once("alice after resuming through nginx", &after.seqs, last_seen + 1, TOTAL);
    assert_eq!(cluster.node_mut(on).wait_exit().await, 0, "exit code after SIGTERM");
}

/// What nginx answers itself: the request id passed through and echoed,
/// a fresh one when the caller sent none, operations endpoints hidden with
/// the spec's error body.
async fn edge_answers(nginx: &Nginx, certs: &TestCerts) {
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(certs.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let healthz = http.get(format!("{}/healthz", nginx.https())).header("x-request-id", "req-42").send().await;
    let healthz = healthz.unwrap_or_else(|e| panic!("GET /healthz through nginx: {e}\n{}", nginx.logs()));
    assert_eq!(healthz.status(), 200);
    assert_eq!(healthz.headers()["x-request-id"], "req-42", "the caller's X-Request-Id is echoed");

    let metrics = http.get(format!("{}/metrics", nginx.https())).send().await.unwrap();
    assert_eq!(metrics.status(), 404, "/metrics must not be reachable through nginx");
    let generated = metrics.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 32, "a generated request id: {generated}");
    let body: serde_json::Value = metrics.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
}

/// A wss session of [`USER`] through nginx, resuming after `since`.
async fn connect(nginx: &Nginx, certs: &TestCerts, since: Seq) -> Session {
    let token = herald_server::auth::mint(common::SECRET, USER, 3600);
    let connect = Connect::new(nginx.wss(), token).since(since).root_certificate(certs.ca_pem.clone());
    match tokio::time::timeout(DEADLINE, connect.connect()).await {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => panic!("wss through nginx (since {since}): {e}\n{}", nginx.logs()),
        Err(_) => panic!("wss through nginx (since {since}) hung\n{}", nginx.logs()),
    }
}

fn publisher(nginx: &Nginx, certs: &TestCerts) -> Publisher {
    Publisher::with_root_certificate(nginx.https(), API_KEY, certs.ca_pem.clone()).unwrap()
}

/// The index of the node named in `welcome`.
fn node_of(cluster: &Cluster, welcome: &Welcome) -> usize {
    cluster.nodes.iter().position(|n| n.name == welcome.node_id).unwrap_or_else(|| panic!("unknown node {welcome:?}"))
}

/// `herald_sessions_active` of `node`, read from the node itself.
async fn sessions_active(node: &Node) -> u64 {
    let text = reqwest::get(format!("{}/metrics", node.http())).await.unwrap().text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with("herald_sessions_active ")).expect("herald_sessions_active");
    line["herald_sessions_active ".len()..].trim().parse().unwrap()
}

/// Publishes `{"i": i}` for `i` in `1..=TOTAL` through `publisher`, one at
/// a time, as a careful backend does: an attempt that fails (nginx found no
/// node, or the node stopped mid-request) is retried with the same
/// idempotency key, so it is stored once. Returns every publish's seq in
/// order, and how many attempts failed.
async fn publish_all(publisher: Publisher, acked: Arc<AtomicI64>) -> (Vec<Seq>, usize) {
    let (mut seqs, mut retries) = (Vec::new(), 0);
    for i in 1..=TOTAL {
        let request = PublishRequest {
            user_id: Some(USER.into()),
            user_ids: None,
            topic: "nginx".into(),
            payload: json!({ "i": i }),
            idempotency_key: Some(format!("nginx-{i}")),
            digest: None,
        };
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let seq = loop {
            let error = match tokio::time::timeout(PUBLISH_TIMEOUT, publisher.publish(&request)).await {
                Ok(Ok((status, answer))) if status.is_success() => break answer.notifications[0].seq,
                Ok(Ok((status, _))) => format!("status {status}"),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {PUBLISH_TIMEOUT:?}"),
            };
            assert!(tokio::time::Instant::now() < deadline, "publish #{i} through nginx keeps failing: {error}");
            retries += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        seqs.push(seq);
        acked.store(i, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (seqs, retries)
}

/// Polls `check` until it holds, failing after [`DEADLINE`].
async fn wait_for(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never happened within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// nginx closes a proxied WebSocket that is silent for `proxy_read_timeout`;
/// a node pings every `HERALD_HEARTBEAT_SECS`, so the timeouts must outlast
/// the default heartbeat (with room for a late ping).
#[test]
fn proxy_timeouts_outlast_the_heartbeat() {
    let defaults =
        herald_server::config::Settings::load(&std::collections::HashMap::<String, String>::new(), None).unwrap();
    let conf = common::nginx::herald_conf();
    for directive in ["proxy_read_timeout", "proxy_send_timeout"] {
        let values: Vec<u64> = conf
            .lines()
            .map(str::trim)
            .filter_map(|l| l.strip_prefix(directive))
            .map(|v| {
                let v = v.trim().trim_end_matches(';');
                v.strip_suffix('s')
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{directive} {v}: write seconds"))
            })
            .collect();
        assert!(!values.is_empty(), "herald.conf sets no {directive}");
        for secs in values {
            assert!(
                secs >= 2 * defaults.heartbeat_secs,
                "{directive} {secs}s is too short for a heartbeat of {}s",
                defaults.heartbeat_secs
            );
        }
    }
}
