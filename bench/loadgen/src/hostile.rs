//! A hostile but authenticated link peer, for bench/stress.py: it logs in
//! with the right password, then misbehaves within the protocol to make the
//! hub hold memory. It never reads what the hub sends (except, in the
//! stream modes, the answers to its OPENs), so nothing drains on its side.
//!
//! - `ping`: PING records as fast as the hub takes them (each asks for a
//!   PONG the hub cannot send, since nobody reads).
//! - `tiny`: opens STREAMS streams to SERVICE, then fills their windows with
//!   1-byte DATA records (each stream's data sits at the hub).
//! - `streams`: opens streams to SERVICE as fast as it can, never closing
//!   any (the hub refuses those past its limit).
//!
//! Prints a JSON line with what it sent.

use std::time::{Duration, Instant};

use link::frame::Frame;
use link::record::Sealer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Error;

/// `hostile HUB USER PASSWORD MODE SERVICE STREAMS SECONDS`
pub async fn run(args: &[String]) -> Result<(), Error> {
    let hub = &args[0];
    let (user, password, mode, service) = (&args[1], &args[2], &args[3], &args[4]);
    let streams: u32 = args[5].parse()?;
    let seconds: u64 = args[6].parse()?;
    let mut tcp = TcpStream::connect(hub).await?;
    let keys = link::io::dial(&mut tcp, user, password.as_bytes()).await?;
    let mut sealer = Sealer::new(keys.send);
    let opener = link::record::Opener::new(keys.recv);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut out = Vec::with_capacity(1 << 20);
    let mut records = 0u64;
    let mut opened = 0u32;
    match mode.as_str() {
        "ping" => {
            while Instant::now() < deadline {
                out.clear();
                for i in 0..4096u64 {
                    sealer.seal(&Frame::Ping(records + i), &mut out);
                }
                records += 4096;
                if tokio::time::timeout_at(deadline.into(), tcp.write_all(&out))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        "tiny" | "streams" => {
            let (mut read, mut write) = tcp.into_split();
            // Count the hub's answers to our OPENs in the background (its
            // other records are read and dropped, unopened).
            let answers = tokio::spawn(async move {
                let _ = opener;
                let mut sink = vec![0u8; 1 << 16];
                while let Ok(n) = read.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
            let mut id = 1u32;
            let count = if mode == "streams" {
                u32::MAX / 4
            } else {
                streams
            };
            while opened < count && Instant::now() < deadline {
                out.clear();
                for _ in 0..64.min(count - opened) {
                    sealer.seal(
                        &Frame::Open {
                            id,
                            window: 1 << 20,
                            service,
                        },
                        &mut out,
                    );
                    id += 2;
                    opened += 1;
                    records += 1;
                }
                write.write_all(&out).await?;
            }
            if mode == "tiny" {
                // Let the OPEN_OKs come back before sending data.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let mut sent = vec![0u64; opened as usize];
                'fill: while Instant::now() < deadline {
                    out.clear();
                    for (i, sent) in sent.iter_mut().enumerate() {
                        // Stay inside the smallest window a stream gets
                        // (64 KiB): within the rules, no protocol error.
                        if *sent >= 60_000 {
                            continue;
                        }
                        for _ in 0..64 {
                            sealer.seal(
                                &Frame::Data {
                                    id: 1 + 2 * i as u32,
                                    data: b"x",
                                },
                                &mut out,
                            );
                        }
                        *sent += 64;
                        records += 64;
                    }
                    if out.is_empty() {
                        break 'fill;
                    }
                    if tokio::time::timeout_at(deadline.into(), write.write_all(&out))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            tokio::time::sleep_until(deadline.into()).await;
            answers.abort();
        }
        other => return Err(format!("unknown mode {other}").into()),
    }
    println!("{{\"mode\": \"{mode}\", \"records\": {records}, \"streams\": {opened}}}");
    Ok(())
}

/// `guess HUB USER SOURCE COUNT`: COUNT logins with a wrong password from
/// the local address SOURCE, one after another; prints how many the hub let
/// the guesser test and how many it answered busy, and the time taken.
pub async fn guess(args: &[String]) -> Result<(), Error> {
    let hub: std::net::SocketAddr = args[0].parse()?;
    let user = &args[1];
    let source: std::net::IpAddr = args[2].parse()?;
    let count: u32 = args[3].parse()?;
    let started = Instant::now();
    let (mut tested, mut busy, mut other) = (0u32, 0u32, 0u32);
    for _ in 0..count {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((source, 0).into())?;
        let mut tcp = socket.connect(hub).await?;
        match link::io::dial(&mut tcp, user, b"a wrong guess").await {
            Err(link::io::LinkHandshakeError::Handshake(
                link::handshake::HandshakeError::Busy { .. },
            )) => busy += 1,
            Err(link::io::LinkHandshakeError::Handshake(
                link::handshake::HandshakeError::Authentication,
            )) => tested += 1,
            _ => other += 1,
        }
    }
    println!(
        "{{\"tested\": {tested}, \"busy\": {busy}, \"other\": {other}, \"seconds\": {:.3}}}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
