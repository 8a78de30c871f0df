//! Pacing without `[[peer]] bandwidth`, sans-IO: on a slower path that
//! carries interactive streams beside bulk ones, the writer paces itself
//! just below the rate it measured the path to drain at while unpaced, so
//! that the WAN's queue stays empty and a keystroke waits only behind what
//! the link's own scheduler put before it (as `bandwidth` does, the way SQM
//! shapes under the bottleneck). Pacing starts well below that rate for a
//! moment, to empty the queue the unpaced writer filled (as BBR drains
//! after its start-up). Now and then it stops pacing for a moment to
//! measure the path again (the rate may have changed), and at once when
//! the writer keeps waiting for the path rather than for its pace (the
//! path got slower than the pace).
//!
//! Bulk alone, or a fast path, is never paced: there is nobody whose wait
//! pacing would shorten, and pacing costs a share of the rate.

use std::time::{Duration, Instant};

use crate::pacing::TokenBucket;

/// The share of the measured rate paced to: below the bottleneck even
/// when the measurement ran a little high.
const SHARE: f64 = 0.9;
/// When pacing starts, the share paced to for [`DRAIN`]: the unpaced
/// writer left the WAN's queue full, and at [`SHARE`] it would drain at a
/// tenth of the rate (a second for 100 ms of queue). This empties 100 ms.
const DRAIN_SHARE: f64 = 0.5;
const DRAIN: Duration = Duration::from_millis(200);
/// Interactive data this recent keeps pacing on.
const INTERACTIVE_HOLD: Duration = Duration::from_secs(2);
/// How long pacing runs between two measurements of the path.
const CRUISE: Duration = Duration::from_secs(10);
/// How long a measurement runs unpaced.
const PROBE: Duration = Duration::from_millis(300);
/// What the pacer may send at once: the same as a configured pace.
const BURST: Duration = Duration::from_millis(4);
/// A paced stretch in which the writer spent more than this share of the
/// time waiting for the kernel to take bytes (not for the pace) means the
/// path drains slower than the pace; twice in a row, it is measured again.
/// (Paced below the path's rate, the kernel's queue is empty at each write
/// and the writer waits only for the pace. A stall of this machine's CPU
/// does not read as waiting for the path.)
const PATH_BOUND: f64 = 0.5;
const SLOWER_TIMES: u32 = 2;

/// Unpaced measurements the path's rate is taken from: the second largest
/// of them. One taken while the kernel's queue was still filling, or cut
/// short by a stall on this machine, reads low, and a pace set from it
/// would hold the link down until the next measurement; one taken while
/// the receiver opened its window in a burst reads high, and a pace above
/// the path's rate fills the WAN's queue until the writer notices.
const SAMPLES: usize = 4;

/// The automatic pacer's state.
#[derive(Debug, Default)]
pub struct AutoPace {
    /// The latest drain rates measured unpaced on a slower path, bytes/s.
    unpaced: std::collections::VecDeque<f64>,
    /// When interactive data last went out beside bulk data.
    interactive_at: Option<Instant>,
    /// While pacing.
    pacing: Option<Pacing>,
    /// While measuring unpaced: until when.
    probing_until: Option<Instant>,
    /// Paced stretches in a row in which the path, not the pace, held the
    /// writer.
    slower: u32,
}

/// Pacing to a measured rate.
#[derive(Debug)]
struct Pacing {
    bucket: TokenBucket,
    /// The path's rate paced below, bytes/s.
    path_rate: f64,
    /// Until when the bucket runs at [`DRAIN_SHARE`].
    draining_until: Instant,
    /// When the path is measured again.
    probe_due: Instant,
}

impl AutoPace {
    /// Interactive data went out beside bulk data at `now`.
    pub fn interactive(&mut self, now: Instant) {
        self.interactive_at = Some(now);
    }

    /// Decides at `now`, on a slower path (`slow`) or not, whether to pace
    /// and returns the bucket to pace with; `None`: unpaced.
    pub fn bucket(&mut self, now: Instant, slow: bool) -> Option<&mut TokenBucket> {
        let interactive = self
            .interactive_at
            .is_some_and(|at| now.saturating_duration_since(at) < INTERACTIVE_HOLD);
        let rate = match (slow && interactive, self.unpaced_rate()) {
            (true, Some(rate)) => rate,
            _ => {
                self.pacing = None;
                self.probing_until = None;
                return None;
            }
        };
        if let Some(until) = self.probing_until {
            if now < until {
                return None;
            }
            self.probing_until = None;
        }
        let pacing = self.pacing.get_or_insert_with(|| Pacing {
            bucket: bucket_at(rate * DRAIN_SHARE, now),
            path_rate: rate,
            draining_until: now + DRAIN,
            probe_due: now + CRUISE,
        });
        if now >= pacing.probe_due {
            self.start_probe(now);
            return None;
        }
        if now >= pacing.draining_until && pacing.bucket.rate() < (pacing.path_rate * SHARE) as u64
        {
            pacing.bucket = bucket_at(pacing.path_rate * SHARE, now);
        }
        self.pacing.as_mut().map(|pacing| &mut pacing.bucket)
    }

    /// Stops pacing to measure the path afresh for [`PROBE`].
    fn start_probe(&mut self, now: Instant) {
        self.pacing = None;
        self.slower = 0;
        self.probing_until = Some(now + PROBE);
        self.unpaced.clear();
    }

