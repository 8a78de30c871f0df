//! Load generator for the benchmarks in bench/ (SOCKS5 connections, FTP
//! sessions, helpers), single-threaded so that the server under test keeps
//! the other core.
//!
//! - `loadgen echo PORT_FILE`: an echo server on 127.0.0.1:0; writes its
//!   port to PORT_FILE and serves until killed.
//! - `loadgen rate PROXY TARGET CLIENTS SECONDS`: CLIENTS concurrent loops of
//!   connect, SOCKS5 no-auth CONNECT to TARGET, 64-byte round trip, close;
//!   prints connections/s and setup latency percentiles as JSON. TARGET
//!   `local` runs the echo server in this same thread.
//! - `loadgen hold PROXY TARGET COUNT`: opens COUNT SOCKS5 tunnels and keeps
//!   them idle; prints "ready" and waits for stdin to close.
//! - `loadgen source PORT_FILE`: a server that sends zeros as fast as it can
//!   to whoever connects.
//! - `loadgen tunnel PROXY TARGET SECONDS`: an HTTP `CONNECT` tunnel to
//!   TARGET (a source) read for SECONDS; prints the Gbit/s as JSON.
//! - `loadgen ftp SERVER USER PASS FILE CLIENTS SECONDS`: CLIENTS concurrent
//!   loops of whole FTP sessions (login, PASV, RETR FILE, QUIT) against
//!   SERVER (a proxy with a fixed target, or the server itself); prints
//!   sessions/s and session latency percentiles as JSON.
//! - `loadgen hostile HUB USER PASSWORD MODE SERVICE STREAMS SECONDS`: an
//!   authenticated link peer that floods the hub (see `hostile.rs`).
//! - `loadgen guess HUB USER SOURCE COUNT`: wrong-password link logins
//!   from the local address SOURCE; prints how many the hub answered.
//! - `loadgen udpecho PORT_FILE`, `loadgen udp TARGET FLOWS SECONDS RATE
//!   SIZE`: UDP echo and UDP load (see `udp.rs`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::socks::{Address, Command, Request};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod ftp;
mod hostile;
mod udp;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.get(1).map(String::as_str) {
        Some("echo") => runtime.block_on(echo(&args[2])),
        Some("rate") => runtime.block_on(async {
            // "local": the echo server runs in this same thread, as in a
            // single-threaded C load generator with a built-in echo.
            let target = if args[3] == "local" {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                tokio::spawn(async move { serve_echo(listener).await.map_err(|e| e.to_string()) });
                addr
            } else {
                args[3].parse()?
            };
            rate(args[2].parse()?, target, args[4].parse()?, args[5].parse()?).await
        }),
        Some("hold") => runtime.block_on(hold(args[2].parse()?, args[3].parse()?, args[4].parse()?)),
        Some("source") => runtime.block_on(source(&args[2])),
        Some("tunnel") => runtime.block_on(connect_tunnel(&args[2], &args[3], args[4].parse()?)),
        Some("ftp") => runtime.block_on(ftp::rate(
            args[2].parse()?,
            args[3].clone(),
            args[4].clone(),
            args[5].clone(),
            args[6].parse()?,
            args[7].parse()?,
        )),
        Some("hostile") => runtime.block_on(hostile::run(&args[2..])),
        Some("udpecho") => udp::echo(&args[2]),
        Some("udp") => udp::load(&args[2..]),
        Some("guess") => runtime.block_on(hostile::guess(&args[2..])),
        _ => Err("usage: loadgen echo PORT_FILE | rate PROXY TARGET CLIENTS SECONDS | hold PROXY TARGET COUNT".into()),
    }
}

async fn echo(port_file: &str) -> Result<(), Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    std::fs::write(port_file, listener.local_addr()?.port().to_string())?;
    serve_echo(listener).await
}

