//! The HTTP proxy service (DESIGN §3), on hyper: absolute-URI requests are
//! forwarded over pooled keep-alive upstream connections (through the
//! service's connector, so `via` and links apply), `CONNECT` opens tunnels;
//! bodies stream both ways, never buffered whole.
//!
//! Audit: one record per request or tunnel (when its response body ends);
//! a connection that carried no request gets one record of its own.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use super::ServiceRuntime;
use crate::access::Verdict;
use crate::audit::{Audit, AuditResult};
use crate::config::{AuthMode, Hop, Host, HostPort};
use crate::connector::{ConnectError, Connector};
use crate::inbound::Inbound;
use crate::relay::{relay, RelayEnd};
use crate::stream::Stream;

type Body = BoxBody<Bytes, hyper::Error>;

/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
const VIA: &str = "1.1 linkgate";

/// The upstream side of one HTTP service: a bounded keep-alive pool.
#[derive(Clone)]
pub struct ProxyClient(Client<UpstreamConnector, Body>);

impl ProxyClient {
    /// A pool that opens connections with `connector`.
    pub fn new(connector: Connector) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .set_host(false)
            .build(UpstreamConnector(connector));
        ProxyClient(client)
    }
}

impl std::fmt::Debug for ProxyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("ProxyClient")
    }
}

// === Serving a client connection ===

