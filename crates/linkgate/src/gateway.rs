//! The running gateway: binds every service's listeners and the link
//! listener, dials peers, admits clients (TCP or link streams) through
//! limits and access rules, and drains on shutdown.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use link::handshake::PeerRecord;
use link::session::{IncomingStream, SessionConfig};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::access::Verdict;
use crate::audit::{Audit, AuditResult};
use crate::config::{Config, Host, HostPort, Listen};
use crate::inbound::{ClientId, Inbound};
use crate::links::{self, AcceptContext, DialTarget, FailureTracker, Links, StreamDispatch};
use crate::service::{ServiceRuntime, SharedContext};
use crate::stream::Stream;
use crate::users::UserDb;

/// A failure while starting or running that is not the config's fault.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A listener could not be opened.
    #[error("{what}: cannot listen on {addr}: {source}")]
    Listen {
        /// `service "NAME"` or `[link]`.
        what: String,
        /// The address as configured.
        addr: String,
        /// The OS error (e.g. address in use, permission denied).
        source: io::Error,
    },
    /// The identity file or a peer record could not be prepared.
    #[error("{0}")]
    Identity(String),
}

/// Tokens and tracker shared by every accept loop and connection task.
#[derive(Clone)]
struct Shutdown {
    /// Cancelled first: stop accepting new clients and streams.
    stop_accepting: CancellationToken,
    /// Cancelled when the grace period is over: close live connections.
    close_all: CancellationToken,
    tracker: TaskTracker,
}

/// A started gateway. Dropping it does not stop it; call [`Gateway::shutdown`].
pub struct Gateway {
    shutdown: Shutdown,
    accept_loops: TaskTracker,
    /// Cancelled after the drain: closes links (with close records).
    stop_links: CancellationToken,
    link_tasks: TaskTracker,
    links: Arc<Links>,
    bound: Vec<(String, SocketAddr)>,
}

/// Numbers connections across the whole gateway (for logs and audit).
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Admits streams that peers open to this gateway's services.
struct GatewayDispatch {
    services: HashMap<String, Arc<ServiceRuntime>>,
    shutdown: Shutdown,
}

impl Gateway {
    /// Binds every listener of `config`, starts accepting, and starts the
    /// links. Fails without accepting anything if any listener cannot be opened.
    pub async fn start(config: &Config) -> Result<Gateway, RuntimeError> {
        let links = Arc::new(Links::default());
        let shutdown = Shutdown {
            stop_accepting: CancellationToken::new(),
            close_all: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };
        let shared = SharedContext {
            links: links.clone(),
            users: Arc::new(UserDb::new(&config.user)),
        };
        let mut services = HashMap::new();
        let mut listeners = Vec::new();
        for service in &config.service {
            let runtime = ServiceRuntime::new(service.clone(), &shared);
            services.insert(service.name.clone(), runtime.clone());
            for listen in &service.listen {
                let Listen::Tcp(addr) = listen else { continue };
                for listener in bind(addr).await.map_err(|source| RuntimeError::Listen {
                    what: format!("service {:?}", service.name),
                    addr: addr.to_string(),
                    source,
                })? {
                    listeners.push((runtime.clone(), listener));
                }
            }
        }
        let mut link_listeners = Vec::new();
        if let Some(link) = &config.link {
            for addr in &link.listen {
                link_listeners.extend(bind(addr).await.map_err(|source| RuntimeError::Listen {
                    what: "[link]".into(),
                    addr: addr.to_string(),
                    source,
                })?);
            }
        }

        let accept_loops = TaskTracker::new();
        let mut bound = Vec::new();
        for (service, listener) in listeners {
            let local = local_addr(&listener);
            tracing::info!(service = &*service.name, kind = service.config.kind.as_str(), listen = %local, "listening");
            bound.push((service.config.name.clone(), local));
            accept_loops.spawn(accept_loop(listener, service, shutdown.clone()));
        }
        accept_loops.close();

        let dispatch: Arc<dyn StreamDispatch> = Arc::new(GatewayDispatch {
            services,
            shutdown: shutdown.clone(),
        });
        let stop_links = CancellationToken::new();
        let link_tasks = TaskTracker::new();
        let session_config = SessionConfig::default();
        if !link_listeners.is_empty() {
            let context = Arc::new(AcceptContext {
                identity: links::identity::load_or_create(&config.gateway.identity)
                    .map_err(RuntimeError::Identity)?,
                records: HashMap::new(),
                links: links.clone(),
                dispatch: dispatch.clone(),
                config: session_config.clone(),
                failures: FailureTracker::default(),
            });
            let context = Arc::new(AcceptContext {
                records: peer_records(config, &context.identity).await?,
                ..Arc::into_inner(context).expect("not shared yet")
            });
            for listener in link_listeners {
                let local = local_addr(&listener);
                tracing::info!(service = "[link]", listen = %local, "listening for links");
                bound.push(("[link]".into(), local));
                link_tasks.spawn(links::run_acceptor(
                    listener,
                    context.clone(),
                    stop_links.clone(),
                ));
            }
        }
        let gateway_name = config.gateway.name.clone().unwrap_or_default();
        for peer in config.peer.iter().filter(|p| !p.connect.is_empty()) {
            let target = DialTarget {
                peer: peer.name.clone(),
                connect: peer.connect.clone(),
                user: peer.user.clone().unwrap_or_else(|| gateway_name.clone()),
                password: peer
                    .password
                    .clone()
                    .expect("validation resolved the password"),
            };
            link_tasks.spawn(links::run_dialer(
                target,
                links.clone(),
                dispatch.clone(),
                session_config.clone(),
                stop_links.clone(),
            ));
        }
        link_tasks.close();
        Ok(Gateway {
            shutdown,
            accept_loops,
            stop_links,
            link_tasks,
            links,
            bound,
        })
    }

