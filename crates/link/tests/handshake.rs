//! The handshake in memory: success, wrong password, unknown user, every
//! flipped byte, replay, and a known-answer transcript.

use linkgate_link::handshake::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

struct Transcript {
    m1: Vec<u8>,
    m2: Vec<u8>,
    m3: Vec<u8>,
    m4: Vec<u8>,
}

#[allow(clippy::large_enum_variant)]
enum Outcome {
    Success {
        client: SessionKeys,
        server: SessionKeys,
        transcript: Transcript,
    },
    Failed,
}

/// Which message to corrupt, and how.
type Tamper<'a> = &'a dyn Fn(usize, &mut Vec<u8>);

fn run(
    seed: u64,
    registered_password: &[u8],
    login_password: &[u8],
    user: &str,
    known: bool,
    tamper: Tamper,
) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let identity = Identity::generate(&mut rng);
    let record = PeerRecord::register(&mut rng, &identity, "branch", registered_password).unwrap();
    let (client, mut m1) = client_start(&mut rng, user, login_password).unwrap();
    tamper(1, &mut m1);
    let Ok(hello) = parse_hello(&m1) else {
        return Outcome::Failed;
    };
    let record = (known && hello.user == "branch").then_some(&record);
    let Ok((server, mut m2)) = server_respond(&mut rng, &identity, record, hello) else {
        return Outcome::Failed;
    };
    tamper(2, &mut m2);
    let Ok((client, mut m3)) =
        client.receive_ke2(&mut rng, &m2, Some(&FixedEphemeral::new([1u8; 32])))
    else {
        return Outcome::Failed;
    };
    tamper(3, &mut m3);
    let (mut m4, server_keys) =
        match server.receive_finish(&m3, Some(&FixedEphemeral::new([2u8; 32]))) {
            Ok(done) => done,
            Err((_, refusal)) => {
                assert_eq!(refusal[0], 1, "a failed hub sends a refusal");
                return Outcome::Failed;
            }
        };
    tamper(4, &mut m4);
    let Ok(client_keys) = client.receive_final(&m4) else {
        return Outcome::Failed;
    };
    Outcome::Success {
        client: client_keys,
        server: server_keys,
        transcript: Transcript { m1, m2, m3, m4 },
    }
}

fn untouched(_: usize, _: &mut Vec<u8>) {}

#[test]
fn right_password_gives_matching_keys() {
    let Outcome::Success { client, server, .. } = run(1, b"pw", b"pw", "branch", true, &untouched)
    else {
        panic!("handshake failed");
    };
    assert_eq!(client.send, server.recv);
    assert_eq!(client.recv, server.send);
    assert_ne!(client.send, client.recv);
    assert_eq!(client.session_id, server.session_id);
    // Both announced what they support in their Noise payloads.
    assert_eq!(client.features, linkgate_link::params::Features::SUPPORTED);
    assert_eq!(server.features, linkgate_link::params::Features::SUPPORTED);
}

#[test]
fn wrong_password_is_detected_by_the_dialer_at_ke2() {
    let mut rng = StdRng::seed_from_u64(2);
    let identity = Identity::generate(&mut rng);
    let record = PeerRecord::register(&mut rng, &identity, "branch", b"right").unwrap();
    let (client, m1) = client_start(&mut rng, "branch", b"wrong").unwrap();
    let (_, m2) = server_respond(
        &mut rng,
        &identity,
        Some(&record),
        parse_hello(&m1).unwrap(),
    )
    .unwrap();
    let error = client.receive_ke2(&mut rng, &m2, None).err().unwrap();
    assert_eq!(error, HandshakeError::Authentication);
    // Logs put it after "authentication failed for peer 'NAME': ".
    assert_eq!(error.to_string(), "wrong password or unknown user");
}

#[test]
fn unknown_user_gets_a_reply_of_the_same_size_and_fails_the_same_way() {
    let mut rng = StdRng::seed_from_u64(3);
    let identity = Identity::generate(&mut rng);
    let record = PeerRecord::register(&mut rng, &identity, "branch", b"pw").unwrap();
    let (_, m1) = client_start(&mut rng, "branch", b"pw").unwrap();
    let (_, real) = server_respond(
        &mut rng,
        &identity,
        Some(&record),
        parse_hello(&m1).unwrap(),
    )
    .unwrap();
    let (client, m1) = client_start(&mut rng, "intruder", b"pw").unwrap();
    let (_, fake) = server_respond(&mut rng, &identity, None, parse_hello(&m1).unwrap()).unwrap();
    assert_eq!(real.len(), fake.len());
    assert_eq!(
        client.receive_ke2(&mut rng, &fake, None).err(),
        Some(HandshakeError::Authentication)
    );
}

