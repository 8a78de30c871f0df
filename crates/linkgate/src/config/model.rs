//! The configuration file's schema (DESIGN §2), as serde structs. Every table
//! rejects unknown keys; defaults are the functions named in `serde(default)`.

use std::path::PathBuf;

use serde::Deserialize;

use crate::limits::Bandwidth;

use super::values::{
    one_or_many, AccessRule, ConfigDuration, DestinationRule, Hop, HostPort, LinkAddress, Listen,
    PortRange, Secret,
};

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[gateway]`: this gateway's identity, logging and admin page.
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// `[link]`: where encrypted links from peers are accepted.
    pub link: Option<LinkConfig>,
    /// `[[peer]]`: other gateways.
    #[serde(default)]
    pub peer: Vec<PeerConfig>,
    /// `[[user]]`: people who authenticate to proxy services.
    #[serde(default)]
    pub user: Vec<UserConfig>,
    /// `[[service]]`: the proxy services.
    #[serde(default)]
    pub service: Vec<ServiceConfig>,
}

/// How log records are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; audit records are `key=value` pairs.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[gateway]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Name in logs and link handshakes; default: the host name.
    pub name: Option<String>,
    /// File with this gateway's long-term secret keys; default `linkgate.key`.
    #[serde(default = "default_identity")]
    pub identity: PathBuf,
    /// `text` (default) or `json`.
    #[serde(default)]
    pub log: LogFormat,
    /// Address of the HTTP status page and API; default: none.
    pub admin: Option<HostPort>,
    /// `[[user]]`s allowed into the admin endpoint (HTTP Basic); required
    /// when `admin` is not a loopback address.
    #[serde(default, deserialize_with = "one_or_many")]
    pub admin_users: Vec<String>,
    /// How long live connections may take to finish after SIGINT/SIGTERM
    /// before they are closed; default 30s. (Extension of the contract.)
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: ConfigDuration,
    /// Worker threads; default: one per CPU core. (Extension of the contract.)
    /// (Read as any integer so that a wrong value gets a plain message
    /// from validation, not serde's "expected u16".)
    pub threads: Option<i64>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            name: None,
            identity: default_identity(),
            log: LogFormat::Text,
            admin: None,
            admin_users: Vec::new(),
            shutdown_grace: default_shutdown_grace(),
            threads: None,
        }
    }
}

fn default_identity() -> PathBuf {
    PathBuf::from("linkgate.key")
}

fn default_shutdown_grace() -> ConfigDuration {
    ConfigDuration(std::time::Duration::from_secs(30))
}

/// `[link]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Where peers' links are accepted: raw TCP, `ws://` (behind a
    /// TLS-terminating reverse proxy) and `wss://` entries, at once.
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<LinkAddress>,
    /// PEM certificate chain for `wss://` listeners.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `wss://` listeners.
    pub tls_key: Option<PathBuf>,
}

/// `[[peer]]`: another gateway, which we dial (`connect` set) or which dials us.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Our local name for that gateway; `peer:NAME` and `link://NAME/...` refer to it.
    pub name: String,
    /// Addresses to dial, tried in order (failover); empty on the accepting
    /// side. Raw TCP, `ws://` and `wss://` may be mixed.
    #[serde(default, deserialize_with = "one_or_many")]
    pub connect: Vec<LinkAddress>,
    /// Proxies to dial through, first hop first (socks4/4a/5, http CONNECT).
    #[serde(default, deserialize_with = "one_or_many")]
    pub via: Vec<Hop>,
    /// For `wss://` addresses: a PEM file of CAs to trust besides the system's.
    pub ca_file: Option<PathBuf>,
    /// For `wss://` addresses: check the hub's certificate (default). The
    /// link's own handshake authenticates the hub either way.
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// The name the other side knows us by; default: `gateway.name`.
    pub user: Option<String>,
    /// The link password, written in the file.
    pub password: Option<Secret>,
    /// Name of an environment variable holding the link password.
    pub password_env: Option<String>,
    /// File holding the link password (first line).
    pub password_file: Option<PathBuf>,
    /// Registration record from `linkgate peer-record` (accepting side only).
    pub record: Option<Secret>,
    /// Key mode instead of a password: that gateway's public key, as
    /// `linkgate public-key` prints it there. (Extension of the contract.)
    pub public_key: Option<String>,
    /// Probe the link this often; it is declared down after three
    /// keepalive intervals without a word from the other side.
    #[serde(default = "default_keepalive")]
    pub keepalive: ConfigDuration,
    /// Streams at once on the link to that gateway (both directions); more
    /// are refused. Bounds what an authenticated peer can make us hold.
    /// (Extension of the contract.)
    #[serde(default = "default_max_streams")]
    pub max_streams: u32,
    /// Pace what this gateway sends over the link to this rate; set just
    /// below the WAN uplink so that the link's scheduler, not the modem's
    /// buffer, decides what waits.
    pub bandwidth: Option<Bandwidth>,
}

fn default_true() -> bool {
    true
}

fn default_max_streams() -> u32 {
    256
}

