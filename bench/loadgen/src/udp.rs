//! UDP load: an echo server, and a client that measures datagrams per
//! second, loss and round trips through a UDP relay.
//!
//! - `loadgen udpecho PORT_FILE`: a UDP echo server on 127.0.0.1:0.
//! - `loadgen udp TARGET FLOWS SECONDS RATE SIZE`: FLOWS client sockets
//!   (each its own flow) send SIZE-byte datagrams to TARGET for SECONDS.
//!   RATE 0: as fast as the relay answers (at most 32 datagrams in flight
//!   per flow); otherwise RATE datagrams/s in all, evenly paced. Prints
//!   JSON: sent, received, loss, received per second, round-trip p50/p99.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error>;

/// Datagrams in flight per flow in the as-fast-as-possible mode.
const WINDOW: u64 = 32;

/// The receive buffer the echo server and each flow's socket ask for: a
/// relay hands datagrams over in bursts (a batch per system call), and the
/// ceiling must not be what loses them (the default ~200 KB holds a few
/// hundred small datagrams).
const RECV_BUFFER: usize = 4 << 20;

/// A loopback UDP socket on a free port with a large receive buffer.
fn bind_loopback() -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(RECV_BUFFER);
    Ok(socket)
}

pub fn echo(port_file: &str) -> Result<(), Error> {
    let socket = bind_loopback()?;
    std::fs::write(port_file, socket.local_addr()?.port().to_string())?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        let _ = socket.send_to(&buf[..n], from);
    }
}

struct Flow {
    socket: UdpSocket,
    sent: u64,
    /// Answers, or datagrams given up for lost (window mode).
    received: u64,
    last_answer: Instant,
}

pub fn load(args: &[String]) -> Result<(), Error> {
    let target: SocketAddr = args[0].parse()?;
    let flows: usize = args[1].parse()?;
    let seconds: f64 = args[2].parse()?;
    let rate: f64 = args[3].parse()?;
    let size: usize = args[4].parse::<usize>()?.max(16);
    let start = Instant::now();
    let mut all: Vec<Flow> = (0..flows)
        .map(|_| {
            let socket = bind_loopback()?;
            socket.connect(target)?;
            socket.set_nonblocking(true)?;
            Ok(Flow {
                socket,
                sent: 0,
                received: 0,
                last_answer: start,
            })
        })
        .collect::<Result<_, std::io::Error>>()?;
    let mut datagram = vec![0x5au8; size];
    let mut buf = vec![0u8; 65536];
    let mut rtts: Vec<u32> = Vec::new();
    let until = start + Duration::from_secs_f64(seconds);
    let mut total_sent = 0u64;
    let mut next = 0usize;
    while Instant::now() < until {
        let now = Instant::now();
        // Send: paced to the rate, or keeping each flow's window full.
        if rate > 0.0 {
            let due = (now.duration_since(start).as_secs_f64() * rate) as u64;
            while total_sent < due {
                let flow = &mut all[next % flows];
                next += 1;
                stamp(&mut datagram, start);
                if flow.socket.send(&datagram).is_ok() {
                    flow.sent += 1;
                }
                total_sent += 1;
            }
        } else {
            for flow in all.iter_mut() {
                // A window that lost its datagrams opens again after 50 ms.
                if flow.sent - flow.received >= WINDOW
                    && now.duration_since(flow.last_answer) > Duration::from_millis(50)
                {
                    flow.received = flow.sent;
                    flow.last_answer = now;
                }
                while flow.sent - flow.received < WINDOW {
                    stamp(&mut datagram, start);
                    if flow.socket.send(&datagram).is_err() {
                        break;
                    }
                    flow.sent += 1;
                    total_sent += 1;
                }
            }
        }
        // Receive whatever came back.
        let mut idle = true;
        for flow in all.iter_mut() {
            while let Ok(n) = flow.socket.recv(&mut buf) {
                idle = false;
                if n >= 8 {
                    let sent_ns = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                    let now_ns = start.elapsed().as_nanos() as u64;
                    rtts.push((now_ns.saturating_sub(sent_ns) / 1000) as u32);
                }
                flow.received += 1;
                flow.last_answer = Instant::now();
            }
        }
        // Nothing came: leave the CPU to the relay under test (two cores
        // are shared by the load, the relay and the echo server).
        if idle {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    // Answers still on their way count as received, not in the rate.
    let mut late = 0usize;
    let drain = Instant::now() + Duration::from_millis(200);
    while Instant::now() < drain {
        for flow in all.iter() {
            while flow.socket.recv(&mut buf).is_ok() {
                late += 1;
            }
        }
    }
    let received = rtts.len() + late;
    rtts.sort_unstable();
    let pct = |p: f64| {
        rtts.get(((rtts.len() as f64 * p) as usize).min(rtts.len().saturating_sub(1)))
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    println!(
        "{{\"sent\":{},\"received\":{},\"loss\":{:.5},\"received_per_s\":{:.0},\"rtt_p50_ms\":{:.3},\"rtt_p99_ms\":{:.3}}}",
        total_sent,
        received,
        1.0 - received as f64 / total_sent.max(1) as f64,
        rtts.len() as f64 / seconds,
        pct(0.5),
        pct(0.99)
    );
    Ok(())
}

/// Writes the time since `start` (ns) into the datagram's first 8 bytes.
fn stamp(datagram: &mut [u8], start: Instant) {
    let ns = start.elapsed().as_nanos() as u64;
    datagram[..8].copy_from_slice(&ns.to_be_bytes());
}
