//! The connections being served right now, for the console, `/api/status`
//! and `linkgate status`: who, to where, bytes so far. Each entry lives as
//! long as its connection's task (dropping the handle removes it); the relay
//! adds bytes to it as they are written, so a two-hour transfer shows its
//! progress, and the service's counters move with it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime};

use crate::metrics::ServiceMetrics;

/// One live connection. Bytes are counted with relaxed atomics: a reading
/// may be a moment behind, never wrong by more than one write.
#[derive(Debug)]
pub struct LiveConnection {
    /// Gateway-wide connection number (as in its audit record).
    pub id: u64,
    /// The service serving it.
    pub service: Arc<str>,
    /// Client address or `peer:NAME`.
    pub client: String,
    /// The outbound chain, passwords masked.
    pub via: Arc<str>,
    /// When it was accepted.
    pub started: Instant,
    /// The same moment on the wall clock.
    pub started_at: SystemTime,
    details: Mutex<Details>,
    up: AtomicU64,
    down: AtomicU64,
    metrics: Arc<ServiceMetrics>,
    /// The user's counters, once the user is known: from then on every
    /// byte counted here is counted for the user too.
    user_bytes: std::sync::OnceLock<Arc<crate::metrics::UserBytes>>,
}

#[derive(Debug, Default)]
struct Details {
    user: Option<String>,
    target: String,
}

/// A snapshot of a live connection.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ConnectionStatus {
    /// See [`LiveConnection::id`].
    pub id: u64,
    /// The service's name.
    pub service: String,
    /// Client address or `peer:NAME`.
    pub client: String,
    /// The authenticated user, or empty.
    pub user: String,
    /// Where it goes (empty until known).
    pub target: String,
    /// The outbound chain, or empty.
    pub via: String,
    /// Client → target bytes so far.
    pub bytes_up: u64,
    /// Target → client bytes so far.
    pub bytes_down: u64,
    /// Seconds since it was accepted.
    pub age_s: f64,
}

impl LiveConnection {
    /// Counts `n` more bytes relayed client → target (`up`) or back,
    /// for the connection and its service.
    pub fn add(&self, up: bool, n: u64) {
        let user = self.user_bytes.get();
        if up {
            self.up.fetch_add(n, Ordering::Relaxed);
            self.metrics.add_bytes(n, 0);
            if let Some(user) = user {
                user.add(n, 0);
            }
        } else {
            self.down.fetch_add(n, Ordering::Relaxed);
            self.metrics.add_bytes(0, n);
            if let Some(user) = user {
                user.add(0, n);
            }
        }
    }

    /// Whether this connection's bytes are counted for its user as they
    /// move (so the audit record must not count them again).
    pub fn counts_for_user(&self) -> bool {
        self.user_bytes.get().is_some()
    }

    /// Bytes counted so far, (up, down).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }

    /// Sets what the console shows as user and target once they are known.
    pub fn set_details(&self, user: Option<&str>, target: &str) {
        let mut details = self.details.lock().unwrap_or_else(|p| p.into_inner());
        details.user = user.map(str::to_string);
        details.target = target.to_string();
        if let Some(counter) = user.and_then(crate::metrics::user_counter) {
            if self.user_bytes.set(counter.clone()).is_ok() {
                // What moved before the user was known counts too.
                let (up, down) = self.bytes();
                counter.add(up, down);
            }
        }
    }

    fn status(&self) -> ConnectionStatus {
        let details = self.details.lock().unwrap_or_else(|p| p.into_inner());
        let (bytes_up, bytes_down) = self.bytes();
        ConnectionStatus {
            id: self.id,
            service: self.service.to_string(),
            client: self.client.clone(),
            user: details.user.clone().unwrap_or_default(),
            target: details.target.clone(),
            via: self.via.to_string(),
            bytes_up,
            bytes_down,
            age_s: self.started.elapsed().as_secs_f64(),
        }
    }
}

/// The gateway's live connections, by id.
#[derive(Debug, Default)]
pub struct Registry {
    live: Mutex<BTreeMap<u64, Weak<LiveConnection>>>,
}

/// Keeps a connection listed until dropped.
#[derive(Debug)]
pub struct Registered {
    entry: Arc<LiveConnection>,
    registry: Arc<Registry>,
}

impl std::ops::Deref for Registered {
    type Target = LiveConnection;
    fn deref(&self) -> &LiveConnection {
        &self.entry
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.entry.id);
    }
}

impl Registry {
    /// Lists a connection accepted now; it stays listed while the returned
    /// handle lives.
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        service: Arc<str>,
        client: String,
        via: Arc<str>,
        metrics: Arc<ServiceMetrics>,
    ) -> Arc<Registered> {
        let entry = Arc::new(LiveConnection {
            id,
            service,
            client,
            via,
            started: Instant::now(),
            started_at: SystemTime::now(),
            details: Mutex::default(),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            metrics,
            user_bytes: std::sync::OnceLock::new(),
        });
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::downgrade(&entry));
        Arc::new(Registered {
            entry,
            registry: self.clone(),
        })
    }

    /// The live connections, newest first, at most `limit` of them, and
    /// how many there are in all.
    pub fn snapshot(&self, limit: usize) -> (Vec<ConnectionStatus>, usize) {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let total = live.len();
        let list = live
            .values()
            .rev()
            .filter_map(Weak::upgrade)
            .take(limit)
            .map(|c| c.status())
            .collect();
        (list, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_listed_while_held_newest_first_with_live_bytes() {
        let registry = Arc::new(Registry::default());
        let metrics = Arc::new(ServiceMetrics::default());
        let first = registry.register(
            1,
            "web".into(),
            "10.0.0.1:5000".into(),
            "".into(),
            metrics.clone(),
        );
        let second = registry.register(
            2,
            "web".into(),
            "10.0.0.2:5000".into(),
            "".into(),
            metrics.clone(),
        );
        second.set_details(Some("alice"), "intranet:80");
        first.add(true, 100);
        first.add(false, 4000);
        let (list, total) = registry.snapshot(10);
        assert_eq!(total, 2);
        assert_eq!(list[0].id, 2, "newest first");
        assert_eq!(
            (list[0].user.as_str(), list[0].target.as_str()),
            ("alice", "intranet:80")
        );
        assert_eq!((list[1].bytes_up, list[1].bytes_down), (100, 4000));
        let counters = metrics.snapshot();
        assert_eq!(
            (counters.bytes_up, counters.bytes_down),
            (100, 4000),
            "the service counts as bytes move"
        );
        drop(first);
        assert_eq!(registry.snapshot(10).1, 1);
        assert_eq!(registry.snapshot(0).0.len(), 0);
    }
}
