//! End-to-end tests of the mapping service over real sockets.

mod common;

use common::servers::*;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn fifty_megabytes_from_python_http_server_to_curl_arrive_intact() {
    let site = tempfile::tempdir().unwrap();
    let body = pseudo_random(50 * 1024 * 1024, 7);
    std::fs::write(site.path().join("big.bin"), &body).unwrap();
    let expected = sha256_hex(&body);
    let server = PythonHttpServer::start(site.path());
    let gateway = RunningGateway::start(&mapping_config("127.0.0.1:0", server.addr, ""));
    let out = gateway.dir.path().join("download.bin");
    let status = Command::new("curl")
        .args(["-sS", "--fail", "-o"])
        .arg(&out)
        .arg(format!("http://{}/big.bin", gateway.addr("web")))
        .status()
        .expect("curl is needed for this test");
    assert!(status.success(), "curl failed: {status}");
    assert_eq!(sha256_file(&out), expected, "downloaded bytes differ");
    let audits = gateway.wait_for_audits(1, WAIT);
    let record = &audits[0];
    assert_eq!(record["service"], "web");
    assert_eq!(record["result"], "ok");
    assert_eq!(record["target"], server.addr.to_string());
    assert!(record["bytes_down"].as_u64().unwrap() > body.len() as u64);
    assert!(record["bytes_up"].as_u64().unwrap() > 0);
    assert!(record["client"].as_str().unwrap().starts_with("127.0.0.1:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_all_intact() {
    let echo = echo_server().await;
    let gateway = RunningGateway::start(&mapping_config("127.0.0.1:0", echo, ""));
    let addr = gateway.addr("web");
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        tasks.push(tokio::spawn(async move {
            let data = pseudo_random(128 * 1024 + i as usize * 97, i + 1);
            let back = round_trip(addr, &data).await;
            assert_eq!(
                sha256_hex(&back),
                sha256_hex(&data),
                "connection {i} corrupted"
            );
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let audits = gateway.wait_for_audits(200, WAIT);
    assert!(audits.iter().all(|a| a["result"] == "ok"), "{audits:?}");
    let up: u64 = audits.iter().map(|a| a["bytes_up"].as_u64().unwrap()).sum();
    let down: u64 = audits
        .iter()
        .map(|a| a["bytes_down"].as_u64().unwrap())
        .sum();
    let expected: u64 = (0..200u64).map(|i| 128 * 1024 + i * 97).sum();
    assert_eq!((up, down), (expected, expected));
}

#[tokio::test]
async fn half_close_is_passed_on_and_reply_still_arrives() {
    // The server answers only after it sees EOF from the client.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut received = Vec::new();
        socket.read_to_end(&mut received).await.unwrap();
        let reply = format!(
            "got {} bytes, sha256 {}",
            received.len(),
            sha256_hex(&received)
        );
        socket.write_all(reply.as_bytes()).await.unwrap();
    });
    let gateway = RunningGateway::start(&mapping_config("127.0.0.1:0", server_addr, ""));
    let mut client = TcpStream::connect(gateway.addr("web")).await.unwrap();
    let data = pseudo_random(300_000, 3);
    client.write_all(&data).await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(WAIT, client.read_to_string(&mut reply))
        .await
        .expect("reply after half-close")
        .unwrap();
    assert_eq!(
        reply,
        format!("got 300000 bytes, sha256 {}", sha256_hex(&data))
    );
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["result"], "ok");
    assert_eq!(audits[0]["bytes_up"], 300_000);
    assert_eq!(
        audits[0]["bytes_down"].as_u64().unwrap(),
        reply.len() as u64
    );
}

/// Connects and expects the gateway to close the connection without data.
async fn expect_closed(addr: SocketAddr) {
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, client.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected a closed connection, got {read:?}"
    );
}

#[tokio::test]
async fn deny_rule_closes_connection_and_audits_denied() {
    let echo = echo_server().await;
    let gateway = RunningGateway::start(&mapping_config(
        "127.0.0.1:0",
        echo,
        "allow = [\"any\"]\ndeny = [\"127.0.0.0/8\"]",
    ));
    expect_closed(gateway.addr("web")).await;
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["result"], "denied");
    assert!(audits[0]["reason"]
        .as_str()
        .unwrap()
        .contains("deny rule 127.0.0.0/8"));
    assert_eq!(audits[0]["bytes_up"], 0);
}

#[tokio::test]
async fn client_outside_allow_list_is_refused_and_audited() {
    let echo = echo_server().await;
    let gateway = RunningGateway::start(&mapping_config(
        "127.0.0.1:0",
        echo,
        "allow = [\"10.0.0.0/8\"]",
    ));
    expect_closed(gateway.addr("web")).await;
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["result"], "denied");
    assert!(audits[0]["reason"]
        .as_str()
        .unwrap()
        .contains("not in the service's allow list"));
}

