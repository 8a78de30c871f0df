//! A WebSocket connection used as a byte stream: what is written goes out
//! as binary frames, what arrives in binary frames is read back in order.
//! The link's records do not care where frame boundaries fall.
//!
//! tungstenite performs the opening handshake (client and server); the
//! upgraded connection is then taken back from it and framed by
//! [`super::ws_frames`], so that payloads move between the socket and the
//! session's buffers without being copied again or held whole. The link
//! handshake lets this be exact: the dialer speaks first, and a client
//! sends nothing before the server's 101 answer (RFC 6455 §4.1), so no
//! frame can have been read ahead with the handshake.
//!
//! Text frames are a protocol error; a ping is answered with a pong, at
//! once on an idle link and otherwise before the next batch; a close frame
//! is the end of the stream, and shutting the writing side down sends one.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

use super::ws_frames::{self, FrameError, Header, Opcode, MAX_CONTROL, MAX_HEADER};
use crate::stream::ByteStream;

/// The WebSocket settings of the opening handshake, both sides.
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
}

/// Largest payload of one frame written through [`AsyncWrite`] (the link
/// handshake's messages; the session's batches go whole, see
/// [`ByteStream::into_link_halves`]).
const MAX_WRITE: usize = 64 * 1024;

/// Which end of the connection we are: a client masks what it sends, a
/// server requires masked frames (RFC 6455 §5.1).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

fn invalid(reason: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason.to_string())
}

/// A ping's payload waiting for its pong, shared by the two halves, and
/// the idle writer to wake for it.
type PendingPong = Arc<Mutex<PongSlot>>;

#[derive(Default)]
struct PongSlot {
    payload: Option<Vec<u8>>,
    idle_writer: Option<Waker>,
}

/// An upgraded WebSocket connection read and written as bytes.
pub struct WsBytes<S> {
    io: S,
    reader: FrameReader,
    writer: FrameWriter,
}

impl<S> WsBytes<S> {
    /// Frames `io` as the client of an upgraded connection.
    pub fn client(ws: WebSocketStream<S>) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        Self::new(ws.into_inner(), Side::Client)
    }

    /// Frames `io` as the server of an upgraded connection.
    pub fn server(ws: WebSocketStream<S>) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        Self::new(ws.into_inner(), Side::Server)
    }

    fn new(io: S, side: Side) -> Self {
        let pong = PendingPong::default();
        WsBytes {
            io,
            reader: FrameReader::new(side, pong.clone()),
            writer: FrameWriter::new(side, pong),
        }
    }
}

// === Reading ===

/// A frame being read: its header, and how much payload is left.
struct InFrame {
    header: Header,
    /// Payload bytes read so far.
    read: u64,
    /// A control frame's payload, gathered whole.
    control: Vec<u8>,
}

/// The reading side's state: a header being read, or a frame's payload.
struct FrameReader {
    side: Side,
    header: [u8; MAX_HEADER],
    header_have: usize,
    frame: Option<InFrame>,
    /// Inside a binary message whose last frame has not come yet.
    in_message: bool,
    /// A close frame (or the end of the connection) was seen.
    ended: bool,
    pong: PendingPong,
}

impl FrameReader {
    fn new(side: Side, pong: PendingPong) -> Self {
        FrameReader {
            side,
            header: [0; MAX_HEADER],
            header_have: 0,
            frame: None,
            in_message: false,
            ended: false,
            pong,
        }
    }

