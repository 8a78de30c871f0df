//! A link session: drives the sans-IO multiplexer ([`crate::mux`]) over a
//! [`Transport`] and gives the gateway async byte streams.
//!
//! Tasks: a reader (reads records, opens them, hands their frames to the
//! multiplexer; it never waits for a stream's consumer, so the link always
//! makes progress), one writer (takes frames from the multiplexer's
//! scheduler, seals them in wire order — the record nonce is an implicit
//! counter — and writes them), and a timer (keepalive probes, dead-link
//! detection). Stream handles only queue plaintext and wait for events.
//!
//! All state lives in one `Mux` behind one lock; wakers and open replies sit
//! next to it and are fired from the multiplexer's events. The lock is never
//! held across I/O or encryption.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::frame::{Frame, KexStep, KEY_EXCHANGE_TYPE};
use crate::handshake::SessionKeys;
use crate::kex::{Chain, Initiated};
pub use crate::mux::Role;
use crate::mux::{Event, Mux, MuxConfig, MuxStats, ReadState, WriteState};
use crate::params::Features;
use crate::record::{complete_record_len, Opener, Sealer, MAX_RECORD, TAG_LEN};
use crate::send_budget::{SendBudget, MAX_BATCH};
use crate::transport::{ReadHalf, Transport, WriteHalf};

/// Tunables of a session.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Bytes a stream may have in flight towards us (its receive window,
    /// while the link's receive budget allows).
    pub window: u32,
    /// All streams' receive windows together: the link's receive memory.
    pub recv_budget: u64,
    /// Streams at once on the link, both directions.
    pub max_streams: usize,
    /// Send a PING this often (liveness, NAT mappings, round-trip time).
    pub keepalive: Duration,
    /// Declare the link dead when nothing arrived for this long.
    pub dead_after: Duration,
    /// Fail the link when a write to the transport makes no progress for
    /// this long (a peer that stopped reading).
    pub write_timeout: Duration,
    /// Most incoming stream requests waiting for the gateway.
    pub incoming_backlog: usize,
    /// The dialer runs a fresh key exchange this long after the last one
    /// (when both sides support it).
    pub key_exchange_interval: Duration,
    /// ... or once this many bytes crossed the link since the last one.
    pub key_exchange_bytes: u64,
    /// Pace what this side sends to this many bytes per second
    /// (`[[peer]] bandwidth`); `None`: as fast as the transport takes it.
    pub pace: Option<u64>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        let mux = MuxConfig::default();
        SessionConfig {
            window: mux.window,
            recv_budget: mux.recv_budget,
            max_streams: mux.max_streams,
            keepalive: mux.keepalive,
            dead_after: mux.dead_after,
            write_timeout: Duration::from_secs(30),
            incoming_backlog: 256,
            key_exchange_interval: Duration::from_secs(3600),
            key_exchange_bytes: 64 << 30,
            pace: None,
        }
    }
}

impl SessionConfig {
    fn mux(&self) -> MuxConfig {
        MuxConfig {
            window: self.window,
            recv_budget: self.recv_budget,
            max_streams: self.max_streams,
            keepalive: self.keepalive,
            dead_after: self.dead_after,
            ..MuxConfig::default()
        }
    }
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

/// A snapshot of a session's counters.
#[derive(Clone, Debug, Default)]
pub struct SessionStats {
    /// Stream payload, round trip and stream counts from the multiplexer.
    pub mux: MuxStats,
    /// Bytes written to and read from the transport (records included).
    pub wire_sent: u64,
    /// Bytes read from the transport.
    pub wire_received: u64,
    /// Fresh key exchanges completed since the link came up.
    pub key_exchanges: u64,
    /// Without a configured pace: the rate, in bytes per second, the link
    /// paces itself to right now (interactive streams beside bulk on a path
    /// slower than the writer), `None` while it does not.
    pub auto_pace: Option<u64>,
    /// Datagrams that arrived and were dropped because whoever takes them
    /// fell behind (see [`Session::take_datagrams`]).
    pub datagrams_dropped: u64,
}

/// The most a paced writer sends ahead of its pace at once (see
/// [`Mux::poll_transmit_urgent`]).
const URGENT_BATCH: usize = 16 * 1024;
/// How long after its last paced write a writer still counts as paced.
const AUTO_PACE_SHOWN_FOR: Duration = Duration::from_secs(1);
/// Bytes read from the transport at a time.
const READ_CHUNK: usize = 256 * 1024;

/// The reader's buffer: a read's worth and a partial record before it.
const READ_BUFFER: usize = READ_CHUNK + MAX_RECORD + 2;

/// Stream data at least this large is handed on as a slice of the read
/// buffer rather than copied; a slice holds the whole buffer in memory
/// until the stream's reader takes it, so at most `READ_BUFFER /
/// SLICE_MIN` (10) times the bytes queued.
const SLICE_MIN: usize = 32 * 1024;
/// What the writer task needs besides the session.
struct WriterConfig {
    write_timeout: Duration,
    /// `[[peer]] bandwidth`, in bytes per second.
    pace: Option<u64>,
    /// The TCP socket under the transport, to bound its unsent bytes.
    unsent_limit: Option<socket2::Socket>,
}

#[derive(Default)]
struct StreamWakers {
    read: Option<Waker>,
    write: Option<Waker>,
}

struct State {
    mux: Mux,
    wakers: HashMap<u32, StreamWakers>,
    open_replies: HashMap<u32, oneshot::Sender<Result<(), String>>>,
    /// Set once the session ended: no new streams.
    ended: bool,
    /// Fresh key exchanges, when both sides support them.
    kex: Option<KexState>,
    /// Stream tasks to wake, and whether to wake the writer, once the lock
    /// is released (see [`Locked`]).
    deferred_wakes: Vec<Waker>,
    writer_due: bool,
}

/// The session state, locked. Wake-ups decided under the lock fire when it
/// is released: a task woken on another worker thread would otherwise run
/// at once into the lock its waker still holds, and both threads would
/// sleep and wake in the kernel for every hand-off.
struct Locked<'a> {
    guard: Option<MutexGuard<'a, State>>,
    shared: &'a Shared,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.guard.as_mut().expect("held until dropped")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        let wakes = std::mem::take(&mut guard.deferred_wakes);
        let writer_due = std::mem::replace(&mut guard.writer_due, false);
        drop(guard);
        if writer_due {
            self.shared.writer_wake.notify_one();
        }
        for waker in wakes {
            waker.wake();
        }
    }
}

