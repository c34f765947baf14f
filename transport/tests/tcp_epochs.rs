//! Epoch ordering of the TCP backend: the next epoch never lands or commits before the
//! receiver released the last one, even when it carries no data; a commit started without
//! waiting for its acknowledgement keeps that order.

use std::sync::Arc;
use std::time::Duration;

use colo_memory::{PageBitmap, Region};
use colo_transport::Error;
use colo_transport::push::{PushReceiver, PushSender, WriteRun, push_epoch, start_epoch};
use colo_transport::tcp::{TcpPushListener, TcpPushOptions, TcpPushSender};

const PAGE: u32 = 4096;
const PAGES: u64 = 64;

fn words(w: &[u64]) -> PageBitmap {
    PageBitmap::from_words(w.to_vec(), PAGES).unwrap()
}

fn connected(streams: usize) -> (TcpPushSender, impl PushReceiver, Arc<Region>, Arc<Region>) {
    let cache = Arc::new(Region::anonymous((PAGES * u64::from(PAGE)) as usize).unwrap());
    let guest = Arc::new(Region::anonymous((PAGES * u64::from(PAGE)) as usize).unwrap());
    let listener = TcpPushListener::bind(
        "127.0.0.1:0",
        Arc::clone(&cache),
        PAGE,
        colo_transport::testing::credentials(),
    )
    .unwrap();
    let desc = *listener.desc();
    let acceptor = std::thread::spawn(move || listener.accept(Duration::from_secs(10)).unwrap());
    let opts = TcpPushOptions {
        streams,
        ..TcpPushOptions::default()
    };
    let tx = TcpPushSender::connect(
        ([127, 0, 0, 1], desc.port).into(),
        desc,
        Arc::clone(&guest),
        &colo_transport::testing::credentials(),
        opts,
    )
    .unwrap();
    (tx, acceptor.join().unwrap(), guest, cache)
}

fn fill(r: &Region, page: u64, byte: u8) {
    let p = r.ptr_at(page * u64::from(PAGE), u64::from(PAGE)).unwrap();
    // SAFETY: `ptr_at` checked that the page lies within the region, and nothing else
    // touches this test's region meanwhile.
    unsafe { std::ptr::write_bytes(p, byte, PAGE as usize) };
}

fn byte_at(r: &Region, page: u64) -> u8 {
    let p = r.ptr_at(page * u64::from(PAGE), 1).unwrap();
    // SAFETY: as in `fill`; the receiver committed the epoch, so its writes are done.
    unsafe { p.read() }
}

#[test]
fn a_started_commit_opens_the_next_epoch_and_keeps_the_order() {
    let (mut tx, mut rx, guest, cache) = connected(2);
    fill(&guest, 3, 0xa1);
    let s = start_epoch(&mut tx, [WriteRun::pages(3, 1, PAGE)], &words(&[1 << 3])).unwrap();
    assert_eq!((s.epoch, tx.epoch()), (1, 2), "epoch 2 opens at once");
    let c = rx.next_commit(Duration::from_secs(10)).unwrap();
    assert_eq!((c.epoch, c.bitmap), (1, words(&[1 << 3])));
    assert_eq!(byte_at(&cache, 3), 0xa1);
    tx.finish_commit().unwrap();
    tx.finish_commit().unwrap(); // nothing pending: returns at once
    // Epoch 2's pages are posted before epoch 1 is released; they must not land before.
    fill(&guest, 5, 0xb2);
    tx.post(&[WriteRun::pages(5, 1, PAGE)]).unwrap();
    let e2 = tx.start_commit(&words(&[1 << 5])).unwrap();
    assert_eq!(e2, 2);
    assert!(matches!(
        rx.next_commit(Duration::from_millis(200)),
        Err(Error::Timeout(..))
    ));
    rx.release(1).unwrap();
    let c = rx.next_commit(Duration::from_secs(10)).unwrap();
    assert_eq!((c.epoch, c.bitmap), (2, words(&[1 << 5])));
    assert_eq!(byte_at(&cache, 5), 0xb2);
    // A fence and a full commit take the pending acknowledgement first.
    tx.fence().unwrap();
    rx.release(2).unwrap();
    assert_eq!(
        push_epoch(&mut tx, std::iter::empty(), &words(&[0]))
            .unwrap()
            .epoch,
        3
    );
    assert_eq!(rx.next_commit(Duration::from_secs(10)).unwrap().epoch, 3);
}

#[test]
fn an_empty_epoch_waits_for_the_release_of_the_previous_one() {
    let cache = Arc::new(Region::anonymous((PAGES * u64::from(PAGE)) as usize).unwrap());
    let guest = Arc::new(Region::anonymous((PAGES * u64::from(PAGE)) as usize).unwrap());
    let listener = TcpPushListener::bind(
        "127.0.0.1:0",
        cache,
        PAGE,
        colo_transport::testing::credentials(),
    )
    .unwrap();
    let desc = *listener.desc();
    let acceptor = std::thread::spawn(move || listener.accept(Duration::from_secs(10)).unwrap());
    let opts = TcpPushOptions {
        streams: 2,
        ..TcpPushOptions::default()
    };
    let mut tx = TcpPushSender::connect(
        ([127, 0, 0, 1], desc.port).into(),
        desc,
        guest,
        &colo_transport::testing::credentials(),
        opts,
    )
    .unwrap();
    let mut rx = acceptor.join().unwrap();

    push_epoch(&mut tx, [WriteRun::pages(3, 1, PAGE)], &words(&[1 << 3])).unwrap();
    assert_eq!(rx.next_commit(Duration::from_secs(10)).unwrap().epoch, 1);
    // Epoch 1 is not released yet. An empty epoch 2 must not commit past it.
    let pusher = std::thread::spawn(move || {
        let r = push_epoch(&mut tx, std::iter::empty(), &words(&[0]));
        (tx, r)
    });
    assert!(matches!(
        rx.next_commit(Duration::from_millis(200)),
        Err(Error::Timeout(..))
    ));
    rx.release(1).unwrap();
    let c = rx.next_commit(Duration::from_secs(10)).unwrap();
    assert_eq!((c.epoch, c.bytes, c.bitmap), (2, 0, words(&[0])));
    let (_tx, r) = pusher.join().unwrap();
    assert_eq!(r.unwrap().epoch, 2);
    rx.release(2).unwrap();
}

#[test]
fn an_abort_ends_a_commit_waiting_for_a_receiver_that_never_answers() {
    // The receiver stays connected but never releases epoch 1, as a stopped or cut-off
    // secondary would: epoch 2's commit waits for it (up to the 60 s ack timeout).
    let (mut tx, mut rx, _guest, _cache) = connected(2);
    push_epoch(&mut tx, [WriteRun::pages(3, 1, PAGE)], &words(&[1 << 3])).unwrap();
    assert_eq!(rx.next_commit(Duration::from_secs(10)).unwrap().epoch, 1);
    let abort = tx.abort_handle();
    let (started_tx, started) = crossbeam_channel::bounded(1);
    let pusher = std::thread::spawn(move || {
        started_tx.send(()).unwrap();
        let r = push_epoch(&mut tx, [WriteRun::pages(4, 1, PAGE)], &words(&[1 << 4]));
        // Dropping the sender joins its workers: it must not hang on the silent peer.
        drop(tx);
        r
    });
    started.recv().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    abort.abort();
    let r = pusher.join().unwrap();
    assert!(
        matches!(&r, Err(e) if !matches!(e, Error::Timeout(..))),
        "the commit fails once aborted, not at its ack timeout: {r:?}"
    );
    drop(rx);
}
