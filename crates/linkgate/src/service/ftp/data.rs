//! One data connection: the client's end (accepted or connected to) and the
//! server's passive port, relayed until both close.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::link_data::Offer;
use super::session::Counters;
use crate::config::Hop;
use crate::connector::Connector;
use crate::relay::relay;
use crate::stream::Stream;

/// Everything one data connection needs, owned: it runs in a task of its own.
pub(super) struct DataConnection {
    pub(super) leg: DataLeg,
    /// The client's address: the only one a passive port accepts.
    pub(super) client_ip: Option<IpAddr>,
    /// The server's passive port, or the data stream over the link to the
    /// gateway the server is behind.
    pub(super) server: Hop,
    /// The service's connector (its `via` chain).
    pub(super) connector: Connector,
    /// How long the client's end may take to appear.
    pub(super) wait: Duration,
    pub(super) idle: Duration,
    pub(super) counters: Arc<Counters>,
    /// The session's bandwidth caps.
    pub(super) caps: crate::limits::Caps,
    pub(super) stop: CancellationToken,
    /// Cancelled when the client asks for another data connection before
    /// this one's client end appeared (as servers do, the new one replaces
    /// it); ignored once both ends are open.
    pub(super) abandon: CancellationToken,
}

impl DataConnection {
    /// Opens both ends at once and relays until both close; the bytes go to
    /// the session's counters. Gives up quietly if either end fails: the
    /// server reports the failed transfer on the control connection.
    pub(super) async fn run(self) {
        let opening = tokio::time::timeout(self.wait, self.leg.open(self.client_ip));
        let client_side = async {
            tokio::select! {
                biased;
                () = self.abandon.cancelled() => None,
                opened = opening => opened.ok().and_then(Result::ok),
            }
        };
        let server_side = self.connector.connect(&self.server);
        let (Some(mut client_side), Ok(mut server_side)) = tokio::join!(client_side, server_side)
        else {
            return;
        };
        let outcome = relay(
            &mut client_side,
            &mut server_side,
            self.idle,
            &self.stop,
            None,
            &self.caps,
        )
        .await;
        outcome.pass_failure_on(&mut client_side, &mut server_side);
        self.counters
            .up
            .fetch_add(outcome.bytes_up, Ordering::Relaxed);
        self.counters
            .down
            .fetch_add(outcome.bytes_down, Ordering::Relaxed);
    }
}

/// How the client's end of a data connection is made.
pub(super) enum DataLeg {
    /// Passive: the client connects to this listener.
    AcceptOn(TcpListener),
    /// Active: the gateway connects to the client.
    ConnectTo(SocketAddr),
    /// Over a link: the client, another gateway, opens a stream for the
    /// offered ticket.
    FromLink(Offer),
}

impl DataLeg {
    async fn open(self, client_ip: Option<IpAddr>) -> std::io::Result<Stream> {
        match self {
            DataLeg::ConnectTo(addr) => TcpStream::connect(addr).await.map(Stream::Tcp),
            DataLeg::AcceptOn(listener) => loop {
                let (stream, peer) = listener.accept().await?;
                // Only the client itself may use its data port.
                if Some(crate::access::canonical(peer.ip())) == client_ip {
                    return Ok(Stream::Tcp(stream));
                }
            },
            DataLeg::FromLink(offer) => offer.stream().await,
        }
    }
}
