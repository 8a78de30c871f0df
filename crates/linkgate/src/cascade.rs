//! Client side of the proxy hops in a `via` chain (cascading): asks a SOCKS4,
//! SOCKS4a, SOCKS5 or HTTP CONNECT proxy, or a peer's SOCKS service at the
//! end of a link stream, over an already connected stream, to connect
//! onwards. The SOCKS messages come from the sans-IO codec in
//! `proto`; each answer is read with a size cap.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use proto::socks::{
    Address, Command, Greeting, PasswordAuth, Reply, Request, Socks4Reply, Socks4Request,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::config::{Hop, HopCredentials, Host, HostPort};
use crate::connector::ConnectError;
use crate::stream::Stream;

/// Largest proxy answer read (an HTTP response head).
const MAX_ANSWER: usize = 16 * 1024;

/// Asks the proxy `hop` (already connected as `stream`) to connect to `next`.
pub async fn through(
    hop: &Hop,
    mut stream: Stream,
    next: &HostPort,
) -> Result<Stream, ConnectError> {
    let refused = |reason: String| ConnectError::Proxy(hop.to_string(), reason);
    let io = |e: io::Error| ConnectError::Proxy(hop.to_string(), format!("connection failed: {e}"));
    match hop {
        // A link hop is a stream to a peer's SOCKS service: SOCKS5 inside,
        // without login (the peer admits the stream by its `peer:` rules).
        Hop::Socks5(..) | Hop::Link { .. } => {
            let credentials = match hop {
                Hop::Socks5(_, credentials) => credentials.as_ref(),
                _ => None,
            };
            let request = Request {
                command: Command::Connect,
                destination: address_of(next),
            };
            socks5(&mut stream, credentials, request)
                .await
                .map_err(|e| match e {
                    HopFailure::Io(e) => io(e),
                    HopFailure::Refused(reason) => refused(reason),
                })?;
            Ok(stream)
        }
        Hop::Socks4(_) | Hop::Socks4a(_) => {
            let destination = match (&next.host, hop) {
                (Host::Name(name), Hop::Socks4(_)) => {
                    Address::Ip(resolve_v4(name, next.port).await?)
                }
                _ => address_of(next),
            };
            let request = Socks4Request {
                command: Command::Connect,
                destination,
                user_id: String::new(),
            };
            let bytes = request.encode().map_err(|e| refused(e.to_string()))?;
            stream.write_all(&bytes).await.map_err(io)?;
            let mut reply = [0u8; 8];
            stream.read_exact(&mut reply).await.map_err(io)?;
            match Socks4Reply::parse(&reply) {
                Ok(Some((true, _))) => Ok(stream),
                Ok(_) => Err(refused(format!(
                    "refused CONNECT to {next}: {} (SOCKS4 reply {})",
                    match reply[1] {
                        92 => "it could not reach the client's identd",
                        93 => "the client's identd did not confirm the user",
                        _ => "rejected or failed",
                    },
                    reply[1]
                ))),
                Err(e) => Err(refused(e.to_string())),
            }
        }
        Hop::Http(_, credentials) => http_connect(stream, credentials.as_ref(), next)
            .await
            .map_err(|e| match e {
                HopFailure::Io(e) => io(e),
                HopFailure::Refused(reason) => refused(reason),
            }),
        Hop::Direct(_) => Err(ConnectError::NotAvailable(hop.scheme())),
    }
}

enum HopFailure {
    Io(io::Error),
    Refused(String),
}

impl From<io::Error> for HopFailure {
    fn from(e: io::Error) -> Self {
        HopFailure::Io(e)
    }
}

pub(crate) fn address_of(target: &HostPort) -> Address {
    match &target.host {
        Host::Ip(ip) => Address::Ip(SocketAddr::new(*ip, target.port)),
        Host::Name(name) => Address::Domain(name.clone(), target.port),
    }
}

async fn resolve_v4(name: &str, port: u16) -> Result<SocketAddr, ConnectError> {
    let addrs = tokio::net::lookup_host((name, port))
        .await
        .map_err(|e| ConnectError::Resolve(name.to_string(), e))?;
    addrs
        .into_iter()
        .find(|a| matches!(a.ip(), IpAddr::V4(_)))
        .ok_or_else(|| {
            ConnectError::Resolve(
                name.to_string(),
                io::Error::other("no IPv4 address, which SOCKS4 needs"),
            )
        })
}

/// Reads until `parse` accepts, with the size cap.
async fn read_message<T>(
    stream: &mut Stream,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, proto::socks::SocksError>,
) -> Result<T, HopFailure> {
    let mut buf = Vec::with_capacity(64);
    loop {
        match parse(&buf) {
            Ok(Some((value, _))) => return Ok(value),
            Ok(None) if buf.len() < MAX_ANSWER => {}
            Ok(None) => return Err(HopFailure::Refused("answer too long".into())),
            Err(e) => return Err(HopFailure::Refused(e.to_string())),
        }
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(HopFailure::Refused(
                "the proxy closed the connection".into(),
            ));
        }
        buf.push(byte[0]);
    }
}

