//! Bandwidth caps as one mechanism (DESIGN §5 "Limits"): a token bucket is a
//! pure value that takes `now` and says how many bytes may go now, or when
//! the next may (like quinn's `Pacer`); the relay, the HTTP body path and
//! the link writer consult every bucket a connection belongs to.
//!
//! Not yet wired to the configuration (issue 13): `bandwidth` values parse
//! here ([`Bandwidth`]), and the buckets are tested on their own.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// A rate in bytes per second, written as in DESIGN §2.5: `"512kbit/s"`,
/// `"20Mbit/s"`, `"1Gbit/s"` (bits) or `"2MB/s"`, `"800kB/s"` (bytes), with
/// decimal prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bandwidth {
    /// Bytes per second (at least 1).
    pub bytes_per_second: u64,
}

impl FromStr for Bandwidth {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("invalid bandwidth {s:?}: {why}; write e.g. \"20Mbit/s\", \"512kbit/s\" or \"2MB/s\"")
        };
        let unit_at = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| bad("no unit"))?;
        let (number, unit) = s.split_at(unit_at);
        let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
        let (prefix, rest) = match unit.chars().next() {
            Some('k') => (1e3, &unit[1..]),
            Some('M') => (1e6, &unit[1..]),
            Some('G') => (1e9, &unit[1..]),
            _ => (1.0, unit),
        };
        let per_byte = match rest {
            "bit/s" => 1.0 / 8.0,
            "B/s" => 1.0,
            _ => return Err(bad("the unit is bit/s or B/s, with k, M or G before it")),
        };
        let bytes = value * prefix * per_byte;
        if !bytes.is_finite() || !(1.0..=1e12).contains(&bytes) {
            return Err(bad("it must be between 8bit/s and 8Tbit/s"));
        }
        Ok(Bandwidth {
            bytes_per_second: bytes.round() as u64,
        })
    }
}

impl fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let bits = self.bytes_per_second as f64 * 8.0;
        match bits {
            b if b >= 1e9 => write!(f, "{}Gbit/s", b / 1e9),
            b if b >= 1e6 => write!(f, "{}Mbit/s", b / 1e6),
            b if b >= 1e3 => write!(f, "{}kbit/s", b / 1e3),
            b => write!(f, "{b}bit/s"),
        }
    }
}

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
    pub fn new(rate: Bandwidth, burst: u64, now: Instant) -> Self {
        let burst = burst.max(16 * 1024) as f64;
        TokenBucket {
            rate: rate.bytes_per_second as f64,
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
        // Wait for a useful amount, not a byte at a time.
        let chunk = (self.rate / 50.0).clamp(1.0, self.burst);
        let wait = (chunk - self.tokens) / self.rate;
        Err(now + Duration::from_secs_f64(wait))
    }

    /// Counts `n` bytes as sent at `now` (may go negative: a write larger
    /// than the credit is paid for by waiting afterwards).
    pub fn consume(&mut self, now: Instant, n: usize) {
        self.refill(now);
        self.tokens -= n as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bandwidths_parse_in_bits_and_bytes_with_decimal_prefixes() {
        let parse = |s: &str| s.parse::<Bandwidth>().map(|b| b.bytes_per_second);
        assert_eq!(parse("20Mbit/s"), Ok(2_500_000));
        assert_eq!(parse("512kbit/s"), Ok(64_000));
        assert_eq!(parse("1Gbit/s"), Ok(125_000_000));
        assert_eq!(parse("2MB/s"), Ok(2_000_000));
        assert_eq!(parse("1.5Mbit/s"), Ok(187_500));
        for bad in [
            "",
            "20",
            "20 Mbit/s",
            "20Mbps",
            "0Mbit/s",
            "-1MB/s",
            "20mbit/s",
            "1e3B/s",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            "18Mbit/s".parse::<Bandwidth>().unwrap().to_string(),
            "18Mbit/s"
        );
    }

    #[test]
    fn a_bucket_lets_its_burst_go_then_its_rate() {
        let start = Instant::now();
        let rate = "8Mbit/s".parse().unwrap(); // 1 MB/s
        let mut bucket = TokenBucket::new(rate, 100_000, start);
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
            let rate: Bandwidth = "8Mbit/s".parse().unwrap();
            let mut bucket = TokenBucket::new(rate, 64 * 1024, start);
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
