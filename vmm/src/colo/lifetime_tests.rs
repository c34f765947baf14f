//! The hazard of guest memory unmapped under a push in flight, or under a RAM cache commit:
//! the VM (which owns the guest RAM) goes first, the push sender or the cache after it. The
//! regions they hold keep the mapping alive, so the pending batch still leaves with the
//! right bytes and the commit lands in mapped memory. With regions that only borrowed the
//! pointer (the code before colo-memory), the sender's goodbye `writev` read unmapped
//! memory (EFAULT: the batch never arrived) and the commit wrote into it (SIGSEGV).

use std::sync::Arc;
use std::time::Duration;

use colo_machine::memory::GuestRam;
use colo_memory::{PAGE_SIZE, PageBitmap, Region};
use colo_ramcache::RamCache;
use colo_transport::push::{EpochCommit, PushReceiver, PushSender, WriteRun};
use colo_transport::tcp::{TcpPushListener, TcpPushOptions, TcpPushSender};

const RAM: u64 = 4 << 20;
const T: Duration = Duration::from_secs(10);

fn pattern(page: u64) -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| (page as u8) ^ (i as u8)).collect()
}

#[test]
fn a_primary_dropped_with_a_push_batch_pending_still_sends_its_bytes() {
    let ram = GuestRam::new(RAM, 1 << 32).unwrap();
    let source = ram.region();
    assert_eq!(source.owners(), 2, "the VM's memory and the push source");
    for p in [3, 4, 9] {
        source.write_at(p * PAGE_SIZE, &pattern(p)).unwrap();
    }
    let cache = Arc::new(Region::anonymous(RAM as usize).unwrap());
    let listener = TcpPushListener::bind(
        "127.0.0.1:0",
        Arc::clone(&cache),
        PAGE_SIZE as u32,
        colo_transport::testing::credentials(),
    )
    .unwrap();
    let desc = *listener.desc();
    let rx = std::thread::spawn(move || listener.accept(T));
    let mut tx = TcpPushSender::connect(
        ([127, 0, 0, 1], desc.port).into(),
        desc,
        source,
        &colo_transport::testing::credentials(),
        TcpPushOptions::default(),
    )
    .unwrap();
    let mut rx = rx.join().unwrap().unwrap();
    // Small runs stay in the sender's pending batch until a commit, a fence or the
    // goodbye sends them.
    tx.post(&[
        WriteRun::pages(3, 2, PAGE_SIZE as u32),
        WriteRun::pages(9, 1, PAGE_SIZE as u32),
    ])
    .unwrap();
    drop(ram); // the VM goes first, as `Primary` used to drop it
    drop(tx); // the goodbye sends the pending batch from guest memory
    // The receiver lands the batch before it sees the goodbye.
    assert!(rx.next_commit(T).is_err(), "no epoch was committed");
    for p in [3, 4, 9] {
        let mut b = vec![0u8; PAGE_SIZE as usize];
        cache.read_at(p * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(
            b,
            pattern(p),
            "page {p} left guest memory after the VM was dropped"
        );
    }
}

#[test]
fn a_secondary_dropped_mid_land_commits_into_mapped_memory() {
    let ram = GuestRam::new(RAM, 1 << 32).unwrap();
    let svm = ram.region();
    let pages = RAM / PAGE_SIZE;
    let mut cache = RamCache::new(ram.layout().clone(), vec![Arc::clone(&svm)]).unwrap();
    cache.region().write_at(7 * PAGE_SIZE, &pattern(7)).unwrap();
    let mut pushed = PageBitmap::new(pages);
    pushed.set(7);
    cache
        .land(&EpochCommit {
            epoch: 1,
            bitmap: pushed,
            bytes: PAGE_SIZE,
        })
        .unwrap();
    drop(ram); // the VM goes first, as `Secondary` used to drop it
    assert_eq!(
        svm.owners(),
        1,
        "the region alone keeps the SVM's memory mapped"
    );
    assert_eq!(
        Arc::strong_count(&svm),
        2,
        "the cache and this test hold the region"
    );
    cache.seal_pages(1).unwrap();
    cache.stage_state(Vec::new()).unwrap();
    cache.stage_disk_acked().unwrap();
    let done = cache.commit(&PageBitmap::new(pages)).unwrap();
    assert_eq!(done.pushed_pages, 1);
    let mut b = vec![0u8; PAGE_SIZE as usize];
    svm.read_at(7 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(b, pattern(7));
}
