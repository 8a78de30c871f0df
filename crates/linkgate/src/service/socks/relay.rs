//! SOCKS5 UDP ASSOCIATE for a client that arrived over a link.
//!
//! Such a client is in the other office: it reached this socks service
//! through the peer gateway's mapping to `link://US/SOCKS`, which carries
//! its bytes without reading them. Its datagrams must go to a UDP port it
//! can reach, so this gateway asks the peer for a relay there: it opens a
//! stream named [`relay_stream_name`] (the client's stream, a datagram
//! flow this gateway opened, the port the client announced). The peer —
//! if that stream is one it opened for a TCP client and has no relay yet
//! ([`crate::links::StreamClients`]) — binds a UDP socket on the address
//! the client connected to and answers with it on the stream, a text line;
//! that address goes to the client as the relay. The peer then carries
//! the client's datagrams, SOCKS header and all, on the flow, and this
//! gateway sends the answers back on it. The association itself — rules,
//! login, destinations, audit, idle timeout — stays here, with the control
//! connection. Closing the stream ends the relay, and so does the client's
//! stream ending.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use link::session::{IncomingStream, LinkStream, OpenError, Session};
use proto::socks::v5consts as c;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{Audit, AuditResult};
use crate::inbound::ClientId;
use crate::links::{Links, StreamClient};

/// What starts the name of a relay request stream; service names cannot
/// contain `/`.
const RELAY_STREAM_MARK: &str = "/socks-udp/";

/// The longest answer line (an IPv6 address with port, and room).
const MAX_ANSWER: usize = 64;

/// A peer's request for a UDP relay next to the client of one of our
/// streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayRequest {
    /// Our stream that carries the client (same number at both ends).
    pub stream: u32,
    /// The datagram flow the peer opened for the client's datagrams.
    pub flow: u32,
    /// The UDP port the client announced, 0 if none.
    pub port: u16,
}

/// The name of the stream that asks for `request`.
pub fn relay_stream_name(request: RelayRequest) -> String {
    format!(
        "{RELAY_STREAM_MARK}{}/{}/{}",
        request.stream, request.flow, request.port
    )
}

/// The request a stream's name makes; `None` for any other stream.
pub fn parse_relay_stream_name(name: &str) -> Option<RelayRequest> {
    let mut parts = name.strip_prefix(RELAY_STREAM_MARK)?.split('/');
    let request = RelayRequest {
        stream: parts.next()?.parse().ok()?,
        flow: parts.next()?.parse().ok()?,
        port: parts.next()?.parse().ok()?,
    };
    parts.next().is_none().then_some(request)
}

/// A datagram flow a task of ours holds; dropping it lets the flow go.
struct HeldFlow {
    links: Arc<Links>,
    peer: String,
    id: u32,
}

impl Drop for HeldFlow {
    fn drop(&mut self) {
        self.links.close_flow(&self.peer, self.id);
    }
}

// === This gateway's association, the client in the peer's office ===

/// The relay a peer keeps next to a client that arrived over the link.
pub(super) struct PeerRelay {
    flow: HeldFlow,
    session: Session,
    datagrams: mpsc::Receiver<Vec<u8>>,
    control: LinkStream,
    bound: SocketAddr,
    last: Vec<u8>,
}

impl PeerRelay {
    /// Asks `peer` for a relay next to the client of `stream` (which
    /// announced UDP `port`, or 0), waiting `wait` at most.
    pub(super) async fn open(
        links: &Arc<Links>,
        peer: &str,
        stream: u32,
        port: u16,
        wait: Duration,
    ) -> Result<PeerRelay, (u8, String)> {
        let down = || {
            (
                c::REPLY_NETWORK_UNREACHABLE,
                format!("the link to {peer} is down: no UDP relay next to the client"),
            )
        };
        let session = links.session(peer).ok_or_else(down)?;
        let (id, datagrams) = links.open_flow(peer).ok_or_else(down)?;
        let flow = HeldFlow {
            links: links.clone(),
            peer: peer.to_string(),
            id,
        };
        let name = relay_stream_name(RelayRequest {
            stream,
            flow: id,
            port,
        });
        let failed = |why: String| (c::REPLY_GENERAL_FAILURE, why);
        let asked = async {
            let mut control = match session.open(&name).await {
                Ok(control) => control,
                Err(OpenError::LinkDown(_)) => return Err(down()),
                Err(OpenError::Refused(why)) => {
                    return Err(failed(format!("{peer} refused a UDP relay: {why}")))
                }
            };
            let bound = read_answer(&mut control)
                .await
                .map_err(|why| failed(format!("{peer}'s UDP relay: {why}")))?;
            Ok((control, bound))
        };
        let (control, bound) = tokio::time::timeout(wait, asked)
            .await
            .map_err(|_| failed(format!("{peer} did not set up a UDP relay within {wait:?}")))??;
        Ok(PeerRelay {
            flow,
            session,
            datagrams,
            control,
            bound,
            last: Vec::new(),
        })
    }

