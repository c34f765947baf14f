//! The devices of the machine: the console and the serial port, virtio-net and virtio-blk
//! on virtio-mmio, and the network backends.

pub mod backend;
pub mod blk;
pub mod console;
pub mod net;
pub mod serial;
pub(crate) mod virtio_mmio;

#[cfg(test)]
mod dirty_tests;
#[cfg(test)]
mod thread_tests;

use colo_memory::GuestMemory;
use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::abi::{BLK_MMIO_GPA, MMIO_LEN, NET_MMIO_GPA};
use super::codec::{Reader, Writer};
use super::error::{Error, Result};
use blk::{Blk, BlkDone, BlkIo};
use net::Net;
use serial::SerialPort;
use virtio_mmio::MmioTransport;

/// The GSI (ISA interrupt line) of the virtio-net device. Colo's ACPI tables and the
/// `virtio_mmio.device=` entry of a Linux guest's command line name it too.
pub const NET_GSI: u32 = 5;
/// The GSI of the virtio-blk device.
pub const BLK_GSI: u32 = 6;
/// The QueueNotify register of a virtio-mmio window.
const QUEUE_NOTIFY: u64 = 0x50;

/// The `virtio_mmio.device=` entries that announce the devices to a Linux guest
/// (`size@base:irq`, Linux's VIRTIO_MMIO_CMDLINE_DEVICES syntax): the network device if
/// it has a backend (`net`), and the disk.
pub fn linux_cmdline_entries(net: bool) -> Vec<String> {
    let entry =
        |gpa: u64, gsi: u32| format!("virtio_mmio.device={}K@{gpa:#x}:{gsi}", MMIO_LEN >> 10);
    let mut v = Vec::new();
    if net {
        v.push(entry(NET_MMIO_GPA, NET_GSI));
    }
    v.push(entry(BLK_MMIO_GPA, BLK_GSI));
    v
}

/// The wake-ups of the device thread (`runner`): an ioeventfd on each queue's QueueNotify
/// (KVM completes the guest's write itself, so it never exits to a vCPU thread), the
/// network backend's received-frame eventfd, and `wake` for everything else (a kick for
/// a pause or stop, a notification that exited anyway).
pub(crate) struct DeviceEvents {
    /// One per queue of every device, registered with KVM.
    pub(crate) notify: Vec<EventFd>,
    /// Received frames.
    pub(crate) rx: EventFd,
    /// Anything else.
    pub(crate) wake: EventFd,
}

impl DeviceEvents {
    /// Every eventfd, to wait on all at once.
    pub(crate) fn all(&self) -> impl Iterator<Item = &EventFd> {
        self.notify.iter().chain([&self.rx, &self.wake])
    }
}

/// Every device of one VM.
pub(crate) struct Devices {
    /// COM1, whose console also takes the built-in guest's console port.
    pub(crate) serial: SerialPort,
    /// The network device.
    pub(crate) net: MmioTransport<Net>,
    /// The block device.
    pub(crate) blk: MmioTransport<Blk>,
    /// Wakes the device thread (a notification that reached a vCPU thread).
    wake: EventFd,
    /// The device thread's eventfds, handed out once ([`Devices::take_events`]).
    events: Option<DeviceEvents>,
}

impl Devices {
    /// The devices, with an ioeventfd on each queue's QueueNotify (matching the queue
    /// index the driver writes, as a 32-bit write: other writes still exit and are
    /// passed on to the device thread).
    ///
    /// # Errors
    /// [`Error::Io`] for an eventfd, [`Error::Kvm`] if KVM refuses an ioeventfd.
    pub(crate) fn new(
        vm: &VmFd,
        serial: SerialPort,
        net: MmioTransport<Net>,
        blk: MmioTransport<Blk>,
    ) -> Result<Self> {
        let efd = || EventFd::new(EFD_NONBLOCK).map_err(Error::io("create an eventfd"));
        let mut notify = Vec::new();
        for (base, queues) in [
            (NET_MMIO_GPA, net.queues.len()),
            (BLK_MMIO_GPA, blk.queues.len()),
        ] {
            for q in 0..queues as u32 {
                let fd = efd()?;
                vm.register_ioevent(&fd, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q)
                    .map_err(Error::kvm("register a QueueNotify ioeventfd"))?;
                notify.push(fd);
            }
        }
        let wake = efd()?;
        let events = DeviceEvents {
            notify,
            rx: net
                .device
                .rx_event()
                .try_clone()
                .map_err(Error::io("duplicate the receive eventfd"))?,
            wake: wake
                .try_clone()
                .map_err(Error::io("duplicate an eventfd"))?,
        };
        Ok(Self {
            serial,
            net,
            blk,
            wake,
            events: Some(events),
        })
    }

