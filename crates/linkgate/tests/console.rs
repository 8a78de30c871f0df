//! The operator's console and its API: a live transfer shows up with its
//! client address and bytes while it runs (in headless Chromium too, with
//! chart data), counters move as bytes move and survive a reload, and with
//! `admin_users` every path wants a login (checked with curl).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(20);

/// A server that sends 16 KiB every 20 ms (about 0.8 MB/s) until the
/// client goes away: a long download.
fn slow_download() -> SocketAddr {
    common::servers::thread_server(|mut client| {
        let chunk = vec![0x42; 16 * 1024];
        while client.write_all(&chunk).is_ok() {
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// A client that reads from `addr` until `stop`; returns its own address.
fn downloading_client(addr: SocketAddr, stop: Arc<AtomicBool>) -> SocketAddr {
    let mut socket = TcpStream::connect(addr).unwrap();
    let local = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while !stop.load(Ordering::Relaxed) {
            if matches!(socket.read(&mut buf), Ok(0) | Err(_)) {
                return;
            }
        }
    });
    local
}

fn admin_addr(gateway: &RunningGateway) -> String {
    gateway
        .records()
        .iter()
        .find(|r| r["message"] == "admin listening")
        .and_then(|r| r["listen"].as_str().map(str::to_string))
        .expect("admin address")
}

/// GET `path` from the admin endpoint: (status code, body).
fn get(admin: &str, path: &str, login: Option<&str>) -> (u16, String) {
    let mut socket = TcpStream::connect(admin).unwrap();
    let auth = login.map_or(String::new(), |l| {
        use base64::Engine;
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(l)
        )
    });
    write!(
        socket,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).unwrap();
    let code = answer[9..12].parse().unwrap();
    (code, answer.split_once("\r\n\r\n").unwrap().1.to_string())
}

fn status(admin: &str) -> serde_json::Value {
    let (code, body) = get(admin, "/api/status", None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn gateway_config(target: SocketAddr, extra_service: &str) -> String {
    format!(
        "[gateway]\nlog = \"json\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n\n\
         [[service]]\nname = \"downloads\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\n\
         target = \"{target}\"\n{extra_service}"
    )
}

#[test]
fn a_live_transfer_shows_in_the_console_with_its_bytes_while_it_runs() {
    let server = slow_download();
    let gateway = RunningGateway::start(&gateway_config(server, ""));
    let admin = admin_addr(&gateway);
    let stop = Arc::new(AtomicBool::new(false));
    let client = downloading_client(gateway.addr("downloads"), stop.clone());

    // The API lists the connection with bytes counted so far, and the
    // service's counters include them (before the connection ends).
    let deadline = Instant::now() + WAIT;
    let (first, service_down) = loop {
        let st = status(&admin);
        let conn = st["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["client"] == client.to_string())
            .cloned();
        let service_down = st["services"][0]["bytes_down"].as_u64().unwrap();
        if let Some(conn) = conn.filter(|c| c["bytes_down"].as_u64().unwrap() > 100_000) {
            if service_down > 100_000 && st["history"].as_array().unwrap().len() >= 3 {
                break (conn, service_down);
            }
        }
        assert!(Instant::now() < deadline, "no live bytes: {st}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(first["service"], "downloads");
    assert_eq!(first["target"], server.to_string());
    assert!(service_down >= first["bytes_down"].as_u64().unwrap() / 2);

    // A real browser renders it: the row carries the client's address and
    // the service's chart has points. A screenshot is kept for a look.
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{admin}/");
    let browse = |extra: &[&str]| {
        let mut args = vec!["--virtual-time-budget=5000", "--window-size=1280,1400"];
        args.extend_from_slice(extra);
        headless_chromium(profile.path(), &args, &url)
    };
    let out = browse(&["--dump-dom"]);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains(&format!("data-client=\"{client}\"")),
        "the console lists the client:\n{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dom.contains("service downloads"), "{dom}");
    let points: Vec<usize> = dom
        .split("data-points=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next()?.parse().ok())
        .collect();
    assert!(points.iter().any(|&n| n >= 2), "chart points {points:?}");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    let _ = std::fs::remove_file(&shot);
    browse(&[&format!("--screenshot={}", shot.display())]);
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot of the console ({size} bytes)");

    // `linkgate status` lists the connection too.
    let (code, text, err) = run_cli(&["status", "--admin", &admin], "");
    assert_eq!(code, 0, "{err}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("conn downloads") && l.contains(&client.to_string())),
        "{text}"
    );
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn service_counters_survive_a_reload_that_restarts_the_service() {
    let server = slow_download();
    let gateway = RunningGateway::start(&gateway_config(server, ""));
    let admin = admin_addr(&gateway);
    let stop = Arc::new(AtomicBool::new(false));
    downloading_client(gateway.addr("downloads"), stop.clone());
    let deadline = Instant::now() + WAIT;
    let before = loop {
        let down = status(&admin)["services"][0]["bytes_down"]
            .as_u64()
            .unwrap();
        if down > 200_000 {
            break down;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    };
    // Change the service (so the reload restarts it), then reload.
    std::fs::write(
        gateway.dir.path().join("linkgate.toml"),
        gateway_config(server, "idle_timeout = \"1h\"\n"),
    )
    .unwrap();
    gateway.signal("HUP");
    gateway.wait_for_line(|l| l.contains("configuration reloaded"), WAIT);
    std::thread::sleep(Duration::from_millis(500));
    let after = status(&admin)["services"][0]["bytes_down"]
        .as_u64()
        .unwrap();
    assert!(
        after > before,
        "counters went from {before} to {after} over the reload"
    );
    // A service a reload cannot start is shown as failed, with the reason.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra = format!(
        "idle_timeout = \"1h\"\n\n[[service]]\nname = \"blocked\"\ntype = \"mapping\"\n\
         listen = \"{}\"\ntarget = \"{server}\"\n",
        taken.local_addr().unwrap()
    );
    std::fs::write(
        gateway.dir.path().join("linkgate.toml"),
        gateway_config(server, &extra),
    )
    .unwrap();
    gateway.signal("HUP");
    let deadline = Instant::now() + WAIT;
    loop {
        let st = status(&admin);
        let blocked = st["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "blocked")
            .cloned();
        if let Some(blocked) = blocked {
            assert_eq!(blocked["state"], "failed");
            assert!(
                blocked["failure"].as_str().unwrap().contains("in use"),
                "{blocked}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn with_admin_users_every_admin_path_wants_a_login() {
    let hash = {
        let (code, out, err) = run_cli(&["passwd"], "console-secret\nconsole-secret\n");
        assert_eq!(code, 0, "{err}");
        out.trim().to_string()
    };
    let gateway = RunningGateway::start(&format!(
        "[gateway]\nlog = \"json\"\nadmin = \"127.0.0.1:0\"\nadmin_users = [\"alice\"]\n\n\
         [[user]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n\n\
         [[user]]\nname = \"bob\"\npassword = \"bob-secret\"\n"
    ));
    let admin = admin_addr(&gateway);
    let curl = |path: &str, login: Option<&str>| {
        let mut command = Command::new("curl");
        command.args(["-s", "-o", "/dev/null", "-w", "%{http_code}"]);
        if let Some(login) = login {
            command.args(["-u", login]);
        }
        let out = command
            .arg(format!("http://{admin}{path}"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for path in ["/", "/api/status", "/metrics"] {
        assert_eq!(curl(path, None), "401", "{path} without a login");
        assert_eq!(
            curl(path, Some("alice:wrong")),
            "401",
            "{path}, wrong password"
        );
        assert_eq!(
            curl(path, Some("bob:bob-secret")),
            "401",
            "{path}, not an admin user"
        );
        assert_eq!(curl(path, Some("alice:console-secret")), "200", "{path}");
    }
    gateway.wait_for_line(|l| l.contains("admin login failed"), WAIT);
    assert!(
        !gateway.lines().iter().any(|l| l.contains("wrong")),
        "password in the log"
    );
    // `linkgate status` logs in with --user and the password from the
    // environment, and says what is missing without them.
    let (code, _, err) = run_cli(&["status", "--admin", &admin], "");
    assert_ne!(code, 0);
    assert!(err.contains("--user"), "{err}");
    let out = Command::new(linkgate_bin())
        .args(["status", "--admin", &admin, "--user", "alice"])
        .env("LINKGATE_ADMIN_PASSWORD", "console-secret")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, body) = get(&admin, "/api/status", Some("alice:console-secret"));
    assert_eq!(code, 200, "{body}");
}

#[test]
fn links_show_their_state_history_and_failed_logins() {
    use common::pair::*;
    let hub = RunningGateway::start(&hub_config("").replace(
        "shutdown_grace = \"2s\"\n",
        "shutdown_grace = \"2s\"\nadmin = \"127.0.0.1:0\"\n",
    ));
    let admin = admin_addr(&hub);
    let intruder = RunningGateway::start(&spoke_config(
        link_addr(&hub),
        "not the password",
        "spoke",
        "",
    ));
    intruder.wait_for_line(|l| l.contains("authentication failed"), WAIT);
    drop(intruder);
    let spoke = RunningGateway::start(&spoke_config(link_addr(&hub), PASSWORD, "spoke", ""));
    wait_link_up(&spoke, 1);
    let deadline = Instant::now() + WAIT;
    let link = loop {
        let link = status(&admin)["links"][0].clone();
        if link["state"] == "up" && link["rtt_ms"].is_f64() {
            break link;
        }
        assert!(Instant::now() < deadline, "{link}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(link["transport"], "tcp");
    assert!(link["since"].as_f64().unwrap() > 1.7e9);
    assert!(link["bytes_received"].as_u64().unwrap() > 0);
    let (_, metrics) = get(&admin, "/metrics", None);
    assert!(
        metrics.contains(
            "linkgate_link_handshake_failures_total{reason=\"wrong_password_or_unknown_user\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("linkgate_link_rtt_seconds{peer=\"spoke\"}"),
        "{metrics}"
    );
    // The spoke stops: the hub shows the link down, since when and why.
    drop(spoke);
    let deadline = Instant::now() + WAIT;
    let st = loop {
        let st = status(&admin);
        // (The state turns down the moment the session ends; its history
        // a moment later.)
        if st["links"][0]["state"] == "down" && st["links"][0]["last_end"].is_string() {
            break st;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    };
    let reason = st["links"][0]["last_end"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!reason.is_empty(), "{st}");
    let kinds: Vec<&str> = st["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    for kind in ["login_failed", "link_up", "link_down"] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
    // The link's byte counter is over the gateway's life: down, it still
    // has what the ended session moved.
    let received = st["links"][0]["bytes_received_total"].as_u64().unwrap();
    assert!(received >= link["bytes_received"].as_u64().unwrap(), "{st}");
    let (_, metrics) = get(&admin, "/metrics", None);
    assert!(
        metrics.contains(&format!(
            "linkgate_link_bytes_total{{peer=\"spoke\",direction=\"received\"}} {received}"
        )),
        "{metrics}"
    );
}
