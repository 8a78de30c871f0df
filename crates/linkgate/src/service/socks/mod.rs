//! The SOCKS service (DESIGN §3): SOCKS4, 4a and 5 on one port, told apart
//! by the first byte; no-auth and RFC 1929 username/password; CONNECT, BIND
//! and UDP ASSOCIATE; reply codes that say what happened.

pub mod link_udp;
mod proxy_udp;
pub mod relay;
mod udp;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use proto::socks::{
    self, v5consts as c, Address, Command, Greeting, PasswordAuth, Reply, Request, Socks4Reply,
    Socks4Request, SocksError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::ServiceRuntime;
use crate::access::Verdict;
use crate::audit::{Audit, AuditResult};
use crate::config::{AuthMode, Hop, Host, HostPort};
use crate::connector::ConnectError;
use crate::inbound::{ClientId, Inbound};
use crate::relay::relay_and_record;
use crate::stream::Stream;

/// Most bytes buffered before a request is complete (largest SOCKS4a
/// request, with room for pipelined early data).
const HANDSHAKE_CAP: usize = 1024;

/// A negotiated request, ready to carry out.
struct Negotiated {
    version: u8,
    command: Command,
    destination: Address,
    /// Bytes the client sent after its request (pipelined early data).
    leftover: Vec<u8>,
}

/// Why negotiation ended without a request to carry out; the audit record
/// has already been filled in and any reply sent.
struct Ended;

/// Reads a client's handshake messages with a hard size cap.
struct HandshakeReader {
    buf: Vec<u8>,
}

enum ReadFailure {
    Closed,
    TooLong,
    Io(io::Error),
    Protocol(SocksError),
}

impl HandshakeReader {
    /// The bytes after the request, in an allocation no larger than they are
    /// (a tunnel may live for hours; its handshake buffer should not).
    fn into_leftover(self) -> Vec<u8> {
        if self.buf.is_empty() {
            Vec::new()
        } else {
            self.buf.as_slice().to_vec()
        }
    }