    /// The path's rate as measured unpaced (see [`SAMPLES`]).
    fn unpaced_rate(&self) -> Option<f64> {
        let mut rates: Vec<f64> = self.unpaced.iter().copied().collect();
        rates.sort_by(f64::total_cmp);
        match rates.len() {
            0 => None,
            1 | 2 => rates.last().copied(),
            n => Some(rates[n - 2]),
        }
    }

    /// The pace in bytes per second, while pacing.
    pub fn pace(&self) -> Option<u64> {
        self.pacing.as_ref().map(|pacing| pacing.bucket.rate())
    }

    /// A measurement of the path's drain rate (bytes/s) while unpaced on a
    /// slower path.
    pub fn measured(&mut self, rate: f64) {
        if self.pacing.is_some() {
            return;
        }
        if self.unpaced.len() == SAMPLES {
            self.unpaced.pop_front();
        }
        self.unpaced.push_back(rate);
    }

    /// A stretch of paced writing ended at `now`, in which the writer spent
    /// `waiting_for_path` (a share of the time, 0 to 1) waiting for the
    /// kernel to take bytes.
    pub fn paced_stretch(&mut self, now: Instant, waiting_for_path: f64) {
        if self.pacing.is_none() {
            return;
        }
        if waiting_for_path <= PATH_BOUND {
            self.slower = 0;
            return;
        }
        self.slower += 1;
        if self.slower >= SLOWER_TIMES {
            self.start_probe(now);
        }
    }

    /// Forgets the path's rate (it turned out fast).
    pub fn fast_path(&mut self) {
        *self = AutoPace {
            interactive_at: self.interactive_at,
            ..AutoPace::default()
        };
    }
}

fn bucket_at(rate: f64, now: Instant) -> TokenBucket {
    let burst = (rate * BURST.as_secs_f64()) as u64;
    TokenBucket::new(rate as u64, burst, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: f64 = 2_400_000.0; // about 19 Mbit/s

    /// Paces on measurement `rate` at `now` and runs through the drain.
    fn pacing_after_drain(pace: &mut AutoPace, now: Instant) -> Instant {
        pace.interactive(now);
        assert!(pace.bucket(now, true).is_some());
        let later = now + DRAIN;
        pace.interactive(later);
        assert!(pace.bucket(later, true).is_some());
        later
    }

    #[test]
    fn bulk_alone_or_a_fast_path_is_never_paced() {
        let now = Instant::now();
        let mut pace = AutoPace::default();
        pace.measured(RATE);
        assert!(pace.bucket(now, true).is_none(), "no interactive data yet");
        pace.interactive(now);
        assert!(pace.bucket(now, false).is_none(), "a fast path");
        let later = now + INTERACTIVE_HOLD + Duration::from_millis(1);
        assert!(
            pace.bucket(later, true).is_none(),
            "interactive data long ago"
        );
    }

    #[test]
    fn pacing_drains_the_queue_first_then_paces_below_the_rate_and_measures_again() {
        let start = Instant::now();
        let mut pace = AutoPace::default();
        pace.measured(RATE);
        pace.interactive(start);
        assert!(pace.bucket(start, true).is_some());
        assert_eq!(pace.pace(), Some((RATE * DRAIN_SHARE) as u64));
        let cruising = pacing_after_drain(&mut pace, start);
        assert_eq!(pace.pace(), Some((RATE * SHARE) as u64));
        // Rates measured while paced say nothing about the path.
        pace.measured(RATE * 10.0);
        pace.paced_stretch(cruising, 0.1);
        assert_eq!(pace.pace(), Some((RATE * SHARE) as u64));
        // After the cruise: a measurement, unpaced, for PROBE.
        let mut now = start + CRUISE;
        pace.interactive(now);
        assert!(pace.bucket(now, true).is_none());
        pace.measured(RATE * 2.0);
        now += PROBE;
        pacing_after_drain(&mut pace, now);
        assert_eq!(pace.pace(), Some((RATE * 2.0 * SHARE) as u64));
    }

    #[test]
    fn one_low_or_one_high_measurement_does_not_set_the_pace() {
        let now = Instant::now();
        let mut pace = AutoPace::default();
        for rate in [RATE, RATE / 10.0, RATE * 2.0, RATE] {
            pace.measured(rate);
        }
        pacing_after_drain(&mut pace, now);
        assert_eq!(pace.pace(), Some((RATE * SHARE) as u64));
    }

    #[test]
    fn a_path_that_keeps_holding_the_paced_writer_is_measured_again() {
        let now = Instant::now();
        let mut pace = AutoPace::default();
        pace.measured(RATE);
        let now = pacing_after_drain(&mut pace, now);
        // Once could be a burst of other traffic: the pace stays.
        pace.paced_stretch(now, 0.9);
        pace.paced_stretch(now, 0.1);
        pace.paced_stretch(now, 0.9);
        assert_eq!(pace.pace(), Some((RATE * SHARE) as u64));
        // Twice in a row: measured again, unpaced, and paced to that.
        pace.paced_stretch(now, 0.9);
        assert!(pace.bucket(now, true).is_none());
        pace.measured(RATE / 2.0);
        pacing_after_drain(&mut pace, now + PROBE);
        assert_eq!(pace.pace(), Some((RATE / 2.0 * SHARE) as u64));
    }
}
