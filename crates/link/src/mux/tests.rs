//! The multiplexer in memory: two ends joined by a function that moves
//! frames, time passed in by hand.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

fn config() -> MuxConfig {
    MuxConfig {
        window: 64 * 1024,
        recv_budget: 1024 * 1024,
        max_streams: 16,
        send_queue: 128 * 1024,
        keepalive: Duration::from_secs(5),
        dead_after: Duration::from_secs(15),
    }
}

/// Every frame `from` has to send, in order (plaintexts).
fn drain(from: &mut Mux, now: Instant) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    loop {
        let mut out = Vec::new();
        if !from.poll_transmit(now, &mut out) {
            return frames;
        }
        frames.push(out);
    }
}

fn deliver(to: &mut Mux, frames: &[Vec<u8>], now: Instant) -> Result<(), ProtocolError> {
    for frame in frames {
        to.handle_frame(Frame::decode(frame).expect("valid frame"), now)?;
    }
    Ok(())
}

/// Moves frames both ways until neither side has anything to send.
fn pump(a: &mut Mux, b: &mut Mux, now: Instant) {
    loop {
        let ab = drain(a, now);
        let ba = drain(b, now);
        if ab.is_empty() && ba.is_empty() {
            return;
        }
        deliver(b, &ab, now).unwrap();
        deliver(a, &ba, now).unwrap();
    }
}

fn events(mux: &mut Mux) -> Vec<Event> {
    std::iter::from_fn(|| mux.poll_event()).collect()
}

fn read_all(mux: &mut Mux, id: u32) -> Vec<u8> {
    let mut data = Vec::new();
    while let Some(chunk) = mux.read_chunk(id, usize::MAX) {
        data.extend_from_slice(&chunk);
    }
    data
}

/// A dialer and an acceptor with one open stream (`id` on the dialer,
/// the same id on the acceptor).
fn linked(now: Instant) -> (Mux, Mux, u32) {
    let mut a = Mux::new(Role::Dialer, config(), now);
    let mut b = Mux::new(Role::Acceptor, config(), now);
    let id = a.open("echo").unwrap();
    pump(&mut a, &mut b, now);
    assert_eq!(
        events(&mut b),
        vec![Event::Incoming {
            id,
            service: "echo".into()
        }]
    );
    assert!(b.accept(id));
    pump(&mut a, &mut b, now);
    assert_eq!(events(&mut a), vec![Event::Opened(id)]);
    (a, b, id)
}

fn kind(frame: &[u8]) -> u8 {
    frame[0]
}

fn data_stream(frame: &[u8]) -> Option<u32> {
    (frame[0] == crate::frame::DATA_TYPE)
        .then(|| u32::from_be_bytes(frame[1..5].try_into().unwrap()))
}

#[test]
fn data_and_half_close_cross_both_ways() {
    let now = Instant::now();
    let (mut a, mut b, id) = linked(now);
    assert_eq!(a.write(id, b"hello"), WriteState::Queued(5));
    a.finish(id).unwrap();
    pump(&mut a, &mut b, now);
    assert_eq!(b.read_state(id), ReadState::Data);
    assert_eq!(read_all(&mut b, id), b"hello");
    assert_eq!(b.read_state(id), ReadState::Eof);
    assert_eq!(a.write(id, b"more"), WriteState::Finished);
    assert_eq!(b.write(id, b"back"), WriteState::Queued(4));
    b.finish(id).unwrap();
    pump(&mut a, &mut b, now);
    assert_eq!(read_all(&mut a, id), b"back");
    assert_eq!(a.read_state(id), ReadState::Eof);
    a.release(id);
    b.release(id);
    assert_eq!(a.stats().streams, 0);
    assert_eq!(b.stats().streams, 0);
    assert!(drain(&mut a, now).is_empty(), "a clean end sends no reset");
}

