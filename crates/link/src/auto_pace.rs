//! Pacing without `[[peer]] bandwidth`, sans-IO: on a slower path that
//! carries interactive streams beside bulk ones, the writer paces itself
//! just below the rate it measured the path to drain at while unpaced, so
//! that the WAN's queue stays empty and a keystroke waits only behind what
//! the link's own scheduler put before it (as `bandwidth` does, the way SQM
//! shapes under the bottleneck). Now and then it stops pacing for a moment
//! to measure the path again (the rate may have changed), and at once when
//! the path keeps draining slower than the pace.
//!
//! Bulk alone, or a fast path, is never paced: there is nobody whose wait
//! pacing would shorten, and pacing costs a share of the rate.

use std::time::{Duration, Instant};

use crate::pacing::TokenBucket;

/// The share of the measured rate paced to: below the bottleneck even
/// when the measurement ran a little high.
const SHARE: f64 = 0.9;
/// Interactive data this recent keeps pacing on.
const INTERACTIVE_HOLD: Duration = Duration::from_secs(2);
/// How long pacing runs between two measurements of the path.
const CRUISE: Duration = Duration::from_secs(10);
/// How long a measurement runs unpaced.
const PROBE: Duration = Duration::from_millis(300);
/// What the pacer may send at once: the same as a configured pace.
const BURST: Duration = Duration::from_millis(4);
/// Paced writes that drained slower than this share of the pace, twice in
/// a row, mean the path may have got slower: it is measured again at once.
/// (Not taken as the new rate: a stall of this machine's CPU reads as a
/// slow path too, and would hold the link down until the next measurement.)
const SLOWER: f64 = 0.8;
const SLOWER_TIMES: u32 = 2;

/// Unpaced measurements the path's rate is the largest of: one taken
/// while the kernel's queue was still filling, or cut short by a stall on
/// this machine, reads low, and a pace set from it would hold the link
/// down until the next measurement (a high one corrects itself: the path
/// then drains slower than the pace).
const SAMPLES: usize = 4;

/// The automatic pacer's state.
#[derive(Debug, Default)]
pub struct AutoPace {
    /// The latest drain rates measured unpaced on a slower path, bytes/s.
    unpaced: std::collections::VecDeque<f64>,
    /// When interactive data last went out beside bulk data.
    interactive_at: Option<Instant>,
    /// While pacing: the bucket, and when the next measurement is due.
    pacing: Option<(TokenBucket, Instant)>,
    /// While measuring unpaced: until when.
    probing_until: Option<Instant>,
    /// Paced measurements in a row that drained slower than the pace.
    slower: u32,
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
        match &self.pacing {
            Some((_, probe_due)) if now >= *probe_due => {
                self.start_probe(now);
                None
            }
            Some(_) => self.pacing.as_mut().map(|(bucket, _)| bucket),
            None => {
                let pace = rate * SHARE;
                let burst = (pace * BURST.as_secs_f64()) as u64;
                self.pacing = Some((TokenBucket::new(pace as u64, burst, now), now + CRUISE));
                self.pacing.as_mut().map(|(bucket, _)| bucket)
            }
        }
    }

    /// Stops pacing to measure the path afresh for [`PROBE`].
    fn start_probe(&mut self, now: Instant) {
        self.pacing = None;
        self.slower = 0;
        self.probing_until = Some(now + PROBE);
        self.unpaced.clear();
    }

    /// The path's rate as measured unpaced: the largest recent sample.
    fn unpaced_rate(&self) -> Option<f64> {
        self.unpaced.iter().copied().reduce(f64::max)
    }

    /// The pace in bytes per second, while pacing.
    pub fn pace(&self) -> Option<u64> {
        self.pacing.as_ref().map(|(bucket, _)| bucket.rate())
    }

    /// A measurement of the path's drain rate (bytes/s) on a slower path:
    /// taken as the path's rate while unpaced; while paced, only a rate
    /// below the pace tells something (the path got slower).
    pub fn measured(&mut self, now: Instant, rate: f64) {
        match &mut self.pacing {
            None => {
                if self.unpaced.len() == SAMPLES {
                    self.unpaced.pop_front();
                }
                self.unpaced.push_back(rate);
            }
            Some((bucket, _)) => {
                if rate >= bucket.rate() as f64 * SLOWER {
                    self.slower = 0;
                    return;
                }
                self.slower += 1;
                if self.slower >= SLOWER_TIMES {
                    self.start_probe(now);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: f64 = 2_400_000.0; // about 19 Mbit/s

    #[test]
    fn bulk_alone_or_a_fast_path_is_never_paced() {
        let now = Instant::now();
        let mut pace = AutoPace::default();
        pace.measured(now, RATE);
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
    fn interactive_data_on_a_slow_path_paces_below_the_measured_rate_and_measures_again() {
        let start = Instant::now();
        let mut pace = AutoPace::default();
        pace.measured(start, RATE);
        pace.interactive(start);
        assert!(pace.bucket(start, true).is_some());
        assert_eq!(pace.pace(), Some((RATE * SHARE) as u64));
        // Paced writes that drain as fast as asked say nothing new.
        pace.measured(start, RATE * 10.0);
        assert_eq!(pace.pace(), Some((RATE * SHARE) as u64));
        // After the cruise: a measurement, unpaced, for PROBE.
        let mut now = start + CRUISE;
        pace.interactive(now);
        assert!(pace.bucket(now, true).is_none());
        pace.measured(now, RATE * 2.0);
        now += PROBE;
        pace.interactive(now);
        assert!(pace.bucket(now, true).is_some());
        assert_eq!(pace.pace(), Some((RATE * 2.0 * SHARE) as u64));
    }

    #[test]
    fn one_low_measurement_does_not_set_the_pace() {
        let now = Instant::now();
        let mut pace = AutoPace::default();
        pace.measured(now, RATE);
        pace.measured(now, RATE / 10.0);
        pace.interactive(now);
        assert!(pace.bucket(now, true).is_some());
        assert_eq!(pace.pace(), Some((RATE * SHARE) as u64));
    }

    #[test]
    fn a_path_that_keeps_draining_slower_than_the_pace_is_measured_again() {
        let now = Instant::now();
        let mut pace = AutoPace::default();
        pace.measured(now, RATE);
        pace.interactive(now);
        assert!(pace.bucket(now, true).is_some());
        // Once could be a stall of this machine: the pace stays.
        pace.measured(now, RATE / 2.0);
        pace.measured(now, RATE);
        pace.measured(now, RATE / 2.0);
        assert_eq!(pace.pace(), Some((RATE * SHARE) as u64));
        // Twice in a row: measured again, unpaced, and paced to that.
        pace.measured(now, RATE / 2.0);
        assert!(pace.bucket(now, true).is_none());
        pace.measured(now, RATE / 2.0);
        let later = now + PROBE;
        pace.interactive(later);
        assert!(pace.bucket(later, true).is_some());
        assert_eq!(pace.pace(), Some((RATE / 2.0 * SHARE) as u64));
    }
}
