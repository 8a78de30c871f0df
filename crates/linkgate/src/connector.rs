//! [`Connector`]: turns a service's `target`/`via` chain into a connected
//! [`Stream`]. Every service reaches the outside through it, so cascading
//! behaves the same everywhere.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::{Hop, Host, HostPort, ServiceConfig};
use crate::links::Links;
use crate::stream::Stream;

/// Why an outbound connection could not be made. The `Display` text is what
/// goes into the audit record's `reason`.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The whole attempt took longer than `connect_timeout`.
    #[error("connecting to {0} timed out after {1:?}")]
    Timeout(String, Duration),
    /// The host name did not resolve.
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, io::Error),
    /// Every address of the destination refused or failed.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, io::Error),
    /// The link to the peer is not up.
    #[error("link to peer {0:?} is down")]
    LinkDown(String),
    /// The peer refused the stream.
    #[error("peer {0:?} refused: {1}")]
    LinkRefused(String, String),
    /// A proxy in the `via` chain refused or failed.
    #[error("via {0}: {1}")]
    Proxy(String, String),
    /// The chain uses a kind of hop this build cannot use yet.
    #[error("{0} hops are not available yet")]
    NotAvailable(&'static str),
}

impl ConnectError {
    /// The audit result of a connection that failed this way: `denied`
    /// when the other gateway refused the stream (its rules or limits, and
    /// its own record says `denied` too), `error` otherwise.
    pub fn audit_result(&self) -> crate::audit::AuditResult {
        match self {
            ConnectError::LinkRefused(..) => crate::audit::AuditResult::Denied,
            _ => crate::audit::AuditResult::Error,
        }
    }
}

/// Opens outbound connections for one service through its `via` chain.
///
/// `connect` is cancel safe: dropping its future closes any half-open socket
/// and leaves nothing behind.
#[derive(Clone)]
pub struct Connector {
    via: Vec<Hop>,
    connect_timeout: Duration,
    links: Arc<Links>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Connector").field("via", &self.via).finish()
    }
}

impl Connector {
    /// The connector of `service` (its `via` and `connect_timeout`), opening
    /// `link://` hops over `links`.
    pub fn for_service(service: &ServiceConfig, links: Arc<Links>) -> Self {
        Connector {
            via: service.via.clone(),
            connect_timeout: service.connect_timeout.0,
            links,
        }
    }

    /// A connector through `via` (may be empty), with `connect_timeout` for
    /// the whole chain; a link dialer reaches its hub with one.
    pub fn new(via: Vec<Hop>, connect_timeout: Duration, links: Arc<Links>) -> Self {
        Connector {
            via,
            connect_timeout,
            links,
        }
    }

    /// The `via` chain as shown in audit records (passwords masked); empty
    /// for direct connections.
    pub fn via_text(&self) -> String {
        let hops: Vec<String> = self.via.iter().map(Hop::to_string).collect();
        hops.join(",")
    }

    /// Connects to `target` (a `host:port` or `link://` hop), within the
    /// service's `connect_timeout` for the whole chain.
    pub async fn connect(&self, target: &Hop) -> Result<Stream, ConnectError> {
        // Boxed: a chain's handshakes make a large future, which would
        // otherwise stay inside every connection's task after connecting.
        let attempt = Box::pin(self.connect_chain(target));
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Timeout(
                target.to_string(),
                self.connect_timeout,
            )),
        }
    }

    async fn connect_chain(&self, target: &Hop) -> Result<Stream, ConnectError> {
        if let Some(first) = self.via.first() {
            // Validation guarantees: proxy hops only (a link:// one only
            // first), and a host:port target.
            let Hop::Direct(final_target) = target else {
                return Err(ConnectError::NotAvailable(target.scheme()));
            };
            let mut stream = match first {
                Hop::Socks4(addr)
                | Hop::Socks4a(addr)
                | Hop::Socks5(addr, _)
                | Hop::Http(addr, _) => connect_tcp(addr).await.map(Stream::Tcp)?,
                Hop::Link { peer, service } => self.open_link(peer, service).await?,
                Hop::Direct(_) => return Err(ConnectError::NotAvailable(first.scheme())),
            };
            for (i, hop) in self.via.iter().enumerate() {
                let next = match self.via.get(i + 1) {
                    Some(
                        Hop::Socks4(addr)
                        | Hop::Socks4a(addr)
                        | Hop::Socks5(addr, _)
                        | Hop::Http(addr, _),
                    ) => addr,
                    Some(other) => return Err(ConnectError::NotAvailable(other.scheme())),
                    None => final_target,
                };
                stream = crate::cascade::through(hop, stream, next).await?;
            }
            return Ok(stream);
        }
        match target {
            Hop::Direct(addr) => connect_tcp(addr).await.map(Stream::Tcp),
            Hop::Link { peer, service } => self.open_link(peer, service).await,
            other => Err(ConnectError::NotAvailable(other.scheme())),
        }
    }

    /// Opens a stream to `peer`'s `service`; fails at once if the link is down.
    async fn open_link(&self, peer: &str, service: &str) -> Result<Stream, ConnectError> {
        let session = self
            .links
            .session(peer)
            .ok_or_else(|| ConnectError::LinkDown(peer.to_string()))?;
        match session.open(service).await {
            Ok(stream) => Ok(Stream::Boxed(Box::new(stream))),
            Err(link::session::OpenError::Refused(reason)) => {
                Err(ConnectError::LinkRefused(peer.to_string(), reason))
            }
            Err(link::session::OpenError::LinkDown(_)) => {
                Err(ConnectError::LinkDown(peer.to_string()))
            }
        }
    }
}

/// Resolves `addr` and connects to each of its addresses in turn until one
/// accepts; sets `TCP_NODELAY` so small writes are not delayed.
pub async fn connect_tcp(addr: &HostPort) -> Result<TcpStream, ConnectError> {
    let candidates: Vec<SocketAddr> = match &addr.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, addr.port)],
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), addr.port))
            .await
            .map_err(|e| ConnectError::Resolve(name.clone(), e))?
            .collect(),
    };
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "the name has no addresses");
    for candidate in candidates {
        match TcpStream::connect(candidate).await {
            Ok(stream) => {
                // Failure to set NODELAY only costs latency; not worth failing the connection.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last_error = e,
        }
    }
    Err(ConnectError::Connect(addr.to_string(), last_error))
}
