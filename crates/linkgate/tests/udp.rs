//! `type = "udp"` services with real clients and servers: dig asking a
//! dnsmasq with a zone of its own, hundreds of datagrams of random sizes
//! echoed intact on two flows that never cross, a refused source audited
//! once, a flow's audit record after its idle timeout, and a target that
//! is not listening.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// A free UDP port on loopback, for servers that cannot bind port 0 and say
/// which port they got (dnsmasq).
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// dnsmasq answering for `office.test` only, on a loopback port; killed
/// (by its PID) when dropped.
struct Dnsmasq {
    child: Child,
    port: u16,
}

impl Dnsmasq {
    /// Starts dnsmasq on a free port. It binds TCP as well as UDP there, and
    /// a port free a moment ago may be taken meanwhile (tests run in
    /// parallel): a dnsmasq that exits at once is started again elsewhere.
    fn start() -> Dnsmasq {
        for _ in 0..5 {
            if let Some(server) = Self::try_start(free_udp_and_tcp_port()) {
                return server;
            }
        }
        panic!("dnsmasq did not start on any of five ports");
    }

    fn try_start(port: u16) -> Option<Dnsmasq> {
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--pid-file",
                "--address=/printer.office.test/10.1.2.3",
                "--address=/files.office.test/10.1.2.4",
            ])
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq is needed for this test (Debian: dnsmasq-base)");
        let mut server = Dnsmasq { child, port };
        // Ready once it answers.
        let deadline = Instant::now() + WAIT;
        while dig(port, "printer.office.test") != "10.1.2.3" {
            if server.child.try_wait().ok().flatten().is_some() {
                return None; // could not bind: its port was taken
            }
            assert!(Instant::now() < deadline, "dnsmasq did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(server)
    }
}

