//! Relays bytes both ways between a client and its target until both sides
//! have closed, passing half-closes on, counting bytes, and enforcing the
//! idle timeout. Buffers are borrowed only while data flows ([`crate::bufpool`]).
//! When either side is a link stream, whole buffers change hands instead:
//! what is read from a socket is queued on the link as it is, and what a
//! link received is written to the socket from the buffer it arrived in.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bufpool::{PooledBuf, BUF_SIZE};
use crate::limits::{Caps, Way};
use crate::stream::Stream;

/// How a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides closed their sending direction: a clean end.
    Closed,
    /// No bytes moved either way for the idle timeout.
    IdleTimeout,
    /// The gateway was stopping and the grace period ran out.
    Shutdown,
    /// A read or write failed; the text says on which side and why.
    Error(String),
}

impl RelayOutcome {
    /// After a failure (an I/O error on either side, or the end of the
    /// shutdown grace), makes dropping both streams reset them: each side
    /// then sees an error, never a clean end that would pass a cut-off
    /// transfer for a complete one (DESIGN §4).
    pub fn pass_failure_on(&self, client: &mut Stream, target: &mut Stream) {
        if matches!(self.end, RelayEnd::Error(_) | RelayEnd::Shutdown) {
            client.abort_on_drop();
            target.abort_on_drop();
        }
    }
}

/// Bytes moved and how the relay ended.
#[derive(Debug)]
pub struct RelayOutcome {
    /// Client → target bytes delivered to the target.
    pub bytes_up: u64,
    /// Target → client bytes delivered to the client.
    pub bytes_down: u64,
    /// Why it stopped.
    pub end: RelayEnd,
}

/// Relays between `client` and `target` until both directions are closed,
/// nothing moves for `idle`, an I/O error occurs, or `stop` is cancelled.
///
/// Guarantees: bytes are written in the order read and never altered; a
/// read EOF on one side becomes a write shutdown (FIN) on the other; the
/// returned counts are bytes actually written to the receiving side.
/// With `live`, bytes are also counted into the connection's live entry
/// (and its service's counters) as they are written. Each side is read no
/// faster than every one of `caps` allows (back-pressure: the other end's
/// TCP window closes; nothing is buffered beyond one relay buffer).
pub async fn relay(
    client: &mut Stream,
    target: &mut Stream,
    idle: Duration,
    stop: &CancellationToken,
    live: Option<&crate::connections::LiveConnection>,
    caps: &Caps,
) -> RelayOutcome {
    let mut both = Bidirectional {
        client,
        target,
        up: Direction::new(Way::Up),
        down: Direction::new(Way::Down),
        live,
        caps,
        last_activity: Instant::now(),
    };
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    let end = loop {
        tokio::select! {
            result = &mut both => break match result {
                Ok(()) => RelayEnd::Closed,
                Err(e) => RelayEnd::Error(e),
            },
            () = &mut sleep => {
                let deadline = both.last_activity + idle;
                if deadline <= Instant::now() {
                    break RelayEnd::IdleTimeout;
                }
                sleep.as_mut().reset(deadline);
            }
            () = stop.cancelled() => break RelayEnd::Shutdown,
        }
    };
    RelayOutcome {
        bytes_up: both.up.bytes,
        bytes_down: both.down.bytes,
        end,
    }
}

enum State {
    /// Waiting for the source to be readable; holds no buffer.
    Reading,
    /// `buf[pos..end]` still has to be written to the sink.
    Writing {
        buf: PooledBuf,
        pos: usize,
        end: usize,
    },
    /// `chunks` still have to be written to the sink, in order (a link
    /// stream is one of the two sides).
    WritingChunks(VecDeque<Bytes>),
    /// The source reached EOF; the sink is being shut down.
    ShuttingDown,
    Done,
}

/// Below this much room left in a direction's spare buffer, the next read
/// goes to a fresh one.
const MIN_SPARE: usize = 16 * 1024;