#[test]
fn every_flipped_byte_of_every_message_fails_cleanly() {
    let Outcome::Success { transcript, .. } = run(4, b"pw", b"pw", "branch", true, &untouched)
    else {
        panic!()
    };
    let lengths = [
        transcript.m1.len(),
        transcript.m2.len(),
        transcript.m3.len(),
        transcript.m4.len(),
    ];
    for (index, &len) in lengths.iter().enumerate() {
        let message = index + 1;
        for position in 0..len {
            let tamper = move |which: usize, bytes: &mut Vec<u8>| {
                if which == message {
                    bytes[position] ^= 0x40;
                }
            };
            match run(4, b"pw", b"pw", "branch", true, &tamper) {
                Outcome::Failed => {}
                Outcome::Success { .. } => {
                    panic!("M{message} byte {position} flipped, yet the handshake succeeded")
                }
            }
        }
    }
}

#[test]
fn a_replayed_handshake_fails() {
    let Outcome::Success { transcript, .. } = run(5, b"pw", b"pw", "branch", true, &untouched)
    else {
        panic!()
    };
    // The attacker replays M1 and M3 to the hub (same identity and record).
    let mut rng = StdRng::seed_from_u64(5);
    let identity = Identity::generate(&mut rng);
    let record = PeerRecord::register(&mut rng, &identity, "branch", b"pw").unwrap();
    let mut fresh = StdRng::seed_from_u64(99);
    let (server, m2) = server_respond(
        &mut fresh,
        &identity,
        Some(&record),
        parse_hello(&transcript.m1).unwrap(),
    )
    .unwrap();
    assert_ne!(m2, transcript.m2, "the hub's reply is fresh");
    let (error, refusal) = server.receive_finish(&transcript.m3, None).err().unwrap();
    assert_eq!(error, HandshakeError::Authentication);
    assert_eq!(refusal[0], 1);
}

#[test]
fn malformed_hellos_are_rejected() {
    assert_eq!(
        parse_hello(b"GET / HTTP/1.1\r\n").err(),
        Some(HandshakeError::Version)
    );
    assert_eq!(
        parse_hello(b"LGK1\x02\x01a").err(),
        Some(HandshakeError::Version)
    );
    assert!(parse_hello(b"LGK1\x01\x09ab").is_err());
    assert!(parse_hello(b"LGK1\x01\x01a").is_err());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn known_answer_transcript() {
    let Outcome::Success {
        client, transcript, ..
    } = run(
        2026,
        b"correct horse",
        b"correct horse",
        "branch",
        true,
        &untouched,
    )
    else {
        panic!()
    };
    let text = format!(
        "# linkgate link v1 handshake with fixed randomness (StdRng seed 2026, Noise ephemerals 0x01.., 0x02..)\n\
         m1 {}\nm2 {}\nm3 {}\nm4 {}\nsession_id {}\ndialer_send_key {}\n",
        hex(&transcript.m1),
        hex(&transcript.m2),
        hex(&transcript.m3),
        hex(&transcript.m4),
        hex(&client.session_id),
        hex(&client.send),
    );
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/handshake-v1.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let golden =
        std::fs::read_to_string(&path).expect("golden transcript (UPDATE_GOLDEN=1 writes it)");
    assert_eq!(
        text, golden,
        "the handshake changed: a protocol change needs a new version"
    );
}

#[test]
fn a_busy_answer_reads_as_busy_and_a_real_m2_never_does() {
    let mut rng = StdRng::seed_from_u64(7);
    let identity = Identity::generate(&mut rng);
    let record = PeerRecord::register(&mut rng, &identity, "branch", b"pw").unwrap();
    for known in [true, false] {
        let (_, m1) = client_start(&mut rng, "branch", b"pw").unwrap();
        let hello = parse_hello(&m1).unwrap();
        let (_, m2) = server_respond(&mut rng, &identity, known.then_some(&record), hello).unwrap();
        assert_eq!(m2.len(), 320, "KE2 has a fixed size");
        assert!(parse_busy(&m2).is_none());
    }
    match parse_busy(&busy(6, "too many failed link logins\nforged line")) {
        Some(HandshakeError::Busy {
            retry_after,
            reason,
        }) => {
            assert_eq!(retry_after, 6);
            assert_eq!(reason, "too many failed link logins\\nforged line");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        parse_hello(b"LGK1\x01\x05br\nch").is_err(),
        "names outside the alphabet"
    );
}
