//! The record layer: round trips over real sockets, and every way a record can be wrong.

use std::io::{self, BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::{Credentials, KEY_LEN, PairKey, accept, connect};

const SESSION: [u8; 32] = [0x5a; 32];

fn keys(session: [u8; 32], channel: Channel) -> (SessionKeys, SessionKeys) {
    (
        SessionKeys::new(&session, Role::Primary, channel),
        SessionKeys::new(&session, Role::Secondary, channel),
    )
}

/// Primary-to-secondary sealer and opener of one session.
fn p2s() -> (Sealer, Opener) {
    let (p, s) = keys(SESSION, Channel::Control);
    (p.split().0, s.split().1)
}

/// A deterministic pattern, so a misplaced byte shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Sealed records, one per message.
fn records(sealer: &mut Sealer, messages: &[&[u8]]) -> Vec<Vec<u8>> {
    messages
        .iter()
        .map(|m| {
            let mut out = Vec::new();
            sealer.seal(&[m], &mut out).unwrap();
            out
        })
        .collect()
}

/// Everything a reader hands out, in reads of `chunk` bytes, and how it stopped.
fn drain(r: &mut impl Read, chunk: usize) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

fn seal_error(r: &io::Result<()>) -> SealError {
    let e = r.as_ref().expect_err("the stream must fail");
    *SealError::from_io(e).unwrap_or_else(|| panic!("not a SealError: {e:?}"))
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Opens `wire` with a fresh primary-to-secondary opener.
fn open_wire(wire: &[u8]) -> (Vec<u8>, io::Result<()>) {
    let (_, opener) = p2s();
    drain(&mut OpenReader::new(wire, opener), 1000)
}

const SIZES: &[usize] = &[
    1,
    2,
    15,
    16,
    17,
    255,
    4095,
    4096,
    4097,
    65_535,
    65_536,
    65_537,
    131_072,
    200_001,
    1 << 20,
];

#[test]
fn messages_of_many_sizes_round_trip_both_ways_over_a_socket_pair() {
    let (p, s) = keys(SESSION, Channel::Push(2));
    let (a, b) = UnixStream::pair().unwrap();
    let echo = thread::spawn(move || {
        let mut s = Sealed::new(b, s);
        for &len in SIZES {
            let mut m = vec![0u8; len];
            s.read_exact(&mut m).unwrap();
            assert_eq!(m, pattern(len, 1), "secondary got {len} bytes intact");
            let back = pattern(len, 2);
            s.write_all(&back).unwrap();
            s.flush().unwrap();
        }
        s.close().unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    });
    let mut p = Sealed::new(a, p);
    for &len in SIZES {
        p.write_all(&pattern(len, 1)).unwrap();
        p.flush().unwrap();
        let mut m = vec![0u8; len];
        p.read_exact(&mut m).unwrap();
        assert_eq!(m, pattern(len, 2), "primary got {len} bytes intact");
    }
    p.close().unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        p.read_to_end(&mut rest).unwrap(),
        0,
        "a clean end after close"
    );
    echo.join().unwrap();
}

#[test]
fn a_handshake_then_a_split_reader_and_writer_on_cloned_tcp_sockets_carry_both_ways_at_once() {
    let creds = Credentials::key(PairKey::from_bytes([3; KEY_LEN]));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = Duration::from_secs(5);
    let server_creds = creds.clone();
    let secondary = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let peer = accept(&mut s, &server_creds, Role::Secondary, Channel::Push(0), t).unwrap();
        let (sealer, opener) = SessionKeys::from_peer(&peer).split();
        let mut w = SealWriter::new(s.try_clone().unwrap(), sealer);
        let mut r = OpenReader::new(s, opener);
        // Echo each message back with its bytes inverted, from a reader and a writer.
        for &len in SIZES {
            let mut m = vec![0u8; len];
            r.read_exact(&mut m).unwrap();
            m.iter_mut().for_each(|b| *b = !*b);
            w.write_gather(&[&m[..len / 2], &m[len / 2..]]).unwrap();
        }
        w.close().unwrap();
        let (rest, end) = drain(&mut r, 4096);
        assert!(rest.is_empty());
        end.expect("a clean end after the peer's close");
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let peer = connect(&mut s, &creds, Role::Primary, Channel::Push(3), t).unwrap();
    let sealed = Sealed::new(s.try_clone().unwrap(), SessionKeys::from_peer(&peer));
    let (mut r, mut w) = sealed.into_split(s).unwrap();
    let writer = thread::spawn(move || {
        for &len in SIZES {
            w.write_all(&pattern(len, 9)).unwrap();
            w.flush().unwrap();
        }
        w.close().unwrap();
    });
    for &len in SIZES {
        let mut m = vec![0u8; len];
        r.read_exact(&mut m).unwrap();
        let want: Vec<u8> = pattern(len, 9).iter().map(|b| !b).collect();
        assert_eq!(m, want, "{len} bytes back");
    }
    let (rest, end) = drain(&mut r, 4096);
    assert!(rest.is_empty());
    end.expect("a clean end after the peer's close");
    writer.join().unwrap();
    secondary.join().unwrap();
}

#[test]
fn a_gather_list_that_fits_goes_out_as_one_record_and_a_longer_one_as_full_records() {
    let (sealer, opener) = p2s();
    let mut w = SealWriter::new(Vec::new(), sealer);
    let parts = [pattern(100, 1), pattern(4096, 2), pattern(3, 3)];
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    w.write_gather(&refs).unwrap();
    assert_eq!(w.get_ref().len(), HEADER_LEN + 4199 + TAG_LEN, "one record");
    let big = pattern(2 * MAX_RECORD + 10, 4);
    w.write_gather(&[&big[..7], &big[7..]]).unwrap();
    assert_eq!(
        w.get_ref().len(),
        4 * (HEADER_LEN + TAG_LEN) + 4199 + big.len(),
        "two full records and a third"
    );
    w.close().unwrap();
    let wire = w.get_ref().clone();
    let (got, end) = drain(&mut OpenReader::new(&wire[..], opener), 333);
    end.unwrap();
    assert_eq!(got, [refs.concat(), big].concat());
}

#[test]
fn a_flipped_bit_anywhere_in_a_record_is_caught_and_nothing_of_it_comes_out() {
    let (mut sealer, _) = p2s();
    let first = pattern(50, 1);
    let target = pattern(100, 2);
    let after = pattern(MAX_RECORD, 3);
    let r = records(&mut sealer, &[&first, &target, &after]);
    let start = r[0].len();
    let wire = r.concat();
    for bit in 0..r[1].len() * 8 {
        let mut bad = wire.clone();
        bad[start + bit / 8] ^= 1 << (bit % 8);
        let (got, end) = open_wire(&bad);
        assert_eq!(got, first, "bit {bit}: only the record before comes out");
        let e = seal_error(&end);
        assert!(
            matches!(
                e,
                SealError::BadTag { record: 1 } | SealError::Oversized { record: 1, .. }
            ),
            "bit {bit}: {e:?}"
        );
        assert_eq!(
            end.unwrap_err().kind(),
            io::ErrorKind::InvalidData,
            "bit {bit}"
        );
    }
}

#[test]
fn a_replayed_reordered_dropped_or_truncated_record_is_caught() {
    let (mut sealer, _) = p2s();
    let m: Vec<Vec<u8>> = (0..4).map(|i| pattern(1000 + i, i as u8)).collect();
    let refs: Vec<&[u8]> = m.iter().map(Vec::as_slice).collect();
    let r = records(&mut sealer, &refs);
    let mut end = Vec::new();
    sealer.seal_end(&mut end).unwrap();

    let cases: [(&str, Vec<u8>, usize, SealError); 7] = [
        (
            "replayed",
            cat(&[&r[0], &r[1], &r[1]]),
            2,
            SealError::BadTag { record: 2 },
        ),
        (
            "reordered",
            cat(&[&r[0], &r[2], &r[1]]),
            1,
            SealError::BadTag { record: 1 },
        ),
        (
            "dropped",
            cat(&[&r[0], &r[2], &r[3]]),
            1,
            SealError::BadTag { record: 1 },
        ),
        (
            "cut and followed by the next",
            [&r[0], &r[1][..500], &r[2], &r[3]].concat(),
            1,
            SealError::BadTag { record: 1 },
        ),
        (
            "cut at the end",
            [&r[0][..], &r[1][..r[1].len() - 1]].concat(),
            1,
            SealError::Truncated {
                record: 1,
                mid_record: true,
            },
        ),
        (
            "ended between records without the end record",
            cat(&[&r[0], &r[1]]),
            2,
            SealError::Truncated {
                record: 2,
                mid_record: false,
            },
        ),
        (
            "end record moved before the last data record",
            cat(&[&r[0], &r[1], &r[2], &end]),
            3,
            SealError::BadTag { record: 3 },
        ),
    ];
    for (what, wire, good, want) in cases {
        let (_, opener) = p2s();
        let mut reader = OpenReader::new(&wire[..], opener);
        let (got, stop) = drain(&mut reader, 64);
        assert_eq!(
            got,
            m[..good].concat(),
            "{what}: the records before come out"
        );
        assert_eq!(seal_error(&stop), want, "{what}");
        let again = reader.read(&mut [0u8; 8]).map(drop);
        assert_eq!(seal_error(&again), want, "{what}: the error stays");
    }
    // And the untouched stream opens whole, ending cleanly.
    let (got, stop) = open_wire(&[r.concat(), end].concat());
    stop.unwrap();
    assert_eq!(got, m.concat());
}

#[test]
fn an_oversized_header_is_refused_before_its_body_arrives() {
    let (_, opener) = p2s();
    let header = (MAX_RECORD as u32 + 1).to_le_bytes();
    let (got, stop) = drain(&mut OpenReader::new(&header[..], opener), 64);
    assert!(got.is_empty());
    assert_eq!(
        seal_error(&stop),
        SealError::Oversized {
            record: 0,
            length: MAX_RECORD as u64 + 1
        }
    );
    let (mut sealer, _) = p2s();
    let mut out = Vec::new();
    let big = vec![0u8; MAX_RECORD + 1];
    assert!(matches!(
        sealer.seal(&[&big], &mut out),
        Err(SealError::Oversized { record: 0, .. })
    ));
    assert!(out.is_empty(), "nothing appended");
    sealer.seal(&[&big[1..]], &mut out).unwrap();
    assert_eq!(
        out.len(),
        MAX_WIRE_RECORD,
        "a full record still seals as record 0"
    );
}

#[test]
fn each_direction_and_channel_has_its_own_key_and_records_do_not_cross() {
    let (p, s) = keys(SESSION, Channel::Control);
    assert_ne!(p.send, p.recv, "the two directions' keys differ");
    assert_eq!(p.send, s.recv);
    assert_eq!(p.recv, s.send);
    let (mut p_seal, mut p_open) = p.split();
    let (mut s_seal, mut s_open) = s.split();
    let mut to_s = Vec::new();
    p_seal.seal(&[b"to the secondary"], &mut to_s).unwrap();
    let mut to_p = Vec::new();
    s_seal.seal(&[b"to the primary"], &mut to_p).unwrap();
    // A record sealed for one direction does not open in the other.
    assert_eq!(
        p_open.open(&mut to_s.clone()),
        Err(SealError::BadTag { record: 0 }),
        "reflected back to its sender"
    );
    assert_eq!(
        s_open.open(&mut to_p.clone()),
        Err(SealError::BadTag { record: 0 })
    );
    // Nor on another channel of the same session.
    for other in [Channel::Push(0), Channel::Push(1), Channel::Disk] {
        let (_, mut o) = keys(SESSION, other).1.split();
        assert_eq!(
            o.open(&mut to_s.clone()),
            Err(SealError::BadTag { record: 0 }),
            "{other}"
        );
    }
    let (_, mut push1) = keys(SESSION, Channel::Push(1)).1.split();
    let (mut push0, _) = keys(SESSION, Channel::Push(0)).0.split();
    let mut rec = Vec::new();
    push0.seal(&[b"page"], &mut rec).unwrap();
    assert_eq!(
        push1.open(&mut rec),
        Err(SealError::BadTag { record: 0 }),
        "push streams 0 and 1"
    );
    // The right opener does open them (and only after the failures above, which did not
    // use up a record number).
    assert!(matches!(s_open.open(&mut to_s), Ok(Opened::Data { .. })));
    assert!(matches!(p_open.open(&mut to_p), Ok(Opened::Data { .. })));
}

#[test]
fn sessions_with_different_secrets_do_not_interoperate() {
    let (p, _) = keys(SESSION, Channel::Control);
    let mut other_secret = SESSION;
    other_secret[31] ^= 1;
    let (_, s) = keys(other_secret, Channel::Control);
    let (a, b) = UnixStream::pair().unwrap();
    let writer = thread::spawn(move || {
        let mut w = Sealed::new(a, p);
        w.write_all(b"hello").unwrap();
        w.flush().unwrap();
        w.close().unwrap();
    });
    let mut r = Sealed::new(b, s);
    let (got, stop) = drain(&mut r, 64);
    assert!(got.is_empty());
    assert_eq!(seal_error(&stop), SealError::BadTag { record: 0 });
    writer.join().unwrap();
}

#[test]
fn both_ends_move_to_the_next_key_together_every_rekey_records() {
    let (mut sealer, mut opener) = p2s();
    sealer.skip_to(REKEY_RECORDS - 2);
    opener.skip_to(REKEY_RECORDS - 2);
    let m: Vec<Vec<u8>> = (0..5).map(|i| pattern(64, i)).collect();
    let refs: Vec<&[u8]> = m.iter().map(Vec::as_slice).collect();
    let r = records(&mut sealer, &refs);
    // An opener that jumped to the boundary without walking through it keeps the old key.
    let (_, mut stale) = p2s();
    stale.skip_to(REKEY_RECORDS);
    assert_eq!(
        stale.open(&mut r[2].clone()),
        Err(SealError::BadTag {
            record: REKEY_RECORDS
        }),
        "record {REKEY_RECORDS} is under a new key"
    );
    for (i, rec) in r.into_iter().enumerate() {
        let mut rec = rec;
        let Ok(Opened::Data { plain, .. }) = opener.open(&mut rec) else {
            panic!("record {i} across the boundary does not open");
        };
        assert_eq!(rec[plain], m[i]);
    }
}

#[test]
fn a_used_up_counter_refuses_to_seal_and_says_so() {
    let (mut sealer, mut opener) = p2s();
    sealer.skip_to(u64::MAX - 1);
    opener.skip_to(u64::MAX - 1);
    let mut last = Vec::new();
    sealer.seal(&[b"last"], &mut last).unwrap();
    assert!(matches!(opener.open(&mut last), Ok(Opened::Data { .. })));
    let mut out = Vec::new();
    assert_eq!(
        sealer.seal(&[b"one more"], &mut out),
        Err(SealError::Exhausted)
    );
    assert!(out.is_empty());
    assert_eq!(sealer.seal_end(&mut out), Err(SealError::Exhausted));
    let mut w = SealWriter::new(Vec::new(), sealer);
    w.write_all(b"one more").unwrap();
    let e = w.flush().unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert_eq!(SealError::from_io(&e), Some(&SealError::Exhausted));
    assert!(w.get_ref().is_empty(), "nothing went out");
}

#[test]
fn a_write_after_close_is_refused() {
    let (sealer, _) = p2s();
    let mut w = SealWriter::new(Vec::new(), sealer);
    w.write_all(b"secret").unwrap();
    assert!(
        !format!("{w:?}").contains("115"),
        "no buffered byte in Debug: {w:?}"
    );
    w.flush().unwrap();
    w.get_mut().clear();
    w.write_all(b"x").unwrap();
    w.close().unwrap();
    let e = w.write(b"y").unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    assert_eq!(SealError::from_io(&e), Some(&SealError::Closed));
    w.close().unwrap();
    assert_eq!(
        w.get_ref().len(),
        HEADER_LEN + 1 + TAG_LEN + HEADER_LEN + TAG_LEN
    );
}

#[test]
fn a_read_timeout_in_the_middle_of_a_record_resumes_where_it_stopped() {
    let (mut sealer, opener) = p2s();
    let m = pattern(10_000, 7);
    let rec = records(&mut sealer, &[&m]).concat();
    let (mut a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut r = OpenReader::new(b, opener);
    a.write_all(&rec[..6000]).unwrap();
    let e = r.fill_buf().map(<[u8]>::len).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{e:?}"
    );
    assert!(
        SealError::from_io(&e).is_none(),
        "a timeout, not a bad record"
    );
    a.write_all(&rec[6000..]).unwrap();
    let mut got = vec![0u8; m.len()];
    r.read_exact(&mut got).unwrap();
    assert_eq!(got, m);
}

/// Records of random sizes, the stream read back in random chunk sizes.
fn stream_of(sizes: &[usize]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let (sealer, _) = p2s();
    let mut w = SealWriter::new(Vec::new(), sealer);
    let msgs: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(n, i as u8))
        .collect();
    for m in &msgs {
        w.write_all(m).unwrap();
        w.flush().unwrap();
    }
    w.close().unwrap();
    (msgs, w.get_ref().clone())
}

