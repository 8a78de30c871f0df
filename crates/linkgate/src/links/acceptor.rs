//! The `[link] listen` side: accepts links from peers, authenticates them,
//! serves their sessions, and slows down sources that keep failing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use link::handshake::{Identity, PeerRecord, StaticKeys};
use link::io::HubPeers;
use link::session::{LinkEnd, Role, Session, SessionConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{serve_session, Links, StreamDispatch};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Failed authentications per source address, to slow down guessing.
///
/// After [`FREE_FAILURES`] failures, each new handshake from that address
/// first waits 250 ms × 2^(failures − FREE_FAILURES), at most 10 s; a
/// success or 15 quiet minutes forget the address.
#[derive(Default)]
pub struct FailureTracker {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// Failures allowed before delays start.
pub const FREE_FAILURES: u32 = 3;
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
const MAX_TRACKED: usize = 100_000;

impl FailureTracker {
    /// The delay to impose on a new handshake from `ip`.
    pub fn delay(&self, ip: IpAddr) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&ip) {
            Some((_, last)) if last.elapsed() > FORGET_AFTER => {
                map.remove(&ip);
                Duration::ZERO
            }
            Some((count, _)) if *count >= FREE_FAILURES => {
                let exponent = (count - FREE_FAILURES).min(6);
                (Duration::from_millis(250) * 2u32.pow(exponent)).min(Duration::from_secs(10))
            }
            _ => Duration::ZERO,
        }
    }

    /// Records a failed handshake from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (_, last)| last.elapsed() < FORGET_AFTER);
        }
        let entry = map.entry(ip).or_insert((0, Instant::now()));
        entry.0 += 1;
        entry.1 = Instant::now();
    }

    /// Forgets `ip` after a successful handshake.
    pub fn succeeded(&self, ip: IpAddr) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ip);
    }
}

/// Everything the link listener needs.
pub struct AcceptContext {
    /// This gateway's OPAQUE identity.
    pub identity: Identity,
    /// Its static keys for key mode (derived from the identity).
    pub static_keys: StaticKeys,
    /// Registration records of the password-mode peers that may dial in, by name.
    pub records: HashMap<String, PeerRecord>,
    /// Key-mode peers that may dial in: their public key and name.
    pub key_peers: HashMap<[u8; 32], String>,
    /// The latest key-mode hello timestamp accepted from each peer, so a
    /// replayed hello is refused (forgotten at restart, as WireGuard does).
    pub hello_times: Mutex<HashMap<String, u64>>,
    /// Live sessions.
    pub links: Arc<Links>,
    /// Where incoming streams go.
    pub dispatch: Arc<dyn StreamDispatch>,
    /// Session tunables of each peer, by name.
    pub configs: HashMap<String, SessionConfig>,
    /// Per-source failure counts.
    pub failures: FailureTracker,
}

impl HubPeers for AcceptContext {
    fn record(&self, user: &str) -> Option<PeerRecord> {
        self.records.get(user).cloned()
    }

    fn key_peer(&self, key: &[u8; 32]) -> Option<String> {
        self.key_peers.get(key).cloned()
    }

    fn fresh(&self, peer: &str, timestamp: u64) -> bool {
        let mut times = self.hello_times.lock().unwrap_or_else(|p| p.into_inner());
        match times.get(peer) {
            Some(&last) if timestamp <= last => false,
            _ => {
                times.insert(peer.to_string(), timestamp);
                true
            }
        }
    }
}

/// Accepts links on `listener` until `stop` is cancelled.
pub async fn run_acceptor(
    listener: TcpListener,
    context: Arc<AcceptContext>,
    stop: CancellationToken,
) {
    loop {
        let (tcp, from) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "link accept failed; pausing 100ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let context = context.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = accept_one(tcp, from, &context, &stop) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn accept_one(
    mut tcp: TcpStream,
    from: SocketAddr,
    context: &Arc<AcceptContext>,
    stop: &CancellationToken,
) {
    let ip = crate::access::canonical(from.ip());
    let delay = context.failures.delay(ip);
    if !delay.is_zero() {
        tracing::debug!(%from, ?delay, "slowing down a source with failed link logins");
        tokio::time::sleep(delay).await;
    }
    let handshake = link::io::accept(
        &mut tcp,
        &context.identity,
        &context.static_keys,
        context.as_ref(),
    );
    let (peer, keys) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(done)) => done,
        Ok(Err(failure)) => {
            context.failures.failed(ip);
            let peer = failure.user.as_deref().unwrap_or("?");
            match (failure.key, &failure.user) {
                (Some(key), None) => {
                    use base64::Engine;
                    let key = base64::engine::general_purpose::STANDARD.encode(key);
                    tracing::warn!(
                        %from,
                        peer,
                        "authentication failed for a gateway with public key {key}: {}; if it is one of yours, give its [[peer]] public_key = \"{key}\"",
                        failure.error
                    );
                }
                _ => tracing::warn!(
                    %from,
                    peer,
                    "authentication failed for peer '{peer}': {}; check that both gateways have the same password (or keys) and that this gateway has a [[peer]] named '{peer}'",
                    failure.error
                ),
            }
            return;
        }
        Err(_) => {
            context.failures.failed(ip);
            tracing::warn!(%from, "link handshake timed out");
            return;
        }
    };
    context.failures.succeeded(ip);
    tracing::info!(%peer, %from, "link up");
    let config = context.configs.get(&peer).cloned().unwrap_or_default();
    let (session, incoming) = Session::start(tcp, keys, Role::Acceptor, config);
    let serving = serve_session(
        &context.links,
        &context.dispatch,
        &peer,
        session.clone(),
        incoming,
    );
    let end = tokio::select! {
        end = serving => end,
        () = stop.cancelled() => {
            session.close("gateway shutting down");
            return;
        }
    };
    match end {
        LinkEnd::Closed(reason) => {
            tracing::info!(%peer, %reason, "link closed by the other gateway")
        }
        LinkEnd::Failed(reason) => tracing::warn!(%peer, %reason, "link down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_start_after_free_failures_grow_and_reset_on_success() {
        let tracker = FailureTracker::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..FREE_FAILURES {
            assert_eq!(tracker.delay(ip), Duration::ZERO);
            tracker.failed(ip);
        }
        assert_eq!(tracker.delay(ip), Duration::from_millis(250));
        tracker.failed(ip);
        assert_eq!(tracker.delay(ip), Duration::from_millis(500));
        for _ in 0..20 {
            tracker.failed(ip);
        }
        assert_eq!(tracker.delay(ip), Duration::from_secs(10));
        assert_eq!(tracker.delay("192.0.2.8".parse().unwrap()), Duration::ZERO);
        tracker.succeeded(ip);
        assert_eq!(tracker.delay(ip), Duration::ZERO);
    }
}
