//! Failures travel as failures: a connection whose far side breaks (a
//! target that resets, a cut or frozen link, a killed hub, the end of the
//! shutdown grace) reaches the client as a TCP reset, never as a clean end
//! that would pass a cut-off download for a complete one. And a silent
//! link is noticed within three keepalive intervals.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::pair::*;
use common::relay::{RelayPlan, TestRelay};
use common::servers::echo_server;
use common::*;

/// A server that sends `total` bytes to each client, 64 KiB every 5 ms
/// (so that a test can break things mid-transfer), then closes cleanly;
/// with `reset_at`, it resets the connection after that many bytes instead.
fn slow_sender(total: usize, reset_at: Option<usize>) -> SocketAddr {
    common::servers::thread_server(move |mut client| {
        let chunk = vec![0x5a; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            if reset_at.is_some_and(|at| sent >= at) {
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                return;
            }
            if client.write_all(&chunk).is_err() {
                return;
            }
            sent += chunk.len();
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

/// Reads from `client` until it ends; calls `trigger` once `after` bytes
/// arrived. Returns the bytes read and how the connection ended.
fn download(
    mut client: TcpStream,
    after: usize,
    trigger: impl FnOnce(),
) -> (usize, std::io::Result<()>) {
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut trigger = Some(trigger);
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match client.read(&mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got += n,
            Err(e) => return (got, Err(e)),
        }
        if got >= after {
            if let Some(trigger) = trigger.take() {
                trigger();
            }
        }
    }
}

fn assert_reset(outcome: (usize, std::io::Result<()>), total: usize, what: &str) {
    let (got, end) = outcome;
    assert!(
        got < total,
        "{what}: the whole transfer arrived ({got} bytes)"
    );
    match end {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(()) => panic!("{what}: a clean end after {got} of {total} bytes: silent truncation"),
        Err(e) => panic!("{what}: expected a reset, got {e}"),
    }
}

/// SOCKS5 CONNECT to `target` without login; returns the tunnel.
fn socks5_connect(proxy: SocketAddr, target: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply, [5, 0]);
    let SocketAddr::V4(v4) = target else {
        panic!("IPv4 target")
    };
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&request).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[1], 0, "SOCKS5 CONNECT refused");
    s
}

