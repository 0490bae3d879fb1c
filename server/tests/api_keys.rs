//! Scoped API keys: `HERALD_API_KEYS` may do everything; the keys of
//! `HERALD_API_KEYS_PUBLISH`, `_READ` and `_ERASE` only their scope. Every
//! backend route against every kind of key, on a real node: a key without
//! the route's scope gets 403 `insufficient_scope` and changes nothing.

mod common;

use common::*;
use serde_json::json;

const PUBLISH: &str = "key-publish-only";
const READ: &str = "key-read-only";
const ERASE: &str = "key-erase-only";
const DISCONNECT: &str = "key-disconnect-only";
/// Listed under both `_PUBLISH` and `_ERASE`.
const PUBLISH_ERASE: &str = "key-publish-and-erase";

async fn node() -> TestServer {
    TestServer::start_with(&[
        ("HERALD_API_KEYS_PUBLISH", &format!("{PUBLISH},{PUBLISH_ERASE}")),
        ("HERALD_API_KEYS_READ", READ),
        ("HERALD_API_KEYS_ERASE", &format!("{ERASE}, {PUBLISH_ERASE}")),
        ("HERALD_API_KEYS_DISCONNECT", DISCONNECT),
        // Three users make a job (the 202 path), so its status can be asked.
        ("HERALD_MAX_USER_IDS", "2"),
        ("HERALD_MAX_AUDIENCE", "5"),
    ])
    .await
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn publish(server: &TestServer, key: &str, body: serde_json::Value) -> Raw {
    raw(client().post(format!("{}/v1/notifications", server.http())).bearer_auth(key).json(&body)).await
}

async fn history(server: &TestServer, key: &str, user: &str) -> Raw {
    raw(client().get(format!("{}/v1/users/{user}/notifications", server.http())).bearer_auth(key)).await
}

async fn presence(server: &TestServer, key: &str, user: &str) -> Raw {
    raw(client().get(format!("{}/v1/users/{user}/presence", server.http())).bearer_auth(key)).await
}

async fn job(server: &TestServer, key: &str, id: &str) -> Raw {
    raw(client().get(format!("{}/v1/jobs/{id}", server.http())).bearer_auth(key)).await
}

async fn erase(server: &TestServer, key: &str, user: &str) -> Raw {
    raw(client().delete(format!("{}/v1/users/{user}/notifications", server.http())).bearer_auth(key)).await
}

async fn unread(server: &TestServer, key: &str, user: &str) -> Raw {
    raw(client().get(format!("{}/v1/users/{user}/unread", server.http())).bearer_auth(key)).await
}

async fn mark_read(server: &TestServer, key: &str, user: &str, up_to_seq: i64) -> Raw {
    let url = format!("{}/v1/users/{user}/notifications/read", server.http());
    raw(client().post(url).bearer_auth(key).json(&json!({ "up_to_seq": up_to_seq }))).await
}

async fn disconnect(server: &TestServer, key: &str, user: &str) -> Raw {
    raw(client().delete(format!("{}/v1/users/{user}/sessions", server.http())).bearer_auth(key)).await
}

async fn revoke(server: &TestServer, key: &str, user: &str) -> Raw {
    let url = format!("{}/v1/users/{user}/tokens/revoke", server.http());
    raw(client().post(url).bearer_auth(key).json(&json!({}))).await
}

/// Asserts a 403 `insufficient_scope` whose message names the scope needed.
fn refused(answer: &Raw, needs: &str) {
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(answer.error_code(), "insufficient_scope");
    let message = answer.body["error"]["message"].as_str().unwrap();
    assert!(message.contains(needs), "the message names the scope needed ({needs}): {message}");
}

async fn seqs(server: &TestServer, user: &str) -> Vec<i64> {
    let page = server.publisher().history(user, 0, 100).await.unwrap();
    page.notifications.iter().map(|n| n.seq).collect()
}

#[tokio::test]
async fn each_route_takes_the_keys_with_its_scope_and_refuses_the_others() {
    let server = node().await;
    let one = |i: i64| json!({ "user_id": "alice", "topic": "orders", "payload": { "i": i } });

    // Publishing: the full key and publish keys.
    for (i, key) in [API_KEY, PUBLISH, PUBLISH_ERASE].into_iter().enumerate() {
        let answer = publish(&server, key, one(i as i64)).await;
        assert_eq!(answer.status, 201, "{key}: {}", answer.body);
    }
    for key in [READ, ERASE, DISCONNECT] {
        refused(&publish(&server, key, one(99)).await, "publish");
    }
    assert_eq!(seqs(&server, "alice").await, vec![1, 2, 3], "a refused publish stores nothing");

    // History and presence: the full key and read keys.
    for key in [API_KEY, READ] {
        let page = history(&server, key, "alice").await;
        assert_eq!((page.status, page.body["last_seq"].as_i64()), (200, Some(3)), "{key}: {}", page.body);
        let here = presence(&server, key, "alice").await;
        assert_eq!((here.status, here.body["sessions"].as_u64()), (200, Some(0)), "{key}: {}", here.body);
    }
    for key in [PUBLISH, ERASE, PUBLISH_ERASE, DISCONNECT] {
        refused(&history(&server, key, "alice").await, "read");
        refused(&presence(&server, key, "alice").await, "read");
        refused(&unread(&server, key, "alice").await, "read");
    }
    for key in [API_KEY, READ] {
        let counts = unread(&server, key, "alice").await;
        assert_eq!((counts.status, counts.body["total"].as_i64()), (200, Some(3)), "{key}: {}", counts.body);
    }

    // Marking read for a user: the full key and publish keys.
    for key in [READ, ERASE, DISCONNECT] {
        refused(&mark_read(&server, key, "alice", 1).await, "publish");
    }
    assert_eq!(unread(&server, API_KEY, "alice").await.body["total"], 3, "a refused mark changes nothing");
    for (key, up_to) in [(API_KEY, 1), (PUBLISH, 2), (PUBLISH_ERASE, 3)] {
        assert_eq!(mark_read(&server, key, "alice", up_to).await.status, 204, "{key}");
    }
    assert_eq!(unread(&server, API_KEY, "alice").await.body["total"], 0);

    // A job's status: whoever may publish (and start it) or read.
    let audience = json!({ "user_ids": ["u1", "u2", "u3"], "topic": "news", "payload": {} });
    let started = publish(&server, PUBLISH, audience).await;
    assert_eq!(started.status, 202, "{}", started.body);
    let id = started.body["job_id"].as_str().expect("a job id").to_string();
    for key in [API_KEY, PUBLISH, READ, PUBLISH_ERASE] {
        let status = job(&server, key, &id).await;
        assert_eq!(status.status, 200, "{key}: {}", status.body);
    }
    for key in [ERASE, DISCONNECT] {
        refused(&job(&server, key, &id).await, "publish or read");
    }

    // Erasure: the full key and erase keys; a refusal deletes nothing.
    for key in [PUBLISH, READ, DISCONNECT] {
        refused(&erase(&server, key, "alice").await, "erase");
    }
    assert_eq!(seqs(&server, "alice").await, vec![1, 2, 3], "a refused erasure deletes nothing");
    let erased = erase(&server, ERASE, "alice").await;
    assert_eq!((erased.status, erased.body["deleted"].as_u64()), (200, Some(3)), "{}", erased.body);
    publish(&server, API_KEY, one(4)).await;
    let erased = erase(&server, PUBLISH_ERASE, "alice").await;
    assert_eq!((erased.status, erased.body["deleted"].as_u64()), (200, Some(1)), "{}", erased.body);
    publish(&server, API_KEY, one(5)).await;
    let erased = erase(&server, API_KEY, "alice").await;
    assert_eq!((erased.status, erased.body["deleted"].as_u64()), (200, Some(1)), "{}", erased.body);

    // Closing a user's sessions: the full key and disconnect keys; a refusal
    // leaves the session open.
    let mut alice = server.connect("alice").await;
    for key in [PUBLISH, READ, ERASE, PUBLISH_ERASE] {
        refused(&disconnect(&server, key, "alice").await, "disconnect");
    }
    assert!(alice.next_frame_within(std::time::Duration::from_millis(200)).await.unwrap().is_none());
    assert_eq!(disconnect(&server, DISCONNECT, "alice").await.status, 204);
    assert_eq!(close_code(&mut alice).await, 4003);
    let mut alice = server.connect("alice").await;
    assert_eq!(disconnect(&server, API_KEY, "alice").await.status, 204);
    assert_eq!(close_code(&mut alice).await, 4003);

    // Revoking tokens is session control too: the disconnect scope.
    for key in [PUBLISH, READ, ERASE, PUBLISH_ERASE] {
        refused(&revoke(&server, key, "alice").await, "disconnect");
    }
    assert_eq!(server.inbox("alice").unread().await.unwrap().total, 0, "alice's token still works");
    assert_eq!(revoke(&server, DISCONNECT, "alice").await.status, 200);
    assert_eq!(revoke(&server, API_KEY, "bob").await.status, 200);
}

#[tokio::test]
async fn unknown_keys_are_401_whatever_the_route() {
    let server = node().await;
    for key in ["nope", "key-publish", "key-publish-only-", ""] {
        let answers = [
            publish(&server, key, json!({ "user_id": "alice", "topic": "t", "payload": {} })).await,
            history(&server, key, "alice").await,
            presence(&server, key, "alice").await,
            job(&server, key, "no-such-job").await,
            erase(&server, key, "alice").await,
            disconnect(&server, key, "alice").await,
            revoke(&server, key, "alice").await,
            unread(&server, key, "alice").await,
            mark_read(&server, key, "alice", 1).await,
        ];
        for answer in answers {
            assert_eq!(answer.status, 401, "{key:?}: {}", answer.body);
            assert!(matches!(answer.error_code(), "invalid_api_key" | "missing_api_key"), "{}", answer.body);
        }
    }
    assert!(seqs(&server, "alice").await.is_empty());
}

#[tokio::test]
async fn a_publish_key_keeps_its_own_publish_rate() {
    // The publish rate is counted per key, scoped or not.
    let server =
        TestServer::start_with(&[("HERALD_API_KEYS_PUBLISH", PUBLISH), ("HERALD_LIMIT_PUBLISHES_PER_KEY", "2/min")])
            .await;
    let body = || json!({ "user_id": "alice", "topic": "t", "payload": {} });
    for _ in 0..2 {
        assert_eq!(publish(&server, PUBLISH, body()).await.status, 201);
    }
    let limited = publish(&server, PUBLISH, body()).await;
    assert_eq!((limited.status, limited.error_code()), (429, "rate_limited"), "{}", limited.body);
    assert_eq!(publish(&server, API_KEY, body()).await.status, 201, "another key has its own rate");
}
