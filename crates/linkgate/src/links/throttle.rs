//! Login throttling on the link listener, sans-IO (time is passed in).
//!
//! Each answer the hub gives to a password-mode hello lets the dialer test
//! one password guess online, so those answers are what is rationed: a
//! token bucket per source address (IPv6 per /64) and one per claimed user
//! name. A success gives the source its token back and refills that user's
//! bucket. Over the limit the hub answers at once with "busy, retry after
//! N s" — it never sleeps on a connection, so a throttled source costs no
//! waiting task, and a correct peer is never locked out by its own retries:
//! nothing the hub itself caused (a timeout) ever counts against anyone.
//!
//! Pre-authentication work is capped too: at most [`PER_SOURCE_IN_FLIGHT`]
//! handshakes at once from one source and [`IN_FLIGHT`] in all (the rest get
//! the busy answer and are closed), like OpenSSH's MaxStartups.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Password answers a source (or a user name) may have in a burst.
pub const BURST: f64 = 10.0;
/// Then one more every this long (10 a minute).
pub const REFILL: Duration = Duration::from_secs(6);
/// A user name's bucket is three times a source's: one noisy address
/// (drained by its own bucket first) cannot empty it.
const USER_BURST: f64 = 3.0 * BURST;
/// Handshakes in progress at once from one source.
pub const PER_SOURCE_IN_FLIGHT: u32 = 2;
/// Handshakes in progress at once in all.
pub const IN_FLIGHT: usize = 256;
/// Sources and names remembered at most (full buckets are forgotten first).
const MAX_TRACKED: usize = 100_000;

/// Why a handshake is refused for now, and when to come back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Busy {
    /// When the dialer may try again.
    pub retry_after: Duration,
    /// What to tell it (and the log).
    pub reason: &'static str,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn full(capacity: f64, now: Instant) -> Self {
        Bucket {
            tokens: capacity,
            updated: now,
        }
    }

    fn refill(&mut self, capacity: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated);
        self.tokens = (self.tokens + elapsed.as_secs_f64() / REFILL.as_secs_f64()).min(capacity);
        self.updated = now;
    }

    /// Time until one whole token is there.
    fn wait(&self) -> Duration {
        REFILL.mul_f64((1.0 - self.tokens).max(0.0))
    }
}

#[derive(Debug)]
struct Source {
    bucket: Bucket,
    in_flight: u32,
    /// Whether the last decision for it was "busy" (to log the change once).
    throttled: bool,
}

/// The throttle of one link listener (shared by its connections).
#[derive(Debug, Default)]
pub struct LoginThrottle {
    sources: HashMap<IpAddr, Source>,
    users: HashMap<String, Bucket>,
    in_flight: usize,
}

/// The key a source is counted under: its address, or its /64 for IPv6
/// (one host usually holds a whole /64).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match crate::access::canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// What a decision means for the log: the first refusal of a source after
/// it was admitted is worth a warning, the rest are not.
#[derive(Debug, PartialEq, Eq)]
pub enum Noted {
    /// Nothing new.
    Quiet,
    /// This source just started being throttled.
    Started,
}

impl LoginThrottle {
    /// A new connection from `ip`: may its handshake start?
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> Result<(), (Busy, Noted)> {
        self.forget_some(now);
        if self.in_flight >= IN_FLIGHT {
            return Err((
                Busy {
                    retry_after: Duration::from_secs(1),
                    reason: "too many link handshakes in progress",
                },
                Noted::Quiet,
            ));
        }
        let source = self.source(ip, now);
        if source.in_flight >= PER_SOURCE_IN_FLIGHT {
            return Err((
                Busy {
                    retry_after: Duration::from_secs(1),
                    reason: "too many link handshakes in progress from your address",
                },
                Noted::Quiet,
            ));
        }
        source.bucket.refill(BURST, now);
        if source.bucket.tokens < 1.0 {
            let busy = Busy {
                retry_after: source.bucket.wait(),
                reason: "too many failed link logins from your address",
            };
            let noted = if std::mem::replace(&mut source.throttled, true) {
                Noted::Quiet
            } else {
                Noted::Started
            };
            return Err((busy, noted));
        }
        source.throttled = false;
        source.in_flight += 1;
        self.in_flight += 1;
        Ok(())
    }