/// A port free for both UDP and TCP on 127.0.0.1 just now.
fn free_udp_and_tcp_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dig +short NAME` against 127.0.0.1:`port`.
fn dig(port: u16, name: &str) -> String {
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            "+short",
            "+tries=1",
            "+time=2",
            name,
        ])
        .output()
        .expect("dig is needed for this test (Debian: dnsutils)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A gateway's config: JSON logs, a short grace period, and `services`.
fn gateway_config(services: &str) -> String {
    format!("[gateway]\nlog = \"json\"\nshutdown_grace = \"1s\"\n\n{services}")
}

fn udp_service(target: SocketAddr, extra: &str) -> String {
    format!(
        "[gateway]\nlog = \"json\"\nshutdown_grace = \"1s\"\n\n[[service]]\nname = \"dns\"\ntype = \"udp\"\n\
         listen = \"127.0.0.1:0\"\ntarget = \"{target}\"\n{extra}"
    )
}

#[test]
fn dig_asks_dnsmasq_through_a_udp_service_and_the_flow_is_audited_after_its_idle_timeout() {
    let dns = Dnsmasq::start();
    let target: SocketAddr = format!("127.0.0.1:{}", dns.port).parse().unwrap();
    let gateway = RunningGateway::start(&udp_service(target, "idle_timeout = \"1s\"\n"));
    let port = gateway.addr("dns").port();
    assert_eq!(dig(port, "printer.office.test"), "10.1.2.3");
    assert_eq!(dig(port, "files.office.test"), "10.1.2.4");
    // Two dig runs are two client ports: two flows, each audited once it
    // has been quiet for a second.
    let audits = gateway.wait_for_audits(2, WAIT);
    for audit in &audits {
        assert_eq!(audit["service"], "dns");
        assert_eq!(audit["result"], "ok", "{audit}");
        assert_eq!(audit["reason"], "idle timeout (1s)");
        assert_eq!(audit["target"], target.to_string());
        assert_eq!(audit["datagrams_up"], 1, "{audit}");
        assert_eq!(audit["datagrams_down"], 1, "{audit}");
        assert!(audit["bytes_up"].as_u64().unwrap() > 20, "{audit}");
        assert!(audit["bytes_down"].as_u64().unwrap() > audit["bytes_up"].as_u64().unwrap());
    }
}

/// A UDP echo server on loopback (a thread); returns its address.
fn echo_server() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    addr
}

/// Sends `count` datagrams of pseudo-random sizes (1 byte to 8 KB) tagged
/// with `tag`, one at a time, and checks each comes back whole; returns
/// the hash of all bytes sent and of all bytes received.
fn exchange(socket: &UdpSocket, tag: u8, count: usize) -> (String, String) {
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (mut sent, mut received) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; 65536];
    for i in 0..count {
        let len = 1 + (i * 7919 + tag as usize * 104_729) % 8192;
        let mut datagram = pseudo_random(len, (tag as u64) << 32 | i as u64);
        datagram[0] = tag;
        socket.send(&datagram).unwrap();
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(buf[0], tag, "a datagram of another flow arrived");
        sent.extend_from_slice(&datagram);
        received.extend_from_slice(&buf[..n]);
    }
    (sha256_hex(&sent), sha256_hex(&received))
}

#[test]
fn datagrams_of_random_sizes_come_back_whole_and_two_flows_never_cross() {
    let echo = echo_server();
    let gateway = RunningGateway::start(&udp_service(echo, ""));
    let service = gateway.addr("dns");
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    a.connect(service).unwrap();
    b.connect(service).unwrap();
    let (ha, hb) = std::thread::scope(|s| {
        let ha = s.spawn(|| exchange(&a, 0xA1, 300));
        let hb = s.spawn(|| exchange(&b, 0xB2, 300));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!(ha.0, ha.1, "flow a: bytes differ");
    assert_eq!(hb.0, hb.1, "flow b: bytes differ");
    // The largest datagram UDP over IPv4 carries, whole.
    let big = pseudo_random(65_507, 7);
    a.send(&big).unwrap();
    let mut buf = vec![0u8; 70_000];
    let n = a.recv(&mut buf).unwrap();
    assert_eq!(sha256_hex(&buf[..n]), sha256_hex(&big));
}

#[test]
fn a_refused_source_is_audited_once_and_gets_nothing() {
    let echo = echo_server();
    let gateway = RunningGateway::start(&udp_service(echo, "allow = \"127.0.0.2\"\n"));
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(gateway.addr("dns")).unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for _ in 0..5 {
        client.send(b"let me in").unwrap();
    }
    let mut buf = [0u8; 64];
    assert!(
        client.recv(&mut buf).is_err(),
        "a refused client got an answer"
    );
    let audit = &gateway.wait_for_audits(1, WAIT)[0];
    assert_eq!(audit["result"], "denied");
    assert_eq!(audit["client"], client.local_addr().unwrap().to_string());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gateway.audits().len(), 1, "one record for the flood");
    // An allowed source is served.
    let allowed = UdpSocket::bind("127.0.0.2:0").unwrap();
    allowed.connect(gateway.addr("dns")).unwrap();
    allowed
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    allowed.send(b"hello").unwrap();
    let n = allowed.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
}

#[test]
fn a_target_that_is_not_listening_ends_the_flow_with_the_reason() {
    let closed: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let gateway = RunningGateway::start(&udp_service(closed, ""));
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(gateway.addr("dns")).unwrap();
    client.send(b"anyone?").unwrap();
    let audit = &gateway.wait_for_audits(1, WAIT)[0];
    assert_eq!(audit["result"], "error", "{audit}");
    assert_eq!(
        audit["reason"],
        "the target is not listening (ICMP port unreachable)"
    );
    assert_eq!(audit["datagrams_up"], 1);
}

/// A hub whose udp services `dns` (→ `dns_target`) and `echo` (→
/// `echo_target`) listen on links, and a spoke mapping them locally.
fn udp_pair(dns_target: SocketAddr, echo_target: SocketAddr) -> (RunningGateway, RunningGateway) {
    let hub_services = format!(
        "[[service]]\nname = \"dns\"\ntype = \"udp\"\nlisten = \"link\"\ntarget = \"{dns_target}\"\nallow = \"peer:spoke\"\nidle_timeout = \"1s\"\n\n\
         [[service]]\nname = \"echo\"\ntype = \"udp\"\nlisten = \"link\"\ntarget = \"{echo_target}\"\nallow = \"peer:spoke\"\n"
    );
    let spoke_services = "[[service]]\nname = \"dns\"\ntype = \"udp\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://hub/dns\"\nidle_timeout = \"1s\"\n\n\
         [[service]]\nname = \"echo\"\ntype = \"udp\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://hub/echo\"\n";
    common::pair::start_pair(&hub_services, spoke_services, None)
}

#[test]
fn dig_asks_the_main_offices_dnsmasq_across_the_link() {
    let dns = Dnsmasq::start();
    let target: SocketAddr = format!("127.0.0.1:{}", dns.port).parse().unwrap();
    let (hub, spoke) = udp_pair(target, echo_server());
    let port = spoke.addr("dns").port();
    assert_eq!(dig(port, "printer.office.test"), "10.1.2.3");
    // Both sides audit the flow once it went quiet: the spoke its client,
    // the hub the peer.
    let spoke_audit = &spoke.wait_for_audits(1, WAIT)[0];
    assert_eq!(spoke_audit["target"], "link://hub/dns");
    assert_eq!(spoke_audit["datagrams_up"], 1, "{spoke_audit}");
    assert_eq!(spoke_audit["datagrams_down"], 1, "{spoke_audit}");
    let hub_audit = &hub.wait_for_audits(1, WAIT)[0];
    assert_eq!(hub_audit["client"], "peer:spoke");
    assert_eq!(hub_audit["target"], target.to_string());
    assert_eq!(hub_audit["result"], "ok", "{hub_audit}");
    assert_eq!(hub_audit["datagrams_down"], 1, "{hub_audit}");
}

#[test]
fn datagrams_cross_the_link_whole_and_flows_stay_apart() {
    let (_hub, spoke) = udp_pair(echo_server(), echo_server());
    let service = spoke.addr("echo");
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    a.connect(service).unwrap();
    b.connect(service).unwrap();
    let (ha, hb) = std::thread::scope(|s| {
        let ha = s.spawn(|| exchange(&a, 0xC3, 300));
        let hb = s.spawn(|| exchange(&b, 0xD4, 300));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!(ha.0, ha.1, "flow a: bytes differ");
    assert_eq!(hb.0, hb.1, "flow b: bytes differ");
}

/// A burst that opens a flow across the link (a client's first datagrams
/// sent back to back, before any answer) arrives whole at the hub and is
/// one flow there: one audit record counting every datagram.
#[test]
fn a_burst_that_opens_a_flow_across_the_link_arrives_whole_as_one_flow() {
    // The hub's `dns` service (idle timeout 1 s) points at an echo server.
    let (hub, spoke) = udp_pair(echo_server(), echo_server());
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(spoke.addr("dns")).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    const BURST: usize = 48;
    let datagrams: Vec<Vec<u8>> = (0..BURST).map(|i| pseudo_random(200, i as u64)).collect();
    send_as_one_buffer(&client, &datagrams);
    let mut answers = Vec::new();
    let mut buf = vec![0u8; 65536];
    for _ in 0..BURST {
        match client.recv(&mut buf) {
            Ok(n) => answers.push(buf[..n].to_vec()),
            Err(e) => panic!("{} of {BURST} answers, then: {e}", answers.len()),
        }
    }
    answers.sort();
    let mut sent = datagrams.clone();
    sent.sort();
    assert_eq!(answers, sent, "the burst came back changed");
    let hub_audits = hub.wait_for_audits(1, WAIT);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(hub.audits().len(), 1, "one flow at the hub: {hub_audits:?}");
    assert_eq!(hub_audits[0]["datagrams_up"], BURST, "{}", hub_audits[0]);
    assert_eq!(hub_audits[0]["datagrams_down"], BURST, "{}", hub_audits[0]);
}

/// Sends equal-sized `datagrams` with one system call that the kernel cuts
/// into them (UDP GSO): they reach the gateway at the same instant.
fn send_as_one_buffer(socket: &UdpSocket, datagrams: &[Vec<u8>]) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrIn};
    use std::os::fd::AsRawFd;
    let bytes = datagrams.concat();
    let segment = datagrams[0].len() as u16;
    let iov = [std::io::IoSlice::new(&bytes)];
    let control = [ControlMessage::UdpGsoSegments(&segment)];
    sendmsg::<SockaddrIn>(socket.as_raw_fd(), &iov, &control, MsgFlags::empty(), None).unwrap();
}

/// A flow outlives a link that is cut and comes back: the hub answers over
/// the new session, the client keeps its socket.
#[test]
fn a_flow_across_the_link_survives_a_reconnect() {
    use common::pair::*;
    use common::relay::{RelayPlan, TestRelay};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let hub = RunningGateway::start(&hub_config(&format!(
        "[[service]]\nname = \"echo\"\ntype = \"udp\"\nlisten = \"link\"\ntarget = \"{}\"\nallow = \"peer:spoke\"\n",
        echo_server()
    )));
    let relay = runtime.block_on(TestRelay::start(link_addr(&hub), RelayPlan::default()));
    let spoke = RunningGateway::start(&spoke_config(
        relay.addr,
        PASSWORD,
        "spoke",
        "[[service]]\nname = \"echo\"\ntype = \"udp\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://hub/echo\"\n",
    ));
    wait_link_up(&spoke, 1);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(spoke.addr("echo")).unwrap();
    let (sent, back) = exchange(&client, 0x11, 20);
    assert_eq!(sent, back);
    relay.cut();
    wait_link_up(&spoke, 2);
    // The first datagrams after the cut may be lost on the dead session:
    // UDP's users retry, and so does this one.
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + WAIT;
    loop {
        client.send(b"still there?").unwrap();
        if let Ok(n) = client.recv(&mut buf) {
            assert_eq!(&buf[..n], b"still there?");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the flow did not survive the reconnect"
        );
    }
    let (sent, back) = exchange(&client, 0x12, 20);
    assert_eq!(sent, back);
}

/// A flood of datagrams and a bulk TCP download on the same link at once:
/// the download's bytes all arrive, and datagrams keep coming back.
#[test]
fn a_datagram_flood_and_a_bulk_download_share_one_link() {
    use common::servers::PythonHttpServer;
    let dir = tempfile::tempdir().unwrap();
    let bulk = pseudo_random(16 << 20, 5);
    std::fs::write(dir.path().join("bulk.bin"), &bulk).unwrap();
    let http = PythonHttpServer::start(dir.path());
    let hub_services = format!(
        "[[service]]\nname = \"web\"\ntype = \"mapping\"\nlisten = \"link\"\ntarget = \"{}\"\nallow = \"peer:spoke\"\n\n\
         [[service]]\nname = \"echo\"\ntype = \"udp\"\nlisten = \"link\"\ntarget = \"{}\"\nallow = \"peer:spoke\"\n",
        http.addr,
        echo_server()
    );
    let spoke_services = "[[service]]\nname = \"web\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://hub/web\"\n\n\
         [[service]]\nname = \"echo\"\ntype = \"udp\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://hub/echo\"\n";
    let (_hub, spoke) = common::pair::start_pair(&hub_services, spoke_services, None);
    let out = spoke.dir.path().join("bulk.bin");
    let mut download = Command::new("curl")
        .args(["-s", "-f", "--max-time", "60", "-o"])
        .arg(&out)
        .arg(format!("http://{}/bulk.bin", spoke.addr("web")))
        .spawn()
        .unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(spoke.addr("echo")).unwrap();
    client.set_nonblocking(true).unwrap();
    let (mut sent, mut back) = (0u32, 0u32);
    let mut buf = [0u8; 2048];
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if client.send(&[9u8; 1000]).is_ok() {
            sent += 1;
        }
        while client.recv(&mut buf).is_ok() {
            back += 1;
        }
        if sent % 64 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(download.wait().unwrap().success(), "the download failed");
    assert_eq!(
        sha256_file(&out),
        sha256_hex(&bulk),
        "the download starved or broke"
    );
    assert!(back > 200, "datagrams starved: {back} of {sent} came back");
}

/// SOCKS5 UDP ASSOCIATE through `via = "link://hub/out"` (PySocks as the
/// client): the datagrams leave from the main office's gateway, the answer
/// comes back with its sender's address, and both gateways audit it.
#[test]
fn socks_udp_associate_goes_through_a_link_via() {
    let echo = echo_server();
    let hub_services =
        "[[service]]\nname = \"out\"\ntype = \"socks\"\nlisten = \"link\"\nallow = \"peer:spoke\"\nidle_timeout = \"1s\"\n";
    let spoke_services =
        "[[service]]\nname = \"socks\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\nvia = \"link://hub/out\"\n";
    let (hub, spoke) = common::pair::start_pair(hub_services, spoke_services, None);
    let proxy = spoke.addr("socks");
    let script = format!(
        "import socks, socket\n\
         s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.set_proxy(socks.SOCKS5, '{}', {})\n\
         s.settimeout(10)\n\
         for i in range(20):\n\
         \x20   s.sendto(b'ping %d across the link' % i, ('{}', {}))\n\
         \x20   data, addr = s.recvfrom(2048)\n\
         \x20   assert data == b'ping %d across the link' % i, data\n\
         print(data.decode(), addr[1])\n",
        proxy.ip(),
        proxy.port(),
        echo.ip(),
        echo.port()
    );
    let out = python(&script);
    assert_eq!(
        out.trim(),
        format!("ping 19 across the link {}", echo.port())
    );
    let hub_audit = &hub.wait_for_audits(1, WAIT)[0];
    assert_eq!(hub_audit["service"], "out");
    assert_eq!(hub_audit["client"], "peer:spoke");
    assert_eq!(hub_audit["datagrams_up"], 20, "{hub_audit}");
    assert_eq!(hub_audit["datagrams_down"], 20, "{hub_audit}");
    assert_eq!(
        hub_audit["bytes_down"], hub_audit["bytes_up"],
        "{hub_audit}"
    );
}

/// SOCKS5 UDP ASSOCIATE for a client that reaches the main office's socks
/// service through the branch's mapping to `link://hub/socks` (PySocks as
/// the client): the branch gateway keeps the UDP relay next to the client,
/// 200 datagrams of 1 byte to 8 KB come back intact (hashed) from their
/// sender, and both gateways audit the association with its datagrams.
#[test]
fn socks_udp_associate_works_for_a_client_that_came_over_a_link() {
    let echo = echo_server();
    let hub_services = "[[service]]\nname = \"socks\"\ntype = \"socks\"\nlisten = \"link\"\nallow = \"peer:spoke\"\n";
    let spoke_services =
        "[[service]]\nname = \"socks\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://hub/socks\"\n";
    let (hub, spoke) = common::pair::start_pair(hub_services, spoke_services, None);
    assert_same_hashes(&python(&pysocks_echo_script(
        spoke.addr("socks"),
        echo,
        200,
    )));
    let hub_audit = &hub.wait_for_audits(1, WAIT)[0];
    assert_eq!(hub_audit["service"], "socks");
    assert_eq!(hub_audit["client"], "peer:spoke");
    assert_eq!(hub_audit["result"], "ok", "{hub_audit}");
    assert_eq!(hub_audit["datagrams_up"], 200, "{hub_audit}");
    assert_eq!(hub_audit["datagrams_down"], 200, "{hub_audit}");
    assert_eq!(
        hub_audit["bytes_up"], hub_audit["bytes_down"],
        "{hub_audit}"
    );
    let spoke_audits = spoke.wait_for_audits(2, WAIT);
    let relay = spoke_audits
        .iter()
        .find(|a| a["target"] == "UDP ASSOCIATE relay")
        .unwrap_or_else(|| panic!("no relay record: {spoke_audits:?}"));
    assert_eq!(relay["service"], "socks");
    assert_eq!(relay["via"], "link://hub");
    assert_eq!(relay["result"], "ok", "{relay}");
    assert_eq!(relay["datagrams_up"], 200, "{relay}");
    assert_eq!(relay["datagrams_down"], 200, "{relay}");
    assert!(
        relay["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{relay}"
    );
    // Both count the datagrams' payloads, without SOCKS headers.
    assert_eq!(relay["bytes_up"], hub_audit["bytes_up"], "{relay}");
    assert_eq!(relay["bytes_down"], hub_audit["bytes_down"], "{relay}");
}

/// The same for a socks service that wants a login: the association
/// belongs to the client's logged-in control connection, and the hub's
/// record names the user.
#[test]
fn socks_udp_associate_for_a_link_client_logs_in_first() {
    let echo = echo_server();
    let hub_services = "[[user]]\nname = \"alice\"\npassword = \"wonderland\"\n\n\
         [[service]]\nname = \"socks\"\ntype = \"socks\"\nlisten = \"link\"\nauth = \"password\"\nallow = \"peer:spoke\"\n";
    let spoke_services =
        "[[service]]\nname = \"socks\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://hub/socks\"\n";
    let (hub, _spoke) = common::pair::start_pair(hub_services, spoke_services, None);
    let proxy = _spoke.addr("socks");
    let script = format!(
        "import socks, socket\n\
         def ping(password):\n\
         \x20   s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20   s.set_proxy(socks.SOCKS5, '{}', {}, username='alice', password=password)\n\
         \x20   s.settimeout(10)\n\
         \x20   try:\n\
         \x20       s.sendto(b'logged in', ('{}', {}))\n\
         \x20       return s.recvfrom(2048)[0].decode()\n\
         \x20   except socks.ProxyError as e:\n\
         \x20       return 'refused'\n\
         \x20   finally:\n\
         \x20       s.close()\n\
         print(ping('wonderland'), ping('wrong'))\n",
        proxy.ip(),
        proxy.port(),
        echo.ip(),
        echo.port()
    );
    assert_eq!(python(&script).trim(), "logged in refused");
    let audits = hub.wait_for_audits(2, WAIT);
    let served = audits
        .iter()
        .find(|a| a["result"] == "ok")
        .unwrap_or_else(|| panic!("no association: {audits:?}"));
    assert_eq!(served["user"], "alice", "{served}");
    assert_eq!(served["datagrams_up"], 1, "{served}");
    assert_eq!(served["datagrams_down"], 1, "{served}");
    assert!(
        audits.iter().any(|a| a["result"] == "auth_failed"),
        "{audits:?}"
    );
}

/// A PySocks script that sends `count` datagrams of random sizes (1 byte
/// to 8 KB) through the SOCKS5 proxy at `proxy` to `echo`, checks each
/// answer names the echo's port, and prints the hashes of what it sent and
/// what came back.
fn pysocks_echo_script(proxy: SocketAddr, echo: SocketAddr, count: usize) -> String {
    format!(
        "import socks, socket, hashlib, random\n\
         random.seed(11)\n\
         s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.set_proxy(socks.SOCKS5, '{}', {})\n\
         s.settimeout(10)\n\
         sent, back = hashlib.sha256(), hashlib.sha256()\n\
         for i in range({count}):\n\
         \x20   data = random.randbytes(random.randint(1, 8000))\n\
         \x20   sent.update(data)\n\
         \x20   s.sendto(data, ('{}', {}))\n\
         \x20   answer, addr = s.recvfrom(65535)\n\
         \x20   back.update(answer)\n\
         \x20   assert addr[1] == {}, addr\n\
         s.close()\n\
         print(sent.hexdigest(), back.hexdigest())\n",
        proxy.ip(),
        proxy.port(),
        echo.ip(),
        echo.port(),
        echo.port()
    )
}

/// Asks the SOCKS5 proxy at `proxy` (no login) for UDP ASSOCIATE by hand;
/// the control connection and the 10-byte reply.
fn udp_associate(proxy: SocketAddr) -> (std::net::TcpStream, [u8; 10]) {
    use std::io::{Read, Write};
    let mut control = std::net::TcpStream::connect(proxy).unwrap();
    control
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    control.write_all(&[5, 1, 0]).unwrap();
    let mut choice = [0u8; 2];
    control.read_exact(&mut choice).unwrap();
    assert_eq!(choice, [5, 0]);
    control.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut reply = [0u8; 10];
    control.read_exact(&mut reply).unwrap();
    (control, reply)
}

/// Asserts that the script printed two equal hashes.
fn assert_same_hashes(out: &str) {
    let hashes: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(hashes.len(), 2, "{out}");
    assert_eq!(hashes[0], hashes[1], "the datagrams came back changed");
}

/// SOCKS5 UDP ASSOCIATE through `via = ["link://hub/out", "socks5://DANTE"]`:
/// the branch's gateway asks Dante (a SOCKS5 proxy in the main office,
/// reached over the link) for a UDP relay, and the datagrams cross the
/// link to the hub, go from there to Dante's relay and from Dante to the
/// echo server; 200 datagrams of 1 byte to 8 KB come back intact (hashed)
/// from the echo's address, and the branch's record counts them.
#[test]
fn socks_udp_associate_goes_through_a_link_and_then_a_socks5_proxy() {
    let echo = echo_server();
    let dante = common::proxies::dante();
    let hub_services =
        "[[service]]\nname = \"out\"\ntype = \"socks\"\nlisten = \"link\"\nallow = \"peer:spoke\"\nidle_timeout = \"1s\"\n";
    let spoke_services = format!(
        "[[service]]\nname = \"socks\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\n\
         via = [\"link://hub/out\", \"socks5://{}\"]\n",
        dante.addr
    );
    let (hub, spoke) = common::pair::start_pair(hub_services, &spoke_services, None);
    assert_same_hashes(&python(&pysocks_echo_script(
        spoke.addr("socks"),
        echo,
        200,
    )));
    let audit = &spoke.wait_for_audits(1, WAIT)[0];
    assert_eq!(
        audit["via"],
        format!("link://hub/out,socks5://{}", dante.addr),
        "{audit}"
    );
    assert_eq!(audit["result"], "ok", "{audit}");
    assert_eq!(audit["datagrams_up"], 200, "{audit}");
    assert_eq!(audit["datagrams_down"], 200, "{audit}");
    assert_eq!(audit["bytes_up"], audit["bytes_down"], "{audit}");
    // The hub relayed the control connection to Dante and the datagrams
    // to Dante's relay, not to the echo server.
    let hub_audits = hub.wait_for_audits(2, WAIT);
    assert!(
        hub_audits
            .iter()
            .any(|a| a["target"] == dante.addr.to_string()),
        "{hub_audits:?}"
    );
    let association = hub_audits
        .iter()
        .find(|a| a["target"] == "UDP ASSOCIATE")
        .unwrap_or_else(|| panic!("{hub_audits:?}"));
    assert_eq!(association["datagrams_up"], 200, "{association}");
    assert!(
        association["bytes_up"].as_u64() > audit["bytes_up"].as_u64(),
        "the hub sends Dante's header with each datagram: {association}"
    );
}

/// The same without a link: `via = "socks5://DANTE"` from this gateway.
#[test]
fn socks_udp_associate_goes_through_a_socks5_proxy() {
    let echo = echo_server();
    let dante = common::proxies::dante();
    let gateway = RunningGateway::start(&gateway_config(&format!(
        "[[service]]\nname = \"socks\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\n\
         via = \"socks5://{}\"\n",
        dante.addr
    )));
    assert_same_hashes(&python(&pysocks_echo_script(
        gateway.addr("socks"),
        echo,
        50,
    )));
    let audit = &gateway.wait_for_audits(1, WAIT)[0];
    assert_eq!(audit["result"], "ok", "{audit}");
    assert_eq!(audit["datagrams_up"], 50, "{audit}");
    assert_eq!(audit["datagrams_down"], 50, "{audit}");
}

/// An association through a SOCKS5 proxy ends when the proxy goes away
/// (here another gateway's socks service, stopped): the client's control
/// connection is closed and the record says why, as an error.
#[test]
fn socks_udp_associate_ends_when_the_proxy_on_the_way_goes_away() {
    use std::io::Read;
    let proxy = RunningGateway::start(&gateway_config(
        "[[service]]\nname = \"socks\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\n",
    ));
    let gateway = RunningGateway::start(&gateway_config(&format!(
        "[[service]]\nname = \"socks\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\n\
         via = \"socks5://{}\"\n",
        proxy.addr("socks")
    )));
    let (mut control, reply) = udp_associate(gateway.addr("socks"));
    assert_eq!(reply[1], 0, "reply {reply:?}");
    drop(proxy);
    let audit = &gateway.wait_for_audits(1, WAIT)[0];
    assert_eq!(audit["result"], "error", "{audit}");
    let reason = audit["reason"].as_str().unwrap();
    assert!(reason.starts_with("the proxy socks5://"), "{reason}");
    let mut rest = [0u8; 16];
    assert!(matches!(control.read(&mut rest), Ok(0) | Err(_)));
}

/// A via whose hops cannot carry datagrams (an HTTP CONNECT proxy) is
/// refused in SOCKS5 ("command not supported"), with the reason audited.
#[test]
fn socks_udp_associate_through_an_http_proxy_is_refused_in_the_protocol() {
    let gateway = RunningGateway::start(&gateway_config(
        "[[service]]\nname = \"socks\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\n\
         via = \"http://127.0.0.1:9\"\n",
    ));
    let (_control, reply) = udp_associate(gateway.addr("socks"));
    assert_eq!(
        reply[1], 7,
        "reply {reply:?}: command not supported expected"
    );
    let audit = &gateway.wait_for_audits(1, WAIT)[0];
    assert_eq!(audit["result"], "error");
    assert_eq!(
        audit["reason"],
        "UDP ASSOCIATE cannot go through http://127.0.0.1:9: only socks5:// hops relay UDP"
    );
}

/// UDP ASSOCIATE through a `link://` via while the link is down: refused
/// in SOCKS5 ("network unreachable"), never a "succeeded" that leads
/// nowhere, and audited as an error.
#[test]
fn socks_udp_associate_through_a_down_link_is_refused_in_the_protocol() {
    let spoke = RunningGateway::start(&common::pair::spoke_config(
        closed_port(),
        common::pair::PASSWORD,
        "spoke",
        "[[service]]\nname = \"socks\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\nvia = \"link://hub/out\"\n",
    ));
    let (_control, reply) = udp_associate(spoke.addr("socks"));
    assert_eq!(reply[1], 3, "reply {reply:?}: network unreachable expected");
    let audit = &spoke.wait_for_audits(1, WAIT)[0];
    assert_eq!(audit["result"], "error");
    assert_eq!(audit["reason"], "via link://hub/out: the link is down");
}

/// `GET path` from the admin endpoint, the body as text.
fn admin_get(gateway: &RunningGateway, path: &str) -> String {
    use std::io::{Read, Write};
    let admin = gateway
        .records()
        .iter()
        .find(|r| r["message"] == "admin listening")
        .and_then(|r| r["listen"].as_str().map(str::to_string))
        .expect("admin address in the log");
    let mut http = std::net::TcpStream::connect(admin).unwrap();
    write!(
        http,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn metrics_count_the_datagrams_a_udp_service_relayed() {
    let echo = echo_server();
    let gateway = RunningGateway::start(
        &udp_service(echo, "").replace("shutdown_grace", "admin = \"127.0.0.1:0\"\nshutdown_grace"),
    );
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(gateway.addr("dns")).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    for i in 0..20u8 {
        client.send(&[i; 10]).unwrap();
        assert_eq!(client.recv(&mut buf).unwrap(), 10);
    }
    let metrics = admin_get(&gateway, "/metrics");
    for line in [
        "linkgate_datagrams_total{service=\"dns\",direction=\"up\"} 20",
        "linkgate_datagrams_total{service=\"dns\",direction=\"down\"} 20",
        "linkgate_datagrams_dropped_total{service=\"dns\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
}
