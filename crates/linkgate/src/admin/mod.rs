//! The admin HTTP endpoint (`[gateway] admin`): the operator's console at
//! `/` (a page that draws itself from `/api/status`), JSON at `/api/status`
//! (what `linkgate status` prints), Prometheus text at `/metrics`.
//! Read-only. With `admin_users`, every path needs HTTP Basic login as one
//! of those `[[user]]`s; without it the endpoint must be on loopback.

mod console;
mod history;
mod prometheus;
mod server;

pub use history::{History, Sample};
pub use server::start;

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::links::Links;
use crate::metrics::MetricsSnapshot;
use crate::service::ServiceRuntime;

/// The services table the gateway keeps (swapped on reload).
pub type ServiceTable =
    Arc<std::sync::RwLock<std::collections::HashMap<String, Arc<ServiceRuntime>>>>;

/// Services a reload could not start, by name: their configuration and why.
pub type FailedServices = Arc<
    std::sync::Mutex<std::collections::HashMap<String, (crate::config::ServiceConfig, String)>>,
>;

/// What the admin endpoint reports on.
#[derive(Clone)]
pub struct AdminState {
    /// This gateway's name.
    pub gateway: String,
    /// The running services.
    pub services: ServiceTable,
    /// Services that failed to start on the last reload.
    pub failed: FailedServices,
    /// Live links.
    pub links: Arc<Links>,
    /// Configured peers.
    pub peers: Vec<PeerInfo>,
    /// When the gateway started.
    pub started: Instant,
    /// The connections being served.
    pub connections: Arc<crate::connections::Registry>,
    /// Traffic samples of the last minutes.
    pub history: Arc<History>,
    /// Who may log in (`admin_users`); None: no login (loopback only).
    pub login: Option<AdminLogin>,
}

/// `admin_users`: the `[[user]]`s allowed in, checked against their passwords.
#[derive(Clone)]
pub struct AdminLogin {
    /// Accounts.
    pub users: Arc<crate::users::UserDb>,
    /// Names allowed into the admin endpoint.
    pub allowed: Vec<String>,
}

/// Most live connections listed in `/api/status` (newest first).
pub const MAX_LISTED_CONNECTIONS: usize = 500;

/// `/api/status`.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct Status {
    /// Gateway name.
    pub gateway: String,
    /// linkgate version.
    pub version: String,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Services, by name.
    pub services: Vec<ServiceStatus>,
    /// Links, by peer name.
    pub links: Vec<LinkStatus>,
    /// Connections being served, newest first (at most
    /// [`MAX_LISTED_CONNECTIONS`]).
    #[serde(default)]
    pub connections: Vec<crate::connections::ConnectionStatus>,
    /// How many connections are being served in all.
    #[serde(default)]
    pub connections_total: usize,
    /// Byte counters every few seconds over the last minutes, oldest first.
    #[serde(default)]
    pub history: Vec<Sample>,
    /// The latest refusals, failed logins and link changes, newest first.
    #[serde(default)]
    pub events: Vec<crate::events::Event>,
    /// Bandwidth caps in use (services', clients', users'), by name.
    #[serde(default)]
    pub caps: Vec<crate::limits::CapStatus>,
}

/// One service in `/api/status`.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct ServiceStatus {
    /// Name.
    pub name: String,
    /// mapping, socks, http, ftp or telnet.
    #[serde(rename = "type")]
    pub kind: String,
    /// Listen entries as configured.
    pub listen: Vec<String>,
    /// `running`, or `failed` (a reload could not start it; see `failure`).
    #[serde(default)]
    pub state: String,
    /// Why it is not running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Counters.
    #[serde(flatten)]
    pub counters: MetricsSnapshot,
}

/// What the admin page shows of a configured peer.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The peer's local name.
    pub name: String,
    /// Whether this gateway dials it.
    pub dials: bool,
    /// `password` or `key`: how the link authenticates.
    pub auth: &'static str,
    /// `bandwidth`: what this gateway paces its sending on the link to.
    pub bandwidth: Option<crate::limits::Bandwidth>,
}

/// One link in `/api/status`.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct LinkStatus {
    /// The peer's local name.
    pub peer: String,
    /// `dials` (we connect to it) or `accepts` (it connects to us).
    pub role: String,
    /// `up` or `down`.
    pub state: String,
    /// `password` (OPAQUE) or `key` (pinned public keys).
    #[serde(default)]
    pub auth: String,
    /// While up: `tcp`, `ws` or `wss`.
    #[serde(default)]
    pub transport: String,
    /// While up: the hub's address as dialed, or the dialer's source address.
    #[serde(default)]
    pub address: String,
    /// While up, on the dialing side: the proxy chain it went through
    /// (passwords masked); empty when direct.
    #[serde(default)]
    pub via: String,
    /// While up: fresh key exchanges done on the link so far.
    #[serde(default)]
    pub key_exchanges: u64,
    /// While up: datagrams that arrived on this session and were dropped
    /// because the gateway's datagram queue was full.
    #[serde(default)]
    pub datagrams_dropped: u64,
    /// While up: the smoothed round-trip time in milliseconds.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// While up: bytes sent and received on the wire by this session.
    #[serde(default)]
    pub bytes_sent: u64,
    /// See `bytes_sent`.
    #[serde(default)]
    pub bytes_received: u64,
    /// While up: streams open on the link.
    #[serde(default)]
    pub streams: usize,
    /// When the current state (up or down) began, seconds since the Unix
    /// epoch; absent before the first session.
    #[serde(default)]
    pub since: Option<f64>,
    /// How the last session ended (why it is down).
    #[serde(default)]
    pub last_end: Option<String>,
    /// Sessions after the first one.
    #[serde(default)]
    pub reconnects: u64,
    /// Wire bytes sent over every session of this link so far (the ended
    /// ones and the live one): a counter over the gateway's whole life.
    #[serde(default)]
    pub bytes_sent_total: u64,
    /// See `bytes_sent_total`.
    #[serde(default)]
    pub bytes_received_total: u64,
    /// `bandwidth`: the rate this gateway paces its sending to ("18Mbit/s").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<String>,
    /// The same in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_second: Option<u64>,
    /// Without `bandwidth`: the rate, in bytes per second, the link paces
    /// itself to right now (a slow path carrying interactive streams beside
    /// bulk ones), absent while it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pace_bytes_per_second: Option<u64>,
}

