//! Publishing and delivery (spec §3 publishing, §2 sessions, §5 guarantees)
//! against a real node.

mod common;

use common::*;
use herald_client::ServerFrame;
use serde_json::json;

#[tokio::test]
async fn a_publish_reaches_the_users_session_with_seq_1_2_3() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    assert_eq!(alice.welcome().user_id, "alice");
    assert_eq!(alice.welcome().last_seq, 0);
    assert_eq!(alice.welcome().node_id, "test-node");
    for i in 1..=3 {
        let published = server.publish("alice", "orders", json!({"order": i})).await;
        assert_eq!(published.seq, i);
    }
    let got = notifications(&mut alice, 3).await;
    assert_eq!(got.iter().map(|n| n.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(got[2].payload, json!({"order": 3}));
    assert_eq!(got[0].topic, "orders");
    assert!(!got[0].read);
    assert!(got[0].created_at.ends_with('Z') && got[0].created_at.len() == 24, "{}", got[0].created_at);
    server.stop().await;
}
