//! The FTP proxy (DESIGN §3). Clients log in as `USER user@host[:port]`
//! (or normally, when the service has a fixed `target`); commands and
//! replies are then relayed, except the data-connection ones:
//!
//! - towards the server the gateway always uses passive mode (PASV, or EPSV
//!   for an IPv6 server), so data connections work through `via` and
//!   whenever only the gateway can reach the server;
//! - a client's PASV/EPSV gets an address on the gateway, which relays the
//!   connection it accepts there (from the client's own address only) to the
//!   server's passive port;
//! - a client's PORT/EPRT (only to its own address, so no FTP bounce) is
//!   answered by the gateway, which connects to the client itself and
//!   relays to the server's passive port.
//!
//! Everything is counted in the session's one audit record.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proto::ftp::{self, Command, FtpError, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{check_destination, parse_destination, ServiceRuntime};
use crate::audit::{Audit, AuditResult};
use crate::config::{Hop, Host, HostPort};
use crate::inbound::{ClientId, Inbound};
use crate::relay::relay;
use crate::stream::Stream;

const FTP_PORT: u16 = 21;
/// Data connections a session may have open or waiting at once.
const MAX_DATA_CONNECTIONS: usize = 4;
/// How long the session's audit record waits for data connections still
/// running when the control connection ends.
const DATA_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves one FTP client.
pub async fn serve(
    service: &ServiceRuntime,
    inbound: Inbound,
    audit: &mut Audit,
    stop: &CancellationToken,
) {
    let client_ip = match &inbound.client {
        ClientId::Addr(addr) => Some(crate::access::canonical(addr.ip())),
        ClientId::Peer(_) => None,
    };
    let local = inbound.local_addr();
    let mut client = Conn::new(inbound.stream);
    let timeout = service.config.handshake_timeout;
    let login = tokio::time::timeout(timeout.0, reach_server(service, &mut client, audit)).await;
    let (mut server, server_host, pending) = match login {
        Ok(Ok(reached)) => reached,
        Ok(Err(Ended)) => return,
        Err(_) => {
            let _ = client.send(b"421 Login not finished in time\r\n").await;
            return audit.finish(
                AuditResult::Error,
                format!("login not finished within {timeout}"),
            );
        }
    };
    let mut session = Session {
        service,
        client_ip,
        local,
        server_host,
        pending: pending.into_iter().collect(),
        counters: Arc::new(Counters::default()),
        data_slots: Arc::new(Semaphore::new(MAX_DATA_CONNECTIONS)),
        stop: stop.clone(),
    };
    let (result, reason) = session.relay(&mut client, &mut server).await;
    // A transfer can still be finishing: let its bytes into the record.
    let _ = tokio::time::timeout(
        DATA_DRAIN,
        session.data_slots.acquire_many(MAX_DATA_CONNECTIONS as u32),
    )
    .await;
    audit.bytes_up = session.counters.up.load(Ordering::Relaxed);
    audit.bytes_down = session.counters.down.load(Ordering::Relaxed);
    audit.finish(result, reason);
}

/// A `proto::ftp` parser: a message and the bytes it took, once whole.
type Parser<T> = fn(&[u8]) -> Result<Option<(T, usize)>, FtpError>;

/// The session ended before relaying began; `audit` says why.
struct Ended;

/// A control connection and what was read from it but not parsed yet.
struct Conn {
    stream: Stream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(stream: Stream) -> Self {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads until `parse` finds a message; `Ok(None)` at end of stream.
    async fn next<T>(&mut self, parse: Parser<T>) -> Result<Option<T>, String> {
        loop {
            if let Some(message) = take(&mut self.buf, parse).map_err(|e| e.to_string())? {
                return Ok(Some(message));
            }
            if self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| e.to_string())?
                == 0
            {
                return Ok(None);
            }
        }
    }
}

/// A line from the client: a command, or one that is not (answered with 500
/// and skipped, as a server would).
enum ClientLine {
    Command(Command),
    Malformed,
}

fn parse_client_line(buf: &[u8]) -> Result<Option<(ClientLine, usize)>, FtpError> {
    match Command::parse(buf) {
        Ok(parsed) => Ok(parsed.map(|(command, used)| (ClientLine::Command(command), used))),
        Err(FtpError::Command(_)) => {
            Ok(ftp::next_line(buf)?.map(|(_, used)| (ClientLine::Malformed, used)))
        }
        Err(e) => Err(e),
    }
}

const SYNTAX_ERROR: &[u8] = b"500 Syntax error, command unrecognized\r\n";

/// Removes the first whole message from `buf`, if there is one.
fn take<T>(buf: &mut Vec<u8>, parse: Parser<T>) -> Result<Option<T>, FtpError> {
    Ok(parse(buf)?.map(|(message, used)| {
        buf.drain(..used);
        message
    }))
}

