//! Bandwidth caps as one mechanism (DESIGN §5 "Limits"): a [`Cap`] is a
//! named pair of token buckets (one per direction, from
//! [`link::pacing::TokenBucket`]); a connection holds [`Caps`], every cap
//! it belongs to (its service's, its client's, its user's), and the relay
//! reads from a side only as fast as all of them allow. A capped
//! connection is slowed by back-pressure: nothing is cut, nothing is
//! buffered beyond the relay's one buffer. The link's own pacing
//! (`[[peer]] bandwidth`) is in the link writer.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use link::pacing::TokenBucket;

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

/// What a cap lets through at once: 50 ms of its rate (at least the
/// bucket's 16 KiB floor), so a capped download starts at once but a
/// measured rate soon matches the setting.
const CAP_BURST: Duration = Duration::from_millis(50);

/// One bandwidth cap: a rate for each direction, shared by every
/// connection it applies to.
#[derive(Debug)]
pub struct Cap {
    /// What it caps, as the console shows it: "service web",
    /// "client 10.0.0.5 on web", "user alice".
    pub name: String,
    /// The configured rate (each direction).
    pub rate: Bandwidth,
    /// Client → target, target → client.
    buckets: [Mutex<TokenBucket>; 2],
    /// Bytes let through each direction.
    bytes: [AtomicU64; 2],
    /// Microseconds that connections waited on this cap (all together).
    waited_us: AtomicU64,
}

/// Which way bytes go through a relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// Client → target.
    Up = 0,
    /// Target → client.
    Down = 1,
}

impl Cap {
    /// A cap of `rate` each direction, full at `now`.
    pub fn new(name: String, rate: Bandwidth, now: Instant) -> Arc<Cap> {
        let burst = (rate.bytes_per_second as f64 * CAP_BURST.as_secs_f64()) as u64;
        let bucket = || Mutex::new(TokenBucket::new(rate.bytes_per_second, burst, now));
        Arc::new(Cap {
            name,
            rate,
            buckets: [bucket(), bucket()],
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            waited_us: AtomicU64::new(0),
        })
    }

