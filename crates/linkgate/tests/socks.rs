//! The SOCKS service with real clients: curl, PySocks, tokio-socks, and
//! hand-written bad input.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::servers::*;
use common::*;
use proto::socks::{
    encode_udp_header, parse_udp_header, Address, Command as SocksCommand, Reply, Request,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const WAIT: Duration = Duration::from_secs(20);

fn socks_config(extra_services: &str) -> String {
    let hash = linkgate::passwd::hash_password("wonderland").unwrap();
    format!(
        "[gateway]\nlog = \"json\"\n\n[[user]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n\n\
         [[service]]\nname = \"socks\"\ntype = \"socks\"\nlisten = [\"127.0.0.1:0\", \"[::1]:0\"]\nhandshake_timeout = \"500ms\"\n\n\
         [[service]]\nname = \"locked\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\nauth = \"password\"\n\n{extra_services}"
    )
}

fn curl(args: &[&str]) -> (bool, Vec<u8>, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn curl_through_socks4_4a_5_and_5_hostname_gets_identical_bytes() {
    let site = tempfile::tempdir().unwrap();
    let body = pseudo_random(3 * 1024 * 1024, 4);
    std::fs::write(site.path().join("f.bin"), &body).unwrap();
    let server = PythonHttpServer::start(site.path());
    let gateway = RunningGateway::start(&socks_config(""));
    let proxy = gateway.addr("socks").to_string();
    let url_ip = format!("http://{}/f.bin", server.addr);
    let url_name = format!("http://localhost:{}/f.bin", server.addr.port());
    for (flag, url) in [
        ("--socks4", &url_ip),
        ("--socks4a", &url_name),
        ("--socks5", &url_ip),
        ("--socks5-hostname", &url_name),
    ] {
        let (ok, got, err) = curl(&[flag, &proxy, url]);
        assert!(ok, "{flag}: {err}");
        assert_eq!(sha256_hex(&got), sha256_hex(&body), "{flag}");
    }
    let audits = gateway.wait_for_audits(4, WAIT);
    assert!(audits
        .iter()
        .all(|a| a["result"] == "ok" && a["service"] == "socks"));
    assert_eq!(
        audits[1]["target"],
        format!("localhost:{}", server.addr.port())
    );
    assert!(audits
        .iter()
        .all(|a| a["bytes_down"].as_u64().unwrap() > body.len() as u64));
}

/// proxychains (any program, here curl without proxy options, made to use
/// the SOCKS service by LD_PRELOAD) and OpenBSD netcat's `-X 5` (what ssh's
/// `ProxyCommand nc -X 5 -x proxy %h %p` runs): identical bytes, audited.
#[test]
fn proxychains_and_netcat_as_ssh_uses_it_go_through() {
    let site = tempfile::tempdir().unwrap();
    let body = pseudo_random(2 * 1024 * 1024 + 3, 6);
    std::fs::write(site.path().join("f.bin"), &body).unwrap();
    let server = PythonHttpServer::start(site.path());
    let gateway = RunningGateway::start(&socks_config(""));
    let proxy = gateway.addr("socks");
    let conf = site.path().join("proxychains.conf");
    std::fs::write(
        &conf,
        format!(
            "strict_chain\nquiet_mode\n[ProxyList]\nsocks5 {} {}\n",
            proxy.ip(),
            proxy.port()
        ),
    )
    .unwrap();
    let got = site.path().join("got.bin");
    let status = Command::new("proxychains4")
        .arg("-f")
        .arg(&conf)
        .args(["curl", "-sS", "--max-time", "10", "-o"])
        .arg(&got)
        .arg(format!("http://{}/f.bin", server.addr))
        .status()
        .expect("proxychains4 is needed for this test (Debian package proxychains4)");
    assert!(status.success());
    assert_eq!(sha256_file(&got), sha256_hex(&body));
    let request = format!("GET /f.bin HTTP/1.0\r\nHost: {}\r\n\r\n", server.addr);
    let mut nc = Command::new("nc")
        .args(["-X", "5", "-x", &proxy.to_string(), "-N", "-w", "10"])
        .args([server.addr.ip().to_string(), server.addr.port().to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("OpenBSD netcat is needed for this test (Debian package netcat-openbsd)");
    use std::io::Write;
    nc.stdin
        .take()
        .unwrap()
        .write_all(request.as_bytes())
        .unwrap();
    let out = nc.wait_with_output().unwrap();
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer through nc");
    assert_eq!(sha256_hex(&out.stdout[split + 4..]), sha256_hex(&body));
    let audits = gateway.wait_for_audits(2, WAIT);
    assert!(
        audits.iter().all(|a| a["result"] == "ok"
            && a["target"] == server.addr.to_string()
            && a["bytes_down"].as_u64().unwrap() > body.len() as u64),
        "{audits:?}"
    );
}

#[test]
fn curl_proxy_user_logs_in_and_a_wrong_password_is_rejected() {
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("hello.txt"), "hello").unwrap();
    let server = PythonHttpServer::start(site.path());
    let gateway = RunningGateway::start(&socks_config(""));
    let proxy = gateway.addr("locked").to_string();
    let url = format!("http://{}/hello.txt", server.addr);
    let (ok, got, err) = curl(&["--socks5", &proxy, "--proxy-user", "alice:wonderland", &url]);
    assert!(ok, "{err}");
    assert_eq!(got, b"hello");
    let (ok, _, err) = curl(&[
        "--socks5",
        &proxy,
        "--proxy-user",
        "alice:looking-glass",
        &url,
    ]);
    assert!(!ok);
    assert!(
        err.contains("User was rejected by the SOCKS5 server"),
        "{err}"
    );
    let (ok, _, _) = curl(&["--socks5", &proxy, &url]);
    assert!(!ok, "no credentials, no entry");
    let (ok, _, _) = curl(&["--socks4", &proxy, &url]);
    assert!(!ok, "SOCKS4 cannot log in");
    let audits = gateway.wait_for_audits(4, WAIT);
    assert_eq!(audits[0]["user"], "alice");
    assert_eq!(audits[0]["result"], "ok");
    assert_eq!(audits[1]["result"], "auth_failed");
    assert_eq!(audits[1]["reason"], "wrong password for user \"alice\"");
    assert_eq!(audits[2]["result"], "auth_failed");
    assert_eq!(audits[3]["result"], "auth_failed");
    assert!(audits[3]["reason"]
        .as_str()
        .unwrap()
        .contains("SOCKS4 cannot carry a password"));
}

#[test]
fn ipv6_listener_and_ipv6_destination() {
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("six.txt"), "over six").unwrap();
    let server = PythonHttpServer::start(site.path());
    let gateway = RunningGateway::start(&socks_config(""));
    let v6 = gateway
        .addrs("socks")
        .into_iter()
        .find(SocketAddr::is_ipv6)
        .unwrap();
    let (ok, got, err) = curl(&[
        "--socks5",
        &v6.to_string(),
        &format!("http://{}/six.txt", server.addr),
    ]);
    assert!(ok, "{err}");
    assert_eq!(got, b"over six");
    assert!(gateway.wait_for_audits(1, WAIT)[0]["client"]
        .as_str()
        .unwrap()
        .starts_with("[::1]:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_socks_client_connects_with_and_without_password() {
    let echo = echo_server().await;
    let gateway = RunningGateway::start(&socks_config(""));
    let mut plain = tokio_socks::tcp::Socks5Stream::connect(gateway.addr("socks"), echo)
        .await
        .unwrap();
    plain.write_all(b"plain").await.unwrap();
    let mut buf = [0u8; 5];
    plain.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"plain");
    let mut authed = tokio_socks::tcp::Socks5Stream::connect_with_password(
        gateway.addr("locked"),
        echo,
        "alice",
        "wonderland",
    )
    .await
    .unwrap();
    authed.write_all(b"authd").await.unwrap();
    authed.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"authd");
    let wrong = tokio_socks::tcp::Socks5Stream::connect_with_password(
        gateway.addr("locked"),
        echo,
        "alice",
        "x",
    )
    .await;
    assert!(wrong.is_err());
    let mut v4 = tokio_socks::tcp::socks4::Socks4Stream::connect(gateway.addr("socks"), echo)
        .await
        .unwrap();
    v4.write_all(b"four!").await.unwrap();
    v4.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"four!");
}

/// SOCKS5 handshake by hand up to the first reply.
async fn socks5_request(
    proxy: SocketAddr,
    command: SocksCommand,
    destination: Address,
) -> (TcpStream, Reply) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 0]);
    stream
        .write_all(
            &Request {
                command,
                destination,
            }
            .encode()
            .unwrap(),
        )
        .await
        .unwrap();
    let reply = read_reply(&mut stream).await;
    (stream, reply)
}

async fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut buf = Vec::new();
    loop {
        if let Some((reply, _)) = Reply::parse(&buf).unwrap() {
            return reply;
        }
        let mut byte = [0u8; 1];
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "connection closed before a reply"
        );
        buf.push(byte[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_round_trip() {
    let gateway = RunningGateway::start(&socks_config(""));
    let expected_peer = Address::Ip("127.0.0.1:0".parse().unwrap());
    let (mut control, first) =
        socks5_request(gateway.addr("socks"), SocksCommand::Bind, expected_peer).await;
    assert_eq!(first.code, 0);
    let Address::Ip(bound) = first.bound else {
        panic!("bound address")
    };
    // The "remote server" connects back to the BIND port.
    let mut remote = TcpStream::connect(bound).await.unwrap();
    let second = read_reply(&mut control).await;
    assert_eq!(second.code, 0);
    assert_eq!(second.bound, Address::Ip(remote.local_addr().unwrap()));
    remote.write_all(b"from remote").await.unwrap();
    let mut buf = [0u8; 11];
    control.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"from remote");
    control.write_all(b"from client").await.unwrap();
    remote.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"from client");
    drop(control);
    drop(remote);
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["result"], "ok");
    assert_eq!(audits[0]["bytes_up"], 11);
    assert_eq!(audits[0]["bytes_down"], 11);
}

