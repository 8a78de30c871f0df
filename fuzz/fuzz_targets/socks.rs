//! Any bytes from a SOCKS client: every parser either asks for more, fails
//! cleanly, or consumes no more than it was given.
#![no_main]
use libfuzzer_sys::fuzz_target;
use linkgate_proto::socks::{parse_udp_header, Greeting, PasswordAuth, Request, Socks4Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, used))) = Request::parse(data) {
        assert!(used <= data.len());
    }
    if let Ok(Some((_, used))) = Socks4Request::parse(data) {
        assert!(used <= data.len());
    }
    if let Ok(Some((_, used))) = Greeting::parse(data) {
        assert!(used <= data.len());
    }
    if let Ok(Some((_, used))) = PasswordAuth::parse(data) {
        assert!(used <= data.len());
    }
    let _ = parse_udp_header(data);
});
