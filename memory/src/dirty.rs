//! The dirty bitmap of guest memory: vm-memory marks a page in it after every write the
//! VMM makes through guest memory (device DMA, virtio rings, loading), and the dirty
//! tracker drains it at every collection.
//!
//! vm-memory's own `AtomicBitmap` can only be drained whole: `get_and_reset` swaps every
//! word and returns a new vector, on every collection (each background push round, every
//! 10 ms by default). That is a few hundred words for the default guests but 14 thousand
//! swaps for 3.5 GiB and a quarter of a million for 64 GiB, nearly all of them of zero
//! words (devices touch few pages). [`DirtyBitmap::drain_into`] reads each word first and
//! swaps only the ones with a mark, straight into the collection's [`PageBitmap`], with
//! nothing allocated.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

use crate::{PAGE_SIZE, PageBitmap};

/// One bit per 4 KiB page of a guest memory region, set by vm-memory after each write
/// through the region, taken by [`DirtyBitmap::drain_into`].
#[derive(Debug, Default)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl DirtyBitmap {
    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Moves every marked page into `out` at flat page `first + page` and clears its mark;
    /// returns how many pages were marked.
    ///
    /// Each word with a mark is swapped with zero atomically: a mark made during the drain
    /// lands in this collection or the next, never nowhere. vm-memory marks after the
    /// write it records, so a page is copied after its bytes are in place. Words read as
    /// zero are left alone (a mark made just after the read waits for the next drain).
    pub fn drain_into(&self, out: &mut PageBitmap, first: u64) -> u64 {
        let mut marked = 0;
        for (i, w) in self.words.iter().enumerate() {
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let v = w.swap(0, Ordering::AcqRel);
            if v != 0 {
                marked += u64::from(v.count_ones());
                out.or_words_at(first + i as u64 * 64, &[v]);
            }
        }
        marked
    }

    /// Clears every mark.
    pub fn reset(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }

    fn mark_page(&self, page: u64) {
        if let Some(w) = self.words.get((page / 64) as usize) {
            w.fetch_or(1 << (page % 64), Ordering::AcqRel);
        }
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = RefSlice<'a, DirtyBitmap>;
}

impl Bitmap for DirtyBitmap {
    /// Marks every page that `offset..offset + len` (bytes from the region's start)
    /// touches. Pages past the region are ignored: vm-memory checks accesses against the
    /// region before it marks them.
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset as u64 / PAGE_SIZE;
        let last = (offset as u64).saturating_add(len as u64 - 1) / PAGE_SIZE;
        for page in first..=last.min(self.pages.saturating_sub(1)) {
            self.mark_page(page);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = offset as u64 / PAGE_SIZE;
        self.words
            .get((page / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, DirtyBitmap> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyBitmap {
    fn with_len(len: usize) -> Self {
        let pages = (len as u64).div_ceil(PAGE_SIZE);
        Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;
    use crate::GuestMemory;

    #[test]
    fn writes_through_guest_memory_mark_exactly_their_pages() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let map = mem.iter().next().unwrap().get_mmap();
        let b = map.bitmap();
        assert_eq!(b.pages(), 256);
        // Across a page boundary: two pages.
        mem.write_slice(&[1; 8], GuestAddress(3 * PAGE_SIZE - 4))
            .unwrap();
        mem.write_obj(7u32, GuestAddress(200 * PAGE_SIZE)).unwrap();
        let mut out = PageBitmap::new(256 + 512);
        // Drained at flat page 512 (a second region's place in the numbering).
        assert_eq!(b.drain_into(&mut out, 512), 3);
        assert_eq!(
            out.runs().collect::<Vec<_>>(),
            [(512 + 2, 2), (512 + 200, 1)]
        );
        // Drained means cleared.
        let mut again = PageBitmap::new(256 + 512);
        assert_eq!(b.drain_into(&mut again, 512), 0);
        assert!(again.is_clear());
    }

    #[test]
    fn marks_past_the_end_and_empty_writes_are_ignored() {
        let b = DirtyBitmap::with_len(10 * PAGE_SIZE as usize);
        b.mark_dirty(9 * PAGE_SIZE as usize, 3 * PAGE_SIZE as usize);
        b.mark_dirty(0, 0);
        assert!(b.dirty_at(9 * PAGE_SIZE as usize));
        assert!(!b.dirty_at(0));
        let mut out = PageBitmap::new(10);
        assert_eq!(b.drain_into(&mut out, 0), 1);
        b.mark_dirty(5, 1);
        b.reset();
        assert!(!b.dirty_at(5));
    }

    #[test]
    fn a_slice_marks_at_its_offset() {
        let b = DirtyBitmap::with_len(8 * PAGE_SIZE as usize);
        b.slice_at(2 * PAGE_SIZE as usize)
            .mark_dirty(PAGE_SIZE as usize, 1);
        assert!(b.dirty_at(3 * PAGE_SIZE as usize));
    }

    #[test]
    fn marks_made_while_draining_are_never_lost() {
        let b = std::sync::Arc::new(DirtyBitmap::with_len(4096 * PAGE_SIZE as usize));
        let writer = {
            let b = std::sync::Arc::clone(&b);
            std::thread::spawn(move || {
                for p in 0..4096u64 {
                    b.mark_dirty((p * PAGE_SIZE) as usize, 1);
                }
            })
        };
        let mut out = PageBitmap::new(4096);
        let mut total = 0;
        while !writer.is_finished() {
            total += b.drain_into(&mut out, 0);
        }
        writer.join().unwrap();
        total += b.drain_into(&mut out, 0);
        assert_eq!(out.count(), 4096);
        assert_eq!(total, 4096, "each mark drained exactly once");
    }
}
