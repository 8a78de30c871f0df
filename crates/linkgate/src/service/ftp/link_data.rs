//! FTP data connections over links.
//!
//! When an FTP session's client is another gateway (a stream from a peer, for
//! that gateway's ftp service with a `link://` target), neither side can
//! reach the other's data ports. The near gateway then asks for a data
//! connection with the private command [`LINK_DATA_VERB`]; this gateway
//! offers a ticket for it (answered as `229 Entering Extended Passive Mode
//! (|||TICKET|)`), and the near gateway opens a link stream named
//! [`data_stream_name`]`(service, ticket)`, which the dispatcher hands to the
//! session that offered it. Only the peer the ticket was offered to can claim
//! it (links authenticate their peers), and an unclaimed ticket expires with
//! the data connection that waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::stream::Stream;

/// The command a gateway sends another gateway's ftp service for a data
/// connection over their link ("eXtension: Link Data Port").
pub const LINK_DATA_VERB: &str = "XLDP";

/// What separates the service name from the ticket in a data stream's name;
/// service names cannot contain it.
const DATA_STREAM_MARK: &str = "/ftp-data/";

/// The name a data stream for `ticket` of `service` is opened with.
pub fn data_stream_name(service: &str, ticket: u16) -> String {
    format!("{service}{DATA_STREAM_MARK}{ticket}")
}

/// The service and ticket of a data stream's name; `None` for any other
/// stream (which names a service only).
pub fn parse_data_stream_name(name: &str) -> Option<(&str, u16)> {
    let (service, ticket) = name.split_once(DATA_STREAM_MARK)?;
    Some((service, ticket.parse().ok().filter(|&t| t != 0)?))
}

/// Tries at picking a free ticket before giving up (the space is only full
/// when a peer has tens of thousands of transfers waiting).
const TICKET_TRIES: usize = 32;

#[derive(Clone, PartialEq, Eq, Hash)]
struct SlotKey {
    peer: String,
    service: String,
    ticket: u16,
}

/// Data connections offered to peers and not claimed yet, gateway-wide (so
/// a reload does not lose the ones being set up).
#[derive(Default)]
pub struct LinkDataSlots {
    pending: Mutex<HashMap<SlotKey, oneshot::Sender<Stream>>>,
}

impl std::fmt::Debug for LinkDataSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let waiting = self.pending.lock().map_or(0, |p| p.len());
        f.debug_struct("LinkDataSlots")
            .field("waiting", &waiting)
            .finish()
    }
}

/// A data connection offered to a peer: its ticket, and the stream once the
/// peer opens it. Dropping the offer withdraws it.
pub struct Offer {
    /// The number the peer names its data stream with.
    pub ticket: u16,
    registry: Arc<LinkDataSlots>,
    key: SlotKey,
    stream: Option<oneshot::Receiver<Stream>>,
}

impl LinkDataSlots {
    /// Offers `peer` a data connection of `service`; `None` if no ticket is
    /// free.
    pub fn offer(self: &Arc<Self>, peer: &str, service: &str) -> Option<Offer> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..TICKET_TRIES {
            let ticket = rand::random::<u16>();
            let key = SlotKey {
                peer: peer.to_string(),
                service: service.to_string(),
                ticket,
            };
            if ticket == 0 || pending.contains_key(&key) {
                continue;
            }
            let (sender, receiver) = oneshot::channel();
            pending.insert(key.clone(), sender);
            return Some(Offer {
                ticket,
                registry: self.clone(),
                key,
                stream: Some(receiver),
            });
        }
        None
    }

    /// Hands `stream`, opened by `peer` for `ticket` of `service`, to the
    /// session that offered it; gives it back if no such offer is waiting.
    pub fn claim(
        &self,
        peer: &str,
        service: &str,
        ticket: u16,
        stream: Stream,
    ) -> Result<(), Stream> {
        let key = SlotKey {
            peer: peer.to_string(),
            service: service.to_string(),
            ticket,
        };
        let sender = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        match sender {
            Some(sender) => sender.send(stream),
            None => Err(stream),
        }
    }

    /// Whether `peer` has been offered `ticket` of `service` and not used it.
    pub fn is_offered(&self, peer: &str, service: &str, ticket: u16) -> bool {
        let key = SlotKey {
            peer: peer.to_string(),
            service: service.to_string(),
            ticket,
        };
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&key)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Offer {
    /// Waits for the peer's stream; an error if the offer was dropped from
    /// the registry without one.
    pub async fn stream(mut self) -> std::io::Result<Stream> {
        let receiver = self.stream.take().expect("an offer is awaited once");
        receiver.await.map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the data connection offer was withdrawn",
            )
        })
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        let mut pending = self
            .registry
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pending.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_round_trip_and_other_names_are_not_data() {
        assert_eq!(data_stream_name("ftp", 4711), "ftp/ftp-data/4711");
        assert_eq!(
            parse_data_stream_name("ftp/ftp-data/4711"),
            Some(("ftp", 4711))
        );
        assert_eq!(parse_data_stream_name("ftp"), None);
        assert_eq!(parse_data_stream_name("ftp/ftp-data/0"), None);
        assert_eq!(parse_data_stream_name("ftp/ftp-data/70000"), None);
        assert_eq!(parse_data_stream_name("ftp/ftp-data/x"), None);
    }

    #[tokio::test]
    async fn only_the_offered_peer_claims_and_a_dropped_offer_is_withdrawn() {
        let slots = Arc::new(LinkDataSlots::default());
        let offer = slots.offer("spoke", "ftp").unwrap();
        let ticket = offer.ticket;
        let (mine, _theirs) = tokio::io::duplex(64);
        let stream = Stream::Boxed(Box::new(mine));
        // Another peer, another service or another ticket: refused.
        let stream = slots.claim("other", "ftp", ticket, stream).unwrap_err();
        let stream = slots.claim("spoke", "web", ticket, stream).unwrap_err();
        let stream = slots
            .claim("spoke", "ftp", ticket.wrapping_add(1), stream)
            .unwrap_err();
        assert!(slots.is_offered("spoke", "ftp", ticket));
        assert!(slots.claim("spoke", "ftp", ticket, stream).is_ok());
        assert!(offer.stream().await.is_ok());
        assert_eq!(slots.len(), 0);

        let withdrawn = slots.offer("spoke", "ftp").unwrap();
        let ticket = withdrawn.ticket;
        drop(withdrawn);
        assert_eq!(slots.len(), 0);
        let (mine, _theirs) = tokio::io::duplex(64);
        assert!(slots
            .claim("spoke", "ftp", ticket, Stream::Boxed(Box::new(mine)))
            .is_err());
    }
}