    /// The addresses actually bound, by service name (`[link]` for the link
    /// listener); ports chosen by the OS when the config said `:0`.
    pub fn bound_addresses(&self) -> &[(String, SocketAddr)] {
        &self.bound
    }

    /// Stops accepting, lets live connections finish for up to `grace`,
    /// then closes the rest, waits for their audit records, and closes the
    /// links with authenticated close records.
    pub async fn shutdown(self, grace: Duration) {
        self.shutdown.stop_accepting.cancel();
        self.accept_loops.wait().await;
        self.shutdown.tracker.close();
        let live = self.shutdown.tracker.len();
        if live > 0 {
            tracing::info!(connections = live, grace = ?grace, "stopping: waiting for live connections");
        }
        if tokio::time::timeout(grace, self.shutdown.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = self.shutdown.tracker.len(),
                "grace period over: closing the remaining connections"
            );
            self.shutdown.close_all.cancel();
            self.shutdown.tracker.wait().await;
        }
        self.stop_links.cancel();
        self.links.close_all("gateway shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.link_tasks.wait()).await;
    }
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// The registration records of peers that dial in: given in the config, or
/// made now from the configured password (Argon2id, off the async threads).
async fn peer_records(
    config: &Config,
    identity: &link::handshake::Identity,
) -> Result<HashMap<String, PeerRecord>, RuntimeError> {
    let mut records = HashMap::new();
    let identity_bytes = identity.to_bytes();
    for peer in config.peer.iter().filter(|p| p.connect.is_empty()) {
        let record = if let Some(record) = &peer.record {
            crate::config::decode_peer_record(record.expose()).map_err(RuntimeError::Identity)?
        } else {
            let password = peer
                .password
                .clone()
                .expect("validation resolved the password");
            let name = peer.name.clone();
            let bytes = identity_bytes.clone();
            tokio::task::spawn_blocking(move || {
                let identity =
                    link::handshake::Identity::from_bytes(&bytes).map_err(|e| e.to_string())?;
                PeerRecord::register(
                    &mut rand::rngs::OsRng,
                    &identity,
                    &name,
                    password.expose().as_bytes(),
                )
                .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| RuntimeError::Identity(e.to_string()))?
            .map_err(RuntimeError::Identity)?
        };
        records.insert(peer.name.clone(), record);
    }
    Ok(records)
}

/// Opens listening sockets for `addr` (every address a name resolves to).
/// IPv6 sockets are IPv6-only so `0.0.0.0:P` and `[::]:P` can coexist.
async fn bind(addr: &HostPort) -> io::Result<Vec<TcpListener>> {
    let addrs: Vec<SocketAddr> = match &addr.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, addr.port)],
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), addr.port))
            .await?
            .collect(),
    };
    let mut listeners = Vec::new();
    for local in addrs {
        let socket = Socket::new(Domain::for_address(local), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        if local.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&local.into())?;
        socket.listen(1024)?;
        listeners.push(TcpListener::from_std(socket.into())?);
    }
    Ok(listeners)
}

