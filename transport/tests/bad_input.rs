//! Hostile and broken push frames over real sockets: each gives a typed error, closes the
//! connection, and leaves every byte outside the region (and every byte of a refused
//! batch) untouched.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use colo_memory::{Error as MemError, PageBitmap, Region};
use colo_transport::Error;
use colo_transport::framing;
use colo_transport::push::{PushReceiver, PushSender, RegionDesc, WriteRun};
use colo_transport::tcp::wire::{MAX_BATCH_BYTES, PushFrame, RunDesc};
use colo_transport::tcp::{TcpPushListener, TcpPushOptions, TcpPushSender};

const PAGE: u64 = 4096;
const PAGES: u64 = 16;
const GUARD: u8 = 0xAA;
const T: Duration = Duration::from_secs(10);

/// A region of PAGES pages between two guard pages, all filled with GUARD.
struct Guarded {
    whole: Region,
    inner: Arc<Region>,
}

impl Guarded {
    fn new() -> Self {
        let whole = Region::anonymous(((PAGES + 2) * PAGE) as usize).unwrap();
        whole
            .write_at(0, &vec![GUARD; ((PAGES + 2) * PAGE) as usize])
            .unwrap();
        let inner = Arc::new(whole.sub(PAGE, PAGES * PAGE).unwrap());
        Self { whole, inner }
    }

    /// Asserts that the guard pages around the region are intact.
    fn assert_guards(&self) {
        let mut b = vec![0u8; PAGE as usize];
        for off in [0, (PAGES + 1) * PAGE] {
            self.whole.read_at(off, &mut b).unwrap();
            assert!(
                b.iter().all(|&x| x == GUARD),
                "a guard page at {off} changed"
            );
        }
    }

    /// Asserts that no byte of the whole mapping changed.
    fn assert_untouched(&self) {
        let mut b = vec![0u8; ((PAGES + 2) * PAGE) as usize];
        self.whole.read_at(0, &mut b).unwrap();
        let bad = b.iter().position(|&x| x != GUARD);
        assert_eq!(
            bad, None,
            "a byte changed at offset {bad:?} of the guarded mapping"
        );
    }
}

fn hello(desc: &RegionDesc) -> [u8; 32] {
    PushFrame::Hello {
        key: desc.key,
        region_len: desc.len,
        page_kib: 4,
        stream: 0,
        streams: 1,
    }
    .to_bytes()
}

fn batch(epoch: u64, runs: &[(u64, u64)], declared: Option<u64>) -> Vec<u8> {
    let total: u64 = runs.iter().map(|r| r.1).sum();
    let mut v = PushFrame::Batch {
        epoch,
        runs: runs.len() as u32,
        bytes: declared.unwrap_or(total),
    }
    .to_bytes()
    .to_vec();
    for &(o, l) in runs {
        v.extend_from_slice(zerocopy::IntoBytes::as_bytes(&RunDesc::new(o, l)));
    }
    v.extend(std::iter::repeat_n(0x55, total.min(1 << 20) as usize));
    v
}

/// Connects a raw client, sends `after_hello` once the stream is accepted, and returns the
/// receiver's error. Checks that the receiver closed the connection and that the guarded
/// mapping is untouched.
/// Proves the test pair's key on a raw push stream `index`, as a sender does first.
fn authenticate(s: &mut TcpStream, index: u32) {
    colo_auth::connect(
        s,
        &colo_transport::testing::credentials(),
        colo_auth::Role::Primary,
        colo_auth::Channel::Push(index),
        T,
    )
    .unwrap();
}

fn run_case(after_hello: &[u8]) -> Error {
    run_case_with(after_hello, true)
}

/// As [`run_case`]; with `untouched` false only the guards are checked (a batch cut off in
/// its data may have placed part of it inside the region: that epoch never commits).
fn run_case_with(after_hello: &[u8], untouched: bool) -> Error {
    let g = Guarded::new();
    let listener = TcpPushListener::bind(
        "127.0.0.1:0",
        Arc::clone(&g.inner),
        PAGE as u32,
        colo_transport::testing::credentials(),
    )
    .unwrap();
    let desc = *listener.desc();
    let rx = std::thread::spawn(move || {
        let mut rx = listener.accept(T).unwrap();
        rx.next_commit(T).unwrap_err()
    });
    let mut s = TcpStream::connect(("127.0.0.1", desc.port)).unwrap();
    authenticate(&mut s, 0);
    s.write_all(&hello(&desc)).unwrap();
    let mut ack = [0u8; 32];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(PushFrame::parse(&ack).unwrap(), PushFrame::HelloAck);
    let _ = s.write_all(after_hello);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let err = rx.join().unwrap();
    // The receiver closed its end: reading gives end of stream or a reset, never data.
    s.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("receiver sent {n} bytes after a bad frame"),
    }
    if untouched {
        g.assert_untouched();
    } else {
        g.assert_guards();
    }
    err
}

