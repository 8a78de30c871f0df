//! Value types of the configuration file: each parses from the string a user
//! writes, so a bad value is reported by serde with its key and position.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer, IntoDeserializer, SeqAccess, Visitor};
use serde::Deserialize;

/// Implements `Deserialize` for a type through its `FromStr`, so that the
/// parse error text becomes the serde error (which carries key and position).
macro_rules! deserialize_from_str {
    ($ty:ty, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$ty, E> {
                        s.parse().map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(V)
            }
        }
    };
}

/// Accepts either one value or a list of values (`listen = "a"` or
/// `listen = ["a", "b"]`); always yields a list.
pub fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or a list of strings")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<T>, E> {
            let one = T::deserialize(s.into_deserializer())?;
            Ok(vec![one])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut all = Vec::new();
            while let Some(item) = seq.next_element()? {
                all.push(item);
            }
            Ok(all)
        }
    }
    deserializer.deserialize_any(V(std::marker::PhantomData))
}

// === Secret ===

/// A password, key or record from the configuration. Its `Debug` prints
/// asterisks and it has no `Display`, so it cannot leak into logs by
/// accident; it is wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq, Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value read from somewhere other than the file itself.
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

// === Duration ===

/// A duration written as `"500ms"`, `"10s"`, `"1h"` or `"1h 30m"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl FromStr for ConfigDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(ConfigDuration)
            .map_err(|e| {
                format!("invalid duration {s:?} ({e}); write it like \"500ms\", \"10s\" or \"1h\"")
            })
    }
}
deserialize_from_str!(ConfigDuration, "a duration such as \"10s\"");
deserialize_from_str!(
    crate::limits::Bandwidth,
    "a bandwidth such as \"20Mbit/s\" or \"2MB/s\""
);

impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

// === Host and port ===

/// The host part of an address: an IP literal, or a name resolved at connect time.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
    /// A DNS name, kept as written (lowercased).
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

/// `host:port` or `[v6]:port`; the host may be a name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// Where to connect or listen.
    pub host: Host,
    /// The TCP port (0 only where listening, meaning "any free port").
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Checks that a name is a plausible DNS host name (letters, digits, `-`, `_`, `.`).
fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|label| !label.is_empty() && label.len() <= 63)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid address {s:?}: {why}; write host:port or [v6]:port");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (ip, port) = rest.split_once("]:").ok_or_else(|| bad("missing ]:port"))?;
            let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| bad("not an IPv6 address"))?;
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("missing :port"))?;
            if host.contains(':') {
                return Err(bad("IPv6 addresses go in brackets"));
            }
            let host = match host.parse::<IpAddr>() {
                Ok(ip) => Host::Ip(ip),
                Err(_) if valid_host_name(host) => Host::Name(host.to_ascii_lowercase()),
                Err(_) => return Err(bad("not an IP address or host name")),
            };
            (host, port)
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| bad("the port must be a number from 0 to 65535"))?;
        Ok(HostPort { host, port })
    }
}
deserialize_from_str!(HostPort, "an address host:port");

// === Listen ===

/// One entry of a service's `listen`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A TCP socket address (host names are resolved when binding).
    Tcp(HostPort),
    /// `"link"`: reachable by peers over encrypted links.
    Link,
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "link" {
            Ok(Listen::Link)
        } else {
            s.parse().map(Listen::Tcp)
        }
    }
}
deserialize_from_str!(Listen, "\"host:port\" or \"link\"");

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Listen::Tcp(addr) => addr.fmt(f),
            Listen::Link => f.write_str("link"),
        }
    }
}

// === Link addresses ===

/// One place a link is dialed (`[[peer]] connect`) or accepted
/// (`[link] listen`): raw TCP, or WebSocket, plain or over TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkAddress {
    /// `host:port`: the link's records straight on TCP.
    Tcp(HostPort),
    /// `ws://host:port/path` or `wss://host:port/path`: the records inside
    /// WebSocket binary messages, over TLS for `wss`.
    WebSocket {
        /// Where to connect or listen.
        addr: HostPort,
        /// The HTTP path of the WebSocket upgrade (starts with `/`).
        path: String,
        /// `wss://`: TLS under the WebSocket.
        tls: bool,
    },
}