    fn bucket(&self, way: Way) -> std::sync::MutexGuard<'_, TokenBucket> {
        self.buckets[way as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// What the console and `/metrics` show of it at `now`.
    pub fn status(&self, now: Instant) -> CapStatus {
        let level = |way| self.bucket(way).level(now).clamp(0.0, 1.0);
        CapStatus {
            name: self.name.clone(),
            rate: self.rate.to_string(),
            bytes_per_second: self.rate.bytes_per_second,
            bytes_up: self.bytes[0].load(Ordering::Relaxed),
            bytes_down: self.bytes[1].load(Ordering::Relaxed),
            // An empty bucket is a cap in use: 100% full.
            use_up: 1.0 - level(Way::Up),
            use_down: 1.0 - level(Way::Down),
            waited_seconds: self.waited_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// A cap as the console and `linkgate status` show it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CapStatus {
    /// See [`Cap::name`].
    pub name: String,
    /// The configured rate, as written ("10Mbit/s").
    pub rate: String,
    /// The same in bytes per second.
    pub bytes_per_second: u64,
    /// Bytes through it, client → target.
    pub bytes_up: u64,
    /// Bytes through it, target → client.
    pub bytes_down: u64,
    /// How much of its burst is used now, 0 to 1, client → target: near 1
    /// means traffic is being held to the cap.
    pub use_up: f64,
    /// The same, target → client.
    pub use_down: f64,
    /// Seconds connections spent waiting on this cap, all together.
    pub waited_seconds: f64,
}

/// Caps by key (a client, a user), each alive while a connection holds it:
/// a client that comes back after all its connections ended starts with a
/// full bucket, and the table never outgrows the connections.
#[derive(Debug, Default)]
pub struct CapTable {
    caps: Mutex<HashMap<String, Weak<Cap>>>,
}

impl CapTable {
    /// The cap for `key` (named `name` when made now), shared with every
    /// live connection that has the same key.
    pub fn get(&self, key: &str, name: impl FnOnce() -> String, rate: Bandwidth) -> Arc<Cap> {
        let mut caps = self.caps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cap) = caps.get(key).and_then(Weak::upgrade) {
            // A reload that changed the rate starts a cap of the new rate.
            if cap.rate == rate {
                return cap;
            }
        }
        if caps.len() >= 64 && caps.len().is_power_of_two() {
            caps.retain(|_, cap| cap.strong_count() > 0);
        }
        let cap = Cap::new(name(), rate, Instant::now());
        caps.insert(key.to_string(), Arc::downgrade(&cap));
        cap
    }

    /// The caps in use now.
    pub fn live(&self) -> Vec<Arc<Cap>> {
        let caps = self.caps.lock().unwrap_or_else(|p| p.into_inner());
        caps.values().filter_map(Weak::upgrade).collect()
    }
}

/// `[[user]] bandwidth`: one cap per user, across all services.
#[derive(Debug, Default)]
pub struct UserCaps {
    rates: HashMap<String, Bandwidth>,
    table: Arc<CapTable>,
}

impl UserCaps {
    /// The caps of the users that have a `bandwidth`.
    pub fn new(users: &[crate::config::UserConfig]) -> Self {
        UserCaps {
            rates: users
                .iter()
                .filter_map(|u| Some((u.name.clone(), u.bandwidth?)))
                .collect(),
            table: Arc::default(),
        }
    }

    /// The caps of `users` after a reload: a user whose rate did not change
    /// keeps the cap its live connections hold.
    pub fn updated(&self, users: &[crate::config::UserConfig]) -> Self {
        UserCaps {
            table: self.table.clone(),
            ..UserCaps::new(users)
        }
    }

    /// The cap of `user`, if it has one.
    pub fn cap(&self, user: &str) -> Option<Arc<Cap>> {
        let rate = *self.rates.get(user)?;
        Some(self.table.get(user, || format!("user {user}"), rate))
    }

    /// The users' caps in use now.
    pub fn live(&self) -> Vec<Arc<Cap>> {
        self.table.live()
    }
}

/// Every cap one connection obeys.
#[derive(Clone, Debug, Default)]
pub struct Caps {
    caps: Vec<Arc<Cap>>,
    /// Where the cap of the connection's user comes from, once it is known.
    users: Option<Arc<UserCaps>>,
}

impl Caps {
    /// No cap.
    pub fn none() -> Self {
        Caps::default()
    }

    /// Caps that will take the user's from `users` (see [`Caps::for_user`]).
    pub fn with_users(users: Arc<UserCaps>) -> Self {
        Caps {
            caps: Vec::new(),
            users: Some(users),
        }
    }

    /// These caps and, when `user` has a `bandwidth`, the user's.
    pub fn for_user(&self, user: Option<&str>) -> Caps {
        let mut caps = self.clone();
        if let (Some(users), Some(user)) = (&self.users, user) {
            caps.push(users.cap(user));
        }
        caps
    }

    /// Adds `cap` (if any) to those obeyed.
    pub fn push(&mut self, cap: Option<Arc<Cap>>) {
        if let Some(cap) = cap {
            if !self.caps.iter().any(|c| Arc::ptr_eq(c, &cap)) {
                self.caps.push(cap);
            }
        }
    }

    /// Whether any cap applies.
    pub fn is_empty(&self) -> bool {
        self.caps.is_empty()
    }

    /// How many of `want` bytes may go `way` at `now` under every cap, or
    /// the instant at which the tightest lets some through.
    pub fn allowance(&self, way: Way, now: Instant, want: usize) -> Result<usize, Instant> {
        let mut allowed = want;
        let mut wait_until: Option<Instant> = None;
        for cap in &self.caps {
            match cap.bucket(way).available(now, want) {
                Ok(n) => allowed = allowed.min(n),
                Err(at) => wait_until = Some(wait_until.map_or(at, |w| w.max(at))),
            }
        }
        match wait_until {
            Some(at) => Err(at),
            None => Ok(allowed),
        }
    }

    /// Counts `n` bytes gone `way` at `now` against every cap.
    pub fn consume(&self, way: Way, now: Instant, n: usize) {
        for cap in &self.caps {
            cap.bucket(way).consume(now, n);
            cap.bytes[way as usize].fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Counts a wait of `waited` on the caps (for the console).
    pub fn waited(&self, waited: Duration) {
        let us = waited.as_micros() as u64;
        for cap in &self.caps {
            cap.waited_us.fetch_add(us, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_connection_obeys_the_tightest_of_its_caps() {
        let now = Instant::now();
        let wide = Cap::new("service s".into(), "8Mbit/s".parse().unwrap(), now);
        let narrow = Cap::new("user u".into(), "800kB/s".parse().unwrap(), now);
        let mut caps = Caps::none();
        caps.push(Some(wide.clone()));
        caps.push(Some(narrow.clone()));
        caps.push(Some(narrow.clone()));
        // Bursts: 50 ms of each rate.
        assert_eq!(caps.allowance(Way::Up, now, 1 << 20), Ok(40_000));
        caps.consume(Way::Up, now, 40_000);
        assert!(caps.allowance(Way::Up, now, 1 << 20).is_err());
        // The other direction has its own buckets.
        assert_eq!(caps.allowance(Way::Down, now, 1000), Ok(1000));
        // After 100 ms the narrow one has refilled (capped at its burst).
        let later = now + Duration::from_millis(100);
        assert_eq!(caps.allowance(Way::Up, later, 1 << 20), Ok(40_000));
        assert_eq!(narrow.status(now).bytes_up, 40_000);
        assert_eq!(wide.status(now).bytes_up, 40_000);
    }

    #[test]
    fn a_table_shares_a_cap_while_it_is_held_and_forgets_it_after() {
        let table = CapTable::default();
        let rate: Bandwidth = "1MB/s".parse().unwrap();
        let a = table.get("10.0.0.1", || "client 10.0.0.1".into(), rate);
        let b = table.get("10.0.0.1", || unreachable!(), rate);
        assert!(Arc::ptr_eq(&a, &b));
        let other = table.get("10.0.0.2", || "client 10.0.0.2".into(), rate);
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(table.live().len(), 2);
        drop((a, b));
        assert_eq!(table.live().len(), 1);
    }
}
