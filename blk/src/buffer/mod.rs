//! The secondary's disk buffer: the *hidden* buffer (original sectors of the secondary
//! disk, copied before a primary write first touches them in an epoch) and the *active*
//! buffer (the secondary VM's own writes), over the secondary disk.
//!
//! The secondary VM reads active over hidden over disk. That is the disk as of the last
//! checkpoint plus the SVM's own writes since: it never sees the primary's writes of the
//! running epoch, which the SVM's own (equal) execution produces by itself.

mod extents;
mod store;

use std::path::PathBuf;

use extents::ExtentMap;
use store::Store;

use crate::disk::Disk;
use crate::error::Result;
use crate::sector::SECTOR_SIZE;

/// Sizing of the secondary's disk buffer.
#[derive(Debug, Clone)]
pub struct BufferOptions {
    /// Bytes of buffered sectors kept in memory; past it they spill to a file.
    pub mem_limit: usize,
    /// Touch the whole memory arena when the buffer is created, so that epochs do not pay
    /// for first-touch page faults.
    pub prefault: bool,
    /// Directory of the spill file (an unnamed file, gone when the process ends).
    pub spill_dir: PathBuf,
    /// Spill file size kept across checkpoints for reuse; a larger file is truncated
    /// when the buffer is dropped.
    pub spill_retain: u64,
}

impl Default for BufferOptions {
    fn default() -> Self {
        Self {
            mem_limit: 256 << 20,
            prefault: false,
            spill_dir: std::env::temp_dir(),
            spill_retain: 1 << 30,
        }
    }
}

impl BufferOptions {
    /// Options with a memory limit, other fields at their defaults.
    pub fn with_mem_limit(mem_limit: usize) -> Self {
        Self {
            mem_limit,
            ..Self::default()
        }
    }
}

/// How big the disk buffer is, for the controller (a checkpoint empties it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BufferStats {
    /// Extents in the hidden buffer.
    pub hidden_extents: usize,
    /// Bytes of original sectors in the hidden buffer.
    pub hidden_bytes: u64,
    /// Extents in the active buffer.
    pub active_extents: usize,
    /// Bytes of SVM writes in the active buffer.
    pub active_bytes: u64,
    /// Memory arena bytes in use (including data of overwritten extents).
    pub mem_bytes: u64,
    /// Spill file bytes in use (including data of overwritten extents).
    pub spill_bytes: u64,
    /// Of those, bytes whose extents were overwritten (reclaimed at the next drop).
    pub dead_bytes: u64,
}

impl BufferStats {
    /// Memory plus spill in use: the figure to compare with a checkpoint threshold.
    pub fn footprint(&self) -> u64 {
        self.mem_bytes + self.spill_bytes
    }
}

/// The disk and its two buffers. Not synchronized: the secondary wraps it in a mutex.
#[derive(Debug)]
pub(crate) struct DiskBuffer {
    disk: Disk,
    store: Store,
    hidden: ExtentMap,
    active: ExtentMap,
    gaps: Vec<(u64, u64)>,
}

fn sectors(offset: u64, len: usize) -> (u64, u64) {
    (offset / SECTOR_SIZE, (offset + len as u64) / SECTOR_SIZE)
}

impl DiskBuffer {
    pub fn new(disk: Disk, opts: &BufferOptions) -> Self {
        Self {
            disk,
            store: Store::new(
                opts.mem_limit,
                opts.prefault,
                &opts.spill_dir,
                opts.spill_retain,
            ),
            hidden: ExtentMap::default(),
            active: ExtentMap::default(),
            gaps: Vec::new(),
        }
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// A primary write of a checked span: originals of sectors not yet in the hidden
    /// buffer are copied there first, then the data goes to the disk.
    pub fn primary_write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let (start, end) = sectors(offset, data.len());
        self.gaps.clear();
        let gaps = &mut self.gaps;
        self.hidden.walk(start, end, |a, b, loc| -> Result<()> {
            if loc.is_none() {
                gaps.push((a, b));
            }
            Ok(())
        })?;
        for i in 0..self.gaps.len() {
            let (a, b) = self.gaps[i];
            let len = ((b - a) * SECTOR_SIZE) as usize;
            let loc = self.store.alloc(len)?;
            self.store
                .fill_from_disk(loc, &self.disk, a * SECTOR_SIZE, len)?;
            self.hidden.insert_new(a, b, loc);
        }
        self.disk.write_unchecked(offset, data)
    }

