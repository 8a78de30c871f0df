//! SOCKS4 and SOCKS4a requests and replies.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::v5::Command;
use super::{Address, SocksError};

/// Longest SOCKS4a request accepted: header, user id and domain, each name
/// at most 255 bytes plus its NUL.
pub const V4_MAX_REQUEST: usize = 8 + 256 + 256;

/// A SOCKS4 or 4a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Socks4Request {
    /// CONNECT or BIND (SOCKS4 has no UDP).
    pub command: Command,
    /// An IPv4 address (SOCKS4) or a domain name (SOCKS4a).
    pub destination: Address,
    /// The USERID field (not a password; ignored for authentication).
    pub user_id: String,
}

/// SOCKS4 reply codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Socks4Reply {
    /// 90: request granted.
    Granted = 90,
    /// 91: request rejected or failed.
    Rejected = 91,
}

fn nul_terminated(buf: &[u8], from: usize) -> Result<Option<(&[u8], usize)>, SocksError> {
    let rest = buf.get(from..).unwrap_or_default();
    match rest.iter().position(|&b| b == 0) {
        Some(end) if end > 255 => Err(SocksError::TooLong),
        Some(end) => Ok(Some((&rest[..end], from + end + 1))),
        None if rest.len() > 255 => Err(SocksError::TooLong),
        None => Ok(None),
    }
}

impl Socks4Request {
    /// Parses a request (first byte 4).
    pub fn parse(buf: &[u8]) -> Result<Option<(Socks4Request, usize)>, SocksError> {
        if buf.len() < 8 {
            if let Some(&v) = buf.first() {
                if v != 4 {
                    return Err(SocksError::Version(v));
                }
            }
            return Ok(None);
        }
        if buf[0] != 4 {
            return Err(SocksError::Version(buf[0]));
        }
        let command = match buf[1] {
            1 => Command::Connect,
            2 => Command::Bind,
            other => return Err(SocksError::Command(other)),
        };
        let port = u16::from_be_bytes([buf[2], buf[3]]);
        let ip = Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
        let Some((user, after_user)) = nul_terminated(buf, 8)? else {
            return Ok(None);
        };
        let user_id = String::from_utf8_lossy(user).into_owned();
        // SOCKS4a: 0.0.0.x with x != 0 means "a domain name follows".
        let octets = ip.octets();
        if octets[..3] == [0, 0, 0] && octets[3] != 0 {
            let Some((name, end)) = nul_terminated(buf, after_user)? else {
                return Ok(None);
            };
            if name.is_empty() {
                return Err(SocksError::Malformed("empty SOCKS4a domain name"));
            }
            let name = std::str::from_utf8(name)
                .map_err(|_| SocksError::Malformed("domain name is not text"))?;
            let destination = Address::Domain(name.to_string(), port);
            return Ok(Some((
                Socks4Request {
                    command,
                    destination,
                    user_id,
                },
                end,
            )));
        }
        let destination = Address::Ip(SocketAddr::new(IpAddr::V4(ip), port));
        Ok(Some((
            Socks4Request {
                command,
                destination,
                user_id,
            },
            after_user,
        )))
    }

    /// Encodes the request (client side); a domain makes it SOCKS4a.
    pub fn encode(&self) -> Result<Vec<u8>, SocksError> {
        let mut out = vec![4, if self.command == Command::Bind { 2 } else { 1 }];
        out.extend_from_slice(&self.destination.port().to_be_bytes());
        match &self.destination {
            Address::Ip(SocketAddr::V4(v4)) => out.extend_from_slice(&v4.ip().octets()),
            Address::Ip(SocketAddr::V6(_)) => {
                return Err(SocksError::Malformed("SOCKS4 carries no IPv6"))
            }
            Address::Domain(..) => out.extend_from_slice(&[0, 0, 0, 1]),
        }
        out.extend_from_slice(self.user_id.as_bytes());
        out.push(0);
        if let Address::Domain(name, _) = &self.destination {
            out.extend_from_slice(name.as_bytes());
            out.push(0);
        }
        Ok(out)
    }
}

impl Socks4Reply {
    /// The 8-byte reply; `bound` fills DSTPORT/DSTIP (IPv4 only, else zeros).
    pub fn encode(self, bound: Option<SocketAddr>) -> [u8; 8] {
        let mut out = [0u8, self as u8, 0, 0, 0, 0, 0, 0];
        if let Some(SocketAddr::V4(v4)) = bound {
            out[2..4].copy_from_slice(&v4.port().to_be_bytes());
            out[4..8].copy_from_slice(&v4.ip().octets());
        }
        out
    }

    /// Parses an 8-byte reply (client side): granted or not, and the address.
    pub fn parse(buf: &[u8]) -> Result<Option<(bool, SocketAddr)>, SocksError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        if buf[0] != 0 {
            return Err(SocksError::Version(buf[0]));
        }
        let port = u16::from_be_bytes([buf[2], buf[3]]);
        let ip = Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
        Ok(Some((buf[1] == 90, SocketAddr::new(IpAddr::V4(ip), port))))
    }
}
