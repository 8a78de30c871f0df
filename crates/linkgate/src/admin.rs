//! The admin HTTP endpoint (`[gateway] admin`): a status page at `/`, JSON
//! at `/api/status` (what `linkgate status` prints), Prometheus text at
//! `/metrics`. Read-only; it listens where the config says (loopback by
//! default), so it needs no login.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::links::Links;
use crate::metrics::MetricsSnapshot;
use crate::service::ServiceRuntime;

/// The services table the gateway keeps (swapped on reload).
pub type ServiceTable =
    Arc<std::sync::RwLock<std::collections::HashMap<String, Arc<ServiceRuntime>>>>;

/// What the admin endpoint reports on.
#[derive(Clone)]
pub struct AdminState {
    /// This gateway's name.
    pub gateway: String,
    /// The running services.
    pub services: ServiceTable,
    /// Live links.
    pub links: Arc<Links>,
    /// Configured peers.
    pub peers: Vec<PeerInfo>,
    /// When the gateway started.
    pub started: Instant,
}

/// `/api/status`.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct Status {
    /// Gateway name.
    pub gateway: String,
    /// linkgate version.
    pub version: String,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Services, by name.
    pub services: Vec<ServiceStatus>,
    /// Links, by peer name.
    pub links: Vec<LinkStatus>,
}

/// One service in `/api/status`.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct ServiceStatus {
    /// Name.
    pub name: String,
    /// mapping, socks, http, ftp or telnet.
    #[serde(rename = "type")]
    pub kind: String,
    /// Listen entries as configured.
    pub listen: Vec<String>,
    /// Counters.
    #[serde(flatten)]
    pub counters: MetricsSnapshot,
}

/// What the admin page shows of a configured peer.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The peer's local name.
    pub name: String,
    /// Whether this gateway dials it.
    pub dials: bool,
    /// `password` or `key`: how the link authenticates.
    pub auth: &'static str,
}

/// One link in `/api/status`.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct LinkStatus {
    /// The peer's local name.
    pub peer: String,
    /// `dials` (we connect to it) or `accepts` (it connects to us).
    pub role: String,
    /// `up` or `down`.
    pub state: String,
    /// `password` (OPAQUE) or `key` (pinned public keys).
    #[serde(default)]
    pub auth: String,
    /// While up: `tcp`, `ws` or `wss`.
    #[serde(default)]
    pub transport: String,
    /// While up: the hub's address as dialed, or the dialer's source address.
    #[serde(default)]
    pub address: String,
    /// While up, on the dialing side: the proxy chain it went through
    /// (passwords masked); empty when direct.
    #[serde(default)]
    pub via: String,
    /// While up: fresh key exchanges done on the link so far.
    #[serde(default)]
    pub key_exchanges: u64,
}

impl AdminState {
    /// The status now.
    pub fn status(&self) -> Status {
        let mut services: Vec<ServiceStatus> = self
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| ServiceStatus {
                name: s.config.name.clone(),
                kind: s.config.kind.as_str().to_string(),
                listen: s.config.listen.iter().map(ToString::to_string).collect(),
                counters: s.metrics.snapshot(),
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let links = self
            .peers
            .iter()
            .map(|peer| {
                let info = self.links.info(&peer.name);
                let session = self.links.session(&peer.name);
                LinkStatus {
                    peer: peer.name.clone(),
                    role: if peer.dials { "dials" } else { "accepts" }.into(),
                    state: if info.is_some() { "up" } else { "down" }.into(),
                    auth: peer.auth.into(),
                    key_exchanges: session.map_or(0, |s| s.stats().key_exchanges),
                    transport: info
                        .as_ref()
                        .map(|i| i.transport.to_string())
                        .unwrap_or_default(),
                    address: info.as_ref().map(|i| i.address.clone()).unwrap_or_default(),
                    via: info.map(|i| i.via).unwrap_or_default(),
                }
            })
            .collect();
        Status {
            gateway: self.gateway.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: self.started.elapsed().as_secs(),
            services,
            links,
        }
    }
}

/// Admin connections served at once; more are closed at accept.
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Time a client has to send a request head.
const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Time a connection may stay open at all (a console polls every few
/// seconds on a keep-alive connection; it reconnects after this).
const ADMIN_CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(300);

/// Binds the admin address; serves until `stop` is cancelled. At most
/// [`MAX_ADMIN_CONNECTIONS`] at once, each with a header timeout and a
/// bounded lifetime, so half-sent requests cannot pile up.
pub async fn start(
    addr: SocketAddr,
    state: AdminState,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(listen = %local, "admin listening");
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (socket, from) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed; pausing 100ms");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%from, "admin connection refused: {MAX_ADMIN_CONNECTIONS} already open");
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |request| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(respond(&state, &request)) }
                });
                let serving = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(socket), service);
                let _ = tokio::time::timeout(ADMIN_CONNECTION_LIFETIME, serving).await;
            });
        }
    });
    Ok(local)
}

