//! The link handshake, sans-IO (see docs/link-protocol.md):
//!
//! ```text
//! M1 dialer -> hub : "LGK1" | version | user_len | user | KE1        (OPAQUE)
//! M2 hub -> dialer : KE2                                              (OPAQUE)
//! M3 dialer -> hub : KE3 | Noise NNpsk0 message 1 (psk, e; payload: parameters)
//! M4 hub -> dialer : 0x00 | Noise message 2 (e, ee; payload: parameters)   or   0x01 | reason
//! ```
//!
//! OPAQUE (opaque-ke, Ristretto255, 3DH, Argon2id) proves the password both
//! ways and yields a session key; HKDF turns it into the PSK of a Noise
//! `NNpsk0` handshake (snow) whose prologue hashes M1, M2 and KE3, so the
//! Noise session is bound to this exact OPAQUE run. Noise's split gives the
//! two record keys.
//!
//! Key mode (pinned static keys, WireGuard style) is the other way in:
//!
//! ```text
//! M1 dialer -> hub : "LGK1" | 2 | Noise IKpsk2 message 1 (e, es, s, ss; payload: timestamp | parameters)
//! M2 hub -> dialer : 0x00 | Noise message 2 (e, ee, se, psk; payload: parameters)   or   0x01 | reason
//! ```
//!
//! The parameters (`params`) announce optional features; the session keys
//! carry the ones both sides have.
//!
//! Byte 4 of M1 names the mode; the hub's configuration decides which mode
//! each peer may use, so neither can be downgraded to the other.

use hkdf::Hkdf;
use opaque_ke::{
    CipherSuite, ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialFinalization, CredentialRequest,
    CredentialResponse, RegistrationResponse, Ristretto255, ServerLogin, ServerLoginParameters,
    ServerRegistration, ServerSetup, TripleDh,
};
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::params::{self, Features};

/// The OPAQUE cipher suite of link protocol version 1.
pub struct LinkSuite;

impl CipherSuite for LinkSuite {
    type OprfCs = Ristretto255;
    type KeyExchange = TripleDh<Ristretto255, sha2::Sha512>;
    type Ksf = opaque_ke::argon2::Argon2<'static>;
}

/// First bytes of M1: protocol name and version.
pub const MAGIC: &[u8; 4] = b"LGK1";
/// Byte 4 of M1 in password mode (OPAQUE, then Noise NNpsk0).
pub const VERSION: u8 = 1;
/// Byte 4 of M1 in key mode (Noise IKpsk2 with pinned static keys).
pub const KEY_MODE: u8 = 2;
const KEY_NOISE_PARAMS: &str = "Noise_IKpsk2_25519_AESGCM_SHA256";
/// Domain separation for the OPAQUE context, prologue and PSK derivation.
const LABEL: &[u8] = b"linkgate link v1";
const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Longest handshake message accepted.
pub const MAX_HANDSHAKE_MESSAGE: usize = 4096;
/// Longest user name in M1.
pub const MAX_USER: usize = 64;

/// Why a handshake failed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// A message had the wrong form or length.
    #[error("malformed handshake message: {0}")]
    Malformed(&'static str),
    /// The other side speaks another protocol or version.
    #[error("not a linkgate link, or an unsupported version")]
    Version,
    /// OPAQUE or Noise verification failed: wrong password or unknown user
    /// (the two are deliberately indistinguishable), or tampering.
    #[error("wrong password or unknown user")]
    Authentication,
    /// The hub refused and said why.
    #[error("the other gateway refused the link: {0}")]
    Refused(String),
    /// The hub throttles logins and asked us to come back later (an
    /// unauthenticated hint).
    #[error("the other gateway is not taking logins from here now ({reason}); it asks to retry in {retry_after} s")]
    Busy {
        /// Seconds the hub asks the dialer to wait.
        retry_after: u16,
        /// What the hub said, escaped.
        reason: String,
    },
    /// Key mode: no peer has the dialer's public key.
    #[error("no [[peer]] has this public key")]
    UnknownKey,
    /// Key mode: the hello is not newer than one already accepted from the
    /// same gateway (a replay, or its clock went back).
    #[error("replayed or out-of-date hello (a replay, or that gateway's clock went back)")]
    StaleHello,
}