impl LinkAddress {
    /// The TCP address under the transport.
    pub fn addr(&self) -> &HostPort {
        match self {
            LinkAddress::Tcp(addr) | LinkAddress::WebSocket { addr, .. } => addr,
        }
    }

    /// The transport's name in logs and status: `tcp`, `ws` or `wss`.
    pub fn transport(&self) -> &'static str {
        match self {
            LinkAddress::Tcp(_) => "tcp",
            LinkAddress::WebSocket { tls: false, .. } => "ws",
            LinkAddress::WebSocket { tls: true, .. } => "wss",
        }
    }
}

impl FromStr for LinkAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((scheme, rest)) = s.split_once("://") else {
            return s.parse().map(LinkAddress::Tcp);
        };
        let bad = |why: &str| {
            format!("invalid link address {s:?}: {why}; write host:port, ws://host:port/path or wss://host:port/path")
        };
        let tls = match scheme {
            "ws" => false,
            "wss" => true,
            _ => return Err(bad("unknown scheme")),
        };
        let (addr, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let addr: HostPort = addr.parse().map_err(|e: String| bad(&e))?;
        let path_ok = path.len() <= 1024
            && path
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'%'));
        if !path_ok {
            return Err(bad("the path may use printable ASCII except ?, # and %"));
        }
        Ok(LinkAddress::WebSocket {
            addr,
            path: path.to_string(),
            tls,
        })
    }
}
deserialize_from_str!(
    LinkAddress,
    "a link address such as \"host:port\" or \"wss://host:443/path\""
);

impl fmt::Display for LinkAddress {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            LinkAddress::Tcp(addr) => addr.fmt(f),
            LinkAddress::WebSocket { addr, path, tls } => {
                let scheme = if *tls { "wss" } else { "ws" };
                write!(f, "{scheme}://{addr}{path}")
            }
        }
    }
}

// === Hops ===

/// User name and password embedded in a proxy hop URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HopCredentials {
    /// The user name (shown in logs).
    pub user: String,
    /// The password (never shown).
    pub password: Secret,
}

/// One hop of a `target` or `via` chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hop {
    /// `host:port`: a direct TCP connection.
    Direct(HostPort),
    /// `link://PEER/SERVICE`: a stream over the encrypted link to PEER's SERVICE.
    Link {
        /// The `[[peer]] name` the stream goes to.
        peer: String,
        /// The peer's service name.
        service: String,
    },
    /// `socks4://host:port` (the gateway resolves names itself).
    Socks4(HostPort),
    /// `socks4a://host:port` (names are resolved by the proxy).
    Socks4a(HostPort),
    /// `socks5://[user:pass@]host:port`.
    Socks5(HostPort, Option<HopCredentials>),
    /// `http://[user:pass@]host:port`, using CONNECT.
    Http(HostPort, Option<HopCredentials>),
}

impl Hop {
    /// The scheme word used in messages (`direct`, `link`, `socks5`, ...).
    pub fn scheme(&self) -> &'static str {
        match self {
            Hop::Direct(_) => "direct",
            Hop::Link { .. } => "link",
            Hop::Socks4(_) => "socks4",
            Hop::Socks4a(_) => "socks4a",
            Hop::Socks5(..) => "socks5",
            Hop::Http(..) => "http",
        }
    }
}

