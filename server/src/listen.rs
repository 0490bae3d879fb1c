//! Serving HTTP on accepted connections — plain or TLS ([`crate::tls`]) —
//! with the limits a public port needs, which `axum::serve` does not set:
//!
//! - a request's headers must arrive within `HERALD_HEADER_TIMEOUT`, or the
//!   connection is closed (slowloris; it also bounds a WebSocket handshake);
//!   so must a new connection's first bytes ([`FirstBytesDeadline`]);
//! - a request head above twice `HERALD_MAX_HEADER_BYTES`, or with more than
//!   hyper's 100 header fields, is refused by hyper with a bare 431 (raising
//!   the field limit would put two heap buffers of that many slots into
//!   every request's parse); up to that, [`header_size`] refuses above
//!   `HERALD_MAX_HEADER_BYTES` with the spec's error body;
//! - every request carries the TCP peer as `ConnectInfo<SocketAddr>` (the
//!   limits' client IP, see [`crate::limit`]).
//!
//! The listening socket ([`bind`]) has a backlog of [`BACKLOG`], not the
//! 128 that `TcpListener::bind` asks for: in a reconnect storm thousands of
//! clients connect at once, and a SYN that finds the accept queue full is
//! dropped and retried by the client only after a second.
//!
//! On `stop_accepting` the loop stops accepting, asks every connection to
//! finish its request in flight and close, and waits for them. Upgraded
//! WebSockets are not connections any more: shutdown drains them itself.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::ListenerExt;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::api::error::ApiError;

/// Connections the kernel completes and queues before `accept` takes them;
/// Linux caps it at `net.core.somaxconn` (4096 by default since 5.4).
pub const BACKLOG: u32 = 4096;

/// Listens on `addr` (`SO_REUSEADDR`, as `TcpListener::bind` sets it) with a
/// backlog of [`BACKLOG`].
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The plain listener's connections with `TCP_NODELAY` set, as the TLS
/// listener sets it on its own: a flushed frame goes out at once instead of
/// waiting (Nagle's algorithm) until the peer acknowledges what went before.
pub fn no_delay(listener: TcpListener) -> impl axum::serve::Listener<Io = TcpStream, Addr = SocketAddr> {
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::trace!(error = %e, "TCP_NODELAY not set");
        }
    })
}

/// What each connection is served with.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Serves `app` on `listener` until `stop_accepting` completes, then lets the
/// connections finish what they are doing.
pub async fn serve<L>(mut listener: L, app: Router, limits: ConnectionLimits, stop_accepting: impl Future<Output = ()>)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let connections = TaskTracker::new();
    let finish = CancellationToken::new();
    let mut stop_accepting = pin!(stop_accepting);
    loop {
        let (io, peer) = tokio::select! {
            _ = &mut stop_accepting => break,
            accepted = listener.accept() => accepted,
        };
        let app = app.clone();
        let finish = finish.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                app.clone().oneshot(request.map(Body::new))
            });
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes * 2);
            builder.http2().timer(TokioTimer::new()).max_header_list_size((limits.max_header_bytes * 2) as u32);
            let io = TokioIo::new(FirstBytesDeadline::new(io, limits.header_timeout));
            let mut connection = pin!(builder.serve_connection_with_upgrades(io, service));
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::trace!(error = %e, "connection ended with an error");
                    }
                }
                _ = finish.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    finish.cancel();
    connections.close();
    connections.wait().await;
}

/// A connection whose first bytes must arrive within a deadline. hyper's
/// header timeout starts only once a request has begun, and the HTTP/1-or-2
/// detection in front of it waits for the first bytes without a limit, so a
/// client that connects and says nothing would hold its socket (and a file
/// descriptor) forever. Once any byte has arrived the deadline is gone and
/// reads and writes pass straight through.
struct FirstBytesDeadline<Io> {
    io: Io,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<Io> FirstBytesDeadline<Io> {
    fn new(io: Io, within: Duration) -> Self {
        FirstBytesDeadline { io, deadline: Some(Box::pin(tokio::time::sleep(within))) }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for FirstBytesDeadline<Io> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else { return read };
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.deadline = None,
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the header timeout",
                )));
            }
            _ => {}
        }
        read
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for FirstBytesDeadline<Io> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Refuses a request whose head is larger than `max_header_bytes` with 431
/// and the spec's body.
pub async fn header_size(State(max): State<usize>, request: Request, next: Next) -> Result<Response, ApiError> {
    let head: usize = request.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + request.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>();
    if head > max {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request line and headers exceed {max} bytes"),
        ));
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_without_delay() {
        use axum::serve::Listener;
        let mut listener = no_delay(bind("127.0.0.1:0".parse().unwrap()).unwrap());
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, peer) = listener.accept().await;
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(accepted.nodelay().unwrap());
    }

    /// With `TcpListener::bind`'s 128, the connects beyond 129 would hang:
    /// the kernel drops a SYN while the accept queue is full.
    #[tokio::test]
    async fn a_burst_of_connects_waits_in_the_backlog_while_nothing_accepts() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let burst = somaxconn.min(1000);
        assert!(burst > 128, "net.core.somaxconn is {somaxconn}; this test needs more than 128");
        let connects =
            (0..burst).map(|_| tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)));
        let results = futures_util::future::join_all(connects).await;
        let queued = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        assert_eq!(queued, burst, "connections completed while nothing accepted");
        drop(listener);
    }
}
