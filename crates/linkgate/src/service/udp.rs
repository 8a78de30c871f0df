//! `type = "udp"`: datagrams relayed whole and unchanged between clients
//! and the service's `target`.
//!
//! Each client address and port is a *flow* with its own outbound socket,
//! connected to the target, so that replies find their way back to the
//! client that caused them and two flows never cross. A flow is admitted
//! like a connection (`allow`/`deny`, `max_connections` counts flows,
//! `max_connections_per_client`), shows in the console while it lives, and
//! ends after `idle_timeout` without a datagram either way, when the target
//! answers with ICMP port unreachable, or when the service stops; then it
//! gets one audit record with bytes and datagrams each way. Bandwidth caps
//! apply per datagram: UDP has no back-pressure, so a datagram over the cap
//! is dropped (and counted), never queued.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::udp_batch::{self, DatagramSocket};
use super::ServiceRuntime;
use crate::access::Verdict;
use crate::audit::{Audit, AuditResult};
use crate::config::{Hop, Host};
use crate::inbound::ClientId;
use crate::limits::{Caps, Way};

/// Largest UDP payload over IPv4 (65,535 − 8 − 20).
pub const MAX_DATAGRAM: usize = 65_507;

/// A refused client's datagrams are dropped without a new audit record for
/// this long (a flood from one source writes one record, not thousands).
const REFUSAL_MEMORY: Duration = Duration::from_secs(5);

/// Flows refused (or being set up) lately, whose datagrams are dropped
/// unrecorded for [`REFUSAL_MEMORY`]; at most a few thousand remembered.
pub(super) struct RefusalMemory<K> {
    seen: Mutex<HashMap<K, Instant>>,
}

