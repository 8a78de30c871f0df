//! The running gateway: binds every service's listeners and the link
//! listener, dials peers, admits clients (TCP or link streams) through
//! limits and access rules, and drains on shutdown.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use link::session::IncomingStream;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::access::Verdict;
use crate::audit::{Audit, AuditResult};
use crate::config::{Config, Host, HostPort, Listen};
use crate::inbound::{ClientId, Inbound};
use crate::links::{self, Links, StreamDispatch};
use crate::service::{parse_data_stream_name, LinkDataSlots, ServiceRuntime, SharedContext};
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
    /// The identity file, a peer record or a TLS file could not be prepared.
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
    /// Cancelled after the drain: closes links (with close records).
    stop_links: CancellationToken,
    link_tasks: TaskTracker,
    links: Arc<Links>,
    /// FTP data connections offered to peers (kept across reloads).
    ftp_data: Arc<LinkDataSlots>,
    /// Live connections and services' counters (kept across reloads).
    connections: Arc<crate::connections::Registry>,
    metrics: Arc<crate::metrics::MetricsBook>,
    /// `[[user]] bandwidth` caps (a reload keeps those whose rate stays).
    user_caps: Arc<crate::limits::UserCaps>,
    /// The running services, by name; shared with the link dispatcher.
    services: ServiceTable,
    /// Services the last reload could not start.
    failed: crate::admin::FailedServices,
    /// Each running service's listeners.
    listeners: HashMap<String, ServiceListeners>,
    /// The configuration running now.
    config: Config,
}

use crate::admin::ServiceTable;

/// One service's accept loops, stoppable without touching its connections.
struct ServiceListeners {
    stop: CancellationToken,
    loops: TaskTracker,
}

/// Numbers connections across the whole gateway (for logs and audit).
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Admits streams that peers open to this gateway's services.
struct GatewayDispatch {
    services: ServiceTable,
    ftp_data: Arc<LinkDataSlots>,
    /// For peers' requests about our own streams (SOCKS UDP relays).
    links: Arc<Links>,
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
        let ftp_data = Arc::new(LinkDataSlots::default());
        let connections = Arc::new(crate::connections::Registry::default());
        let metrics = Arc::new(crate::metrics::MetricsBook::default());
        let shared = SharedContext {
            links: links.clone(),
            users: Arc::new(UserDb::new(&config.user)),
            ftp_data: ftp_data.clone(),
            connections: connections.clone(),
            metrics: metrics.clone(),
            user_caps: Arc::new(crate::limits::UserCaps::new(&config.user)),
        };
        let mut runtimes = HashMap::new();
        let mut bound_listeners = Vec::new();
        for service in &config.service {
            let runtime = ServiceRuntime::new(service.clone(), &shared);
            bound_listeners.push((runtime.clone(), bind_service(service).await?));
            runtimes.insert(service.name.clone(), runtime);
        }
        let mut link_listeners = Vec::new();
        if let Some(link) = &config.link {
            for addr in &link.listen {
                let bound = bind(addr.addr())
                    .await
                    .map_err(|source| RuntimeError::Listen {
                        what: "[link]".into(),
                        addr: addr.to_string(),
                        source,
                    })?;
                link_listeners.extend(bound.into_iter().map(|socket| (socket, addr.clone())));
            }
        }

