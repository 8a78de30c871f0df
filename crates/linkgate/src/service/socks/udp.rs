//! SOCKS5 UDP ASSOCIATE (RFC 1928 §7): the client's datagrams, each with a
//! SOCKS header naming its destination, go out to their destinations, and
//! answers come back wrapped in a header that names their sender, for as
//! long as the control connection stays open (or until `idle_timeout`
//! without datagrams).
//!
//! An association has two sides, each of two kinds:
//! - the client's ([`ClientSide`]): a UDP socket here, next to a direct
//!   client, or the relay that the gateway a link client came through keeps
//!   next to that client ([`super::relay`]);
//! - the far side ([`FarSide`]): datagrams sent from here, or a flow to a
//!   peer's socks service when `via` starts with a `link://` hop
//!   ([`super::link_udp`]), so that they leave from the other office; and
//!   through the UDP relays of the `socks5://` hops after that, if any
//!   ([`super::proxy_udp`]).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proto::socks::{self, v5consts as c, Address};
use tokio::io::AsyncReadExt;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::link_udp::LinkLeg;
use super::proxy_udp::{self, ProxyRelays};
use super::relay::PeerRelay;
use super::{check_destination, refuse, send_reply, Negotiated};
use crate::audit::{Audit, AuditResult};
use crate::config::Hop;
use crate::inbound::{ClientId, Inbound};
use crate::service::ServiceRuntime;
use crate::stream::Stream;

/// Targets a client may have sent to and hear back from, bounded.
const MAX_UDP_PEERS: usize = 4096;

/// The largest datagram a UDP socket delivers.
const MAX_DATAGRAM: usize = 65536;

/// Carries out a UDP ASSOCIATE request until the association ends.
pub(super) async fn associate(
    service: &ServiceRuntime,
    mut inbound: Inbound,
    negotiated: Negotiated,
    audit: &mut Audit,
    stop: &CancellationToken,
) {
    let version = negotiated.version;
    // The client's UDP address as announced; else learned from its first
    // datagram (which must come from the control connection's host).
    let announced = match &negotiated.destination {
        Address::Ip(addr) if !addr.ip().is_unspecified() && addr.port() != 0 => Some(*addr),
        _ => None,
    };
    // Both sides are set up before any "succeeded": a client must not
    // wait on a relay that cannot work.
    let opened = async {
        let far = FarSide::open(service).await?;
        let client = ClientSide::open(service, &mut inbound, announced).await?;
        Ok::<_, Refusal>((far, client))
    }
    .await;
    let (mut far, mut client) = match opened {
        Ok(sides) => sides,
        Err((code, reason)) => {
            let stream = &mut inbound.stream;
            return refuse(stream, version, code, audit, AuditResult::Error, reason).await;
        }
    };
    send_reply(
        &mut inbound.stream,
        version,
        c::REPLY_SUCCEEDED,
        Some(client.bound()),
    )
    .await;
    let reason = relay(
        service,
        &mut inbound.stream,
        &mut client,
        &mut far,
        audit,
        stop,
    )
    .await;
    let result = association_result(&reason);
    client.finish(result == AuditResult::Ok).await;
    audit.finish(result, reason);
}

/// Relays datagrams both ways until the association ends; returns why.
async fn relay(
    service: &ServiceRuntime,
    control: &mut Stream,
    client: &mut ClientSide,
    far: &mut FarSide,
    audit: &mut Audit,
    stop: &CancellationToken,
) -> String {
    let (mut up, mut down, mut datagrams) = (0u64, 0u64, [0u64; 2]);
    let mut from_target = vec![0u8; MAX_DATAGRAM];
    let mut control_buf = [0u8; 64];
    let idle = service.config.idle_timeout.0;
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    let reason = loop {
        tokio::select! {
            received = client.recv() => match received {
                Ok(n) => {
                    let sent = far.forward(service, client.datagram(n)).await;
                    service.metrics.add_datagram(true, sent.is_some());
                    if let Some(payload) = sent {
                        up += payload as u64;
                        datagrams[0] += 1;
                        sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                    }
                }
                Err(end) => break end,
            },
            answer = far.answer(&mut from_target) => match answer {
                Ok((datagram, payload)) => {
                    let delivered = client.send(&datagram).await;
                    service.metrics.add_datagram(false, delivered);
                    if delivered {
                        down += payload as u64;
                        datagrams[1] += 1;
                        sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                    }
                }
                Err(end) => break end,
            },
            read = control.read(&mut control_buf) => match read {
                Ok(0) => break "control connection closed".to_string(),
                Ok(_) => continue,
                Err(e) => break format!("control connection: {e}"),
            },
            () = &mut sleep => break format!("idle timeout ({})", service.config.idle_timeout),
            () = stop.cancelled() => break "gateway shutting down: grace period over".to_string(),
        }
    };
    audit.bytes_up = up;
    audit.bytes_down = down;
    audit.datagrams = Some(datagrams);
    reason
}

