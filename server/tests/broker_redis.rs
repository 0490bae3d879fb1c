//! The Redis broker with in-process nodes: several nodes (the library's `run`)
//! share one SQLite file and a real Redis, each test in its own namespace
//! (`HERALD_REDIS_PREFIX`). The process-level cluster tests are in cluster.rs.

mod common;
mod services;

use std::time::Duration;

use common::*;
use herald_client::ServerFrame;
use herald_server::auth::unix_now;
use serde_json::json;

use services::{redis_url, PrivateRedis};

fn prefix(test: &str) -> String {
    format!("{}-{test}", services::unique_prefix())
}

/// `n` nodes on one database and one Redis namespace.
async fn nodes(n: usize, prefix: &str, extra: &[(&str, &str)]) -> (tempfile::TempDir, Vec<TestServer>) {
    let dir = tempfile::tempdir().unwrap();
    let url = redis_url();
    let mut out = Vec::new();
    for i in 0..n {
        let node_id = format!("node-{i}");
        let mut vars = vec![
            ("HERALD_REDIS_URL", url.as_str()),
            ("HERALD_REDIS_PREFIX", prefix),
            ("HERALD_NODE_ID", node_id.as_str()),
        ];
        vars.extend_from_slice(extra);
        out.push(TestServer::start_in(dir.path(), &vars).await);
    }
    (dir, out)
}

#[tokio::test]
async fn a_publish_on_one_node_reaches_the_users_sessions_on_every_node_once() {
    let p = prefix("fanout");
    let (_dir, nodes) = nodes(3, &p, &[]).await;
    let mut sessions = Vec::new();
    for node in &nodes {
        sessions.push(node.connect("alice").await);
    }
    let mut bob = nodes[1].connect("bob").await;
    for i in 1..=30 {
        nodes[i % 3].publish("alice", "t", json!({"i": i})).await;
    }
    for session in &mut sessions {
        let got: Vec<i64> = notifications(session, 30).await.iter().map(|n| n.seq).collect();
        assert_eq!(got, (1..=30).collect::<Vec<_>>());
        let extra = session.next_frame_within(Duration::from_millis(300)).await;
        assert!(!matches!(extra, Ok(Some(ServerFrame::Notification(_)))), "a duplicate arrived: {extra:?}");
    }
    let extra = bob.next_frame_within(Duration::from_millis(200)).await;
    assert!(!matches!(extra, Ok(Some(ServerFrame::Notification(_)))), "bob got alice's notification");
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn disconnecting_a_user_closes_their_sessions_on_every_node() {
    let p = prefix("disconnect");
    let (_dir, nodes) = nodes(2, &p, &[]).await;
    let mut here = nodes[0].connect("dora").await;
    let mut there = nodes[1].connect("dora").await;
    let mut other = nodes[1].connect("erin").await;
    let answer =
        raw(reqwest::Client::new().delete(format!("{}/v1/users/dora/sessions", nodes[0].http())).bearer_auth(API_KEY))
            .await;
    assert_eq!(answer.status, 204, "{}", answer.body);
    assert_eq!(close_code(&mut here).await, 4003);
    assert_eq!(close_code(&mut there).await, 4003, "the other node's session closes too");
    assert!(other.next_frame_within(Duration::from_millis(300)).await.unwrap().is_none(), "erin stays");
    drop((here, there, other));
    for node in nodes {
        node.stop().await;
    }
}

/// `GET /v1/users/{id}/sessions` on any node lists the user's sessions on
/// every node; closing one by its id on one node closes it where it runs
/// and nothing else; a refresh on one node shows in the listing on the
/// other.
#[tokio::test]
async fn sessions_are_listed_and_closed_one_at_a_time_across_nodes() {
    let p = prefix("sessions");
    let (_dir, nodes) = nodes(2, &p, &[]).await;
    let connect = |node: usize, user: &'static str, jti: &'static str, agent: &'static str| {
        let (ws, token) = (nodes[node].ws(), token_with_jti(user, json!(jti)));
        async move { herald_client::Connect::new(ws, token).user_agent(agent).connect().await.unwrap() }
    };
    let mut here = connect(0, "hana", "hana-phone", "Phone/1").await;
    let mut there = connect(1, "hana", "hana-laptop", "Laptop/1").await;
    let mut other = connect(1, "ivan", "ivan-phone", "Phone/1").await;
    let listing = |node: usize| {
        let publisher = nodes[node].publisher();
        async move { publisher.sessions("hana").await.expect("a listing") }
    };
    for node in 0..2 {
        eventually("both of hana's sessions listed", || async { listing(node).await.sessions.len() == 2 }).await;
        let hana = listing(node).await;
        assert_eq!(hana.count, 2);
        let seen: Vec<_> =
            hana.sessions.iter().map(|s| (s.session_id.clone(), s.node_id.as_str(), s.jti.as_deref())).collect();
        assert_eq!(
            seen,
            [
                (here.welcome().session_id.clone(), "node-0", Some("hana-phone")),
                (there.welcome().session_id.clone(), "node-1", Some("hana-laptop"))
            ],
            "from node-{node}"
        );
        assert_eq!(hana.sessions[1].user_agent.as_deref(), Some("Laptop/1"));
    }

    // A refresh on node-1 reaches node-0's listing.
    let fresh = token_with_jti("hana", json!("hana-laptop-2"));
    there.send_text(json!({"type": "refresh", "token": fresh, "ref": 1}).to_string()).await.unwrap();
    assert!(matches!(next(&mut there).await, ServerFrame::Ok { .. }));
    eventually("the refreshed token listed on node-0", || async {
        listing(0).await.sessions.iter().any(|s| s.jti.as_deref() == Some("hana-laptop-2"))
    })
    .await;

    // node-0 closes the session node-1 serves.
    let url = format!("{}/v1/users/hana/sessions/{}", nodes[0].http(), there.welcome().session_id);
    let answer = raw(reqwest::Client::new().delete(url).bearer_auth(API_KEY)).await;
    assert_eq!(answer.status, 204, "{}", answer.body);
    assert_eq!(closed(&mut there).await, (4003, "disconnected by the server".to_string()));
    drop(there);
    assert!(here.next_frame_within(Duration::from_millis(300)).await.unwrap().is_none(), "node-0's session stays");
    assert!(other.next_frame_within(Duration::from_millis(100)).await.unwrap().is_none(), "ivan stays");
    eventually("the closed session to leave node-0's listing", || async {
        let hana = listing(0).await;
        hana.count == 1 && hana.sessions.len() == 1 && hana.sessions[0].node_id == "node-0"
    })
    .await;
    drop((here, other));
    for node in nodes {
        node.stop().await;
    }
}

