//! [`Stream`]: the one byte-stream type that connectors return and services
//! relay, so that TCP and (later) link streams are interchangeable.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Anything that carries bytes both ways and can be half-closed.
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin + IntoBoxed + 'static {
    /// Makes dropping the stream tell the other end that the connection
    /// failed (a TCP reset), instead of ending it cleanly. The default does
    /// nothing: a link stream dropped before it finished is reset anyway.
    fn abort_on_drop(&mut self) {}

    /// The link stream this is, if it is one: the relay then hands whole
    /// buffers to it and takes them from it instead of copying.
    fn as_link(&mut self) -> Option<&mut link::session::LinkStream> {
        None
    }

    /// Splits a stream that carries a link into the session's halves its
    /// own way (a WebSocket hands whole batches to its messages); `Err`
    /// gives the stream back for the generic split.
    #[allow(clippy::type_complexity)]
    fn into_link_halves(
        self: Box<Self>,
    ) -> Result<(link::transport::ReadHalf, link::transport::WriteHalf), Box<dyn ByteStream>> {
        Err(self.into_boxed())
    }
}

/// Boxes a stream as a [`ByteStream`] trait object (what lets a default
/// method of the trait give its boxed self back).
pub trait IntoBoxed {
    /// `self` as a trait object.
    fn into_boxed(self: Box<Self>) -> Box<dyn ByteStream>;
}

impl<T: ByteStream> IntoBoxed for T {
    fn into_boxed(self: Box<Self>) -> Box<dyn ByteStream> {
        self
    }
}

impl ByteStream for link::session::LinkStream {
    fn as_link(&mut self) -> Option<&mut link::session::LinkStream> {
        Some(self)
    }
}
impl ByteStream for tokio::io::DuplexStream {}

/// A connected byte stream. TCP is kept as its own variant so that the relay
/// can later take kernel fast paths (e.g. splice) when both ends are sockets.
///
/// `poll_shutdown` half-closes: on TCP it sends FIN and reading goes on.
pub enum Stream {
    /// A plain TCP connection.
    Tcp(TcpStream),
    /// Any other transport (link streams, proxied streams with leftover bytes).
    Boxed(Box<dyn ByteStream>),
}

impl Stream {
    /// Makes dropping this stream reset the connection (SO_LINGER 0 on
    /// TCP), so that a failure on the other side of a relay reaches this
    /// side as an error, never as a clean end of data.
    pub fn abort_on_drop(&mut self) {
        match self {
            Stream::Tcp(tcp) => {
                let _ = socket2::SockRef::from(&*tcp).set_linger(Some(std::time::Duration::ZERO));
            }
            Stream::Boxed(inner) => inner.abort_on_drop(),
        }
    }
}

impl Stream {
    /// The link stream under this stream, if it is one (see
    /// [`ByteStream::as_link`]).
    pub fn as_link(&mut self) -> Option<&mut link::session::LinkStream> {
        match self {
            Stream::Tcp(_) => None,
            Stream::Boxed(inner) => inner.as_link(),
        }
    }
}

impl From<TcpStream> for Stream {
    fn from(tcp: TcpStream) -> Self {
        Stream::Tcp(tcp)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Boxed(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Boxed(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Boxed(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Boxed(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Boxed(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Boxed(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
