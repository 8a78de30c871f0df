//! Any bytes from a Telnet client at the gateway's prompt, in two pieces:
//! the decoder never panics, never consumes more than it is given, and
//! answers only with well-formed refusals.
#![no_main]
use libfuzzer_sys::fuzz_target;
use linkgate_proto::telnet::LineDecoder;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut decoder = LineDecoder::default();
    let mut replies = Vec::new();
    for piece in [&data[..split], &data[split..]] {
        match decoder.feed(piece, &mut replies) {
            Ok((Some(_), used)) => {
                assert!(used <= piece.len());
                break;
            }
            Ok((None, used)) => assert_eq!(used, piece.len()),
            Err(_) => break,
        }
    }
    assert_eq!(replies.len() % 3, 0);
    for reply in replies.chunks(3) {
        assert!(reply[0] == 255 && (reply[1] == 252 || reply[1] == 254));
    }
});
