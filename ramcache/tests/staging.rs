//! Epoch staging: a checkpoint cut off at every step leaves SVM memory exactly as it was,
//! SVM-only writes are reverted by the commit, and pages outside the union are not copied.

mod common;

use std::sync::Arc;
use std::time::Duration;

use colo_memory::PageBitmap;
use colo_memory::Region;
use colo_ramcache::{Error, RamCache, Stage};
use colo_transport::double::{DoubleReceiver, Faults};
use colo_transport::push::{EpochCommit, PushReceiver, WriteRun, push_epoch};
use colo_transport::tcp::{TcpPushListener, TcpPushOptions, TcpPushSender};
use common::{PAGE, PAGES, cache, locate, page_bytes, svm_snapshot, svm_write};

const T: Duration = Duration::from_secs(10);

fn commit_of(epoch: u64, pages: &[u64]) -> EpochCommit {
    let mut b = PageBitmap::new(PAGES);
    pages.iter().for_each(|&p| b.set(p));
    EpochCommit {
        epoch,
        bitmap: b,
        bytes: pages.len() as u64 * PAGE,
    }
}

/// Brings the cache and the SVM to a committed first checkpoint where both hold
/// `page_bytes(1, p)` everywhere, and returns the SVM snapshot.
fn committed_baseline(c: &mut RamCache, svm: &[Arc<Region>]) -> Vec<Vec<u8>> {
    for p in 0..PAGES {
        c.region().write_at(p * PAGE, &page_bytes(1, p)).unwrap();
    }
    let all: Vec<u64> = (0..PAGES).collect();
    c.land(&commit_of(1, &all)).unwrap();
    c.seal_pages(1).unwrap();
    c.stage_state(b"s1".to_vec()).unwrap();
    c.stage_disk_acked().unwrap();
    let done = c.commit(&PageBitmap::new(PAGES)).unwrap();
    assert_eq!((done.checkpoint, done.pages), (1, PAGES));
    let snap = svm_snapshot(svm);
    for p in 0..PAGES {
        assert!(
            snap[p as usize] == page_bytes(1, p),
            "initial sync of page {p}"
        );
    }
    snap
}

#[test]
fn a_checkpoint_cut_at_every_step_leaves_the_svm_unchanged() {
    // Steps of checkpoint 2: 0 nothing, 1 pages landing in the cache, 2 push epoch
    // landed, 3 sealed, 4 state staged, 5 disk acknowledged (complete, not yet committed).
    for cut in 0..=5 {
        let (mut c, svm) = cache();
        committed_baseline(&mut c, &svm);
        // The SVM runs on and writes page 5 itself.
        svm_write(&svm, 5, &page_bytes(9, 5));
        let before = svm_snapshot(&svm);
        let pages = [0, 3, 39, 40, 41, 69];
        if cut >= 1 {
            for &p in &pages {
                c.region().write_at(p * PAGE, &page_bytes(2, p)).unwrap();
            }
        }
        if cut >= 2 {
            c.land(&commit_of(2, &pages)).unwrap();
        }
        if cut >= 3 {
            c.seal_pages(2).unwrap();
        }
        if cut >= 4 {
            c.stage_state(b"s2".to_vec()).unwrap();
        }
        if cut >= 5 {
            c.stage_disk_acked().unwrap();
        }
        let mut dirty = PageBitmap::new(PAGES);
        dirty.set(5);
        if cut < 5 {
            let missing = match cut {
                0..=2 => Stage::Pages,
                3 => Stage::State,
                _ => Stage::Disk,
            };
            match c.commit(&dirty) {
                Err(Error::Incomplete {
                    checkpoint: 2,
                    missing: m,
                }) => assert_eq!(m, missing),
                other => panic!("cut {cut}: expected Incomplete, got {other:?}"),
            }
            assert!(
                svm_snapshot(&svm) == before,
                "cut {cut}: a refused commit touched the SVM"
            );
        }
        // Failover: the incomplete checkpoint is dropped.
        let dropped = c.abort();
        assert_eq!(dropped.checkpoint, 2);
        assert!(
            svm_snapshot(&svm) == before,
            "cut {cut}: the abort touched the SVM"
        );
        assert!(matches!(c.commit(&dirty), Err(Error::Abandoned)));
        assert!(matches!(c.land(&commit_of(3, &[1])), Err(Error::Abandoned)));
        assert!(
            svm_snapshot(&svm) == before,
            "cut {cut}: the SVM changed after the abort"
        );
    }
}

