//! SIGHUP reload: a bad file changes nothing; a good one keeps unchanged
//! services (and everyone's established connections) and applies the rest.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(20);

/// A server that greets with its name, then echoes.
async fn named_server(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if socket.write_all(name.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn greeting(stream: &mut TcpStream) -> String {
    let mut buf = [0u8; 1];
    stream.read_exact(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

async fn echo(stream: &mut TcpStream, text: &[u8]) {
    stream.write_all(text).await.unwrap();
    let mut back = vec![0u8; text.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, text);
}

fn mapping(name: &str, target: SocketAddr) -> String {
    format!("[[service]]\nname = \"{name}\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{target}\"\n\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_file_keeps_connections_and_rejects_a_bad_one() {
    let a = named_server("A").await;
    let b = named_server("B").await;
    let head = "[gateway]\nlog = \"json\"\n\n";
    let first = format!(
        "{head}{}{}{}",
        mapping("keep", a),
        mapping("gone", a),
        mapping("moved", a)
    );
    let gateway = RunningGateway::start(&first);
    let config_path = gateway.dir.path().join("linkgate.toml");
    let (keep, gone, moved) = (
        gateway.addr("keep"),
        gateway.addr("gone"),
        gateway.addr("moved"),
    );
    let mut kept_conn = TcpStream::connect(keep).await.unwrap();
    assert_eq!(greeting(&mut kept_conn).await, "A");
    let mut moved_conn = TcpStream::connect(moved).await.unwrap();
    assert_eq!(greeting(&mut moved_conn).await, "A");

    // A broken file is rejected and nothing changes.
    std::fs::write(
        &config_path,
        format!("{first}\n[[service]]\nname = \"broken\"\n"),
    )
    .unwrap();
    gateway.signal("HUP");
    gateway.wait_for_line(|l| l.contains("the new configuration is rejected"), WAIT);
    let mut still = TcpStream::connect(gone).await.unwrap();
    assert_eq!(greeting(&mut still).await, "A");
    drop(still);

    // A good file: keep unchanged, gone removed, moved retargeted, added new.
    let second = format!(
        "{head}{}{}{}",
        mapping("keep", a),
        mapping("moved", b),
        mapping("added", b)
    );
    std::fs::write(&config_path, second).unwrap();
    gateway.signal("HUP");
    gateway.wait_for_line(|l| l.contains("configuration reloaded"), WAIT);
    echo(&mut kept_conn, b"established connections live on").await;
    echo(&mut moved_conn, b"even through a changed service").await;
    let mut again = TcpStream::connect(keep).await.unwrap();
    assert_eq!(
        greeting(&mut again).await,
        "A",
        "an unchanged service keeps its listener"
    );
    assert!(
        TcpStream::connect(gone).await.is_err(),
        "a removed service stops listening"
    );
    let moved_now = *gateway.addrs("moved").last().unwrap();
    let mut retargeted = TcpStream::connect(moved_now).await.unwrap();
    assert_eq!(greeting(&mut retargeted).await, "B");
    let mut added = TcpStream::connect(gateway.addr("added")).await.unwrap();
    assert_eq!(greeting(&mut added).await, "B");
    let reloaded = gateway
        .records()
        .into_iter()
        .find(|r| r["message"] == "configuration reloaded")
        .unwrap();
    assert_eq!(
        (
            reloaded["kept"].as_u64(),
            reloaded["stopped"].as_u64(),
            reloaded["started"].as_u64()
        ),
        (Some(1), Some(2), Some(2))
    );
}
