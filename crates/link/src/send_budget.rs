//! How much the link's writer hands the transport at a time, sans-IO.
//!
//! On a fast path a large batch costs fewer system calls; on a narrow WAN
//! every byte handed to the kernel is a byte a keystroke on another stream
//! waits behind (DESIGN §5 "Fair links"). So the batch, the record size and
//! the kernel's unsent-bytes limit follow the rate the transport actually
//! drains at, measured from writes that had to wait; and with `[[peer]]
//! bandwidth` a token bucket paces the writer just below the WAN's rate,
//! so that queues form here, where the scheduler orders them, and not in
//! the modem.

use std::time::{Duration, Instant};

use crate::auto_pace::AutoPace;
use crate::pacing::TokenBucket;

/// The largest batch: what a fast path (loopback, LAN) writes at once.
pub const MAX_BATCH: usize = 256 * 1024;
/// The smallest batch (and record) a slow path gets.
pub const MIN_BATCH: usize = 16 * 1024;
/// The smallest unsent-bytes limit a slow path gets: 3 ms at 20 Mbit/s,
/// slack enough for a writer woken late.
pub const MIN_UNSENT: usize = 16 * 1024;
/// How much drain time one batch may hold: a record due on another stream
/// waits at most about this long behind what was handed over before it.
const BATCH_TIME: Duration = Duration::from_millis(4);
/// The drain rate is measured over writes that took this long together
/// (or moved [`MEASURE_BYTES`]): on a narrow path most of that is waiting
/// for the kernel to take bytes, so bytes ÷ write time is the path's rate;
/// on a fast one writes take no time and the rate comes out huge.
const MEASURE_TIME: Duration = Duration::from_millis(50);
const MEASURE_BYTES: usize = 8 << 20;
/// While paced without a configured rate: how long a stretch of writing
/// is looked at for whether the path or the pace held the writer.
const PACED_STRETCH: Duration = Duration::from_millis(100);
/// A paced writer may send this much of its rate at once.
const PACE_BURST: Duration = Duration::from_millis(4);

/// The writer's sizing and pacing state.
#[derive(Debug)]
pub struct SendBudget {
    pacer: Option<TokenBucket>,
    /// Pacing without a configured rate ([`AutoPace`]); unused with one.
    auto: AutoPace,
    batch: usize,
    /// Bytes and write time since the last measurement.
    measured_bytes: usize,
    measured_time: Duration,
    /// When the current measurement began, and whether it is of paced
    /// writing without a configured rate (see [`SendBudget::wrote`]).
    measure_started: Option<Instant>,
    measuring_auto_paced: bool,
}

impl SendBudget {
    /// Unpaced, or paced to `pace` bytes per second.
    pub fn new(pace: Option<u64>, now: Instant) -> Self {
        let pacer = pace.map(|rate| {
            let burst = (rate as f64 * PACE_BURST.as_secs_f64()) as u64;
            TokenBucket::new(rate, burst.max(MIN_BATCH as u64), now)
        });
        let mut budget = SendBudget {
            pacer,
            auto: AutoPace::default(),
            batch: MAX_BATCH,
            measured_bytes: 0,
            measured_time: Duration::ZERO,
            measure_started: None,
            measuring_auto_paced: false,
        };
        if let Some(rate) = pace {
            budget.batch = batch_for_rate(rate as f64);
        }
        budget
    }

    /// The bytes the next batch may hold at `now`, or when the pacer
    /// allows the next one.
    pub fn allowance(&mut self, now: Instant) -> Result<usize, Instant> {
        let batch = self.batch;
        match self.active_pacer(now) {
            None => Ok(batch),
            Some(pacer) => pacer.available(now, batch),
        }
    }

    /// The bucket the writer paces with at `now`: the configured one, or
    /// the automatic one while it paces.
    fn active_pacer(&mut self, now: Instant) -> Option<&mut TokenBucket> {
        let slow = self.batch < MAX_BATCH;
        match &mut self.pacer {
            Some(pacer) => Some(pacer),
            None => self.auto.bucket(now, slow),
        }
    }

    /// Interactive data went out beside bulk data at `now` (see
    /// [`AutoPace`]).
    pub fn interactive(&mut self, now: Instant) {
        self.auto.interactive(now);
    }

    /// The rate the writer paces itself to without a configured one, while
    /// it does.
    pub fn auto_pace(&self) -> Option<u64> {
        self.auto.pace()
    }

    /// The largest record payload to make now: a batch's worth, so that a
    /// record never holds more drain time than a batch.
    pub fn frame_limit(&self) -> usize {
        self.batch
    }

    /// The kernel's unsent-bytes limit to ask for (`TCP_NOTSENT_LOWAT`),
    /// so that what waits in the kernel is bounded by drain time, not by
    /// the socket's buffer size: a batch on a fast path, half a batch
    /// (about 2 ms of drain, at least [`MIN_UNSENT`]) on a slower one.
    pub fn unsent_limit(&self) -> u32 {
        match self.unsent_gate() {
            Some(limit) => limit as u32,
            None => self.batch as u32,
        }
    }

    /// On a slower path (batches below the largest), the unsent bytes
    /// under which the writer hands the kernel its next piece, and the
    /// piece's size; `None` on a fast path, where the kernel's queue drains
    /// as it fills.
    pub fn unsent_gate(&self) -> Option<usize> {
        (self.batch < MAX_BATCH).then(|| (self.batch / 2).max(MIN_UNSENT))
    }

