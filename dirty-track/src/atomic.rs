//! The VMM's own dirty bitmap: pages written by the VMM itself (device DMA, virtio used
//! rings), which KVM's dirty log never sees.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::bitmap::PageBitmap;

/// A page bitmap that device threads mark concurrently and the checkpoint drains.
#[derive(Debug)]
pub struct AtomicPageBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
    page_shift: u32,
}

impl AtomicPageBitmap {
    /// A clear bitmap of `pages` pages of `page_size` bytes (a power of two).
    ///
    /// # Panics
    /// If `page_size` is not a power of two.
    pub fn new(pages: u64, page_size: u64) -> Self {
        assert!(
            page_size.is_power_of_two(),
            "page size {page_size} is not a power of two"
        );
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self {
            words,
            pages,
            page_shift: page_size.trailing_zeros(),
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks every page touched by a write of `len` bytes at byte `offset`. The part of the
    /// write past the end is ignored (the caller's guest memory bounds check comes first).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.page_shift;
        let last =
            (offset.saturating_add(len - 1) >> self.page_shift).min(self.pages.saturating_sub(1));
        let mut p = first;
        while p <= last && p < self.pages {
            let lo = p % 64;
            let n = (64 - lo).min(last - p + 1);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << lo
            };
            // Release: the write this mark follows is visible to whoever drains the mark.
            self.words[(p / 64) as usize].fetch_or(mask, Ordering::Release);
            p += n;
        }
    }

    /// Moves every mark into `out` (OR) and clears this bitmap, word by word atomically, so
    /// a mark made during the drain lands either in `out` or in the next drain, never
    /// nowhere. Returns the number of pages drained (some may already have been set in
    /// `out`).
    ///
    /// # Panics
    /// If `out` covers a different number of pages.
    pub fn drain_into(&self, out: &mut PageBitmap) -> u64 {
        assert_eq!(
            out.pages(),
            self.pages,
            "drain into a bitmap of another size"
        );
        let mut drained = 0;
        for (i, w) in self.words.iter().enumerate() {
            // Cheap load first: most words of a VMM bitmap are zero.
            if w.load(Ordering::Relaxed) != 0 {
                let bits = w.swap(0, Ordering::AcqRel);
                drained += u64::from(bits.count_ones());
                out.or_word(i, bits);
            }
        }
        drained
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn marks_cover_every_touched_page() {
        let b = AtomicPageBitmap::new(200, 4096);
        b.mark(4095, 2); // pages 0 and 1
        b.mark(10 * 4096, 4096); // page 10 only
        b.mark(60 * 4096, 70 * 4096); // pages 60..130
        b.mark(199 * 4096, 1 << 20); // clamped to page 199
        b.mark(5000 * 4096, 10); // past the end: ignored
        let mut out = PageBitmap::new(200);
        b.drain_into(&mut out);
        assert_eq!(
            out.runs().collect::<Vec<_>>(),
            vec![(0, 2), (10, 1), (60, 70), (199, 1)]
        );
        let mut again = PageBitmap::new(200);
        b.drain_into(&mut again);
        assert!(again.is_clear(), "drain clears");
    }

    #[test]
    fn concurrent_marks_are_never_lost() {
        let b = Arc::new(AtomicPageBitmap::new(4096, 4096));
        let mut total = PageBitmap::new(4096);
        let writers: Vec<_> = (0..2)
            .map(|t| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    for p in (t..4096).step_by(2) {
                        b.mark(p * 4096, 1);
                    }
                })
            })
            .collect();
        for _ in 0..50 {
            b.drain_into(&mut total);
        }
        for w in writers {
            w.join().unwrap();
        }
        b.drain_into(&mut total);
        assert_eq!(total.count(), 4096);
    }
}