/// A dialer with two accepted streams, "bulk" (128 KiB queued to send)
/// and "keys" (nothing yet).
fn bulk_backlog_and_keys(now: Instant) -> (Mux, u32, u32) {
    let mut a = Mux::new(Role::Dialer, config(), now);
    let mut b = Mux::new(Role::Acceptor, config(), now);
    let bulk = a.open("bulk").unwrap();
    let keys = a.open("keys").unwrap();
    pump(&mut a, &mut b, now);
    b.accept(bulk);
    b.accept(keys);
    pump(&mut a, &mut b, now);
    assert_eq!(
        a.write(bulk, &[7; 128 * 1024]),
        WriteState::Queued(128 * 1024)
    );
    (a, bulk, keys)
}

#[test]
fn a_sparse_stream_is_sent_before_a_backlogged_one() {
    let now = Instant::now();
    let (mut a, bulk, keys) = bulk_backlog_and_keys(now);
    // The bulk stream gets going...
    let mut out = Vec::new();
    assert!(a.poll_transmit(now, &mut out));
    assert_eq!(data_stream(&out), Some(bulk));
    // ...then a keystroke arrives: it goes out next, not after 128 KiB.
    assert_eq!(a.write(keys, b"x"), WriteState::Queued(1));
    out.clear();
    assert!(a.poll_transmit(now, &mut out));
    assert_eq!(data_stream(&out), Some(keys));
}

/// What the writer paces for: a sparse stream's data beside a backlogged
/// bulk stream is told, bulk alone is not.
#[test]
fn sparse_data_beside_bulk_is_told_and_bulk_alone_is_not() {
    let now = Instant::now();
    let (mut a, bulk, keys) = bulk_backlog_and_keys(now);
    let _ = a.take_sparse_beside_bulk();
    // Small records: the fifth is from the bulk list, with credit left.
    a.set_frame_limit(4096);
    let mut out = Vec::new();
    for _ in 0..5 {
        out.clear();
        assert!(a.poll_transmit(now, &mut out));
        assert_eq!(data_stream(&out), Some(bulk));
    }
    assert!(!a.take_sparse_beside_bulk(), "bulk alone");
    assert_eq!(a.write(keys, b"x"), WriteState::Queued(1));
    out.clear();
    assert!(a.poll_transmit(now, &mut out));
    assert_eq!(data_stream(&out), Some(keys));
    assert!(a.take_sparse_beside_bulk());
    assert!(!a.take_sparse_beside_bulk(), "told once");
}

#[test]
fn control_frames_go_before_queued_data_and_pongs_do_not_pile_up() {
    let now = Instant::now();
    let (mut a, mut b, id) = linked(now);
    assert!(matches!(b.write(id, &[1; 100_000]), WriteState::Queued(_)));
    for i in 0..10_000 {
        b.handle_frame(Frame::Ping(i), now).unwrap();
    }
    let mut out = Vec::new();
    assert!(b.poll_transmit(now, &mut out));
    assert_eq!(Frame::decode(&out).unwrap(), Frame::Pong(9_999));
    let rest = drain(&mut b, now);
    assert!(
        rest.iter().all(|f| kind(f) == crate::frame::DATA_TYPE),
        "one PONG for a flood of PINGs"
    );
    deliver(&mut a, &rest, now).unwrap();
}

#[test]
fn the_peer_cannot_exceed_windows_or_reuse_ids() {
    let now = Instant::now();
    let (_, mut b, id) = linked(now);
    let too_much = vec![0u8; 64 * 1024 + 1];
    let mut big = Vec::new();
    for chunk in too_much.chunks(MAX_DATA) {
        big.push(Frame::Data { id, data: chunk });
    }
    let fresh = || linked(now).1;
    let mut errors = Vec::new();
    let mut probe = |frames: Vec<Frame<'_>>| {
        let mut b = fresh();
        let result = frames.into_iter().try_for_each(|f| b.handle_frame(f, now));
        errors.push(result.is_err());
    };
    probe(big);
    probe(vec![Frame::Open {
        id,
        window: 10,
        service: "again",
    }]);
    probe(
        vec![Frame::Open {
            id: id + 2,
            window: 10,
            service: "x",
        }]
        .into_iter()
        .chain([Frame::Open {
            id,
            window: 10,
            service: "lower",
        }])
        .collect(),
    );
    probe(vec![Frame::Open {
        id: 2,
        window: 10,
        service: "wrong parity",
    }]);
    probe(vec![Frame::Window {
        id,
        increment: u32::MAX,
    }]);
    probe(vec![Frame::Data {
        id: 99,
        data: b"never opened",
    }]);
    probe(vec![Frame::Open {
        id: id + 2,
        window: u32::MAX,
        service: "huge window",
    }]);
    probe(vec![
        Frame::Fin { id },
        Frame::Data {
            id,
            data: b"after fin",
        },
    ]);
    assert_eq!(errors, vec![true; 8], "each violation is a protocol error");
    // Within the rules, nothing is an error.
    b.handle_frame(
        Frame::Data {
            id,
            data: &[1; 1000],
        },
        now,
    )
    .unwrap();
    b.handle_frame(
        Frame::Window {
            id,
            increment: 1000,
        },
        now,
    )
    .unwrap();
}

