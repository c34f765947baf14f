//! Where buffered sectors live: a memory arena allocated once, and past its limit a spill
//! file. Both are bump-allocated and reset as a whole when the buffer is dropped, so a
//! drop does no per-extent work here and no I/O (unless the spill file grew past
//! [`BufferOptions::spill_retain`](crate::BufferOptions::spill_retain), when it is
//! truncated to give its blocks back).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::aligned::AlignedBuf;
use crate::disk::Disk;
use crate::error::{Error, Result};

/// Where an extent's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loc {
    /// Byte offset in the memory arena.
    Mem(u64),
    /// Byte offset in the spill file.
    Spill(u64),
}

impl Loc {
    /// The location `bytes` further on.
    pub fn add(self, bytes: u64) -> Self {
        match self {
            Self::Mem(o) => Self::Mem(o + bytes),
            Self::Spill(o) => Self::Spill(o + bytes),
        }
    }
}

/// Bytes copied per step when moving data between the spill file and a disk.
const COPY_CHUNK: usize = 1 << 20;

#[derive(Debug)]
pub(crate) struct Store {
    /// Page-aligned, so that reads of original sectors into it run at full speed.
    mem: AlignedBuf,
    mem_used: usize,
    spill_dir: PathBuf,
    spill: Option<File>,
    spill_used: u64,
    spill_len: u64,
    spill_retain: u64,
    dead: u64,
    scratch: Vec<u8>,
}

impl Store {
    /// A store with `mem_limit` bytes of memory (touched now when `prefault`) and a spill
    /// file created in `spill_dir` when first needed.
    pub fn new(mem_limit: usize, prefault: bool, spill_dir: &Path, spill_retain: u64) -> Self {
        let mut mem = AlignedBuf::new(mem_limit);
        if prefault {
            // Write one byte per page so the kernel backs the whole arena now rather than
            // on the first write of an epoch (first touch runs at a tenth of memcpy speed).
            for i in (0..mem.len()).step_by(4096) {
                mem[i] = 1;
            }
            std::hint::black_box(&mut *mem);
        }
        Self {
            mem,
            mem_used: 0,
            spill_dir: spill_dir.to_path_buf(),
            spill: None,
            spill_used: 0,
            spill_len: 0,
            spill_retain,
            dead: 0,
            scratch: Vec::new(),
        }
    }

    /// Arena bytes in use (live or dead).
    pub fn mem_used(&self) -> u64 {
        self.mem_used as u64
    }

    /// Spill file bytes in use (live or dead).
    pub fn spill_used(&self) -> u64 {
        self.spill_used
    }

    /// Bytes allocated whose extents were overwritten since the last reset.
    pub fn dead(&self) -> u64 {
        self.dead
    }

    /// Records `bytes` of allocated data as unreachable.
    pub fn add_dead(&mut self, bytes: u64) {
        self.dead += bytes;
    }

    /// Allocates `len` bytes: in memory while the arena has room, else in the spill file.
    pub fn alloc(&mut self, len: usize) -> Result<Loc> {
        if self.mem.len() - self.mem_used >= len {
            let at = self.mem_used;
            self.mem_used += len;
            return Ok(Loc::Mem(at as u64));
        }
        self.spill_file()?;
        let at = self.spill_used;
        self.spill_used += len as u64;
        Ok(Loc::Spill(at))
    }

    fn spill_file(&mut self) -> Result<&File> {
        if self.spill.is_none() {
            let f = create_unnamed(&self.spill_dir).map_err(|source| Error::Spill {
                op: "create it",
                source,
            })?;
            tracing::info!(dir = %self.spill_dir.display(), "disk buffer spills to a file");
            self.spill = Some(f);
        }
        Ok(self.spill.as_ref().expect("just created"))
    }

    /// Stores `data` at `loc`.
    pub fn write(&mut self, loc: Loc, data: &[u8]) -> Result<()> {
        match loc {
            Loc::Mem(o) => {
                self.mem[o as usize..o as usize + data.len()].copy_from_slice(data);
                Ok(())
            }
            Loc::Spill(o) => {
                let f = self
                    .spill
                    .as_ref()
                    .expect("spill locations come from alloc");
                f.write_all_at(data, o).map_err(|source| Error::Spill {
                    op: "write",
                    source,
                })?;
                self.spill_len = self.spill_len.max(o + data.len() as u64);
                Ok(())
            }
        }
    }

