//! A logged-in session: commands and replies relayed both ways at once, with
//! the data-connection commands translated (see the module above).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proto::ftp::{self, Command, Reply};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::conn::{parse_client_line, reply, take, ClientLine, Conn, SYNTAX_ERROR};
use super::data::{DataConnection, DataLeg};
use super::link_data::{data_stream_name, LINK_DATA_VERB};
use crate::audit::AuditResult;
use crate::config::{Hop, Host, HostPort};
use crate::service::ServiceRuntime;

/// Commands sent to the server and not answered yet, at most.
const MAX_PENDING: usize = 64;
/// How long a new data connection waits for a slot that an abandoned one is
/// giving back (or that a finishing transfer frees).
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// What a command sent to the server is waiting for.
pub(super) enum Pending {
    /// Relay the reply as it is.
    Other,
    /// The client asked for passive mode (EPSV when `extended`).
    Passive { extended: bool },
    /// The client asked for active mode to `client`; the server is asked
    /// for passive mode instead.
    Active { client: SocketAddr, extended: bool },
    /// The client, another gateway, asked for a data connection over the
    /// link ([`LINK_DATA_VERB`]).
    LinkData,
    /// FEAT: relayed without the TLS features (see [`NO_TLS`]).
    Feat,
}

/// The answer to AUTH. The gateway cannot pass TLS through: it reads the
/// commands to relay the data connections. Clients that use TLS "if
/// available" (FileZilla's and lftp's defaults) go on without it; had AUTH
/// reached a server that accepts it, the session would break at the first
/// encrypted byte.
pub(super) const NO_TLS: &str =
    "534 TLS is not available through this FTP proxy (it must read the commands); continue without";

/// Whether a FEAT line announces a TLS feature (RFC 4217: AUTH, PBSZ, PROT).
fn is_tls_feature(line: &[u8]) -> bool {
    let word: Vec<u8> = line
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take_while(|b| !b.is_ascii_whitespace())
        .map(u8::to_ascii_uppercase)
        .collect();
    matches!(&word[..], b"AUTH" | b"PBSZ" | b"PROT")
}

/// Where the session's server is; its data connections go there too.
#[derive(Clone)]
pub(super) enum ServerSide {
    /// An FTP server over TCP (through `via`): data to its passive ports.
    Tcp(Host),
    /// Another gateway's ftp service over a link: data as link streams.
    Link { peer: String, service: String },
}

/// Bytes moved by the session, control and data connections together.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) up: AtomicU64,
    pub(super) down: AtomicU64,
}

