//! Entry points of the `cargo fuzz` targets in `netcmp/fuzz/`. They are ordinary functions
//! so that the unit tests run them too (as proptests) and they cannot rot.

use std::time::{Duration, Instant};

use crate::compare::{Engine, Output};
use crate::config::Config;
use crate::framing::{Decoder, FromVm, MAX_FRAME, PACE_GO, PACE_HOLD, RoleWord};
use crate::wire;

/// Parses `data` as a frame, and rewrites it if it is TCP; neither may panic, and a
/// rewrite keeps the frame's length and what it parses as (apart from the numbers).
pub fn parse_frame(data: &[u8]) {
    let parsed = wire::parse(data);
    let mut copy = data.to_vec();
    let d = wire::Deltas {
        seq: 0x1234_5678,
        ack: 0x9abc_def0,
        tsval: 7,
        tsecr: 0xFFFF_FFF0,
    };
    if wire::rewrite_tcp(&mut copy, d).is_ok() {
        assert_eq!(copy.len(), data.len());
        let again = wire::parse(&copy).expect("a rewritten frame still parses");
        let before = parsed.expect("a frame that rewrote had parsed");
        assert_eq!(again.src, before.src);
        assert_eq!(again.dst, before.dst);
        assert_eq!(
            again.tcp().map(|t| t.payload.clone()),
            before.tcp().map(|t| t.payload.clone())
        );
    }
}

/// Feeds `data`, cut into frames, to a compare engine: the first byte of each chunk picks
/// the side (client, primary, secondary), the chunk is the frame; every few frames the
/// clock moves, scans run and checkpoints commit. Checks that released bytes are always
/// frames the primary sent.
pub fn engine_ingest(data: &[u8]) {
    let config = Config {
        compare_timeout: Duration::from_millis(30),
        expired_scan_cycle: Duration::from_millis(10),
        max_queue_size: 8,
        max_connections: 16,
        secondary_lead: Some(Duration::from_millis(15)),
        ..Config::default()
    };
    let Ok(mut engine) = Engine::new(config) else {
        return;
    };
    let mut out = Output::default();
    let mut now = Instant::now();
    let mut primaries = Vec::new();
    let mut rest = data;
    let mut i = 0u32;
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head & 0x7F) * 2 + usize::from(head >> 7);
        let take = len.min(tail.len());
        let (frame, next) = tail.split_at(take);
        rest = next;
        match head % 3 {
            0 => engine.client_frame(frame.to_vec(), now, &mut out),
            1 => {
                primaries.push(frame.to_vec());
                engine.primary_frame(frame.to_vec(), now, &mut out);
            }
            _ => engine.secondary_frame(frame.to_vec(), now, &mut out),
        }
        i += 1;
        if i % 7 == 0 {
            now += Duration::from_millis(11);
            engine.poll(now, &mut out);
        }
        if i % 23 == 0 {
            engine.checkpoint_committed(now, &mut out);
        }
    }
    now += Duration::from_secs(1);
    engine.scan(now, &mut out);
    engine.checkpoint_committed(now, &mut out);
    engine.poll(now, &mut out);
    for f in &out.to_client {
        assert!(
            primaries.contains(f),
            "released a frame the primary never sent"
        );
    }
    // Pacing words alternate, hold first, and a commit lets the secondary go.
    let words: Vec<&Vec<u8>> = out.to_secondary.iter().filter(|f| f.len() == 1).collect();
    for (i, w) in words.iter().enumerate() {
        let want = if i % 2 == 0 { PACE_HOLD } else { PACE_GO };
        assert_eq!(w.as_slice(), want.as_slice(), "pacing word {i}");
    }
    assert!(!engine.secondary_held(), "held after a commit");
}

/// Feeds `data` to the length-prefixed stream decoder in chunks whose sizes come from the
/// data itself; frames must never exceed the limit and the decoder must never panic. Each
/// frame is also read as a cluster-mode proxy reads a VM's frames ([`FromVm::classify`]:
/// commit marker, role word, or guest frame), which must agree with its length and
/// re-encode to the same bytes.
pub fn stream_frames(data: &[u8]) {
    let mut d = Decoder::new(MAX_FRAME);
    let mut i = 0;
    while i < data.len() {
        let step = 1 + usize::from(data[i] % 97);
        let end = (i + step).min(data.len());
        d.feed(&data[i..end]);
        i = end;
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    assert!(f.len() <= MAX_FRAME as usize);
                    from_vm(f);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// One frame as a cluster-mode proxy reads it from a VM.
fn from_vm(f: Vec<u8>) {
    let len = f.len();
    match FromVm::classify(f.clone()) {
        Ok(FromVm::Marker) => assert_eq!(len, 0),
        Ok(FromVm::Role(w)) => {
            assert_eq!(w.encode().as_slice(), f.as_slice());
            assert_eq!(RoleWord::from_byte(w.byte()).ok(), Some(w));
        }
        Ok(FromVm::Frame(g)) => {
            assert!(len > 1);
            assert_eq!(g, f);
        }
        Err(crate::Error::UnknownRoleWord(b)) => assert_eq!(f, [b]),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::testing::{Seg, arp_reply, udp_from_vm};

    proptest! {
        #[test]
        fn parse_frame_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            parse_frame(&data);
        }

        #[test]
        fn engine_ingest_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            engine_ingest(&data);
        }

        /// Every one-byte frame is a known word or refused with its byte.
        #[test]
        fn role_words_classify(b in any::<u8>(), rest in proptest::collection::vec(any::<u8>(), 0..4)) {
            from_vm(vec![b]);
            let mut f = vec![b];
            f.extend_from_slice(&rest);
            from_vm(f);
            let mut wire = Vec::new();
            crate::framing::encode(&[b], &mut wire).unwrap();
            stream_frames(&wire);
        }

        #[test]
        fn stream_frames_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            stream_frames(&data);
        }

        /// Valid frames with random bytes flipped: a rich source of almost-valid headers.
        #[test]
        fn mutated_frames_never_panic(
            which in 0usize..4,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
        ) {
            let mut f = match which {
                0 => Seg::vm(1000, Some(5), b"hello").frame(),
                1 => Seg::client(5, Some(1000), b"").syn().frame(),
                2 => udp_from_vm(53, b"answer"),
                _ => arp_reply(),
            };
            for (at, x) in flips {
                let n = f.len();
                f[at % n] ^= x;
            }
            let cut = cut % (f.len() + 1);
            parse_frame(&f[..cut]);
            parse_frame(&f);
            let mut e = Engine::new(Config::default()).unwrap();
            let mut out = Output::default();
            let now = Instant::now();
            e.primary_frame(f.clone(), now, &mut out);
            e.secondary_frame(f.clone(), now, &mut out);
            e.client_frame(f.clone(), now, &mut out);
            e.scan(now + Duration::from_secs(10), &mut out);
        }
    }
}
