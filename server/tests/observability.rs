//! Observability with real processes: two `herald` nodes (PostgreSQL + Redis)
//! export traces over OTLP/HTTP to a receiver this test runs — a real OTLP
//! endpoint decoding the protobuf the nodes send — and one trace covers a
//! publish with a `traceparent` on node 0 through to the delivery on node 1.
//! Also: JSON logs, one object per line, with the request id on the lines a
//! request causes, echoed (or generated) in `x-request-id`.

mod common;
mod services;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::routing::post;
use common::{eventually, next, next_notification, TestServer, API_KEY, WAIT};
use herald_client::{ClientFrame, ServerFrame};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::{json, Value};
use services::Cluster;

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    node: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// An OTLP/HTTP trace receiver on 127.0.0.1: what the nodes export, decoded.
async fn receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let store = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let store = store.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("the nodes send OTLP protobuf");
                let mut out = store.lock().unwrap();
                for resource_spans in request.resource_spans {
                    let node = resource_spans
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.instance.id")
                        .map(|kv| text(&kv.value))
                        .unwrap_or_default();
                    for scope in resource_spans.scope_spans {
                        for span in scope.spans {
                            out.push(Span {
                                node: node.clone(),
                                name: span.name,
                                trace_id: hex(&span.trace_id),
                                span_id: hex(&span.span_id),
                                parent_span_id: hex(&span.parent_span_id),
                                attributes: span
                                    .attributes
                                    .iter()
                                    .map(|kv| (kv.key.clone(), text(&kv.value)))
                                    .collect(),
                            });
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse { partial_success: None }.encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, spans)
}

#[tokio::test]
async fn one_trace_covers_a_publish_on_one_node_and_the_delivery_on_another() {
    let (endpoint, spans) = receiver().await;
    let cluster = Cluster::build()
        .nodes(2)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start();
    let mut session = cluster.node(1).connect("alice", None).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = reqwest::Client::new()
        .post(format!("{}/v1/notifications", cluster.node(0).http()))
        .bearer_auth(API_KEY)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({"user_id": "alice", "topic": "t", "payload": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(next_notification(&mut session).await.seq, 1);

    let of_trace =
        || -> Vec<Span> { spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect() };
    // Each node exports on its own schedule: wait for all four spans, not
    // just the last one to happen (node 0's may come in a later batch).
    let wanted = ["POST /v1/notifications", "store.append", "broker.publish", "broker.deliver"];
    let exported = tokio::time::timeout(WAIT, async {
        while !wanted.iter().all(|name| of_trace().iter().any(|s| s.name == *name)) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(exported.is_ok(), "not every span of the trace arrived; got {:#?}", spans.lock().unwrap());
    let trace = of_trace();
    let find = |name: &str| {
        trace.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no {name} span in {trace:#?}")).clone()
    };
    let request = find("POST /v1/notifications");
    let append = find("store.append");
    let publish = find("broker.publish");
    let deliver = find("broker.deliver");
    assert_eq!(request.node, "node-0");
    assert_eq!(request.parent_span_id, caller_span, "the caller's traceparent is the request's parent");
    assert_eq!(request.attributes["http.route"], "/v1/notifications");
    assert_eq!(request.attributes["http.response.status_code"], "201");
    assert!(!request.attributes["request_id"].is_empty());
    assert_eq!((append.node.as_str(), append.parent_span_id.as_str()), ("node-0", request.span_id.as_str()));
    assert_eq!((publish.node.as_str(), publish.parent_span_id.as_str()), ("node-0", request.span_id.as_str()));
    assert_eq!(deliver.node, "node-1");
    assert_eq!(deliver.parent_span_id, publish.span_id, "node 1 continues the trace carried by Redis");
    assert_eq!(deliver.attributes["sessions"], "1");

    // Without a traceparent a publish starts a trace of its own.
    cluster.node(0).publisher().publish_one("alice", "t", json!(2)).await.unwrap();
    eventually("an untraced publish gets its own trace", || async {
        spans.lock().unwrap().iter().any(|s| s.name == "POST /v1/notifications" && s.trace_id != trace_id)
    })
    .await;
}

#[tokio::test]
async fn json_logs_carry_the_request_id_which_the_response_echoes() {
    let mut cluster = Cluster::build()
        .nodes(1)
        .env("HERALD_LOG_FORMAT", "json")
        .env("HERALD_LOG", "info,herald_server=debug")
        .start();
    let http = reqwest::Client::new();
    let node = cluster.node(0).http();
    // Refused (no API key): the refusal is logged inside the request.
    let refused = http
        .post(format!("{node}/v1/notifications"))
        .header("x-request-id", "req-observability-1")
        .json(&json!({"user_id": "alice", "topic": "t", "payload": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["x-request-id"], "req-observability-1");
    // No id, or an unusable one: a new one is made and echoed.
    let generated = http.get(format!("{node}/healthz")).header("x-request-id", "has spaces").send().await.unwrap();
    let id = generated.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    // A session's lines carry its handshake's request id.
    let session = cluster.node(0).connect("alice", None).await;
    session.close().await.unwrap();

    eventually("the refusal and the session are logged", || async {
        let log = cluster.node(0).log();
        log.contains("request refused") && log.contains("session closed")
    })
    .await;
    cluster.node(0).sigterm();
    let code = tokio::time::timeout(WAIT * 3, cluster.node_mut(0).wait_exit()).await.expect("exits");
    assert_eq!(code, 0);
    let log = cluster.node(0).log();
    let mut lines = 0;
    let mut refusal = None;
    let mut session_lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        lines += 1;
        assert!(value["timestamp"].is_string() && value["level"].is_string(), "{line}");
        let ids: Vec<&str> =
            value["spans"].as_array().into_iter().flatten().filter_map(|s| s["request_id"].as_str()).collect();
        if value["message"] == "request refused" {
            assert_eq!(ids, vec!["req-observability-1"], "{line}");
            refusal = Some(value.clone());
        }
        if value["span"]["name"] == "ws_session" {
            assert_eq!(ids.len(), 1, "{line}");
            session_lines += 1;
        }
        assert!(!line.contains(API_KEY) && !line.contains("Bearer"), "a secret in the log: {line}");
    }
    assert!(lines > 5, "{log}");
    assert_eq!(refusal.expect("the refusal line")["code"], "missing_api_key");
    assert!(session_lines >= 2, "the session's open/close lines name its request: {log}");
}

#[tokio::test]
async fn metrics_count_frames_store_calls_pool_and_requests_by_route() {
    let server = TestServer::start().await;
    for i in 1..=3 {
        server.publish("alice", "t", json!(i)).await;
    }
    let mut alice = server.connect_since("alice", 0).await;
    for seq in 1..=3 {
        assert_eq!(next_notification(&mut alice).await.seq, seq);
    }
    alice.send(&ClientFrame::Ping { reference: Some(json!(1)) }).await.unwrap();
    assert!(matches!(next(&mut alice).await, ServerFrame::Pong { .. }));
    alice.send_text("not json").await.unwrap();
    assert!(matches!(next(&mut alice).await, ServerFrame::Error { .. }));
    let unread = reqwest::Client::new()
        .get(format!("{}/v1/me/unread", server.http()))
        .bearer_auth(server.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(unread.status(), 200);

    assert_eq!(server.metric("herald_frames_received_total{kind=\"ping\"}").await, 1.0);
    assert_eq!(server.metric("herald_frames_received_total{kind=\"bad\"}").await, 1.0);
    // welcome + 3 replayed + pong + error
    assert!(server.metric("herald_frames_sent_total").await >= 6.0);
    // The session started with one store request: its head and the replay.
    assert_eq!(server.metric("herald_store_seconds_count{op=\"resume\"}").await, 1.0);
    assert_eq!(server.metric("herald_store_seconds_count{op=\"unread\"}").await, 1.0);
    assert!(server.metric("herald_db_pool_connections{state=\"idle\"}").await >= 1.0);
    assert_eq!(server.metric("herald_http_requests_total{route=\"/v1/notifications\",status=\"201\"}").await, 3.0);
    assert_eq!(server.metric("herald_http_requests_total{route=\"/v1/me/unread\",status=\"200\"}").await, 1.0);
    // Three publishes one after another: three group commits of one each.
    assert_eq!(server.metric("herald_store_group_commit_size_count").await, 3.0);
    assert_eq!(server.metric("herald_store_group_commit_size_sum").await, 3.0);
    assert_eq!(server.metric("herald_store_group_commit_seconds_count").await, 3.0);
    assert_eq!(server.metric("herald_store_group_commits_failed_total").await, 0.0);
    server.stop().await;
}
