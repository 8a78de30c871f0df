//! Any configuration text: loading never panics; it is valid or explained.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = linkgate::config::parse_and_validate(text, "fuzz.toml", std::path::Path::new("/nonexistent"));
    }
});
