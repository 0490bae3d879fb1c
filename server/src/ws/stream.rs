//! The session's socket under tungstenite: reads pass straight through;
//! writes gather in a buffer that goes out on `flush` and is **freed** after
//! it.
//!
//! Why: tungstenite keeps its own write buffer at the largest size it ever
//! held. A client that reconnects with `since` gets a replay page of up to
//! [`REPLAY_PAGE`](super::session) frames in one flush, so after a reconnect
//! storm every session kept ≈10 KiB it would never use again (RSS of a
//! 19,800-session node 165 → 400 MiB). With tungstenite told to write every
//! frame through at once (`write_buffer_size` 0), its own buffer holds one
//! frame at most, and this one holds a flush's worth only while it is going
//! out.
//!
//! Guarantees: bytes go out in the order written; `poll_flush` returns ready
//! only when everything written before it is in the socket; at most
//! [`MAX_BUFFER`] bytes (plus one write) wait here; past it a write waits
//! for the socket (backpressure, so a stalled client still stalls its
//! session's writes, which end it).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Written bytes held before a write waits to push them into the socket.
pub const MAX_BUFFER: usize = 32 * 1024;

pub struct FlushBuffered<S> {
    inner: S,
    out: Vec<u8>,
    /// How much of `out` is already in the socket.
    sent: usize,
}

impl<S> FlushBuffered<S> {
    pub fn new(inner: S) -> Self {
        FlushBuffered { inner, out: Vec::new(), sent: 0 }
    }

    /// Bytes held (capacity), for tests.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.out.capacity()
    }
}

impl<S: AsyncWrite + Unpin> FlushBuffered<S> {
    /// Pushes everything held into the socket, then lets the buffer go.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FlushBuffered<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FlushBuffered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.out.len() >= MAX_BUFFER {
            ready!(self.poll_drain(cx))?;
        }
        self.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_wait_for_flush_and_the_buffer_is_freed_after_it() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut s = FlushBuffered::new(near);
        s.write_all(b"hello ").await.unwrap();
        s.write_all(b"world").await.unwrap();
        let mut got = [0u8; 11];
        // Nothing reached the peer before the flush.
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), far.read(&mut got)).await.is_err());
        assert!(s.held() > 0);
        s.flush().await.unwrap();
        assert_eq!(s.held(), 0, "the buffer is let go after a flush");
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
    }

    #[tokio::test]
    async fn a_full_buffer_makes_writes_wait_for_the_socket() {
        // The peer's pipe holds 1 KiB and nobody reads it.
        let (near, mut far) = tokio::io::duplex(1024);
        let mut s = FlushBuffered::new(near);
        let chunk = vec![7u8; 4096];
        let mut accepted = 0;
        while accepted < 4 * MAX_BUFFER {
            match tokio::time::timeout(std::time::Duration::from_millis(50), s.write(&chunk)).await {
                Ok(n) => accepted += n.unwrap(),
                Err(_) => break,
            }
        }
        assert!(accepted <= MAX_BUFFER + chunk.len() + 1024, "accepted {accepted} bytes with nobody reading");
        // Once the peer reads, everything arrives in order.
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            far.read_to_end(&mut all).await.unwrap();
            all
        });
        s.flush().await.unwrap();
        s.shutdown().await.unwrap();
        let all = reader.await.unwrap();
        assert_eq!(all.len(), accepted);
        assert!(all.iter().all(|b| *b == 7));
    }
}
