//! The stream multiplexer, sans-IO: the stream table, flow-control windows,
//! per-stream send and receive queues, and the scheduler that picks the next
//! frame to send. No sockets, no clock (time is passed in), no wakers: the
//! caller feeds frames in ([`Mux::handle_frame`]), takes frames out
//! ([`Mux::poll_transmit`]) and reacts to [`Event`]s. `session` drives it
//! over a transport.
//!
//! Scheduling: control frames first (OPEN, OPEN_OK, OPEN_FAIL, RESET, CLOSE,
//! then a due PING/PONG and window updates), then stream data by deficit
//! round robin over two lists, as fq_codel does: a stream that had nothing
//! queued joins the *new* list and is served before streams that stayed
//! busy (the *old* list), so a keystroke does not wait behind bulk
//! transfers on the same link.
//!
//! Bounds against a hostile peer (all per link, documented in
//! docs/link-protocol.md): at most `max_streams` streams; receive windows
//! drawn from one budget of `recv_budget` bytes (each stream gets at least
//! [`MIN_WINDOW`]); received data is held in buffers of its own (never a
//! slice of a larger read buffer), so memory follows what is buffered, not
//! which records it came in; at most one pending PONG and one window update per
//! stream; peer-caused control replies (OPEN_FAIL) past [`CONTROL_LIMIT`]
//! make [`Mux::wants_read`] false so the caller stops reading; stream ids
//! only increase, windows never exceed [`MAX_WINDOW`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use chunks::ChunkQueue;

use crate::frame::{Frame, KexStep, MAX_DATA, MAX_TEXT};

/// Largest window (and send credit) a stream may have: 2³¹ − 1, as in
/// HTTP/2. A WINDOW frame that would go past it is a protocol error.
pub const MAX_WINDOW: u64 = (1 << 31) - 1;
/// The smallest receive window a stream is given, however full the link's
/// budget is, so every stream can make progress.
pub const MIN_WINDOW: u32 = 64 * 1024;
/// Control frames queued at once before the caller should stop reading
/// (peer-caused replies would otherwise grow without bound).
pub const CONTROL_LIMIT: usize = 1024;
/// All streams' send queues together may hold about this much: with many
/// streams each gets `SEND_BUDGET / streams` (at least [`MIN_SEND_QUEUE`]),
/// so a peer that grants no credit cannot make us queue more.
pub const SEND_BUDGET: usize = 16 * 1024 * 1024;
/// The smallest send queue a stream gets.
pub const MIN_SEND_QUEUE: usize = 16 * 1024;
/// Bytes of data a stream is served before others get their turn.
const QUANTUM: i64 = 16 * 1024;

/// Which end of the link we are: decides stream id parity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// We dialed (odd stream ids).
    Dialer,
    /// We accepted (even stream ids).
    Acceptor,
}

/// Tunables of the multiplexer.
#[derive(Clone, Debug)]
pub struct MuxConfig {
    /// The receive window a stream gets while the budget allows.
    pub window: u32,
    /// All streams' receive windows together (the link's receive memory).
    pub recv_budget: u64,
    /// Streams (both directions, opening ones included) at once.
    pub max_streams: usize,
    /// Bytes a local writer may queue on one stream before it waits, while
    /// the link's send budget allows (see [`SEND_BUDGET`]).
    pub send_queue: usize,
    /// Send a PING this often (RTT measurement and liveness).
    pub keepalive: Duration,
    /// Declare the link dead when nothing arrived for this long.
    pub dead_after: Duration,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            window: 2 * 1024 * 1024,
            recv_budget: 32 * 1024 * 1024,
            max_streams: 256,
            // As much as the window: a bulk stream's relay can queue a
            // whole window ahead of the writer. With 256 KiB (one relay
            // read) the relay and the writer took turns every 128 KiB,
            // each turn a wake-up: 1.98 against 1.37 CPU s/GB on the raw
            // link (bench/README, 2026-12-03 evening). The link's total
            // stays bounded by SEND_BUDGET.
            send_queue: 2 * 1024 * 1024,
            keepalive: Duration::from_secs(5),
            dead_after: Duration::from_secs(15),
        }
    }
}

/// Something the driver must react to.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The peer asks for a stream to our `service`: accept or refuse it.
    Incoming { id: u32, service: String },
    /// Our OPEN was accepted.
    Opened(u32),
    /// Our OPEN was refused, or the link ended first.
    OpenFailed { id: u32, reason: String },
    /// Data, end of stream or a reset is ready to be read.
    Readable(u32),
    /// Room in the send queue again (or the stream was reset).
    Writable(u32),
    /// A datagram of flow `flow` arrived; the opener of a flow names the
    /// receiver's service in each of its datagrams.
    Datagram {
        flow: u32,
        service: Option<String>,
        payload: Vec<u8>,
    },
}

/// Why a datagram was not queued (it is dropped, as UDP would).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatagramDrop {
    /// The other gateway did not announce the datagram feature.
    NotSupported,
    /// Larger than a link carries ([`crate::frame::MAX_DATAGRAM`]), or a
    /// service name longer than [`crate::frame::MAX_DATAGRAM_SERVICE`].
    TooLarge,
    /// The link's datagram queue is full: the link is busier than the
    /// datagrams' rate.
    QueueFull,
    /// The link is closing.
    Closing,
}

