//! The key-value store: a map in memory, backed by an append-only log on the disk (the
//! record format is in [`colo_guest_abi::record`]).
//!
//! At boot [`Store::recover`] reads the log from sector 0 and replays every record into
//! the map. Each [`Store::set`] then appends one record: the sector holding the end of the
//! log is kept in memory, so an append writes that sector (with the records before the
//! end in it) plus any sectors the new record reaches, always including the byte after the
//! record (the 0 that ends the log), and then flushes. The map changes only once the disk
//! has the record.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use colo_guest_abi::record::{self, HEADER, Header};

use crate::blk::{BlkError, SECTOR, VirtioBlk};

/// Bytes read per request while replaying.
const REPLAY_CHUNK: usize = 64 << 10;
/// Heap bytes kept free for the network and the sockets; a SET that would eat into them
/// is refused.
pub const MEMORY_RESERVE: usize = 1 << 20;

/// Why a SET was refused.
#[derive(Debug, Clone, Copy)]
pub enum SetError {
    /// The log has no room for the record.
    DiskFull,
    /// The map would leave less than [`MEMORY_RESERVE`] bytes of heap.
    MemoryFull,
    /// The disk failed; nothing changed.
    Disk(BlkError),
}

impl fmt::Display for SetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DiskFull => write!(f, "disk full"),
            Self::MemoryFull => write!(f, "memory full"),
            Self::Disk(e) => write!(f, "disk error: {e}"),
        }
    }
}

/// Why the log could not be replayed.
#[derive(Debug, Clone, Copy)]
pub enum RecoverError {
    /// Reading the disk failed.
    Disk(BlkError),
    /// The records do not fit in the heap.
    Memory {
        /// Records replayed before memory ran short.
        records: u64,
    },
}

impl fmt::Display for RecoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disk(e) => write!(f, "reading the log: {e}"),
            Self::Memory { records } => {
                write!(
                    f,
                    "the log does not fit in memory (after {records} records)"
                )
            }
        }
    }
}

/// What [`Store::recover`] found.
#[derive(Debug, Clone, Copy)]
pub struct Recovery {
    /// Records replayed.
    pub records: u64,
    /// Bytes of log.
    pub bytes: u64,
    /// Set if the log ended in something other than its 0 end marker (a torn write, or
    /// a disk that never held a log): the reason. New records overwrite from there.
    pub damaged: Option<&'static str>,
}

/// Reads the log sequentially through a buffer of whole sectors.
struct LogReader<'a> {
    blk: &'a mut VirtioBlk,
    capacity: u64,
    buf: Vec<u8>,
    /// Byte offset on the disk of `buf[0]`.
    start: u64,
}

impl LogReader<'_> {
    /// `len` bytes of the disk at byte `off`, or `None` past the end of the disk.
    fn get(&mut self, off: u64, len: usize) -> Result<Option<&[u8]>, BlkError> {
        let end = off + len as u64;
        if end > self.capacity {
            return Ok(None);
        }
        if off < self.start || end > self.start + self.buf.len() as u64 {
            let first = off - off % SECTOR as u64;
            let need = (end - first).next_multiple_of(SECTOR as u64);
            let want = need.max(REPLAY_CHUNK as u64).min(self.capacity - first);
            self.buf.resize(want as usize, 0);
            self.blk.read(first / SECTOR as u64, &mut self.buf)?;
            self.start = first;
        }
        let at = (off - self.start) as usize;
        Ok(Some(&self.buf[at..at + len]))
    }
}

/// The map and its log.
pub struct Store {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Byte offset of the end of the log.
    end: u64,
    /// The sector holding `end`: the log's bytes before it, zeros from it on.
    tail: Box<[u8; SECTOR]>,
    /// Bytes of disk.
    capacity: u64,
    /// SETs since boot (replayed records not counted).
    sets: u64,
    /// Scratch for appends.
    scratch: Vec<u8>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("keys", &self.map.len())
            .field("end", &self.end)
            .field("capacity", &self.capacity)
            .field("sets", &self.sets)
            .finish()
    }
}

