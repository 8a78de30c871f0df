//! SOCKS5 (RFC 1928) and username/password authentication (RFC 1929).

use super::addr::atyp;
use super::{Address, SocksError};

/// Wire constants.
pub mod consts {
    /// No authentication required.
    pub const METHOD_NONE: u8 = 0x00;
    /// Username/password (RFC 1929).
    pub const METHOD_PASSWORD: u8 = 0x02;
    /// No acceptable method.
    pub const METHOD_UNACCEPTABLE: u8 = 0xff;
    /// Succeeded.
    pub const REPLY_SUCCEEDED: u8 = 0x00;
    /// General SOCKS server failure.
    pub const REPLY_GENERAL_FAILURE: u8 = 0x01;
    /// Connection not allowed by ruleset.
    pub const REPLY_NOT_ALLOWED: u8 = 0x02;
    /// Network unreachable.
    pub const REPLY_NETWORK_UNREACHABLE: u8 = 0x03;
    /// Host unreachable.
    pub const REPLY_HOST_UNREACHABLE: u8 = 0x04;
    /// Connection refused.
    pub const REPLY_CONNECTION_REFUSED: u8 = 0x05;
    /// TTL expired (used for timeouts).
    pub const REPLY_TTL_EXPIRED: u8 = 0x06;
    /// Command not supported.
    pub const REPLY_COMMAND_NOT_SUPPORTED: u8 = 0x07;
    /// Address type not supported.
    pub const REPLY_ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;
}

/// A SOCKS5 reply code in words (RFC 1928 §6), for logs and audit records.
pub fn reply_text(code: u8) -> String {
    match code {
        consts::REPLY_SUCCEEDED => "succeeded".into(),
        consts::REPLY_GENERAL_FAILURE => "general failure".into(),
        consts::REPLY_NOT_ALLOWED => "not allowed by the proxy's rules".into(),
        consts::REPLY_NETWORK_UNREACHABLE => "network unreachable".into(),
        consts::REPLY_HOST_UNREACHABLE => "host unreachable".into(),
        consts::REPLY_CONNECTION_REFUSED => "connection refused".into(),
        consts::REPLY_TTL_EXPIRED => "timed out (TTL expired)".into(),
        consts::REPLY_COMMAND_NOT_SUPPORTED => "command not supported".into(),
        consts::REPLY_ADDRESS_TYPE_NOT_SUPPORTED => "address type not supported".into(),
        other => format!("unknown reply code {other}"),
    }
}

/// Longest SOCKS5 request: header and a 255-byte domain.
pub const V5_MAX_REQUEST: usize = 4 + 1 + 255 + 2;

/// What a client asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Open a TCP connection to the destination.
    Connect,
    /// Accept one incoming TCP connection for the client.
    Bind,
    /// Relay UDP datagrams.
    UdpAssociate,
}

/// The client's method offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greeting {
    /// Offered authentication methods.
    pub methods: Vec<u8>,
}

impl Greeting {
    /// Parses `VER NMETHODS METHODS`.
    pub fn parse(buf: &[u8]) -> Result<Option<(Greeting, usize)>, SocksError> {
        let Some(&version) = buf.first() else {
            return Ok(None);
        };
        if version != 5 {
            return Err(SocksError::Version(version));
        }
        let Some(&count) = buf.get(1) else {
            return Ok(None);
        };
        if count == 0 {
            return Err(SocksError::Malformed("no authentication methods offered"));
        }
        let len = 2 + count as usize;
        if buf.len() < len {
            return Ok(None);
        }
        Ok(Some((
            Greeting {
                methods: buf[2..len].to_vec(),
            },
            len,
        )))
    }

    /// Encodes the offer (client side).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![5, self.methods.len() as u8];
        out.extend_from_slice(&self.methods);
        out
    }
}

/// RFC 1929 credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordAuth {
    /// The user name.
    pub user: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for PasswordAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("PasswordAuth")
            .field("user", &self.user)
            .field("password", &"********")
            .finish()
    }
}

impl PasswordAuth {
    /// Parses `VER=1 ULEN UNAME PLEN PASSWD`.
    pub fn parse(buf: &[u8]) -> Result<Option<(PasswordAuth, usize)>, SocksError> {
        let Some(&version) = buf.first() else {
            return Ok(None);
        };
        if version != 1 {
            return Err(SocksError::Version(version));
        }
        let Some(&user_len) = buf.get(1) else {
            return Ok(None);
        };
        let Some(&password_len) = buf.get(2 + user_len as usize) else {
            return Ok(None);
        };
        let len = 3 + user_len as usize + password_len as usize;
        if buf.len() < len {
            return Ok(None);
        }
        let text = |b: &[u8]| {
            String::from_utf8(b.to_vec())
                .map_err(|_| SocksError::Malformed("credentials are not UTF-8"))
        };
        let user = text(&buf[2..2 + user_len as usize])?;
        let password = text(&buf[3 + user_len as usize..len])?;
        Ok(Some((PasswordAuth { user, password }, len)))
    }

