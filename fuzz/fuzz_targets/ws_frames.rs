//! Any bytes as a run of WebSocket frames: headers parse or fail without
//! a panic, a parsed header writes back to the same header, and a payload
//! unmasked in two pieces equals one unmasked at once.
#![no_main]
use libfuzzer_sys::fuzz_target;
use linkgate::links::ws_frames::{apply_mask, encode_header, header_len, parse_header, MAX_HEADER};

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while data.len() - at >= 2 {
        let need = header_len([data[at], data[at + 1]]);
        assert!((2..=MAX_HEADER).contains(&need));
        if data.len() - at < need {
            break;
        }
        let Ok(header) = parse_header(&data[at..at + need]) else {
            break;
        };
        let mut written = [0; MAX_HEADER];
        let n = encode_header(&header, &mut written);
        assert_eq!(parse_header(&written[..n]), Ok(header));
        at += need;
        let len = (header.len.min((data.len() - at) as u64)) as usize;
        if let Some(key) = header.mask {
            let mut whole = data[at..at + len].to_vec();
            apply_mask(&mut whole, key, 0);
            let mut pieces = data[at..at + len].to_vec();
            let cut = len / 3;
            let (first, second) = pieces.split_at_mut(cut);
            apply_mask(first, key, 0);
            apply_mask(second, key, cut as u64);
            assert_eq!(whole, pieces);
        }
        at += len;
    }
});
