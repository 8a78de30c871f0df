//! How a link gets through the network between two gateways: a TCP
//! connection, made directly or through a proxy chain (`[[peer]] via`, the
//! same code as a service's `via`), carrying the link's records as they
//! are, or inside WebSocket binary messages (`ws://`), over TLS (`wss://`).
//! Transports carry bytes and nothing more: the link's own handshake
//! authenticates both gateways whatever carries it.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

use super::websocket::{self, WsBytes};
use super::Links;
use crate::config::{Hop, LinkAddress};
use crate::connector::{ConnectError, Connector};
use crate::stream::Stream;

/// How a dialer reaches its hub: the proxy chain, and TLS settings for
/// `wss://` addresses.
pub struct Route {
    connector: Connector,
    via: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Route {
    /// A route through `via` (may be empty), with `tls` for `wss://`
    /// addresses; TCP connections (the whole chain) take at most `timeout`.
    pub fn new(
        via: Vec<Hop>,
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
        links: Arc<Links>,
    ) -> Route {
        let connector = Connector::new(via, timeout, links);
        Route {
            via: connector.via_text(),
            connector,
            tls,
        }
    }

    /// The proxy chain as shown in logs and status (passwords masked);
    /// empty when dialing directly.
    pub fn via(&self) -> &str {
        &self.via
    }

    /// Connects to `addr` and sets up its transport, ready for the link
    /// handshake.
    pub async fn dial(&self, addr: &LinkAddress) -> Result<LinkTransport, String> {
        let tcp = self
            .connector
            .connect(&Hop::Direct(addr.addr().clone()))
            .await
            .map_err(|e| describe(&e))?;
        let socket = link::transport::Transport::tcp_socket(&tcp);
        self.carry(addr, tcp)
            .await
            .map(|stream| LinkTransport { stream, socket })
    }

    /// Layers what `addr` asks for (TLS, WebSocket) on the connection.
    async fn carry(&self, addr: &LinkAddress, tcp: Stream) -> Result<Stream, String> {
        let LinkAddress::WebSocket {
            addr: at,
            path,
            tls,
        } = addr
        else {
            return Ok(tcp);
        };
        let url = format!("ws://{at}{path}");
        let upgrade = |stream: Stream| async move {
            tokio_tungstenite::client_async_with_config(url, stream, Some(websocket::config()))
                .await
                .map(|(ws, _)| Stream::Boxed(Box::new(WsBytes::client(ws))))
                .map_err(|e| format!("WebSocket upgrade failed: {e}"))
        };
        if !tls {
            return upgrade(tcp).await;
        }
        let config = self.tls.clone().ok_or("wss:// needs a TLS configuration")?;
        let name = crate::tls::server_name(&at.host)?;
        let mut tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        unlimit_sending(tls.get_mut().1);
        upgrade(Stream::Boxed(Box::new(tls))).await
    }
}

/// A proxy's refusal the way an operator reads it: "proxy ADDR refused:
/// 407 Proxy Authentication Required".
fn describe(error: &ConnectError) -> String {
    match error {
        ConnectError::Proxy(hop, reason) => {
            let addr = hop.split_once("://").map_or(hop.as_str(), |(_, rest)| {
                rest.rsplit('@').next().unwrap_or(rest)
            });
            if reason.starts_with("refused") {
                format!("proxy {addr} {reason}")
            } else {
                format!("proxy {addr}: {reason}")
            }
        }
        other => other.to_string(),
    }
}

/// Lets rustls take a whole batch of the link's records at once: with its
/// default 64 KiB limit on unsent TLS data a 256 KiB batch went in four
/// rounds of sealing and writing (wss A/B, 6 rounds alternating, medians:
/// 4.63 -> 5.09 Gbit/s, 2.316 -> 2.123 CPU s/GB). What it holds stays
/// bounded: the link's writer hands over one batch at a time and waits
/// until it was written.
fn unlimit_sending<Data>(tls: &mut rustls::ConnectionCommon<Data>) {
    tls.set_buffer_limit(None);
}

/// What a link listener's connections carry.
#[derive(Clone)]
pub enum Carrier {
    /// The link's records straight on TCP.
    Tcp,
    /// WebSocket on `path`, over TLS when an acceptor is given.
    WebSocket {
        /// The only path upgraded; others get 404.
        path: String,
        /// `wss://`: TLS first.
        tls: Option<TlsAcceptor>,
    },
}

impl Carrier {
    /// The transport's name in logs and status.
    pub fn name(&self) -> &'static str {
        match self {
            Carrier::Tcp => "tcp",
            Carrier::WebSocket { tls: None, .. } => "ws",
            Carrier::WebSocket { tls: Some(_), .. } => "wss",
        }
    }

