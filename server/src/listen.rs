//! Serving HTTP on accepted connections — plain or TLS ([`crate::tls`]) —
//! with the limits a public port needs, which `axum::serve` does not set:
//!
//! - a request's headers must arrive within `HERALD_HEADER_TIMEOUT`, or the
//!   connection is closed (slowloris; it also bounds a WebSocket handshake);
//!   so must a new connection's first bytes ([`Socket`]); and a connection
//!   with no request in flight for as long is closed, HTTP/2 included
//!   ([`Requests`]);
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
//! Every connection holds one of the node's [`Slots`]
//! (`HERALD_MAX_CONNECTIONS`, see [`crate::capacity`]) from its accept until
//! its socket closes, through a WebSocket upgrade for the session's life.
//! With every slot taken the loop waits: new connections queue in the
//! kernel's listen queue instead of taking the descriptors the node keeps
//! for its store and broker.
//!
//! On `stop_accepting` the loop stops accepting, asks every connection to
//! finish its request in flight and close, and waits for them. Upgraded
//! WebSockets are not connections any more: shutdown drains them itself.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::api::error::ApiError;
use crate::telemetry::{LogSampler, Metrics};

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

/// How often, at most, a wait for a slot is logged.
const FULL_LOG_EVERY: Duration = Duration::from_secs(60);

/// The node's connection slots (`HERALD_MAX_CONNECTIONS`): one per accepted
/// connection, held by its socket ([`Slot`]). A cheap handle.
#[derive(Clone)]
pub struct Slots {
    semaphore: Arc<Semaphore>,
    max: Option<usize>,
    waits: Counter,
    /// The "every slot is taken" line, at most once per [`FULL_LOG_EVERY`].
    full_log: LogSampler,
}

/// A connection's place under `HERALD_MAX_CONNECTIONS`, given back when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Slots {
    /// `max` connections at once; `None`: as many as the process can open.
    pub fn new(max: Option<usize>, metrics: &Metrics) -> Slots {
        Slots {
            semaphore: Arc::new(Semaphore::new(max.unwrap_or(Semaphore::MAX_PERMITS))),
            max,
            waits: metrics.accept_waits.clone(),
            full_log: LogSampler::new(FULL_LOG_EVERY),
        }
    }

    /// Connections holding a slot now.
    pub fn open(&self) -> usize {
        self.max.unwrap_or(Semaphore::MAX_PERMITS) - self.semaphore.available_permits()
    }

    /// A free slot, waiting for one when every slot is taken.
    pub async fn take(&self) -> Slot {
        if let Ok(permit) = self.semaphore.clone().try_acquire_owned() {
            return Slot { _permit: permit };
        }
        self.waits.inc();
        if let Some(unlogged) = self.full_log.sample("connections", std::time::Instant::now()) {
            tracing::warn!(
                max_connections = self.max,
                unlogged,
                "every connection slot is taken (HERALD_MAX_CONNECTIONS): new connections wait in the listen queue \
                 until one closes"
            );
        }
        Slot { _permit: self.semaphore.clone().acquire_owned().await.expect("the semaphore is never closed") }
    }
}

/// Where [`serve`] takes its connections from: a plain [`Accept`], or
/// [`crate::tls::TlsListener`] with its handshakes done.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection, its peer and its slot.
    fn accept(&mut self) -> impl Future<Output = (Self::Io, SocketAddr, Slot)> + Send;
}

/// Accepts from the listening socket, each connection with a slot and
/// `TCP_NODELAY` set: a flushed frame goes out at once instead of waiting
/// (Nagle's algorithm) until the peer acknowledges what went before.
pub struct Accept {
    listener: TcpListener,
    slots: Slots,
}

impl Accept {
    pub fn new(listener: TcpListener, slots: Slots) -> Accept {
        Accept { listener, slots }
    }