impl FromStr for Hop {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((scheme, rest)) = s.split_once("://") else {
            return s.parse().map(Hop::Direct);
        };
        let bad = |why: &str| format!("invalid hop {s:?}: {why}");
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if scheme == "link" {
            let (peer, service) = rest
                .split_once('/')
                .ok_or_else(|| bad("write link://PEER/SERVICE"))?;
            if peer.is_empty() || service.is_empty() || service.contains('/') {
                return Err(bad("write link://PEER/SERVICE"));
            }
            return Ok(Hop::Link {
                peer: peer.to_string(),
                service: service.to_string(),
            });
        }
        let (credentials, addr) = match rest.rsplit_once('@') {
            Some((cred, addr)) => {
                let (user, password) = cred
                    .split_once(':')
                    .ok_or_else(|| bad("credentials are written user:password@"))?;
                let credentials = HopCredentials {
                    user: user.to_string(),
                    password: Secret(password.to_string()),
                };
                (Some(credentials), addr)
            }
            None => (None, rest),
        };
        let addr: HostPort = addr.parse().map_err(|e: String| bad(&e))?;
        let no_credentials = |hop: Hop| match credentials {
            Some(_) => Err(bad("this scheme takes no password")),
            None => Ok(hop),
        };
        match scheme {
            "socks4" => no_credentials(Hop::Socks4(addr)),
            "socks4a" => no_credentials(Hop::Socks4a(addr)),
            "socks5" => Ok(Hop::Socks5(addr, credentials)),
            "http" => Ok(Hop::Http(addr, credentials)),
            _ => Err(bad(
                "unknown scheme; use host:port, link://, socks4://, socks4a://, socks5:// or http://",
            )),
        }
    }
}
deserialize_from_str!(Hop, "a hop such as \"host:port\" or \"socks5://host:port\"");

/// Shows the hop as written, with any password replaced by asterisks.
impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let user = |c: &Option<HopCredentials>| match c {
            Some(c) => format!("{}:****@", c.user),
            None => String::new(),
        };
        match self {
            Hop::Direct(addr) => write!(f, "{addr}"),
            Hop::Link { peer, service } => write!(f, "link://{peer}/{service}"),
            Hop::Socks4(addr) => write!(f, "socks4://{addr}"),
            Hop::Socks4a(addr) => write!(f, "socks4a://{addr}"),
            Hop::Socks5(addr, c) => write!(f, "socks5://{}{addr}", user(c)),
            Hop::Http(addr, c) => write!(f, "http://{}{addr}", user(c)),
        }
    }
}

// === Access rules ===

/// One entry of `allow` or `deny`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessRule {
    /// `any`: every TCP client and every authenticated user (but not link
    /// peers, which must be named with `peer:`).
    Any,
    /// A CIDR network or a single address.
    Net(IpNet),
    /// `peer:NAME`: streams arriving over the link from that peer.
    Peer(String),
    /// `user:NAME`: clients that authenticated as that user.
    User(String),
}

impl FromStr for AccessRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "any" {
            return Ok(AccessRule::Any);
        }
        if let Some(name) = s.strip_prefix("peer:") {
            return non_empty(name, s).map(AccessRule::Peer);
        }
        if let Some(name) = s.strip_prefix("user:") {
            return non_empty(name, s).map(AccessRule::User);
        }
        parse_net(s).map(AccessRule::Net).ok_or_else(|| {
            format!(
                "invalid access rule {s:?}: write a CIDR (10.0.0.0/8), an address, \
                 \"peer:NAME\", \"user:NAME\" or \"any\""
            )
        })
    }
}
deserialize_from_str!(AccessRule, "an access rule such as \"10.0.0.0/8\"");

impl fmt::Display for AccessRule {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            AccessRule::Any => f.write_str("any"),
            AccessRule::Net(net) => write!(f, "{net}"),
            AccessRule::Peer(name) => write!(f, "peer:{name}"),
            AccessRule::User(name) => write!(f, "user:{name}"),
        }
    }
}

fn non_empty(name: &str, whole: &str) -> Result<String, String> {
    if name.is_empty() {
        Err(format!(
            "invalid access rule {whole:?}: the name is missing"
        ))
    } else {
        Ok(name.to_string())
    }
}

/// Parses a CIDR or a bare address (taken as a /32 or /128 network).
fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

// === Destinations ===