async fn accept_loop(listener: TcpListener, service: Arc<ServiceRuntime>, shutdown: Shutdown) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.stop_accepting.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => admit_tcp(&service, tcp, peer, &shutdown),
            Err(e) => {
                // Typically EMFILE/ENFILE: back off instead of spinning.
                tracing::warn!(service = &*service.name, error = %e, "accept failed; pausing 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn new_audit(service: &ServiceRuntime, client: &ClientId) -> Audit {
    let conn_id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    let mut audit = Audit::start(
        service.name.clone(),
        conn_id,
        client.to_string(),
        service.via_text.clone(),
    );
    if let Some(target) = &service.config.target {
        audit.target = target.to_string();
    }
    audit
}

/// Applies the connection limit and access rules; on refusal fills in
/// `audit` and returns `None`.
fn admission(
    service: &ServiceRuntime,
    client: &ClientId,
    audit: &mut Audit,
) -> Option<OwnedSemaphorePermit> {
    let Some(slot) = service.try_slot() else {
        audit.finish(
            AuditResult::Denied,
            format!(
                "max_connections ({}) reached",
                service.config.max_connections
            ),
        );
        return None;
    };
    if let Verdict::Deny(why) = service.access.check(client, None) {
        audit.finish(AuditResult::Denied, why);
        return None;
    }
    Some(slot)
}

/// Serves an admitted client in its own task, writing its audit record at the end.
fn spawn_serve(
    service: &Arc<ServiceRuntime>,
    inbound: Inbound,
    slot: OwnedSemaphorePermit,
    mut audit: Audit,
    shutdown: &Shutdown,
) {
    let span = tracing::info_span!("conn", service = &*service.name, client = %inbound.client, conn_id = audit.conn_id);
    let service = service.clone();
    let close_all = shutdown.close_all.clone();
    shutdown.tracker.spawn(async move {
        let _slot = slot;
        service
            .serve(inbound, &mut audit, &close_all)
            .instrument(span)
            .await;
        audit.emit();
    });
}

fn admit_tcp(service: &Arc<ServiceRuntime>, tcp: TcpStream, peer: SocketAddr, shutdown: &Shutdown) {
    let _ = tcp.set_nodelay(true);
    let client = ClientId::Addr(peer);
    let mut audit = new_audit(service, &client);
    let Some(slot) = admission(service, &client, &mut audit) else {
        audit.emit();
        return;
    };
    let inbound = Inbound {
        stream: tcp.into(),
        client,
    };
    spawn_serve(service, inbound, slot, audit, shutdown);
}

impl StreamDispatch for GatewayDispatch {
    fn dispatch(&self, peer: &str, request: IncomingStream) {
        let client = ClientId::Peer(peer.to_string());
        let Some(service) = self.services.get(&request.service) else {
            let conn_id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
            let mut audit = Audit::start(
                request.service.as_str().into(),
                conn_id,
                client.to_string(),
                "".into(),
            );
            let reason = format!("no service named {:?} on this gateway", request.service);
            audit.finish(AuditResult::Denied, reason.clone());
            audit.emit();
            request.refuse(&reason);
            return;
        };
        let mut audit = new_audit(service, &client);
        let refuse =
            |mut audit: Audit, result: AuditResult, reason: String, request: IncomingStream| {
                audit.finish(result, reason.clone());
                audit.emit();
                request.refuse(&reason);
            };
        if !service.config.listen.contains(&Listen::Link) {
            let reason = format!(
                "service {:?} is not exported over links (listen has no \"link\")",
                service.config.name
            );
            return refuse(audit, AuditResult::Denied, reason, request);
        }
        if self.shutdown.stop_accepting.is_cancelled() {
            return refuse(
                audit,
                AuditResult::Error,
                "gateway shutting down".into(),
                request,
            );
        }
        let Some(slot) = admission(service, &client, &mut audit) else {
            let reason = audit.reason.clone();
            return refuse(audit, AuditResult::Denied, reason, request);
        };
        let Some(stream) = request.accept() else {
            audit.finish(
                AuditResult::Error,
                "the link closed before the stream was accepted",
            );
            audit.emit();
            return;
        };
        let inbound = Inbound {
            stream: Stream::Boxed(Box::new(stream)),
            client,
        };
        spawn_serve(service, inbound, slot, audit, &self.shutdown);
    }
}
