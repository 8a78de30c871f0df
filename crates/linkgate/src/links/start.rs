//! Starting the links of a gateway from its configuration: an acceptor per
//! `[link] listen` socket (with the peers' records and pinned keys) and a
//! dialer per `[[peer]]` with `connect`.

use std::collections::HashMap;
use std::sync::Arc;

use link::handshake::{Identity, PeerRecord, StaticKeys};
use link::session::SessionConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::transport::{Carrier, Route};
use super::{
    identity, run_acceptor, run_dialer, AcceptContext, DialCredential, DialTarget, Links,
    StreamDispatch,
};
use crate::config::{decode_peer_record, decode_public_key, Config, LinkAddress};

/// Connecting to a hub through a proxy chain: the whole chain's TCP part.
const ROUTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts accepting on `listeners` (each with the `[link] listen` entry it
/// was bound for) and dialing every peer with `connect`, as tasks of
/// `tasks` that end when `stop` is cancelled. Fails (before starting
/// anything) if the identity file, a peer record or a TLS file cannot be
/// prepared.
pub async fn start(
    config: &Config,
    listeners: Vec<(TcpListener, LinkAddress)>,
    links: &Arc<Links>,
    dispatch: &Arc<dyn StreamDispatch>,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), String> {
    // The identity is needed to accept links, and to dial in key mode.
    let dials_with_key = config
        .peer
        .iter()
        .any(|p| !p.connect.is_empty() && p.public_key.is_some());
    let identity = if !listeners.is_empty() || dials_with_key {
        Some(identity::load_or_create(&config.gateway.identity)?)
    } else {
        None
    };
    let static_keys = identity.as_ref().map(Identity::static_keys);
    if let (false, Some(identity), Some(keys)) = (listeners.is_empty(), identity, &static_keys) {
        let records = peer_records(config, &identity).await?;
        let context = Arc::new(AcceptContext {
            static_keys: keys.clone(),
            identity,
            records,
            key_peers: key_peers(config),
            hello_times: Default::default(),
            links: links.clone(),
            dispatch: dispatch.clone(),
            configs: config
                .peer
                .iter()
                .map(|p| (p.name.clone(), session_config(p)))
                .collect(),
            throttle: Default::default(),
        });
        let mut carriers = Vec::new();
        for (listener, address) in listeners {
            carriers.push((listener, carrier(config, &address)?));
        }
        for (listener, carrier) in carriers {
            if let Ok(local) = listener.local_addr() {
                tracing::info!(service = "[link]", listen = %local, transport = carrier.name(), "listening for links");
            }
            tasks.spawn(run_acceptor(
                listener,
                carrier,
                context.clone(),
                stop.clone(),
            ));
        }
    }
    let gateway_name = config.gateway.name.clone().unwrap_or_default();
    for peer in config.peer.iter().filter(|p| !p.connect.is_empty()) {
        let dials_tls = peer
            .connect
            .iter()
            .any(|a| matches!(a, LinkAddress::WebSocket { tls: true, .. }));
        let tls = match dials_tls {
            true => Some(crate::tls::client_config(
                peer.ca_file.as_deref(),
                peer.tls_verify,
            )?),
            false => None,
        };
        let target = DialTarget {
            peer: peer.name.clone(),
            connect: peer.connect.clone(),
            route: Route::new(peer.via.clone(), tls, ROUTE_TIMEOUT, links.clone()),
            credential: credential(peer, static_keys.as_ref(), &gateway_name),
        };
        tasks.spawn(run_dialer(
            target,
            links.clone(),
            dispatch.clone(),
            session_config(peer),
            stop.clone(),
        ));
    }
    Ok(())
}

/// What a `[link] listen` entry's connections carry.
fn carrier(config: &Config, address: &LinkAddress) -> Result<Carrier, String> {
    let LinkAddress::WebSocket { path, tls, .. } = address else {
        return Ok(Carrier::Tcp);
    };
    let tls = match (tls, &config.link) {
        (false, _) => None,
        (true, Some(link)) => {
            let (Some(cert), Some(key)) = (&link.tls_cert, &link.tls_key) else {
                return Err(format!("{address} needs [link] tls_cert and tls_key"));
            };
            Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
                cert, key,
            )?))
        }
        (true, None) => return Err(format!("{address} needs [link] tls_cert and tls_key")),
    };
    Ok(Carrier::WebSocket {
        path: path.clone(),
        tls,
    })
}

/// The session tunables for the link to `peer`: its keepalive, and down
/// after three unanswered keepalive intervals.
pub fn session_config(peer: &crate::config::PeerConfig) -> SessionConfig {
    SessionConfig {
        keepalive: peer.keepalive.0,
        pace: peer.bandwidth.map(|b| b.bytes_per_second),
        dead_after: peer.keepalive.0 * 3,
        max_streams: peer.max_streams as usize,
        ..SessionConfig::default()
    }
}

/// How we authenticate to a peer we dial: its pinned key, or the password.
fn credential(
    peer: &crate::config::PeerConfig,
    keys: Option<&StaticKeys>,
    gateway_name: &str,
) -> DialCredential {
    match (&peer.public_key, keys) {
        (Some(key), Some(keys)) => DialCredential::Key {
            keys: keys.clone(),
            peer_key: decode_public_key(key).expect("validation checked the key"),
        },
        _ => DialCredential::Password {
            user: peer
                .user
                .clone()
                .unwrap_or_else(|| gateway_name.to_string()),
            password: peer
                .password
                .clone()
                .expect("validation resolved the password"),
        },
    }
}

/// The key-mode peers that dial in, by their public key.
fn key_peers(config: &Config) -> HashMap<[u8; 32], String> {
    config
        .peer
        .iter()
        .filter(|p| p.connect.is_empty())
        .filter_map(|p| {
            let key = decode_public_key(p.public_key.as_deref()?).ok()?;
            Some((key, p.name.clone()))
        })
        .collect()
}

/// The registration records of password-mode peers that dial in: given in
/// the config, or made now from the configured password (Argon2id, off the
/// async threads).
async fn peer_records(
    config: &Config,
    identity: &Identity,
) -> Result<HashMap<String, PeerRecord>, String> {
    let mut records = HashMap::new();
    let identity_bytes = identity.to_bytes();
    let password_peers = config
        .peer
        .iter()
        .filter(|p| p.connect.is_empty() && p.public_key.is_none());
    for peer in password_peers {
        let record = if let Some(record) = &peer.record {
            decode_peer_record(record.expose())?
        } else {
            let password = peer
                .password
                .clone()
                .expect("validation resolved the password");
            let name = peer.name.clone();
            let bytes = identity_bytes.clone();
            tokio::task::spawn_blocking(move || {
                let identity = Identity::from_bytes(&bytes).map_err(|e| e.to_string())?;
                PeerRecord::register(
                    &mut rand::rngs::OsRng,
                    &identity,
                    &name,
                    password.expose().as_bytes(),
                )
                .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())??
        };
        records.insert(peer.name.clone(), record);
    }
    Ok(records)
}