    /// Sets up the transport of an accepted connection (TLS, then the
    /// WebSocket upgrade), ready for the link handshake.
    pub async fn accept(&self, tcp: TcpStream) -> Result<LinkTransport, String> {
        let socket = link::transport::Transport::tcp_socket(&tcp);
        self.carry(tcp)
            .await
            .map(|stream| LinkTransport { stream, socket })
    }

    /// Layers this listener's TLS and WebSocket on an accepted connection.
    async fn carry(&self, tcp: TcpStream) -> Result<Stream, String> {
        let Carrier::WebSocket { path, tls } = self else {
            return Ok(Stream::Tcp(tcp));
        };
        let _ = tcp.set_nodelay(true);
        let stream = match tls {
            Some(acceptor) => {
                let mut tls = acceptor
                    .accept(tcp)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                unlimit_sending(tls.get_mut().1);
                Stream::Boxed(Box::new(tls))
            }
            None => Stream::Tcp(tcp),
        };
        let expected = path.clone();
        // tungstenite's callback type fixes the (large) error response.
        #[allow(clippy::result_large_err)]
        let check_path = move |request: &Request, response: Response| {
            if request.uri().path() == expected {
                Ok(response)
            } else {
                let mut refusal = ErrorResponse::new(Some("not found".into()));
                *refusal.status_mut() = StatusCode::NOT_FOUND;
                Err(refusal)
            }
        };
        let ws = tokio_tungstenite::accept_hdr_async_with_config(
            stream,
            check_path,
            Some(websocket::config()),
        )
        .await
        .map_err(|e| format!("WebSocket upgrade failed: {e}"))?;
        Ok(Stream::Boxed(Box::new(WsBytes::server(ws))))
    }
}

/// What carries a link: the byte stream (TCP, or TLS and WebSocket over
/// it), and a handle on the TCP socket under it when there is one, so that
/// the link's writer can bound what the kernel holds unsent whatever is
/// layered on top.
pub struct LinkTransport {
    /// The stream the handshake and the session run over.
    pub stream: Stream,
    socket: Option<socket2::Socket>,
}

impl link::transport::Transport for LinkTransport {
    fn into_halves(self) -> (link::transport::ReadHalf, link::transport::WriteHalf) {
        self.stream.into_halves()
    }

    fn tcp_socket(&self) -> Option<socket2::Socket> {
        self.socket.as_ref().and_then(|s| s.try_clone().ok())
    }
}

impl link::transport::Transport for Stream {
    fn into_halves(self) -> (link::transport::ReadHalf, link::transport::WriteHalf) {
        match self {
            Stream::Tcp(tcp) => tcp.into_halves(),
            Stream::Boxed(boxed) => match boxed.into_link_halves() {
                Ok(halves) => halves,
                Err(boxed) => link::transport::Stream(Stream::Boxed(boxed)).into_halves(),
            },
        }
    }

    fn tcp_socket(&self) -> Option<socket2::Socket> {
        match self {
            Stream::Tcp(tcp) => tcp.tcp_socket(),
            Stream::Boxed(_) => None,
        }
    }
}

impl crate::stream::ByteStream for tokio_rustls::client::TlsStream<Stream> {}
impl crate::stream::ByteStream for tokio_rustls::server::TlsStream<TcpStream> {}
