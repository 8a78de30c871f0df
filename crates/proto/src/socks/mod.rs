//! SOCKS4 and 4a (the de-facto specs), SOCKS5 (RFC 1928) and its
//! username/password authentication (RFC 1929): server-side parsers and
//! replies, client-side requests, and the SOCKS5 UDP datagram header.

mod addr;
mod v4;
mod v5;

pub use addr::{Address, AddressError};
pub use v4::{Socks4Reply, Socks4Request, V4_MAX_REQUEST};
pub use v5::{
    consts as v5consts, encode_udp_header, parse_udp_header, reply_text as v5_reply_text, Command,
    Greeting, PasswordAuth, Reply, Request, UdpHeader, V5_MAX_REQUEST,
};

use thiserror::Error;

/// Why bytes from a SOCKS peer can never form a valid message.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum SocksError {
    /// The version byte is not the one expected.
    #[error("not SOCKS (version byte {0:#04x})")]
    Version(u8),
    /// A field has a value the protocol does not allow.
    #[error("malformed SOCKS message: {0}")]
    Malformed(&'static str),
    /// A command other than CONNECT, BIND or UDP ASSOCIATE.
    #[error("unsupported SOCKS command {0:#04x}")]
    Command(u8),
    /// An address type other than IPv4, domain name or IPv6.
    #[error("unsupported SOCKS address type {0:#04x}")]
    AddressType(u8),
    /// A variable-length field would exceed its cap.
    #[error("SOCKS message too long")]
    TooLong,
}

/// Which SOCKS version a client speaks, from its first byte.
pub fn version_of(first_byte: u8) -> Result<u8, SocksError> {
    match first_byte {
        4 | 5 => Ok(first_byte),
        other => Err(SocksError::Version(other)),
    }
}
