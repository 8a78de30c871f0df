//! Which TCP client each link stream this gateway opened carries.
//!
//! A mapping to `link://PEER/SERVICE` is byte-transparent: it does not know
//! that its client speaks SOCKS to the peer's socks service. When that
//! client asks for UDP ASSOCIATE, the peer needs a UDP port next to the
//! client — in this office — and asks this gateway for one, naming the
//! stream. Only a stream this gateway opened to that same peer, and still
//! serving a TCP client, gets a relay, and one at most.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// The TCP clients of our live link streams, by peer and stream number.
#[derive(Default)]
pub struct StreamClients {
    entries: Mutex<HashMap<(String, u32), Entry>>,
}

struct Entry {
    client: StreamClient,
    relayed: bool,
}

/// A client whose bytes one of our link streams carries.
#[derive(Clone, Debug)]
pub struct StreamClient {
    /// The service that opened the stream for it.
    pub service: Arc<str>,
    /// The client's address.
    pub client: SocketAddr,
    /// The address the client connected to (a relay for it listens on the
    /// same IP, which the client can reach).
    pub local: SocketAddr,
    /// Cancelled when the stream stops serving the client.
    pub ended: CancellationToken,
}

/// Keeps a stream's client registered; dropping it forgets the client and
/// ends whatever was started for it.
pub struct StreamClientGuard {
    links: Arc<super::Links>,
    key: (String, u32),
    ended: CancellationToken,
}

impl StreamClients {
    /// Registers `client` as carried by `stream` to `peer` while the guard
    /// lives.
    pub fn register(
        links: &Arc<super::Links>,
        peer: &str,
        stream: u32,
        service: Arc<str>,
        client: SocketAddr,
        local: SocketAddr,
    ) -> StreamClientGuard {
        let ended = CancellationToken::new();
        let key = (peer.to_string(), stream);
        let entry = Entry {
            client: StreamClient {
                service,
                client,
                local,
                ended: ended.clone(),
            },
            relayed: false,
        };
        links.stream_clients().lock().insert(key.clone(), entry);
        StreamClientGuard {
            links: links.clone(),
            key,
            ended,
        }
    }

    /// The client of our stream `stream` to `peer`, for a UDP relay; `None`
    /// when there is no such stream (or it has no TCP client) or it has a
    /// relay already.
    pub fn take_for_relay(&self, peer: &str, stream: u32) -> Option<StreamClient> {
        let mut entries = self.lock();
        let entry = entries.get_mut(&(peer.to_string(), stream))?;
        if entry.relayed {
            return None;
        }
        entry.relayed = true;
        Some(entry.client.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for StreamClientGuard {
    fn drop(&mut self) {
        self.ended.cancel();
        self.links.stream_clients().lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_gets_one_relay_while_its_client_is_registered() {
        let links = Arc::new(super::super::Links::default());
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:1080".parse().unwrap();
        let guard = StreamClients::register(&links, "hub", 7, "socks".into(), client, local);
        let clients = links.stream_clients();
        assert!(clients.take_for_relay("other", 7).is_none(), "another peer");
        assert!(clients.take_for_relay("hub", 9).is_none(), "another stream");
        let found = clients.take_for_relay("hub", 7).expect("registered");
        assert_eq!(found.client, client);
        assert!(clients.take_for_relay("hub", 7).is_none(), "a second relay");
        drop(guard);
        assert!(found.ended.is_cancelled());
        assert!(clients.lock().is_empty());
    }
}
