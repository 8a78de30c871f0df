//! A link session over TCP: many concurrent byte streams, each with
//! credit-based flow control, multiplexed over one encrypted connection.
//!
//! Tasks: a reader (opens records, dispatches frames; it never blocks on a
//! stream, so the link can always make progress), a writer (flushes the
//! outbox to the socket), and a keepalive. Streams seal their own DATA
//! frames into the shared outbox, so a busy stream's encryption runs on its
//! own task, in parallel with the writer.
//!
//! Deadlock freedom: DATA is bounded twice (per-stream credit, and the
//! outbox high-water mark); control frames (WINDOW, FIN, RESET, PONG,
//! OPEN_OK) are never refused, and the reader never waits for a consumer.
//! Lock order: a stream's lock, then the outbox lock, never the reverse.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::frame::{Frame, MAX_DATA, MAX_TEXT};
use crate::handshake::SessionKeys;
use crate::record::{complete_record_len, Opener, Sealer};

/// Tunables of a session.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Bytes a stream may have in flight towards us (its receive window).
    pub window: u32,
    /// Send a PING when nothing was sent for this long.
    pub keepalive: Duration,
    /// Declare the link dead when nothing arrived for this long.
    pub dead_after: Duration,
    /// Most incoming stream requests waiting for the gateway.
    pub incoming_backlog: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            window: 1024 * 1024,
            keepalive: Duration::from_secs(15),
            dead_after: Duration::from_secs(45),
            incoming_backlog: 256,
        }
    }
}

/// Which end of the link we are: decides stream id parity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// We dialed (odd stream ids).
    Dialer,
    /// We accepted (even stream ids).
    Acceptor,
}

/// How a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEnd {
    /// A CLOSE record was exchanged: a deliberate, authenticated end.
    Closed(String),
    /// Anything else: I/O error, authentication failure, truncation, silence.
    Failed(String),
}

impl std::fmt::Display for LinkEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            LinkEnd::Closed(reason) => write!(f, "closed: {reason}"),
            LinkEnd::Failed(reason) => write!(f, "failed: {reason}"),
        }
    }
}

/// Opening a stream failed.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The other gateway refused (service unknown, not exported, not allowed...).
    #[error("refused by the other gateway: {0}")]
    Refused(String),
    /// The link ended before the answer came.
    #[error("the link is down: {0}")]
    LinkDown(String),
}

/// Outbox size beyond which DATA waits (control frames never wait).
const HIGH_WATER: usize = 1024 * 1024;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 256 * 1024;

struct Outbox {
    sealer: Sealer,
    buf: Vec<u8>,
    /// Streams waiting for the outbox to drain.
    blocked: Vec<Waker>,
    /// No more frames: CLOSE was queued or the link failed.
    closed: bool,
    last_queued: Instant,
}

#[derive(Default)]
struct StreamInner {
    recv: VecDeque<Bytes>,
    /// Bytes the peer may still send before we grant more.
    recv_allowance: u64,
    /// Bytes consumed by the reader since the last WINDOW frame.
    consumed_unacked: u32,
    fin_received: bool,
    send_credit: u64,
    fin_sent: bool,
    /// Set when the stream is aborted (RESET, link end); reads and writes fail.
    reset: Option<String>,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    open_reply: Option<oneshot::Sender<Result<u32, String>>>,
}

struct StreamShared {
    id: u32,
    inner: Mutex<StreamInner>,
}

impl StreamShared {
    fn lock(&self) -> MutexGuard<'_, StreamInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Shared {
    outbox: Mutex<Outbox>,
    writer_wake: Notify,
    streams: Mutex<HashMap<u32, Arc<StreamShared>>>,
    next_id: AtomicU32,
    config: SessionConfig,
    end: watch::Sender<Option<LinkEnd>>,
}

impl Shared {
    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn streams(&self) -> MutexGuard<'_, HashMap<u32, Arc<StreamShared>>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a control frame; returns false if the link is closed.
    fn send_control(&self, frame: &Frame<'_>) -> bool {
        let mut outbox = self.outbox();
        if outbox.closed {
            return false;
        }
        let Outbox { sealer, buf, .. } = &mut *outbox;
        sealer.seal(frame, buf);
        outbox.last_queued = Instant::now();
        drop(outbox);
        self.writer_wake.notify_one();
        true
    }

