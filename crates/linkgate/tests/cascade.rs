//! `via` chains: a second gateway reaches its targets through the first
//! one's SOCKS and HTTP proxies (SOCKS5 with login, SOCKS4, SOCKS4a, HTTP
//! CONNECT, and a two-hop chain).

mod common;

use std::time::Duration;

use common::servers::*;
use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(20);

fn proxies() -> RunningGateway {
    RunningGateway::start(
        "[gateway]\nlog = \"json\"\n\n[[user]]\nname = \"alice\"\npassword = \"wonderland\"\n\n\
         [[service]]\nname = \"s5\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\nauth = \"password\"\n\n\
         [[service]]\nname = \"s\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\n\n\
         [[service]]\nname = \"h\"\ntype = \"http\"\nlisten = \"127.0.0.1:0\"\n",
    )
}

fn via_mapping(name: &str, target: &str, via: &str) -> String {
    format!("[[service]]\nname = \"{name}\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{target}\"\nvia = {via}\n\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mappings_reach_their_targets_through_socks_and_http_proxies() {
    let echo = echo_server().await;
    let first = proxies();
    let (s5, s, h) = (first.addr("s5"), first.addr("s"), first.addr("h"));
    let by_name = format!("localhost:{}", echo.port());
    let nowhere = closed_port();
    let config = format!(
        "[gateway]\nlog = \"json\"\n\n{}{}{}{}{}{}{}",
        via_mapping(
            "via-s5",
            &echo.to_string(),
            &format!("\"socks5://alice:wonderland@{s5}\"")
        ),
        via_mapping("via-s4", &echo.to_string(), &format!("\"socks4://{s}\"")),
        via_mapping("via-s4a", &by_name, &format!("\"socks4a://{s}\"")),
        via_mapping("via-h", &echo.to_string(), &format!("\"http://{h}\"")),
        via_mapping(
            "chain",
            &echo.to_string(),
            &format!("[\"socks5://alice:wonderland@{s5}\", \"http://{h}\"]")
        ),
        via_mapping(
            "bad-login",
            &echo.to_string(),
            &format!("\"socks5://alice:wrong@{s5}\"")
        ),
        via_mapping(
            "to-nowhere",
            &nowhere.to_string(),
            &format!("\"socks5://{s}\"")
        ),
    );
    let second = RunningGateway::start(&config);
    let data = pseudo_random(1_000_000, 8);
    for name in ["via-s5", "via-s4", "via-s4a", "via-h", "chain"] {
        let back = round_trip(second.addr(name), &data).await;
        assert!(
            sha256_hex(&back) == sha256_hex(&data),
            "{name} corrupted or failed"
        );
    }
    let mut refused = TcpStream::connect(second.addr("bad-login")).await.unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(refused.read(&mut buf).await.unwrap_or(0), 0);
    let mut refused = TcpStream::connect(second.addr("to-nowhere")).await.unwrap();
    assert_eq!(refused.read(&mut buf).await.unwrap_or(0), 0);
    let audits = second.wait_for_audits(7, WAIT);
    let of = |name: &str| {
        audits
            .iter()
            .find(|a| a["service"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        of("via-s5")["via"],
        format!("socks5://alice:****@{s5}"),
        "password masked"
    );
    assert_eq!(
        of("chain")["via"],
        format!("socks5://alice:****@{s5},http://{h}")
    );
    assert!(["via-s5", "via-s4", "via-s4a", "via-h", "chain"]
        .iter()
        .all(|n| of(n)["result"] == "ok"));
    assert_eq!(of("bad-login")["result"], "error");
    assert_eq!(
        of("bad-login")["reason"],
        format!("via socks5://alice:****@{s5}: login as \"alice\" rejected")
    );
    // The proxy's reply code, in words.
    assert_eq!(
        of("to-nowhere")["reason"],
        format!(
            "via socks5://{s}: refused CONNECT to {nowhere}: connection refused (SOCKS5 reply 5)"
        )
    );
    assert!(
        !second.lines().join("\n").contains("wonderland"),
        "no password in logs"
    );
    // The proxies saw the chain: SOCKS to the HTTP proxy, HTTP CONNECT to the echo server.
    let first_audits = first.wait_for_audits(7, WAIT);
    assert!(first_audits
        .iter()
        .any(|a| a["service"] == "s5" && a["target"] == h.to_string()));
    assert!(first_audits
        .iter()
        .any(|a| a["service"] == "s" && a["target"] == by_name));
}