#[test]
fn truncated_frames_are_refused() {
    let e = run_case(&PushFrame::Fence(1).to_bytes()[..20]);
    assert!(
        matches!(
            e,
            Error::Frame(framing::Error::Truncated { got: 20, want: 32 })
        ),
        "{e}"
    );
    let mut b = batch(1, &[(0, PAGE)], None);
    b.truncate(32 + 16 + 100);
    let e = run_case_with(&b, false);
    assert!(
        matches!(e, Error::Frame(framing::Error::Truncated { .. })),
        "{e}"
    );
    let b = batch(1, &[(0, PAGE)], None);
    let e = run_case(&b[..40]);
    assert!(
        matches!(
            e,
            Error::Frame(framing::Error::Truncated { got: 8, want: 16 })
        ),
        "{e}"
    );
}

#[test]
fn wrong_magic_is_refused() {
    let mut f = PushFrame::Fence(1).to_bytes();
    f[..4].copy_from_slice(b"HTTP");
    assert!(matches!(
        run_case(&f),
        Error::Frame(framing::Error::BadMagic { .. })
    ));
}

#[test]
fn wrong_version_is_refused() {
    let mut f = PushFrame::Fence(1).to_bytes();
    f[4] = 2;
    assert!(matches!(
        run_case(&f),
        Error::Frame(framing::Error::VersionMismatch {
            ours: 1,
            theirs: 2,
            ..
        })
    ));
}

#[test]
fn lengths_over_the_limit_are_refused() {
    let f = PushFrame::Batch {
        epoch: 1,
        runs: 1,
        bytes: MAX_BATCH_BYTES + 1,
    }
    .to_bytes();
    assert!(matches!(
        run_case(&f),
        Error::Frame(framing::Error::TooLarge { .. })
    ));
    let f = PushFrame::Batch {
        epoch: 1,
        runs: 5000,
        bytes: 1,
    }
    .to_bytes();
    assert!(matches!(
        run_case(&f),
        Error::Frame(framing::Error::TooLarge { .. })
    ));
    // A header whose byte count disagrees with its runs.
    let e = run_case(&batch(1, &[(0, PAGE)], Some(2 * PAGE)));
    assert!(matches!(e, Error::Protocol(_)), "{e}");
}

#[test]
fn offsets_and_runs_outside_the_region_are_refused_before_any_byte_lands() {
    // Entirely outside.
    let e = run_case(&batch(1, &[(PAGES * PAGE, PAGE)], None));
    assert!(
        matches!(e, Error::Memory(MemError::OutOfBounds { .. })),
        "{e}"
    );
    // Crossing the end by one byte.
    let e = run_case(&batch(1, &[(PAGES * PAGE - PAGE + 1, PAGE)], None));
    assert!(
        matches!(e, Error::Memory(MemError::OutOfBounds { .. })),
        "{e}"
    );
    // Wrapping arithmetic.
    let e = run_case(&batch(1, &[(u64::MAX - 10, 20)], None));
    assert!(
        matches!(e, Error::Memory(MemError::OutOfBounds { .. })),
        "{e}"
    );
    // A valid run followed by a bad one in the same batch: the valid one must not land
    // either (the guarded mapping stays untouched).
    let e = run_case(&batch(1, &[(0, PAGE), (PAGES * PAGE, PAGE)], None));
    assert!(
        matches!(e, Error::Memory(MemError::OutOfBounds { .. })),
        "{e}"
    );
}

#[test]
fn epoch_commit_with_a_bitmap_of_the_wrong_size_is_refused() {
    let mut f = PushFrame::EpochEnd { epoch: 1, words: 2 }
        .to_bytes()
        .to_vec();
    f.extend_from_slice(&[0u8; 16]);
    let e = run_case(&f);
    assert!(
        matches!(
            e,
            Error::Memory(MemError::BitmapSize {
                found: 2,
                expected: 1,
                pages: 16
            })
        ),
        "{e}"
    );
    // Bits past the last page.
    let mut f = PushFrame::EpochEnd { epoch: 1, words: 1 }
        .to_bytes()
        .to_vec();
    f.extend_from_slice(&(1u64 << 20).to_le_bytes());
    assert!(matches!(
        run_case(&f),
        Error::Memory(MemError::BitmapExcess { pages: 16 })
    ));
}

#[test]
fn data_for_the_wrong_epoch_is_refused() {
    let e = run_case(&batch(3, &[(0, PAGE)], None));
    assert!(matches!(e, Error::Protocol(_)), "{e}");
}

