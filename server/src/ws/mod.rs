//! `GET /v1/ws` (spec §2): everything that can refuse a connection runs in
//! [`handshake`] before the upgrade; only a verified [`session::SessionContext`]
//! enters [`session`], one `select!` loop per connection, which ends with a
//! [`close::SessionEnd`] that picks the close code.

pub mod close;
pub mod handshake;
pub mod protocol;
pub mod session;
pub mod stream;