    /// Reads payload bytes of binary frames into `buf` (at most one
    /// frame's worth per call, so that no header lands in it); control
    /// frames are handled on the way. EOF after a close frame.
    fn poll_read<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.ended || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let Some(frame) = &mut self.frame else {
                ready!(self.poll_header(io, cx))?;
                continue;
            };
            let left = frame.header.len - frame.read;
            if frame.header.opcode.is_control() {
                if left > 0 {
                    let mut room = [0u8; MAX_CONTROL];
                    let mut piece = ReadBuf::new(&mut room[..left as usize]);
                    ready!(Pin::new(&mut *io).poll_read(cx, &mut piece))?;
                    let got = piece.filled();
                    if got.is_empty() {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    frame.control.extend_from_slice(got);
                    frame.read += got.len() as u64;
                    continue;
                }
                let InFrame {
                    header,
                    mut control,
                    ..
                } = self.frame.take().expect("matched above");
                if let Some(key) = header.mask {
                    ws_frames::apply_mask(&mut control, key, 0);
                }
                match header.opcode {
                    Opcode::Ping => {
                        let mut slot = self.pong.lock().unwrap_or_else(|p| p.into_inner());
                        slot.payload = Some(control);
                        if let Some(writer) = slot.idle_writer.take() {
                            writer.wake();
                        }
                    }
                    Opcode::Close => self.ended = true,
                    _ => {}
                }
                continue;
            }
            if left == 0 {
                if frame.header.fin {
                    self.in_message = false;
                }
                self.frame = None;
                continue;
            }
            // Only this frame's payload, straight into the caller's buffer.
            let before = buf.filled().len();
            let limit = left.min(buf.remaining() as u64);
            ready!(Pin::new(&mut (&mut *io).take(limit)).poll_read(cx, buf))?;
            let got = buf.filled().len() - before;
            if got == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection ended inside a WebSocket frame",
                )));
            }
            if let Some(key) = frame.header.mask {
                ws_frames::apply_mask(&mut buf.filled_mut()[before..], key, frame.read);
            }
            frame.read += got as u64;
            if frame.read == frame.header.len {
                if frame.header.fin {
                    self.in_message = false;
                }
                self.frame = None;
            }
            return Poll::Ready(Ok(()));
        }
    }

    /// Reads and checks the next frame's header.
    fn poll_header<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let need = match self.header_have {
                0 | 1 => 2,
                _ => ws_frames::header_len([self.header[0], self.header[1]]),
            };
            if self.header_have == need {
                break;
            }
            let mut piece = ReadBuf::new(&mut self.header[self.header_have..need]);
            ready!(Pin::new(&mut *io).poll_read(cx, &mut piece))?;
            let got = piece.filled().len();
            if got == 0 {
                if self.header_have == 0 && !self.in_message {
                    // Ended without a close frame: the session above tells
                    // a truncated link from a closed one by its records.
                    self.ended = true;
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection ended inside a WebSocket frame",
                )));
            }
            self.header_have += got;
        }
        let header = ws_frames::parse_header(&self.header[..self.header_have])
            .map_err(|e: FrameError| invalid(e))?;
        self.header_have = 0;
        match (self.side, header.mask) {
            (Side::Server, None) => {
                return Poll::Ready(Err(invalid("unmasked WebSocket frame from the client")))
            }
            (Side::Client, Some(_)) => {
                return Poll::Ready(Err(invalid("masked WebSocket frame from the server")))
            }
            _ => {}
        }
        match header.opcode {
            Opcode::Text => return Poll::Ready(Err(invalid("WebSocket text message on a link"))),
            Opcode::Binary if self.in_message => {
                return Poll::Ready(Err(invalid("WebSocket message begun inside another")))
            }
            Opcode::Continuation if !self.in_message => {
                return Poll::Ready(Err(invalid("WebSocket continuation outside a message")))
            }
            Opcode::Binary => self.in_message = !header.fin,
            _ => {}
        }
        self.frame = Some(InFrame {
            header,
            read: 0,
            control: Vec::new(),
        });
        Poll::Ready(Ok(()))
    }
}

// === Writing ===

/// The writing side's state.
struct FrameWriter {
    side: Side,
    /// Bytes to write before anything else: a whole small frame (a pong,
    /// the close, a handshake message), and how much of it went.
    staged: Vec<u8>,
    staged_sent: usize,
    /// The header of the batch being written, its length, and how much of
    /// header and payload went; `None` between batches.
    batch: Option<([u8; MAX_HEADER], usize, usize)>,
    /// The batch is written and the stream is being flushed.
    flushing: bool,
    /// The close frame is staged (shutdown began).
    closing: bool,
    pong: PendingPong,
}

impl FrameWriter {
    fn new(side: Side, pong: PendingPong) -> Self {
        FrameWriter {
            side,
            staged: Vec::new(),
            staged_sent: 0,
            batch: None,
            flushing: false,
            closing: false,
            pong,
        }
    }

    /// A frame header for `len` payload bytes; a client's gets a fresh
    /// masking key.
    fn header(&self, opcode: Opcode, len: usize) -> Header {
        Header {
            fin: true,
            opcode,
            mask: (self.side == Side::Client).then(rand::random::<[u8; 4]>),
            len: len as u64,
        }
    }

