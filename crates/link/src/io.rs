//! The handshake over an async byte stream: length-prefixed messages, the
//! dialer's and the hub's sides. Time limits are the caller's (wrap in
//! `tokio::time::timeout`).

use std::sync::LazyLock;

use rand::rngs::OsRng;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::handshake::{
    self, HandshakeError, Identity, Mode, PeerRecord, SessionKeys, StaticKeys,
    MAX_HANDSHAKE_MESSAGE,
};

/// A handshake over a stream failed.
#[derive(Debug, Error)]
pub enum LinkHandshakeError {
    /// The cryptographic handshake failed (see the inner error).
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The connection failed or closed mid-handshake.
    #[error("connection lost during the handshake: {0}")]
    Io(#[from] std::io::Error),
}

/// Handshake arithmetic (OPAQUE, Diffie-Hellman, Argon2id on the dialer)
/// runs on blocking threads, at most one per core at once: a flood of
/// handshakes then waits for these permits instead of taking the async
/// workers from established links and other services.
static HANDSHAKE_CPU: LazyLock<Semaphore> =
    LazyLock::new(|| Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())));

/// Runs `work` on a blocking thread once a handshake permit is free.
async fn off_workers<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, HandshakeError> {
    let _permit = HANDSHAKE_CPU
        .acquire()
        .await
        .map_err(|_| HandshakeError::Malformed("handshake pool closed"))?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| HandshakeError::Malformed("handshake task failed"))
}

async fn write_message<S: AsyncWrite + Unpin>(
    stream: &mut S,
    message: &[u8],
) -> std::io::Result<()> {
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&(message.len() as u16).to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await?;
    stream.flush().await
}

async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, LinkHandshakeError> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let len = u16::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_HANDSHAKE_MESSAGE {
        return Err(HandshakeError::Malformed("handshake message length").into());
    }
    let mut message = vec![0u8; len];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

/// The dialer's side: logs in as `user` with `password`. The password
/// stretching (Argon2id, tens of milliseconds) runs on a blocking thread.
pub async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    password: &[u8],
) -> Result<SessionKeys, LinkHandshakeError> {
    let (client, m1) = handshake::client_start(&mut OsRng, user, password)?;
    write_message(stream, &m1).await?;
    let m2 = read_message(stream).await?;
    if let Some(busy) = handshake::parse_busy(&m2) {
        return Err(busy.into());
    }
    let (client, m3) = off_workers(move || client.receive_ke2(&mut OsRng, &m2, None)).await??;
    write_message(stream, &m3).await?;
    let m4 = read_message(stream).await?;
    Ok(client.receive_final(&m4)?)
}

/// The dialer's side in key mode: proves `keys` to the hub whose public key
/// is pinned as `hub`, and checks that the hub holds it.
pub async fn dial_key<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    keys: &StaticKeys,
    hub: &[u8; 32],
) -> Result<SessionKeys, LinkHandshakeError> {
    // Nanoseconds since the epoch: grows between a gateway's dials, so the
    // hub can refuse a replayed hello.
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let (keys, hub) = (keys.clone(), *hub);
    let (client, m1) =
        off_workers(move || handshake::key_client_start(&keys, &hub, timestamp, None)).await??;
    write_message(stream, &m1).await?;
    let m2 = read_message(stream).await?;
    if let Some(busy) = handshake::parse_busy(&m2) {
        return Err(busy.into());
    }
    Ok(off_workers(move || client.receive_final(&m2)).await??)
}

/// What the hub learned from a failed handshake, for its log.
#[derive(Debug)]
pub struct AcceptFailure {
    /// The user the dialer claimed (password mode) or the peer its key
    /// belongs to (key mode), if it got that far.
    pub user: Option<String>,
    /// In key mode, the dialer's static public key, once proven.
    pub key: Option<[u8; 32]>,
    /// What went wrong.
    pub error: LinkHandshakeError,
}

/// What the hub knows about the gateways that may dial in.
pub trait HubPeers {
    /// The registration record of the password-mode peer `user`.
    fn record(&self, user: &str) -> Option<PeerRecord>;
    /// The name of the key-mode peer whose static public key is `key`.
    fn key_peer(&self, key: &[u8; 32]) -> Option<String>;
    /// Whether `timestamp` is later than that of every key-mode hello
    /// accepted from `peer` so far; if so, it is remembered.
    fn fresh(&self, peer: &str, timestamp: u64) -> bool;
    /// Called before the hub answers a password-mode hello for `user`
    /// (each answer lets the dialer test one password guess). `Err` with
    /// (seconds, reason) refuses it with a busy answer instead.
    fn password_attempt(&self, user: &str) -> Result<(), (u16, String)> {
        let _ = user;
        Ok(())
    }
}

