//! The services: what happens to a client connection once it is admitted.
//! One module per service type; [`ServiceRuntime`] holds what they share.

mod abortable;
pub mod busy;
mod data_port;
mod ftp;
mod http_proxy;
mod lockstep;
mod mapping;
pub mod socks;
mod telnet;
pub mod udp;
pub mod udp_batch;

pub use ftp::{data_stream_name, parse_data_stream_name, LinkDataSlots, Offer};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::access::{AccessList, Destinations};
use crate::audit::Audit;
use crate::config::{ServiceConfig, ServiceKind};
use crate::connector::Connector;
use crate::inbound::Inbound;
use crate::links::Links;
use crate::users::UserDb;

/// A configured service, ready to serve connections.
#[derive(Debug)]
pub struct ServiceRuntime {
    /// The service's configuration as loaded.
    pub config: ServiceConfig,
    /// The name, shared with every audit record.
    pub name: Arc<str>,
    /// `allow`/`deny`.
    pub access: AccessList,
    /// `destinations`.
    pub destinations: Destinations,
    /// The outbound chain.
    pub connector: Connector,
    /// The chain as written in audit records.
    pub via_text: Arc<str>,
    /// Accounts for `auth = "password"`.
    pub users: Arc<UserDb>,
    /// Counters for the admin page (kept across reloads).
    pub metrics: Arc<crate::metrics::ServiceMetrics>,
    /// The gateway's live connections (the console's list).
    pub connections: Arc<crate::connections::Registry>,
    /// FTP data connections offered to peers, gateway-wide.
    pub ftp_data: Arc<ftp::LinkDataSlots>,
    slots: Arc<Semaphore>,
    per_client: Arc<PerClient>,
    /// `bandwidth`: one cap for all the service's clients.
    service_cap: Option<Arc<crate::limits::Cap>>,
    /// `client_bandwidth`: a cap per client, while it has connections.
    client_caps: Arc<crate::limits::CapTable>,
    /// `[[user]] bandwidth`, gateway-wide.
    user_caps: Arc<crate::limits::UserCaps>,
    /// Live links: udp flows to `link://` targets.
    pub links: Arc<Links>,
    /// udp: the flows peers opened to this service over links.
    pub udp_link_flows: udp::LinkFlows,
    /// socks: the UDP associations peers opened over links.
    pub socks_link_flows: socks::link_udp::SocksLinkFlows,
    /// Cancelled when the service stops (reload, shutdown); set once it
    /// starts. Ends its udp flows that came over links.
    stopped: std::sync::OnceLock<CancellationToken>,
}

/// Connections being served per client (source address, or `peer:NAME`),
/// for `max_connections_per_client`.
#[derive(Debug, Default)]
struct PerClient {
    counts: Mutex<HashMap<String, u32>>,
}

/// One connection counted against its client's limit until dropped.
#[derive(Debug)]
pub struct ClientSlot {
    table: Arc<PerClient>,
    key: String,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// What an admitted connection holds: its place in `max_connections` and,
/// with `max_connections_per_client`, in its client's share.
#[derive(Debug)]
pub struct Admitted {
    _slot: OwnedSemaphorePermit,
    _client: Option<ClientSlot>,
    /// The service's and the client's bandwidth caps.
    pub caps: crate::limits::Caps,
}

/// What every service shares with the rest of the gateway.
#[derive(Clone)]
pub struct SharedContext {
    /// Live links, for `link://` hops.
    pub links: Arc<Links>,
    /// `[[user]]` accounts.
    pub users: Arc<UserDb>,
    /// FTP data connections offered to peers; one registry for the
    /// gateway's whole life, so a reload keeps those being set up.
    pub ftp_data: Arc<ftp::LinkDataSlots>,
    /// The live connections, for the gateway's whole life.
    pub connections: Arc<crate::connections::Registry>,
    /// Services' counters by name, for the gateway's whole life.
    pub metrics: Arc<crate::metrics::MetricsBook>,
    /// `[[user]] bandwidth` caps.
    pub user_caps: Arc<crate::limits::UserCaps>,
}

impl ServiceRuntime {
    /// Builds the runtime of one validated service configuration.
    pub fn new(config: ServiceConfig, shared: &SharedContext) -> Arc<Self> {
        Self::build(config, shared, None)
    }