    /// The next connection. The slot is taken before `accept`, so the loop
    /// waits with the socket still in the kernel's queue.
    pub async fn next(&mut self) -> (TcpStream, SocketAddr, Slot) {
        let slot = self.slots.take().await;
        loop {
            match self.listener.accept().await {
                Ok((tcp, peer)) => {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::trace!(error = %e, "TCP_NODELAY not set");
                    }
                    return (tcp, peer, slot);
                }
                // The peer gave up while it waited in the queue.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => {
                    // Out of file descriptors (something besides the clients
                    // took them) and the like: back off.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Listener for Accept {
    type Io = TcpStream;

    fn accept(&mut self) -> impl Future<Output = (TcpStream, SocketAddr, Slot)> + Send {
        self.next()
    }
}

/// What each connection is served with.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Serves `app` on `listener` until `stop_accepting` completes, then lets the
/// connections finish what they are doing.
pub async fn serve(
    mut listener: impl Listener,
    app: Router,
    limits: ConnectionLimits,
    stop_accepting: impl Future<Output = ()>,
) {
    let connections = TaskTracker::new();
    let finish = CancellationToken::new();
    let mut stop_accepting = pin!(stop_accepting);
    loop {
        let (io, peer, slot) = tokio::select! {
            _ = &mut stop_accepting => break,
            accepted = listener.accept() => accepted,
        };
        let app = app.clone();
        let finish = finish.clone();
        connections.spawn(async move {
            let requests = Arc::new(Requests::new());
            let in_flight = requests.clone();
            let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                let open = in_flight.begin();
                let response = app.clone().oneshot(request.map(Body::new));
                async move {
                    let response = response.await;
                    drop(open);
                    response
                }
            });
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes * 2);
            builder.http2().timer(TokioTimer::new()).max_header_list_size((limits.max_header_bytes * 2) as u32);
            let io = TokioIo::new(Socket::new(io, slot, limits.header_timeout));
            let mut connection = pin!(builder.serve_connection_with_upgrades(io, service));
            let idle_check = tokio::time::sleep(limits.header_timeout);
            let mut idle_check = pin!(idle_check);
            let draining = loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(e) = result {
                            tracing::trace!(error = %e, "connection ended with an error");
                        }
                        return;
                    }
                    _ = finish.cancelled() => break true,
                    _ = &mut idle_check => {
                        let idle = requests.idle_for();
                        if idle >= limits.header_timeout {
                            break false;
                        }
                        idle_check.as_mut().reset(tokio::time::Instant::now() + limits.header_timeout - idle);
                    }
                }
            };
            // Let the requests in flight finish (publishes included, when
            // draining), then close; an idle connection has none, and a peer
            // that does not take the goodbye is not waited for.
            connection.as_mut().graceful_shutdown();
            if draining {
                let _ = connection.await;
            } else {
                let _ = tokio::time::timeout(limits.header_timeout, connection).await;
            }
        });
    }
    finish.cancel();
    connections.close();
    connections.wait().await;
}

/// A connection's requests in flight, and since when it has had none. An
/// HTTP/1 connection waiting for its next request is closed by hyper's
/// header timeout; an HTTP/2 one would be held open for ever (by any client
/// that sends the preface and nothing more, each holding a [`Slot`]), so
/// [`serve`] closes a connection that has had no request in flight for
/// `HERALD_HEADER_TIMEOUT`, as nginx's `keepalive_timeout` does.
struct Requests {
    opened: std::time::Instant,
    in_flight: AtomicUsize,
    /// When the last request ended, in ms since `opened`.
    idle_since_ms: AtomicU64,
}

/// A request in flight on its connection ([`Requests`]).
struct InFlight(Arc<Requests>);

impl Requests {
    fn new() -> Requests {
        Requests { opened: std::time::Instant::now(), in_flight: AtomicUsize::new(0), idle_since_ms: AtomicU64::new(0) }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// How long the connection has had no request in flight (zero while it has one).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
        self.opened.elapsed().saturating_sub(since)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.opened.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(now, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A client's connection as the server holds it: with its [`Slot`], given
/// back when the socket closes (an upgraded connection's socket lives on in
/// its WebSocket session), and with a deadline for its first bytes. hyper's
/// header timeout starts only once a request has begun, and the HTTP/1-or-2
/// detection in front of it waits for the first bytes without a limit, so a
/// client that connects and says nothing would hold its socket (and a file
/// descriptor) forever. Once any byte has arrived the deadline is gone and
/// reads and writes pass straight through.
struct Socket<Io> {
    io: Io,
    deadline: Option<Pin<Box<Sleep>>>,
    _slot: Slot,
}

impl<Io> Socket<Io> {
    fn new(io: Io, slot: Slot, within: Duration) -> Self {
        Socket { io, deadline: Some(Box::pin(tokio::time::sleep(within))), _slot: slot }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Socket<Io> {
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

impl<Io: AsyncWrite + Unpin> AsyncWrite for Socket<Io> {
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
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accept = Accept::new(listener, Slots::new(None, &Metrics::new()));
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, peer, _slot) = accept.next().await;
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(accepted.nodelay().unwrap());
    }

    /// A connection holds its slot until it is dropped; with none free the
    /// next connection stays in the kernel's queue, unaccepted, and is
    /// accepted once a slot is given back.
    #[tokio::test]
    async fn a_connection_beyond_the_slots_waits_in_the_queue_until_one_closes() {
        let metrics = Metrics::new();
        let slots = Slots::new(Some(2), &metrics);
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accept = Accept::new(listener, slots.clone());
        let clients: Vec<_> = futures_util::future::join_all((0..3).map(|_| TcpStream::connect(addr))).await;
        assert!(clients.iter().all(Result::is_ok), "the kernel completes all three: {clients:?}");
        let first = accept.next().await;
        let _second = accept.next().await;
        assert_eq!(slots.open(), 2);
        assert!(tokio::time::timeout(Duration::from_millis(300), accept.next()).await.is_err(), "a third was accepted");
        assert_eq!(metrics.accept_waits.get(), 1);
        drop(first);
        let (_, peer, _third) = tokio::time::timeout(Duration::from_secs(5), accept.next()).await.expect("accepted");
        let ports: Vec<u16> = clients.iter().map(|c| c.as_ref().unwrap().local_addr().unwrap().port()).collect();
        assert!(ports.contains(&peer.port()));
        assert_eq!(slots.open(), 2);
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