#[test]
fn wrong_region_key_is_refused_at_connect() {
    let g = Guarded::new();
    let listener = TcpPushListener::bind(
        "127.0.0.1:0",
        Arc::clone(&g.inner),
        PAGE as u32,
        colo_transport::testing::credentials(),
    )
    .unwrap();
    let mut desc = *listener.desc();
    let rx = std::thread::spawn(move || listener.accept(T).map(|_| ()));
    desc.key ^= 1;
    let src = Arc::new(Region::anonymous((PAGES * PAGE) as usize).unwrap());
    let e = TcpPushSender::connect(
        ([127, 0, 0, 1], desc.port).into(),
        desc,
        src,
        &colo_transport::testing::credentials(),
        TcpPushOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Handshake(_)
                | Error::Frame(framing::Error::Recv(_))
                // A later stream that connected before the receiver closed its listener.
                | Error::Auth(colo_auth::AuthError::Io { .. })
        ),
        "{e}"
    );
    assert!(matches!(rx.join().unwrap(), Err(Error::BadKey { .. })));
    g.assert_untouched();
}

#[test]
fn sender_refuses_runs_outside_either_region_before_sending() {
    let g = Guarded::new();
    let listener = TcpPushListener::bind(
        "127.0.0.1:0",
        Arc::clone(&g.inner),
        PAGE as u32,
        colo_transport::testing::credentials(),
    )
    .unwrap();
    let desc = *listener.desc();
    let rx = std::thread::spawn(move || listener.accept(T).unwrap());
    let src = Arc::new(Region::anonymous((PAGES * PAGE) as usize).unwrap());
    let mut tx = TcpPushSender::connect(
        ([127, 0, 0, 1], desc.port).into(),
        desc,
        src,
        &colo_transport::testing::credentials(),
        TcpPushOptions::default(),
    )
    .unwrap();
    let _rx = rx.join().unwrap();
    let e = tx
        .post(&[WriteRun {
            src: 0,
            dst: PAGES * PAGE,
            len: PAGE,
        }])
        .unwrap_err();
    assert!(
        matches!(e, Error::Memory(MemError::OutOfBounds { .. })),
        "{e}"
    );
    let e = tx
        .post(&[WriteRun {
            src: PAGES * PAGE,
            dst: 0,
            len: 1,
        }])
        .unwrap_err();
    assert!(
        matches!(e, Error::Memory(MemError::OutOfBounds { .. })),
        "{e}"
    );
    let e = tx.commit(&PageBitmap::new(2 * PAGES)).unwrap_err();
    assert!(
        matches!(e, Error::Memory(MemError::BitmapPages { .. })),
        "{e}"
    );
    g.assert_untouched();
}

/// A stream that does not prove the pair key, even one that sends a valid Hello with the
/// right region key and frames after it, is dropped unread: nothing lands in the region,
/// and the real sender's streams still get in afterwards.
#[test]
fn an_unauthenticated_stream_is_dropped_and_the_real_sender_still_connects() {
    let g = Guarded::new();
    let listener = TcpPushListener::bind(
        "127.0.0.1:0",
        Arc::clone(&g.inner),
        PAGE as u32,
        colo_transport::testing::credentials(),
    )
    .unwrap();
    let desc = *listener.desc();
    let rx = std::thread::spawn(move || listener.accept(Duration::from_secs(20)));
    // A stranger who knows the region key (as a sniffer of an unencrypted control
    // channel would) but not the pair key.
    let mut stranger = TcpStream::connect(("127.0.0.1", desc.port)).unwrap();
    let mut bytes = hello(&desc).to_vec();
    bytes.extend_from_slice(&PushFrame::Fence(1).to_bytes());
    let _ = stranger.write_all(&bytes);
    stranger.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 64];
    match stranger.read(&mut b) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("the receiver answered a stranger with {n} bytes"),
    }
    // Another pair's key is refused the same way.
    let mut other = TcpStream::connect(("127.0.0.1", desc.port)).unwrap();
    let e = colo_auth::connect(
        &mut other,
        &colo_auth::Credentials::key(colo_auth::PairKey::from_bytes([9; 32])),
        colo_auth::Role::Primary,
        colo_auth::Channel::Push(0),
        T,
    )
    .unwrap_err();
    assert!(matches!(e, colo_auth::AuthError::OtherPair { .. }), "{e}");
    let guest = Arc::new(Region::anonymous((PAGES * PAGE) as usize).unwrap());
    let tx = TcpPushSender::connect(
        ([127, 0, 0, 1], desc.port).into(),
        desc,
        guest,
        &colo_transport::testing::credentials(),
        TcpPushOptions::default(),
    )
    .unwrap();
    assert!(rx.join().unwrap().is_ok(), "the real sender got in");
    drop(tx);
    g.assert_untouched();
}