    /// A write straight to the disk (the full copy of a resync: no epoch to undo).
    pub fn direct_write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.disk.write_unchecked(offset, data)
    }

    /// An SVM write of a checked span, into the active buffer.
    pub fn svm_write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let (start, end) = sectors(offset, data.len());
        if let Some(loc) = self.active.exact(start, end) {
            return self.store.write(loc, data);
        }
        let loc = self.store.alloc(data.len())?;
        self.store.write(loc, data)?;
        let dead = self.active.overwrite(start, end, loc);
        self.store.add_dead(dead * SECTOR_SIZE);
        Ok(())
    }

    /// An SVM read of a checked span: active over hidden over disk.
    pub fn svm_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (start, end) = sectors(offset, buf.len());
        let at = |s: u64| ((s - start) * SECTOR_SIZE) as usize;
        self.active.walk(start, end, |a, b, loc| {
            let piece = &mut buf[at(a)..at(b)];
            match loc {
                Some(l) => self.store.read(l, piece),
                None => self.hidden.walk(a, b, |c, d, loc| {
                    let piece = &mut buf[at(c)..at(d)];
                    match loc {
                        Some(l) => self.store.read(l, piece),
                        None => self.disk.read_unchecked(c * SECTOR_SIZE, piece),
                    }
                }),
            }
        })
    }

    /// Drops both buffers (a committed checkpoint).
    pub fn drop_all(&mut self) -> Result<()> {
        self.hidden.clear();
        self.active.clear();
        self.store.reset()
    }

    /// Failover: restores the hidden originals onto the disk (undoing the primary's
    /// writes of the uncommitted epoch), writes the active buffer over them (the SVM
    /// keeps its own view), makes it durable, and drops both buffers.
    pub fn flush_into_disk(&mut self) -> Result<()> {
        self.write_back(true)
    }

    /// A stop at the last commit: restores the hidden originals onto the disk (undoing
    /// the primary's writes of the uncommitted epoch), drops the SVM's writes, makes it
    /// durable, and drops both buffers. The disk then equals the primary's as of the last
    /// committed checkpoint.
    pub fn roll_back_into_disk(&mut self) -> Result<()> {
        self.write_back(false)
    }

    /// Writes the hidden buffer (and with `active`, the active one over it) onto the
    /// disk, syncs it and drops both buffers.
    fn write_back(&mut self, active: bool) -> Result<()> {
        let maps = if active {
            [Some(&self.hidden), Some(&self.active)]
        } else {
            [Some(&self.hidden), None]
        };
        for map in maps.into_iter().flatten() {
            for (s, e) in map.iter() {
                self.store.copy_to_disk(
                    e.loc,
                    &self.disk,
                    s * SECTOR_SIZE,
                    (e.sectors * SECTOR_SIZE) as usize,
                )?;
            }
        }
        self.disk.sync()?;
        self.drop_all()
    }

    pub fn stats(&self) -> BufferStats {
        BufferStats {
            hidden_extents: self.hidden.len(),
            hidden_bytes: self.hidden.sectors() * SECTOR_SIZE,
            active_extents: self.active.len(),
            active_bytes: self.active.sectors() * SECTOR_SIZE,
            mem_bytes: self.store.mem_used(),
            spill_bytes: self.store.spill_used(),
            dead_bytes: self.store.dead(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk_with(bytes: &[u8]) -> Disk {
        let f = tempfile::tempfile().unwrap();
        use std::io::Write;
        (&f).write_all(bytes).unwrap();
        Disk::from_file(f).unwrap()
    }

    fn read_disk(b: &DiskBuffer) -> Vec<u8> {
        let mut v = vec![0u8; b.disk().len() as usize];
        b.disk().read_at(0, &mut v).unwrap();
        v
    }

    #[test]
    fn hidden_keeps_first_original_and_svm_sees_checkpoint_plus_own_writes() {
        for mem in [0usize, 1024, 1 << 20] {
            let mut b =
                DiskBuffer::new(disk_with(&[0u8; 4096]), &BufferOptions::with_mem_limit(mem));
            b.primary_write(0, &[1; 1024]).unwrap();
            b.primary_write(512, &[2; 1024]).unwrap(); // sector 1 already buffered
            b.svm_write(1024, &[9; 512]).unwrap();
            let mut r = vec![0u8; 2048];
            b.svm_read(0, &mut r).unwrap();
            assert_eq!(&r[..1024], &[0; 1024]);
            assert_eq!(&r[1024..1536], &[9; 512]);
            assert_eq!(&r[1536..], &[0; 512]);
            let d = read_disk(&b);
            assert_eq!(&d[..512], &[1; 512]);
            assert_eq!(&d[512..1536], &[2; 1024]);
            let s = b.stats();
            assert_eq!((s.hidden_extents, s.hidden_bytes), (2, 1536));
            assert_eq!((s.active_extents, s.active_bytes), (1, 512));
            // Failover: originals back, SVM write on top.
            b.flush_into_disk().unwrap();
            let d = read_disk(&b);
            assert_eq!(&d[..1024], &[0; 1024]);
            assert_eq!(&d[1024..1536], &[9; 512]);
            assert_eq!(b.stats(), BufferStats::default());
        }
    }

    #[test]
    fn checkpoint_keeps_primary_writes_and_drops_svm_writes() {
        let mut b = DiskBuffer::new(disk_with(&[0u8; 4096]), &BufferOptions::with_mem_limit(512));
        b.primary_write(0, &[1; 2048]).unwrap();
        b.svm_write(0, &[7; 512]).unwrap();
        b.svm_write(0, &[8; 512]).unwrap(); // in place
        b.svm_write(0, &[6; 1024]).unwrap(); // overwrites
        assert_eq!(b.stats().dead_bytes, 512);
        b.drop_all().unwrap();
        let mut r = vec![0u8; 4096];
        b.svm_read(0, &mut r).unwrap();
        assert_eq!(&r[..2048], &[1; 2048]);
        assert_eq!(&r[2048..], &[0; 2048]);
        assert_eq!(b.stats(), BufferStats::default());
    }
}
