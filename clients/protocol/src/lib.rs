//! Herald v1 wire types — the one place the server and its clients share.
//!
//! Every WebSocket frame is one JSON object in a text frame with a `type`
//! (`shared/spec/herald-v1.md` §2). [`ServerFrame`] is what a server sends,
//! [`ClientFrame`] what a client sends. The server encodes hot frames
//! (notifications) through [`encode_notification`] so that a payload it holds
//! as raw JSON is written out without being parsed again.
//!
//! The HTTP bodies of the publish and inbox APIs live in [`http`].

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

pub mod http;

/// A per-user sequence number: 1, 2, 3, … with no gaps.
pub type Seq = i64;

/// The `ref` a client attaches to a frame; echoed back verbatim in `ok` / `error`.
pub type Ref = Value;

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Always the first frame of a session.
    Welcome(Welcome),
    Notification(Notification),
    /// Read state changed, by this or another device of the user.
    Read(ReadMark),
    /// The session's token expires at `expires_at` (unix seconds); send `refresh`.
    TokenExpiring {
        expires_at: i64,
    },
    Pong {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    Ok {
        #[serde(rename = "ref")]
        reference: Ref,
    },
    Error {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
        code: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub session_id: String,
    pub user_id: String,
    pub node_id: String,
    /// The user's newest committed seq at connect time.
    pub last_seq: Seq,
    pub heartbeat_secs: u64,
    pub token_expires_at: i64,
    /// Set when `since` lies below the retained history: seqs
    /// `since+1 .. oldest_seq-1` are gone and will not come.
    #[serde(default, skip_serializing_if = "is_false")]
    pub truncated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_seq: Option<Seq>,
    /// The store's epoch: which history the seqs belong to. A client keeps
    /// it with its cursor and sends it back with `since` (`epoch=`); it
    /// changes only when the store is restored from a backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// With `since`: the seq the replay starts after. Below the client's
    /// `since` when that ran past `last_seq` or belongs to an earlier epoch
    /// (seqs after this one were lost in a restore and handed out again):
    /// the client moves its cursor back to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Seq>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A stored notification as clients see it, in frames and in the inbox API.
/// `P` is the payload's representation: clients use [`Value`]; the server
/// sends the stored JSON text as it was published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification<P = Value> {
    pub seq: Seq,
    pub id: String,
    pub topic: String,
    pub payload: P,
    /// RFC 3339, UTC, millisecond precision.
    pub created_at: String,
    pub read: bool,
}

/// Which notifications a read mark covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReadMark {
    /// Every unread notification of one topic (with `seq <= up_to_seq`, when
    /// given). Only ever sent by clients: the user's sessions hear of it as
    /// the [`Seqs`](ReadMark::Seqs) it marked.
    Topic {
        topic: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        up_to_seq: Option<Seq>,
    },
    Seqs {
        seqs: Vec<Seq>,
    },
    UpTo {
        up_to_seq: Seq,
    },
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    Ping {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    Refresh {
        token: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
    Read {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seqs: Option<Vec<Seq>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        up_to_seq: Option<Seq>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<Ref>,
    },
}

impl ClientFrame {
    /// The frame `type` names a client may send.
    pub const TYPES: [&'static str; 3] = ["ping", "refresh", "read"];
}

/// Encodes a `notification` frame whose payload is already JSON text.
///
/// Written out field by field rather than through a derived `Serialize`:
/// every replayed notification is encoded on its way out, and serde_json
/// escapes each of the seven keys as well as the values. The text is the
/// same, byte for byte (a test checks it against serde_json).
pub fn encode_notification(
    seq: Seq,
    id: &str,
    topic: &str,
    payload: &RawValue,
    created_at: &str,
    read: bool,
) -> String {
    // Sized once: the field names and punctuation take under 100 bytes.
    let mut out = String::with_capacity(100 + id.len() + topic.len() + payload.get().len() + created_at.len());
    out.push_str(r#"{"type":"notification","seq":"#);
    out.push_str(itoa::Buffer::new().format(seq));
    out.push_str(r#","id":"#);
    push_json_string(&mut out, id);
    out.push_str(r#","topic":"#);
    push_json_string(&mut out, topic);
    out.push_str(r#","payload":"#);
    out.push_str(payload.get());
    out.push_str(r#","created_at":"#);
    push_json_string(&mut out, created_at);
    out.push_str(if read { r#","read":true}"# } else { r#","read":false}"# });
    out
}

/// Appends `text` as a JSON string, escaped as serde_json escapes it: as
/// it is, between quotes, when nothing in it needs escaping (a quote, a
/// backslash or a control character), which is the usual case.
fn push_json_string(out: &mut String, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(text).expect("a string always serializes"));
    }
}

/// Close codes (spec §2, "Liveness and close codes").
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The node is going away (shutdown): reconnect, with `since`, to any node.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol (RFC 6455 §7.4.1): an
    /// unmasked frame, a reserved opcode or bit, a bad control frame.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not UTF-8 (RFC 6455 §8.1).
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_LARGE: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    /// Try again later: reconnect with `since`; nothing is lost.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Token expired, or refresh refused.
    pub const TOKEN_EXPIRED: u16 = 4001;
    pub const FORBIDDEN: u16 = 4003;
    pub const RATE_LIMITED: u16 = 4029;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_notification_parses_as_the_typed_frame() {
        let payload = RawValue::from_string(r#"{"order":42}"#.into()).unwrap();
        let text = encode_notification(7, "id-1", "orders", &payload, "2026-11-22T10:00:00.123Z", false);
        let frame: ServerFrame = serde_json::from_str(&text).unwrap();
        let ServerFrame::Notification(n) = frame else { panic!("{text}") };
        assert_eq!(n.seq, 7);
        assert_eq!(n.payload, serde_json::json!({"order": 42}));
    }

    #[test]
    fn encoded_notification_is_what_serde_json_writes() {
        #[derive(Serialize)]
        struct Derived<'a> {
            r#type: &'static str,
            seq: Seq,
            id: &'a str,
            topic: &'a str,
            payload: &'a RawValue,
            created_at: &'a str,
            read: bool,
        }
        let strings = [
            "",
            "id-1",
            "orders",
            "a\"quote",
            "back\\slash",
            "tab\there",
            "nul\u{0}",
            "\u{1f}",
            "\u{7f}",
            "é✓🚀",
            "</script>",
        ];
        let payload = RawValue::from_string(r#"{"order":42,"s":"\u00e9"}"#.into()).unwrap();
        for (i, id) in strings.iter().enumerate() {
            for topic in strings {
                let seq = [0, 1, 42, i64::MAX, -1][i % 5];
                let read = i % 2 == 0;
                let created_at = strings[(i + 3) % strings.len()];
                let derived = Derived { r#type: "notification", seq, id, topic, payload: &payload, created_at, read };
                assert_eq!(
                    encode_notification(seq, id, topic, &payload, created_at, read),
                    serde_json::to_string(&derived).unwrap(),
                    "id {id:?} topic {topic:?}"
                );
            }
        }
    }

    #[test]
    fn read_frames_take_either_form() {
        let a: ServerFrame = serde_json::from_str(r#"{"type":"read","seqs":[1,2]}"#).unwrap();
        assert_eq!(a, ServerFrame::Read(ReadMark::Seqs { seqs: vec![1, 2] }));
        let b: ServerFrame = serde_json::from_str(r#"{"type":"read","up_to_seq":9}"#).unwrap();
        assert_eq!(b, ServerFrame::Read(ReadMark::UpTo { up_to_seq: 9 }));
        let out = serde_json::to_string(&ServerFrame::Read(ReadMark::UpTo { up_to_seq: 9 })).unwrap();
        assert_eq!(out, r#"{"type":"read","up_to_seq":9}"#);
    }

    #[test]
    fn topic_marks_are_told_apart_from_the_others() {
        let all: ReadMark = serde_json::from_str(r#"{"topic":"orders"}"#).unwrap();
        assert_eq!(all, ReadMark::Topic { topic: "orders".into(), up_to_seq: None });
        let some: ReadMark = serde_json::from_str(r#"{"topic":"orders","up_to_seq":4}"#).unwrap();
        assert_eq!(some, ReadMark::Topic { topic: "orders".into(), up_to_seq: Some(4) });
        assert_eq!(serde_json::to_string(&all).unwrap(), r#"{"topic":"orders"}"#);
        let up_to: ReadMark = serde_json::from_str(r#"{"up_to_seq":4}"#).unwrap();
        assert_eq!(up_to, ReadMark::UpTo { up_to_seq: 4 });
    }

    #[test]
    fn client_frames_round_trip_with_ref() {
        let f = ClientFrame::Ping { reference: Some(Value::from(7)) };
        let s = serde_json::to_string(&f).unwrap();
        assert_eq!(s, r#"{"type":"ping","ref":7}"#);
        assert_eq!(serde_json::from_str::<ClientFrame>(&s).unwrap(), f);
    }
}
