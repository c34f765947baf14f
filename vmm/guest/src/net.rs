//! The virtio-net driver (queue 0 receive, queue 1 transmit) and smoltcp's
//! [`phy::Device`] over it.
//!
//! Every buffer is [`BUF_SIZE`] bytes: the 12-byte `virtio_net_hdr_v1` and then the frame.
//! The receive queue is kept full; a receive buffer goes back to the device as soon as
//! smoltcp has consumed its frame. Transmitted frames are made available at once but the
//! device is only notified by [`VirtioNet::flush`] (once per main-loop turn), or when the
//! transmit buffers run out, because every notification is a VM exit.

use alloc::vec::Vec;
use core::fmt;

use colo_guest_abi::boot::NET_QUEUE_SIZE;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::virtio::mmio::{self, InitError, Mmio};
use crate::virtio::queue::{Buf, VirtQueue};

/// Size of every receive and transmit buffer.
const BUF_SIZE: usize = 2048;
/// `virtio_net_hdr_v1`.
const HDR: usize = 12;
/// Largest Ethernet frame (without FCS) for smoltcp.
pub const MTU: usize = 1514;
/// VIRTIO_NET_F_MAC: the MAC address is in config space.
const F_MAC: u64 = 1 << 5;
const RX: usize = 0;
const TX: usize = 1;
/// Waits for the device to return a transmit buffer when all are in flight, each ended
/// early by the device's wake-up: at most about 100 ms in all.
const TX_WAITS: u32 = 1000;
/// Each of those waits.
const TX_WAIT_US: u32 = 100;

/// `count` zeroed buffers of [`BUF_SIZE`] bytes in one block that is never freed.
fn buffers(count: usize) -> *mut u8 {
    alloc::vec![0u8; count * BUF_SIZE].leak().as_mut_ptr()
}

/// The receive half.
struct RxRing {
    q: VirtQueue,
    bufs: *mut u8,
    /// Buffer slot of each head descriptor in flight.
    slot_of: Vec<u16>,
    /// The device may be short of buffers: notify at the next flush.
    low: bool,
}

/// The transmit half.
struct TxRing {
    q: VirtQueue,
    bufs: *mut u8,
    slot_of: Vec<u16>,
    free_slots: Vec<u16>,
    /// Frames made available since the last notification.
    unnotified: bool,
}

/// The virtio-net device.
pub struct VirtioNet {
    mmio: Mmio,
    mac: [u8; 6],
    rx: RxRing,
    tx: TxRing,
}

impl fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioNet")
            .field("mac", &self.mac)
            .field("rx_queue", &self.rx.q.size())
            .field("tx_queue", &self.tx.q.size())
            .finish()
    }
}

impl RxRing {
    /// Makes buffer `slot` available to the device.
    fn post(&mut self, slot: u16) {
        let buf = Buf {
            addr: self.bufs as u64 + u64::from(slot) * BUF_SIZE as u64,
            len: BUF_SIZE as u32,
            device_writes: true,
        };
        let head = self
            .q
            .add(&[buf])
            .expect("one descriptor per buffer, and this buffer's was freed");
        self.slot_of[usize::from(head)] = slot;
    }
}

impl TxRing {
    /// Takes back the buffers of frames the device has sent.
    fn reclaim(&mut self) {
        while let Some(u) = self.q.pop_used() {
            self.free_slots.push(self.slot_of[usize::from(u.head)]);
        }
    }

    /// Notifies the device of the frames made available since the last notification.
    /// The VMM's device thread sends them while the guest runs on; their buffers come
    /// back through the used ring ([`TxRing::reclaim`]).
    fn notify(&mut self, mmio: Mmio) {
        if self.unnotified {
            self.unnotified = false;
            mmio.notify(self.q.index());
        }
    }

    /// Whether a transmit buffer is free, after taking back what the device sent and, if
    /// every buffer waits for the device, notifying it and waiting (bounded) for it to
    /// send some: a frame without a buffer would be dropped.
    fn has_room(&mut self, mmio: Mmio) -> bool {
        if self.free_slots.is_empty() {
            self.reclaim();
        }
        if self.free_slots.is_empty() {
            self.notify(mmio);
            for _ in 0..TX_WAITS {
                self.reclaim();
                if !self.free_slots.is_empty() {
                    break;
                }
                crate::arch::idle(TX_WAIT_US);
            }
        }
        !self.free_slots.is_empty()
    }
}