/// A fixed Noise ephemeral key, for known-answer tests. It can only be
/// made with the `test-hooks` feature (which only this crate's own tests
/// enable), so every real handshake takes a fresh ephemeral: the hook is in
/// the signatures, but outside tests only `None` can be passed.
pub struct FixedEphemeral([u8; 32]);

#[cfg(feature = "test-hooks")]
impl FixedEphemeral {
    /// The ephemeral secret `key` (tests only).
    pub fn new(key: [u8; 32]) -> Self {
        FixedEphemeral(key)
    }
}

/// Keys and identity of an established link session. Wiped from memory
/// when dropped.
#[derive(zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct SessionKeys {
    /// Key for records we send.
    pub send: [u8; 32],
    /// Key for records we receive.
    pub recv: [u8; 32],
    /// Noise handshake hash: unique per session (for logs and tests).
    pub session_id: [u8; 32],
    /// The optional features both sides announced (see `params`).
    #[zeroize(skip)]
    pub features: Features,
}

// === Hub identity and peer records ===

/// The hub's long-term OPAQUE secrets (OPRF seed and key-exchange key pair).
/// Clones share one copy (handshakes take it to a blocking thread).
#[derive(Clone)]
pub struct Identity(std::sync::Arc<ServerSetup<LinkSuite>>);

impl Identity {
    /// Generates a fresh identity.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Identity(std::sync::Arc::new(ServerSetup::new(rng)))
    }
    /// Serialized form for the identity file.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.serialize().to_vec()
    }
    /// Parses the identity file's contents.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HandshakeError> {
        ServerSetup::deserialize(bytes)
            .map(|setup| Identity(std::sync::Arc::new(setup)))
            .map_err(|_| HandshakeError::Malformed("invalid identity"))
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("Identity(********)")
    }
}

/// A peer's OPAQUE registration record, as stored by the hub: it lets the
/// hub verify the peer's password without knowing it.
#[derive(Clone)]
pub struct PeerRecord(ServerRegistration<LinkSuite>);

impl std::fmt::Debug for PeerRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("PeerRecord(********)")
    }
}

impl PeerRecord {
    /// Runs OPAQUE registration for `user` with `password` against
    /// `identity`, both sides locally (the hub knows the password at this
    /// moment only).
    pub fn register<R: RngCore + CryptoRng>(
        rng: &mut R,
        identity: &Identity,
        user: &str,
        password: &[u8],
    ) -> Result<Self, HandshakeError> {
        let start = ClientRegistration::<LinkSuite>::start(rng, password)
            .map_err(|_| HandshakeError::Authentication)?;
        let response = ServerRegistration::start(&identity.0, start.message, user.as_bytes())
            .map_err(|_| HandshakeError::Authentication)?;
        let finish = start
            .state
            .finish(
                rng,
                password,
                RegistrationResponse::deserialize(&response.message.serialize())
                    .map_err(|_| HandshakeError::Authentication)?,
                ClientRegistrationFinishParameters::default(),
            )
            .map_err(|_| HandshakeError::Authentication)?;
        Ok(PeerRecord(ServerRegistration::finish(finish.message)))
    }

    /// Serialized form (`linkgate peer-record` prints it in base64).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.serialize().to_vec()
    }

    /// Parses a serialized record.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HandshakeError> {
        ServerRegistration::deserialize(bytes)
            .map(PeerRecord)
            .map_err(|_| HandshakeError::Malformed("invalid peer record"))
    }
}

// === Dialer (OPAQUE client, Noise initiator) ===

/// The dialer after sending M1, waiting for M2.
pub struct ClientAwaitingKe2 {
    login: ClientLogin<LinkSuite>,
    password: Vec<u8>,
    m1: Vec<u8>,
}

/// The dialer after sending M3, waiting for M4.
pub struct ClientAwaitingFinal {
    noise: snow::HandshakeState,
}

