//! The handshake over an async byte stream: length-prefixed messages, the
//! dialer's and the hub's sides. Time limits are the caller's (wrap in
//! `tokio::time::timeout`).

use rand::rngs::OsRng;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::handshake::{
    self, HandshakeError, Identity, PeerRecord, SessionKeys, MAX_HANDSHAKE_MESSAGE,
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
    let (client, m3) =
        tokio::task::spawn_blocking(move || client.receive_ke2(&mut OsRng, &m2, None))
            .await
            .map_err(|_| HandshakeError::Malformed("handshake task failed"))??;
    write_message(stream, &m3).await?;
    let m4 = read_message(stream).await?;
    Ok(client.receive_final(&m4)?)
}

/// What the hub learned from a failed handshake, for its log.
#[derive(Debug)]
pub struct AcceptFailure {
    /// The user the dialer claimed, if it got that far.
    pub user: Option<String>,
    /// What went wrong.
    pub error: LinkHandshakeError,
}

/// The hub's side: answers a dialer, looking its record up by user name
/// (`None`: unknown user, answered from a fake record). Returns the user
/// and the session keys.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    identity: &Identity,
    lookup: impl Fn(&str) -> Option<PeerRecord>,
) -> Result<(String, SessionKeys), AcceptFailure> {
    let fail = |user: Option<&str>, error: LinkHandshakeError| AcceptFailure {
        user: user.map(str::to_string),
        error,
    };
    let m1 = read_message(stream).await.map_err(|e| fail(None, e))?;
    let hello = handshake::parse_hello(&m1).map_err(|e| fail(None, e.into()))?;
    let user = hello.user.clone();
    let record = lookup(&user);
    let known = record.is_some();
    let (server, m2) = handshake::server_respond(&mut OsRng, identity, record.as_ref(), hello)
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
    match server.receive_finish(&m3, None) {
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