    /// Reads `buf.len()` bytes from `loc`.
    pub fn read(&self, loc: Loc, buf: &mut [u8]) -> Result<()> {
        match loc {
            Loc::Mem(o) => {
                buf.copy_from_slice(&self.mem[o as usize..o as usize + buf.len()]);
                Ok(())
            }
            Loc::Spill(o) => {
                let f = self
                    .spill
                    .as_ref()
                    .expect("spill locations come from alloc");
                f.read_exact_at(buf, o)
                    .map_err(|source| Error::Spill { op: "read", source })
            }
        }
    }

    /// Copies `len` bytes at disk offset `offset` into `loc` (the copy-before-write of
    /// original sectors).
    pub fn fill_from_disk(&mut self, loc: Loc, disk: &Disk, offset: u64, len: usize) -> Result<()> {
        match loc {
            Loc::Mem(o) => disk.read_unchecked(offset, &mut self.mem[o as usize..o as usize + len]),
            Loc::Spill(o) => {
                let mut scratch = std::mem::take(&mut self.scratch);
                let r = (|| {
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(COPY_CHUNK);
                        scratch.resize(n, 0);
                        disk.read_unchecked(offset + done as u64, &mut scratch)?;
                        self.write(Loc::Spill(o + done as u64), &scratch)?;
                        done += n;
                    }
                    Ok(())
                })();
                self.scratch = scratch;
                r
            }
        }
    }

    /// Writes `len` bytes from `loc` onto the disk at `offset` (failover).
    pub fn copy_to_disk(&mut self, loc: Loc, disk: &Disk, offset: u64, len: usize) -> Result<()> {
        match loc {
            Loc::Mem(o) => disk.write_unchecked(offset, &self.mem[o as usize..o as usize + len]),
            Loc::Spill(o) => {
                let mut scratch = std::mem::take(&mut self.scratch);
                let r = (|| {
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(COPY_CHUNK);
                        scratch.resize(n, 0);
                        self.read(Loc::Spill(o + done as u64), &mut scratch)?;
                        disk.write_unchecked(offset + done as u64, &scratch)?;
                        done += n;
                    }
                    Ok(())
                })();
                self.scratch = scratch;
                r
            }
        }
    }

    /// Forgets every allocation. The arena stays allocated and touched; the spill file is
    /// reused from its start, and truncated only when it grew past the retain limit.
    pub fn reset(&mut self) -> Result<()> {
        self.mem_used = 0;
        self.spill_used = 0;
        self.dead = 0;
        if self.spill_len > self.spill_retain {
            if let Some(f) = &self.spill {
                f.set_len(0).map_err(|source| Error::Spill {
                    op: "truncate",
                    source,
                })?;
            }
            self.spill_len = 0;
        }
        Ok(())
    }
}

/// Creates a file with no name in `dir` (O_TMPFILE), or, where the file system cannot,
/// a named one that is unlinked at once.
fn create_unnamed(dir: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
    {
        Ok(f) => Ok(f),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
            static N: AtomicU64 = AtomicU64::new(0);
            let path = dir.join(format!(
                ".colo-blk-spill-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(f)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spills_past_the_memory_limit_and_resets() {
        let dir = std::env::temp_dir();
        let mut s = Store::new(1024, true, &dir, 0);
        let a = s.alloc(512).unwrap();
        let b = s.alloc(512).unwrap();
        let c = s.alloc(1024).unwrap();
        assert_eq!((a, b, c), (Loc::Mem(0), Loc::Mem(512), Loc::Spill(0)));
        s.write(a, &[1; 512]).unwrap();
        s.write(c, &[3; 1024]).unwrap();
        let mut buf = [0u8; 1024];
        s.read(c, &mut buf).unwrap();
        assert_eq!(buf, [3; 1024]);
        s.read(a, &mut buf[..512]).unwrap();
        assert_eq!(buf[..512], [1; 512]);
        assert_eq!((s.mem_used(), s.spill_used()), (1024, 1024));
        s.reset().unwrap();
        assert_eq!((s.mem_used(), s.spill_used()), (0, 0));
        assert_eq!(s.alloc(512).unwrap(), Loc::Mem(0));
    }
}
