//! What carries a link: any ordered, reliable byte stream, split into a
//! read half and a write half. The session above never knows which one it
//! got (raw TCP, a proxy chain, WebSocket, TLS); a transport only carries
//! bytes and never decides who is trusted.

use std::io;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The read half of a transport.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;

/// The write half of a transport.
pub enum WriteHalf {
    /// A byte stream: the writer writes each batch of records from its own
    /// buffer.
    Bytes(Box<dyn AsyncWrite + Send + Unpin>),
    /// A transport that frames what it sends (WebSocket): the writer hands
    /// each batch over whole, to be framed (and masked) in place rather
    /// than copied into a message of its own.
    Batches(Box<dyn BatchSink>),
}

/// The sending side of a message transport (see [`WriteHalf::Batches`]).
pub trait BatchSink: Send + Unpin {
    /// Sends `batch` whole and flushes; `Ready(Ok)` once it went. The sink
    /// may change the bytes in place (a WebSocket client masks them);
    /// after `Pending` it is called again with the same batch, unchanged
    /// since, and the caller reuses the buffer only after `Ready`.
    fn poll_send(&mut self, cx: &mut Context<'_>, batch: &mut [u8]) -> Poll<io::Result<()>>;
    /// Ends the sending side cleanly (a close message).
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Polled while the writer has nothing to send: `Ready(Ok)` once the
    /// transport sent something of its own (a WebSocket pong), so that it
    /// does not wait for the link's next batch. The default never does.
    /// Dropped mid-way when a batch becomes due, which then goes after it.
    fn poll_idle(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl WriteHalf {
    /// Writes `batch` and flushes (a message transport may have changed
    /// its bytes in place: the caller clears it afterwards).
    pub async fn write_batch(&mut self, batch: &mut [u8]) -> io::Result<()> {
        match self {
            WriteHalf::Bytes(stream) => {
                stream.write_all(batch).await?;
                // TLS transports buffer; TCP's flush is free.
                stream.flush().await
            }
            WriteHalf::Batches(sink) => std::future::poll_fn(|cx| sink.poll_send(cx, batch)).await,
        }
    }

    /// Resolves once the transport sent something of its own while the
    /// writer is idle (see [`BatchSink::poll_idle`]); a byte stream never.
    pub async fn idle(&mut self) -> io::Result<()> {
        match self {
            WriteHalf::Bytes(_) => std::future::pending().await,
            WriteHalf::Batches(sink) => std::future::poll_fn(|cx| sink.poll_idle(cx)).await,
        }
    }

    /// Ends the sending side cleanly.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            WriteHalf::Bytes(stream) => stream.shutdown().await,
            WriteHalf::Batches(sink) => std::future::poll_fn(|cx| sink.poll_shutdown(cx)).await,
        }
    }
}

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
        (Box::new(read), WriteHalf::Bytes(Box::new(write)))
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
        (Box::new(read), WriteHalf::Bytes(Box::new(write)))
    }
}

/// Two halves that are already separate.
pub struct Halves(pub ReadHalf, pub WriteHalf);

impl Transport for Halves {
    fn into_halves(self) -> (ReadHalf, WriteHalf) {
        (self.0, self.1)
    }
}
