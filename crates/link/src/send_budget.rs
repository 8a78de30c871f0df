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

use crate::pacing::TokenBucket;

/// The largest batch: what a fast path (loopback, LAN) writes at once.
pub const MAX_BATCH: usize = 256 * 1024;
/// The smallest batch (and record) a slow path gets.
pub const MIN_BATCH: usize = 16 * 1024;
/// How much drain time one batch may hold: a record due on another stream
/// waits at most about this long behind what was handed over before it.
const BATCH_TIME: Duration = Duration::from_millis(4);
/// A write that took longer than this pushed back: the transport, not the
/// writer, set its pace, so its rate is a measurement of the path.
const PUSHED_BACK: Duration = Duration::from_millis(2);
/// A paced writer may send this much of its rate at once.
const PACE_BURST: Duration = Duration::from_millis(4);

/// The writer's sizing and pacing state.
#[derive(Debug)]
pub struct SendBudget {
    pacer: Option<TokenBucket>,
    batch: usize,
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
            batch: MAX_BATCH,
        };
        if let Some(rate) = pace {
            budget.batch = batch_for_rate(rate as f64);
        }
        budget
    }

    /// The bytes the next batch may hold at `now`, or when the pacer
    /// allows the next one.
    pub fn allowance(&mut self, now: Instant) -> Result<usize, Instant> {
        match &mut self.pacer {
            None => Ok(self.batch),
            Some(pacer) => pacer.available(now, self.batch),
        }
    }

    /// The largest record payload to make now: a batch's worth, so that a
    /// record never holds more drain time than a batch.
    pub fn frame_limit(&self) -> usize {
        self.batch
    }

    /// The kernel's unsent-bytes limit to ask for (`TCP_NOTSENT_LOWAT`):
    /// about one batch, so that what waits in the kernel is bounded by
    /// drain time, not by the socket's buffer size.
    pub fn unsent_limit(&self) -> u32 {
        self.batch as u32
    }

    /// Records that `bytes` were handed to the transport at `now`, the
    /// write having taken `elapsed`.
    pub fn wrote(&mut self, now: Instant, bytes: usize, elapsed: Duration) {
        if let Some(pacer) = &mut self.pacer {
            pacer.consume(now, bytes);
        }
        let ceiling = self
            .pacer
            .as_ref()
            .map_or(MAX_BATCH, |p| batch_for_rate(p.rate() as f64));
        self.batch = if elapsed >= PUSHED_BACK && bytes >= MIN_BATCH {
            batch_for_rate(bytes as f64 / elapsed.as_secs_f64()).min(ceiling)
        } else {
            // Taken at once: the path may be faster than we thought.
            (self.batch * 2).min(ceiling)
        };
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
        assert_eq!(budget.unsent_limit(), MIN_BATCH as u32);
        // Writes taken at once grow it back, doubling.
        budget.wrote(now, MIN_BATCH, Duration::from_micros(50));
        assert_eq!(budget.allowance(now), Ok(2 * MIN_BATCH));
        for _ in 0..10 {
            budget.wrote(now, MIN_BATCH, Duration::ZERO);
        }
        assert_eq!(budget.allowance(now), Ok(MAX_BATCH));
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
