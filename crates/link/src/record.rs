//! The record layer: each record is `u16 length || AES-256-GCM ciphertext
//! || tag`, sealed with Noise's CipherState rules (nonce = 32 zero bits and
//! a 64-bit big-endian counter that both sides count implicitly, never
//! sent; REKEY as in Noise §11.3 every [`REKEY_INTERVAL`] records). Any
//! record that fails to open is fatal to the link: nothing from it, or
//! after it, is ever delivered.
//!
//! The keys come from the Noise handshake's split (see `handshake`). We seal
//! with ring's AEAD directly instead of snow's transport object so that the
//! sending and receiving halves are independent values owned by different
//! tasks, and so that sealing and opening work in place without copies.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use thiserror::Error;

use crate::frame::Frame;

/// Largest ciphertext (including the tag) of one record: Noise's limit.
pub const MAX_RECORD: usize = 65535;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Largest plaintext of one record.
pub const MAX_PLAINTEXT: usize = MAX_RECORD - TAG_LEN;
/// Records sealed with one key before both sides switch to the next.
pub const REKEY_INTERVAL: u64 = 1 << 20;

/// A record could not be opened.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RecordError {
    /// Wrong key, tampered, replayed, reordered or truncated record.
    #[error("link record failed authentication (tampered, replayed or corrupted data)")]
    Authentication,
    /// Shorter than a tag: cannot be a record.
    #[error("link record too short")]
    TooShort,
}

fn nonce(counter: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(bytes)
}

fn aead_key(raw: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, raw).expect("32-byte AES-256 key"))
}

/// Noise REKEY: the first 32 bytes of ENCRYPT(k, 2^64-1, "", 32 zero bytes).
fn rekey(raw: &[u8; 32]) -> [u8; 32] {
    let mut block = [0u8; 32];
    // The tag is discarded: only the keystream-derived bytes become the key.
    let _tag = aead_key(raw)
        .seal_in_place_separate_tag(nonce(u64::MAX), Aad::empty(), &mut block)
        .expect("sealing 32 bytes cannot fail");
    block
}

/// One direction's key and counter. The raw key is wiped when dropped
/// (ring's own key schedule is ring's to handle).
struct CipherState {
    raw: zeroize::Zeroizing<[u8; 32]>,
    key: LessSafeKey,
    counter: u64,
    rekey_interval: u64,
}

impl CipherState {
    fn new(raw: [u8; 32], rekey_interval: u64) -> Self {
        CipherState {
            key: aead_key(&raw),
            raw: zeroize::Zeroizing::new(raw),
            counter: 0,
            rekey_interval,
        }
    }

    /// Advances the counter after a record, rekeying at each interval.
    /// Noise reserves nonce 2^64 - 1 for REKEY and forbids reuse: a link
    /// that ever got there (it cannot, at any real rate) must end.
    fn advance(&mut self) {
        self.counter = self
            .counter
            .checked_add(1)
            .filter(|&c| c < u64::MAX)
            .expect("record counter exhausted: the link must be re-established");
        if self.counter.is_multiple_of(self.rekey_interval) {
            *self.raw = rekey(&self.raw);
            self.key = aead_key(&self.raw);
        }
    }
}

/// The sending half: seals frames into records.
pub struct Sealer(CipherState);

impl Sealer {
    /// A sealer with the handshake's sending key.
    pub fn new(key: [u8; 32]) -> Self {
        Sealer(CipherState::new(key, REKEY_INTERVAL))
    }

    /// Same, with a different rekey interval (tests exercise rekeying).
    pub fn with_rekey_interval(key: [u8; 32], interval: u64) -> Self {
        Sealer(CipherState::new(key, interval.max(1)))
    }

    /// Appends one record carrying `frame` to `out`. The frame's plaintext
    /// must not exceed [`MAX_PLAINTEXT`] (DATA frames are cut to
    /// `frame::MAX_DATA` by the caller; texts are capped at `frame::MAX_TEXT`).
    pub fn seal(&mut self, frame: &Frame<'_>, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0, 0]);
        frame.encode(out);
        let plaintext_len = out.len() - start - 2;
        assert!(plaintext_len <= MAX_PLAINTEXT, "frame larger than a record");
        let state = &mut self.0;
        let tag = state
            .key
            .seal_in_place_separate_tag(nonce(state.counter), Aad::empty(), &mut out[start + 2..])
            .expect("AES-GCM sealing within size limits cannot fail");
        out.extend_from_slice(tag.as_ref());
        let record_len = (plaintext_len + TAG_LEN) as u16;
        out[start..start + 2].copy_from_slice(&record_len.to_be_bytes());
        state.advance();
    }
}

impl Sealer {
    /// Seals a record laid out in place: `record` is two bytes for the
    /// length, the frame's plaintext, then [`TAG_LEN`] bytes of room for the
    /// tag. Lets a writer encode many frames into one buffer, then seal
    /// them in wire order without copying.
    pub fn seal_in_place(&mut self, record: &mut [u8]) {
        assert!(
            record.len() >= 2 + TAG_LEN && record.len() - 2 - TAG_LEN <= MAX_PLAINTEXT,
            "record layout out of bounds"
        );
        let tag_at = record.len() - TAG_LEN;
        let record_len = (record.len() - 2) as u16;
        record[..2].copy_from_slice(&record_len.to_be_bytes());
        let state = &mut self.0;
        let tag = state
            .key
            .seal_in_place_separate_tag(nonce(state.counter), Aad::empty(), &mut record[2..tag_at])
            .expect("AES-GCM sealing within size limits cannot fail");
        record[tag_at..].copy_from_slice(tag.as_ref());
        state.advance();
    }
}

