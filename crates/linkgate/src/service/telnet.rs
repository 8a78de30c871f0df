//! The telnet gateway (DESIGN §3): asks the client where to go, checks the
//! answer against `destinations`, connects (through `via`), then relays
//! transparently, Telnet negotiation included, as a mapping does. A refused
//! or unreachable destination gets a one-line reason and a new prompt; after
//! three the connection closes.

use proto::telnet::{LineDecoder, TelnetError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{check_destination, parse_destination, ServiceRuntime};
use crate::audit::{Audit, AuditResult};
use crate::config::Hop;
use crate::inbound::Inbound;
use crate::relay::relay_and_record;
use crate::stream::Stream;

const PROMPT: &[u8] = b"linkgate: destination (host[ port] or host:port)? ";
/// Destinations a client may try before the connection closes.
const TRIES: usize = 3;
/// The port when the client names only a host.
const TELNET_PORT: u16 = 23;

/// Serves one telnet client.
pub async fn serve(
    service: &ServiceRuntime,
    mut inbound: Inbound,
    audit: &mut Audit,
    stop: &CancellationToken,
) {
    let mut prompt = Prompt::default();
    let mut last_refusal = (AuditResult::Error, String::new());
    for _ in 0..TRIES {
        let timeout = service.config.handshake_timeout;
        let answer = match tokio::time::timeout(timeout.0, prompt.ask(&mut inbound.stream)).await {
            Ok(Ok(Some(answer))) => answer,
            Ok(Ok(None)) => {
                let (result, reason) = match last_refusal {
                    (result, reason) if !reason.is_empty() => {
                        (result, format!("{reason} (then the client left)"))
                    }
                    _ => (AuditResult::Error, "client left at the prompt".into()),
                };
                return audit.finish(result, reason);
            }
            Ok(Err(why)) => return audit.finish(AuditResult::Error, why),
            Err(_) => {
                let reason = format!("no destination given within {timeout}");
                let _ = tell_last(&mut inbound.stream, &reason).await;
                return audit.finish(AuditResult::Error, reason);
            }
        };
        let (result, reason) = match reach(service, &answer, audit).await {
            Ok(mut upstream) => {
                let early = prompt.leftover();
                let idle = service.config.idle_timeout;
                let client = &mut inbound.stream;
                relay_and_record(client, &mut upstream, &early, idle, stop, audit, "closed").await;
                return;
            }
            Err(refusal) => refusal,
        };
        if tell(&mut inbound.stream, &reason).await.is_err() {
            return audit.finish(result, reason);
        }
        last_refusal = (result, reason);
    }
    let (result, reason) = last_refusal;
    let _ = tell_last(&mut inbound.stream, "too many tries; closing").await;
    audit.finish(result, format!("{reason} ({TRIES} tries)"));
}

/// Reads the client's answer as a destination, checks it and connects to it
/// (through `via`); `Err` holds the audit result and the reason to show.
async fn reach(
    service: &ServiceRuntime,
    answer: &str,
    audit: &mut Audit,
) -> Result<Stream, (AuditResult, String)> {
    let target = parse_destination(answer, TELNET_PORT).map_err(|why| (AuditResult::Error, why))?;
    audit.target = target.to_string();
    check_destination(service, &target)
        .await
        .map_err(|why| (AuditResult::Denied, why))?;
    service
        .connector
        .connect(&Hop::Direct(target))
        .await
        .map_err(|e| (e.audit_result(), e.to_string()))
}

/// The prompt's state: what the client sent that is not used yet.
#[derive(Default)]
struct Prompt {
    decoder: LineDecoder,
    /// Bytes read but not yet decoded (those after a complete line).
    pending: Vec<u8>,
}

impl Prompt {
    /// Shows the prompt and reads one answer; `None` when the client closed.
    async fn ask(&mut self, client: &mut Stream) -> Result<Option<String>, String> {
        client
            .write_all(PROMPT)
            .await
            .map_err(|e| format!("writing to client: {e}"))?;
        let mut replies = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            let pending = std::mem::take(&mut self.pending);
            let decoded = self.decoder.feed(&pending, &mut replies);
            if !replies.is_empty() {
                client
                    .write_all(&replies)
                    .await
                    .map_err(|e| format!("writing to client: {e}"))?;
                replies.clear();
            }
            match decoded {
                Ok((Some(line), used)) => {
                    self.pending = pending[used..].to_vec();
                    return Ok(Some(String::from_utf8_lossy(&line).trim().to_string()));
                }
                Ok((None, _)) => {}
                Err(TelnetError::TooLong) => {
                    let _ = tell(client, "line too long").await;
                    return Err("destination line too long".into());
                }
            }
            let n = client
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading from client: {e}"))?;
            if n == 0 {
                return Ok(None);
            }
            self.pending = buf[..n].to_vec();
        }
    }

    /// Bytes the client sent after its answer: they go to the destination.
    fn leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

/// Sends the line the connection ends with, and finishes the stream: over
/// a link, a stream dropped unfinished is reset, and the reset would
/// overtake the line.
async fn tell_last(client: &mut Stream, text: &str) -> std::io::Result<()> {
    tell(client, text).await?;
    client.shutdown().await
}

/// Sends one line of explanation to the client.
async fn tell(client: &mut Stream, text: &str) -> std::io::Result<()> {
    client
        .write_all(format!("linkgate: {text}\r\n").as_bytes())
        .await
}
