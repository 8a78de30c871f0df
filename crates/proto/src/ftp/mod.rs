//! The FTP control connection (RFC 959, with RFC 2428's extended
//! addresses): commands from clients, replies from servers, and the
//! address arguments a proxy must read and rewrite (PORT, EPRT, and the 227
//! and 229 replies to PASV and EPSV).
//!
//! Text is kept as bytes: path names need not be UTF-8, and a proxy passes
//! them on unchanged.

mod address;
mod command;
mod line;
mod reply;

#[cfg(test)]
mod proptests;

pub use address::{
    format_eprt, format_epsv_reply, format_host_port, format_pasv_reply, parse_eprt,
    parse_epsv_reply, parse_host_port, parse_pasv_reply,
};
pub use command::Command;
pub use line::{next_line, MAX_LINE};
pub use reply::{Reply, MAX_REPLY};

use thiserror::Error;

/// Why bytes from an FTP peer can never form a valid message.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum FtpError {
    /// A line longer than [`MAX_LINE`] bytes, or a reply longer than
    /// [`MAX_REPLY`].
    #[error("FTP line or reply too long")]
    TooLong,
    /// A command line without a valid verb.
    #[error("malformed FTP command: {0}")]
    Command(&'static str),
    /// A reply line that does not start with a three-digit code.
    #[error("malformed FTP reply: {0}")]
    Reply(&'static str),
    /// A PORT/EPRT argument or a 227/229 reply without a usable address.
    #[error("malformed FTP address: {0}")]
    Address(&'static str),
}