        let mut listeners = HashMap::new();
        for (runtime, sockets) in bound_listeners {
            let started = start_accepting(&runtime, sockets, &shutdown);
            listeners.insert(runtime.config.name.clone(), started);
        }
        let services: ServiceTable = Arc::new(std::sync::RwLock::new(runtimes));
        let dispatch: Arc<dyn StreamDispatch> = Arc::new(GatewayDispatch {
            services: services.clone(),
            ftp_data: ftp_data.clone(),
            links: links.clone(),
            shutdown: shutdown.clone(),
        });
        let stop_links = CancellationToken::new();
        let link_tasks = TaskTracker::new();
        links::start(
            config,
            link_listeners,
            &links,
            &dispatch,
            &stop_links,
            &link_tasks,
        )
        .await
        .map_err(RuntimeError::Identity)?;
        link_tasks.close();
        Ok(Gateway {
            shutdown,
            stop_links,
            link_tasks,
            links,
            ftp_data,
            connections,
            metrics,
            user_caps: shared.user_caps.clone(),
            services,
            failed: Default::default(),
            listeners,
            config: config.clone(),
        })
    }

    /// What the admin endpoint reports on.
    pub fn admin_state(&self, started: std::time::Instant) -> crate::admin::AdminState {
        crate::admin::AdminState {
            gateway: self.config.gateway.name.clone().unwrap_or_default(),
            services: self.services.clone(),
            failed: self.failed.clone(),
            links: self.links.clone(),
            peers: self
                .config
                .peer
                .iter()
                .map(|p| crate::admin::PeerInfo {
                    name: p.name.clone(),
                    dials: !p.connect.is_empty(),
                    bandwidth: p.bandwidth,
                    auth: if p.public_key.is_some() {
                        "key"
                    } else {
                        "password"
                    },
                })
                .collect(),
            started,
            connections: self.connections.clone(),
            history: Arc::default(),
            login: (!self.config.gateway.admin_users.is_empty()).then(|| {
                crate::admin::AdminLogin {
                    users: Arc::new(UserDb::new(&self.config.user)),
                    allowed: self.config.gateway.admin_users.clone(),
                }
            }),
        }
    }

    /// Applies a new, validated configuration (SIGHUP). Services whose
    /// configuration did not change keep running untouched; removed or
    /// changed ones stop accepting (their established connections go on
    /// until they end); new and changed ones start. Changes to `[gateway]`,
    /// `[link]` and `[[peer]]` need a restart and are reported as such.
    pub async fn reload(&mut self, new: Config) {
        if new.gateway != self.config.gateway
            || new.link != self.config.link
            || new.peer != self.config.peer
        {
            tracing::warn!(
                "reload: changes to [gateway], [link] or [[peer]] take effect only after a restart"
            );
        }
        let users_changed = new.user != self.config.user;
        let shared = SharedContext {
            links: self.links.clone(),
            users: Arc::new(UserDb::new(&new.user)),
            ftp_data: self.ftp_data.clone(),
            connections: self.connections.clone(),
            metrics: self.metrics.clone(),
            user_caps: if users_changed {
                Arc::new(self.user_caps.updated(&new.user))
            } else {
                self.user_caps.clone()
            },
        };
        self.user_caps = shared.user_caps.clone();
        let unchanged = |service: &crate::config::ServiceConfig| {
            let old = self
                .config
                .service
                .iter()
                .find(|old| old.name == service.name);
            old == Some(service)
                && !(users_changed && service.auth == crate::config::AuthMode::Password)
        };
        let keep: Vec<String> = new
            .service
            .iter()
            .filter(|s| unchanged(s))
            .map(|s| s.name.clone())
            .collect();
        // Stop what goes away or changes first, so its ports are free again.
        let stopping: Vec<String> = self
            .listeners
            .keys()
            .filter(|name| !keep.contains(name))
            .cloned()
            .collect();
        let mut previous = HashMap::new();
        for name in &stopping {
            if let Some(old) = self.listeners.remove(name) {
                old.stop.cancel();
                old.loops.wait().await;
            }
            let old = self
                .services
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            if let Some(old) = old {
                previous.insert(name.clone(), old);
            }
        }
        let (mut started, mut failed) = (0, 0);
        let mut failures = HashMap::new();
        for service in new.service.iter().filter(|s| !keep.contains(&s.name)) {
            let runtime = match previous.get(&service.name) {
                Some(old) => ServiceRuntime::succeeding(service.clone(), &shared, old),
                None => ServiceRuntime::new(service.clone(), &shared),
            };
            match bind_service(service).await {
                Ok(sockets) => {
                    let accepting = start_accepting(&runtime, sockets, &self.shutdown);
                    self.listeners.insert(service.name.clone(), accepting);
                    self.services
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(service.name.clone(), runtime);
                    started += 1;
                }
                Err(e) => {
                    tracing::error!("reload: {e}; the service stays stopped");
                    failures.insert(service.name.clone(), (service.clone(), e.to_string()));
                    failed += 1;
                }
            }
        }
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = failures;
        tracing::info!(
            kept = keep.len(),
            stopped = stopping.len(),
            started,
            failed,
            "configuration reloaded"
        );
        self.config = new;
    }

    /// Stops accepting, lets live connections finish for up to `grace`,
    /// then closes the rest, waits for their audit records, and closes the
    /// links with authenticated close records.
    pub async fn shutdown(self, grace: Duration, hurry: impl std::future::Future<Output = ()>) {
        self.shutdown.stop_accepting.cancel();
        for listeners in self.listeners.values() {
            listeners.loops.wait().await;
        }
        self.shutdown.tracker.close();
        let live = self.shutdown.tracker.len();
        if live > 0 {
            tracing::info!(connections = live, grace = ?grace, "stopping: waiting for live connections");
        }
        let drained = tokio::select! {
            drained = tokio::time::timeout(grace, self.shutdown.tracker.wait()) => drained.is_ok(),
            () = hurry => {
                tracing::warn!("second stop signal: closing every connection now");
                false
            }
        };
        if !drained {
            tracing::warn!(
                connections = self.shutdown.tracker.len(),
                "grace period over: closing the remaining connections"
            );
            self.shutdown.close_all.cancel();
            self.shutdown.tracker.wait().await;
        }
        self.stop_links.cancel();
        self.links
            .close_all("gateway shutting down", Duration::from_secs(2))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.link_tasks.wait()).await;
    }
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// A service's bound sockets: TCP listeners, or UDP sockets for `udp`.
#[derive(Default)]
struct Bound {
    tcp: Vec<TcpListener>,
    udp: Vec<crate::service::udp_batch::DatagramSocket>,
}

