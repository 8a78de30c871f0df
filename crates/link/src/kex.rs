//! Fresh key exchange inside an established session, sans-IO.
//!
//! REKEY (in `record`) only derives the next key from the current one: a
//! key stolen from a long-lived link's memory would open all its later
//! traffic. So, every hour or so many bytes, the dialer runs a new Noise
//! `NNpsk0` handshake (fresh ephemeral Diffie-Hellman keys on both sides)
//! inside the encrypted session, and both sides switch to its keys. The
//! handshake's PSK is the session's *chain secret*, so only the two gateways
//! of this session can complete it (nothing new to authenticate: the
//! records it travels in are already authenticated), and the prologue names
//! the session and the epoch, so a message cannot be replayed into another
//! session or another round. Each round gives new record keys and the next
//! chain secret:
//!
//! ```text
//! chain_0     = HKDF-SHA256(IKM = k_dialer_to_hub ‖ k_hub_to_dialer, info = "linkgate link v1 kex chain")
//! round n     : Noise_NNpsk0_25519_AESGCM_SHA256, psk = chain_n,
//!               prologue = "linkgate link v1 kex" ‖ session id ‖ n (u64 big-endian)
//! chain_(n+1) = HKDF-SHA256(IKM = chain_n ‖ new k_dialer_to_hub ‖ new k_hub_to_dialer, same info)
//! ```
//!
//! On the wire (KEY_EXCHANGE frames, docs/link-protocol.md): the dialer
//! sends INIT (Noise message 1); the hub answers REPLY (message 2) and seals
//! every record after it with its new key; the dialer, once it read REPLY,
//! opens the hub's next records with the new key and sends DONE, the last
//! record under its old key. All old keys are wiped.

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::handshake::{HandshakeError, SessionKeys};

const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
const PROLOGUE_LABEL: &[u8] = b"linkgate link v1 kex";
const CHAIN_INFO: &[u8] = b"linkgate link v1 kex chain";
/// A Noise message of this exchange: a 32-byte ephemeral key and the tag of
/// the empty payload.
const MESSAGE_LEN: usize = 48;

/// One direction pair of record keys from a key exchange.
pub struct NewKeys {
    /// Key for the records we send after the switch.
    pub send: Zeroizing<[u8; 32]>,
    /// Key for the records we receive after the peer's switch.
    pub recv: Zeroizing<[u8; 32]>,
}

/// The secret both sides of a session hold for the next key exchange, and
/// the round it is for.
pub struct Chain {
    secret: Zeroizing<[u8; 32]>,
    session_id: [u8; 32],
    epoch: u64,
    dialer: bool,
}

/// The dialer between sending INIT and reading REPLY.
pub struct Initiated {
    noise: snow::HandshakeState,
}

impl Chain {
    /// The chain of a session that just completed its handshake; `dialer`
    /// says which side we are.
    pub fn new(keys: &SessionKeys, dialer: bool) -> Chain {
        let (to_hub, to_dialer) = if dialer {
            (&keys.send, &keys.recv)
        } else {
            (&keys.recv, &keys.send)
        };
        Chain {
            secret: derive(&[&to_hub[..], &to_dialer[..]]),
            session_id: keys.session_id,
            epoch: 0,
            dialer,
        }
    }

    /// Key exchanges completed so far on this session.
    pub fn completed(&self) -> u64 {
        self.epoch
    }

