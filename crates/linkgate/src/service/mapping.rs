//! The mapping service (DESIGN §3): every client is connected to the fixed
//! `target` and relayed both ways until both sides close.

use tokio_util::sync::CancellationToken;

use super::ServiceRuntime;
use crate::audit::{Audit, AuditResult};
use crate::config::Hop;
use crate::inbound::{ClientId, Inbound};
use crate::links::{StreamClientGuard, StreamClients};
use crate::relay::relay_and_record;
use crate::stream::Stream;

/// Connects `inbound` to the service's target and relays until done.
pub async fn serve(
    service: &ServiceRuntime,
    mut inbound: Inbound,
    audit: &mut Audit,
    stop: &CancellationToken,
) {
    let Some(target) = &service.config.target else {
        // Validation guarantees a target; keep the record honest if not.
        audit.finish(AuditResult::Error, "the mapping has no target");
        return;
    };
    audit.target = target.to_string();
    let mut upstream = match service.connector.connect(target).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(error = %e, "connect failed");
            audit.finish(e.audit_result(), e.to_string());
            return;
        }
    };
    // A peer's socks service may ask for a UDP relay next to this client.
    let _client_of_stream = register_client_of_stream(service, target, &inbound, &mut upstream);
    let idle = service.config.idle_timeout;
    relay_and_record(
        &mut inbound.stream,
        &mut upstream,
        &[],
        idle,
        stop,
        audit,
        "closed",
    )
    .await;
}

/// Registers the client of a stream straight to `link://PEER/SERVICE`
/// (see [`crate::links::StreamClients`]) while the guard lives.
fn register_client_of_stream(
    service: &ServiceRuntime,
    target: &Hop,
    inbound: &Inbound,
    upstream: &mut Stream,
) -> Option<StreamClientGuard> {
    let Hop::Link { peer, .. } = target else {
        return None;
    };
    let (ClientId::Addr(client), Some(local)) = (&inbound.client, inbound.local_addr()) else {
        return None;
    };
    if !service.config.via.is_empty() {
        return None;
    }
    let stream = upstream.as_link()?.id();
    Some(StreamClients::register(
        &service.links,
        peer,
        stream,
        service.name.clone(),
        *client,
        local,
    ))
}
