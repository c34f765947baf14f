//! virtio-blk over a `colo_blk::BlockBackend`: a raw image file, or block replication
//! (the primary's replicated disk, the secondary's disk buffer).

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use colo_blk::BlockBackend;

use colo_dirty_track::AtomicPageBitmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::virtio_mmio::{F_VERSION_1, VirtioDevice, mark_used_ring, mark_written};
use crate::vm::codec::{Reader, Writer};
use crate::vm::error::{Error, Result};

/// Bytes per sector.
pub const SECTOR: u64 = 512;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Largest request the device accepts.
const MAX_REQUEST: usize = 1 << 20;

/// Opens a raw image as an unreplicated backend, checking its size first.
///
/// # Errors
/// [`Error::Disk`] if it is missing, unreadable, empty, or not a whole number of sectors.
pub fn open_raw(path: &Path) -> Result<colo_blk::Disk> {
    let disk = |reason: String| Error::Disk {
        path: path.display().to_string(),
        reason,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| disk(format!("cannot open: {e}")))?
        .len();
    if size == 0 || size % SECTOR != 0 {
        return Err(disk(format!(
            "size {size} is not a non-zero multiple of {SECTOR} bytes"
        )));
    }
    colo_blk::Disk::open(path).map_err(|e| disk(format!("cannot open: {e}")))
}

/// Counters of the device.
#[derive(Debug, Default, Clone, Copy)]
pub struct BlkStats {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// The virtio-blk device. Requests complete synchronously during the notification, so
/// none is ever in flight when the VM is paused.
pub struct Blk {
    backend: Arc<dyn BlockBackend>,
    /// Counters.
    pub stats: BlkStats,
}

impl Blk {
    /// A device over `backend`.
    pub fn new(backend: Arc<dyn BlockBackend>) -> Self {
        Self {
            backend,
            stats: BlkStats::default(),
        }
    }

    /// Logs a backend failure (rate-limited: the first, then every power of two).
    fn failed(&mut self, op: &str, e: &colo_blk::Error) -> u8 {
        if (self.stats.errors + 1).is_power_of_two() {
            tracing::warn!(op, error = %e, errors = self.stats.errors + 1, "disk request failed");
        }
        S_IOERR
    }

    /// Counts and logs (rate-limited) a request the driver built wrongly.
    fn bad_chain(&mut self, why: &str) {
        self.stats.errors += 1;
        if self.stats.errors.is_power_of_two() {
            tracing::warn!(why, errors = self.stats.errors, "bad disk request");
        }
    }

    /// Serves one request; returns the bytes written into the chain (data and status).
    fn request(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let (Ok(mut r), Ok(mut w)) = (chain.clone().reader(mem), chain.writer(mem)) else {
            self.bad_chain("a descriptor outside guest memory");
            return 0;
        };
        let mut hdr = [0u8; 16];
        let Some(data_room) = w.available_bytes().checked_sub(1) else {
            self.bad_chain("no writable status byte");
            return 0;
        };
        // The status byte is the last writable byte.
        let Ok(mut status_w) = w.split_at(data_room) else {
            self.bad_chain("cannot split off the status byte");
            return 0;
        };
        if r.read_exact(&mut hdr).is_err() {
            self.bad_chain("a header shorter than 16 bytes");
            return u32::from(status_w.write_all(&[S_IOERR]).is_ok());
        }
        let kind = u32::from_le_bytes(hdr[..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(hdr[8..].try_into().expect("8 bytes"));
        let data_len = match kind {
            T_IN => data_room,
            T_OUT => r.available_bytes(),
            _ => 0,
        };
        let in_bounds = sector
            .checked_mul(SECTOR)
            .and_then(|o| o.checked_add(data_len as u64))
            .is_some_and(|end| end <= self.backend.len());
        let mut written = 0;
        let status = match kind {
            T_IN | T_OUT
                if !in_bounds || data_len > MAX_REQUEST || data_len as u64 % SECTOR != 0 =>
            {
                self.bad_chain(&format!(
                    "type {kind} at sector {sector}, {data_len} bytes: outside the disk or not whole sectors"
                ));
                S_IOERR
            }
            T_IN => {
                self.stats.reads += 1;
                let mut buf = vec![0u8; data_len];
                match self.backend.read_at(sector * SECTOR, &mut buf) {
                    Ok(()) if w.write_all(&buf).is_ok() => {
                        written = data_len as u32;
                        S_OK
                    }
                    Ok(()) => S_IOERR,
                    Err(e) => self.failed("read", &e),
                }
            }
            T_OUT => {
                self.stats.writes += 1;
                let mut buf = vec![0u8; data_len];
                match r.read_exact(&mut buf) {
                    Ok(()) => match self.backend.write_at(sector * SECTOR, &buf) {
                        Ok(()) => S_OK,
                        Err(e) => self.failed("write", &e),
                    },
                    Err(_) => S_IOERR,
                }
            }
            T_FLUSH => {
                self.stats.flushes += 1;
                match self.backend.flush() {
                    Ok(()) => S_OK,
                    Err(e) => self.failed("flush", &e),
                }
            }
            T_GET_ID => {
                let mut id = [0u8; 20];
                id[..8].copy_from_slice(b"colo-blk");
                let n = data_room.min(20);
                if w.write_all(&id[..n]).is_ok() {
                    written = n as u32;
                }
                S_OK
            }
            _ => S_UNSUPP,
        };
        if status == S_IOERR {
            self.stats.errors += 1;
        }
        written + u32::from(status_w.write_all(&[status]).is_ok())
    }
}

impl VirtioDevice for Blk {
    fn device_id(&self) -> u32 {
        2
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_FLUSH
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[crate::vm::abi::BLK_QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = (self.backend.len() / SECTOR).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn notify(
        &mut self,
        index: usize,
        q: &mut [Queue],
        mem: &GuestMemoryMmap,
        dirty: &AtomicPageBitmap,
    ) -> Result<()> {
        let Some(q) = q.get_mut(index) else {
            return Err(Error::Virtio(format!("block has no queue {index}")));
        };
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written_to = chain.clone();
            let n = self.request(chain, mem);
            mark_written(written_to, dirty);
            if q.add_used(mem, head, n).is_err() {
                break;
            }
            used = true;
        }
        if used {
            mark_used_ring(q, dirty);
        }
        Ok(())
    }

    fn save(&self, w: &mut Writer) {
        w.u64(self.backend.len());
    }

    fn restore(&mut self, r: &mut Reader<'_>) -> Result<()> {
        let size = r.u64("disk size")?;
        if size != self.backend.len() {
            return Err(Error::Snapshot(format!(
                "the snapshot's disk is {size} bytes, this VM's is {}",
                self.backend.len()
            )));
        }
        Ok(())
    }
}
