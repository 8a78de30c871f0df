//! Access rules (DESIGN §2.5): who may use a service (`allow`/`deny`) and
//! where its clients may go (`destinations`).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{AccessRule, DestinationRule, Host, HostPattern, ServiceConfig};
use crate::inbound::ClientId;

/// The outcome of checking a client against `allow`/`deny`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The client may proceed.
    Admit,
    /// The client is refused; the text says which rule decided.
    Deny(String),
    /// Only a `user:` rule could admit this client: decide after login.
    AfterLogin,
}

/// A service's `allow` and `deny` lists, with the loopback default applied.
#[derive(Clone, Debug)]
pub struct AccessList {
    allow: Vec<AccessRule>,
    deny: Vec<AccessRule>,
}

impl AccessList {
    /// The lists of `service`; an omitted `allow` admits loopback clients only.
    pub fn for_service(service: &ServiceConfig) -> Self {
        AccessList {
            allow: service.allow.clone().unwrap_or_else(loopback_only),
            deny: service.deny.clone(),
        }
    }

    /// Checks `client`, logged in as `user` if any. A client is admitted
    /// when it matches some `allow` entry and no `deny` entry.
    pub fn check(&self, client: &ClientId, user: Option<&str>) -> Verdict {
        if let Some(rule) = self.deny.iter().find(|r| matches(r, client, user)) {
            return Verdict::Deny(format!("matches deny rule {rule}"));
        }
        if self.allow.iter().any(|r| matches(r, client, user)) {
            return Verdict::Admit;
        }
        let user_rules = self.allow.iter().any(|r| matches!(r, AccessRule::User(_)));
        if user.is_none() && user_rules {
            return Verdict::AfterLogin;
        }
        Verdict::Deny("not in the service's allow list".into())
    }
}

/// The default `allow`: 127.0.0.0/8 and ::1.
fn loopback_only() -> Vec<AccessRule> {
    vec![
        AccessRule::Net("127.0.0.0/8".parse().expect("valid CIDR")),
        AccessRule::Net("::1/128".parse().expect("valid CIDR")),
    ]
}

fn matches(rule: &AccessRule, client: &ClientId, user: Option<&str>) -> bool {
    match (rule, client) {
        // `any` means any network client; peers must be named explicitly so
        // that adding a link never silently opens a service to it.
        (AccessRule::Any, ClientId::Addr(_)) => true,
        (AccessRule::Net(net), ClientId::Addr(addr)) => net.contains(&canonical(addr.ip())),
        (AccessRule::Peer(name), ClientId::Peer(peer)) => name == peer,
        (AccessRule::User(name), _) => user == Some(name.as_str()),
        _ => false,
    }
}

/// Maps IPv4-mapped IPv6 addresses (`::ffff:10.1.2.3`, seen on dual-stack
/// sockets) to plain IPv4 so that IPv4 rules apply to them.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// A service's `destinations`: where its clients may go.
#[derive(Clone, Debug)]
pub struct Destinations {
    rules: Option<Vec<DestinationRule>>,
}

impl Destinations {
    /// The list of `service`; omitted means any destination.
    pub fn for_service(service: &ServiceConfig) -> Self {
        Destinations {
            rules: service.destinations.clone(),
        }
    }

    /// Whether some entry is a network, so host names must be resolved
    /// before [`Destinations::allows`] can judge them.
    pub fn needs_resolution(&self) -> bool {
        self.rules
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|rule| matches!(rule.host, HostPattern::Net(_)))
    }

    /// Whether `host:port` as the client asked for it is allowed. `resolved`
    /// are the addresses a name resolved to, checked against CIDR entries.
    pub fn allows(&self, host: &Host, port: u16, resolved: &[IpAddr]) -> bool {
        let Some(rules) = &self.rules else {
            return true;
        };
        rules
            .iter()
            .any(|rule| rule.ports.contains(port) && host_matches(&rule.host, host, resolved))
    }
}

