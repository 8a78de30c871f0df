//! UDP load: an echo server, and a client that measures datagrams per
//! second, loss and round trips through a UDP relay.
//!
//! - `loadgen udpecho PORT_FILE`: a UDP echo server on 127.0.0.1:0.
//! - `loadgen udp TARGET FLOWS SECONDS RATE SIZE`: FLOWS client sockets
//!   (each its own flow) send SIZE-byte datagrams to TARGET for SECONDS.
//!   RATE 0: as fast as the relay answers (at most 32 datagrams in flight
//!   per flow; an answer also settles the older datagrams of its flow still
//!   waiting, as lost); otherwise RATE datagrams/s in all, evenly paced. Prints
//!   JSON: sent, received, loss, received per second, round-trip p50/p99.
//!
//! Both ends are made as cheap per datagram as the kernel allows, so that
//! a relay's rate is its own and not what the load leaves it: each socket
//! takes coalesced datagrams (`UDP_GRO`: a relay's segmented burst arrives
//! as one buffer), the echo answers such a burst with one segmented send
//! (`UDP_SEGMENT`), and a flow refills its window with one segmented send.
//! A relay that sends datagram by datagram gets them back one by one, as
//! before; the datagrams on the wire are the same either way.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrStorage,
};

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
    // Best effort too: without it a segmented burst arrives cut up.
    if std::env::var_os("LOADGEN_NO_GRO").is_none() {
        let _ = setsockopt(&socket, sockopt::UdpGroSegment, &true);
    }
    Ok(socket)
}

/// One receive: the bytes, the size of each datagram in them (a coalesced
/// burst holds several of that size, the last may be shorter), and the
/// sender.
fn receive(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, usize, SocketAddr)> {
    let mut space = nix::cmsg_space!(i32);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )?;
    let mut segment = msg.bytes;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::UdpGroSegments(size) = cmsg {
            segment = size as usize;
        }
    }
    let from = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from((v4.ip(), v4.port())))
        })
        .ok_or("no IPv4 sender")
        .map_err(std::io::Error::other)?;
    Ok((msg.bytes, segment.max(1), from))
}

/// Sends `bytes` as datagrams of `segment` bytes (one, when it holds no
/// more than one) to `to`, or to the connected peer.
fn send_segments(
    socket: &UdpSocket,
    bytes: &[u8],
    segment: usize,
    to: Option<&SockaddrStorage>,
) -> std::io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let size = segment as u16;
    let segmented = [ControlMessage::UdpGsoSegments(&size)];
    let control: &[ControlMessage] = if bytes.len() > segment {
        &segmented
    } else {
        &[]
    };
    sendmsg(socket.as_raw_fd(), &iov, control, MsgFlags::empty(), to)?;
    Ok(())
}

pub fn echo(port_file: &str) -> Result<(), Error> {
    let socket = bind_loopback()?;
    std::fs::write(port_file, socket.local_addr()?.port().to_string())?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, segment, from) = receive(&socket, &mut buf)?;
        let to = SockaddrStorage::from(from);
        let _ = send_segments(&socket, &buf[..n], segment, Some(&to));
    }
}

struct Flow {
    socket: UdpSocket,
    /// The stamps of the datagrams in flight, oldest first (window mode).
    /// Relays keep a flow's order, so an answer also settles every older
    /// datagram still waiting: those were lost, and a loss frees its
    /// place in the window at once instead of shrinking it for good.
    in_flight: VecDeque<u64>,
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
                in_flight: VecDeque::new(),
                last_answer: start,
            })
        })
        .collect::<Result<_, std::io::Error>>()?;
    let mut datagram = vec![0x5au8; size];
    // A window's worth of datagrams, sent as one segmented buffer when the
    // kernel takes it (at most 64 segments, 64 KiB in all).
    let burst_max = (WINDOW as usize).min(65507 / size).max(1);
    let mut burst = vec![0x5au8; size * burst_max];
    let mut segments_work = true;
    let mut buf = vec![0u8; 65536];
    let mut rtts: Vec<u32> = Vec::new();
    let until = start + Duration::from_secs_f64(seconds);
    let mut total_sent = 0u64;
    let mut next = 0usize;
    let mut clock = Stamps::new(start);
    while Instant::now() < until {
        let now = Instant::now();
        // Send: paced to the rate, or keeping each flow's window full.
        if rate > 0.0 {
            let due = (now.duration_since(start).as_secs_f64() * rate) as u64;
            while total_sent < due {
                let flow = &mut all[next % flows];
                next += 1;
                clock.stamp(&mut datagram);
                let _ = flow.socket.send(&datagram);
                total_sent += 1;
            }
        } else {
            for flow in all.iter_mut() {
                // A window whose datagrams were all lost opens again after
                // 50 ms without an answer.
                if flow.in_flight.len() as u64 >= WINDOW
                    && now.duration_since(flow.last_answer) > Duration::from_millis(50)
                {
                    flow.in_flight.clear();
                    flow.last_answer = now;
                }
                let wanted = WINDOW as usize - flow.in_flight.len();
                if segments_work && wanted > 1 {
                    let count = wanted.min(burst_max);
                    let stamps: Vec<u64> = burst
                        .chunks_mut(size)
                        .take(count)
                        .map(|chunk| clock.stamp(chunk))
                        .collect();
                    match send_segments(&flow.socket, &burst[..count * size], size, None) {
                        Ok(()) => {
                            flow.in_flight.extend(stamps);
                            total_sent += count as u64;
                        }
                        // EIO/EINVAL: no segmentation here; one by one.
                        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                            segments_work = false
                        }
                        Err(_) => {}
                    }
                    continue;
                }
                while (flow.in_flight.len() as u64) < WINDOW {
                    let stamp = clock.stamp(&mut datagram);
                    if flow.socket.send(&datagram).is_err() {
                        break;
                    }
                    flow.in_flight.push_back(stamp);
                    total_sent += 1;
                }
            }
        }
        // Receive whatever came back.
        let mut idle = true;
        for flow in all.iter_mut() {
            while let Ok((n, segment, _)) = receive(&flow.socket, &mut buf) {
                idle = false;
                let now_ns = start.elapsed().as_nanos() as u64;
                for answer in buf[..n].chunks(segment) {
                    if answer.len() >= 8 {
                        let sent_ns = u64::from_be_bytes(answer[..8].try_into().expect("8 bytes"));
                        rtts.push((now_ns.saturating_sub(sent_ns) / 1000) as u32);
                        while flow.in_flight.front().is_some_and(|&s| s <= sent_ns) {
                            flow.in_flight.pop_front();
                        }
                    }
                }
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
            while let Ok((n, segment, _)) = receive(&flow.socket, &mut buf) {
                late += n.div_ceil(segment);
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

/// Send times, in ns since the load started, each later than the last (a
/// datagram's stamp names it among those in flight).
struct Stamps {
    start: Instant,
    last: u64,
}

impl Stamps {
    fn new(start: Instant) -> Self {
        Stamps { start, last: 0 }
    }

    /// Writes a new stamp into the datagram's first 8 bytes; returns it.
    fn stamp(&mut self, datagram: &mut [u8]) -> u64 {
        let ns = (self.start.elapsed().as_nanos() as u64).max(self.last + 1);
        self.last = ns;
        datagram[..8].copy_from_slice(&ns.to_be_bytes());
        ns
    }
}
