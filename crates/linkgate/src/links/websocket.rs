//! A WebSocket connection used as a byte stream: what is written goes out
//! as binary messages, what arrives in binary messages is read back in
//! order. The link's records do not care where message boundaries fall.
//! Text messages are a protocol error; pings are answered by tungstenite;
//! a close message is the end of the stream.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::Sink;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::stream::ByteStream;

/// Largest WebSocket message (and frame) accepted. The session writes at
/// most about 320 KiB at a time; a peer that is not authenticated yet must
/// not make us buffer tens of MiB (tungstenite's default is 64 MiB).
const MAX_MESSAGE: usize = 1 << 20;

/// The WebSocket settings of links, both sides.
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        // Our writes are already large: send each at once.
        .write_buffer_size(0)
}

/// A WebSocket stream read and written as bytes.
pub struct WsBytes<S> {
    inner: WebSocketStream<S>,
    /// The rest of the last binary message received.
    pending: Bytes,
    /// A close or end was seen: reads return EOF.
    ended: bool,
}

impl<S> WsBytes<S> {
    /// Wraps an upgraded WebSocket connection.
    pub fn new(inner: WebSocketStream<S>) -> Self {
        WsBytes {
            inner,
            pending: Bytes::new(),
            ended: false,
        }
    }
}

fn to_io(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "WebSocket closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, format!("WebSocket: {other}")),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        poll_read_messages(&mut this.inner, &mut this.pending, &mut this.ended, cx, buf)
    }
}

/// Reads the bytes of binary messages from `messages`: the rest of the
/// last one first (`pending`), EOF once a close was seen (`ended`).
fn poll_read_messages<M>(
    messages: &mut M,
    pending: &mut Bytes,
    ended: &mut bool,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>>
where
    M: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        if !pending.is_empty() {
            let n = pending.len().min(buf.remaining());
            buf.put_slice(&pending[..n]);
            pending.advance(n);
            return Poll::Ready(Ok(()));
        }
        if *ended {
            return Poll::Ready(Ok(()));
        }
        match ready!(Pin::new(&mut *messages).poll_next(cx)) {
            Some(Ok(Message::Binary(data))) => *pending = data,
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Close(_))) | None => *ended = true,
            Some(Ok(Message::Text(_))) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "WebSocket text message on a link",
                )))
            }
            Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.inner).poll_ready(cx)).map_err(to_io)?;
        let n = data.len().min(MAX_MESSAGE);
        Pin::new(&mut this.inner)
            .start_send(Message::Binary(Bytes::copy_from_slice(&data[..n])))
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_flush(cx)
            .map_err(to_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.get_mut().inner).poll_close(cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> ByteStream for WsBytes<S> {
    fn into_link_halves(
        self: Box<Self>,
    ) -> Result<(link::transport::ReadHalf, link::transport::WriteHalf), Box<dyn ByteStream>> {
        let WsBytes {
            inner,
            pending,
            ended,
        } = *self;
        let (sink, messages) = futures_util::StreamExt::split(inner);
        let reader = WsReader {
            messages,
            pending,
            ended,
        };
        let writer = WsBatches { sink };
        Ok((
            Box::new(reader),
            link::transport::WriteHalf::Batches(Box::new(writer)),
        ))
    }
}

/// The reading half of a link's WebSocket (see [`WsBytes`]).
struct WsReader<S> {
    messages: SplitStream<WebSocketStream<S>>,
    pending: Bytes,
    ended: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsReader<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        poll_read_messages(
            &mut this.messages,
            &mut this.pending,
            &mut this.ended,
            cx,
            buf,
        )
    }
}

/// The sending half of a link's WebSocket: each batch of records the
/// session's writer hands over becomes one binary message, uncopied.
struct WsBatches<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin> link::transport::BatchSink for WsBatches<S> {
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        batch: &mut Option<Bytes>,
    ) -> Poll<io::Result<()>> {
        if batch.is_some() {
            ready!(Pin::new(&mut self.sink).poll_ready(cx)).map_err(to_io)?;
            let message = Message::Binary(batch.take().expect("checked"));
            Pin::new(&mut self.sink)
                .start_send(message)
                .map_err(to_io)?;
        }
        Pin::new(&mut self.sink).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.sink).poll_close(cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}