/// A reader that hands out at most `chunks[i % len]` bytes per read.
struct Trickle<'a> {
    bytes: &'a [u8],
    chunks: Vec<usize>,
    i: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let c = self.chunks[self.i % self.chunks.len()].max(1);
        self.i += 1;
        let n = c.min(out.len()).min(self.bytes.len());
        out[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    /// Arbitrary bytes never panic the decoder, and never come out as data (a forged tag
    /// would have to be guessed); a header of any value is handled.
    #[test]
    fn arbitrary_bytes_never_panic_the_decoder_and_never_come_out(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        header in any::<u32>(),
        chunk in 1usize..64,
    ) {
        let (_, mut opener) = p2s();
        let mut buf = bytes.clone();
        let opened = opener.open(&mut buf);
        let came_out = matches!(opened, Ok(Opened::Data { .. } | Opened::End { .. }));
        prop_assert!(!came_out);
        let mut with_header = header.to_le_bytes().to_vec();
        with_header.extend_from_slice(&bytes);
        for wire in [&bytes, &with_header] {
            let (_, opener) = p2s();
            let mut r = OpenReader::new(Trickle { bytes: wire, chunks: vec![chunk], i: 0 }, opener);
            let (got, stop) = drain(&mut r, chunk);
            prop_assert!(got.is_empty());
            prop_assert!(SealError::from_io(&stop.unwrap_err()).is_some());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any messages round trip through any chunking of reads.
    #[test]
    fn any_messages_round_trip_through_any_chunking(
        sizes in proptest::collection::vec(1usize..70_000, 1..6),
        chunks in proptest::collection::vec(1usize..9000, 1..5),
        read_size in 1usize..100_000,
    ) {
        let (msgs, wire) = stream_of(&sizes);
        let (_, opener) = p2s();
        let mut r = OpenReader::new(Trickle { bytes: &wire, chunks, i: 0 }, opener);
        let (got, stop) = drain(&mut r, read_size);
        prop_assert!(stop.is_ok());
        prop_assert_eq!(got, msgs.concat());
    }

    /// One altered byte anywhere stops the stream at the record holding it; what came
    /// out before is exactly the records before it.
    #[test]
    fn one_altered_byte_stops_the_stream_at_its_record(
        sizes in proptest::collection::vec(1usize..5000, 1..5),
        at in any::<prop::sample::Index>(),
        xor in 1u8..,
    ) {
        let (msgs, mut wire) = stream_of(&sizes);
        let at = at.index(wire.len());
        wire[at] ^= xor;
        // The record holding `at`: walk the record boundaries.
        let mut bounds = vec![0usize];
        for m in &msgs {
            bounds.push(bounds.last().unwrap() + HEADER_LEN + m.len() + TAG_LEN);
        }
        let hit = bounds.iter().rposition(|&b| b <= at).unwrap();
        let (got, stop) = open_wire(&wire);
        let e = seal_error(&stop);
        prop_assert_eq!(got, msgs[..hit].concat());
        match e {
            SealError::BadTag { record } | SealError::Oversized { record, .. }
            | SealError::Truncated { record, .. } => prop_assert_eq!(record, hit as u64),
            other => prop_assert!(false, "{other:?}"),
        }
    }
}

#[test]
fn writer_threads_sharing_one_seal_writer_on_a_cloned_socket_arrive_whole_and_in_order() {
    use std::sync::{Arc, Mutex};
    let (p, s) = keys(SESSION, Channel::Control);
    let (a, b) = UnixStream::pair().unwrap();
    let (sealer, _) = p.split();
    let writer = Arc::new(Mutex::new(SealWriter::new(a.try_clone().unwrap(), sealer)));
    let threads: Vec<_> = (0..2u8)
        .map(|t| {
            let writer = Arc::clone(&writer);
            thread::spawn(move || {
                for i in 0..200u32 {
                    let body = pattern(1 + (i as usize * 997) % 9000, t);
                    let mut frame = (body.len() as u32 + 5).to_le_bytes().to_vec();
                    frame.push(t);
                    frame.extend_from_slice(&i.to_le_bytes());
                    frame.extend_from_slice(&body);
                    let mut w = writer.lock().unwrap();
                    w.write_all(&frame).unwrap();
                    w.flush().unwrap();
                }
            })
        })
        .collect();
    let (_, opener) = s.split();
    let mut r = OpenReader::new(b, opener);
    let mut next = [0u32; 2];
    for _ in 0..400 {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).unwrap();
        let mut frame = vec![0u8; u32::from_le_bytes(len) as usize];
        r.read_exact(&mut frame).unwrap();
        let t = frame[0];
        let i = u32::from_le_bytes(frame[1..5].try_into().unwrap());
        assert_eq!(i, next[t as usize], "thread {t}'s messages in order");
        assert_eq!(frame[5..], pattern(1 + (i as usize * 997) % 9000, t));
        next[t as usize] += 1;
    }
    threads.into_iter().for_each(|h| h.join().unwrap());
    drop(a);
    writer.lock().unwrap().close().unwrap();
    let (rest, end) = drain(&mut r, 64);
    assert!(rest.is_empty());
    end.expect("a clean end");
}
