//! The demo page and its routes: static files with a strict CSP and ETags,
//! the browser SDK, and the dev-mode test publish (absent outside dev mode).
//! The page itself is exercised in a real browser by clients/js/test/demo.test.mjs.

mod common;

use common::*;
use reqwest::header;
use reqwest::Client;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A node whose settings say dev mode (keys are the test ones, so tokens mint).
async fn start_dev(dir: &std::path::Path) -> (String, CancellationToken, tokio::task::JoinHandle<()>) {
    let mut settings = settings(dir, &[]);
    settings.dev_mode = true;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { herald_server::run(settings, listener, shutdown).await.expect("the server runs") }
    });
    (addr.to_string(), shutdown, task)
}

#[tokio::test]
async fn the_page_and_the_sdk_are_served_with_csp_and_etags() {
    let server = TestServer::start().await;
    let http = Client::new();
    let page = http.get(format!("{}/demo", server.http())).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
    let csp = page.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap().to_string();
    for directive in ["default-src 'self'", "script-src 'self'", "style-src 'self'", "connect-src 'self' ws: wss:"] {
        assert!(csp.contains(directive), "{csp}");
    }
    let html = page.text().await.unwrap();
    assert!(!html.contains("<style") && !html.contains("<script>") && !html.contains(" style="), "inline code: {html}");
    for (path, kind) in [("/demo/app.js", "text/javascript"), ("/demo/app.css", "text/css")] {
        let asset = http.get(format!("{}{path}", server.http())).send().await.unwrap();
        assert_eq!(asset.status(), 200, "{path}");
        assert!(asset.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with(kind), "{path}");
    }

    let sdk = http.get(format!("{}/sdk/herald.js", server.http())).send().await.unwrap();
    assert_eq!(sdk.status(), 200);
    assert_eq!(sdk.headers()[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
    assert_eq!(sdk.headers()[header::CACHE_CONTROL], "no-cache");
    let etag = sdk.headers()[header::ETAG].to_str().unwrap().to_string();
    assert!(sdk.text().await.unwrap().contains("Herald"));
    let again =
        http.get(format!("{}/sdk/herald.js", server.http())).header(header::IF_NONE_MATCH, &etag).send().await.unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()[header::ETAG].to_str().unwrap(), etag);
    assert!(again.bytes().await.unwrap().is_empty());
    let stale = http
        .get(format!("{}/sdk/herald.js", server.http()))
        .header(header::IF_NONE_MATCH, "\"0000000000000000\"")
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn the_test_publish_does_not_exist_outside_dev_mode() {
    let server = TestServer::start().await;
    let config = raw(Client::new().get(format!("{}/demo/config", server.http()))).await;
    assert_eq!(config.body, json!({"dev_mode": false}));
    let refused = raw(Client::new()
        .post(format!("{}/demo/publish", server.http()))
        .bearer_auth(server.token("alice"))
        .json(&json!({"topic": "t", "payload": {"text": "hi"}})))
    .await;
    assert_eq!(refused.status, 404);
    assert_eq!(refused.error_code(), "not_found");
    let mut alice = server.connect("alice").await;
    server.publish("alice", "probe", json!(1)).await;
    assert_eq!(next_notification(&mut alice).await.topic, "probe", "nothing was published before");
    server.stop().await;
}

#[tokio::test]
async fn in_dev_mode_a_user_publishes_to_themselves_only() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, shutdown, task) = start_dev(dir.path()).await;
    let (http, ws) = (format!("http://{addr}"), format!("ws://{addr}"));
    let token = |user: &str| herald_server::auth::mint(SECRET, user, 3600);
    let config = raw(Client::new().get(format!("{http}/demo/config"))).await;
    assert_eq!(config.body, json!({"dev_mode": true}));

    let mut alice = herald_client::Connect::new(&ws, token("alice")).connect().await.unwrap();
    let mut bob = herald_client::Connect::new(&ws, token("bob")).connect().await.unwrap();
    let publish = |token: Option<String>, body: serde_json::Value| {
        let request = Client::new().post(format!("{http}/demo/publish")).json(&body);
        raw(match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        })
    };
    let ok = publish(Some(token("alice")), json!({"topic": "demo", "payload": {"text": "hi"}})).await;
    assert_eq!(ok.status, 201, "{}", ok.body);
    assert_eq!(ok.body["notifications"][0]["user_id"], "alice");
    assert_eq!(ok.body["notifications"][0]["seq"], 1);
    let got = next_notification(&mut alice).await;
    assert_eq!((got.topic.as_str(), got.payload.clone()), ("demo", json!({"text": "hi"})));

    // Refusals, as on a publish; none of them stores anything.
    let no_token = publish(None, json!({"topic": "demo", "payload": 1})).await;
    assert_eq!((no_token.status, no_token.error_code()), (401, "missing_token"));
    let api_key = publish(Some(API_KEY.into()), json!({"topic": "demo", "payload": 1})).await;
    assert_eq!((api_key.status, api_key.error_code()), (401, "invalid_token"));
    let other_user = publish(Some(token("alice")), json!({"topic": "demo", "payload": 1, "user_id": "bob"})).await;
    assert_eq!((other_user.status, other_user.error_code()), (422, "invalid_request"));
    let bad_topic = publish(Some(token("alice")), json!({"topic": "", "payload": 1})).await;
    assert_eq!((bad_topic.status, bad_topic.error_code()), (422, "invalid_topic"));
    let no_payload = publish(Some(token("alice")), json!({"topic": "demo"})).await;
    assert_eq!((no_payload.status, no_payload.error_code()), (422, "invalid_request"));
    let too_large = post_head_only(&addr, "/demo/publish", &token("alice"), 4 << 20).await;
    assert!(too_large.starts_with("HTTP/1.1 413"), "{too_large}");

    // Bob got nothing; alice's next seq is 2, so nothing else was stored for her.
    let ok = publish(Some(token("bob")), json!({"topic": "mine", "payload": "x"})).await;
    assert_eq!(ok.body["notifications"][0]["user_id"], "bob");
    assert_eq!(next_notification(&mut bob).await.topic, "mine");
    let ok = publish(Some(token("alice")), json!({"topic": "demo", "payload": 2})).await;
    assert_eq!(ok.body["notifications"][0]["seq"], 2);
    assert_eq!(next_notification(&mut alice).await.seq, 2);

    shutdown.cancel();
    task.await.unwrap();
}
