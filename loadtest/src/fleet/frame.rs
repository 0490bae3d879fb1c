//! The receive path's view of server frames.
//!
//! A worker reads up to a few hundred thousand frames a second while sharing
//! the cores with the server, so notification frames are read through a
//! borrowed projection of [`herald_protocol::Notification`] that keeps only
//! `seq` and the payload's send time, instead of building the full typed
//! frame. The welcome (once per session) uses the typed
//! [`herald_protocol::ServerFrame`].

use serde::Deserialize;
use serde_json::value::RawValue;

/// What the load generator needs from a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// A notification; `sent_ns` is the payload's `t` (unix ns), when present.
    Notification { seq: i64, sent_ns: Option<u64> },
    /// Anything else (`pong`, `read`, `token_expiring`, …).
    Other,
}

#[derive(Deserialize)]
struct View<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    seq: Option<i64>,
    #[serde(default, borrow)]
    payload: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    t: Option<u64>,
}

/// Reads a text frame; `None` if it is not JSON with a `type`.
pub fn parse(text: &str) -> Option<Seen> {
    let view: View = serde_json::from_str(text).ok()?;
    Some(match (view.kind, view.seq) {
        ("notification", Some(seq)) => {
            let sent_ns = view.payload.and_then(|p| serde_json::from_str::<Payload>(p.get()).ok()).and_then(|p| p.t);
            Seen::Notification { seq, sent_ns }
        }
        _ => Seen::Other,
    })
}

/// The payload a publish carries: its send time, and `pad` bytes of filler.
pub fn payload(sent_ns: u64, pad: usize) -> serde_json::Value {
    match pad {
        0 => serde_json::json!({ "t": sent_ns }),
        n => serde_json::json!({ "t": sent_ns, "pad": "x".repeat(n) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_server_encodes() {
        let payload = RawValue::from_string(payload(1_700_000_000_123_456_789, 3).to_string()).unwrap();
        let text = herald_protocol::encode_notification(42, "id", "t", &payload, "2026-01-01T00:00:00.000Z", false);
        assert_eq!(parse(&text), Some(Seen::Notification { seq: 42, sent_ns: Some(1_700_000_000_123_456_789) }));
        // A payload that is not ours (not an object, no `t`) still counts.
        let other = RawValue::from_string("[1,2]".into()).unwrap();
        let text = herald_protocol::encode_notification(7, "id", "t", &other, "2026-01-01T00:00:00.000Z", false);
        assert_eq!(parse(&text), Some(Seen::Notification { seq: 7, sent_ns: None }));
        assert_eq!(parse(r#"{"type":"pong"}"#), Some(Seen::Other));
        assert_eq!(parse("nope"), None);
    }
}
