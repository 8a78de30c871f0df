//! A model of a narrow office WAN for tests: a TCP relay whose direction
//! from the target back to the client drains at a fixed rate through one
//! bounded FIFO, the way a DSL modem queues: an unpaced sender fills it
//! and everything behind it waits its whole length. When the FIFO is full
//! the relay stops reading, and the sender's TCP window closes (its socket
//! buffer toward the target is kept small, so little waits there besides).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// What the relay reads from the target at once: a few packets.
const CHUNK: usize = 4 * 1460;
/// The relay's socket receive buffer toward the target (Linux doubles it).
const KERNEL_QUEUE: u32 = 16 * 1024;
/// A line free for longer than this was idle, not late.
const IDLE: Duration = Duration::from_millis(20);

/// Starts the relay on a free loopback port in front of `target`, for
/// every connection: client to target unshaped, target to client at
/// `rate` bytes/s behind a FIFO of about `fifo` bytes. Returns its address.
pub async fn start(target: SocketAddr, rate: f64, fifo: u32) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(relay(client, target, rate, fifo));
        }
    });
    addr
}

async fn relay(client: tokio::net::TcpStream, target: SocketAddr, rate: f64, fifo: u32) {
    let socket = TcpSocket::new_v4().unwrap();
    // The kernel's own queue in front of the FIFO stays small.
    socket.set_recv_buffer_size(KERNEL_QUEUE).unwrap();
    let Ok(server) = socket.connect(target).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    });
    // The FIFO: chunks read from the target, each holding its bytes' worth
    // of the FIFO's room until it has gone out.
    let room = Arc::new(Semaphore::new(fifo as usize));
    let (queue, mut line) = mpsc::unbounded_channel::<(Vec<u8>, OwnedSemaphorePermit)>();
    let down = tokio::spawn(async move {
        // When the line is free again: each chunk leaves after the one
        // before it, at `rate`. A timer that fires late must not slow the
        // line down, so the next chunk leaves when the line is free, not a
        // chunk's time after the late wake-up; a line idle for a while
        // starts afresh.
        let mut free_at = Instant::now();
        while let Some((chunk, held)) = line.recv().await {
            let now = Instant::now();
            if now.saturating_duration_since(free_at) > IDLE {
                free_at = now;
            }
            free_at += Duration::from_secs_f64(chunk.len() as f64 / rate);
            tokio::time::sleep_until(free_at).await;
            if client_write.write_all(&chunk).await.is_err() {
                break;
            }
            drop(held);
        }
        let _ = client_write.shutdown().await;
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match server_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let held = room.clone().acquire_many_owned(n as u32).await.unwrap();
        if queue.send((buf[..n].to_vec(), held)).is_err() {
            break;
        }
    }
    drop(queue);
    let _ = down.await;
    up.abort();
}
