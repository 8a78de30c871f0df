//! The services: what happens to a client connection once it is admitted.
//! One module per service type; [`ServiceRuntime`] holds what they share.

mod http_proxy;
mod lockstep;
mod mapping;
mod socks;
mod telnet;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::access::{AccessList, Destinations};
use crate::audit::{Audit, AuditResult};
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
    /// Counters for the admin page.
    pub metrics: Arc<crate::metrics::ServiceMetrics>,
    slots: Arc<Semaphore>,
}

/// What every service shares with the rest of the gateway.
#[derive(Clone)]
pub struct SharedContext {
    /// Live links, for `link://` hops.
    pub links: Arc<Links>,
    /// `[[user]]` accounts.
    pub users: Arc<UserDb>,
}

impl ServiceRuntime {
    /// Builds the runtime of one validated service configuration.
    pub fn new(config: ServiceConfig, shared: &SharedContext) -> Arc<Self> {
        let connector = Connector::for_service(&config, shared.links.clone());
        Arc::new(ServiceRuntime {
            name: config.name.as_str().into(),
            access: AccessList::for_service(&config),
            destinations: Destinations::for_service(&config),
            via_text: connector.via_text().into(),
            connector,
            users: shared.users.clone(),
            metrics: Arc::default(),
            slots: Arc::new(Semaphore::new(config.max_connections as usize)),
            config,
        })
    }

    /// Takes one of the service's `max_connections` slots, if any is free.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
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
            // Validation refuses the others until they are built.
            other => audit.finish(
                AuditResult::Error,
                format!("the {} service type is not available yet", other.as_str()),
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
