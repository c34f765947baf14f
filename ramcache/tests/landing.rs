//! Release gating through `Landing`, over real TCP push streams on loopback: epochs land and
//! are released at once, the held epoch keeps the next one out of the cache until its
//! commit, and an interrupt or a lost sender ends every wait.

mod common;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use colo_memory::{PageBitmap, Region};
use colo_ramcache::{Error, Landing, LandingEnd};
use colo_transport::push::{WriteRun, push_epoch};
use colo_transport::tcp::{TcpPushListener, TcpPushOptions, TcpPushSender};
use common::{PAGE, PAGES, cache, page_bytes, svm_snapshot};

const T: Duration = Duration::from_secs(10);

/// A landing over a fresh cache, and a connected sender of a guest region.
fn pair() -> (Landing, TcpPushSender, Arc<Region>, Vec<Arc<Region>>) {
    let (c, svm) = cache();
    let listener = TcpPushListener::bind(
        "127.0.0.1:0",
        Arc::clone(c.region()),
        PAGE as u32,
        colo_transport::testing::credentials(),
    )
    .unwrap();
    let desc = *listener.desc();
    let guest = Arc::new(Region::anonymous((PAGES * PAGE) as usize).unwrap());
    let g = Arc::clone(&guest);
    let tx = std::thread::spawn(move || {
        TcpPushSender::connect(
            ([127, 0, 0, 1], desc.port).into(),
            desc,
            g,
            &colo_transport::testing::credentials(),
            TcpPushOptions::default(),
        )
        .unwrap()
    });
    let rx = listener.accept(T).unwrap();
    (
        Landing::start(c, Box::new(rx)).unwrap(),
        tx.join().unwrap(),
        guest,
        svm,
    )
}

/// Writes `pages` of the guest with `tag` and pushes them as one epoch.
fn push(tx: &mut TcpPushSender, guest: &Region, tag: u8, pages: &[u64]) -> u64 {
    let mut bitmap = PageBitmap::new(PAGES);
    for &p in pages {
        guest.write_at(p * PAGE, &page_bytes(tag, p)).unwrap();
        bitmap.set(p);
    }
    let runs: Vec<WriteRun> = bitmap
        .runs()
        .map(|(p, n)| WriteRun::pages(p, n, PAGE as u32))
        .collect();
    push_epoch(tx, runs, &bitmap).unwrap().epoch
}

fn stage(l: &Landing, k: u64) {
    l.with_cache(|c| {
        c.seal_pages(k).unwrap();
        c.stage_state(vec![k as u8]).unwrap();
        c.stage_disk_acked().unwrap();
    });
}

#[test]
fn unheld_epochs_are_released_at_once_and_the_held_one_after_its_commit() {
    let (landing, mut tx, guest, svm) = pair();
    // Background epochs: each is released as it lands, or the next push would block.
    for (tag, page) in [(1u8, 3u64), (2, 4), (3, 5)] {
        let e = push(&mut tx, &guest, tag, &[page]);
        landing.wait_landed(e, T).unwrap();
    }
    landing.hold(4);
    assert_eq!(push(&mut tx, &guest, 4, &[6, 7]), 4);
    landing.wait_landed(4, T).unwrap();
    // Epoch 5 cannot land while 4 is held: its commit waits for the release.
    let (done_tx, done_rx) = mpsc::channel();
    let g = Arc::clone(&guest);
    let pusher = std::thread::spawn(move || {
        let e = push(&mut tx, &g, 5, &[8]);
        done_tx.send(e).unwrap();
        tx
    });
    assert!(
        done_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "epoch 5 committed while epoch 4 was held"
    );
    assert_eq!(landing.landed(), 4);
    let before = svm_snapshot(&svm);
    stage(&landing, 4);
    let done = landing
        .commit_and_release(4, &PageBitmap::new(PAGES))
        .unwrap();
    assert_eq!((done.checkpoint, done.pushed_pages), (1, 5));
    assert!(svm_snapshot(&svm) != before, "the commit reached the SVM");
    assert_eq!(
        done_rx.recv_timeout(T).unwrap(),
        5,
        "epoch 5 goes after the release"
    );
    landing.wait_landed(5, T).unwrap();
    drop(pusher.join().unwrap());
}

#[test]
fn an_interrupt_ends_a_wait_for_pages_at_once() {
    let (landing, _tx, _guest, _svm) = pair();
    let stop = landing.interrupter();
    let t = Instant::now();
    let waker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        stop.interrupt();
    });
    let e = landing.wait_landed(1, T).unwrap_err();
    assert!(matches!(e, Error::Landing(LandingEnd::Interrupted)), "{e}");
    assert!(t.elapsed() < T / 2, "the wait ended with the interrupt");
    waker.join().unwrap();
}

#[test]
fn a_lost_sender_ends_the_landing_and_a_wait_times_out_without_one() {
    let (landing, tx, _guest, _svm) = pair();
    assert!(matches!(
        landing.wait_landed(1, Duration::from_millis(50)),
        Err(Error::LandTimeout {
            epoch: 1,
            landed: 0
        })
    ));
    drop(tx);
    let e = landing.wait_landed(1, T).unwrap_err();
    assert!(matches!(e, Error::Landing(LandingEnd::Transport(_))), "{e}");
    assert!(matches!(landing.ended(), Some(LandingEnd::Transport(_))));
}

#[test]
fn dropping_a_landing_held_on_an_epoch_stops_and_joins_its_thread() {
    let (landing, mut tx, guest, _svm) = pair();
    landing.hold(1);
    push(&mut tx, &guest, 1, &[1]);
    landing.wait_landed(1, T).unwrap();
    let t = Instant::now();
    drop(landing); // the thread waits for the commit of epoch 1: the drop must end that
    assert!(t.elapsed() < Duration::from_secs(2));
}