impl<K> Default for RefusalMemory<K> {
    fn default() -> Self {
        RefusalMemory {
            seen: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> RefusalMemory<K> {
    /// Whether `key` was noted lately; if not, notes it now.
    pub(super) fn seen_lately(&self, key: &K) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen
            .get(key)
            .is_some_and(|at| at.elapsed() < REFUSAL_MEMORY)
        {
            return true;
        }
        if seen.len() >= 4096 {
            seen.retain(|_, at| at.elapsed() < REFUSAL_MEMORY);
        }
        seen.insert(key.clone(), Instant::now());
        false
    }

    /// Forgets `key` (its flow was admitted after all).
    pub(super) fn forget(&self, key: &K) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// The counters of one flow, shared by the service's receive loop (client
/// → target) and the flow's own task (target → client).
#[derive(Default)]
struct FlowCounters {
    bytes: [AtomicU64; 2],
    datagrams: [AtomicU64; 2],
    dropped: AtomicU64,
    /// Milliseconds from the flow's start to its last datagram either way.
    last_ms: AtomicU64,
}

impl FlowCounters {
    /// Counts `datagrams` relayed `way`, `bytes` in all, once per batch:
    /// a clock read and a handful of shared counters per datagram are a
    /// measurable share of a relay's time at the peak.
    fn count(&self, way: Way, datagrams: usize, bytes: usize, started: Instant) {
        self.bytes[way as usize].fetch_add(bytes as u64, Ordering::Relaxed);
        self.datagrams[way as usize].fetch_add(datagrams as u64, Ordering::Relaxed);
        self.last_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl Flow {
    /// The datagrams the flow's caps let through `way` now; the rest are
    /// counted as dropped.
    fn within_caps<'a>(&self, way: Way, datagrams: &'a [&'a [u8]]) -> Cow<'a, [&'a [u8]]> {
        if self.caps.is_empty() {
            return Cow::Borrowed(datagrams);
        }
        let mut allowed = Vec::with_capacity(datagrams.len());
        for &datagram in datagrams {
            let now = Instant::now();
            if self.caps.allowance(way, now, datagram.len()).is_err() {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.caps.consume(way, now, datagram.len());
            allowed.push(datagram);
        }
        Cow::Owned(allowed)
    }

    /// Counts `datagrams` relayed `way` in the flow and the console's
    /// live connection.
    fn count(&self, way: Way, datagrams: &[&[u8]]) {
        if datagrams.is_empty() {
            return;
        }
        let bytes: usize = datagrams.iter().map(|d| d.len()).sum();
        self.counters
            .count(way, datagrams.len(), bytes, self.started);
        if let Some(live) = &self.live {
            live.add(way == Way::Up, bytes as u64);
        }
    }
}

struct Flow {
    outbound: Outbound,
    /// The service's counters (datagrams relayed and dropped).
    metrics: Arc<crate::metrics::ServiceMetrics>,
    counters: Arc<FlowCounters>,
    started: Instant,
    live: Option<Arc<crate::connections::Registered>>,
    caps: Caps,
}

/// Where a flow's datagrams go: a socket connected to the target, or a
/// flow over the link to the gateway whose udp service is the target.
enum Outbound {
    Socket(Arc<DatagramSocket>),
    Link {
        links: Arc<crate::links::Links>,
        peer: String,
        service: String,
        flow: u32,
    },
}

impl Outbound {
    /// Sends `datagrams` now; returns how many went (the rest are dropped).
    fn send(&self, datagrams: &[&[u8]]) -> usize {
        match self {
            Outbound::Socket(socket) => udp_batch::send(socket, datagrams, None),
            Outbound::Link {
                links,
                peer,
                service,
                flow,
            } => links.session(peer).map_or(0, |s| {
                datagrams
                    .iter()
                    .filter(|d| s.send_datagram(*flow, Some(service), d).is_ok())
                    .count()
            }),
        }
    }
}

/// Where a flow's answers come from.
enum Answers {
    Socket(Arc<DatagramSocket>),
    Link(tokio::sync::mpsc::Receiver<Vec<u8>>),
}

impl Answers {
    /// Waits for answers and takes all that are waiting (at most
    /// [`udp_batch::BATCH`]) into `batch`.
    async fn recv(&mut self, batch: &mut AnswerBatch) -> io::Result<()> {
        batch.clear();
        match self {
            Answers::Socket(socket) => {
                udp_batch::recv_copied(socket, |answer| batch.push(answer)).await
            }
            Answers::Link(answers) => {
                let answer = answers
                    .recv()
                    .await
                    .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "flow closed"))?;
                batch.push(&answer);
                while batch.len() < udp_batch::BATCH {
                    let Ok(answer) = answers.try_recv() else {
                        break;
                    };
                    batch.push(&answer);
                }
                Ok(())
            }
        }
    }
}

/// The answers one wake-up of a flow found, one after the other in one
/// buffer.
#[derive(Default)]
struct AnswerBatch {
    arena: Vec<u8>,
    ends: Vec<(usize, usize)>,
}

impl AnswerBatch {
    fn clear(&mut self) {
        self.arena.clear();
        self.ends.clear();
        // A burst of large answers should not stay allocated.
        if self.arena.capacity() > 4 * (MAX_DATAGRAM + 1) {
            self.arena = Vec::new();
        }
    }

    fn push(&mut self, datagram: &[u8]) {
        let start = self.arena.len();
        self.arena.extend_from_slice(datagram);
        self.ends.push((start, self.arena.len()));
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn datagrams(&self) -> impl Iterator<Item = &[u8]> {
        self.ends
            .iter()
            .map(|&(start, end)| &self.arena[start..end])
    }
}

/// Where a flow's answers are delivered: the client's address, from the
/// service's socket, or back over the link the flow came in on.
enum Client {
    Socket {
        listener: Arc<DatagramSocket>,
        addr: SocketAddr,
    },
    /// Over whatever session is up to `peer` now: a flow outlives a
    /// reconnect (the peer's next datagram arrives on the new session).
    Link {
        links: Arc<crate::links::Links>,
        peer: String,
        flow: u32,
    },
}

impl Client {
    /// Sends `datagrams` now; returns how many went (the rest are dropped).
    fn send(&self, datagrams: &[&[u8]]) -> usize {
        match self {
            Client::Socket { listener, addr } => udp_batch::send(listener, datagrams, Some(*addr)),
            Client::Link { links, peer, flow } => links.session(peer).map_or(0, |s| {
                datagrams
                    .iter()
                    .filter(|d| s.send_datagram(*flow, None, d).is_ok())
                    .count()
            }),
        }
    }
}

/// The flows of one listening socket, by client address.
type Flows = Arc<Mutex<HashMap<SocketAddr, Slot>>>;

/// A client's flow, or the datagrams it sent while its flow is being set
/// up (admission, the target's name resolved, a socket opened): the socket's
/// receive loop never waits for that.
enum Slot {
    Ready(Arc<Flow>),
    Opening(Vec<Vec<u8>>),
}

/// Datagrams kept for a flow being set up, at most; later ones are dropped.
const EARLY_DATAGRAMS: usize = 64;

/// Keeps a datagram for a flow being set up, or drops it (counted) once
/// [`EARLY_DATAGRAMS`] wait already.
fn keep_early(early: &mut Vec<Vec<u8>>, datagram: impl Into<Vec<u8>>, service: &ServiceRuntime) {
    if early.len() < EARLY_DATAGRAMS {
        early.push(datagram.into());
    } else {
        service.metrics.add_datagrams(true, 0, 1);
    }
}

/// Puts `flow`, now set up, in `key`'s slot of `table` and sends on the
/// datagrams that waited for it.
fn flow_is_ready<K: std::hash::Hash + Eq>(
    table: &Mutex<HashMap<K, Slot>>,
    key: K,
    flow: &Arc<Flow>,
) {
    let slot = table
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, Slot::Ready(flow.clone()));
    if let Some(Slot::Opening(early)) = slot {
        let early: Vec<&[u8]> = early.iter().map(Vec::as_slice).collect();
        forward(flow, &early);
    }
}

/// The flows peers opened to a udp service over links, by peer and flow.
#[derive(Default)]
pub struct LinkFlows {
    flows: Mutex<HashMap<(String, u32), Slot>>,
    refused: RefusalMemory<(String, u32)>,
}

impl std::fmt::Debug for LinkFlows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkFlows")
    }
}

/// Serves the datagrams arriving on `socket` until `stop` is cancelled;
/// then ends every flow (each writes its audit record) and returns.
pub async fn serve_socket(
    socket: DatagramSocket,
    service: Arc<ServiceRuntime>,
    stop: CancellationToken,
) {
    let socket = Arc::new(socket);
    let flows: Flows = Arc::default();
    let tasks = TaskTracker::new();
    let refused: Arc<RefusalMemory<SocketAddr>> = Arc::default();
    let mut batch = udp_batch::RecvBatch::default();
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => break,
            received = batch.recv(&socket) => received,
        };
        if let Err(e) = received {
            tracing::warn!(service = &*service.name, error = %e, "receiving a datagram failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        // Consecutive datagrams of one flow in a batch go out together.
        let mut run: Vec<&[u8]> = Vec::with_capacity(udp_batch::BATCH);
        let mut current: Option<(SocketAddr, Arc<Flow>)> = None;
        for (datagram, client) in batch.datagrams() {
            if current.as_ref().is_some_and(|(addr, _)| *addr == client) {
                run.push(datagram);
                continue;
            }
            if let Some((_, flow)) = current.take() {
                forward(&flow, &run);
            }
            run.clear();
            let mut table = flows.lock().unwrap_or_else(|p| p.into_inner());
            match table.get_mut(&client) {
                Some(Slot::Ready(flow)) => {
                    run.push(datagram);
                    current = Some((client, flow.clone()));
                }
                Some(Slot::Opening(early)) => keep_early(early, datagram, &service),
                // Refused lately (or being set up): dropped unrecorded.
                None if refused.seen_lately(&client) => {}
                None => {
                    table.insert(client, Slot::Opening(vec![datagram.to_vec()]));
                    let setup = FlowSetup {
                        service: service.clone(),
                        listener: socket.clone(),
                        client,
                        flows: flows.clone(),
                        refused: refused.clone(),
                        stop: stop.clone(),
                    };
                    tasks.spawn(setup.run());
                }
            }
        }
        if let Some((_, flow)) = current.take() {
            forward(&flow, &run);
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// Counts and sends datagrams from the client towards the target, or
/// drops them (over a cap, a full socket buffer, a link that is down).
fn forward(flow: &Flow, datagrams: &[&[u8]]) {
    let allowed = flow.within_caps(Way::Up, datagrams);
    flow.count(Way::Up, &allowed);
    let sent = flow.outbound.send(&allowed);
    let dropped = datagrams.len() - sent;
    // Datagrams over a cap were counted as dropped already.
    let unsent = allowed.len() - sent;
    if unsent > 0 {
        flow.counters
            .dropped
            .fetch_add(unsent as u64, Ordering::Relaxed);
    }
    flow.metrics
        .add_datagrams(true, sent as u64, dropped as u64);
}

/// A datagram of a flow that `peer` opened over a link to `service`:
/// the flow is found, or admitted and set up (refusals are audited once).
/// Datagrams that arrive while it is being set up wait for it (up to
/// [`EARLY_DATAGRAMS`]), as for a client of a listening socket: a burst
/// that opens a flow is one flow, not a flow per datagram. Answers go back
/// over whatever session to `peer` is up when they come.
pub fn serve_link_datagram(
    service: &Arc<ServiceRuntime>,
    peer: &str,
    datagram: link::session::Datagram,
    tasks: &TaskTracker,
) {
    let key = (peer.to_string(), datagram.flow);
    let mut table = service
        .udp_link_flows
        .flows
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    match table.get_mut(&key) {
        Some(Slot::Ready(flow)) => {
            let flow = flow.clone();
            drop(table);
            return forward(&flow, &[&datagram.payload]);
        }
        Some(Slot::Opening(early)) => return keep_early(early, datagram.payload, service),
        // Refused lately: dropped unrecorded.
        None if service.udp_link_flows.refused.seen_lately(&key) => return,
        None => {
            table.insert(key.clone(), Slot::Opening(vec![datagram.payload]));
        }
    }
    drop(table);
    let service = service.clone();
    let stop = service.udp_stop();
    tasks.spawn(async move {
        let id = ClientId::Peer(key.0.clone());
        let client = Client::Link {
            links: service.links.clone(),
            peer: key.0.clone(),
            flow: key.1,
        };
        let forget = {
            let service = service.clone();
            let key = key.clone();
            move || {
                service
                    .udp_link_flows
                    .flows
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
            }
        };
        let Some((flow, answers, audit, admitted)) = admit_flow(&service, &id).await else {
            return forget();
        };
        flow_is_ready(&service.udp_link_flows.flows, key.clone(), &flow);
        service.udp_link_flows.refused.forget(&key);
        run_flow(
            service, client, answers, flow, forget, audit, admitted, stop,
        )
        .await;
    });
}

/// Sets up the flow of a client new to a listening socket, then serves it.
struct FlowSetup {
    service: Arc<ServiceRuntime>,
    listener: Arc<DatagramSocket>,
    client: SocketAddr,
    flows: Flows,
    refused: Arc<RefusalMemory<SocketAddr>>,
    stop: CancellationToken,
}

impl FlowSetup {
    /// Admits the client and opens its way to the target (a refusal or a
    /// target that cannot be reached is audited, and the client's datagrams
    /// are dropped unrecorded for a while); sends what it sent meanwhile,
    /// then carries the flow until it ends.
    async fn run(self) {
        let FlowSetup {
            service,
            listener,
            client,
            flows,
            refused,
            stop,
        } = self;
        let forget = {
            let flows = flows.clone();
            move || {
                flows
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&client);
            }
        };
        let Some((flow, answers, audit, admitted)) =
            admit_flow(&service, &ClientId::Addr(client)).await
        else {
            return forget();
        };
        flow_is_ready(&flows, client, &flow);
        refused.forget(&client);
        let to_client = Client::Socket {
            listener,
            addr: client,
        };
        run_flow(
            service, to_client, answers, flow, forget, audit, admitted, stop,
        )
        .await;
    }
}

/// The admission of a new flow from `id` and its way to the target.
async fn admit_flow(
    service: &Arc<ServiceRuntime>,
    id: &ClientId,
) -> Option<(Arc<Flow>, Answers, Audit, super::Admitted)> {
    let mut audit = crate::gateway::new_audit(service, id);
    audit.datagrams = Some([0, 0]);
    let admitted = match service.admit(id) {
        Ok(admitted) => admitted,
        Err(why) => {
            audit.finish(AuditResult::Denied, why);
            audit.emit();
            return None;
        }
    };
    if let Verdict::Deny(why) = service.access.check(id, None) {
        audit.finish(AuditResult::Denied, why);
        audit.emit();
        return None;
    }
    let (outbound, answers) = match connect_target(service).await {
        Ok(pair) => pair,
        Err(why) => {
            audit.finish(AuditResult::Error, why);
            audit.emit();
            return None;
        }
    };
    let live = service.connections.register(
        audit.conn_id,
        service.name.clone(),
        audit.client.clone(),
        service.via_text.clone(),
        service.metrics.clone(),
    );
    live.set_details(None, &audit.target);
    audit.live = Some(live.clone());
    let flow = Arc::new(Flow {
        outbound,
        metrics: service.metrics.clone(),
        counters: Arc::default(),
        started: Instant::now(),
        live: Some(live),
        caps: admitted.caps.clone(),
    });
    Some((flow, answers, audit, admitted))
}

/// The way to the service's target: a socket connected to it (its first
/// address), or a flow over the link to the peer that serves it.
async fn connect_target(service: &ServiceRuntime) -> Result<(Outbound, Answers), String> {
    let target = match &service.config.target {
        Some(Hop::Direct(target)) => target,
        Some(Hop::Link {
            peer,
            service: name,
        }) => {
            let (flow, answers) = service
                .links
                .open_flow(peer)
                .ok_or_else(|| format!("the link to {peer} is down"))?;
            let outbound = Outbound::Link {
                links: service.links.clone(),
                peer: peer.clone(),
                service: name.clone(),
                flow,
            };
            return Ok((outbound, Answers::Link(answers)));
        }
        _ => return Err("udp targets are host:port or link://PEER/SERVICE".into()),
    };
    let addr = match &target.host {
        Host::Ip(ip) => SocketAddr::new(*ip, target.port),
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), target.port))
            .await
            .map_err(|e| format!("cannot resolve {name}: {e}"))?
            .next()
            .ok_or_else(|| format!("{name} has no address"))?,
    };
    let local: SocketAddr = match addr.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(local)
        .map_err(|e| format!("cannot open a socket to {addr}: {e}"))?;
    // Never blocks: a UDP socket's connect only sets its peer.
    socket
        .connect(addr)
        .map_err(|e| format!("cannot send to {addr}: {e}"))?;
    let socket = DatagramSocket::new(socket)
        .map(Arc::new)
        .map_err(|e| format!("cannot open a socket to {addr}: {e}"))?;
    Ok((Outbound::Socket(socket.clone()), Answers::Socket(socket)))
}

/// Carries the target's answers back to `client` until the flow ends, then
/// forgets it and writes its audit record.
#[allow(clippy::too_many_arguments)]
async fn run_flow(
    service: Arc<ServiceRuntime>,
    client: Client,
    mut answers: Answers,
    flow: Arc<Flow>,
    forget: impl FnOnce(),
    mut audit: Audit,
    admitted: super::Admitted,
    stop: CancellationToken,
) {
    let _active = service.metrics.active();
    let idle = service.config.idle_timeout;
    let mut batch = AnswerBatch::default();
    let (result, reason) = loop {
        let last = Duration::from_millis(flow.counters.last_ms.load(Ordering::Relaxed));
        let quiet_until = flow.started + last + idle.0;
        tokio::select! {
            () = stop.cancelled() => break (AuditResult::Ok, "service stopped".to_string()),
            () = tokio::time::sleep_until(quiet_until.into()) => {
                let last = Duration::from_millis(flow.counters.last_ms.load(Ordering::Relaxed));
                if flow.started + last + idle.0 <= Instant::now() {
                    break (AuditResult::Ok, format!("idle timeout ({idle})"));
                }
            }
            received = answers.recv(&mut batch) => match received {
                Ok(()) => {
                    let answers: Vec<&[u8]> = batch.datagrams().collect();
                    let allowed = flow.within_caps(Way::Down, &answers);
                    flow.count(Way::Down, &allowed);
                    let sent = client.send(&allowed);
                    let unsent = allowed.len() - sent;
                    if unsent > 0 {
                        flow.counters.dropped.fetch_add(unsent as u64, Ordering::Relaxed);
                    }
                    let dropped = batch.len() - sent;
                    flow.metrics.add_datagrams(false, sent as u64, dropped as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    break (
                        AuditResult::Error,
                        "the target is not listening (ICMP port unreachable)".to_string(),
                    )
                }
                Err(e) => break (AuditResult::Error, format!("receiving from the target: {e}")),
            },
        }
    };
    forget();
    if let Outbound::Link {
        links,
        peer,
        flow: id,
        ..
    } = &flow.outbound
    {
        links.close_flow(peer, *id);
    }
    drop(admitted);
    let c = &flow.counters;
    audit.bytes_up = c.bytes[0].load(Ordering::Relaxed);
    audit.bytes_down = c.bytes[1].load(Ordering::Relaxed);
    audit.datagrams = Some([
        c.datagrams[0].load(Ordering::Relaxed),
        c.datagrams[1].load(Ordering::Relaxed),
    ]);
    let dropped = c.dropped.load(Ordering::Relaxed);
    let reason = if dropped > 0 {
        format!("{reason}; {dropped} datagrams dropped (bandwidth cap or full socket buffer)")
    } else {
        reason
    };
    audit.finish(result, reason);
    audit.emit();
}
