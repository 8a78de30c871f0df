//! [`Inbound`]: a client connection as every service sees it, whether it
//! came from a TCP listener or (later) as a stream over an encrypted link.

use std::fmt;
use std::net::SocketAddr;

use crate::stream::Stream;

/// Who a client is before it logs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientId {
    /// A TCP client, by its source address.
    Addr(SocketAddr),
    /// A stream that arrived over the link from this `[[peer]]`.
    Peer(String),
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            ClientId::Addr(addr) => {
                // Show IPv4-mapped addresses as plain IPv4, as rules see them.
                let ip = crate::access::canonical(addr.ip());
                write!(f, "{}", SocketAddr::new(ip, addr.port()))
            }
            ClientId::Peer(name) => write!(f, "peer:{name}"),
        }
    }
}

/// A client connection handed to a service: the byte stream and who sent it.
///
/// Services must treat both origins alike; that is what lets any service be
/// projected into another office over a link.
pub struct Inbound {
    /// The client's bytes, both ways.
    pub stream: Stream,
    /// Who the client is.
    pub client: ClientId,
}

impl Inbound {
    /// The gateway's own address on a TCP connection (where BIND and UDP
    /// ASSOCIATE open their sockets); `None` for link streams. Asked of the
    /// socket only when needed: most connections never do.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.stream {
            Stream::Tcp(tcp) => tcp.local_addr().ok(),
            Stream::Boxed(_) => None,
        }
    }
}