#[test]
fn streams_per_link_are_capped_and_refused_with_a_reason() {
    let now = Instant::now();
    let mut a = Mux::new(Role::Dialer, config(), now);
    let mut b = Mux::new(Role::Acceptor, config(), now);
    let mut opened = Vec::new();
    for i in 0..20 {
        // The dialer side caps itself too: lie to it with a raw frame.
        let id = 1 + 2 * i;
        b.handle_frame(
            Frame::Open {
                id,
                window: 1000,
                service: "svc",
            },
            now,
        )
        .unwrap();
        opened.push(id);
    }
    let incoming = events(&mut b)
        .into_iter()
        .filter(|e| matches!(e, Event::Incoming { .. }))
        .count();
    assert_eq!(incoming, 16);
    let refusals: Vec<_> = drain(&mut b, now)
        .into_iter()
        .filter_map(|f| match Frame::decode(&f).unwrap() {
            Frame::OpenFail { id, reason } => Some((id, reason.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(refusals.len(), 4);
    assert!(
        refusals[0].1.contains("maximum of 16 streams"),
        "{refusals:?}"
    );
    for _ in 0..16 {
        a.open("svc").unwrap();
    }
    assert!(a.open("svc").unwrap_err().contains("maximum"));
}

#[test]
fn a_flood_of_opens_stops_the_reader_until_replies_drain() {
    let now = Instant::now();
    let mut cfg = config();
    cfg.max_streams = 0;
    let mut b = Mux::new(Role::Acceptor, cfg, now);
    let mut id = 1;
    while b.wants_read() {
        b.handle_frame(
            Frame::Open {
                id,
                window: 1,
                service: "x",
            },
            now,
        )
        .unwrap();
        id += 2;
    }
    assert_eq!(id, 1 + 2 * CONTROL_LIMIT as u32);
    let sent = drain(&mut b, now);
    assert_eq!(sent.len(), CONTROL_LIMIT);
    assert!(b.wants_read());
}

#[test]
fn windows_come_from_one_budget_per_link() {
    let now = Instant::now();
    let mut cfg = config();
    cfg.recv_budget = 3 * 64 * 1024;
    cfg.window = 128 * 1024;
    let mut a = Mux::new(Role::Dialer, cfg, now);
    let windows: Vec<u32> = (0..4)
        .map(|_| {
            let id = a.open("s").unwrap();
            let mut out = Vec::new();
            a.poll_transmit(now, &mut out);
            match Frame::decode(&out).unwrap() {
                Frame::Open {
                    id: got, window, ..
                } => {
                    assert_eq!(got, id);
                    window
                }
                other => panic!("{other:?}"),
            }
        })
        .collect();
    // 128 KiB while the budget lasts, then the minimum.
    assert_eq!(windows, vec![128 * 1024, 64 * 1024, MIN_WINDOW, MIN_WINDOW]);
}

#[test]
fn keepalive_measures_the_round_trip_and_silence_kills_the_link() {
    let start = Instant::now();
    let (mut a, mut b, _) = linked(start);
    // The first probe goes at once, the next after the keepalive interval.
    a.handle_timeout(start).unwrap();
    let first = drain(&mut a, start);
    assert!(matches!(Frame::decode(&first[0]).unwrap(), Frame::Ping(_)));
    deliver(&mut b, &first, start).unwrap();
    deliver(&mut a, &drain(&mut b, start), start).unwrap();
    assert!(a.handle_timeout(start + Duration::from_secs(1)).is_ok());
    assert!(drain(&mut a, start).is_empty(), "no probe before keepalive");
    let t = start + Duration::from_secs(5);
    assert_eq!(a.next_timeout(), t);
    a.handle_timeout(t).unwrap();
    let ping = drain(&mut a, t);
    deliver(&mut b, &ping, t).unwrap();
    let pong = drain(&mut b, t);
    deliver(&mut a, &pong, t + Duration::from_millis(30)).unwrap();
    assert_eq!(a.stats().rtt, Some(Duration::from_millis(30)));
    // Silence from b from now on.
    let last = t + Duration::from_millis(30);
    assert!(a.handle_timeout(last + Duration::from_secs(14)).is_ok());
    let err = a
        .handle_timeout(last + Duration::from_secs(15))
        .unwrap_err();
    assert!(err.contains("nothing received"), "{err}");
}

#[test]
fn a_dropped_unfinished_stream_is_reset_and_a_finished_one_still_delivers() {
    let now = Instant::now();
    let (mut a, mut b, id) = linked(now);
    assert_eq!(a.write(id, b"partial"), WriteState::Queued(7));
    a.release(id);
    let frames = drain(&mut a, now);
    let decoded: Vec<_> = frames.iter().map(|f| Frame::decode(f).unwrap()).collect();
    assert_eq!(
        decoded,
        vec![Frame::Reset {
            id,
            reason: "stream closed"
        }],
        "queued data of an aborted stream is dropped, the reset says so"
    );
    deliver(&mut b, &frames, now).unwrap();
    assert!(matches!(b.read_state(id), ReadState::Reset(_)));

    let (mut a, mut b, id) = linked(now);
    assert_eq!(a.write(id, b"complete"), WriteState::Queued(8));
    a.finish(id).unwrap();
    a.release(id);
    pump(&mut a, &mut b, now);
    assert_eq!(read_all(&mut b, id), b"complete");
    assert_eq!(b.read_state(id), ReadState::Eof);
}

#[test]
fn fail_all_resets_streams_and_fails_opens() {
    let now = Instant::now();
    let (mut a, _b, id) = linked(now);
    let opening = a.open("later").unwrap();
    a.fail_all("link failed: gone");
    let evs = events(&mut a);
    assert!(evs.contains(&Event::OpenFailed {
        id: opening,
        reason: "link failed: gone".into()
    }));
    assert_eq!(
        a.read_state(id),
        ReadState::Reset("link failed: gone".into())
    );
    assert!(matches!(a.write(id, b"x"), WriteState::Reset(_)));
}

proptest! {
    /// Any mix of writes on several streams, with small windows and queues,
    /// arrives intact and in order on each stream.
    #[test]
    fn streams_arrive_intact(writes in proptest::collection::vec((0usize..4, 1usize..40_000), 1..40)) {
        let now = Instant::now();
        let mut cfg = config();
        cfg.window = 64 * 1024;
        cfg.send_queue = 50_000;
        let mut a = Mux::new(Role::Dialer, cfg.clone(), now);
        let mut b = Mux::new(Role::Acceptor, cfg, now);
        let ids: Vec<u32> = (0..4).map(|_| a.open("s").unwrap()).collect();
        pump(&mut a, &mut b, now);
        for &id in &ids { b.accept(id); }
        pump(&mut a, &mut b, now);
        let mut sent = vec![Vec::new(); 4];
        let mut got = vec![Vec::new(); 4];
        let mut seed = 0u8;
        for (stream, len) in writes {
            let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_add(seed)).collect();
            seed = seed.wrapping_add(1);
            let mut at = 0;
            while at < data.len() {
                match a.write(ids[stream], &data[at..]) {
                    WriteState::Queued(n) => { sent[stream].extend_from_slice(&data[at..at + n]); at += n; }
                    WriteState::Blocked => {
                        pump(&mut a, &mut b, now);
                        for (i, &id) in ids.iter().enumerate() { got[i].extend(read_all(&mut b, id)); }
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        for &id in &ids { a.finish(id).unwrap(); }
        loop {
            pump(&mut a, &mut b, now);
            let mut progress = false;
            for (i, &id) in ids.iter().enumerate() {
                let chunk = read_all(&mut b, id);
                progress |= !chunk.is_empty();
                got[i].extend(chunk);
            }
            if !progress { break; }
        }
        for (i, &id) in ids.iter().enumerate() {
            prop_assert_eq!(b.read_state(id), ReadState::Eof);
            prop_assert!(got[i] == sent[i], "stream {} differs", i);
        }
    }
}

/// What a paced writer sends ahead of its pace: a keystroke, never bulk.
#[test]
fn only_a_sparse_streams_data_is_urgent() {
    let now = Instant::now();
    let (mut a, bulk, keys) = bulk_backlog_and_keys(now);
    let mut out = Vec::new();
    // The bulk stream uses up its first quantum and counts as bulk...
    while out.len() < 32 * 1024 && a.poll_transmit(now, &mut out) {}
    out.clear();
    assert!(
        !a.poll_transmit_urgent(now, &mut out),
        "bulk went ahead of the pace"
    );
    // ...while a keystroke is urgent, once, and bulk is still not.
    assert_eq!(a.write(keys, b"x"), WriteState::Queued(1));
    assert!(a.poll_transmit_urgent(now, &mut out));
    assert_eq!(data_stream(&out), Some(keys));
    out.clear();
    assert!(!a.poll_transmit_urgent(now, &mut out));
    assert!(a.poll_transmit(now, &mut out));
    assert_eq!(data_stream(&out), Some(bulk));
}

#[test]
fn queued_data_goes_in_records_of_equal_size_without_a_small_leftover() {
    let now = Instant::now();
    let roomy = MuxConfig {
        window: 1024 * 1024,
        send_queue: 1024 * 1024,
        ..config()
    };
    let mut a = Mux::new(Role::Dialer, roomy.clone(), now);
    let mut b = Mux::new(Role::Acceptor, roomy, now);
    let id = a.open("bulk").unwrap();
    pump(&mut a, &mut b, now);
    b.accept(id);
    pump(&mut a, &mut b, now);
    // A relay's 256 KiB read: four full records would leave 88 bytes over.
    let read = 256 * 1024;
    assert_eq!(a.write(id, &vec![7; read]), WriteState::Queued(read));
    let sizes: Vec<usize> = drain(&mut a, now)
        .iter()
        .filter(|frame| data_stream(frame) == Some(id))
        .map(|frame| frame.len() - crate::frame::DATA_HEADER)
        .collect();
    assert_eq!(sizes.len(), read.div_ceil(MAX_DATA), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), read);
    let (smallest, largest) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
    assert!(largest - smallest <= 1, "{sizes:?}");
}

/// With the defaults a lone stream's writer may queue a whole window before
/// it waits: with less, a bulk stream's relay and the link's writer take
/// turns (a wake-up each) every half queue.
#[test]
fn a_lone_stream_may_queue_a_whole_window_ahead() {
    let now = Instant::now();
    let config = MuxConfig::default();
    let mut a = Mux::new(Role::Dialer, config.clone(), now);
    let mut b = Mux::new(Role::Acceptor, config.clone(), now);
    let id = a.open("bulk").unwrap();
    pump(&mut a, &mut b, now);
    assert!(b.accept(id));
    pump(&mut a, &mut b, now);
    let window = config.window as usize;
    let mut data = Bytes::from(vec![7u8; window + 1]);
    assert_eq!(a.write_chunk(id, &mut data), WriteState::Queued(window));
    assert_eq!(a.write_chunk(id, &mut data), WriteState::Blocked);
    assert_eq!(data.len(), 1);
}
