//! End-to-end tests of the telnet gateway: Python's telnetlib (a real
//! client that answers option requests) through the gateway to a server
//! that negotiates, and refusals, bad input and stalls with raw sockets.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(20);
const PROMPT: &[u8] = b"(host[ port] or host:port)? ";
/// IAC DO TERMINAL-TYPE and the refusal a client sends back.
const DO_TTYPE: &[u8] = b"\xff\xfd\x18";
const WONT_TTYPE: &[u8] = b"\xff\xfc\x18";

fn telnet_config(extra: &str) -> String {
    format!(
        "[gateway]\nlog = \"json\"\n\n[[service]]\nname = \"tn\"\ntype = \"telnet\"\n\
         listen = \"127.0.0.1:0\"\n{extra}\n"
    )
}

/// A login-style server: asks for terminal type, prompts, greets the name it
/// is given (then hangs up if `hang_up`); records every byte it receives.
async fn negotiating_server(hang_up: bool) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        socket.write_all(DO_TTYPE).await.unwrap();
        socket.write_all(b"login: ").await.unwrap();
        let mut buf = [0u8; 1024];
        loop {
            let n = socket.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            let received = {
                let mut seen = record.lock().unwrap();
                seen.extend_from_slice(&buf[..n]);
                seen.clone()
            };
            if let Some(end) = received.windows(2).position(|w| w == b"\r\n") {
                let start = received
                    .iter()
                    .rposition(|&b| b == 0x18)
                    .map_or(0, |i| i + 1);
                let name = String::from_utf8_lossy(&received[start..end]).to_string();
                let hello = format!("hello {name}\r\n");
                socket.write_all(hello.as_bytes()).await.unwrap();
                if hang_up {
                    return;
                }
            }
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telnetlib_reaches_a_negotiating_server_through_the_gateway() {
    let (server, seen) = negotiating_server(false).await;
    let gateway = RunningGateway::start(&telnet_config(""));
    let script = format!(
        r#"
import telnetlib, warnings
warnings.simplefilter("ignore")
t = telnetlib.Telnet("127.0.0.1", {port}, timeout=10)
t.read_until(b"or host:port)? ", 10)
t.write(b"127.0.0.1 {server_port}\n")
t.read_until(b"login: ", 10)
t.write(b"alice\r\n")
print(t.read_until(b"hello alice", 10).decode())
"#,
        port = gateway.addr("tn").port(),
        server_port = server.port(),
    );
    let out = tokio::task::spawn_blocking(move || python(&script))
        .await
        .unwrap();
    assert!(out.contains("hello alice"), "{out}");
    // telnetlib refused the server's DO TERMINAL-TYPE itself: the gateway
    // relayed the request and the answer unchanged, and added nothing.
    let received = seen.lock().unwrap().clone();
    assert_eq!(received, [WONT_TTYPE, b"alice\r\n"].concat());
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["service"], "tn");
    assert_eq!(audits[0]["result"], "ok");
    assert_eq!(audits[0]["target"], server.to_string());
    assert_eq!(audits[0]["bytes_up"], (WONT_TTYPE.len() + 7) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_telnet_command_reaches_a_negotiating_server_through_the_gateway() {
    let (server, seen) = negotiating_server(true).await;
    let gateway = RunningGateway::start(&telnet_config(""));
    let mut telnet = tokio::process::Command::new("telnet")
        .arg("127.0.0.1")
        .arg(gateway.addr("tn").port().to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the telnet command is needed for this test (Debian package telnet)");
    let mut stdin = telnet.stdin.take().unwrap();
    // telnet sends a typed line end as CR LF.
    let destination = format!("127.0.0.1 {}\n", server.port());
    stdin.write_all(destination.as_bytes()).await.unwrap();
    // Once the server has the client's answer to its DO TERMINAL-TYPE, the
    // relay is up: type the login name.
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.lock().unwrap().len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server heard nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stdin.write_all(b"alice\n").await.unwrap();
    let mut shown = Vec::new();
    let mut stdout = telnet.stdout.take().unwrap();
    tokio::time::timeout(WAIT, stdout.read_to_end(&mut shown))
        .await
        .expect("telnet did not end when the server hung up")
        .unwrap();
    let _ = telnet.wait().await;
    let shown = String::from_utf8_lossy(&shown);
    assert!(
        shown.contains("destination (host[ port] or host:port)?"),
        "{shown}"
    );
    assert!(shown.contains("login: hello alice"), "{shown}");
    // The client's own answer (WILL or WONT TERMINAL-TYPE) went through
    // unchanged, then the name.
    let received = seen.lock().unwrap().clone();
    assert!(
        received.starts_with(b"\xff\xfb\x18") || received.starts_with(WONT_TTYPE),
        "{received:?}"
    );
    assert_eq!(&received[3..], b"alice\r\n");
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["result"], "ok");
    drop(stdin);
}

/// Reads until `needle` has arrived; returns everything read.
async fn read_until(stream: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !contains(&got, needle) {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("no answer from the gateway")
            .unwrap();
        assert!(
            n > 0,
            "closed early; got {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_refusals_each_get_a_reason_then_the_connection_closes() {
    let closed = closed_port();
    let gateway = RunningGateway::start(&telnet_config("destinations = [\"127.0.0.1\"]"));
    let mut client = TcpStream::connect(gateway.addr("tn")).await.unwrap();
    // A client that negotiates before answering gets refusals back.
    read_until(&mut client, PROMPT).await;
    client
        .write_all(b"\xff\xfb\x18127.0.0.2 23\r\n")
        .await
        .unwrap();
    let got = read_until(&mut client, PROMPT).await;
    assert!(
        got.starts_with(b"\xff\xfe\x18"),
        "no DONT for the WILL: {got:?}"
    );
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("127.0.0.2:23 is not in the service's destinations"),
        "{text}"
    );
    client.write_all(b"no_such host!\r\n").await.unwrap();
    let text = String::from_utf8_lossy(&read_until(&mut client, PROMPT).await).to_string();
    assert!(text.contains("cannot read"), "{text}");
    client
        .write_all(format!("127.0.0.1:{}\r\n", closed.port()).as_bytes())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&read_until(&mut client, b"closing").await).to_string();
    assert!(
        text.contains(&format!("cannot connect to 127.0.0.1:{}", closed.port())),
        "{text}"
    );
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
        .await
        .unwrap();
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["result"], "error");
    let reason = audits[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("cannot connect") && reason.ends_with("(3 tries)"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_destination_is_audited_as_denied() {
    let gateway = RunningGateway::start(&telnet_config("destinations = [\"*.corp.example\"]"));
    let mut client = TcpStream::connect(gateway.addr("tn")).await.unwrap();
    read_until(&mut client, PROMPT).await;
    client.write_all(b"127.0.0.1 22\r\n").await.unwrap();
    read_until(&mut client, PROMPT).await;
    drop(client);
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["result"], "denied");
    assert_eq!(audits[0]["target"], "127.0.0.1:22");
    let reason = audits[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("not in the service's destinations"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_lines_and_stalled_prompts_are_cut_off() {
    let gateway = RunningGateway::start(&telnet_config("handshake_timeout = \"1s\""));
    let mut flood = TcpStream::connect(gateway.addr("tn")).await.unwrap();
    read_until(&mut flood, PROMPT).await;
    let _ = flood.write_all(&[b'x'; 4096]).await;
    read_until(&mut flood, b"line too long").await;
    let mut stalled = TcpStream::connect(gateway.addr("tn")).await.unwrap();
    read_until(&mut stalled, PROMPT).await;
    let text = String::from_utf8_lossy(&read_until(&mut stalled, b"within 1s").await).to_string();
    assert!(text.contains("no destination given"), "{text}");
    let audits = gateway.wait_for_audits(2, WAIT);
    let reasons: Vec<&str> = audits
        .iter()
        .map(|a| a["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"destination line too long"),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"no destination given within 1s"),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_typed_ahead_of_the_connection_reach_the_destination() {
    let (sink, seen) = servers::sink_server().await;
    let gateway = RunningGateway::start(&telnet_config(""));
    let mut client = TcpStream::connect(gateway.addr("tn")).await.unwrap();
    read_until(&mut client, PROMPT).await;
    let data = pseudo_random(300_000, 3);
    let mut sent = format!("127.0.0.1 {}\r\n", sink.port()).into_bytes();
    sent.extend_from_slice(&data);
    client.write_all(&sent).await.unwrap();
    client.shutdown().await.unwrap();
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["result"], "ok");
    assert_eq!(sha256_hex(&seen.lock().unwrap()), sha256_hex(&data));
}

/// Over a link too, the last refusal line reaches the client and the
/// connection then ends cleanly (a stream dropped unfinished is reset, and
/// the reset used to overtake the line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_link_the_last_refusal_arrives_before_a_clean_close() {
    let hub_services = "[[service]]\nname = \"tn\"\ntype = \"telnet\"\nlisten = \"link\"\n\
         allow = \"peer:spoke\"\ndestinations = [\"127.0.0.1\"]\n";
    let spoke_services = "[[service]]\nname = \"tn\"\ntype = \"mapping\"\n\
         listen = \"127.0.0.1:0\"\ntarget = \"link://hub/tn\"\n";
    let (_hub, spoke) = common::pair::start_pair(hub_services, spoke_services, None);
    let mut client = TcpStream::connect(spoke.addr("tn")).await.unwrap();
    for _ in 0..3 {
        read_until(&mut client, PROMPT).await;
        client.write_all(b"10.9.9.9 23\r\n").await.unwrap();
    }
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
        .await
        .expect("the connection stays open");
    let text = String::from_utf8_lossy(&rest).to_string();
    assert!(
        ended.is_ok(),
        "reset instead of a clean close: {ended:?} after {text:?}"
    );
    assert!(text.contains("too many tries; closing"), "{text}");
}
