//! Our record layer is Noise's transport, implemented with ring so that the
//! halves can live on different tasks: checked here byte for byte against
//! snow's own transport on the same handshake, rekeys included.

use linkgate_link::frame::Frame;
use linkgate_link::record::{Opener, Sealer};

const PARAMS: &str = "Noise_NN_25519_AESGCM_SHA256";

#[test]
fn records_equal_snow_transport_messages_across_rekeys() {
    let mut initiator = snow::Builder::new(PARAMS.parse().unwrap())
        .build_initiator()
        .unwrap();
    let mut responder = snow::Builder::new(PARAMS.parse().unwrap())
        .build_responder()
        .unwrap();
    let mut buf = [0u8; 1024];
    let mut out = [0u8; 1024];
    let n = initiator.write_message(&[], &mut buf).unwrap();
    responder.read_message(&buf[..n], &mut out).unwrap();
    let n = responder.write_message(&[], &mut buf).unwrap();
    initiator.read_message(&buf[..n], &mut out).unwrap();
    let (send_key, recv_key) = initiator.dangerously_get_raw_split();
    let mut snow_initiator = initiator.into_transport_mode().unwrap();
    let mut snow_responder = responder.into_transport_mode().unwrap();

    const INTERVAL: u64 = 4;
    let mut sealer = Sealer::with_rekey_interval(send_key, INTERVAL);
    let mut opener = Opener::with_rekey_interval(recv_key, INTERVAL);
    let mut ciphertext = vec![0u8; 70_000];
    for i in 0..11u32 {
        let payload = vec![i as u8; 100 + 977 * i as usize];
        let frame = Frame::Data {
            id: 1,
            data: &payload,
        };
        let mut plaintext = Vec::new();
        frame.encode(&mut plaintext);
        // Ours: two length bytes, then exactly what snow writes.
        let mut record = Vec::new();
        sealer.seal(&frame, &mut record);
        let n = snow_initiator
            .write_message(&plaintext, &mut ciphertext)
            .unwrap();
        assert_eq!(&record[2..], &ciphertext[..n], "record {i}");
        assert_eq!(u16::from_be_bytes([record[0], record[1]]) as usize, n);
        // And the other direction: we open what snow sealed.
        let n = snow_responder
            .write_message(&plaintext, &mut ciphertext)
            .unwrap();
        let opened = opener.open(&mut ciphertext[..n]).unwrap();
        assert_eq!(opened, &plaintext[..]);
        if (i as u64 + 1).is_multiple_of(INTERVAL) {
            // Noise's REKEY (§11.3), at the same record on both sides.
            snow_initiator.rekey_outgoing();
            snow_responder.rekey_outgoing();
        }
    }
}