    /// The runtime of a service restarted by a reload with `config`. What
    /// its live connections count against carries over from `previous`
    /// where the setting did not change — the `bandwidth` cap, the
    /// per-client caps, the connection slots — so that a reload hands no
    /// one a fresh allowance beside the one still in use.
    pub fn succeeding(
        config: ServiceConfig,
        shared: &SharedContext,
        previous: &ServiceRuntime,
    ) -> Arc<Self> {
        Self::build(config, shared, Some(previous))
    }

    fn build(
        config: ServiceConfig,
        shared: &SharedContext,
        previous: Option<&ServiceRuntime>,
    ) -> Arc<Self> {
        let same = |setting: fn(&ServiceConfig) -> String| {
            previous.filter(|p| setting(&p.config) == setting(&config))
        };
        let slots = same(|c| c.max_connections.to_string()).map_or_else(
            || Arc::new(Semaphore::new(config.max_connections as usize)),
            |p| p.slots.clone(),
        );
        let per_client = same(|c| format!("{:?}", c.max_connections_per_client))
            .map_or_else(Arc::default, |p| p.per_client.clone());
        let service_cap = match same(|c| format!("{:?}", c.bandwidth)) {
            Some(p) => p.service_cap.clone(),
            None => config.bandwidth.map(|rate| {
                crate::limits::Cap::new(
                    format!("service {}", config.name),
                    rate,
                    std::time::Instant::now(),
                )
            }),
        };
        // The table makes a new cap for a client whose rate changed.
        let client_caps = previous.map_or_else(Arc::default, |p| p.client_caps.clone());
        let connector = Connector::for_service(&config, shared.links.clone());
        Arc::new(ServiceRuntime {
            name: config.name.as_str().into(),
            access: AccessList::for_service(&config),
            destinations: Destinations::for_service(&config),
            via_text: connector.via_text().into(),
            connector,
            users: shared.users.clone(),
            metrics: shared.metrics.for_service(&config.name),
            connections: shared.connections.clone(),
            ftp_data: shared.ftp_data.clone(),
            slots,
            per_client,
            service_cap,
            client_caps,
            user_caps: shared.user_caps.clone(),
            links: shared.links.clone(),
            udp_link_flows: udp::LinkFlows::default(),
            socks_link_flows: socks::link_udp::SocksLinkFlows::default(),
            stopped: std::sync::OnceLock::new(),
            config,
        })
    }

    /// Whether every `max_connections` slot is taken.
    pub fn slots_full(&self) -> bool {
        self.slots.available_permits() == 0
    }

    /// Takes one of the service's `max_connections` slots, if any is free.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Admits one more connection from `client` within `max_connections`
    /// and `max_connections_per_client`; `Err` says which limit refused it.
    pub fn admit(&self, client: &crate::inbound::ClientId) -> Result<Admitted, String> {
        let slot = self
            .try_slot()
            .ok_or_else(|| format!("max_connections ({}) reached", self.config.max_connections))?;
        // A source address, not address and port: one machine.
        let key = match client {
            crate::inbound::ClientId::Addr(addr) => addr.ip().to_string(),
            peer => peer.to_string(),
        };
        let client_slot = match self.config.max_connections_per_client {
            None => None,
            Some(limit) => {
                let mut counts = self
                    .per_client
                    .counts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let count = counts.entry(key.clone()).or_default();
                if *count >= limit {
                    return Err(format!(
                        "max_connections_per_client ({limit}) reached for {key}"
                    ));
                }
                *count += 1;
                Some(ClientSlot {
                    table: self.per_client.clone(),
                    key: key.clone(),
                })
            }
        };
        let mut caps = crate::limits::Caps::with_users(self.user_caps.clone());
        caps.push(self.service_cap.clone());
        caps.push(self.config.client_bandwidth.map(|rate| {
            self.client_caps
                .get(&key, || format!("client {key} on {}", self.name), rate)
        }));
        Ok(Admitted {
            _slot: slot,
            _client: client_slot,
            caps,
        })
    }

    /// Records the token that is cancelled when the service stops.
    pub fn set_stop(&self, stop: CancellationToken) {
        let _ = self.stopped.set(stop);
    }

    /// The token cancelled when the service stops (a fresh one, never
    /// cancelled, before it started).
    pub fn udp_stop(&self) -> CancellationToken {
        self.stopped.get().cloned().unwrap_or_default()
    }

