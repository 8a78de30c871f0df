//! WebSocket framing (RFC 6455 §5.2), sans-IO: frame headers parsed and
//! written, payloads masked and unmasked in place.
//!
//! tungstenite does the opening handshake; once a link's connection is
//! upgraded, its frames go through this codec instead of tungstenite's
//! message layer, which copies every payload byte twice more (into its
//! output buffer, and out of a zero-filled input buffer) and holds whole
//! messages in memory. Here a frame's payload streams between the socket
//! and the session's own buffers; only headers (at most 14 bytes) and
//! control payloads (at most 125) are held.

use thiserror::Error;

/// Longest frame header: 2 bytes, an 8-byte length, a 4-byte mask key.
pub const MAX_HEADER: usize = 14;
/// Longest payload of a control frame (close, ping, pong).
pub const MAX_CONTROL: usize = 125;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    /// More of the message a text or binary frame began.
    Continuation,
    /// A UTF-8 text message (never valid on a link).
    Text,
    /// A binary message.
    Binary,
    /// The end of the connection.
    Close,
    /// A liveness probe, to be answered with a pong.
    Ping,
    /// The answer to a ping.
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Opcode> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    /// Close, ping and pong: short, never fragmented, allowed between the
    /// frames of a message.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// A frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The last frame of its message.
    pub fin: bool,
    /// What the frame carries.
    pub opcode: Opcode,
    /// The masking key (frames from a client have one, from a server not).
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
}

/// A frame header that breaks RFC 6455.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum FrameError {
    /// RSV bits set: no extension was negotiated.
    #[error("WebSocket frame with reserved bits set")]
    Reserved,
    /// An opcode RFC 6455 does not define.
    #[error("WebSocket frame with unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A control frame over 125 bytes or fragmented.
    #[error("WebSocket control frame fragmented or longer than 125 bytes")]
    BadControl,
    /// A 64-bit length with its top bit set.
    #[error("WebSocket frame length over 2^63")]
    Length,
}

/// The whole header's length, from its first two bytes (2 to 14).
pub fn header_len(first_two: [u8; 2]) -> usize {
    let extended = match first_two[1] & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if first_two[1] & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// Parses a header of exactly [`header_len`] bytes.
pub fn parse_header(bytes: &[u8]) -> Result<Header, FrameError> {
    debug_assert!(bytes.len() >= 2 && bytes.len() == header_len([bytes[0], bytes[1]]));
    let (b0, b1) = (bytes[0], bytes[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    let opcode = Opcode::from_bits(b0 & 0x0F).ok_or(FrameError::UnknownOpcode(b0 & 0x0F))?;
    let fin = b0 & 0x80 != 0;
    let (len, rest) = match b1 & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes([bytes[2], bytes[3]])),
            &bytes[4..],
        ),
        127 => {
            let len = u64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(FrameError::Length);
            }
            (len, &bytes[10..])
        }
        short => (u64::from(short), &bytes[2..]),
    };
    let mask = (b1 & 0x80 != 0).then(|| rest[..4].try_into().expect("4 bytes"));
    if opcode.is_control() && (!fin || len > MAX_CONTROL as u64) {
        return Err(FrameError::BadControl);
    }
    Ok(Header {
        fin,
        opcode,
        mask,
        len,
    })
}

/// Writes `header` into `out` (the shortest length encoding); returns how
/// many bytes it took.
pub fn encode_header(header: &Header, out: &mut [u8; MAX_HEADER]) -> usize {
    out[0] = u8::from(header.fin) << 7 | header.opcode.bits();
    let mask_bit = if header.mask.is_some() { 0x80 } else { 0 };
    let mut at = 2;
    if header.len < 126 {
        out[1] = mask_bit | header.len as u8;
    } else if let Ok(len) = u16::try_from(header.len) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        at = 4;
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&header.len.to_be_bytes());
        at = 10;
    }
    if let Some(key) = header.mask {
        out[at..at + 4].copy_from_slice(&key);
        at += 4;
    }
    at
}