/// Starts a handshake as `user` with `password`; returns the state and M1.
pub fn client_start<R: RngCore + CryptoRng>(
    rng: &mut R,
    user: &str,
    password: &[u8],
) -> Result<(ClientAwaitingKe2, Vec<u8>), HandshakeError> {
    if user.is_empty() || user.len() > MAX_USER {
        return Err(HandshakeError::Malformed("user name must be 1 to 64 bytes"));
    }
    let start = ClientLogin::<LinkSuite>::start(rng, password)
        .map_err(|_| HandshakeError::Authentication)?;
    let mut m1 = Vec::with_capacity(128);
    m1.extend_from_slice(MAGIC);
    m1.push(VERSION);
    m1.push(user.len() as u8);
    m1.extend_from_slice(user.as_bytes());
    m1.extend_from_slice(&start.message.serialize());
    let state = ClientAwaitingKe2 {
        login: start.state,
        password: password.to_vec(),
        m1: m1.clone(),
    };
    Ok((state, m1))
}

impl ClientAwaitingKe2 {
    /// Verifies the hub's M2 (this is where a wrong password is detected)
    /// and returns M3. `ephemeral` fixes the Noise ephemeral key (tests only).
    pub fn receive_ke2<R: RngCore + CryptoRng>(
        self,
        rng: &mut R,
        m2: &[u8],
        ephemeral: Option<&FixedEphemeral>,
    ) -> Result<(ClientAwaitingFinal, Vec<u8>), HandshakeError> {
        let response = CredentialResponse::<LinkSuite>::deserialize(m2)
            .map_err(|_| HandshakeError::Malformed("bad KE2"))?;
        let params = ClientLoginFinishParameters::new(Some(LABEL), Default::default(), None);
        let finish = self
            .login
            .finish(rng, &self.password, response, params)
            .map_err(|_| HandshakeError::Authentication)?;
        let ke3 = finish.message.serialize();
        let prologue = prologue(&self.m1, m2, &ke3);
        let psk = noise_psk(&finish.session_key);
        let mut noise = noise_builder(&prologue, &psk, ephemeral.map(|e| &e.0))?
            .build_initiator()
            .map_err(|_| HandshakeError::Malformed("noise setup"))?;
        let mut m3 = ke3.to_vec();
        let mut buf = [0u8; 512];
        let n = noise
            .write_message(&our_parameters(), &mut buf)
            .map_err(|_| HandshakeError::Malformed("noise message 1"))?;
        m3.extend_from_slice(&buf[..n]);
        Ok((ClientAwaitingFinal { noise }, m3))
    }
}

impl ClientAwaitingFinal {
    /// Processes M4: the hub's acceptance (Noise message 2) or refusal.
    pub fn receive_final(self, m4: &[u8]) -> Result<SessionKeys, HandshakeError> {
        initiator_final(self.noise, m4)
    }
}

// === Hub (OPAQUE server, Noise responder) ===

/// M1, parsed.
pub struct Hello {
    /// The name the dialer logs in as (sent in clear; OPAQUE needs it).
    pub user: String,
    request: CredentialRequest<LinkSuite>,
    m1: Vec<u8>,
}

/// Parses M1.
pub fn parse_hello(m1: &[u8]) -> Result<Hello, HandshakeError> {
    if m1.len() < 6 || &m1[..4] != MAGIC || m1[4] != VERSION {
        return Err(HandshakeError::Version);
    }
    let user_len = m1[5] as usize;
    let user = m1
        .get(6..6 + user_len)
        .ok_or(HandshakeError::Malformed("truncated hello"))?;
    if !valid_user(user) {
        return Err(HandshakeError::Malformed(
            "user name must be 1-64 letters, digits, '.', '_' or '-'",
        ));
    }
    let user = String::from_utf8_lossy(user).into_owned();
    let request = CredentialRequest::deserialize(&m1[6 + user_len..])
        .map_err(|_| HandshakeError::Malformed("bad KE1"))?;
    Ok(Hello {
        user,
        request,
        m1: m1.to_vec(),
    })
}

