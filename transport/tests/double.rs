//! The verbs push pipeline driven against the in-process queue pair that enforces the verbs
//! rules: the same sender and receiver code that runs on an RDMA device.

mod common;

use std::sync::Arc;
use std::time::Duration;

use colo_memory::{Error as MemError, PageBitmap, Region};
use colo_transport::Error;
use colo_transport::double::{DoubleReceiver, Faults, SimConfig};
use colo_transport::framing;
use colo_transport::push::{PushReceiver, PushSender, WriteRun, push_epoch};
use colo_transport::verbs::{VerbsOptions, WcStatus};
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
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let mut tx = rx
        .connect(*rx.desc(), Arc::clone(&src), Faults::default())
        .unwrap();
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
    let mut tx = rx
        .connect(*rx.desc(), Arc::clone(&src), Faults::default())
        .unwrap();
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
    let mut tx = rx
        .connect(*rx.desc(), Arc::clone(&src), Faults::default())
        .unwrap();
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
    let mut tx = rx
        .connect(*rx.desc(), Arc::clone(&src), Faults::default())
        .unwrap();
    fill(&src, 1, &[2]);
    push_epoch(&mut tx, runs(&[2]), &bitmap_of(&[2], PAGES)).unwrap();
    assert_eq!(rx.next_commit(T).unwrap().epoch, 1);
    // Epoch 1 is not released: a write into epoch 2 would overwrite the cache mid-commit,
    // so the sender holds it back until the release arrives.
    fill(&src, 2, &[2]);
    let pusher = std::thread::spawn(move || {
        let r = push_epoch(&mut tx, runs(&[2]), &bitmap_of(&[2], PAGES));
        (r, tx)
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_landed(&dst, 1, &[2]);
    assert!(
        rx.release(2).is_err(),
        "releasing an epoch that never committed"
    );
    rx.release(1).unwrap();
    let (r, _tx) = pusher.join().unwrap();
    assert_eq!(r.unwrap().epoch, 2);
    assert_eq!(rx.next_commit(T).unwrap().epoch, 2);
    assert_landed(&dst, 2, &[2]);
}

#[test]
fn a_release_that_never_comes_times_out_without_writing() {
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let opts = VerbsOptions {
        release_timeout: Duration::from_millis(100),
        ..VerbsOptions::default()
    };
    let mut tx = rx
        .connect_with(
            *rx.desc(),
            Arc::clone(&src),
            Faults::default(),
            SimConfig::default(),
            opts,
        )
        .unwrap();
    push_epoch(&mut tx, runs(&[1]), &bitmap_of(&[1], PAGES)).unwrap();
    assert_eq!(rx.next_commit(T).unwrap().epoch, 1);
    fill(&src, 2, &[2]);
    let e = push_epoch(&mut tx, runs(&[2]), &bitmap_of(&[2], PAGES)).unwrap_err();
    assert!(matches!(e, Error::Timeout(..)), "{e}");
    assert!(e.to_string().contains("release"), "{e}");
    let mut page = vec![1u8; PAGE as usize];
    dst.read_at(2 * u64::from(PAGE), &mut page).unwrap();
    assert!(
        page.iter().all(|&b| b == 0),
        "an unreleased epoch's write landed"
    );
}

#[test]
fn an_abort_ends_a_wait_for_a_release_that_never_comes() {
    // The receiver never releases epoch 1, as a stopped or cut-off secondary would; the
    // sender would wait its whole release timeout (30 s by default) for it.
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let mut tx = rx
        .connect_with(
            *rx.desc(),
            Arc::clone(&src),
            Faults::default(),
            SimConfig::default(),
            VerbsOptions::default(),
        )
        .unwrap();
    push_epoch(&mut tx, runs(&[1]), &bitmap_of(&[1], PAGES)).unwrap();
    assert_eq!(rx.next_commit(T).unwrap().epoch, 1);
    fill(&src, 2, &[2]);
    let abort = tx.abort_handle();
    let pusher = std::thread::spawn(move || {
        let r = push_epoch(&mut tx, runs(&[2]), &bitmap_of(&[2], PAGES));
        (tx, r)
    });
    std::thread::sleep(Duration::from_millis(100));
    abort.abort();
    let (mut tx, r) = pusher.join().unwrap();
    assert!(matches!(r, Err(Error::Closed)), "{r:?}");
    // Closed for good, and nothing of the unreleased epoch landed.
    assert!(tx.fence().is_err());
    let mut page = vec![1u8; PAGE as usize];
    dst.read_at(2 * u64::from(PAGE), &mut page).unwrap();
    assert!(
        page.iter().all(|&b| b == 0),
        "an unreleased epoch's write landed"
    );
}

/// Adjacent pages whose sources are scattered: each request gathers up to max_sge SGEs.
#[test]
fn adjacent_runs_gather_into_requests_of_max_sge() {
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let cfg = SimConfig {
        max_sge: 4,
        ..SimConfig::default()
    };
    let mut tx = rx
        .connect_with(
            *rx.desc(),
            Arc::clone(&src),
            Faults::default(),
            cfg,
            VerbsOptions::default(),
        )
        .unwrap();
    // Page p of the target comes from source page PAGES-1-p: never source-contiguous.
    let n = 30u64;
    let mut b = vec![0u8; PAGE as usize];
    for p in 0..n {
        pattern(7, p, &mut b);
        src.write_at((PAGES - 1 - p) * u64::from(PAGE), &b).unwrap();
    }
    let list: Vec<WriteRun> = (0..n)
        .map(|p| WriteRun {
            src: (PAGES - 1 - p) * u64::from(PAGE),
            dst: p * u64::from(PAGE),
            len: u64::from(PAGE),
        })
        .collect();
    let all: Vec<u64> = (0..n).collect();
    push_epoch(&mut tx, list, &bitmap_of(&all, PAGES)).unwrap();
    assert_eq!(rx.next_commit(T).unwrap().bytes, n * u64::from(PAGE));
    assert_landed(&dst, 7, &all);
    let s = tx.stats();
    assert_eq!((s.writes, s.sges), (n.div_ceil(4), n));
    // Source-contiguous adjacent pages merge into one SGE: one request for 64 pages.
    rx.release(1).unwrap();
    let all: Vec<u64> = (64..128).collect();
    fill(&src, 8, &all);
    push_epoch(&mut tx, runs(&all), &bitmap_of(&all, PAGES)).unwrap();
    assert_eq!(rx.next_commit(T).unwrap().epoch, 2);
    assert_landed(&dst, 8, &all);
    assert_eq!(
        (tx.stats().writes, tx.stats().sges),
        (s.writes + 1, s.sges + 1)
    );
}

/// A small send queue and many requests: selective signaling and the in-flight bound keep
/// every post within the queue (the simulated queue refuses an overfull post, as verbs does).
#[test]
fn selective_signaling_respects_the_send_queue() {
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let cfg = SimConfig {
        max_send_wr: 8,
        ..SimConfig::default()
    };
    let opts = VerbsOptions {
        signal_every: 4,
        max_outstanding: 100,
        max_write: 2 * u64::from(PAGE),
        ..VerbsOptions::default()
    };
    let mut tx = rx
        .connect_with(*rx.desc(), Arc::clone(&src), Faults::default(), cfg, opts)
        .unwrap();
    let all: Vec<u64> = (0..PAGES).collect();
    for epoch in 1..=3 {
        fill(&src, epoch, &all);
        // One run of every page: split at max_write into PAGES/2 requests.
        push_epoch(
            &mut tx,
            [WriteRun::pages(0, PAGES, PAGE)],
            &bitmap_of(&all, PAGES),
        )
        .unwrap();
        assert_eq!(rx.next_commit(T).unwrap().epoch, epoch);
        assert_landed(&dst, epoch, &all);
        rx.release(epoch).unwrap();
    }
    let s = tx.stats();
    assert_eq!(s.writes, 3 * PAGES / 2);
    assert!(s.max_in_flight <= 7, "{s:?}");
    // Every 4th request (the last of each post is one of them here).
    assert_eq!(s.signaled, 3 * (PAGES / 2 / 4), "{s:?}");
    assert_eq!(s.commits, 3);
}

/// Where the source cannot be registered, pages go through the registered bounce buffers.
#[test]
fn bounce_buffers_carry_the_pages_when_the_source_is_unregistered() {
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let cfg = SimConfig {
        bounce: Some(16 * PAGE as usize),
        ..SimConfig::default()
    };
    let opts = VerbsOptions {
        max_outstanding: 4,
        signal_every: 2,
        ..VerbsOptions::default()
    };
    let mut tx = rx
        .connect_with(*rx.desc(), Arc::clone(&src), Faults::default(), cfg, opts)
        .unwrap();
    for epoch in 1..=3 {
        let mut pages = epoch_pages(epoch, PAGES);
        // And a run longer than one bounce slot (4 pages).
        pages.extend(100..110);
        pages.sort_unstable();
        pages.dedup();
        fill(&src, epoch, &pages);
        push_epoch(&mut tx, runs(&pages), &bitmap_of(&pages, PAGES)).unwrap();
        assert_eq!(rx.next_commit(T).unwrap().epoch, epoch);
        assert_landed(&dst, epoch, &pages);
        rx.release(epoch).unwrap();
    }
    let s = tx.stats();
    assert_eq!(s.bounced, s.bytes);
    assert!(s.max_in_flight <= 4, "{s:?}");
}

#[test]
fn runs_outside_either_region_are_refused_before_any_write() {
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let mut tx = rx
        .connect(*rx.desc(), Arc::clone(&src), Faults::default())
        .unwrap();
    fill(&src, 3, &[0]);
    let past = WriteRun::pages(PAGES, 1, PAGE);
    let e = tx.post(&[WriteRun::pages(0, 1, PAGE), past]).unwrap_err();
    assert!(
        matches!(e, Error::Memory(MemError::OutOfBounds { .. })),
        "{e}"
    );
    let wild = WriteRun {
        src: 0,
        dst: u64::MAX - 10,
        len: 4096,
    };
    assert!(matches!(
        tx.post(&[wild]),
        Err(Error::Memory(MemError::OutOfBounds { .. }))
    ));
    assert_eq!(tx.stats().writes, 0);
    assert!(matches!(
        tx.commit(&PageBitmap::new(PAGES + 1)),
        Err(Error::Memory(MemError::BitmapPages { .. }))
    ));
    // The sender is still usable.
    push_epoch(&mut tx, runs(&[0]), &bitmap_of(&[0], PAGES)).unwrap();
    assert_eq!(rx.next_commit(T).unwrap().epoch, 1);
    assert_landed(&dst, 3, &[0]);
}

/// Epoch 1 commits; epoch 2 fails at its 10th write with `faults`. Returns the sender's
/// and the receiver's errors, and checks that epoch 2 never commits and that the pages of
/// epoch 1 which epoch 2 does not write are intact.
fn fault_mid_epoch(faults: Faults) -> (Error, Error) {
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let first = epoch_pages(1, PAGES);
    let mut tx = rx
        .connect(*rx.desc(), Arc::clone(&src), Faults::default())
        .unwrap();
    fill(&src, 1, &first);
    push_epoch(&mut tx, runs(&first), &bitmap_of(&first, PAGES)).unwrap();
    let c = rx.next_commit(T).unwrap();
    rx.release(c.epoch).unwrap();
    tx.endpoint_mut().inject(faults).unwrap();
    let second = epoch_pages(2, PAGES);
    assert!(second.len() > 20);
    fill(&src, 2, &second);
    let tx_err = push_epoch(&mut tx, runs(&second), &bitmap_of(&second, PAGES)).unwrap_err();
    let rx_err = rx.next_commit(T).unwrap_err();
    assert!(
        rx.next_commit(Duration::from_millis(50)).is_err(),
        "epoch 2 committed"
    );
    // The queue pair is in error: nothing more is accepted.
    assert!(tx.post(&[WriteRun::pages(0, 1, PAGE)]).is_err() || tx.fence().is_err());
    let kept: Vec<u64> = first
        .iter()
        .copied()
        .filter(|p| !second.contains(p))
        .collect();
    assert_landed(&dst, 1, &kept);
    (tx_err, rx_err)
}

fn is_status(e: &Error, want: WcStatus) -> bool {
    matches!(e, Error::Completion { status, .. } if *status == want)
}

#[test]
fn lost_connection_mid_epoch_never_commits() {
    let (t, r) = fault_mid_epoch(Faults {
        lose_connection_at: Some(10),
        ..Faults::default()
    });
    assert!(is_status(&t, WcStatus::RetryExceeded), "{t}");
    assert!(matches!(r, Error::Frame(framing::Error::PeerClosed)), "{r}");
}

#[test]
fn corrupted_key_mid_epoch_is_a_remote_access_error() {
    let (t, r) = fault_mid_epoch(Faults {
        corrupt_key_at: Some(10),
        ..Faults::default()
    });
    assert!(is_status(&t, WcStatus::RemoteAccess), "{t}");
    assert!(is_status(&r, WcStatus::Flushed), "{r}");
}

#[test]
fn out_of_bounds_address_mid_epoch_is_refused_and_lands_nowhere() {
    let (t, r) = fault_mid_epoch(Faults {
        out_of_bounds_at: Some(10),
        ..Faults::default()
    });
    assert!(is_status(&t, WcStatus::RemoteAccess), "{t}");
    assert!(is_status(&r, WcStatus::Flushed), "{r}");
}

#[test]
fn a_wrong_key_in_the_descriptor_fails_the_first_write() {
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let mut desc = *rx.desc();
    desc.key ^= 0x10;
    let mut tx = rx.connect(desc, src, Faults::default()).unwrap();
    let e = push_epoch(&mut tx, runs(&[3]), &bitmap_of(&[3], PAGES)).unwrap_err();
    assert!(is_status(&e, WcStatus::RemoteAccess), "{e}");
    assert!(matches!(rx.next_commit(T), Err(Error::Completion { .. })));
    let mut page = vec![1u8; PAGE as usize];
    dst.read_at(3 * u64::from(PAGE), &mut page).unwrap();
    assert!(
        page.iter().all(|&b| b == 0),
        "a write with a bad key landed"
    );
}

#[test]
fn a_key_wider_than_an_rkey_is_refused_at_connect() {
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let mut desc = *rx.desc();
    desc.key |= 1 << 40;
    assert!(matches!(
        rx.connect(desc, src, Faults::default()),
        Err(Error::Protocol(_))
    ));
}

/// Every connection gets its own registration: a second connection registers the region
/// again with a new rkey, so a sender that kept the first descriptor fails its first write
/// with a remote access error, the receiver reports it, and not a byte of the region
/// changes; the sender given the new descriptor writes.
#[test]
fn a_new_connection_gets_a_new_rkey_and_the_old_one_writes_nothing() {
    let (src, dst) = regions();
    let mut rx = DoubleReceiver::new(Arc::clone(&dst), PAGE);
    let old = *rx.desc();
    let mut tx = rx
        .connect(old, Arc::clone(&src), Faults::default())
        .unwrap();
    fill(&src, 1, &[2]);
    let first = push_epoch(&mut tx, runs(&[2]), &bitmap_of(&[2], PAGES)).unwrap();
    assert_eq!(first.epoch, 1);
    assert_eq!(rx.next_commit(T).unwrap().epoch, 1);
    rx.release(1).unwrap();
    assert_landed(&dst, 1, &[2]);
    drop(tx);

    // Reconnecting with the first descriptor: the region was registered again.
    let mut stale = rx
        .connect(old, Arc::clone(&src), Faults::default())
        .unwrap();
    assert_ne!(rx.desc().key, old.key, "a new rkey for the new connection");
    fill(&src, 2, &[2, 3]);
    let e = push_epoch(&mut stale, runs(&[2, 3]), &bitmap_of(&[2, 3], PAGES)).unwrap_err();
    assert!(is_status(&e, WcStatus::RemoteAccess), "{e}");
    assert!(matches!(rx.next_commit(T), Err(Error::Completion { .. })));
    assert_landed(&dst, 1, &[2]);
    let mut page = vec![1u8; PAGE as usize];
    dst.read_at(3 * u64::from(PAGE), &mut page).unwrap();
    assert!(
        page.iter().all(|&b| b == 0),
        "a write with an old rkey landed"
    );
    drop(stale);

    // The owner renews the registration and hands out the new descriptor.
    let fresh = rx.renew();
    assert_ne!(fresh.key, old.key);
    let mut tx = rx
        .connect(fresh, Arc::clone(&src), Faults::default())
        .unwrap();
    assert_eq!(
        push_epoch(&mut tx, runs(&[2, 3]), &bitmap_of(&[2, 3], PAGES))
            .unwrap()
            .epoch,
        2,
        "the new connection continues from the last committed epoch"
    );
    assert_eq!(rx.next_commit(T).unwrap().epoch, 2);
    assert_landed(&dst, 2, &[2, 3]);
}
