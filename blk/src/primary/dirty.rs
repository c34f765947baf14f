//! The dirty-chunk bitmap of a resync (the drive-mirror role): chunks written since the
//! copy started, or not copied yet.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per chunk of the disk. Set after a write completes, cleared by the copier just
/// before it reads the chunk: a write that lands during the read sets the bit again, so
/// the chunk is copied once more.
#[derive(Debug)]
pub(crate) struct DirtyMap {
    words: Vec<AtomicU64>,
    chunks: u64,
    chunk: u64,
}

impl DirtyMap {
    pub fn new(disk_len: u64, chunk: u64) -> Self {
        let chunks = disk_len.div_ceil(chunk);
        Self {
            words: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            chunks,
            chunk,
        }
    }

    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Marks every chunk (the start of a full copy).
    pub fn set_all(&self) {
        for (i, w) in self.words.iter().enumerate() {
            let first = i as u64 * 64;
            let n = (self.chunks - first).min(64);
            w.store(
                if n == 64 { u64::MAX } else { (1 << n) - 1 },
                Ordering::SeqCst,
            );
        }
    }

    /// Marks the chunks of a completed write of `len > 0` bytes at `offset`.
    pub fn mark(&self, offset: u64, len: u64) {
        let first = offset / self.chunk;
        let last = (offset + len - 1) / self.chunk;
        for c in first..=last {
            self.words[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::SeqCst);
        }
    }

    /// Finds a dirty chunk at or after `from`, clears it and returns it.
    pub fn take_next(&self, from: u64) -> Option<u64> {
        let mut wi = (from / 64) as usize;
        let mut mask = u64::MAX << (from % 64);
        while wi < self.words.len() {
            let w = &self.words[wi];
            let mut v = w.load(Ordering::SeqCst) & mask;
            while v != 0 {
                let bit = v.trailing_zeros();
                let prev = w.fetch_and(!(1 << bit), Ordering::SeqCst);
                if prev & (1 << bit) != 0 {
                    return Some(wi as u64 * 64 + u64::from(bit));
                }
                v &= !(1 << bit);
            }
            wi += 1;
            mask = u64::MAX;
        }
        None
    }

    /// Dirty chunks now.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_take_and_set_all() {
        let m = DirtyMap::new(130 * 4096 + 1, 4096);
        assert_eq!(m.chunks(), 131);
        m.mark(4096 * 64, 8192);
        assert_eq!(m.count(), 2);
        assert_eq!(m.take_next(0), Some(64));
        assert_eq!(m.take_next(65), Some(65));
        assert_eq!(m.take_next(0), None);
        m.set_all();
        assert_eq!(m.count(), 131);
        let mut n = 0;
        let mut at = 0;
        while let Some(c) = m.take_next(at) {
            assert_eq!(c, at);
            at = c + 1;
            n += 1;
        }
        assert_eq!(n, 131);
        m.mark(130 * 4096, 512);
        assert_eq!(m.take_next(0), Some(130));
    }
}
