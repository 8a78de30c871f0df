//! Property tests: every encoder's output parses back to the same value, at
//! any split point; arbitrary bytes never panic and never over-consume.

use std::net::{SocketAddr, SocketAddrV4};

use proptest::prelude::*;

use super::*;

/// A line of text without line ends.
fn arb_text() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        any::<u8>().prop_filter("no line ends", |b| *b != b'\r' && *b != b'\n'),
        0..60,
    )
}

/// Parses `bytes` fed as a prefix (must ask for more) and then whole.
fn parse_split<T>(
    bytes: &[u8],
    split: usize,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, FtpError>,
) -> T {
    let split = split % bytes.len().max(1);
    assert!(
        matches!(parse(&bytes[..split]), Ok(None)),
        "a prefix of {split} bytes is complete"
    );
    let (value, used) = parse(bytes).unwrap().unwrap();
    assert_eq!(used, bytes.len());
    value
}

proptest! {
    #[test]
    fn command_round_trip(verb in "[A-Z]{1,8}", arg in proptest::option::of(arb_text()), split in any::<usize>()) {
        let command = Command { verb, arg };
        prop_assert_eq!(parse_split(&command.encode(), split, Command::parse), command);
    }

    #[test]
    fn reply_round_trip(code in 100u16..600, lines in proptest::collection::vec(arb_text(), 1..6),
                        split in any::<usize>()) {
        let reply = Reply { code, lines };
        // A middle line that reads as the last one is escaped with a space.
        let reparsed = parse_split(&reply.encode(), split, Reply::parse);
        prop_assert_eq!(reparsed.code, reply.code);
        prop_assert_eq!(reparsed.lines.len(), reply.lines.len());
        for (got, sent) in reparsed.lines.iter().zip(&reply.lines) {
            prop_assert!(got == sent || got[1..] == sent[..]);
        }
    }

    #[test]
    fn host_port_round_trip(addr in any::<SocketAddrV4>()) {
        prop_assert_eq!(parse_host_port(format_host_port(addr).as_bytes()), Ok(addr));
        prop_assert_eq!(parse_pasv_reply(format_pasv_reply(addr).as_bytes()), Ok(addr));
    }

    #[test]
    fn extended_round_trip(addr in any::<SocketAddr>()) {
        // Scope ids and flow info are not part of EPRT.
        let addr = SocketAddr::new(addr.ip(), addr.port());
        prop_assert_eq!(parse_eprt(format_eprt(addr).as_bytes()), Ok(addr));
        prop_assert_eq!(parse_epsv_reply(format_epsv_reply(addr.port()).as_bytes()), Ok(addr.port()));
    }

    #[test]
    fn arbitrary_bytes_are_safe(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(Some((_, used))) = Command::parse(&bytes) {
            prop_assert!(used <= bytes.len());
        }
        if let Ok(Some((_, used))) = Reply::parse(&bytes) {
            prop_assert!(used <= bytes.len());
        }
        let _ = parse_host_port(&bytes);
        let _ = parse_pasv_reply(&bytes);
        let _ = parse_eprt(&bytes);
        let _ = parse_epsv_reply(&bytes);
    }
}
