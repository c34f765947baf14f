//! virtio-blk over a `colo_blk::BlockBackend`: a raw image file, or block replication
//! (the primary's replicated disk, the secondary's disk buffer). Requests run without
//! the machine locked, so a pause need not wait for them (see `Blk`).

use std::collections::VecDeque;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use colo_blk::BlockBackend;

use colo_memory::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::virtio_mmio::{F_VERSION_1, VirtioDevice};
use crate::codec::{Reader, Writer};
use crate::error::{Error, Result};

/// Bytes per sector.
pub(crate) const SECTOR: u64 = 512;
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

/// What one request asks of the backend.
enum Op {
    /// Read `len` bytes at `offset`.
    Read { offset: u64, len: usize },
    /// Write `data` at `offset` (copied out of the guest when the request was taken).
    Write { offset: u64, data: Vec<u8> },
    /// Flush.
    Flush,
    /// Answered when the request was taken (a bad request, GET_ID): passed through, so
    /// that requests complete in the order they were taken.
    Done { status: u8, data: Vec<u8> },
}

/// A request's outcome.
struct Outcome {
    status: u8,
    /// Why the backend failed it.
    error: Option<(&'static str, colo_blk::Error)>,
    /// What the device writes into the request's buffers before the status byte.
    data: Vec<u8>,
}

/// A request taken from the queue and not yet completed.
struct Pending {
    head: u16,
    /// The device-writable buffers, in chain order; the status byte is the last byte.
    writable: Vec<(GuestAddress, u32)>,
    /// What it asks, until [`Blk::start_io`] hands it out.
    op: Option<Op>,
}

/// Requests handed out by [`Blk::start_io`], to run without the machine.
pub(crate) struct BlkIo {
    backend: Arc<dyn BlockBackend>,
    generation: u64,
    ops: Vec<Op>,
}

impl BlkIo {
    /// Runs the requests against the backend, in order.
    pub(crate) fn run(self) -> BlkDone {
        let outcomes = self
            .ops
            .into_iter()
            .map(|op| run_op(&*self.backend, op))
            .collect();
        BlkDone {
            generation: self.generation,
            outcomes,
        }
    }
}

/// The outcomes of a [`BlkIo`], for [`Blk::finish`].
pub(crate) struct BlkDone {
    generation: u64,
    outcomes: Vec<Outcome>,
}

/// The virtio-blk device. When the guest notifies, the device thread (`runner`) takes the
/// requests from the queue (what a write carries is copied out of the guest then), runs
/// them against the backend *without holding the machine* ([`Blk::start_io`], then
/// [`BlkIo::run`]) and writes their outcomes into guest memory afterwards
/// ([`Blk::finish`]) once the VM is not paused, then raises the interrupt. A checkpoint
/// can pause the VM while a request runs (a guest disk flush can take milliseconds, even
/// a hundred), instead of waiting for it.
///
/// A request not completed when the VM is saved is saved as not yet taken from the queue
/// ([`VirtioDevice::unfinished`]), and a restored device takes it again in the device
/// thread's first pass ([`Blk::take_requests`]): a VM restored from that snapshot (the SVM at each checkpoint, and
/// after failover) runs it again. That is safe because a request is idempotent at this
/// level — a write writes the same bytes from the same guest buffer (a driver does not
/// touch a buffer in flight), a flush flushes, a read reads again — and requests complete
/// in the order they were taken, so the unfinished ones are the last taken.
pub(crate) struct Blk {
    backend: Arc<dyn BlockBackend>,
    /// Counters.
    pub(crate) stats: BlkStats,
    pending: VecDeque<Pending>,
    /// Bumped by a reset or restore: outcomes of requests taken before are dropped.
    generation: u64,
}

impl Blk {
    /// A device over `backend`.
    pub(crate) fn new(backend: Arc<dyn BlockBackend>) -> Self {
        Self {
            backend,
            stats: BlkStats::default(),
            pending: VecDeque::new(),
            generation: 0,
        }
    }

    /// Requests taken from the queue and not yet completed.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Hands out the requests taken and not yet started, to run without the machine.
    pub(crate) fn start_io(&mut self) -> Option<BlkIo> {
        let ops: Vec<Op> = self
            .pending
            .iter_mut()
            .filter_map(|p| p.op.take())
            .collect();
        (!ops.is_empty()).then(|| BlkIo {
            backend: Arc::clone(&self.backend),
            generation: self.generation,
            ops,
        })
    }

    /// Writes the outcomes of a [`BlkIo`] into their requests' buffers and the used ring,
    /// in order; drops them if the device was reset or restored since.
    pub(crate) fn finish(&mut self, done: BlkDone, q: &mut Queue, mem: &GuestMemory) {
        if done.generation != self.generation {
            return;
        }
        for o in done.outcomes {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            if o.status != S_OK {
                self.stats.errors += 1;
                if let Some((op, e)) = &o.error
                    && self.stats.errors.is_power_of_two()
                {
                    tracing::warn!(op, error = %e, errors = self.stats.errors, "disk request failed");
                }
            }
            let written = write_outcome(&p.writable, &o, mem);
            if q.add_used(mem, p.head, written).is_err() {
                break;
            }
        }
    }

    /// Drops every request in flight: their outcomes will not be written (reset,
    /// restore).
    fn forget_in_flight(&mut self) {
        self.pending.clear();
        self.generation += 1;
    }

