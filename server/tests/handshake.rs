//! The WebSocket handshake and user authentication (spec §2 "Handshake",
//! §4 "Errors"): where the token may travel, which algorithms and keys verify
//! it, which claims are checked, that every refusal comes before the upgrade
//! with the spec's status and body, and that no token reaches a log line.
//!
//! Keys are fixtures in `tests/fixtures/keys/` (see the README there).

mod common;
use common::tls::TestCerts;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use herald_client::{ClientFrame, Connect, Error, Inbox, Publisher, ServerFrame, TokenVia};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------- helpers

fn key_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys").join(name)
}

fn key_path_str(name: &str) -> String {
    key_path(name).to_str().expect("a UTF-8 path").to_string()
}

fn now() -> i64 {
    herald_server::auth::unix_now()
}

/// `sub` and an `exp` an hour from now.
fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 3600})
}

/// Signs `claims` with `alg`; `kid` goes in the header when given.
fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).expect("the test key signs")
}

/// An HMAC token signed with the harness's `HERALD_JWT_SECRET`.
fn hs(alg: Algorithm, claims: &Value) -> String {
    sign(alg, None, claims, &EncodingKey::from_secret(SECRET.as_bytes()))
}

/// The private key of fixture `name` (`rsa-a`, `ec-p256`, `ed25519`, ...).
fn private_key(name: &str) -> EncodingKey {
    let pem = std::fs::read(key_path(&format!("{name}.pem"))).expect("the fixture key exists");
    let key = if name.starts_with("rsa") {
        EncodingKey::from_rsa_pem(&pem)
    } else if name.starts_with("ec") {
        EncodingKey::from_ec_pem(&pem)
    } else {
        EncodingKey::from_ed_pem(&pem)
    };
    key.expect("the fixture is a PKCS#8 private key")
}

/// A token signed with fixture key `name`.
fn signed_by(name: &str, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    sign(alg, kid, claims, &private_key(name))
}

/// `token` with its claims swapped for another user's: the signature no longer matches.
fn tampered(token: &str) -> String {
    let forged = hs(Algorithm::HS256, &claims("mallory"));
    let parts: Vec<&str> = token.split('.').collect();
    let forged_claims = forged.split('.').nth(1).unwrap();
    format!("{}.{}.{}", parts[0], forged_claims, parts[2])
}

/// Connects with `token` (in the `Authorization` header) and returns the
/// `welcome`'s user id, failing the test on a refusal.
async fn accepted(server: &TestServer, token: &str) -> String {
    let session = Connect::new(server.ws(), token).connect().await.unwrap_or_else(|e| panic!("refused: {e}"));
    let user = session.welcome().user_id.clone();
    session.close().await.unwrap();
    user
}

/// Connects with `token` and returns the refusal's status and code,
/// failing the test if the session opened.
async fn refusal(server: &TestServer, via: TokenVia, token: &str) -> (u16, String) {
    match Connect::new(server.ws(), token).token_via(via).connect().await {
        Ok(session) => panic!("accepted as {:?} with {via:?}", session.welcome().user_id),
        Err(Error::Refused { status, code, message, .. }) => {
            assert!(!message.is_empty(), "a refusal carries a message");
            (status, code)
        }
        Err(e) => panic!("not a refusal with the spec's error body: {e}"),
    }
}

/// Asserts `token` is refused with 401 `code`, whichever way it travels.
async fn refused_401(server: &TestServer, token: &str, code: &str) {
    for via in [TokenVia::Header, TokenVia::Subprotocol, TokenVia::Query] {
        assert_eq!(refusal(server, via, token).await, (401, code.to_string()), "via {via:?}");
    }
}

/// A well-formed WebSocket upgrade request for `/v1/ws?{query}`, sent raw so
/// the test sees the status, headers and body exactly as a browser would.
fn upgrade(server: &TestServer, query: &str) -> reqwest::RequestBuilder {
    let url =
        if query.is_empty() { format!("{}/v1/ws", server.http()) } else { format!("{}/v1/ws?{query}", server.http()) };
    reqwest::Client::new()
        .get(url)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
}

/// Asserts a raw answer is the refusal `status` / `code` with the spec's body.
fn assert_refused(answer: &Raw, status: u16, code: &str) {
    assert_eq!(answer.status, status, "body: {}", answer.body);
    assert_eq!(answer.error_code(), code);
    assert!(answer.headers.get("upgrade").is_none(), "a refusal does not upgrade");
    let content_type = answer.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(content_type.starts_with("application/json"), "content-type {content_type}");
}

async fn handshakes(server: &TestServer, outcome: &str) -> f64 {
    server.metric(&format!("herald_handshakes_total{{outcome=\"{outcome}\"}}")).await
}

// ------------------------------------------------- where the token travels

#[tokio::test]
async fn the_token_is_taken_from_the_header_the_subprotocol_or_the_query() {
    let server = TestServer::start().await;
    for (via, user) in [(TokenVia::Header, "alice"), (TokenVia::Subprotocol, "bob"), (TokenVia::Query, "carol")] {
        let exp = now() + 1800;
        let token = hs(Algorithm::HS256, &json!({"sub": user, "exp": exp}));
        let session = Connect::new(server.ws(), token).token_via(via).connect().await.unwrap();
        assert_eq!(session.welcome().user_id, user, "via {via:?}");
        assert_eq!(session.welcome().token_expires_at, exp, "via {via:?}");
        if via == TokenVia::Subprotocol {
            assert_eq!(session.protocol(), Some("herald.v1"), "a browser needs the server to pick herald.v1");
        }
        session.close().await.unwrap();
    }
    server.stop().await;
}

