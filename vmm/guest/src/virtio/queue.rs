//! A split virtqueue (virtio 1.x section 2.7): the descriptor table, the available
//! (driver) ring and the used (device) ring, in one zeroed, page-aligned heap block that
//! is never freed.
//!
//! The driver side: [`VirtQueue::add`] links free descriptors into a chain and publishes
//! its head in the available ring; [`VirtQueue::pop_used`] takes back chains the device
//! finished and frees their descriptors. Ring memory the device reads or writes is only
//! touched with volatile accesses, ordered by fences around the ring indices.

use alloc::alloc::{Layout, alloc_zeroed};
use alloc::vec::Vec;
use core::sync::atomic::{Ordering, fence};

/// VIRTQ_DESC_F_NEXT: the chain continues at `next`.
const DESC_F_NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE: the device writes this buffer.
const DESC_F_WRITE: u16 = 2;

/// A descriptor as the device sees it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// An element of the used ring.
#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    /// Guest-physical (== virtual) address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it (otherwise it reads it).
    pub device_writes: bool,
}

/// A chain the device has finished.
#[derive(Debug, Clone, Copy)]
pub struct Used {
    /// Index of the chain's first descriptor (as returned by [`VirtQueue::add`]).
    pub head: u16,
    /// Bytes the device wrote into the chain.
    pub len: u32,
}

/// The driver's side of one split virtqueue.
pub struct VirtQueue {
    index: u16,
    size: u16,
    /// `size` descriptors, 16-byte aligned.
    desc: *mut Desc,
    /// flags u16, idx u16, ring[size] u16, used_event u16; 2-byte aligned.
    avail: *mut u16,
    /// flags u16, idx u16, then ring[size] of UsedElem; 4-byte aligned.
    used: *mut u16,
    /// Descriptors not in any chain.
    free: Vec<u16>,
    /// Whether each descriptor is in a chain (catches a device returning one twice).
    in_use: Vec<bool>,
    /// Our copy of avail.idx.
    avail_idx: u16,
    /// used.idx as far as we have consumed it.
    last_used: u16,
}

impl VirtQueue {
    /// Allocates a queue of `size` entries (a power of two) for queue number `index`.
    pub fn new(index: u16, size: u16) -> Self {
        let n = usize::from(size);
        let desc_bytes = 16 * n;
        let avail_bytes = 6 + 2 * n;
        let used_off = (desc_bytes + avail_bytes).next_multiple_of(4);
        let total = used_off + 6 + 8 * n;
        let layout = Layout::from_size_align(total, 4096).expect("a small, valid layout");
        // SAFETY: the layout has a non-zero size. The block is never freed: the device
        // owns parts of it for as long as the guest runs.
        let base = unsafe { alloc_zeroed(layout) };
        if base.is_null() {
            crate::fatal!(crate::rt::EXIT_NO_MEMORY, "no memory for virtqueue {index}");
        }
        // SAFETY: both offsets are inside the `total`-byte block and suitably aligned
        // (4096-aligned base, avail at a multiple of 16, used at a multiple of 4).
        let (avail, used) = unsafe { (base.add(desc_bytes), base.add(used_off)) };
        Self {
            index,
            size,
            desc: base.cast(),
            avail: avail.cast(),
            used: used.cast(),
            free: (0..size).rev().collect(),
            in_use: alloc::vec![false; n],
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Guest-physical addresses of the descriptor table, the available ring and the used
    /// ring, for QueueDesc, QueueDriver and QueueDevice.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.avail as u64, self.used as u64)
    }

    /// This queue's number (what QueueNotify wants).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors in chains the device holds (or finished but not yet popped).
    pub fn in_flight(&self) -> usize {
        usize::from(self.size) - self.free.len()
    }

    /// Links `bufs` into a chain and makes it available to the device. Returns the head
    /// descriptor, or `None` (nothing changed) if there are not enough free descriptors.
    /// The device is not notified.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let ids = &self.free[self.free.len() - bufs.len()..];
        for (i, (b, &id)) in bufs.iter().zip(ids.iter().rev()).enumerate() {
            let last = i + 1 == bufs.len();
            let d = Desc {
                addr: b.addr,
                len: b.len,
                flags: if b.device_writes { DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { DESC_F_NEXT },
                next: if last { 0 } else { ids[ids.len() - 2 - i] },
            };
            // SAFETY: id < size (free only holds valid indices), so the slot is inside the
            // descriptor table; the descriptor is free, so the device is not reading it.
            unsafe { self.desc.add(usize::from(id)).write_volatile(d) };
            self.in_use[usize::from(id)] = true;
        }
        let head = ids[ids.len() - 1];
        self.free.truncate(self.free.len() - bufs.len());
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: ring[slot] (offset 4 + 2 * slot) lies inside the available ring; the
        // device reads it only after it sees the new idx below.
        unsafe { self.avail.add(2 + slot).write_volatile(head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The descriptors and the ring entry must be visible before the new index.
        fence(Ordering::Release);
        // SAFETY: avail.idx is the second u16 of the available ring.
        unsafe { self.avail.add(1).write_volatile(self.avail_idx) };
        Some(head)
    }

    /// Takes the next chain the device finished, if any, and frees its descriptors.
    ///
    /// # Panics
    /// If the device returns a descriptor index that is out of range or not in flight.
    pub fn pop_used(&mut self) -> Option<Used> {
        // SAFETY: used.idx is the second u16 of the used ring, which the device writes.
        let idx = unsafe { self.used.add(1).read_volatile() };
        if idx == self.last_used {
            return None;
        }
        // The element must be read after the index that published it.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: the used ring's elements start 4 bytes in, 8 bytes each, and
        // slot < size; the device wrote this one before publishing idx.
        let elem = unsafe {
            self.used
                .add(2)
                .cast::<UsedElem>()
                .add(slot)
                .read_volatile()
        };
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(elem.id)
            .ok()
            .filter(|&h| h < self.size)
            .unwrap_or_else(|| panic!("queue {}: used id {} out of range", self.index, elem.id));
        self.free_chain(head);
        Some(Used {
            head,
            len: elem.len,
        })
    }

    fn free_chain(&mut self, head: u16) {
        let mut id = head;
        for _ in 0..self.size {
            let in_use = &mut self.in_use[usize::from(id)];
            assert!(
                *in_use,
                "queue {}: descriptor {id} returned but not in flight",
                self.index
            );
            *in_use = false;
            self.free.push(id);
            // SAFETY: id < size (checked by the caller for the head, and below for every
            // `next`); the device is done with the chain.
            let d = unsafe { self.desc.add(usize::from(id)).read_volatile() };
            if d.flags & DESC_F_NEXT == 0 {
                return;
            }
            assert!(
                d.next < self.size,
                "queue {}: bad next {}",
                self.index,
                d.next
            );
            id = d.next;
        }
        panic!("queue {}: descriptor chain loops", self.index);
    }
}
