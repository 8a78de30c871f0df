//! Bandwidth caps and link pacing as a user measures them: curl's own
//! download rate through a capped service, per-client shares from two
//! source addresses, a SOCKS user's cap, a link paced by `[[peer]]
//! bandwidth` with an echo that keeps a short round trip beside a bulk
//! download, the same without `bandwidth` on a narrow WAN modelled by a
//! shaping relay (the link paces itself), and the caps as the console and
//! `/metrics` show them.
//!
//! Rates are asserted generously (the machine is shared); the tight
//! figures are in bench/wan.py.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::servers::PythonHttpServer;
use common::*;

const MB: f64 = 1e6;

/// A directory served by http.server with a random file `name` of `len`
/// bytes; returns the server and the file's SHA-256.
fn served_file(name: &str, len: usize) -> (tempfile::TempDir, PythonHttpServer, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(len, len as u64);
    std::fs::write(dir.path().join(name), &data).unwrap();
    let server = PythonHttpServer::start(dir.path());
    (dir, server, sha256_hex(&data))
}

/// Starts curl downloading `url` (through `proxy` args if any) into `out`;
/// it prints its average download speed in bytes per second.
fn curl(args: &[&str], url: &str, out: &std::path::Path) -> Child {
    Command::new("curl")
        .args([
            "-s",
            "-f",
            "--max-time",
            "60",
            "-w",
            "%{speed_download}",
            "-o",
        ])
        .arg(out)
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl is needed for this test")
}

/// Waits for curl; returns its measured rate in bytes per second.
fn finish(child: Child, out: &std::path::Path, sha: &str) -> f64 {
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "curl failed: {output:?}");
    assert_eq!(sha256_file(out), sha, "bytes differ");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}

fn assert_near(rate: f64, cap: f64, what: &str) {
    assert!(
        rate > cap * 0.6 && rate < cap * 1.25,
        "{what}: {:.2} MB/s, cap {:.2} MB/s",
        rate / MB,
        cap / MB
    );
}

#[test]
fn a_capped_service_holds_curl_to_its_rate_and_the_console_shows_it() {
    let (_dir, origin, sha) = served_file("big.bin", 2_000_000);
    let config = format!(
        "[gateway]\nlog = \"json\"\nadmin = \"127.0.0.1:0\"\n\n\
         [[service]]\nname = \"web\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\n\
         target = \"{}\"\nbandwidth = \"8Mbit/s\"\n",
        origin.addr
    );
    let gateway = RunningGateway::start(&config);
    let out = gateway.dir.path().join("got.bin");
    let url = format!("http://{}/big.bin", gateway.addr("web"));
    let download = curl(&[], &url, &out);
    // While it runs, the console lists the cap as in use.
    std::thread::sleep(Duration::from_millis(800));
    let admin = admin_of(&gateway);
    let status = Command::new("curl")
        .args(["-s", &format!("http://{admin}/api/status")])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let cap = &status["caps"][0];
    assert_eq!(cap["name"], "service web", "{status}");
    assert_eq!(cap["rate"], "8Mbit/s");
    assert!(cap["use_down"].as_f64().unwrap() > 0.5, "{cap}");
    let rate = finish(download, &out, &sha);
    assert_near(rate, MB, "capped service");
    let metrics = Command::new("curl")
        .args(["-s", &format!("http://{admin}/metrics")])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("linkgate_cap_rate_bytes_per_second{cap=\"service web\"} 1000000"),
        "{metrics}"
    );
    let down: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("linkgate_cap_bytes_total{cap=\"service web\",direction=\"down\"} ")
        })
        .expect("cap bytes")
        .parse()
        .unwrap();
    assert!(down >= 2_000_000, "{down}");
}

