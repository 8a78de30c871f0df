//! The semantic checks that serde cannot express: names unique and
//! referenced names existing, secure-by-default rules, one password source,
//! and the features not built yet. Also fills in defaults that depend on the
//! environment (gateway name, absolute paths, secrets from env/files).

use std::collections::HashSet;
use std::path::Path;

use super::load::{KeyPath, KeySeg};
use super::model::{AuthMode, Config, ServiceConfig, ServiceKind};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use link::handshake::PeerRecord;

use super::values::{AccessRule, Hop, LinkAddress, Listen, Secret};

/// A problem found by validation: where, and what.
pub type Finding = (KeyPath, String);

/// Checks `config`, filling in environment-dependent defaults; returns every
/// problem found (empty when the configuration is valid).
pub fn validate(config: &mut Config, base: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    check_gateway(config, base, &mut out);
    check_peers(config, base, &mut out);
    check_users(config, &mut out);
    check_admin(config, &mut out);
    check_identity_dir(config, &mut out);
    let peers: HashSet<String> = config.peer.iter().map(|p| p.name.clone()).collect();
    let users: HashSet<String> = config.user.iter().map(|u| u.name.clone()).collect();
    for service in &mut config.service {
        if service.idle_timeout.0 == super::model::UNSET_DURATION {
            service.idle_timeout = super::model::default_idle_timeout(service.kind);
        }
    }
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    for (i, service) in config.service.iter().enumerate() {
        let path = |key: &str| KeyPath::new([key_seg("service"), KeySeg::Index(i), key_seg(key)]);
        let named = |msg: String| format!("service {}: {msg}", shown(&service.name));
        if !valid_name(&service.name) {
            out.push((path("name"), named(NAME_RULE.into())));
        } else if !names.insert(service.name.clone()) {
            out.push((
                path("name"),
                named("another service already has this name; names must be unique".into()),
            ));
        }
        for listen in &service.listen {
            if let Listen::Tcp(addr) = listen {
                if addr.port != 0 && !addresses.insert(addr.clone()) {
                    out.push((
                        path("listen"),
                        named(format!("{addr} is already used by another service")),
                    ));
                }
            }
        }
        check_service(service, &peers, &users, &path, &named, &mut out);
    }
    out
}

/// Settings that work but are probably not what was meant: each with where
/// it is and why it will surprise.
pub fn advisories(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    for (i, service) in config.service.iter().enumerate() {
        let on_link = service.listen.iter().any(|l| matches!(l, Listen::Link));
        if service.kind == ServiceKind::Socks && service.auth == AuthMode::Password && on_link {
            out.push((
                KeyPath::new([key_seg("service"), KeySeg::Index(i), key_seg("auth")]),
                format!(
                    "service {}: peers that use it as a `via = \"link://...\"` hop will be \
                     refused: link hops speak SOCKS5 without a login. Only clients that log \
                     in themselves (through a peer's mapping) can use it; for via hops, add a \
                     socks service with auth = \"none\" that allows peer:NAME",
                    shown(&service.name)
                ),
            ));
        }
    }
    out
}

fn key_seg(key: &str) -> KeySeg {
    KeySeg::Key(key.to_string())
}

/// A name as quoted in messages: at most 64 characters (a 2000-character
/// name is not echoed whole), with Rust's escapes.
fn shown(name: &str) -> String {
    match name.char_indices().nth(64) {
        Some((cut, _)) => format!("{:?}…", &name[..cut]),
        None => format!("{name:?}"),
    }
}

