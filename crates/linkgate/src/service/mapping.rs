//! The mapping service (DESIGN §3): every client is connected to the fixed
//! `target` and relayed both ways until both sides close.

use tokio_util::sync::CancellationToken;

use super::ServiceRuntime;
use crate::audit::{Audit, AuditResult};
use crate::inbound::Inbound;
use crate::relay::{relay, RelayEnd};

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
            audit.finish(AuditResult::Error, e.to_string());
            return;
        }
    };
    let outcome = relay(
        &mut inbound.stream,
        &mut upstream,
        service.config.idle_timeout.0,
        stop,
    )
    .await;
    audit.bytes_up = outcome.bytes_up;
    audit.bytes_down = outcome.bytes_down;
    match outcome.end {
        RelayEnd::Closed => audit.finish(AuditResult::Ok, "closed"),
        RelayEnd::IdleTimeout => audit.finish(
            AuditResult::Ok,
            format!("idle timeout ({})", service.config.idle_timeout),
        ),
        RelayEnd::Shutdown => audit.finish(
            AuditResult::Error,
            "gateway shutting down: grace period over",
        ),
        RelayEnd::Error(e) => audit.finish(AuditResult::Error, e),
    }
}
