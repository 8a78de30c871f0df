//! How many bytes a TCP socket holds that it has not sent yet.
//!
//! The link writer needs this to keep a narrow path's kernel queue short:
//! `TCP_NOTSENT_LOWAT` bounds it only when a write needs a new segment, and
//! a write that fits the last unsent segment (up to 64 KB with GSO) is
//! appended past the limit. The count comes from the `SIOCOUTQNSD` ioctl,
//! which neither socket2 nor nix wraps: this module is the crate's one
//! `unsafe`, measured to pay in bench/README ("where the unpaced echo
//! waits").

use std::io;

/// The bytes `socket` holds that the kernel has not sent yet.
#[cfg(target_os = "linux")]
pub fn unsent_bytes(socket: &socket2::Socket) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut unsent: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one c_int through its argument, which
    // points to a live, aligned c_int on this stack frame; the descriptor
    // belongs to `socket`, borrowed for the whole call.
    let result = unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            libc::SIOCOUTQNSD,
            &mut unsent as *mut libc::c_int,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsent.max(0) as usize)
}

/// Not known off Linux: the writer then relies on `TCP_NOTSENT_LOWAT`.
#[cfg(not(target_os = "linux"))]
pub fn unsent_bytes(_socket: &socket2::Socket) -> io::Result<usize> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_connected_socket_that_sent_everything_holds_nothing() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _accepted = listener.accept().unwrap();
        let socket = socket2::Socket::from(stream);
        assert_eq!(unsent_bytes(&socket).unwrap(), 0);
    }
}
