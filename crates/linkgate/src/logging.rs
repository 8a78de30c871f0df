//! Log output on stderr: human text or one JSON object per line.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Flushes what is queued when dropped (keep it until exit).
pub struct LogGuard(Arc<Batch>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.0.flush();
    }
}

/// Log lines gathered in memory and written to stderr by one thread in
/// batches: a proxy writing an audit record per request then pays no system
/// call per record on its network threads (and no spinning hand-off).
struct Batch {
    buffer: Mutex<Vec<u8>>,
    wake: Condvar,
}

/// Pending bytes that make the writer thread flush at once.
const FLUSH_AT: usize = 64 * 1024;
/// Pending bytes beyond which loggers write through themselves (stderr is
/// stalled): memory stays bounded and nothing is dropped.
const HARD_LIMIT: usize = 8 * 1024 * 1024;
/// Longest a line waits before it is written.
const FLUSH_EVERY: Duration = Duration::from_millis(20);

impl Batch {
    fn flush(&self) {
        let pending = std::mem::take(&mut *self.buffer.lock().unwrap_or_else(|p| p.into_inner()));
        if !pending.is_empty() {
            let _ = std::io::stderr().lock().write_all(&pending);
        }
    }

    fn run(self: Arc<Self>) {
        // Two buffers take turns, so the loggers' one never has to grow again
        // from empty after a flush.
        let mut pending = Vec::with_capacity(FLUSH_AT);
        loop {
            {
                let buffer = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
                let (mut buffer, _) = self
                    .wake
                    .wait_timeout_while(buffer, FLUSH_EVERY, |b| b.len() < FLUSH_AT)
                    .unwrap_or_else(|p| p.into_inner());
                std::mem::swap(&mut *buffer, &mut pending);
            }
            if !pending.is_empty() {
                let _ = std::io::stderr().lock().write_all(&pending);
            }
            pending.clear();
            // A burst may have grown it far beyond the usual; do not keep that.
            pending.shrink_to(FLUSH_AT * 4);
        }
    }
}

/// One log record's writer: appends to the batch.
pub struct BatchWriter(Arc<Batch>);

impl Write for BatchWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut buffer = self.0.buffer.lock().unwrap_or_else(|p| p.into_inner());
        if buffer.len() + bytes.len() > HARD_LIMIT {
            let pending = std::mem::take(&mut *buffer);
            drop(buffer);
            let mut stderr = std::io::stderr().lock();
            stderr.write_all(&pending)?;
            stderr.write_all(bytes)?;
            return Ok(bytes.len());
        }
        buffer.extend_from_slice(bytes);
        if buffer.len() >= FLUSH_AT {
            self.0.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Clone)]
struct BatchMaker(Arc<Batch>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchMaker {
    type Writer = BatchWriter;
    fn make_writer(&'a self) -> BatchWriter {
        BatchWriter(self.0.clone())
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the default level
/// (`info`). Safe to call once; later calls are ignored.
///
/// Records are written in batches by a dedicated thread, at most
/// 20 ms after they were logged; nothing is dropped. Keep the returned guard
/// until exit: dropping it writes what is still queued.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let batch = Arc::new(Batch {
        buffer: Mutex::new(Vec::with_capacity(FLUSH_AT)),
        wake: Condvar::new(),
    });
    let flusher = batch.clone();
    let _ = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || flusher.run());
    let writer = BatchMaker(batch.clone());
    let _ = AUDIT_SINK.set((batch.clone(), format));
    let guard = LogGuard(batch);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colours only for a person at a terminal, never in files or pipes.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        // No metadata `target` in JSON: audit records have a `target` field
        // of their own, and a duplicate key would make the object ambiguous.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_target(false)
            .with_current_span(false)
            .try_init(),
    };
    guard
}

/// Where audit records go once logging is set up.
static AUDIT_SINK: std::sync::OnceLock<(Arc<Batch>, LogFormat)> = std::sync::OnceLock::new();

/// Writes one audit record in the configured format; before logging is set
/// up (library use), as text straight to stderr.
pub fn write_audit(record: &crate::audit::AuditRecord<'_>) {
    use std::fmt::Write as _;
    let sink = AUDIT_SINK.get();
    let format = sink.map_or(LogFormat::Text, |(_, format)| *format);
    let timestamp = humantime::format_rfc3339_micros(std::time::SystemTime::now());
    let mut line = String::with_capacity(320);
    match format {
        LogFormat::Json => {
            // {"timestamp":..,"level":"INFO","message":"audit", then the fields}
            let _ = write!(
                line,
                "{{\"timestamp\":\"{timestamp}\",\"level\":\"INFO\",\"message\":\"audit\","
            );
            match serde_json::to_string(record) {
                Ok(fields) => line.push_str(&fields[1..]),
                Err(_) => return,
            }
        }
        LogFormat::Text => {
            let _ = write!(
                line,
                "{timestamp}  INFO audit: audit service={:?} conn_id={} client={:?} user={:?} target={:?} via={:?} \
                 bytes_up={} bytes_down={} duration_ms={} result={:?} reason={:?}",
                record.service,
                record.conn_id,
                record.client,
                record.user,
                record.target,
                record.via,
                record.bytes_up,
                record.bytes_down,
                record.duration_ms,
                record.result,
                record.reason,
            );
            if let (Some(up), Some(down)) = (record.datagrams_up, record.datagrams_down) {
                let _ = write!(line, " datagrams_up={up} datagrams_down={down}");
            }
        }
    }
    line.push('\n');
    let _ = match sink {
        Some((batch, _)) => BatchWriter(batch.clone()).write_all(line.as_bytes()),
        None => std::io::stderr().lock().write_all(line.as_bytes()),
    };
}
