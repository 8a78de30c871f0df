//! Links that get out of an office: dialed through the office's proxy
//! (squid with Basic auth, microsocks as SOCKS5), carried in WebSocket
//! (the hub's ws:// listener behind nginx terminating TLS, the hub's own
//! wss:// listener). Each time: bytes hashed end to end through a mapping
//! over the link on parallel streams, and a capture of what crossed the
//! wire between the spoke and the next box shows neither the payload nor
//! the link password.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::pair::{hub_service, wait_link_up, PASSWORD, SPOKE_SERVICE, WAIT};
use common::proxies::{microsocks, nginx_tls_to_ws, squid, test_certs, TestCerts};
use common::relay::{contains, RelayPlan, TestRelay};
use common::servers::{echo_server, round_trip};
use common::*;

const PATH: &str = "/linkgate";

/// A hub that accepts links on raw TCP, ws:// and wss:// at once and
/// exports `web` (→ `target`) to the spoke.
fn start_hub(certs: &TestCerts, target: SocketAddr) -> RunningGateway {
    RunningGateway::start(&format!(
        "[gateway]\nname = \"hub\"\nlog = \"json\"\nshutdown_grace = \"1s\"\n\n\
         [link]\nlisten = [\"127.0.0.1:0\", \"ws://127.0.0.1:0{PATH}\", \"wss://127.0.0.1:0{PATH}\"]\n\
         tls_cert = \"{}\"\ntls_key = \"{}\"\n\n\
         [[peer]]\nname = \"spoke\"\npassword = \"{PASSWORD}\"\n\n{}",
        certs.cert.display(),
        certs.key.display(),
        hub_service(target)
    ))
}

