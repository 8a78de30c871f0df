//! The stream multiplexer as a hostile peer drives it: any sequence of
//! frames from the other side, mixed with the gateway's own operations
//! (open, accept, write, read, finish, drop) and the passing of time.
//! Never a panic; a protocol error ends the run (the link would close);
//! memory stays within the link's documented ceiling at every step.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use linkgate_link::frame::Frame;
use linkgate_link::mux::{Event, Mux, MuxConfig, ReadState, Role, CONTROL_LIMIT, MIN_WINDOW};

fuzz_target!(|data: &[u8]| {
    let config = MuxConfig {
        window: 64 * 1024,
        recv_budget: 256 * 1024,
        max_streams: 8,
        send_queue: 32 * 1024,
        keepalive: Duration::from_secs(5),
        dead_after: Duration::from_secs(15),
    };
    let start = Instant::now();
    let mut now = start;
    let role = if data.first().is_some_and(|b| b & 1 == 1) { Role::Dialer } else { Role::Acceptor };
    let mut mux = Mux::new(role, config.clone(), now);
    // Half the inputs negotiate datagrams, so DATAGRAM frames are both
    // refused (not negotiated) and handled.
    if data.first().is_some_and(|b| b & 2 == 2) {
        mux.enable_datagrams();
    }
    let mut ids: Vec<u32> = Vec::new();
    let mut rest = data.get(1..).unwrap_or_default();
    // Capacities may double past what they hold; windows come from the
    // budget (each stream at least MIN_WINDOW); send queues are per stream.
    let ceiling = 2 * (config.recv_budget as usize + config.max_streams * MIN_WINDOW as usize)
        + 2 * config.max_streams * config.send_queue;
    let mut local_controls = 0;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        match op % 8 {
            // A frame from the peer: a length byte, then that many bytes.
            0 | 1 | 2 => {
                let Some((&len, tail)) = rest.split_first() else { return };
                let len = (len as usize).min(tail.len());
                let (bytes, tail) = tail.split_at(len);
                rest = tail;
                // The session stops reading while the peer's replies back up.
                if !mux.wants_read() {
                    continue;
                }
                if let Ok(frame) = Frame::decode(bytes) {
                    if mux.handle_frame(frame, now).is_err() {
                        return;
                    }
                }
            }
            3 => {
                if let Ok(id) = mux.open("svc") {
                    ids.push(id);
                    local_controls += 1;
                }
            }
            4 => {
                let pick = rest.first().copied().unwrap_or(0) as usize;
                if let Some(&id) = ids.get(pick % ids.len().max(1)) {
                    if pick & 2 == 2 {
                        let mut chunk = bytes::Bytes::from_static(&[0xab; 5000]);
                        let _ = mux.write_chunk(id, &mut chunk);
                    } else {
                        let _ = mux.write(id, &[0xab; 5000]);
                    }
                    if pick & 1 == 1 {
                        let _ = mux.finish(id);
                    }
                }
            }
            5 => {
                let pick = rest.first().copied().unwrap_or(0) as usize;
                if let Some(&id) = ids.get(pick % ids.len().max(1)) {
                    if mux.read_state(id) == ReadState::Data {
                        if pick & 4 == 4 {
                            let _ = mux.read_chunk(id, pick * 97 + 1);
                        } else {
                            let mut dst = vec![0; pick * 97 + 1];
                            mux.read_into(id, &mut dst);
                        }
                    }
                    if pick & 3 == 3 {
                        local_controls += 1;
                        mux.release(id);
                        ids.retain(|&i| i != id);
                    }
                }
            }
            6 => {
                let mut out = Vec::new();
                let pick = rest.first().copied().unwrap_or(1);
                for _ in 0..(pick % 16) {
                    out.clear();
                    // A paced writer's turn, or a keystroke ahead of it.
                    let sent = match pick & 0x80 == 0x80 {
                        true => mux.poll_transmit_urgent(now, &mut out),
                        false => mux.poll_transmit(now, &mut out),
                    };
                    if !sent {
                        local_controls = 0;
                        break;
                    }
                    assert!(Frame::decode(&out).is_ok(), "we send only valid frames");
                }
            }
            _ => {
                now += Duration::from_millis(u64::from(rest.first().copied().unwrap_or(0)) * 100);
                if mux.handle_timeout(now).is_err() {
                    return;
                }
            }
        }
        while let Some(event) = mux.poll_event() {
            match event {
                Event::Incoming { id, .. } => {
                    if id % 3 == 0 {
                        mux.refuse(id, "no");
                    } else if mux.accept(id) {
                        ids.push(id);
                    }
                }
                Event::OpenFailed { id, .. } => ids.retain(|&i| i != id),
                _ => {}
            }
        }
        let memory = mux.memory();
        assert!(memory.received + memory.queued <= ceiling, "{memory:?}");
        // Peer-caused replies stop reading at CONTROL_LIMIT; the rest are
        // the gateway's own (opens, resets, accepts since the last send).
        assert!(memory.control <= CONTROL_LIMIT + local_controls + 2 * config.max_streams, "{memory:?}");
        assert!(mux.stats().streams <= config.max_streams);
    }
});
