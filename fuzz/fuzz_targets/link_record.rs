//! Any byte stream after the handshake: records are framed and opened
//! without panics, and (with overwhelming probability) nothing opens.
#![no_main]
use libfuzzer_sys::fuzz_target;
use linkgate_link::record::{complete_record_len, Opener};

fuzz_target!(|data: &[u8]| {
    let mut opener = Opener::new([9u8; 32]);
    let mut rest = data.to_vec();
    while let Some(len) = complete_record_len(&rest) {
        let mut record: Vec<u8> = rest.drain(..len).collect();
        if opener.open(&mut record[2..]).is_err() {
            break;
        }
    }
});
