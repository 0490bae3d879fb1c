//! Why a session ended, and the close code that tells the client what to do.

use herald_protocol::close;

/// The reason a session loop returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client sent a close frame.
    ClientClosed,
    /// The connection dropped without a close frame, or failed.
    ClientGone,
    /// The node is shutting down: reconnect, with `since`, to any node.
    Shutdown,
    /// The outbox overflowed or a write stalled: the client could not keep up.
    Lagged,
    /// No frame from the peer for three heartbeats.
    HeartbeatTimeout,
    /// The token expired without a refresh.
    TokenExpired,
    /// A refresh carried an invalid token or another `sub`.
    RefreshRefused,
    /// Too many malformed or unknown frames.
    PolicyViolation,
    /// A client frame above the size limit.
    TooLarge,
    /// The client broke the WebSocket protocol itself.
    ProtocolError,
    /// A text frame that is not UTF-8.
    InvalidUtf8,
    /// The client sent frames faster than `HERALD_LIMIT_FRAMES_PER_SESSION`.
    RateLimited,
    /// The store could not be reached (PostgreSQL down): try again later.
    StoreUnavailable,
    /// The store failed while the session needed it.
    Internal,
    /// A backend disconnected the user's sessions.
    Disconnected,
    /// A backend revoked the user's tokens, this session's among them.
    TokenRevoked,
}

impl SessionEnd {
    /// The close code and reason to send; `None` when there is nobody to tell.
    pub fn close_frame(self) -> Option<(u16, &'static str)> {
        Some(match self {
            SessionEnd::ClientClosed | SessionEnd::ClientGone => return None,
            SessionEnd::Shutdown => (close::GOING_AWAY, "node shutting down; reconnect with since"),
            SessionEnd::Lagged => (close::TRY_AGAIN_LATER, "session could not keep up; reconnect with since"),
            SessionEnd::HeartbeatTimeout => (close::TRY_AGAIN_LATER, "heartbeat timeout"),
            SessionEnd::TokenExpired => (close::TOKEN_EXPIRED, "token expired"),
            SessionEnd::RefreshRefused => (close::TOKEN_EXPIRED, "refresh refused"),
            SessionEnd::PolicyViolation => (close::POLICY_VIOLATION, "too many bad frames"),
            SessionEnd::TooLarge => (close::TOO_LARGE, "frame too large"),
            SessionEnd::ProtocolError => (close::PROTOCOL_ERROR, "WebSocket protocol error"),
            SessionEnd::InvalidUtf8 => (close::INVALID_DATA, "text frame is not UTF-8"),
            SessionEnd::RateLimited => (close::RATE_LIMITED, "too many frames; slow down"),
            SessionEnd::StoreUnavailable => (close::TRY_AGAIN_LATER, "store unavailable; reconnect with since"),
            SessionEnd::Internal => (close::INTERNAL_ERROR, "internal error; reconnect with since"),
            SessionEnd::Disconnected => (close::FORBIDDEN, "disconnected by the server"),
            SessionEnd::TokenRevoked => (close::TOKEN_EXPIRED, "token revoked"),
        })
    }

    /// The code recorded in metrics (1000 for a client's close, 1006 for a drop).
    pub fn metric_code(self) -> u16 {
        match self {
            SessionEnd::ClientClosed => close::NORMAL,
            SessionEnd::ClientGone => 1006,
            other => other.close_frame().map_or(1006, |(code, _)| code),
        }
    }
}