/// XORs `data` with the masking `key`, `data` being the payload's bytes
/// from `offset` on (so a payload can be unmasked in pieces as it
/// arrives). Masking twice gives the bytes back.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: u64) {
    let mut key = key;
    key.rotate_left((offset % 4) as usize);
    // Eight bytes at a time (the compiler widens this further); the key
    // repeats every four bytes, so every word takes the same pattern.
    let word = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut words = data.chunks_exact_mut(8);
    for chunk in &mut words {
        let masked = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ word;
        chunk.copy_from_slice(&masked.to_ne_bytes());
    }
    for (i, byte) in words.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn opcodes() -> impl Strategy<Value = Opcode> {
        prop_oneof![
            Just(Opcode::Continuation),
            Just(Opcode::Text),
            Just(Opcode::Binary),
            Just(Opcode::Close),
            Just(Opcode::Ping),
            Just(Opcode::Pong),
        ]
    }

    #[test]
    fn the_rfcs_examples_parse() {
        // RFC 6455 §5.7: a single-frame unmasked text "Hello", and masked.
        let unmasked = [0x81, 0x05];
        assert_eq!(header_len(unmasked), 2);
        assert_eq!(
            parse_header(&unmasked),
            Ok(Header {
                fin: true,
                opcode: Opcode::Text,
                mask: None,
                len: 5
            })
        );
        let masked = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d];
        let header = parse_header(&masked).unwrap();
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply_mask(&mut payload, header.mask.unwrap(), 0);
        assert_eq!(&payload, b"Hello");
        // 256 bytes of binary in one unmasked frame: a 16-bit length.
        assert_eq!(parse_header(&[0x82, 0x7E, 0x01, 0x00]).unwrap().len, 256);
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(parse_header(&[0xC2, 0x00]), Err(FrameError::Reserved));
        assert_eq!(
            parse_header(&[0x83, 0x00]),
            Err(FrameError::UnknownOpcode(3))
        );
        assert_eq!(parse_header(&[0x09, 0x00]), Err(FrameError::BadControl));
        assert_eq!(
            parse_header(&[0x89, 0x7E, 0, 126]),
            Err(FrameError::BadControl)
        );
        let huge = [0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse_header(&huge), Err(FrameError::Length));
    }

    proptest! {
        /// Whatever header is written, reading it back gives it again.
        #[test]
        fn headers_round_trip(
            fin in any::<bool>(),
            opcode in opcodes(),
            mask in proptest::option::of(any::<[u8; 4]>()),
            len in prop_oneof![0u64..200, 100u64..70_000, 0u64..(1 << 63)],
        ) {
            let (fin, len) = match opcode.is_control() {
                true => (true, len % (MAX_CONTROL as u64 + 1)),
                false => (fin, len),
            };
            let header = Header { fin, opcode, mask, len };
            let mut out = [0; MAX_HEADER];
            let n = encode_header(&header, &mut out);
            prop_assert_eq!(header_len([out[0], out[1]]), n);
            prop_assert_eq!(parse_header(&out[..n]), Ok(header));
        }

        /// Any bytes: a header or an error, never a panic.
        #[test]
        fn any_bytes_parse_or_fail(bytes in any::<[u8; MAX_HEADER]>()) {
            let n = header_len([bytes[0], bytes[1]]);
            let _ = parse_header(&bytes[..n]);
        }

        /// Masking in pieces equals masking at once, equals the plain
        /// definition, and undoes itself.
        #[test]
        fn masking_in_pieces_is_masking(
            data in proptest::collection::vec(any::<u8>(), 0..100),
            key in any::<[u8; 4]>(),
            cut in 0usize..100,
        ) {
            let expected: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
            let cut = cut.min(data.len());
            let mut pieces = data.clone();
            let (first, second) = pieces.split_at_mut(cut);
            apply_mask(first, key, 0);
            apply_mask(second, key, cut as u64);
            prop_assert_eq!(&pieces, &expected);
            apply_mask(&mut pieces, key, 0);
            prop_assert_eq!(pieces, data);
        }
    }
}
