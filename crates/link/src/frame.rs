//! The multiplexer's frames: what one decrypted record carries. Sans-IO:
//! [`Frame::encode`] appends to a buffer, [`Frame::decode`] parses a whole
//! record's plaintext and rejects anything malformed.

use thiserror::Error;

/// Largest payload of one DATA frame, so that a whole record (frame header +
/// data + AEAD tag) fits the 16-bit record length.
pub const MAX_DATA: usize = crate::record::MAX_PLAINTEXT - DATA_HEADER;
/// Bytes before the data in a DATA frame: type and stream id.
pub const DATA_HEADER: usize = 5;
/// The type byte of a DATA frame (the multiplexer writes DATA frames
/// straight from a stream's queue).
pub const DATA_TYPE: u8 = kind::DATA;
/// Longest service name or reason text carried in a frame.
pub const MAX_TEXT: usize = 1024;
/// Longest message in a KEY_EXCHANGE frame.
pub const MAX_KEX_MESSAGE: usize = 256;

mod kind {
    pub const DATA: u8 = 0;
    pub const OPEN: u8 = 1;
    pub const OPEN_OK: u8 = 2;
    pub const OPEN_FAIL: u8 = 3;
    pub const WINDOW: u8 = 4;
    pub const FIN: u8 = 5;
    pub const RESET: u8 = 6;
    pub const PING: u8 = 7;
    pub const PONG: u8 = 8;
    pub const CLOSE: u8 = 9;
    pub const KEY_EXCHANGE: u8 = 10;
    pub const DATAGRAM: u8 = 11;
}

/// Longest service name a DATAGRAM frame carries (names are short; the
/// room is the datagram's).
pub const MAX_DATAGRAM_SERVICE: usize = 64;
/// Bytes of a DATAGRAM frame besides its payload, at most: type, flow id,
/// name length and the longest name.
pub const DATAGRAM_OVERHEAD: usize = 1 + 4 + 1 + MAX_DATAGRAM_SERVICE;
/// Largest datagram a link carries, whatever the service name: a record
/// holds at most [`crate::record::MAX_PLAINTEXT`] bytes.
pub const MAX_DATAGRAM: usize = crate::record::MAX_PLAINTEXT - DATAGRAM_OVERHEAD;

/// The type byte of a KEY_EXCHANGE frame (the session's writer looks for it:
/// records after some of these are sealed with new keys).
pub const KEY_EXCHANGE_TYPE: u8 = kind::KEY_EXCHANGE;

/// The steps of an in-session key exchange (see `kex`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KexStep {
    /// Dialer to hub: Noise message 1.
    Init = 1,
    /// Hub to dialer: Noise message 2; the hub's later records use its new key.
    Reply = 2,
    /// Dialer to hub, empty: the dialer's later records use its new key.
    Done = 3,
}

impl KexStep {
    /// Whether the sender's records after this one use the new key.
    pub fn switches_keys(self) -> bool {
        self != KexStep::Init
    }
}