impl VirtioNet {
    /// Initializes the device at `base` (from the command line) and fills its receive queue.
    ///
    /// # Errors
    /// [`InitError`] if the device is missing or refuses the driver.
    pub fn new(base: u64) -> Result<Self, InitError> {
        let dev = mmio::init(&mmio::Spec {
            base,
            device_id: 1,
            required: F_MAC,
            optional: 0,
            queue_sizes: &[NET_QUEUE_SIZE, NET_QUEUE_SIZE],
        })?;
        let mmio = dev.mmio;
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = mmio.config_u8(i);
        }
        let mut queues = dev.queues;
        let txq = queues.remove(TX);
        let rxq = queues.remove(RX);
        let (nrx, ntx) = (usize::from(rxq.size()), usize::from(txq.size()));
        let mut rx = RxRing {
            q: rxq,
            bufs: buffers(nrx),
            slot_of: alloc::vec![0; nrx],
            low: false,
        };
        for slot in 0..nrx as u16 {
            rx.post(slot);
        }
        mmio.notify(rx.q.index());
        let tx = TxRing {
            q: txq,
            bufs: buffers(ntx),
            slot_of: alloc::vec![0; ntx],
            free_slots: (0..ntx as u16).rev().collect(),
            unnotified: false,
        };
        Ok(Self { mmio, mac, rx, tx })
    }

    /// The MAC address from config space.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Sizes of the receive and transmit queues.
    pub fn queue_sizes(&self) -> (u16, u16) {
        (self.rx.q.size(), self.tx.q.size())
    }

    /// Notifies the device of frames made available since the last call (one exit for
    /// all of them), and of receive buffers if it may be running short.
    pub fn flush(&mut self) {
        self.tx.notify(self.mmio);
        if self.rx.low {
            self.rx.low = false;
            self.mmio.notify(self.rx.q.index());
        }
    }
}

/// A received frame, in receive buffer `slot`.
pub struct RxToken<'a> {
    rx: &'a mut RxRing,
    slot: u16,
    len: usize,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let start = usize::from(self.slot) * BUF_SIZE + HDR;
        // SAFETY: the slot's buffer lies inside the receive block (slot < queue size,
        // len <= BUF_SIZE - HDR, checked in `receive`); the device finished writing it
        // (its used entry was read after an acquire fence) and gets it back only below.
        let frame = unsafe { core::slice::from_raw_parts(self.rx.bufs.add(start), self.len) };
        let r = f(frame);
        self.rx.post(self.slot);
        r
    }
}

/// Room for one frame to send; a transmit buffer is taken when the token is consumed.
pub struct TxToken<'a> {
    tx: &'a mut TxRing,
    mmio: Mmio,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let tx = self.tx;
        let room = tx.has_room(self.mmio);
        let slot = match tx.free_slots.pop() {
            Some(slot) if room && len <= BUF_SIZE - HDR => slot,
            other => {
                if let Some(slot) = other {
                    tx.free_slots.push(slot);
                }
                let mut scratch = alloc::vec![0u8; len];
                return f(&mut scratch);
            }
        };
        let start = usize::from(slot) * BUF_SIZE;
        // SAFETY: the slot's buffer lies inside the transmit block and is not in the
        // queue (it was on the free list), so neither the device nor anyone else uses it;
        // HDR + len <= BUF_SIZE was checked above.
        let buf = unsafe { core::slice::from_raw_parts_mut(tx.bufs.add(start), HDR + len) };
        buf[..HDR].fill(0);
        let r = f(&mut buf[HDR..]);
        let b = Buf {
            addr: buf.as_ptr() as u64,
            len: (HDR + len) as u32,
            device_writes: false,
        };
        let head =
            tx.q.add(&[b])
                .expect("one descriptor per transmit buffer, and this buffer was free");
        tx.slot_of[usize::from(head)] = slot;
        tx.unnotified = true;
        r
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        loop {
            let used = self.rx.q.pop_used()?;
            let slot = self.rx.slot_of[usize::from(used.head)];
            if self.rx.q.in_flight() < usize::from(self.rx.q.size()) / 4 {
                self.rx.low = true;
            }
            let len = used.len as usize;
            if len <= HDR || len > BUF_SIZE {
                // The device dropped a frame (too large) or returned garbage.
                self.rx.post(slot);
                continue;
            }
            return Some((
                RxToken {
                    rx: &mut self.rx,
                    slot,
                    len: len - HDR,
                },
                TxToken {
                    tx: &mut self.tx,
                    mmio: self.mmio,
                },
            ));
        }
    }

    fn transmit(&mut self, _now: Instant) -> Option<Self::TxToken<'_>> {
        if !self.tx.has_room(self.mmio) {
            return None;
        }
        Some(TxToken {
            tx: &mut self.tx,
            mmio: self.mmio,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = None;
        caps
    }
}
