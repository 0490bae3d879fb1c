//! Native TLS: https and wss on the node's one port (`HERALD_TLS_CERT` /
//! `HERALD_TLS_KEY`), with certificates from a throwaway CA.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::tls::TestCerts;
use common::*;
use futures_util::StreamExt;
use herald_client::ServerFrame;
use herald_server::config::Settings;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

async fn start_tls(dir: &std::path::Path, certs: &TestCerts, extra: &[(&str, &str)]) -> TestServer {
    let [(k1, v1), (k2, v2)] = certs.vars();
    let mut vars = vec![(k1, v1.as_str()), (k2, v2.as_str())];
    vars.extend_from_slice(extra);
    TestServer::start_in(dir, &vars).await
}

fn https(server: &TestServer) -> String {
    format!("https://localhost:{}", server.addr.port())
}

fn client_trusting(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], 0).into())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn rustls_trusting(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A wss session for `user`, trusting `ca_pem`; answers the welcome frame's text.
async fn wss_connect(
    server: &TestServer,
    ca_pem: &str,
    user: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::Error,
> {
    let mut request = format!("wss://localhost:{}/v1/ws", server.addr.port()).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", server.token(user)).parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
        request,
        tcp,
        None,
        Some(Connector::Rustls(rustls_trusting(ca_pem))),
    )
    .await?;
    Ok(ws)
}

async fn next_json<S>(ws: &mut S) -> serde_json::Value
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let message = tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time").unwrap().unwrap();
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

#[tokio::test]
async fn https_and_wss_share_the_port_and_deliver() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let server = start_tls(dir.path(), &certs, &[]).await;
    let http = client_trusting(&certs.ca_pem);

    let health = http.get(format!("{}/healthz", https(&server))).send().await.unwrap();
    assert_eq!(health.status(), 200);

    let mut ws = wss_connect(&server, &certs.ca_pem, "alice").await.expect("wss handshake");
    let welcome = next_json(&mut ws).await;
    assert_eq!((welcome["type"].as_str(), welcome["user_id"].as_str()), (Some("welcome"), Some("alice")));

    let published = http
        .post(format!("{}/v1/notifications", https(&server)))
        .bearer_auth(API_KEY)
        .json(&json!({"user_id": "alice", "topic": "tls", "payload": {"over": "https"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 201);
    let note = next_json(&mut ws).await;
    assert_eq!((note["type"].as_str(), note["seq"].as_i64()), (Some("notification"), Some(1)));
    assert_eq!(note["payload"], json!({"over": "https"}));
    server.stop().await;
}

#[tokio::test]
async fn plaintext_and_untrusted_clients_are_refused_and_the_node_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let server = start_tls(dir.path(), &certs, &[]).await;

    // Plain http to the TLS port gets no HTTP answer.
    let plain = reqwest::get(format!("http://127.0.0.1:{}/healthz", server.addr.port())).await;
    assert!(plain.is_err(), "plain http was answered: {plain:?}");
    // A client that does not trust the CA fails the handshake.
    let stranger = TestCerts::create_named(dir.path(), "stranger", "Someone else");
    assert!(wss_connect(&server, &stranger.ca_pem, "alice").await.is_err());
    assert!(client_trusting(&stranger.ca_pem).get(format!("{}/healthz", https(&server))).send().await.is_err());

    // The node is unharmed.
    let mut ws = wss_connect(&server, &certs.ca_pem, "bob").await.expect("wss handshake");
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    server.stop().await;
}

/// Handshakes run in tasks of their own: clients that connect and say
/// nothing do not hold up anyone else's handshake.
#[tokio::test]
async fn silent_connections_do_not_hold_up_other_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let server = start_tls(dir.path(), &certs, &[]).await;
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    // A handshake that waited behind them would wait for their 10 s timeout.
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(certs.ca_pem.as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], 0).into())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let health = http.get(format!("{}/healthz", https(&server))).send().await.expect("served past silent peers");
    assert_eq!(health.status(), 200);
    drop(silent);
    server.stop().await;
}