#[tokio::test]
async fn default_allow_admits_ipv6_loopback_on_ipv6_listener() {
    let echo = echo_server().await;
    let gateway = RunningGateway::start(&mapping_config("[::1]:0", echo, ""));
    let addr = gateway.addr("web");
    assert!(addr.is_ipv6());
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"over ipv6").await.unwrap();
    client.shutdown().await.unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"over ipv6");
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["result"], "ok");
    assert!(audits[0]["client"].as_str().unwrap().starts_with("[::1]:"));
}

#[tokio::test]
async fn idle_timeout_closes_a_silent_connection() {
    let echo = echo_server().await;
    let gateway = RunningGateway::start(&mapping_config(
        "127.0.0.1:0",
        echo,
        "idle_timeout = \"300ms\"",
    ));
    let mut client = TcpStream::connect(gateway.addr("web")).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
        .await
        .expect("idle connection closed")
        .ok();
    assert!(started.elapsed() >= Duration::from_millis(250));
    let audits = gateway.wait_for_audits(1, WAIT);
    assert!(
        audits[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("idle timeout"),
        "{:?}",
        audits[0]
    );
    assert_eq!(audits[0]["bytes_up"], 4);
    assert_eq!(audits[0]["bytes_down"], 4);
}

#[tokio::test]
async fn unreachable_target_is_audited_as_error() {
    let gateway = RunningGateway::start(&mapping_config("127.0.0.1:0", closed_port(), ""));
    expect_closed(gateway.addr("web")).await;
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["result"], "error");
    assert!(audits[0]["reason"]
        .as_str()
        .unwrap()
        .starts_with("cannot connect to 127.0.0.1:"));
}

#[tokio::test]
async fn max_connections_refuses_the_extra_client() {
    let echo = echo_server().await;
    let gateway =
        RunningGateway::start(&mapping_config("127.0.0.1:0", echo, "max_connections = 1"));
    let addr = gateway.addr("web");
    let mut first = TcpStream::connect(addr).await.unwrap();
    first.write_all(b"a").await.unwrap();
    let mut one = [0u8; 1];
    first.read_exact(&mut one).await.unwrap();
    expect_closed(addr).await;
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["result"], "denied");
    assert_eq!(audits[0]["reason"], "max_connections (1) reached");
    // The first connection is unaffected.
    first.write_all(b"b").await.unwrap();
    first.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"b");
}

#[tokio::test]
async fn sigterm_stops_accepting_drains_live_connections_and_exits_zero() {
    let echo = echo_server().await;
    let mut gateway = RunningGateway::start(&mapping_config("127.0.0.1:0", echo, ""));
    let addr = gateway.addr("web");
    let mut live = TcpStream::connect(addr).await.unwrap();
    live.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    live.read_exact(&mut buf).await.unwrap();

    gateway.signal("TERM");
    gateway.wait_for_line(|l| l.contains("waiting for live connections"), WAIT);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "new connections must be refused while draining"
    );
    live.write_all(b"during").await.unwrap();
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during");
    live.shutdown().await.unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).await.unwrap();

    let status = gateway.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0));
    let audits = gateway.audits();
    assert_eq!(audits.len(), 1);
    assert_eq!(audits[0]["result"], "ok");
    assert_eq!(audits[0]["bytes_up"], 12);
}

#[tokio::test]
async fn grace_period_over_closes_connections_with_an_audit_record() {
    let echo = echo_server().await;
    let config = mapping_config("127.0.0.1:0", echo, "")
        .replace("shutdown_grace = \"10s\"", "shutdown_grace = \"200ms\"");
    let mut gateway = RunningGateway::start(&config);
    let mut live = TcpStream::connect(gateway.addr("web")).await.unwrap();
    live.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    live.read_exact(&mut one).await.unwrap();
    gateway.signal("INT");
    assert_eq!(gateway.wait_exit(WAIT).code(), Some(0));
    let audits = gateway.audits();
    assert_eq!(audits.len(), 1);
    assert_eq!(audits[0]["result"], "error");
    assert!(audits[0]["reason"]
        .as_str()
        .unwrap()
        .contains("grace period over"));
}

#[test]
fn text_log_audit_record_is_one_line_of_key_value_pairs() {
    let echo_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo = echo_listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = echo_listener.accept().unwrap();
        let mut r = s.try_clone().unwrap();
        std::io::copy(&mut r, &mut s).unwrap();
    });
    let config = format!(
        "[[service]]\nname = \"web\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{echo}\"\n"
    );
    let gateway = RunningGateway::start(&config);
    let line = gateway.wait_for_line(|l| l.contains("listening"), WAIT);
    let addr: SocketAddr = line
        .split("listen=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    {
        use std::io::{Read, Write};
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.write_all(b"hello").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"hello");
    }
    let audit = gateway.wait_for_line(|l| l.contains(" audit "), WAIT);
    for field in [
        "service=\"web\"",
        "client=\"127.0.0.1:",
        "user=\"\"",
        &format!("target=\"{echo}\""),
        "via=\"\"",
        "bytes_up=5",
        "bytes_down=5",
        "duration_ms=",
        "result=\"ok\"",
        "reason=\"closed\"",
    ] {
        assert!(audit.contains(field), "{field} missing in {audit}");
    }
}