#[test]
fn a_reload_that_restarts_a_capped_service_keeps_its_cap_in_use() {
    let (_dir, origin, sha) = served_file("big.bin", 4_000_000);
    // A port of our own: the restarted service must come back on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = |idle: &str| {
        format!(
            "[gateway]\nlog = \"json\"\n\n\
             [[service]]\nname = \"web\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:{port}\"\n\
             target = \"{}\"\nbandwidth = \"16Mbit/s\"\nidle_timeout = \"{idle}\"\n",
            origin.addr
        )
    };
    let gateway = RunningGateway::start(&config("5m"));
    let url = format!("http://127.0.0.1:{port}/big.bin");
    let (first_out, second_out) = (
        gateway.dir.path().join("first.bin"),
        gateway.dir.path().join("second.bin"),
    );
    let first = curl(&[], &url, &first_out);
    std::thread::sleep(Duration::from_millis(500));
    // A change that restarts the service while the first download runs.
    std::fs::write(gateway.dir.path().join("linkgate.toml"), config("6m")).unwrap();
    gateway.signal("HUP");
    gateway.wait_for_line(
        |l| l.contains("configuration reloaded"),
        Duration::from_secs(30),
    );
    let second = curl(&[], &url, &second_out);
    let second_rate = finish(second, &second_out, &sha);
    finish(first, &first_out, &sha);
    // Sharing the 2 MB/s cap with the first download for most of its time,
    // the second averages about 1.2 MB/s; with a fresh cap of its own it
    // would take the whole 2 MB/s.
    assert!(
        second_rate < 1.6 * MB,
        "the second download took {:.2} MB/s beside the first: the reload gave it a cap of its own",
        second_rate / MB
    );
}

#[test]
fn client_bandwidth_gives_each_source_address_its_own_share() {
    let (_dir, origin, sha) = served_file("part.bin", 1_500_000);
    let config = format!(
        "[gateway]\nlog = \"json\"\n\n\
         [[service]]\nname = \"web\"\ntype = \"mapping\"\nlisten = \"0.0.0.0:0\"\n\
         target = \"{}\"\nallow = \"127.0.0.0/8\"\nclient_bandwidth = \"8Mbit/s\"\n",
        origin.addr
    );
    let gateway = RunningGateway::start(&config);
    let port = gateway.addr("web").port();
    let url = format!("http://127.0.0.1:{port}/part.bin");
    let dir = gateway.dir.path();
    // Two sources at once: each gets the whole per-client rate.
    let a = curl(&["--interface", "127.0.0.1"], &url, &dir.join("a"));
    let b = curl(&["--interface", "127.0.0.2"], &url, &dir.join("b"));
    let (a, b) = (
        finish(a, &dir.join("a"), &sha),
        finish(b, &dir.join("b"), &sha),
    );
    assert_near(a, MB, "first source");
    assert_near(b, MB, "second source");
    // Two connections from one source share its cap.
    let c = curl(&["--interface", "127.0.0.3"], &url, &dir.join("c"));
    let d = curl(&["--interface", "127.0.0.3"], &url, &dir.join("d"));
    let (c, d) = (
        finish(c, &dir.join("c"), &sha),
        finish(d, &dir.join("d"), &sha),
    );
    assert_near(c + d, MB, "one source, two connections together");
}

#[test]
fn a_socks_users_cap_follows_that_user_only() {
    let (_dir, origin, sha) = served_file("big.bin", 1_500_000);
    let config = "[gateway]\nlog = \"json\"\nadmin = \"127.0.0.1:0\"\n\n\
         [[user]]\nname = \"alice\"\npassword = \"alice-pw\"\nbandwidth = \"8Mbit/s\"\n\n\
         [[user]]\nname = \"bob\"\npassword = \"bob-pw\"\n\n\
         [[service]]\nname = \"socks\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\nauth = \"password\"\n";
    let gateway = RunningGateway::start(config);
    let proxy = gateway.addr("socks");
    let url = format!("http://{}/big.bin", origin.addr);
    let dir = gateway.dir.path();
    let alice = curl(
        &[
            "--socks5",
            &proxy.to_string(),
            "--proxy-user",
            "alice:alice-pw",
        ],
        &url,
        &dir.join("alice"),
    );
    // Her bytes count in /metrics while the transfer runs, not at its end.
    std::thread::sleep(Duration::from_millis(700));
    let so_far = user_bytes_down(&gateway, "alice");
    assert!(so_far > 200_000 && so_far < 1_400_000, "{so_far}");
    let alice = finish(alice, &dir.join("alice"), &sha);
    assert_near(alice, MB, "alice");
    let bob = curl(
        &["--socks5", &proxy.to_string(), "--proxy-user", "bob:bob-pw"],
        &url,
        &dir.join("bob"),
    );
    let bob = finish(bob, &dir.join("bob"), &sha);
    assert!(bob > 3.0 * MB, "bob has no cap: {:.2} MB/s", bob / MB);
    // Counted once: live, not again when the connection ended.
    let alice_total = user_bytes_down(&gateway, "alice");
    assert!(
        (1_500_000..1_510_000).contains(&alice_total),
        "{alice_total}"
    );
}

