//! Property tests of the two parsers a client reaches: WebSocket client
//! frames and publish bodies. Whatever arrives, they answer — a frame or a
//! refusal — and never panic; what they accept is well-formed. The same
//! entry points are the cargo-fuzz targets in `server/fuzz/`.

use herald_protocol::ClientFrame;
use herald_server::api::publish::{check_user_id, parse_body};
use herald_server::config::Settings;
use herald_server::ws::protocol::{parse, MAX_READ_SEQS};
use proptest::prelude::*;
use serde_json::{json, Value};

fn settings() -> Settings {
    let env: std::collections::HashMap<String, String> = [
        ("HERALD_JWT_SECRET", "test-secret-0123456789abcdef"),
        ("HERALD_API_KEYS", "k"),
        ("HERALD_MAX_USER_IDS", "50"),
        ("HERALD_MAX_AUDIENCE", "200"),
        ("HERALD_MAX_PAYLOAD_BYTES", "4096"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Settings::load(&env, None).unwrap()
}

/// Any JSON value, a few levels deep, biased towards the shapes that matter.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        prop_oneof![Just("read"), Just("ping"), Just("refresh"), Just("alice"), Just("")].prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 40, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_string()),
                    Just("ref".to_string()),
                    Just("seqs".to_string()),
                    Just("up_to_seq".to_string()),
                    Just("token".to_string()),
                    Just("user_id".to_string()),
                    Just("user_ids".to_string()),
                    Just("topic".to_string()),
                    Just("payload".to_string()),
                    Just("idempotency_key".to_string()),
                    Just("digest".to_string()),
                    Just("key".to_string()),
                    Just("window_secs".to_string()),
                    "[a-z_]{1,10}",
                ],
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Client frames close to valid ones: the right type, odd values.
fn near_frame() -> impl Strategy<Value = Value> {
    let topic = prop_oneof![json_value(), "[a-z\\x00-\\x1f]{0,130}".prop_map(Value::String)];
    (prop_oneof![Just("read"), Just("ping"), Just("refresh")], json_value(), json_value(), topic, json_value())
        .prop_map(|(kind, a, b, topic, reference)| {
            let mut frame = json!({"type": kind, "seqs": a, "up_to_seq": b, "ref": reference, "token": "t"});
            if !topic.is_null() {
                frame["topic"] = topic;
            }
            frame
        })
}

fn check_frame(text: &str) {
    match parse(text) {
        Ok(ClientFrame::Read { seqs, up_to_seq, topic: Some(topic), .. }) => {
            // A topic as publishing takes it, an optional bound, no seqs.
            let chars = topic.chars().count();
            assert!((1..=128).contains(&chars) && !topic.contains(char::is_control), "{text}");
            assert!(seqs.is_none() && up_to_seq.is_none_or(|n| n >= 1), "{text}");
        }
        Ok(ClientFrame::Read { seqs, up_to_seq, topic: None, .. }) => {
            // Exactly one of the two, within bounds.
            match (seqs, up_to_seq) {
                (Some(seqs), None) => {
                    assert!(!seqs.is_empty() && seqs.len() <= MAX_READ_SEQS && seqs.iter().all(|s| *s >= 1), "{text}")
                }
                (None, Some(up_to)) => assert!(up_to >= 1, "{text}"),
                other => panic!("accepted a read mark {other:?}: {text}"),
            }
        }
        Ok(ClientFrame::Ping { .. } | ClientFrame::Refresh { .. }) => {}
        Err(bad) => assert!(["bad_frame", "unknown_type"].contains(&bad.code), "{bad:?}"),
    }
}

fn check_publish(body: &[u8]) {
    let settings = settings();
    match parse_body(&settings, body) {
        Ok((request, users)) => {
            assert!(!users.is_empty() && users.len() <= settings.max_audience);
            let mut unique = users.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), users.len(), "duplicates kept");
            assert!(users.iter().all(|u| check_user_id(u).is_ok()));
            assert!(request.payload.get().len() <= settings.max_payload_bytes);
            assert!(!request.topic.is_empty());
        }
        Err(e) => {
            assert!([400, 413, 422].contains(&e.status.as_u16()), "{e:?}");
            assert!(!e.message.is_empty());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_a_frame_or_a_refusal(text in ".{0,200}") {
        check_frame(&text);
    }

    #[test]
    fn any_json_is_a_frame_or_a_refusal(value in json_value()) {
        check_frame(&value.to_string());
    }

    #[test]
    fn near_valid_frames_are_checked(value in near_frame()) {
        check_frame(&value.to_string());
    }

    #[test]
    fn any_bytes_are_a_publish_or_a_refusal(body in prop::collection::vec(any::<u8>(), 0..300)) {
        check_publish(&body);
    }

    #[test]
    fn any_json_is_a_publish_or_a_refusal(value in json_value()) {
        check_publish(value.to_string().as_bytes());
    }

    #[test]
    fn near_valid_publishes_are_checked(
        user in json_value(),
        users in prop::collection::vec(".{0,20}", 0..300),
        topic in ".{0,140}",
        payload in json_value(),
        key in json_value(),
        window in any::<i64>(),
    ) {
        check_publish(json!({"user_id": user, "topic": topic, "payload": payload}).to_string().as_bytes());
        check_publish(json!({"user_ids": users, "topic": topic, "payload": payload, "idempotency_key": key}).to_string().as_bytes());
        check_publish(
            json!({"user_ids": users, "topic": topic, "payload": payload, "digest": {"key": key, "window_secs": window}})
                .to_string()
                .as_bytes(),
        );
    }
}

#[test]
fn the_property_checks_accept_what_they_should() {
    // Guard against properties that pass because everything is refused.
    assert!(parse(r#"{"type":"read","seqs":[1,2]}"#).is_ok());
    assert!(parse(r#"{"type":"read","up_to_seq":3,"ref":1}"#).is_ok());
    assert!(parse(r#"{"type":"read","seqs":[1],"up_to_seq":3}"#).is_err());
    let settings = settings();
    let (_, users) =
        parse_body(&settings, br#"{"user_ids":["a","b","a"],"topic":"t","payload":{"x":1}}"#).expect("a valid publish");
    assert_eq!(users, vec!["a", "b"]);
    assert_eq!(parse_body(&settings, b"{").unwrap_err().status.as_u16(), 400);
}