#[test]
fn an_svm_write_the_primary_never_touched_is_reverted() {
    let (mut c, svm) = cache();
    committed_baseline(&mut c, &svm);
    // The primary pushes page 10 only; the SVM writes 20 and 45 (region 1) itself.
    c.region().write_at(10 * PAGE, &page_bytes(2, 10)).unwrap();
    c.land(&commit_of(2, &[10])).unwrap();
    svm_write(&svm, 20, &page_bytes(9, 20));
    svm_write(&svm, 45, &page_bytes(9, 45));
    let mut dirty = PageBitmap::new(PAGES);
    dirty.set(20);
    dirty.set(45);
    c.seal_pages(2).unwrap();
    c.stage_state(b"s2".to_vec()).unwrap();
    c.stage_disk_acked().unwrap();
    let done = c.commit(&dirty).unwrap();
    assert_eq!(
        (done.pages, done.pushed_pages, done.reverted_pages),
        (3, 1, 2)
    );
    assert_eq!(done.state, b"s2");
    let now = svm_snapshot(&svm);
    assert!(
        now[10] == page_bytes(2, 10),
        "the pushed page is in the SVM"
    );
    assert!(
        now[20] == page_bytes(1, 20),
        "the SVM's own write in region 0 is reverted"
    );
    assert!(
        now[45] == page_bytes(1, 45),
        "the SVM's own write in region 1 is reverted"
    );
}

#[test]
fn pages_outside_the_union_are_not_copied() {
    let (mut c, svm) = cache();
    committed_baseline(&mut c, &svm);
    // A cache page changes without being in any bitmap: a commit that copied everything
    // (QEMU's old bug) would carry it into the SVM.
    c.region().write_at(33 * PAGE, &page_bytes(7, 33)).unwrap();
    c.land(&commit_of(2, &[1])).unwrap();
    c.seal_pages(2).unwrap();
    c.stage_state(Vec::new()).unwrap();
    c.stage_disk_acked().unwrap();
    let done = c.commit(&PageBitmap::new(PAGES)).unwrap();
    assert_eq!((done.pages, done.runs), (1, 1));
    assert!(svm_snapshot(&svm)[33] == page_bytes(1, 33));
}

#[test]
fn runs_crossing_a_region_boundary_are_split() {
    let (mut c, svm) = cache();
    committed_baseline(&mut c, &svm);
    let pages: Vec<u64> = (36..46).collect();
    for &p in &pages {
        c.region().write_at(p * PAGE, &page_bytes(3, p)).unwrap();
    }
    c.land(&commit_of(2, &pages)).unwrap();
    c.seal_pages(2).unwrap();
    c.stage_state(Vec::new()).unwrap();
    c.stage_disk_acked().unwrap();
    let done = c.commit(&PageBitmap::new(PAGES)).unwrap();
    assert_eq!((done.pages, done.runs), (10, 2));
    let now = svm_snapshot(&svm);
    for &p in &pages {
        assert!(now[p as usize] == page_bytes(3, p), "page {p}");
        let (r, _) = locate(p);
        assert_eq!(r, usize::from(p >= 40));
    }
}

#[test]
fn steps_out_of_order_or_twice_are_refused() {
    let (mut c, _svm) = cache();
    assert!(matches!(
        c.land(&commit_of(2, &[1])),
        Err(Error::PushOrder { got: 2, last: 0 })
    ));
    assert!(matches!(
        c.seal_pages(1),
        Err(Error::SealMismatch {
            through: 1,
            landed: 0
        })
    ));
    // A bitmap of another guest: refused by its page count (its words were checked when
    // it was built from the wire).
    let mut short = commit_of(1, &[1]);
    short.bitmap = PageBitmap::new(PAGES - 1);
    assert!(matches!(
        c.land(&short),
        Err(Error::Memory(colo_memory::Error::BitmapPages {
            found: 69,
            expected: 70
        }))
    ));
    c.land(&commit_of(1, &[1])).unwrap();
    c.seal_pages(1).unwrap();
    assert!(matches!(
        c.seal_pages(1),
        Err(Error::Duplicate {
            stage: Stage::Pages,
            ..
        })
    ));
    assert!(matches!(
        c.land(&commit_of(2, &[1])),
        Err(Error::Duplicate { .. })
    ));
    c.stage_state(vec![1]).unwrap();
    assert!(matches!(
        c.stage_state(vec![1]),
        Err(Error::Duplicate {
            stage: Stage::State,
            ..
        })
    ));
    c.stage_disk_acked().unwrap();
    assert!(matches!(
        c.stage_disk_acked(),
        Err(Error::Duplicate {
            stage: Stage::Disk,
            ..
        })
    ));
    assert!(matches!(
        c.commit(&PageBitmap::new(3)),
        Err(Error::DirtySize { got: 3, pages: 70 })
    ));
    let s = c.status();
    assert!(s.sealed && s.disk_acked && s.state_bytes == Some(1) && s.pages == 1);
    c.commit(&PageBitmap::new(PAGES)).unwrap();
    assert_eq!(c.committed(), 1);
    assert_eq!(c.status().checkpoint, 2);
}

