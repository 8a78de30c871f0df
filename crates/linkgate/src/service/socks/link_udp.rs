//! SOCKS5 UDP ASSOCIATE across a link: a SOCKS service whose `via` is one
//! `link://PEER/SOCKS` hop sends its clients' datagrams, SOCKS header and
//! all, on a datagram flow to that peer's SOCKS service, and the datagrams
//! leave from the other office; that service answers on the same flow,
//! each answer already wrapped in the SOCKS header that names its sender.
//!
//! Both ends apply their own rules: the client's gateway its `destinations`
//! (as for any SOCKS request), the peer's gateway its `allow` (`peer:`
//! names), `destinations` and `max_connections`, as for a link stream. A
//! flow is one association; the peer ends it after `idle_timeout` without
//! datagrams, with one audit record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use proto::socks::{self, Address};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::udp::UdpAssociation;
use crate::access::Verdict;
use crate::audit::{Audit, AuditResult};
use crate::config::AuthMode;
use crate::inbound::ClientId;
use crate::links::Links;
use crate::service::ServiceRuntime;

/// The client's side of a flow to a peer's SOCKS service.
pub(super) struct LinkLeg {
    links: Arc<Links>,
    peer: String,
    service: String,
    flow: u32,
    answers: mpsc::Receiver<Vec<u8>>,
}

impl LinkLeg {
    /// A new flow to `peer`'s `service`; `None` when the link is down.
    pub(super) fn open(links: &Arc<Links>, peer: &str, service: &str) -> Option<LinkLeg> {
        let (flow, answers) = links.open_flow(peer)?;
        Some(LinkLeg {
            links: links.clone(),
            peer: peer.to_string(),
            service: service.to_string(),
            flow,
            answers,
        })
    }

    /// The next answer on the flow, `None` once the flow is gone.
    pub(super) async fn recv(&mut self) -> Option<Vec<u8>> {
        self.answers.recv().await
    }

    /// Sends one datagram, SOCKS header and all; false if it was dropped.
    pub(super) fn send(&self, datagram: &[u8]) -> bool {
        self.links.session(&self.peer).is_some_and(|s| {
            s.send_datagram(self.flow, Some(&self.service), datagram)
                .is_ok()
        })
    }
}

impl Drop for LinkLeg {
    fn drop(&mut self) {
        self.links.close_flow(&self.peer, self.flow);
    }
}

/// The flows peers opened to a SOCKS service's UDP relay, by peer and flow.
#[derive(Default)]
pub struct SocksLinkFlows {
    flows: Mutex<HashMap<FlowKey, mpsc::Sender<Vec<u8>>>>,
    refused: crate::service::udp::RefusalMemory<FlowKey>,
}

/// A flow a peer opened: the peer's name and the flow's id.
type FlowKey = (String, u32);

impl std::fmt::Debug for SocksLinkFlows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SocksLinkFlows")
    }
}

/// Datagrams of one flow waiting for its task, at most.
const FLOW_BACKLOG: usize = 256;

/// A SOCKS-wrapped datagram of a flow that `peer` opened to `service` (a
/// SOCKS service that listens on links): handed to the flow's task, or the
/// flow is admitted and started.
pub fn serve_link_datagram(
    service: &Arc<ServiceRuntime>,
    peer: &str,
    datagram: Vec<u8>,
    flow: u32,
    tasks: &TaskTracker,
) {
    let table = &service.socks_link_flows;
    let key = (peer.to_string(), flow);
    let existing = table
        .flows
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    if let Some(sender) = existing {
        let _ = sender.try_send(datagram);
        return;
    }
    if table.refused.seen_lately(&key) {
        return;
    }
    let id = ClientId::Peer(peer.to_string());
    let mut audit = crate::gateway::new_audit(service, &id);
    audit.target = "UDP ASSOCIATE".into();
    audit.datagrams = Some([0, 0]);
    if service.config.auth == AuthMode::Password {
        audit.finish(
            AuditResult::AuthFailed,
            format!(
                "gateway {peer} offered no login: a link:// via hop speaks SOCKS5 without one; \
                 give peers a socks service with auth = \"none\" that allows peer:{peer}"
            ),
        );
        return audit.emit();
    }
    let admitted = match service.admit(&id) {
        Ok(admitted) => admitted,
        Err(why) => {
            audit.finish(AuditResult::Denied, why);
            return audit.emit();
        }
    };
    if let Verdict::Deny(why) = service.access.check(&id, None) {
        audit.finish(AuditResult::Denied, why);
        return audit.emit();
    }
    let (sender, receiver) = mpsc::channel(FLOW_BACKLOG);
    let _ = sender.try_send(datagram);
    table
        .flows
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key.clone(), sender);
    table.refused.forget(&key);
    tasks.spawn(run_flow(
        service.clone(),
        key,
        receiver,
        audit,
        admitted,
        service.udp_stop(),
    ));
}

/// One association for a peer: datagrams from the link go out to their
/// destinations; answers come back wrapped in the SOCKS header.
async fn run_flow(
    service: Arc<ServiceRuntime>,
    key: (String, u32),
    mut datagrams: mpsc::Receiver<Vec<u8>>,
    mut audit: Audit,
    admitted: crate::service::Admitted,
    stop: CancellationToken,
) {
    let _active = service.metrics.active();
    let mut association = UdpAssociation::new();
    let mut from_target = vec![0u8; 65536];
    let (mut sent, mut answered) = (0u64, 0u64);
    let idle = service.config.idle_timeout.0;
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    let reason = loop {
        tokio::select! {
            datagram = datagrams.recv() => {
                let Some(datagram) = datagram else { break "flow closed".to_string() };
                if association.forward(&service, &datagram).await.is_some() {
                    sent += 1;
                    sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                }
            }
            received = association.recv_from_target(&mut from_target) => {
                let Ok((n, from)) = received else { continue };
                if !association.knows(&from) {
                    continue; // nobody the client talked to: dropped
                }
                let mut answer = Vec::with_capacity(n + 22);
                if socks::encode_udp_header(&Address::Ip(from), &mut answer).is_err() {
                    continue;
                }
                answer.extend_from_slice(&from_target[..n]);
                let delivered = service.links.session(&key.0).is_some_and(|s| {
                    s.send_datagram(key.1, None, &answer).is_ok()
                });
                if delivered {
                    association.delivered(n);
                    answered += 1;
                    sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                }
            }
            () = &mut sleep => break format!("idle timeout ({})", service.config.idle_timeout),
            () = stop.cancelled() => break "service stopped".to_string(),
        }
    };
    service
        .socks_link_flows
        .flows
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key);
    drop(admitted);
    let (up, down) = association.bytes();
    audit.bytes_up = up;
    audit.bytes_down = down;
    audit.datagrams = Some([sent, answered]);
    audit.finish(AuditResult::Ok, reason);
    audit.emit();
}