/// Binds every listening socket of `service`.
async fn bind_service(service: &crate::config::ServiceConfig) -> Result<Bound, RuntimeError> {
    let mut bound = Bound::default();
    for listen in &service.listen {
        let Listen::Tcp(addr) = listen else { continue };
        let failed = |source| RuntimeError::Listen {
            what: format!("service {:?}", service.name),
            addr: addr.to_string(),
            source,
        };
        if service.kind == crate::config::ServiceKind::Udp {
            bound.udp.extend(bind_udp(addr).await.map_err(failed)?);
        } else {
            bound.tcp.extend(bind(addr).await.map_err(failed)?);
        }
    }
    Ok(bound)
}

/// The receive buffer a udp service's listening socket asks for.
const UDP_LISTEN_RECV_BUFFER: usize = 4 << 20;

/// Opens UDP sockets for `addr` (every address a name resolves to).
async fn bind_udp(addr: &HostPort) -> io::Result<Vec<crate::service::udp_batch::DatagramSocket>> {
    let addrs: Vec<SocketAddr> = match &addr.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, addr.port)],
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), addr.port))
            .await?
            .collect(),
    };
    let mut sockets = Vec::new();
    for local in addrs {
        let socket = Socket::new(Domain::for_address(local), Type::DGRAM, None)?;
        if local.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_nonblocking(true)?;
        // Every client's datagrams queue here while the workers are busy
        // elsewhere: the default (~200 KB, a few hundred small datagrams)
        // overflows in a 2 ms pause at 100k datagrams/s. Best effort: the
        // kernel caps it at net.core.rmem_max.
        let _ = socket.set_recv_buffer_size(UDP_LISTEN_RECV_BUFFER);
        socket.bind(&local.into())?;
        sockets.push(crate::service::udp_batch::DatagramSocket::new(
            socket.into(),
        )?);
    }
    Ok(sockets)
}

