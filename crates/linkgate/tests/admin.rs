//! The admin endpoint and `linkgate status`.

mod common;

use std::time::Duration;

use common::servers::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_metrics_page_and_the_status_command() {
    let echo = echo_server().await;
    // The peer "hub" never answers: a listener that is never accepted from
    // (a port merely closed could be handed to one of this gateway's own
    // listeners, and the dialer would then knock on it).
    let silent_hub = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = format!(
        "[gateway]\nname = \"office\"\nlog = \"json\"\nadmin = \"127.0.0.1:0\"\n\n\
         [[peer]]\nname = \"hub\"\nconnect = \"{}\"\npassword = \"pw\"\n\n\
         [[service]]\nname = \"web\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{echo}\"\n\n\
         [[service]]\nname = \"closed\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{echo}\"\nallow = \"10.0.0.0/8\"\n",
        silent_hub.local_addr().unwrap()
    );
    let gateway = RunningGateway::start(&config);
    let admin = gateway
        .records()
        .iter()
        .find(|r| r["message"] == "admin listening")
        .and_then(|r| r["listen"].as_str().map(str::to_string))
        .expect("admin address in the log");
    let mut client = TcpStream::connect(gateway.addr("web")).await.unwrap();
    client.write_all(b"12345").await.unwrap();
    client.shutdown().await.unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.unwrap();
    let mut refused = TcpStream::connect(gateway.addr("closed")).await.unwrap();
    let _ = refused.read(&mut [0u8; 1]).await;
    // One live connection too.
    let mut live = TcpStream::connect(gateway.addr("web")).await.unwrap();
    live.write_all(b"x").await.unwrap();
    live.read_exact(&mut [0u8; 1]).await.unwrap();
    gateway.wait_for_audits(2, WAIT);

    let http = reqwest::Client::new();
    let body = http
        .get(format!("http://{admin}/api/status"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["gateway"], "office");
    let web = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap()
        .clone();
    assert_eq!(
        (
            web["type"].as_str(),
            web["active"].as_i64(),
            web["ok"].as_u64()
        ),
        (Some("mapping"), Some(1), Some(1))
    );
    // Bytes so far: the finished connection's 5 each way and the live
    // one's byte each way.
    assert_eq!(
        (web["bytes_up"].as_u64(), web["bytes_down"].as_u64()),
        (Some(6), Some(6))
    );
    let closed = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "closed")
        .unwrap()
        .clone();
    assert_eq!(closed["denied"], 1);
    // The refusal is among the recent events the console shows.
    assert!(
        status["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "denied"
                && e["text"]
                    .as_str()
                    .unwrap()
                    .starts_with("closed: 127.0.0.1:")),
        "{}",
        status["events"]
    );
    assert_eq!(status["links"][0]["peer"], "hub");
    assert_eq!(status["links"][0]["role"], "dials");
    assert_eq!(status["links"][0]["auth"], "password");
    assert_eq!(status["links"][0]["state"], "down");

    let metrics = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("linkgate_connections_total{service=\"web\",result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("linkgate_connections_active{service=\"web\"} 1"));
    assert!(metrics.contains("linkgate_bytes_total{service=\"web\",direction=\"up\"} 6"));
    assert!(metrics.contains("linkgate_link_up{peer=\"hub\"} 0"));
    assert!(
        metrics.contains("linkgate_connection_duration_seconds_count{service=\"web\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("linkgate_link_reconnects_total{peer=\"hub\"} 0"));
    assert!(metrics.lines().any(|l| l.starts_with("linkgate_open_fds ")));
    let page = http
        .get(format!("http://{admin}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The console draws itself from /api/status (tests/console.rs renders
    // it in a browser).
    assert!(page.contains("<title>linkgate</title>") && page.contains("/api/status"));

    let (code, out, err) = run_cli(&["status", "--admin", &admin], "");
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("gateway office (linkgate "), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("web ") && l.contains("mapping")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("link hub")
            && l.contains("dials")
            && l.contains("password")
            && l.ends_with("down")),
        "{out}"
    );
    let (code, _, err) = run_cli(&["status", "--admin", &closed_port().to_string()], "");
    assert_eq!(code, 1);
    assert!(err.contains("cannot get the status from"), "{err}");
}
