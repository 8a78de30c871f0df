//! The `[link] listen` side: accepts links from peers, authenticates them
//! and serves their sessions. Who may start a handshake, and how many
//! password answers a source or a user name gets, is [`super::throttle`]'s
//! call; refusals are answered at once (a busy message), never by sleeping.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use link::handshake::{HandshakeError, Identity, PeerRecord, StaticKeys};
use link::io::{HubPeers, LinkHandshakeError};
use link::session::{LinkEnd, Role, Session, SessionConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::throttle::{Busy, LoginThrottle, Noted};
use super::transport::Carrier;
use super::{serve_session, LinkInfo, Links, StreamDispatch};

/// The dialer sends its hello at once; a connection silent for this long
/// is dropped (it holds a handshake slot of its source meanwhile).
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(3);
/// The whole handshake, hello to final message.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS and the WebSocket upgrade, on `ws://` and `wss://` listeners.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Who may start a handshake, and how many password answers each
    /// source and user name gets.
    pub throttle: Mutex<LoginThrottle>,
}

impl AcceptContext {
    fn throttle(&self) -> std::sync::MutexGuard<'_, LoginThrottle> {
        self.throttle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The hub's view of the peers for one handshake from `ip`.
struct Attempt<'a> {
    context: &'a AcceptContext,
    ip: IpAddr,
}

fn whole_seconds(wait: Duration) -> u16 {
    u16::try_from(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).unwrap_or(u16::MAX)
}

impl HubPeers for Attempt<'_> {
    fn record(&self, user: &str) -> Option<PeerRecord> {
        self.context.records.get(user).cloned()
    }

    fn key_peer(&self, key: &[u8; 32]) -> Option<String> {
        self.context.key_peers.get(key).cloned()
    }

    fn password_attempt(&self, user: &str) -> Result<(), (u16, String)> {
        self.context
            .throttle()
            .password_attempt(self.ip, user, Instant::now())
            .map_err(|busy| (whole_seconds(busy.retry_after), busy.reason.to_string()))
    }

    fn fresh(&self, peer: &str, timestamp: u64) -> bool {
        let mut times = self
            .context
            .hello_times
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match times.get(peer) {
            Some(&last) if timestamp <= last => false,
            _ => {
                times.insert(peer.to_string(), timestamp);
                true
            }
        }
    }
}

/// Accepts links on `listener`, carried as `carrier` says, until `stop`
/// is cancelled.
pub async fn run_acceptor(
    listener: TcpListener,
    carrier: Carrier,
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
        let admitted = context.throttle().admit(from.ip(), Instant::now());
        if let Err((busy, noted)) = admitted {
            refuse_busy(&tcp, from, &busy, noted);
            continue;
        }
        let context = context.clone();
        let stop = stop.clone();
        let carrier = carrier.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = accept_one(tcp, from, &carrier, &context, &stop) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Answers a refused connection with the busy message, without waiting
/// (a socket that cannot take 60 bytes at once gets nothing), and closes it.
fn refuse_busy(tcp: &TcpStream, from: SocketAddr, busy: &Busy, noted: Noted) {
    let seconds = whole_seconds(busy.retry_after);
    let message = link::handshake::busy(seconds, busy.reason);
    let mut framed = (message.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&message);
    let _ = tcp.try_write(&framed);
    match noted {
        Noted::Started => tracing::warn!(
            %from,
            "throttling link logins from {}: {}; its handshakes are refused for {seconds} s",
            from.ip(),
            busy.reason
        ),
        Noted::Quiet => {
            tracing::debug!(%from, reason = busy.reason, "link handshake refused: busy")
        }
    }
}

/// Releases a handshake slot of the throttle when dropped.
struct Slot<'a> {
    context: &'a AcceptContext,
    ip: IpAddr,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.context.throttle().finished(self.ip);
    }
}