/// The address the hub listens on for links carried by `transport`.
fn hub_listener(hub: &RunningGateway, transport: &str) -> SocketAddr {
    hub.records()
        .iter()
        .find(|r| r["message"] == "listening for links" && r["transport"] == transport)
        .and_then(|r| r["listen"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("hub listens for {transport} links"))
}

/// A spoke dialing `connect` (a comma-separated list: failover in order)
/// with the extra `[[peer]]` lines `peer_extra`, mapping `web` to the
/// hub's `web`; with an admin endpoint.
fn start_spoke(connect: &str, peer_extra: &str) -> RunningGateway {
    let connect: Vec<String> = connect.split(',').map(|a| format!("\"{a}\"")).collect();
    RunningGateway::start(&format!(
        "[gateway]\nname = \"spoke\"\nlog = \"json\"\nshutdown_grace = \"1s\"\nadmin = \"127.0.0.1:0\"\n\n\
         [[peer]]\nname = \"hub\"\nconnect = [{}]\nuser = \"spoke\"\npassword = \"{PASSWORD}\"\n{peer_extra}\n\n\
         {SPOKE_SERVICE}",
        connect.join(", ")
    ))
}

/// 6 parallel streams of 512 KiB each through the spoke's `web` mapping,
/// echoed back intact (hashes compared). Returns one stream's payload.
async fn parallel_echoes(spoke: &RunningGateway) -> Vec<u8> {
    let web = spoke.addr("web");
    let mut tasks = Vec::new();
    for seed in 0..6u64 {
        tasks.push(tokio::spawn(async move {
            let data = pseudo_random(512 * 1024, 1000 + seed);
            let back = tokio::time::timeout(WAIT, round_trip(web, &data))
                .await
                .expect("echo through the link in time");
            assert_eq!(sha256_hex(&back), sha256_hex(&data), "stream {seed}");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    pseudo_random(512 * 1024, 1000)
}

/// Neither the payload nor the link password is visible in `capture`.
fn assert_opaque(capture: &[u8], payload: &[u8]) {
    assert!(capture.len() > 512 * 1024, "the capture saw the transfer");
    assert!(
        !contains(capture, PASSWORD.as_bytes()),
        "link password on the wire"
    );
    for at in [0, 4096, 300_000] {
        assert!(
            !contains(capture, &payload[at..at + 32]),
            "payload bytes at {at} on the wire"
        );
    }
}

/// The spoke's admin status for its link to the hub.
fn link_status(spoke: &RunningGateway) -> serde_json::Value {
    let admin = spoke
        .records()
        .iter()
        .find(|r| r["message"] == "admin listening")
        .and_then(|r| r["listen"].as_str().map(str::to_string))
        .expect("admin address");
    let mut socket = std::net::TcpStream::connect(admin).unwrap();
    use std::io::{Read, Write};
    socket
        .write_all(b"GET /api/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).unwrap();
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let status: serde_json::Value = serde_json::from_str(body).expect("status JSON");
    status["links"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hubs_own_wss_listener_carries_a_link_and_its_certificate_is_checked() {
    let certs = test_certs();
    let echo = echo_server().await;
    let hub = start_hub(&certs, echo);
    let wss = hub_listener(&hub, "wss");
    let capture = TestRelay::start(wss, RelayPlan::default()).await;
    let spoke = start_spoke(
        &format!("wss://127.0.0.1:{}{PATH}", capture.addr.port()),
        &format!("ca_file = \"{}\"", certs.ca.display()),
    );
    wait_link_up(&spoke, 1);
    let payload = parallel_echoes(&spoke).await;
    assert_opaque(&capture.recorded(), &payload);
    let status = link_status(&spoke);
    assert_eq!(status["state"], "up");
    assert_eq!(status["transport"], "wss");
    assert!(
        hub.lines()
            .iter()
            .any(|l| l.contains("\"link up\"") && l.contains("\"transport\":\"wss\"")),
        "the hub logs the transport"
    );

    // Without the test CA the certificate is not trusted: the link stays
    // down and the log says why...
    let untrusting = start_spoke(&format!("wss://127.0.0.1:{}{PATH}", wss.port()), "");
    let why = untrusting.wait_for_line(
        |l| l.contains("cannot reach the other gateway") && l.contains("TLS handshake failed"),
        WAIT,
    );
    assert!(
        why.contains("UnknownIssuer") || why.contains("certificate"),
        "{why}"
    );
    // ...unless the operator turns the check off (the link's own
    // handshake still authenticates the hub).
    let unchecked = start_spoke(
        &format!("wss://127.0.0.1:{}{PATH}", wss.port()),
        "tls_verify = false",
    );
    wait_link_up(&unchecked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_terminating_tls_in_front_of_the_hubs_ws_listener() {
    let certs = test_certs();
    let echo = echo_server().await;
    let hub = start_hub(&certs, echo);
    let nginx = nginx_tls_to_ws(&certs, PATH, hub_listener(&hub, "ws"));
    let capture = TestRelay::start(nginx.addr, RelayPlan::default()).await;
    let spoke = start_spoke(
        &format!("wss://localhost:{}{PATH}", capture.addr.port()),
        &format!("ca_file = \"{}\"", certs.ca.display()),
    );
    wait_link_up(&spoke, 1);
    let payload = parallel_echoes(&spoke).await;
    assert_opaque(&capture.recorded(), &payload);
    assert_eq!(link_status(&spoke)["transport"], "wss");
    // A wrong path is not upgraded by the hub (nginx passes the 404 on).
    let lost = start_spoke(
        &format!("wss://localhost:{}/elsewhere", nginx.addr.port()),
        &format!("ca_file = \"{}\"", certs.ca.display()),
    );
    lost.wait_for_line(|l| l.contains("WebSocket upgrade failed"), WAIT);
    drop(nginx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoke_behind_squid_with_basic_auth_links_over_raw_tcp_and_over_wss() {
    let certs = test_certs();
    let echo = echo_server().await;
    let hub = start_hub(&certs, echo);
    let squid = squid("office", "proxy-secret");
    let capture = TestRelay::start(squid.addr, RelayPlan::default()).await;
    let via = format!("via = \"http://office:proxy-secret@{}\"", capture.addr);

    let spoke = start_spoke(&hub_listener(&hub, "tcp").to_string(), &via);
    wait_link_up(&spoke, 1);
    let payload = parallel_echoes(&spoke).await;
    assert_opaque(&capture.recorded(), &payload);
    let status = link_status(&spoke);
    assert_eq!(status["transport"], "tcp");
    assert_eq!(
        status["via"],
        format!("http://office:****@{}", capture.addr)
    );
    drop(spoke);

    // What a browser does behind a corporate proxy: CONNECT to the hub's
    // TLS port, then TLS, then WebSocket.
    let spoke = start_spoke(
        &format!("wss://127.0.0.1:{}{PATH}", hub_listener(&hub, "wss").port()),
        &format!("{via}\nca_file = \"{}\"", certs.ca.display()),
    );
    wait_link_up(&spoke, 1);
    parallel_echoes(&spoke).await;
    assert_eq!(link_status(&spoke)["transport"], "wss");
    drop(spoke);

    // A wrong proxy password: the proxy's own answer is in the log, and
    // the dialer keeps retrying with its backoff.
    let refused = start_spoke(
        &hub_listener(&hub, "tcp").to_string(),
        &format!("via = \"http://office:wrong@{}\"", squid.addr),
    );
    let line = refused.wait_for_line(|l| l.contains("cannot reach the other gateway"), WAIT);
    assert!(
        line.contains(&format!(
            "proxy {} refused: 407 Proxy Authentication Required",
            squid.addr
        )),
        "{line}"
    );
    refused.wait_for_line(
        |l| l.contains("cannot reach the other gateway") && l != line,
        Duration::from_secs(10),
    );
    assert!(
        !refused.lines().iter().any(|l| l.contains("wrong@")),
        "proxy password logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoke_through_a_socks5_proxy_that_is_not_linkgate() {
    let certs = test_certs();
    let echo = echo_server().await;
    let hub = start_hub(&certs, echo);
    let socks = microsocks("office", "socks-secret");
    let capture = TestRelay::start(socks.addr, RelayPlan::default()).await;
    let spoke = start_spoke(
        &format!("ws://127.0.0.1:{}{PATH}", hub_listener(&hub, "ws").port()),
        &format!("via = \"socks5://office:socks-secret@{}\"", capture.addr),
    );
    wait_link_up(&spoke, 1);
    let payload = parallel_echoes(&spoke).await;
    assert_opaque(&capture.recorded(), &payload);
    let status = link_status(&spoke);
    assert_eq!(status["transport"], "ws");
    assert_eq!(
        status["via"],
        format!("socks5://office:****@{}", capture.addr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_list_may_mix_transports_and_fails_over_in_order() {
    let certs = test_certs();
    let echo = echo_server().await;
    let hub = start_hub(&certs, echo);
    // First a raw address where nothing listens, then the hub's wss://.
    let spoke = start_spoke(
        &format!(
            "{},wss://127.0.0.1:{}{PATH}",
            closed_port(),
            hub_listener(&hub, "wss").port()
        ),
        &format!("ca_file = \"{}\"", certs.ca.display()),
    );
    wait_link_up(&spoke, 1);
    parallel_echoes(&spoke).await;
    assert_eq!(link_status(&spoke)["transport"], "wss");
}