const NAME_RULE: &str = "names use letters, digits, '.', '_' and '-' (1 to 64 of them)";

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_gateway(config: &mut Config, base: &Path, out: &mut Vec<Finding>) {
    let gateway = &mut config.gateway;
    match &gateway.name {
        Some(name) if !valid_name(name) => out.push((
            KeyPath::new([key_seg("gateway"), key_seg("name")]),
            NAME_RULE.to_string(),
        )),
        Some(_) => {}
        None => gateway.name = Some(host_name()),
    }
    gateway.identity = base.join(&gateway.identity);
    if gateway.threads.is_some_and(|n| !(1..=1024).contains(&n)) {
        out.push((
            KeyPath::new([key_seg("gateway"), key_seg("threads")]),
            "threads must be 1-1024 (or omitted: one per CPU core)".into(),
        ));
    }
    if let Some(link) = &mut config.link {
        let path = |key: &str| KeyPath::new([key_seg("link"), key_seg(key)]);
        if link.listen.is_empty() {
            out.push((
                path("listen"),
                "give at least one address to accept links on".into(),
            ));
        }
        let serves_tls = link
            .listen
            .iter()
            .any(|a| matches!(a, LinkAddress::WebSocket { tls: true, .. }));
        for file in [&mut link.tls_cert, &mut link.tls_key]
            .into_iter()
            .flatten()
        {
            *file = base.join(&*file);
        }
        match (&link.tls_cert, &link.tls_key) {
            (Some(cert), Some(key)) => {
                if let Err(why) = crate::tls::load_certs(cert) {
                    out.push((path("tls_cert"), why));
                } else if let Err(why) = crate::tls::load_key(key) {
                    out.push((path("tls_key"), why));
                } else if let Err(why) = crate::tls::server_config(cert, key) {
                    out.push((path("tls_key"), why));
                }
            }
            (None, None) if serves_tls => out.push((
                path("tls_cert"),
                "a wss:// listener needs tls_cert and tls_key (PEM files of the certificate chain and its private key)".into(),
            )),
            (None, None) => {}
            (Some(_), None) => out.push((path("tls_key"), "tls_cert needs tls_key too".into())),
            (None, Some(_)) => out.push((path("tls_cert"), "tls_key needs tls_cert too".into())),
        }
    }
}

/// The machine's host name, made into a valid gateway name.
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if name.is_empty() {
        "linkgate".into()
    } else {
        name
    }
}

fn check_peers(config: &mut Config, base: &Path, out: &mut Vec<Finding>) {
    let has_link_listener = config.link.is_some();
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    for (i, peer) in config.peer.iter_mut().enumerate() {
        let path = |key: &str| KeyPath::new([key_seg("peer"), KeySeg::Index(i), key_seg(key)]);
        let named = |msg: &str| format!("peer {}: {msg}", shown(&peer.name));
        if !valid_name(&peer.name) {
            out.push((path("name"), named(NAME_RULE)));
        } else if !names.insert(peer.name.clone()) {
            out.push((path("name"), named("another peer already has this name")));
        }
        let sources = [
            peer.password.is_some(),
            peer.password_env.is_some(),
            peer.password_file.is_some(),
            peer.record.is_some(),
            peer.public_key.is_some(),
        ];
        let dialing = !peer.connect.is_empty();
        match sources.iter().filter(|s| **s).count() {
            0 if dialing => out.push((
                path("password"),
                named("set one of password, password_env, password_file or public_key"),
            )),
            0 => out.push((
                path("password"),
                named("set one of password, password_env, password_file, record or public_key"),
            )),
            1 => {}
            _ => out.push((
                path("password"),
                named(
                    "set only one of password, password_env, password_file, record and public_key",
                ),
            )),
        }
        if let Some(key) = &peer.public_key {
            match decode_public_key(key) {
                Err(why) => out.push((path("public_key"), named(&why))),
                // The hub knows a key-mode peer by its key alone.
                Ok(key) if !keys.insert(key) => out.push((
                    path("public_key"),
                    named("another peer has the same public_key"),
                )),
                Ok(_) => {}
            }
            if peer.user.is_some() {
                out.push((
                    path("user"),
                    named("user is for password mode; with public_key the other gateway knows this one by its key"),
                ));
            }
        }
        if dialing && peer.record.is_some() {
            out.push((
                path("record"),
                named("a record is for the accepting side; the dialing side (with connect) needs the password"),
            ));
        }
        if dialing && peer.user.as_deref().is_some_and(|u| !valid_name(u)) {
            out.push((path("user"), named(NAME_RULE)));
        }
        if let Some(record) = &peer.record {
            if let Err(why) = decode_peer_record(record.expose()) {
                out.push((path("record"), named(&why)));
            }
        }
        for (j, hop) in peer.via.iter().enumerate() {
            if !matches!(
                hop,
                Hop::Socks4(_) | Hop::Socks4a(_) | Hop::Socks5(..) | Hop::Http(..)
            ) {
                out.push((
                    path("via"),
                    named(&format!(
                        "via hop {} ({hop}) cannot carry a link; use socks4://, socks4a://, socks5:// or http:// proxies",
                        j + 1
                    )),
                ));
            }
        }
        if !dialing && !peer.via.is_empty() {
            out.push((
                path("via"),
                named("via is for the dialing side (with connect)"),
            ));
        }
        if let Some(file) = &mut peer.ca_file {
            *file = base.join(&*file);
            if let Err(why) = crate::tls::load_certs(file) {
                out.push((path("ca_file"), named(&why)));
            }
        }
        if !dialing && peer.user.is_some() {
            out.push((
                path("user"),
                named("user is for the dialing side; on the accepting side the peer's name is the user it logs in as"),
            ));
        }
        let keepalive = peer.keepalive.0;
        if keepalive < std::time::Duration::from_millis(100)
            || keepalive > std::time::Duration::from_secs(600)
        {
            out.push((
                path("keepalive"),
                named("keepalive must be between 100ms and 10m (the link is declared down after three of them)"),
            ));
        }
        if !(1..=65_536).contains(&peer.max_streams) {
            out.push((path("max_streams"), named("max_streams must be 1-65536")));
        }
        if !dialing && !has_link_listener {
            out.push((
                path("connect"),
                named("this peer has no connect address and this gateway has no [link] listen, so no link to it can ever come up"),
            ));
        }
        if let Some(var) = &peer.password_env {
            match std::env::var(var) {
                Ok(value) if !value.is_empty() => peer.password = Some(Secret::new(value)),
                _ => out.push((
                    path("password_env"),
                    named(&format!("environment variable {var} is not set")),
                )),
            }
        }
        if let Some(file) = &peer.password_file {
            let file = base.join(file);
            match std::fs::read_to_string(&file) {
                Ok(text) if !text.trim().is_empty() => {
                    let first = text.lines().next().unwrap_or_default().trim_end();
                    peer.password = Some(Secret::new(first.to_string()));
                }
                Ok(_) => out.push((
                    path("password_file"),
                    named(&format!("{} is empty", file.display())),
                )),
                Err(e) => out.push((
                    path("password_file"),
                    named(&format!("cannot read {}: {e}", file.display())),
                )),
            }
        }
    }
}

