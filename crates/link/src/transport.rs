//! What carries a link: any ordered, reliable byte stream, split into a
//! read half and a write half. The session above never knows which one it
//! got (raw TCP, a proxy chain, WebSocket, TLS); a transport only carries
//! bytes and never decides who is trusted.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The read half of a transport.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a transport.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// An ordered byte stream a session can run over.
///
/// The session reads from one task and writes from another, so the halves
/// must be usable independently. Reads and writes need not be cancel safe:
/// the session never drops a pending read or write and then retries it.
pub trait Transport: Send + 'static {
    /// Splits the stream for the session's reader and writer tasks.
    fn into_halves(self) -> (ReadHalf, WriteHalf);

    /// A second handle on the TCP socket under the transport, if there is
    /// one, for the writer to bound the bytes the kernel holds unsent
    /// (`TCP_NOTSENT_LOWAT`). The default: none.
    fn tcp_socket(&self) -> Option<socket2::Socket> {
        None
    }
}

impl Transport for TcpStream {
    fn into_halves(self) -> (ReadHalf, WriteHalf) {
        // Records are whole messages: never hold one back for coalescing.
        let _ = self.set_nodelay(true);
        let (read, write) = self.into_split();
        (Box::new(read), Box::new(write))
    }

    fn tcp_socket(&self) -> Option<socket2::Socket> {
        socket2::SockRef::from(self).try_clone().ok()
    }
}

/// Any single `AsyncRead + AsyncWrite` stream (a TLS or WebSocket adapter,
/// an in-memory duplex in tests), split with `tokio::io::split`.
pub struct Stream<S>(pub S);

impl<S> Transport for Stream<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    fn into_halves(self) -> (ReadHalf, WriteHalf) {
        let (read, write) = tokio::io::split(self.0);
        (Box::new(read), Box::new(write))
    }
}

/// Two halves that are already separate.
pub struct Halves(pub ReadHalf, pub WriteHalf);

impl Transport for Halves {
    fn into_halves(self) -> (ReadHalf, WriteHalf) {
        (self.0, self.1)
    }
}