    /// Puts a whole frame with `payload` (copied) in `staged`.
    fn stage(&mut self, opcode: Opcode, payload: &[u8]) {
        let header = self.header(opcode, payload.len());
        let mut bytes = [0; MAX_HEADER];
        let n = ws_frames::encode_header(&header, &mut bytes);
        self.staged.extend_from_slice(&bytes[..n]);
        let start = self.staged.len();
        self.staged.extend_from_slice(payload);
        if let Some(key) = header.mask {
            ws_frames::apply_mask(&mut self.staged[start..], key, 0);
        }
    }

    /// Stages the pong a ping asked for, if one did.
    fn stage_pong(&mut self) {
        let pong = self
            .pong
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .payload
            .take();
        if let Some(payload) = pong {
            self.stage(Opcode::Pong, &payload);
        }
    }

    /// While the link has nothing to send: `Ready` once the pong a ping
    /// asked for went out (staged bytes a batch interrupted go first).
    fn poll_idle<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if self.staged.is_empty() {
            let mut slot = self.pong.lock().unwrap_or_else(|p| p.into_inner());
            let Some(payload) = slot.payload.take() else {
                slot.idle_writer = Some(cx.waker().clone());
                return Poll::Pending;
            };
            drop(slot);
            self.stage(Opcode::Pong, &payload);
        }
        ready!(self.poll_staged(io, cx))?;
        Pin::new(&mut *io).poll_flush(cx)
    }

    /// Writes out what is staged.
    fn poll_staged<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.staged_sent < self.staged.len() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.staged[self.staged_sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.staged_sent += n;
        }
        self.staged.clear();
        self.staged_sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Sends `batch` as one binary frame (masking it in place on a
    /// client) and flushes. Called again with the same batch after
    /// `Pending`.
    fn poll_send<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
        batch: &mut [u8],
    ) -> Poll<io::Result<()>> {
        if self.batch.is_none() && !self.flushing {
            self.stage_pong();
            ready!(self.poll_staged(io, cx))?;
            let header = self.header(Opcode::Binary, batch.len());
            let mut bytes = [0; MAX_HEADER];
            let len = ws_frames::encode_header(&header, &mut bytes);
            if let Some(key) = header.mask {
                ws_frames::apply_mask(batch, key, 0);
            }
            self.batch = Some((bytes, len, 0));
        }
        if let Some((header, header_len, sent)) = &mut self.batch {
            let total = *header_len + batch.len();
            while *sent < total {
                let n = if *sent < *header_len {
                    let parts = [
                        IoSlice::new(&header[*sent..*header_len]),
                        IoSlice::new(batch),
                    ];
                    ready!(Pin::new(&mut *io).poll_write_vectored(cx, &parts))?
                } else {
                    ready!(Pin::new(&mut *io).poll_write(cx, &batch[*sent - *header_len..]))?
                };
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *sent += n;
            }
            self.batch = None;
            self.flushing = true;
        }
        ready!(Pin::new(&mut *io).poll_flush(cx))?;
        self.flushing = false;
        Poll::Ready(Ok(()))
    }

    /// Sends a close frame, then ends the stream's writing side.
    fn poll_shutdown<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.closing {
            // Status 1000: a normal closure.
            self.stage(Opcode::Close, &1000u16.to_be_bytes());
            self.closing = true;
        }
        ready!(self.poll_staged(io, cx))?;
        Pin::new(&mut *io).poll_shutdown(cx)
    }
}