struct Direction {
    way: Way,
    state: State,
    bytes: u64,
    /// Something was written since the last flush.
    unflushed: bool,
    /// A cap holds this direction back until this timer fires.
    capped: Option<(Pin<Box<tokio::time::Sleep>>, Instant)>,
    /// What is left of the buffer this direction reads a socket into when
    /// the sink is a link stream (the part read was handed to the link).
    spare: BytesMut,
}

enum Failure {
    Read(io::Error),
    Write(io::Error),
}

impl Direction {
    fn new(way: Way) -> Self {
        Direction {
            way,
            state: State::Reading,
            bytes: 0,
            unflushed: false,
            capped: None,
            spare: BytesMut::new(),
        }
    }

    /// How many bytes the caps let this direction read now; `Pending`
    /// (with a timer armed) when none.
    fn poll_allowance(&mut self, cx: &mut Context<'_>, caps: &Caps) -> Poll<usize> {
        if caps.is_empty() {
            return Poll::Ready(BUF_SIZE);
        }
        loop {
            if let Some((timer, since)) = &mut self.capped {
                std::task::ready!(timer.as_mut().poll(cx));
                caps.waited(since.elapsed());
                self.capped = None;
            }
            match caps.allowance(self.way, Instant::now().into_std(), BUF_SIZE) {
                Ok(n) => return Poll::Ready(n),
                Err(at) => {
                    let timer = Box::pin(tokio::time::sleep_until(Instant::from_std(at)));
                    self.capped = Some((timer, Instant::now()));
                }
            }
        }
    }

    /// Reads into a pooled buffer (socket to socket): the next state,
    /// `ShuttingDown` at EOF. Pending gives the buffer back: idle costs
    /// nothing.
    fn poll_read_pooled(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut Stream,
        allowed: usize,
    ) -> Poll<io::Result<State>> {
        let mut buf = PooledBuf::take();
        let mut read_buf = ReadBuf::new(&mut buf[..allowed.min(BUF_SIZE)]);
        std::task::ready!(Pin::new(&mut *source).poll_read(cx, &mut read_buf))?;
        let end = read_buf.filled().len();
        Poll::Ready(Ok(match end {
            0 => State::ShuttingDown,
            _ => State::Writing { buf, pos: 0, end },
        }))
    }

