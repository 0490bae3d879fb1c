//! `redis+sentinel://`: nodes find the Redis master through Sentinel and
//! follow it through a failover. Real `herald` processes against a Redis
//! master, a replica and three Sentinels of the test's own; the periodic
//! repair (which reads the store) is pushed out of the way, so what reaches
//! another node live came through Redis.

mod common;
mod services;

use std::time::Duration;

use common::*;
use serde_json::json;
use services::*;

/// Longest wait for notifications that should arrive; only a failure limit.
const DEADLINE: Duration = Duration::from_secs(20);

/// `nodes` nodes on `redis` (`extra` settings on top).
fn sentinel_cluster(redis: &RedisSentinel, nodes: usize, extra: &[(&str, &str)]) -> Cluster {
    let mut build = Cluster::build()
        .nodes(nodes)
        .redis(redis.url())
        .env("HERALD_REPAIR_INTERVAL", "1h")
        .env("HERALD_PRESENCE_TTL", "3s");
    for (key, value) in extra {
        build = build.env(key, value);
    }
    build.start()
}

/// Publishes `seqs` to `user` through `node`, asserting each seq.
async fn publish(node: &Node, user: &str, seqs: std::ops::RangeInclusive<i64>) {
    let publisher = node.publisher();
    for seq in seqs {
        let published = publish_within(&publisher, user, json!({ "seq": seq })).await.expect("a publish");
        assert_eq!(published.seq, seq);
    }
}

/// `user` on `to` receives live what `from` publishes: seqs `first..=last`.
async fn heard(cluster: &Cluster, from: usize, to: usize, user: &str, first: i64, last: i64) {
    let reader = Reader::spawn(cluster.node(to).connect(user, Some(first - 1)).await, None);
    publish(cluster.node(from), user, first..=last).await;
    let received = reader.until(last, DEADLINE).await;
    assert_eq!(
        received.seqs,
        (first..=last).collect::<Vec<_>>(),
        "{user} on node-{to}, published on node-{from}\n{}",
        cluster.logs()
    );
}

/// Sentinel moves the master while the old one keeps running (a manual
/// failover, as for maintenance). Sentinel then demotes the old master and
/// closes its clients; a client that reconnected to the address it had
/// would land on a replica, where its publishes reach only that replica's
/// subscribers. The nodes ask Sentinel again, so a node started after the
/// failover hears, and is heard by, the ones started before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_follow_a_failover_to_the_master_sentinel_names() {
    follow_a_failover(RedisSentinel::start(), &[]).await;
}

/// The same over TLS (`rediss+sentinel://`): to the Sentinels and to each
/// master they name, trusting the CA in `HERALD_REDIS_TLS_CA`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_follow_a_failover_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = common::tls::TestCerts::create(dir.path());
    let ca = certs.ca_file(dir.path(), "ca.pem");
    let redis = RedisSentinel::start_tls(&certs.cert, &certs.key, &ca);
    assert!(redis.url().starts_with("rediss+sentinel://"));
    follow_a_failover(redis, &[("HERALD_REDIS_TLS_CA", ca.to_str().unwrap())]).await;
}

async fn follow_a_failover(redis: RedisSentinel, extra: &[(&str, &str)]) {
    let before = redis.master_port();
    let mut cluster = sentinel_cluster(&redis, 2, extra);
    heard(&cluster, 0, 1, "alice", 1, 3).await;

    let redis = std::sync::Arc::new(redis);
    let after = tokio::task::spawn_blocking({
        let redis = redis.clone();
        move || redis.fail_over()
    })
    .await
    .unwrap();
    assert_ne!(before, after);
    let late = cluster.add_node();

    heard(&cluster, 0, late, "bob", 1, 3).await;
    heard(&cluster, late, 1, "alice", 4, 6).await;
    heard(&cluster, 1, 0, "carol", 1, 3).await;

    // Every node's presence is on the new master, written there since the
    // failover (the old master's copy was replicated before it).
    all_on(&cluster, &redis, after, 3).await;
}

