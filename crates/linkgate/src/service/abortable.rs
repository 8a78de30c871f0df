//! A client connection that resets, rather than ends cleanly, once it is
//! marked failed. The HTTP proxy hands its client connection to hyper; when
//! an upstream body breaks off, hyper ends the response however the framing
//! allows, and for a body delimited by the connection's end (an HTTP/1.0
//! client) a clean close would pass the cut-off body for a whole one.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stream::Stream;

/// A stream with a shared "failed" mark. Marked, it refuses to shut down
/// (no FIN) and resets the connection when dropped.
pub struct Abortable {
    /// Present until [`Abortable::into_stream`] takes it back.
    inner: Option<Stream>,
    failed: Arc<AtomicBool>,
}

impl Abortable {
    /// Wraps `stream`; setting `failed` later makes it reset.
    pub fn new(stream: Stream, failed: Arc<AtomicBool>) -> Self {
        Abortable {
            inner: Some(stream),
            failed,
        }
    }

    /// Takes the stream back (for a CONNECT tunnel, which relays it
    /// directly and resets it itself on failure).
    pub fn into_stream(mut self) -> Stream {
        self.inner.take().expect("the stream is taken back once")
    }

    fn stream(&mut self) -> &mut Stream {
        self.inner
            .as_mut()
            .expect("the stream is present until taken back")
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

impl AsyncRead for Abortable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Abortable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().stream()).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the response failed: the connection is reset, not closed",
            )));
        }
        Pin::new(this.stream()).poll_shutdown(cx)
    }
}

impl Drop for Abortable {
    fn drop(&mut self) {
        if self.failed() {
            if let Some(stream) = self.inner.as_mut() {
                stream.abort_on_drop();
            }
        }
    }
}
