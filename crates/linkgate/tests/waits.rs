//! Every wait has an end, and every refusal says why: a hung HTTP
//! upstream, an FTP login that stalls after the server was reached, the
//! admin port under half-sent requests, and clients beyond
//! `max_connections`, each answered in their own protocol.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// A server that greets with `greeting` (if any), then reads and never answers.
fn mute_server(greeting: Option<&'static str>) -> SocketAddr {
    common::servers::thread_server(move |mut client| {
        if let Some(greeting) = greeting {
            let _ = client.write_all(greeting.as_bytes());
        }
        let mut sink = [0u8; 1024];
        while client.read(&mut sink).unwrap_or(0) > 0 {}
    })
}

#[test]
fn a_hung_upstream_gets_a_504_after_the_response_timeout() {
    let origin = mute_server(None);
    let config = "[gateway]\nlog = \"json\"\n\n[[service]]\nname = \"web-proxy\"\ntype = \"http\"\nlisten = \"127.0.0.1:0\"\nresponse_timeout = \"500ms\"\n";
    let gateway = RunningGateway::start(config);
    let started = Instant::now();
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-x"])
        .arg(gateway.addr("web-proxy").to_string())
        .arg(format!("http://{origin}/slow"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "504");
    assert!(started.elapsed() < Duration::from_secs(10));
    let audit = &gateway.wait_for_audits(1, WAIT)[0];
    assert_eq!(audit["result"], "error");
    assert_eq!(audit["reason"], "upstream sent no response within 500ms");
}

#[test]
fn an_ftp_login_that_stalls_after_the_server_was_reached_is_ended() {
    let server = mute_server(Some("220 mute server\r\n"));
    let config = "[gateway]\nlog = \"json\"\n\n[[service]]\nname = \"ftp\"\ntype = \"ftp\"\nlisten = \"127.0.0.1:0\"\nhandshake_timeout = \"1s\"\n";
    let gateway = RunningGateway::start(config);
    let client = TcpStream::connect(gateway.addr("ftp")).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut lines = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert!(line.starts_with("220"), "{line}");
    let started = Instant::now();
    (&client)
        .write_all(format!("USER anonymous@{server}\r\n").as_bytes())
        .unwrap();
    // The server greets the gateway but never answers USER.
    let mut got = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        got.push_str(&line);
    }
    assert!(got.contains("421 Login not finished in time"), "{got:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let audit = &gateway.wait_for_audits(1, WAIT)[0];
    assert_eq!(audit["reason"], "login not finished within 1s");
}

#[test]
fn half_sent_admin_requests_cannot_use_up_the_gateway() {
    let config = "[gateway]\nlog = \"json\"\nadmin = \"127.0.0.1:0\"\n";
    let gateway = RunningGateway::start(config);
    let admin: SocketAddr = gateway
        .records()
        .iter()
        .find(|r| r["message"] == "admin listening")
        .and_then(|r| r["listen"].as_str()?.parse().ok())
        .expect("admin listens");
    let mut held = Vec::new();
    for _ in 0..64 {
        let mut s = TcpStream::connect(admin).unwrap();
        s.write_all(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        held.push(s);
    }
    // The 65th is closed at once, with a log line saying why.
    let mut extra = TcpStream::connect(admin).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(extra.read(&mut [0u8; 16]).unwrap_or(0), 0);
    gateway.wait_for_line(|l| l.contains("admin connection refused"), WAIT);
    // The half-sent ones are cut off by the header timeout.
    let started = Instant::now();
    let mut first = held.remove(0);
    first
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = first.read_to_end(&mut answer);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let mut fresh = TcpStream::connect(admin).unwrap();
    fresh
        .write_all(b"GET /api/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    fresh.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn clients_beyond_max_connections_are_told_why_in_their_protocol() {
    let config = "[gateway]\nlog = \"json\"\n\n\
        [[service]]\nname = \"socks\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\nmax_connections = 1\n\n\
        [[service]]\nname = \"web-proxy\"\ntype = \"http\"\nlisten = \"127.0.0.1:0\"\nmax_connections = 1\n\n\
        [[service]]\nname = \"ftp\"\ntype = \"ftp\"\nlisten = \"127.0.0.1:0\"\nmax_connections = 1\n";
    let gateway = RunningGateway::start(config);
    // One client holds each service's only slot.
    let _socks_holder = TcpStream::connect(gateway.addr("socks")).unwrap();
    let _http_holder = TcpStream::connect(gateway.addr("web-proxy")).unwrap();
    let _ftp_holder = TcpStream::connect(gateway.addr("ftp")).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // SOCKS5: the request fails with "general failure" (1).
    let mut socks = TcpStream::connect(gateway.addr("socks")).unwrap();
    socks
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    socks.write_all(&[5, 1, 0]).unwrap();
    let mut reply = [0u8; 2];
    socks.read_exact(&mut reply).unwrap();
    assert_eq!(reply, [5, 0]);
    socks.write_all(&[5, 1, 0, 1, 127, 0, 0, 1, 0, 80]).unwrap();
    let mut reply = [0u8; 10];
    socks.read_exact(&mut reply).unwrap();
    assert_eq!(reply[1], 1, "general SOCKS server failure");

    // HTTP: 503 with the reason.
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-x"])
        .arg(gateway.addr("web-proxy").to_string())
        .arg("http://127.0.0.1:9/")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("503"), "{text}");
    assert!(text.contains("max_connections (1) reached"), "{text}");

    // FTP: 421 instead of the greeting.
    let mut ftp = TcpStream::connect(gateway.addr("ftp")).unwrap();
    ftp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = String::new();
    ftp.read_to_string(&mut greeting).unwrap();
    assert!(
        greeting.starts_with("421 Too many connections"),
        "{greeting}"
    );

    let audits = gateway.wait_for_audits(3, WAIT);
    assert!(audits
        .iter()
        .all(|a| a["result"] == "denied" && a["reason"] == "max_connections (1) reached"));
}

/// `max_connections_per_client`: the third connection from one source
/// address is refused (told why, audited denied), while another source
/// address is still served.
#[test]
fn one_client_cannot_take_more_than_its_share_of_a_service() {
    use std::io::{Read, Write};
    let echo = common::servers::thread_server(|mut client| {
        let mut buf = [0u8; 1024];
        while let Ok(n) = client.read(&mut buf) {
            if n == 0 || client.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
    let gateway = RunningGateway::start(&format!(
        "[gateway]\nlog = \"json\"\n\n[[service]]\nname = \"m\"\ntype = \"mapping\"\n\
         listen = \"127.0.0.1:0\"\ntarget = \"{echo}\"\nmax_connections_per_client = 2\n\
         allow = [\"127.0.0.0/8\"]\n"
    ));
    let addr = gateway.addr("m");
    let from = |source: [u8; 4]| {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&std::net::SocketAddr::from((source, 0)).into())
            .unwrap();
        socket.connect(&addr.into()).unwrap();
        let mut stream: std::net::TcpStream = socket.into();
        stream.write_all(b"ping").unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        stream
    };
    let echoed = |stream: &mut std::net::TcpStream| {
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).is_ok() && &back == b"ping"
    };
    let mut first = from([127, 0, 0, 1]);
    let mut second = from([127, 0, 0, 1]);
    assert!(echoed(&mut first) && echoed(&mut second));
    let mut third = from([127, 0, 0, 1]);
    let mut answer = Vec::new();
    let _ = third.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"ping"), "the third was served");
    let mut other = from([127, 0, 0, 2]);
    assert!(echoed(&mut other), "another source address is served");
    let audits = gateway.wait_for_audits(1, std::time::Duration::from_secs(20));
    assert_eq!(audits[0]["result"], "denied");
    assert_eq!(
        audits[0]["reason"],
        "max_connections_per_client (2) reached for 127.0.0.1"
    );
    drop((first, second));
}