/// Waits until `nodes` nodes write their presence to the master at `port`
/// (deleted first, so only writes made since count): each node's publishing
/// connection has found that master.
async fn all_on(cluster: &Cluster, redis: &RedisSentinel, port: u16, nodes: usize) {
    let nodes_key = format!("{}:nodes", cluster.prefix);
    redis.cli(port, &["del", &nodes_key]);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while redis.cli(port, &["zcard", &nodes_key]).trim() != nodes.to_string() {
        assert!(tokio::time::Instant::now() < deadline, "the nodes' presence is not on the master at {port}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The master dies: Sentinel promotes the replica on its own, and the nodes
/// reach it; what was published while there was no master reaches the
/// sessions when their node is back on Redis (its repair on reconnecting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_the_replica_sentinel_promotes_when_the_master_dies() {
    let redis = RedisSentinel::start();
    let cluster = sentinel_cluster(&redis, 2, &[]);
    heard(&cluster, 0, 1, "alice", 1, 2).await;

    let reader = Reader::spawn(cluster.node(1).connect("dave", None).await, None);
    let mut redis = redis;
    let promoted = tokio::task::spawn_blocking(move || {
        let promoted = redis.kill_master();
        (redis, promoted)
    });
    // Stored while the master is gone (or going): node-0 cannot tell node-1.
    publish(cluster.node(0), "dave", 1..=3).await;
    let (redis, promoted) = promoted.await.unwrap();
    let received = reader.until(3, DEADLINE).await;
    assert_eq!(received.seqs, vec![1, 2, 3], "dave on node-1\n{}", cluster.logs());

    // Live again once both nodes publish to the promoted master (a publish
    // made while a node's connection still looks for it is lost to the other
    // node, and the repair interval here is an hour).
    all_on(&cluster, &redis, promoted, 2).await;
    heard(&cluster, 0, 1, "alice", 3, 5).await;
    heard(&cluster, 1, 0, "erin", 1, 2).await;
}

/// The master and the Sentinels each require a password of their own: the
/// master's in the URL, the Sentinels' in `HERALD_REDIS_SENTINEL_PASSWORD`.
/// Without the Sentinels' (or with a wrong one) a node does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_authenticate_to_the_sentinels_and_the_master_apart() {
    let passwords = SentinelPasswords { master: "master-secret", sentinel: "sentinel-secret", sentinel_user: None };
    let redis = RedisSentinel::start_with_passwords(passwords);
    assert!(redis.url().contains(":master-secret@"));
    let cluster = sentinel_cluster(&redis, 2, &[("HERALD_REDIS_SENTINEL_PASSWORD", "sentinel-secret")]);
    heard(&cluster, 0, 1, "alice", 1, 3).await;

    let refused = |sentinel_password: Option<&'static str>| {
        let mut env = cluster.env().to_vec();
        env.retain(|(k, _)| k != "HERALD_REDIS_SENTINEL_PASSWORD");
        if let Some(p) = sentinel_password {
            env.push(("HERALD_REDIS_SENTINEL_PASSWORD".into(), p.into()));
        }
        env.push(("HERALD_NODE_ID".into(), "refused".into()));
        Node::spawn("refused", &env)
    };
    for password in [None, Some("wrong")] {
        let mut node = refused(password);
        let code = node.wait_exit().await;
        assert_ne!(code, 0, "started without the Sentinels' password ({password:?})");
        let log = node.log();
        assert!(log.contains("HERALD_REDIS_URL") && log.contains("Authentication"), "{log}");
    }
}

