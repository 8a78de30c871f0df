//! Links to other gateways: the registry of live sessions by peer name,
//! the dialing loops (with backoff and failover) and the link listener.
//! Streams arriving over a link are handed to the gateway's dispatcher.

mod acceptor;
mod dialer;
pub mod identity;
mod start;
mod stream_clients;
pub mod throttle;
pub mod transport;
mod websocket;
pub mod ws_frames;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use link::session::{Datagram, IncomingStream, Session};

pub use acceptor::{handshake_failures, run_acceptor, AcceptContext};
pub use dialer::{run_dialer, DialCredential, DialTarget};
pub use start::start;
pub use stream_clients::{StreamClient, StreamClientGuard, StreamClients};

/// Receives the streams a peer opens towards this gateway's services.
pub trait StreamDispatch: Send + Sync + 'static {
    /// Admits or refuses `request`, which arrived from `peer`.
    fn dispatch(&self, peer: &str, request: IncomingStream);

    /// A datagram of a flow `peer` opened towards one of our udp services.
    /// The default drops it.
    fn datagram(&self, peer: &str, datagram: link::session::Datagram) {
        let _ = (peer, datagram);
    }
}

/// How a live link is carried, for logs, the console and `linkgate status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    /// `tcp`, `ws` or `wss`.
    pub transport: &'static str,
    /// The hub's address as dialed, or the dialer's source address.
    pub address: String,
    /// The proxy chain the dialer went through (passwords masked); empty
    /// when direct (and always on the accepting side, which cannot know).
    pub via: String,
}

/// What the console says about a link besides its live session: since
/// when it is up or down, why it went down, how often it came back.
#[derive(Clone, Debug, Default)]
pub struct LinkHistory {
    /// When the current state began (up or down); None before the first
    /// session.
    pub since: Option<std::time::SystemTime>,
    /// How the last session ended, if one did.
    pub last_end: Option<String>,
    /// Sessions established so far.
    pub sessions: u64,
    /// Wire bytes (sent, received) of the sessions that ended; with the
    /// live session's, a counter over the gateway's whole life.
    pub ended_bytes: [u64; 2],
}

/// Live link sessions, by the `[[peer]] name` of the gateway at the other end.
#[derive(Default)]
pub struct Links {
    sessions: Mutex<HashMap<String, (Session, LinkInfo)>>,
    history: Mutex<HashMap<String, LinkHistory>>,
    /// Our udp flows across links, by peer and flow id: where their
    /// answers go.
    flows: Mutex<HashMap<(String, u32), FlowAnswers>>,
    /// The next flow id per peer, kept across sessions so that a flow that
    /// outlived a reconnect never shares its id with a new one.
    next_flow: Mutex<HashMap<String, u32>>,
    stream_clients: StreamClients,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links").field("up", &self.up()).finish()
    }
}

/// Where the answers on one of our udp flows go.
type FlowAnswers = tokio::sync::mpsc::Sender<Vec<u8>>;

/// Answers waiting for a flow's task, at most (then they are dropped).
const FLOW_BACKLOG: usize = 256;