/// The host half of a `destinations` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: any host.
    Any,
    /// An address or CIDR; also matched against the addresses a name resolves to.
    Net(IpNet),
    /// An exact host name (compared case-insensitively).
    Exact(String),
    /// `*.suffix`: any name ending in `.suffix`.
    Suffix(String),
}

/// The port half of a `destinations` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSet {
    /// `*` or omitted: any port.
    Any,
    /// A list of inclusive ranges (a single port is a range of one).
    Ranges(Vec<(u16, u16)>),
}

impl PortSet {
    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        match self {
            PortSet::Any => true,
            PortSet::Ranges(ranges) => ranges.iter().any(|&(lo, hi)| lo <= port && port <= hi),
        }
    }
}

/// One entry of `destinations`: `HOST` or `HOST:PORTS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationRule {
    /// Which hosts.
    pub host: HostPattern,
    /// Which ports.
    pub ports: PortSet,
}

impl FromStr for DestinationRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid destination {s:?}: {why}");
        // IPv6 hosts contain colons: "[v6]:ports" or a bare v6 address/CIDR.
        let (host, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(|| bad("missing ]"))?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| bad("expected :PORTS after ]"))?,
                    ),
                ),
            }
        } else if s.matches(':').count() > 1 {
            (s, None)
        } else {
            match s.split_once(':') {
                Some((host, ports)) => (host, Some(ports)),
                None => (s, None),
            }
        };
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some(net) = parse_net(host) {
            HostPattern::Net(net)
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if !valid_host_name(suffix) {
                return Err(bad("the part after *. is not a host name"));
            }
            HostPattern::Suffix(suffix.to_ascii_lowercase())
        } else if valid_host_name(host) {
            HostPattern::Exact(host.to_ascii_lowercase())
        } else {
            return Err(bad(
                "the host is not *, an address, a CIDR, a name or *.suffix",
            ));
        };
        let ports = match ports {
            None | Some("*") => PortSet::Any,
            Some(list) => {
                let mut ranges = Vec::new();
                for part in list.split(',') {
                    let port = |p: &str| {
                        p.trim().parse::<u16>().map_err(|_| {
                            bad("ports are *, a port, a range 8000-8100 or a list 80,443")
                        })
                    };
                    let range = match part.split_once('-') {
                        Some((lo, hi)) => (port(lo)?, port(hi)?),
                        None => (port(part)?, port(part)?),
                    };
                    if range.0 > range.1 {
                        return Err(bad("a port range must go from low to high"));
                    }
                    ranges.push(range);
                }
                PortSet::Ranges(ranges)
            }
        };
        Ok(DestinationRule { host, ports })
    }
}
deserialize_from_str!(
    DestinationRule,
    "a destination such as \"*.corp.example:443\""
);