/// Asks the SOCKS5 proxy `hop` (already connected as `control`) for a UDP
/// relay (UDP ASSOCIATE, RFC 1928 §7) and returns the relay's address as
/// the proxy states it (an unspecified address means the proxy's own). The
/// association lasts as long as `control` stays open.
pub async fn udp_associate(hop: &Hop, control: &mut Stream) -> Result<Address, ConnectError> {
    let refused = |reason: String| ConnectError::Proxy(hop.to_string(), reason);
    let credentials = match hop {
        Hop::Socks5(_, credentials) => credentials.as_ref(),
        _ => return Err(refused("only a socks5:// hop relays UDP".into())),
    };
    let request = Request {
        command: Command::UdpAssociate,
        // The datagrams come from wherever the previous hop sends them.
        destination: Address::Ip(SocketAddr::from(([0, 0, 0, 0], 0))),
    };
    socks5(control, credentials, request)
        .await
        .map_err(|e| match e {
            HopFailure::Io(e) => {
                ConnectError::Proxy(hop.to_string(), format!("connection failed: {e}"))
            }
            HopFailure::Refused(reason) => refused(reason),
        })
}

/// Logs in to a SOCKS5 proxy and sends it `request`; returns the address
/// its success reply binds.
async fn socks5(
    stream: &mut Stream,
    credentials: Option<&HopCredentials>,
    request: Request,
) -> Result<Address, HopFailure> {
    use proto::socks::v5consts as c;
    let methods = match credentials {
        Some(_) => vec![c::METHOD_NONE, c::METHOD_PASSWORD],
        None => vec![c::METHOD_NONE],
    };
    stream.write_all(&Greeting { methods }.encode()).await?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await?;
    match (choice, credentials) {
        ([5, c::METHOD_NONE], _) => {}
        ([5, c::METHOD_PASSWORD], Some(credentials)) => {
            let auth = PasswordAuth {
                user: credentials.user.clone(),
                password: credentials.password.expose().to_string(),
            };
            let bytes = auth
                .encode()
                .map_err(|e| HopFailure::Refused(e.to_string()))?;
            stream.write_all(&bytes).await?;
            let mut status = [0u8; 2];
            stream.read_exact(&mut status).await?;
            if status[1] != 0 {
                return Err(HopFailure::Refused(format!(
                    "login as {:?} rejected",
                    credentials.user
                )));
            }
        }
        ([5, c::METHOD_PASSWORD], None) => {
            return Err(HopFailure::Refused(
                "the proxy wants a user name and password; add user:pass@ to the hop".into(),
            ))
        }
        (_, None) => {
            return Err(HopFailure::Refused(
                "no acceptable authentication method: the proxy wants a login this hop does \
                 not offer (a link:// hop never logs in; the peer's service needs \
                 auth = \"none\")"
                    .into(),
            ))
        }
        _ => {
            return Err(HopFailure::Refused(
                "no acceptable authentication method".into(),
            ))
        }
    }
    let bytes = request
        .encode()
        .map_err(|e| HopFailure::Refused(e.to_string()))?;
    stream.write_all(&bytes).await?;
    let reply = read_message(stream, Reply::parse).await?;
    if reply.code != c::REPLY_SUCCEEDED {
        let asked = match request.command {
            Command::UdpAssociate => "UDP ASSOCIATE".to_string(),
            _ => format!("CONNECT to {}", request.destination),
        };
        return Err(HopFailure::Refused(format!(
            "refused {asked}: {} (SOCKS5 reply {})",
            proto::socks::v5_reply_text(reply.code),
            reply.code
        )));
    }
    Ok(reply.bound)
}

async fn http_connect(
    mut stream: Stream,
    credentials: Option<&HopCredentials>,
    next: &HostPort,
) -> Result<Stream, HopFailure> {
    let mut request = format!("CONNECT {next} HTTP/1.1\r\nHost: {next}\r\n");
    if let Some(credentials) = credentials {
        let token = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            credentials.user,
            credentials.password.expose()
        ));
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if head.len() > MAX_ANSWER {
            return Err(HopFailure::Refused("CONNECT answer too long".into()));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HopFailure::Refused(
                "the proxy closed the connection".into(),
            ));
        }
        head.extend_from_slice(&chunk[..n]);
    };
    let status_line =
        String::from_utf8_lossy(&head[..head.iter().position(|&b| b == b'\r').unwrap_or(0)])
            .into_owned();
    let ok = status_line
        .split_whitespace()
        .nth(1)
        .is_some_and(|code| code.starts_with('2'));
    if !ok {
        // "HTTP/1.1 407 Proxy Authentication Required" -> "407 Proxy ...".
        let status = status_line
            .split_once(' ')
            .map_or(status_line.as_str(), |(_, status)| status);
        let status = link::handshake::untrusted_text(status.as_bytes(), 200);
        return Err(HopFailure::Refused(format!(
            "refused: {status} (CONNECT {next})"
        )));
    }
    // Bytes after the head already belong to the tunnel.
    let early = head.split_off(end);
    if early.is_empty() {
        Ok(stream)
    } else {
        Ok(Stream::Boxed(Box::new(Prefixed {
            prefix: early,
            read: 0,
            inner: stream,
        })))
    }
}

/// A stream that first yields bytes already read from it.
struct Prefixed {
    prefix: Vec<u8>,
    read: usize,
    inner: Stream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read < self.prefix.len() {
            let n = (self.prefix.len() - self.read).min(buf.remaining());
            let start = self.read;
            buf.put_slice(&self.prefix[start..start + n]);
            self.read += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl crate::stream::ByteStream for Prefixed {
    fn abort_on_drop(&mut self) {
        self.inner.abort_on_drop();
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
