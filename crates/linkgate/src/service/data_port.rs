//! Listening sockets that wait for one incoming connection: FTP passive
//! data ports and SOCKS BIND.
//!
//! Letting the kernel pick the port (`bind` to port 0) makes it search the
//! bind table for a free one, which gets slow once tens of thousands of
//! sockets are bound or waiting in TIME_WAIT: under a load of short FTP
//! sessions that search took two thirds of the gateway's CPU. Trying
//! explicit ports from a random starting point costs one hash lookup per
//! try, and lets an administrator confine the ports to a range a firewall
//! opens (ftp's `passive_ports`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

use crate::config::PortRange;

/// Ports tried in the system's ephemeral range before leaving the choice to
/// the kernel after all.
const DEFAULT_RANGE_TRIES: u32 = 64;
/// Pending connections a data port queues: one is expected.
const BACKLOG: i32 = 4;

/// A listener on `ip` at a free port of `range` (ftp's `passive_ports`),
/// or of the system's ephemeral range when `None`. Tries every port of a
/// configured range before failing.
pub(crate) fn bind_data_port(ip: IpAddr, range: Option<PortRange>) -> io::Result<TcpListener> {
    let (low, high, tries) = match range {
        Some(range) => (range.low, range.high, u32::from(range.high - range.low) + 1),
        None => {
            let (low, high) = ephemeral_range();
            (low, high, DEFAULT_RANGE_TRIES)
        }
    };
    let size = u32::from(high - low) + 1;
    let start = rand::random::<u32>() % size;
    let mut last_error = None;
    for i in 0..tries.min(size) {
        let port = low + ((start + i) % size) as u16;
        match bind_at(SocketAddr::new(ip, port)) {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    match range {
        Some(range) => Err(last_error.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("no free port in {}-{}", range.low, range.high),
            )
        })),
        None => bind_at(SocketAddr::new(ip, 0)),
    }
}

fn bind_at(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // As tokio's own bind does: a port whose last connection is in
    // TIME_WAIT can listen again.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// The kernel's ephemeral port range (read once), or Linux's default.
fn ephemeral_range() -> (u16, u16) {
    static RANGE: OnceLock<(u16, u16)> = OnceLock::new();
    *RANGE.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|text| {
                let mut numbers = text.split_whitespace().map(|n| n.parse::<u16>().ok());
                let (low, high) = (numbers.next()??, numbers.next()??);
                (low > 0 && low <= high).then_some((low, high))
            })
            .unwrap_or((32768, 60999))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ports_come_from_the_range_until_it_is_full() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        // Find three free consecutive ports to make a range of.
        let probe = bind_data_port(ip, None).unwrap();
        let base = probe.local_addr().unwrap().port().min(60000);
        drop(probe);
        let range = PortRange {
            low: base,
            high: base + 2,
        };
        let mut held = Vec::new();
        while let Ok(listener) = bind_data_port(ip, Some(range)) {
            let port = listener.local_addr().unwrap().port();
            assert!((range.low..=range.high).contains(&port), "{port}");
            held.push(listener);
            assert!(held.len() <= 3);
        }
        // Others may hold some of these ports; none of ours repeats.
        let mut ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        ports.dedup();
        assert_eq!(ports.len(), held.len());
        assert!(bind_data_port(ip, Some(range)).is_err());
        // The default range always finds one.
        assert!(bind_data_port(ip, None).is_ok());
    }
}