    /// Records that `bytes` were handed to the transport at `now`, the
    /// write having taken `elapsed` (waiting for the kernel included,
    /// waiting for the pacer not).
    pub fn wrote(&mut self, now: Instant, bytes: usize, elapsed: Duration) {
        if let Some(pacer) = self.active_pacer(now) {
            pacer.consume(now, bytes);
        }
        let auto_pacing = self.pacer.is_none() && self.auto.pace().is_some();
        if self.measuring_auto_paced != auto_pacing {
            // What was measured before says nothing about this stretch.
            self.measuring_auto_paced = auto_pacing;
            self.measured_bytes = 0;
            self.measured_time = Duration::ZERO;
            self.measure_started = None;
        }
        let started = *self
            .measure_started
            .get_or_insert(now.checked_sub(elapsed).unwrap_or(now));
        self.measured_bytes += bytes;
        self.measured_time += elapsed;
        if auto_pacing {
            // Paced below the path's rate, writes do not wait for the
            // kernel; the share of the time they did says whether the
            // path still drains faster than the pace.
            let wall = now.saturating_duration_since(started);
            if wall >= PACED_STRETCH {
                let waiting = self.measured_time.as_secs_f64() / wall.as_secs_f64();
                self.auto.paced_stretch(now, waiting);
                self.reset_measurement();
            }
            return;
        }
        if self.measured_time < MEASURE_TIME && self.measured_bytes < MEASURE_BYTES {
            return;
        }
        let rate = self.measured_bytes as f64 / self.measured_time.as_secs_f64().max(1e-6);
        let pace = match &self.pacer {
            Some(pacer) => Some(pacer.rate()),
            None => {
                match batch_for_rate(rate) == MAX_BATCH {
                    true => self.auto.fast_path(),
                    false => self.auto.measured(rate),
                }
                self.auto.pace()
            }
        };
        let ceiling = pace.map_or(MAX_BATCH, |rate| batch_for_rate(rate as f64));
        self.batch = batch_for_rate(rate).min(ceiling);
        self.reset_measurement();
    }

    /// Records that `bytes` of urgent frames (see
    /// [`crate::mux::Mux::poll_transmit_urgent`]) went out at `now` ahead
    /// of the pace: the pacer is paid for them (bulk waits that much
    /// longer), the drain-rate measurement does not see them.
    pub fn wrote_urgent(&mut self, now: Instant, bytes: usize) {
        if let Some(pacer) = self.active_pacer(now) {
            pacer.consume(now, bytes);
        }
    }

    fn reset_measurement(&mut self) {
        self.measured_bytes = 0;
        self.measured_time = Duration::ZERO;
        self.measure_started = None;
    }
}

fn batch_for_rate(bytes_per_second: f64) -> usize {
    let bytes = bytes_per_second * BATCH_TIME.as_secs_f64();
    (bytes as usize).clamp(MIN_BATCH, MAX_BATCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_path_gets_small_batches_and_a_fast_one_large() {
        let now = Instant::now();
        let mut budget = SendBudget::new(None, now);
        assert_eq!(budget.allowance(now), Ok(MAX_BATCH));
        // 256 KiB took 100 ms: about 20 Mbit/s.
        budget.wrote(now, MAX_BATCH, Duration::from_millis(100));
        assert_eq!(budget.frame_limit(), MIN_BATCH);
        assert_eq!(budget.unsent_limit(), MIN_UNSENT as u32);
        assert_eq!(budget.unsent_gate(), Some(MIN_UNSENT));
        // A few writes taken at once do not undo the measurement: the
        // kernel had room because the limit kept its queue short.
        for _ in 0..3 {
            budget.wrote(now, MIN_BATCH, Duration::from_micros(20));
        }
        assert_eq!(budget.allowance(now), Ok(MIN_BATCH));
        // Megabytes taken at once: a fast path after all.
        for _ in 0..600 {
            budget.wrote(now, MIN_BATCH, Duration::from_micros(5));
        }
        assert_eq!(budget.allowance(now), Ok(MAX_BATCH));
        assert_eq!(budget.unsent_gate(), None);
    }

    #[test]
    fn a_paced_writer_sends_its_rate_and_no_more() {
        let start = Instant::now();
        let rate = 2_250_000; // 18 Mbit/s
        let mut budget = SendBudget::new(Some(rate), start);
        assert_eq!(budget.frame_limit(), MIN_BATCH);
        let (mut now, mut sent) = (start, 0usize);
        while now < start + Duration::from_secs(2) {
            match budget.allowance(now) {
                Ok(n) => {
                    budget.wrote(now, n, Duration::ZERO);
                    sent += n;
                }
                Err(next) => {
                    assert!(next > now);
                    now = next;
                }
            }
        }
        let expected = rate as f64 * 2.0;
        assert!(
            (sent as f64) < expected * 1.02 && (sent as f64) > expected * 0.95,
            "sent {sent} in 2 s at {rate} B/s"
        );
        // Never a batch larger than 4 ms of the rate would allow (the floor
        // being one small batch).
        assert!(budget.frame_limit() <= MIN_BATCH);
    }
}