/// Serves one HTTP proxy client connection (any number of requests).
pub async fn serve(
    service: &ServiceRuntime,
    inbound: Inbound,
    audit: &mut Audit,
    stop: &CancellationToken,
) {
    let Some(client) = service.http_client.clone() else {
        audit.finish(AuditResult::Error, "http service without a client pool");
        return;
    };
    let state = Arc::new(ConnState {
        requests: AtomicU64::new(0),
        login: Mutex::new(None),
        tunnel: Mutex::new(None),
    });
    let io = TokioIo::new(inbound.stream);
    let handler = {
        let state = state.clone();
        let template = AuditTemplate::of(audit);
        let client_id = inbound.client.clone();
        hyper::service::service_fn(move |request| {
            let state = state.clone();
            let template = template.clone();
            let client_id = client_id.clone();
            let client = client.clone();
            async move {
                Ok::<_, Infallible>(
                    handle(service, &state, &template, &client_id, &client, request).await,
                )
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
    let result = tokio::select! {
        result = connection => result,
        () = stop.cancelled() => {
            audit.finish(AuditResult::Error, "gateway shutting down: grace period over");
            return;
        }
    };
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
    requests: AtomicU64,
    /// The last `Proxy-Authorization` value that verified, and its user:
    /// Argon2 runs once per connection, not once per request.
    login: Mutex<Option<(HeaderValue, String)>>,
    /// A CONNECT tunnel to run once hyper hands the connection over.
    tunnel: Mutex<Option<Tunnel>>,
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
}

impl AuditTemplate {
    fn of(audit: &Audit) -> Self {
        AuditTemplate {
            service: audit.service.clone(),
            conn_id: audit.conn_id,
            client: audit.client.clone(),
            via: audit.via.clone(),
        }
    }

    fn start(&self) -> Audit {
        Audit::start(
            self.service.clone(),
            self.conn_id,
            self.client.clone(),
            self.via.clone(),
        )
    }
}

async fn handle(
    service: &ServiceRuntime,
    state: &ConnState,
    template: &AuditTemplate,
    client_id: &crate::inbound::ClientId,
    client: &ProxyClient,
    request: Request<Incoming>,
) -> Response<Body> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let mut audit = template.start();
    audit.target = request.uri().to_string();
    // Authentication, then the access rules that depend on the user.
    let user = if service.config.auth == AuthMode::Password {
        match login(service, state, request.headers()).await {
            Ok(user) => Some(user),
            Err(failure) => {
                let response = proxy_auth_required(&failure);
                audit.finish(AuditResult::AuthFailed, failure);
                audit.emit();
                return response;
            }
        }
    } else {
        None
    };
    audit.user = user.clone();
    if let Verdict::Deny(why) = service.access.check(client_id, user.as_deref()) {
        audit.finish(AuditResult::Denied, why.clone());
        audit.emit();
        return error(StatusCode::FORBIDDEN, &format!("access denied: {why}"));
    }
    if request.method() == Method::CONNECT {
        return connect(service, state, audit, request).await;
    }
    forward(service, audit, client, request).await
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

async fn forward(
    service: &ServiceRuntime,
    mut audit: Audit,
    client: &ProxyClient,
    request: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let Some(authority) = parts.uri.authority().cloned() else {
        audit.finish(AuditResult::Error, "request without an absolute URI");
        audit.emit();
        return error(
            StatusCode::BAD_REQUEST,
            "this is a proxy: send an absolute URI (GET http://host/path) or CONNECT host:port",
        );
    };
    if parts.uri.scheme_str() != Some("http") {
        audit.finish(
            AuditResult::Error,
            format!("unsupported scheme in {}", parts.uri),
        );
        audit.emit();
        return error(
            StatusCode::BAD_REQUEST,
            "only http:// URIs are forwarded; use CONNECT for https",
        );
    }
    let target = match authority_target(authority.as_str(), 80) {
        Some(target) => target,
        None => {
            audit.finish(AuditResult::Error, format!("bad host in {}", parts.uri));
            audit.emit();
            return error(StatusCode::BAD_REQUEST, "the URI's host is not valid");
        }
    };
    if let Err(reason) = super::check_destination(service, &target).await {
        audit.finish(AuditResult::Denied, reason.clone());
        audit.emit();
        return error(StatusCode::FORBIDDEN, &reason);
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
    let uploaded = Arc::new(AtomicU64::new(0));
    let body = Counted {
        inner: body,
        counter: uploaded.clone(),
    }
    .boxed();
    let upstream_request = Request::from_parts(parts, body);
    match client.0.request(upstream_request).await {
        Ok(response) => {
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
            };
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            let (status, reason) = upstream_failure(&e);
            audit.bytes_up = uploaded.load(Ordering::Relaxed);
            audit.finish(AuditResult::Error, reason.clone());
            audit.emit();
            error(status, &reason)
        }
    }
}

/// 504 for timeouts, 502 for everything else, with the cause in words.
fn upstream_failure(error: &hyper_util::client::legacy::Error) -> (StatusCode, String) {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(connect) = current.downcast_ref::<ConnectError>() {
            let status = match connect {
                ConnectError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            };
            return (status, connect.to_string());
        }
        source = current.source();
    }
    (
        StatusCode::BAD_GATEWAY,
        format!("upstream failed: {}", describe(error)),
    )
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
        audit.finish(AuditResult::Error, "CONNECT without host:port");
        audit.emit();
        return error(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    audit.target = target.to_string();
    if let Err(reason) = super::check_destination(service, &target).await {
        audit.finish(AuditResult::Denied, reason.clone());
        audit.emit();
        return error(StatusCode::FORBIDDEN, &reason);
    }
    let upstream = match service.connector.connect(&Hop::Direct(target)).await {
        Ok(upstream) => upstream,
        Err(e) => {
            let status = if matches!(e, ConnectError::Timeout(..)) {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            audit.finish(AuditResult::Error, e.to_string());
            audit.emit();
            return error(status, &e.to_string());
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
    let (mut client, early) = match upgraded.downcast::<TokioIo<Stream>>() {
        Ok(parts) => (parts.io.into_inner(), parts.read_buf),
        Err(upgraded) => (
            Stream::Boxed(Box::new(TokioIo::new(upgraded))),
            Bytes::new(),
        ),
    };
    if !early.is_empty() {
        use tokio::io::AsyncWriteExt;
        if let Err(e) = upstream.write_all(&early).await {
            audit.finish(AuditResult::Error, format!("writing to target: {e}"));
            audit.emit();
            return;
        }
    }
    let outcome = relay(
        &mut client,
        &mut upstream,
        service.config.idle_timeout.0,
        stop,
    )
    .await;
    audit.bytes_up = outcome.bytes_up + early.len() as u64;
    audit.bytes_down = outcome.bytes_down;
    match outcome.end {
        RelayEnd::Closed => audit.finish(AuditResult::Ok, "tunnel closed"),
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

/// Hop-by-hop fields (RFC 9110 §7.6.1), including those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
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

// === Upstream connections through the service's connector ===

/// Opens upstream connections for the pool with the service's [`Connector`].
#[derive(Clone)]
pub struct UpstreamConnector(Connector);

/// An upstream connection as hyper's client sees it.
pub struct UpstreamIo(TokioIo<Stream>);

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = self.0.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let host = match host.parse() {
                Ok(ip) => Host::Ip(ip),
                Err(_) => Host::Name(host.to_ascii_lowercase()),
            };
            let target = Hop::Direct(HostPort {
                host,
                port: uri.port_u16().unwrap_or(80),
            });
            connector
                .connect(&target)
                .await
                .map(|stream| UpstreamIo(TokioIo::new(stream)))
        })
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
