//! SOCKS5 UDP ASSOCIATE through SOCKS5 proxies: a SOCKS service whose `via`
//! has `socks5://` hops (after an optional first `link://` hop) asks each
//! of those proxies for a UDP relay, over a control connection that goes
//! through the hops before it and stays open for the association.
//!
//! A client's datagram (its SOCKS header names the destination) is wrapped
//! once more for each proxy: the outermost header names the first proxy's
//! relay and is read by the association's exit (this gateway, or the
//! peer's socks service over the link), which sends the rest there; each
//! proxy peels its header and sends the rest on to the next relay. Answers
//! come back wrapped the same way, each header naming the relay it came
//! from, and are unwrapped down to the header that names their sender.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;

use proto::socks::{self, v5consts as c, Address};
use tokio::io::{AsyncRead, ReadBuf};

use super::udp::Refusal;
use crate::config::{Hop, HostPort};
use crate::connector::Connector;
use crate::service::ServiceRuntime;
use crate::stream::Stream;

/// The proxies' UDP relays an association's datagrams go through, in order.
pub(super) struct ProxyRelays {
    relays: Vec<ProxyRelay>,
}

struct ProxyRelay {
    /// The hop as configured (without its password), for messages.
    hop: String,
    /// Where the proxy receives datagrams, as the hop before it sees it.
    relay: Address,
    /// The association lasts as long as this connection.
    control: Stream,
}

impl ProxyRelays {
    /// Asks each `socks5://` hop of `via` after `start` for a UDP relay,
    /// all within the service's `connect_timeout`. Other hop kinds cannot
    /// carry datagrams and are refused.
    pub(super) async fn open(
        service: &ServiceRuntime,
        via: &[Hop],
        start: usize,
    ) -> Result<ProxyRelays, Refusal> {
        for hop in &via[start..] {
            if !matches!(hop, Hop::Socks5(..)) {
                return Err((
                    c::REPLY_COMMAND_NOT_SUPPORTED,
                    format!("UDP ASSOCIATE cannot go through {hop}: only socks5:// hops relay UDP"),
                ));
            }
        }
        let timeout = service.config.connect_timeout.0;
        let opening = async {
            let mut relays = Vec::new();
            for (i, hop) in via.iter().enumerate().skip(start) {
                let Hop::Socks5(address, _) = hop else {
                    unreachable!("checked above")
                };
                relays.push(open_relay(service, &via[..i], hop, address).await?);
            }
            Ok(ProxyRelays { relays })
        };
        match tokio::time::timeout(timeout, opening).await {
            Ok(result) => result,
            Err(_) => Err((
                c::REPLY_TTL_EXPIRED,
                format!("the proxies' UDP relays were not set up within {timeout:?}"),
            )),
        }
    }

    /// Where the exit sends the first wrapped datagram: the first proxy's
    /// relay, or `None` without proxies.
    pub(super) fn first_relay(&self) -> Option<&Address> {
        self.relays.first().map(|relay| &relay.relay)
    }

    /// `datagram` (the client's, its header naming the destination) wrapped
    /// for every proxy after the first: what the exit sends to the first
    /// proxy's relay.
    pub(super) fn wrap(&self, datagram: &[u8]) -> Option<Vec<u8>> {
        let mut wrapped = Vec::with_capacity(datagram.len() + 22 * self.relays.len());
        for relay in self.relays.iter().skip(1) {
            socks::encode_udp_header(&relay.relay, &mut wrapped).ok()?;
        }
        wrapped.extend_from_slice(datagram);
        Some(wrapped)
    }

    /// Where the answer's datagram for the client starts in `answer` (what
    /// the first proxy's relay sent the exit), once each later proxy's
    /// header is peeled off; `None` if one names a sender other than the
    /// relay it should (somebody else's datagram: dropped).
    pub(super) fn unwrap(&self, answer: &[u8]) -> Option<usize> {
        let mut at = 0;
        for relay in self.relays.iter().skip(1) {
            let (header, len) = socks::parse_udp_header(&answer[at..]).ok()?;
            if header.fragment != 0 || !same_address(&header.address, &relay.relay) {
                return None;
            }
            at += len;
        }
        Some(at)
    }

    /// Resolves when a proxy closed its control connection (its relay is
    /// gone), with why; never without proxies.
    pub(super) async fn closed(&mut self) -> String {
        let mut scratch = [0u8; 64];
        poll_fn(|cx| {
            for relay in &mut self.relays {
                loop {
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut relay.control).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                            return Poll::Ready(format!(
                                "the proxy {} closed the UDP association",
                                relay.hop
                            ))
                        }
                        // Nothing is due on a control connection: ignored.
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(e)) => {
                            return Poll::Ready(format!(
                                "the proxy {}'s control connection: {e}",
                                relay.hop
                            ))
                        }
                        Poll::Pending => break,
                    }
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// Connects to the proxy `hop` at `address` through `before` (the hops in
/// front of it) and asks it for a UDP relay.
async fn open_relay(
    service: &ServiceRuntime,
    before: &[Hop],
    hop: &Hop,
    address: &HostPort,
) -> Result<ProxyRelay, Refusal> {
    let connector = Connector::new(
        before.to_vec(),
        service.config.connect_timeout.0,
        service.links.clone(),
    );
    let failed = |e: crate::connector::ConnectError| (super::reply_code(&e), e.to_string());
    let mut control = connector
        .connect(&Hop::Direct(address.clone()))
        .await
        .map_err(failed)?;
    let bound = crate::cascade::udp_associate(hop, &mut control)
        .await
        .map_err(failed)?;
    // "Send to me": a proxy that binds every address names none.
    let relay = match bound {
        Address::Ip(addr) if addr.ip().is_unspecified() => {
            match crate::cascade::address_of(address) {
                Address::Ip(proxy) => Address::Ip(SocketAddr::new(proxy.ip(), addr.port())),
                Address::Domain(name, _) => Address::Domain(name, addr.port()),
            }
        }
        other => other,
    };
    Ok(ProxyRelay {
        hop: hop.to_string(),
        relay,
        control,
    })
}

/// Whether a header's sender is `relay` (IPv4-mapped addresses compared as
/// IPv4; a relay known by name matches any sender, which the hop in front
/// of it already checked against where it sent).
pub(super) fn same_address(sender: &Address, relay: &Address) -> bool {
    match (sender, relay) {
        (Address::Ip(sender), Address::Ip(relay)) => {
            crate::access::canonical(sender.ip()) == crate::access::canonical(relay.ip())
                && sender.port() == relay.port()
        }
        (_, Address::Domain(..)) => true,
        (sender, relay) => sender == relay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_match_relays_across_address_forms() {
        let relay = Address::Ip("127.0.0.1:4000".parse().unwrap());
        let mapped = Address::Ip("[::ffff:127.0.0.1]:4000".parse().unwrap());
        let other_port = Address::Ip("127.0.0.1:4001".parse().unwrap());
        assert!(same_address(&mapped, &relay));
        assert!(!same_address(&other_port, &relay));
        assert!(same_address(
            &other_port,
            &Address::Domain("proxy".into(), 4000)
        ));
    }
}