/// Whether `name` is a valid user (peer) name: 1–64 ASCII letters, digits,
/// `.`, `_` or `-`, the alphabet of `[[peer]] name`. The name arrives
/// before authentication, so nothing else may reach the hub's logs.
pub fn valid_user(name: &[u8]) -> bool {
    (1..=MAX_USER).contains(&name.len())
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Text that came from the other side (before or after authentication),
/// made safe for a log line: invalid UTF-8 replaced, control characters
/// (newlines, escape codes) escaped, at most `max` bytes kept.
pub fn untrusted_text(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// First bytes of a "busy" answer, which the hub may send in place of M2
/// (either mode) when it throttles logins. It is not authenticated: a
/// dialer takes its retry time as a hint, never as proof of anything.
pub const BUSY_MAGIC: &[u8; 4] = b"LGB1";

/// A busy answer: `BUSY_MAGIC` | retry after (u16 seconds) | reason.
pub fn busy(retry_after_secs: u16, reason: &str) -> Vec<u8> {
    let mut message = BUSY_MAGIC.to_vec();
    message.extend_from_slice(&retry_after_secs.to_be_bytes());
    message.extend_from_slice(&reason.as_bytes()[..reason.len().min(256)]);
    message
}

/// Reads a busy answer: `Some(error)` if `m2` is one. (A real M2 is never
/// this short with this prefix: KE2 is a fixed 320 bytes, a key-mode M2
/// starts with 0x00 or 0x01.)
pub fn parse_busy(m2: &[u8]) -> Option<HandshakeError> {
    if m2.len() < 6 || m2.len() > 6 + 256 || &m2[..4] != BUSY_MAGIC {
        return None;
    }
    Some(HandshakeError::Busy {
        retry_after: u16::from_be_bytes([m2[4], m2[5]]),
        reason: untrusted_text(&m2[6..], 256),
    })
}

/// The hub after sending M2, waiting for M3.
pub struct ServerAwaitingFinish {
    login: ServerLogin<LinkSuite>,
    m1: Vec<u8>,
    m2: Vec<u8>,
}

/// Answers M1 with M2. With `record = None` (unknown user) OPAQUE answers
/// from a fake record, indistinguishable from a real one to the dialer.
pub fn server_respond<R: RngCore + CryptoRng>(
    rng: &mut R,
    identity: &Identity,
    record: Option<&PeerRecord>,
    hello: Hello,
) -> Result<(ServerAwaitingFinish, Vec<u8>), HandshakeError> {
    let params = ServerLoginParameters {
        context: Some(LABEL),
        identifiers: Default::default(),
    };
    let start = ServerLogin::start(
        rng,
        &identity.0,
        record.map(|r| r.0.clone()),
        hello.request,
        hello.user.as_bytes(),
        params,
    )
    .map_err(|_| HandshakeError::Malformed("cannot answer KE1"))?;
    let m2 = start.message.serialize().to_vec();
    let state = ServerAwaitingFinish {
        login: start.state,
        m1: hello.m1,
        m2: m2.clone(),
    };
    Ok((state, m2))
}

/// KE3's length in this suite (a MAC).
const KE3_LEN: usize = 64;

impl ServerAwaitingFinish {
    /// Verifies M3; on success returns M4 and the session keys. On failure
    /// returns the error and the refusal M4 to send before closing.
    pub fn receive_finish(
        self,
        m3: &[u8],
        ephemeral: Option<&FixedEphemeral>,
    ) -> Result<(Vec<u8>, SessionKeys), (HandshakeError, Vec<u8>)> {
        let refuse = |e: HandshakeError| {
            let mut m4 = vec![1u8];
            m4.extend_from_slice(b"authentication failed: wrong password or unknown user");
            (e, m4)
        };
        if m3.len() <= KE3_LEN {
            return Err(refuse(HandshakeError::Malformed("short M3")));
        }
        let (ke3, noise_message) = m3.split_at(KE3_LEN);
        let finalization = CredentialFinalization::<LinkSuite>::deserialize(ke3)
            .map_err(|_| refuse(HandshakeError::Malformed("bad KE3")))?;
        let params = ServerLoginParameters {
            context: Some(LABEL),
            identifiers: Default::default(),
        };
        let finish = self
            .login
            .finish(finalization, params)
            .map_err(|_| refuse(HandshakeError::Authentication))?;
        let prologue = prologue(&self.m1, &self.m2, ke3);
        let psk = noise_psk(&finish.session_key);
        let mut noise = noise_builder(&prologue, &psk, ephemeral.map(|e| &e.0))
            .and_then(|b| {
                b.build_responder()
                    .map_err(|_| HandshakeError::Malformed("noise setup"))
            })
            .map_err(refuse)?;
        let mut buf = [0u8; 512];
        let n = noise
            .read_message(noise_message, &mut buf)
            .map_err(|_| refuse(HandshakeError::Authentication))?;
        let theirs = params::decode(&buf[..n]).map_err(refuse)?;
        let n = noise
            .write_message(&our_parameters(), &mut buf)
            .map_err(|_| refuse(HandshakeError::Malformed("noise message 2")))?;
        let mut m4 = vec![0u8];
        m4.extend_from_slice(&buf[..n]);
        let keys = split_keys(&mut noise, false, theirs).map_err(refuse)?;
        Ok((m4, keys))
    }
}

// === Key mode ===

/// How a hub tells the two modes apart from M1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// OPAQUE password login, then Noise NNpsk0.
    Password,
    /// Noise IKpsk2 with pinned static keys.
    Key,
}

/// The mode M1 asks for.
pub fn hello_mode(m1: &[u8]) -> Result<Mode, HandshakeError> {
    match m1.get(..5) {
        Some([a, b, c, d, VERSION]) if [*a, *b, *c, *d] == *MAGIC => Ok(Mode::Password),
        Some([a, b, c, d, KEY_MODE]) if [*a, *b, *c, *d] == *MAGIC => Ok(Mode::Key),
        _ => Err(HandshakeError::Version),
    }
}

/// A gateway's static X25519 key pair for key mode. Wiped from memory when
/// dropped (clones too: each copy wipes itself).
#[derive(Clone, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct StaticKeys {
    secret: [u8; 32],
    /// The public half, which the other gateway pins.
    pub public: [u8; 32],
}

