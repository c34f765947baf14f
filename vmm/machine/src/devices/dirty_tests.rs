//! Every write a device makes into guest memory marks its page by itself: guest memory is
//! vm-memory's bitmap-backed mmap, and no device marks pages by hand. Each test drives one
//! device path against queues set up in guest memory and checks that exactly the pages it
//! wrote (buffers, status bytes, the used ring) are marked, and nothing else.

use std::collections::BTreeSet;
use std::sync::Arc;

use colo_dirty_track::DirtyTracker;
use colo_memory::{GuestMemory, PAGE_SIZE, PageBitmap};
use kvm_ioctls::Kvm;
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::backend::NetBackend;
use super::blk::Blk;
use super::net::Net;
use super::virtio_mmio::VirtioDevice;

const NEXT: u16 = 1;
const WRITE: u16 = 2;

fn guest() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
}

/// The pages the memory's own bitmaps hold, cleared: what a collection would report besides
/// KVM's log.
fn marked(mem: &GuestMemory) -> BTreeSet<u64> {
    use vm_memory::GuestMemoryBackend;
    let mut out = BTreeSet::new();
    for r in mem.iter() {
        let map = r.get_mmap();
        let mut b = colo_memory::PageBitmap::new(map.bitmap().pages());
        map.bitmap().drain_into(&mut b, 0);
        out.extend(b.runs().flat_map(|(first, n)| first..first + n));
    }
    out
}

fn page(gpa: u64) -> u64 {
    gpa / PAGE_SIZE
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

#[test]
fn a_received_frame_marks_its_buffer_and_the_used_ring_only() {
    let mem = guest();
    let (backend, peer) = NetBackend::channel();
    let mut net = Net::new([2, 0, 0, 0, 0, 1], backend);
    let tx = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
    let rx = MockSplitQueue::create(&mem, GuestAddress(0x20000), 16);
    // One receive buffer spanning two pages, so the mark must cover both.
    rx.add_desc_chains(&[desc(0x30800, 4096, WRITE, 0)], 0)
        .unwrap();
    let mut queues: Vec<Queue> = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
    marked(&mem); // the driver's set-up is not the device's doing
    peer.to_guest.send(vec![0xab; 3000]).unwrap();
    net.deliver(&mut queues, &mem);
    assert_eq!(net.stats.rx_frames, 1);
    assert_eq!(
        marked(&mem),
        BTreeSet::from([page(0x20000), page(0x30800), page(0x30800 + 3000 + 12 - 1)]),
        "the frame's pages and the RX used ring, nothing else"
    );
    let mut b = [0u8; 4];
    mem.read_slice(&mut b, GuestAddress(0x30800 + 12)).unwrap();
    assert_eq!(b, [0xab; 4], "the frame follows the 12-byte header");
}

#[test]
fn a_transmitted_frame_marks_only_the_used_ring() {
    let mem = guest();
    let (backend, peer) = NetBackend::channel();
    let mut net = Net::new([2, 0, 0, 0, 0, 1], backend);
    let tx = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
    let rx = MockSplitQueue::create(&mem, GuestAddress(0x20000), 16);
    mem.write_slice(&[0x5a; 12 + 60], GuestAddress(0x40000))
        .unwrap();
    tx.add_desc_chains(&[desc(0x40000, 12 + 60, 0, 0)], 0)
        .unwrap();
    let mut queues: Vec<Queue> = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
    marked(&mem);
    net.notify(1, &mut queues, &mem).unwrap();
    assert_eq!(peer.from_guest.try_recv().unwrap().len(), 60);
    assert_eq!(
        marked(&mem),
        BTreeSet::from([page(0x10000)]),
        "reading a frame writes nothing but the TX used ring"
    );
}

#[test]
fn a_disk_read_marks_its_data_its_status_and_the_used_ring_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0x77u8; 64 << 10]).unwrap();
    let disk = colo_blk::PlainDisk::new(super::blk::open_raw(&path).unwrap());
    let mut blk = Blk::new(Arc::new(disk));
    let mem = guest();
    let q = MockSplitQueue::create(&mem, GuestAddress(0x50000), 16);
    // A read of 8 sectors at sector 2: header (device-readable), a data buffer across a page
    // boundary, and the status byte on a page of its own.
    let mut header = [0u8; 16];
    header[8..16].copy_from_slice(&2u64.to_le_bytes());
    mem.write_slice(&header, GuestAddress(0x60000)).unwrap();
    q.add_desc_chains(
        &[
            desc(0x60000, 16, NEXT, 1),
            desc(0x61e00, 4096, NEXT | WRITE, 2),
            desc(0x64000, 1, WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut queues: Vec<Queue> = vec![q.create_queue().unwrap()];
    marked(&mem);
    blk.notify(0, &mut queues, &mem).unwrap();
    assert!(marked(&mem).is_empty(), "taking a request writes nothing");
    let io = blk.start_io().expect("one request to run");
    blk.finish(io.run(), &mut queues[0], &mem);
    assert_eq!(blk.stats.reads, 1);
    assert_eq!(
        marked(&mem),
        BTreeSet::from([page(0x50000), page(0x61e00), page(0x62000), page(0x64000)]),
        "the data pages, the status page and the used ring, nothing else"
    );
    let mut b = [0u8; 2];
    mem.read_slice(&mut b, GuestAddress(0x61e00 + 4095))
        .unwrap();
    assert_eq!(b, [0x77, 0], "data, then status OK");
}

/// The dirty tracker reports the device's writes beside KVM's log, in the flat numbering,
/// with no hand marking anywhere: a write through guest memory is a dirty page.
#[test]
fn the_tracker_collects_what_devices_wrote() {
    let Ok(kvm) = Kvm::new() else {
        eprintln!("skipped: /dev/kvm is not available on this machine");
        return;
    };
    let vm = kvm.create_vm().unwrap();
    let ram = crate::memory::GuestRam::new(8 << 20, 1 << 32).unwrap();
    ram.register(&vm).unwrap();
    let mem = ram.mem().clone();
    let tracker = DirtyTracker::new(mem.clone(), false).unwrap();
    let (backend, peer) = NetBackend::channel();
    let mut net = Net::new([2, 0, 0, 0, 0, 1], backend);
    let tx = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
    let rx = MockSplitQueue::create(&mem, GuestAddress(0x20000), 16);
    rx.add_desc_chains(&[desc(0x7f_f000, 2048, WRITE, 0)], 0)
        .unwrap();
    let mut queues: Vec<Queue> = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
    let mut b = PageBitmap::new(tracker.layout().pages());
    tracker.collect(&vm, &mut b).unwrap();
    b.clear_all();
    peer.to_guest.send(vec![1; 100]).unwrap();
    net.deliver(&mut queues, &mem);
    let s = tracker.collect(&vm, &mut b).unwrap();
    assert_eq!((s.kvm_pages, s.vmm_pages), (0, 2));
    assert_eq!(
        b.runs().collect::<Vec<_>>(),
        vec![(page(0x20000), 1), (page(0x7f_f000), 1)]
    );
}
