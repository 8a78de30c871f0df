//! Destination addresses as SOCKS carries them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

use super::SocksError;

/// A destination: an IP address or a domain name, and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// An IPv4 or IPv6 socket address.
    Ip(SocketAddr),
    /// A domain name (1 to 255 bytes) and a port.
    Domain(String, u16),
}

/// A domain name cannot be carried.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AddressError {
    /// Empty or longer than 255 bytes.
    #[error("domain names must be 1 to 255 bytes")]
    DomainLength,
}

pub(crate) mod atyp {
    pub const IPV4: u8 = 1;
    pub const DOMAIN: u8 = 3;
    pub const IPV6: u8 = 4;
}

impl Address {
    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            Address::Ip(addr) => addr.port(),
            Address::Domain(_, port) => *port,
        }
    }

    /// Parses `ATYP ADDR PORT` at the start of `buf` (SOCKS5 layout).
    pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Address, usize)>, SocksError> {
        let Some(&kind) = buf.first() else {
            return Ok(None);
        };
        let (len, addr_start) = match kind {
            atyp::IPV4 => (1 + 4 + 2, 1),
            atyp::IPV6 => (1 + 16 + 2, 1),
            atyp::DOMAIN => {
                let Some(&name_len) = buf.get(1) else {
                    return Ok(None);
                };
                if name_len == 0 {
                    return Err(SocksError::Malformed("empty domain name"));
                }
                (2 + name_len as usize + 2, 2)
            }
            other => return Err(SocksError::AddressType(other)),
        };
        if buf.len() < len {
            return Ok(None);
        }
        let port = u16::from_be_bytes([buf[len - 2], buf[len - 1]]);
        let raw = &buf[addr_start..len - 2];
        let address = match kind {
            atyp::IPV4 => {
                let ip = Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]);
                Address::Ip(SocketAddr::new(IpAddr::V4(ip), port))
            }
            atyp::IPV6 => {
                let octets: [u8; 16] = raw.try_into().map_err(|_| SocksError::Malformed("ipv6"))?;
                Address::Ip(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
            }
            _ => {
                let name = std::str::from_utf8(raw)
                    .map_err(|_| SocksError::Malformed("domain name is not text"))?;
                Address::Domain(name.to_string(), port)
            }
        };
        Ok(Some((address, len)))
    }

    /// Appends `ATYP ADDR PORT` (SOCKS5 layout).
    pub(crate) fn encode(&self, out: &mut Vec<u8>) -> Result<(), AddressError> {
        match self {
            Address::Ip(SocketAddr::V4(v4)) => {
                out.push(atyp::IPV4);
                out.extend_from_slice(&v4.ip().octets());
            }
            Address::Ip(SocketAddr::V6(v6)) => {
                out.push(atyp::IPV6);
                out.extend_from_slice(&v6.ip().octets());
            }
            Address::Domain(name, _) => {
                if name.is_empty() || name.len() > 255 {
                    return Err(AddressError::DomainLength);
                }
                out.push(atyp::DOMAIN);
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
            }
        }
        out.extend_from_slice(&self.port().to_be_bytes());
        Ok(())
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Address::Ip(addr) => write!(f, "{addr}"),
            Address::Domain(name, port) => write!(f, "{name}:{port}"),
        }
    }
}
