//! Any bytes on an FTP control connection: every parser either asks for
//! more, fails cleanly, or consumes no more than it was given, and whatever
//! parses re-encodes to something that parses to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use linkgate_proto::ftp::{
    parse_eprt, parse_epsv_reply, parse_host_port, parse_pasv_reply, Command, Reply,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((command, used))) = Command::parse(data) {
        assert!(used <= data.len());
        let again = Command::parse(&command.encode()).unwrap().unwrap().0;
        assert_eq!(again, command);
    }
    if let Ok(Some((reply, used))) = Reply::parse(data) {
        assert!(used <= data.len());
        let again = Reply::parse(&reply.encode()).unwrap().unwrap().0;
        assert_eq!(again.code, reply.code);
        assert_eq!(again.lines.len(), reply.lines.len());
    }
    let _ = parse_host_port(data);
    let _ = parse_pasv_reply(data);
    let _ = parse_eprt(data);
    let _ = parse_epsv_reply(data);
});
