//! Datagrams in batches: one `recvmmsg` takes every datagram waiting on a
//! socket (up to [`BATCH`]), one `sendmmsg` sends several. Under load a
//! udp service then makes a fraction of a system call per datagram instead
//! of one per datagram each way; when idle a batch is a single datagram.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::UdpSocket;

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
    pub async fn recv(&mut self, socket: &UdpSocket) -> io::Result<()> {
        socket
            .async_io(Interest::READABLE, || self.take(socket))
            .await
    }

    fn take(&mut self, socket: &UdpSocket) -> io::Result<()> {
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
        for message in results {
            let from = message.address.as_ref().and_then(to_std);
            // A datagram from no address we can answer is dropped.
            if let Some(from) = from {
                self.received.push((message.bytes, from));
            }
        }
        Ok(())
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
pub async fn recv_copied(socket: &UdpSocket, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    // `async_io`, not `ready` + `try_io`: tokio's `try_io` sees no
    // readiness at all for an interest of more than one kind.
    let receive = Interest::READABLE.add(Interest::ERROR);
    socket
        .async_io(receive, || {
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.take(socket)?;
                for (datagram, _) in scratch.datagrams() {
                    each(datagram);
                }
                Ok(())
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
pub fn send(socket: &UdpSocket, datagrams: &[&[u8]], to: Option<SocketAddr>) -> usize {
    let address = to.map(SockaddrStorage::from);
    let mut sent = 0;
    for group in datagrams.chunks(BATCH) {
        let slices: Vec<[IoSlice<'_>; 1]> = group.iter().map(|d| [IoSlice::new(d)]).collect();
        let addresses = vec![address; group.len()];
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(group.len(), None);
        let result = sendmmsg(
            socket.as_raw_fd(),
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
