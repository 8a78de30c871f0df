//! The admin endpoint's HTTP server: bounded connections, header timeout,
//! HTTP Basic login against `admin_users`, and the routes.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::AdminState;

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
    let sampled = state.clone();
    let stop_sampling = stop.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(super::history::INTERVAL);
        loop {
            tokio::select! {
                _ = every.tick() => sampled.history.push(sampled.sample()),
                () = stop_sampling.cancelled() => return,
            }
        }
    });
    let sessions = std::sync::Arc::new(LoginCache::default());
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
            let sessions = sessions.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |request| {
                    let state = state.clone();
                    let sessions = sessions.clone();
                    async move {
                        if let Some(refusal) = check_login(&state, &sessions, &request, from).await
                        {
                            return Ok::<_, Infallible>(refusal);
                        }
                        Ok::<_, Infallible>(respond(&state, &request))
                    }
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

/// Credentials that passed recently (by a hash of the header), so that a
/// console polling every two seconds does not cost an Argon2 check each time.
#[derive(Default)]
struct LoginCache {
    passed: std::sync::Mutex<std::collections::HashMap<[u8; 32], std::time::Instant>>,
}

/// How long a checked login is remembered.
const LOGIN_MEMORY: std::time::Duration = std::time::Duration::from_secs(60);
/// Logins remembered at once.
const LOGIN_CACHE_SIZE: usize = 64;

impl LoginCache {
    fn key(header: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(header).into()
    }

    fn remembers(&self, header: &[u8]) -> bool {
        let passed = self.passed.lock().unwrap_or_else(|p| p.into_inner());
        passed
            .get(&Self::key(header))
            .is_some_and(|at| at.elapsed() < LOGIN_MEMORY)
    }

    fn remember(&self, header: &[u8]) {
        let mut passed = self.passed.lock().unwrap_or_else(|p| p.into_inner());
        passed.retain(|_, at| at.elapsed() < LOGIN_MEMORY);
        if passed.len() < LOGIN_CACHE_SIZE {
            passed.insert(Self::key(header), std::time::Instant::now());
        }
    }
}

/// With `admin_users`, every request needs HTTP Basic login as one of
/// them; returns the refusal to send, or None to go on.
async fn check_login(
    state: &AdminState,
    sessions: &LoginCache,
    request: &Request<Incoming>,
    from: SocketAddr,
) -> Option<Response<Full<Bytes>>> {
    let login = state.login.as_ref()?;
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec());
    if let Some(header) = &header {
        if sessions.remembers(header) {
            return None;
        }
        if let Some((user, password)) = basic_credentials(header) {
            if login.allowed.contains(&user) && login.users.verify(&user, &password).await.is_ok() {
                sessions.remember(header);
                return None;
            }
            let shown = link::handshake::untrusted_text(user.as_bytes(), 64);
            tracing::warn!(%from, user = %shown, "admin login failed");
            crate::events::note(
                crate::events::EventKind::LoginFailed,
                format!("admin login from {from} as {shown} failed"),
            );
        }
    }
    let mut response = Response::new(Full::new(Bytes::from_static(
        b"login required: one of the [gateway] admin_users\n",
    )));
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"linkgate admin\", charset=\"UTF-8\""),
    );
    Some(response)
}

/// `Basic base64(user:password)`.
fn basic_credentials(header: &[u8]) -> Option<(String, String)> {
    use base64::Engine;
    let text = std::str::from_utf8(header).ok()?;
    let (scheme, token) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
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
            super::prometheus::render(&state.status()),
        ),
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            super::console::PAGE.to_string(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /, /api/status or /metrics\n".into(),
        ),
    }
}
