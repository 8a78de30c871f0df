//! The mapping service (DESIGN §3): every client is connected to the fixed
//! `target` and relayed both ways until both sides close.

use tokio_util::sync::CancellationToken;

use super::ServiceRuntime;
use crate::audit::{Audit, AuditResult};
use crate::inbound::Inbound;
use crate::relay::relay_and_record;

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