async fn accept_one(
    tcp: TcpStream,
    from: SocketAddr,
    carrier: &Carrier,
    context: &Arc<AcceptContext>,
    stop: &CancellationToken,
) {
    let ip = from.ip();
    let slot = Slot {
        context: context.as_ref(),
        ip,
    };
    if let Carrier::Tcp = carrier {
        let mut first = [0u8; 1];
        if tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, tcp.peek(&mut first))
            .await
            .is_err()
        {
            tracing::debug!(%from, "no link hello within {FIRST_MESSAGE_TIMEOUT:?}; closed");
            return;
        }
    }
    let mut tcp = match tokio::time::timeout(UPGRADE_TIMEOUT, carrier.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%from, transport = carrier.name(), error = %e, "link connection refused before the handshake");
            return;
        }
        Err(_) => {
            tracing::debug!(%from, transport = carrier.name(), "no {} upgrade within {UPGRADE_TIMEOUT:?}; closed", carrier.name());
            return;
        }
    };
    let attempt = Attempt {
        context: context.as_ref(),
        ip,
    };
    let handshake = link::io::accept(
        &mut tcp.stream,
        &context.identity,
        &context.static_keys,
        &attempt,
    );
    let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await;
    drop(slot);
    let (peer, keys) = match outcome {
        Ok(Ok(done)) => done,
        Ok(Err(failure)) => {
            log_failure(context, from, failure);
            return;
        }
        Err(_) => {
            count_failure("timeout");
            // Not counted against anyone: a slow network, or a slow hub.
            tracing::warn!(%from, "link handshake timed out after {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let password_user = context.records.contains_key(&peer).then_some(peer.as_str());
    context
        .throttle()
        .succeeded(ip, password_user, Instant::now());
    tracing::info!(%peer, %from, transport = carrier.name(), "link up");
    let info = LinkInfo {
        transport: carrier.name(),
        address: from.to_string(),
        via: String::new(),
    };
    let config = context.configs.get(&peer).cloned().unwrap_or_default();
    let (session, incoming) = Session::start(tcp, keys, Role::Acceptor, config);
    let serving = serve_session(
        &context.links,
        &context.dispatch,
        &peer,
        session.clone(),
        incoming,
        true,
        info,
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

/// Failed link handshakes by reason since start, for `/metrics`.
static FAILURES: std::sync::LazyLock<Mutex<std::collections::BTreeMap<&'static str, u64>>> =
    std::sync::LazyLock::new(Mutex::default);

/// Failed link handshakes on this gateway's listeners by reason:
/// `wrong_password_or_unknown_user`, `unknown_key`, `wrong_key`,
/// `stale_hello`, `malformed`, `version`, `busy`, `abandoned`, `timeout`.
pub fn handshake_failures() -> std::collections::BTreeMap<&'static str, u64> {
    FAILURES.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn count_failure(reason: &'static str) {
    *FAILURES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(reason)
        .or_default() += 1;
}

/// Logs why a handshake failed, and charges key-mode failures to the
/// source (password answers were charged when they were given).
fn log_failure(context: &AcceptContext, from: SocketAddr, failure: link::io::AcceptFailure) {
    let peer = failure.user.as_deref().unwrap_or("?");
    count_failure(match &failure.error {
        LinkHandshakeError::Io(_) => "abandoned",
        LinkHandshakeError::Handshake(e) => match e {
            HandshakeError::Busy { .. } => "busy",
            HandshakeError::Authentication if failure.key.is_none() && failure.user.is_some() => {
                "wrong_password_or_unknown_user"
            }
            HandshakeError::Authentication => "wrong_key",
            HandshakeError::UnknownKey => "unknown_key",
            HandshakeError::StaleHello => "stale_hello",
            HandshakeError::Version => "version",
            _ => "malformed",
        },
    });
    match &failure.error {
        LinkHandshakeError::Handshake(HandshakeError::Busy {
            retry_after,
            reason,
        }) => {
            tracing::warn!(
                %from,
                peer,
                "refused a link login for '{peer}' for now ({reason}); asked to retry in {retry_after} s"
            );
            return;
        }
        LinkHandshakeError::Io(e) => {
            tracing::debug!(%from, peer, error = %e, "link handshake abandoned");
            return;
        }
        LinkHandshakeError::Handshake(_) => {}
    }
    if failure.key.is_some() || failure.user.is_none() {
        context.throttle().key_failure(from.ip(), Instant::now());
    }
    crate::events::note(
        crate::events::EventKind::LoginFailed,
        format!("link login from {from} as '{peer}': {}", failure.error),
    );
    // Say what happened as far as the hub knows it (the dialer is told
    // less: it must not learn which user names exist).
    let password_mode = failure.key.is_none() && failure.user.is_some();
    match (&failure.error, failure.key, &failure.user) {
        (_, Some(key), None) => {
            use base64::Engine;
            let key = base64::engine::general_purpose::STANDARD.encode(key);
            tracing::warn!(
                %from,
                "authentication failed for a gateway with public key {key}: {}; if it is one of yours, give its [[peer]] public_key = \"{key}\"",
                failure.error
            );
        }
        (LinkHandshakeError::Handshake(HandshakeError::Authentication), _, Some(_))
            if password_mode && !context.records.contains_key(peer) =>
        {
            let mut known: Vec<&str> = context.records.keys().map(String::as_str).collect();
            known.sort_unstable();
            tracing::warn!(
                %from,
                peer,
                "authentication failed for '{peer}': this gateway has no [[peer]] named '{peer}' that logs in with a password (those it has: {})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            );
        }
        (LinkHandshakeError::Handshake(HandshakeError::Authentication), _, Some(_))
            if password_mode =>
        {
            tracing::warn!(
                %from,
                peer,
                "authentication failed for peer '{peer}': wrong password (or a replayed handshake); the [[peer]] '{peer}' here and that gateway must have the same password"
            );
        }
        (LinkHandshakeError::Handshake(HandshakeError::Authentication), None, None) => {
            tracing::warn!(
                %from,
                "authentication failed for a gateway at {from}: its hello was made for another public key than this gateway's; it must pin the key `linkgate public-key` prints here"
            );
        }
        _ => tracing::warn!(
            %from,
            peer,
            "link handshake from {from} (as '{peer}') failed: {}",
            failure.error
        ),
    }
}
