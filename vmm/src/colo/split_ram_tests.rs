//! COLO over guest RAM split around the 32-bit hole: the primary pushes from the flat view
//! of its two regions ([`GuestRam::region`]), the secondary's RAM cache commits into its
//! two regions ([`GuestRam::regions_by_slot`]), over real TCP push streams. A page above
//! the hole travels as its flat page number and lands at the same flat offset of the SVM
//! (which is the same guest-physical address: colo-machine's memory tests check that the
//! flat view is the guest memory).

use std::sync::Arc;
use std::time::Duration;

use colo_machine::memory::GuestRam;
use colo_memory::{PAGE_SIZE, PageBitmap};
use colo_ramcache::RamCache;
use colo_transport::push::{PushReceiver, PushSender, WriteRun};
use colo_transport::tcp::{TcpPushListener, TcpPushOptions, TcpPushSender};

const MIB: u64 = 1 << 20;
const HIGH: u64 = 4 << 30;
const RANGES: [(u64, u64); 2] = [(0, 4 * MIB), (HIGH, 2 * MIB)];
const T: Duration = Duration::from_secs(10);

#[test]
fn pages_above_the_hole_are_pushed_flat_and_land_at_their_address() {
    let pvm = GuestRam::with_ranges(&RANGES).unwrap();
    let svm = GuestRam::with_ranges(&RANGES).unwrap();
    let layout = pvm.layout().clone();
    // The guest writes one page below the hole and two above it.
    let writes = [
        (5 * PAGE_SIZE, b"low page"),
        (HIGH, b"high pg0"),
        (HIGH + 3 * PAGE_SIZE, b"high pg3"),
    ];
    let mut dirty = PageBitmap::new(layout.pages());
    for (gpa, bytes) in writes {
        let flat = layout.flat_offset(gpa).unwrap();
        pvm.region().write_at(flat, bytes).unwrap();
        dirty.set(flat / PAGE_SIZE);
    }
    let mut cache = RamCache::new(layout.clone(), svm.regions_by_slot()).unwrap();
    let listener = TcpPushListener::bind(
        "127.0.0.1:0",
        Arc::clone(cache.region()),
        PAGE_SIZE as u32,
        colo_transport::testing::credentials(),
    )
    .unwrap();
    let desc = *listener.desc();
    let rx = std::thread::spawn(move || listener.accept(T));
    let mut tx = TcpPushSender::connect(
        ([127, 0, 0, 1], desc.port).into(),
        desc,
        pvm.region(),
        &colo_transport::testing::credentials(),
        TcpPushOptions::default(),
    )
    .unwrap();
    let mut rx = rx.join().unwrap().unwrap();
    let runs: Vec<_> = dirty
        .runs()
        .map(|(p, n)| WriteRun::pages(p, n, PAGE_SIZE as u32))
        .collect();
    tx.post(&runs).unwrap();
    assert_eq!(tx.commit(&dirty).unwrap(), 1);
    let commit = rx.next_commit(T).unwrap();
    cache.land(&commit).unwrap();
    cache.seal_pages(1).unwrap();
    cache.stage_state(Vec::new()).unwrap();
    cache.stage_disk_acked().unwrap();
    let done = cache.commit(&PageBitmap::new(layout.pages())).unwrap();
    assert_eq!(done.pushed_pages, 3);
    // The high pages sit past the whole low region in the flat numbering.
    assert_eq!(layout.flat_offset(HIGH), Some(4 * MIB));
    for (gpa, bytes) in writes {
        let mut b = [0u8; 8];
        svm.region()
            .read_at(layout.flat_offset(gpa).unwrap(), &mut b)
            .unwrap();
        assert_eq!(&b, bytes, "the page at {gpa:#x}");
    }
}