/// The identity file is created on first start when links need it: its
/// directory must exist then (as `run` would find out too late).
fn check_identity_dir(config: &Config, out: &mut Vec<Finding>) {
    let needed = config.link.is_some()
        || config
            .peer
            .iter()
            .any(|p| !p.connect.is_empty() && p.public_key.is_some());
    let identity = &config.gateway.identity;
    if !needed || identity.exists() {
        return;
    }
    if let Some(dir) = identity.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            out.push((
                KeyPath::new([key_seg("gateway"), key_seg("identity")]),
                format!(
                    "the directory {} does not exist; the identity file is created there on first start: create the directory or point identity elsewhere",
                    dir.display()
                ),
            ));
        }
    }
}

fn check_admin(config: &Config, out: &mut Vec<Finding>) {
    let path = |key: &str| KeyPath::new([key_seg("gateway"), key_seg(key)]);
    for name in &config.gateway.admin_users {
        if !config.user.iter().any(|u| &u.name == name) {
            out.push((
                path("admin_users"),
                format!("{name:?} is not a [[user]]; admin_users names [[user]] entries"),
            ));
        }
    }
    if let Some(admin) = &config.gateway.admin {
        let loopback = match &admin.host {
            super::values::Host::Ip(ip) => ip.is_loopback(),
            super::values::Host::Name(name) => name == "localhost",
        };
        if !loopback && config.gateway.admin_users.is_empty() {
            out.push((
                path("admin"),
                format!("the admin endpoint on {admin} would be open to that network: set admin_users = [\"NAME\"] ([[user]]s who may log in), or listen on 127.0.0.1"),
            ));
        }
    }
}

fn check_users(config: &mut Config, out: &mut Vec<Finding>) {
    let mut names = HashSet::new();
    for (i, user) in config.user.iter_mut().enumerate() {
        let path = |key: &str| KeyPath::new([key_seg("user"), KeySeg::Index(i), key_seg(key)]);
        let named = |msg: &str| format!("user {}: {msg}", shown(&user.name));
        if user.name.is_empty() || user.name.len() > 255 || user.name.contains(':') {
            out.push((
                path("name"),
                named("a user name has 1 to 255 characters and no ':'"),
            ));
        } else if !names.insert(user.name.clone()) {
            out.push((path("name"), named("another user already has this name")));
        }
        let sources = [
            user.password_hash.is_some(),
            user.password.is_some(),
            user.password_env.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            out.push((
                path("password_hash"),
                named("set exactly one of password_hash (from `linkgate passwd`), password or password_env"),
            ));
        }
        if let Some(hash) = &user.password_hash {
            if argon2::PasswordHash::new(hash.expose()).is_err() {
                out.push((
                    path("password_hash"),
                    named("not a PHC password hash; make one with `linkgate passwd`"),
                ));
            }
        }
        if let Some(var) = &user.password_env {
            match std::env::var(var) {
                Ok(value) if !value.is_empty() => user.password = Some(Secret::new(value)),
                _ => out.push((
                    path("password_env"),
                    named(&format!("environment variable {var} is not set")),
                )),
            }
        }
    }
}

