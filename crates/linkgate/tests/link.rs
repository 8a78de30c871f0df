//! Two gateway processes joined by an encrypted link, over loopback:
//! transfers, reverse direction, restart, secrecy and attacks.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pair::*;
use common::relay::{contains, RelayPlan, TestRelay};
use common::servers::FtpServer;
use common::servers::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[test]
fn fifty_megabytes_spoke_to_hub_to_python_http_server_arrive_intact() {
    let site = tempfile::tempdir().unwrap();
    let body = pseudo_random(50 * 1024 * 1024, 11);
    std::fs::write(site.path().join("big.bin"), &body).unwrap();
    let server = PythonHttpServer::start(site.path());
    let (hub, spoke) = start_pair(&hub_service(server.addr), SPOKE_SERVICE, None);
    let out = spoke.dir.path().join("download.bin");
    let status = Command::new("curl")
        .args(["-sS", "--fail", "-o"])
        .arg(&out)
        .arg(format!("http://{}/big.bin", spoke.addr("web")))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(sha256_file(&out), sha256_hex(&body));
    let spoke_audit = &spoke.wait_for_audits(1, WAIT)[0];
    assert_eq!(spoke_audit["target"], "link://hub/web");
    assert_eq!(spoke_audit["result"], "ok");
    let hub_audit = &hub.wait_for_audits(1, WAIT)[0];
    assert_eq!(hub_audit["client"], "peer:spoke");
    assert_eq!(hub_audit["result"], "ok");
    assert!(hub_audit["bytes_down"].as_u64().unwrap() > body.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams_all_intact_and_reverse_direction_works() {
    let echo = echo_server().await;
    // Hub exports `web`; the spoke exports `back` and the hub maps to it (reverse tunnel).
    let hub_services = format!(
        "{}\n[[service]]\nname = \"reverse\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://spoke/back\"\n",
        hub_service(echo)
    );
    let spoke_services = format!(
        "{SPOKE_SERVICE}\n[[service]]\nname = \"back\"\ntype = \"mapping\"\nlisten = \"link\"\ntarget = \"{echo}\"\nallow = \"peer:hub\"\n"
    );
    let (hub, spoke) = start_pair(&hub_services, &spoke_services, None);
    let addr = spoke.addr("web");
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        tasks.push(tokio::spawn(async move {
            let data = pseudo_random(100_000 + i as usize * 331, i + 7);
            assert!(
                round_trip(addr, &data).await == data,
                "stream {i} corrupted"
            );
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let data = pseudo_random(2_000_000, 5);
    assert!(round_trip(hub.addr("reverse"), &data).await == data);
    let spoke_audits = spoke.wait_for_audits(101, WAIT);
    assert!(spoke_audits
        .iter()
        .filter(|a| a["service"] == "back")
        .all(|a| a["client"] == "peer:hub"));
    assert!(
        spoke_audits.iter().all(|a| a["result"] == "ok"),
        "{spoke_audits:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_restart_is_survived_and_a_down_link_fails_fast() {
    let echo = echo_server().await;
    let (hub, spoke) = start_pair(&hub_service(echo), SPOKE_SERVICE, None);
    let addr = spoke.addr("web");
    assert_eq!(round_trip(addr, b"before").await, b"before");
    let hub_link = link_addr(&hub);
    let dir = hub.stop();

    // While the hub is down, connections fail within a second with a clear reason.
    let started = Instant::now();
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 8];
    let n = client.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    let audits = spoke.wait_for_audits(2, WAIT);
    assert_eq!(audits[1]["result"], "error");
    assert_eq!(audits[1]["reason"], "link to peer \"hub\" is down");

    // Same port, same identity file: the spoke reconnects by itself.
    let config = hub_config(&hub_service(echo)).replace("127.0.0.1:0", &hub_link.to_string());
    let _hub = RunningGateway::start_in(dir, &config);
    wait_link_up(&spoke, 2);
    assert_eq!(round_trip(addr, b"after").await, b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_shows_neither_tunnel_data_nor_the_password() {
    let echo = echo_server().await;
    let hub = RunningGateway::start(&hub_config(&hub_service(echo)));
    let relay = TestRelay::start(link_addr(&hub), RelayPlan::default()).await;
    let spoke = RunningGateway::start(&spoke_config(relay.addr, PASSWORD, "spoke", SPOKE_SERVICE));
    wait_link_up(&spoke, 1);
    let marker = b"MARKER-d41d8cd98f00b204e9800998ecf8427e";
    let payload: Vec<u8> = marker
        .iter()
        .copied()
        .cycle()
        .take(marker.len() * 1000)
        .collect();
    assert_eq!(round_trip(spoke.addr("web"), &payload).await, payload);
    let wire = relay.recorded();
    assert!(
        wire.len() > payload.len() * 2,
        "the tunnel went through the recorder"
    );
    assert!(
        !contains(&wire, &marker[..16]),
        "plaintext marker on the wire"
    );
    assert!(
        !contains(&wire, PASSWORD.as_bytes()),
        "password on the wire"
    );
    assert!(
        !contains(&wire, b"horse"),
        "part of the password on the wire"
    );
    // The user name is sent in clear (OPAQUE needs it), as documented.
    assert!(contains(&wire, b"spoke"));
}

#[test]
fn wrong_password_fails_clearly_on_both_sides_and_no_data_flows() {
    let hub = RunningGateway::start(&hub_config(
        "[[service]]\nname = \"web\"\ntype = \"mapping\"\nlisten = \"link\"\ntarget = \"127.0.0.1:9\"\nallow = \"peer:spoke\"\n",
    ));
    let spoke = RunningGateway::start(&spoke_config(
        link_addr(&hub),
        "wrong password",
        "spoke",
        SPOKE_SERVICE,
    ));
    spoke.wait_for_line(
        |l| {
            l.contains(
                "authentication failed for peer 'hub': wrong password or unknown user; check",
            )
        },
        WAIT,
    );
    hub.wait_for_line(
        |l| l.contains("authentication failed for peer 'spoke': wrong password"),
        WAIT,
    );
    assert_eq!(spoke.count_lines(|l| l.contains("\"link up\"")), 0);
    // A client of the spoke is refused at once: the link is not up.
    let mut client = std::net::TcpStream::connect(spoke.addr("web")).unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(std::io::Read::read(&mut client, &mut buf).unwrap_or(0), 0);
    assert_eq!(
        spoke.wait_for_audits(1, WAIT)[0]["reason"],
        "link to peer \"hub\" is down"
    );
    assert!(hub.audits().is_empty());
}

#[test]
fn unknown_user_fails_like_a_wrong_password() {
    let hub = RunningGateway::start(&hub_config(""));
    let spoke = RunningGateway::start(&spoke_config(
        link_addr(&hub),
        PASSWORD,
        "intruder",
        SPOKE_SERVICE,
    ));
    spoke.wait_for_line(|l| l.contains("wrong password or unknown user"), WAIT);
    // The hub knows, and says, what the dialer is not told.
    hub.wait_for_line(
        |l| {
            l.contains("authentication failed for 'intruder': this gateway has no [[peer]] named 'intruder'")
                && l.contains("(those it has: spoke)")
        },
        WAIT,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_handshake_is_refused_by_the_hub() {
    let echo = echo_server().await;
    let hub = RunningGateway::start(&hub_config(&hub_service(echo)));
    let relay = TestRelay::start(link_addr(&hub), RelayPlan::default()).await;
    let spoke = RunningGateway::start(&spoke_config(relay.addr, PASSWORD, "spoke", SPOKE_SERVICE));
    wait_link_up(&spoke, 1);
    wait_link_up(&hub, 1);
    // The dialer's handshake messages are the first two frames it sent.
    let up = relay.up.lock().unwrap().clone();
    let frame_end = |at: usize| at + 2 + u16::from_be_bytes([up[at], up[at + 1]]) as usize;
    let m1_end = frame_end(0);
    let m3_end = frame_end(m1_end);
    let mut attacker = TcpStream::connect(link_addr(&hub)).await.unwrap();
    attacker.write_all(&up[..m1_end]).await.unwrap();
    let mut m2 = vec![0u8; 2];
    attacker.read_exact(&mut m2).await.unwrap();
    let mut rest = vec![0u8; u16::from_be_bytes([m2[0], m2[1]]) as usize];
    attacker.read_exact(&mut rest).await.unwrap();
    attacker.write_all(&up[m1_end..m3_end]).await.unwrap();
    let mut answer = Vec::new();
    let _ = attacker.read_to_end(&mut answer).await;
    assert_eq!(answer.get(2), Some(&1u8), "the hub refuses (status 1)");
    hub.wait_for_line(
        |l| l.contains("authentication failed for peer 'spoke'"),
        WAIT,
    );
    assert_eq!(hub.count_lines(|l| l.contains("\"link up\"")), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_data_byte_closes_the_link_and_is_never_delivered() {
    let (sink, received) = sink_server().await;
    let hub = RunningGateway::start(&hub_config(&hub_service(sink)));
    // The handshake is well under 2 KB; byte 50,000 is inside stream data.
    let plan = RelayPlan {
        flip_up_at: Some(50_000),
        ..RelayPlan::default()
    };
    let relay = TestRelay::start(link_addr(&hub), plan).await;
    let spoke = RunningGateway::start(&spoke_config(relay.addr, PASSWORD, "spoke", SPOKE_SERVICE));
    wait_link_up(&spoke, 1);
    let payload = pseudo_random(1_000_000, 21);
    let mut client = TcpStream::connect(spoke.addr("web")).await.unwrap();
    let _ = client.write_all(&payload).await;
    hub.wait_for_line(
        |l| l.contains("link down") && l.contains("failed authentication"),
        WAIT,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = received.lock().unwrap().clone();
    assert!(
        got.len() < payload.len(),
        "the tampered stream must not complete"
    );
    assert_eq!(
        &payload[..got.len()],
        &got[..],
        "only an untouched prefix may be delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_without_a_close_record_is_reported_as_an_error() {
    let echo = echo_server().await;
    let hub = RunningGateway::start(&hub_config(&hub_service(echo)));
    let relay = TestRelay::start(link_addr(&hub), RelayPlan::default()).await;
    let spoke = RunningGateway::start(&spoke_config(relay.addr, PASSWORD, "spoke", SPOKE_SERVICE));
    wait_link_up(&spoke, 1);
    wait_link_up(&hub, 1);
    relay.cut();
    for gateway in [&hub, &spoke] {
        gateway.wait_for_line(
            |l| l.contains("link down") && l.contains("without a close record (truncated)"),
            WAIT,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_link_with_bulk_both_ways_on_many_streams_does_not_deadlock() {
    let echo = echo_server().await;
    let hub = RunningGateway::start(&hub_config(&hub_service(echo)));
    let plan = RelayPlan {
        rate: 4 * 1024 * 1024,
        ..RelayPlan::default()
    };
    let relay = TestRelay::start(link_addr(&hub), plan).await;
    let spoke = RunningGateway::start(&spoke_config(relay.addr, PASSWORD, "spoke", SPOKE_SERVICE));
    wait_link_up(&spoke, 1);
    let addr = spoke.addr("web");
    let mut tasks = Vec::new();
    for i in 0..24u64 {
        tasks.push(tokio::spawn(async move {
            let data = pseudo_random(400_000, 100 + i);
            assert!(
                round_trip(addr, &data).await == data,
                "stream {i} corrupted"
            );
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("no deadlock")
            .unwrap();
    }
}

#[test]
fn streams_to_unexported_or_disallowed_services_are_refused_and_audited() {
    let hub_services = "[[service]]\nname = \"private\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:9\"\n\n\
        [[service]]\nname = \"closed\"\ntype = \"mapping\"\nlisten = \"link\"\ntarget = \"127.0.0.1:9\"\n\
        allow = \"peer:spoke\"\ndeny = \"peer:spoke\"\n";
    let spoke_services = "[[service]]\nname = \"a\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://hub/private\"\n\n\
        [[service]]\nname = \"b\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://hub/closed\"\n\n\
        [[service]]\nname = \"c\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://hub/missing\"\n";
    let (hub, spoke) = start_pair(hub_services, spoke_services, None);
    for name in ["a", "b", "c"] {
        let mut client = std::net::TcpStream::connect(spoke.addr(name)).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(std::io::Read::read(&mut client, &mut buf).unwrap_or(0), 0);
    }
    let hub_audits = hub.wait_for_audits(3, WAIT);
    let reason = |service: &str| {
        hub_audits.iter().find(|a| a["service"] == service).unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(hub_audits
        .iter()
        .all(|a| a["result"] == "denied" && a["client"] == "peer:spoke"));
    assert!(reason("private").contains("not exported over links"));
    // (`check` refuses a "link" listener whose allow names no peer at all.)
    assert!(reason("closed").contains("matches deny rule peer:spoke"));
    assert!(reason("missing").contains("no service named \"missing\""));
    let spoke_audits = spoke.wait_for_audits(3, WAIT);
    // Denied on both sides: the hub's rules refused it.
    assert!(spoke_audits.iter().all(|a| a["result"] == "denied"
        && a["reason"]
            .as_str()
            .unwrap()
            .starts_with("peer \"hub\" refused: ")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialer_fails_over_to_the_next_address_and_hub_can_hold_a_record_instead_of_the_password() {
    let echo = echo_server().await;
    // The hub's [[peer]] holds a record made by `linkgate peer-record`.
    let dir = tempfile::tempdir().unwrap();
    let base = hub_config(&hub_service(echo));
    std::fs::write(dir.path().join("linkgate.toml"), &base).unwrap();
    let (code, record, stderr) = run_cli(
        &[
            "peer-record",
            "-c",
            dir.path().join("linkgate.toml").to_str().unwrap(),
            "spoke",
        ],
        &format!("{PASSWORD}\n"),
    );
    assert_eq!(code, 0, "{stderr}");
    // It prints the line to paste into the [[peer]] table.
    let line = record.trim();
    assert!(
        line.starts_with("record = \"") && line.ends_with('"'),
        "{line}"
    );
    let config = base.replace(&format!("password = \"{PASSWORD}\""), line);
    assert!(!config.contains(PASSWORD));
    let hub = RunningGateway::start_in(dir, &config);
    // First address refuses connections; the second is the hub.
    let spoke_config = spoke_config(link_addr(&hub), PASSWORD, "spoke", SPOKE_SERVICE).replace(
        "connect = \"",
        &format!("connect = [\"{}\", \"", closed_port()),
    );
    let spoke_config = spoke_config.replacen("\"\nuser", "\"]\nuser", 1);
    let spoke = RunningGateway::start(&spoke_config);
    wait_link_up(&spoke, 1);
    spoke.wait_for_line(|l| l.contains("cannot reach the other gateway"), WAIT);
    assert_eq!(
        round_trip(spoke.addr("web"), b"via failover").await,
        b"via failover"
    );
}

/// `via = "link://hub/out"`: the spoke's services reach the hub's side
/// through the hub's SOCKS service, carried by the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_hop_in_via_reaches_targets_through_the_peers_socks_service() {
    let echo = echo_server().await;
    let hub_services = "[[service]]\nname = \"out\"\ntype = \"socks\"\nlisten = \"link\"\nallow = [\"peer:spoke\"]\n";
    let spoke_services = format!(
        "[[service]]\nname = \"web\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{echo}\"\n\
         via = \"link://hub/out\"\n"
    );
    let (hub, spoke) = start_pair(hub_services, &spoke_services, None);
    let data = pseudo_random(2 * 1024 * 1024, 21);
    let back = round_trip(spoke.addr("web"), &data).await;
    assert_eq!(sha256_hex(&back), sha256_hex(&data));
    let hub_audit = &hub.wait_for_audits(1, WAIT)[0];
    assert_eq!(hub_audit["service"], "out");
    assert_eq!(hub_audit["client"], "peer:spoke");
    assert_eq!(hub_audit["target"], echo.to_string());
    assert_eq!(hub_audit["result"], "ok");
    let spoke_audit = &spoke.wait_for_audits(1, WAIT)[0];
    assert_eq!(spoke_audit["via"], "link://hub/out");
    assert_eq!(spoke_audit["result"], "ok");
}

/// A `link://` via hop to a SOCKS service that wants a login: refused, and
/// both gateways say why in words (the hub's audit, the spoke's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_hop_to_a_socks_service_that_wants_a_login_is_refused_in_words() {
    let echo = echo_server().await;
    let hub_services = "[[user]]\nname = \"alice\"\npassword = \"a\"\n\n\
         [[service]]\nname = \"out\"\ntype = \"socks\"\nlisten = \"link\"\nauth = \"password\"\nallow = [\"peer:spoke\"]\n";
    let spoke_services = format!(
        "[[service]]\nname = \"web\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{echo}\"\n\
         via = \"link://hub/out\"\n"
    );
    let (hub, spoke) = start_pair(hub_services, &spoke_services, None);
    let mut client = tokio::net::TcpStream::connect(spoke.addr("web"))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let _ = tokio::io::AsyncReadExt::read(&mut client, &mut buf).await;
    let hub_audit = &hub.wait_for_audits(1, WAIT)[0];
    assert_eq!(hub_audit["result"], "auth_failed");
    assert!(
        hub_audit["reason"]
            .as_str()
            .unwrap()
            .contains("a link:// via hop speaks SOCKS5 without one"),
        "{hub_audit}"
    );
    let spoke_audit = &spoke.wait_for_audits(1, WAIT)[0];
    assert!(
        spoke_audit["reason"]
            .as_str()
            .unwrap()
            .contains("a link:// hop never logs in"),
        "{spoke_audit}"
    );
}

/// This gateway's public key, as `linkgate public-key` prints it for a
/// gateway that will run in `dir` (its identity file is created there).
fn public_key_in(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("linkgate.toml");
    std::fs::write(&path, "[gateway]\nidentity = \"gw.key\"\n").unwrap();
    let (code, stdout, stderr) = run_cli(&["public-key", "-c", path.to_str().unwrap()], "");
    assert_eq!(code, 0, "{stderr}");
    let key = stdout.trim().to_string();
    assert_eq!(key.len(), 44, "{key}");
    key
}

/// A hub (identity `gw.key`) that admits the spoke by its public key.
fn key_hub_config(spoke_key: &str, services: &str) -> String {
    format!(
        "[gateway]\nname = \"hub\"\nidentity = \"gw.key\"\nlog = \"json\"\n\n[link]\nlisten = \"127.0.0.1:0\"\n\n\
         [[peer]]\nname = \"spoke\"\npublic_key = \"{spoke_key}\"\n\n{services}"
    )
}

/// A spoke (identity `gw.key`) that dials `connect` pinning `hub_key`.
fn key_spoke_config(connect: SocketAddr, hub_key: &str) -> String {
    format!(
        "[gateway]\nname = \"spoke\"\nidentity = \"gw.key\"\nlog = \"json\"\n\n\
         [[peer]]\nname = \"hub\"\nconnect = \"{connect}\"\npublic_key = \"{hub_key}\"\n\n{SPOKE_SERVICE}"
    )
}

/// Key mode: each gateway pins the other's public key instead of sharing a
/// password; data flows both ways, and a gateway whose key is not pinned is
/// refused with a message that names its key on the hub and says why on the
/// dialer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_mode_links_with_pinned_public_keys() {
    let echo = echo_server().await;
    let (hub_dir, spoke_dir, stranger_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (hub_key, spoke_key, stranger_key) = (
        public_key_in(&hub_dir),
        public_key_in(&spoke_dir),
        public_key_in(&stranger_dir),
    );
    assert_ne!(hub_key, spoke_key);
    // The same identity gives the same key again.
    assert_eq!(public_key_in(&hub_dir), hub_key);
    let hub = RunningGateway::start_in(hub_dir, &key_hub_config(&spoke_key, &hub_service(echo)));
    let spoke_config = |key: &str| key_spoke_config(link_addr(&hub), key);
    let spoke = RunningGateway::start_in(spoke_dir, &spoke_config(&hub_key));
    wait_link_up(&spoke, 1);
    let data = pseudo_random(3 * 1024 * 1024 + 5, 31);
    let mut client = TcpStream::connect(spoke.addr("web")).await.unwrap();
    let (mut read, mut write) = client.split();
    let sent = data.clone();
    let (_, echoed) = tokio::join!(
        async move {
            write.write_all(&sent).await.unwrap();
            write.shutdown().await.unwrap();
        },
        async move {
            let mut echoed = Vec::new();
            read.read_to_end(&mut echoed).await.unwrap();
            echoed
        }
    );
    assert_eq!(sha256_hex(&echoed), sha256_hex(&data));
    // A gateway the hub does not know (its own key, the right hub key).
    let stranger = RunningGateway::start_in(stranger_dir, &spoke_config(&hub_key));
    stranger.wait_for_line(
        |l| {
            l.contains("authentication failed for peer 'hub'")
                && l.contains("no [[peer]] with your public key")
        },
        WAIT,
    );
    hub.wait_for_line(
        |l| {
            l.contains("authentication failed for a gateway with public key")
                && l.contains(&stranger_key)
        },
        WAIT,
    );
    // A dialer that pinned the wrong key for the hub.
    let confused = RunningGateway::start(&spoke_config(&spoke_key));
    confused.wait_for_line(
        |l| l.contains("authentication failed for peer 'hub'") && l.contains("not its key"),
        WAIT,
    );
    hub.wait_for_line(
        |l| l.contains("its hello was made for another public key than this gateway's"),
        WAIT,
    );
    assert!(
        !hub.lines().iter().any(|l| l.contains("peer '?'")),
        "no placeholder names in the hub's log"
    );
    assert_eq!(hub.count_lines(|l| l.contains("\"link up\"")), 1);
}

/// In key mode a recorded hello cannot be replayed: the hub refuses a hello
/// whose timestamp is not newer than the last one it accepted from that
/// gateway (else a replay would replace the real link).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_key_mode_hello_is_refused() {
    let echo = echo_server().await;
    let (hub_dir, spoke_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (hub_key, spoke_key) = (public_key_in(&hub_dir), public_key_in(&spoke_dir));
    let hub = RunningGateway::start_in(hub_dir, &key_hub_config(&spoke_key, &hub_service(echo)));
    let relay = TestRelay::start(link_addr(&hub), RelayPlan::default()).await;
    let spoke = RunningGateway::start_in(spoke_dir, &key_spoke_config(relay.addr, &hub_key));
    wait_link_up(&hub, 1);
    let up = relay.up.lock().unwrap().clone();
    let m1_end = 2 + u16::from_be_bytes([up[0], up[1]]) as usize;
    let mut attacker = TcpStream::connect(link_addr(&hub)).await.unwrap();
    attacker.write_all(&up[..m1_end]).await.unwrap();
    let mut answer = Vec::new();
    let _ = attacker.read_to_end(&mut answer).await;
    assert_eq!(answer.get(2), Some(&1u8), "the hub refuses (status 1)");
    assert!(String::from_utf8_lossy(&answer).contains("replayed"));
    hub.wait_for_line(|l| l.contains("replayed or out-of-date hello"), WAIT);
    assert_eq!(hub.count_lines(|l| l.contains("\"link up\"")), 1);
    drop(spoke);
}

/// An FTP proxy whose `via` is a link hop: the control connection and every
/// data connection (passive and active client) leave from the hub's side.
#[test]
fn ftp_control_and_data_connections_through_a_link_hop() {
    let server = FtpServer::start();
    let big = pseudo_random(2 * 1024 * 1024 + 1, 22);
    std::fs::write(server.path("big.bin"), &big).unwrap();
    let hub_services = "[[service]]\nname = \"out\"\ntype = \"socks\"\nlisten = \"link\"\nallow = [\"peer:spoke\"]\n";
    let spoke_services = format!(
        "[[service]]\nname = \"ftp\"\ntype = \"ftp\"\nlisten = \"127.0.0.1:0\"\n\
         target = \"127.0.0.1:{}\"\nvia = \"link://hub/out\"\n",
        server.port
    );
    let (hub, spoke) = start_pair(hub_services, &spoke_services, None);
    let script = format!(
        r#"
import ftplib, hashlib
for passive in (True, False):
    f = ftplib.FTP()
    f.connect("127.0.0.1", {port}, timeout=15)
    f.login("alice", "secret")
    f.set_pasv(passive)
    data = bytearray()
    f.retrbinary("RETR big.bin", data.extend)
    print(hashlib.sha256(data).hexdigest())
    f.quit()
"#,
        port = spoke.addr("ftp").port()
    );
    let out = python(&script);
    let digest = sha256_hex(&big);
    assert_eq!(out, format!("{digest}\n{digest}\n"));
    // Two sessions, each a control and a data connection, all through the hub.
    let records = hub.wait_for_audits(4, WAIT);
    assert!(
        records
            .iter()
            .all(|r| r["service"] == "out" && r["client"] == "peer:spoke" && r["result"] == "ok"),
        "{records:?}"
    );
}

/// An ftp service whose target is the hub's ftp service: the FTP server sits
/// in the hub's office, clients in the spoke's. Control and every data
/// connection (passive and active client, download, upload, listing) cross
/// the link; both a fixed-target hub service and a `USER user@host` one.
#[test]
fn ftp_service_with_a_link_target_carries_data_over_the_link() {
    let server = FtpServer::start();
    let big = pseudo_random(2 * 1024 * 1024 + 3, 24);
    std::fs::write(server.path("big.bin"), &big).unwrap();
    let hub_services = format!(
        "[[service]]\nname = \"ftp\"\ntype = \"ftp\"\nlisten = \"link\"\n\
         target = \"127.0.0.1:{port}\"\nallow = [\"peer:spoke\"]\n\n\
         [[service]]\nname = \"ftp-any\"\ntype = \"ftp\"\nlisten = \"link\"\n\
         allow = [\"peer:spoke\"]\ndestinations = [\"127.0.0.1:{port}\"]\n",
        port = server.port
    );
    let spoke_services = "[[service]]\nname = \"ftp\"\ntype = \"ftp\"\nlisten = \"127.0.0.1:0\"\n\
         target = \"link://hub/ftp\"\n\n\
         [[service]]\nname = \"ftp-any\"\ntype = \"ftp\"\nlisten = \"127.0.0.1:0\"\n\
         target = \"link://hub/ftp-any\"\n";
    let (hub, spoke) = start_pair(&hub_services, spoke_services, None);
    let script = format!(
        r#"
import ftplib, hashlib, io
upload = bytes(range(256)) * 4096
for passive in (True, False):
    f = ftplib.FTP()
    f.connect("127.0.0.1", {fixed}, timeout=15)
    f.login("alice", "secret")
    f.set_pasv(passive)
    data = bytearray()
    f.retrbinary("RETR big.bin", data.extend)
    print(hashlib.sha256(data).hexdigest())
    name = "up-%s.bin" % passive
    f.storbinary("STOR " + name, io.BytesIO(upload))
    print(sorted(f.nlst()))
    f.quit()
f = ftplib.FTP()
f.connect("127.0.0.1", {any}, timeout=15)
f.login("alice@127.0.0.1:{server}", "secret")
data = bytearray()
f.retrbinary("RETR big.bin", data.extend)
print(hashlib.sha256(data).hexdigest())
f.quit()
"#,
        fixed = spoke.addr("ftp").port(),
        any = spoke.addr("ftp-any").port(),
        server = server.port,
    );
    let out = python(&script);
    let digest = sha256_hex(&big);
    let listing = "['big.bin', 'up-False.bin', 'up-True.bin']";
    assert_eq!(
        out,
        format!("{digest}\n['big.bin', 'up-True.bin']\n{digest}\n{listing}\n{digest}\n")
    );
    let uploaded: Vec<u8> = (0..=255u8).cycle().take(256 * 4096).collect();
    for name in ["up-True.bin", "up-False.bin"] {
        assert_eq!(sha256_file(&server.path(name)), sha256_hex(&uploaded));
    }
    // curl: EPSV, and active mode (EPRT).
    for active in [false, true] {
        let url = format!(
            "ftp://alice:secret@127.0.0.1:{}/big.bin",
            spoke.addr("ftp").port()
        );
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "20", &url]);
        if active {
            curl.args(["-P", "-"]);
        }
        let out = curl.output().expect("curl is needed for this test");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(sha256_hex(&out.stdout), digest, "curl active {active}");
    }
    // One record per session on each side, data bytes included.
    let hub_records = hub.wait_for_audits(5, WAIT);
    assert!(
        hub_records.iter().all(|r| r["client"] == "peer:spoke"
            && r["result"] == "ok"
            && r["bytes_down"].as_u64().unwrap() > big.len() as u64),
        "{hub_records:?}"
    );
    let spoke_records = spoke.wait_for_audits(5, WAIT);
    let targets: Vec<&str> = spoke_records
        .iter()
        .map(|r| r["target"].as_str().unwrap())
        .collect();
    assert_eq!(
        targets.iter().filter(|t| **t == "link://hub/ftp").count(),
        4,
        "{spoke_records:?}"
    );
    assert!(targets.contains(&"link://hub/ftp-any"), "{spoke_records:?}");
    assert!(
        spoke_records
            .iter()
            .all(|r| r["result"] == "ok" && r["bytes_up"].as_u64().unwrap() > 0),
        "{spoke_records:?}"
    );
}

/// The two ways of miswiring FTP across a link get a clear 425 for data
/// connections, and the session goes on: a plain mapping to the hub's ftp
/// service (data cannot cross that way), and an ftp service whose link target
/// is a mapping to the server instead of the hub's ftp service.
#[test]
fn ftp_miswired_across_a_link_gets_clear_425s_for_data() {
    let server = FtpServer::start();
    std::fs::write(server.path("small.txt"), b"hello").unwrap();
    let hub_services = format!(
        "[[service]]\nname = \"ftp\"\ntype = \"ftp\"\nlisten = \"link\"\n\
         target = \"127.0.0.1:{port}\"\nallow = [\"peer:spoke\"]\n\n\
         [[service]]\nname = \"ftp-mapped\"\ntype = \"mapping\"\nlisten = \"link\"\n\
         target = \"127.0.0.1:{port}\"\nallow = [\"peer:spoke\"]\n",
        port = server.port
    );
    let spoke_services =
        "[[service]]\nname = \"mapped\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\n\
         target = \"link://hub/ftp\"\n\n\
         [[service]]\nname = \"ftp\"\ntype = \"ftp\"\nlisten = \"127.0.0.1:0\"\n\
         target = \"link://hub/ftp-mapped\"\n";
    let (_hub, spoke) = start_pair(&hub_services, spoke_services, None);
    let script = format!(
        r#"
import ftplib
for port in ({mapped}, {ftp}):
    f = ftplib.FTP()
    f.connect("127.0.0.1", port, timeout=15)
    f.login("alice", "secret")
    try:
        f.retrbinary("RETR small.txt", print)
    except ftplib.error_temp as e:
        print(e)
    print(f.sendcmd("PWD"))
"#,
        mapped = spoke.addr("mapped").port(),
        ftp = spoke.addr("ftp").port(),
    );
    let stdout = python(&script);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(
        lines[0].starts_with(
            "425 Over a link, data connections need an ftp service with a link:// target"
        ),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with("425 No data connection over the link: the target must be"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("257") && lines[3].starts_with("257"),
        "{stdout}"
    );
}

/// An HTTP proxy whose `via` is a link hop: requests and CONNECT tunnels
/// leave from the hub's side, and every stream is closed cleanly.
#[test]
fn http_proxy_through_a_link_hop() {
    let site = tempfile::tempdir().unwrap();
    let body = pseudo_random(1024 * 1024 + 7, 23);
    std::fs::write(site.path().join("file.bin"), &body).unwrap();
    let origin = PythonHttpServer::start(site.path());
    let hub_services = "[[service]]\nname = \"out\"\ntype = \"socks\"\nlisten = \"link\"\nallow = [\"peer:spoke\"]\n";
    let spoke_services = "[[service]]\nname = \"web\"\ntype = \"http\"\nlisten = \"127.0.0.1:0\"\nvia = \"link://hub/out\"\n";
    let (hub, spoke) = start_pair(hub_services, spoke_services, None);
    let out = spoke.dir.path().join("got.bin");
    let url = format!("http://{}/file.bin", origin.addr);
    for tunnel in [false, true] {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--fail", "-x"])
            .arg(format!("http://{}", spoke.addr("web")))
            .arg("-o")
            .arg(&out);
        if tunnel {
            curl.arg("-p");
        }
        let status = curl
            .arg(&url)
            .status()
            .expect("curl is needed for this test");
        assert!(status.success(), "curl (tunnel: {tunnel}) failed");
        assert_eq!(sha256_file(&out), sha256_hex(&body), "tunnel: {tunnel}");
    }
    let records = hub.wait_for_audits(2, WAIT);
    assert!(
        records
            .iter()
            .all(|r| r["client"] == "peer:spoke" && r["result"] == "ok"),
        "{records:?}"
    );
}

/// An origin that keeps every connection open (HTTP/1.1 keep-alive) and
/// answers each request head with "hello".
async fn keep_alive_origin() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
                        if socket.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_upstream_connections_over_a_link_hop_are_closed_cleanly() {
    let origin = keep_alive_origin().await;
    let hub_services = "[[service]]\nname = \"out\"\ntype = \"socks\"\nlisten = \"link\"\nallow = [\"peer:spoke\"]\n";
    let spoke_services = "[[service]]\nname = \"web\"\ntype = \"http\"\nlisten = \"127.0.0.1:0\"\nvia = \"link://hub/out\"\n";
    let (hub, spoke) = start_pair(hub_services, spoke_services, None);
    let proxy = spoke.addr("web");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--fail", "-x"])
            .arg(format!("http://{proxy}"))
            .arg(format!("http://{origin}/a"))
            .arg(format!("http://{origin}/b"))
            .output()
            .expect("curl is needed for this test")
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hellohello");
    // The client left: the pooled upstream stream is closed, not dropped.
    let records = hub.wait_for_audits(1, WAIT);
    assert_eq!(records[0]["result"], "ok", "{records:?}");
}

/// A hub that stops on SIGTERM closes its links with close records and
/// waits for the answers: the spoke logs a deliberate close, never a
/// truncated link (it used to, now and then, when the hub exited before
/// its close record left).
#[test]
fn a_hub_that_stops_closes_its_links_cleanly() {
    for _ in 0..5 {
        let hub = RunningGateway::start(&hub_config(""));
        let spoke = RunningGateway::start(&spoke_config(link_addr(&hub), PASSWORD, "spoke", ""));
        wait_link_up(&spoke, 1);
        wait_link_up(&hub, 1);
        let mut hub = hub;
        hub.signal("TERM");
        assert!(hub.wait_exit(WAIT).success());
        let line = spoke.wait_for_line(
            |l| l.contains("link closed by the other gateway") || l.contains("link down"),
            WAIT,
        );
        assert!(
            line.contains("link closed by the other gateway")
                && line.contains("gateway shutting down"),
            "{line}"
        );
    }
}