#[test]
fn mismatched_svm_memory_is_refused() {
    let svm = vec![Arc::new(Region::anonymous((40 * PAGE) as usize).unwrap())];
    assert!(matches!(
        RamCache::new(common::layout(), svm),
        Err(Error::Layout(_))
    ));
    let svm = vec![
        Arc::new(Region::anonymous((40 * PAGE) as usize).unwrap()),
        Arc::new(Region::anonymous((31 * PAGE) as usize).unwrap()),
    ];
    assert!(matches!(
        RamCache::new(common::layout(), svm),
        Err(Error::Layout(_))
    ));
}

/// Pages pushed over real TCP sockets land in the cache and reach the SVM only at the
/// commit; the next epoch's writes wait for the release.
#[test]
fn tcp_push_lands_in_the_cache_and_commits_into_the_svm() {
    let (mut c, svm) = cache();
    let guest = Arc::new(Region::anonymous((PAGES * PAGE) as usize).unwrap());
    let listener = TcpPushListener::bind(
        "127.0.0.1:0",
        Arc::clone(c.region()),
        PAGE as u32,
        colo_transport::testing::credentials(),
    )
    .unwrap();
    let desc = *listener.desc();
    let addr = ([127, 0, 0, 1], desc.port).into();
    let sender = std::thread::spawn(move || {
        let mut tx = TcpPushSender::connect(
            addr,
            desc,
            Arc::clone(&guest),
            &colo_transport::testing::credentials(),
            TcpPushOptions::default(),
        )
        .unwrap();
        for epoch in 1..=2u8 {
            let pages: Vec<u64> = if epoch == 1 {
                (0..PAGES).collect()
            } else {
                vec![2, 40, 41]
            };
            let mut bitmap = PageBitmap::new(PAGES);
            for &p in &pages {
                guest.write_at(p * PAGE, &page_bytes(epoch, p)).unwrap();
                bitmap.set(p);
            }
            let runs: Vec<WriteRun> = bitmap
                .runs()
                .map(|(p, n)| WriteRun::pages(p, n, PAGE as u32))
                .collect();
            push_epoch(&mut tx, runs, &bitmap).unwrap();
        }
        tx
    });
    let mut rx = listener.accept(T).unwrap();
    for checkpoint in 1..=2u64 {
        let before = svm_snapshot(&svm);
        let commit = rx.next_commit(T).unwrap();
        assert!(
            svm_snapshot(&svm) == before,
            "pages reached the SVM before the commit"
        );
        c.land(&commit).unwrap();
        c.seal_pages(commit.epoch).unwrap();
        c.stage_state(vec![checkpoint as u8]).unwrap();
        c.stage_disk_acked().unwrap();
        let done = c.commit(&PageBitmap::new(PAGES)).unwrap();
        rx.release(commit.epoch).unwrap();
        assert_eq!(done.checkpoint, checkpoint);
    }
    let _tx = sender.join().unwrap();
    let now = svm_snapshot(&svm);
    for p in 0..PAGES {
        let tag = if [2, 40, 41].contains(&p) { 2 } else { 1 };
        assert!(now[p as usize] == page_bytes(tag, p), "page {p}");
    }
}

/// A push connection lost in the middle of an epoch: the receiver reports the error, the
/// epoch never lands, and the SVM keeps its memory.
#[test]
fn a_push_lost_mid_epoch_never_reaches_the_svm() {
    let (mut c, svm) = cache();
    committed_baseline(&mut c, &svm);
    let before = svm_snapshot(&svm);
    let guest = Arc::new(Region::anonymous((PAGES * PAGE) as usize).unwrap());
    for p in 0..PAGES {
        guest.write_at(p * PAGE, &page_bytes(5, p)).unwrap();
    }
    let mut rx = DoubleReceiver::new(Arc::clone(c.region()), PAGE as u32);
    let faults = Faults {
        lose_connection_at: Some(3),
        ..Faults::default()
    };
    let mut tx = rx.connect(*rx.desc(), Arc::clone(&guest), faults).unwrap();
    let runs: Vec<WriteRun> = (0..8)
        .map(|p| WriteRun::pages(p * 2, 1, PAGE as u32))
        .collect();
    let mut bitmap = PageBitmap::new(PAGES);
    (0..8).for_each(|p| bitmap.set(p * 2));
    assert!(
        push_epoch(&mut tx, runs, &bitmap).is_err(),
        "the lost connection surfaces"
    );
    assert!(
        rx.next_commit(Duration::from_millis(200)).is_err(),
        "no commit for a cut epoch"
    );
    // Some pages of the cut epoch did land in the cache, none in the SVM.
    let mut b = vec![0u8; PAGE as usize];
    c.region().read_at(0, &mut b).unwrap();
    assert!(
        b == page_bytes(5, 0),
        "the first writes landed in the cache"
    );
    assert!(matches!(
        c.commit(&PageBitmap::new(PAGES)),
        Err(Error::Incomplete { .. })
    ));
    c.abort();
    assert!(svm_snapshot(&svm) == before);
}