fn admin_of(gateway: &RunningGateway) -> String {
    gateway
        .records()
        .iter()
        .find(|r| r["message"] == "admin listening")
        .and_then(|r| r["listen"].as_str().map(str::to_string))
        .expect("admin address")
}

/// `linkgate_user_bytes_total{user=USER,direction="down"}` from /metrics.
fn user_bytes_down(gateway: &RunningGateway, user: &str) -> u64 {
    let metrics = Command::new("curl")
        .args(["-s", &format!("http://{}/metrics", admin_of(gateway))])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout).to_string();
    let prefix = format!("linkgate_user_bytes_total{{user=\"{user}\",direction=\"down\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |v| v.parse().unwrap())
}

/// 64-byte round trips to `addr` every 20 ms for `span`; the round-trip
/// times, sorted.
fn echo_times(addr: SocketAddr, span: Duration) -> Vec<Duration> {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket.set_nodelay(true).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut times = Vec::new();
    let until = Instant::now() + span;
    let mut back = [0u8; 64];
    while Instant::now() < until {
        let sent = Instant::now();
        socket.write_all(&[7u8; 64]).unwrap();
        socket.read_exact(&mut back).unwrap();
        times.push(sent.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    times.sort();
    times
}

/// A hub serving `bulk` (the file at `origin`) and `echo` to a spoke that
/// maps both; `hub_peer` is added to the hub's `[[peer]]`, and the spoke
/// dials `wan(hub's link address)`.
fn bulk_and_echo_pair(
    origin: SocketAddr,
    echo: SocketAddr,
    hub_peer: &str,
    wan: impl Fn(SocketAddr) -> SocketAddr,
) -> (RunningGateway, RunningGateway) {
    let hub = RunningGateway::start(&format!(
        "[gateway]\nname = \"hub\"\nlog = \"json\"\nshutdown_grace = \"1s\"\nadmin = \"127.0.0.1:0\"\n\n\
         [link]\nlisten = \"127.0.0.1:0\"\n\n\
         [[peer]]\nname = \"spoke\"\npassword = \"{}\"\n{hub_peer}\n\n\
         [[service]]\nname = \"bulk\"\ntype = \"mapping\"\nlisten = \"link\"\ntarget = \"{origin}\"\nallow = \"peer:spoke\"\n\n\
         [[service]]\nname = \"echo\"\ntype = \"mapping\"\nlisten = \"link\"\ntarget = \"{echo}\"\nallow = \"peer:spoke\"\n",
        common::pair::PASSWORD,
    ));
    let spoke = RunningGateway::start(&common::pair::spoke_config(
        wan(common::pair::link_addr(&hub)),
        common::pair::PASSWORD,
        "spoke",
        "[[service]]\nname = \"bulk\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://hub/bulk\"\n\n\
         [[service]]\nname = \"echo\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://hub/echo\"\n",
    ));
    common::pair::wait_link_up(&spoke, 1);
    (hub, spoke)
}

/// Downloads `bulk.bin` through the spoke while timing echoes through it
/// from `echo_after` into the download, for `echo_span`; the download's
/// rate (checked intact against `sha`) and the echo p95.
fn download_beside_echo(
    spoke: &RunningGateway,
    sha: &str,
    echo_after: Duration,
    echo_span: Duration,
) -> (f64, Duration) {
    let out = spoke.dir.path().join("bulk.bin");
    let url = format!("http://{}/bulk.bin", spoke.addr("bulk"));
    let download = curl(&[], &url, &out);
    std::thread::sleep(echo_after);
    let times = echo_times(spoke.addr("echo"), echo_span);
    let rate = finish(download, &out, sha);
    let p95 = times[times.len() * 95 / 100];
    eprintln!(
        "download {:.2} MB/s, echo p95 {p95:?}: {times:?}",
        rate / MB
    );
    (rate, p95)
}

/// [`download_beside_echo`] of a `size`-byte file through a link whose hub
/// paces itself to `bandwidth`, on loopback.
fn paced_download_beside_echo(
    size: usize,
    bandwidth: &str,
    echo_after: Duration,
    echo_span: Duration,
) -> (f64, Duration) {
    let (_dir, origin, sha) = served_file("bulk.bin", size);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let echo = runtime.block_on(common::servers::echo_server());
    let hub_peer = format!("bandwidth = \"{bandwidth}\"");
    let (_hub, spoke) = bulk_and_echo_pair(origin.addr, echo, &hub_peer, |hub| hub);
    download_beside_echo(&spoke, &sha, echo_after, echo_span)
}

#[test]
fn a_paced_link_sends_at_its_bandwidth_and_a_keystroke_still_goes_first() {
    let (rate, p95) = paced_download_beside_echo(
        3_000_000,
        "16Mbit/s",
        Duration::from_millis(200),
        Duration::from_millis(1000),
    );
    // 16 Mbit/s is 2 MB/s of records; the payload is a little less.
    assert_near(rate, 2.0 * MB, "paced link");
    assert!(
        p95 < Duration::from_millis(100),
        "echo p95 {p95:?} behind the paced download"
    );
}

/// A slow pace sends a batch every ~65 ms (16 KiB at 2 Mbit/s); a
/// keystroke that waited for the pacer's next turn would take half that
/// on average. It goes at once, paid for from the pace.
#[test]
fn a_keystroke_on_a_slowly_paced_link_does_not_wait_for_the_pacers_turn() {
    let (rate, p95) = paced_download_beside_echo(
        800_000,
        "2Mbit/s",
        Duration::from_millis(300),
        Duration::from_millis(1500),
    );
    assert_near(rate, 0.25 * MB, "slowly paced link");
    assert!(
        p95 < Duration::from_millis(20),
        "echo p95 {p95:?} waited for the pace"
    );
}

/// Without `bandwidth`, on a path that drains at 20 Mbit/s through a
/// modem-like FIFO of about 100 ms, the link paces itself once an echo
/// runs beside the download: the echo waits for the link's scheduler, not
/// for the FIFO. (Unpaced, the echo's p95 here is the FIFO's length.)
#[test]
fn a_link_on_a_narrow_wan_paces_itself_so_a_keystroke_skips_the_modems_queue() {
    const WAN_RATE: f64 = 2.5 * MB;
    let (_dir, origin, sha) = served_file("bulk.bin", 10_000_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let echo = runtime.block_on(common::servers::echo_server());
    let (hub, spoke) = bulk_and_echo_pair(origin.addr, echo, "", |hub| {
        runtime.block_on(common::shaper::start(hub, WAN_RATE, 256 * 1024))
    });
    // Mid-download, the operator sees the pace the hub chose.
    let admin = admin_of(&hub);
    let console = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2000));
        let status = Command::new("curl")
            .args(["-s", &format!("http://{admin}/api/status")])
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        let (code, cli, err) = run_cli(&["status", "--admin", &admin], "");
        assert_eq!(code, 0, "{err}");
        (status, cli)
    });
    let (rate, p95) = download_beside_echo(
        &spoke,
        &sha,
        Duration::from_millis(1000),
        Duration::from_millis(2000),
    );
    assert!(
        rate > WAN_RATE * 0.5,
        "the paced download kept {:.2} MB/s of the WAN's {:.2}",
        rate / MB,
        WAN_RATE / MB
    );
    assert!(
        p95 < Duration::from_millis(50),
        "echo p95 {p95:?} behind the download on the narrow WAN"
    );
    let (status, cli) = console.join().unwrap();
    let pace = status["links"][0]["auto_pace_bytes_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no automatic pace shown: {status}"));
    assert!(
        pace > WAN_RATE * 0.3 && pace < WAN_RATE * 1.1,
        "shown pace {:.2} MB/s on a {:.2} MB/s WAN",
        pace / MB,
        WAN_RATE / MB
    );
    assert!(
        cli.lines()
            .any(|l| l.starts_with("link spoke") && l.contains(" paced auto ")),
        "{cli}"
    );
}

#[test]
fn an_http_proxys_cap_holds_plain_requests_and_connect_tunnels() {
    let (_dir, origin, sha) = served_file("big.bin", 1_500_000);
    let config = "[gateway]\nlog = \"json\"\n\n\
         [[service]]\nname = \"proxy\"\ntype = \"http\"\nlisten = \"127.0.0.1:0\"\nbandwidth = \"8Mbit/s\"\n";
    let gateway = RunningGateway::start(config);
    let proxy = gateway.addr("proxy").to_string();
    let url = format!("http://{}/big.bin", origin.addr);
    let dir = gateway.dir.path();
    let plain = curl(&["-x", &proxy], &url, &dir.join("plain"));
    assert_near(finish(plain, &dir.join("plain"), &sha), MB, "plain GET");
    // -p: the same download through a CONNECT tunnel.
    let tunnel = curl(&["-p", "-x", &proxy], &url, &dir.join("tunnel"));
    assert_near(finish(tunnel, &dir.join("tunnel"), &sha), MB, "CONNECT");
}