fn check_service(
    service: &ServiceConfig,
    peers: &HashSet<String>,
    users: &HashSet<String>,
    path: &dyn Fn(&str) -> KeyPath,
    named: &dyn Fn(String) -> String,
    out: &mut Vec<Finding>,
) {
    let kind = service.kind;
    let mut push = |key: &str, msg: String| out.push((path(key), named(msg)));
    if service.listen.is_empty() {
        push("listen", "give at least one address, or \"link\"".into());
    }
    if service.listen.contains(&Listen::Link) && peers.is_empty() {
        push(
            "listen",
            "\"link\" makes the service reachable by peers, but no [[peer]] is configured".into(),
        );
    }
    if kind == ServiceKind::Udp {
        check_udp(service, &mut push);
    }
    match (kind, &service.target) {
        (ServiceKind::Mapping, None) => push(
            "target",
            "a mapping service needs a target (host:port or link://PEER/SERVICE)".into(),
        ),
        (ServiceKind::Udp, None) => {
            push("target", "a udp service needs a target (host:port)".into())
        }
        (ServiceKind::Socks | ServiceKind::Http | ServiceKind::Telnet, Some(_)) => push(
            "target",
            format!(
                "a {} service takes its destination from the client; remove target",
                kind.as_str()
            ),
        ),
        (_, Some(Hop::Direct(_) | Hop::Link { .. })) | (_, None) => {}
        (_, Some(hop)) => push(
            "target",
            format!(
                "target must be host:port or link://PEER/SERVICE; put the {} proxy in via",
                hop.scheme()
            ),
        ),
    }
    for (i, hop) in service.via.iter().enumerate() {
        match hop {
            Hop::Direct(addr) => push(
                "via",
                format!("{addr} is not a proxy; via hops are socks4://, socks4a://, socks5://, http:// or link://"),
            ),
            Hop::Link { .. } if i > 0 => push(
                "via",
                "a link:// hop can only be the first hop of a chain".into(),
            ),
            _ => {}
        }
    }
    if matches!(service.target, Some(Hop::Link { .. })) && !service.via.is_empty() {
        push("target", "a link:// target cannot be reached through via; remove via or put the link first in via".into());
    }
    for hop in service.target.iter().chain(&service.via) {
        if let Hop::Link { peer, .. } = hop {
            if !peers.contains(peer) {
                let key = if Some(hop) == service.target.as_ref() {
                    "target"
                } else {
                    "via"
                };
                push(
                    key,
                    format!("{hop} names peer {peer:?}, but there is no [[peer]] with that name"),
                );
            }
        }
    }
    let allow = service.allow.as_deref().unwrap_or_default();
    for (key, rules) in [("allow", allow), ("deny", service.deny.as_slice())] {
        for rule in rules {
            match rule {
                AccessRule::Peer(name) if !peers.contains(name) => {
                    push(key, format!("{rule} names no [[peer]]"));
                }
                AccessRule::User(name) if !users.contains(name) => {
                    push(key, format!("{rule} names no [[user]]"));
                }
                AccessRule::User(_) if service.auth != AuthMode::Password => {
                    push(
                        key,
                        format!("{rule} can only match after login; set auth = \"password\""),
                    );
                }
                _ => {}
            }
        }
    }
    // Open is judged on the union: 0.0.0.0/1 and 128.0.0.0/1 together are
    // 0.0.0.0/0; and a network wider than a /8 is open in all but name.
    let nets: Vec<ipnet::IpNet> = allow
        .iter()
        .filter_map(|rule| match rule {
            AccessRule::Net(net) => Some(*net),
            _ => None,
        })
        .collect();
    let union = ipnet::IpNet::aggregate(&nets);
    let open_union = union.iter().find(|net| net.prefix_len() < 8).map(|net| {
        let parts: Vec<String> = nets
            .iter()
            .filter(|n| net.contains(*n))
            .map(ToString::to_string)
            .collect();
        parts.join("\", \"")
    });
    let open = allow
        .iter()
        .find(|rule| matches!(rule, AccessRule::Any))
        .map(ToString::to_string)
        .or(open_union);
    if service.listen.contains(&Listen::Link)
        && !allow
            .iter()
            .any(|r| matches!(r, AccessRule::Peer(_) | AccessRule::Any))
    {
        push(
            "allow",
            "listen has \"link\", but allow names no peer: streams from peers would all be refused; add \"peer:NAME\"".into(),
        );
    }
    if let Some(rule) = open {
        if kind == ServiceKind::Telnet {
            push(
                "allow",
                format!(
                    "allow = [\"{rule}\"] on a telnet service lets anyone use this gateway (telnet \
                     has no login); allow only your networks"
                ),
            );
        } else if kind.is_open_proxy_kind() && service.auth != AuthMode::Password {
            push(
                "allow",
                format!(
                    "allow = [\"{rule}\"] on a {} service needs auth = \"password\": otherwise anyone \
                     can use this gateway as an open proxy; add auth = \"password\" or allow only your networks",
                    kind.as_str()
                ),
            );
        }
    }
    if service.response_timeout.is_some() && kind != ServiceKind::Http {
        push(
            "response_timeout",
            format!(
                "response_timeout is for http services; a {} service waits for no response",
                kind.as_str()
            ),
        );
    }
    if service.response_timeout.is_some_and(|d| d.0.is_zero()) {
        push("response_timeout", "must be longer than zero".into());
    }
    if service.passive_ports.is_some() && kind != ServiceKind::Ftp {
        push(
            "passive_ports",
            format!(
                "passive_ports is for ftp services; a {} service has no data connections",
                kind.as_str()
            ),
        );
    }
    if service.destinations.is_some() && kind == ServiceKind::Mapping {
        push(
            "destinations",
            "a mapping service always goes to its target; remove destinations".into(),
        );
    }
    if service.auth == AuthMode::Password {
        if matches!(kind, ServiceKind::Mapping | ServiceKind::Telnet) {
            push(
                "auth",
                format!(
                    "a {} service has no login; auth = \"password\" applies to socks, http and ftp",
                    kind.as_str()
                ),
            );
        } else if users.is_empty() {
            push(
                "auth",
                "auth = \"password\" needs at least one [[user]]".into(),
            );
        }
    }
    if service.max_connections_per_client == Some(0) {
        push(
            "max_connections_per_client",
            "must be at least 1 (or omitted: no per-client limit)".into(),
        );
    }
    if service.max_connections == 0 {
        push("max_connections", "must be at least 1".into());
    }
    for (key, d) in [
        ("connect_timeout", service.connect_timeout),
        ("idle_timeout", service.idle_timeout),
        ("handshake_timeout", service.handshake_timeout),
    ] {
        if d.0.is_zero() {
            push(key, "must be longer than zero".into());
        }
    }
}