    /// Encodes the credentials (client side).
    pub fn encode(&self) -> Result<Vec<u8>, SocksError> {
        if self.user.len() > 255 || self.password.len() > 255 {
            return Err(SocksError::TooLong);
        }
        let mut out = vec![1, self.user.len() as u8];
        out.extend_from_slice(self.user.as_bytes());
        out.push(self.password.len() as u8);
        out.extend_from_slice(self.password.as_bytes());
        Ok(out)
    }
}

/// A SOCKS5 request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub command: Command,
    /// Where.
    pub destination: Address,
}

impl Request {
    /// Parses `VER CMD RSV ATYP ADDR PORT`. An unknown command or address
    /// type is an error the server answers with reply 0x07 or 0x08.
    pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, SocksError> {
        let Some(&version) = buf.first() else {
            return Ok(None);
        };
        if version != 5 {
            return Err(SocksError::Version(version));
        }
        if buf.len() < 4 {
            return Ok(None);
        }
        let command = match buf[1] {
            1 => Command::Connect,
            2 => Command::Bind,
            3 => Command::UdpAssociate,
            other => return Err(SocksError::Command(other)),
        };
        let Some((destination, len)) = Address::parse(&buf[3..])? else {
            return Ok(None);
        };
        Ok(Some((
            Request {
                command,
                destination,
            },
            3 + len,
        )))
    }

    /// Encodes the request (client side).
    pub fn encode(&self) -> Result<Vec<u8>, SocksError> {
        let command = match self.command {
            Command::Connect => 1,
            Command::Bind => 2,
            Command::UdpAssociate => 3,
        };
        let mut out = vec![5, command, 0];
        self.destination
            .encode(&mut out)
            .map_err(|_| SocksError::TooLong)?;
        Ok(out)
    }
}

/// A SOCKS5 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// One of the `consts::REPLY_*` codes.
    pub code: u8,
    /// BND.ADDR and BND.PORT.
    pub bound: Address,
}

impl Reply {
    /// Encodes `VER REP RSV ATYP BND.ADDR BND.PORT`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![5, self.code, 0];
        if self.bound.encode(&mut out).is_err() {
            out.truncate(3);
            out.extend_from_slice(&[atyp::IPV4, 0, 0, 0, 0, 0, 0]);
        }
        out
    }

    /// Parses a reply (client side).
    pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, SocksError> {
        let Some(&version) = buf.first() else {
            return Ok(None);
        };
        if version != 5 {
            return Err(SocksError::Version(version));
        }
        if buf.len() < 4 {
            return Ok(None);
        }
        let Some((bound, len)) = Address::parse(&buf[3..])? else {
            return Ok(None);
        };
        Ok(Some((
            Reply {
                code: buf[1],
                bound,
            },
            3 + len,
        )))
    }
}

/// The header in front of every SOCKS5 UDP datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpHeader {
    /// Fragment number; 0 means a whole datagram (we drop fragments).
    pub fragment: u8,
    /// Destination (client → gateway) or source (gateway → client).
    pub address: Address,
}

/// Parses a datagram's header; returns it and where the payload starts.
pub fn parse_udp_header(datagram: &[u8]) -> Result<(UdpHeader, usize), SocksError> {
    if datagram.len() < 4 {
        return Err(SocksError::Malformed("short UDP datagram"));
    }
    if datagram[0] != 0 || datagram[1] != 0 {
        return Err(SocksError::Malformed("UDP reserved bytes not zero"));
    }
    let (address, len) =
        Address::parse(&datagram[3..])?.ok_or(SocksError::Malformed("truncated UDP header"))?;
    Ok((
        UdpHeader {
            fragment: datagram[2],
            address,
        },
        3 + len,
    ))
}