impl std::fmt::Debug for StaticKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("StaticKeys")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// This gateway's static key pair, derived from the identity (HKDF with
    /// its own label, so it is independent of the OPAQUE secrets): the
    /// identity file holds one secret and needs no second format.
    pub fn static_keys(&self) -> StaticKeys {
        let mut secret = [0u8; 32];
        let identity = zeroize::Zeroizing::new(self.to_bytes());
        Hkdf::<Sha256>::new(None, &identity)
            .expand(b"linkgate link v1 static x25519 key", &mut secret)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let public = curve25519_dalek::montgomery::MontgomeryPoint::mul_base_clamped(secret);
        StaticKeys {
            secret,
            public: public.to_bytes(),
        }
    }
}

/// Whether an X25519 public key is one of the low-order points (or maps to
/// one): a Diffie-Hellman with it gives a fixed result whatever the secret,
/// so such a key must never be pinned or accepted. Multiplying by the
/// cofactor (8) sends exactly those points to the identity (u = 0).
pub fn is_low_order(public: &[u8; 32]) -> bool {
    let point = curve25519_dalek::montgomery::MontgomeryPoint(*public);
    (point * curve25519_dalek::scalar::Scalar::from(8u8)).to_bytes() == [0u8; 32]
}

/// Key mode's pre-shared key: none is configured, so zeros (as WireGuard
/// does without a preshared key); authentication rests on the static keys.
const KEY_MODE_PSK: [u8; 32] = [0; 32];