/// A record key, wiped when dropped.
type RecordKey = zeroize::Zeroizing<[u8; 32]>;

/// Where the session is in its fresh key exchanges (see `kex`).
struct KexState {
    chain: Chain,
    /// The dialer sent INIT and waits for REPLY.
    initiated: Option<Initiated>,
    /// The hub sent REPLY: the key for the dialer's records after its DONE.
    awaiting_done: Option<RecordKey>,
    /// The key the writer seals with after the REPLY or DONE it sends next.
    next_send: Option<RecordKey>,
    /// When the last round started, and the link's byte count then.
    started: Instant,
    bytes_at_start: u64,
    interval: Duration,
    bytes: u64,
    /// How long the dialer waits for REPLY.
    answer_within: Duration,
}

struct Shared {
    state: Mutex<State>,
    /// Becomes true when the first record from the peer was opened.
    authenticated: watch::Sender<bool>,
    writer_wake: Notify,
    reader_wake: Notify,
    /// The timer's deadline moved earlier (a key exchange round ended).
    timer_wake: Notify,
    end: watch::Sender<Option<LinkEnd>>,
    wire_sent: AtomicU64,
    /// See [`SessionStats::auto_pace`]: the writer's automatic pace and
    /// when it last wrote with it (an idle writer paces nothing).
    auto_pace: Mutex<Option<(u64, std::time::Instant)>>,
    wire_received: AtomicU64,
    /// Datagrams received, for whoever took the receiver.
    datagrams: mpsc::Sender<Datagram>,
    datagrams_rx: Mutex<Option<mpsc::Receiver<Datagram>>>,
    /// Received datagrams dropped because their reader was behind.
    datagrams_dropped: AtomicU64,
}

/// A datagram that arrived over the link.
#[derive(Debug)]
pub struct Datagram {
    /// Its flow (see [`Session::open_flow`], [`Session::peer_flow`]).
    pub flow: u32,
    /// The service it is for, when the peer opened the flow.
    pub service: Option<String>,
    /// The datagram, whole.
    pub payload: Vec<u8>,
}

/// Datagrams received and not yet taken, at most (then they are dropped).
const DATAGRAM_BACKLOG: usize = 1024;

fn wake(slot: &mut Option<Waker>, deferred: &mut Vec<Waker>) {
    if let Some(waker) = slot.take() {
        deferred.push(waker);
    }
}

