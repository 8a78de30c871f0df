//! The HTTP proxy service (DESIGN §3), on hyper: absolute-URI requests are
//! forwarded over keep-alive upstream connections (through the service's
//! connector, so `via` and links apply), `CONNECT` opens tunnels; bodies
//! stream both ways, never buffered whole.
//!
//! Each client connection keeps its own small pool of upstream connections
//! (at most [`MAX_UPSTREAMS`], by destination), and drives them inside its
//! own task: a request and its upstream exchange never hop between tasks or
//! threads, which is what makes small keep-alive requests cheap.
//!
//! Audit: one record per request or tunnel (when its response body ends);
//! a connection that carried no request gets one record of its own.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use base64::Engine;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use super::abortable::Abortable;
use super::ServiceRuntime;
use crate::access::Verdict;
use crate::audit::{Audit, AuditResult};
use crate::config::{AuthMode, Hop, HostPort};
use crate::connector::ConnectError;
use crate::inbound::Inbound;
use crate::relay::relay_and_record;
use crate::stream::Stream;

type Body = BoxBody<Bytes, hyper::Error>;

/// Longest wait for upstream connections to close when a client leaves.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
const VIA: &str = "1.1 linkgate";

/// Most upstream connections one client connection keeps for reuse.
pub const MAX_UPSTREAMS: usize = 8;

/// Upstream connections of one client connection, and the futures that
/// drive them (polled by the client connection's own task).
struct Upstreams {
    idle: Mutex<Vec<(HostPort, SendRequest<Body>)>>,
    drivers: Mutex<Drivers>,
}

#[derive(Default)]
struct Drivers {
    running: FuturesUnordered<Pin<Box<dyn Future<Output = ()> + Send>>>,
    waker: Option<std::task::Waker>,
}

impl Upstreams {
    fn new() -> Self {
        Upstreams {
            idle: Mutex::new(Vec::new()),
            drivers: Mutex::new(Drivers::default()),
        }
    }

    /// Adds an upstream connection's driver to this task's set.
    fn drive(&self, connection: impl Future<Output = ()> + Send + 'static) {
        let mut drivers = self.drivers.lock().unwrap_or_else(|p| p.into_inner());
        drivers.running.push(Box::pin(connection));
        if let Some(waker) = drivers.waker.take() {
            waker.wake();
        }
    }