// === The stream during the link handshake ===

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.reader.poll_read(&mut this.io, cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.writer.poll_staged(&mut this.io, cx))?;
        this.writer.stage_pong();
        let n = data.len().min(MAX_WRITE);
        this.writer.stage(Opcode::Binary, &data[..n]);
        // Taken: written by the next write or flush if not now.
        let _ = this.writer.poll_staged(&mut this.io, cx)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.writer.poll_staged(&mut this.io, cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.writer.poll_shutdown(&mut this.io, cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> ByteStream for WsBytes<S> {
    fn into_link_halves(
        self: Box<Self>,
    ) -> Result<(link::transport::ReadHalf, link::transport::WriteHalf), Box<dyn ByteStream>> {
        let WsBytes { io, reader, writer } = *self;
        let (read, write) = tokio::io::split(io);
        Ok((
            Box::new(WsReader { io: read, reader }),
            link::transport::WriteHalf::Batches(Box::new(WsBatches { io: write, writer })),
        ))
    }
}

// === The session's halves ===

/// The reading half of a link's WebSocket.
struct WsReader<S> {
    io: tokio::io::ReadHalf<S>,
    reader: FrameReader,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsReader<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.reader.poll_read(&mut this.io, cx, buf)
    }
}

/// The sending half of a link's WebSocket: each batch of records the
/// session's writer hands over becomes one binary frame, masked in place
/// on the dialer's side and written with its header in one vectored call.
struct WsBatches<S> {
    io: tokio::io::WriteHalf<S>,
    writer: FrameWriter,
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin> link::transport::BatchSink for WsBatches<S> {
    fn poll_send(&mut self, cx: &mut Context<'_>, batch: &mut [u8]) -> Poll<io::Result<()>> {
        self.writer.poll_send(&mut self.io, cx, batch)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writer.poll_shutdown(&mut self.io, cx)
    }

    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writer.poll_idle(&mut self.io, cx)
    }
}

#[cfg(test)]
mod tests {
    //! Against tungstenite's own framing at the other end: what it sends
    //! is read back exact, what we send it takes as binary messages.

    use super::*;
    use bytes::Bytes;
    use futures_util::{SinkExt, StreamExt};
    use link::transport::WriteHalf;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::tungstenite::Message;

    /// An upgraded pair over memory: tungstenite's client and ours as the
    /// server, or tungstenite's server and ours as the client.
    async fn upgraded() -> (
        (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>),
        (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>),
    ) {
        let mut pairs = Vec::new();
        for _ in 0..2 {
            let (a, b) = tokio::io::duplex(1 << 20);
            let (client, server) = tokio::join!(
                tokio_tungstenite::client_async("ws://localhost/link", a),
                tokio_tungstenite::accept_async(b),
            );
            pairs.push((client.unwrap().0, server.unwrap()));
        }
        let second = pairs.pop().unwrap();
        (pairs.pop().unwrap(), second)
    }

    fn sizes() -> Vec<usize> {
        vec![1, 125, 126, 127, 65_535, 65_536, 300_000, 7, 0, 40_000]
    }

    fn payload(size: usize, seed: usize) -> Vec<u8> {
        (0..size).map(|i| (i * 31 + seed * 7) as u8).collect()
    }

    /// Sends batch `seed` of `size` bytes through our sink.
    async fn send_batch(sink: &mut Box<dyn link::transport::BatchSink>, size: usize, seed: usize) {
        let mut batch = payload(size, seed);
        std::future::poll_fn(|cx| sink.poll_send(cx, &mut batch))
            .await
            .unwrap();
    }

    /// Checks that tungstenite's next message is batch `seed`, whole.
    async fn expect_batch<S: AsyncRead + AsyncWrite + Unpin>(
        theirs: &mut WebSocketStream<S>,
        size: usize,
        seed: usize,
    ) {
        let message = theirs.next().await.unwrap().unwrap();
        assert!(
            message == Message::Binary(Bytes::from(payload(size, seed))),
            "message {seed}"
        );
    }

    /// Our server side of an upgraded connection, split as a session
    /// takes it: the reader and the batch sink.
    fn server_halves(
        ours: WebSocketStream<DuplexStream>,
    ) -> (
        link::transport::ReadHalf,
        Box<dyn link::transport::BatchSink>,
    ) {
        let (reader, writer) = Box::new(WsBytes::server(ours))
            .into_link_halves()
            .ok()
            .unwrap();
        let WriteHalf::Batches(sink) = writer else {
            panic!("a WebSocket sends batches")
        };
        (reader, sink)
    }

    #[tokio::test]
    async fn tungstenites_client_and_our_server_agree() {
        let ((mut theirs, ours), _) = upgraded().await;
        let (mut reader, mut sink) = server_halves(ours);
        // Their binary messages, with a ping among them, read back as bytes.
        let mut expected = Vec::new();
        for (seed, size) in sizes().into_iter().enumerate() {
            let data = payload(size, seed);
            expected.extend_from_slice(&data);
            theirs
                .send(Message::Binary(Bytes::from(data)))
                .await
                .unwrap();
            if seed == 3 {
                theirs
                    .send(Message::Ping(Bytes::from_static(b"are you there")))
                    .await
                    .unwrap();
            }
        }
        let mut got = vec![0; expected.len()];
        reader.read_exact(&mut got).await.unwrap();
        assert!(got == expected, "bytes differ");
        // Our batches arrive as binary messages, the pong first.
        for (seed, size) in sizes().into_iter().enumerate() {
            send_batch(&mut sink, size, seed).await;
        }
        let pong = theirs.next().await.unwrap().unwrap();
        assert_eq!(pong, Message::Pong(Bytes::from_static(b"are you there")));
        for (seed, size) in sizes().into_iter().enumerate() {
            expect_batch(&mut theirs, size, seed).await;
        }
        // Shutting down sends a close; their answer (or their end) ends
        // our reading.
        std::future::poll_fn(|cx| sink.poll_shutdown(cx))
            .await
            .unwrap();
        assert!(matches!(theirs.next().await, Some(Ok(Message::Close(_)))));
        drop(theirs);
        let mut rest = Vec::new();
        assert_eq!(reader.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_ping_on_an_idle_link_is_answered_at_once() {
        let ((mut theirs, ours), _) = upgraded().await;
        let (mut reader, mut sink) = server_halves(ours);
        // The session's reader is always reading.
        let reading = tokio::spawn(async move {
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).await.map(|_| rest)
        });
        theirs
            .send(Message::Ping(Bytes::from_static(b"still there?")))
            .await
            .unwrap();
        // The idle writer sends the pong with no batch to carry it...
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            std::future::poll_fn(|cx| sink.poll_idle(cx)),
        )
        .await
        .expect("the pong went while idle")
        .unwrap();
        let pong = theirs.next().await.unwrap().unwrap();
        assert_eq!(pong, Message::Pong(Bytes::from_static(b"still there?")));
        // ...and the next batch follows it whole.
        send_batch(&mut sink, 40_000, 1).await;
        expect_batch(&mut theirs, 40_000, 1).await;
        theirs.close(None).await.unwrap();
        assert!(reading.await.unwrap().unwrap().is_empty());
    }

    #[tokio::test]
    async fn our_client_masks_what_tungstenites_server_reads() {
        let (_, (ours, mut theirs)) = upgraded().await;
        let mut ours = WsBytes::client(ours);
        // The link handshake's messages go through the plain stream.
        ours.write_all(b"hello hub").await.unwrap();
        ours.flush().await.unwrap();
        let hello = theirs.next().await.unwrap().unwrap();
        assert_eq!(hello, Message::Binary(Bytes::from_static(b"hello hub")));
        theirs
            .send(Message::Binary(Bytes::from_static(b"hello spoke")))
            .await
            .unwrap();
        let mut answer = [0; 11];
        ours.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"hello spoke");
        let (_, writer) = Box::new(ours).into_link_halves().ok().unwrap();
        let WriteHalf::Batches(mut sink) = writer else {
            panic!("a WebSocket sends batches")
        };
        for (seed, size) in sizes().into_iter().enumerate() {
            send_batch(&mut sink, size, seed).await;
            expect_batch(&mut theirs, size, seed).await;
        }
    }

    /// Frames written by hand, as a hostile or broken peer would.
    async fn read_raw(side: Side, wire: &[u8]) -> io::Result<Vec<u8>> {
        let (mut peer, io) = tokio::io::duplex(1 << 16);
        peer.write_all(wire).await.unwrap();
        drop(peer);
        let mut ws = WsBytes::new(io, side);
        let mut got = Vec::new();
        ws.read_to_end(&mut got).await.map(|_| got)
    }

    #[tokio::test]
    async fn fragments_are_joined_and_broken_frames_refused() {
        // Unmasked from a server: "ab" in a binary frame and its
        // continuation, a pong between them, then a close.
        let wire = [0x02, 1, b'a', 0x8A, 0, 0x80, 1, b'b', 0x88, 0];
        assert_eq!(read_raw(Side::Client, &wire).await.unwrap(), b"ab");
        let refused = [
            (Side::Client, vec![0x81, 1, b'x'], "text"),
            (Side::Server, vec![0x82, 1, b'x'], "unmasked"),
            (Side::Client, vec![0x82, 0x81, 1, 2, 3, 4, b'x'], "masked"),
            (Side::Client, vec![0x80, 1, b'x'], "continuation outside"),
            (
                Side::Client,
                vec![0x02, 1, b'x', 0x82, 1, b'y'],
                "begun inside",
            ),
            (Side::Client, vec![0x82, 5, b'x'], "ended inside"),
            (Side::Client, vec![0xC2, 1, b'x'], "reserved"),
        ];
        for (side, wire, what) in refused {
            let error = read_raw(side, &wire).await.unwrap_err();
            assert!(error.to_string().contains(what), "{what}: {error}");
        }
    }
}