/// Starts the accept loops of one service; they stop with the gateway or
/// on their own token (reload).
fn start_accepting(
    runtime: &Arc<ServiceRuntime>,
    sockets: Bound,
    shutdown: &Shutdown,
) -> ServiceListeners {
    let stop = shutdown.stop_accepting.child_token();
    runtime.set_stop(stop.clone());
    let loops = TaskTracker::new();
    for socket in sockets.udp {
        let local = socket
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        tracing::info!(service = &*runtime.name, kind = "udp", listen = %local, "listening");
        // Flows end when the service stops: UDP has no graceful drain.
        loops.spawn(crate::service::udp::serve_socket(
            socket,
            runtime.clone(),
            stop.clone(),
        ));
    }
    for listener in sockets.tcp {
        let local = local_addr(&listener);
        tracing::info!(service = &*runtime.name, kind = runtime.config.kind.as_str(), listen = %local, "listening");
        loops.spawn(accept_loop(
            listener,
            runtime.clone(),
            shutdown.clone(),
            stop.clone(),
        ));
    }
    loops.close();
    ServiceListeners { stop, loops }
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
        // Accepted sockets inherit it on Linux: one system call less per client.
        socket.set_tcp_nodelay(true)?;
        socket.bind(&local.into())?;
        socket.listen(1024)?;
        listeners.push(TcpListener::from_std(socket.into())?);
    }
    Ok(listeners)
}

async fn accept_loop(
    listener: TcpListener,
    service: Arc<ServiceRuntime>,
    shutdown: Shutdown,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
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

/// A new audit record for a client of `service`, numbered gateway-wide.
/// A new number for a connection's log and audit records.
pub(crate) fn next_conn_id() -> u64 {
    NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed)
}

pub(crate) fn new_audit(service: &ServiceRuntime, client: &ClientId) -> Audit {
    let conn_id = next_conn_id();
    let mut audit = Audit::start(
        service.name.clone(),
        conn_id,
        client.to_string(),
        service.via_text.clone(),
    );
    if let Some(target) = &service.config.target {
        audit.target = target.to_string();
    }
    audit.metrics = Some(service.metrics.clone());
    audit
}

