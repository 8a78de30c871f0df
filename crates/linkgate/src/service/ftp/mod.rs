//! The FTP proxy (DESIGN §3). Clients log in as `USER user@host[:port]`
//! (or normally, when the service has a fixed `target`); commands and
//! replies are then relayed, except the data-connection ones:
//!
//! - towards the server the gateway always uses passive mode (PASV, or EPSV
//!   for an IPv6 server), so data connections work through `via` and
//!   whenever only the gateway can reach the server;
//! - a client's PASV/EPSV gets an address on the gateway, which relays the
//!   connection it accepts there (from the client's own address only) to the
//!   server's passive port;
//! - a client's PORT/EPRT (only to its own address, so no FTP bounce) is
//!   answered by the gateway, which connects to the client itself and
//!   relays to the server's passive port.
//!
//! Everything is counted in the session's one audit record.

mod conn;
mod data;
mod link_data;
mod login;
mod session;

pub use link_data::{data_stream_name, parse_data_stream_name, LinkDataSlots, Offer};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::ServiceRuntime;
use crate::audit::{Audit, AuditResult};
use crate::inbound::{ClientId, Inbound};
use conn::Conn;
use session::{Counters, Session};

const FTP_PORT: u16 = 21;
/// Data connections a session may have open or waiting at once.
const MAX_DATA_CONNECTIONS: usize = 4;
/// How long the session's audit record waits for data connections still
/// running when the control connection ends.
const DATA_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves one FTP client.
pub async fn serve(
    service: &ServiceRuntime,
    inbound: Inbound,
    audit: &mut Audit,
    stop: &CancellationToken,
) {
    let (client_ip, client_peer) = match &inbound.client {
        ClientId::Addr(addr) => (Some(crate::access::canonical(addr.ip())), None),
        ClientId::Peer(peer) => (None, Some(peer.clone())),
    };
    let local = inbound.local_addr();
    let inbound_client = inbound.client;
    let mut client = Conn::new(inbound.stream);
    let timeout = service.config.handshake_timeout;
    let login_deadline = tokio::time::Instant::now() + timeout.0;
    let login = tokio::time::timeout(
        timeout.0,
        login::reach_server(service, &mut client, &inbound_client, audit),
    )
    .await;
    let (mut server, server_side, pending) = match login {
        Ok(Ok(reached)) => reached,
        Ok(Err(Ended)) => return finish_refused(&mut client).await,
        Err(_) => {
            let _ = client.send(b"421 Login not finished in time\r\n").await;
            finish_refused(&mut client).await;
            return audit.finish(
                AuditResult::Error,
                format!("login not finished within {timeout}"),
            );
        }
    };
    let mut session = Session {
        service,
        client_ip,
        client_peer,
        local,
        server: server_side,
        pending: pending.into_iter().collect(),
        counters: Arc::new(Counters::default()),
        data_slots: Arc::new(Semaphore::new(MAX_DATA_CONNECTIONS)),
        stop: stop.clone(),
        abandon_last: CancellationToken::new(),
        login_deadline: Some(login_deadline),
        // The user is known here: `reach_server` logged the client in.
        caps: audit.caps.for_user(audit.user.as_deref()),
    };
    let (result, reason) = session.relay(&mut client, &mut server).await;
    // Close both control connections properly: over a link, a stream that is
    // just dropped reads as reset on the other side.
    let closing = async {
        let _ = server.stream.shutdown().await;
        let _ = client.stream.shutdown().await;
    };
    let _ = tokio::time::timeout(DATA_DRAIN, closing).await;
    // A transfer can still be finishing: let its bytes into the record.
    let _ = tokio::time::timeout(
        DATA_DRAIN,
        session.data_slots.acquire_many(MAX_DATA_CONNECTIONS as u32),
    )
    .await;
    audit.bytes_up = session.counters.up.load(Ordering::Relaxed);
    audit.bytes_down = session.counters.down.load(Ordering::Relaxed);
    audit.finish(result, reason);
}

/// The session ended before relaying began; `audit` says why.
struct Ended;

/// Ends a client's control connection after the reply that refused its
/// login: finished, not dropped, so that over a link the reply is not
/// overtaken by the stream's reset.
async fn finish_refused(client: &mut Conn) {
    let _ = tokio::time::timeout(DATA_DRAIN, client.stream.shutdown()).await;
}