/// Appends a datagram header for `address` (fragment 0) to `out`.
pub fn encode_udp_header(address: &Address, out: &mut Vec<u8>) -> Result<(), SocksError> {
    out.extend_from_slice(&[0, 0, 0]);
    address.encode(out).map_err(|_| SocksError::TooLong)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socks::{Socks4Request, V4_MAX_REQUEST};
    use proptest::prelude::*;
    use std::net::SocketAddr;

    fn arb_address() -> impl Strategy<Value = Address> {
        prop_oneof![
            (any::<std::net::IpAddr>(), any::<u16>())
                .prop_map(|(ip, port)| Address::Ip(SocketAddr::new(ip, port))),
            ("[a-z0-9.-]{1,255}", any::<u16>()).prop_map(|(d, p)| Address::Domain(d, p)),
        ]
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        prop_oneof![
            Just(Command::Connect),
            Just(Command::Bind),
            Just(Command::UdpAssociate)
        ]
    }

    /// Feeds `bytes` in two pieces split at `split`: incomplete prefixes give
    /// `Ok(None)`, the whole gives the value and its exact length.
    fn parse_split<T: PartialEq + std::fmt::Debug>(
        bytes: &[u8],
        split: usize,
        parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, SocksError>,
    ) -> T {
        let split = split % bytes.len().max(1);
        assert_eq!(
            parse(&bytes[..split]).unwrap(),
            None,
            "prefix of {split} bytes"
        );
        let mut with_trailing = bytes.to_vec();
        with_trailing.extend_from_slice(b"trailing data");
        let (value, used) = parse(&with_trailing).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        value
    }

    proptest! {
        #[test]
        fn request_round_trip(command in arb_command(), destination in arb_address(), split in any::<usize>()) {
            let request = Request { command, destination };
            let bytes = request.encode().unwrap();
            prop_assert!(bytes.len() <= V5_MAX_REQUEST);
            prop_assert_eq!(parse_split(&bytes, split, Request::parse), request);
        }

        #[test]
        fn reply_round_trip(code in any::<u8>(), bound in arb_address(), split in any::<usize>()) {
            let reply = Reply { code, bound };
            prop_assert_eq!(parse_split(&reply.encode(), split, Reply::parse), reply);
        }

        #[test]
        fn greeting_and_password_round_trip(methods in proptest::collection::vec(any::<u8>(), 1..255),
                                            user in "\\PC{0,60}", password in "\\PC{0,60}", split in any::<usize>()) {
            let greeting = Greeting { methods };
            prop_assert_eq!(parse_split(&greeting.encode(), split, Greeting::parse), greeting);
            if user.len() <= 255 && password.len() <= 255 {
                let auth = PasswordAuth { user, password };
                prop_assert_eq!(parse_split(&auth.encode().unwrap(), split, PasswordAuth::parse), auth);
            }
        }

        #[test]
        fn socks4_round_trip(ip in any::<std::net::Ipv4Addr>(), port in any::<u16>(), user in "[a-z]{0,20}",
                             domain in proptest::option::of("[a-z0-9.-]{1,100}"), bind in any::<bool>(), split in any::<usize>()) {
            prop_assume!(ip.octets()[..3] != [0, 0, 0]);
            let destination = match domain {
                Some(name) => Address::Domain(name, port),
                None => Address::Ip(SocketAddr::new(ip.into(), port)),
            };
            let request = Socks4Request {
                command: if bind { Command::Bind } else { Command::Connect },
                destination,
                user_id: user,
            };
            let bytes = request.encode().unwrap();
            prop_assert!(bytes.len() <= V4_MAX_REQUEST);
            prop_assert_eq!(parse_split(&bytes, split, Socks4Request::parse), request);
        }

        #[test]
        fn udp_header_round_trip(address in arb_address(), payload in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut datagram = Vec::new();
            encode_udp_header(&address, &mut datagram).unwrap();
            let start = datagram.len();
            datagram.extend_from_slice(&payload);
            let (header, offset) = parse_udp_header(&datagram).unwrap();
            prop_assert_eq!(header.address, address);
            prop_assert_eq!(offset, start);
        }

        #[test]
        fn parsers_never_panic_or_overrun(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            for result in [Request::parse(&bytes).map(|o| o.map(|(_, n)| n)),
                           Reply::parse(&bytes).map(|o| o.map(|(_, n)| n)),
                           Greeting::parse(&bytes).map(|o| o.map(|(_, n)| n)),
                           PasswordAuth::parse(&bytes).map(|o| o.map(|(_, n)| n)),
                           Socks4Request::parse(&bytes).map(|o| o.map(|(_, n)| n))] {
                if let Ok(Some(used)) = result {
                    prop_assert!(used <= bytes.len());
                }
            }
            let _ = parse_udp_header(&bytes);
        }
    }

    #[test]
    fn bad_input_gets_specific_errors() {
        assert_eq!(Request::parse(&[4, 1, 0, 1]), Err(SocksError::Version(4)));
        assert_eq!(Request::parse(&[5, 9, 0, 1]), Err(SocksError::Command(9)));
        assert_eq!(
            Request::parse(&[5, 1, 0, 7]),
            Err(SocksError::AddressType(7))
        );
        assert!(Request::parse(&[5, 1, 0, 3, 0, 0, 80]).is_err());
        assert_eq!(
            Greeting::parse(&[5, 0]),
            Err(SocksError::Malformed("no authentication methods offered"))
        );
        let mut long_user = vec![4, 1, 0, 80, 1, 2, 3, 4];
        long_user.extend(std::iter::repeat_n(b'a', 300));
        assert_eq!(Socks4Request::parse(&long_user), Err(SocksError::TooLong));
        assert_eq!(
            Socks4Request::parse(&[4, 3, 0, 80, 1, 2, 3, 4, 0]),
            Err(SocksError::Command(3))
        );
    }
}
