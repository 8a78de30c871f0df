//! Any first handshake message: parsing never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = linkgate_link::handshake::parse_hello(data);
});