/// Over TLS, a connection holds its slot under `HERALD_MAX_CONNECTIONS`
/// from its TCP accept, through its handshake and a WebSocket upgrade, to
/// its close; and `HERALD_MAX_SESSIONS` refuses the session past it.
#[tokio::test]
async fn tls_connections_and_sessions_hold_their_places_until_they_close() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let caps = [("HERALD_MAX_CONNECTIONS", "3"), ("HERALD_MAX_SESSIONS", "1")];
    let server = start_tls(dir.path(), &certs, &caps).await;
    let mut alice = wss_connect(&server, &certs.ca_pem, "alice").await.expect("wss handshake");
    assert_eq!(next_json(&mut alice).await["type"], "welcome");
    match wss_connect(&server, &certs.ca_pem, "bob").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            let body: serde_json::Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "node_full");
        }
        other => panic!("a second session on a node that takes one: {other:?}"),
    }

    // alice's session and a silent connection take two of the three slots;
    // a client that keeps its connection takes the third.
    let _silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let keeper = client_trusting(&certs.ca_pem);
    assert_eq!(keeper.get(format!("{}/healthz", https(&server))).send().await.unwrap().status(), 200);
    let connections = keeper.get(format!("{}/metrics", https(&server))).send().await.unwrap().text().await.unwrap();
    assert!(connections.lines().any(|l| l == "herald_connections_open 3"), "{connections}");
    // A fourth connection waits: its TLS handshake does not even begin.
    let (waiting, url) = (client_trusting(&certs.ca_pem), format!("{}/healthz", https(&server)));
    let late = tokio::spawn(async move { waiting.get(url).send().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!late.is_finished(), "a connection past the cap was served");
    // alice leaves: her socket's slot lets the waiting one in.
    drop(alice);
    let answer = tokio::time::timeout(WAIT, late).await.expect("served once a slot was free").unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let server = start_tls(dir.path(), &certs, &[("HERALD_TLS_RELOAD_INTERVAL", "200ms")]).await;
    let old_ca = client_trusting(&certs.ca_pem);
    assert_eq!(old_ca.get(format!("{}/healthz", https(&server))).send().await.unwrap().status(), 200);

    // The renewal is written over the same paths (as certbot or cert-manager do).
    let renewed_dir = tempfile::tempdir().unwrap();
    let renewed = TestCerts::create_named(renewed_dir.path(), "server", "Renewed");
    let new_ca = client_trusting(&renewed.ca_pem);
    assert!(new_ca.get(format!("{}/healthz", https(&server))).send().await.is_err(), "renewed before the renewal");
    std::fs::copy(&renewed.key, &certs.key).unwrap();
    std::fs::copy(&renewed.cert, &certs.cert).unwrap();
    eventually("the renewed certificate is served", || async {
        // A fresh client each time: no pooled connection from before.
        client_trusting(&renewed.ca_pem).get(format!("{}/healthz", https(&server))).send().await.is_ok()
    })
    .await;
    assert!(client_trusting(&certs.ca_pem).get(format!("{}/healthz", https(&server))).send().await.is_err());
    server.stop().await;
}

#[test]
fn tls_settings_are_checked_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let other = TestCerts::create_named(dir.path(), "other", "Other");
    let load = |vars: &[(&str, &str)]| {
        let mut env: HashMap<&str, &str> = HashMap::from([("HERALD_JWT_SECRET", SECRET), ("HERALD_API_KEYS", API_KEY)]);
        env.extend(vars.iter().copied());
        Settings::load(&env, None).map(|s| s.tls.is_some()).map_err(|e| e.to_string())
    };
    let (cert, key) = (certs.cert.to_str().unwrap(), certs.key.to_str().unwrap());
    assert_eq!(load(&[("HERALD_TLS_CERT", cert), ("HERALD_TLS_KEY", key)]), Ok(true));
    assert_eq!(load(&[]), Ok(false));

    let only_cert = load(&[("HERALD_TLS_CERT", cert)]).unwrap_err();
    assert!(only_cert.contains("HERALD_TLS_KEY"), "{only_cert}");
    let only_key = load(&[("HERALD_TLS_KEY", key)]).unwrap_err();
    assert!(only_key.contains("HERALD_TLS_CERT"), "{only_key}");
    let missing = load(&[("HERALD_TLS_CERT", "/nonexistent/cert.pem"), ("HERALD_TLS_KEY", key)]).unwrap_err();
    assert!(missing.contains("/nonexistent/cert.pem"), "{missing}");
    let mismatched = load(&[("HERALD_TLS_CERT", cert), ("HERALD_TLS_KEY", other.key.to_str().unwrap())]).unwrap_err();
    assert!(mismatched.contains("do not form a usable pair"), "{mismatched}");
    let not_pem = load(&[("HERALD_TLS_CERT", key), ("HERALD_TLS_KEY", key)]).unwrap_err();
    assert!(not_pem.contains("no PEM certificate"), "{not_pem}");
}

/// The Rust client's frames parse over wss too (a smoke check of the pieces together).
#[tokio::test]
async fn frames_over_wss_are_the_protocol_frames() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let server = start_tls(dir.path(), &certs, &[]).await;
    let mut ws = wss_connect(&server, &certs.ca_pem, "carol").await.expect("wss handshake");
    let welcome = next_json(&mut ws).await;
    let parsed: ServerFrame = serde_json::from_value(welcome).expect("a protocol frame");
    assert!(matches!(parsed, ServerFrame::Welcome(_)));
    server.stop().await;
}