    /// Polls every upstream connection; never completes.
    fn poll_drivers(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut drivers = self.drivers.lock().unwrap_or_else(|p| p.into_inner());
        while let Poll::Ready(Some(())) = drivers.running.poll_next_unpin(cx) {}
        drivers.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Closes every upstream connection properly, waiting at most
    /// [`CLOSE_WAIT`]: once its sender is gone hyper shuts each one down,
    /// whereas one that is just dropped reads as reset on the other side
    /// when it runs over a link.
    async fn close(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let drained = std::future::poll_fn(|cx| {
            let mut drivers = self.drivers.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                match drivers.running.poll_next_unpin(cx) {
                    Poll::Ready(Some(())) => {}
                    Poll::Ready(None) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        });
        let _ = tokio::time::timeout(CLOSE_WAIT, drained).await;
    }

    /// An idle connection to `target` that can take a request now.
    async fn checkout(&self, target: &HostPort) -> Option<SendRequest<Body>> {
        loop {
            let found = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                let index = idle.iter().position(|(key, _)| key == target)?;
                idle.swap_remove(index).1
            };
            let mut sender = found;
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Returns a connection for reuse, evicting the oldest beyond the bound.
    fn checkin(&self, target: HostPort, sender: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= MAX_UPSTREAMS {
            idle.remove(0);
        }
        idle.push((target, sender));
    }

    /// A ready connection to `target`: reused, or newly opened.
    /// A new connection obeys `caps` (those of the request that opened it).
    async fn connection(
        &self,
        service: &ServiceRuntime,
        target: &HostPort,
        caps: crate::limits::Caps,
    ) -> Result<SendRequest<Body>, UpstreamError> {
        if let Some(sender) = self.checkout(target).await {
            return Ok(sender);
        }
        let stream = service
            .connector
            .connect(&Hop::Direct(target.clone()))
            .await
            .map_err(UpstreamError::Connect)?;
        let stream = crate::capped::Capped::wrap(stream, caps, crate::limits::Way::Down);
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Http)?;
        self.drive(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

enum UpstreamError {
    Connect(ConnectError),
    Http(hyper::Error),
}

// === Serving a client connection ===

/// Serves one HTTP proxy client connection (any number of requests).
pub async fn serve(
    service: &ServiceRuntime,
    inbound: Inbound,
    audit: &mut Audit,
    stop: &CancellationToken,
) {
    let state = Arc::new(ConnState {
        upstreams: Upstreams::new(),
        requests: AtomicU64::new(0),
        login: Mutex::new(None),
        tunnel: Mutex::new(None),
        client_failed: Arc::new(AtomicBool::new(false)),
    });
    let io = TokioIo::new(Abortable::new(inbound.stream, state.client_failed.clone()));
    let handler = {
        let state = state.clone();
        let template = AuditTemplate::of(audit);
        let client_id = inbound.client.clone();
        hyper::service::service_fn(move |request| {
            let state = state.clone();
            let template = template.clone();
            let client_id = client_id.clone();
            async move {
                Ok::<_, Infallible>(handle(service, &state, &template, &client_id, request).await)
            }
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(service.config.handshake_timeout.0)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true)
        .serve_connection(io, handler)
        .with_upgrades();
    let drive = std::future::poll_fn(|cx| state.upstreams.poll_drivers(cx));
    let served = super::lockstep::lockstep(connection, drive);
    let result = tokio::select! {
        biased;
        result = served => result,
        () = stop.cancelled() => {
            audit.finish(AuditResult::Error, "gateway shutting down: grace period over");
            return;
        }
    };
    state.upstreams.close().await;
    let tunnel = state
        .tunnel
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(tunnel) = tunnel {
        run_tunnel(service, tunnel, stop).await;
    }
    if state.requests.load(Ordering::Relaxed) > 0 {
        audit.suppress();
    } else {
        match result {
            Ok(()) => audit.finish(AuditResult::Ok, "closed without a request"),
            Err(e) => audit.finish(AuditResult::Error, format!("bad request: {e}")),
        }
    }
}

/// Per-connection state shared with the request handler.
struct ConnState {
    upstreams: Upstreams,
    requests: AtomicU64,
    /// The last `Proxy-Authorization` value that verified, and its user:
    /// Argon2 runs once per connection, not once per request.
    login: Mutex<Option<(HeaderValue, String)>>,
    /// A CONNECT tunnel to run once hyper hands the connection over.
    tunnel: Mutex<Option<Tunnel>>,
    /// Set when a response body broke off: the client connection is then
    /// reset instead of closed ([`Abortable`]).
    client_failed: Arc<AtomicBool>,
}

struct Tunnel {
    upgrade: OnUpgrade,
    upstream: Stream,
    audit: Audit,
}

/// What a per-request audit record inherits from its connection.
#[derive(Clone)]
struct AuditTemplate {
    service: Arc<str>,
    conn_id: u64,
    client: String,
    via: Arc<str>,
    metrics: Option<Arc<crate::metrics::ServiceMetrics>>,
    /// The connection's service and client caps; each request adds its user's.
    caps: crate::limits::Caps,
}

impl AuditTemplate {
    fn of(audit: &Audit) -> Self {
        AuditTemplate {
            service: audit.service.clone(),
            conn_id: audit.conn_id,
            client: audit.client.clone(),
            via: audit.via.clone(),
            metrics: audit.metrics.clone(),
            caps: audit.caps.clone(),
        }
    }

    fn start(&self) -> Audit {
        let mut audit = Audit::start(
            self.service.clone(),
            self.conn_id,
            self.client.clone(),
            self.via.clone(),
        );
        audit.metrics = self.metrics.clone();
        audit.caps = self.caps.clone();
        audit
    }
}

async fn handle(
    service: &ServiceRuntime,
    state: &ConnState,
    template: &AuditTemplate,
    client_id: &crate::inbound::ClientId,
    request: Request<Incoming>,
) -> Response<Body> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let mut audit = template.start();
    audit.target = without_userinfo(request.uri());
    // Authentication, then the access rules that depend on the user.
    let user = if service.config.auth == AuthMode::Password {
        match login(service, state, request.headers()).await {
            Ok(user) => Some(user),
            Err(failure) => {
                let response = proxy_auth_required(&failure);
                return answer(audit, AuditResult::AuthFailed, failure, response);
            }
        }
    } else {
        None
    };
    audit.user = user.clone();
    if let Verdict::Deny(why) = service.access.check(client_id, user.as_deref()) {
        let response = error(StatusCode::FORBIDDEN, &format!("access denied: {why}"));
        return answer(audit, AuditResult::Denied, why, response);
    }
    if request.method() == Method::CONNECT {
        return connect(service, state, audit, request).await;
    }
    forward(service, state, audit, request).await
}

/// Checks `Proxy-Authorization: Basic` against `[[user]]`; returns the user.
async fn login(
    service: &ServiceRuntime,
    state: &ConnState,
    headers: &HeaderMap,
) -> Result<String, String> {
    let value = headers
        .get(header::PROXY_AUTHORIZATION)
        .ok_or_else(|| "no Proxy-Authorization header".to_string())?;
    if let Some((known, user)) = &*state.login.lock().unwrap_or_else(|p| p.into_inner()) {
        if known == value {
            return Ok(user.clone());
        }
    }
    let encoded = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        })
        .ok_or_else(|| "Proxy-Authorization is not Basic".to_string())?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| "Proxy-Authorization is not valid base64".to_string())?;
    let (user, password) = decoded
        .split_once(':')
        .ok_or_else(|| "Proxy-Authorization lacks user:password".to_string())?;
    service
        .users
        .verify(user, password)
        .await
        .map_err(|failure| format!("{failure} for user {user:?}"))?;
    *state.login.lock().unwrap_or_else(|p| p.into_inner()) =
        Some((value.clone(), user.to_string()));
    Ok(user.to_string())
}

// === Forwarding absolute-URI requests ===

/// How long an upstream may take to start its response, unless the service
/// says otherwise (`response_timeout`).
const DEFAULT_RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn forward(
    service: &ServiceRuntime,
    state: &ConnState,
    mut audit: Audit,
    request: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let Some(authority) = parts.uri.authority().cloned() else {
        let shown =
            "this is a proxy: send an absolute URI (GET http://host/path) or CONNECT host:port";
        let response = error(StatusCode::BAD_REQUEST, shown);
        return answer(
            audit,
            AuditResult::Error,
            "request without an absolute URI",
            response,
        );
    };
    if parts.uri.scheme_str() != Some("http") {
        let response = error(
            StatusCode::BAD_REQUEST,
            "only http:// URIs are forwarded; use CONNECT for https",
        );
        let reason = format!("unsupported scheme in {}", audit.target);
        return answer(audit, AuditResult::Error, reason, response);
    }
    let Some(target) = authority_target(authority.as_str(), 80) else {
        let response = error(StatusCode::BAD_REQUEST, "the URI's host is not valid");
        let reason = format!("bad host in {}", audit.target);
        return answer(audit, AuditResult::Error, reason, response);
    };
    if let Err(reason) = super::check_destination(service, &target).await {
        let response = error(StatusCode::FORBIDDEN, &reason);
        return answer(audit, AuditResult::Denied, reason, response);
    }
    // RFC 9110 §7.6: drop hop-by-hop fields; Host follows the URI; add Via.
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::PROXY_AUTHORIZATION);
    if let Ok(host) =
        HeaderValue::from_str(authority.as_str().rsplit('@').next().unwrap_or_default())
    {
        parts.headers.insert(header::HOST, host);
    }
    parts
        .headers
        .append(header::VIA, HeaderValue::from_static(VIA));
    parts.version = Version::HTTP_11;
    // The upstream gets origin-form (RFC 9112 §3.2.1).
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"));
    let uploaded = Arc::new(AtomicU64::new(0));
    let body = Counted {
        inner: body,
        counter: uploaded.clone(),
    }
    .boxed();
    let upstream_request = Request::from_parts(parts, body);
    let failed = |mut audit: Audit, status: StatusCode, reason: String| {
        audit.bytes_up = uploaded.load(Ordering::Relaxed);
        let response = error(status, &reason);
        answer(audit, AuditResult::Error, reason, response)
    };
    let caps = audit.caps.for_user(audit.user.as_deref());
    let mut sender = match state.upstreams.connection(service, &target, caps).await {
        Ok(sender) => sender,
        Err(UpstreamError::Connect(e)) => {
            return failed(audit, connect_failure_status(&e), e.to_string())
        }
        Err(UpstreamError::Http(e)) => {
            return failed(
                audit,
                StatusCode::BAD_GATEWAY,
                format!("upstream failed: {}", describe(&e)),
            )
        }
    };
    let response_timeout = service
        .config
        .response_timeout
        .map_or(DEFAULT_RESPONSE_TIMEOUT, |d| d.0);
    let sent = tokio::time::timeout(response_timeout, sender.send_request(upstream_request)).await;
    let Ok(sent) = sent else {
        // The connection is dropped, not pooled: it is stuck mid-exchange.
        return failed(
            audit,
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "upstream sent no response within {}",
                humantime::format_duration(response_timeout)
            ),
        );
    };
    match sent {
        Ok(response) => {
            state.upstreams.checkin(target, sender);
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .append(header::VIA, HeaderValue::from_static(VIA));
            let status = parts.status;
            audit.finish(
                AuditResult::Ok,
                format!(
                    "{} {}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                )
                .trim_end()
                .to_string(),
            );
            let body = AuditedBody {
                inner: body,
                audit: Some(audit),
                uploaded,
                downloaded: 0,
                client_failed: state.client_failed.clone(),
            };
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => failed(
            audit,
            StatusCode::BAD_GATEWAY,
            format!("upstream failed: {}", describe(&e)),
        ),
    }
}

fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

// === CONNECT tunnels ===

async fn connect(
    service: &ServiceRuntime,
    state: &ConnState,
    mut audit: Audit,
    request: Request<Incoming>,
) -> Response<Body> {
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|a| authority_target(a.as_str(), 443))
    else {
        let response = error(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
        return answer(
            audit,
            AuditResult::Error,
            "CONNECT without host:port",
            response,
        );
    };
    audit.target = target.to_string();
    if let Err(reason) = super::check_destination(service, &target).await {
        let response = error(StatusCode::FORBIDDEN, &reason);
        return answer(audit, AuditResult::Denied, reason, response);
    }
    let upstream = match service.connector.connect(&Hop::Direct(target)).await {
        Ok(upstream) => upstream,
        Err(e) => {
            let response = error(connect_failure_status(&e), &e.to_string());
            return answer(audit, e.audit_result(), e.to_string(), response);
        }
    };
    let upgrade = hyper::upgrade::on(request);
    *state.tunnel.lock().unwrap_or_else(|p| p.into_inner()) = Some(Tunnel {
        upgrade,
        upstream,
        audit,
    });
    let mut response = Response::new(empty());
    response
        .headers_mut()
        .insert(header::VIA, HeaderValue::from_static(VIA));
    response
}

/// A tunnel whose connection hyper would not hand back (not expected: the
/// downcast below takes our own stream back).
impl crate::stream::ByteStream for TokioIo<hyper::upgrade::Upgraded> {}

async fn run_tunnel(service: &ServiceRuntime, tunnel: Tunnel, stop: &CancellationToken) {
    let Tunnel {
        upgrade,
        mut upstream,
        mut audit,
    } = tunnel;
    let upgraded = match upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            audit.finish(AuditResult::Error, format!("CONNECT upgrade failed: {e}"));
            audit.emit();
            return;
        }
    };
    // Take our own stream back (and any bytes hyper had already read), so the
    // tunnel relays socket to socket like a mapping.
    let (mut client, early) = match upgraded.downcast::<TokioIo<Abortable>>() {
        Ok(parts) => (parts.io.into_inner().into_stream(), parts.read_buf),
        Err(upgraded) => (
            Stream::Boxed(Box::new(TokioIo::new(upgraded))),
            Bytes::new(),
        ),
    };
    let idle = service.config.idle_timeout;
    relay_and_record(
        &mut client,
        &mut upstream,
        &early,
        idle,
        stop,
        &mut audit,
        "tunnel closed",
    )
    .await;
    audit.emit();
}

// === Helpers ===

/// `host:port` (or `[v6]:port`, or `host` with `default_port`) as a target.
fn authority_target(authority: &str, default_port: u16) -> Option<HostPort> {
    let authority = authority.rsplit('@').next()?;
    if let Ok(target) = authority.parse::<HostPort>() {
        return Some(target);
    }
    // No port given: the scheme's default (also for [v6] literals).
    let with_port = format!("{authority}:{default_port}");
    with_port.parse().ok()
}

/// The URI as written in audit records: any `user:password@` is left out,
/// since records must never carry secrets.
fn without_userinfo(uri: &Uri) -> String {
    match uri.authority().map(|a| a.as_str()) {
        Some(authority) if authority.contains('@') => {
            let host = authority.rsplit('@').next().unwrap_or_default();
            let path = uri.path_and_query().map_or("", |pq| pq.as_str());
            match uri.scheme_str() {
                Some(scheme) => format!("{scheme}://{host}{path}"),
                None => host.to_string(),
            }
        }
        _ => uri.to_string(),
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1), including those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the fields present (usually a handful) rather than a
    // hash lookup for every hop-by-hop name on every request.
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name))
        .cloned()
        .collect();
    if doomed.is_empty() {
        return;
    }
    doomed.extend(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok()),
    );
    for name in doomed {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::PROXY_AUTHENTICATE
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// Writes the request's audit record (`result`, `reason`) and returns the
/// response that tells the client.
fn answer(
    mut audit: Audit,
    result: AuditResult,
    reason: impl Into<String>,
    response: Response<Body>,
) -> Response<Body> {
    audit.finish(result, reason);
    audit.emit();
    response
}

/// 504 when connecting timed out, 502 for every other upstream failure.
fn connect_failure_status(error: &ConnectError) -> StatusCode {
    match error {
        ConnectError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// A short plain-text response saying why.
fn error(status: StatusCode, why: &str) -> Response<Body> {
    let body = format!(
        "{} {}: {why}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::VIA, HeaderValue::from_static(VIA));
    response
}

fn proxy_auth_required(why: &str) -> Response<Body> {
    let mut response = error(
        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        &format!("log in with a [[user]] account ({why})"),
    );
    response.headers_mut().insert(
        header::PROXY_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"linkgate\""),
    );
    response
}

/// Counts the data bytes of a body as they stream.
struct Counted<B> {
    inner: B,
    counter: Arc<AtomicU64>,
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that writes its request's audit record when it has been
/// sent (or abandoned), with the bytes that really moved.
struct AuditedBody {
    inner: Incoming,
    audit: Option<Audit>,
    uploaded: Arc<AtomicU64>,
    downloaded: u64,
    /// The client connection's failure mark, set when this body breaks off.
    client_failed: Arc<AtomicBool>,
}

impl AuditedBody {
    fn finish(&mut self, failure: Option<String>) {
        if let Some(mut audit) = self.audit.take() {
            audit.bytes_up = self.uploaded.load(Ordering::Relaxed);
            audit.bytes_down = self.downloaded;
            if let Some(why) = failure {
                audit.finish(AuditResult::Error, why);
            }
            audit.emit();
        }
    }
}

impl HttpBody for AuditedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.downloaded += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                self.client_failed.store(true, Ordering::Relaxed);
                let why = format!("upstream response body failed: {e}");
                self.finish(Some(why));
            }
            Poll::Ready(None) => self.finish(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AuditedBody {
    fn drop(&mut self) {
        if self.audit.is_some() {
            let incomplete = (!self.inner.is_end_stream())
                .then(|| "client went away before the response ended".to_string());
            self.finish(incomplete);
        }
    }
}
