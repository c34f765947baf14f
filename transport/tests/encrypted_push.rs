//! The TCP push with `--encrypt`: epochs land exactly as in the clear over several
//! streams, a sniffer between the sides sees none of the page bytes, a side that encrypts
//! and one that does not refuse each other, and a man in the middle who flips one bit
//! after the handshake is caught: the epoch never commits and no byte of the region
//! changes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use colo_memory::{PageBitmap, Region};
use colo_transport::Error;
use colo_transport::push::{PushReceiver, WriteRun, push_epoch};
use colo_transport::tcp::{TcpPushListener, TcpPushOptions, TcpPushSender};

const PAGE: u32 = 4096;
const PAGES: u64 = 64;
const T: Duration = Duration::from_secs(10);
/// What the guest's pages hold: easy to look for on the wire.
const MARK: &[u8; 16] = b"GUEST-PAGE-BYTES";

fn creds() -> colo_auth::Credentials {
    colo_transport::testing::credentials().encrypted(true)
}

fn region() -> Arc<Region> {
    Arc::new(Region::anonymous((PAGES * u64::from(PAGE)) as usize).unwrap())
}

fn marked_guest() -> Arc<Region> {
    let g = region();
    g.write_at(
        0,
        &MARK.repeat((PAGES * u64::from(PAGE)) as usize / MARK.len()),
    )
    .unwrap();
    g
}

/// A relay from a local port to `to` that records what the sender sent and, at byte
/// `flip` of that direction (if any), flips one bit.
fn relay(to: u16, flip: Option<usize>) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    std::thread::spawn(move || {
        let Ok((mut a, _)) = l.accept() else { return };
        let mut b = TcpStream::connect(("127.0.0.1", to)).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
        });
        let mut buf = [0u8; 65536];
        let mut at = 0usize;
        loop {
            let n = match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(f) = flip.filter(|f| (at..at + n).contains(f)) {
                buf[f - at] ^= 0x10;
            }
            record.lock().unwrap().extend_from_slice(&buf[..n]);
            at += n;
            if b.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = b.shutdown(std::net::Shutdown::Both);
    });
    (port, seen)
}

fn all_pages() -> Vec<u64> {
    (0..PAGES).collect()
}

fn bitmap(pages: &[u64]) -> PageBitmap {
    let mut b = PageBitmap::new(PAGES);
    for &p in pages {
        b.set(p);
    }
    b
}

#[test]
fn encrypted_epochs_land_exactly_and_the_wire_shows_no_page_byte() {
    let cache = region();
    let guest = marked_guest();
    let listener = TcpPushListener::bind("127.0.0.1:0", Arc::clone(&cache), PAGE, creds()).unwrap();
    let desc = *listener.desc();
    let (port, seen) = relay(desc.port, None);
    let rx = std::thread::spawn(move || listener.accept(T).unwrap());
    // One stream, so the one relay sees all of it.
    let mut tx = TcpPushSender::connect(
        ([127, 0, 0, 1], port).into(),
        desc,
        Arc::clone(&guest),
        &creds(),
        TcpPushOptions {
            streams: 1,
            ..TcpPushOptions::default()
        },
    )
    .unwrap();
    let mut rx = rx.join().unwrap();
    let pages = all_pages();
    let runs = pages.iter().map(|&p| WriteRun::pages(p, 1, PAGE));
    push_epoch(&mut tx, runs, &bitmap(&pages)).unwrap();
    let c = rx.next_commit(T).unwrap();
    assert_eq!(c.bytes, PAGES * u64::from(PAGE));
    rx.release(c.epoch).unwrap();
    let (mut want, mut got) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
    for p in pages {
        guest.read_at(p * u64::from(PAGE), &mut want).unwrap();
        cache.read_at(p * u64::from(PAGE), &mut got).unwrap();
        assert!(want == got, "page {p} landed as sent");
    }
    drop(tx);
    let wire = seen.lock().unwrap().clone();
    assert!(
        wire.len() as u64 > PAGES * u64::from(PAGE),
        "the pages went through"
    );
    assert!(
        !wire.windows(MARK.len()).any(|w| w == MARK),
        "a sniffer saw the guest's bytes"
    );
}

#[test]
fn a_side_that_encrypts_and_one_that_does_not_refuse_each_other() {
    let listener = TcpPushListener::bind("127.0.0.1:0", region(), PAGE, creds()).unwrap();
    let desc = *listener.desc();
    let rx = std::thread::spawn(move || listener.accept(Duration::from_secs(3)));
    let e = TcpPushSender::connect(
        ([127, 0, 0, 1], desc.port).into(),
        desc,
        marked_guest(),
        &colo_transport::testing::credentials(),
        TcpPushOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Auth(colo_auth::AuthError::EncryptMismatch {
                peer_encrypts: true
            })
        ),
        "{e}"
    );
    // The receiver refused it and is still waiting (until its own timeout).
    assert!(matches!(rx.join().unwrap(), Err(Error::Timeout(..))));
}

/// A bit flipped inside the first sealed record (the first batch, after the plain
/// handshake, Hello and HelloAck) fails that record's tag: the receiver reports it, the
/// epoch never commits, and the region holds not one byte of the batch.
#[test]
fn a_flipped_bit_after_the_handshake_is_caught_and_lands_nothing() {
    // The connector's bytes before the first record: its auth Hello (56) and proof (32),
    // then the push Hello (32).
    let first_record = 56 + 32 + 32;
    let cache = region();
    let listener = TcpPushListener::bind("127.0.0.1:0", Arc::clone(&cache), PAGE, creds()).unwrap();
    let desc = *listener.desc();
    let (port, _) = relay(desc.port, Some(first_record + 100));
    let rx = std::thread::spawn(move || listener.accept(T).unwrap());
    let mut tx = TcpPushSender::connect(
        ([127, 0, 0, 1], port).into(),
        desc,
        marked_guest(),
        &creds(),
        TcpPushOptions {
            streams: 1,
            ..TcpPushOptions::default()
        },
    )
    .unwrap();
    let mut rx = rx.join().unwrap();
    let pages = all_pages();
    let runs = pages.iter().map(|&p| WriteRun::pages(p, 1, PAGE));
    let sent = push_epoch(&mut tx, runs, &bitmap(&pages));
    assert!(sent.is_err(), "the epoch cannot be acknowledged");
    let e = rx.next_commit(T).unwrap_err();
    assert!(
        !matches!(e, Error::Timeout(..)),
        "the receiver reports the bad record at once: {e}"
    );
    let mut all = vec![0u8; (PAGES * u64::from(PAGE)) as usize];
    cache.read_at(0, &mut all).unwrap();
    assert!(
        all.iter().all(|&b| b == 0),
        "a byte of the tampered batch landed"
    );
}
