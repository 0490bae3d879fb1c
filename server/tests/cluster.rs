//! Several `herald` processes sharing one PostgreSQL and one Redis (spec §5):
//! real services, real processes, real WebSocket clients.
//!
//! Each test starts its own nodes on a fresh database and its own Redis
//! prefix; tests that take a service down use a private one. Deadlines are
//! only "it never arrived" limits, never timing assertions. A failing test
//! prints the logs of its nodes.

mod common;
mod services;

use std::time::Duration;

use common::*;
use herald_client::{Connect, PublishRequest, Published, RevokeToken, RevokeTokens, Seq};
use herald_server::auth::unix_now;
use serde_json::json;
use services::*;

const USER: &str = "alice";
/// Longest wait for notifications that should arrive; only a failure limit.
const DEADLINE: Duration = Duration::from_secs(20);

/// Publishes `count` notifications to `user` through `node`, one at a
/// time; asserts they got seqs `first..first+count`.
async fn publish_n(node: &Node, user: &str, first: Seq, count: i64) {
    let publisher = node.publisher();
    for i in 0..count {
        let published = publish_within(&publisher, user, json!({ "i": i }))
            .await
            .unwrap_or_else(|e| panic!("publish on {}: {e}", node.name));
        assert_eq!(published.seq, first + i, "seq of a publish on {}", node.name);
    }
}

/// Polls `check` until it holds, failing after `within`.
async fn within<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never happened within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The seqs of the acknowledged publishes; panics on any failed one.
fn all_acknowledged(answers: Vec<Result<Published, String>>) -> Vec<Seq> {
    answers.into_iter().enumerate().map(|(i, a)| a.unwrap_or_else(|e| panic!("publish #{i} failed: {e}")).seq).collect()
}

