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

use colo_memory::GuestMemory;

use super::abi::{BLK_MMIO_GPA, MMIO_LEN, NET_MMIO_GPA};
use super::codec::{Reader, Writer};
use super::error::Result;
use blk::Blk;
use net::Net;
use serial::SerialPort;
use virtio_mmio::MmioTransport;

/// Every device of one VM.
pub(crate) struct Devices {
    /// COM1, whose console also takes the built-in guest's console port.
    pub(crate) serial: SerialPort,
    /// The network device.
    pub(crate) net: MmioTransport<Net>,
    /// The block device.
    pub(crate) blk: MmioTransport<Blk>,
}

impl Devices {
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

    /// An MMIO write; processes a queue notification on the spot. False if no device is
    /// at `addr`.
    ///
    /// # Errors
    /// A queue the guest broke.
    pub(crate) fn mmio_write(&mut self, addr: u64, data: &[u8], mem: &GuestMemory) -> Result<bool> {
        if (NET_MMIO_GPA..NET_MMIO_GPA + MMIO_LEN).contains(&addr) {
            if let Some(q) = self.net.write(addr - NET_MMIO_GPA, data) {
                self.net.notify(q, mem)?;
            }
        } else if (BLK_MMIO_GPA..BLK_MMIO_GPA + MMIO_LEN).contains(&addr) {
            if let Some(q) = self.blk.write(addr - BLK_MMIO_GPA, data) {
                self.blk.notify(q, mem)?;
            }
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// Delivers received frames if the guest has buffers for them.
    pub(crate) fn poll_rx(&mut self, mem: &GuestMemory) {
        if self.net.driver_ok() && self.net.device.has_rx() {
            let t = &mut self.net;
            t.device.deliver(&mut t.queues, mem);
        }
    }

    /// After a restore, takes the disk requests that were in flight in the snapshot.
    ///
    /// # Errors
    /// A queue the guest broke.
    pub(crate) fn poll_blk(&mut self, mem: &GuestMemory) -> Result<()> {
        let t = &mut self.blk;
        if !t.driver_ok() {
            return Ok(());
        }
        t.device.poll(&mut t.queues, mem)
    }

    /// Saves every device.
    pub(crate) fn save(&self, w: &mut Writer) {
        self.net.save(w);
        self.blk.save(w);
    }

    /// Restores every device.
    ///
    /// # Errors
    /// Bad snapshot bytes.
    pub(crate) fn restore(&mut self, r: &mut Reader<'_>) -> Result<()> {
        self.net.restore(r)?;
        self.blk.restore(r)
    }
}
