//! Helpers shared by the HTTP clients ([`Publisher`](crate::Publisher), [`Inbox`](crate::Inbox)).

use reqwest::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::refusal;
use crate::Error;

/// A 2xx answer's status and JSON body, or the spec's error as [`Error::Refused`].
pub(crate) async fn answer<T: DeserializeOwned>(response: reqwest::Response) -> Result<(StatusCode, T), Error> {
    let (status, headers) = (response.status(), response.headers().clone());
    let body = response.bytes().await?;
    if !status.is_success() {
        return Err(refusal(status.as_u16(), &headers, &body));
    }
    let value = serde_json::from_slice(&body).map_err(|e| Error::Protocol(format!("bad response body: {e}")))?;
    Ok((status, value))
}

/// A 2xx answer without a body.
pub(crate) async fn no_content(response: reqwest::Response) -> Result<(), Error> {
    let (status, headers) = (response.status(), response.headers().clone());
    let body = response.bytes().await?;
    if !status.is_success() {
        return Err(refusal(status.as_u16(), &headers, &body));
    }
    Ok(())
}

/// Percent-encodes one path segment.
pub(crate) fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(crate) fn trim_base(base: String) -> String {
    base.trim_end_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(super::encode_segment("a b/é"), "a%20b%2F%C3%A9");
    }
}