impl AdminState {
    /// The status now.
    pub fn status(&self) -> Status {
        let mut services: Vec<ServiceStatus> = self
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| ServiceStatus {
                name: s.config.name.clone(),
                kind: s.config.kind.as_str().to_string(),
                listen: s.config.listen.iter().map(ToString::to_string).collect(),
                state: "running".into(),
                failure: None,
                counters: s.metrics.snapshot(),
            })
            .collect();
        for (name, (config, error)) in self.failed.lock().unwrap_or_else(|p| p.into_inner()).iter()
        {
            services.push(ServiceStatus {
                name: name.clone(),
                kind: config.kind.as_str().to_string(),
                listen: config.listen.iter().map(ToString::to_string).collect(),
                state: "failed".into(),
                failure: Some(error.clone()),
                counters: MetricsSnapshot::default(),
            });
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let links = self
            .peers
            .iter()
            .map(|peer| {
                let info = self.links.info(&peer.name);
                let session = self.links.session(&peer.name);
                let history = self.links.history(&peer.name);
                let stats = session.as_ref().map(|s| s.stats());
                LinkStatus {
                    rtt_ms: stats
                        .as_ref()
                        .and_then(|s| s.mux.srtt)
                        .map(|d| d.as_secs_f64() * 1000.0),
                    bytes_sent: stats.as_ref().map_or(0, |s| s.wire_sent),
                    bytes_received: stats.as_ref().map_or(0, |s| s.wire_received),
                    streams: stats.as_ref().map_or(0, |s| s.mux.streams),
                    datagrams_dropped: stats.as_ref().map_or(0, |s| s.datagrams_dropped),
                    since: history.since.map(unix_seconds),
                    last_end: history.last_end,
                    reconnects: history.sessions.saturating_sub(1),
                    bytes_sent_total: history.ended_bytes[0]
                        + stats.as_ref().map_or(0, |s| s.wire_sent),
                    bytes_received_total: history.ended_bytes[1]
                        + stats.as_ref().map_or(0, |s| s.wire_received),
                    bandwidth: peer.bandwidth.map(|b| b.to_string()),
                    bandwidth_bytes_per_second: peer.bandwidth.map(|b| b.bytes_per_second),
                    auto_pace_bytes_per_second: stats.as_ref().and_then(|s| s.auto_pace),
                    peer: peer.name.clone(),
                    role: if peer.dials { "dials" } else { "accepts" }.into(),
                    state: if info.is_some() { "up" } else { "down" }.into(),
                    auth: peer.auth.into(),
                    key_exchanges: session.map_or(0, |s| s.stats().key_exchanges),
                    transport: info
                        .as_ref()
                        .map(|i| i.transport.to_string())
                        .unwrap_or_default(),
                    address: info.as_ref().map(|i| i.address.clone()).unwrap_or_default(),
                    via: info.map(|i| i.via).unwrap_or_default(),
                }
            })
            .collect();
        let (connections, connections_total) = self.connections.snapshot(MAX_LISTED_CONNECTIONS);
        Status {
            caps: self.caps(),
            gateway: self.gateway.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: self.started.elapsed().as_secs(),
            services,
            links,
            connections,
            connections_total,
            history: self.history.samples(),
            events: crate::events::recent(),
        }
    }

    /// The bandwidth caps in use, sorted by name.
    fn caps(&self) -> Vec<crate::limits::CapStatus> {
        let now = Instant::now();
        let services = self.services.read().unwrap_or_else(|p| p.into_inner());
        let mut caps: Vec<Arc<crate::limits::Cap>> =
            services.values().flat_map(|s| s.caps()).collect();
        // Users' caps are gateway-wide: any service sees the same table.
        if let Some(service) = services.values().next() {
            caps.extend(service.user_caps());
        }
        let mut caps: Vec<_> = caps.iter().map(|c| c.status(now)).collect();
        caps.sort_by(|a, b| a.name.cmp(&b.name));
        caps.dedup_by(|a, b| a.name == b.name);
        caps
    }

    /// The byte counters now, for the history ring.
    pub fn sample(&self) -> Sample {
        let services = self
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| {
                let c = s.metrics.snapshot();
                (s.config.name.clone(), [c.bytes_up, c.bytes_down])
            })
            .collect();
        let links = self
            .peers
            .iter()
            .filter_map(|p| {
                let stats = self.links.session(&p.name)?.stats();
                Some((p.name.clone(), [stats.wire_sent, stats.wire_received]))
            })
            .collect();
        Sample {
            t: unix_seconds(std::time::SystemTime::now()),
            services,
            links,
        }
    }
}

fn unix_seconds(at: std::time::SystemTime) -> f64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
