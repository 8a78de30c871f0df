//! Key mode in memory: matching keys, a wrong hub key, a dialer key the hub
//! can read (so it can look it up), every flipped byte, and the mode byte.

use linkgate_link::handshake::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn keys(seed: u64) -> StaticKeys {
    Identity::generate(&mut StdRng::seed_from_u64(seed)).static_keys()
}

#[test]
fn static_keys_are_stable_per_identity_and_differ_between_identities() {
    let identity = Identity::generate(&mut StdRng::seed_from_u64(1));
    let again = Identity::from_bytes(&identity.to_bytes()).unwrap();
    assert_eq!(identity.static_keys().public, again.static_keys().public);
    assert_ne!(keys(1).public, keys(2).public);
}

#[test]
fn pinned_keys_give_matching_session_keys_and_the_hub_learns_who_and_when() {
    let (dialer, hub) = (keys(1), keys(2));
    let (client, m1) = key_client_start(
        &dialer,
        &hub.public,
        42,
        Some(&FixedEphemeral::new([7u8; 32])),
    )
    .unwrap();
    assert_eq!(hello_mode(&m1), Ok(Mode::Key));
    let hello = key_server_read(&hub, &m1, Some(&FixedEphemeral::new([8u8; 32]))).unwrap();
    assert_eq!(hello.public, dialer.public);
    assert_eq!(hello.timestamp, 42);
    let (m2, hub_keys) = hello.accept().unwrap();
    let dialer_keys = client.receive_final(&m2).unwrap();
    assert_eq!(dialer_keys.send, hub_keys.recv);
    assert_eq!(dialer_keys.recv, hub_keys.send);
    assert_eq!(dialer_keys.session_id, hub_keys.session_id);
    assert_eq!(
        dialer_keys.features,
        linkgate_link::params::Features::SUPPORTED
    );
    assert_eq!(
        hub_keys.features,
        linkgate_link::params::Features::SUPPORTED
    );
    assert_ne!(dialer_keys.send, dialer_keys.recv);
}

#[test]
fn a_hello_for_another_hub_key_cannot_be_read() {
    let (dialer, hub, other) = (keys(1), keys(2), keys(3));
    let (_, m1) = key_client_start(&dialer, &other.public, 1, None).unwrap();
    assert!(matches!(
        key_server_read(&hub, &m1, None),
        Err(HandshakeError::Authentication)
    ));
}

#[test]
fn an_impostor_hub_cannot_finish_the_handshake() {
    // The dialer pins `hub`; `impostor` answers with its own keys (it cannot
    // read M1, so it answers a hello of its own making).
    let (dialer, hub, impostor) = (keys(1), keys(2), keys(3));
    let (client, _) = key_client_start(&dialer, &hub.public, 1, None).unwrap();
    let (_, forged) = key_client_start(&dialer, &impostor.public, 1, None).unwrap();
    let (m2, _) = key_server_read(&impostor, &forged, None)
        .unwrap()
        .accept()
        .unwrap();
    assert!(matches!(
        client.receive_final(&m2),
        Err(HandshakeError::Authentication)
    ));
}

#[test]
fn every_flipped_byte_fails_and_refusals_carry_their_reason() {
    let (dialer, hub) = (keys(1), keys(2));
    let (_, m1) = key_client_start(&dialer, &hub.public, 5, None).unwrap();
    for i in 0..m1.len() {
        let mut bad = m1.clone();
        bad[i] ^= 0x01;
        assert!(key_server_read(&hub, &bad, None).is_err(), "byte {i} of M1");
    }
    let (client, m1) = key_client_start(&dialer, &hub.public, 5, None).unwrap();
    let (m2, _) = key_server_read(&hub, &m1, None).unwrap().accept().unwrap();
    for i in 0..m2.len() {
        let (client, m1) = key_client_start(
            &dialer,
            &hub.public,
            5,
            Some(&FixedEphemeral::new([9u8; 32])),
        )
        .unwrap();
        let (mut bad, _) = key_server_read(&hub, &m1, Some(&FixedEphemeral::new([10u8; 32])))
            .unwrap()
            .accept()
            .unwrap();
        bad[i] ^= 0x01;
        assert!(client.receive_final(&bad).is_err(), "byte {i} of M2");
    }
    assert!(client.receive_final(&m2).is_ok());
    let (client, _) = key_client_start(&dialer, &hub.public, 6, None).unwrap();
    assert_eq!(
        client.receive_final(&refusal("unknown key")).err(),
        Some(HandshakeError::Refused("unknown key".into()))
    );
}

#[test]
fn the_mode_byte_tells_password_from_key_mode_and_nothing_else_passes() {
    let mut rng = StdRng::seed_from_u64(4);
    let (_, password_hello) = client_start(&mut rng, "branch", b"pw").unwrap();
    assert_eq!(hello_mode(&password_hello), Ok(Mode::Password));
    // A key hello is not a password hello, and the other way round.
    let (_, key_hello) = key_client_start(&keys(1), &keys(2).public, 1, None).unwrap();
    assert!(parse_hello(&key_hello).is_err());
    assert!(key_server_read(&keys(2), &password_hello, None).is_err());
    for bad in [&b"LGK1\x03"[..], b"LGK2\x01", b"LGK", b""] {
        assert_eq!(hello_mode(bad), Err(HandshakeError::Version));
    }
}

#[test]
fn low_order_keys_are_recognised_and_real_keys_are_not() {
    use linkgate_link::handshake::is_low_order;
    // The all-zero key (order 2), u = 1 (order 4), and a point of order 8.
    let mut order8 = [0u8; 32];
    order8.copy_from_slice(&[
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ]);
    let mut one = [0u8; 32];
    one[0] = 1;
    for key in [[0u8; 32], one, order8] {
        assert!(is_low_order(&key), "{key:?}");
    }
    let identity = linkgate_link::handshake::Identity::generate(&mut rand::rngs::OsRng);
    assert!(!is_low_order(&identity.static_keys().public));
}