fn host_matches(pattern: &HostPattern, host: &Host, resolved: &[IpAddr]) -> bool {
    match (pattern, host) {
        (HostPattern::Any, _) => true,
        (HostPattern::Net(net), Host::Ip(ip)) => net_contains(net, *ip),
        (HostPattern::Net(net), Host::Name(_)) => {
            !resolved.is_empty() && resolved.iter().all(|ip| net_contains(net, *ip))
        }
        (HostPattern::Exact(name), Host::Name(asked)) => name.eq_ignore_ascii_case(asked),
        (HostPattern::Suffix(suffix), Host::Name(asked)) => {
            let asked = asked.to_ascii_lowercase();
            asked
                .strip_suffix(suffix.as_str())
                .is_some_and(|rest| rest.ends_with('.'))
        }
        _ => false,
    }
}

fn net_contains(net: &IpNet, ip: IpAddr) -> bool {
    net.contains(&canonical(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn service(extra: &str) -> ServiceConfig {
        let text = format!(
            "[[service]]\nname = \"s\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:1\"\n{extra}"
        );
        let config: crate::config::Config = toml::from_str(&text).unwrap();
        config.service.into_iter().next().unwrap()
    }

    fn addr(s: &str) -> ClientId {
        ClientId::Addr(s.parse::<SocketAddr>().unwrap())
    }

    #[test]
    fn default_admits_loopback_only() {
        let list = AccessList::for_service(&service(""));
        assert_eq!(list.check(&addr("127.0.0.1:5000"), None), Verdict::Admit);
        assert_eq!(list.check(&addr("127.9.9.9:5000"), None), Verdict::Admit);
        assert_eq!(list.check(&addr("[::1]:5000"), None), Verdict::Admit);
        assert_eq!(
            list.check(&addr("[::ffff:127.0.0.1]:5000"), None),
            Verdict::Admit
        );
        assert!(matches!(
            list.check(&addr("192.0.2.1:5000"), None),
            Verdict::Deny(_)
        ));
        assert!(matches!(
            list.check(&addr("[2001:db8::1]:5000"), None),
            Verdict::Deny(_)
        ));
        assert!(matches!(
            list.check(&ClientId::Peer("p".into()), None),
            Verdict::Deny(_)
        ));
    }

    #[test]
    fn deny_beats_allow_and_any_excludes_peers() {
        let list = AccessList::for_service(&service("allow = [\"any\"]\ndeny = [\"10.9.0.0/16\"]"));
        assert_eq!(list.check(&addr("10.1.0.1:1"), None), Verdict::Admit);
        assert!(
            matches!(list.check(&addr("10.9.3.4:1"), None), Verdict::Deny(r) if r.contains("10.9.0.0/16"))
        );
        assert!(matches!(
            list.check(&ClientId::Peer("x".into()), None),
            Verdict::Deny(_)
        ));
    }

    #[test]
    fn user_rules_wait_for_login() {
        let list = AccessList::for_service(&service("allow = [\"user:alice\", \"peer:branch\"]"));
        assert_eq!(list.check(&addr("192.0.2.1:1"), None), Verdict::AfterLogin);
        assert_eq!(
            list.check(&addr("192.0.2.1:1"), Some("alice")),
            Verdict::Admit
        );
        assert!(matches!(
            list.check(&addr("192.0.2.1:1"), Some("bob")),
            Verdict::Deny(_)
        ));
        assert_eq!(
            list.check(&ClientId::Peer("branch".into()), None),
            Verdict::Admit
        );
    }

    #[test]
    fn destinations_match_names_suffixes_and_networks() {
        let rules: Vec<DestinationRule> = ["*.corp.example", "10.0.0.0/8", "*:443"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let d = Destinations { rules: Some(rules) };
        let name = |s: &str| Host::Name(s.into());
        assert!(d.allows(&name("www.corp.example"), 80, &[]));
        assert!(!d.allows(&name("corp.example.evil"), 80, &[]));
        assert!(!d.allows(&name("xcorp.example"), 80, &[]));
        assert!(d.allows(&name("anything"), 443, &[]));
        assert!(d.allows(&Host::Ip("10.1.2.3".parse().unwrap()), 22, &[]));
        assert!(d.allows(&name("intra"), 22, &["10.0.0.5".parse().unwrap()]));
        assert!(!d.allows(&name("intra"), 22, &["192.0.2.5".parse().unwrap()]));
    }
}