    /// Marks the session ended (first reason wins), aborts every stream and
    /// stops the writer.
    fn finish(&self, end: LinkEnd) {
        self.end.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(end.clone());
                true
            } else {
                false
            }
        });
        let reason = format!("link {end}");
        let streams: Vec<_> = self.streams().drain().map(|(_, s)| s).collect();
        for stream in streams {
            let mut inner = stream.lock();
            inner.reset.get_or_insert_with(|| reason.clone());
            if let Some(reply) = inner.open_reply.take() {
                let _ = reply.send(Err(reason.clone()));
            }
            wake(&mut inner.read_waker);
            wake(&mut inner.write_waker);
        }
        let mut outbox = self.outbox();
        outbox.closed = true;
        for waker in outbox.blocked.drain(..) {
            waker.wake();
        }
        drop(outbox);
        self.writer_wake.notify_one();
    }
}

fn wake(slot: &mut Option<Waker>) {
    if let Some(waker) = slot.take() {
        waker.wake();
    }
}

fn text_cap(text: &str) -> &str {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

// === Session ===

/// A handle to an established link; cheap to clone.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

/// A stream the other gateway wants to open to one of our services.
pub struct IncomingStream {
    shared: Arc<Shared>,
    id: u32,
    peer_window: u32,
    /// The service it asks for.
    pub service: String,
}

impl Session {
    /// Starts the session's tasks on an authenticated connection. Incoming
    /// stream requests arrive on the returned receiver.
    pub fn start(
        tcp: TcpStream,
        keys: SessionKeys,
        role: Role,
        config: SessionConfig,
    ) -> (Session, mpsc::Receiver<IncomingStream>) {
        let _ = tcp.set_nodelay(true);
        let (end, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            outbox: Mutex::new(Outbox {
                sealer: Sealer::new(keys.send),
                buf: Vec::with_capacity(64 * 1024),
                blocked: Vec::new(),
                closed: false,
                last_queued: Instant::now(),
            }),
            writer_wake: Notify::new(),
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(if role == Role::Dialer { 1 } else { 2 }),
            config: config.clone(),
            end,
        });
        let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_backlog);
        let (read_half, write_half) = tcp.into_split();
        let opener = Opener::new(keys.recv);
        tokio::spawn(run_writer(shared.clone(), write_half));
        let reader_shared = shared.clone();
        tokio::spawn(async move {
            let end = run_reader(&reader_shared, read_half, opener, incoming_tx, role).await;
            reader_shared.finish(end);
        });
        tokio::spawn(run_keepalive(shared.clone()));
        (Session { shared }, incoming_rx)
    }

    /// Opens a stream to the other gateway's `service`; resolves once the
    /// other side accepted or refused it.
    pub async fn open(&self, service: &str) -> Result<LinkStream, OpenError> {
        let id = self.shared.next_id.fetch_add(2, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        let stream = Arc::new(StreamShared {
            id,
            inner: Mutex::new(StreamInner {
                recv_allowance: u64::from(self.shared.config.window),
                open_reply: Some(reply_tx),
                ..StreamInner::default()
            }),
        });
        self.shared.streams().insert(id, stream.clone());
        let window = self.shared.config.window;
        if !self.shared.send_control(&Frame::Open {
            id,
            window,
            service: text_cap(service),
        }) {
            self.shared.streams().remove(&id);
            return Err(OpenError::LinkDown(self.end_reason()));
        }
        match reply_rx.await {
            Ok(Ok(peer_window)) => {
                stream.lock().send_credit = u64::from(peer_window);
                Ok(LinkStream::new(self.shared.clone(), stream))
            }
            Ok(Err(reason)) => {
                self.shared.streams().remove(&id);
                Err(OpenError::Refused(reason))
            }
            Err(_) => Err(OpenError::LinkDown(self.end_reason())),
        }
    }

    fn end_reason(&self) -> String {
        match &*self.shared.end.borrow() {
            Some(end) => end.to_string(),
            None => "closing".into(),
        }
    }

    /// Sends an authenticated CLOSE record and stops sending; the session
    /// ends when the peer closes its side (or after the writer flushes).
    pub fn close(&self, reason: &str) {
        let mut outbox = self.shared.outbox();
        if !outbox.closed {
            let Outbox { sealer, buf, .. } = &mut *outbox;
            sealer.seal(
                &Frame::Close {
                    reason: text_cap(reason),
                },
                buf,
            );
            outbox.closed = true;
        }
        drop(outbox);
        self.shared.writer_wake.notify_one();
    }

    /// Waits until the session has ended and says how.
    pub async fn ended(&self) -> LinkEnd {
        let mut end = self.shared.end.subscribe();
        loop {
            if let Some(end) = end.borrow_and_update().clone() {
                return end;
            }
            if end.changed().await.is_err() {
                return LinkEnd::Failed("session dropped".into());
            }
        }
    }

    /// Whether the session has ended.
    pub fn is_ended(&self) -> bool {
        self.shared.end.borrow().is_some()
    }

    /// Whether `other` is a handle to this same session.
    pub fn same_session(&self, other: &Session) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl IncomingStream {
    /// Accepts the stream; the other side may send at once.
    pub fn accept(self) -> Option<LinkStream> {
        let stream = Arc::new(StreamShared {
            id: self.id,
            inner: Mutex::new(StreamInner {
                recv_allowance: u64::from(self.shared.config.window),
                send_credit: u64::from(self.peer_window),
                ..StreamInner::default()
            }),
        });
        self.shared.streams().insert(self.id, stream.clone());
        let window = self.shared.config.window;
        if !self.shared.send_control(&Frame::OpenOk {
            id: self.id,
            window,
        }) {
            self.shared.streams().remove(&self.id);
            return None;
        }
        Some(LinkStream::new(self.shared.clone(), stream))
    }

    /// Refuses the stream, telling the other side why.
    pub fn refuse(self, reason: &str) {
        self.shared.send_control(&Frame::OpenFail {
            id: self.id,
            reason: text_cap(reason),
        });
    }
}

// === Tasks ===

async fn run_writer(shared: Arc<Shared>, mut tcp: tokio::net::tcp::OwnedWriteHalf) {
    let mut spare = Vec::with_capacity(64 * 1024);
    loop {
        let (chunk, closed) = {
            let mut outbox = shared.outbox();
            std::mem::swap(&mut outbox.buf, &mut spare);
            for waker in outbox.blocked.drain(..) {
                waker.wake();
            }
            (std::mem::take(&mut spare), outbox.closed)
        };
        if chunk.is_empty() {
            spare = chunk;
            if closed {
                let _ = tcp.shutdown().await;
                return;
            }
            shared.writer_wake.notified().await;
            continue;
        }
        if let Err(e) = tcp.write_all(&chunk).await {
            shared.finish(LinkEnd::Failed(format!("writing to the link: {e}")));
            return;
        }
        spare = chunk;
        spare.clear();
        if spare.capacity() > 4 * HIGH_WATER {
            spare.shrink_to(64 * 1024);
        }
    }
}

async fn run_keepalive(shared: Arc<Shared>) {
    let mut end = shared.end.subscribe();
    let mut counter = 0u64;
    loop {
        let idle_since = shared.outbox().last_queued;
        let due = idle_since + shared.config.keepalive;
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            _ = end.changed() => return,
        }
        if shared.outbox().last_queued <= idle_since {
            counter += 1;
            if !shared.send_control(&Frame::Ping(counter)) {
                return;
            }
        }
    }
}

