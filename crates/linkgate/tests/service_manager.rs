//! Under a service manager: the notifications a systemd unit of
//! `Type=notify-reload` relies on, read from a real Unix datagram socket
//! while real signals drive the gateway.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

/// The next notification (one datagram, `KEY=value` lines).
fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Skips watchdog pings and status updates until a message with `key`.
fn until(socket: &UnixDatagram, key: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no {key}; saw {seen:?}");
        let message = next(socket);
        seen.push(message.clone());
        if message.lines().any(|l| l == key) {
            return message;
        }
    }
}

#[test]
fn ready_watchdog_reloading_ready_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let config =
        "[gateway]\nlog = \"json\"\nshutdown_grace = \"1s\"\n\n[[service]]\nname = \"m\"\n\
                  type = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:9\"\n";
    let gateway_dir = tempfile::tempdir().unwrap();
    let mut gateway = RunningGateway::start_with_env(
        gateway_dir,
        config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut seen = Vec::new();
    let ready = until(&socket, "READY=1", &mut seen);
    // READY comes after the listeners are bound: the port takes connections.
    std::net::TcpStream::connect(gateway.addr("m")).expect("listening when READY");
    assert!(
        ready.contains("STATUS=1 services, 0 connections, links up 0/0"),
        "{ready}"
    );
    // Pings every half WATCHDOG_USEC.
    until(&socket, "WATCHDOG=1", &mut seen);
    until(&socket, "WATCHDOG=1", &mut seen);
    gateway.signal("HUP");
    let reloading = until(&socket, "RELOADING=1", &mut seen);
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading}"
    );
    until(&socket, "READY=1", &mut seen);
    gateway.signal("TERM");
    until(&socket, "STOPPING=1", &mut seen);
    assert!(gateway.wait_exit(Duration::from_secs(20)).success());
}

/// The unit in packaging/ passes `systemd-analyze verify` (pointed at the
/// binary under test), where systemd is installed.
#[test]
fn the_systemd_unit_verifies() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: unit not verified");
        return;
    }
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/linkgate.service"),
    )
    .unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "NoNewPrivileges=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    ] {
        assert!(unit.contains(line), "unit lacks {line}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("linkgate.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/linkgate", linkgate_bin().to_str().unwrap()),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