    /// The device thread's eventfds (once).
    pub(crate) fn take_events(&mut self) -> Option<DeviceEvents> {
        self.events.take()
    }

    /// An MMIO read; false if no device is at `addr`.
    pub(crate) fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if (NET_MMIO_GPA..NET_MMIO_GPA + MMIO_LEN).contains(&addr) {
            self.net.read(addr - NET_MMIO_GPA, data);
        } else if (BLK_MMIO_GPA..BLK_MMIO_GPA + MMIO_LEN).contains(&addr) {
            self.blk.read(addr - BLK_MMIO_GPA, data);
        } else {
            data.fill(0xff);
            return false;
        }
        true
    }

    /// An MMIO write; a queue notification that exited (not the 32-bit write of a queue
    /// index the ioeventfds match) wakes the device thread, which serves every queue.
    /// False if no device is at `addr`.
    pub(crate) fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool {
        let notified = if (NET_MMIO_GPA..NET_MMIO_GPA + MMIO_LEN).contains(&addr) {
            self.net.write(addr - NET_MMIO_GPA, data).is_some()
        } else if (BLK_MMIO_GPA..BLK_MMIO_GPA + MMIO_LEN).contains(&addr) {
            self.blk.write(addr - BLK_MMIO_GPA, data).is_some()
        } else {
            return false;
        };
        if notified {
            // A full counter is a wake-up already pending.
            let _ = self.wake.write(1);
        }
        true
    }

    /// Serves every queue once: transmits what the guest queued, delivers received frames
    /// into its receive buffers, takes its disk requests, and raises each device's
    /// interrupt if it used buffers. Returns the disk requests to run (without the
    /// machine), and whether buffers were used. A queue the driver has not set up, or set up wrongly, is left alone.
    pub(crate) fn serve(&mut self, mem: &GuestMemory) -> (Option<BlkIo>, bool) {
        let n = &mut self.net;
        if n.driver_ok() {
            // Every queue, as if notified: TX sends what the guest queued, RX delivers
            // waiting frames into the buffers it posted.
            for q in 0..n.queues.len() {
                if n.queues[q].ready() && n.queues[q].is_valid(mem) {
                    // Net's notify fails only for a queue it does not have.
                    let _ = n.notify(q, mem);
                }
            }
        }
        let mut used = n.signal_used();
        let b = &mut self.blk;
        if b.driver_ok()
            && let Err(e) = b.device.take_requests(&mut b.queues, mem)
        {
            tracing::warn!(error = %e, "disk queue");
        }
        used |= b.signal_used();
        (b.device.start_io(), used)
    }

    /// Writes the outcomes of disk requests run by [`Devices::serve`]'s caller into the
    /// guest, and raises the block device's interrupt.
    pub(crate) fn finish_blk(&mut self, done: BlkDone, mem: &GuestMemory) {
        let t = &mut self.blk;
        t.device.finish(done, &mut t.queues[0], mem);
        t.signal_used();
    }

    /// Saves every device.
    pub(crate) fn save(&self, w: &mut Writer) {
        self.serial.save(w);
        self.net.save(w);
        self.blk.save(w);
    }

    /// Restores every device.
    ///
    /// # Errors
    /// Bad snapshot bytes.
    pub(crate) fn restore(&mut self, r: &mut Reader<'_>) -> Result<()> {
        self.serial.restore(r)?;
        self.net.restore(r)?;
        self.blk.restore(r)
    }
}
