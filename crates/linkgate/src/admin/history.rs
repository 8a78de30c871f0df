//! Traffic over the last minutes, for the console's charts: a fixed-size
//! ring of samples of the byte counters, taken every few seconds. The page
//! draws rates from the differences between samples; nothing grows.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

/// How often a sample is taken.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Samples kept: 5 minutes' worth.
pub const CAPACITY: usize = 150;

/// The byte counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Seconds since the Unix epoch.
    pub t: f64,
    /// Per service: [bytes up, bytes down] so far.
    pub services: BTreeMap<String, [u64; 2]>,
    /// Per link: [bytes sent, bytes received] on the wire so far.
    pub links: BTreeMap<String, [u64; 2]>,
}

/// The ring of the latest samples.
#[derive(Debug)]
pub struct History {
    ring: Mutex<VecDeque<Sample>>,
    capacity: usize,
}

impl Default for History {
    fn default() -> Self {
        History::with_capacity(CAPACITY)
    }
}

impl History {
    /// A ring keeping the latest `capacity` samples.
    pub fn with_capacity(capacity: usize) -> Self {
        History {
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity: capacity.max(1),
        }
    }

    /// Adds a sample, dropping the oldest when full.
    pub fn push(&self, sample: Sample) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(sample);
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_latest_samples_in_order() {
        let history = History::with_capacity(3);
        for t in 0..5 {
            history.push(Sample {
                t: f64::from(t),
                ..Sample::default()
            });
        }
        let times: Vec<f64> = history.samples().iter().map(|s| s.t).collect();
        assert_eq!(times, [2.0, 3.0, 4.0]);
    }
}