async fn udp_echo_server() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_associate_relays_and_drops_strangers_and_ends_with_the_control_connection() {
    let echo = udp_echo_server().await;
    let gateway = RunningGateway::start(&socks_config(""));
    let (control, reply) = socks5_request(
        gateway.addr("socks"),
        SocksCommand::UdpAssociate,
        Address::Ip("0.0.0.0:0".parse().unwrap()),
    )
    .await;
    assert_eq!(reply.code, 0);
    let Address::Ip(relay) = reply.bound else {
        panic!()
    };
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..5u8 {
        let mut datagram = Vec::new();
        encode_udp_header(&Address::Ip(echo), &mut datagram).unwrap();
        datagram.extend_from_slice(&[i; 100]);
        client.send_to(&datagram, relay).await.unwrap();
        let mut buf = vec![0u8; 2048];
        let (n, _) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let (header, offset) = parse_udp_header(&buf[..n]).unwrap();
        assert_eq!(header.address, Address::Ip(echo));
        assert_eq!(&buf[offset..n], &[i; 100]);
    }
    // A stranger's datagram to the relay port is dropped.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut datagram = Vec::new();
    encode_udp_header(&Address::Ip(echo), &mut datagram).unwrap();
    datagram.extend_from_slice(b"stranger");
    stranger.send_to(&datagram, relay).await.unwrap();
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stranger.recv_from(&mut buf))
            .await
            .is_err()
    );
    drop(control);
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["reason"], "control connection closed");
    assert_eq!(audits[0]["bytes_up"], 500);
    assert_eq!(audits[0]["bytes_down"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pysocks_udp_associate_against_a_udp_echo_server() {
    let echo = udp_echo_server().await;
    let gateway = RunningGateway::start(&socks_config(""));
    let proxy = gateway.addr("socks");
    let script = format!(
        "import socks, socket\n\
         s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.set_proxy(socks.SOCKS5, '{}', {})\n\
         s.settimeout(10)\n\
         s.sendto(b'ping over socks udp', ('{}', {}))\n\
         data, addr = s.recvfrom(2048)\n\
         print(data.decode(), addr[1])\n",
        proxy.ip(),
        proxy.port(),
        echo.ip(),
        echo.port()
    );
    let out = tokio::task::spawn_blocking(move || python(&script))
        .await
        .unwrap();
    assert_eq!(out.trim(), format!("ping over socks udp {}", echo.port()));
}

/// Sends raw bytes and returns what the gateway answered before closing.
async fn answer_to(proxy: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("the gateway closes");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_reply_or_a_clean_close() {
    let gateway = RunningGateway::start(&socks_config(""));
    let proxy = gateway.addr("socks");
    // Not SOCKS at all.
    assert_eq!(answer_to(proxy, b"GET / HTTP/1.1\r\n\r\n").await, b"");
    // Unknown command: "command not supported".
    let answer = answer_to(proxy, &[5, 1, 0, 5, 9, 0, 1, 127, 0, 0, 1, 0, 80]).await;
    assert_eq!(&answer[..4], &[5, 0, 5, 7]);
    // Unknown address type: "address type not supported".
    let answer = answer_to(proxy, &[5, 1, 0, 5, 1, 0, 9, 1, 2, 3]).await;
    assert_eq!(&answer[..4], &[5, 0, 5, 8]);
    // SOCKS4a domain longer than 255 bytes.
    let mut long = vec![4, 1, 0, 80, 0, 0, 0, 1, 0];
    long.extend(std::iter::repeat_n(b'a', 400));
    assert_eq!(answer_to(proxy, &long).await, b"");
    // Truncated request, then the client gives up.
    assert_eq!(answer_to(proxy, &[5, 1]).await, b"");
    let audits = gateway.wait_for_audits(5, WAIT);
    let reasons: Vec<&str> = audits
        .iter()
        .map(|a| a["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"not SOCKS (version byte 0x47)"),
        "{reasons:?}"
    );
    assert!(reasons.contains(&"unsupported SOCKS command 0x09"));
    assert!(reasons.contains(&"unsupported SOCKS address type 0x09"));
    assert!(reasons.contains(&"SOCKS message too long"));
    assert!(audits.iter().all(|a| a["result"] == "error"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_closed_after_the_handshake_timeout() {
    let gateway = RunningGateway::start(&socks_config(""));
    let mut stream = TcpStream::connect(gateway.addr("socks")).await.unwrap();
    stream.write_all(&[5, 1]).await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("closed");
    assert!(started.elapsed() >= Duration::from_millis(400));
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["reason"], "handshake not finished within 500ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_refusals_and_unreachable_targets_get_their_reply_codes() {
    let echo = echo_server().await;
    let closed = closed_port();
    let extra = "[[service]]\nname = \"fenced\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\n\
                 destinations = [\"127.0.0.1:1-1000\", \"*.corp.example\"]\n";
    let gateway = RunningGateway::start(&socks_config(extra));
    let (_, reply) = socks5_request(
        gateway.addr("fenced"),
        SocksCommand::Connect,
        Address::Ip(echo),
    )
    .await;
    assert_eq!(reply.code, 2, "not allowed by ruleset");
    let (_, reply) = socks5_request(
        gateway.addr("socks"),
        SocksCommand::Connect,
        Address::Ip(closed),
    )
    .await;
    assert_eq!(reply.code, 5, "connection refused");
    let (_, reply) = socks5_request(
        gateway.addr("socks"),
        SocksCommand::Connect,
        Address::Domain("no-such-host.invalid".into(), 80),
    )
    .await;
    assert_eq!(reply.code, 4, "host unreachable");
    let audits = gateway.wait_for_audits(3, WAIT);
    assert_eq!(audits[0]["result"], "denied");
    assert_eq!(
        audits[0]["reason"],
        format!("destination {echo} is not in the service's destinations")
    );
    assert!(audits[1]["reason"]
        .as_str()
        .unwrap()
        .contains("Connection refused"));
    assert!(audits[2]["reason"]
        .as_str()
        .unwrap()
        .starts_with("cannot resolve no-such-host.invalid"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_after_the_request_reaches_the_target() {
    let (sink, received) = sink_server().await;
    let gateway = RunningGateway::start(&socks_config(""));
    let mut stream = TcpStream::connect(gateway.addr("socks")).await.unwrap();
    let mut bytes = vec![5, 1, 0];
    bytes.extend(
        Request {
            command: SocksCommand::Connect,
            destination: Address::Ip(sink),
        }
        .encode()
        .unwrap(),
    );
    bytes.extend_from_slice(b"pipelined");
    stream.write_all(&bytes).await.unwrap();
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.unwrap();
    let _ = read_reply(&mut stream).await;
    stream.write_all(b"+more").await.unwrap();
    drop(stream);
    gateway.wait_for_audits(1, WAIT);
    assert_eq!(&received.lock().unwrap()[..], b"pipelined+more");
}