/// Nothing repairs a lost disconnect, so while Redis is gone the call says
/// 503 (this node's sessions are closed all the same), and 204 once it is back.
#[tokio::test]
async fn a_disconnect_that_may_not_reach_other_nodes_is_a_503() {
    let mut redis = PrivateRedis::start();
    let url = redis.url();
    let node = TestServer::start_with(&[("HERALD_REDIS_URL", url.as_str())]).await;
    let mut here = node.connect("gina").await;
    redis.stop();
    let url = format!("{}/v1/users/gina/sessions", node.http());
    let answer = raw(reqwest::Client::new().delete(&url).bearer_auth(API_KEY)).await;
    assert_eq!((answer.status, answer.error_code()), (503, "broker_unavailable"), "{}", answer.body);
    assert!(answer.headers.contains_key("retry-after"));
    assert_eq!(close_code(&mut here).await, 4003, "this node's session closes all the same");
    drop(here);
    // One session closed by its id, and a listing: the same 503.
    let one = format!("{url}/{}", uuid::Uuid::now_v7());
    let answer = raw(reqwest::Client::new().delete(&one).bearer_auth(API_KEY)).await;
    assert_eq!((answer.status, answer.error_code()), (503, "broker_unavailable"), "{}", answer.body);
    let answer = raw(reqwest::Client::new().get(&url).bearer_auth(API_KEY)).await;
    assert_eq!((answer.status, answer.error_code()), (503, "broker_unavailable"), "{}", answer.body);
    redis.start_again();
    eventually("the broker answers again", || async {
        raw(reqwest::Client::new().delete(&url).bearer_auth(API_KEY)).await.status == 204
    })
    .await;
    node.stop().await;
    redis.stop();
}

