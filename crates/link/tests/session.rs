//! Sessions over real loopback TCP: handshake, many streams both ways,
//! half-close, refusal, clean close and truncation.

use std::time::Duration;

use linkgate_link::handshake::{Identity, PeerRecord};
use linkgate_link::session::{LinkEnd, OpenError, Role, Session, SessionConfig};
use rand::rngs::OsRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn pair(
    config: SessionConfig,
) -> (
    (
        Session,
        tokio::sync::mpsc::Receiver<linkgate_link::session::IncomingStream>,
    ),
    (
        Session,
        tokio::sync::mpsc::Receiver<linkgate_link::session::IncomingStream>,
    ),
) {
    pair_with(config.clone(), config).await
}

/// Like [`pair`], with the hub's session tuned apart from the dialer's.
async fn pair_with(
    config: SessionConfig,
    hub_config: SessionConfig,
) -> (
    (
        Session,
        tokio::sync::mpsc::Receiver<linkgate_link::session::IncomingStream>,
    ),
    (
        Session,
        tokio::sync::mpsc::Receiver<linkgate_link::session::IncomingStream>,
    ),
) {
    let identity = Identity::generate(&mut OsRng);
    let static_keys = identity.static_keys();
    let record = PeerRecord::register(&mut OsRng, &identity, "branch", b"pw").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hub = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let peers = OnePeer(record);
        let (user, keys) = linkgate_link::io::accept(&mut tcp, &identity, &static_keys, &peers)
            .await
            .map_err(|f| f.error.to_string())
            .unwrap();
        assert_eq!(user, "branch");
        (tcp, keys)
    });
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let keys = linkgate_link::io::dial(&mut tcp, "branch", b"pw")
        .await
        .unwrap();
    let (hub_tcp, hub_keys) = hub.await.unwrap();
    let dialer = Session::start(tcp, keys, Role::Dialer, config);
    let acceptor = Session::start(hub_tcp, hub_keys, Role::Acceptor, hub_config);
    (dialer, acceptor)
}

/// A hub that knows one password-mode peer, "branch".
struct OnePeer(PeerRecord);

impl linkgate_link::io::HubPeers for OnePeer {
    fn record(&self, user: &str) -> Option<PeerRecord> {
        (user == "branch").then(|| self.0.clone())
    }
    fn key_peer(&self, _: &[u8; 32]) -> Option<String> {
        None
    }
    fn fresh(&self, _: &str, _: u64) -> bool {
        false
    }
}

