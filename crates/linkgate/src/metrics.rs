//! Per-service counters for the admin page, `/api/status` and `/metrics`.
//! Updated with relaxed atomics: cheap on the hot path, and a snapshot is
//! allowed to be a moment out of date.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{LazyLock, Mutex};

/// Upper bounds (seconds) of the connection-duration histogram's buckets;
/// a last bucket takes the rest.
pub const DURATION_BUCKETS: [f64; 6] = [0.1, 1.0, 10.0, 60.0, 600.0, 3600.0];

/// Bytes of finished connections by authenticated user, [up, down],
/// process-wide (a user's traffic crosses services).
static USER_BYTES: LazyLock<Mutex<BTreeMap<String, Arc<UserBytes>>>> =
    LazyLock::new(Mutex::default);

/// Most distinct users counted (a bound against a flood of names).
const MAX_USERS: usize = 10_000;

/// One user's byte counters, counted as bytes move (a live connection
/// holds its user's, see `connections::LiveConnection`).
#[derive(Debug, Default)]
pub struct UserBytes {
    up: AtomicU64,
    down: AtomicU64,
}

impl UserBytes {
    /// Counts `up` and `down` more bytes.
    pub fn add(&self, up: u64, down: u64) {
        if up > 0 {
            self.up.fetch_add(up, Ordering::Relaxed);
        }
        if down > 0 {
            self.down.fetch_add(down, Ordering::Relaxed);
        }
    }
}

/// The counters of `user` (none past [`MAX_USERS`] distinct names).
pub fn user_counter(user: &str) -> Option<Arc<UserBytes>> {
    let mut users = USER_BYTES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(counter) = users.get(user) {
        return Some(counter.clone());
    }
    if users.len() >= MAX_USERS {
        return None;
    }
    let counter = Arc::new(UserBytes::default());
    users.insert(user.to_string(), counter.clone());
    Some(counter)
}

/// Counts bytes for `user` that no live connection counted as they moved.
pub fn add_user_bytes(user: &str, up: u64, down: u64) {
    if let Some(counter) = user_counter(user) {
        counter.add(up, down);
    }
}

/// Bytes by user so far, live connections included.
pub fn user_bytes() -> BTreeMap<String, [u64; 2]> {
    USER_BYTES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(user, c)| {
            (
                user.clone(),
                [c.up.load(Ordering::Relaxed), c.down.load(Ordering::Relaxed)],
            )
        })
        .collect()
}

use crate::audit::AuditResult;

/// Counters of one service.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    active: AtomicI64,
    ok: AtomicU64,
    denied: AtomicU64,
    auth_failed: AtomicU64,
    error: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    /// Finished connections by duration bucket, and the sum of durations
    /// in milliseconds.
    durations: [AtomicU64; DURATION_BUCKETS.len() + 1],
    duration_ms_sum: AtomicU64,
    /// Datagrams relayed (udp services, SOCKS UDP), up and down, and
    /// dropped (caps, full socket buffers, busy or down links).
    datagrams: [AtomicU64; 2],
    datagrams_dropped: AtomicU64,
}

/// Every service's counters, by service name, for the gateway's whole life:
/// a reload that restarts a service keeps its counters (a transfer that
/// spans the reload stays in them).
#[derive(Debug, Default)]
pub struct MetricsBook {
    services: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<ServiceMetrics>>>,
}

impl MetricsBook {
    /// The counters of service `name` (created at its first start).
    pub fn for_service(&self, name: &str) -> std::sync::Arc<ServiceMetrics> {
        self.services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }
}

/// A copy of a service's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricsSnapshot {
    /// Connections being served now.
    pub active: i64,
    /// Finished connections (or HTTP requests) by result.
    pub ok: u64,
    /// Refused by rules or limits.
    pub denied: u64,
    /// Failed logins.
    pub auth_failed: u64,
    /// Errors.
    pub error: u64,
    /// Client → target bytes so far (live connections included).
    pub bytes_up: u64,
    /// Target → client bytes so far (live connections included).
    pub bytes_down: u64,
    /// Finished connections per duration bucket (see [`DURATION_BUCKETS`];
    /// not cumulative, the last one is everything longer).
    #[serde(default)]
    pub duration_buckets: Vec<u64>,
    /// Sum of finished connections' durations, seconds.
    #[serde(default)]
    pub duration_sum_s: f64,
    /// Client → target datagrams relayed so far.
    #[serde(default)]
    pub datagrams_up: u64,
    /// Target → client datagrams relayed so far.
    #[serde(default)]
    pub datagrams_down: u64,
    /// Datagrams dropped so far (over a cap, a full socket buffer, a link
    /// that was busy or down), as UDP drops them.
    #[serde(default)]
    pub datagrams_dropped: u64,
}

/// Counts a connection as active until dropped.
pub struct ActiveGuard<'a>(&'a ServiceMetrics);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServiceMetrics {
    /// Marks a connection active for the guard's lifetime.
    pub fn active(&self) -> ActiveGuard<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self)
    }

    /// Counts bytes as the relay moves them (live connections).
    pub fn add_bytes(&self, up: u64, down: u64) {
        if up > 0 {
            self.bytes_up.fetch_add(up, Ordering::Relaxed);
        }
        if down > 0 {
            self.bytes_down.fetch_add(down, Ordering::Relaxed);
        }
    }

    /// Counts datagrams as they are relayed (`up`: client → target) and
    /// those dropped on the way.
    pub fn add_datagrams(&self, up: bool, relayed: u64, dropped: u64) {
        if relayed > 0 {
            self.datagrams[usize::from(!up)].fetch_add(relayed, Ordering::Relaxed);
        }
        if dropped > 0 {
            self.datagrams_dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Counts one datagram, relayed or dropped (`up`: client → target).
    pub fn add_datagram(&self, up: bool, relayed: bool) {
        self.add_datagrams(up, u64::from(relayed), u64::from(!relayed));
    }

    /// Counts one finished record; `bytes_up`/`bytes_down` are the bytes not
    /// already counted live.
    pub fn record(&self, result: AuditResult, bytes_up: u64, bytes_down: u64) {
        let counter = match result {
            AuditResult::Ok => &self.ok,
            AuditResult::Denied => &self.denied,
            AuditResult::AuthFailed => &self.auth_failed,
            AuditResult::Error => &self.error,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.bytes_up.fetch_add(bytes_up, Ordering::Relaxed);
        self.bytes_down.fetch_add(bytes_down, Ordering::Relaxed);
    }

    /// Counts a finished connection's duration.
    pub fn record_duration(&self, duration: std::time::Duration) {
        let seconds = duration.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.durations[bucket].fetch_add(1, Ordering::Relaxed);
        self.duration_ms_sum
            .fetch_add(duration.as_millis() as u64, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            active: self.active.load(Ordering::Relaxed),
            ok: self.ok.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
            auth_failed: self.auth_failed.load(Ordering::Relaxed),
            error: self.error.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            duration_buckets: self
                .durations
                .iter()
                .map(|d| d.load(Ordering::Relaxed))
                .collect(),
            duration_sum_s: self.duration_ms_sum.load(Ordering::Relaxed) as f64 / 1000.0,
            datagrams_up: self.datagrams[0].load(Ordering::Relaxed),
            datagrams_down: self.datagrams[1].load(Ordering::Relaxed),
            datagrams_dropped: self.datagrams_dropped.load(Ordering::Relaxed),
        }
    }
}
