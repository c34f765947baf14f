//! The push pipeline driven against the in-process double that enforces the verbs rules.

mod common;

use std::sync::Arc;
use std::time::Duration;

use colo_transport::double::{DoubleReceiver, Faults};
use colo_transport::push::{PushReceiver, PushSender, WriteRun, push_epoch};
use colo_transport::{Error, Region};
use common::{bitmap_of, epoch_pages, pattern};

const PAGE: u32 = 4096;
const PAGES: u64 = 256;
const T: Duration = Duration::from_secs(10);

fn regions() -> (Arc<Region>, Arc<Region>) {
    let len = (PAGES * u64::from(PAGE)) as usize;
    (
        Arc::new(Region::anonymous(len).unwrap()),
        Arc::new(Region::anonymous(len).unwrap()),
    )
}

fn fill(src: &Region, epoch: u64, pages: &[u64]) {
    let mut b = vec![0u8; PAGE as usize];
    for &p in pages {
        pattern(epoch, p, &mut b);
        src.write_at(p * u64::from(PAGE), &b).unwrap();
    }
}

fn assert_landed(dst: &Region, epoch: u64, pages: &[u64]) {
    let (mut want, mut got) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
    for &p in pages {
        pattern(epoch, p, &mut want);
        dst.read_at(p * u64::from(PAGE), &mut got).unwrap();
        assert!(want == got, "page {p} of epoch {epoch} did not land");
    }
}

fn runs(pages: &[u64]) -> impl Iterator<Item = WriteRun> + '_ {
    pages.iter().map(|&p| WriteRun::pages(p, 1, PAGE))
}

#[test]
fn fence_returns_only_after_every_write_landed() {
    let (src, dst) = regions();
    let rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let mut tx = rx.connect(*rx.desc(), Arc::clone(&src), Faults::default());
    let pages: Vec<u64> = (0..PAGES).collect();
    fill(&src, 1, &pages);
    tx.post(&runs(&pages).collect::<Vec<_>>()).unwrap();
    tx.fence().unwrap();
    assert_landed(&dst, 1, &pages);
}

#[test]
fn commit_is_seen_only_after_all_its_data() {
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let mut tx = rx.connect(*rx.desc(), Arc::clone(&src), Faults::default());
    let all: Vec<u64> = (0..PAGES).collect();
    fill(&src, 9, &all);
    // No explicit fence: commit must still order itself after every write.
    tx.post(&runs(&all).collect::<Vec<_>>()).unwrap();
    assert_eq!(tx.commit(&bitmap_of(&all, PAGES)).unwrap(), 1);
    assert_eq!(rx.next_commit(T).unwrap().epoch, 1);
    assert_landed(&dst, 9, &all);
}

#[test]
fn epochs_commit_in_order_with_exact_bitmaps() {
    let (src, dst) = regions();

    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let mut tx = rx.connect(*rx.desc(), Arc::clone(&src), Faults::default());
    for epoch in 1..=3 {
        let pages = epoch_pages(epoch, PAGES);
        fill(&src, epoch, &pages);
        let s = push_epoch(&mut tx, runs(&pages), &bitmap_of(&pages, PAGES)).unwrap();
        assert_eq!((s.epoch, s.runs), (epoch, pages.len() as u64));
        let c = rx.next_commit(T).unwrap();
        assert_eq!(
            (c.epoch, c.bytes),
            (epoch, pages.len() as u64 * u64::from(PAGE))
        );
        assert_eq!(c.bitmap, bitmap_of(&pages, PAGES));
        // When the commit is visible, every page of the epoch is in place.
        assert_landed(&dst, epoch, &pages);
        rx.release(epoch).unwrap();
    }
}

#[test]
fn writes_of_the_next_epoch_wait_for_release() {
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let mut tx = rx.connect(*rx.desc(), Arc::clone(&src), Faults::default());
    push_epoch(&mut tx, runs(&[1]), &bitmap_of(&[1], PAGES)).unwrap();
    assert_eq!(rx.next_commit(T).unwrap().epoch, 1);
    // Epoch 1 not released: a write into epoch 2 would overwrite the cache mid-commit.
    let e = push_epoch(&mut tx, runs(&[2]), &bitmap_of(&[2], PAGES)).unwrap_err();
    assert!(e.to_string().contains("epoch 2"), "{e}");
    assert!(
        rx.release(2).is_err(),
        "releasing an epoch that never committed"
    );
}

/// Epoch 1 commits; epoch 2 fails at its `at`-th write with `faults`. Returns the sender's
/// and the receiver's errors, and checks that epoch 2 never commits.
fn fault_mid_epoch(faults: impl Fn(u64) -> Faults) -> (Error, Error) {
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let first = epoch_pages(1, PAGES);
    let at = first.len() as u64 + 10;
    let mut tx = rx.connect(*rx.desc(), Arc::clone(&src), faults(at));
    fill(&src, 1, &first);
    push_epoch(&mut tx, runs(&first), &bitmap_of(&first, PAGES)).unwrap();
    let c = rx.next_commit(T).unwrap();
    rx.release(c.epoch).unwrap();
    let second = epoch_pages(2, PAGES);
    let tx_err = push_epoch(&mut tx, runs(&second), &bitmap_of(&second, PAGES)).unwrap_err();
    let rx_err = rx.next_commit(T).unwrap_err();
    assert!(
        matches!(
            rx.next_commit(Duration::from_millis(50)),
            Err(Error::Timeout(..))
        ),
        "epoch 2 committed"
    );
    // The queue pair is in error: nothing more is accepted.
    assert!(tx.post(&[WriteRun::pages(0, 1, PAGE)]).is_err() || tx.fence().is_err());
    (tx_err, rx_err)
}

#[test]
fn lost_connection_mid_epoch_never_commits() {
    let (t, r) = fault_mid_epoch(|at| Faults {
        lose_connection_at: Some(at),
        ..Faults::default()
    });
    assert!(matches!(t, Error::Injected(_)), "{t}");
    assert!(matches!(r, Error::PeerClosed), "{r}");
}

#[test]
fn corrupted_request_mid_epoch_is_a_key_error() {
    let (t, r) = fault_mid_epoch(|at| Faults {
        corrupt_key_at: Some(at),
        ..Faults::default()
    });
    assert!(matches!(t, Error::BadKey { .. }), "{t}");
    assert!(matches!(r, Error::BadKey { .. }), "{r}");
}

#[test]
fn out_of_bounds_offset_mid_epoch_is_refused_and_lands_nowhere() {
    let (t, r) = fault_mid_epoch(|at| Faults {
        out_of_bounds_at: Some(at),
        ..Faults::default()
    });
    assert!(matches!(t, Error::OutOfBounds { .. }), "{t}");
    assert!(matches!(r, Error::OutOfBounds { .. }), "{r}");
}

#[test]
fn a_wrong_key_in_the_descriptor_fails_the_first_write() {
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let mut desc = *rx.desc();
    desc.key ^= 0x10;
    let mut tx = rx.connect(desc, src, Faults::default());
    let e = push_epoch(&mut tx, runs(&[3]), &bitmap_of(&[3], PAGES)).unwrap_err();
    assert!(matches!(e, Error::BadKey { .. }), "{e}");
    assert!(matches!(rx.next_commit(T), Err(Error::BadKey { .. })));
    let mut page = vec![1u8; PAGE as usize];
    dst.read_at(3 * u64::from(PAGE), &mut page).unwrap();
    assert!(
        page.iter().all(|&b| b == 0),
        "a write with a bad key landed"
    );
}