fn key_noise(
    keys: &StaticKeys,
    remote: Option<&[u8; 32]>,
    ephemeral: Option<&[u8; 32]>,
    initiator: bool,
) -> Result<snow::HandshakeState, HandshakeError> {
    let params = KEY_NOISE_PARAMS
        .parse()
        .map_err(|_| HandshakeError::Malformed("noise parameters"))?;
    let mut prologue = LABEL.to_vec();
    prologue.extend_from_slice(MAGIC);
    prologue.push(KEY_MODE);
    let mut builder = snow::Builder::new(params)
        .prologue(&prologue)
        .and_then(|b| b.local_private_key(&keys.secret))
        .and_then(|b| b.psk(2, &KEY_MODE_PSK))
        .map_err(|_| HandshakeError::Malformed("noise setup"))?;
    if let Some(remote) = remote {
        builder = builder
            .remote_public_key(remote)
            .map_err(|_| HandshakeError::Malformed("noise setup"))?;
    }
    if let Some(key) = ephemeral {
        builder = builder.fixed_ephemeral_key_for_testing_only(key);
    }
    let state = if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    };
    state.map_err(|_| HandshakeError::Malformed("noise setup"))
}

/// The dialer in key mode after sending M1, waiting for M2.
pub struct KeyClient {
    noise: snow::HandshakeState,
}

/// Starts a key-mode handshake with `keys` towards the hub whose public key
/// is `hub`; `timestamp` (nanoseconds since the Unix epoch, growing) lets the
/// hub refuse a replayed M1. `ephemeral` is for tests only.
pub fn key_client_start(
    keys: &StaticKeys,
    hub: &[u8; 32],
    timestamp: u64,
    ephemeral: Option<&FixedEphemeral>,
) -> Result<(KeyClient, Vec<u8>), HandshakeError> {
    let mut noise = key_noise(keys, Some(hub), ephemeral.map(|e| &e.0), true)?;
    let mut m1 = MAGIC.to_vec();
    m1.push(KEY_MODE);
    let mut payload = timestamp.to_be_bytes().to_vec();
    payload.extend_from_slice(&our_parameters());
    let mut buf = [0u8; 512];
    let n = noise
        .write_message(&payload, &mut buf)
        .map_err(|_| HandshakeError::Malformed("noise message 1"))?;
    m1.extend_from_slice(&buf[..n]);
    Ok((KeyClient { noise }, m1))
}

impl KeyClient {
    /// Processes M2: the hub's acceptance or refusal.
    pub fn receive_final(self, m2: &[u8]) -> Result<SessionKeys, HandshakeError> {
        initiator_final(self.noise, m2)
    }
}

/// A key-mode M1 the hub could decrypt: who sent it (their static public
/// key, now proven to be held by the sender) and when.
pub struct KeyHello {
    noise: snow::HandshakeState,
    /// The dialer's static public key.
    pub public: [u8; 32],
    /// The dialer's timestamp (nanoseconds since the Unix epoch).
    pub timestamp: u64,
    features: Features,
}

/// Reads a key-mode M1 with the hub's `keys`. Fails when it was not made
/// for this hub's public key, or was tampered with.
pub fn key_server_read(
    keys: &StaticKeys,
    m1: &[u8],
    ephemeral: Option<&FixedEphemeral>,
) -> Result<KeyHello, HandshakeError> {
    if hello_mode(m1)? != Mode::Key {
        return Err(HandshakeError::Version);
    }
    let mut noise = key_noise(keys, None, ephemeral.map(|e| &e.0), false)?;
    let mut payload = [0u8; 512];
    let n = noise
        .read_message(&m1[5..], &mut payload)
        .map_err(|_| HandshakeError::Authentication)?;
    let (timestamp, parameters) = payload[..n]
        .split_first_chunk::<8>()
        .ok_or(HandshakeError::Malformed("key hello without a timestamp"))?;
    let features = params::decode(parameters)?;
    let public: [u8; 32] = noise
        .get_remote_static()
        .and_then(|key| key.try_into().ok())
        .ok_or(HandshakeError::Malformed("key hello without a static key"))?;
    if is_low_order(&public) {
        return Err(HandshakeError::Malformed("low-order static key"));
    }
    Ok(KeyHello {
        noise,
        public,
        timestamp: u64::from_be_bytes(*timestamp),
        features,
    })
}