/// How an association's end is audited: the client closing its control
/// connection or going quiet is a normal end; the gateway cutting it (the
/// grace period over, the link's flow gone) or a proxy on the way ending
/// its relay is an error.
fn association_result(reason: &str) -> AuditResult {
    if reason.starts_with("gateway")
        || reason.starts_with("the link")
        || reason.starts_with("the proxy")
    {
        AuditResult::Error
    } else {
        AuditResult::Ok
    }
}

/// A refusal before the association starts: the SOCKS5 reply code and why.
pub(super) type Refusal = (u8, String);

// === The client's side ===

/// Where the client's datagrams arrive and its answers go.
enum ClientSide {
    /// A UDP socket here, next to a direct client.
    Socket(DirectClient),
    /// The relay a peer gateway keeps next to a client that arrived over
    /// the link.
    Relay(PeerRelay),
}

struct DirectClient {
    socket: UdpSocket,
    /// The client's UDP address, once announced or seen.
    client: Option<SocketAddr>,
    /// The control connection's host: the only one whose datagrams count.
    client_ip: IpAddr,
    buf: Vec<u8>,
}

impl ClientSide {
    async fn open(
        service: &ServiceRuntime,
        inbound: &mut Inbound,
        announced: Option<SocketAddr>,
    ) -> Result<ClientSide, Refusal> {
        match inbound.client.clone() {
            ClientId::Addr(client_tcp) => {
                let Some(local) = inbound.local_addr() else {
                    return Err((
                        c::REPLY_COMMAND_NOT_SUPPORTED,
                        "UDP ASSOCIATE needs a direct TCP client".into(),
                    ));
                };
                let socket = UdpSocket::bind(SocketAddr::new(local.ip(), 0))
                    .await
                    .map_err(|e| {
                        (
                            c::REPLY_GENERAL_FAILURE,
                            format!("cannot open a UDP socket: {e}"),
                        )
                    })?;
                Ok(ClientSide::Socket(DirectClient {
                    socket,
                    client: announced,
                    client_ip: crate::access::canonical(client_tcp.ip()),
                    buf: vec![0u8; MAX_DATAGRAM],
                }))
            }
            ClientId::Peer(peer) => {
                let Some(stream) = inbound.stream.as_link().map(|s| s.id()) else {
                    return Err((
                        c::REPLY_COMMAND_NOT_SUPPORTED,
                        "UDP ASSOCIATE needs a client's own stream".into(),
                    ));
                };
                let port = announced.map_or(0, |a| a.port());
                let wait = service.config.connect_timeout.0;
                PeerRelay::open(&service.links, &peer, stream, port, wait)
                    .await
                    .map(ClientSide::Relay)
            }
        }
    }

    /// The address the client sends its datagrams to.
    fn bound(&self) -> SocketAddr {
        match self {
            ClientSide::Socket(direct) => direct
                .socket
                .local_addr()
                .unwrap_or_else(|_| super::unspecified()),
            ClientSide::Relay(relay) => relay.bound(),
        }
    }

    /// Waits for the client's next datagram and says how long it is (see
    /// [`ClientSide::datagram`]); `Err` when this side ended, and why.
    async fn recv(&mut self) -> Result<usize, String> {
        match self {
            ClientSide::Socket(direct) => loop {
                let Ok((n, from)) = direct.socket.recv_from(&mut direct.buf).await else {
                    continue;
                };
                let expected = direct.client.map_or(
                    crate::access::canonical(from.ip()) == direct.client_ip,
                    |client| client == from,
                );
                if expected {
                    direct.client = Some(from);
                    return Ok(n);
                }
                // Not our client: dropped.
            },
            ClientSide::Relay(relay) => relay.recv().await,
        }
    }

    /// The datagram [`ClientSide::recv`] took, SOCKS header and all.
    fn datagram(&self, n: usize) -> &[u8] {
        match self {
            ClientSide::Socket(direct) => &direct.buf[..n],
            ClientSide::Relay(relay) => relay.datagram(n),
        }
    }

    /// Sends the client one answer; false if it was dropped.
    async fn send(&mut self, datagram: &[u8]) -> bool {
        match self {
            ClientSide::Socket(direct) => match direct.client {
                Some(client) => direct.socket.send_to(datagram, client).await.is_ok(),
                None => false,
            },
            ClientSide::Relay(relay) => relay.send(datagram),
        }
    }

