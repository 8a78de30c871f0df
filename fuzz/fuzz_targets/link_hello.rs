//! Any first handshake message, either mode: parsing never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use linkgate_link::handshake::{self, Identity, StaticKeys};
use std::sync::OnceLock;

fn hub_keys() -> &'static StaticKeys {
    static KEYS: OnceLock<StaticKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        use rand::SeedableRng;
        Identity::generate(&mut rand::rngs::StdRng::seed_from_u64(7)).static_keys()
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = handshake::hello_mode(data);
    let _ = handshake::parse_hello(data);
    let _ = handshake::key_server_read(hub_keys(), data, None);
    // Past the magic of each mode too, so that uninstrumented runs reach
    // the user name, KE1 and Noise parsing.
    for mode in [handshake::VERSION, handshake::KEY_MODE] {
        let mut hello = handshake::MAGIC.to_vec();
        hello.push(mode);
        hello.extend_from_slice(data);
        let _ = handshake::parse_hello(&hello);
        let _ = handshake::key_server_read(hub_keys(), &hello, None);
    }
});