/// A session of `user` on `node` with a token issued 100 s ago.
async fn connect_issued_earlier(node: &TestServer, user: &str) -> (herald_client::Session, String) {
    let token = token_issued(user, Some(unix_now() - 100));
    (herald_client::Connect::new(node.ws(), &token).connect().await.unwrap(), token)
}

/// A node on the same database as the others but another Redis namespace:
/// it hears none of their messages, nor they its, as if every one were lost.
async fn node_not_hearing(dir: &tempfile::TempDir) -> TestServer {
    let (url, elsewhere) = (redis_url(), prefix("elsewhere"));
    let vars = [("HERALD_REDIS_URL", url.as_str()), ("HERALD_REDIS_PREFIX", &elsewhere), ("HERALD_NODE_ID", "lost")];
    TestServer::start_in(dir.path(), &vars).await
}

async fn revoke_tokens(node: &TestServer, user: &str) {
    let url = format!("{}/v1/users/{user}/tokens/revoke", node.http());
    let answer = raw(reqwest::Client::new().post(url).bearer_auth(API_KEY).json(&json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}

/// A revocation taken by one node closes the user's older-token sessions
/// on the others: through Redis where it is carried, and from the store
/// (the periodic re-read) where it is not — here a node in another Redis
/// namespace takes it, as if the message were lost.
#[tokio::test]
async fn revoked_tokens_close_sessions_on_every_node_by_message_or_from_the_store() {
    let p = prefix("revoke");
    let (dir, nodes) = nodes(2, &p, &[("HERALD_REPAIR_INTERVAL", "500ms")]).await;
    let (mut here, _) = connect_issued_earlier(&nodes[0], "gail").await;
    let (mut there, token) = connect_issued_earlier(&nodes[1], "gail").await;
    revoke_tokens(&nodes[0], "gail").await;
    assert_eq!(close_code(&mut here).await, 4001);
    assert_eq!(close_code(&mut there).await, 4001, "the other node's session closes too");
    assert_eq!(handshake_refusal(&nodes[1].ws(), &token).await, Some((401, "token_revoked".into())));
    drop((here, there));

    let elsewhere = node_not_hearing(&dir).await;
    let (mut on_a, token) = connect_issued_earlier(&nodes[0], "hank").await;
    let (mut on_b, _) = connect_issued_earlier(&nodes[1], "hank").await;
    revoke_tokens(&elsewhere, "hank").await;
    assert_eq!(close_code(&mut on_a).await, 4001, "from the store");
    assert_eq!(close_code(&mut on_b).await, 4001, "from the store");
    assert_eq!(handshake_refusal(&nodes[0].ws(), &token).await.map(|(status, _)| status), Some(401));
    for node in &nodes {
        assert_eq!(node.metric("herald_revoked_users").await, 2.0, "every node knows both");
    }
    drop((on_a, on_b));
    elsewhere.stop().await;
    for node in nodes {
        node.stop().await;
    }
}

/// One token revoked alone closes its sessions on every node — by message
/// where Redis carries it, from the store where it does not — and every
/// node refuses it, a node started later too; the user's other token keeps
/// its sessions on both nodes.
#[tokio::test]
async fn a_single_revoked_token_closes_its_sessions_on_every_node() {
    let p = prefix("revoke-one");
    let (dir, nodes) = nodes(2, &p, &[("HERALD_REPAIR_INTERVAL", "500ms")]).await;
    let connect = |node: &TestServer, token: &str| herald_client::Connect::new(node.ws(), token).connect();
    let revoke_one = |node: &TestServer, jti: &str| {
        let url = format!("{}/v1/users/mia/tokens/{jti}/revoke", node.http());
        raw(reqwest::Client::new().post(url).bearer_auth(API_KEY).json(&json!({})))
    };
    let (phone, laptop, watch) = (
        token_with_jti("mia", json!("phone")),
        token_with_jti("mia", json!("laptop")),
        token_with_jti("mia", json!("watch")),
    );
    let mut phone_here = connect(&nodes[0], &phone).await.unwrap();
    let mut phone_there = connect(&nodes[1], &phone).await.unwrap();
    let mut laptop_there = connect(&nodes[1], &laptop).await.unwrap();
    assert_eq!(revoke_one(&nodes[0], "phone").await.status, 200);
    assert_eq!(close_code(&mut phone_here).await, 4001);
    assert_eq!(close_code(&mut phone_there).await, 4001, "the other node's session closes too");
    assert_eq!(handshake_refusal(&nodes[1].ws(), &phone).await, Some((401, "token_revoked".into())));

    // Taken by a node in another Redis namespace, as if the message were lost.
    let elsewhere = node_not_hearing(&dir).await;
    let mut watch_here = connect(&nodes[0], &watch).await.unwrap();
    let mut watch_there = connect(&nodes[1], &watch).await.unwrap();
    assert_eq!(revoke_one(&elsewhere, "watch").await.status, 200);
    assert_eq!(close_code(&mut watch_here).await, 4001, "from the store");
    assert_eq!(close_code(&mut watch_there).await, 4001, "from the store");
    for node in &nodes {
        assert_eq!(node.metric("herald_revoked_tokens").await, 2.0, "every node knows both");
    }
    assert!(laptop_there.next_frame_within(Duration::from_millis(300)).await.unwrap().is_none(), "the laptop stays");
    nodes[0].publish("mia", "t", json!("for the laptop")).await;
    assert_eq!(next_notification(&mut laptop_there).await.payload, json!("for the laptop"));

    let later =
        TestServer::start_in(dir.path(), &[("HERALD_REDIS_URL", &redis_url()), ("HERALD_REDIS_PREFIX", &p)]).await;
    assert_eq!(handshake_refusal(&later.ws(), &phone).await, Some((401, "token_revoked".into())));
    assert_eq!(handshake_refusal(&later.ws(), &watch).await, Some((401, "token_revoked".into())));
    assert!(connect(&later, &laptop).await.is_ok(), "the laptop's token works on a new node");
    drop((phone_here, phone_there, laptop_there, watch_here, watch_there));
    for node in [elsewhere, later] {
        node.stop().await;
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn read_marks_reach_sessions_on_other_nodes() {
    let p = prefix("read");
    let (_dir, nodes) = nodes(2, &p, &[]).await;
    let mut on_b = nodes[1].connect("carol").await;
    nodes[0].publish("carol", "t", json!({})).await;
    assert_eq!(next_notification(&mut on_b).await.seq, 1);
    nodes[0].inbox("carol").mark_read(&herald_client::ReadMark::UpTo { up_to_seq: 1 }).await.unwrap();
    match next(&mut on_b).await {
        ServerFrame::Read(mark) => assert_eq!(mark, herald_client::ReadMark::UpTo { up_to_seq: 1 }),
        other => panic!("expected a read frame, got {other:?}"),
    }
    for node in nodes {
        node.stop().await;
    }
}

/// `user`'s sessions across the cluster, as `node` counts them.
async fn presence(node: &TestServer, user: &str) -> u64 {
    let url = format!("{}/v1/users/{user}/presence", node.http());
    let body: serde_json::Value =
        reqwest::Client::new().get(url).bearer_auth(API_KEY).send().await.unwrap().json().await.unwrap();
    body["sessions"].as_u64().unwrap()
}

#[tokio::test]
async fn presence_counts_sessions_on_every_node() {
    let p = prefix("presence");
    let (_dir, nodes) = nodes(2, &p, &[]).await;
    let a1 = nodes[0].connect("dave").await;
    let _b1 = nodes[1].connect("dave").await;
    let _b2 = nodes[1].connect("dave").await;
    eventually("presence is 3 on both nodes", || async {
        presence(&nodes[0], "dave").await == 3 && presence(&nodes[1], "dave").await == 3
    })
    .await;
    drop(a1);
    eventually("presence drops to 2", || async { presence(&nodes[1], "dave").await == 2 }).await;
    for node in nodes {
        node.stop().await;
    }
}

/// Lookups made at once are read from Redis together (a batch per live
/// node): each still answers its own user's count, whatever else shares
/// its batch — users with none, one or several sessions on either node.
/// Redis is paused while they arrive, so they queue up behind the first.
#[tokio::test]
async fn presence_lookups_made_at_once_each_get_their_own_users_count() {
    let redis = PrivateRedis::start();
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for i in 0..2 {
        let id = format!("node-{i}");
        nodes.push(
            TestServer::start_in(dir.path(), &[("HERALD_REDIS_URL", url.as_str()), ("HERALD_NODE_ID", &id)]).await,
        );
    }
    let users: Vec<String> = (0..12).map(|i| format!("batch-{i}")).collect();
    // batch-i has (7 i) mod 5 sessions (0, 2, 4, 1, 3, 0, …), alternating
    // between the nodes.
    let count = |i: usize| (7 * i % 5) as u64;
    let mut sessions = Vec::new();
    for (i, user) in users.iter().enumerate() {
        for k in 0..count(i) as usize {
            sessions.push(nodes[k % 2].connect(user).await);
        }
    }
    eventually("every count is in Redis", || async {
        presence(&nodes[0], "batch-2").await == 4 && presence(&nodes[1], "batch-11").await == 2
    })
    .await;

    let mut admin = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("CLIENT").arg("PAUSE").arg(500).arg("ALL").query_async(&mut admin).await.unwrap();
    let client = reqwest::Client::new();
    let lookups = (0..10).flat_map(|round| users.iter().enumerate().map(move |(i, user)| (round + i, i, user)));
    let lookups = lookups.map(|(n, i, user)| {
        let url = format!("{}/v1/users/{user}/presence", nodes[n % 2].http());
        let request = client.get(url).bearer_auth(API_KEY).send();
        async move {
            let body: serde_json::Value = request.await.unwrap().json().await.unwrap();
            (i, body["sessions"].as_u64())
        }
    });
    for (i, answer) in futures_util::future::join_all(lookups).await {
        assert_eq!(answer, Some(count(i)), "batch-{i}");
    }

    // Handshakes while Redis stalls give up on their lookups (the cap fails
    // open) and connect; once it answers, their sessions count.
    let () = redis::cmd("CLIENT").arg("PAUSE").arg(1000).arg("ALL").query_async(&mut admin).await.unwrap();
    let late = futures_util::future::join_all((0..20).map(|k| nodes[k % 2].connect("late"))).await;
    let fallbacks = "herald_rate_limit_fallbacks_total{limit=\"sessions_per_user\"}";
    let gave_up = nodes[0].metric(fallbacks).await + nodes[1].metric(fallbacks).await;
    assert!(gave_up >= 20.0, "{gave_up} handshakes fell back to the node's own count");
    eventually("the late sessions count", || async { presence(&nodes[0], "late").await == 20 }).await;
    drop((sessions, late));
    for node in nodes {
        node.stop().await;
    }
}

/// Redis loses a node's presence hash (evicted under `maxmemory`, or
/// deleted) and a session arrives before the node's next refresh: the node
/// writes the hash whole again, not only the newcomer, so the users already
/// connected keep counting.
#[tokio::test]
async fn a_presence_hash_redis_lost_is_written_whole_again() {
    let p = prefix("evicted");
    let (_dir, nodes) = nodes(1, &p, &[("HERALD_PRESENCE_TTL", "30s")]).await;
    let node = &nodes[0];
    let (_alice, _bob) = (node.connect("alice").await, node.connect("bob").await);
    eventually("alice and bob count", || async {
        presence(node, "alice").await == 1 && presence(node, "bob").await == 1
    })
    .await;
    let mut redis = redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let key = format!("{p}:presence:node-0");
    let deleted: u32 = redis::cmd("DEL").arg(&key).query_async(&mut redis).await.unwrap();
    assert_eq!(deleted, 1, "no hash at {key}");
    // Within the tick, long before the 10 s refresh.
    let _carol = node.connect("carol").await;
    eventually("carol counts", || async { presence(node, "carol").await == 1 }).await;
    for user in ["alice", "bob"] {
        assert_eq!(presence(node, user).await, 1, "{user} left out of the rewritten hash");
        // The listing the other nodes read is written whole too.
        let listing: Option<String> =
            redis::cmd("HGET").arg(&key).arg(format!("\u{1}{user}")).query_async(&mut redis).await.unwrap();
        let listing: Vec<herald_client::UserSession> = serde_json::from_str(&listing.expect("a listing")).unwrap();
        assert_eq!(listing.len(), 1, "{user}'s listing");
    }
    for node in nodes {
        node.stop().await;
    }
}

/// A node in another Redis namespace writes to the same store: its publishes
/// never reach this namespace's channels — exactly what a lost broker message
/// looks like. The periodic repair must deliver them anyway.
#[tokio::test]
async fn notifications_the_broker_never_carried_arrive_through_the_repair() {
    let p = prefix("repair");
    let (dir, nodes) = nodes(2, &p, &[("HERALD_REPAIR_INTERVAL", "500ms")]).await;
    let other_prefix = prefix("elsewhere");
    let elsewhere = TestServer::start_in(
        dir.path(),
        &[("HERALD_REDIS_URL", &redis_url()), ("HERALD_REDIS_PREFIX", &other_prefix), ("HERALD_NODE_ID", "lost")],
    )
    .await;
    let mut on_a = nodes[0].connect("erin").await;
    let mut on_b = nodes[1].connect("erin").await;
    for i in 1..=5 {
        elsewhere.publish("erin", "t", json!({"i": i})).await;
    }
    nodes[0].publish("erin", "t", json!({"i": 6})).await;
    for session in [&mut on_a, &mut on_b] {
        let got: Vec<i64> = notifications(session, 6).await.iter().map(|n| n.seq).collect();
        assert_eq!(got, (1..=6).collect::<Vec<_>>());
    }
    // Without any later live message: the repair alone.
    elsewhere.publish("erin", "t", json!({"i": 7})).await;
    for session in [&mut on_a, &mut on_b] {
        assert_eq!(next_notification(session).await.seq, 7);
    }
    assert!(nodes[1].metric("herald_repair_heads_total").await >= 1.0);
    elsewhere.stop().await;
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn an_unreachable_redis_fails_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path(), &[("HERALD_REDIS_URL", "redis://127.0.0.1:1")]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = herald_server::run(settings, listener, Default::default()).await.unwrap_err();
    assert!(err.to_string().starts_with("HERALD_REDIS_URL"), "{err}");
}

#[tokio::test]
async fn sessions_that_stay_connected_get_everything_across_a_redis_restart() {
    let mut redis = PrivateRedis::start();
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for i in 0..2 {
        let id = format!("node-{i}");
        let vars =
            [("HERALD_REDIS_URL", url.as_str()), ("HERALD_NODE_ID", id.as_str()), ("HERALD_REPAIR_INTERVAL", "1s")];
        nodes.push(TestServer::start_in(dir.path(), &vars).await);
    }
    let mut on_b = nodes[1].connect("frank").await;
    let mut total = 0;
    for _ in 0..5 {
        total += 1;
        nodes[0].publish("frank", "t", json!({"n": total})).await;
    }
    redis.stop();
    // Stored while Redis is gone: 201 all the same.
    for _ in 0..5 {
        total += 1;
        nodes[0].publish("frank", "t", json!({"n": total})).await;
    }
    redis.start_again();
    for _ in 0..5 {
        total += 1;
        nodes[0].publish("frank", "t", json!({"n": total})).await;
    }
    let got: Vec<i64> = notifications(&mut on_b, total as usize).await.iter().map(|n| n.seq).collect();
    assert_eq!(got, (1..=total).collect::<Vec<_>>());
    // And live delivery through Redis works again, not only the repair.
    eventually("the subscriber is back", || async { nodes[1].metric("herald_broker_resyncs_total").await >= 1.0 })
        .await;
    let received = nodes[1].metric("herald_broker_received_total").await;
    nodes[0].publish("frank", "t", json!({"n": total + 1})).await;
    assert_eq!(next_notification(&mut on_b).await.seq, total + 1);
    assert!(nodes[1].metric("herald_broker_received_total").await > received);
    for node in nodes {
        node.stop().await;
    }
    redis.stop();
}
