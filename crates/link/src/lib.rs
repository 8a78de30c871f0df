//! The encrypted, mutually authenticated, multiplexed link between two
//! linkgate gateways (OPAQUE + Noise NNpsk0; see DESIGN §5). Lands with the
//! link issue; the daemon refuses `[link]` and `[[peer]]` until then.