    /// The handshake admitted by [`LoginThrottle::admit`] ended, however.
    pub fn finished(&mut self, ip: IpAddr) {
        if let Some(source) = self.sources.get_mut(&source_key(ip)) {
            source.in_flight = source.in_flight.saturating_sub(1);
        }
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// The hub is about to answer a password-mode hello from `ip` for
    /// `user` (one guess for the dialer): takes a token from both buckets.
    pub fn password_attempt(&mut self, ip: IpAddr, user: &str, now: Instant) -> Result<(), Busy> {
        let source = self.source(ip, now);
        source.bucket.refill(BURST, now);
        let source_tokens = source.bucket.tokens;
        let user_bucket = self
            .users
            .entry(user.to_string())
            .or_insert_with(|| Bucket::full(USER_BURST, now));
        user_bucket.refill(USER_BURST, now);
        if user_bucket.tokens < 1.0 {
            return Err(Busy {
                retry_after: user_bucket.wait(),
                reason: "too many failed link logins for this user name",
            });
        }
        if source_tokens < 1.0 {
            return Err(Busy {
                retry_after: self.source(ip, now).bucket.wait(),
                reason: "too many failed link logins from your address",
            });
        }
        user_bucket.tokens -= 1.0;
        self.source(ip, now).bucket.tokens -= 1.0;
        Ok(())
    }

    /// A key-mode hello from `ip` failed (unknown or wrong key): costs the
    /// source a token, as a password answer does.
    pub fn key_failure(&mut self, ip: IpAddr, now: Instant) {
        let source = self.source(ip, now);
        source.bucket.refill(BURST, now);
        source.bucket.tokens = (source.bucket.tokens - 1.0).max(0.0);
    }

    /// `user` (if a password-mode login) logged in from `ip`: the source
    /// gets its token back, the user's bucket is full again. Other users'
    /// and sources' counts are untouched.
    pub fn succeeded(&mut self, ip: IpAddr, user: Option<&str>, now: Instant) {
        let source = self.source(ip, now);
        source.bucket.refill(BURST, now);
        if user.is_some() {
            source.bucket.tokens = (source.bucket.tokens + 1.0).min(BURST);
        }
        source.throttled = false;
        if let Some(user) = user {
            self.users.remove(user);
        }
    }

    fn source(&mut self, ip: IpAddr, now: Instant) -> &mut Source {
        self.sources
            .entry(source_key(ip))
            .or_insert_with(|| Source {
                bucket: Bucket::full(BURST, now),
                in_flight: 0,
                throttled: false,
            })
    }

    /// Keeps the tables bounded: past [`MAX_TRACKED`] entries, forgets
    /// those that would be full by now and have nothing in flight.
    fn forget_some(&mut self, now: Instant) {
        let refilled = |bucket: &Bucket, capacity: f64| {
            let mut bucket = *bucket;
            bucket.refill(capacity, now);
            bucket.tokens >= capacity
        };
        if self.sources.len() >= MAX_TRACKED {
            self.sources
                .retain(|_, s| s.in_flight > 0 || !refilled(&s.bucket, BURST));
        }
        if self.users.len() >= MAX_TRACKED {
            self.users.retain(|_, b| !refilled(b, USER_BURST));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_burst_of_guesses_then_ten_a_minute_and_busy_says_when() {
        let mut throttle = LoginThrottle::default();
        let now = Instant::now();
        let attacker = ip("192.0.2.7");
        for _ in 0..10 {
            throttle.admit(attacker, now).unwrap();
            throttle.password_attempt(attacker, "branch", now).unwrap();
            throttle.finished(attacker);
        }
        let (busy, noted) = throttle.admit(attacker, now).unwrap_err();
        assert_eq!(noted, Noted::Started);
        assert_eq!(busy.retry_after, REFILL);
        assert!(busy.reason.contains("failed link logins"));
        assert_eq!(throttle.admit(attacker, now).unwrap_err().1, Noted::Quiet);
        // A correct peer at another address is not affected...
        let branch = ip("198.51.100.1");
        throttle.admit(branch, now).unwrap();
        throttle.password_attempt(branch, "branch", now).unwrap();
        throttle.succeeded(branch, Some("branch"), now);
        throttle.finished(branch);
        // ...and the offending address may try again once a token is back.
        let later = now + REFILL;
        throttle.admit(attacker, later).unwrap();
    }

    #[test]
    fn handshakes_in_flight_are_capped_per_source_and_in_all() {
        let mut throttle = LoginThrottle::default();
        let now = Instant::now();
        let source = ip("192.0.2.7");
        throttle.admit(source, now).unwrap();
        throttle.admit(source, now).unwrap();
        let (busy, _) = throttle.admit(source, now).unwrap_err();
        assert!(busy.reason.contains("in progress from your address"));
        throttle.finished(source);
        throttle.admit(source, now).unwrap();
        for i in 0..(IN_FLIGHT - 2) {
            throttle
                .admit(IpAddr::V4((0x0a00_0000 + i as u32).into()), now)
                .unwrap();
        }
        let (busy, _) = throttle.admit(ip("203.0.113.9"), now).unwrap_err();
        assert!(busy.reason.contains("too many link handshakes in progress"));
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let mut throttle = LoginThrottle::default();
        let now = Instant::now();
        throttle.admit(ip("2001:db8::1"), now).unwrap();
        throttle.admit(ip("2001:db8::2"), now).unwrap();
        assert!(throttle.admit(ip("2001:db8::ffff:3"), now).is_err());
        throttle.admit(ip("2001:db8:0:1::1"), now).unwrap();
    }

    #[test]
    fn one_user_name_is_limited_across_sources_and_a_success_resets_only_it() {
        let mut throttle = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..USER_BURST as u32 {
            let source = IpAddr::V4((0x0a00_0000 + i).into());
            throttle.password_attempt(source, "branch", now).unwrap();
        }
        let busy = throttle
            .password_attempt(ip("192.0.2.200"), "branch", now)
            .unwrap_err();
        assert!(busy.reason.contains("for this user name"));
        throttle
            .password_attempt(ip("192.0.2.200"), "other", now)
            .unwrap();
        throttle.succeeded(ip("192.0.2.201"), Some("branch"), now);
        throttle
            .password_attempt(ip("192.0.2.200"), "branch", now)
            .unwrap();
    }
}