fn respond(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        response
    };
    match request.uri().path() {
        "/api/status" => {
            let body = serde_json::to_string_pretty(&state.status()).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            prometheus(&state.status()),
        ),
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            html(&state.status()),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /, /api/status or /metrics\n".into(),
        ),
    }
}

fn prometheus(status: &Status) -> String {
    let mut out = String::new();
    out.push_str("# HELP linkgate_connections_active Connections being served.\n# TYPE linkgate_connections_active gauge\n");
    for s in &status.services {
        let _ = writeln!(
            out,
            "linkgate_connections_active{{service=\"{}\"}} {}",
            s.name, s.counters.active
        );
    }
    out.push_str("# HELP linkgate_connections_total Finished connections (HTTP: requests) by result.\n# TYPE linkgate_connections_total counter\n");
    for s in &status.services {
        let c = &s.counters;
        for (result, n) in [
            ("ok", c.ok),
            ("denied", c.denied),
            ("auth_failed", c.auth_failed),
            ("error", c.error),
        ] {
            let _ = writeln!(
                out,
                "linkgate_connections_total{{service=\"{}\",result=\"{result}\"}} {n}",
                s.name
            );
        }
    }
    out.push_str("# HELP linkgate_bytes_total Bytes relayed by finished connections.\n# TYPE linkgate_bytes_total counter\n");
    for s in &status.services {
        let _ = writeln!(
            out,
            "linkgate_bytes_total{{service=\"{}\",direction=\"up\"}} {}",
            s.name, s.counters.bytes_up
        );
        let _ = writeln!(
            out,
            "linkgate_bytes_total{{service=\"{}\",direction=\"down\"}} {}",
            s.name, s.counters.bytes_down
        );
    }
    out.push_str("# HELP linkgate_link_up Whether the link to a peer is up.\n# TYPE linkgate_link_up gauge\n");
    for l in &status.links {
        let _ = writeln!(
            out,
            "linkgate_link_up{{peer=\"{}\"}} {}",
            l.peer,
            u8::from(l.state == "up")
        );
    }
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn html(status: &Status) -> String {
    let mut out = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <title>linkgate {gw}</title><style>body{{font-family:sans-serif}}td,th{{padding:2px 10px;text-align:left}}</style>\
         </head><body><h1>linkgate {gw}</h1><p>version {v}, up {up} s</p><h2>Services</h2><table>\
         <tr><th>service</th><th>type</th><th>listen</th><th>active</th><th>ok</th><th>denied</th><th>auth failed</th>\
         <th>errors</th><th>bytes up</th><th>bytes down</th></tr>",
        gw = escape(&status.gateway),
        v = escape(&status.version),
        up = status.uptime_s
    );
    for s in &status.services {
        let c = &s.counters;
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&s.name),
            s.kind,
            escape(&s.listen.join(", ")),
            c.active,
            c.ok,
            c.denied,
            c.auth_failed,
            c.error,
            c.bytes_up,
            c.bytes_down
        );
    }
    out.push_str(
        "</table><h2>Links</h2><table><tr><th>peer</th><th>role</th><th>auth</th><th>state</th>\
         <th>transport</th><th>address</th><th>via</th></tr>",
    );
    for l in &status.links {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&l.peer),
            l.role,
            escape(&l.auth),
            l.state,
            escape(&l.transport),
            escape(&l.address),
            escape(&l.via)
        );
    }
    out.push_str("</table></body></html>\n");
    out
}
