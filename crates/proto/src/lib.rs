//! Sans-IO codecs for the protocols linkgate speaks: bytes in, values out,
//! no I/O, no async runtime, so every parser is testable and fuzzable
//! without sockets.
//!
//! Parsers follow one convention: `parse(&[u8])` returns `Ok(None)` when more
//! bytes are needed, `Ok(Some((value, consumed)))` when a whole message is
//! there, and `Err` when the bytes can never become a valid message. Every
//! message has a hard size cap, so a caller never buffers more than that.

pub mod ftp;
pub mod socks;
pub mod telnet;
