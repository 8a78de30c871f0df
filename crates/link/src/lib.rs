//! The encrypted, mutually authenticated, multiplexed link between two
//! linkgate gateways, in layers:
//! - `handshake`, `params`, `record`, `kex`, `frame` and `mux` are sans-IO
//!   (no sockets, no clock) and tested in memory: who the peer is, which
//!   optional features both sides have, how records are sealed, the fresh
//!   key exchange inside a session, what a record carries, and the stream
//!   multiplexer with its scheduler;
//! - `transport` is what carries the bytes (TCP or any split byte stream);
//! - `io` runs the handshake over a stream, `session` runs the multiplexer
//!   over a transport with one reader, one writer and a timer.
//!
//! The protocol is written down in docs/link-protocol.md.

mod auto_pace;
pub mod frame;
pub mod handshake;
pub mod io;
pub mod kex;
pub mod mux;
pub mod pacing;
pub mod params;
pub mod record;
pub mod send_budget;
pub mod session;
pub mod transport;
mod unsent;