async fn run_reader(
    shared: &Arc<Shared>,
    mut tcp: tokio::net::tcp::OwnedReadHalf,
    mut opener: Opener,
    incoming: mpsc::Sender<IncomingStream>,
    role: Role,
) -> LinkEnd {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut close_received: Option<String> = None;
    loop {
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(READ_CHUNK);
        }
        let read = tokio::time::timeout(shared.config.dead_after, tcp.read_buf(&mut buf)).await;
        let n = match read {
            Err(_) => {
                return LinkEnd::Failed(format!(
                    "nothing received for {:?}: the other gateway or the network is gone",
                    shared.config.dead_after
                ))
            }
            Ok(Err(e)) => return LinkEnd::Failed(format!("reading from the link: {e}")),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            return match close_received {
                Some(reason) => LinkEnd::Closed(reason),
                None => LinkEnd::Failed(
                    "the connection ended without a close record (truncated)".into(),
                ),
            };
        }
        while let Some(len) = complete_record_len(&buf) {
            let mut record = buf.split_to(len);
            if close_received.is_some() {
                return LinkEnd::Failed("data after the close record".into());
            }
            let plaintext_len = match opener.open(&mut record[2..]) {
                Ok(plaintext) => plaintext.len(),
                Err(e) => return LinkEnd::Failed(e.to_string()),
            };
            record.truncate(2 + plaintext_len);
            record.advance(2);
            if let Err(reason) = dispatch(shared, record, &incoming, role, &mut close_received) {
                let _ = shared.send_control(&Frame::Close {
                    reason: text_cap(&reason),
                });
                return LinkEnd::Failed(reason);
            }
        }
    }
}