    /// Ends this side: a peer's relay is told cleanly when the association
    /// ended normally (`clean`), and reset when it was cut.
    async fn finish(self, clean: bool) {
        if let (ClientSide::Relay(relay), true) = (self, clean) {
            relay.finish().await;
        }
    }
}

// === The far side ===

/// Where the client's datagrams go out: an exit, and the SOCKS5 proxies
/// after it, if `via` has any.
struct FarSide {
    exit: Exit,
    proxies: ProxyRelays,
}

/// Where datagrams leave for their destinations (or the first proxy).
enum Exit {
    /// From this gateway.
    Here(UdpAssociation),
    /// From a peer's socks service, over a link.
    Link(LinkLeg),
}

impl FarSide {
    /// Sets up the exit (`via`'s first hop, if a `link://` one) and the
    /// proxies after it.
    async fn open(service: &ServiceRuntime) -> Result<FarSide, Refusal> {
        let via = service.config.via.as_slice();
        let (exit, proxies_from) = match via.first() {
            Some(Hop::Link {
                peer,
                service: name,
            }) => {
                let leg = LinkLeg::open(&service.links, peer, name).ok_or_else(|| {
                    (
                        c::REPLY_NETWORK_UNREACHABLE,
                        format!("via link://{peer}/{name}: the link is down"),
                    )
                })?;
                (Exit::Link(leg), 1)
            }
            _ => (Exit::Here(UdpAssociation::new()), 0),
        };
        let proxies = ProxyRelays::open(service, via, proxies_from).await?;
        Ok(FarSide { exit, proxies })
    }

    /// Sends one of the client's datagrams on; its payload's length, or
    /// `None` if it was dropped (malformed, fragmented, a destination the
    /// rules refuse, or no way out).
    async fn forward(&mut self, service: &ServiceRuntime, datagram: &[u8]) -> Option<usize> {
        let (header, offset) = socks::parse_udp_header(datagram).ok()?;
        if header.fragment != 0 || check_destination(service, &header.address).await.is_err() {
            return None;
        }
        let payload = datagram.len() - offset;
        let sent = match (&mut self.exit, self.proxies.first_relay()) {
            (Exit::Here(association), None) => {
                association
                    .send_to(&header.address, &datagram[offset..])
                    .await
            }
            (Exit::Link(link), None) => link.send(datagram),
            // To the first proxy's relay, wrapped for the proxies after it.
            (exit, Some(relay)) => {
                let inner = self.proxies.wrap(datagram)?;
                match exit {
                    Exit::Here(association) => association.send_to(relay, &inner).await,
                    Exit::Link(link) => {
                        let mut framed = Vec::with_capacity(inner.len() + 22);
                        socks::encode_udp_header(relay, &mut framed).ok()?;
                        framed.extend_from_slice(&inner);
                        link.send(&framed)
                    }
                }
            }
        };
        sent.then_some(payload)
    }

    /// The next answer for the client, wrapped in the header that names its
    /// sender, and its payload's length; `Err` when this side ended.
    async fn answer(&mut self, buf: &mut [u8]) -> Result<(Vec<u8>, usize), String> {
        loop {
            let answer = tokio::select! {
                answer = self.exit.answer(buf) => answer?,
                reason = self.proxies.closed() => return Err(reason),
            };
            let Some(start) = self.unwrap(&answer) else {
                continue; // not from the relay it should be: dropped
            };
            let answer = match start {
                0 => answer,
                start => answer[start..].to_vec(),
            };
            if let Ok((_, offset)) = socks::parse_udp_header(&answer) {
                let payload = answer.len() - offset;
                return Ok((answer, payload));
            }
        }
    }

    /// Where the client's datagram starts in what the exit received: after
    /// the headers of the proxies' relays, each checked.
    fn unwrap(&self, answer: &[u8]) -> Option<usize> {
        let Some(relay) = self.proxies.first_relay() else {
            return Some(0);
        };
        let (header, len) = socks::parse_udp_header(answer).ok()?;
        if !proxy_udp::same_address(&header.address, relay) {
            return None;
        }
        Some(len + self.proxies.unwrap(&answer[len..])?)
    }
}

impl Exit {
    /// The next datagram the exit received, in a header naming its sender.
    async fn answer(&mut self, buf: &mut [u8]) -> Result<Vec<u8>, String> {
        match self {
            Exit::Here(association) => loop {
                let Ok((n, from)) = association.recv_from_target(buf).await else {
                    continue;
                };
                if !association.knows(&from) {
                    continue; // nobody the client talked to: dropped
                }
                let mut answer = Vec::with_capacity(n + 22);
                if socks::encode_udp_header(&Address::Ip(from), &mut answer).is_ok() {
                    answer.extend_from_slice(&buf[..n]);
                    return Ok(answer);
                }
            },
            Exit::Link(link) => link
                .recv()
                .await
                .ok_or_else(|| "the link flow ended".into()),
        }
    }
}