/// What a udp service cannot have: proxy hops, logins, destinations.
fn check_udp(service: &ServiceConfig, push: &mut dyn FnMut(&str, String)) {
    if !service.via.is_empty() {
        push(
            "via",
            "a udp service sends its datagrams directly; remove via".into(),
        );
    }
    if service.auth == AuthMode::Password {
        push(
            "auth",
            "UDP has no login; admit clients with allow and deny".into(),
        );
    }
    if service.destinations.is_some() {
        push(
            "destinations",
            "a udp service goes only to its target; remove destinations".into(),
        );
    }
}

/// Decodes a `[[peer]] public_key` (base64 from `linkgate public-key`).
pub fn decode_public_key(text: &str) -> Result<[u8; 32], String> {
    let key = STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| {
            "public_key is not a key: paste the output of `linkgate public-key` on that gateway"
                .to_string()
        })?;
    if link::handshake::is_low_order(&key) {
        return Err("public_key is a degenerate (low-order) key that anyone could impersonate; paste the output of `linkgate public-key` on that gateway".into());
    }
    Ok(key)
}

/// Decodes a `[[peer]] record` (base64 from `linkgate peer-record`).
pub fn decode_peer_record(text: &str) -> Result<PeerRecord, String> {
    let bytes = STANDARD.decode(text.trim()).map_err(|_| {
        "record is not base64; paste the output of `linkgate peer-record` as is".to_string()
    })?;
    PeerRecord::from_bytes(&bytes).map_err(|_| {
        "record is not a valid registration record; make it with `linkgate peer-record`".to_string()
    })
}
