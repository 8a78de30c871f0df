//! Keeps the link to one `[[peer]]` with `connect` up: tries its addresses
//! in order, authenticates, serves the session, and after any failure waits
//! with exponential backoff and jitter (capped at 30 s) before trying again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use link::handshake::HandshakeError;
use link::io::LinkHandshakeError;
use link::session::{LinkEnd, Role, Session, SessionConfig};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::transport::Route;
use super::LinkInfo;
use super::{serve_session, Links, StreamDispatch};
use crate::config::{LinkAddress, Secret};

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reaching the hub: TCP (through the proxy chain), TLS, WebSocket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait a hub's busy answer can impose on us.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(60);
/// A link that stayed up this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// What a dialer needs to know about its peer.
pub struct DialTarget {
    /// Our local name for the peer.
    pub peer: String,
    /// Addresses, tried in order.
    pub connect: Vec<LinkAddress>,
    /// The proxy chain and TLS settings to reach them.
    pub route: Route,
    /// How we prove who we are.
    pub credential: DialCredential,
}

/// How a dialer authenticates.
pub enum DialCredential {
    /// Password mode (OPAQUE).
    Password {
        /// The name the other side knows us by.
        user: String,
        /// The link password.
        password: Secret,
    },
    /// Key mode (Noise IKpsk2).
    Key {
        /// Our static key pair.
        keys: link::handshake::StaticKeys,
        /// The public key pinned for the peer.
        peer_key: [u8; 32],
    },
}

/// Dials until `stop` is cancelled.
pub async fn run_dialer(
    target: DialTarget,
    links: Arc<Links>,
    dispatch: Arc<dyn StreamDispatch>,
    config: SessionConfig,
    stop: CancellationToken,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let mut hint = None;
        match establish(&target, &config).await {
            Err(retry_after) => hint = retry_after,
            Ok((session, incoming, addr)) => {
                let via = target.route.via();
                if via.is_empty() {
                    tracing::info!(peer = %target.peer, %addr, "link up");
                } else {
                    tracing::info!(peer = %target.peer, %addr, via, "link up");
                }
                let info = LinkInfo {
                    transport: addr.transport(),
                    address: addr.to_string(),
                    via: via.to_string(),
                };
                let started = Instant::now();
                let end = tokio::select! {
                    end = serve_session(&links, &dispatch, &target.peer, session.clone(), incoming, false, info) => end,
                    () = stop.cancelled() => {
                        session.close("gateway shutting down");
                        return;
                    }
                };
                match &end {
                    LinkEnd::Closed(reason) => {
                        tracing::info!(peer = %target.peer, %reason, "link closed by the other gateway")
                    }
                    LinkEnd::Failed(reason) => {
                        tracing::warn!(peer = %target.peer, %reason, "link down")
                    }
                }
                if started.elapsed() >= STABLE_AFTER {
                    backoff = FIRST_BACKOFF;
                }
            }
        }
        // Jitter spreads reconnects of many offices after a hub restart.
        let half = backoff / 2;
        let mut wait = half + half.mul_f64(rand::thread_rng().gen::<f64>());
        if let Some(retry_after) = hint {
            // The hub's busy answer is unauthenticated: a hint, honoured
            // within our own bounds.
            wait = wait.max(retry_after.min(MAX_BUSY_WAIT));
        }
        tracing::debug!(peer = %target.peer, wait = ?wait, "reconnecting after backoff");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A link just established: the session, its incoming streams, and the
/// address it was made to.
type Established = (
    Session,
    tokio::sync::mpsc::Receiver<link::session::IncomingStream>,
    LinkAddress,
);

/// One pass over the peer's addresses; logs each failure. `Err` carries the
/// longest retry time a busy hub asked for, if any.
async fn establish(
    target: &DialTarget,
    config: &SessionConfig,
) -> Result<Established, Option<Duration>> {
    let mut hint: Option<Duration> = None;
    for addr in &target.connect {
        let mut tcp = match tokio::time::timeout(CONNECT_TIMEOUT, target.route.dial(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::warn!(peer = %target.peer, %addr, error = %e, "cannot reach the other gateway");
                continue;
            }
            Err(_) => {
                tracing::warn!(peer = %target.peer, %addr, "connecting to the other gateway timed out");
                continue;
            }
        };
        let handshake = async {
            match &target.credential {
                DialCredential::Password { user, password } => {
                    link::io::dial(&mut tcp.stream, user, password.expose().as_bytes()).await
                }
                DialCredential::Key { keys, peer_key } => {
                    link::io::dial_key(&mut tcp.stream, keys, peer_key).await
                }
            }
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(keys)) => {
                let (session, incoming) = Session::start(tcp, keys, Role::Dialer, config.clone());
                return Ok((session, incoming, addr.clone()));
            }
            Ok(Err(LinkHandshakeError::Handshake(HandshakeError::Busy {
                retry_after,
                reason,
            }))) => {
                tracing::warn!(
                    peer = %target.peer,
                    %addr,
                    "the other gateway is not taking link logins from here now: {reason}; retrying in {retry_after} s (its hint)"
                );
                let wait = Duration::from_secs(u64::from(retry_after));
                hint = Some(hint.map_or(wait, |h| h.max(wait)));
            }
            Ok(Err(LinkHandshakeError::Handshake(e))) => match &target.credential {
                DialCredential::Password { user, .. } => tracing::error!(
                    peer = %target.peer,
                    %addr,
                    user = %user,
                    "authentication failed for peer '{}': {e}; check that both gateways have the same password and that the other side has a [[peer]] named '{}'",
                    target.peer,
                    user
                ),
                DialCredential::Key { .. } => tracing::error!(
                    peer = %target.peer,
                    %addr,
                    "authentication failed for peer '{}': {e}; check that its public_key here is what `linkgate public-key` prints there, and that it has a [[peer]] with this gateway's public key",
                    target.peer
                ),
            },
            Ok(Err(e)) => {
                tracing::warn!(peer = %target.peer, %addr, error = %e, "link handshake failed")
            }
            Err(_) => tracing::warn!(peer = %target.peer, %addr, "link handshake timed out"),
        }
    }
    Err(hint)
}
