//! Handshake parameters, sans-IO: what each side announces inside the
//! encrypted payloads of the Noise handshake messages (like QUIC's transport
//! parameters), so that additions to the protocol are negotiated instead of
//! breaking the version.
//!
//! ```text
//! parameters := parameter*            (at most MAX_PARAMETERS bytes)
//! parameter  := id (u8) | length (u8) | value (length bytes)
//! id 1       := features: u64 big-endian bit set
//! ```
//!
//! Rules (docs/link-protocol.md, "Extensions"): unknown ids are skipped;
//! unknown feature bits are ignored; a known id with a malformed value, or
//! any id twice, is a malformed handshake. A feature is in effect on a link
//! only when both sides announced it. Empty parameters (what a gateway that
//! predates them sends) mean no features.

use crate::handshake::HandshakeError;

/// Longest parameter block accepted (it travels in one handshake message).
pub const MAX_PARAMETERS: usize = 192;

const FEATURES_ID: u8 = 1;

/// A set of optional protocol features.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features(u64);

impl Features {
    /// No optional feature.
    pub const NONE: Features = Features(0);
    /// In-session fresh key exchange (`KEY_EXCHANGE` frames, see `kex`).
    pub const KEY_EXCHANGE: Features = Features(1 << 0);
    /// UDP datagrams across the link (`DATAGRAM` frames).
    pub const DATAGRAMS: Features = Features(1 << 1);

    /// What this build of linkgate supports and announces.
    pub const SUPPORTED: Features = Features(Features::KEY_EXCHANGE.0 | Features::DATAGRAMS.0);

    /// The features in both sets.
    pub fn both(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }

    /// Whether every feature of `feature` is in this set.
    pub fn contains(self, feature: Features) -> bool {
        self.0 & feature.0 == feature.0
    }

    /// The raw bit set (for logs and status).
    pub fn bits(self) -> u64 {
        self.0
    }
}

/// Appends the parameter block announcing `features` to `out`.
pub fn encode(features: Features, out: &mut Vec<u8>) {
    out.push(FEATURES_ID);
    out.push(8);
    out.extend_from_slice(&features.0.to_be_bytes());
}

/// Parses a parameter block (see the module's rules).
pub fn decode(block: &[u8]) -> Result<Features, HandshakeError> {
    if block.len() > MAX_PARAMETERS {
        return Err(HandshakeError::Malformed("handshake parameters too long"));
    }
    let mut features = None;
    let mut rest = block;
    while let Some((&id, after_id)) = rest.split_first() {
        let (&len, after_len) = after_id
            .split_first()
            .ok_or(HandshakeError::Malformed("truncated handshake parameter"))?;
        let value = after_len
            .get(..len as usize)
            .ok_or(HandshakeError::Malformed("truncated handshake parameter"))?;
        rest = &after_len[len as usize..];
        if id == FEATURES_ID {
            let bits: [u8; 8] = value
                .try_into()
                .map_err(|_| HandshakeError::Malformed("bad features parameter"))?;
            if features
                .replace(Features(u64::from_be_bytes(bits)))
                .is_some()
            {
                return Err(HandshakeError::Malformed("handshake parameter repeated"));
            }
        }
        // Unknown ids are skipped: a later version may add them.
    }
    Ok(features.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_empty_means_none() {
        let mut block = Vec::new();
        encode(Features::SUPPORTED, &mut block);
        assert_eq!(decode(&block).unwrap(), Features::SUPPORTED);
        assert_eq!(decode(&[]).unwrap(), Features::NONE);
    }

    #[test]
    fn unknown_ids_and_bits_are_ignored() {
        // An unknown parameter before and after, and a future feature bit.
        let mut block = vec![200, 3, 1, 2, 3];
        encode(Features(Features::KEY_EXCHANGE.0 | 1 << 40), &mut block);
        block.extend_from_slice(&[7, 0]);
        let theirs = decode(&block).unwrap();
        assert_eq!(theirs.both(Features::SUPPORTED), Features::KEY_EXCHANGE);
        assert!(Features::SUPPORTED.contains(Features::DATAGRAMS));
    }

    #[test]
    fn malformed_blocks_are_refused() {
        assert!(decode(&[1]).is_err(), "no length");
        assert!(decode(&[1, 8, 0, 0]).is_err(), "truncated value");
        assert!(decode(&[1, 2, 0, 0]).is_err(), "features of the wrong size");
        let mut twice = Vec::new();
        encode(Features::NONE, &mut twice);
        encode(Features::KEY_EXCHANGE, &mut twice);
        assert!(decode(&twice).is_err(), "repeated");
        assert!(decode(&[9; MAX_PARAMETERS + 1]).is_err(), "too long");
    }

    proptest! {
        #[test]
        fn decode_never_panics(block in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&block);
        }
    }
}