impl Store {
    /// Replays the log on `blk` into a new map.
    ///
    /// # Errors
    /// [`RecoverError`] if the disk cannot be read or the records do not fit in memory.
    pub fn recover(blk: &mut VirtioBlk) -> Result<(Self, Recovery), RecoverError> {
        let capacity = blk.sectors().saturating_mul(SECTOR as u64);
        let mut map = BTreeMap::new();
        let mut rd = LogReader {
            blk,
            capacity,
            buf: Vec::new(),
            start: 0,
        };
        let mut off = 0u64;
        let mut records = 0u64;
        let damaged = loop {
            let Some(h) = rd.get(off, HEADER).map_err(RecoverError::Disk)? else {
                break None; // the disk is full of records
            };
            let h: &[u8; HEADER] = h.try_into().expect("HEADER bytes");
            let (key_len, value_len) = match Header::parse(h) {
                Header::End => break None,
                Header::Bad => break Some("a record header is not valid"),
                Header::Set { key_len, value_len } => (key_len, value_len),
            };
            let len = record::record_len(key_len, value_len);
            let Some(rec) = rd.get(off, len).map_err(RecoverError::Disk)? else {
                break Some("the last record runs past the end of the disk");
            };
            let Some((key, value)) = record::decode(rec, key_len, value_len) else {
                break Some("a record's checksum does not match");
            };
            if crate::rt::heap_free() < MEMORY_RESERVE / 2 + 2 * len {
                return Err(RecoverError::Memory { records });
            }
            map.insert(key.to_vec(), value.to_vec());
            records += 1;
            off += len as u64;
        };
        let mut tail = Box::new([0u8; SECTOR]);
        let sector_start = off - off % SECTOR as u64;
        if let Some(s) = rd.get(sector_start, SECTOR).map_err(RecoverError::Disk)? {
            let keep = (off - sector_start) as usize;
            tail[..keep].copy_from_slice(&s[..keep]);
        }
        let store = Self {
            map,
            end: off,
            tail,
            capacity,
            sets: 0,
            scratch: Vec::new(),
        };
        let recovery = Recovery {
            records,
            bytes: off,
            damaged,
        };
        Ok((store, recovery))
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(Vec::as_slice)
    }

    /// SETs since boot.
    pub fn sets(&self) -> u64 {
        self.sets
    }

    /// Keys in the map.
    pub fn keys(&self) -> usize {
        self.map.len()
    }

    /// Appends the record for `key` = `value` to the log, makes it durable, then updates
    /// the map.
    ///
    /// # Errors
    /// [`SetError`]; on any error neither the disk's log nor the map changed.
    ///
    /// # Panics
    /// If `key` is empty or longer than [`record::MAX_KEY`], or `value` longer than
    /// [`record::MAX_VALUE`] (the line protocol's limits keep them shorter).
    pub fn set(&mut self, blk: &mut VirtioBlk, key: &[u8], value: &[u8]) -> Result<(), SetError> {
        let len = record::record_len(key.len(), value.len());
        // The record and the 0 after it must fit.
        if self.end + len as u64 + 1 > self.capacity {
            return Err(SetError::DiskFull);
        }
        if crate::rt::heap_free() < MEMORY_RESERVE + 2 * len {
            return Err(SetError::MemoryFull);
        }
        let in_sector = (self.end % SECTOR as u64) as usize;
        let first = self.end / SECTOR as u64;
        let buf = &mut self.scratch;
        buf.clear();
        buf.extend_from_slice(&self.tail[..in_sector]);
        record::encode(key, value, buf);
        buf.resize((in_sector + len + 1).next_multiple_of(SECTOR), 0);
        blk.write(first, buf).map_err(SetError::Disk)?;
        blk.flush().map_err(SetError::Disk)?;

        let new_end = self.end + len as u64;
        let tail_at = ((new_end / SECTOR as u64 - first) as usize) * SECTOR;
        self.tail.copy_from_slice(&buf[tail_at..tail_at + SECTOR]);
        self.end = new_end;
        self.sets += 1;
        self.map.insert(key.to_vec(), value.to_vec());
        Ok(())
    }
}