async fn serve_echo(listener: TcpListener) -> Result<(), Error> {
    loop {
        let (mut socket, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.read(&mut buf).await {
                if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Connects through the proxy to `target`; returns the tunnel.
async fn tunnel(proxy: SocketAddr, target: SocketAddr) -> Result<TcpStream, Error> {
    let mut stream = TcpStream::connect(proxy).await?;
    stream.set_nodelay(true)?;
    // Step by step, as curl does (some servers drop pipelined requests).
    stream.write_all(&[5, 1, 0]).await?;
    let mut method = [0u8; 2];
    stream.read_exact(&mut method).await?;
    if method != [5, 0] {
        return Err(format!("method refused: {method:?}").into());
    }
    let request = Request {
        command: Command::Connect,
        destination: Address::Ip(target),
    }
    .encode()?;
    stream.write_all(&request).await?;
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).await?;
    if reply[1] != 0 {
        return Err(format!("request refused: {reply:?}").into());
    }
    Ok(stream)
}

async fn rate(
    proxy: SocketAddr,
    target: SocketAddr,
    clients: usize,
    seconds: f64,
) -> Result<(), Error> {
    // A server that drops a request must not stall the run: 2 s per round.
    let rounds = drive(
        clients,
        seconds,
        Duration::from_secs(2),
        move || async move {
            let mut stream = tunnel(proxy, target).await?;
            let payload = [7u8; 64];
            stream.write_all(&payload).await?;
            let mut back = [0u8; 64];
            stream.read_exact(&mut back).await?;
            Ok(())
        },
    )
    .await?;
    report("connections", &rounds);
    Ok(())
}

/// What a rate run measured.
struct Rounds {
    /// Latency of each successful round, in milliseconds.
    latencies: Vec<f64>,
    errors: u64,
    /// The text of one failed round's error, to show why.
    last_error: Option<String>,
    elapsed: f64,
}

/// Runs `clients` concurrent loops of `round` until `seconds` have passed;
/// a round that takes longer than `limit` counts as an error.
async fn drive<F, Fut>(
    clients: usize,
    seconds: f64,
    limit: Duration,
    round: F,
) -> Result<Rounds, Error>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), Error>> + Send,
{
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..clients {
        let round = round.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut last_error = None;
            while Instant::now() < deadline {
                let began = Instant::now();
                match tokio::time::timeout(limit, round()).await {
                    Ok(Ok(())) => latencies.push(began.elapsed().as_secs_f64() * 1000.0),
                    Ok(Err(e)) => {
                        errors += 1;
                        last_error = Some(e.to_string());
                    }
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors, last_error)
        }));
    }
    let mut rounds = Rounds {
        latencies: Vec::new(),
        errors: 0,
        last_error: None,
        elapsed: 0.0,
    };
    for worker in workers {
        let (latencies, errors, last_error) = worker.await?;
        rounds.latencies.extend(latencies);
        rounds.errors += errors;
        rounds.last_error = rounds.last_error.or(last_error);
    }
    rounds.elapsed = started.elapsed().as_secs_f64();
    Ok(rounds)
}

/// Prints a rate run's result as JSON: how many rounds (`what`), errors,
/// rounds per second and latency percentiles in milliseconds; the last
/// error's text on stderr.
fn report(what: &str, rounds: &Rounds) {
    if let Some(e) = &rounds.last_error {
        eprintln!("last error: {e}");
    }
    let mut latencies = rounds.latencies.clone();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "{{\"{what}\": {}, \"errors\": {}, \"per_second\": {:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}}}",
        latencies.len(),
        rounds.errors,
        latencies.len() as f64 / rounds.elapsed,
        pct(0.50),
        pct(0.99)
    );
}

async fn hold(proxy: SocketAddr, target: SocketAddr, count: usize) -> Result<(), Error> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        held.push(tunnel(proxy, target).await?);
    }
    println!("ready");
    let mut line = String::new();
    let _ = tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await;
    drop(held);
    Ok(())
}

async fn source(port_file: &str) -> Result<(), Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    std::fs::write(port_file, listener.local_addr()?.port().to_string())?;
    loop {
        let (mut socket, _) = listener.accept().await?;
        tokio::spawn(async move {
            let zeros = vec![0u8; 256 * 1024];
            while socket.write_all(&zeros).await.is_ok() {}
        });
    }
}

async fn connect_tunnel(proxy: &str, target: &str, seconds: u64) -> Result<(), Error> {
    let mut stream = TcpStream::connect(proxy).await?;
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    // Read the response head up to the blank line; any bytes after it are tunnel data.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err("proxy closed during CONNECT".into());
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
        return Err(format!("CONNECT refused: {}", String::from_utf8_lossy(&head)).into());
    }
    let mut buf = vec![0u8; 256 * 1024];
    let started = Instant::now();
    let mut total = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{{\"bytes\": {total}, \"gbps\": {:.3}}}",
        total as f64 * 8.0 / elapsed / 1e9
    );
    Ok(())
}