    fn noise(&self) -> Result<snow::Builder<'_>, HandshakeError> {
        let params = NOISE_PARAMS
            .parse()
            .map_err(|_| HandshakeError::Malformed("noise parameters"))?;
        Ok(snow::Builder::new(params))
    }

    fn prologue(&self) -> Vec<u8> {
        let mut prologue = PROLOGUE_LABEL.to_vec();
        prologue.extend_from_slice(&self.session_id);
        prologue.extend_from_slice(&self.epoch.to_be_bytes());
        prologue
    }

    /// The dialer starts a round: its state and the INIT message.
    pub fn initiate(&self) -> Result<(Initiated, Vec<u8>), HandshakeError> {
        let prologue = self.prologue();
        let mut noise = self
            .noise()?
            .prologue(&prologue)
            .and_then(|b| b.psk(0, &self.secret))
            .and_then(|b| b.build_initiator())
            .map_err(|_| HandshakeError::Malformed("noise setup"))?;
        let mut message = vec![0u8; MESSAGE_LEN + 16];
        let n = noise
            .write_message(&[], &mut message)
            .map_err(|_| HandshakeError::Malformed("key exchange message 1"))?;
        message.truncate(n);
        Ok((Initiated { noise }, message))
    }

    /// The hub answers INIT: the REPLY message and the new keys. The chain
    /// moves to the next round.
    pub fn respond(&mut self, init: &[u8]) -> Result<(Vec<u8>, NewKeys), HandshakeError> {
        let prologue = self.prologue();
        let mut noise = self
            .noise()?
            .prologue(&prologue)
            .and_then(|b| b.psk(0, &self.secret))
            .and_then(|b| b.build_responder())
            .map_err(|_| HandshakeError::Malformed("noise setup"))?;
        let mut scratch = [0u8; 64];
        if init.len() != MESSAGE_LEN {
            return Err(HandshakeError::Malformed("key exchange message 1 length"));
        }
        noise
            .read_message(init, &mut scratch)
            .map_err(|_| HandshakeError::Authentication)?;
        let mut reply = vec![0u8; MESSAGE_LEN + 16];
        let n = noise
            .write_message(&[], &mut reply)
            .map_err(|_| HandshakeError::Malformed("key exchange message 2"))?;
        reply.truncate(n);
        Ok((reply, self.advance(&mut noise)?))
    }

    /// The dialer reads REPLY: the new keys. The chain moves to the next round.
    pub fn finish(
        &mut self,
        initiated: Initiated,
        reply: &[u8],
    ) -> Result<NewKeys, HandshakeError> {
        let mut noise = initiated.noise;
        let mut scratch = [0u8; 64];
        if reply.len() != MESSAGE_LEN {
            return Err(HandshakeError::Malformed("key exchange message 2 length"));
        }
        noise
            .read_message(reply, &mut scratch)
            .map_err(|_| HandshakeError::Authentication)?;
        self.advance(&mut noise)
    }

    fn advance(&mut self, noise: &mut snow::HandshakeState) -> Result<NewKeys, HandshakeError> {
        if !noise.is_handshake_finished() {
            return Err(HandshakeError::Malformed("key exchange incomplete"));
        }
        let (to_hub, to_dialer) = noise.dangerously_get_raw_split();
        let (to_hub, to_dialer) = (Zeroizing::new(to_hub), Zeroizing::new(to_dialer));
        self.secret = derive(&[&self.secret[..], &to_hub[..], &to_dialer[..]]);
        self.epoch += 1;
        Ok(if self.dialer {
            NewKeys {
                send: to_hub,
                recv: to_dialer,
            }
        } else {
            NewKeys {
                send: to_dialer,
                recv: to_hub,
            }
        })
    }
}

fn derive(parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let mut input = Zeroizing::new(Vec::with_capacity(96));
    for part in parts {
        input.extend_from_slice(part);
    }
    let mut out = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, &input)
        .expand(CHAIN_INFO, &mut out[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Features;

    fn pair() -> (Chain, Chain) {
        let keys = |send: u8, recv: u8| SessionKeys {
            send: [send; 32],
            recv: [recv; 32],
            session_id: [7; 32],
            features: Features::KEY_EXCHANGE,
        };
        (
            Chain::new(&keys(1, 2), true),
            Chain::new(&keys(2, 1), false),
        )
    }

    #[test]
    fn both_sides_agree_round_after_round() {
        let (mut dialer, mut hub) = pair();
        let mut seen = Vec::new();
        for round in 1..=3 {
            let (initiated, init) = dialer.initiate().unwrap();
            let (reply, hub_keys) = hub.respond(&init).unwrap();
            let dialer_keys = dialer.finish(initiated, &reply).unwrap();
            assert_eq!(*dialer_keys.send, *hub_keys.recv);
            assert_eq!(*dialer_keys.recv, *hub_keys.send);
            assert_ne!(*dialer_keys.send, *dialer_keys.recv);
            assert!(!seen.contains(&*dialer_keys.send), "keys repeat");
            seen.push(*dialer_keys.send);
            assert_eq!((dialer.completed(), hub.completed()), (round, round));
        }
    }

    #[test]
    fn another_session_or_round_cannot_answer() {
        let (mut dialer, mut hub) = pair();
        // An INIT of round 0 replayed in round 1 fails.
        let (initiated, init) = dialer.initiate().unwrap();
        let (reply, _) = hub.respond(&init).unwrap();
        dialer.finish(initiated, &reply).unwrap();
        assert!(hub.respond(&init).is_err());
        // A dialer with another chain secret can neither start nor finish.
        let stranger_keys = SessionKeys {
            send: [9; 32],
            recv: [2; 32],
            session_id: [7; 32],
            features: Features::KEY_EXCHANGE,
        };
        let mut stranger = Chain::new(&stranger_keys, true);
        let (initiated, stranger_init) = stranger.initiate().unwrap();
        assert!(hub.respond(&stranger_init).is_err());
        let (_, init) = dialer.initiate().unwrap();
        let (reply, _) = hub.respond(&init).unwrap();
        assert!(stranger.finish(initiated, &reply).is_err());
    }

    #[test]
    fn malformed_messages_are_refused() {
        let (mut dialer, mut hub) = pair();
        assert!(hub.respond(&[]).is_err());
        assert!(hub.respond(&[0; MESSAGE_LEN]).is_err());
        let (initiated, _) = dialer.initiate().unwrap();
        assert!(dialer.finish(initiated, &[1; 3]).is_err());
    }
}