/// Opens a session with raw headers and query; returns the welcome's user id.
async fn welcome_user(server: &TestServer, query: &str, headers: &[(&'static str, String)]) -> String {
    let mut request = format!("{}/v1/ws?{query}", server.ws()).into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, HeaderValue::from_str(value).unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.expect("the upgrade succeeds");
    let frame = tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time");
    let Some(Ok(Message::Text(text))) = frame else { panic!("expected a text frame, got {frame:?}") };
    match serde_json::from_str(&text).unwrap() {
        ServerFrame::Welcome(w) => w.user_id,
        other => panic!("expected welcome, got {other:?}"),
    }
}

#[tokio::test]
async fn the_header_wins_over_the_subprotocol_which_wins_over_the_query() {
    let server = TestServer::start().await;
    let query = format!("access_token={}", server.token("by-query"));
    let protocol = ("sec-websocket-protocol", format!("herald.v1, herald.bearer.{}", server.token("by-protocol")));
    let header = ("authorization", format!("Bearer {}", server.token("by-header")));
    assert_eq!(welcome_user(&server, &query, &[]).await, "by-query");
    assert_eq!(welcome_user(&server, &query, std::slice::from_ref(&protocol)).await, "by-protocol");
    assert_eq!(welcome_user(&server, &query, &[protocol, header]).await, "by-header");
    server.stop().await;
}

// ------------------------------------------------------ algorithms and keys

#[tokio::test]
async fn hs256_hs384_and_hs512_verify_with_the_shared_secret() {
    let server = TestServer::start().await;
    for (alg, user) in [(Algorithm::HS256, "u256"), (Algorithm::HS384, "u384"), (Algorithm::HS512, "u512")] {
        assert_eq!(accepted(&server, &hs(alg, &claims(user))).await, user, "{alg:?}");
    }
    let other_secret = EncodingKey::from_secret(b"another-secret-0123456789abcdef");
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        refused_401(&server, &sign(alg, None, &claims("alice"), &other_secret), "invalid_token").await;
    }
    refused_401(&server, &tampered(&hs(Algorithm::HS256, &claims("alice"))), "invalid_token").await;
    server.stop().await;
}

/// A server whose `HERALD_JWT_PUBLIC_KEYS` is the single-key PEM of fixture
/// `key` accepts tokens signed with it under each of `algs`, refuses altered
/// ones and those of `other` (another key of the same type, when there is one),
/// and still accepts HMAC tokens from its secret.
async fn pem_key_verifies(key: &str, algs: &[Algorithm], other: Option<&str>) {
    let path = key_path_str(&format!("{key}.pub.pem"));
    let server = TestServer::start_with(&[("HERALD_JWT_PUBLIC_KEYS", &path)]).await;
    for &alg in algs {
        let user = format!("user-{alg:?}");
        let token = signed_by(key, alg, None, &claims(&user));
        assert_eq!(accepted(&server, &token).await, user, "{alg:?} with {key}");
        refused_401(&server, &tampered(&token), "invalid_token").await;
        if let Some(other) = other {
            refused_401(&server, &signed_by(other, alg, None, &claims("alice")), "invalid_token").await;
        }
    }
    assert_eq!(accepted(&server, &server.token("hmac-user")).await, "hmac-user", "the secret still works");
    server.stop().await;
}

#[tokio::test]
async fn rs256_and_ps256_verify_with_an_rsa_pem_key() {
    pem_key_verifies("rsa-a", &[Algorithm::RS256, Algorithm::PS256], Some("rsa-b")).await;
}

#[tokio::test]
async fn es256_verifies_with_a_p256_pem_key() {
    pem_key_verifies("ec-p256", &[Algorithm::ES256], None).await;
}

#[tokio::test]
async fn es384_verifies_with_a_p384_pem_key() {
    pem_key_verifies("ec-p384", &[Algorithm::ES384], None).await;
}

#[tokio::test]
async fn eddsa_verifies_with_an_ed25519_pem_key() {
    pem_key_verifies("ed25519", &[Algorithm::EdDSA], None).await;
}

#[tokio::test]
async fn a_jwks_file_picks_the_key_by_kid() {
    let server = TestServer::start_with(&[("HERALD_JWT_PUBLIC_KEYS", &key_path_str("jwks.json"))]).await;
    let good = [
        ("rsa-a", Algorithm::RS256),
        ("rsa-a", Algorithm::PS256),
        ("rsa-b", Algorithm::RS256),
        ("ec-p256", Algorithm::ES256),
        ("ec-p384", Algorithm::ES384),
        ("ed25519", Algorithm::EdDSA),
    ];
    for (kid, alg) in good {
        let user = format!("{kid}-{alg:?}");
        assert_eq!(accepted(&server, &signed_by(kid, alg, Some(kid), &claims(&user))).await, user);
    }
    let bad = [
        // A kid the set does not hold.
        signed_by("rsa-a", Algorithm::RS256, Some("retired-key"), &claims("alice")),
        // Signed by key B, naming key A.
        signed_by("rsa-b", Algorithm::RS256, Some("rsa-a"), &claims("alice")),
        signed_by("ec-p384", Algorithm::ES384, Some("ec-p256"), &claims("alice")),
        // An EC signature naming an RSA key.
        signed_by("ec-p256", Algorithm::ES256, Some("rsa-a"), &claims("alice")),
        // rsa-b's JWK pins "alg":"RS256".
        signed_by("rsa-b", Algorithm::PS256, Some("rsa-b"), &claims("alice")),
        // Several keys: a token must say which.
        signed_by("rsa-a", Algorithm::RS256, None, &claims("alice")),
    ];
    for token in &bad {
        refused_401(&server, token, "invalid_token").await;
    }
    server.stop().await;
}

// ------------------------------------------------------------------ claims

#[tokio::test]
async fn an_expired_token_is_refused_as_token_expired() {
    let server = TestServer::start().await;
    let token = hs(Algorithm::HS256, &json!({"sub": "alice", "exp": now() - 5}));
    refused_401(&server, &token, "token_expired").await;
    server.stop().await;
}

#[tokio::test]
async fn sub_and_exp_are_required_and_nbf_is_checked() {
    let server = TestServer::start().await;
    let cases = [
        ("no exp", json!({"sub": "alice"})),
        ("no sub", json!({"exp": now() + 3600})),
        ("empty sub", json!({"sub": "", "exp": now() + 3600})),
        ("sub not a string", json!({"sub": 42, "exp": now() + 3600})),
        ("nbf in the future", json!({"sub": "alice", "exp": now() + 3600, "nbf": now() + 600})),
    ];
    for (what, claims) in cases {
        let token = hs(Algorithm::HS256, &claims);
        assert_eq!(refusal(&server, TokenVia::Header, &token).await, (401, "invalid_token".into()), "{what}");
    }
    let started = json!({"sub": "alice", "exp": now() + 3600, "nbf": now() - 60});
    assert_eq!(accepted(&server, &hs(Algorithm::HS256, &started)).await, "alice", "nbf in the past");
    server.stop().await;
}

#[tokio::test]
async fn sub_is_1_to_256_bytes_of_utf8() {
    let server = TestServer::start().await;
    let longest = "a".repeat(256);
    assert_eq!(accepted(&server, &hs(Algorithm::HS256, &claims(&longest))).await, longest);
    // 128 two-byte characters: 256 bytes.
    let wide = "é".repeat(128);
    assert_eq!(accepted(&server, &hs(Algorithm::HS256, &claims(&wide))).await, wide);
    // 86 characters but 258 bytes.
    for sub in ["a".repeat(257), "€".repeat(86)] {
        refused_401(&server, &hs(Algorithm::HS256, &claims(&sub)), "invalid_token").await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_configured_issuer_and_audience_must_match() {
    let server =
        TestServer::start_with(&[("HERALD_JWT_ISSUER", "https://auth.example.com"), ("HERALD_JWT_AUDIENCE", "herald")])
            .await;
    let exp = now() + 3600;
    let right = json!({"sub": "alice", "exp": exp, "iss": "https://auth.example.com", "aud": "herald"});
    assert_eq!(accepted(&server, &hs(Algorithm::HS256, &right)).await, "alice");
    let listed = json!({"sub": "bob", "exp": exp, "iss": "https://auth.example.com", "aud": ["herald"]});
    assert_eq!(accepted(&server, &hs(Algorithm::HS256, &listed)).await, "bob", "aud as a one-element list");

    let cases = [
        ("wrong iss", json!({"sub": "alice", "exp": exp, "iss": "https://evil.example.com", "aud": "herald"})),
        ("missing iss", json!({"sub": "alice", "exp": exp, "aud": "herald"})),
        ("wrong aud", json!({"sub": "alice", "exp": exp, "iss": "https://auth.example.com", "aud": "billing"})),
        ("missing aud", json!({"sub": "alice", "exp": exp, "iss": "https://auth.example.com"})),
    ];
    for (what, claims) in cases {
        let token = hs(Algorithm::HS256, &claims);
        assert_eq!(refusal(&server, TokenVia::Header, &token).await, (401, "invalid_token".into()), "{what}");
    }
    server.stop().await;
}

// ------------------------------------------------------ algorithm attacks

#[tokio::test]
async fn alg_none_is_never_accepted() {
    let server = TestServer::start().await;
    let genuine = server.token("alice");
    let parts: Vec<&str> = genuine.split('.').collect();
    // base64url of {"alg":"none","typ":"JWT"}, {"alg":"None",...}, {"alg":"NONE",...}.
    for header in [
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0",
        "eyJhbGciOiJOb25lIiwidHlwIjoiSldUIn0",
        "eyJhbGciOiJOT05FIiwidHlwIjoiSldUIn0",
    ] {
        refused_401(&server, &format!("{header}.{}.", parts[1]), "invalid_token").await;
        refused_401(&server, &format!("{header}.{}.{}", parts[1], parts[2]), "invalid_token").await;
    }
    server.stop().await;
}

#[tokio::test]
async fn an_hs256_token_keyed_with_the_public_key_is_refused() {
    let path = key_path("rsa-a.pub.pem");
    let server = TestServer::start_with(&[("HERALD_JWT_PUBLIC_KEYS", path.to_str().unwrap())]).await;
    let public_pem = std::fs::read(&path).unwrap();
    let confused = sign(Algorithm::HS256, None, &claims("alice"), &EncodingKey::from_secret(&public_pem));
    refused_401(&server, &confused, "invalid_token").await;
    // The same server accepts the genuine RS256 token, so the refusal is about the algorithm.
    assert_eq!(accepted(&server, &signed_by("rsa-a", Algorithm::RS256, None, &claims("alice"))).await, "alice");
    server.stop().await;
}

#[tokio::test]
async fn a_public_key_token_is_refused_by_a_server_with_only_a_secret() {
    let server = TestServer::start().await;
    for (key, alg) in [("rsa-a", Algorithm::RS256), ("ec-p256", Algorithm::ES256), ("ed25519", Algorithm::EdDSA)] {
        refused_401(&server, &signed_by(key, alg, None, &claims("alice")), "invalid_token").await;
    }
    server.stop().await;
}

// -------------------------------------------- refusals before the upgrade

#[tokio::test]
async fn refusals_come_before_the_upgrade_with_the_spec_status_and_body() {
    let server = TestServer::start().await;
    let expired = hs(Algorithm::HS256, &json!({"sub": "alice", "exp": now() - 5}));
    let valid = server.token("alice");

    assert_refused(&raw(upgrade(&server, "")).await, 401, "missing_token");
    assert_refused(&raw(upgrade(&server, "access_token=")).await, 401, "missing_token");
    assert_refused(&raw(upgrade(&server, "").basic_auth("alice", Some("pw"))).await, 401, "missing_token");
    assert_refused(&raw(upgrade(&server, "").bearer_auth("not-a-jwt")).await, 401, "invalid_token");
    assert_refused(&raw(upgrade(&server, "").bearer_auth(&expired)).await, 401, "token_expired");
    assert_refused(&raw(upgrade(&server, &format!("access_token={expired}"))).await, 401, "token_expired");
    let protocol = format!("herald.v1, herald.bearer.{}", tampered(&valid));
    assert_refused(&raw(upgrade(&server, "").header("sec-websocket-protocol", protocol)).await, 401, "invalid_token");
    // The upgrade itself goes through with the same headers and a good token.
    assert_eq!(raw(upgrade(&server, "").bearer_auth(&valid)).await.status, 101);
    server.stop().await;
}

#[tokio::test]
async fn a_request_that_is_not_a_websocket_upgrade_gets_400_not_websocket() {
    let server = TestServer::start().await;
    let valid = server.token("alice");
    let http = reqwest::Client::new();
    let url = format!("{}/v1/ws", server.http());
    assert_refused(&raw(http.get(&url).bearer_auth(&valid)).await, 400, "not_websocket");
    let without = |name: &'static str| {
        let mut request = http.get(&url).bearer_auth(&valid);
        for (header, value) in [
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ] {
            if header != name {
                request = request.header(header, value);
            }
        }
        request
    };
    for missing in ["connection", "upgrade", "sec-websocket-version", "sec-websocket-key"] {
        assert_refused(&raw(without(missing)).await, 400, "not_websocket");
    }
    let old_version = without("sec-websocket-version").header("sec-websocket-version", "8");
    assert_refused(&raw(old_version).await, 400, "not_websocket");
    let other_upgrade = without("upgrade").header("upgrade", "h2c");
    assert_refused(&raw(other_upgrade).await, 400, "not_websocket");

    // Accepted: the RFC 6455 example key gets the RFC's accept value, and the
    // answer names herald.v1 only when the client offered it.
    let answer = raw(upgrade(&server, "").bearer_auth(&valid)).await;
    assert_eq!(answer.status, 101);
    assert_eq!(answer.headers["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert!(answer.headers.get("sec-websocket-protocol").is_none());
    // Firefox sends `Connection: keep-alive, Upgrade`.
    let offered = without("connection")
        .header("connection", "keep-alive, Upgrade")
        .header("sec-websocket-protocol", "chat, herald.v1");
    let answer = raw(offered).await;
    assert_eq!(answer.status, 101);
    assert_eq!(answer.headers["sec-websocket-protocol"], "herald.v1");
    assert_eq!(handshakes(&server, "accepted").await, 2.0);
    assert_eq!(handshakes(&server, "not_websocket").await, 7.0);
    server.stop().await;
}

#[tokio::test]
async fn refused_handshakes_are_counted_by_outcome() {
    let server = TestServer::start().await;
    let (invalid, missing, accepted_before) = (
        handshakes(&server, "invalid_token").await,
        handshakes(&server, "missing_token").await,
        handshakes(&server, "accepted").await,
    );
    refused_401(&server, "not-a-jwt", "invalid_token").await;
    assert_refused(&raw(upgrade(&server, "")).await, 401, "missing_token");
    server.connect("alice").await.close().await.unwrap();
    assert_eq!(handshakes(&server, "invalid_token").await, invalid + 3.0);
    assert_eq!(handshakes(&server, "missing_token").await, missing + 1.0);
    assert_eq!(handshakes(&server, "accepted").await, accepted_before + 1.0);
    server.stop().await;
}

#[tokio::test]
async fn only_allowed_origins_may_open_a_websocket() {
    let server =
        TestServer::start_with(&[("HERALD_ALLOWED_ORIGINS", "https://app.example.com, https://admin.example.com")])
            .await;
    let token = server.token("alice");
    for origin in ["https://evil.example.com", "https://app.example.com.evil.net", "http://app.example.com", "null"] {
        let answer = raw(upgrade(&server, "").bearer_auth(&token).header("origin", origin)).await;
        assert_refused(&answer, 403, "origin_not_allowed");
        let connect = Connect::new(server.ws(), &token).token_via(TokenVia::Subprotocol).origin(origin);
        assert!(
            matches!(connect.connect().await, Err(Error::Refused { status: 403, ref code, .. }) if code == "origin_not_allowed"),
            "{origin}"
        );
    }
    for origin in ["https://app.example.com", "https://admin.example.com"] {
        let session = Connect::new(server.ws(), &token).origin(origin).connect().await.unwrap();
        assert_eq!(session.welcome().user_id, "alice", "{origin}");
        session.close().await.unwrap();
    }
    // Servers and tools send no Origin at all.
    assert_eq!(accepted(&server, &token).await, "alice");
    server.stop().await;
}

#[tokio::test]
async fn since_must_be_a_seq() {
    let server = TestServer::start().await;
    let token = server.token("alice");
    for since in ["-1", "abc", "1.5", "", "99999999999999999999"] {
        let answer = raw(upgrade(&server, &format!("since={since}")).bearer_auth(&token)).await;
        assert_refused(&answer, 400, "invalid_since");
    }
    assert!(matches!(
        Connect::new(server.ws(), &token).since(-1).connect().await,
        Err(Error::Refused { status: 400, ref code, .. }) if code == "invalid_since"
    ));
    assert_eq!(server.connect_since("alice", 0).await.welcome().user_id, "alice");
    server.stop().await;
}

/// `epoch` is the welcome's: letters, digits, `-`, `_`, at most 64 bytes.
#[tokio::test]
async fn epoch_must_look_like_one() {
    let server = TestServer::start().await;
    let token = server.token("alice");
    let long = "e".repeat(65);
    for epoch in ["", "a%20b", "%C3%A9", "a.b", long.as_str()] {
        let answer = raw(upgrade(&server, &format!("since=0&epoch={epoch}")).bearer_auth(&token)).await;
        assert_refused(&answer, 400, "invalid_epoch");
    }
    let welcome = Connect::new(server.ws(), &token).since(0).epoch("e".repeat(64)).connect().await.unwrap();
    let epoch = welcome.welcome().epoch.clone().expect("a welcome carries the store's epoch");
    assert!(is_epoch_shaped(&epoch), "{epoch}");
    assert_eq!(welcome.welcome().since, Some(0), "an unknown epoch resumes from 0, here where it was anyway");
    server.stop().await;
}

fn is_epoch_shaped(epoch: &str) -> bool {
    (1..=64).contains(&epoch.len()) && epoch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[tokio::test]
async fn a_draining_node_refuses_with_503_and_retry_after() {
    let server = TestServer::start_with(&[("HERALD_DRAIN_GRACE", "3s")]).await;
    let token = server.token("alice");
    assert_eq!(accepted(&server, &token).await, "alice");
    server.begin_shutdown();
    let answer = raw(upgrade(&server, "").bearer_auth(&token)).await;
    assert_refused(&answer, 503, "draining");
    let retry_after = answer.headers.get("retry-after").expect("Retry-After").to_str().unwrap();
    assert!(retry_after.parse::<u64>().is_ok_and(|s| s >= 1), "Retry-After: {retry_after}");
    assert!(matches!(
        Connect::new(server.ws(), &token).connect().await,
        Err(Error::Refused { status: 503, ref code, .. }) if code == "draining"
    ));
    // Dropped, not stopped: a full drain would wait out the grace period.
}

// ------------------------------------------------------- nothing is logged

/// The `herald` binary, its output captured to files.
struct Process {
    child: tokio::process::Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Process {
    fn spawn(dir: &Path, vars: &[(&str, &str)]) -> Process {
        let (stdout, stderr) = (dir.join("stdout.log"), dir.join("stderr.log"));
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .env_clear()
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("the herald binary starts");
        Process { child, stdout, stderr }
    }

    /// The address from the `listening addr=...` log line, polled until `WAIT`.
    async fn address(&self) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            let found = log.lines().filter(|l| l.contains("listening")).find_map(|l| {
                let addr = l.split_whitespace().find_map(|w| w.strip_prefix("addr="))?;
                Some(addr.trim_matches('"').to_string())
            });
            if let Some(addr) = found {
                return addr;
            }
            assert!(tokio::time::Instant::now() < deadline, "no listening line; stderr:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit; returns (stdout, stderr).
    async fn terminate(mut self) -> (String, String) {
        let pid = self.child.id().expect("still running").to_string();
        let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
        assert!(status.success(), "kill -TERM {pid}");
        let exit = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.expect("exits in time");
        let (out, err) =
            (std::fs::read_to_string(&self.stdout).unwrap(), std::fs::read_to_string(&self.stderr).unwrap());
        assert!(exit.unwrap().success(), "herald exited badly; stderr:\n{err}");
        (out, err)
    }
}

#[tokio::test]
async fn no_token_or_api_key_reaches_any_log_line() {
    const LOG_SECRET: &str = "log-test-secret-5b1d0c8e7f2a4936";
    const LOG_API_KEY: &str = "log-test-api-key-c0ffee-9d2e41";
    const WRONG_API_KEY: &str = "log-test-wrong-key-badf00d-71e3";
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}/h.db", dir.path().display());
    let herald = Process::spawn(
        dir.path(),
        &[
            ("HERALD_LOG", "trace"),
            ("HERALD_LISTEN", "127.0.0.1:0"),
            ("HERALD_DATABASE_URL", &database),
            ("HERALD_JWT_SECRET", LOG_SECRET),
            ("HERALD_API_KEYS", LOG_API_KEY),
            ("HERALD_NODE_ID", "log-test-node"),
            ("HERALD_DRAIN_GRACE", "0s"),
        ],
    );
    let addr = herald.address().await;
    let (ws, http) = (format!("ws://{addr}"), format!("http://{addr}"));
    let mint = |sub: &str, ttl: i64| herald_server::auth::mint(LOG_SECRET, sub, ttl);
    let wrong_secret = EncodingKey::from_secret(b"not-the-log-test-secret-at-all");
    let mut secrets: Vec<String> = vec![LOG_SECRET.into(), LOG_API_KEY.into(), WRONG_API_KEY.into()];

    let publisher = Publisher::new(&http, LOG_API_KEY);
    for via in [TokenVia::Header, TokenVia::Subprotocol, TokenVia::Query] {
        let token = mint("log-alice", 3600);
        let mut session = Connect::new(&ws, &token).token_via(via).connect().await.unwrap();
        let published = publisher.publish_one("log-alice", "orders", json!({"n": 1})).await.unwrap();
        assert_eq!(next_notification(&mut session).await.seq, published.seq);
        session.close().await.unwrap();
        secrets.push(token);

        for bad in [sign(Algorithm::HS256, None, &claims("log-alice"), &wrong_secret), mint("log-alice", -60)] {
            assert!(matches!(
                Connect::new(&ws, &bad).token_via(via).connect().await,
                Err(Error::Refused { status: 401, .. })
            ));
            secrets.push(bad);
        }
    }
    let inbox_token = mint("log-alice", 3600);
    let page = Inbox::new(&http, &inbox_token).list(&[("limit", "10")]).await.unwrap();
    assert_eq!(page.notifications.len(), 3);
    secrets.push(inbox_token);
    let bad_inbox_token = sign(Algorithm::HS256, None, &claims("log-alice"), &wrong_secret);
    assert!(matches!(Inbox::new(&http, &bad_inbox_token).unread().await, Err(Error::Refused { status: 401, .. })));
    secrets.push(bad_inbox_token);
    let refused = Publisher::new(&http, WRONG_API_KEY).publish_one("log-alice", "orders", json!({})).await;
    assert!(matches!(refused, Err(Error::Refused { status: 401, .. })));

    let (stdout, stderr) = herald.terminate().await;
    // Trace level really logged the handshakes, sessions and refusals.
    assert!(stderr.contains("listening"), "stderr:\n{stderr}");
    assert!(stderr.contains("session open"), "sessions are logged at debug; stderr:\n{stderr}");
    assert!(stderr.contains("request refused"), "refusals are logged at debug; stderr:\n{stderr}");
    for secret in &secrets {
        // A whole token, or its signature alone (a log could cut the rest).
        let signature = secret.rsplit('.').next().unwrap();
        for needle in [secret.as_str(), signature] {
            assert!(!stderr.contains(needle), "stderr holds a credential: {needle}");
            assert!(!stdout.contains(needle), "stdout holds a credential: {needle}");
        }
    }
}

// ---------------------------------------------------------------- JWKS endpoint

/// The fixture JWKS with only the keys named in `kids`.
fn jwks_of(kids: &[&str]) -> String {
    let all: Value = serde_json::from_str(&std::fs::read_to_string(key_path("jwks.json")).unwrap()).unwrap();
    let keys: Vec<Value> = all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
        .cloned()
        .collect();
    assert_eq!(keys.len(), kids.len(), "every kid is a fixture");
    json!({ "keys": keys }).to_string()
}

/// An identity provider's JWKS endpoint on loopback: the test changes what it
/// serves (or makes it fail, or redirect) and counts the fetches.
struct JwksEndpoint {
    url: String,
    document: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// `Some(url)`: answers 302 to `url` instead.
    redirect: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _server: tokio::task::JoinHandle<()>,
}

impl JwksEndpoint {
    /// Over plain HTTP.
    async fn start(kids: &[&str]) -> JwksEndpoint {
        Self::start_on(kids, None).await
    }

    /// Over TLS, with the certificate in `certs` (it names 127.0.0.1).
    async fn start_tls(kids: &[&str], certs: &TestCerts) -> JwksEndpoint {
        Self::start_on(kids, Some(certs)).await
    }

    async fn start_on(kids: &[&str], tls: Option<&TestCerts>) -> JwksEndpoint {
        use axum::http::{header, StatusCode};
        use axum::response::IntoResponse;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        let document = Arc::new(Mutex::new(Some(jwks_of(kids))));
        let redirect: Arc<Mutex<Option<String>>> = Arc::default();
        let fetches = Arc::new(AtomicUsize::new(0));
        let (served, redirected, counted) = (document.clone(), redirect.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                let (served, redirected, counted) = (served.clone(), redirected.clone(), counted.clone());
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    if let Some(to) = redirected.lock().unwrap().clone() {
                        return (StatusCode::FOUND, [(header::LOCATION, to)]).into_response();
                    }
                    match served.lock().unwrap().clone() {
                        Some(body) => (StatusCode::OK, body).into_response(),
                        None => (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response(),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let (url, server) = match tls {
            None => (
                format!("http://{at}/.well-known/jwks.json"),
                tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }),
            ),
            Some(certs) => {
                let files = herald_server::tls::TlsFiles {
                    cert: certs.cert.clone(),
                    key: certs.key.clone(),
                    reload_every: Duration::from_secs(3600),
                };
                use herald_server::listen::{Accept, ConnectionLimits, Slots};
                let accept = Accept::new(listener, Slots::new(None, &herald_server::telemetry::Metrics::new()));
                let listener = herald_server::tls::Tls::new(&files).unwrap().listen(accept);
                let limits = ConnectionLimits { header_timeout: Duration::from_secs(10), max_header_bytes: 16 * 1024 };
                let serve = herald_server::listen::serve(listener, app, limits, std::future::pending());
                (format!("https://{at}/.well-known/jwks.json"), tokio::spawn(serve))
            }
        };
        JwksEndpoint { url, document, redirect, fetches, _server: server }
    }

    /// Answers 302 to `to` from now on.
    fn redirect_to(&self, to: &str) {
        *self.redirect.lock().unwrap() = Some(to.to_string());
    }

    /// Serves the keys `kids` from now on; `None`: answers 500.
    fn serve(&self, kids: Option<&[&str]>) {
        self.serve_document(kids.map(jwks_of));
    }

    fn serve_document(&self, document: Option<String>) {
        *self.document.lock().unwrap() = document;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// `GET /v1/me/unread` with `token`: its status.
async fn unread_status(server: &TestServer, token: &str) -> u16 {
    raw(reqwest::Client::new().get(format!("{}/v1/me/unread", server.http())).bearer_auth(token)).await.status
}

/// An RS256 token of fixture key `kid`, naming it.
fn rs256(kid: &str) -> String {
    signed_by(kid, Algorithm::RS256, Some(kid), &claims("alice"))
}

/// Longer than the shortest gap between fetches asked for by unknown kids (1 s).
const PAST_THE_GAP: Duration = Duration::from_millis(1100);

#[tokio::test]
async fn a_jwks_endpoint_supplies_the_keys_and_a_key_rotated_in_is_accepted_at_once() {
    let jwks = JwksEndpoint::start(&["rsa-a"]).await;
    let server = TestServer::start_with(&[("HERALD_JWT_JWKS_URL", &jwks.url), ("HERALD_JWT_JWKS_REFRESH", "1h")]).await;
    assert_eq!(unread_status(&server, &rs256("rsa-a")).await, 200);
    assert_eq!(jwks.fetches(), 1, "fetched once, at start");

    // A kid the set does not hold: fetched again, still unknown, refused.
    tokio::time::sleep(PAST_THE_GAP).await;
    assert_eq!(unread_status(&server, &rs256("rsa-b")).await, 401);
    assert_eq!(jwks.fetches(), 2);

    // The provider rotates a key in: the next token naming it is accepted,
    // over HTTP and at the WebSocket handshake, without waiting for the
    // periodic refresh (an hour here).
    jwks.serve(Some(&["rsa-a", "rsa-b"]));
    tokio::time::sleep(PAST_THE_GAP).await;
    assert_eq!(unread_status(&server, &rs256("rsa-b")).await, 200);
    assert_eq!(jwks.fetches(), 3);
    let session = Connect::new(server.ws(), rs256("rsa-b")).connect().await.expect("a handshake with the new key");
    assert_eq!(session.welcome().user_id, "alice");

    // A session's `refresh` frame too: a key rotated in while it was open.
    let mut session = Connect::new(server.ws(), rs256("rsa-a")).connect().await.unwrap();
    jwks.serve(Some(&["rsa-a", "rsa-b", "ec-p256"]));
    tokio::time::sleep(PAST_THE_GAP).await;
    let token = signed_by("ec-p256", Algorithm::ES256, Some("ec-p256"), &claims("alice"));
    session.send(&ClientFrame::Refresh { token, reference: Some(json!(1)) }).await.unwrap();
    match session.next_frame().await.unwrap() {
        ServerFrame::Ok { reference } => assert_eq!(reference, json!(1)),
        other => panic!("a refresh with a key rotated in: {other:?}"),
    }
    let before = jwks.fetches();

    // Made-up kids cannot make the node hammer the provider: one fetch per
    // gap (1 s) — one in all, unless the 20 requests themselves took longer
    // than a gap (a loaded CI machine, a debug build).
    let started = Instant::now();
    for i in 0..20 {
        let token = signed_by("rsa-a", Algorithm::RS256, Some(&format!("made-up-{i}")), &claims("alice"));
        assert_eq!(unread_status(&server, &token).await, 401);
    }
    let gaps = 1 + started.elapsed().as_secs() as usize;
    assert!(jwks.fetches() <= before + gaps, "{} fetches for 20 made-up kids in {gaps} gaps", jwks.fetches() - before);

    // The provider fails: the keys fetched before stay in use.
    jwks.serve(None);
    tokio::time::sleep(PAST_THE_GAP).await;
    let token = signed_by("rsa-a", Algorithm::RS256, Some("made-up"), &claims("alice"));
    assert_eq!(unread_status(&server, &token).await, 401);
    assert_eq!(unread_status(&server, &rs256("rsa-a")).await, 200);
    assert_eq!(unread_status(&server, &rs256("rsa-b")).await, 200);
    assert_eq!(server.metric("herald_jwks_fetches_total{outcome=\"failed\"}").await, 1.0);
    assert!(server.metric("herald_jwks_fetches_total{outcome=\"ok\"}").await >= 4.0);
    server.stop().await;
}

#[tokio::test]
async fn a_key_the_provider_withdraws_stops_verifying_at_the_periodic_refresh() {
    let jwks = JwksEndpoint::start(&["rsa-a", "rsa-b"]).await;
    let server = TestServer::start_with(&[("HERALD_JWT_JWKS_URL", &jwks.url), ("HERALD_JWT_JWKS_REFRESH", "1s")]).await;
    assert_eq!(unread_status(&server, &rs256("rsa-a")).await, 200);
    jwks.serve(Some(&["rsa-b"]));
    eventually("rsa-a is refused after a refresh", || async { unread_status(&server, &rs256("rsa-a")).await == 401 })
        .await;
    assert_eq!(unread_status(&server, &rs256("rsa-b")).await, 200);
    server.stop().await;
}

#[tokio::test]
async fn keys_a_provider_lists_for_other_uses_are_skipped_not_refused() {
    let mut document: Value = serde_json::from_str(&jwks_of(&["rsa-a", "rsa-b"])).unwrap();
    let keys = document["keys"].as_array_mut().unwrap();
    // rsa-b marked as an encryption key, as providers list them beside their signing keys.
    keys[1]["use"] = json!("enc");
    keys[1]["alg"] = json!("RSA-OAEP");
    keys.push(json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"}));
    keys.push(json!({"kty": "XYZ", "kid": "from-the-future", "crv": "?"}));
    let jwks = JwksEndpoint::start(&["rsa-a"]).await;
    jwks.serve_document(Some(document.to_string()));
    let server = TestServer::start_with(&[("HERALD_JWT_JWKS_URL", &jwks.url)]).await;
    assert_eq!(unread_status(&server, &rs256("rsa-a")).await, 200);
    assert_eq!(unread_status(&server, &rs256("rsa-b")).await, 401, "an encryption key does not verify tokens");
    server.stop().await;

    // The same document as a file is refused: there, Herald reads what it was given.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, document.to_string()).unwrap();
    let mut env: std::collections::HashMap<&str, &str> = [("HERALD_API_KEYS", API_KEY)].into_iter().collect();
    env.insert("HERALD_JWT_PUBLIC_KEYS", file.to_str().unwrap());
    assert!(herald_server::config::Settings::load(&env, None).is_err());
}

#[tokio::test]
async fn a_node_whose_jwks_cannot_be_fetched_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = JwksEndpoint::start(&["rsa-a"]).await;
    jwks.serve(None);
    for url in [jwks.url.as_str(), "http://127.0.0.1:1/jwks.json"] {
        let settings = settings(dir.path(), &[("HERALD_JWT_JWKS_URL", url)]);
        let refused = herald_server::AppState::build(settings, Default::default()).await.err().expect("no start");
        let message = refused.to_string();
        assert!(message.starts_with("HERALD_JWT_JWKS_URL: cannot fetch the JWKS from"), "{message}");
    }
}

/// A provider inside the organisation: its certificate is signed by the
/// organisation's CA, which `HERALD_JWT_JWKS_CA` names.
#[tokio::test]
async fn a_jwks_endpoint_over_tls_is_trusted_through_the_ca_named() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let ca = certs.ca_file(dir.path(), "ca.pem");
    let jwks = JwksEndpoint::start_tls(&["rsa-a"], &certs).await;

    let server =
        TestServer::start_with(&[("HERALD_JWT_JWKS_URL", &jwks.url), ("HERALD_JWT_JWKS_CA", ca.to_str().unwrap())])
            .await;
    assert_eq!(unread_status(&server, &rs256("rsa-a")).await, 200);
    assert_eq!(jwks.fetches(), 1);

    // Without the CA, the built-in roots do not know it: no start, and the
    // error says what to set.
    let settings = settings(dir.path(), &[("HERALD_JWT_JWKS_URL", &jwks.url)]);
    let refused = herald_server::AppState::build(settings, Default::default()).await.err().expect("no start");
    let message = refused.to_string();
    assert!(message.contains("UnknownIssuer") && message.contains("HERALD_JWT_JWKS_CA"), "{message}");
}

/// Keys fetched in the clear could be swapped on the way: an https endpoint
/// that redirects to http is not followed, while a redirect to another
/// https URL is.
#[tokio::test]
async fn an_https_jwks_url_is_never_left_for_http() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::create(dir.path());
    let ca = certs.ca_file(dir.path(), "ca.pem");
    let in_the_clear = JwksEndpoint::start(&["rsa-a"]).await;
    let moved_to_tls = JwksEndpoint::start_tls(&["rsa-a"], &certs).await;
    let front = JwksEndpoint::start_tls(&["rsa-a"], &certs).await;
    let ca = ca.to_str().unwrap();

    front.redirect_to(&in_the_clear.url);
    let settings_for = |url: &str| settings(dir.path(), &[("HERALD_JWT_JWKS_URL", url), ("HERALD_JWT_JWKS_CA", ca)]);
    let refused =
        herald_server::AppState::build(settings_for(&front.url), Default::default()).await.err().expect("no start");
    assert!(refused.to_string().starts_with("HERALD_JWT_JWKS_URL: cannot fetch the JWKS from"), "{refused}");
    assert_eq!(in_the_clear.fetches(), 0, "the redirect to http:// was followed");

    front.redirect_to(&moved_to_tls.url);
    let server = TestServer::start_with(&[("HERALD_JWT_JWKS_URL", &front.url), ("HERALD_JWT_JWKS_CA", ca)]).await;
    assert_eq!(unread_status(&server, &rs256("rsa-a")).await, 200);
    assert_eq!(moved_to_tls.fetches(), 1);
}

#[test]
fn jwks_settings_are_checked_before_anything_starts() {
    let load = |vars: &[(&str, &str)]| {
        let mut env: std::collections::HashMap<&str, &str> = [("HERALD_API_KEYS", API_KEY)].into_iter().collect();
        env.extend(vars.iter().copied());
        herald_server::config::Settings::load(&env, None).map(|s| s.jwt.jwks_url.clone()).map_err(|e| e.to_string())
    };
    let good = "https://idp.example.com/.well-known/jwks.json";
    assert_eq!(load(&[("HERALD_JWT_JWKS_URL", good)]), Ok(Some(good.to_string())));
    assert!(load(&[("HERALD_JWT_JWKS_URL", "http://[::1]:9000/jwks")]).is_ok(), "http on loopback");
    let plain = load(&[("HERALD_JWT_JWKS_URL", "http://idp.example.com/jwks")]).unwrap_err();
    assert!(plain.starts_with("HERALD_JWT_JWKS_URL") && plain.contains("https://"), "{plain}");
    let both = load(&[("HERALD_JWT_JWKS_URL", good), ("HERALD_JWT_PUBLIC_KEYS", &key_path_str("jwks.json"))]);
    assert!(both.unwrap_err().contains("not both"));
    let fast = load(&[("HERALD_JWT_JWKS_URL", good), ("HERALD_JWT_JWKS_REFRESH", "100ms")]).unwrap_err();
    assert!(fast.starts_with("HERALD_JWT_JWKS_REFRESH"), "{fast}");
    assert!(load(&[("HERALD_JWT_JWKS_URL", "not a url")]).unwrap_err().starts_with("HERALD_JWT_JWKS_URL"));

    // A CA for the JWKS endpoint: only with an https URL, and it must hold a certificate.
    let ca = key_path_str("rsa-a.pem");
    let no_url = load(&[("HERALD_JWT_JWKS_CA", &ca)]).unwrap_err();
    assert!(no_url.starts_with("HERALD_JWT_JWKS_CA") && no_url.contains("https://"), "{no_url}");
    let http = load(&[("HERALD_JWT_JWKS_URL", "http://127.0.0.1:9000/jwks"), ("HERALD_JWT_JWKS_CA", &ca)]);
    assert!(http.unwrap_err().starts_with("HERALD_JWT_JWKS_CA"));
    let not_a_certificate = load(&[("HERALD_JWT_JWKS_URL", good), ("HERALD_JWT_JWKS_CA", &ca)]).unwrap_err();
    assert!(not_a_certificate.starts_with("HERALD_JWT_JWKS_CA") && not_a_certificate.contains("no PEM certificate"));
    let missing = load(&[("HERALD_JWT_JWKS_URL", good), ("HERALD_JWT_JWKS_CA", "/nonexistent/ca.pem")]).unwrap_err();
    assert!(missing.starts_with("HERALD_JWT_JWKS_CA") && missing.contains("cannot read"), "{missing}");
}
