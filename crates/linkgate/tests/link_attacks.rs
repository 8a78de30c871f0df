//! The link listener under attack: floods of wrong-password logins and of
//! idle connections neither let an attacker guess fast nor keep a correct
//! peer out, from another address at once and from the same address soon
//! after the flood stops.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::pair::*;
use common::servers::{echo_server, round_trip};
use common::*;
use link::handshake::HandshakeError;
use link::io::LinkHandshakeError;
use tokio::net::{TcpSocket, TcpStream};

async fn connect_from(source: &str, hub: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket.connect(hub).await
}

/// One login with a wrong password from `source`: Ok(true) if the hub
/// answered busy, Ok(false) if it let the guess be tested.
async fn wrong_login(source: &str, hub: SocketAddr) -> bool {
    let mut tcp = connect_from(source, hub).await.unwrap();
    match link::io::dial(&mut tcp, "spoke", b"not the password").await {
        Err(LinkHandshakeError::Handshake(HandshakeError::Busy { retry_after, .. })) => {
            assert!((1..=10).contains(&retry_after), "retry after {retry_after}");
            true
        }
        Err(LinkHandshakeError::Handshake(HandshakeError::Authentication)) => false,
        other => panic!("unexpected outcome: {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_floods_neither_outrun_the_throttle_nor_lock_a_correct_peer_out() {
    let echo = echo_server().await;
    let hub = RunningGateway::start(&hub_config(&hub_service(echo)));
    let hub_link = link_addr(&hub);

    // A guesser at 127.0.0.2: ten answers, then busy at once (no sleeping).
    let started = Instant::now();
    let mut tested = 0;
    for _ in 0..30 {
        if !wrong_login("127.0.0.2", hub_link).await {
            tested += 1;
        }
    }
    assert_eq!(tested, 10, "guesses the hub let through");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refusals are immediate"
    );
    hub.wait_for_line(
        |l| l.contains("throttling link logins from 127.0.0.2"),
        WAIT,
    );
    // The same address holds idle connections open too.
    let mut idle = Vec::new();
    for _ in 0..500 {
        if let Ok(tcp) = connect_from("127.0.0.2", hub_link).await {
            idle.push(tcp);
        }
    }

    // Meanwhile a correct spoke at 127.0.0.1 links at once.
    let linking = Instant::now();
    let spoke = RunningGateway::start(&spoke_config(hub_link, PASSWORD, "spoke", SPOKE_SERVICE));
    wait_link_up(&spoke, 1);
    let took = linking.elapsed();
    eprintln!("correct spoke from another address linked in {took:?} during the flood");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(round_trip(spoke.addr("web"), b"through").await, b"through");
    drop(spoke);
    drop(idle);

    // Now the flood comes from the spoke's own address, 127.0.0.1...
    let mut busy = false;
    for _ in 0..15 {
        busy |= wrong_login("127.0.0.1", hub_link).await;
    }
    assert!(busy, "the second guesser is throttled too");
    // ...and once it stops, the correct spoke there gets in within seconds
    // (it waits out the hub's hint, 6 s per login token).
    let linking = Instant::now();
    let spoke = RunningGateway::start(&spoke_config(hub_link, PASSWORD, "spoke", SPOKE_SERVICE));
    wait_link_up(&spoke, 1);
    let took = linking.elapsed();
    eprintln!("correct spoke from the offending address linked {took:?} after the flood");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(spoke.count_lines(|l| l.contains("not taking link logins from here now")) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_dropped_after_three_seconds() {
    let hub = RunningGateway::start(&hub_config(""));
    let mut silent = TcpStream::connect(link_addr(&hub)).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .expect("the hub closes a silent connection")
    .unwrap_or(0);
    assert_eq!(n, 0);
    let held = started.elapsed();
    assert!(
        held >= Duration::from_secs(2) && held < Duration::from_secs(8),
        "held {held:?}"
    );
}