/// The hub's side: answers a dialer in either mode. In password mode its
/// record is looked up by user name (`None`: unknown user, answered from a
/// fake record); in key mode by its static key. Returns the peer's name and
/// the session keys. The arithmetic runs off the async workers, bounded
/// (one handshake computation per core at once).
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    identity: &Identity,
    keys: &StaticKeys,
    peers: &impl HubPeers,
) -> Result<(String, SessionKeys), AcceptFailure> {
    let fail = |user: Option<&str>, error: LinkHandshakeError| AcceptFailure {
        user: user.map(str::to_string),
        key: None,
        error,
    };
    let m1 = read_message(stream).await.map_err(|e| fail(None, e))?;
    if handshake::hello_mode(&m1).map_err(|e| fail(None, e.into()))? == Mode::Key {
        return accept_key(stream, keys, peers, &m1).await;
    }
    let lookup = |user: &str| peers.record(user);
    let hello = handshake::parse_hello(&m1).map_err(|e| fail(None, e.into()))?;
    let user = hello.user.clone();
    if let Err((retry_after, reason)) = peers.password_attempt(&user) {
        let _ = write_message(stream, &handshake::busy(retry_after, &reason)).await;
        let busy = HandshakeError::Busy {
            retry_after,
            reason,
        };
        return Err(fail(Some(&user), busy.into()));
    }
    let record = lookup(&user);
    let known = record.is_some();
    let identity = identity.clone();
    let (server, m2) = off_workers(move || {
        handshake::server_respond(&mut OsRng, &identity, record.as_ref(), hello)
    })
    .await
    .and_then(|answer| answer)
    .map_err(|e| fail(Some(&user), e.into()))?;
    write_message(stream, &m2)
        .await
        .map_err(|e| fail(Some(&user), e.into()))?;
    // A dialer with the wrong password (or an unknown user) stops here: it
    // detected the failure in M2 and closes, so this read fails.
    let m3 = read_message(stream).await.map_err(|e| match e {
        LinkHandshakeError::Io(_) => fail(Some(&user), HandshakeError::Authentication.into()),
        other => fail(Some(&user), other),
    })?;
    let finished = off_workers(move || server.receive_finish(&m3, None))
        .await
        .map_err(|e| fail(Some(&user), e.into()))?;
    match finished {
        Ok((m4, keys)) if known => {
            write_message(stream, &m4)
                .await
                .map_err(|e| fail(Some(&user), e.into()))?;
            Ok((user, keys))
        }
        // Unknown users cannot get here with a valid M3; refuse regardless.
        Ok(_) => Err(fail(Some(&user), HandshakeError::Authentication.into())),
        Err((error, refusal)) => {
            let _ = write_message(stream, &refusal).await;
            Err(fail(Some(&user), error.into()))
        }
    }
}

/// The hub's side of key mode, from M1 on.
async fn accept_key<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    keys: &StaticKeys,
    peers: &impl HubPeers,
    m1: &[u8],
) -> Result<(String, SessionKeys), AcceptFailure> {
    let mut refuse = async |user: Option<String>, key, error: HandshakeError, reason: &str| {
        let _ = write_message(stream, &handshake::refusal(reason)).await;
        AcceptFailure {
            user,
            key,
            error: error.into(),
        }
    };
    let (keys, message) = (keys.clone(), m1.to_vec());
    let read = off_workers(move || handshake::key_server_read(&keys, &message, None))
        .await
        .and_then(|read| read);
    let hello = match read {
        Ok(hello) => hello,
        Err(e) => {
            let reason =
                "authentication failed: the key you pinned for this gateway is not its key";
            return Err(refuse(None, None, e, reason).await);
        }
    };
    let key = hello.public;
    let Some(peer) = peers.key_peer(&key) else {
        let reason = "authentication failed: this gateway has no [[peer]] with your public key";
        return Err(refuse(None, Some(key), HandshakeError::UnknownKey, reason).await);
    };
    if !peers.fresh(&peer, hello.timestamp) {
        let reason = "authentication failed: replayed or out-of-date hello (check the clock)";
        return Err(refuse(Some(peer), Some(key), HandshakeError::StaleHello, reason).await);
    }
    match off_workers(move || hello.accept())
        .await
        .and_then(|accepted| accepted)
    {
        Ok((m2, session_keys)) => match write_message(stream, &m2).await {
            Ok(()) => Ok((peer, session_keys)),
            Err(e) => Err(AcceptFailure {
                user: Some(peer),
                key: Some(key),
                error: e.into(),
            }),
        },
        Err(e) => Err(refuse(Some(peer), Some(key), e, "handshake failed").await),
    }
}