    /// The relay's address, in the client's office.
    pub(super) fn bound(&self) -> SocketAddr {
        self.bound
    }

    /// Waits for the client's next datagram (see [`PeerRelay::datagram`]);
    /// `Err` when the relay ended, and why.
    pub(super) async fn recv(&mut self) -> Result<usize, String> {
        let mut probe = [0u8; 16];
        loop {
            tokio::select! {
                datagram = self.datagrams.recv() => {
                    let Some(datagram) = datagram else {
                        return Err("the link flow ended".into());
                    };
                    self.last = datagram;
                    return Ok(self.last.len());
                }
                read = self.control.read(&mut probe) => match read {
                    // The peer ends its relay when the client's connection
                    // closed: the association is over as if it had seen it.
                    Ok(0) => return Err("control connection closed".into()),
                    Ok(_) => continue,
                    Err(e) => {
                        return Err(format!("the link relay at {} failed: {e}", self.flow.peer))
                    }
                },
            }
        }
    }

    /// The datagram [`PeerRelay::recv`] took.
    pub(super) fn datagram(&self, n: usize) -> &[u8] {
        &self.last[..n]
    }

    /// Sends the client one answer; false if the link dropped it.
    pub(super) fn send(&self, datagram: &[u8]) -> bool {
        self.session
            .send_datagram(self.flow.id, None, datagram)
            .is_ok()
    }

    /// Ends the relay cleanly.
    pub(super) async fn finish(mut self) {
        let _ = self.control.shutdown().await;
    }
}