    /// The service's bandwidth caps in use: its own and its clients'.
    pub fn caps(&self) -> Vec<Arc<crate::limits::Cap>> {
        let mut caps: Vec<_> = self.service_cap.iter().cloned().collect();
        caps.extend(self.client_caps.live());
        caps
    }

    /// The users' bandwidth caps in use, gateway-wide.
    pub fn user_caps(&self) -> Vec<Arc<crate::limits::Cap>> {
        self.user_caps.live()
    }

    /// Serves one admitted client until it is done, filling in `audit`.
    /// `stop` is cancelled when the gateway's shutdown grace period is over.
    pub async fn serve(&self, inbound: Inbound, audit: &mut Audit, stop: &CancellationToken) {
        match self.config.kind {
            // The protocol services' futures are large (handshake buffers,
            // hyper's connection state); boxed, they cost their size only to
            // their own connections, not to every idle mapped one.
            ServiceKind::Mapping => mapping::serve(self, inbound, audit, stop).await,
            ServiceKind::Socks => Box::pin(socks::serve(self, inbound, audit, stop)).await,
            ServiceKind::Http => Box::pin(http_proxy::serve(self, inbound, audit, stop)).await,
            ServiceKind::Telnet => Box::pin(telnet::serve(self, inbound, audit, stop)).await,
            ServiceKind::Ftp => Box::pin(ftp::serve(self, inbound, audit, stop)).await,
            // Its datagrams are served by `udp::serve_socket`; a byte
            // stream (from a peer that named it) has nothing to go to.
            ServiceKind::Udp => audit.finish(
                crate::audit::AuditResult::Denied,
                "a udp service takes datagrams, not streams",
            ),
        }
    }
}

/// Applies the service's `destinations` to `target`; names are resolved
/// first when a rule is a network. `Err` says why it is refused.
pub(crate) async fn check_destination(
    service: &ServiceRuntime,
    target: &crate::config::HostPort,
) -> Result<(), String> {
    use crate::config::Host;
    let resolved: Vec<std::net::IpAddr> =
        match (&target.host, service.destinations.needs_resolution()) {
            (Host::Name(name), true) => tokio::net::lookup_host((name.as_str(), target.port))
                .await
                .map(|addrs| addrs.map(|a| a.ip()).collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
    if service
        .destinations
        .allows(&target.host, target.port, &resolved)
    {
        Ok(())
    } else {
        Err(format!(
            "destination {target} is not in the service's destinations"
        ))
    }
}

/// Reads a destination a person typed: `host`, `host port`, `host:port` or
/// `[v6]:port`; `default_port` when none is given.
pub(crate) fn parse_destination(
    answer: &str,
    default_port: u16,
) -> Result<crate::config::HostPort, String> {
    let bad = || format!("cannot read {answer:?}: write host, host port or host:port");
    let mut words = answer.split_whitespace();
    let (host, port) = match (words.next(), words.next(), words.next()) {
        (None, ..) => return Err("no destination given".into()),
        (Some(host), Some(port), None) => (host, port.parse::<u16>().map_err(|_| bad())?),
        (Some(one), None, None) => {
            if let Ok(target) = one.parse::<crate::config::HostPort>() {
                return Ok(target);
            }
            (one, default_port)
        }
        _ => return Err(bad()),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let joined = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        _ => format!("{host}:{port}"),
    };
    joined.parse().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::parse_destination;

    #[test]
    fn destination_forms() {
        let read = |text: &str| parse_destination(text, 23).map(|t| t.to_string());
        assert_eq!(read("example.com").unwrap(), "example.com:23");
        assert_eq!(read("example.com 2323").unwrap(), "example.com:2323");
        assert_eq!(read("example.com:2323").unwrap(), "example.com:2323");
        assert_eq!(read("10.0.0.1").unwrap(), "10.0.0.1:23");
        assert_eq!(read("::1 23").unwrap(), "[::1]:23");
        assert_eq!(read("[::1]:2323").unwrap(), "[::1]:2323");
        assert_eq!(read("::1").unwrap(), "[::1]:23");
        assert!(read("").is_err());
        assert!(read("a b c").is_err());
        assert!(read("host port").is_err());
        assert!(read("bad_host!").is_err());
    }
}
