//! A byte stream held to bandwidth caps, for paths that do not go through
//! the relay (the HTTP proxy's requests to its upstreams, driven by hyper):
//! reads wait until every cap lets bytes go one way, writes the other way.
//! Back-pressure only: a read or write is delayed, never refused, and
//! nothing is buffered here.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::limits::{Caps, Way};
use crate::stream::{ByteStream, Stream};

/// `inner`, read as `reads` and written as the other way, within `caps`.
pub struct Capped {
    inner: Stream,
    caps: Caps,
    reads: Way,
    read_wait: Option<Pin<Box<tokio::time::Sleep>>>,
    write_wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Capped {
    /// Wraps `inner` (no wrapping when `caps` is empty).
    pub fn wrap(inner: Stream, caps: Caps, reads: Way) -> Stream {
        if caps.is_empty() {
            return inner;
        }
        Stream::Boxed(Box::new(Capped {
            inner,
            caps,
            reads,
            read_wait: None,
            write_wait: None,
        }))
    }
}

fn other(way: Way) -> Way {
    match way {
        Way::Up => Way::Down,
        Way::Down => Way::Up,
    }
}

/// How many of `want` bytes may go `way` now; `Pending` with `timer` armed
/// when none.
fn poll_allowance(
    caps: &Caps,
    way: Way,
    want: usize,
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<usize> {
    loop {
        if let Some(sleep) = timer {
            ready!(sleep.as_mut().poll(cx));
            *timer = None;
        }
        match caps.allowance(way, Instant::now(), want) {
            Ok(n) => return Poll::Ready(n),
            Err(at) => {
                *timer = Some(Box::pin(tokio::time::sleep_until(
                    tokio::time::Instant::from_std(at),
                )))
            }
        }
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let want = buf.remaining();
        let allowed = ready!(poll_allowance(
            &this.caps,
            this.reads,
            want,
            &mut this.read_wait,
            cx
        ));
        if allowed >= want {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let n = buf.filled().len() - before;
            this.caps.consume(this.reads, Instant::now(), n);
            return Poll::Ready(Ok(()));
        }
        // Fewer bytes allowed than asked for: read just those (a copy only
        // while the cap holds the stream back, when it is slow anyway).
        let mut small = vec![0u8; allowed];
        let mut limited = ReadBuf::new(&mut small);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
        let n = limited.filled().len();
        buf.put_slice(limited.filled());
        this.caps.consume(this.reads, Instant::now(), n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let way = other(this.reads);
        let allowed = ready!(poll_allowance(
            &this.caps,
            way,
            data.len(),
            &mut this.write_wait,
            cx
        ));
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &data[..allowed.min(data.len())]))?;
        this.caps.consume(way, Instant::now(), n);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl ByteStream for Capped {
    fn abort_on_drop(&mut self) {
        self.inner.abort_on_drop();
    }
}
