//! Entry points for the `cargo fuzz` targets in `transport/fuzz/`. They are ordinary
//! functions so that the unit tests run them too and they cannot rot.

use std::sync::Arc;

use crate::control::ControlChannel;
use crate::push::RegionDesc;
use crate::tcp::{MemStream, Shared, serve_stream};
use colo_memory::Region;

/// Decodes `data` as a sequence of control frames until the first error.
pub fn control_frames(data: &[u8]) {
    let mut ch = ControlChannel::new(MemStream::new(data)).with_max_state(1 << 20);
    for _ in 0..1024 {
        if ch.recv().is_err() {
            break;
        }
    }
}

/// Decodes `data` as a Hello payload.
pub fn hello(data: &[u8]) {
    if let Ok(h) = crate::control::Hello::decode(data) {
        // A valid Hello re-encodes to the same bytes.
        assert_eq!(h.encode(), data);
    }
}

/// Decodes `data` as a verbs push message (commit, release, close or address): the first four bytes are
/// the immediate data, the rest the message. A valid message re-encodes to the same bytes.
pub fn verbs_message(data: &[u8]) {
    use crate::verbs::message::{self, Message};
    let Some((imm, msg)) = data.split_first_chunk::<4>() else {
        return;
    };
    let mut again = Vec::new();
    match message::decode(msg, u32::from_le_bytes(*imm), 64) {
        Ok(Message::Commit {
            epoch,
            bytes,
            bitmap,
        }) => message::encode_commit(&mut again, epoch, bytes, &bitmap),
        Ok(Message::Release { epoch }) => message::encode_release(&mut again, epoch),
        Ok(Message::Address { name }) => message::encode_address(&mut again, &name),
        Ok(Message::Close { epoch }) => message::encode_close(&mut again, epoch),
        Err(_) => return,
    }
    assert_eq!(again, msg);
}

/// Feeds `data` to a push receiver stream as if it came off the network, into a region of
/// 64 pages that sits between two guard pages, and checks the guards afterwards: no byte
/// may land outside the region whatever the input.
pub fn push_stream(data: &[u8]) {
    const PAGE: usize = 4096;
    let whole = Region::anonymous(66 * PAGE).expect("map fuzz region");
    whole.write_at(0, &[0xAA; PAGE]).expect("guard");
    whole
        .write_at(65 * PAGE as u64, &[0xAA; PAGE])
        .expect("guard");
    let inner = Arc::new(whole.sub(PAGE as u64, 64 * PAGE as u64).expect("inner"));
    let desc = RegionDesc {
        addr: 0,
        key: 7,
        len: 64 * PAGE as u64,
        page_size: PAGE as u32,
        port: 0,
        name: crate::push::EndpointName::EMPTY,
    };
    let (shared, commits) = Shared::new(Arc::clone(&inner), desc, 1);
    let mut s = MemStream::new(data);
    // Let the first epoch's data flow without a consumer: release as commits arrive.
    let _ = serve_stream(&mut s, 0, &shared);
    drop(commits);
    let mut g = vec![0u8; PAGE];
    whole.read_at(0, &mut g).expect("guard");
    assert!(g.iter().all(|&b| b == 0xAA), "write before the region");
    whole.read_at(65 * PAGE as u64, &mut g).expect("guard");
    assert!(g.iter().all(|&b| b == 0xAA), "write after the region");
    drop(inner);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::control::{ControlFields, FrameHeader, Kind};
    use crate::tcp::wire::{PushFrame, RunDesc};

    fn batch(epoch: u64, runs: &[(u64, u64)]) -> Vec<u8> {
        let total: u64 = runs.iter().map(|r| r.1).sum();
        let mut v = PushFrame::Batch {
            epoch,
            runs: runs.len() as u32,
            bytes: total,
        }
        .to_bytes()
        .to_vec();
        for &(o, l) in runs {
            v.extend_from_slice(zerocopy::IntoBytes::as_bytes(&RunDesc::new(o, l)));
        }
        v.extend(std::iter::repeat_n(0x55, total as usize));
        v
    }

    #[test]
    fn push_stream_keeps_guards_on_hostile_runs() {
        for runs in [
            vec![(0, 4096)],
            vec![(64 * 4096 - 1, 2)],
            vec![(u64::MAX - 1, 4)],
            vec![(4096, 0)],
            vec![(0, 64 * 4096 + 1)],
        ] {
            push_stream(&batch(1, &runs));
        }
        // A well-formed epoch end without a bitmap, and a bitmap of the wrong size.
        let mut v = batch(1, &[(0, 4096)]);
        v.extend_from_slice(&PushFrame::EpochEnd { epoch: 1, words: 3 }.to_bytes());
        push_stream(&v);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            verbs_message(&data);
            control_frames(&data);
            hello(&data);
            push_stream(&data);
        }

        #[test]
        fn verbs_messages_survive_one_mutation(epoch: u64, words in 0usize..8, at: usize, x: u8) {
            let mut m = Vec::new();
            crate::verbs::message::encode_commit(&mut m, epoch, 4096, &vec![epoch; words]);
            let i = at % m.len();
            m[i] ^= x;
            let mut d = (epoch as u32).to_le_bytes().to_vec();
            d.extend_from_slice(&m);
            verbs_message(&d);
        }

        #[test]
        fn decoders_never_panic_on_valid_headers(kind in 0u16..64, arg in any::<u64>(), tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut f = FrameHeader::new(Kind::Hello, ControlFields::new(arg, tail.len() as u32)).to_bytes().to_vec();
            f[6..8].copy_from_slice(&kind.to_le_bytes());
            f.extend_from_slice(&tail);
            control_frames(&f);
        }
    }
}