/// Applies the connection limit and access rules; on refusal fills in
/// `audit` and returns `None`.
fn admission(
    service: &ServiceRuntime,
    client: &ClientId,
    audit: &mut Audit,
) -> Option<crate::service::Admitted> {
    let slot = match service.admit(client) {
        Ok(admitted) => admitted,
        Err(why) => {
            audit.finish(AuditResult::Denied, why);
            return None;
        }
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
    mut slot: crate::service::Admitted,
    mut audit: Audit,
    shutdown: &Shutdown,
) {
    // Debug level: an enabled span is entered and left on every poll of the
    // connection's task (a measurable cost per HTTP request), and nothing
    // inside connections logs above debug.
    let span = tracing::debug_span!("conn", service = &*service.name, client = %inbound.client, conn_id = audit.conn_id);
    let service = service.clone();
    let close_all = shutdown.close_all.clone();
    audit.live = Some(service.connections.register(
        audit.conn_id,
        service.name.clone(),
        audit.client.clone(),
        service.via_text.clone(),
        service.metrics.clone(),
    ));
    audit.caps = std::mem::take(&mut slot.caps);
    let task = async move {
        let _slot = slot;
        let _active = service.metrics.active();
        service
            .serve(inbound, &mut audit, &close_all)
            .instrument(span)
            .await;
        audit.emit();
    };
    shutdown.tracker.spawn(task);
}

fn admit_tcp(service: &Arc<ServiceRuntime>, tcp: TcpStream, peer: SocketAddr, shutdown: &Shutdown) {
    // Linux copies TCP_NODELAY from the listening socket (set in `bind`).
    #[cfg(not(target_os = "linux"))]
    let _ = tcp.set_nodelay(true);
    let client = ClientId::Addr(peer);
    let mut audit = new_audit(service, &client);
    let Some(slot) = admission(service, &client, &mut audit) else {
        // Over a limit (not a rule): told why, in the client's protocol.
        if service.slots_full() || audit.reason.starts_with("max_connections_per_client") {
            crate::service::busy::refuse(service.config.kind, tcp, audit.reason.clone());
        }
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
    fn datagram(&self, peer: &str, datagram: link::session::Datagram) {
        let Some(name) = datagram.service.as_deref() else {
            return; // An answer to a flow we no longer have.
        };
        let service = self
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned();
        match service {
            Some(service)
                if service.config.kind == crate::config::ServiceKind::Udp
                    && service.config.listen.contains(&Listen::Link) =>
            {
                crate::service::udp::serve_link_datagram(
                    &service,
                    peer,
                    datagram,
                    &self.shutdown.tracker,
                );
            }
            Some(service)
                if service.config.kind == crate::config::ServiceKind::Socks
                    && service.config.listen.contains(&Listen::Link) =>
            {
                crate::service::socks::link_udp::serve_link_datagram(
                    &service,
                    peer,
                    datagram.payload,
                    datagram.flow,
                    &self.shutdown.tracker,
                );
            }
            _ => tracing::debug!(
                peer,
                service = name,
                "datagram for no udp service on links: dropped"
            ),
        }
    }

    fn dispatch(&self, peer: &str, request: IncomingStream) {
        if let Some((service, ticket)) = parse_data_stream_name(&request.service) {
            return self.dispatch_ftp_data(peer, service.to_string(), ticket, request);
        }
        if let Some(asked) = crate::service::socks::relay::parse_relay_stream_name(&request.service)
        {
            return crate::service::socks::relay::serve_relay_request(
                &self.links,
                peer,
                asked,
                request,
                &self.shutdown.tracker,
                self.shutdown.close_all.clone(),
            );
        }
        let client = ClientId::Peer(peer.to_string());
        let service = self
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&request.service)
            .cloned();
        let Some(service) = service else {
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
        let service = &service;
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

impl GatewayDispatch {
    /// A data stream for an FTP session of `service` whose client is `peer`:
    /// handed to the session that offered `ticket` to that peer, or refused
    /// and audited. (Its bytes go into the session's own audit record, and
    /// it is let in while the gateway drains: its session is already live.)
    fn dispatch_ftp_data(&self, peer: &str, service: String, ticket: u16, request: IncomingStream) {
        if !self.ftp_data.is_offered(peer, &service, ticket) {
            let conn_id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
            let client = ClientId::Peer(peer.to_string());
            let mut audit = Audit::start(
                service.as_str().into(),
                conn_id,
                client.to_string(),
                "".into(),
            );
            audit.target = request.service.clone();
            let reason =
                format!("no FTP data connection {ticket} of service {service:?} awaits this peer");
            audit.finish(AuditResult::Denied, reason.clone());
            audit.emit();
            request.refuse(&reason);
            return;
        }
        if let Some(stream) = request.accept() {
            // Should the offer have expired meanwhile, the stream is dropped
            // and the peer sees it end.
            let _ = self
                .ftp_data
                .claim(peer, &service, ticket, Stream::Boxed(Box::new(stream)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `admit_tcp` relies on accepted sockets inheriting TCP_NODELAY from
    /// the listener on Linux.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let addr = HostPort {
            host: Host::Ip("127.0.0.1".parse().unwrap()),
            port: 0,
        };
        let listener = bind(&addr).await.unwrap().remove(0);
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let ((accepted, _), _client) = tokio::try_join!(listener.accept(), client).unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    /// Two link sessions joined over loopback TCP (keys made up: the
    /// handshake is not what this tests), and the streams the second one
    /// receives.
    async fn session_pair() -> (
        link::session::Session,
        link::session::Session,
        tokio::sync::mpsc::Receiver<IncomingStream>,
    ) {
        use link::handshake::SessionKeys;
        use link::session::{Role, Session, SessionConfig};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialed = TcpStream::connect(listener.local_addr().unwrap());
        let (dialed, (accepted, _)) = tokio::try_join!(dialed, listener.accept()).unwrap();
        let keys = |send: u8, recv: u8| SessionKeys {
            send: [send; 32],
            recv: [recv; 32],
            session_id: [0; 32],
            features: link::params::Features::NONE,
        };
        let (dialer, _) =
            Session::start(dialed, keys(1, 2), Role::Dialer, SessionConfig::default());
        let (acceptor, incoming) = Session::start(
            accepted,
            keys(2, 1),
            Role::Acceptor,
            SessionConfig::default(),
        );
        (dialer, acceptor, incoming)
    }

    /// A dispatcher with no services, for the link-level request tests.
    fn test_dispatch(ftp_data: Arc<LinkDataSlots>, links: Arc<Links>) -> Arc<GatewayDispatch> {
        Arc::new(GatewayDispatch {
            services: ServiceTable::default(),
            ftp_data,
            links,
            shutdown: Shutdown {
                stop_accepting: CancellationToken::new(),
                close_all: CancellationToken::new(),
                tracker: TaskTracker::new(),
            },
        })
    }

    /// Hands every stream `peer` opens to `dispatch`, until aborted.
    fn serve_requests(
        dispatch: Arc<GatewayDispatch>,
        peer: &'static str,
        mut incoming: tokio::sync::mpsc::Receiver<IncomingStream>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(request) = incoming.recv().await {
                dispatch.dispatch(peer, request);
            }
        })
    }

    /// An FTP data stream is handed over only for a ticket offered to that
    /// very peer; any other is refused (and audited).
    #[tokio::test]
    async fn ftp_data_streams_need_a_ticket_offered_to_that_peer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ftp_data = Arc::new(LinkDataSlots::default());
        let dispatch = test_dispatch(ftp_data.clone(), Arc::new(Links::default()));
        let (spoke, _hub_session, incoming) = session_pair().await;
        let hub = serve_requests(dispatch, "spoke", incoming);
        let offer = ftp_data.offer("spoke", "ftp").unwrap();
        let ticket = offer.ticket;
        // Another ticket, and the offered ticket for another peer: refused.
        let wrong = crate::service::data_stream_name("ftp", ticket.wrapping_add(1).max(1));
        let refused = spoke.open(&wrong).await.err().expect("refused");
        assert!(
            refused.to_string().contains("awaits this peer"),
            "{refused}"
        );
        let elsewhere = ftp_data.offer("other", "ftp").unwrap();
        let foreign = crate::service::data_stream_name("ftp", elsewhere.ticket);
        if elsewhere.ticket != ticket {
            assert!(spoke.open(&foreign).await.is_err());
        }
        // The offered one reaches the session that offered it.
        let mut stream = spoke
            .open(&crate::service::data_stream_name("ftp", ticket))
            .await
            .unwrap();
        stream.write_all(b"data").await.unwrap();
        let mut received = offer.stream().await.unwrap();
        let mut got = [0u8; 4];
        received.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"data");
        // Used once: the same ticket again is refused.
        let again = crate::service::data_stream_name("ftp", ticket);
        assert!(spoke.open(&again).await.is_err());
        hub.abort();
    }

    /// A peer may ask for a UDP relay only next to the client of a stream
    /// this gateway opened to it, once: any other request is refused.
    #[tokio::test]
    async fn udp_relays_are_only_for_our_own_streams_clients() {
        use crate::links::StreamClients;
        use crate::service::socks::relay::{relay_stream_name, RelayRequest};
        let links = Arc::new(Links::default());
        let dispatch = test_dispatch(Arc::new(LinkDataSlots::default()), links.clone());
        let (hub, _spoke_session, incoming) = session_pair().await;
        let spoke = serve_requests(dispatch, "hub", incoming);
        let client = "127.0.0.1:40000".parse().unwrap();
        let local = "127.0.0.1:1080".parse().unwrap();
        let _guard = StreamClients::register(&links, "hub", 5, "socks".into(), client, local);
        let ask = |stream| {
            relay_stream_name(RelayRequest {
                stream,
                flow: 2,
                port: 0,
            })
        };
        let refused = hub.open(&ask(6)).await.err().expect("refused");
        assert!(
            refused.to_string().contains("carries no client"),
            "{refused}"
        );
        // The right stream; this test's gateway has no live link to set the
        // relay up on, but the stream's one relay is spent.
        assert!(hub.open(&ask(5)).await.is_err());
        let again = hub.open(&ask(5)).await.err().expect("refused");
        assert!(again.to_string().contains("carries no client"), "{again}");
        spoke.abort();
    }
}
