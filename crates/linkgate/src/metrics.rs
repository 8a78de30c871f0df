//! Per-service counters for the admin page, `/api/status` and `/metrics`.
//! Updated with relaxed atomics: cheap on the hot path, and a snapshot is
//! allowed to be a moment out of date.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

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
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
        }
    }
}