/// Datagrams waiting to be sent, at most this many bytes: on a busy link a
/// datagram is dropped rather than kept waiting (UDP's users want fresh
/// data, not old).
pub const DATAGRAM_QUEUE_BYTES: usize = 256 * 1024;

/// The peer broke the protocol: the link must be closed with this reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// What reading a stream found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadState {
    /// Buffered bytes are available (see [`Mux::recv_slices`]).
    Data,
    /// The peer finished sending: end of stream.
    Eof,
    /// The stream was aborted; the reason.
    Reset(String),
    /// Nothing yet: wait for [`Event::Readable`].
    Blocked,
    /// No such stream.
    Gone,
}

/// What writing to a stream did.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteState {
    /// This many bytes were queued.
    Queued(usize),
    /// The send queue is full: wait for [`Event::Writable`].
    Blocked,
    /// The stream was aborted (or the link ended); the reason.
    Reset(String),
    /// The stream was already finished for sending.
    Finished,
}

/// Counters for the console and metrics.
#[derive(Clone, Debug, Default)]
pub struct MuxStats {
    /// Stream payload bytes sent.
    pub bytes_sent: u64,
    /// Stream payload bytes received.
    pub bytes_received: u64,
    /// Streams in the table now.
    pub streams: usize,
    /// Streams opened over the link's life, both directions.
    pub streams_total: u64,
    /// The latest PING round trip.
    pub rtt: Option<Duration>,
    /// The smoothed PING round trip (7/8 old + 1/8 new, as TCP's SRTT).
    pub srtt: Option<Duration>,
    /// Datagrams sent, received, and dropped before sending.
    pub datagrams_sent: u64,
    /// See `datagrams_sent`.
    pub datagrams_received: u64,
    /// See `datagrams_sent`.
    pub datagrams_dropped: u64,
}

/// What the multiplexer holds in memory (see [`Mux::memory`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MuxMemory {
    /// Bytes allocated for data received and not yet read, all streams.
    pub received: usize,
    /// Bytes allocated for data queued to send, all streams.
    pub queued: usize,
    /// Control frames waiting to be sent.
    pub control: usize,
    /// All receive windows together: what the peer may make us buffer.
    pub windows: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum List {
    New,
    Old,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// We sent OPEN and wait for OPEN_OK.
    Opening,
    /// The peer sent OPEN; the gateway has not decided yet.
    Pending,
    /// Both sides agreed.
    Open,
}

struct Stream {
    phase: Phase,
    /// The local handle is gone; the stream lives on only to send what
    /// was queued and its FIN.
    detached: bool,
    // Receiving.
    recv: ChunkQueue,
    /// This stream's share of the receive budget.
    window: u32,
    /// Bytes the peer may still send.
    allowance: u64,
    /// Bytes read by the application since the last WINDOW.
    consumed: u64,
    /// Window increment waiting to be sent.
    window_due: u64,
    fin_received: bool,
    reset: Option<String>,
    // Sending.
    send: ChunkQueue,
    credit: u64,
    fin_queued: bool,
    fin_sent: bool,
    writer_waiting: bool,
    list: Option<List>,
    deficit: i64,
}

impl Stream {
    fn new(phase: Phase, window: u32, credit: u64) -> Self {
        Stream {
            phase,
            detached: false,
            recv: ChunkQueue::default(),
            window,
            allowance: u64::from(window),
            consumed: 0,
            window_due: 0,
            fin_received: false,
            reset: None,
            send: ChunkQueue::default(),
            credit,
            fin_queued: false,
            fin_sent: false,
            writer_waiting: false,
            list: None,
            deficit: 0,
        }
    }

    /// Whether the scheduler has something for this stream to send now.
    fn sendable(&self) -> bool {
        self.phase == Phase::Open
            && self.reset.is_none()
            && ((!self.send.is_empty() && self.credit > 0)
                || (self.send.is_empty() && self.fin_queued && !self.fin_sent))
    }

    /// Both directions ended cleanly (or it was reset): nothing more to do.
    fn finished(&self) -> bool {
        self.reset.is_some() || (self.fin_sent && self.fin_received)
    }
}

enum Control {
    Open {
        id: u32,
        window: u32,
        service: String,
    },
    OpenOk {
        id: u32,
        window: u32,
    },
    OpenFail {
        id: u32,
        reason: String,
    },
    Reset {
        id: u32,
        reason: String,
    },
}

fn untrusted(text: &str) -> String {
    crate::handshake::untrusted_text(text.as_bytes(), MAX_TEXT)
}

