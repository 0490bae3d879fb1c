//! One WebSocket session, low level: [`Connect`] opens it, [`Session`] reads
//! and writes frames. No reconnects — that is [`Client`](crate::Client)'s job.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_protocol::{ClientFrame, Seq, ServerFrame, Welcome};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::error::refusal;
use crate::{Error, TlsOptions};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How the token travels in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenVia {
    /// `Authorization: Bearer <jwt>` (the default for servers and tools).
    Header,
    /// `Sec-WebSocket-Protocol: herald.v1, herald.bearer.<jwt>` (what browsers do).
    Subprotocol,
    /// `?access_token=<jwt>`.
    Query,
}

/// Options of one WebSocket connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), herald_client::Error> {
/// use herald_client::{Connect, ServerFrame};
/// let mut session = Connect::new("wss://herald.example.com", "<user jwt>")
///     .since(41) // resume: first every notification after seq 41
///     .connect()
///     .await?;
/// println!("hello {}, newest seq {}", session.welcome().user_id, session.welcome().last_seq);
/// while let ServerFrame::Notification(n) = session.next_frame().await? {
///     println!("{} {}", n.seq, n.payload);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Connect {
    base: String,
    token: String,
    since: Option<Seq>,
    epoch: Option<String>,
    via: TokenVia,
    origin: Option<String>,
    user_agent: String,
    tls: TlsOptions,
    tls_config: Option<Arc<rustls::ClientConfig>>,
}

impl Connect {
    /// `base` is the server's `ws://host:port` or `wss://host:port`
    /// (`http://` and `https://` are taken to mean the same).
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> Connect {
        Connect {
            base: base.into(),
            token: token.into(),
            since: None,
            epoch: None,
            via: TokenVia::Header,
            origin: None,
            user_agent: DEFAULT_USER_AGENT.to_string(),
            tls: TlsOptions::default(),
            tls_config: None,
        }
    }

    /// Resume after `seq`: the server first sends every notification after it.
    pub fn since(mut self, seq: Seq) -> Connect {
        self.since = Some(seq);
        self
    }

    /// The store epoch `since` belongs to (the `epoch` of the welcome that
    /// began the history the client's cursor counts). If the store was
    /// restored from a backup since, the server resumes from where the two
    /// histories part and says so in the welcome's `since`; an epoch the
    /// server does not send yet is harmless to omit.
    pub fn epoch(mut self, epoch: impl Into<String>) -> Connect {
        self.epoch = Some(epoch.into());
        self
    }

    pub fn token_via(mut self, via: TokenVia) -> Connect {
        self.via = via;
        self
    }

    pub fn origin(mut self, origin: impl Into<String>) -> Connect {
        self.origin = Some(origin.into());
        self
    }

    /// The handshake's `User-Agent` (default `herald-client-rust/<version>`),
    /// which a backend sees in the user's session listing: name the app and
    /// device ("MyApp/3.2 (Android 14)"). Empty sends none.
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Connect {
        self.user_agent = user_agent.into();
        self
    }

    /// Which certificates `wss://` trusts (default: `webpki-roots`).
    pub fn tls(mut self, tls: TlsOptions) -> Connect {
        self.tls = tls;
        self.tls_config = None;
        self
    }

    /// Also trusts the certificates in `pem` for `wss://`.
    pub fn root_certificate(self, pem: impl Into<Vec<u8>>) -> Connect {
        let tls = self.tls.clone().root_certificate(pem);
        self.tls(tls)
    }

    /// A TLS configuration already built (the [`Client`](crate::Client) builds one for all its connections).
    pub(crate) fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Connect {
        self.tls_config = Some(config);
        self
    }