/// The receiving half: opens records in order.
pub struct Opener(CipherState);

impl Opener {
    /// An opener with the handshake's receiving key.
    pub fn new(key: [u8; 32]) -> Self {
        Opener(CipherState::new(key, REKEY_INTERVAL))
    }

    /// Same, with a different rekey interval (must match the peer's sealer).
    pub fn with_rekey_interval(key: [u8; 32], interval: u64) -> Self {
        Opener(CipherState::new(key, interval.max(1)))
    }

    /// Decrypts `record` (ciphertext and tag, without the length prefix) in
    /// place and returns the plaintext. After an error the opener must not
    /// be used again: the link is to be closed.
    pub fn open<'a>(&mut self, record: &'a mut [u8]) -> Result<&'a mut [u8], RecordError> {
        if record.len() < TAG_LEN {
            return Err(RecordError::TooShort);
        }
        let state = &mut self.0;
        let plaintext = state
            .key
            .open_in_place(nonce(state.counter), Aad::empty(), record)
            .map_err(|_| RecordError::Authentication)?;
        state.advance();
        Ok(plaintext)
    }
}

/// If `buf` starts with a complete record, its total length including the
/// two length bytes.
pub fn complete_record_len(buf: &[u8]) -> Option<usize> {
    let len = u16::from_be_bytes([*buf.first()?, *buf.get(1)?]) as usize + 2;
    (buf.len() >= len).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(interval: u64) -> (Sealer, Opener) {
        let key = [7u8; 32];
        (
            Sealer::with_rekey_interval(key, interval),
            Opener::with_rekey_interval(key, interval),
        )
    }

    fn seal_data(sealer: &mut Sealer, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        sealer.seal(&Frame::Data { id: 1, data }, &mut out);
        out
    }

    #[test]
    fn round_trip_across_rekeys() {
        let (mut sealer, mut opener) = pair(3);
        for i in 0..20u8 {
            let mut record = seal_data(&mut sealer, &[i; 100]);
            let len = complete_record_len(&record).unwrap();
            assert_eq!(len, record.len());
            let plaintext = opener.open(&mut record[2..]).unwrap();
            assert_eq!(
                Frame::decode(plaintext).unwrap(),
                Frame::Data {
                    id: 1,
                    data: &[i; 100]
                }
            );
        }
    }

    #[test]
    fn rekey_changes_the_key() {
        let (mut sealer, _) = pair(2);
        let (mut plain_sealer, _) = pair(u64::MAX);
        for _ in 0..2 {
            seal_data(&mut sealer, b"x");
            seal_data(&mut plain_sealer, b"x");
        }
        // Same counter (2), different key after the rekey.
        assert_ne!(
            seal_data(&mut sealer, b"x"),
            seal_data(&mut plain_sealer, b"x")
        );
    }

    #[test]
    fn every_flipped_bit_position_is_rejected() {
        let (mut sealer, _) = pair(REKEY_INTERVAL);
        let record = seal_data(&mut sealer, b"secret payload");
        for i in 2..record.len() {
            let mut tampered = record.clone();
            tampered[i] ^= 0x01;
            let (_, mut opener) = pair(REKEY_INTERVAL);
            assert_eq!(
                opener.open(&mut tampered[2..]).unwrap_err(),
                RecordError::Authentication
            );
        }
    }

    #[test]
    fn replayed_and_reordered_records_are_rejected() {
        let (mut sealer, mut opener) = pair(REKEY_INTERVAL);
        let first = seal_data(&mut sealer, b"one");
        let second = seal_data(&mut sealer, b"two");
        let mut reordered = second.clone();
        assert!(opener.open(&mut reordered[2..]).is_err());
        let (_, mut opener) = pair(REKEY_INTERVAL);
        let mut replay = first.clone();
        opener.open(&mut first.clone()[2..]).unwrap();
        assert!(opener.open(&mut replay[2..]).is_err());
    }

    #[test]
    fn sealing_in_place_equals_sealing_by_frame() {
        let (mut by_frame, _) = pair(2);
        let (mut in_place, mut opener) = pair(2);
        for i in 0..5u8 {
            let expected = seal_data(&mut by_frame, &[i; 300]);
            let mut record = vec![0, 0];
            Frame::Data {
                id: 1,
                data: &[i; 300],
            }
            .encode(&mut record);
            record.extend_from_slice(&[0; TAG_LEN]);
            in_place.seal_in_place(&mut record);
            assert_eq!(record, expected);
            assert!(opener.open(&mut record[2..]).is_ok());
        }
    }

    #[test]
    fn incomplete_records_wait_for_more_bytes() {
        assert_eq!(complete_record_len(&[]), None);
        assert_eq!(complete_record_len(&[0]), None);
        assert_eq!(complete_record_len(&[0, 3, 1, 2]), None);
        assert_eq!(complete_record_len(&[0, 3, 1, 2, 3, 9]), Some(5));
    }
}