/// Logs the client in to its server: the fixed target, or the one named in
/// `USER user@host[:port]`. Returns the server's control connection, its
/// host (for data connections), and the command whose reply is awaited.
async fn reach_server(
    service: &ServiceRuntime,
    client: &mut Conn,
    audit: &mut Audit,
) -> Result<(Conn, Host, Option<Pending>), Ended> {
    if let Some(Hop::Direct(target)) = &service.config.target {
        audit.target = target.to_string();
        let server = open_server(service, client, target, audit, true).await?;
        return Ok((server, target.host.clone(), None));
    }
    let _ = client
        .send(b"220 linkgate FTP proxy: log in with USER user@host[:port]\r\n")
        .await;
    loop {
        let command = match client.next(parse_client_line).await {
            Ok(Some(ClientLine::Command(command))) => command,
            Ok(Some(ClientLine::Malformed)) => {
                let _ = client.send(SYNTAX_ERROR).await;
                continue;
            }
            Ok(None) => {
                audit.finish(AuditResult::Error, "client left before logging in");
                return Err(Ended);
            }
            Err(e) => {
                let _ = client
                    .send(b"500 Command line too long or malformed\r\n")
                    .await;
                audit.finish(AuditResult::Error, format!("client: {e}"));
                return Err(Ended);
            }
        };
        match command.verb.as_str() {
            "USER" => {
                let Some((user, target)) = command.arg_str().and_then(proxy_login) else {
                    let _ = client
                        .send(b"501 Log in with USER user@host[:port]\r\n")
                        .await;
                    continue;
                };
                audit.target = target.to_string();
                if let Err(reason) = check_destination(service, &target).await {
                    let _ = client.send(format!("530 {reason}\r\n").as_bytes()).await;
                    audit.finish(AuditResult::Denied, reason);
                    return Err(Ended);
                }
                // The client had the gateway's greeting: the reply it awaits
                // is the one to USER.
                let mut server = open_server(service, client, &target, audit, false).await?;
                if server
                    .send(format!("USER {user}\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    audit.finish(AuditResult::Error, "server closed after its greeting");
                    return Err(Ended);
                }
                return Ok((server, target.host, Some(Pending::Other)));
            }
            "QUIT" => {
                let _ = client.send(b"221 Goodbye\r\n").await;
                audit.finish(AuditResult::Ok, "client quit before logging in");
                return Err(Ended);
            }
            _ => {
                let _ = client
                    .send(b"530 Log in with USER user@host[:port] first\r\n")
                    .await;
            }
        }
    }
}

/// `user@host[:port]` (the last `@` separates: user names may contain one).
fn proxy_login(arg: &str) -> Option<(String, HostPort)> {
    let (user, destination) = arg.rsplit_once('@')?;
    let target = parse_destination(destination, FTP_PORT).ok()?;
    (!user.is_empty()).then(|| (user.to_string(), target))
}

/// Connects to the server and reads its greeting, passed on to the client
/// when `forward_greeting`.
async fn open_server(
    service: &ServiceRuntime,
    client: &mut Conn,
    target: &HostPort,
    audit: &mut Audit,
    forward_greeting: bool,
) -> Result<Conn, Ended> {
    let stream = match service
        .connector
        .connect(&Hop::Direct(target.clone()))
        .await
    {
        Ok(stream) => stream,
        Err(e) => {
            let _ = client.send(format!("421 {e}\r\n").as_bytes()).await;
            audit.finish(AuditResult::Error, e.to_string());
            return Err(Ended);
        }
    };
    let mut server = Conn::new(stream);
    match server.next(Reply::parse).await {
        Ok(Some(greeting)) if greeting.code / 100 == 2 => {
            if forward_greeting {
                let _ = client.send(&greeting.encode()).await;
            }
            Ok(server)
        }
        Ok(Some(refusal)) => {
            let _ = client.send(&refusal.encode()).await;
            audit.finish(
                AuditResult::Error,
                format!("server refused the session ({})", refusal.code),
            );
            Err(Ended)
        }
        Ok(None) | Err(_) => {
            let _ = client.send(b"421 The server sent no greeting\r\n").await;
            audit.finish(AuditResult::Error, "the server sent no greeting");
            Err(Ended)
        }
    }
}

/// What a command sent to the server is waiting for.
enum Pending {
    /// Relay the reply as it is.
    Other,
    /// The client asked for passive mode (EPSV when `extended`).
    Passive { extended: bool },
    /// The client asked for active mode to `client`; the server is asked
    /// for passive mode instead.
    Active { client: SocketAddr, extended: bool },
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
}

struct Session<'a> {
    service: &'a ServiceRuntime,
    /// The client's address (`None` over links: no data connections then).
    client_ip: Option<IpAddr>,
    /// The gateway's address on the client's control connection.
    local: Option<SocketAddr>,
    server_host: Host,
    pending: VecDeque<Pending>,
    counters: Arc<Counters>,
    data_slots: Arc<Semaphore>,
    stop: CancellationToken,
}

