//! The running gateway: binds every service's listeners, accepts clients,
//! applies access rules and connection limits, and drains on shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::access::Verdict;
use crate::audit::{Audit, AuditResult};
use crate::config::{Config, Host, HostPort, Listen};
use crate::inbound::{ClientId, Inbound};
use crate::service::ServiceRuntime;

/// A failure while starting or running that is not the config's fault.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A listener could not be opened.
    #[error("service {service:?}: cannot listen on {addr}: {source}")]
    Listen {
        /// The service.
        service: String,
        /// The address as configured.
        addr: String,
        /// The OS error (e.g. address in use, permission denied).
        source: io::Error,
    },
}

/// Tokens and tracker shared by every accept loop and connection task.
#[derive(Clone)]
struct Shutdown {
    /// Cancelled first: stop accepting new clients.
    stop_accepting: CancellationToken,
    /// Cancelled when the grace period is over: close live connections.
    close_all: CancellationToken,
    tracker: TaskTracker,
}

/// A started gateway. Dropping it does not stop it; call [`Gateway::shutdown`].
pub struct Gateway {
    shutdown: Shutdown,
    accept_loops: TaskTracker,
    bound: Vec<(String, SocketAddr)>,
}

/// Numbers connections across the whole gateway (for logs and audit).
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

impl Gateway {
    /// Binds every listener of `config` and starts accepting. Fails without
    /// accepting anything if any listener cannot be opened.
    pub async fn start(config: &Config) -> Result<Gateway, RuntimeError> {
        let mut listeners = Vec::new();
        for service in &config.service {
            let runtime = ServiceRuntime::new(service.clone());
            for listen in &service.listen {
                let Listen::Tcp(addr) = listen else { continue };
                for listener in bind(addr).await.map_err(|source| RuntimeError::Listen {
                    service: service.name.clone(),
                    addr: addr.to_string(),
                    source,
                })? {
                    listeners.push((runtime.clone(), listener));
                }
            }
        }
        let shutdown = Shutdown {
            stop_accepting: CancellationToken::new(),
            close_all: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };
        let accept_loops = TaskTracker::new();
        let mut bound = Vec::new();
        for (service, listener) in listeners {
            let local = listener
                .local_addr()
                .map_err(|source| RuntimeError::Listen {
                    service: service.config.name.clone(),
                    addr: "?".into(),
                    source,
                })?;
            tracing::info!(service = &*service.name, kind = service.config.kind.as_str(), listen = %local, "listening");
            bound.push((service.config.name.clone(), local));
            accept_loops.spawn(accept_loop(listener, service, shutdown.clone()));
        }
        accept_loops.close();
        Ok(Gateway {
            shutdown,
            accept_loops,
            bound,
        })
    }

    /// The addresses actually bound, by service name (ports chosen by the OS
    /// when the config said `:0`).
    pub fn bound_addresses(&self) -> &[(String, SocketAddr)] {
        &self.bound
    }

    /// Stops accepting, lets live connections finish for up to `grace`,
    /// then closes the rest and waits for their audit records.
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
    }
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
            Ok((tcp, peer)) => admit(&service, tcp, peer, &shutdown),
            Err(e) => {
                // Typically EMFILE/ENFILE: back off instead of spinning.
                tracing::warn!(service = &*service.name, error = %e, "accept failed; pausing 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Applies limits and access rules to a new client, then serves it in its own task.
fn admit(service: &Arc<ServiceRuntime>, tcp: TcpStream, peer: SocketAddr, shutdown: &Shutdown) {
    let _ = tcp.set_nodelay(true);
    let client = ClientId::Addr(peer);
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
    let Some(slot) = service.try_slot() else {
        audit.finish(
            AuditResult::Denied,
            format!(
                "max_connections ({}) reached",
                service.config.max_connections
            ),
        );
        audit.emit();
        return;
    };
    if let Verdict::Deny(why) = service.access.check(&client, None) {
        audit.finish(AuditResult::Denied, why);
        audit.emit();
        return;
    }
    let span = tracing::info_span!("conn", service = &*service.name, client = %client, conn_id);
    let inbound = Inbound {
        stream: tcp.into(),
        client,
    };
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
