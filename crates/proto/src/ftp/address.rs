//! Data-connection addresses: `h1,h2,h3,h4,p1,p2` (PORT and the 227 reply to
//! PASV, RFC 959) and `<d>proto<d>addr<d>port<d>` (EPRT and the 229 reply to
//! EPSV, RFC 2428).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use super::FtpError;

/// Parses `h1,h2,h3,h4,p1,p2` (PORT's argument), spaces around numbers allowed.
pub fn parse_host_port(text: &[u8]) -> Result<SocketAddrV4, FtpError> {
    let text = std::str::from_utf8(text).map_err(|_| FtpError::Address("not ASCII"))?;
    let numbers: Vec<u8> = text
        .split(',')
        .map(|n| n.trim().parse::<u8>())
        .collect::<Result<_, _>>()
        .map_err(|_| FtpError::Address("expected six numbers from 0 to 255"))?;
    let [h1, h2, h3, h4, p1, p2] = numbers[..] else {
        return Err(FtpError::Address("expected six numbers from 0 to 255"));
    };
    let port = u16::from(p1) << 8 | u16::from(p2);
    Ok(SocketAddrV4::new(Ipv4Addr::new(h1, h2, h3, h4), port))
}

/// `h1,h2,h3,h4,p1,p2` for `addr`.
pub fn format_host_port(addr: SocketAddrV4) -> String {
    let [h1, h2, h3, h4] = addr.ip().octets();
    let port = addr.port();
    format!("{h1},{h2},{h3},{h4},{},{}", port >> 8, port & 0xff)
}

/// The address in a 227 reply's text. RFC 1123 §4.1.2.6: the numbers may
/// come with or without parentheses, so the first run of six
/// comma-separated numbers counts.
pub fn parse_pasv_reply(text: &[u8]) -> Result<SocketAddrV4, FtpError> {
    let start = text
        .iter()
        .position(u8::is_ascii_digit)
        .ok_or(FtpError::Address("no address in the 227 reply"))?;
    let len = text[start..]
        .iter()
        .position(|&b| !(b.is_ascii_digit() || b == b','))
        .unwrap_or(text.len() - start);
    parse_host_port(&text[start..start + len])
}

/// The text of a 227 reply for `addr`.
pub fn format_pasv_reply(addr: SocketAddrV4) -> String {
    format!("Entering Passive Mode ({})", format_host_port(addr))
}

/// Parses EPRT's argument `<d>1|2<d>address<d>port<d>`, where `<d>` is any
/// printable ASCII character that is not a digit (RFC 2428 §2).
pub fn parse_eprt(text: &[u8]) -> Result<SocketAddr, FtpError> {
    let text = std::str::from_utf8(text).map_err(|_| FtpError::Address("not ASCII"))?;
    let delimiter = text
        .chars()
        .next()
        .filter(|c| c.is_ascii_graphic() && !c.is_ascii_digit())
        .ok_or(FtpError::Address("EPRT needs a delimiter character first"))?;
    let fields: Vec<&str> = text.split(delimiter).collect();
    let ["", family, address, port, ""] = fields[..] else {
        return Err(FtpError::Address(
            "EPRT needs <d>family<d>address<d>port<d>",
        ));
    };
    let ip: IpAddr = match family {
        "1" => address.parse::<Ipv4Addr>().map(IpAddr::V4),
        "2" => address.parse::<std::net::Ipv6Addr>().map(IpAddr::V6),
        _ => {
            return Err(FtpError::Address(
                "EPRT family must be 1 (IPv4) or 2 (IPv6)",
            ))
        }
    }
    .map_err(|_| FtpError::Address("EPRT address does not match its family"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| FtpError::Address("EPRT port is not a number from 0 to 65535"))?;
    Ok(SocketAddr::new(ip, port))
}

/// EPRT's argument for `addr`, with `|` as the delimiter.
pub fn format_eprt(addr: SocketAddr) -> String {
    let family = if addr.is_ipv4() { 1 } else { 2 };
    format!("|{family}|{}|{}|", addr.ip(), addr.port())
}

/// The port in a 229 reply's text: `(<d><d><d>port<d>)`.
pub fn parse_epsv_reply(text: &[u8]) -> Result<u16, FtpError> {
    let bad = FtpError::Address("no (|||port|) in the 229 reply");
    let open = text.iter().position(|&b| b == b'(').ok_or(bad.clone())?;
    let inner = &text[open + 1..];
    let close = inner.iter().position(|&b| b == b')').ok_or(bad.clone())?;
    let inner = std::str::from_utf8(&inner[..close]).map_err(|_| bad.clone())?;
    let delimiter = inner.chars().next().ok_or(bad.clone())?;
    if !delimiter.is_ascii_graphic() || delimiter.is_ascii_digit() {
        return Err(bad);
    }
    let fields: Vec<&str> = inner.split(delimiter).collect();
    match fields[..] {
        ["", "", "", port, ""] => port.parse().map_err(|_| bad),
        _ => Err(bad),
    }
}

/// The text of a 229 reply for `port`.
pub fn format_epsv_reply(port: u16) -> String {
    format!("Entering Extended Passive Mode (|||{port}|)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_examples() {
        // RFC 959's PORT form and RFC 2428's EPRT/EPSV examples.
        let a = parse_host_port(b"132,235,1,2,24,131").unwrap();
        assert_eq!(a, "132.235.1.2:6275".parse().unwrap());
        assert_eq!(format_host_port(a), "132,235,1,2,24,131");
        assert_eq!(
            parse_eprt(b"|1|132.235.1.2|6275|").unwrap(),
            "132.235.1.2:6275".parse().unwrap()
        );
        assert_eq!(
            parse_eprt(b"|2|1080::8:800:200C:417A|5282|").unwrap(),
            "[1080::8:800:200c:417a]:5282".parse().unwrap()
        );
        assert_eq!(
            parse_epsv_reply(b"Entering Extended Passive Mode (|||6446|)").unwrap(),
            6446
        );
    }

    #[test]
    fn pasv_replies_with_and_without_parentheses() {
        let want: SocketAddrV4 = "10.0.0.5:50000".parse().unwrap();
        assert_eq!(
            parse_pasv_reply(format_pasv_reply(want).as_bytes()).unwrap(),
            want
        );
        assert_eq!(
            parse_pasv_reply(b"Entering Passive Mode 10,0,0,5,195,80").unwrap(),
            want
        );
        assert_eq!(parse_pasv_reply(b"=10,0,0,5,195,80").unwrap(), want);
    }

    #[test]
    fn bad_addresses_fail() {
        assert!(parse_host_port(b"1,2,3,4,5").is_err());
        assert!(parse_host_port(b"1,2,3,4,5,256").is_err());
        assert!(parse_host_port(b"1,2,3,4,5,6,7").is_err());
        assert!(parse_eprt(b"|3|1.2.3.4|21|").is_err());
        assert!(parse_eprt(b"|1|::1|21|").is_err());
        assert!(parse_eprt(b"1|1.2.3.4|21|").is_err());
        assert!(parse_eprt(b"|1|1.2.3.4|70000|").is_err());
        assert!(parse_epsv_reply(b"Entering Extended Passive Mode (|1|2|3|)").is_err());
        assert!(parse_pasv_reply(b"no numbers here").is_err());
    }
}
