//! The encrypted, mutually authenticated, multiplexed link between two
//! linkgate gateways. `handshake`, `record` and `frame` are sans-IO (no
//! sockets, no clock) and tested in memory; `session` drives them over a
//! tokio TCP stream and multiplexes streams with per-stream flow control.
//! The protocol is written down in docs/link-protocol.md.

pub mod frame;
pub mod handshake;
pub mod io;
pub mod record;
pub mod session;