/// Handles one decrypted frame. An `Err` is a protocol violation by the
/// peer: the link is closed.
fn dispatch(
    shared: &Arc<Shared>,
    plaintext: BytesMut,
    incoming: &mpsc::Sender<IncomingStream>,
    role: Role,
    close_received: &mut Option<String>,
) -> Result<(), String> {
    let frame = Frame::decode(&plaintext).map_err(|e| e.to_string())?;
    let stream_of = |id: u32| shared.streams().get(&id).cloned();
    match frame {
        Frame::Data { id, data } => {
            let len = data.len();
            if len == 0 || len > MAX_DATA {
                return Err("empty or oversized data frame".into());
            }
            // Streams we dropped may still receive in-flight data: ignore it.
            let Some(stream) = stream_of(id) else {
                return Ok(());
            };
            let payload = plaintext.freeze().slice(crate::frame::DATA_HEADER..);
            let mut inner = stream.lock();
            if inner.reset.is_some() || inner.fin_received {
                return Ok(());
            }
            if len as u64 > inner.recv_allowance {
                return Err(format!("stream {id} sent beyond its window"));
            }
            inner.recv_allowance -= len as u64;
            inner.recv.push_back(payload);
            wake(&mut inner.read_waker);
        }
        Frame::Open {
            id,
            window,
            service,
        } => {
            let theirs = if role == Role::Dialer { 0 } else { 1 };
            if id % 2 != theirs || shared.streams().contains_key(&id) {
                return Err(format!("invalid stream id {id} in open"));
            }
            let request = IncomingStream {
                shared: shared.clone(),
                id,
                peer_window: window,
                service: service.to_string(),
            };
            if let Err(
                mpsc::error::TrySendError::Full(request)
                | mpsc::error::TrySendError::Closed(request),
            ) = incoming.try_send(request)
            {
                request.refuse("the gateway is too busy to accept more streams");
            }
        }
        Frame::OpenOk { id, window } => {
            if let Some(stream) = stream_of(id) {
                if let Some(reply) = stream.lock().open_reply.take() {
                    let _ = reply.send(Ok(window));
                }
            }
        }
        Frame::OpenFail { id, reason } => {
            if let Some(stream) = shared.streams().remove(&id) {
                if let Some(reply) = stream.lock().open_reply.take() {
                    let _ = reply.send(Err(reason.to_string()));
                }
            }
        }
        Frame::Window { id, increment } => {
            if let Some(stream) = stream_of(id) {
                let mut inner = stream.lock();
                inner.send_credit += u64::from(increment);
                wake(&mut inner.write_waker);
            }
        }
        Frame::Fin { id } => {
            if let Some(stream) = stream_of(id) {
                let mut inner = stream.lock();
                inner.fin_received = true;
                wake(&mut inner.read_waker);
            }
        }
        Frame::Reset { id, reason } => {
            if let Some(stream) = shared.streams().remove(&id) {
                let mut inner = stream.lock();
                inner.reset = Some(format!("reset by the other gateway: {reason}"));
                wake(&mut inner.read_waker);
                wake(&mut inner.write_waker);
            }
        }
        Frame::Ping(value) => {
            shared.send_control(&Frame::Pong(value));
        }
        Frame::Pong(_) => {}
        Frame::Close { reason } => {
            *close_received = Some(reason.to_string());
            // Answer with our own close so the peer sees a clean end too.
            let mut outbox = shared.outbox();
            if !outbox.closed {
                let Outbox { sealer, buf, .. } = &mut *outbox;
                sealer.seal(
                    &Frame::Close {
                        reason: "closing in reply",
                    },
                    buf,
                );
                outbox.closed = true;
            }
            drop(outbox);
            shared.writer_wake.notify_one();
        }
    }
    Ok(())
}