impl Links {
    /// The live session to `peer`, if its link is up.
    pub fn session(&self, peer: &str) -> Option<Session> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get(peer)
            .map(|(s, _)| s)
            .filter(|s| !s.is_ended())
            .cloned()
    }

    /// How the live link to `peer` is carried, if it is up.
    pub fn info(&self, peer: &str) -> Option<LinkInfo> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get(peer)
            .filter(|(s, _)| !s.is_ended())
            .map(|(_, info)| info.clone())
    }

    /// The link's history (since when, why down, sessions so far).
    pub fn history(&self, peer: &str) -> LinkHistory {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned()
            .unwrap_or_default()
    }

    fn note(&self, peer: &str, change: impl FnOnce(&mut LinkHistory)) {
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        change(history.entry(peer.to_string()).or_default());
    }

    /// Opens a udp flow to `peer` (whose link must be up): its id, and the
    /// receiver of the answers that come back on it. Dropping the receiver
    /// ends the flow here; [`Links::close_flow`] forgets it.
    pub fn open_flow(&self, peer: &str) -> Option<(u32, tokio::sync::mpsc::Receiver<Vec<u8>>)> {
        let session = self.session(peer)?;
        // Our ids have the parity the session gives ours (odd when we dial).
        let first = if session.peer_flow(1) { 2 } else { 1 };
        let flow = {
            let mut next = self.next_flow.lock().unwrap_or_else(|p| p.into_inner());
            let entry = next.entry(peer.to_string()).or_insert(first);
            let flow = *entry;
            *entry = entry.wrapping_add(2).max(first);
            flow
        };
        let (tx, rx) = tokio::sync::mpsc::channel(FLOW_BACKLOG);
        self.flows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((peer.to_string(), flow), tx);
        Some((flow, rx))
    }

    /// Takes flow `flow`, which `peer` opened, for a task of ours: its
    /// datagrams go to the returned receiver instead of to a service by
    /// name (a SOCKS UDP relay, which the peer asked for over a stream).
    /// `None` if the flow is taken already; [`Links::close_flow`] lets it go.
    pub fn adopt_flow(
        &self,
        peer: &str,
        flow: u32,
    ) -> Option<tokio::sync::mpsc::Receiver<Vec<u8>>> {
        let mut flows = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        match flows.entry((peer.to_string(), flow)) {
            std::collections::hash_map::Entry::Occupied(_) => None,
            std::collections::hash_map::Entry::Vacant(slot) => {
                let (tx, rx) = tokio::sync::mpsc::channel(FLOW_BACKLOG);
                slot.insert(tx);
                Some(rx)
            }
        }
    }

    /// Forgets flow `flow` to `peer`.
    pub fn close_flow(&self, peer: &str, flow: u32) {
        self.flows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(peer.to_string(), flow));
    }

    /// Hands a datagram of one of our flows (opened or adopted) to its task
    /// (dropped when the task is behind); gives it back when no task of
    /// ours has that flow.
    fn deliver(&self, peer: &str, datagram: Datagram) -> Option<Datagram> {
        let sender = self
            .flows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(peer.to_string(), datagram.flow))
            .cloned();
        match sender {
            Some(sender) => {
                let _ = sender.try_send(datagram.payload);
                None
            }
            None => Some(datagram),
        }
    }

    /// Which client each of our link streams carries (see
    /// [`StreamClients`]).
    pub fn stream_clients(&self) -> &StreamClients {
        &self.stream_clients
    }

    /// Names of peers whose link is up.
    pub fn up(&self) -> Vec<String> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .iter()
            .filter(|(_, (s, _))| !s.is_ended())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Registers a new session for `peer`, closing any previous one.
    fn register(&self, peer: &str, session: Session, info: LinkInfo) {
        let previous = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.to_string(), (session, info));
        let ended = previous.map(|(old, _)| {
            old.close("replaced by a new link from the same peer");
            old.stats()
        });
        self.note(peer, |h| {
            h.since = Some(std::time::SystemTime::now());
            h.sessions += 1;
            if let Some(stats) = ended {
                h.ended_bytes[0] += stats.wire_sent;
                h.ended_bytes[1] += stats.wire_received;
            }
        });
    }

    /// Removes `session` if it is still the one registered for `peer`.
    fn unregister(&self, peer: &str, session: &Session) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions
            .get(peer)
            .is_some_and(|(s, _)| s.same_session(session))
        {
            sessions.remove(peer);
            drop(sessions);
            let stats = session.stats();
            self.note(peer, |h| {
                h.ended_bytes[0] += stats.wire_sent;
                h.ended_bytes[1] += stats.wire_received;
            });
        }
    }

    /// Closes every link with an authenticated close record and waits (at
    /// most `wait`) until the other sides answered with theirs, so that a
    /// gateway that stops is not taken for a cut link.
    pub async fn close_all(&self, reason: &str, wait: std::time::Duration) {
        let sessions: Vec<Session> = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, (s, _))| s)
            .collect();
        for session in &sessions {
            session.close(reason);
        }
        let all_ended = futures_util::future::join_all(sessions.iter().map(Session::ended));
        let _ = tokio::time::timeout(wait, all_ended).await;
    }
}

/// How long an accepted session may take to show its first record before
/// it is dropped (the dialer sends a PING at once).
const FIRST_RECORD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs a new session: registers it, feeds its incoming streams to
/// `dispatch`, and unregisters it when it ends. Returns how it ended.
///
/// An accepted session replaces the peer's registered one only once it
/// has received an authenticated record, as WireGuard switches only on the
/// first authenticated data: a replayed key-mode hello completes a
/// handshake, but its sender has no keys to follow it with, so the live
/// link stays.
async fn serve_session(
    links: &Arc<Links>,
    dispatch: &Arc<dyn StreamDispatch>,
    peer: &str,
    session: Session,
    mut incoming: tokio::sync::mpsc::Receiver<IncomingStream>,
    wait_for_proof: bool,
    info: LinkInfo,
) -> link::session::LinkEnd {
    if wait_for_proof {
        let proven = tokio::time::timeout(FIRST_RECORD_TIMEOUT, session.authenticated()).await;
        if !matches!(proven, Ok(true)) {
            session.close("no authenticated record after the handshake");
            return link::session::LinkEnd::Failed(
                "the other side sent no authenticated record after the handshake (a replayed hello?)".into(),
            );
        }
    }
    crate::events::note(
        crate::events::EventKind::LinkUp,
        format!("link to {peer} up ({} {})", info.transport, info.address),
    );
    links.register(peer, session.clone(), info);
    let dispatcher = {
        let dispatch = dispatch.clone();
        let peer = peer.to_string();
        tokio::spawn(async move {
            while let Some(request) = incoming.recv().await {
                dispatch.dispatch(&peer, request);
            }
        })
    };
    let datagrams = session.take_datagrams().map(|mut datagrams| {
        let (dispatch, links, session, peer) = (
            dispatch.clone(),
            links.clone(),
            session.clone(),
            peer.to_string(),
        );
        tokio::spawn(async move {
            while let Some(datagram) = datagrams.recv().await {
                // A flow a task of ours holds first; then a flow the peer
                // opens names its service. An answer to a flow we no
                // longer have is dropped.
                if let Some(datagram) = links.deliver(&peer, datagram) {
                    if session.peer_flow(datagram.flow) {
                        dispatch.datagram(&peer, datagram);
                    }
                }
            }
        })
    });
    let end = session.ended().await;
    dispatcher.abort();
    if let Some(datagrams) = datagrams {
        datagrams.abort();
    }
    links.unregister(peer, &session);
    if links.session(peer).is_none() {
        crate::events::note(
            crate::events::EventKind::LinkDown,
            format!("link to {peer} {end}"),
        );
        links.note(peer, |h| {
            h.since = Some(std::time::SystemTime::now());
            h.last_end = Some(end.to_string());
        });
    }
    end
}
