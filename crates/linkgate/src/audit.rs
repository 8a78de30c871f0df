//! Audit records (DESIGN §1): exactly one per relayed or refused connection,
//! written when it ends, as a tracing event with message `audit`.

use std::sync::Arc;
use std::time::Instant;

/// The `result` field of an audit record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditResult {
    /// Served and ended normally.
    Ok,
    /// Refused by an access rule, a destination rule or a limit.
    Denied,
    /// The client failed to authenticate.
    AuthFailed,
    /// Something failed (connect, I/O, timeout, protocol).
    Error,
}

impl AuditResult {
    /// The word written in the record.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditResult::Ok => "ok",
            AuditResult::Denied => "denied",
            AuditResult::AuthFailed => "auth_failed",
            AuditResult::Error => "error",
        }
    }
}

/// The audit record of one connection, filled in as the connection goes.
#[derive(Debug)]
pub struct Audit {
    /// The service's name.
    pub service: Arc<str>,
    /// Gateway-wide connection number, also in the connection's log span.
    pub conn_id: u64,
    /// Client address or `peer:NAME`.
    pub client: String,
    /// The authenticated user, if any.
    pub user: Option<String>,
    /// Where the client went (or asked to go).
    pub target: String,
    /// The outbound chain, passwords masked; empty when direct.
    pub via: Arc<str>,
    /// Client → target bytes.
    pub bytes_up: u64,
    /// Target → client bytes.
    pub bytes_down: u64,
    /// How it ended.
    pub result: AuditResult,
    /// Why, in words.
    pub reason: String,
    started: Instant,
    /// Set when the connection's requests wrote records of their own.
    suppressed: bool,
    /// The service's counters, updated when the record is written.
    pub metrics: Option<Arc<crate::metrics::ServiceMetrics>>,
    /// The connection's entry in the live list, while it is served; the
    /// relay counts bytes into it as they move.
    pub live: Option<Arc<crate::connections::Registered>>,
    /// The bandwidth caps of its service and client (the user's is added
    /// when the relay starts, once the user is known).
    pub caps: crate::limits::Caps,
    /// UDP flows: datagrams client → target and target → client.
    pub datagrams: Option<[u64; 2]>,
}

impl Audit {
    /// Starts the record of a connection accepted now.
    pub fn start(service: Arc<str>, conn_id: u64, client: String, via: Arc<str>) -> Self {
        Audit {
            service,
            conn_id,
            client,
            user: None,
            target: String::new(),
            via,
            bytes_up: 0,
            bytes_down: 0,
            result: AuditResult::Ok,
            reason: String::new(),
            started: Instant::now(),
            suppressed: false,
            metrics: None,
            live: None,
            caps: crate::limits::Caps::none(),
            datagrams: None,
        }
    }

    /// Records the outcome; the last call wins.
    pub fn finish(&mut self, result: AuditResult, reason: impl Into<String>) {
        self.result = result;
        self.reason = reason.into();
    }

    /// Marks the record as not to be written: the connection's requests
    /// (HTTP proxy) each wrote their own.
    pub fn suppress(&mut self) {
        self.suppressed = true;
    }

    /// Writes the record to the log (target `audit`, message `audit`),
    /// unless suppressed.
    ///
    /// Records bypass the tracing machinery and are formatted straight into
    /// the log writer (they are the hot path of a busy proxy: one per
    /// request), in the same shapes as other records, whatever the log level.
    pub fn emit(&self) {
        if self.suppressed {
            return;
        }
        if let Some(metrics) = &self.metrics {
            // Bytes the relay already counted live are not counted twice.
            let (live_up, live_down) = self.live.as_ref().map_or((0, 0), |l| l.bytes());
            metrics.record(
                self.result,
                self.bytes_up.saturating_sub(live_up),
                self.bytes_down.saturating_sub(live_down),
            );
        }
        match self.result {
            AuditResult::Denied => crate::events::note(
                crate::events::EventKind::Denied,
                format!(
                    "{}: {} to {}: {}",
                    self.service,
                    self.client,
                    or_dash(&self.target),
                    self.reason
                ),
            ),
            AuditResult::AuthFailed => crate::events::note(
                crate::events::EventKind::LoginFailed,
                format!(
                    "{}: {} as {}: {}",
                    self.service,
                    self.client,
                    self.user.as_deref().unwrap_or("?"),
                    self.reason
                ),
            ),
            AuditResult::Ok | AuditResult::Error => {}
        }
        if let Some(metrics) = &self.metrics {
            metrics.record_duration(self.started.elapsed());
        }
        if let Some(user) = &self.user {
            // A live connection counted its bytes for the user as they
            // moved; only what it did not see is added here.
            let (up, down) = match &self.live {
                Some(live) if live.counts_for_user() => {
                    let (up, down) = live.bytes();
                    (
                        self.bytes_up.saturating_sub(up),
                        self.bytes_down.saturating_sub(down),
                    )
                }
                _ => (self.bytes_up, self.bytes_down),
            };
            crate::metrics::add_user_bytes(user, up, down);
        }
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let record = AuditRecord {
            service: &self.service,
            conn_id: self.conn_id,
            client: &self.client,
            user: self.user.as_deref().unwrap_or(""),
            target: &self.target,
            via: &self.via,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            duration_ms,
            result: self.result.as_str(),
            reason: &self.reason,
            datagrams_up: self.datagrams.map(|d| d[0]),
            datagrams_down: self.datagrams.map(|d| d[1]),
        };
        crate::logging::write_audit(&record);
    }
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() {
        "-"
    } else {
        text
    }
}

/// An audit record's fields, in the order they are written.
#[derive(serde::Serialize)]
pub struct AuditRecord<'a> {
    /// See [`Audit::service`].
    pub service: &'a str,
    /// See [`Audit::conn_id`].
    pub conn_id: u64,
    /// See [`Audit::client`].
    pub client: &'a str,
    /// The user, or empty.
    pub user: &'a str,
    /// See [`Audit::target`].
    pub target: &'a str,
    /// See [`Audit::via`].
    pub via: &'a str,
    /// See [`Audit::bytes_up`].
    pub bytes_up: u64,
    /// See [`Audit::bytes_down`].
    pub bytes_down: u64,
    /// Milliseconds from accept to the end.
    pub duration_ms: u64,
    /// `ok`, `denied`, `auth_failed` or `error`.
    pub result: &'a str,
    /// Why, in words.
    pub reason: &'a str,
    /// UDP flows: datagrams client → target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datagrams_up: Option<u64>,
    /// UDP flows: datagrams target → client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datagrams_down: Option<u64>,
}
