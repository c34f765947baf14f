//! Entry points of the `cargo fuzz` targets in `blk/fuzz/`. They are ordinary functions
//! so that the unit tests run them too and they cannot rot.

use std::io::Write;

use crate::buffer::BufferOptions;
use crate::disk::Disk;
use crate::frame_io::read_frame;
use crate::primary::LinkState;
use crate::secondary::{Inner, SecondaryPhase};
use crate::wire::Frame;

/// Size of the disk the fuzzed secondary writes to.
const FUZZ_DISK: u64 = 64 << 10;

/// Feeds `data` to a secondary's receive loop as if it came from the primary (already
/// past the handshake, in the phase the first byte picks), against a 64 KiB disk file
/// with a tiny memory buffer (so spill paths run too). Every epoch marker commits at
/// once. Afterwards the disk file must still be exactly 64 KiB: no write reached past its
/// end. Then a failover must succeed and leave the disk at its size.
pub fn secondary_stream(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let file = tempfile_disk();
    let disk = Disk::from_file(file.try_clone().expect("dup")).expect("disk");
    let opts = BufferOptions {
        mem_limit: 4096,
        ..BufferOptions::default()
    };
    let inner = Inner::new(disk, &opts);
    inner.lock().phase = if mode & 1 == 0 {
        SecondaryPhase::Replicating
    } else {
        SecondaryPhase::Syncing
    };
    let mut acks = Vec::new();
    let _ = crate::secondary::serve_for_fuzz(&inner, data, &mut acks);
    assert_eq!(
        file.metadata().expect("stat").len(),
        FUZZ_DISK,
        "write past the end"
    );
    // Whatever was applied, the acknowledgements are well formed and in order.
    let mut r = &acks[..];
    let mut last = 0;
    let mut p = Vec::new();
    while let Ok(f) = read_frame(&mut r, &mut p) {
        match f {
            Frame::Ack { seq, .. } => {
                assert!(seq > last, "acks go forward");
                last = seq;
            }
            Frame::Reject { .. } => {}
            other => panic!("the secondary sent {other:?}"),
        }
    }
    let mut st = inner.lock();
    if st.phase == SecondaryPhase::Replicating {
        st.buf.flush_into_disk().expect("failover flush");
    }
    drop(st);
    assert_eq!(
        file.metadata().expect("stat").len(),
        FUZZ_DISK,
        "write past the end"
    );
}

/// Feeds `data` to the primary's acknowledgement decoder with 100 frames in flight.
pub fn primary_acks(data: &[u8]) {
    let mut st = LinkState::for_fuzz(100);
    let mut r = data;
    let mut p = Vec::new();
    for _ in 0..4096 {
        let Ok(f) = read_frame(&mut r, &mut p) else {
            break;
        };
        match st.on_frame(f, &p) {
            Ok(true) => {}
            _ => break,
        }
        assert!(st.acked <= 100);
        assert_eq!(st.inflight_frames() as u64, 100 - st.acked);
    }
}

fn tempfile_disk() -> std::fs::File {
    let dir = std::env::temp_dir();
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(&dir)
            .expect("temporary disk file")
    };
    f.write_all(&vec![0x5A; FUZZ_DISK as usize])
        .expect("fill disk");
    f
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::MAX_WRITE_BYTES;

    fn frame(f: Frame, payload: &[u8]) -> Vec<u8> {
        let mut v = f.to_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn hostile_writes_never_pass_the_end_of_the_disk() {
        let mut input = vec![0u8]; // replicating
        input.extend(frame(
            Frame::Write {
                seq: 1,
                offset: 0,
                len: 8192,
            },
            &[1; 8192],
        ));
        input.extend(frame(Frame::Checkpoint { seq: 2, epoch: 1 }, &[]));
        input.extend(frame(
            Frame::Write {
                seq: 3,
                offset: FUZZ_DISK - 512,
                len: 1024,
            },
            &[2; 1024],
        ));
        secondary_stream(&input);
        let big = Frame::Write {
            seq: 1,
            offset: 0,
            len: MAX_WRITE_BYTES as u32,
        };
        secondary_stream(&[&[0u8][..], &big.to_bytes()].concat());
        let far = Frame::Write {
            seq: 1,
            offset: u64::MAX - 511,
            len: 512,
        };
        secondary_stream(&frame(far, &[3; 512]));
        let mut s = vec![1u8];
        s.extend(frame(
            Frame::SyncData {
                seq: 1,
                offset: 4096,
                len: 512,
            },
            &[4; 512],
        ));
        s.extend(frame(Frame::SyncDone { seq: 2, epoch: 5 }, &[]));
        s.extend(frame(Frame::Checkpoint { seq: 3, epoch: 5 }, &[]));
        secondary_stream(&s);
    }

    #[test]
    fn acks_out_of_range_are_refused() {
        primary_acks(&frame(
            Frame::Ack {
                seq: 50,
                buffered: 1,
            },
            &[],
        ));
        primary_acks(&frame(
            Frame::Ack {
                seq: 500,
                buffered: 1,
            },
            &[],
        ));
        let mut two = frame(
            Frame::Ack {
                seq: 50,
                buffered: 1,
            },
            &[],
        );
        two.extend(frame(
            Frame::Ack {
                seq: 10,
                buffered: 1,
            },
            &[],
        ));
        primary_acks(&two);
    }

    /// 64 cases unless `PROPTEST_CASES` says otherwise (the test command's fallback for
    /// machines without cargo-fuzz sets it to 10,000).
    fn config() -> ProptestConfig {
        if std::env::var_os("PROPTEST_CASES").is_some() {
            ProptestConfig::default()
        } else {
            ProptestConfig::with_cases(64)
        }
    }

    proptest! {
        #![proptest_config(config())]
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            secondary_stream(&data);
            primary_acks(&data);
        }

        #[test]
        fn decoders_never_panic_on_valid_headers(
            kind in prop::sample::select(vec![1u16, 2, 3, 16, 17, 18, 19, 20, 32, 34]),
            len in prop::sample::select(vec![0u32, 512, 1024, 4096, 7, 1 << 21]),
            seq in 0u64..4,
            arg in prop::sample::select(vec![0u64, 512, 4096, FUZZ_DISK - 512, FUZZ_DISK, u64::MAX - 511]),
            phase in 0u8..2,
        ) {
            let mut h = Frame::Write { seq: 1, offset: 0, len: 512 }.to_bytes();
            h[6..8].copy_from_slice(&kind.to_le_bytes());
            h[8..12].copy_from_slice(&len.to_le_bytes());
            h[16..24].copy_from_slice(&seq.to_le_bytes());
            h[24..32].copy_from_slice(&arg.to_le_bytes());
            let mut v = vec![phase];
            v.extend_from_slice(&h);
            v.extend(std::iter::repeat_n(0x77, (len as usize).min(8192)));
            secondary_stream(&v);
            primary_acks(&v[1..]);
        }
    }
}