impl Shared {
    fn lock(&self) -> Locked<'_> {
        Locked {
            guard: Some(self.state.lock().unwrap_or_else(|p| p.into_inner())),
            shared: self,
        }
    }

    /// Fires the wakers and replies for the multiplexer's events, wakes the
    /// writer if something became sendable, and returns incoming stream
    /// requests (to hand to the gateway after the lock is released).
    fn settle(&self, state: &mut State) -> Vec<(u32, String)> {
        let mut incoming = Vec::new();
        while let Some(event) = state.mux.poll_event() {
            match event {
                Event::Incoming { id, service } => incoming.push((id, service)),
                Event::Opened(id) => {
                    let delivered = state
                        .open_replies
                        .remove(&id)
                        .is_some_and(|reply| reply.send(Ok(())).is_ok());
                    if !delivered {
                        // Whoever opened it stopped waiting.
                        state.mux.release(id);
                    }
                }
                Event::OpenFailed { id, reason } => {
                    if let Some(reply) = state.open_replies.remove(&id) {
                        let _ = reply.send(Err(reason));
                    }
                }
                Event::Readable(id) => {
                    if let Some(w) = state.wakers.get_mut(&id) {
                        wake(&mut w.read, &mut state.deferred_wakes);
                    }
                }
                Event::Writable(id) => {
                    if let Some(w) = state.wakers.get_mut(&id) {
                        wake(&mut w.write, &mut state.deferred_wakes);
                    }
                }
                Event::Datagram {
                    flow,
                    service,
                    payload,
                } => {
                    let datagram = Datagram {
                        flow,
                        service,
                        payload,
                    };
                    // Nobody reading, or behind: dropped, as UDP would.
                    if self.datagrams.try_send(datagram).is_err() {
                        self.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if state.mux.take_dirty() {
            state.writer_due = true;
        }
        incoming
    }

    /// Marks the session ended (first reason wins), fails every stream and
    /// stops the writer once it flushed a queued CLOSE.
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
        let mut state = self.lock();
        state.ended = true;
        state.mux.fail_all(&reason);
        self.settle(&mut state);
        for (_, reply) in state.open_replies.drain() {
            let _ = reply.send(Err(reason.clone()));
        }
        drop(state);
        self.writer_wake.notify_one();
        self.reader_wake.notify_one();
    }

    /// Queues a CLOSE telling the peer why we end the link; nothing is
    /// sent after it.
    fn close(&self, reason: &str) {
        let mut state = self.lock();
        state.mux.close(reason);
        self.settle(&mut state);
    }

    /// The dialer starts a fresh key exchange when one is due (time or
    /// bytes); fails when the hub left the last one unanswered.
    fn start_key_exchange(&self, state: &mut State) -> Result<(), String> {
        if state.mux.role() != Role::Dialer {
            return Ok(());
        }
        let bytes =
            self.wire_sent.load(Ordering::Relaxed) + self.wire_received.load(Ordering::Relaxed);
        let Some(kex) = state.kex.as_mut() else {
            return Ok(());
        };
        let now = Instant::now();
        if kex.initiated.is_some() {
            return match now.duration_since(kex.started) > kex.answer_within {
                true => Err("the other gateway did not answer a key exchange".into()),
                false => Ok(()),
            };
        }
        let due = now.duration_since(kex.started) >= kex.interval
            || bytes.saturating_sub(kex.bytes_at_start) >= kex.bytes;
        // The last round's DONE must be out before the next INIT.
        if !due || kex.next_send.is_some() {
            return Ok(());
        }
        let (initiated, init) = kex.chain.initiate().map_err(|e| e.to_string())?;
        if state.mux.send_key_exchange(KexStep::Init, init) {
            kex.initiated = Some(initiated);
            kex.started = now;
            kex.bytes_at_start = bytes;
        }
        Ok(())
    }

    /// Handles a KEY_EXCHANGE record from the peer (already opened). The
    /// dialer's REPLY switches `opener` to the hub's new key at once; the
    /// hub's DONE switches it to the dialer's.
    fn key_exchange(&self, plaintext: &[u8], opener: &mut Opener) -> Result<(), String> {
        let Ok(Frame::KeyExchange { step, message }) = Frame::decode(plaintext) else {
            return Err("malformed key exchange frame".into());
        };
        let mut state = self.lock();
        let state = &mut *state;
        let Some(kex) = state.kex.as_mut() else {
            return Err("key exchange frame on a link that did not negotiate it".into());
        };
        let failed = |e: crate::handshake::HandshakeError| format!("key exchange failed: {e}");
        match (state.mux.role(), step) {
            (Role::Acceptor, KexStep::Init) if kex.awaiting_done.is_none() => {
                let (reply, keys) = kex.chain.respond(message).map_err(failed)?;
                kex.awaiting_done = Some(keys.recv);
                kex.next_send = Some(keys.send);
                if !state.mux.send_key_exchange(KexStep::Reply, reply) {
                    return Err("key exchange out of step".into());
                }
            }
            (Role::Acceptor, KexStep::Done) if message.is_empty() => {
                let key = kex
                    .awaiting_done
                    .take()
                    .ok_or("unexpected key exchange DONE")?;
                *opener = Opener::new(*key);
            }
            (Role::Dialer, KexStep::Reply) => {
                let initiated = kex
                    .initiated
                    .take()
                    .ok_or("unexpected key exchange REPLY")?;
                let keys = kex.chain.finish(initiated, message).map_err(failed)?;
                *opener = Opener::new(*keys.recv);
                kex.next_send = Some(keys.send);
                // The next round is due an interval after this one ended.
                kex.started = Instant::now();
                if !state.mux.send_key_exchange(KexStep::Done, Vec::new()) {
                    return Err("key exchange out of step".into());
                }
                self.timer_wake.notify_one();
            }
            _ => return Err(format!("unexpected key exchange step {step:?}")),
        }
        self.settle(state);
        Ok(())
    }

    fn end_reason(&self) -> String {
        match &*self.end.borrow() {
            Some(end) => end.to_string(),
            None => "closing".into(),
        }
    }
}

// === Session ===

/// A handle to an established link; cheap to clone.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

/// A stream the other gateway wants to open to one of our services.
/// Dropping it without an answer refuses it.
pub struct IncomingStream {
    shared: Arc<Shared>,
    id: u32,
    answered: bool,
    /// The service it asks for.
    pub service: String,
}

impl Session {
    /// Starts the session's tasks on an authenticated transport. Incoming
    /// stream requests arrive on the returned receiver.
    pub fn start(
        transport: impl Transport,
        keys: SessionKeys,
        role: Role,
        config: SessionConfig,
    ) -> (Session, mpsc::Receiver<IncomingStream>) {
        let (end, _) = watch::channel(None);
        let (datagrams_tx, datagrams_rx) = mpsc::channel(DATAGRAM_BACKLOG);
        let mut mux = Mux::new(role, config.mux(), Instant::now().into_std());
        if keys.features.contains(Features::DATAGRAMS) {
            mux.enable_datagrams();
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                mux,
                wakers: HashMap::new(),
                open_replies: HashMap::new(),
                ended: false,
                kex: keys
                    .features
                    .contains(Features::KEY_EXCHANGE)
                    .then(|| KexState {
                        chain: Chain::new(&keys, role == Role::Dialer),
                        initiated: None,
                        awaiting_done: None,
                        next_send: None,
                        started: Instant::now(),
                        bytes_at_start: 0,
                        interval: config.key_exchange_interval,
                        bytes: config.key_exchange_bytes,
                        answer_within: config.dead_after,
                    }),
                deferred_wakes: Vec::new(),
                writer_due: false,
            }),
            writer_wake: Notify::new(),
            reader_wake: Notify::new(),
            timer_wake: Notify::new(),
            authenticated: watch::channel(false).0,
            end,
            wire_sent: AtomicU64::new(0),
            auto_pace: Mutex::new(None),
            wire_received: AtomicU64::new(0),
            datagrams: datagrams_tx,
            datagrams_rx: Mutex::new(Some(datagrams_rx)),
            datagrams_dropped: AtomicU64::new(0),
        });
        let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_backlog);
        let writer_config = WriterConfig {
            write_timeout: config.write_timeout,
            pace: config.pace,
            unsent_limit: transport.tcp_socket(),
        };
        let (read_half, write_half) = transport.into_halves();
        let opener = Opener::new(keys.recv);
        let sealer = Sealer::new(keys.send);
        let writer_shared = shared.clone();
        tokio::spawn(async move {
            if let Err(end) = run_writer(&writer_shared, write_half, sealer, writer_config).await {
                writer_shared.finish(end);
            }
        });
        let reader_shared = shared.clone();
        tokio::spawn(async move {
            let end = run_reader(&reader_shared, read_half, opener, incoming_tx).await;
            reader_shared.finish(end);
        });
        tokio::spawn(run_timer(shared.clone()));
        (Session { shared }, incoming_rx)
    }

    /// The datagrams that arrive over the link, for the one caller that
    /// takes them (`None` after the first call). Until then, and whenever
    /// the taker falls behind by [`DATAGRAM_BACKLOG`], they are dropped.
    pub fn take_datagrams(&self) -> Option<mpsc::Receiver<Datagram>> {
        self.shared
            .datagrams_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// A new id for a datagram flow this side opens.
    pub fn open_flow(&self) -> u32 {
        self.shared.lock().mux.open_flow()
    }

    /// Whether the other gateway opened flow `flow`.
    pub fn peer_flow(&self, flow: u32) -> bool {
        self.shared.lock().mux.peer_flow(flow)
    }

    /// Sends one datagram of `flow` (naming the other gateway's `service`
    /// on a flow this side opened), or drops it and says why.
    pub fn send_datagram(
        &self,
        flow: u32,
        service: Option<&str>,
        payload: &[u8],
    ) -> Result<(), crate::mux::DatagramDrop> {
        let mut state = self.shared.lock();
        let sent = state.mux.send_datagram(flow, service, payload);
        self.shared.settle(&mut state);
        sent
    }

    /// Opens a stream to the other gateway's `service`; resolves once the
    /// other side accepted or refused it.
    pub async fn open(&self, service: &str) -> Result<LinkStream, OpenError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let id = {
            let mut state = self.shared.lock();
            if state.ended {
                return Err(OpenError::LinkDown(self.shared.end_reason()));
            }
            // The link is up but will not take one more stream (its limit,
            // or it is closing): the caller reports it like a refusal.
            let id = state.mux.open(service).map_err(OpenError::Refused)?;
            state.open_replies.insert(id, reply_tx);
            state.wakers.insert(id, StreamWakers::default());
            self.shared.settle(&mut state);
            id
        };
        // Until the answer, a drop of this future must release the stream.
        let guard = LinkStream {
            shared: self.shared.clone(),
            id,
        };
        match reply_rx.await {
            Ok(Ok(())) => Ok(guard),
            Ok(Err(reason)) => {
                if self.is_ended() {
                    Err(OpenError::LinkDown(reason))
                } else {
                    Err(OpenError::Refused(reason))
                }
            }
            Err(_) => Err(OpenError::LinkDown(self.shared.end_reason())),
        }
    }

    /// Sends an authenticated CLOSE record and stops sending; the session
    /// ends when the peer closes its side.
    pub fn close(&self, reason: &str) {
        self.shared.close(reason);
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

    /// Resolves once a record from the other side was opened: proof that it
    /// holds the session keys (a replayed handshake never gets this far).
    /// Returns false if the session ended first.
    pub async fn authenticated(&self) -> bool {
        let mut seen = self.shared.authenticated.subscribe();
        tokio::select! {
            result = seen.wait_for(|&seen| seen) => result.is_ok(),
            _ = self.ended() => *self.shared.authenticated.borrow(),
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

    /// Counters now: bytes each way, streams, round-trip time.
    pub fn stats(&self) -> SessionStats {
        let state = self.shared.lock();
        SessionStats {
            mux: state.mux.stats(),
            key_exchanges: state.kex.as_ref().map_or(0, |kex| kex.chain.completed()),
            wire_sent: self.shared.wire_sent.load(Ordering::Relaxed),
            auto_pace: self.current_auto_pace(),
            wire_received: self.shared.wire_received.load(Ordering::Relaxed),
            datagrams_dropped: self.shared.datagrams_dropped.load(Ordering::Relaxed),
        }
    }

    /// The writer's automatic pace, if it wrote with one lately.
    fn current_auto_pace(&self) -> Option<u64> {
        let paced = *self
            .shared
            .auto_pace
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        paced
            .filter(|(_, at)| at.elapsed() < AUTO_PACE_SHOWN_FOR)
            .map(|(rate, _)| rate)
    }
}

impl IncomingStream {
    /// Accepts the stream; the other side may send at once. None if the
    /// link ended (or the other side gave up) meanwhile.
    pub fn accept(mut self) -> Option<LinkStream> {
        self.answered = true;
        let mut state = self.shared.lock();
        if !state.mux.accept(self.id) {
            return None;
        }
        state.wakers.insert(self.id, StreamWakers::default());
        self.shared.settle(&mut state);
        drop(state);
        Some(LinkStream {
            shared: self.shared.clone(),
            id: self.id,
        })
    }

    /// Refuses the stream, telling the other side why.
    pub fn refuse(mut self, reason: &str) {
        self.answered = true;
        self.refuse_now(reason);
    }

    fn refuse_now(&self, reason: &str) {
        let mut state = self.shared.lock();
        state.mux.refuse(self.id, reason);
        self.shared.settle(&mut state);
    }
}

impl Drop for IncomingStream {
    fn drop(&mut self) {
        if !self.answered {
            self.refuse_now("the gateway did not take the stream");
        }
    }
}

// === Tasks ===

/// Takes frames from the scheduler, seals them in order and writes them.
/// Returns Ok when our CLOSE went out or the session ended.
async fn run_writer(
    shared: &Arc<Shared>,
    mut transport: WriteHalf,
    mut sealer: Sealer,
    config: WriterConfig,
) -> Result<(), LinkEnd> {
    let WriterConfig {
        write_timeout,
        pace,
        unsent_limit,
    } = config;
    let mut out: Vec<u8> = Vec::with_capacity(MAX_BATCH + MAX_RECORD + 2);
    // Each record's place in `out`, and for a REPLY or DONE the key that
    // seals the records after it.
    let mut records: Vec<(usize, usize, Option<RecordKey>)> = Vec::new();
    let mut budget = SendBudget::new(pace, Instant::now().into_std());
    let mut unsent_limit_set = 0;
    loop {
        // While the pace holds bulk data back, a keystroke or a control
        // frame that becomes due goes at once (paid for from the pace),
        // rather than waiting out the pacer's turn: on a narrow WAN that
        // turn is several milliseconds of every round trip.
        let (allowance, urgent_only) = match budget.allowance(Instant::now().into_std()) {
            Ok(bytes) => (bytes, false),
            Err(next) => {
                tokio::select! {
                    () = tokio::time::sleep_until(Instant::from_std(next)) => continue,
                    () = shared.writer_wake.notified() => (URGENT_BATCH, true),
                }
            }
        };
        // On a slower path the batch is put together only once the kernel
        // will take it: a record that becomes due meanwhile (a keystroke)
        // is then scheduled into it ahead of bulk data, instead of waiting
        // behind a bulk batch sealed earlier.
        let batch_started = Instant::now();
        // Urgent frames are few and small: they go past the gate.
        let gate = unsent_limit
            .as_ref()
            .zip(budget.unsent_gate())
            .filter(|_| !urgent_only);
        if let Some(gate) = gate {
            if tokio::time::timeout(write_timeout, below_unsent_limit(gate))
                .await
                .is_err()
            {
                return Err(LinkEnd::Failed(format!(
                    "the other gateway has not taken data for {write_timeout:?}"
                )));
            }
        }
        let (close_sent, ended) = {
            let mut state = shared.lock();
            let now = Instant::now().into_std();
            let throttled = !state.mux.wants_read();
            state.mux.set_frame_limit(budget.frame_limit());
            while out.len() < allowance {
                let start = out.len();
                out.extend_from_slice(&[0, 0]);
                let composed = match urgent_only {
                    true => state.mux.poll_transmit_urgent(now, &mut out),
                    false => state.mux.poll_transmit(now, &mut out),
                };
                if !composed {
                    out.truncate(start);
                    break;
                }
                let switch =
                    out[start + 2] == KEY_EXCHANGE_TYPE && out[start + 3] != KexStep::Init as u8;
                let next_key = match switch {
                    true => match state.kex.as_mut().and_then(|kex| kex.next_send.take()) {
                        Some(key) => Some(key),
                        None => return Err(LinkEnd::Failed("key exchange out of step".into())),
                    },
                    false => None,
                };
                out.extend_from_slice(&[0; TAG_LEN]);
                records.push((start, out.len(), next_key));
            }
            if state.mux.take_sparse_beside_bulk() {
                budget.interactive(now);
            }
            shared.settle(&mut state);
            if throttled && state.mux.wants_read() {
                shared.reader_wake.notify_one();
            }
            (state.mux.close_sent(), state.ended)
        };
        if out.is_empty() {
            if urgent_only {
                continue;
            }
            if close_sent || ended {
                let _ = tokio::time::timeout(write_timeout, transport.shutdown()).await;
                return Ok(());
            }
            tokio::select! {
                () = shared.writer_wake.notified() => {}
                sent = transport.idle() => if let Err(e) = sent {
                    return Err(LinkEnd::Failed(format!("writing to the link: {e}")));
                },
            }
            continue;
        }
        for (start, end, next_key) in records.drain(..) {
            sealer.seal_in_place(&mut out[start..end]);
            if let Some(key) = next_key {
                sealer = Sealer::new(*key);
            }
        }
        let batch_len = out.len();
        // Waiting for the kernel before the batch was put together is part
        // of what writing it took: the path's rate is measured from both.
        let write_started = batch_started;
        let result =
            tokio::time::timeout(write_timeout, write_out(&mut transport, &mut out, gate)).await;
        let now = Instant::now();
        match urgent_only {
            true => budget.wrote_urgent(now.into_std(), batch_len),
            false => budget.wrote(now.into_std(), batch_len, now - write_started),
        }
        *shared.auto_pace.lock().unwrap_or_else(|p| p.into_inner()) =
            budget.auto_pace().map(|rate| (rate, now.into_std()));
        if let Some(socket) = &unsent_limit {
            let limit = budget.unsent_limit();
            if limit != unsent_limit_set {
                // Best effort: without it the kernel just queues more.
                let _ = socket.set_tcp_notsent_lowat(limit);
                unsent_limit_set = limit;
            }
        }
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(LinkEnd::Failed(format!("writing to the link: {e}"))),
            Err(_) => {
                return Err(LinkEnd::Failed(format!(
                    "the other gateway has not taken data for {write_timeout:?}"
                )))
            }
        }
        shared
            .wire_sent
            .fetch_add(batch_len as u64, Ordering::Relaxed);
        out.clear();
        if out.capacity() > 4 * MAX_BATCH {
            out.shrink_to(MAX_BATCH + MAX_RECORD + 2);
        }
    }
}

/// How often a writer held back by the kernel's unsent bytes looks again
/// (the timer's resolution; 2.5 KB drain at 20 Mbit/s meanwhile).
const UNSENT_POLL: Duration = Duration::from_millis(1);

/// Writes a batch. Given `gate` (the TCP socket and a limit: a slower
/// path), a byte stream gets the batch in pieces of the limit, each once
/// the kernel holds fewer unsent bytes than that, and a message transport
/// gets it once it does: the kernel appends a write to its last unsent
/// segment whatever `TCP_NOTSENT_LOWAT` says, so without the gate a record
/// due on another stream could wait behind 64 KB (26 ms at 20 Mbit/s).
async fn write_out(
    transport: &mut WriteHalf,
    out: &mut [u8],
    gate: Option<(&socket2::Socket, usize)>,
) -> io::Result<()> {
    let Some(gate @ (_, limit)) = gate else {
        return transport.write_batch(out).await;
    };
    match transport {
        WriteHalf::Bytes(stream) => {
            use tokio::io::AsyncWriteExt;
            for piece in out.chunks(limit) {
                below_unsent_limit(gate).await;
                stream.write_all(piece).await?;
            }
            stream.flush().await
        }
        WriteHalf::Batches(_) => {
            below_unsent_limit(gate).await;
            transport.write_batch(out).await
        }
    }
}

/// Waits until the kernel holds fewer unsent bytes on `socket` than the
/// limit. An error (no such ioctl) opens the gate: the kernel's own limit
/// still holds for new segments.
async fn below_unsent_limit((socket, limit): (&socket2::Socket, usize)) {
    while crate::unsent::unsent_bytes(socket).is_ok_and(|unsent| unsent >= limit) {
        tokio::time::sleep(UNSENT_POLL).await;
    }
}

/// Sends keepalive probes and declares a silent link dead.
async fn run_timer(shared: Arc<Shared>) {
    let mut end = shared.end.subscribe();
    loop {
        let due = {
            let state = shared.lock();
            let due = state.mux.next_timeout();
            match &state.kex {
                Some(kex) if state.mux.role() == Role::Dialer => {
                    let wait = match kex.initiated {
                        Some(_) => kex.answer_within + Duration::from_millis(1),
                        None => kex.interval,
                    };
                    due.min((kex.started + wait).into_std())
                }
                _ => due,
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(Instant::from_std(due)) => {}
            () = shared.timer_wake.notified() => {}
            _ = end.changed() => return,
        }
        let result = {
            let mut state = shared.lock();
            let result = state
                .mux
                .handle_timeout(Instant::now().into_std())
                .and_then(|()| shared.start_key_exchange(&mut state));
            shared.settle(&mut state);
            result
        };
        if let Err(reason) = result {
            shared.finish(LinkEnd::Failed(reason));
            return;
        }
    }
}

/// A frame opened by the reader, for the multiplexer.
enum Received {
    /// DATA: the stream and its payload, already copied out of the record.
    Data(u32, Bytes),
    /// DATA: the stream, and where its payload sits in the read buffer.
    DataAt(u32, usize, usize),
    /// Any other frame: where its plaintext sits in the read buffer.
    Other(usize, usize),
}

async fn run_reader(
    shared: &Arc<Shared>,
    mut transport: ReadHalf,
    mut opener: Opener,
    incoming: mpsc::Sender<IncomingStream>,
) -> LinkEnd {
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    let mut end = shared.end.subscribe();
    loop {
        // Peer-caused replies backed up: let the writer catch up first.
        loop {
            let notified = shared.reader_wake.notified();
            {
                let state = shared.lock();
                if state.ended {
                    return LinkEnd::Failed(shared.end_reason());
                }
                if state.mux.wants_read() {
                    break;
                }
            }
            notified.await;
        }
        // The opened records before it may still be queued as slices of
        // the old buffer: then this takes a new one.
        buf.reserve(READ_BUFFER - buf.len());
        let n = tokio::select! {
            read = transport.read_buf(&mut buf) => match read {
                Ok(n) => n,
                Err(e) => return LinkEnd::Failed(format!("reading from the link: {e}")),
            },
            _ = end.changed() => return LinkEnd::Failed(shared.end_reason()),
        };
        if n == 0 {
            return match shared.lock().mux.close_received() {
                Some(reason) => LinkEnd::Closed(reason.to_string()),
                None => LinkEnd::Failed(
                    "the connection ended without a close record (truncated)".into(),
                ),
            };
        }
        shared.wire_received.fetch_add(n as u64, Ordering::Relaxed);
        // Open every complete record outside the lock, then hand the frames
        // to the multiplexer in one go.
        let mut at = 0;
        let mut plaintexts: Vec<Received> = Vec::new();
        let base = buf.as_ptr() as usize;
        while let Some(len) = complete_record_len(&buf[at..]) {
            match opener.open(&mut buf[at + 2..at + len]) {
                // Handled at once: the next record may be sealed with the
                // keys this one brings.
                Ok(plaintext) if plaintext.first() == Some(&KEY_EXCHANGE_TYPE) => {
                    if let Err(reason) = shared.key_exchange(plaintext, &mut opener) {
                        shared.close(&reason);
                        return LinkEnd::Failed(reason);
                    }
                }
                // A large piece of stream data is queued as a slice of the
                // read buffer (no copy); a small one is copied outside the
                // lock, so that it never holds a whole buffer in memory.
                Ok(plaintext) => plaintexts.push(match Frame::decode(plaintext) {
                    Ok(Frame::Data { id, data }) if data.len() >= SLICE_MIN => {
                        Received::DataAt(id, data.as_ptr() as usize - base, data.len())
                    }
                    Ok(Frame::Data { id, data }) => {
                        Received::Data(id, Bytes::copy_from_slice(data))
                    }
                    _ => Received::Other(at + 2, plaintext.len()),
                }),
                Err(e) => {
                    shared.close(&e.to_string());
                    return LinkEnd::Failed(e.to_string());
                }
            }
            at += len;
        }
        let opened_any = !plaintexts.is_empty();
        let opened = buf.split_to(at).freeze();
        let requests = {
            let mut state = shared.lock();
            let now = Instant::now().into_std();
            for received in plaintexts.drain(..) {
                let handled = match received {
                    Received::Data(id, data) => state.mux.handle_data(id, data, now),
                    Received::DataAt(id, start, len) => {
                        state
                            .mux
                            .handle_data(id, opened.slice(start..start + len), now)
                    }
                    Received::Other(start, len) => Frame::decode(&opened[start..start + len])
                        .map_err(|e| crate::mux::ProtocolError(e.to_string()))
                        .and_then(|frame| state.mux.handle_frame(frame, now)),
                }
                .map_err(|e| e.0);
                if let Err(reason) = handled {
                    state.mux.close(&reason);
                    shared.settle(&mut state);
                    return LinkEnd::Failed(reason);
                }
            }
            shared.settle(&mut state)
        };
        if opened_any {
            shared
                .authenticated
                .send_if_modified(|seen| !std::mem::replace(seen, true));
        }
        for (id, service) in requests {
            let request = IncomingStream {
                shared: shared.clone(),
                id,
                answered: false,
                service,
            };
            if let Err(
                mpsc::error::TrySendError::Full(mut request)
                | mpsc::error::TrySendError::Closed(mut request),
            ) = incoming.try_send(request)
            {
                request.answered = true;
                request.refuse_now("the gateway is too busy to accept more streams");
            }
        }
    }
}

// === LinkStream ===

/// One stream over a link: an ordered, flow-controlled byte stream with
/// half-close. Dropping it before both directions finished resets it.
pub struct LinkStream {
    shared: Arc<Shared>,
    id: u32,
}

fn broken(reason: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, reason.to_string())
}

impl LinkStream {
    /// The stream's number on its session, the same at both ends: a
    /// service at one end can name, to the other, the stream it serves.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Takes received chunks, `max` bytes at most, without copying them:
    /// appends them to `chunks` and returns how many bytes; `Ok(0)` at the
    /// end of the stream. For relays, which write the chunks on as they are.
    pub fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        chunks: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        let mut state = self.shared.lock();
        match state.mux.read_state(self.id) {
            ReadState::Data => {
                let mut taken = 0;
                while taken < max {
                    let Some(chunk) = state.mux.read_chunk(self.id, max - taken) else {
                        break;
                    };
                    taken += chunk.len();
                    chunks.push_back(chunk);
                }
                self.shared.settle(&mut state);
                Poll::Ready(Ok(taken))
            }
            ReadState::Eof => Poll::Ready(Ok(0)),
            ReadState::Reset(reason) => Poll::Ready(Err(broken(&reason))),
            ReadState::Gone => Poll::Ready(Err(broken("stream closed"))),
            ReadState::Blocked => {
                if let Some(w) = state.wakers.get_mut(&self.id) {
                    w.read = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    /// Queues the front of `data` (as much as the send queue takes) without
    /// copying it; returns how many bytes were taken off `data`. For relays,
    /// which hand over the buffer they read into.
    pub fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut state = self.shared.lock();
        let written = state.mux.write_chunk(self.id, data);
        self.finish_write(&mut state, written, cx)
    }

    fn finish_write(
        &self,
        state: &mut Locked<'_>,
        written: WriteState,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match written {
            WriteState::Queued(n) => {
                self.shared.settle(state);
                Poll::Ready(Ok(n))
            }
            WriteState::Blocked => {
                if let Some(w) = state.wakers.get_mut(&self.id) {
                    w.write = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            WriteState::Reset(reason) => Poll::Ready(Err(broken(&reason))),
            WriteState::Finished => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            ))),
        }
    }
}

impl AsyncRead for LinkStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut state = this.shared.lock();
        match state.mux.read_state(this.id) {
            ReadState::Data => {
                // Only the part that will be filled is initialised: a
                // caller's uninitialised buffer is not zeroed whole.
                let want = state.mux.buffered(this.id).min(buf.remaining());
                let n = state
                    .mux
                    .read_into(this.id, buf.initialize_unfilled_to(want));
                buf.advance(n);
                this.shared.settle(&mut state);
                Poll::Ready(Ok(()))
            }
            ReadState::Eof => Poll::Ready(Ok(())),
            ReadState::Reset(reason) => Poll::Ready(Err(broken(&reason))),
            ReadState::Gone => Poll::Ready(Err(broken("stream closed"))),
            ReadState::Blocked => {
                if let Some(w) = state.wakers.get_mut(&this.id) {
                    w.read = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for LinkStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        let mut state = this.shared.lock();
        let written = state.mux.write(this.id, data);
        this.finish_write(&mut state, written, cx)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The writer task sends queued data as soon as the scheduler allows.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut state = this.shared.lock();
        let result = state.mux.finish(this.id);
        this.shared.settle(&mut state);
        Poll::Ready(result.map_err(|reason| broken(&reason)))
    }
}

impl Drop for LinkStream {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.wakers.remove(&self.id);
        state.open_replies.remove(&self.id);
        state.mux.release(self.id);
        self.shared.settle(&mut state);
    }
}