#[test]
fn a_target_that_resets_reaches_mapping_and_socks_clients_as_a_reset() {
    const TOTAL: usize = 8 * 1024 * 1024;
    let target = slow_sender(TOTAL, Some(512 * 1024));
    // The reference: straight to the target, the client sees a reset.
    assert_reset(
        download(TcpStream::connect(target).unwrap(), usize::MAX, || {}),
        TOTAL,
        "direct",
    );
    let config = mapping_config(
        "127.0.0.1:0",
        target,
        "\n[[service]]\nname = \"socks\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\n",
    );
    let gateway = RunningGateway::start(&config);
    let mapped = TcpStream::connect(gateway.addr("web")).unwrap();
    assert_reset(download(mapped, usize::MAX, || {}), TOTAL, "mapping");
    let socks = socks5_connect(gateway.addr("socks"), target);
    assert_reset(download(socks, usize::MAX, || {}), TOTAL, "socks");
    let audits = gateway.wait_for_audits(2, WAIT);
    assert!(audits.iter().all(|a| a["result"] == "error"), "{audits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_resets_the_client_mid_download() {
    const TOTAL: usize = 64 * 1024 * 1024;
    let target = slow_sender(TOTAL, None);
    let hub = RunningGateway::start(&hub_config(&hub_service(target)));
    let relay = TestRelay::start(link_addr(&hub), RelayPlan::default()).await;
    let spoke = RunningGateway::start(&spoke_config(relay.addr, PASSWORD, "spoke", SPOKE_SERVICE));
    wait_link_up(&spoke, 1);
    let client = TcpStream::connect(spoke.addr("web")).unwrap();
    let outcome =
        tokio::task::spawn_blocking(move || download(client, 1024 * 1024, move || relay.cut()))
            .await
            .unwrap();
    assert_reset(outcome, TOTAL, "cut link");
    let audit = &spoke.wait_for_audits(1, WAIT)[0];
    assert_eq!(audit["result"], "error");
}

#[test]
fn a_killed_hub_resets_the_client_mid_download() {
    const TOTAL: usize = 64 * 1024 * 1024;
    let target = slow_sender(TOTAL, None);
    let (hub, spoke) = start_pair(&hub_service(target), SPOKE_SERVICE, None);
    let client = TcpStream::connect(spoke.addr("web")).unwrap();
    let outcome = download(client, 1024 * 1024, || hub.signal("KILL"));
    assert_reset(outcome, TOTAL, "hub killed");
}

#[test]
fn the_end_of_the_shutdown_grace_resets_live_downloads() {
    const TOTAL: usize = 64 * 1024 * 1024;
    let target = slow_sender(TOTAL, None);
    let config = mapping_config("127.0.0.1:0", target, "")
        .replace("shutdown_grace = \"10s\"", "shutdown_grace = \"500ms\"");
    let gateway = RunningGateway::start(&config);
    let client = TcpStream::connect(gateway.addr("web")).unwrap();
    let outcome = download(client, 1024 * 1024, || gateway.signal("TERM"));
    assert_reset(outcome, TOTAL, "shutdown grace over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_hub_is_noticed_within_three_keepalives_and_relinked_when_it_wakes() {
    let echo = echo_server().await;
    let with_keepalive =
        |config: String| config.replace("[[peer]]\n", "[[peer]]\nkeepalive = \"300ms\"\n");
    let hub = RunningGateway::start(&with_keepalive(hub_config(&hub_service(echo))));
    let spoke = RunningGateway::start(&with_keepalive(spoke_config(
        link_addr(&hub),
        PASSWORD,
        "spoke",
        SPOKE_SERVICE,
    )));
    wait_link_up(&spoke, 1);
    let addr = spoke.addr("web");
    assert_eq!(servers::round_trip(addr, b"before").await, b"before");

    hub.signal("STOP");
    let frozen = Instant::now();
    let down = spoke.wait_for_line(|l| l.contains("\"link down\""), WAIT);
    let noticed = frozen.elapsed();
    assert!(down.contains("nothing received"), "{down}");
    // 3 x 300 ms, plus scheduling slack on a shared machine.
    assert!(
        noticed < Duration::from_secs(5),
        "noticed after {noticed:?}"
    );
    eprintln!("frozen hub noticed after {noticed:?}");

    // While it is down, a new connection fails at once.
    let started = Instant::now();
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::io::AsyncReadExt::read(&mut client, &mut buf)
        .await
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(1));

    hub.signal("CONT");
    let woke = Instant::now();
    wait_link_up(&spoke, 2);
    let relinked = woke.elapsed();
    eprintln!("relinked {relinked:?} after the hub woke");
    assert!(
        relinked < Duration::from_secs(15),
        "relinked after {relinked:?}"
    );
    assert_eq!(servers::round_trip(addr, b"after").await, b"after");
}

/// An origin that answers any request with a 200 whose body is cut by a
/// reset after 1 MiB: chunked, or delimited by the connection's end.
fn resetting_origin(chunked: bool) -> SocketAddr {
    common::servers::thread_server(move |mut client| {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if client.read(&mut byte).unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let framing = if chunked {
            "Transfer-Encoding: chunked"
        } else {
            "Connection: close"
        };
        let _ = write!(client, "HTTP/1.1 200 OK\r\n{framing}\r\n\r\n");
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..16 {
            let ok = if chunked {
                write!(client, "{:x}\r\n", chunk.len()).is_ok()
                    && client.write_all(&chunk).is_ok()
                    && client.write_all(b"\r\n").is_ok()
            } else {
                client.write_all(&chunk).is_ok()
            };
            if !ok {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
    })
}

#[test]
fn an_upstream_reset_aborts_the_http_response_instead_of_ending_it() {
    let config = "[gateway]\nlog = \"json\"\n\n[[service]]\nname = \"web-proxy\"\ntype = \"http\"\nlisten = \"127.0.0.1:0\"\n";
    let gateway = RunningGateway::start(config);
    let proxy = gateway.addr("web-proxy").to_string();
    for (chunked, http10) in [(true, false), (false, false), (false, true), (true, true)] {
        let origin = resetting_origin(chunked);
        let mut args = vec!["-sS", "-o", "/dev/null", "-x", &proxy];
        if http10 {
            args.push("-0");
        }
        let url = format!("http://{origin}/big");
        args.push(&url);
        let out = std::process::Command::new("curl")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "curl (chunked upstream: {chunked}, HTTP/1.0 client: {http10}) took a cut-off body for a whole one"
        );
    }
    let audits = gateway.wait_for_audits(4, WAIT);
    assert!(audits.iter().all(|a| a["result"] == "error"), "{audits:?}");
}

#[test]
fn a_target_that_resets_reaches_a_telnet_client_as_a_reset() {
    const TOTAL: usize = 8 * 1024 * 1024;
    let target = slow_sender(TOTAL, Some(512 * 1024));
    let config = "[gateway]\nlog = \"json\"\n\n[[service]]\nname = \"consoles\"\ntype = \"telnet\"\nlisten = \"127.0.0.1:0\"\ndestinations = [\"127.0.0.1\"]\n";
    let gateway = RunningGateway::start(config);
    let mut client = TcpStream::connect(gateway.addr("consoles")).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut prompt = [0u8; 256];
    let n = client.read(&mut prompt).unwrap();
    assert!(String::from_utf8_lossy(&prompt[..n]).contains("destination"));
    write!(client, "{}\r\n", target).unwrap();
    assert_reset(download(client, usize::MAX, || {}), TOTAL, "telnet");
    let audit = &gateway.wait_for_audits(1, WAIT)[0];
    assert_eq!(audit["result"], "error");
}

#[test]
fn a_second_stop_signal_during_the_drain_closes_everything_at_once() {
    const TOTAL: usize = 64 * 1024 * 1024;
    let target = slow_sender(TOTAL, None);
    // A long grace: without the second signal the gateway would wait 60 s.
    let config = mapping_config("127.0.0.1:0", target, "")
        .replace("shutdown_grace = \"10s\"", "shutdown_grace = \"60s\"");
    let mut gateway = RunningGateway::start(&config);
    let client = TcpStream::connect(gateway.addr("web")).unwrap();
    let stopped = std::sync::Mutex::new(None);
    let outcome = download(client, 1024 * 1024, || {
        gateway.signal("TERM");
        gateway.wait_for_line(|l| l.contains("waiting for live connections"), WAIT);
        gateway.signal("TERM");
        *stopped.lock().unwrap() = Some(Instant::now());
    });
    assert_reset(outcome, TOTAL, "second signal");
    let status = gateway.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let took = stopped.lock().unwrap().unwrap().elapsed();
    assert!(
        took < Duration::from_secs(10),
        "exited {took:?} after the second signal"
    );
    assert!(gateway.count_lines(|l| l.contains("second stop signal")) == 1);
}