    /// Reads a whole buffer when a link stream is on either side: a link
    /// source gives the chunk it received; a socket is read into `spare`,
    /// whose filled part is handed on and whose rest takes the next read.
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut Stream,
        allowed: usize,
    ) -> Poll<io::Result<State>> {
        let allowed = allowed.clamp(1, BUF_SIZE);
        if let Some(link) = source.as_link() {
            let mut chunks = VecDeque::new();
            let read = std::task::ready!(link.poll_read_chunks(cx, allowed, &mut chunks))?;
            return Poll::Ready(Ok(match read {
                0 => State::ShuttingDown,
                _ => State::WritingChunks(chunks),
            }));
        }
        if self.spare.capacity() < MIN_SPARE {
            self.spare.reserve(BUF_SIZE);
        }
        let mut limited = bytes::BufMut::limit(&mut self.spare, allowed);
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut *source), cx, &mut limited);
        let Poll::Ready(read) = read else {
            // Nothing to read: let the buffer go (freed once the link sent
            // what was cut from it), so an idle connection holds none.
            self.spare = BytesMut::new();
            return Poll::Pending;
        };
        match read {
            Ok(0) => Poll::Ready(Ok(State::ShuttingDown)),
            Ok(_) => Poll::Ready(Ok(State::WritingChunks(VecDeque::from([self
                .spare
                .split()
                .freeze()])))),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Moves as many bytes as are ready; `Ready(Ok)` once the direction has
    /// been shut down. Sets `*moved` when any byte was transferred.
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut Stream,
        sink: &mut Stream,
        moved: &mut bool,
        live: Option<(&crate::connections::LiveConnection, bool)>,
        caps: &Caps,
    ) -> Poll<Result<(), Failure>> {
        loop {
            match &mut self.state {
                State::Reading => {
                    let allowed = match self.poll_allowance(cx, caps) {
                        Poll::Ready(n) => n,
                        Poll::Pending => {
                            if self.unflushed {
                                std::task::ready!(Pin::new(&mut *sink).poll_flush(cx))
                                    .map_err(Failure::Write)?;
                                self.unflushed = false;
                            }
                            return Poll::Pending;
                        }
                    };
                    let read = if source.as_link().is_some() || sink.as_link().is_some() {
                        self.poll_read_chunk(cx, source, allowed)
                    } else {
                        self.poll_read_pooled(cx, source, allowed)
                    };
                    match read {
                        Poll::Pending => {
                            if self.unflushed {
                                std::task::ready!(Pin::new(&mut *sink).poll_flush(cx))
                                    .map_err(Failure::Write)?;
                                self.unflushed = false;
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Read(e))),
                        Poll::Ready(Ok(state)) => {
                            let read = match &state {
                                State::Writing { end, .. } => *end,
                                State::WritingChunks(chunks) => chunks.iter().map(Bytes::len).sum(),
                                _ => 0,
                            };
                            if read > 0 && !caps.is_empty() {
                                caps.consume(self.way, Instant::now().into_std(), read);
                            }
                            *moved |= read > 0;
                            self.state = state;
                        }
                    }
                }
                State::WritingChunks(chunks) => {
                    let n = std::task::ready!(poll_write_chunks(cx, sink, chunks))
                        .map_err(Failure::Write)?;
                    count_written(&mut self.bytes, &mut self.unflushed, n, live, moved)?;
                    if chunks.is_empty() {
                        self.state = State::Reading;
                    }
                }
                State::Writing { buf, pos, end } => {
                    let n =
                        std::task::ready!(Pin::new(&mut *sink).poll_write(cx, &buf[*pos..*end]))
                            .map_err(Failure::Write)?;
                    count_written(&mut self.bytes, &mut self.unflushed, n, live, moved)?;
                    *pos += n;
                    if *pos == *end {
                        self.state = State::Reading;
                    }
                }
                State::ShuttingDown => {
                    std::task::ready!(Pin::new(&mut *sink).poll_shutdown(cx))
                        .map_err(Failure::Write)?;
                    self.state = State::Done;
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Counts `n` bytes a direction wrote to its sink into its byte count
/// and the connection's live entry; a write of none is an error.
fn count_written(
    bytes: &mut u64,
    unflushed: &mut bool,
    n: usize,
    live: Option<(&crate::connections::LiveConnection, bool)>,
    moved: &mut bool,
) -> Result<(), Failure> {
    if n == 0 {
        return Err(Failure::Write(io::ErrorKind::WriteZero.into()));
    }
    *bytes += n as u64;
    if let Some((live, up)) = live {
        live.add(up, n as u64);
    }
    *unflushed = true;
    *moved = true;
    Ok(())
}

/// Most buffers given to one vectored write.
const MAX_WRITE_SLICES: usize = 64;

/// Writes the front of `chunks` to `sink` (handing the buffers over when it
/// is a link stream, one vectored write otherwise) and drops what was
/// written; returns how many bytes.
fn poll_write_chunks(
    cx: &mut Context<'_>,
    sink: &mut Stream,
    chunks: &mut VecDeque<Bytes>,
) -> Poll<io::Result<usize>> {
    if let Some(link) = sink.as_link() {
        let mut written = 0;
        while let Some(front) = chunks.front_mut() {
            match link.poll_write_chunk(cx, front) {
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) if written == 0 => return Poll::Ready(Err(e)),
                // Reported by the next call, once what was taken counts.
                Poll::Ready(Err(_)) | Poll::Pending if written > 0 => break,
                other => return other,
            }
            if !front.is_empty() {
                break;
            }
            chunks.pop_front();
        }
        return Poll::Ready(Ok(written));
    }
    let slices: Vec<io::IoSlice<'_>> = chunks
        .iter()
        .take(MAX_WRITE_SLICES)
        .map(|chunk| io::IoSlice::new(chunk))
        .collect();
    let mut n = std::task::ready!(Pin::new(&mut *sink).poll_write_vectored(cx, &slices))?;
    let written = n;
    while n > 0 {
        let front = chunks
            .front_mut()
            .expect("written bytes came from the chunks");
        let take = n.min(front.len());
        front.advance(take);
        if front.is_empty() {
            chunks.pop_front();
        }
        n -= take;
    }
    Poll::Ready(Ok(written))
}

struct Bidirectional<'a> {
    client: &'a mut Stream,
    target: &'a mut Stream,
    up: Direction,
    down: Direction,
    live: Option<&'a crate::connections::LiveConnection>,
    caps: &'a Caps,
    last_activity: Instant,
}

impl Future for Bidirectional<'_> {
    type Output = Result<(), String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut moved = false;
        let live = this.live;
        let up = this.up.poll_copy(
            cx,
            this.client,
            this.target,
            &mut moved,
            live.map(|l| (l, true)),
            this.caps,
        );
        let down = this.down.poll_copy(
            cx,
            this.target,
            this.client,
            &mut moved,
            live.map(|l| (l, false)),
            this.caps,
        );
        if moved {
            this.last_activity = Instant::now();
        }
        let describe = |failure: Failure, reader: &str, writer: &str| match failure {
            Failure::Read(e) => format!("reading from {reader}: {e}"),
            Failure::Write(e) => format!("writing to {writer}: {e}"),
        };
        match (up, down) {
            (Poll::Ready(Err(f)), _) => Poll::Ready(Err(describe(f, "client", "target"))),
            (_, Poll::Ready(Err(f))) => Poll::Ready(Err(describe(f, "target", "client"))),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    }
}

/// Sends `early` (bytes the client sent along with its request) to the
/// target, relays until the end, and records bytes and outcome in `audit`.
/// `closed` is the reason written for a clean end.
pub async fn relay_and_record(
    client: &mut Stream,
    target: &mut Stream,
    early: &[u8],
    idle: crate::config::ConfigDuration,
    stop: &CancellationToken,
    audit: &mut crate::audit::Audit,
    closed: &str,
) {
    use crate::audit::AuditResult;
    use tokio::io::AsyncWriteExt;
    if !early.is_empty() {
        if let Err(e) = target.write_all(early).await {
            audit.finish(AuditResult::Error, format!("writing to target: {e}"));
            return;
        }
    }
    let live = audit.live.clone();
    if let Some(live) = &live {
        live.set_details(audit.user.as_deref(), &audit.target);
        // The early bytes went out before the relay counted anything.
        live.add(true, early.len() as u64);
    }
    let caps = audit.caps.for_user(audit.user.as_deref());
    let outcome = relay(
        client,
        target,
        idle.0,
        stop,
        live.as_deref().map(|r| &**r),
        &caps,
    )
    .await;
    outcome.pass_failure_on(client, target);
    audit.bytes_up = outcome.bytes_up + early.len() as u64;
    audit.bytes_down = outcome.bytes_down;
    match outcome.end {
        RelayEnd::Closed => audit.finish(AuditResult::Ok, closed),
        RelayEnd::IdleTimeout => audit.finish(AuditResult::Ok, format!("idle timeout ({idle})")),
        RelayEnd::Shutdown => audit.finish(
            AuditResult::Error,
            "gateway shutting down: grace period over",
        ),
        RelayEnd::Error(e) => audit.finish(AuditResult::Error, e),
    }
}
