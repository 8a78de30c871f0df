//! Telling a client why it was refused at `max_connections`, in its own
//! protocol: SOCKS gets a "general failure" reply, HTTP a 503, FTP a 421,
//! telnet a line of text; a mapping (which has no protocol of its own) is
//! just closed. The answers run in small tasks of their own, at most
//! [`ANSWERERS`] at once: past that, refused clients are closed silently,
//! so a flood costs nothing more than the accept.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::config::ServiceKind;

/// Refusal answers in progress at once, over all services.
const ANSWERERS: usize = 64;
/// How long an answer may take in all.
const ANSWER_TIME: Duration = Duration::from_secs(2);

static SLOTS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(ANSWERERS)));

/// Answers `tcp`, a client of a `kind` service that is full, with `why`.
pub fn refuse(kind: ServiceKind, tcp: TcpStream, why: String) {
    if kind == ServiceKind::Mapping {
        return;
    }
    let Ok(slot) = SLOTS.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _slot = slot;
        let _ = tokio::time::timeout(ANSWER_TIME, answer(kind, tcp, &why)).await;
    });
}

async fn answer(kind: ServiceKind, mut tcp: TcpStream, why: &str) -> std::io::Result<()> {
    match kind {
        ServiceKind::Socks => {
            let mut buf = [0u8; 512];
            let n = tcp.read(&mut buf).await?;
            match buf[..n].first() {
                Some(5) => {
                    // Take "no authentication" so the client reads a reply
                    // to its request, then fail the request.
                    tcp.write_all(&[5, 0]).await?;
                    let _ = tcp.read(&mut buf).await?;
                    tcp.write_all(&[5, 1, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
                }
                Some(4) => tcp.write_all(&[0, 0x5b, 0, 0, 0, 0, 0, 0]).await?,
                _ => {}
            }
        }
        ServiceKind::Http => {
            let body = format!("{why}: the proxy is at its connection limit; try again shortly\n");
            let response = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\nVia: 1.1 linkgate\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(response.as_bytes()).await?;
        }
        ServiceKind::Ftp => {
            tcp.write_all(
                format!("421 Too many connections ({why}); try again later\r\n").as_bytes(),
            )
            .await?
        }
        ServiceKind::Telnet => {
            tcp.write_all(
                format!("linkgate: too many connections ({why}); try again later\r\n").as_bytes(),
            )
            .await?
        }
        ServiceKind::Mapping | ServiceKind::Udp => {}
    }
    // Let the answer reach the client before the close: read (and drop)
    // what it still sends, so the close is not a reset that eats the answer.
    tcp.shutdown().await?;
    let mut sink = [0u8; 1024];
    while tcp.read(&mut sink).await? > 0 {}
    Ok(())
}