/// An inclusive range of ports, `"50000-50999"` (or one port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// The lowest port.
    pub low: u16,
    /// The highest port.
    pub high: u16,
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid port range {s:?}: write LOW-HIGH, e.g. 50000-50999");
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(bad)
        };
        let (low, high) = match s.split_once('-') {
            Some((low, high)) => (port(low)?, port(high)?),
            None => (port(s)?, port(s)?),
        };
        if low > high {
            return Err(format!(
                "invalid port range {s:?}: it must go from low to high"
            ));
        }
        Ok(PortRange { low, high })
    }
}
deserialize_from_str!(PortRange, "a port range such as \"50000-50999\"");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(
            "50000-50999".parse::<PortRange>(),
            Ok(PortRange {
                low: 50000,
                high: 50999
            })
        );
        assert_eq!(
            "2121".parse::<PortRange>(),
            Ok(PortRange {
                low: 2121,
                high: 2121
            })
        );
        for bad in ["0-10", "9-8", "a-b", "1-70000", ""] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn host_port_forms() {
        let ws: LinkAddress = "wss://Hub.example.net:443/linkgate".parse().unwrap();
        assert_eq!(ws.to_string(), "wss://hub.example.net:443/linkgate");
        assert_eq!(ws.transport(), "wss");
        let bare: LinkAddress = "ws://127.0.0.1:8080".parse().unwrap();
        assert_eq!(bare.to_string(), "ws://127.0.0.1:8080/");
        assert_eq!(
            "10.0.0.1:7000".parse::<LinkAddress>().unwrap().transport(),
            "tcp"
        );
        assert!("http://hub:80/x".parse::<LinkAddress>().is_err());
        assert!("wss://hub:443/a b".parse::<LinkAddress>().is_err());
        assert!("wss://hub/x".parse::<LinkAddress>().is_err());
        let hp: HostPort = "example.net:80".parse().unwrap();
        assert_eq!(hp.host, Host::Name("example.net".into()));
        let hp: HostPort = "[::1]:7000".parse().unwrap();
        assert_eq!(hp.to_string(), "[::1]:7000");
        assert!("::1:80".parse::<HostPort>().is_err());
        assert!("host".parse::<HostPort>().is_err());
        assert!("host:99999".parse::<HostPort>().is_err());
        assert!("bad host:80".parse::<HostPort>().is_err());
    }

    #[test]
    fn hops_hide_passwords() {
        let hop: Hop = "socks5://alice:s3cret@127.0.0.1:1080".parse().unwrap();
        assert_eq!(hop.to_string(), "socks5://alice:****@127.0.0.1:1080");
        assert!(!format!("{hop:?}").contains("s3cret"));
        let hop: Hop = "link://main/web".parse().unwrap();
        assert_eq!(
            hop,
            Hop::Link {
                peer: "main".into(),
                service: "web".into()
            }
        );
        assert!("ftp://x:21".parse::<Hop>().is_err());
        assert!("socks4://u:p@x:1".parse::<Hop>().is_err());
    }

    #[test]
    fn destinations_forms() {
        let d: DestinationRule = "*:443".parse().unwrap();
        assert_eq!(d.host, HostPattern::Any);
        assert!(d.ports.contains(443) && !d.ports.contains(80));
        let d: DestinationRule = "2001:db8::/32".parse().unwrap();
        assert!(matches!(d.host, HostPattern::Net(_)));
        let d: DestinationRule = "[::1]:80,8000-8100".parse().unwrap();
        assert!(d.ports.contains(8050) && !d.ports.contains(8101));
        let d: DestinationRule = "*.Corp.Example".parse().unwrap();
        assert_eq!(d.host, HostPattern::Suffix("corp.example".into()));
        assert!("host:9-1".parse::<DestinationRule>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(
            "500ms".parse::<ConfigDuration>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            "1h".parse::<ConfigDuration>().unwrap().0,
            Duration::from_secs(3600)
        );
        assert!("10 parsecs".parse::<ConfigDuration>().is_err());
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// No input makes a parser panic; every error is a message.
        #[test]
        fn parsers_never_panic(s in "\\PC{0,40}") {
            let _ = s.parse::<HostPort>();
            let _ = s.parse::<Hop>();
            let _ = s.parse::<AccessRule>();
            let _ = s.parse::<DestinationRule>();
            let _ = s.parse::<ConfigDuration>();
            let _ = s.parse::<Listen>();
        }

        /// Displaying an address and parsing it back gives the same address.
        #[test]
        fn host_port_round_trips(ip in any::<std::net::IpAddr>(), port in any::<u16>()) {
            let original = HostPort { host: Host::Ip(ip), port };
            prop_assert_eq!(original.to_string().parse::<HostPort>().unwrap(), original);
        }

        /// Hops without passwords print exactly as they parse.
        #[test]
        fn hop_round_trips(name in "[a-z][a-z0-9-]{0,10}(\\.[a-z]{2,5})?", port in 1u16.., scheme in 0usize..5) {
            let text = match scheme {
                0 => format!("{name}:{port}"),
                1 => format!("socks4://{name}:{port}"),
                2 => format!("socks4a://{name}:{port}"),
                3 => format!("socks5://{name}:{port}"),
                _ => format!("http://{name}:{port}"),
            };
            prop_assert_eq!(text.parse::<Hop>().unwrap().to_string(), text);
        }
    }
}