fn capped(text: &str) -> String {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// The multiplexer of one link.
pub struct Mux {
    role: Role,
    config: MuxConfig,
    streams: HashMap<u32, Stream>,
    /// Next id for a stream we open.
    next_local: u32,
    /// Lowest id the peer may open next (ids only increase).
    next_peer: u32,
    /// Sum of all streams' receive windows.
    windows_total: u64,
    control: VecDeque<Control>,
    /// Control entries caused by the peer (OPEN_FAIL replies).
    peer_control: usize,
    pong_due: Option<u64>,
    ping_due: Option<u64>,
    /// The session's key-exchange message waiting to go out (one at a time).
    key_exchange: Option<(KexStep, Vec<u8>)>,
    window_updates: VecDeque<u32>,
    new_flows: VecDeque<u32>,
    old_flows: VecDeque<u32>,
    /// A sparse stream's data went out while a bulk one had data waiting
    /// (see [`Mux::take_sparse_beside_bulk`]).
    sparse_beside_bulk: bool,
    events: VecDeque<Event>,
    /// Our CLOSE: queued (with its reason) and whether it went out.
    close: Option<String>,
    close_sent: bool,
    /// The peer's CLOSE reason, once received.
    close_received: Option<String>,
    /// Set when something became sendable; cleared by [`Mux::take_dirty`].
    dirty: bool,
    last_received: Instant,
    next_ping: Instant,
    ping_counter: u64,
    ping_outstanding: Option<(u64, Instant)>,
    stats: MuxStats,
    /// Largest DATA payload the scheduler puts in one frame now.
    frame_limit: usize,
    /// Both sides announced datagrams.
    datagrams: bool,
    /// Encoded DATAGRAM frames waiting, and their bytes.
    datagram_queue: VecDeque<Vec<u8>>,
    datagram_bytes: usize,
    /// The last frame sent was a datagram: stream data goes next if any.
    datagram_turn: bool,
    /// Next id for a datagram flow we open (same parity rule as streams).
    next_flow: u32,
}

impl Mux {
    /// A multiplexer for a link that was just established at `now`.
    pub fn new(role: Role, config: MuxConfig, now: Instant) -> Self {
        let (next_local, next_peer) = match role {
            Role::Dialer => (1, 2),
            Role::Acceptor => (2, 1),
        };
        Mux {
            role,
            // The first PING goes out at once: it proves to the other side
            // that we hold the session keys (a replayed handshake cannot
            // send it), and it measures the round trip from the start.
            next_ping: now,
            config,
            streams: HashMap::new(),
            next_local,
            next_peer,
            windows_total: 0,
            control: VecDeque::new(),
            peer_control: 0,
            pong_due: None,
            ping_due: None,
            key_exchange: None,
            window_updates: VecDeque::new(),
            new_flows: VecDeque::new(),
            sparse_beside_bulk: false,
            old_flows: VecDeque::new(),
            events: VecDeque::new(),
            close: None,
            close_sent: false,
            close_received: None,
            dirty: false,
            last_received: now,
            ping_counter: 0,
            ping_outstanding: None,
            stats: MuxStats::default(),
            frame_limit: MAX_DATA,
            datagrams: false,
            datagram_queue: VecDeque::new(),
            datagram_bytes: 0,
            datagram_turn: false,
            next_flow: next_local,
        }
    }

    /// Lets datagrams cross the link (both sides announced the feature).
    pub fn enable_datagrams(&mut self) {
        self.datagrams = true;
    }

    /// A new id for a datagram flow this side opens: the dialer's are odd,
    /// the acceptor's even, so the two sides never pick the same.
    pub fn open_flow(&mut self) -> u32 {
        let flow = self.next_flow;
        self.next_flow = self.next_flow.wrapping_add(2).max(2 - (flow & 1));
        flow
    }

    /// Whether the peer opened flow `flow` (else we did).
    pub fn peer_flow(&self, flow: u32) -> bool {
        (flow & 1 == 1) != (self.role == Role::Dialer)
    }

    /// Queues one datagram of `flow`, naming the peer's `service` when we
    /// opened the flow. It goes out before queued stream data (taking turns
    /// with it when both are waiting), or is dropped.
    pub fn send_datagram(
        &mut self,
        flow: u32,
        service: Option<&str>,
        payload: &[u8],
    ) -> Result<(), DatagramDrop> {
        let refused = |mux: &mut Mux, why| {
            mux.stats.datagrams_dropped += 1;
            Err(why)
        };
        if !self.datagrams {
            return refused(self, DatagramDrop::NotSupported);
        }
        if self.close.is_some() || self.close_sent {
            return refused(self, DatagramDrop::Closing);
        }
        if payload.len() > crate::frame::MAX_DATAGRAM
            || service.is_some_and(|s| s.len() > crate::frame::MAX_DATAGRAM_SERVICE)
        {
            return refused(self, DatagramDrop::TooLarge);
        }
        if self.datagram_bytes + payload.len() + crate::frame::DATAGRAM_OVERHEAD
            > DATAGRAM_QUEUE_BYTES
        {
            return refused(self, DatagramDrop::QueueFull);
        }
        let mut frame = Vec::with_capacity(payload.len() + crate::frame::DATAGRAM_OVERHEAD);
        Frame::Datagram {
            flow,
            service,
            payload,
        }
        .encode(&mut frame);
        self.datagram_bytes += frame.len();
        self.datagram_queue.push_back(frame);
        self.dirty = true;
        Ok(())
    }

    fn transmit_datagram(&mut self, out: &mut Vec<u8>) -> bool {
        let Some(frame) = self.datagram_queue.pop_front() else {
            return false;
        };
        self.datagram_bytes -= frame.len();
        out.extend_from_slice(&frame);
        self.stats.datagrams_sent += 1;
        self.datagram_turn = true;
        true
    }

    /// Caps the payload of the DATA frames made from now on (at least
    /// 1 KiB, at most [`MAX_DATA`]). A slow or paced link sends smaller
    /// records, so that a record due on another stream never waits behind
    /// a large one already on the wire.
    pub fn set_frame_limit(&mut self, bytes: usize) {
        self.frame_limit = bytes.clamp(1024, MAX_DATA);
    }

    // === Local API ===

    /// Queues an OPEN for the peer's `service` and returns the new stream's
    /// id; [`Event::Opened`] or [`Event::OpenFailed`] follows.
    pub fn open(&mut self, service: &str) -> Result<u32, String> {
        if self.close.is_some() || self.close_received.is_some() {
            return Err("the link is closing".into());
        }
        if self.streams.len() >= self.config.max_streams {
            return Err(format!(
                "the link already carries its maximum of {} streams",
                self.config.max_streams
            ));
        }
        let id = self.next_local;
        self.next_local = id
            .checked_add(2)
            .ok_or("the link has used up its stream ids; it must reconnect")?;
        let window = self.grant_window();
        self.streams
            .insert(id, Stream::new(Phase::Opening, window, 0));
        self.stats.streams_total += 1;
        self.push_control(Control::Open {
            id,
            window,
            service: capped(service),
        });
        Ok(id)
    }

    /// Accepts the peer's pending stream `id`; false if it is gone.
    pub fn accept(&mut self, id: u32) -> bool {
        let Some(stream) = self.streams.get_mut(&id) else {
            return false;
        };
        if stream.phase != Phase::Pending {
            return false;
        }
        stream.phase = Phase::Open;
        let window = stream.window;
        self.push_control(Control::OpenOk { id, window });
        true
    }

    /// Refuses the peer's pending stream `id`, telling it why.
    pub fn refuse(&mut self, id: u32, reason: &str) {
        if self
            .streams
            .get(&id)
            .is_some_and(|s| s.phase == Phase::Pending)
        {
            self.remove(id);
            self.push_control(Control::OpenFail {
                id,
                reason: capped(reason),
            });
        }
    }

    /// What a read of stream `id` would find now. With [`ReadState::Data`],
    /// take the bytes with [`Mux::read_into`] or [`Mux::read_chunk`].
    pub fn read_state(&self, id: u32) -> ReadState {
        let Some(stream) = self.streams.get(&id) else {
            return ReadState::Gone;
        };
        if !stream.recv.is_empty() {
            ReadState::Data
        } else if stream.fin_received {
            ReadState::Eof
        } else if let Some(reason) = &stream.reset {
            ReadState::Reset(reason.clone())
        } else {
            ReadState::Blocked
        }
    }

    /// Bytes buffered on stream `id`, not yet read.
    pub fn buffered(&self, id: u32) -> usize {
        self.streams.get(&id).map_or(0, |stream| stream.recv.len())
    }

    /// Copies buffered bytes of stream `id` into `dst` (as many as fit)
    /// and marks them read; returns how many.
    pub fn read_into(&mut self, id: u32, dst: &mut [u8]) -> usize {
        let n = self
            .streams
            .get_mut(&id)
            .map_or(0, |stream| stream.recv.copy_into(dst));
        self.consumed(id, n);
        n
    }

    /// Takes the next buffered chunk of stream `id` (at most `max` bytes),
    /// without copying it, and marks it read.
    pub fn read_chunk(&mut self, id: u32, max: usize) -> Option<Bytes> {
        let chunk = self.streams.get_mut(&id)?.recv.pop(max)?;
        self.consumed(id, chunk.len());
        Some(chunk)
    }

    /// `n` buffered bytes of stream `id` were read; grants the peer more
    /// window once a quarter of it was consumed.
    fn consumed(&mut self, id: u32, n: usize) {
        let budget_free = self.config.recv_budget.saturating_sub(self.windows_total);
        let max_window = u64::from(self.config.window);
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.consumed += n as u64;
        if stream.fin_received || stream.reset.is_some() {
            return;
        }
        if stream.consumed >= u64::from(stream.window) / 4 {
            // Grow a stream that got a small window while the link was busy.
            let grown = (u64::from(stream.window) + budget_free).min(max_window);
            let growth = grown.saturating_sub(u64::from(stream.window));
            stream.window = grown as u32;
            self.windows_total += growth;
            let increment = std::mem::take(&mut stream.consumed) + growth;
            stream.allowance += increment;
            if stream.window_due == 0 {
                self.window_updates.push_back(id);
            }
            stream.window_due += increment;
            self.dirty = true;
        }
    }

    /// Queues a copy of `data` (or of the part that fits) on stream `id`.
    pub fn write(&mut self, id: u32, data: &[u8]) -> WriteState {
        let room = match self.send_room(id) {
            Ok(room) => room,
            Err(state) => return state,
        };
        let n = room.min(data.len());
        self.queue(id, Bytes::copy_from_slice(&data[..n]))
    }

    /// Queues `data` on stream `id` without copying it: takes the part
    /// that fits off its front (all of it when there is room).
    pub fn write_chunk(&mut self, id: u32, data: &mut Bytes) -> WriteState {
        let room = match self.send_room(id) {
            Ok(room) => room,
            Err(state) => return state,
        };
        let chunk = data.split_to(room.min(data.len()));
        self.queue(id, chunk)
    }

    /// Room in stream `id`'s send queue, or why it takes nothing now.
    fn send_room(&mut self, id: u32) -> Result<usize, WriteState> {
        let send_queue = self.send_cap();
        let Some(stream) = self.streams.get_mut(&id) else {
            return Err(WriteState::Reset("stream closed".into()));
        };
        if let Some(reason) = &stream.reset {
            return Err(WriteState::Reset(reason.clone()));
        }
        if stream.fin_queued {
            return Err(WriteState::Finished);
        }
        let room = send_queue.saturating_sub(stream.send.len());
        if room == 0 {
            stream.writer_waiting = true;
            return Err(WriteState::Blocked);
        }
        Ok(room)
    }

    fn queue(&mut self, id: u32, chunk: Bytes) -> WriteState {
        let n = chunk.len();
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.send.push(chunk);
        }
        self.schedule(id);
        WriteState::Queued(n)
    }

    /// Half-closes stream `id` for sending: FIN follows the queued data.
    /// Err with the reason when the stream was reset (unless the peer had
    /// finished sending first: then there is nothing left to tell it).
    pub fn finish(&mut self, id: u32) -> Result<(), String> {
        let Some(stream) = self.streams.get_mut(&id) else {
            return Err("stream closed".into());
        };
        if stream.fin_queued {
            return Ok(());
        }
        if let Some(reason) = &stream.reset {
            // A peer that finished sending and then left has nothing more
            // to learn from our end of stream: like TCP's shutdown towards
            // a closed socket, this is not an error.
            if stream.fin_received {
                stream.fin_queued = true;
                stream.fin_sent = true;
                return Ok(());
            }
            return Err(reason.clone());
        }
        stream.fin_queued = true;
        self.schedule(id);
        Ok(())
    }

    /// The local handle of stream `id` is gone. A stream that ended cleanly
    /// both ways is forgotten; one whose FIN is queued still sends its data
    /// and FIN first (then a RESET, unless the peer finished too: we will
    /// not read more); any other is reset at once, its queued data dropped.
    pub fn release(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.finished() {
            self.remove(id);
        } else if stream.fin_queued && !stream.fin_sent {
            stream.detached = true;
            stream.recv.clear();
        } else {
            self.remove(id);
            self.push_control(Control::Reset {
                id,
                reason: "stream closed".into(),
            });
        }
    }

    /// Queues an authenticated CLOSE; nothing is sent after it.
    pub fn close(&mut self, reason: &str) {
        if self.close.is_none() {
            self.close = Some(capped(reason));
            self.dirty = true;
        }
    }

    /// The link ended: every stream is reset with `reason` and every open
    /// in progress fails. Queued data is dropped (a queued CLOSE stays).
    pub fn fail_all(&mut self, reason: &str) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            let stream = self.streams.get_mut(&id).expect("listed");
            match stream.phase {
                Phase::Opening => {
                    self.remove(id);
                    self.events.push_back(Event::OpenFailed {
                        id,
                        reason: reason.to_string(),
                    });
                }
                _ if stream.detached => self.remove(id),
                _ => {
                    stream.reset.get_or_insert_with(|| reason.to_string());
                    stream.send.clear();
                    self.events.push_back(Event::Readable(id));
                    self.events.push_back(Event::Writable(id));
                }
            }
        }
        self.control.clear();
        self.peer_control = 0;
        self.window_updates.clear();
        self.new_flows.clear();
        self.old_flows.clear();
        self.pong_due = None;
        self.ping_due = None;
    }

    // === Wire ===

    /// Handles one frame from the peer, received at `now`.
    /// Handles a DATA frame from the peer whose payload the caller already
    /// copied into a buffer of its own (`data`), received at `now`.
    pub fn handle_data(&mut self, id: u32, data: Bytes, now: Instant) -> Result<(), ProtocolError> {
        self.last_received = now;
        let err = |text: String| Err(ProtocolError(text));
        if self.close_received.is_some() {
            return err("frame after the close record".into());
        }
        if data.is_empty() || data.len() > MAX_DATA {
            return err("empty or oversized data frame".into());
        }
        self.check_used(id)?;
        let Some(stream) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if stream.phase != Phase::Open {
            return err(format!("data on stream {id} before it was open"));
        }
        if stream.fin_received {
            return err(format!("data on stream {id} after its end"));
        }
        if data.len() as u64 > stream.allowance {
            return err(format!("stream {id} sent beyond its window"));
        }
        stream.allowance -= data.len() as u64;
        self.stats.bytes_received += data.len() as u64;
        if stream.reset.is_some() || stream.detached {
            // Nobody will read it.
            return Ok(());
        }
        stream.recv.push(data);
        self.events.push_back(Event::Readable(id));
        Ok(())
    }

    /// Handles one frame from the peer, received at `now`.
    pub fn handle_frame(&mut self, frame: Frame<'_>, now: Instant) -> Result<(), ProtocolError> {
        if let Frame::Data { id, data } = frame {
            return self.handle_data(id, Bytes::copy_from_slice(data), now);
        }
        self.last_received = now;
        let err = |text: String| Err(ProtocolError(text));
        if self.close_received.is_some() {
            return err("frame after the close record".into());
        }
        match frame {
            Frame::Data { .. } => {}
            Frame::Open {
                id,
                window,
                service,
            } => {
                if self.role_of(id) == self.role || id < self.next_peer {
                    return err(format!("invalid stream id {id} in open"));
                }
                if u64::from(window) > MAX_WINDOW {
                    return err(format!("stream {id} opened with a window over 2^31-1"));
                }
                self.next_peer = id.saturating_add(2);
                if self.streams.len() >= self.config.max_streams
                    || self.close.is_some()
                    || self.peer_control >= CONTROL_LIMIT
                {
                    let reason = if self.close.is_some() {
                        "the link is closing".to_string()
                    } else {
                        format!(
                            "the link already carries its maximum of {} streams",
                            self.config.max_streams
                        )
                    };
                    self.peer_control += 1;
                    self.push_control(Control::OpenFail { id, reason });
                    return Ok(());
                }
                let own_window = self.grant_window();
                self.streams.insert(
                    id,
                    Stream::new(Phase::Pending, own_window, u64::from(window)),
                );
                self.stats.streams_total += 1;
                self.events.push_back(Event::Incoming {
                    id,
                    service: untrusted(service),
                });
            }
            Frame::OpenOk { id, window } => {
                if u64::from(window) > MAX_WINDOW {
                    return err(format!("stream {id} accepted with a window over 2^31-1"));
                }
                self.check_used(id)?;
                let Some(stream) = self.streams.get_mut(&id) else {
                    return Ok(());
                };
                if stream.phase != Phase::Opening {
                    return err(format!("open-ok for stream {id} that was not opening"));
                }
                stream.phase = Phase::Open;
                stream.credit = u64::from(window);
                self.events.push_back(Event::Opened(id));
                self.schedule(id);
            }
            Frame::OpenFail { id, reason } => {
                self.check_used(id)?;
                let Some(stream) = self.streams.get_mut(&id) else {
                    return Ok(());
                };
                if stream.phase != Phase::Opening {
                    return err(format!("open-fail for stream {id} that was not opening"));
                }
                self.remove(id);
                self.events.push_back(Event::OpenFailed {
                    id,
                    reason: untrusted(reason),
                });
            }
            Frame::Window { id, increment } => {
                self.check_used(id)?;
                let Some(stream) = self.streams.get_mut(&id) else {
                    return Ok(());
                };
                let credit = stream.credit + u64::from(increment);
                if credit > MAX_WINDOW {
                    return err(format!("stream {id}'s window grew past 2^31-1"));
                }
                stream.credit = credit;
                self.schedule(id);
            }
            Frame::Fin { id } => {
                self.check_used(id)?;
                let Some(stream) = self.streams.get_mut(&id) else {
                    return Ok(());
                };
                if stream.phase != Phase::Open {
                    return err(format!("fin on stream {id} before it was open"));
                }
                stream.fin_received = true;
                if stream.detached && stream.fin_sent {
                    self.remove(id);
                } else {
                    self.events.push_back(Event::Readable(id));
                }
            }
            Frame::Reset { id, reason } => {
                self.check_used(id)?;
                let Some(stream) = self.streams.get_mut(&id) else {
                    return Ok(());
                };
                if stream.phase == Phase::Opening {
                    return err(format!("reset of stream {id} before it was answered"));
                }
                if stream.detached {
                    self.remove(id);
                    return Ok(());
                }
                // A pending stream keeps the reset for the gateway to find
                // when it takes the stream; a scheduled one is skipped.
                stream.reset = Some(format!("reset by the other gateway: {}", untrusted(reason)));
                stream.send.clear();
                self.events.push_back(Event::Readable(id));
                self.events.push_back(Event::Writable(id));
            }
            Frame::Ping(value) => {
                self.pong_due = Some(value);
                self.dirty = true;
            }
            Frame::Pong(value) => {
                if let Some((expected, sent)) = self.ping_outstanding {
                    if value == expected {
                        let rtt = now.saturating_duration_since(sent);
                        self.stats.rtt = Some(rtt);
                        self.stats.srtt = Some(match self.stats.srtt {
                            Some(srtt) => (srtt * 7 + rtt) / 8,
                            None => rtt,
                        });
                        self.ping_outstanding = None;
                    }
                }
            }
            Frame::Close { reason } => {
                self.close_received = Some(untrusted(reason));
                // Answer with our own close so the peer sees a clean end too.
                self.close("closed in reply to the other gateway");
            }
            // The session handles key exchanges itself (they change its
            // keys); one reaching the multiplexer was not negotiated.
            Frame::KeyExchange { .. } => return err("unexpected key exchange frame".into()),
            Frame::Datagram {
                flow,
                service,
                payload,
            } => {
                if !self.datagrams {
                    return err("datagram frame, but datagrams were not negotiated".into());
                }
                self.stats.datagrams_received += 1;
                self.events.push_back(Event::Datagram {
                    flow,
                    service: service.map(str::to_string),
                    payload: payload.to_vec(),
                });
            }
        }
        Ok(())
    }

    /// Which end of the link we are.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Queues a key-exchange frame from the session; it goes out before
    /// anything else. Returns false (and queues nothing) while another one
    /// is still waiting, or once the link is closing.
    pub fn send_key_exchange(&mut self, step: KexStep, message: Vec<u8>) -> bool {
        if self.key_exchange.is_some() || self.close.is_some() {
            return false;
        }
        self.key_exchange = Some((step, message));
        self.dirty = true;
        true
    }

    /// Encodes the next frame to send into `out` (the plaintext of one
    /// record); false when there is nothing to send now.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) -> bool {
        if self.transmit_control(now, out) {
            return true;
        }
        if self.close_sent {
            return false;
        }
        // Datagrams never wait behind stream data; when both are waiting
        // they take turns, so neither starves the other.
        let streams_waiting = !self.new_flows.is_empty() || !self.old_flows.is_empty();
        if (!self.datagram_turn || !streams_waiting) && self.transmit_datagram(out) {
            return true;
        }
        if self.transmit_data(out, false) {
            self.datagram_turn = false;
            return true;
        }
        self.transmit_datagram(out)
    }

    /// Like [`Mux::poll_transmit`], but only a frame that should not wait
    /// for a paced writer's next turn: control, key exchange, keepalive and
    /// window frames, and a sparse stream's data (a keystroke, a request:
    /// a stream on the new-flows list, at most one quantum before it counts
    /// as bulk). Bulk data and datagrams wait for the pace.
    pub fn poll_transmit_urgent(&mut self, now: Instant, out: &mut Vec<u8>) -> bool {
        self.transmit_control(now, out) || (!self.close_sent && self.transmit_data(out, true))
    }

    /// Encodes the next control frame, if one is due.
    fn transmit_control(&mut self, now: Instant, out: &mut Vec<u8>) -> bool {
        if self.close_sent {
            return false;
        }
        if let Some((step, message)) = self.key_exchange.take() {
            Frame::KeyExchange {
                step,
                message: &message,
            }
            .encode(out);
            return true;
        }
        if let Some(control) = self.control.pop_front() {
            match control {
                Control::Open {
                    id,
                    window,
                    service,
                } => Frame::Open {
                    id,
                    window,
                    service: &service,
                }
                .encode(out),
                Control::OpenOk { id, window } => Frame::OpenOk { id, window }.encode(out),
                Control::OpenFail { id, reason } => {
                    self.peer_control = self.peer_control.saturating_sub(1);
                    Frame::OpenFail {
                        id,
                        reason: &reason,
                    }
                    .encode(out)
                }
                Control::Reset { id, reason } => Frame::Reset {
                    id,
                    reason: &reason,
                }
                .encode(out),
            }
            return true;
        }
        if let Some(reason) = &self.close {
            Frame::Close { reason }.encode(out);
            self.close_sent = true;
            return true;
        }
        if let Some(value) = self.pong_due.take() {
            Frame::Pong(value).encode(out);
            return true;
        }
        if let Some(value) = self.ping_due.take() {
            Frame::Ping(value).encode(out);
            self.ping_outstanding.get_or_insert((value, now));
            return true;
        }
        while let Some(id) = self.window_updates.pop_front() {
            if let Some(stream) = self.streams.get_mut(&id) {
                let increment = std::mem::take(&mut stream.window_due);
                if increment > 0 && stream.reset.is_none() && !stream.fin_received {
                    Frame::Window {
                        id,
                        increment: increment.min(MAX_WINDOW) as u32,
                    }
                    .encode(out);
                    return true;
                }
            }
        }
        false
    }

    /// Whether, since the last call, a sparse stream's data (one that had
    /// sent little lately: keystrokes, requests) went out while a bulk
    /// stream had data waiting: what the writer paces for (DESIGN §5
    /// "Fair links").
    pub fn take_sparse_beside_bulk(&mut self) -> bool {
        std::mem::take(&mut self.sparse_beside_bulk)
    }

    /// Deficit round robin: new flows first, then old ones (unless
    /// `new_only`).
    fn transmit_data(&mut self, out: &mut Vec<u8>, new_only: bool) -> bool {
        let send_queue = self.send_cap();
        loop {
            let (id, list) = match (self.new_flows.front(), self.old_flows.front()) {
                (Some(&id), _) => (id, List::New),
                (None, Some(&id)) if !new_only => (id, List::Old),
                _ => return false,
            };
            macro_rules! pop {
                () => {
                    match list {
                        List::New => self.new_flows.pop_front(),
                        List::Old => self.old_flows.pop_front(),
                    }
                };
            }
            let Some(stream) = self.streams.get_mut(&id) else {
                pop!();
                continue;
            };
            if !stream.sendable() {
                stream.list = None;
                pop!();
                continue;
            }
            if stream.deficit <= 0 {
                stream.deficit += QUANTUM;
                stream.list = Some(List::Old);
                pop!();
                self.old_flows.push_back(id);
                continue;
            }
            if stream.send.is_empty() {
                // Only the FIN is left.
                Frame::Fin { id }.encode(out);
                stream.fin_sent = true;
                stream.list = None;
                pop!();
                if stream.detached {
                    let reset = !stream.fin_received;
                    self.remove(id);
                    if reset {
                        self.push_control(Control::Reset {
                            id,
                            reason: "stream closed".into(),
                        });
                    }
                }
                return true;
            }
            // The queued bytes go out in records of equal size rather than
            // full ones and a small leftover: a relay hands over 256 KiB
            // reads, and four full records left 88 bytes that went in a
            // write (and woke the other end's reader) of their own.
            let queued = stream.send.len();
            let records = queued.div_ceil(self.frame_limit);
            let n = queued
                .div_ceil(records)
                .min(stream.credit.min(MAX_DATA as u64) as usize);
            out.push(crate::frame::DATA_TYPE);
            out.extend_from_slice(&id.to_be_bytes());
            stream.send.copy_out(n, out);
            stream.credit -= n as u64;
            stream.deficit -= n as i64;
            if list == List::New && !self.old_flows.is_empty() {
                self.sparse_beside_bulk = true;
            }
            self.stats.bytes_sent += n as u64;
            if stream.writer_waiting && stream.send.len() <= send_queue / 2 {
                stream.writer_waiting = false;
                self.events.push_back(Event::Writable(id));
            }
            if !stream.sendable() {
                stream.list = None;
                pop!();
            }
            return true;
        }
    }

    /// Keeps time: queues a PING every keepalive interval; Err when nothing
    /// arrived for `dead_after`.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), String> {
        if now.saturating_duration_since(self.last_received) >= self.config.dead_after {
            return Err(format!(
                "nothing received for {:?}: the other gateway or the network is gone",
                self.config.dead_after
            ));
        }
        if now >= self.next_ping {
            self.ping_counter += 1;
            self.ping_due = Some(self.ping_counter);
            if self.ping_outstanding.is_some_and(|(_, sent)| {
                now.saturating_duration_since(sent) >= self.config.dead_after
            }) {
                self.ping_outstanding = None;
            }
            self.next_ping = now + self.config.keepalive;
            self.dirty = true;
        }
        Ok(())
    }

    /// When [`Mux::handle_timeout`] should be called next.
    pub fn next_timeout(&self) -> Instant {
        self.next_ping
            .min(self.last_received + self.config.dead_after)
    }

    /// The next event to react to.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether something became sendable since the last call (the driver
    /// then wakes its writer).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// False while peer-caused replies are backed up: stop reading the
    /// transport until the writer has sent some.
    pub fn wants_read(&self) -> bool {
        self.peer_control < CONTROL_LIMIT
    }

    /// Whether our CLOSE went out (nothing more will be sent).
    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    /// The peer's CLOSE reason, once it arrived.
    pub fn close_received(&self) -> Option<&str> {
        self.close_received.as_deref()
    }

    /// Memory held for the link now, by what holds it. Received data sits
    /// in buffers of exactly its size; queued data may be a slice of a
    /// relay's read buffer, which that relay reuses for its next read.
    pub fn memory(&self) -> MuxMemory {
        let mut memory = MuxMemory {
            control: self.control.len(),
            windows: self.windows_total,
            ..MuxMemory::default()
        };
        for stream in self.streams.values() {
            memory.received += stream.recv.len();
            memory.queued += stream.send.len();
        }
        memory
    }

    /// Counters now.
    pub fn stats(&self) -> MuxStats {
        MuxStats {
            streams: self.streams.len(),
            ..self.stats.clone()
        }
    }

    // === Internals ===

    fn role_of(&self, id: u32) -> Role {
        if id % 2 == 1 {
            Role::Dialer
        } else {
            Role::Acceptor
        }
    }

    /// A frame may name a stream that is gone (frames may still be in
    /// flight after a reset), but never an id that was not opened yet.
    fn check_used(&self, id: u32) -> Result<(), ProtocolError> {
        let used = if self.role_of(id) == self.role {
            id < self.next_local
        } else {
            id < self.next_peer
        };
        if !used || id == 0 {
            return Err(ProtocolError(format!(
                "frame for stream {id}, never opened"
            )));
        }
        Ok(())
    }

    /// The send queue each stream may fill now.
    fn send_cap(&self) -> usize {
        (SEND_BUDGET / self.streams.len().max(1)).clamp(
            MIN_SEND_QUEUE.min(self.config.send_queue),
            self.config.send_queue,
        )
    }

    fn grant_window(&mut self) -> u32 {
        let free = self.config.recv_budget.saturating_sub(self.windows_total);
        let window = free
            .min(u64::from(self.config.window))
            .max(u64::from(MIN_WINDOW.min(self.config.window))) as u32;
        self.windows_total += u64::from(window);
        window
    }

    fn push_control(&mut self, control: Control) {
        self.control.push_back(control);
        self.dirty = true;
    }

    fn schedule(&mut self, id: u32) {
        if let Some(stream) = self.streams.get_mut(&id) {
            if stream.list.is_none() && stream.sendable() {
                stream.list = Some(List::New);
                stream.deficit = QUANTUM;
                self.new_flows.push_back(id);
                self.dirty = true;
            }
        }
    }

    fn remove(&mut self, id: u32) {
        if let Some(stream) = self.streams.remove(&id) {
            self.windows_total = self.windows_total.saturating_sub(u64::from(stream.window));
        }
    }
}

mod chunks;
#[cfg(test)]
mod tests;