    /// Takes every request the driver made available (after a restore, first those in
    /// flight when the snapshot was saved).
    ///
    /// # Errors
    /// [`Error::Virtio`] for a device without its queue.
    pub(crate) fn take_requests(&mut self, q: &mut [Queue], mem: &GuestMemory) -> Result<()> {
        let Some(q) = q.first_mut() else {
            return Err(Error::Virtio("block has no queue 0".into()));
        };
        if !q.ready() || !q.is_valid(mem) {
            return Ok(());
        }
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let (op, writable) = self.take(chain, mem);
            self.pending.push_back(Pending {
                head,
                writable,
                op: Some(op),
            });
        }
        Ok(())
    }

    /// Counts and logs (rate-limited) a request the driver built wrongly.
    fn bad_chain(&mut self, why: &str) {
        self.stats.errors += 1;
        if self.stats.errors.is_power_of_two() {
            tracing::warn!(why, errors = self.stats.errors, "bad disk request");
        }
    }

    /// Takes one request apart: what running it asks of the backend, and where the outcome
    /// goes.
    fn take(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> (Op, Vec<(GuestAddress, u32)>) {
        let writable: Vec<_> = chain
            .clone()
            .writable()
            .map(|d| (d.addr(), d.len()))
            .collect();
        let done = |status| Op::Done {
            status,
            data: Vec::new(),
        };
        let (Ok(mut r), Ok(w)) = (chain.clone().reader(mem), chain.writer(mem)) else {
            self.bad_chain("a descriptor outside guest memory");
            return (done(S_IOERR), Vec::new());
        };
        let Some(data_room) = w.available_bytes().checked_sub(1) else {
            self.bad_chain("no writable status byte");
            return (done(S_IOERR), Vec::new());
        };
        let mut hdr = [0u8; 16];
        if r.read_exact(&mut hdr).is_err() {
            self.bad_chain("a header shorter than 16 bytes");
            return (done(S_IOERR), writable);
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
        let op = match kind {
            T_IN | T_OUT
                if !in_bounds || data_len > MAX_REQUEST || data_len as u64 % SECTOR != 0 =>
            {
                self.bad_chain(&format!(
                    "type {kind} at sector {sector}, {data_len} bytes: outside the disk or not whole sectors"
                ));
                done(S_IOERR)
            }
            T_IN => {
                self.stats.reads += 1;
                Op::Read {
                    offset: sector * SECTOR,
                    len: data_len,
                }
            }
            T_OUT => {
                self.stats.writes += 1;
                let mut data = vec![0u8; data_len];
                match r.read_exact(&mut data) {
                    Ok(()) => Op::Write {
                        offset: sector * SECTOR,
                        data,
                    },
                    Err(_) => done(S_IOERR),
                }
            }
            T_FLUSH => {
                self.stats.flushes += 1;
                Op::Flush
            }
            T_GET_ID => {
                let mut id = vec![0u8; data_room.min(20)];
                let n = id.len().min(8);
                id[..n].copy_from_slice(&b"colo-blk"[..n]);
                Op::Done {
                    status: S_OK,
                    data: id,
                }
            }
            _ => done(S_UNSUPP),
        };
        (op, writable)
    }
}

/// Writes an outcome into a request's device-writable buffers: its data from the start,
/// its status into the last byte. Returns the bytes written (the used length).
fn write_outcome(writable: &[(GuestAddress, u32)], o: &Outcome, mem: &GuestMemory) -> u32 {
    let room: u64 = writable.iter().map(|&(_, l)| u64::from(l)).sum();
    let Some(status_at) = room.checked_sub(1) else {
        return 0;
    };
    let data = &o.data[..o.data.len().min(status_at as usize)];
    let mut at = 0u64;
    let mut written = 0u32;
    for &(addr, len) in writable {
        let len = u64::from(len);
        // The part of the data that falls into this buffer.
        let (from, to) = (at.min(data.len() as u64), (at + len).min(data.len() as u64));
        if from < to
            && mem
                .write_slice(&data[from as usize..to as usize], addr)
                .is_ok()
        {
            written += (to - from) as u32;
        }
        if (at..at + len).contains(&status_at)
            && addr
                .checked_add(status_at - at)
                .is_some_and(|a| mem.write_obj(o.status, a).is_ok())
        {
            written += 1;
        }
        at += len;
    }
    written
}

/// Runs one request against the backend.
fn run_op(backend: &dyn BlockBackend, op: Op) -> Outcome {
    let ok = |data| Outcome {
        status: S_OK,
        error: None,
        data,
    };
    let failed = |op, e| Outcome {
        status: S_IOERR,
        error: Some((op, e)),
        data: Vec::new(),
    };
    match op {
        Op::Read { offset, len } => {
            let mut buf = vec![0u8; len];
            match backend.read_at(offset, &mut buf) {
                Ok(()) => ok(buf),
                Err(e) => failed("read", e),
            }
        }
        Op::Write { offset, data } => match backend.write_at(offset, &data) {
            Ok(()) => ok(Vec::new()),
            Err(e) => failed("write", e),
        },
        Op::Flush => match backend.flush() {
            Ok(()) => ok(Vec::new()),
            Err(e) => failed("flush", e),
        },
        Op::Done { status, data } => Outcome {
            status,
            error: None,
            data,
        },
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
        &[crate::abi::BLK_QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = (self.backend.len() / SECTOR).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn notify(&mut self, index: usize, q: &mut [Queue], mem: &GuestMemory) -> Result<()> {
        if index != 0 {
            return Err(Error::Virtio(format!("block has no queue {index}")));
        }
        self.take_requests(q, mem)
    }

    fn unfinished(&self, _index: usize) -> u16 {
        // At most the queue size: a queue has no more descriptors than that.
        self.pending.len() as u16
    }

    fn reset(&mut self) {
        self.forget_in_flight();
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
        // Requests the VM took before must not complete into the restored memory; those
        // the snapshot has in flight are taken again before the guest runs.
        self.forget_in_flight();
        Ok(())
    }
}