/// A logged-in session's state.
pub(super) struct Session<'a> {
    pub(super) service: &'a ServiceRuntime,
    /// The client's address (`None` over links).
    pub(super) client_ip: Option<IpAddr>,
    /// The gateway the client is, when it came over a link.
    pub(super) client_peer: Option<String>,
    /// The gateway's address on the client's control connection.
    pub(super) local: Option<SocketAddr>,
    pub(super) server: ServerSide,
    pub(super) pending: VecDeque<Pending>,
    pub(super) counters: Arc<Counters>,
    pub(super) data_slots: Arc<Semaphore>,
    pub(super) stop: CancellationToken,
    /// Abandons the last data connection started, if its client end has
    /// not appeared yet.
    pub(super) abandon_last: CancellationToken,
    /// Until the server accepted the login (230), when the session's
    /// `handshake_timeout` runs out: the whole login is bounded, not only
    /// the part before the server was reached.
    pub(super) login_deadline: Option<tokio::time::Instant>,
    /// The bandwidth caps the data connections obey.
    pub(super) caps: crate::limits::Caps,
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_or_never(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Session<'_> {
    /// Relays until either side closes; returns the audit result.
    pub(super) async fn relay(
        &mut self,
        client: &mut Conn,
        server: &mut Conn,
    ) -> (AuditResult, String) {
        loop {
            // Whatever is already buffered first (the login may have read
            // ahead); a client that pipelines waits once MAX_PENDING of its
            // commands await replies, so nothing grows without bound.
            while self.pending.len() < MAX_PENDING {
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
                read = client.stream.read_buf(&mut client.buf), if self.pending.len() < MAX_PENDING => match read {
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
                () = sleep_until_or_never(self.login_deadline) => {
                    let _ = client.send(b"421 Login not finished in time\r\n").await;
                    let timeout = self.service.config.handshake_timeout;
                    return (AuditResult::Error, format!("login not finished within {timeout}"));
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
            "PASV" | "EPSV" | "PORT" | "EPRT" if self.client_ip.is_none() => {
                return reply(
                    client,
                    "425 Over a link, data connections need an ftp service with a link:// target on the other gateway",
                )
                .await;
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
            "AUTH" => return reply(client, NO_TLS).await,
            "FEAT" => {
                server.send(&command.encode()).await.map_err(to_server)?;
                self.pending.push_back(Pending::Feat);
                return Ok(());
            }
            LINK_DATA_VERB if self.client_peer.is_some() => Pending::LinkData,
            LINK_DATA_VERB => {
                return reply(client, "502 XLDP is spoken between linkgate gateways only").await;
            }
            _ => {
                server.send(&command.encode()).await.map_err(to_server)?;
                self.pending.push_back(Pending::Other);
                return Ok(());
            }
        };
        let ask = match &self.server {
            ServerSide::Link { .. } => format!("{LINK_DATA_VERB}\r\n"),
            ServerSide::Tcp(Host::Ip(IpAddr::V6(_))) => "EPSV\r\n".to_string(),
            ServerSide::Tcp(_) => "PASV\r\n".to_string(),
        };
        server.send(ask.as_bytes()).await.map_err(to_server)?;
        self.pending.push_back(pending);
        Ok(())
    }

    async fn on_reply(&mut self, answer: Reply, client: &mut Conn) -> Result<(), String> {
        if answer.code == 230 {
            self.login_deadline = None;
        }
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
                if !self.start_data(DataLeg::ConnectTo(to), port).await {
                    return reply(client, "425 Too many data connections at once").await;
                }
                let verb = if extended { "EPRT" } else { "PORT" };
                reply(client, &format!("200 {verb} command successful")).await
            }
            (Some(Pending::LinkData), Some(port)) => self.offer_link_data(client, port).await,
            (Some(Pending::Feat), _) if answer.lines.len() > 2 => {
                let mut features = answer;
                let last = features.lines.len() - 1;
                let mut index = 0;
                features.lines.retain(|line| {
                    index += 1;
                    index == 1 || index == last + 1 || !is_tls_feature(line)
                });
                client
                    .send(&features.encode())
                    .await
                    .map_err(|e| format!("writing to client: {e}"))
            }
            (Some(Pending::Passive { .. } | Pending::Active { .. } | Pending::LinkData), None)
                if answer.code < 400 =>
            {
                reply(client, "425 The server did not open a passive port").await
            }
            // XLDP not understood: the link target is no gateway's ftp service.
            (Some(Pending::Passive { .. } | Pending::Active { .. } | Pending::LinkData), None)
                if answer.code >= 500 && matches!(self.server, ServerSide::Link { .. }) =>
            {
                reply(
                    client,
                    "425 No data connection over the link: the target must be the other gateway's ftp service",
                )
                .await
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
        let listener = match crate::service::data_port::bind_data_port(
            local.ip(),
            self.service.config.passive_ports,
        ) {
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
        if !self
            .start_data(DataLeg::AcceptOn(listener), server_port)
            .await
        {
            return reply(client, "425 Too many data connections at once").await;
        }
        reply(client, &text).await
    }

    /// Offers the client, another gateway, a data connection over the link.
    async fn offer_link_data(&mut self, client: &mut Conn, server_port: u16) -> Result<(), String> {
        let peer = self.client_peer.as_deref().unwrap_or_default();
        let Some(offer) = self.service.ftp_data.offer(peer, &self.service.config.name) else {
            return reply(client, "425 Too many data connections waiting").await;
        };
        let text = format!("229 {}", ftp::format_epsv_reply(offer.ticket));
        if !self.start_data(DataLeg::FromLink(offer), server_port).await {
            return reply(client, "425 Too many data connections at once").await;
        }
        reply(client, &text).await
    }

    /// Starts one data connection between the client side `leg` and the
    /// server's passive `server_port` (a ticket when the server is across a
    /// link), in a task of its own; `false` when the session already has its
    /// most. A previous one still waiting for its client end is abandoned.
    async fn start_data(&mut self, leg: DataLeg, server_port: u16) -> bool {
        self.abandon_last.cancel();
        self.abandon_last = CancellationToken::new();
        let slot = match self.data_slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            // The abandoned one gives its slot back as soon as it runs.
            Err(_) => {
                match tokio::time::timeout(SLOT_WAIT, self.data_slots.clone().acquire_owned()).await
                {
                    Ok(Ok(slot)) => slot,
                    _ => return false,
                }
            }
        };
        let server = match &self.server {
            ServerSide::Tcp(host) => Hop::Direct(HostPort {
                host: host.clone(),
                port: server_port,
            }),
            ServerSide::Link { peer, service } => Hop::Link {
                peer: peer.clone(),
                service: data_stream_name(service, server_port),
            },
        };
        let connector = self.service.connector.clone();
        let client_ip = self.client_ip;
        let counters = self.counters.clone();
        let stop = self.stop.clone();
        let wait = self.service.config.connect_timeout.0;
        let idle = self.service.config.idle_timeout.0;
        let abandon = self.abandon_last.clone();
        let caps = self.caps.clone();
        tokio::spawn(async move {
            let _slot = slot;
            DataConnection {
                leg,
                client_ip,
                server,
                connector,
                wait,
                idle,
                counters,
                stop,
                abandon,
                caps,
            }
            .run()
            .await;
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::is_tls_feature;

    #[test]
    fn tls_features_are_recognised_in_feat_lines() {
        for line in [" AUTH TLS", " AUTH SSL", "PBSZ", " prot", "\tAUTH"] {
            assert!(is_tls_feature(line.as_bytes()), "{line}");
        }
        for line in [" EPSV", " MLST type*;size*;", " AUTHX", " SIZE", ""] {
            assert!(!is_tls_feature(line.as_bytes()), "{line}");
        }
    }
}
