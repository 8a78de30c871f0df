//! Datagrams in batches: one `recvmmsg` takes every datagram waiting on a
//! socket (up to [`BATCH`]), one `sendmmsg` sends several. Under load a
//! udp service then makes a fraction of a system call per datagram instead
//! of one per datagram each way; when idle a batch is a single datagram.
//!
//! The sockets ([`DatagramSocket`]) wait for reading only: sends never
//! wait (a full socket buffer drops, as UDP does), and a socket registered
//! for writing too gets a wake-up for every datagram the kernel frees
//! after sending it (`sock_wfree` → `EPOLLOUT`), which woke a parked
//! worker thread for nothing several times per batch.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, sendmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A non-blocking UDP socket that the runtime watches for datagrams (and
/// queued errors) only.
pub struct DatagramSocket {
    fd: AsyncFd<UdpSocket>,
    /// Whether the socket's route takes segmented sends (UDP GSO); cleared
    /// the first time the kernel refuses one.
    segments: AtomicBool,
}

impl DatagramSocket {
    /// Takes `socket` over (made non-blocking); needs a runtime.
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let interest = Interest::READABLE.add(Interest::ERROR);
        // SAFETY: a `UdpSocket` owns its file descriptor, closes it only
        // when dropped and returns the same one from every `as_raw_fd`;
        // the `AsyncFd` owns the socket and never hands it out by value,
        // so the descriptor stays open and the same while registered.
        let registered = unsafe { AsyncFd::register_with_interest(socket, interest) };
        registered
            .map(|fd| DatagramSocket {
                fd,
                segments: AtomicBool::new(true),
            })
            .map_err(io::Error::from)
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.fd.get_ref().local_addr()
    }

    /// The socket itself.
    pub fn get_ref(&self) -> &UdpSocket {
        self.fd.get_ref()
    }

    /// Waits until `interest` is ready and `take` (one `recvmmsg`) got
    /// something or failed. A batch short of [`BATCH`] emptied the queue,
    /// so the readiness is cleared then and there rather than by one more
    /// call that would only say "would block" (a datagram arriving
    /// meanwhile is a new event, which clearing does not lose).
    async fn receive(
        &self,
        interest: Interest,
        mut take: impl FnMut(&UdpSocket) -> io::Result<usize>,
    ) -> io::Result<()> {
        loop {
            let mut guard = self.fd.ready(interest).await?;
            match take(self.fd.get_ref()) {
                Ok(arrived) => {
                    if arrived < BATCH {
                        guard.clear_ready();
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Most datagrams taken or sent by one system call.
pub const BATCH: usize = 16;

/// The room one datagram gets: the largest UDP payload, and one byte more
/// so that a datagram too large to relay is seen as such.
const SLOT: usize = super::udp::MAX_DATAGRAM + 1;

/// Buffers for one socket's batches of received datagrams.
pub struct RecvBatch {
    buf: Vec<u8>,
    /// Each received datagram's length and sender, in arrival order.
    received: Vec<(usize, SocketAddr)>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            buf: vec![0; SLOT * BATCH],
            received: Vec::with_capacity(BATCH),
        }
    }
}

impl RecvBatch {
    /// Waits for datagrams on `socket` and takes all that are waiting (at
    /// most [`BATCH`], one system call).
    pub async fn recv(&mut self, socket: &DatagramSocket) -> io::Result<()> {
        socket.receive(Interest::READABLE, |s| self.take(s)).await
    }

    /// Takes the datagrams waiting on `socket`; how many arrived (those
    /// from no address we can answer are not kept).
    fn take(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.received.clear();
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut slices: Vec<[IoSliceMut<'_>; 1]> = self
            .buf
            .chunks_mut(SLOT)
            .map(|slot| [IoSliceMut::new(slot)])
            .collect();
        let results = recvmmsg(
            socket.as_raw_fd(),
            &mut headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        let mut arrived = 0;
        for message in results {
            arrived += 1;
            let from = message.address.as_ref().and_then(to_std);
            // A datagram from no address we can answer is dropped.
            if let Some(from) = from {
                self.received.push((message.bytes, from));
            }
        }
        Ok(arrived)
    }

    /// The datagrams of the last batch, with their senders, in order.
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        self.buf
            .chunks(SLOT)
            .zip(&self.received)
            .map(|(slot, &(len, from))| (&slot[..len.min(SLOT)], from))
    }
}

thread_local! {
    /// Room for one batch per worker thread, for sockets that are read in
    /// batches but too many to each have a batch's buffers (a flow's
    /// socket to its target): what it receives is copied out at once.
    static SCRATCH: std::cell::RefCell<RecvBatch> = std::cell::RefCell::default();
}

/// Waits for datagrams on `socket`, or an error queued on it (ICMP port
/// unreachable on a connected socket, then returned), takes all that are
/// waiting (at most [`BATCH`], one system call) and hands each to `each`.
pub async fn recv_copied(socket: &DatagramSocket, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let receive = Interest::READABLE.add(Interest::ERROR);
    socket
        .receive(receive, |socket| {
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let arrived = scratch.take(socket)?;
                for (datagram, _) in scratch.datagrams() {
                    each(datagram);
                }
                Ok(arrived)
            })
        })
        .await
}

fn to_std(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    address
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Sends `datagrams` on `socket` now, without waiting (to `to`, or where
/// the socket is connected), [`BATCH`] per system call; returns how many
/// were sent: the rest are dropped, as a full socket buffer drops them.
pub fn send(socket: &DatagramSocket, datagrams: &[&[u8]], to: Option<SocketAddr>) -> usize {
    let address = to.map(SockaddrStorage::from);
    if let Some(sent) = send_segmented(socket, datagrams, address.as_ref()) {
        return sent;
    }
    let mut sent = 0;
    for group in datagrams.chunks(BATCH) {
        let slices: Vec<[IoSlice<'_>; 1]> = group.iter().map(|d| [IoSlice::new(d)]).collect();
        let addresses = vec![address; group.len()];
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(group.len(), None);
        let result = sendmmsg(
            socket.get_ref().as_raw_fd(),
            &mut headers,
            &slices,
            &addresses,
            [],
            MsgFlags::MSG_DONTWAIT,
        );
        match result {
            Ok(results) => {
                let n = results.count();
                sent += n;
                if n < group.len() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    sent
}

/// Largest datagram sent as a segment of a larger one: one fits a 1,500
/// byte path (IPv6 and a tunnel's headers included); the kernel refuses
/// segments larger than the route's MTU.
const MAX_SEGMENT: usize = 1200;

/// Sends several small datagrams of one size (the last may be shorter) to
/// one address as one buffer that the kernel cuts into them (UDP GSO,
/// `UDP_SEGMENT`): one trip through the IP stack instead of one each.
/// `None` when they do not qualify or the socket's route cannot segment
/// (then never tried on that socket again): send them one by one.
fn send_segmented(
    socket: &DatagramSocket,
    datagrams: &[&[u8]],
    to: Option<&SockaddrStorage>,
) -> Option<usize> {
    let (first, rest) = datagrams.split_first()?;
    let segment = first.len();
    let uniform = !rest.is_empty()
        && (1..=MAX_SEGMENT).contains(&segment)
        && rest
            .iter()
            .enumerate()
            .all(|(i, d)| match i + 1 == rest.len() {
                true => !d.is_empty() && d.len() <= segment,
                false => d.len() == segment,
            });
    if !uniform || datagrams.len() > BATCH || !socket.segments.load(Ordering::Relaxed) {
        return None;
    }
    let slices: Vec<IoSlice<'_>> = datagrams.iter().map(|d| IoSlice::new(d)).collect();
    let segment = segment as u16;
    let control = [ControlMessage::UdpGsoSegments(&segment)];
    let fd = socket.get_ref().as_raw_fd();
    match sendmsg(fd, &slices, &control, MsgFlags::MSG_DONTWAIT, to) {
        Ok(_) => Some(datagrams.len()),
        // A full socket buffer drops them, as for one by one.
        Err(Errno::EAGAIN) => Some(0),
        // No segmentation on this route (EIO: the device cannot; EINVAL,
        // ENOPROTOOPT, EOPNOTSUPP: an older kernel or a larger MTU needed).
        Err(Errno::EIO | Errno::EINVAL | Errno::ENOPROTOOPT | Errno::EOPNOTSUPP) => {
            socket.segments.store(false, Ordering::Relaxed);
            None
        }
        // Anything else (an ICMP error reported on a connected socket):
        // one by one, as before.
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (DatagramSocket, UdpSocket) {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(receiver.local_addr().unwrap()).unwrap();
        (DatagramSocket::new(sender).unwrap(), receiver)
    }

    fn received(receiver: &UdpSocket, count: usize) -> Vec<Vec<u8>> {
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = vec![0u8; 65536];
        (0..count)
            .map(|_| {
                let n = receiver.recv(&mut buf).unwrap();
                buf[..n].to_vec()
            })
            .collect()
    }

    /// Equal-sized datagrams sent as one segmented buffer arrive as the
    /// datagrams they were, the shorter last one included.
    #[tokio::test]
    async fn segmented_datagrams_arrive_one_by_one_and_whole() {
        let (sender, receiver) = pair();
        let datagrams: Vec<Vec<u8>> = (0..BATCH as u8)
            .map(|i| vec![i; if i as usize == BATCH - 1 { 37 } else { 300 }])
            .collect();
        let slices: Vec<&[u8]> = datagrams.iter().map(|d| d.as_slice()).collect();
        assert_eq!(send(&sender, &slices, None), BATCH);
        assert!(
            sender.segments.load(Ordering::Relaxed),
            "loopback segments UDP: the segmented path was taken"
        );
        assert_eq!(received(&receiver, BATCH), datagrams);
    }

    /// Datagrams of mixed sizes, or too large to be segments, go one by one.
    #[tokio::test]
    async fn mixed_or_large_datagrams_go_one_by_one() {
        let (sender, receiver) = pair();
        let datagrams = [vec![1u8; 10], vec![2u8; 20], vec![3u8; 10], vec![4u8; 5000]];
        let slices: Vec<&[u8]> = datagrams.iter().map(|d| d.as_slice()).collect();
        assert!(send_segmented(&sender, &slices, None).is_none());
        assert!(send_segmented(&sender, &[&datagrams[3], &datagrams[3]], None).is_none());
        assert_eq!(send(&sender, &slices, None), 4);
        assert_eq!(received(&receiver, 4), datagrams);
    }
}