impl Session<'_> {
    /// Relays until either side closes; returns the audit result.
    async fn relay(&mut self, client: &mut Conn, server: &mut Conn) -> (AuditResult, String) {
        loop {
            // Whatever is already buffered first (the login may have read ahead).
            loop {
                match take(&mut client.buf, parse_client_line) {
                    Ok(Some(ClientLine::Command(command))) => {
                        if let Err(e) = self.on_command(command, client, server).await {
                            return (AuditResult::Error, e);
                        }
                    }
                    Ok(Some(ClientLine::Malformed)) => {
                        if let Err(e) = client.send(SYNTAX_ERROR).await {
                            return (AuditResult::Error, format!("writing to client: {e}"));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = client.send(b"500 Command line too long\r\n").await;
                        return (AuditResult::Error, format!("client: {e}"));
                    }
                }
            }
            loop {
                match take(&mut server.buf, Reply::parse) {
                    Ok(Some(reply)) => {
                        if let Err(e) = self.on_reply(reply, client).await {
                            return (AuditResult::Error, e);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return (AuditResult::Error, format!("server: {e}")),
                }
            }
            tokio::select! {
                read = client.stream.read_buf(&mut client.buf) => match read {
                    Ok(0) => return (AuditResult::Ok, "client closed".into()),
                    Ok(n) => self.counters.up.fetch_add(n as u64, Ordering::Relaxed),
                    Err(e) => return (AuditResult::Error, format!("reading from client: {e}")),
                },
                read = server.stream.read_buf(&mut server.buf) => match read {
                    Ok(0) => return (AuditResult::Ok, "server closed".into()),
                    Ok(n) => self.counters.down.fetch_add(n as u64, Ordering::Relaxed),
                    Err(e) => return (AuditResult::Error, format!("reading from server: {e}")),
                },
                () = self.stop.cancelled() => {
                    return (AuditResult::Error, "gateway shutting down: grace period over".into())
                }
            };
        }
    }

    async fn on_command(
        &mut self,
        command: Command,
        client: &mut Conn,
        server: &mut Conn,
    ) -> Result<(), String> {
        let to_server = |e: std::io::Error| format!("writing to server: {e}");
        let verb = command.verb.as_str();
        let pending = match verb {
            "PASV" | "EPSV" if command.arg_str() == Some("ALL") => {
                // The gateway picks the server-side mode itself.
                return reply(client, "200 EPSV ALL ok").await;
            }
            "PASV" | "EPSV" => Pending::Passive {
                extended: verb == "EPSV",
            },
            "PORT" | "EPRT" => {
                let parsed = match verb {
                    "PORT" => ftp::parse_host_port(command.arg.as_deref().unwrap_or_default())
                        .map(SocketAddr::V4),
                    _ => ftp::parse_eprt(command.arg.as_deref().unwrap_or_default()),
                };
                let Ok(address) = parsed else {
                    return reply(client, "501 Cannot read that address").await;
                };
                if Some(crate::access::canonical(address.ip())) != self.client_ip {
                    return reply(client, "500 Data connections go to your own address only").await;
                }
                Pending::Active {
                    client: address,
                    extended: verb == "EPRT",
                }
            }
            _ => {
                server.send(&command.encode()).await.map_err(to_server)?;
                self.pending.push_back(Pending::Other);
                return Ok(());
            }
        };
        if self.client_ip.is_none() {
            return reply(client, "425 Data connections need a direct TCP client").await;
        }
        let ask = if matches!(self.server_host, Host::Ip(IpAddr::V6(_))) {
            "EPSV\r\n"
        } else {
            "PASV\r\n"
        };
        server.send(ask.as_bytes()).await.map_err(to_server)?;
        self.pending.push_back(pending);
        Ok(())
    }

    async fn on_reply(&mut self, answer: Reply, client: &mut Conn) -> Result<(), String> {
        // Preliminary replies (1xx) come before the final one.
        let pending = if answer.code < 200 {
            None
        } else {
            self.pending.pop_front()
        };
        let passive_port = match answer.code {
            227 => ftp::parse_pasv_reply(answer.lines.concat().as_slice())
                .ok()
                .map(|a| a.port()),
            229 => ftp::parse_epsv_reply(answer.lines.concat().as_slice()).ok(),
            _ => None,
        };
        match (pending, passive_port) {
            (Some(Pending::Passive { extended }), Some(port)) => {
                self.offer_passive(client, port, extended).await
            }
            (
                Some(Pending::Active {
                    client: to,
                    extended,
                }),
                Some(port),
            ) => {
                if !self.start_data(DataLeg::ConnectTo(to), port) {
                    return reply(client, "425 Too many data connections at once").await;
                }
                let verb = if extended { "EPRT" } else { "PORT" };
                reply(client, &format!("200 {verb} command successful")).await
            }
            (Some(Pending::Passive { .. } | Pending::Active { .. }), None) if answer.code < 400 => {
                reply(client, "425 The server did not open a passive port").await
            }
            _ => client
                .send(&answer.encode())
                .await
                .map_err(|e| format!("writing to client: {e}")),
        }
    }

    /// Opens a port on the gateway for the client's data connection.
    async fn offer_passive(
        &mut self,
        client: &mut Conn,
        server_port: u16,
        extended: bool,
    ) -> Result<(), String> {
        let Some(local) = self.local else {
            return reply(client, "425 Data connections need a direct TCP client").await;
        };
        let listener = match TcpListener::bind(SocketAddr::new(local.ip(), 0)).await {
            Ok(listener) => listener,
            Err(e) => return reply(client, &format!("425 Cannot open a data port: {e}")).await,
        };
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let text = match (extended, local.ip()) {
            (true, _) => format!("229 {}", ftp::format_epsv_reply(port)),
            (false, IpAddr::V4(ip)) => format!(
                "227 {}",
                ftp::format_pasv_reply(SocketAddrV4::new(ip, port))
            ),
            (false, IpAddr::V6(_)) => {
                return reply(client, "425 Use EPSV: this connection is IPv6").await;
            }
        };
        if !self.start_data(DataLeg::AcceptOn(listener), server_port) {
            return reply(client, "425 Too many data connections at once").await;
        }
        reply(client, &text).await
    }

    /// Starts one data connection between the client side `leg` and the
    /// server's passive `server_port`, in a task of its own; `false` when
    /// the session already has its most.
    fn start_data(&self, leg: DataLeg, server_port: u16) -> bool {
        let Ok(slot) = self.data_slots.clone().try_acquire_owned() else {
            return false;
        };
        let server = HostPort {
            host: self.server_host.clone(),
            port: server_port,
        };
        let connector = self.service.connector.clone();
        let client_ip = self.client_ip;
        let counters = self.counters.clone();
        let stop = self.stop.clone();
        let wait = self.service.config.connect_timeout.0;
        let idle = self.service.config.idle_timeout.0;
        tokio::spawn(async move {
            let _slot = slot;
            let client_side = tokio::time::timeout(wait, leg.open(client_ip));
            let server = Hop::Direct(server);
            let server_side = connector.connect(&server);
            let (Ok(Ok(client_side)), Ok(mut server_side)) = tokio::join!(client_side, server_side)
            else {
                return;
            };
            let mut client_side = Stream::Tcp(client_side);
            let outcome = relay(&mut client_side, &mut server_side, idle, &stop).await;
            counters.up.fetch_add(outcome.bytes_up, Ordering::Relaxed);
            counters
                .down
                .fetch_add(outcome.bytes_down, Ordering::Relaxed);
        });
        true
    }
}

/// How the client's end of a data connection is made.
enum DataLeg {
    /// Passive: the client connects to this listener.
    AcceptOn(TcpListener),
    /// Active: the gateway connects to the client.
    ConnectTo(SocketAddr),
}

impl DataLeg {
    async fn open(self, client_ip: Option<IpAddr>) -> std::io::Result<TcpStream> {
        match self {
            DataLeg::ConnectTo(addr) => TcpStream::connect(addr).await,
            DataLeg::AcceptOn(listener) => loop {
                let (stream, peer) = listener.accept().await?;
                // Only the client itself may use its data port.
                if Some(crate::access::canonical(peer.ip())) == client_ip {
                    return Ok(stream);
                }
            },
        }
    }
}

async fn reply(client: &mut Conn, line: &str) -> Result<(), String> {
    client
        .send(format!("{line}\r\n").as_bytes())
        .await
        .map_err(|e| format!("writing to client: {e}"))
}

#[cfg(test)]
mod tests {
    use super::proxy_login;

    #[test]
    fn proxy_login_forms() {
        let read = |arg: &str| proxy_login(arg).map(|(user, target)| (user, target.to_string()));
        assert_eq!(
            read("alice@ftp.example.com"),
            Some(("alice".into(), "ftp.example.com:21".into()))
        );
        assert_eq!(
            read("alice@10.0.0.1:2121"),
            Some(("alice".into(), "10.0.0.1:2121".into()))
        );
        assert_eq!(
            read("a@b.c@[::1]:2121"),
            Some(("a@b.c".into(), "[::1]:2121".into()))
        );
        assert_eq!(read("anonymous"), None);
        assert_eq!(read("@host"), None);
    }
}
