//! Relays bytes both ways between a client and its target until both sides
//! have closed, passing half-closes on, counting bytes, and enforcing the
//! idle timeout. Buffers are borrowed only while data flows ([`crate::bufpool`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

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
    /// The source reached EOF; the sink is being shut down.
    ShuttingDown,
    Done,
}

struct Direction {
    way: Way,
    state: State,
    bytes: u64,
    /// Something was written since the last flush.
    unflushed: bool,
    /// A cap holds this direction back until this timer fires.
    capped: Option<(Pin<Box<tokio::time::Sleep>>, Instant)>,
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
                    let mut buf = PooledBuf::take();
                    let mut read_buf = ReadBuf::new(&mut buf[..allowed.min(BUF_SIZE)]);
                    match Pin::new(&mut *source).poll_read(cx, &mut read_buf) {
                        Poll::Pending => {
                            // `buf` goes back to the pool here: idle costs nothing.
                            if self.unflushed {
                                std::task::ready!(Pin::new(&mut *sink).poll_flush(cx))
                                    .map_err(Failure::Write)?;
                                self.unflushed = false;
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Read(e))),
                        Poll::Ready(Ok(())) => {
                            let end = read_buf.filled().len();
                            if end > 0 && !caps.is_empty() {
                                caps.consume(self.way, Instant::now().into_std(), end);
                            }
                            self.state = if end == 0 {
                                State::ShuttingDown
                            } else {
                                *moved = true;
                                State::Writing { buf, pos: 0, end }
                            };
                        }
                    }
                }
                State::Writing { buf, pos, end } => {
                    let n =
                        std::task::ready!(Pin::new(&mut *sink).poll_write(cx, &buf[*pos..*end]))
                            .map_err(Failure::Write)?;
                    if n == 0 {
                        return Poll::Ready(Err(Failure::Write(io::ErrorKind::WriteZero.into())));
                    }
                    *pos += n;
                    self.bytes += n as u64;
                    if let Some((live, up)) = live {
                        live.add(up, n as u64);
                    }
                    self.unflushed = true;
                    *moved = true;
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