    async fn next<T>(
        &mut self,
        stream: &mut Stream,
        parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, SocksError>,
    ) -> Result<T, ReadFailure> {
        loop {
            match parse(&self.buf) {
                Ok(Some((value, used))) => {
                    self.buf.drain(..used);
                    return Ok(value);
                }
                Ok(None) if self.buf.len() >= HANDSHAKE_CAP => return Err(ReadFailure::TooLong),
                Ok(None) => {}
                Err(e) => return Err(ReadFailure::Protocol(e)),
            }
            // Reads into spare capacity only, so the cap holds; no stack
            // buffer, so an idle tunnel's task stays small.
            self.buf.reserve(HANDSHAKE_CAP - self.buf.len());
            let room = HANDSHAKE_CAP - self.buf.len();
            let mut limited = (&mut *stream).take(room as u64);
            match limited.read_buf(&mut self.buf).await {
                Ok(0) => return Err(ReadFailure::Closed),
                Ok(_) => {}
                Err(e) => return Err(ReadFailure::Io(e)),
            }
        }
    }
}

/// Serves one SOCKS client.
pub async fn serve(
    service: &ServiceRuntime,
    mut inbound: Inbound,
    audit: &mut Audit,
    stop: &CancellationToken,
) {
    let timeout = service.config.handshake_timeout;
    let negotiated =
        match tokio::time::timeout(timeout.0, Box::pin(negotiate(service, &mut inbound, audit)))
            .await
        {
            Ok(Ok(negotiated)) => negotiated,
            Ok(Err(Ended)) => return,
            Err(_) => {
                audit.finish(
                    AuditResult::Error,
                    format!("handshake not finished within {timeout}"),
                );
                return;
            }
        };
    audit.target = negotiated.destination.to_string();
    if let Err(reason) = check_destination(service, &negotiated.destination).await {
        return refuse(
            &mut inbound.stream,
            negotiated.version,
            c::REPLY_NOT_ALLOWED,
            audit,
            AuditResult::Denied,
            reason,
        )
        .await;
    }
    match negotiated.command {
        Command::Connect => connect(service, inbound, negotiated, audit, stop).await,
        Command::Bind => Box::pin(bind(service, inbound, negotiated, audit, stop)).await,
        Command::UdpAssociate => {
            Box::pin(udp::associate(service, inbound, negotiated, audit, stop)).await
        }
    }
}

async fn negotiate(
    service: &ServiceRuntime,
    inbound: &mut Inbound,
    audit: &mut Audit,
) -> Result<Negotiated, Ended> {
    let mut reader = HandshakeReader {
        buf: Vec::with_capacity(64),
    };
    let stream = &mut inbound.stream;
    let fail = |audit: &mut Audit, failure: ReadFailure| {
        let reason = match failure {
            ReadFailure::Closed => "client closed during the SOCKS handshake".to_string(),
            ReadFailure::TooLong => format!("SOCKS request longer than {HANDSHAKE_CAP} bytes"),
            ReadFailure::Io(e) => format!("reading the SOCKS handshake: {e}"),
            ReadFailure::Protocol(e) => e.to_string(),
        };
        audit.finish(AuditResult::Error, reason);
        Ended
    };
    // One read takes the whole greeting (or SOCKS4 request) in the usual case.
    match stream.read_buf(&mut reader.buf).await {
        Ok(0) => return Err(fail(audit, ReadFailure::Closed)),
        Ok(_) => {}
        Err(e) => return Err(fail(audit, ReadFailure::Io(e))),
    }
    match socks::version_of(reader.buf[0]) {
        Ok(4) => {
            let request = match reader.next(stream, Socks4Request::parse).await {
                Ok(request) => request,
                Err(failure) => {
                    if matches!(failure, ReadFailure::Protocol(SocksError::Command(_))) {
                        send_reply(stream, 4, c::REPLY_COMMAND_NOT_SUPPORTED, None).await;
                    }
                    return Err(fail(audit, failure));
                }
            };
            if service.config.auth == AuthMode::Password {
                send_reply(stream, 4, c::REPLY_NOT_ALLOWED, None).await;
                audit.finish(
                    AuditResult::AuthFailed,
                    "SOCKS4 cannot carry a password and this service requires auth = \"password\"; use SOCKS5",
                );
                return Err(Ended);
            }
            Ok(Negotiated {
                version: 4,
                command: request.command,
                destination: request.destination,
                leftover: reader.into_leftover(),
            })
        }
        Ok(_) => {
            let greeting = reader
                .next(stream, Greeting::parse)
                .await
                .map_err(|f| fail(audit, f))?;
            let wanted = match service.config.auth {
                AuthMode::Password => c::METHOD_PASSWORD,
                AuthMode::None => c::METHOD_NONE,
            };
            if !greeting.methods.contains(&wanted) {
                refusal_sent(stream, &[5, c::METHOD_UNACCEPTABLE]).await;
                let (result, reason) = match (service.config.auth, &inbound.client) {
                    // A peer's `via = "link://..."` hop never logs in.
                    (AuthMode::Password, crate::inbound::ClientId::Peer(peer)) => (
                        AuditResult::AuthFailed,
                        format!(
                            "gateway {peer} offered no login: a link:// via hop speaks SOCKS5 \
                             without one; give peers a socks service with auth = \"none\" \
                             that allows peer:{peer}"
                        ),
                    ),
                    (AuthMode::Password, _) => (
                        AuditResult::AuthFailed,
                        "client offered no username/password method".to_string(),
                    ),
                    (AuthMode::None, _) => (
                        AuditResult::Error,
                        "client offered no method this service accepts".to_string(),
                    ),
                };
                audit.finish(result, reason);
                return Err(Ended);
            }
            write_or_end(stream, &[5, wanted], audit).await?;
            if wanted == c::METHOD_PASSWORD {
                let credentials = reader
                    .next(stream, PasswordAuth::parse)
                    .await
                    .map_err(|f| fail(audit, f))?;
                login(service, stream, &inbound.client, credentials, audit).await?;
            }
            let request = match reader.next(stream, Request::parse).await {
                Ok(request) => request,
                Err(failure) => {
                    let code = match &failure {
                        ReadFailure::Protocol(SocksError::Command(_)) => {
                            Some(c::REPLY_COMMAND_NOT_SUPPORTED)
                        }
                        ReadFailure::Protocol(SocksError::AddressType(_)) => {
                            Some(c::REPLY_ADDRESS_TYPE_NOT_SUPPORTED)
                        }
                        ReadFailure::Protocol(_) | ReadFailure::TooLong => {
                            Some(c::REPLY_GENERAL_FAILURE)
                        }
                        _ => None,
                    };
                    if let Some(code) = code {
                        send_reply(stream, 5, code, None).await;
                    }
                    return Err(fail(audit, failure));
                }
            };
            Ok(Negotiated {
                version: 5,
                command: request.command,
                destination: request.destination,
                leftover: reader.into_leftover(),
            })
        }
        Err(e) => Err(fail(audit, ReadFailure::Protocol(e))),
    }
}

async fn write_or_end(stream: &mut Stream, bytes: &[u8], audit: &mut Audit) -> Result<(), Ended> {
    if let Err(e) = stream.write_all(bytes).await {
        audit.finish(AuditResult::Error, format!("writing to client: {e}"));
        return Err(Ended);
    }
    Ok(())
}

/// RFC 1929 login, then the `user:` access rules.
async fn login(
    service: &ServiceRuntime,
    stream: &mut Stream,
    client: &ClientId,
    credentials: PasswordAuth,
    audit: &mut Audit,
) -> Result<(), Ended> {
    audit.user = Some(credentials.user.clone());
    if let Err(failure) = service
        .users
        .verify(&credentials.user, &credentials.password)
        .await
    {
        refusal_sent(stream, &[1, 1]).await;
        audit.finish(
            AuditResult::AuthFailed,
            format!("{failure} for user {:?}", credentials.user),
        );
        return Err(Ended);
    }
    if let Verdict::Deny(why) = service.access.check(client, Some(&credentials.user)) {
        refusal_sent(stream, &[1, 1]).await;
        audit.finish(AuditResult::Denied, why);
        return Err(Ended);
    }
    write_or_end(stream, &[1, 0], audit).await
}

/// The `destinations` rules, for a SOCKS address.
async fn check_destination(service: &ServiceRuntime, destination: &Address) -> Result<(), String> {
    let (host, port) = host_of(destination);
    super::check_destination(service, &HostPort { host, port })
        .await
        .map_err(|_| format!("destination {destination} is not in the service's destinations"))
}

fn host_of(address: &Address) -> (Host, u16) {
    match address {
        Address::Ip(addr) => (Host::Ip(crate::access::canonical(addr.ip())), addr.port()),
        Address::Domain(name, port) => (Host::Name(name.to_ascii_lowercase()), *port),
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
}

/// Sends a reply in the client's SOCKS version (errors are ignored: the
/// connection ends anyway).
async fn send_reply(stream: &mut Stream, version: u8, code: u8, bound: Option<SocketAddr>) {
    let bytes = if version == 4 {
        let reply = if code == c::REPLY_SUCCEEDED {
            Socks4Reply::Granted
        } else {
            Socks4Reply::Rejected
        };
        reply.encode(bound).to_vec()
    } else {
        Reply {
            code,
            bound: Address::Ip(bound.unwrap_or_else(unspecified)),
        }
        .encode()
    };
    let _ = stream.write_all(&bytes).await;
}

/// Answers the client with reply `code` and records why the request ended.
async fn refuse(
    stream: &mut Stream,
    version: u8,
    code: u8,
    audit: &mut Audit,
    result: AuditResult,
    reason: impl Into<String>,
) {
    send_reply(stream, version, code, None).await;
    let _ = stream.shutdown().await;
    audit.finish(result, reason);
}

/// Sends a refusal the connection ends with, and finishes the stream: over
/// a link, a stream dropped unfinished is reset, and the reset would
/// overtake the answer.
async fn refusal_sent(stream: &mut Stream, answer: &[u8]) {
    let _ = stream.write_all(answer).await;
    let _ = stream.shutdown().await;
}

/// The SOCKS5 reply code for a failed outbound connection.
fn reply_code(error: &ConnectError) -> u8 {
    match error {
        ConnectError::Timeout(..) => c::REPLY_TTL_EXPIRED,
        ConnectError::Resolve(..) => c::REPLY_HOST_UNREACHABLE,
        ConnectError::Connect(_, e) => match e.kind() {
            io::ErrorKind::ConnectionRefused => c::REPLY_CONNECTION_REFUSED,
            io::ErrorKind::HostUnreachable => c::REPLY_HOST_UNREACHABLE,
            io::ErrorKind::NetworkUnreachable => c::REPLY_NETWORK_UNREACHABLE,
            io::ErrorKind::TimedOut => c::REPLY_TTL_EXPIRED,
            _ => c::REPLY_GENERAL_FAILURE,
        },
        _ => c::REPLY_GENERAL_FAILURE,
    }
}

// === CONNECT ===

async fn connect(
    service: &ServiceRuntime,
    mut inbound: Inbound,
    negotiated: Negotiated,
    audit: &mut Audit,
    stop: &CancellationToken,
) {
    let (host, port) = host_of(&negotiated.destination);
    let target = Hop::Direct(HostPort { host, port });
    let mut upstream = match service.connector.connect(&target).await {
        Ok(stream) => stream,
        Err(e) => {
            send_reply(
                &mut inbound.stream,
                negotiated.version,
                reply_code(&e),
                None,
            )
            .await;
            audit.finish(e.audit_result(), e.to_string());
            return;
        }
    };
    let bound = match &upstream {
        Stream::Tcp(tcp) => tcp.local_addr().ok(),
        Stream::Boxed(_) => None,
    };
    send_reply(
        &mut inbound.stream,
        negotiated.version,
        c::REPLY_SUCCEEDED,
        bound,
    )
    .await;
    let idle = service.config.idle_timeout;
    let early = negotiated.leftover;
    relay_and_record(
        &mut inbound.stream,
        &mut upstream,
        &early,
        idle,
        stop,
        audit,
        "closed",
    )
    .await;
}

// === BIND ===

async fn bind(
    service: &ServiceRuntime,
    mut inbound: Inbound,
    negotiated: Negotiated,
    audit: &mut Audit,
    stop: &CancellationToken,
) {
    let version = negotiated.version;
    let Some(local) = inbound
        .local_addr()
        .filter(|_| service.config.via.is_empty())
    else {
        return refuse(
            &mut inbound.stream,
            version,
            c::REPLY_COMMAND_NOT_SUPPORTED,
            audit,
            AuditResult::Error,
            "BIND needs a direct TCP client and a service without via",
        )
        .await;
    };
    let listener = match super::data_port::bind_data_port(local.ip(), None) {
        Ok(listener) => listener,
        Err(e) => {
            return refuse(
                &mut inbound.stream,
                version,
                c::REPLY_GENERAL_FAILURE,
                audit,
                AuditResult::Error,
                format!("cannot open a BIND listener: {e}"),
            )
            .await;
        }
    };
    send_reply(
        &mut inbound.stream,
        version,
        c::REPLY_SUCCEEDED,
        listener.local_addr().ok(),
    )
    .await;
    let accepted = tokio::time::timeout(service.config.connect_timeout.0, listener.accept()).await;
    let (incoming, from) = match accepted {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            return refuse(
                &mut inbound.stream,
                version,
                c::REPLY_GENERAL_FAILURE,
                audit,
                AuditResult::Error,
                format!("BIND accept failed: {e}"),
            )
            .await;
        }
        Err(_) => {
            return refuse(
                &mut inbound.stream,
                version,
                c::REPLY_TTL_EXPIRED,
                audit,
                AuditResult::Error,
                format!(
                    "no connection to the BIND port within {}",
                    service.config.connect_timeout
                ),
            )
            .await;
        }
    };
    drop(listener);
    // The request names the host expected to connect; anyone else is refused.
    if let Address::Ip(expected) = &negotiated.destination {
        let expected = crate::access::canonical(expected.ip());
        if !expected.is_unspecified() && expected != crate::access::canonical(from.ip()) {
            return refuse(
                &mut inbound.stream,
                version,
                c::REPLY_NOT_ALLOWED,
                audit,
                AuditResult::Denied,
                format!("BIND connection came from {from}, not from {expected}"),
            )
            .await;
        }
    }
    let _ = incoming.set_nodelay(true);
    send_reply(&mut inbound.stream, version, c::REPLY_SUCCEEDED, Some(from)).await;
    let mut incoming = Stream::Tcp(incoming);
    let idle = service.config.idle_timeout;
    let early = negotiated.leftover;
    relay_and_record(
        &mut inbound.stream,
        &mut incoming,
        &early,
        idle,
        stop,
        audit,
        "closed",
    )
    .await;
}