    /// Opens the session and reads its `welcome`.
    pub async fn connect(self) -> Result<Session, Error> {
        let url = self.url();
        let mut request = url.as_str().into_client_request()?;
        let headers = request.headers_mut();
        match self.via {
            TokenVia::Header => {
                headers.insert("authorization", header(&format!("Bearer {}", self.token))?);
            }
            TokenVia::Subprotocol => {
                headers.insert("sec-websocket-protocol", header(&format!("herald.v1, herald.bearer.{}", self.token))?);
            }
            TokenVia::Query => {}
        }
        if let Some(origin) = &self.origin {
            headers.insert("origin", header(origin)?);
        }
        if !self.user_agent.is_empty() {
            headers.insert("user-agent", header(&self.user_agent)?);
        }
        let connector = match (&self.tls_config, url.starts_with("wss:")) {
            (_, false) => None,
            (Some(config), true) => Some(Connector::Rustls(config.clone())),
            (None, true) => Some(Connector::Rustls(self.tls.client_config()?)),
        };
        let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
        let (ws, response) =
            match tokio_tungstenite::connect_async_tls_with_config(request, Some(config), false, connector).await {
                Ok(ok) => ok,
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    let status = response.status().as_u16();
                    let body = response.body().as_deref().unwrap_or_default();
                    return Err(refusal(status, response.headers(), body));
                }
                Err(e) => return Err(e.into()),
            };
        let protocol =
            response.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut session = Session { ws, welcome: None, protocol };
        match session.next_frame().await? {
            ServerFrame::Welcome(w) => session.welcome = Some(w),
            other => return Err(Error::Protocol(format!("expected welcome, got {other:?}"))),
        }
        Ok(session)
    }

    /// `<base>/v1/ws?since=..&access_token=..`, with http(s) read as ws(s).
    fn url(&self) -> String {
        let base = self.base.trim_end_matches('/');
        let base = match base.split_once("://") {
            Some(("http", rest)) => format!("ws://{rest}"),
            Some(("https", rest)) => format!("wss://{rest}"),
            _ => base.to_string(),
        };
        let mut params = Vec::new();
        if let Some(since) = self.since {
            params.push(format!("since={since}"));
        }
        if let Some(epoch) = &self.epoch {
            params.push(format!("epoch={}", crate::http::encode_segment(epoch)));
        }
        if self.via == TokenVia::Query {
            params.push(format!("access_token={}", self.token));
        }
        match params.is_empty() {
            true => format!("{base}/v1/ws"),
            false => format!("{base}/v1/ws?{}", params.join("&")),
        }
    }
}

fn header(value: &str) -> Result<HeaderValue, Error> {
    HeaderValue::from_str(value).map_err(|e| Error::Protocol(format!("bad header value: {e}")))
}

/// What [`Connect`] says it is unless told otherwise.
pub const DEFAULT_USER_AGENT: &str = concat!("herald-client-rust/", env!("CARGO_PKG_VERSION"));

/// An open WebSocket session.
pub struct Session {
    pub(crate) ws: Ws,
    welcome: Option<Welcome>,
    protocol: Option<String>,
}

impl Session {
    /// The `welcome` frame the session opened with.
    pub fn welcome(&self) -> &Welcome {
        self.welcome.as_ref().expect("connect reads the welcome")
    }

    /// The subprotocol the server chose, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// The next frame. WebSocket pings are answered on the way; a close frame
    /// becomes [`Error::Closed`] with its code.
    pub async fn next_frame(&mut self) -> Result<ServerFrame, Error> {
        loop {
            match self.ws.next().await {
                None => return Err(Error::Closed { code: 1006, reason: "connection dropped".into() }),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(&t).map_err(|e| Error::Protocol(format!("{e}: {}", t.as_str())));
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame.map_or((1005, String::new()), |f| (f.code.into(), f.reason.to_string()));
                    return Err(Error::Closed { code, reason });
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Like [`Session::next_frame`], giving up after `wait`.
    pub async fn next_frame_within(&mut self, wait: Duration) -> Result<Option<ServerFrame>, Error> {
        match tokio::time::timeout(wait, self.next_frame()).await {
            Ok(frame) => frame.map(Some),
            Err(_) => Ok(None),
        }
    }

    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), Error> {
        let text = serde_json::to_string(frame).map_err(|e| Error::Protocol(e.to_string()))?;
        self.send_text(text).await
    }

    /// Sends any text frame, well-formed or not.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<(), Error> {
        Ok(self.ws.send(Message::Text(text.into().into())).await?)
    }

    /// Sends raw WebSocket messages (binary, oversized, …).
    pub async fn send_message(&mut self, message: Message) -> Result<(), Error> {
        Ok(self.ws.send(message).await?)
    }

    /// Closes with 1000.
    pub async fn close(mut self) -> Result<(), Error> {
        self.ws.close(None).await?;
        while let Some(Ok(_)) = self.ws.next().await {}
        Ok(())
    }

    pub(crate) fn into_parts(self) -> (Ws, Welcome) {
        (self.ws, self.welcome.expect("connect reads the welcome"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_carry_since_and_map_http_schemes() {
        let c = Connect::new("https://h:1/", "t").since(4);
        assert_eq!(c.url(), "wss://h:1/v1/ws?since=4");
        assert_eq!(c.epoch("e 1").url(), "wss://h:1/v1/ws?since=4&epoch=e%201");
        let c = Connect::new("ws://h:1", "t").token_via(TokenVia::Query);
        assert_eq!(c.url(), "ws://h:1/v1/ws?access_token=t");
        assert_eq!(Connect::new("http://h", "t").url(), "ws://h/v1/ws");
    }
}
