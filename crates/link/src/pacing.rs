//! Token buckets: how many bytes may go now, or when the next may. Pure
//! values that take `now` (like quinn's `Pacer`), so they are tested
//! without a clock. The link writer paces with one (`[[peer]] bandwidth`);
//! the gateway's bandwidth caps are built from them.

use std::time::{Duration, Instant};

/// A token bucket: `rate` bytes per second, holding at most `burst` bytes
/// of credit. Pure: time is passed in.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`. The burst is at least one 16 KiB chunk, so
    /// a capped connection still moves data in useful pieces.
    pub fn new(bytes_per_second: u64, burst: u64, now: Instant) -> Self {
        let burst = burst.max(16 * 1024) as f64;
        TokenBucket {
            rate: bytes_per_second.max(1) as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now.max(self.last);
    }

    /// How many of `want` bytes may go at `now` (at least 1 when any), or,
    /// when none, the instant at which at least one chunk may.
    pub fn available(&mut self, now: Instant, want: usize) -> Result<usize, Instant> {
        self.refill(now);
        if self.tokens >= 1.0 {
            return Ok((self.tokens as usize).min(want).max(1));
        }
        // Wait for a useful amount, not a byte at a time; but at most half
        // the burst, so that a timer firing late (timers round up to the
        // millisecond) finds the credit it earned meanwhile instead of a
        // full bucket that threw it away.
        let chunk = (self.rate / 50.0).clamp(1.0, self.burst / 2.0);
        let wait = (chunk - self.tokens) / self.rate;
        Err(now + Duration::from_secs_f64(wait))
    }

    /// Counts `n` bytes as sent at `now` (may go negative: a write larger
    /// than the credit is paid for by waiting afterwards).
    pub fn consume(&mut self, now: Instant, n: usize) {
        self.refill(now);
        self.tokens -= n as f64;
    }

    /// The rate, in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Credit left at `now` as a share of the burst: 1 = full (unused), 0
    /// or less = empty (senders are waiting on it).
    pub fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens / self.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_bucket_lets_its_burst_go_then_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1_000_000, 100_000, start);
        assert_eq!(bucket.available(start, 1_000_000), Ok(100_000));
        bucket.consume(start, 100_000);
        let retry = bucket.available(start, 1000).unwrap_err();
        assert!(retry > start && retry <= start + Duration::from_millis(25));
        let later = start + Duration::from_millis(50);
        assert_eq!(bucket.available(later, 1_000_000), Ok(50_000));
    }

    proptest! {
        /// Over any schedule of requests, what was granted never exceeds
        /// the burst plus rate × elapsed time.
        #[test]
        fn never_more_than_burst_plus_rate(steps in proptest::collection::vec((0u64..50, 1usize..200_000), 1..200)) {
            let start = Instant::now();
            let mut bucket = TokenBucket::new(1_000_000, 64 * 1024, start);
            let (mut now, mut sent) = (start, 0u64);
            for (ms, want) in steps {
                now += Duration::from_millis(ms);
                if let Ok(n) = bucket.available(now, want) {
                    bucket.consume(now, n);
                    sent += n as u64;
                }
                let allowed = 64.0 * 1024.0 + 1e6 * now.duration_since(start).as_secs_f64();
                prop_assert!(sent as f64 <= allowed + 1.0, "sent {} > {}", sent, allowed);
            }
        }
    }
}