// === LinkStream ===

/// One stream over a link: an ordered, flow-controlled byte stream with
/// half-close. Dropping it before both directions finished resets it.
pub struct LinkStream {
    shared: Arc<Shared>,
    stream: Arc<StreamShared>,
}

impl LinkStream {
    fn new(shared: Arc<Shared>, stream: Arc<StreamShared>) -> Self {
        LinkStream { shared, stream }
    }

    fn broken(reason: &str) -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionReset, reason.to_string())
    }
}

impl AsyncRead for LinkStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut inner = this.stream.lock();
        if !inner.recv.is_empty() {
            let mut copied = 0;
            while buf.remaining() > 0 {
                let Some(front) = inner.recv.front_mut() else {
                    break;
                };
                let n = front.len().min(buf.remaining());
                buf.put_slice(&front[..n]);
                front.advance(n);
                if front.is_empty() {
                    inner.recv.pop_front();
                }
                copied += n;
            }
            inner.consumed_unacked += copied as u32;
            // Grant more credit once a quarter of the window was consumed.
            if inner.consumed_unacked >= this.shared.config.window / 4 && !inner.fin_received {
                let increment = std::mem::take(&mut inner.consumed_unacked);
                inner.recv_allowance += u64::from(increment);
                this.shared.send_control(&Frame::Window {
                    id: this.stream.id,
                    increment,
                });
            }
            return Poll::Ready(Ok(()));
        }
        if inner.fin_received {
            return Poll::Ready(Ok(()));
        }
        if let Some(reason) = &inner.reset {
            return Poll::Ready(Err(Self::broken(reason)));
        }
        inner.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for LinkStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut inner = this.stream.lock();
        if let Some(reason) = &inner.reset {
            return Poll::Ready(Err(Self::broken(reason)));
        }
        if inner.fin_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        if inner.send_credit == 0 {
            inner.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = data.len().min(MAX_DATA).min(inner.send_credit as usize);
        let mut outbox = this.shared.outbox();
        if outbox.closed {
            return Poll::Ready(Err(Self::broken("link closed")));
        }
        if outbox.buf.len() >= HIGH_WATER {
            outbox.blocked.push(cx.waker().clone());
            return Poll::Pending;
        }
        let Outbox { sealer, buf, .. } = &mut *outbox;
        sealer.seal(
            &Frame::Data {
                id: this.stream.id,
                data: &data[..n],
            },
            buf,
        );
        outbox.last_queued = Instant::now();
        drop(outbox);
        inner.send_credit -= n as u64;
        drop(inner);
        this.shared.writer_wake.notify_one();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames are flushed by the writer task as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut inner = this.stream.lock();
        if inner.fin_sent {
            return Poll::Ready(Ok(()));
        }
        if let Some(reason) = &inner.reset {
            // A peer that finished sending and then left has nothing more to
            // learn from our end of stream: like TCP's shutdown towards a
            // closed socket, this is not an error. Data writes still are.
            if inner.fin_received {
                inner.fin_sent = true;
                return Poll::Ready(Ok(()));
            }
            return Poll::Ready(Err(Self::broken(reason)));
        }
        inner.fin_sent = true;
        drop(inner);
        this.shared.send_control(&Frame::Fin { id: this.stream.id });
        Poll::Ready(Ok(()))
    }
}

impl Drop for LinkStream {
    fn drop(&mut self) {
        let id = self.stream.id;
        let finished = {
            let inner = self.stream.lock();
            inner.reset.is_some() || (inner.fin_sent && inner.fin_received)
        };
        self.shared.streams().remove(&id);
        if !finished {
            self.shared.send_control(&Frame::Reset {
                id,
                reason: "stream closed",
            });
        }
    }
}