fn default_keepalive() -> ConfigDuration {
    ConfigDuration(std::time::Duration::from_secs(5))
}

/// `[[user]]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The login name.
    pub name: String,
    /// Argon2id PHC string from `linkgate passwd`.
    pub password_hash: Option<Secret>,
    /// The password in clear (discouraged).
    pub password: Option<Secret>,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// Cap on this user's traffic, each direction, all services together.
    pub bandwidth: Option<Bandwidth>,
}

/// The five kinds of service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// Fixed TCP mapping to `target`.
    Mapping,
    /// SOCKS4/4a/5 server.
    Socks,
    /// HTTP forward proxy with CONNECT.
    Http,
    /// FTP control-protocol proxy.
    Ftp,
    /// Telnet gateway that prompts for a destination.
    Telnet,
    /// UDP forwarding to `target`, a flow per client address and port.
    Udp,
}

impl ServiceKind {
    /// The word used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Mapping => "mapping",
            ServiceKind::Socks => "socks",
            ServiceKind::Http => "http",
            ServiceKind::Ftp => "ftp",
            ServiceKind::Telnet => "telnet",
            ServiceKind::Udp => "udp",
        }
    }

    /// Whether clients choose their destination (so it is a proxy that must
    /// not be left open to the world without authentication).
    pub fn is_open_proxy_kind(self) -> bool {
        !matches!(self, ServiceKind::Mapping | ServiceKind::Udp)
    }
}

/// Whether a service asks its clients to log in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No login.
    #[default]
    None,
    /// Clients authenticate as a `[[user]]`.
    Password,
}

/// `[[service]]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name; peers address it as `link://<gateway>/<name>`.
    pub name: String,
    /// What the service does.
    #[serde(rename = "type")]
    pub kind: ServiceKind,
    /// TCP addresses and/or `"link"`.
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<Listen>,
    /// Fixed destination (mapping: required; ftp: optional).
    pub target: Option<Hop>,
    /// Outbound chain, first hop first.
    #[serde(default, deserialize_with = "one_or_many")]
    pub via: Vec<Hop>,
    /// Who may use the service; omitted means loopback clients only.
    #[serde(default, deserialize_with = "one_or_many_opt")]
    pub allow: Option<Vec<AccessRule>>,
    /// Who may not, even if allowed.
    #[serde(default, deserialize_with = "one_or_many")]
    pub deny: Vec<AccessRule>,
    /// Where clients may go (socks/http/ftp/telnet); omitted means anywhere.
    #[serde(default, deserialize_with = "one_or_many_opt")]
    pub destinations: Option<Vec<DestinationRule>>,
    /// `none` (default) or `password`.
    #[serde(default)]
    pub auth: AuthMode,
    /// Most simultaneous client connections; default 1024.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Most simultaneous connections from one client: one source address
    /// (TCP) or one peer (link streams); none by default.
    pub max_connections_per_client: Option<u32>,
    /// Cap on the service's traffic, each direction, all clients together.
    pub bandwidth: Option<Bandwidth>,
    /// Cap per client (source address, user or peer), each direction.
    pub client_bandwidth: Option<Bandwidth>,
    /// Time allowed to establish the outbound connection; default 10s.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: ConfigDuration,
    /// A connection with no traffic either way for this long is closed;
    /// default 2h (udp: a flow without datagrams either way, default 60s).
    /// Filled in by validation when not written.
    #[serde(default = "unset_duration")]
    pub idle_timeout: ConfigDuration,
    /// Time a client has to finish its protocol handshake; default 10s.
    /// (Extension of the contract.)
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: ConfigDuration,
    /// ftp: the ports the gateway offers clients for passive-mode data
    /// connections (to open in a firewall); default: any free port of the
    /// system's ephemeral range. (Extension of the contract.)
    pub passive_ports: Option<PortRange>,
    /// http: how long the upstream may take to start its response (the
    /// status line and headers) after the request was sent; default 60s.
    /// (Extension of the contract.)
    pub response_timeout: Option<ConfigDuration>,
}

fn one_or_many_opt<'de, D, T>(deserializer: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    one_or_many(deserializer).map(Some)
}

fn default_max_connections() -> u32 {
    1024
}

fn default_connect_timeout() -> ConfigDuration {
    ConfigDuration(std::time::Duration::from_secs(10))
}

/// Stands for "not written" until validation puts in the kind's default.
fn unset_duration() -> ConfigDuration {
    ConfigDuration(UNSET_DURATION)
}

/// See [`unset_duration`]; no one writes 584 million years.
pub(crate) const UNSET_DURATION: std::time::Duration = std::time::Duration::MAX;

/// The idle timeout of a service of `kind` that does not set one.
pub(crate) fn default_idle_timeout(kind: ServiceKind) -> ConfigDuration {
    ConfigDuration(match kind {
        ServiceKind::Udp => std::time::Duration::from_secs(60),
        _ => std::time::Duration::from_secs(2 * 3600),
    })
}

fn default_handshake_timeout() -> ConfigDuration {
    ConfigDuration(std::time::Duration::from_secs(10))
}