/// Echoes every accepted stream until its EOF, then half-closes.
fn serve_echo(mut incoming: tokio::sync::mpsc::Receiver<linkgate_link::session::IncomingStream>) {
    tokio::spawn(async move {
        while let Some(request) = incoming.recv().await {
            if request.service != "echo" {
                request.refuse("no such service");
                continue;
            }
            let stream = request.accept().unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(stream);
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
        }
    });
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends `payload` on a new stream to the echo service, `chunk` bytes at a
/// time with `pause` between chunks, half-closes, and returns what came back.
async fn echo(dialer: &Session, payload: Vec<u8>, chunk: usize, pause: Duration) -> Vec<u8> {
    let stream = dialer.open("echo").await.unwrap();
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        for piece in payload.chunks(chunk.max(1)) {
            w.write_all(piece).await.unwrap();
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        w.shutdown().await.unwrap();
        w
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    let _w = writer.await.unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_echo_intact_with_small_windows() {
    let config = SessionConfig {
        window: 16 * 1024,
        ..SessionConfig::default()
    };
    let ((dialer, _), (_acceptor, incoming)) = pair(config).await;
    serve_echo(incoming);
    let mut tasks = Vec::new();
    for i in 0..50u8 {
        let dialer = dialer.clone();
        tasks.push(tokio::spawn(async move {
            let payload = data(200_000 + i as usize * 1000, i);
            let back = echo(&dialer, payload.clone(), payload.len(), Duration::ZERO).await;
            assert!(back == payload, "stream {i} corrupted");
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("no deadlock")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_key_exchanges_mid_transfer_keep_every_byte() {
    // Rounds every 30 ms and every 4 MiB: many switches while 8 streams
    // move 48 MiB both ways, some of them in the middle of a write batch.
    let config = SessionConfig {
        key_exchange_interval: Duration::from_millis(30),
        key_exchange_bytes: 4 << 20,
        ..SessionConfig::default()
    };
    let ((dialer, _), (acceptor, incoming)) = pair(config).await;
    serve_echo(incoming);
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let dialer = dialer.clone();
        tasks.push(tokio::spawn(async move {
            let payload = data(3 << 20, i);
            let back = echo(&dialer, payload.clone(), 100_000, Duration::from_millis(2)).await;
            assert!(back == payload, "stream {i} corrupted");
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("no deadlock")
            .unwrap();
    }
    // Rounds ran during the transfer (how many depends on the machine's
    // speed); more follow on the quiet link.
    let during = dialer.stats().key_exchanges;
    assert!(during >= 1, "no key exchange during the transfer");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while dialer.stats().key_exchanges < during + 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "key exchanges stopped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (dialer_rounds, hub_rounds) =
        (dialer.stats().key_exchanges, acceptor.stats().key_exchanges);
    assert!(
        hub_rounds.abs_diff(dialer_rounds) <= 1,
        "hub {hub_rounds}, dialer {dialer_rounds}"
    );
    assert!(!dialer.is_ended() && !acceptor.is_ended());
    // The link still works after the last switch.
    let mut stream = dialer.open("echo").await.unwrap();
    stream.write_all(b"after").await.unwrap();
    let mut back = [0u8; 5];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"after");
}

#[tokio::test]
async fn either_side_opens_and_refusals_carry_the_reason() {
    let ((dialer, dialer_incoming), (acceptor, acceptor_incoming)) =
        pair(SessionConfig::default()).await;
    serve_echo(dialer_incoming);
    serve_echo(acceptor_incoming);
    for session in [&dialer, &acceptor] {
        let mut stream = session.open("echo").await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hello");
    }
    match dialer.open("nope").await {
        Err(OpenError::Refused(reason)) => assert_eq!(reason, "no such service"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn close_is_clean_on_both_sides_and_streams_fail_afterwards() {
    let ((dialer, _), (acceptor, incoming)) = pair(SessionConfig::default()).await;
    serve_echo(incoming);
    dialer.close("bye");
    assert_eq!(acceptor.ended().await, LinkEnd::Closed("bye".into()));
    assert!(matches!(dialer.ended().await, LinkEnd::Closed(_)));
    assert!(matches!(
        dialer.open("echo").await,
        Err(OpenError::LinkDown(_))
    ));
}

#[tokio::test]
async fn silence_is_detected() {
    let config = SessionConfig {
        keepalive: Duration::from_secs(3600),
        dead_after: Duration::from_millis(300),
        ..SessionConfig::default()
    };
    // Only the dialer's patience is short: were the hub's too, it could
    // give up first and the dialer would see its socket close instead.
    let hub = SessionConfig {
        keepalive: Duration::from_secs(3600),
        dead_after: Duration::from_secs(60),
        ..SessionConfig::default()
    };
    let ((dialer, _), (_acceptor, _)) = pair_with(config, hub).await;
    match dialer.ended().await {
        LinkEnd::Failed(reason) => assert!(reason.contains("nothing received"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn keepalive_keeps_an_idle_link_up() {
    let config = SessionConfig {
        keepalive: Duration::from_millis(50),
        dead_after: Duration::from_millis(400),
        ..SessionConfig::default()
    };
    let ((dialer, _), (acceptor, _)) = pair(config).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!dialer.is_ended() && !acceptor.is_ended());
}

/// A side that sends its end of stream and leaves (as HTTP clients do with
/// idle pooled connections) lets the other side finish cleanly: reading
/// gives EOF and shutting down succeeds; only writing data fails.
#[tokio::test]
async fn a_peer_that_finished_and_left_does_not_fail_the_shutdown() {
    let ((dialer, _dialer_incoming), (_acceptor, mut acceptor_incoming)) =
        pair(SessionConfig::default()).await;
    let accepted = tokio::spawn(async move {
        let request = acceptor_incoming.recv().await.unwrap();
        request.accept().unwrap()
    });
    let mut leaving = dialer.open("svc").await.unwrap();
    let mut staying = accepted.await.unwrap();
    leaving.write_all(b"last words").await.unwrap();
    leaving.shutdown().await.unwrap();
    drop(leaving);
    let mut got = Vec::new();
    staying.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"last words");
    // Let the reset of the dropped stream arrive.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(staying.write_all(b"too late").await.is_err());
    staying.shutdown().await.unwrap();
}

/// A session proves itself with its first record (each side PINGs at once);
/// one whose other end sends nothing never does.
#[tokio::test]
async fn a_session_is_authenticated_by_the_first_record_from_the_other_side() {
    let ((dialer, _), (acceptor, _)) = pair(SessionConfig::default()).await;
    for session in [&dialer, &acceptor] {
        tokio::time::timeout(Duration::from_secs(5), session.authenticated())
            .await
            .map(|proven| assert!(proven))
            .expect("the other side's first PING arrives at once");
    }
    // A handshake whose sender cannot follow it with records: here, a
    // session over a connection whose other end stays silent.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (_held, _) = listener.accept().await.unwrap();
    let keys = linkgate_link::handshake::SessionKeys {
        send: [1; 32],
        recv: [2; 32],
        session_id: [0; 32],
        features: linkgate_link::params::Features::NONE,
    };
    let (lonely, _) = Session::start(silent, keys, Role::Acceptor, SessionConfig::default());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), lonely.authenticated())
            .await
            .is_err(),
        "no record, no proof"
    );
}

/// Datagrams cross both ways whole and in order, each flow keeps its own,
/// the opener names the service, and a flood of them beside a bulk stream
/// starves neither: the stream's bytes all arrive, and so do most of the
/// datagrams (the rest dropped, counted, never queued without bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_cross_whole_in_order_and_share_the_link_with_streams() {
    let ((dialer, _), (acceptor, incoming)) = pair(SessionConfig::default()).await;
    serve_echo(incoming);
    let mut at_hub = acceptor.take_datagrams().unwrap();
    let mut at_branch = dialer.take_datagrams().unwrap();
    assert!(dialer.take_datagrams().is_none(), "taken once");
    // Two flows from the branch; the hub answers each on its own flow.
    let (a, b) = (dialer.open_flow(), dialer.open_flow());
    assert_ne!(a, b);
    assert!(acceptor.peer_flow(a) && !dialer.peer_flow(a));
    for i in 0..200u32 {
        let flow = if i % 2 == 0 { a } else { b };
        let payload = data(1 + (i as usize * 37) % 8000, i as u8);
        dialer.send_datagram(flow, Some("dns"), &payload).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), at_hub.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((got.flow, got.service.as_deref()), (flow, Some("dns")));
        assert_eq!(got.payload, payload);
        acceptor
            .send_datagram(got.flow, None, &got.payload)
            .unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), at_branch.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((back.flow, back.service), (flow, None));
        assert_eq!(back.payload, payload);
    }
    // The largest datagram a link carries, and one byte more refused.
    let largest = data(linkgate_link::frame::MAX_DATAGRAM, 9);
    dialer.send_datagram(a, Some("dns"), &largest).unwrap();
    let got = at_hub.recv().await.unwrap();
    assert_eq!(got.payload, largest);
    assert_eq!(
        dialer.send_datagram(
            a,
            Some("dns"),
            &data(linkgate_link::frame::MAX_DATAGRAM + 1, 1)
        ),
        Err(linkgate_link::mux::DatagramDrop::TooLarge)
    );
    // A bulk stream and a flood of datagrams at once.
    let bulk = data(8 << 20, 3);
    let echoing = {
        let dialer = dialer.clone();
        let bulk = bulk.clone();
        tokio::spawn(async move { echo(&dialer, bulk, 64 * 1024, Duration::ZERO).await })
    };
    // The flood's end is a datagram on a flow of its own (datagrams are
    // sent in order, so it comes after the flood's survivors).
    let end_flow = dialer.open_flow();
    let flood = tokio::spawn(async move {
        let mut received = 0u32;
        while let Some(datagram) = at_hub.recv().await {
            if datagram.flow == end_flow {
                break;
            }
            received += 1;
        }
        received
    });
    let (mut sent, mut dropped) = (0u32, 0u32);
    for _ in 0..20_000 {
        match dialer.send_datagram(b, Some("dns"), &[7u8; 1000]) {
            Ok(()) => sent += 1,
            Err(_) => dropped += 1,
        }
        if (sent + dropped) % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(echoing.await.unwrap(), bulk, "the stream starved or broke");
    // The end marker may itself be dropped by a full queue: repeat it.
    while !flood.is_finished() {
        let _ = dialer.send_datagram(end_flow, Some("dns"), b"end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = flood.await.unwrap();
    assert!(
        received > 2000 && received <= sent,
        "datagrams starved: {received} of {sent} sent, {dropped} dropped"
    );
}

/// A message transport standing in for a WebSocket: counts the batches it
/// is given and sends a frame of its own (a pong) when told to.
#[derive(Default)]
struct SinkState {
    batches: usize,
    own_frame_due: bool,
    own_frames_sent: usize,
    idle_writer: Option<std::task::Waker>,
}

struct CountingSink(std::sync::Arc<std::sync::Mutex<SinkState>>);

impl linkgate_link::transport::BatchSink for CountingSink {
    fn poll_send(
        &mut self,
        _cx: &mut std::task::Context<'_>,
        _batch: &mut [u8],
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0.lock().unwrap().batches += 1;
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_idle(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let mut state = self.0.lock().unwrap();
        if std::mem::take(&mut state.own_frame_due) {
            state.own_frames_sent += 1;
            return std::task::Poll::Ready(Ok(()));
        }
        state.idle_writer = Some(cx.waker().clone());
        std::task::Poll::Pending
    }
}

/// What a message transport has to send of its own (a WebSocket pong) goes
/// out while the link is idle, not with the link's next batch a keepalive
/// interval later (a proxy that pings may give up first).
#[tokio::test]
async fn an_idle_link_lets_its_transport_send_frames_of_its_own() {
    use linkgate_link::transport::{Halves, WriteHalf};
    let state = std::sync::Arc::new(std::sync::Mutex::new(SinkState::default()));
    let (silent_peer, read) = tokio::io::duplex(1024);
    let keys = linkgate_link::handshake::SessionKeys {
        send: [1; 32],
        recv: [2; 32],
        session_id: [0; 32],
        features: linkgate_link::params::Features::NONE,
    };
    let config = SessionConfig {
        keepalive: Duration::from_secs(60),
        dead_after: Duration::from_secs(120),
        ..SessionConfig::default()
    };
    let transport = Halves(
        Box::new(read),
        WriteHalf::Batches(Box::new(CountingSink(state.clone()))),
    );
    let (_session, _) = Session::start(transport, keys, Role::Acceptor, config);
    let started = tokio::time::Instant::now();
    // The first PING goes at once; then the writer has nothing to send.
    while state.lock().unwrap().batches == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "no first batch");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    {
        let mut state = state.lock().unwrap();
        state.own_frame_due = true;
        if let Some(writer) = state.idle_writer.take() {
            writer.wake();
        }
    }
    let asked = tokio::time::Instant::now();
    while state.lock().unwrap().own_frames_sent == 0 {
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "the idle writer never let the transport send"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(state.lock().unwrap().batches, 1, "no batch was needed");
    drop(silent_peer);
}
