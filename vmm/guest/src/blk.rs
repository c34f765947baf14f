//! The virtio-blk driver: one request at a time, waiting for each (the VMM's device
//! thread completes it while the guest runs on: the notification does not exit).
//!
//! A request is a chain of three descriptors: the 16-byte header (device reads), the
//! data (device reads for a write, writes for a read) and the status byte (device
//! writes). A flush has no data descriptor.

use alloc::boxed::Box;
use core::fmt;

use colo_guest_abi::boot::BLK_QUEUE_SIZE;

use crate::virtio::mmio::{self, InitError, Mmio};
use crate::virtio::queue::{Buf, VirtQueue};

/// Bytes per sector.
pub const SECTOR: usize = 512;
/// VIRTIO_BLK_F_FLUSH.
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const S_OK: u8 = 0;
/// Largest data buffer of one request (the VMM accepts up to 1 MiB).
pub const MAX_REQUEST: usize = 256 << 10;
/// How often to look at the used ring before waiting with the VMM (a request to the
/// host's page cache completes in some tens of microseconds).
const SPINS: u32 = 2000;
/// Each wait with the VMM: it ends early once the device used the request.
const WAIT_US: u32 = 500;
/// Waits before declaring the device broken: 20 s in all, unless waits end early (the
/// device's wake-up for another buffer, a checkpoint's pause), which only stretches it.
const WAITS: u32 = 40_000;

/// Why a request failed.
#[derive(Debug, Clone, Copy)]
pub enum BlkError {
    /// The device answered with this status (1 I/O error, 2 unsupported).
    Status(u8),
    /// The request lies past the end of the disk, or its length is not whole sectors
    /// or larger than [`MAX_REQUEST`].
    Range,
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(s) => write!(f, "the disk answered with status {s}"),
            Self::Range => write!(f, "request outside the disk or not whole sectors"),
        }
    }
}

/// The request header and status byte, in guest memory the device reads and writes.
#[repr(C)]
struct ReqHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
    status: u8,
}

/// The virtio-blk device.
pub struct VirtioBlk {
    mmio: Mmio,
    q: VirtQueue,
    sectors: u64,
    has_flush: bool,
    req: Box<ReqHeader>,
}

impl fmt::Debug for VirtioBlk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("sectors", &self.sectors)
            .field("has_flush", &self.has_flush)
            .finish()
    }
}

impl VirtioBlk {
    /// Initializes the device at `base` (from the command line).
    ///
    /// # Errors
    /// [`InitError`] if the device is missing or refuses the driver.
    pub fn new(base: u64) -> Result<Self, InitError> {
        let mut dev = mmio::init(&mmio::Spec {
            base,
            device_id: 2,
            required: 0,
            optional: F_FLUSH,
            queue_sizes: &[BLK_QUEUE_SIZE],
        })?;
        let sectors = dev.mmio.config_u64(0);
        Ok(Self {
            mmio: dev.mmio,
            q: dev.queues.remove(0),
            sectors,
            has_flush: dev.features & F_FLUSH != 0,
            req: Box::new(ReqHeader {
                kind: 0,
                reserved: 0,
                sector: 0,
                status: 0xff,
            }),
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the device offered FLUSH (without it, writes are durable when done).
    pub fn has_flush(&self) -> bool {
        self.has_flush
    }

    /// Reads whole sectors from `sector` into `buf`.
    ///
    /// # Errors
    /// [`BlkError`] if the range is bad or the device fails.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.check(sector, buf.len())?;
        self.request(
            T_IN,
            sector,
            Some((buf.as_mut_ptr() as u64, buf.len(), true)),
        )
    }

    /// Writes whole sectors from `buf` at `sector`.
    ///
    /// # Errors
    /// [`BlkError`] if the range is bad or the device fails.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        self.check(sector, buf.len())?;
        self.request(T_OUT, sector, Some((buf.as_ptr() as u64, buf.len(), false)))
    }

    /// Makes completed writes durable (nothing to do without FLUSH).
    ///
    /// # Errors
    /// [`BlkError`] if the device fails.
    pub fn flush(&mut self) -> Result<(), BlkError> {
        if self.has_flush {
            self.request(T_FLUSH, 0, None)
        } else {
            Ok(())
        }
    }

    fn check(&self, sector: u64, len: usize) -> Result<(), BlkError> {
        let n = (len / SECTOR) as u64;
        if len == 0 || len % SECTOR != 0 || len > MAX_REQUEST {
            return Err(BlkError::Range);
        }
        match sector.checked_add(n) {
            Some(end) if end <= self.sectors => Ok(()),
            _ => Err(BlkError::Range),
        }
    }

    /// Runs one request to completion. `data` is (address, length, device writes).
    /// Stops the VM if the device does not complete it.
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<(u64, usize, bool)>,
    ) -> Result<(), BlkError> {
        let hdr: *mut ReqHeader = &mut *self.req;
        // SAFETY: `hdr` points to our boxed header, which the device touches only while
        // a request is in flight, and none is (requests run one at a time to completion).
        unsafe {
            hdr.write_volatile(ReqHeader {
                kind,
                reserved: 0,
                sector,
                status: 0xff,
            });
        }
        let hdr_addr = hdr as u64;
        let status_addr = hdr_addr + core::mem::offset_of!(ReqHeader, status) as u64;
        let header = Buf {
            addr: hdr_addr,
            len: 16,
            device_writes: false,
        };
        let status = Buf {
            addr: status_addr,
            len: 1,
            device_writes: true,
        };
        let head = match data {
            Some((addr, len, device_writes)) => self.q.add(&[
                header,
                Buf {
                    addr,
                    len: len as u32,
                    device_writes,
                },
                status,
            ]),
            None => self.q.add(&[header, status]),
        }
        .expect("requests run one at a time, so the queue is empty");
        self.mmio.notify(self.q.index());
        for round in 0..SPINS + WAITS {
            if let Some(used) = self.q.pop_used() {
                assert_eq!(used.head, head, "the only request in flight");
                // SAFETY: the device completed the request (acquire fence in pop_used)
                // and no longer touches the header.
                let st = unsafe { core::ptr::addr_of!((*hdr).status).read_volatile() };
                return if st == S_OK {
                    Ok(())
                } else {
                    Err(BlkError::Status(st))
                };
            }
            if round < SPINS {
                core::hint::spin_loop();
            } else {
                crate::arch::idle(WAIT_US);
            }
        }
        // The device may still write into the buffers later: stopping is the only safe
        // way out.
        crate::fatal!(
            crate::rt::EXIT_DISK,
            "virtio-blk: request type {kind} at sector {sector} not completed"
        )
    }
}
