//! A TCP relay the tests put between two gateways to watch or damage the
//! link: it records every byte, can flip one byte, throttle bandwidth, or
//! cut the connection without either gateway closing it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// What the relay does to the dialer→hub direction.
#[derive(Clone, Default)]
pub struct RelayPlan {
    /// Flip the byte at this offset of the dialer→hub stream (first connection only).
    pub flip_up_at: Option<usize>,
    /// Bytes per second in each direction (0 = unlimited).
    pub rate: usize,
}

/// A running relay; every connection through it goes to `upstream`.
pub struct TestRelay {
    pub addr: SocketAddr,
    /// Everything seen dialer→hub, then hub→dialer, for all connections.
    pub up: Arc<Mutex<Vec<u8>>>,
    pub down: Arc<Mutex<Vec<u8>>>,
    cut: Arc<Notify>,
    flipped: Arc<AtomicBool>,
}

impl TestRelay {
    pub async fn start(upstream: SocketAddr, plan: RelayPlan) -> TestRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = TestRelay {
            addr,
            up: Arc::default(),
            down: Arc::default(),
            cut: Arc::new(Notify::new()),
            flipped: Arc::default(),
        };
        let (up, down, cut, flipped) = (
            relay.up.clone(),
            relay.down.clone(),
            relay.cut.clone(),
            relay.flipped.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let flip = if flipped.swap(true, Ordering::SeqCst) {
                    None
                } else {
                    plan.flip_up_at
                };
                let a = tokio::spawn(pump(cr, sw, up.clone(), flip, plan.rate));
                let b = tokio::spawn(pump(sr, cw, down.clone(), None, plan.rate));
                let cut = cut.clone();
                tokio::spawn(async move {
                    cut.notified().await;
                    a.abort();
                    b.abort();
                });
            }
        });
        relay
    }

    /// Ends every relayed connection at once (both sides see a plain EOF,
    /// with no close record).
    pub fn cut(&self) {
        self.cut.notify_waiters();
    }

    pub fn recorded(&self) -> Vec<u8> {
        let mut all = self.up.lock().unwrap().clone();
        all.extend_from_slice(&self.down.lock().unwrap());
        all
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: Arc<Mutex<Vec<u8>>>,
    flip_at: Option<usize>,
    rate: usize,
) {
    let mut seen = 0usize;
    let chunk = if rate > 0 {
        (rate / 50).max(512)
    } else {
        64 * 1024
    };
    let mut buf = vec![0u8; chunk];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if let Some(at) = flip_at {
            if at >= seen && at < seen + n {
                buf[at - seen] ^= 0x01;
            }
        }
        record.lock().unwrap().extend_from_slice(&buf[..n]);
        seen += n;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
    }
}

/// True if `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
