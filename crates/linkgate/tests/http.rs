//! The HTTP proxy with real clients (curl, Python requests, reqwest) against
//! a hyper origin server that shows what it received.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(20);

/// An origin server: `/headers` answers with the request's headers, one per
/// line; `/sha256` answers with the body's length and SHA-256; `/big`
/// answers with 8 MB of known bytes; anything else says "hello".
async fn origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: Request<hyper::body::Incoming>| async move {
                        let path = request.uri().path().to_string();
                        let body = match path.as_str() {
                            "/headers" => {
                                let mut text = String::new();
                                for (name, value) in request.headers() {
                                    text.push_str(&format!(
                                        "{}: {}\n",
                                        name,
                                        value.to_str().unwrap_or("?")
                                    ));
                                }
                                Bytes::from(text)
                            }
                            "/sha256" => {
                                let body = request.into_body().collect().await.unwrap().to_bytes();
                                Bytes::from(format!("{} {}", body.len(), sha256_hex(&body)))
                            }
                            "/big" => Bytes::from(pseudo_random(8 * 1024 * 1024, 99)),
                            _ => Bytes::from_static(b"hello"),
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(body)))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    addr
}

fn http_config(extra: &str) -> String {
    let hash = linkgate::passwd::hash_password("wonderland").unwrap();
    format!(
        "[gateway]\nlog = \"json\"\n\n[[user]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n\n\
         [[service]]\nname = \"web\"\ntype = \"http\"\nlisten = \"127.0.0.1:0\"\nhandshake_timeout = \"1s\"\nconnect_timeout = \"1s\"\n\n\
         [[service]]\nname = \"locked\"\ntype = \"http\"\nlisten = \"127.0.0.1:0\"\nauth = \"password\"\n\n{extra}"
    )
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "15"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_get_post_reuse_and_connect_tunnel() {
    let origin = origin().await;
    let gateway = RunningGateway::start(&http_config(""));
    let proxy = gateway.addr("web").to_string();
    let dir = tempfile::tempdir().unwrap();
    // GET of 8 MB, hashed.
    let out = dir.path().join("big");
    let (ok, _, err) = curl(&[
        "-x",
        &proxy,
        "-o",
        out.to_str().unwrap(),
        &format!("http://{origin}/big"),
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        sha256_file(&out),
        sha256_hex(&pseudo_random(8 * 1024 * 1024, 99))
    );
    // POST of 20 MB, streamed through.
    let upload = dir.path().join("upload");
    let body = pseudo_random(20 * 1024 * 1024, 5);
    std::fs::write(&upload, &body).unwrap();
    let (ok, answer, err) = curl(&[
        "-x",
        &proxy,
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("http://{origin}/sha256"),
    ]);
    assert!(ok, "{err}");
    assert_eq!(answer, format!("{} {}", body.len(), sha256_hex(&body)));
    // Two URLs on one connection.
    let (ok, answer, err) = curl(&[
        "-v",
        "-x",
        &proxy,
        &format!("http://{origin}/a"),
        &format!("http://{origin}/b"),
    ]);
    assert!(ok, "{err}");
    assert_eq!(answer, "hellohello");
    assert!(
        err.contains("Re-using existing connection") || err.contains("Reusing existing"),
        "{err}"
    );
    // CONNECT tunnel (-p).
    let (ok, answer, err) = curl(&["-p", "-x", &proxy, &format!("http://{origin}/tunnelled")]);
    assert!(ok, "{err}");
    assert_eq!(answer, "hello");
    let audits = gateway.wait_for_audits(5, WAIT);
    assert_eq!(audits[0]["target"], format!("http://{origin}/big"));
    assert_eq!(audits[0]["reason"], "200 OK");
    assert!(audits[0]["bytes_down"].as_u64().unwrap() >= 8 * 1024 * 1024);
    assert_eq!(audits[1]["bytes_up"].as_u64().unwrap(), body.len() as u64);
    assert_eq!(
        audits[2]["conn_id"], audits[3]["conn_id"],
        "both requests on one connection"
    );
    assert_eq!(audits[4]["target"], origin.to_string());
    assert_eq!(audits[4]["reason"], "tunnel closed");
    assert!(audits.iter().all(|a| a["result"] == "ok"), "{audits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_and_proxy_authorization_are_not_forwarded() {
    let origin = origin().await;
    let gateway = RunningGateway::start(&http_config(""));
    let locked = gateway.addr("locked").to_string();
    let (ok, seen, err) = curl(&[
        "-x",
        &locked,
        "--proxy-user",
        "alice:wonderland",
        "-H",
        "Connection: X-Hop-Secret",
        "-H",
        "X-Hop-Secret: must-not-pass",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "X-End-To-End: passes",
        &format!("http://{origin}/headers"),
    ]);
    assert!(ok, "{err}");
    let seen = seen.to_ascii_lowercase();
    assert!(seen.contains("x-end-to-end: passes"), "{seen}");
    assert!(seen.contains("via: 1.1 linkgate"), "{seen}");
    assert!(seen.contains(&format!("host: {origin}")), "{seen}");
    for hidden in [
        "x-hop-secret",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "connection:",
    ] {
        assert!(
            !seen.contains(hidden),
            "{hidden} reached the origin:\n{seen}"
        );
    }
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["user"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_authentication_is_required_and_wrong_passwords_are_refused() {
    let origin = origin().await;
    let gateway = RunningGateway::start(&http_config(""));
    let locked = gateway.addr("locked").to_string();
    let url = format!("http://{origin}/");
    let (_, head, _) = curl(&["-i", "-x", &locked, &url]);
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("proxy-authenticate: basic realm=\"linkgate\""),
        "{head}"
    );
    let (_, head, _) = curl(&["-i", "-x", &locked, "--proxy-user", "alice:nope", &url]);
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    let (ok, body, _) = curl(&["-x", &locked, "--proxy-user", "alice:wonderland", &url]);
    assert!(ok);
    assert_eq!(body, "hello");
    let audits = gateway.wait_for_audits(3, WAIT);
    assert_eq!(audits[0]["result"], "auth_failed");
    assert_eq!(audits[1]["result"], "auth_failed");
    assert_eq!(audits[1]["reason"], "wrong password for user \"alice\"");
    assert_eq!(audits[2]["result"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_and_reqwest_go_through_the_proxy() {
    let origin = origin().await;
    let gateway = RunningGateway::start(&http_config(""));
    let proxy = gateway.addr("web");
    let script = format!(
        "import requests\nr = requests.get('http://{origin}/py', proxies={{'http': 'http://{proxy}'}}, timeout=10)\nprint(r.status_code, r.text)\n"
    );
    let out = tokio::task::spawn_blocking(move || python(&script))
        .await
        .unwrap();
    assert_eq!(out.trim(), "200 hello");
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{proxy}")).unwrap())
        .build()
        .unwrap();
    let text = client
        .get(format!("http://{origin}/rust"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text, "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_upstream_failures_get_their_status_codes() {
    let origin = origin().await;
    let extra = "[[service]]\nname = \"fenced\"\ntype = \"http\"\nlisten = \"127.0.0.1:0\"\ndestinations = [\"*.corp.example\"]\n";
    let gateway = RunningGateway::start(&http_config(extra));
    let proxy = gateway.addr("web").to_string();
    let status = |args: &[&str]| {
        let (_, out, _) = curl(&[&["-o", "/dev/null", "-w", "%{http_code}"], args].concat());
        out
    };
    assert_eq!(
        status(&[
            "-x",
            &gateway.addr("fenced").to_string(),
            &format!("http://{origin}/")
        ]),
        "403"
    );
    assert_eq!(
        status(&["-x", &proxy, &format!("http://{}/", closed_port())]),
        "502"
    );
    // A destination whose accept queue is full never answers the SYN: 504.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _fillers: Vec<_> = (0..300)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&silent_addr, Duration::from_millis(50)).ok()
        })
        .collect();
    assert_eq!(
        status(&["-x", &proxy, &format!("http://{silent_addr}/")]),
        "504"
    );
    // Not a proxy request: 400 with the reason.
    let (_, body, _) = curl(&[&format!("http://{proxy}/")]);
    assert!(body.contains("this is a proxy"), "{body}");
    let audits = gateway.wait_for_audits(4, WAIT);
    assert_eq!(audits[0]["result"], "denied");
    assert!(audits[1]["reason"]
        .as_str()
        .unwrap()
        .contains("Connection refused"));
    assert!(audits[2]["reason"].as_str().unwrap().contains("timed out"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_slow_clients_are_cut_off_without_hurting_others() {
    let origin = origin().await;
    let gateway = RunningGateway::start(&http_config(""));
    let proxy = gateway.addr("web");
    // A header flood gets 431 and a closed connection.
    let mut flood = TcpStream::connect(proxy).await.unwrap();
    let mut request = format!("GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\n");
    for i in 0..3000 {
        request.push_str(&format!("X-Flood-{i}: {}\r\n", "a".repeat(30)));
    }
    request.push_str("\r\n");
    let _ = flood.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, flood.read_to_end(&mut answer))
        .await
        .expect("closed");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // Garbage gets 400.
    let mut garbage = TcpStream::connect(proxy).await.unwrap();
    garbage
        .write_all(b"\x00\x01\x02 not http\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, garbage.read_to_end(&mut answer))
        .await
        .expect("closed");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // A partial request line is dropped after the handshake timeout (1s)...
    let mut slow = TcpStream::connect(proxy).await.unwrap();
    slow.write_all(b"GET http://").await.unwrap();
    // ...while another client is served normally meanwhile.
    let (ok, body, _) = curl(&["-x", &proxy.to_string(), &format!("http://{origin}/")]);
    assert!(ok && body == "hello");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, slow.read_to_end(&mut rest))
        .await
        .expect("slow client closed");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_config_serves_socks_and_http() {
    let origin = origin().await;
    let config = linkgate::config::DEFAULT_CONFIG
        .replace("127.0.0.1:1080", "127.0.0.1:0")
        .replace("127.0.0.1:3128", "127.0.0.1:0")
        .replace("127.0.0.1:9180", "127.0.0.1:0")
        .replace("[gateway]\n", "[gateway]\nlog = \"json\"\n");
    let gateway = RunningGateway::start(&config);
    let url = format!("http://{origin}/");
    let (ok, body, err) = curl(&["-x", &gateway.addr("http").to_string(), &url]);
    assert!(ok && body == "hello", "{err}");
    let (ok, body, err) = curl(&[
        "--socks5-hostname",
        &gateway.addr("socks").to_string(),
        &url,
    ]);
    assert!(ok && body == "hello", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_a_request_uri_never_reach_the_audit_log() {
    let origin = origin().await;
    let gateway = RunningGateway::start(&http_config(""));
    let mut client = TcpStream::connect(gateway.addr("web")).await.unwrap();
    let request = format!(
        "GET http://bob:hunter2@{origin}/ HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n"
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer).ends_with("hello"));
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["target"], format!("http://{origin}/"));
    assert!(!gateway.lines().join("\n").contains("hunter2"));
}