/// The datagrams an association sends from this gateway: one outbound
/// socket, and who the client sent to (only they may answer).
pub(super) struct UdpAssociation {
    out: Option<UdpSocket>,
    /// Where the client sent datagrams: only these may answer.
    peers: HashSet<SocketAddr>,
    /// Names already resolved for this association.
    resolved: HashMap<String, Option<IpAddr>>,
    up: u64,
    down: u64,
}

impl UdpAssociation {
    /// A new association with nothing sent yet.
    pub(super) fn new() -> Self {
        UdpAssociation {
            out: None,
            peers: HashSet::new(),
            resolved: HashMap::new(),
            up: 0,
            down: 0,
        }
    }

    /// Bytes (payload) sent for the client and received for it so far.
    pub(super) fn bytes(&self) -> (u64, u64) {
        (self.up, self.down)
    }

    /// Counts `n` payload bytes delivered to the client.
    pub(super) fn delivered(&mut self, n: usize) {
        self.down += n as u64;
    }

    /// Forwards one datagram from the client: its payload's length, or
    /// `None` if it was dropped.
    pub(super) async fn forward(
        &mut self,
        service: &ServiceRuntime,
        datagram: &[u8],
    ) -> Option<usize> {
        let (header, offset) = socks::parse_udp_header(datagram).ok()?;
        if header.fragment != 0 || check_destination(service, &header.address).await.is_err() {
            return None;
        }
        let payload = &datagram[offset..];
        self.send_to(&header.address, payload)
            .await
            .then_some(payload.len())
    }

    /// Sends `payload` to `to` (resolving a name once per association);
    /// false if it could not go out.
    pub(super) async fn send_to(&mut self, to: &Address, payload: &[u8]) -> bool {
        let target = match to {
            Address::Ip(addr) => *addr,
            Address::Domain(name, port) => {
                if !self.resolved.contains_key(name) {
                    let ip = tokio::net::lookup_host((name.as_str(), *port))
                        .await
                        .ok()
                        .and_then(|mut addrs| addrs.next())
                        .map(|a| a.ip());
                    if self.resolved.len() >= MAX_UDP_PEERS {
                        self.resolved.clear();
                    }
                    self.resolved.insert(name.clone(), ip);
                }
                let Some(ip) = self.resolved.get(name).copied().flatten() else {
                    return false;
                };
                SocketAddr::new(ip, *port)
            }
        };
        let Ok((socket, wire_target)) = self.socket_for(target).await else {
            return false;
        };
        if socket.send_to(payload, wire_target).await.is_err() {
            return false;
        }
        let target = SocketAddr::new(crate::access::canonical(target.ip()), target.port());
        if self.peers.len() >= MAX_UDP_PEERS {
            self.peers.clear();
        }
        self.peers.insert(target);
        self.up += payload.len() as u64;
        true
    }

    /// Whether `from` is someone the client sent to.
    pub(super) fn knows(&self, from: &SocketAddr) -> bool {
        self.peers.contains(from)
    }

    /// The outbound socket: one dual-stack IPv6 socket reaches IPv4 targets
    /// too (as mapped addresses); an IPv4-only host gets an IPv4 socket.
    async fn socket_for(&mut self, target: SocketAddr) -> io::Result<(&UdpSocket, SocketAddr)> {
        if self.out.is_none() {
            self.out = Some(outbound_udp_socket()?);
        }
        let socket = self.out.as_ref().expect("just set");
        let target = match (socket.local_addr()?.is_ipv6(), target) {
            (true, SocketAddr::V4(v4)) => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            (_, other) => other,
        };
        Ok((socket, target))
    }

    /// Waits for a datagram from any target (canonical sender address);
    /// never resolves before the first datagram went out.
    pub(super) async fn recv_from_target(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match &self.out {
            Some(socket) => {
                let (n, from) = socket.recv_from(buf).await?;
                Ok((
                    n,
                    SocketAddr::new(crate::access::canonical(from.ip()), from.port()),
                ))
            }
            None => std::future::pending().await,
        }
    }
}

fn outbound_udp_socket() -> io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let dual_stack = Socket::new(Domain::IPV6, Type::DGRAM, None).and_then(|socket| {
        socket.set_only_v6(false)?;
        socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
        Ok(socket)
    });
    let socket = match dual_stack {
        Ok(socket) => socket,
        Err(_) => {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
            socket
        }
    };
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}
