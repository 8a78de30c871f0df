//! A control connection: reading whole commands or replies, writing lines.

use proto::ftp::{self, Command, FtpError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::stream::Stream;

/// A `proto::ftp` parser: a message and the bytes it took, once whole.
pub(super) type Parser<T> = fn(&[u8]) -> Result<Option<(T, usize)>, FtpError>;

/// A control connection and what was read from it but not parsed yet.
pub(super) struct Conn {
    pub(super) stream: Stream,
    pub(super) buf: Vec<u8>,
}

impl Conn {
    /// A control connection with nothing read yet.
    pub(super) fn new(stream: Stream) -> Self {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` whole.
    pub(super) async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads until `parse` finds a message; `Ok(None)` at end of stream.
    pub(super) async fn next<T>(&mut self, parse: Parser<T>) -> Result<Option<T>, String> {
        loop {
            if let Some(message) = take(&mut self.buf, parse).map_err(|e| e.to_string())? {
                return Ok(Some(message));
            }
            if self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| e.to_string())?
                == 0
            {
                return Ok(None);
            }
        }
    }
}

/// A line from the client: a command, or one that is not (answered with 500
/// and skipped, as a server would).
pub(super) enum ClientLine {
    Command(Command),
    Malformed,
}

/// [`Command::parse`], turning a line that is no command into
/// [`ClientLine::Malformed`] (consumed) instead of an error.
pub(super) fn parse_client_line(buf: &[u8]) -> Result<Option<(ClientLine, usize)>, FtpError> {
    match Command::parse(buf) {
        Ok(parsed) => Ok(parsed.map(|(command, used)| (ClientLine::Command(command), used))),
        Err(FtpError::Command(_)) => {
            Ok(ftp::next_line(buf)?.map(|(_, used)| (ClientLine::Malformed, used)))
        }
        Err(e) => Err(e),
    }
}

/// The answer to a [`ClientLine::Malformed`].
pub(super) const SYNTAX_ERROR: &[u8] = b"500 Syntax error, command unrecognized\r\n";

/// Removes the first whole message from `buf`, if there is one.
pub(super) fn take<T>(buf: &mut Vec<u8>, parse: Parser<T>) -> Result<Option<T>, FtpError> {
    Ok(parse(buf)?.map(|(message, used)| {
        buf.drain(..used);
        message
    }))
}

/// Sends the client one reply line (CRLF added).
pub(super) async fn reply(client: &mut Conn, line: &str) -> Result<(), String> {
    client
        .send(format!("{line}\r\n").as_bytes())
        .await
        .map_err(|e| format!("writing to client: {e}"))
}