impl KeyHello {
    /// Accepts the dialer (its key is known and its timestamp new): M2 and
    /// the session keys.
    pub fn accept(mut self) -> Result<(Vec<u8>, SessionKeys), HandshakeError> {
        let mut buf = [0u8; 512];
        let n = self
            .noise
            .write_message(&our_parameters(), &mut buf)
            .map_err(|_| HandshakeError::Malformed("noise message 2"))?;
        let mut m2 = vec![0u8];
        m2.extend_from_slice(&buf[..n]);
        Ok((m2, split_keys(&mut self.noise, false, self.features)?))
    }
}

/// A refusal message (the final message of either mode): `reason` is shown
/// to the other gateway.
pub fn refusal(reason: &str) -> Vec<u8> {
    let mut message = vec![1u8];
    message.extend_from_slice(&reason.as_bytes()[..reason.len().min(256)]);
    message
}

/// The dialer's last step in either mode: the hub's final message is 0x00
/// and Noise's last message (then the record keys), or 0x01 and a reason.
fn initiator_final(
    mut noise: snow::HandshakeState,
    message: &[u8],
) -> Result<SessionKeys, HandshakeError> {
    match message.split_first() {
        Some((0, noise_message)) => {
            let mut buf = [0u8; 512];
            let n = noise
                .read_message(noise_message, &mut buf)
                .map_err(|_| HandshakeError::Authentication)?;
            let theirs = params::decode(&buf[..n])?;
            split_keys(&mut noise, true, theirs)
        }
        Some((1, reason)) => Err(refused(reason)),
        _ => Err(HandshakeError::Malformed("bad final message")),
    }
}

/// A refusal's reason, as the other gateway sent it (at most 256 bytes).
fn refused(reason: &[u8]) -> HandshakeError {
    HandshakeError::Refused(untrusted_text(reason, 256))
}

/// The parameter block this gateway puts in its Noise payloads.
fn our_parameters() -> Vec<u8> {
    let mut block = Vec::new();
    params::encode(Features::SUPPORTED, &mut block);
    block
}

fn split_keys(
    noise: &mut snow::HandshakeState,
    initiator: bool,
    theirs: Features,
) -> Result<SessionKeys, HandshakeError> {
    if !noise.is_handshake_finished() {
        return Err(HandshakeError::Malformed("noise handshake incomplete"));
    }
    let (initiator_to_responder, responder_to_initiator) = noise.dangerously_get_raw_split();
    let (send, recv) = if initiator {
        (initiator_to_responder, responder_to_initiator)
    } else {
        (responder_to_initiator, initiator_to_responder)
    };
    Ok(SessionKeys {
        send,
        recv,
        session_id: session_id(noise),
        features: theirs.both(Features::SUPPORTED),
    })
}

// === Shared pieces ===

fn prologue(m1: &[u8], m2: &[u8], ke3: &[u8]) -> Vec<u8> {
    let mut hash = Sha256::new();
    for part in [m1, m2, ke3] {
        hash.update((part.len() as u32).to_be_bytes());
        hash.update(part);
    }
    let mut prologue = LABEL.to_vec();
    prologue.extend_from_slice(&hash.finalize());
    prologue
}

fn noise_psk(session_key: &[u8]) -> [u8; 32] {
    let mut psk = [0u8; 32];
    Hkdf::<Sha256>::new(None, session_key)
        .expand(b"linkgate link v1 noise psk", &mut psk)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    psk
}

fn noise_builder<'a>(
    prologue: &'a [u8],
    psk: &'a [u8; 32],
    ephemeral: Option<&'a [u8; 32]>,
) -> Result<snow::Builder<'a>, HandshakeError> {
    let params = NOISE_PARAMS
        .parse()
        .map_err(|_| HandshakeError::Malformed("noise parameters"))?;
    let mut builder = snow::Builder::new(params)
        .prologue(prologue)
        .and_then(|b| b.psk(0, psk))
        .map_err(|_| HandshakeError::Malformed("noise setup"))?;
    if let Some(key) = ephemeral {
        builder = builder.fixed_ephemeral_key_for_testing_only(key);
    }
    Ok(builder)
}

fn session_id(noise: &snow::HandshakeState) -> [u8; 32] {
    let mut id = [0u8; 32];
    id.copy_from_slice(&noise.get_handshake_hash()[..32]);
    id
}