/// One multiplexer message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Stream bytes; may be sent only within the receiver's window.
    Data { id: u32, data: &'a [u8] },
    /// Opens stream `id` to the receiver's service `service`; `window` is how
    /// many bytes the opener is ready to receive.
    Open {
        id: u32,
        window: u32,
        service: &'a str,
    },
    /// The service accepted the stream; `window` bytes may be sent to it.
    OpenOk { id: u32, window: u32 },
    /// The stream was refused; `reason` says why.
    OpenFail { id: u32, reason: &'a str },
    /// The sender consumed `increment` more bytes: the window grows by that.
    Window { id: u32, increment: u32 },
    /// The sender will send no more data on this stream (half-close).
    Fin { id: u32 },
    /// The stream is aborted in both directions.
    Reset { id: u32, reason: &'a str },
    /// Liveness probe; answered with `Pong` carrying the same value.
    Ping(u64),
    /// Answer to `Ping`.
    Pong(u64),
    /// The link is closing on purpose; anything after it is an error, and a
    /// link that ends without it was truncated.
    Close { reason: &'a str },
    /// A step of a fresh key exchange (only when both sides announced the
    /// key-exchange feature).
    KeyExchange { step: KexStep, message: &'a [u8] },
    /// One UDP datagram of flow `flow` (only when both sides announced the
    /// datagram feature). The side that opened the flow names the
    /// receiver's service in each of its datagrams (no round trip opens a
    /// flow, and a flow the receiver forgot comes back by itself); answers
    /// carry no name.
    Datagram {
        flow: u32,
        service: Option<&'a str>,
        payload: &'a [u8],
    },
}

/// A record's plaintext is not a valid frame.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Empty record, unknown type, wrong length, or invalid text.
    #[error("malformed link frame: {0}")]
    Malformed(&'static str),
}

fn text(bytes: &[u8]) -> Result<&str, FrameError> {
    if bytes.len() > MAX_TEXT {
        return Err(FrameError::Malformed("text too long"));
    }
    std::str::from_utf8(bytes).map_err(|_| FrameError::Malformed("text is not UTF-8"))
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, FrameError> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(FrameError::Malformed("frame too short"))
}

fn u64_exact(bytes: &[u8]) -> Result<u64, FrameError> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| FrameError::Malformed("bad ping length"))?;
    Ok(u64::from_be_bytes(array))
}

impl<'a> Frame<'a> {
    /// Appends the frame's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let head = |out: &mut Vec<u8>, kind: u8, id: u32| {
            out.push(kind);
            out.extend_from_slice(&id.to_be_bytes());
        };
        match self {
            Frame::Data { id, data } => {
                head(out, kind::DATA, *id);
                out.extend_from_slice(data);
            }
            Frame::Open {
                id,
                window,
                service,
            } => {
                head(out, kind::OPEN, *id);
                out.extend_from_slice(&window.to_be_bytes());
                out.extend_from_slice(service.as_bytes());
            }
            Frame::OpenOk { id, window } => {
                head(out, kind::OPEN_OK, *id);
                out.extend_from_slice(&window.to_be_bytes());
            }
            Frame::OpenFail { id, reason } => {
                head(out, kind::OPEN_FAIL, *id);
                out.extend_from_slice(reason.as_bytes());
            }
            Frame::Window { id, increment } => {
                head(out, kind::WINDOW, *id);
                out.extend_from_slice(&increment.to_be_bytes());
            }
            Frame::Fin { id } => head(out, kind::FIN, *id),
            Frame::Reset { id, reason } => {
                head(out, kind::RESET, *id);
                out.extend_from_slice(reason.as_bytes());
            }
            Frame::Ping(value) => {
                out.push(kind::PING);
                out.extend_from_slice(&value.to_be_bytes());
            }
            Frame::Pong(value) => {
                out.push(kind::PONG);
                out.extend_from_slice(&value.to_be_bytes());
            }
            Frame::Close { reason } => {
                out.push(kind::CLOSE);
                out.extend_from_slice(reason.as_bytes());
            }
            Frame::KeyExchange { step, message } => {
                out.push(kind::KEY_EXCHANGE);
                out.push(*step as u8);
                out.extend_from_slice(message);
            }
            Frame::Datagram {
                flow,
                service,
                payload,
            } => {
                head(out, kind::DATAGRAM, *flow);
                let name = service.unwrap_or("").as_bytes();
                out.push(name.len() as u8);
                out.extend_from_slice(name);
                out.extend_from_slice(payload);
            }
        }
    }

    /// Parses one record's plaintext.
    pub fn decode(bytes: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let (&kind, rest) = bytes
            .split_first()
            .ok_or(FrameError::Malformed("empty record"))?;
        let with_id =
            || -> Result<(u32, &'a [u8]), FrameError> { Ok((u32_at(rest, 0)?, &rest[4..])) };
        let exact = |body: &[u8], len: usize| {
            if body.len() == len {
                Ok(())
            } else {
                Err(FrameError::Malformed("wrong frame length"))
            }
        };
        Ok(match kind {
            kind::DATA => {
                let (id, data) = with_id()?;
                Frame::Data { id, data }
            }
            kind::OPEN => {
                let (id, body) = with_id()?;
                let window = u32_at(body, 0)?;
                let service = text(&body[4..])?;
                if service.is_empty() {
                    return Err(FrameError::Malformed("open without a service name"));
                }
                Frame::Open {
                    id,
                    window,
                    service,
                }
            }
            kind::OPEN_OK => {
                let (id, body) = with_id()?;
                exact(body, 4)?;
                Frame::OpenOk {
                    id,
                    window: u32_at(body, 0)?,
                }
            }
            kind::OPEN_FAIL => {
                let (id, body) = with_id()?;
                Frame::OpenFail {
                    id,
                    reason: text(body)?,
                }
            }
            kind::WINDOW => {
                let (id, body) = with_id()?;
                exact(body, 4)?;
                Frame::Window {
                    id,
                    increment: u32_at(body, 0)?,
                }
            }
            kind::FIN => {
                let (id, body) = with_id()?;
                exact(body, 0)?;
                Frame::Fin { id }
            }
            kind::RESET => {
                let (id, body) = with_id()?;
                Frame::Reset {
                    id,
                    reason: text(body)?,
                }
            }
            kind::PING => Frame::Ping(u64_exact(rest)?),
            kind::PONG => Frame::Pong(u64_exact(rest)?),
            kind::CLOSE => Frame::Close {
                reason: text(rest)?,
            },
            kind::DATAGRAM => {
                let (flow, body) = with_id()?;
                let (&len, body) = body
                    .split_first()
                    .ok_or(FrameError::Malformed("datagram without a name length"))?;
                let len = len as usize;
                if len > MAX_DATAGRAM_SERVICE || body.len() < len {
                    return Err(FrameError::Malformed("datagram service name length"));
                }
                let service = match len {
                    0 => None,
                    _ => Some(text(&body[..len])?),
                };
                Frame::Datagram {
                    flow,
                    service,
                    payload: &body[len..],
                }
            }
            kind::KEY_EXCHANGE => {
                let (&step, message) = rest
                    .split_first()
                    .ok_or(FrameError::Malformed("key exchange without a step"))?;
                let step = match step {
                    1 => KexStep::Init,
                    2 => KexStep::Reply,
                    3 => KexStep::Done,
                    _ => return Err(FrameError::Malformed("unknown key exchange step")),
                };
                if message.len() > MAX_KEX_MESSAGE {
                    return Err(FrameError::Malformed("key exchange message too long"));
                }
                Frame::KeyExchange { step, message }
            }
            _ => return Err(FrameError::Malformed("unknown frame type")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_frame() -> impl Strategy<Value = (u8, u32, u32, u64, Vec<u8>, String)> {
        (
            0u8..12,
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..300),
            "[a-z0-9 -]{1,40}",
        )
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip((kind, id, n, v, data, s) in arb_frame()) {
            let frame = match kind {
                0 => Frame::Data { id, data: &data },
                1 => Frame::Open { id, window: n, service: &s },
                2 => Frame::OpenOk { id, window: n },
                3 => Frame::OpenFail { id, reason: &s },
                4 => Frame::Window { id, increment: n },
                5 => Frame::Fin { id },
                6 => Frame::Reset { id, reason: &s },
                7 => Frame::Ping(v),
                8 => Frame::Pong(v),
                9 => Frame::Close { reason: &s },
                10 => Frame::Datagram {
                    flow: id,
                    service: (n % 2 == 0).then_some(&s[..s.len().min(MAX_DATAGRAM_SERVICE)]),
                    payload: &data,
                },
                _ => Frame::KeyExchange {
                    step: [KexStep::Init, KexStep::Reply, KexStep::Done][n as usize % 3],
                    message: &data[..data.len().min(MAX_KEX_MESSAGE)],
                },
            };
            let mut out = Vec::new();
            frame.encode(&mut out);
            prop_assert_eq!(Frame::decode(&out).unwrap(), frame);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Frame::decode(&bytes);
        }
    }

    #[test]
    fn a_datagram_name_longer_than_its_room_or_the_frame_is_rejected() {
        let mut frame = vec![kind::DATAGRAM, 0, 0, 0, 1, 65];
        frame.extend_from_slice(&[b'a'; 65]);
        assert!(Frame::decode(&frame).is_err());
        assert!(Frame::decode(&[kind::DATAGRAM, 0, 0, 0, 1, 5, b'a']).is_err());
        assert!(Frame::decode(&[kind::DATAGRAM, 0, 0, 0, 1]).is_err());
        // No name, no payload: an empty datagram, which UDP allows.
        assert_eq!(
            Frame::decode(&[kind::DATAGRAM, 0, 0, 0, 1, 0]),
            Ok(Frame::Datagram {
                flow: 1,
                service: None,
                payload: &[]
            })
        );
    }

    #[test]
    fn malformed_frames_are_rejected() {
        assert!(Frame::decode(&[]).is_err());
        assert!(Frame::decode(&[42, 0, 0, 0, 1]).is_err());
        assert!(Frame::decode(&[kind::WINDOW, 0, 0, 0, 1, 0]).is_err());
        assert!(Frame::decode(&[kind::OPEN, 0, 0, 0, 1, 0, 0, 0, 1]).is_err());
        assert!(Frame::decode(&[kind::CLOSE, 0xff]).is_err());
    }
}