/// Alice on every node, Bob on the second; 50 publishes on the first node.
/// Every Alice session gets 1..=50 once, in order, and nothing else; Bob
/// gets nothing.
async fn every_node_receives_exactly_once(cluster: &Cluster) {
    let mut readers = Vec::new();
    for node in &cluster.nodes {
        let session = node.connect(USER, None).await;
        assert_eq!(session.welcome().last_seq, 0);
        readers.push((node.name.clone(), Reader::spawn(session, None)));
    }
    let bob = Reader::spawn(cluster.node(1).connect("bob", None).await, None);

    publish_n(cluster.node(0), USER, 1, 50).await;

    let bob = bob.until(0, DEADLINE);
    for (name, received) in all_until(readers, 50, DEADLINE).await {
        received.assert_exactly(&format!("alice on {name}"), 50);
    }
    let bob = bob.await;
    assert!(bob.seqs.is_empty(), "bob received alice's notifications: {:?}", bob.seqs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_one_node_reaches_sessions_on_every_node_exactly_once() {
    let cluster = Cluster::start(3);
    every_node_receives_exactly_once(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_a_redis_cluster_deliver_exactly_once() {
    let redis = RedisCluster::start();
    let cluster = Cluster::build().redis(redis.url()).start();
    every_node_receives_exactly_once(&cluster).await;
    // Presence reads each node's hash with one HMGET, routed to its slot.
    let _sessions = [cluster.node(0).connect("pat", None).await, cluster.node(1).connect("pat", None).await];
    presence_everywhere(&cluster, &[0, 1, 2], "pat", 2, WAIT).await;
}

/// What one publishing task got back: Alice's and Bob's seqs.
#[derive(Default)]
struct Answers {
    alice: Vec<Seq>,
    bob: Vec<Seq>,
}

/// 90 publishes through `node`; with `batched`, every third names Alice and Bob.
async fn publish_task(node_name: String, publisher: herald_client::Publisher, batched: bool) -> Answers {
    let mut answers = Answers::default();
    for i in 0..90 {
        let both = batched && i % 3 == 0;
        let request = PublishRequest {
            user_id: (!both).then(|| USER.to_string()),
            user_ids: both.then(|| vec![USER.to_string(), "bob".to_string()]),
            topic: "race".into(),
            payload: json!({ "node": node_name, "i": i }),
            idempotency_key: None,
            digest: None,
        };
        let (status, response) = match tokio::time::timeout(PUBLISH_TIMEOUT, publisher.publish(&request)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => panic!("publish on {node_name}: {e}"),
            Err(_) => panic!("publish on {node_name}: no answer within {PUBLISH_TIMEOUT:?}"),
        };
        assert_eq!(status, 201, "publish on {node_name}");
        for published in response.notifications {
            match published.user_id.as_str() {
                USER => answers.alice.push(published.seq),
                "bob" => answers.bob.push(published.seq),
                other => panic!("an answer for {other}"),
            }
        }
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_every_node_keep_one_gapless_order() {
    let cluster = Cluster::start(3);
    let mut readers = Vec::new();
    for node in &cluster.nodes {
        let session = node.connect(USER, None).await;
        readers.push((node.name.clone(), Reader::on(node, USER, session)));
    }
    let bob = Reader::on(cluster.node(2), "bob", cluster.node(2).connect("bob", None).await);

    // 3 nodes × 4 tasks × 90 publishes; half the tasks batch Alice with Bob.
    let mut tasks = Vec::new();
    for node in &cluster.nodes {
        for t in 0..4 {
            tasks.push(tokio::spawn(publish_task(node.name.clone(), node.publisher(), t % 2 == 1)));
        }
    }
    let (mut alice, mut bob_seqs) = (Vec::new(), Vec::new());
    for task in tasks {
        let answers = task.await.expect("a publishing task panicked");
        alice.extend(answers.alice);
        bob_seqs.extend(answers.bob);
    }
    alice.sort_unstable();
    bob_seqs.sort_unstable();
    let total = alice.len() as Seq;
    assert_eq!(total, 3 * 4 * 90);
    assert_exactly_once("the seqs of alice's HTTP answers", &alice, 1, total);
    let bob_total = bob_seqs.len() as Seq;
    assert_exactly_once("the seqs of bob's HTTP answers", &bob_seqs, 1, bob_total);

    for (name, received) in all_until(readers, total, DEADLINE).await {
        if received.reconnects > 0 {
            eprintln!("alice on {name} was closed with 1013 and resumed {} times", received.reconnects);
        }
        received.assert_exactly(&format!("alice on {name}"), total);
    }
    bob.until(bob_total, DEADLINE).await.assert_exactly("bob on node-2", bob_total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_users_node_loses_nothing() {
    let mut cluster = Cluster::start(3);
    let reader = Reader::spawn(cluster.node(0).connect(USER, None).await, None);
    let publishing = PublishLoop::spawn(cluster.node(1).publisher(), USER, Duration::from_millis(10));
    within("alice on node-0 received 20 notifications", DEADLINE, || async { reader.last_seen() >= 20 }).await;

    cluster.node_mut(0).kill9();
    let before = reader.ended(DEADLINE).await;
    assert!(before.ended.is_some(), "the session on the killed node did not end");
    let last_seen = *before.seqs.last().unwrap();
    assert_exactly_once("alice on node-0 before the kill", &before.seqs, 1, last_seen);

    // Publishing on node-1 goes on; Alice resumes on node-2.
    let acked_at_reconnect = publishing.acked();
    let after = Reader::on(cluster.node(2), USER, cluster.node(2).connect(USER, Some(last_seen)).await);
    publishing.wait_acked(acked_at_reconnect + 20, DEADLINE).await;
    let acknowledged = all_acknowledged(publishing.stop().await);
    let last = *acknowledged.last().unwrap();
    assert_exactly_once("the seqs of the HTTP answers", &acknowledged, 1, last);

    let after = after.until(last, DEADLINE).await;
    assert_exactly_once("alice on node-2 after resuming", &after.seqs, last_seen + 1, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_a_cluster_moves_sessions_without_loss() {
    let mut cluster = Cluster::start(3);
    let reader = Reader::spawn(cluster.node(0).connect(USER, None).await, None);
    let publishing = PublishLoop::spawn(cluster.node(2).publisher(), USER, Duration::from_millis(10));
    within("alice on node-0 received 20 notifications", DEADLINE, || async { reader.last_seen() >= 20 }).await;

    cluster.node(0).sigterm();
    let before = reader.ended(DEADLINE).await;
    match &before.ended {
        Some(herald_client::Error::Closed { code: 1001, .. }) => {}
        other => panic!("expected close 1001 on SIGTERM, got {other:?}"),
    }
    let last_seen = *before.seqs.last().unwrap();
    assert_exactly_once("alice on node-0 before SIGTERM", &before.seqs, 1, last_seen);

    let acked_at_reconnect = publishing.acked();
    let after = Reader::on(cluster.node(1), USER, cluster.node(1).connect(USER, Some(last_seen)).await);
    publishing.wait_acked(acked_at_reconnect + 20, DEADLINE).await;
    assert_eq!(cluster.node_mut(0).wait_exit().await, 0, "node-0 exit code after SIGTERM");
    let acknowledged = all_acknowledged(publishing.stop().await);
    let last = *acknowledged.last().unwrap();
    assert_exactly_once("the seqs of the HTTP answers", &acknowledged, 1, last);

    let after = after.until(last, DEADLINE).await;
    assert_exactly_once("alice on node-1 after resuming", &after.seqs, last_seen + 1, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_stream_sessions_still_receive_everything() {
    let mut redis = PrivateRedis::start();
    let cluster = Cluster::build().redis(redis.url()).env("HERALD_REPAIR_INTERVAL", "1s").start();
    // No resuming here: these sessions must stay open through the outage.
    let mut sessions = Vec::new();
    for node in &cluster.nodes[1..] {
        sessions.push((node.name.clone(), Reader::spawn(node.connect(USER, None).await, None)));
    }
    let publishing = PublishLoop::spawn(cluster.node(0).publisher(), USER, Duration::from_millis(20));
    publishing.wait_acked(20, DEADLINE).await;

    redis.stop();
    let stopped_at = tokio::time::Instant::now();
    let at_stop = publishing.acked();
    publishing.wait_acked(at_stop + 20, DEADLINE).await;
    // Without Redis, the connected sessions still get what is stored (repair
    // from the store); the outage lasts a few repair intervals at least.
    let during = publishing.last_seq();
    for (name, reader) in &sessions {
        within(&format!("alice on {name} got seq {during} while Redis was down"), DEADLINE, || async {
            reader.last_seen() >= during
        })
        .await;
    }
    tokio::time::sleep_until(stopped_at + Duration::from_secs(3)).await;
    redis.start_again();
    let at_start = publishing.acked();
    publishing.wait_acked(at_start + 20, DEADLINE).await;

    // Every publish answered 2xx, during the outage too (the store has them).
    let acknowledged = all_acknowledged(publishing.stop().await);
    let last = *acknowledged.last().unwrap();
    assert_exactly_once("the seqs of the HTTP answers", &acknowledged, 1, last);
    for (name, received) in all_until(sessions, last, Duration::from_secs(30)).await {
        assert!(received.ended.is_none(), "alice on {name} was disconnected: {:?}", received.ended);
        received.assert_exactly(&format!("alice on {name}, connected throughout"), last);
    }
}

/// A publish's answer as it came: status, `Retry-After` and body.
struct Refusal {
    status: u16,
    retry_after: Option<String>,
    body: serde_json::Value,
}

async fn raw_publish(node: &Node, user: &str, payload: serde_json::Value) -> Result<Refusal, String> {
    let request = reqwest::Client::new()
        .post(format!("{}/v1/notifications", node.http()))
        .bearer_auth(API_KEY)
        .json(&json!({ "user_id": user, "topic": "outage", "payload": payload }))
        .send();
    let response = match tokio::time::timeout(PUBLISH_TIMEOUT, request).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(format!("request failed: {e}")),
        Err(_) => return Err(format!("no answer within {PUBLISH_TIMEOUT:?}")),
    };
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap_or("?").to_string());
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    Ok(Refusal { status, retry_after, body })
}

/// Every stored notification of `user`, following pages.
async fn history(node: &Node, user: &str) -> Vec<herald_client::Notification> {
    let publisher = node.publisher();
    let mut out: Vec<herald_client::Notification> = Vec::new();
    loop {
        let after = out.last().map_or(0, |n| n.seq);
        let page = publisher.history(user, after, 500).await.expect("history");
        if page.notifications.is_empty() {
            return out;
        }
        out.extend(page.notifications);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_answers_503_and_no_false_2xx() {
    let pg = PrivatePostgres::start();
    // A short connect timeout keeps the outage answers quick (default 5 s).
    let cluster = Cluster::build().postgres_admin(pg.url()).env("HERALD_DB_CONNECT_TIMEOUT", "2s").start();
    // A steady stream across the outage, and publishes on every node.
    let publishing = PublishLoop::spawn(cluster.node(0).publisher(), USER, Duration::from_millis(20));
    publishing.wait_acked(10, DEADLINE).await;
    let mut acknowledged: Vec<Published> = Vec::new();

    pg.stop();
    let answers =
        futures_util::future::join_all(cluster.nodes.iter().map(|node| raw_publish(node, USER, json!({})))).await;
    for (node, answer) in cluster.nodes.iter().zip(answers) {
        let answer = answer.unwrap_or_else(|e| panic!("publish on {} while down: {e}", node.name));
        assert_eq!(answer.status, 503, "publish on {} with the store down: {}", node.name, answer.body);
        assert!(answer.retry_after.is_some(), "503 without Retry-After on {}", node.name);
        let (code, message) = (&answer.body["error"]["code"], &answer.body["error"]["message"]);
        assert!(
            code.as_str().is_some_and(|c| !c.is_empty()) && message.as_str().is_some_and(|m| !m.is_empty()),
            "not the spec's error body: {}",
            answer.body
        );
        if code != "store_unavailable" {
            eprintln!("note: {} answered 503 with code {code}", node.name);
        }
    }
    futures_util::future::join_all(cluster.nodes.iter().map(|node| async move {
        within(&format!("{} is not ready", node.name), DEADLINE, || async { node.ready_status().await == 503 }).await
    }))
    .await;

    pg.start_again();
    for node in &cluster.nodes {
        let publisher = node.publisher();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match publish_within(&publisher, USER, json!({ "after": "outage" })).await {
                Ok(published) => {
                    acknowledged.push(published);
                    break;
                }
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "publishes on {} still fail after PostgreSQL is back: {e}",
                    node.name
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        within(&format!("{} is ready again", node.name), DEADLINE, || async { node.ready_status().await == 200 }).await;
    }
    let resumed = publishing.acked();
    publishing.wait_acked(resumed + 10, DEADLINE).await;
    let answers = publishing.stop().await;
    let failed = answers.iter().filter(|a| a.is_err()).count();
    eprintln!("the publish loop had {failed} of {} publishes refused during the outage", answers.len());
    // The writers log each error of the outage once, and its end.
    for node in &cluster.nodes {
        let log = node.log();
        let failed: Vec<_> =
            log.lines().filter(|l| l.contains("group commit failed") && !l.contains("DEBUG")).collect();
        let mut kinds: Vec<&str> = failed
            .iter()
            .map(|l| l.split_once("error=").and_then(|(_, r)| r.rsplit_once(" notifications=")).unwrap().0)
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), failed.len(), "{}: an outage logged per group: {failed:#?}", node.name);
        if !failed.is_empty() {
            assert!(log.contains("group commits succeed again"), "{}: the outage's end is not logged", node.name);
        }
    }
    acknowledged.extend(answers.into_iter().flatten());

    // Every 2xx is stored, under its seq and id; the stored seqs have no gap.
    let stored = history(cluster.node(1), USER).await;
    let seqs: Vec<Seq> = stored.iter().map(|n| n.seq).collect();
    let last = seqs.last().copied().unwrap_or(0);
    assert_exactly_once("the stored seqs", &seqs, 1, last);
    let mut acked_seqs: Vec<Seq> = acknowledged.iter().map(|p| p.seq).collect();
    acked_seqs.sort_unstable();
    acked_seqs.dedup();
    assert_eq!(acked_seqs.len(), acknowledged.len(), "two 2xx answers carried the same seq");
    for published in &acknowledged {
        let found = stored.iter().find(|n| n.seq == published.seq);
        assert!(
            found.is_some_and(|n| n.id == published.id),
            "acknowledged seq {} (id {}) is not stored as such: {:?}",
            published.seq,
            published.id,
            found
        );
    }
}

/// `GET /v1/users/{user}/presence` → `sessions`.
async fn presence(node: &Node, user: &str) -> Option<u64> {
    let request = reqwest::Client::new()
        .get(format!("{}/v1/users/{user}/presence", node.http()))
        .bearer_auth(API_KEY)
        .timeout(Duration::from_secs(10));
    let response = request.send().await.ok()?;
    if response.status() != 200 {
        return None;
    }
    let body: serde_json::Value = response.json().await.ok()?;
    body["sessions"].as_u64()
}

/// Waits until every node in `nodes` counts `expected` sessions of `user`.
async fn presence_everywhere(cluster: &Cluster, nodes: &[usize], user: &str, expected: u64, limit: Duration) {
    for &i in nodes {
        let node = cluster.node(i);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let seen = presence(node, user).await;
            if seen == Some(expected) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "presence of {user} on {}: {seen:?}, expected {expected} within {limit:?}",
                node.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The nodes serving `user`'s sessions, in the listing's order, as `node`
/// lists them (`None` while the call fails).
async fn listed_nodes(node: &Node, user: &str) -> Option<(u64, Vec<(String, String)>)> {
    let listing = node.publisher().sessions(user).await.ok()?;
    Some((listing.count, listing.sessions.into_iter().map(|s| (s.node_id, s.session_id)).collect()))
}

/// Presence counts, and the listing of sessions, across real processes:
/// a session closed by its client or by a backend (by its id, through
/// another node) leaves both; a dead node's sessions leave both after the
/// presence TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_sessions_across_nodes() {
    let mut cluster = Cluster::build().env("HERALD_PRESENCE_TTL", "3s").start();
    let on_a = cluster.node(0).connect(USER, None).await;
    let on_b1 = cluster.node(1).connect(USER, None).await;
    let mut on_b2 = cluster.node(1).connect(USER, None).await;
    presence_everywhere(&cluster, &[0, 1, 2], USER, 3, WAIT).await;
    presence_everywhere(&cluster, &[2], "bob", 0, WAIT).await;
    let id = |session: &herald_client::Session| session.welcome().session_id.clone();
    let everyone = vec![("node-0".into(), id(&on_a)), ("node-1".into(), id(&on_b1)), ("node-1".into(), id(&on_b2))];
    assert_eq!(listed_nodes(cluster.node(2), USER).await, Some((3, everyone)), "listed by a node without any");

    on_b1.close().await.expect("close");
    presence_everywhere(&cluster, &[0, 1, 2], USER, 2, WAIT).await;

    // node-2 closes one of node-1's sessions by its id.
    let url = format!("{}/v1/users/{USER}/sessions/{}", cluster.node(2).http(), id(&on_b2));
    let answer = raw(reqwest::Client::new().delete(url).bearer_auth(API_KEY)).await;
    assert_eq!(answer.status, 204, "{}", answer.body);
    assert_eq!(closed(&mut on_b2).await.0, 4003);
    let closing = format!("a backend closes one session user_id={USER} session_id={}", id(&on_b2));
    assert!(cluster.node(2).log().contains(&closing), "logged for the audit trail:\n{}", cluster.node(2).log());
    drop(on_b2);
    presence_everywhere(&cluster, &[0, 1, 2], USER, 1, WAIT).await;
    let left = Some((1, vec![("node-0".to_string(), id(&on_a))]));
    within("node-2's listing to drop the closed session", WAIT, || async {
        listed_nodes(cluster.node(2), USER).await == left
    })
    .await;

    // A dead node's sessions stop counting, and stop being listed, after the presence TTL.
    cluster.node_mut(0).kill9();
    presence_everywhere(&cluster, &[1, 2], USER, 0, DEADLINE).await;
    assert_eq!(listed_nodes(cluster.node(1), USER).await, Some((0, vec![])));
    drop(on_a);
}

/// A Redis that refuses writes but still answers reads and `PUBLISH` (at
/// `maxmemory`: `OOM`; the same for `MISCONF` or `READONLY`): the nodes'
/// presence and heartbeats cannot be written, so rather than counts that
/// leave sessions out, presence answers 503 `broker_unavailable` on every
/// node, each logs it once at `warn`, and `herald_broker_presence_ok` is 0.
/// Deliveries go on across nodes. Once Redis takes writes again, presence
/// counts every session again and the nodes log that too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_writes_makes_presence_a_503_not_a_wrong_count() {
    let redis = PrivateRedis::start();
    let cluster = Cluster::build().nodes(2).redis(redis.url()).env("HERALD_PRESENCE_TTL", "3s").start();
    let reader = Reader::spawn(cluster.node(1).connect(USER, None).await, None);
    presence_everywhere(&cluster, &[0, 1], USER, 1, WAIT).await;
    let redis_config = |maxmemory: &'static str| {
        let url = redis.url();
        async move {
            let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
            redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(maxmemory).query_async::<()>(&mut conn).await.unwrap();
        }
    };
    let presence_answer = |node: &Node| {
        let url = format!("{}/v1/users/{USER}/presence", node.http());
        async move { raw(reqwest::Client::new().get(url).bearer_auth(API_KEY)).await }
    };

    redis_config("1").await; // every write is now over the limit
    for node in &cluster.nodes {
        within(&format!("{} answers presence with 503", node.name), DEADLINE, || async {
            let answer = presence_answer(node).await;
            if answer.status == 200 {
                return false;
            }
            assert_eq!((answer.status, answer.error_code()), (503, "broker_unavailable"), "{}", answer.body);
            assert!(answer.headers.contains_key("retry-after"), "503 without Retry-After");
            let message = answer.body["error"]["message"].as_str().unwrap_or_default().to_string();
            assert!(message.contains("OOM"), "the refusal says why: {message}");
            true
        })
        .await;
        assert_eq!(metric_at(&node.http(), "herald_broker_presence_ok").await, 0.0, "{}", node.name);
    }
    // PUBLISH is not a write: notifications still reach the other node.
    publish_n(cluster.node(0), USER, 1, 5).await;

    redis_config("0").await;
    presence_everywhere(&cluster, &[0, 1], USER, 1, DEADLINE).await;
    for node in &cluster.nodes {
        assert_eq!(metric_at(&node.http(), "herald_broker_presence_ok").await, 1.0, "{}", node.name);
        let log = node.log();
        let warned = log.lines().filter(|l| l.contains("presence writes to Redis keep failing")).count();
        assert_eq!(warned, 1, "{}: the failures are logged once\n{log}", node.name);
        assert!(log.contains("presence is written to Redis again"), "{}: the end is not logged", node.name);
    }
    reader.until(5, DEADLINE).await.assert_exactly("alice on node-1", 5);
}

/// A large-audience job on a node that is killed: once its lease expires,
/// another node's worker takes it over from the recorded progress, and every
/// user still gets the notification exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_on_a_killed_node_is_taken_over_and_each_user_gets_it_once() {
    let users = 40_000;
    let mut cluster = Cluster::build()
        .nodes(1)
        .env("HERALD_MAX_USER_IDS", "10")
        .env("HERALD_WORKERS", "1")
        .env("HERALD_JOB_LEASE", "2s")
        .start();
    let request = PublishRequest {
        user_id: None,
        user_ids: Some((0..users).map(|i| format!("fan-{i}")).collect()),
        topic: "takeover".into(),
        payload: json!({"big": true}),
        idempotency_key: None,
        digest: None,
    };
    let job_id = match cluster.node(0).publisher().submit(&request).await.unwrap() {
        (_, herald_client::Submitted::Job(job)) => job.job_id,
        other => panic!("expected a job, got {other:?}"),
    };
    let publisher = cluster.node(0).publisher();
    within("the job has made progress", DEADLINE, || async {
        publisher.job(&job_id).await.map(|s| s.progress.done > 0).unwrap_or(false)
    })
    .await;
    cluster.node_mut(0).kill9();

    let taker = cluster.add_node();
    let publisher = cluster.node(taker).publisher();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = publisher.job(&job_id).await.unwrap();
        assert_ne!(status.state, "failed", "{status:?}");
        if status.state == "done" {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "the job never finished: {status:?}\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.attempts >= 2, "the job was not taken over: {status:?}\n{}", cluster.logs());
    assert_eq!(status.progress.done, users as i64);

    let pool = sqlx::PgPool::connect(&cluster.database_url()).await.unwrap();
    let (total, distinct): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT user_id) FROM notifications WHERE topic = 'takeover'")
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert_eq!((total, distinct), (users as i64, users as i64), "each user exactly once");
}

/// PostgreSQL's disk fills up (a tmpfs of 64 MiB holding its data and its
/// WAL). First a table cannot grow: the publishes that need a new page get
/// 503 `store_unavailable` with `Retry-After` (PostgreSQL's `53100`), the
/// others still commit. Then the WAL cannot grow either: PostgreSQL panics
/// and cannot recover until room is made, and every publish gets 503 while
/// `/readyz` says not ready. The operator deletes the file that filled the
/// disk and starts PostgreSQL: the node, never restarted, takes publishes
/// again. Every 2xx is stored and delivered once, in order, under its seq;
/// no refused publish took a seq; `herald check` finds the store sound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_postgres_disk_refuses_with_503_loses_nothing_and_recovers_once_room_is_made() {
    let pg = PrivatePostgres::start_on_small_disk(64);
    let disk = pg.disk().expect("a small disk");
    let cluster = Cluster::build().nodes(1).postgres_admin(pg.url()).env("HERALD_DB_CONNECT_TIMEOUT", "2s").start();
    let node = cluster.node(0);
    let reader = Reader::on(node, USER, node.connect(USER, Some(0)).await);
    let pad = "x".repeat(2000);
    let mut acknowledged: Vec<(Seq, String)> = Vec::new();
    // Each answer is a stored notification or the spec's 503; which, the
    // disk decides. True when it was refused.
    let mut publish = |answer: Result<Refusal, String>, what: &str| {
        let answer = answer.unwrap_or_else(|e| panic!("{what}: {e}\n{}", pg.log()));
        if answer.status == 201 {
            let published = &answer.body["notifications"][0];
            acknowledged.push((published["seq"].as_i64().unwrap(), published["id"].as_str().unwrap().to_string()));
            return false;
        }
        assert_eq!(answer.status, 503, "{what}: {}", answer.body);
        assert_eq!(answer.body["error"]["code"], "store_unavailable", "{what}: {}", answer.body);
        assert!(answer.retry_after.is_some(), "{what}: 503 without Retry-After");
        true
    };
    for i in 0..20 {
        assert!(!publish(raw_publish(node, USER, json!({ "i": i, "pad": pad })).await, "before"), "refused before");
    }

    // Something else fills the disk to the last block.
    fill(&disk.join("filler"));
    // Publishes go on until the tables need a page the disk cannot give.
    let mut refused = 0;
    for i in 0..400 {
        if publish(raw_publish(node, USER, json!({ "full": i, "pad": pad })).await, "a table full") {
            refused += 1;
            if refused == 5 {
                break;
            }
        }
    }
    assert_eq!(refused, 5, "400 publishes of 2 KB fitted on a full disk\n{}", pg.log());
    assert!(pg.log().contains("No space left on device"), "{}", pg.log());

    // The WAL needs a new segment: PostgreSQL stops, and stays down.
    admin_execute(&pg.url(), vec!["SELECT pg_switch_wal()".into()]).expect("switch the WAL segment");
    let _ = raw_publish(node, USER, json!("wants a new WAL segment")).await;
    let down = tokio::time::Instant::now() + DEADLINE;
    while pg.is_running() {
        assert!(tokio::time::Instant::now() < down, "PostgreSQL kept running with its WAL full\n{}", pg.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..3 {
        assert!(publish(raw_publish(node, USER, json!({ "down": i })).await, "PostgreSQL down"), "taken while down");
    }
    within("the node says it is not ready", DEADLINE, || async { node.ready_status().await == 503 }).await;
    // The other writes are refused the same way, and store nothing.
    let http = reqwest::Client::new();
    let token = node.token(USER);
    let writes = [
        ("a read mark", http.post(format!("{}/v1/me/notifications/read", node.http())).bearer_auth(&token)),
        ("a revocation", http.post(format!("{}/v1/users/mallory/tokens/revoke", node.http())).bearer_auth(API_KEY)),
        (
            "a single token's",
            http.post(format!("{}/v1/users/mallory/tokens/t1/revoke", node.http())).bearer_auth(API_KEY),
        ),
    ];
    for (what, request) in writes {
        let body = if what == "a read mark" { json!({"up_to_seq": 1}) } else { json!({}) };
        let answer = raw(request.json(&body)).await;
        assert_eq!((answer.status, answer.error_code()), (503, "store_unavailable"), "{what}: {}", answer.body);
        assert!(answer.headers.contains_key("retry-after"), "{what}: 503 without Retry-After");
    }

    // The operator makes room and starts PostgreSQL: it recovers, and the
    // node takes publishes again without a restart.
    std::fs::remove_file(disk.join("filler")).unwrap();
    pg.start_again();
    let back = tokio::time::Instant::now() + Duration::from_secs(30);
    while publish(raw_publish(node, USER, json!("after")).await, "after room was made") {
        assert!(tokio::time::Instant::now() < back, "publishes still refused with room and PostgreSQL up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    within("the node is ready again", DEADLINE, || async { node.ready_status().await == 200 }).await;

    // Every acknowledged publish is stored under its seq and id, the seqs
    // without a gap (a refused one took none); the session that stayed
    // connected and a resume from 0 both get them once, in order.
    let last = acknowledged.last().unwrap().0;
    let seqs: Vec<Seq> = acknowledged.iter().map(|(seq, _)| *seq).collect();
    assert_exactly_once("the acknowledged seqs", &seqs, 1, last);
    let stored: Vec<(Seq, String)> = history(node, USER).await.into_iter().map(|n| (n.seq, n.id)).collect();
    assert_eq!(stored, acknowledged, "what is stored is exactly what was acknowledged");
    reader.until(last, DEADLINE).await.assert_exactly("alice, connected throughout", last);
    let resumed = Reader::spawn(node.connect(USER, Some(0)).await, None);
    resumed.until(last, DEADLINE).await.assert_exactly("alice, resuming from 0", last);
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("check")
        .env("HERALD_DATABASE_URL", cluster.database_url())
        .output()
        .unwrap();
    assert!(check.status.success(), "herald check: {}", String::from_utf8_lossy(&check.stderr));
    let log = node.log();
    assert!(log.contains("No space left on device"), "the node's log does not say why");
    assert!(log.contains("group commits succeed again"), "the end of the failures is not logged");
    // Nothing refused was stored: alice has read nothing, mallory's tokens work.
    let unread = raw(reqwest::Client::new().get(format!("{}/v1/me/unread", node.http())).bearer_auth(node.token(USER)));
    assert_eq!(unread.await.body["total"], last, "a refused read mark was stored");
    assert_eq!(
        handshake_refusal(&node.ws(), &token_with_jti("mallory", json!("t1"))).await,
        None,
        "a refused revocation"
    );
}

/// Token revocation across `herald` processes on PostgreSQL and Redis: the
/// node serving the user's session closes it (4001) on the Redis message; a
/// node serving none of them learns from the store within the repair
/// interval; a node started afterwards refuses the token from its start;
/// and a token issued at the revocation's time works everywhere. One token
/// revoked alone by its `jti` likewise, while the user's other token works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_every_node_and_the_nodes_started_later() {
    let mut cluster = Cluster::build().nodes(3).env("HERALD_REPAIR_INTERVAL", "500ms").start();
    let issued = unix_now() - 100;
    let old = token_issued(USER, Some(issued));
    let mut on_a = Connect::new(cluster.node(0).ws(), &old).connect().await.expect("connect with the old token");

    let revoked = cluster.node(1).publisher().revoke_tokens(USER, &RevokeTokens::default()).await.expect("revoke");
    assert!(revoked.issued_before > issued, "{revoked:?}");
    assert_eq!(close_code(&mut on_a).await, 4001, "closed on node-0\n{}", cluster.logs());
    drop(on_a);
    let refused = Some((401, "token_revoked".to_string()));
    for i in 0..3 {
        let node = cluster.node(i);
        within(&format!("{} refuses the revoked token", node.name), DEADLINE, || async {
            handshake_refusal(&node.ws(), &old).await == refused
        })
        .await;
    }
    let late = cluster.add_node();
    assert_eq!(handshake_refusal(&cluster.node(late).ws(), &old).await, refused, "from its start");

    let fresh = token_issued(USER, Some(revoked.issued_before));
    for i in [2, late] {
        assert_eq!(handshake_refusal(&cluster.node(i).ws(), &fresh).await, None, "a newer token on node {i}");
    }

    // One token revoked alone, by its `jti`: the same, for that token only.
    let (phone, laptop) = (token_with_jti("pia", json!("phone")), token_with_jti("pia", json!("laptop")));
    let mut phone_on_a = Connect::new(cluster.node(0).ws(), &phone).connect().await.expect("connect the phone");
    let mut laptop_on_c = Connect::new(cluster.node(2).ws(), &laptop).connect().await.expect("connect the laptop");
    let one = cluster.node(1).publisher().revoke_token("pia", "phone", &RevokeToken::default()).await.expect("revoke");
    assert_eq!(one.jti, "phone");
    assert_eq!(close_code(&mut phone_on_a).await, 4001, "closed on node-0\n{}", cluster.logs());
    for i in [0, 1, 2, late] {
        let node = cluster.node(i);
        within(&format!("{} refuses the revoked phone", node.name), DEADLINE, || async {
            handshake_refusal(&node.ws(), &phone).await == refused
        })
        .await;
        assert_eq!(handshake_refusal(&node.ws(), &laptop).await, None, "the laptop's token on {}", node.name);
    }
    assert!(laptop_on_c.next_frame_within(Duration::from_millis(300)).await.unwrap().is_none(), "the laptop stays");
    let later = cluster.add_node();
    assert_eq!(handshake_refusal(&cluster.node(later).ws(), &phone).await, refused, "from its start");
    // The node that took them logged both at info, for the audit trail.
    let log = cluster.node(1).log();
    let audit =
        |needle: &str| log.lines().any(|l| l.contains(needle) && l.contains(" INFO ") && l.contains("request_id"));
    assert!(audit("tokens revoked") && audit("issued_before"), "{log}");
    assert!(audit("token revoked") && log.contains("jti=phone"), "{log}");
}

/// The operator's PostgreSQL restore: `pg_dump` while the nodes serve, more
/// notifications (lost in the restore), the nodes stopped, `pg_restore`,
/// `herald mark-restored`, the nodes started. A client that saw the lost
/// notifications and resumes with its epoch gets the new ones stored under
/// the same seqs; the epoch's row counter survived the dump, so a second
/// mark works too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_postgres_restore_and_mark_restored_a_client_resumes_from_the_fork() {
    let mut cluster = Cluster::build().nodes(2).start();
    publish_n(cluster.node(0), USER, 1, 5).await;
    let dump = tempfile::tempdir().unwrap();
    let file = dump.path().join("herald.dump");
    let ran = |program: &str, args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(program).args(args).output().unwrap();
        assert!(out.status.success(), "{program}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let url = cluster.database_url();
    ran("pg_dump", &["--format=custom".as_ref(), "--file".as_ref(), file.as_os_str(), url.as_ref()]);
    publish_n(cluster.node(1), USER, 6, 3).await;
    let mut seen = cluster.node(1).connect(USER, Some(0)).await;
    let e0 = seen.welcome().epoch.clone().expect("an epoch in the welcome");
    assert_eq!(notifications(&mut seen, 8).await.len(), 8);
    drop(seen);
    for i in 0..2 {
        cluster.node(i).sigterm();
        assert_eq!(cluster.node_mut(i).wait_exit().await, 0);
    }

    let options = ["--clean", "--if-exists", "--no-owner", "--dbname"];
    let mut args: Vec<&std::ffi::OsStr> = options.iter().map(|a| a.as_ref()).collect();
    args.extend([url.as_ref(), file.as_os_str()]);
    ran("pg_restore", &args);
    let env = cluster.env().to_vec();
    let mark = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("mark-restored")
            .env_clear()
            .envs(env.iter().cloned())
            .output()
            .unwrap();
        assert!(out.status.success(), "mark-restored: {}", String::from_utf8_lossy(&out.stderr));
    };
    mark();
    let node = cluster.add_node();
    publish_n(cluster.node(node), USER, 6, 4).await;
    let token = cluster.node(node).token(USER);
    let mut back = Connect::new(cluster.node(node).ws(), &token).since(8).epoch(&e0).connect().await.unwrap();
    let e1 = back.welcome().epoch.clone().unwrap();
    assert_ne!(e1, e0);
    assert_eq!(back.welcome().since, Some(5), "{}", cluster.logs());
    let seqs: Vec<Seq> = notifications(&mut back, 4).await.iter().map(|n| n.seq).collect();
    assert_eq!(seqs, [6, 7, 8, 9]);

    // A second restore (marked without one, as after restoring the same
    // dump again): the epochs' ordinals carry on past the dumped ones.
    cluster.node(node).sigterm();
    assert_eq!(cluster.node_mut(node).wait_exit().await, 0);
    mark();
    let node = cluster.add_node();
    let token = cluster.node(node).token(USER);
    let again = Connect::new(cluster.node(node).ws(), &token).since(9).epoch(&e1).connect().await.unwrap();
    assert_ne!(again.welcome().epoch.as_deref(), Some(e1.as_str()));
    assert_eq!(again.welcome().since, Some(9), "the fork at the second mark is the counter, 9");
}
