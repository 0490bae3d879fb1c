//! Reading client frames: every malformed or unknown frame becomes a typed
//! refusal carrying the frame's `ref`, so the session can answer and live on.

use herald_protocol::{ClientFrame, ReadMark, Ref, Seq};
use serde_json::Value;

/// Most seqs one read mark may list.
pub const MAX_READ_SEQS: usize = 1000;

#[derive(Debug, PartialEq)]
pub struct BadFrame {
    pub reference: Option<Ref>,
    pub code: &'static str,
    pub message: String,
}

fn bad(reference: Option<Ref>, code: &'static str, message: impl Into<String>) -> BadFrame {
    BadFrame { reference, code, message: message.into() }
}

/// Parses one text frame.
pub fn parse(text: &str) -> Result<ClientFrame, BadFrame> {
    let value: Value = serde_json::from_str(text).map_err(|e| bad(None, "bad_frame", format!("not JSON: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(bad(None, "bad_frame", "a frame is a JSON object"));
    };
    let reference = map.get("ref").cloned();
    let Some(kind) = map.get("type").and_then(Value::as_str) else {
        return Err(bad(reference, "bad_frame", "a frame needs a string `type`"));
    };
    if !ClientFrame::TYPES.contains(&kind) {
        return Err(bad(reference, "unknown_type", format!("unknown frame type `{kind}`")));
    }
    let frame: ClientFrame =
        serde_json::from_value(value).map_err(|e| bad(reference.clone(), "bad_frame", e.to_string()))?;
    if let ClientFrame::Read { seqs, up_to_seq, topic, .. } = &frame {
        read_mark(seqs.clone(), *up_to_seq, topic.clone()).map_err(|m| bad(reference, "bad_frame", m))?;
    }
    Ok(frame)
}

/// A read mark from its optional fields: `seqs`, or `up_to_seq`, or a
/// `topic` (with `up_to_seq` or without), with positive seqs. Shared by the
/// `read` frame and `POST /v1/me/notifications/read`.
pub fn read_mark(seqs: Option<Vec<Seq>>, up_to_seq: Option<Seq>, topic: Option<String>) -> Result<ReadMark, String> {
    if let Some(topic) = topic {
        crate::api::publish::check_topic(&topic)?;
        return match (seqs, up_to_seq) {
            (Some(_), _) => Err("`seqs` does not go with `topic`".into()),
            (None, Some(n)) if n < 1 => Err("`up_to_seq` is at least 1".into()),
            (None, up_to_seq) => Ok(ReadMark::Topic { topic, up_to_seq }),
        };
    }
    match (seqs, up_to_seq) {
        (Some(seqs), None) => {
            if seqs.is_empty() || seqs.len() > MAX_READ_SEQS {
                return Err(format!("`seqs` takes 1 to {MAX_READ_SEQS} seqs"));
            }
            if seqs.iter().any(|s| *s < 1) {
                return Err("every seq is at least 1".into());
            }
            Ok(ReadMark::Seqs { seqs })
        }
        (None, Some(up_to_seq)) if up_to_seq >= 1 => Ok(ReadMark::UpTo { up_to_seq }),
        (None, Some(_)) => Err("`up_to_seq` is at least 1".into()),
        _ => Err("give exactly one of `seqs`, `up_to_seq` and `topic`".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refusals_carry_the_ref_and_the_spec_codes() {
        assert_eq!(parse("nope").unwrap_err().code, "bad_frame");
        assert_eq!(parse("[1]").unwrap_err().code, "bad_frame");
        let e = parse(r#"{"type":"dance","ref":7}"#).unwrap_err();
        assert_eq!((e.code, e.reference), ("unknown_type", Some(json!(7))));
        let e = parse(r#"{"type":"read","ref":"r","seqs":[]}"#).unwrap_err();
        assert_eq!((e.code, e.reference), ("bad_frame", Some(json!("r"))));
        let e = parse(r#"{"type":"refresh","ref":3}"#).unwrap_err();
        assert_eq!((e.code, e.reference), ("bad_frame", Some(json!(3))));
    }

    #[test]
    fn good_frames_parse() {
        assert_eq!(parse(r#"{"type":"ping"}"#).unwrap(), ClientFrame::Ping { reference: None });
        assert!(matches!(
            parse(r#"{"type":"read","up_to_seq":4,"ref":1}"#).unwrap(),
            ClientFrame::Read { up_to_seq: Some(4), .. }
        ));
        assert!(read_mark(Some(vec![1]), Some(2), None).is_err());
        assert!(read_mark(None, None, None).is_err());
        assert!(matches!(
            parse(r#"{"type":"read","topic":"orders","ref":1}"#).unwrap(),
            ClientFrame::Read { topic: Some(_), up_to_seq: None, seqs: None, .. }
        ));
        let topic = || Some("orders".to_string());
        assert_eq!(read_mark(None, None, topic()), Ok(ReadMark::Topic { topic: "orders".into(), up_to_seq: None }));
        assert_eq!(
            read_mark(None, Some(3), topic()),
            Ok(ReadMark::Topic { topic: "orders".into(), up_to_seq: Some(3) })
        );
        assert!(read_mark(Some(vec![1]), None, topic()).is_err());
        assert!(read_mark(None, Some(0), topic()).is_err());
        assert!(read_mark(None, None, Some(String::new())).is_err());
        assert!(read_mark(None, None, Some("x".repeat(129))).is_err());
        assert!(read_mark(None, None, Some("a\u{7}b".into())).is_err());
        assert_eq!(parse(r#"{"type":"read","topic":"","ref":5}"#).unwrap_err().reference, Some(json!(5)));
    }
}