/// Reads the relay's address, one line.
async fn read_answer(control: &mut LinkStream) -> Result<SocketAddr, String> {
    let mut line = Vec::with_capacity(MAX_ANSWER);
    let mut byte = [0u8; 1];
    while line.len() < MAX_ANSWER {
        match control.read(&mut byte).await {
            Ok(0) => return Err("closed before its address".into()),
            Ok(_) if byte[0] == b'\n' => {
                return std::str::from_utf8(&line)
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .ok_or_else(|| "answered no address".into());
            }
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("answered too long a line".into())
}

// === The peer's association, the client in this office ===

/// Serves `peer`'s request for a UDP relay next to the client of one of
/// our streams: refused unless that stream is ours to `peer`, carries a
/// TCP client, and has no relay yet; otherwise relayed until the request's
/// stream or the client's ends. One audit record, under the service that
/// opened the client's stream.
pub fn serve_relay_request(
    links: &Arc<Links>,
    peer: &str,
    asked: RelayRequest,
    request: IncomingStream,
    tasks: &TaskTracker,
    stop: CancellationToken,
) {
    let Some(client) = links.stream_clients().take_for_relay(peer, asked.stream) else {
        tracing::debug!(
            peer,
            stream = asked.stream,
            "UDP relay refused: no client of ours on that stream"
        );
        return request.refuse(&format!(
            "stream {} carries no client of this gateway (or has a UDP relay already)",
            asked.stream
        ));
    };
    tasks.spawn(run_relay(
        links.clone(),
        peer.to_string(),
        asked,
        request,
        client,
        stop,
    ));
}

async fn run_relay(
    links: Arc<Links>,
    peer: String,
    asked: RelayRequest,
    request: IncomingStream,
    client: StreamClient,
    stop: CancellationToken,
) {
    let mut audit = Audit::start(
        client.service.clone(),
        crate::gateway::next_conn_id(),
        ClientId::Addr(client.client).to_string(),
        format!("link://{peer}").into(),
    );
    audit.target = "UDP ASSOCIATE relay".into();
    audit.datagrams = Some([0, 0]);
    let reason = match start_relay(&links, &peer, asked, request, &client).await {
        Ok(mut relay) => {
            let reason = relay.run(&client, &mut audit, &stop).await;
            if reason.result == AuditResult::Ok {
                let _ = relay.control.shutdown().await;
            }
            reason
        }
        Err(reason) => reason,
    };
    audit.finish(reason.result, reason.why);
    audit.emit();
}

/// Why a relay ended, as audited.
struct RelayEnd {
    result: AuditResult,
    why: String,
}

impl RelayEnd {
    fn error(why: impl Into<String>) -> RelayEnd {
        RelayEnd {
            result: AuditResult::Error,
            why: why.into(),
        }
    }
}

/// A relay next to a client here, for the association at the peer.
struct ClientRelay {
    socket: UdpSocket,
    session: Session,
    flow: HeldFlow,
    answers: mpsc::Receiver<Vec<u8>>,
    control: LinkStream,
    /// The client's UDP address once announced or seen.
    client_udp: Option<SocketAddr>,
    client_ip: IpAddr,
}

async fn start_relay(
    links: &Arc<Links>,
    peer: &str,
    asked: RelayRequest,
    request: IncomingStream,
    client: &StreamClient,
) -> Result<ClientRelay, RelayEnd> {
    let refused = |request: IncomingStream, why: String| {
        request.refuse(&why);
        RelayEnd::error(why)
    };
    let socket = match UdpSocket::bind(SocketAddr::new(client.local.ip(), 0)).await {
        Ok(socket) => socket,
        Err(e) => return Err(refused(request, format!("cannot open a UDP socket: {e}"))),
    };
    let Some(session) = links.session(peer) else {
        return Err(refused(request, "the link went down".into()));
    };
    let Some(answers) = links.adopt_flow(peer, asked.flow) else {
        return Err(refused(request, format!("flow {} is taken", asked.flow)));
    };
    let flow = HeldFlow {
        links: links.clone(),
        peer: peer.to_string(),
        id: asked.flow,
    };
    let Some(mut control) = request.accept() else {
        return Err(RelayEnd::error("the link went down"));
    };
    let bound = socket
        .local_addr()
        .map_err(|e| RelayEnd::error(e.to_string()))?;
    control
        .write_all(format!("{bound}\n").as_bytes())
        .await
        .map_err(|e| RelayEnd::error(format!("the link stream: {e}")))?;
    let client_ip = crate::access::canonical(client.client.ip());
    Ok(ClientRelay {
        socket,
        session,
        flow,
        answers,
        control,
        client_udp: (asked.port != 0).then(|| SocketAddr::new(client_ip, asked.port)),
        client_ip,
    })
}

impl ClientRelay {
    /// Carries datagrams between the client and the flow until the request
    /// stream or the client's stream ends.
    async fn run(
        &mut self,
        client: &StreamClient,
        audit: &mut Audit,
        stop: &CancellationToken,
    ) -> RelayEnd {
        let mut buf = vec![0u8; 65536];
        let mut probe = [0u8; 16];
        let mut datagrams = [0u64; 2];
        let end = loop {
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => {
                    let Ok((n, from)) = received else { continue };
                    let from = SocketAddr::new(crate::access::canonical(from.ip()), from.port());
                    let expected = self
                        .client_udp
                        .map_or(from.ip() == self.client_ip, |client| client == from);
                    if !expected {
                        continue; // not our client: dropped
                    }
                    self.client_udp = Some(from);
                    if self.session.send_datagram(self.flow.id, None, &buf[..n]).is_ok() {
                        datagrams[0] += 1;
                        audit.bytes_up += payload_len(&buf[..n]);
                    }
                }
                answer = self.answers.recv() => {
                    let Some(answer) = answer else {
                        break RelayEnd::error("the link flow ended");
                    };
                    let Some(to) = self.client_udp else { continue };
                    if self.socket.send_to(&answer, to).await.is_ok() {
                        datagrams[1] += 1;
                        audit.bytes_down += payload_len(&answer);
                    }
                }
                read = self.control.read(&mut probe) => match read {
                    Ok(0) => break RelayEnd {
                        result: AuditResult::Ok,
                        why: format!("the association at {} ended", self.flow.peer),
                    },
                    Ok(_) => continue,
                    Err(e) => break RelayEnd::error(format!("the link stream: {e}")),
                },
                () = client.ended.cancelled() => break RelayEnd {
                    result: AuditResult::Ok,
                    why: "the client's connection closed".into(),
                },
                () = stop.cancelled() => break RelayEnd::error("gateway shutting down"),
            }
        };
        audit.datagrams = Some(datagrams);
        end
    }
}

/// A datagram's payload without its SOCKS header, as the association at the
/// peer counts it (0 for one that has no valid header: the peer drops it).
fn payload_len(datagram: &[u8]) -> u64 {
    proto::socks::parse_udp_header(datagram)
        .map_or(0, |(_, offset)| (datagram.len() - offset) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn relay_stream_names_round_trip(stream: u32, flow: u32, port: u16) {
            let request = RelayRequest { stream, flow, port };
            prop_assert_eq!(parse_relay_stream_name(&relay_stream_name(request)), Some(request));
        }

        #[test]
        fn other_names_are_no_relay_requests(name in "[a-z0-9/._-]{0,40}") {
            prop_assume!(!name.starts_with(RELAY_STREAM_MARK));
            prop_assert_eq!(parse_relay_stream_name(&name), None);
        }
    }

    #[test]
    fn malformed_relay_names_are_refused() {
        for name in [
            "/socks-udp/",
            "/socks-udp/1/2",
            "/socks-udp/1/2/3/4",
            "/socks-udp/x/2/3",
            "/socks-udp/1/2/70000",
        ] {
            assert_eq!(parse_relay_stream_name(name), None, "{name}");
        }
    }
}