/// Sentinels whose `default` user is off: a node names their ACL user in
/// `HERALD_REDIS_SENTINEL_USERNAME`. With the password alone (which
/// authenticates as `default`) it does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_authenticate_to_the_sentinels_as_an_acl_user() {
    let passwords = SentinelPasswords {
        master: "master-secret",
        sentinel: "sentinel-secret",
        sentinel_user: Some("herald-sentinel"),
    };
    let redis = RedisSentinel::start_with_passwords(passwords);
    let acl =
        [("HERALD_REDIS_SENTINEL_USERNAME", "herald-sentinel"), ("HERALD_REDIS_SENTINEL_PASSWORD", "sentinel-secret")];
    let cluster = sentinel_cluster(&redis, 2, &acl);
    heard(&cluster, 0, 1, "alice", 1, 3).await;

    let mut env = cluster.env().to_vec();
    env.retain(|(k, _)| k != "HERALD_REDIS_SENTINEL_USERNAME");
    env.push(("HERALD_NODE_ID".into(), "refused".into()));
    let mut node = Node::spawn("refused", &env);
    assert_ne!(node.wait_exit().await, 0, "started as the Sentinels' default user");
    let log = node.log();
    assert!(log.contains("HERALD_REDIS_URL") && log.contains("Authentication"), "{log}");
}

#[test]
fn sentinel_urls_and_settings_are_checked_before_anything_starts() {
    use herald_server::broker::redis::RedisTarget;
    let target = RedisTarget::parse("redis+sentinel://u:p%40ss@10.0.0.1,10.0.0.2:5000/main/2").unwrap();
    assert_eq!(
        target,
        RedisTarget::Sentinel {
            sentinels: vec!["redis://10.0.0.1:26379".into(), "redis://10.0.0.2:5000".into()],
            name: "main".into(),
            master: "redis://u:p%40ss@10.0.0.1:26379/2".into(),
        }
    );
    assert!(target.is_sentinel() && !target.is_tls());
    assert!(RedisTarget::parse("rediss+sentinel://[::1]:26380/m").unwrap().is_tls());
    for bad in [
        "redis+sentinel://h:1",
        "redis+sentinel://h:1/",
        "redis+sentinel:///m",
        "redis+sentinel://h/m/0/x",
        "redis+sentinel://h/m/x",
        "rediss+sentinel://h/m#insecure",
        "redis+sentinel://h/m?timeout=1",
    ] {
        assert!(RedisTarget::parse(bad).is_err(), "{bad}");
    }

    let load = |vars: &[(&str, &str)]| {
        let mut env: std::collections::HashMap<&str, &str> = [("HERALD_API_KEYS", API_KEY)].into_iter().collect();
        env.extend(vars.iter().copied());
        herald_server::config::Settings::load(&env, None).map(|s| s.redis_sentinel_password).map_err(|e| e.to_string())
    };
    let url = ("HERALD_REDIS_URL", "redis+sentinel://127.0.0.1:26379/main");
    assert_eq!(load(&[url, ("HERALD_REDIS_SENTINEL_PASSWORD", "s3cret")]), Ok(Some("s3cret".into())));
    let plain = load(&[("HERALD_REDIS_URL", "redis://127.0.0.1:6379"), ("HERALD_REDIS_SENTINEL_PASSWORD", "s3cret")]);
    assert!(plain.unwrap_err().starts_with("HERALD_REDIS_SENTINEL_PASSWORD"));
    let user = ("HERALD_REDIS_SENTINEL_USERNAME", "herald");
    let alone = load(&[url, user]).unwrap_err();
    assert!(alone.starts_with("HERALD_REDIS_SENTINEL_USERNAME") && alone.contains("PASSWORD"), "{alone}");
    assert!(load(&[url, user, ("HERALD_REDIS_SENTINEL_PASSWORD", "s3cret")]).is_ok());
    let plain = load(&[("HERALD_REDIS_URL", "redis://127.0.0.1:6379"), user]);
    assert!(plain.unwrap_err().starts_with("HERALD_REDIS_SENTINEL_USERNAME"));
    let no_name = load(&[("HERALD_REDIS_URL", "redis+sentinel://127.0.0.1:26379")]).unwrap_err();
    assert!(no_name.starts_with("HERALD_REDIS_URL") && no_name.contains("master's name"), "{no_name}");
}
