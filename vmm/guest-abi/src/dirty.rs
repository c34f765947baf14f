//! Which page the built-in guest's dirty load writes next, for each
//! [`DirtyPattern`], and what that page must hold before the write.
//!
//! It lives in the contract crate, not in the guest, so that the host tests it: the guest
//! runs it on every vCPU that has a share of the load.
//!
//! Write number `seq` (from 0) stores `seq + 1` in its page. The patterns that revisit
//! their pages in a fixed order (sweep and hot) know what each page held before: the value
//! of the write one cycle earlier. The guest checks it before every write, so a checkpoint
//! that missed a page, or a restore that brought an old one back, stops the guest with
//! [`crate::boot::EXIT_MEMORY_LOST`] within one cycle.

use crate::boot::{DirtyPattern, HOT_SET_PAGES};

/// A prime above any page count of a slice (2^31 - 1): multiplying page numbers by it
/// modulo the page count is a bijection, which scatters a set of consecutive ranks over
/// the whole slice.
const SCATTER: u64 = 0x7fff_ffff;
/// Most draws of a Zipf rank before falling back to a uniform one.
const ZIPF_TRIES: u32 = 16;

/// One write of the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageWrite {
    /// The page, counted from the start of the slice.
    pub page: u64,
    /// What to store in the page's first 8 bytes.
    pub value: u64,
    /// What those bytes must hold before, if the pattern knows.
    pub expect: Option<u64>,
}

/// The sequence of pages a load writes in a slice of `pages` pages.
#[derive(Clone, Debug)]
pub struct PageSchedule {
    pattern: DirtyPattern,
    pages: u64,
    /// Pages one cycle of a cyclic pattern visits (the slice, or the hot set).
    cycle: u64,
    /// `log2(pages + 1)` rounded up: the span of the Zipf draw's exponent.
    zipf_bits: u32,
    rng: u64,
    /// Writes made so far.
    seq: u64,
}

impl PageSchedule {
    /// The schedule of `pattern` over `pages` pages (at least 1), its random draws seeded
    /// by `seed` (each vCPU its own).
    pub fn new(pattern: DirtyPattern, pages: u64, seed: u64) -> Self {
        let pages = pages.clamp(1, SCATTER - 1);
        let cycle = match pattern {
            DirtyPattern::Sweep | DirtyPattern::Zipf => pages,
            DirtyPattern::Hot => pages.min(HOT_SET_PAGES),
        };
        Self {
            pattern,
            pages,
            cycle,
            zipf_bits: u64::BITS - pages.leading_zeros(),
            rng: seed,
            seq: 0,
        }
    }

    /// Writes made so far.
    pub fn writes(&self) -> u64 {
        self.seq
    }

    /// The next write.
    pub fn next_write(&mut self) -> PageWrite {
        let seq = self.seq;
        self.seq += 1;
        let value = seq + 1;
        match self.pattern {
            DirtyPattern::Sweep => PageWrite {
                page: seq % self.cycle,
                value,
                expect: self.cyclic_expect(seq),
            },
            DirtyPattern::Hot => PageWrite {
                page: self.scatter(seq % self.cycle),
                value,
                expect: self.cyclic_expect(seq),
            },
            DirtyPattern::Zipf => {
                let rank = self.zipf_rank();
                PageWrite {
                    page: self.scatter(rank - 1),
                    value,
                    expect: None,
                }
            }
        }
    }

    /// The value a cyclic pattern's write `seq` finds: that of the write one cycle before
    /// (none in the first cycle, where the page may hold anything).
    fn cyclic_expect(&self, seq: u64) -> Option<u64> {
        (seq >= self.cycle).then(|| seq + 1 - self.cycle)
    }

    /// Rank `i` (from 0) placed in the slice.
    fn scatter(&self, i: u64) -> u64 {
        i * SCATTER % self.pages
    }

    /// splitmix64.
    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A rank in `1..=pages` with probability about proportional to 1/rank: `2^u` for `u`
    /// uniform in `[0, zipf_bits)` is log-uniform (density 1/x), and the draws above
    /// `pages` are drawn again.
    fn zipf_rank(&mut self) -> u64 {
        for _ in 0..ZIPF_TRIES {
            let u = (self.random() >> 11) as f64 / (1u64 << 53) as f64 * f64::from(self.zipf_bits);
            let rank = exp2(u) as u64;
            if (1..=self.pages).contains(&rank) {
                return rank;
            }
        }
        1 + self.random() % self.pages
    }
}

/// `2^x` for `0 <= x < 64`, to about 1e-5 relative (no libm in the guest): the integer part
/// as a shift, the fraction by a polynomial.
fn exp2(x: f64) -> f64 {
    let i = x as u32;
    let f = x - f64::from(i);
    let p = 1.0
        + f * (core::f64::consts::LN_2
            + f * (0.240_226_51 + f * (0.055_504_11 + f * (0.009_618_13 + f * 0.001_333_36))));
    (1u64 << i.min(63)) as f64 * p
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::HashSet;
    use std::vec;

    use super::*;

    #[test]
    fn exp2_is_close() {
        for k in 0..640 {
            let x = f64::from(k) / 10.0;
            let want = std::primitive::f64::powf(2.0, x);
            assert!(((exp2(x) - want) / want).abs() < 1e-4, "2^{x}");
        }
    }

    #[test]
    fn a_sweep_visits_every_page_in_order_and_knows_the_last_value() {
        let mut s = PageSchedule::new(DirtyPattern::Sweep, 5, 1);
        let w: std::vec::Vec<_> = (0..7).map(|_| s.next_write()).collect();
        assert_eq!(
            w.iter().map(|w| w.page).collect::<std::vec::Vec<_>>(),
            [0, 1, 2, 3, 4, 0, 1]
        );
        assert_eq!(w[4].expect, None);
        // Write 5 (value 6) finds write 0's value, 1.
        assert_eq!((w[5].value, w[5].expect), (6, Some(1)));
        assert_eq!(w[6].expect, Some(2));
    }

    #[test]
    fn the_hot_set_is_fixed_scattered_and_revisited() {
        let pages = 61_440;
        let mut s = PageSchedule::new(DirtyPattern::Hot, pages, 1);
        let first: std::vec::Vec<_> = (0..HOT_SET_PAGES).map(|_| s.next_write()).collect();
        let set: HashSet<u64> = first.iter().map(|w| w.page).collect();
        assert_eq!(set.len() as u64, HOT_SET_PAGES, "distinct pages");
        assert!(set.iter().all(|&p| p < pages));
        assert!(
            set.iter().any(|&p| p > pages / 2),
            "spread over the slice, not packed at its start"
        );
        for (i, was) in first.iter().enumerate() {
            let again = s.next_write();
            assert_eq!(again.page, was.page);
            assert_eq!(
                again.expect,
                Some(was.value),
                "write {i} of the second cycle"
            );
        }
        // A slice smaller than the hot set is all hot.
        let mut small = PageSchedule::new(DirtyPattern::Hot, 3, 1);
        let pages: HashSet<u64> = (0..9).map(|_| small.next_write().page).collect();
        assert_eq!(pages.len(), 3);
    }

    #[test]
    fn zipf_ranks_fall_off_as_one_over_rank() {
        let pages = 61_440;
        let mut s = PageSchedule::new(DirtyPattern::Zipf, pages, 7);
        let mut count = vec![0u64; pages as usize];
        let n = 400_000;
        for _ in 0..n {
            let w = s.next_write();
            assert!(w.page < pages);
            assert_eq!(w.expect, None);
            count[w.page as usize] += 1;
        }
        // Rank 1 is page 0, rank 2 page SCATTER % pages, ...: P(rank r) is about
        // 1 / (r ln(pages)) over a continuous log-uniform draw; the top ranks by count.
        let mut sorted = count.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let top: u64 = sorted[..64].iter().sum();
        let expect_top = (64f64).ln() / (pages as f64).ln();
        let got_top = top as f64 / f64::from(n);
        assert!(
            (got_top - expect_top).abs() < 0.05,
            "share of the 64 hottest pages: {got_top:.3}, expected about {expect_top:.3}"
        );
        // Ranks 2^k..2^(k+1) get about equal shares.
        let page_of = |r: u64| (r - 1) * SCATTER % pages;
        let octave = |k: u32| -> u64 {
            ((1u64 << k)..(1u64 << (k + 1)))
                .map(|r| count[page_of(r) as usize])
                .sum()
        };
        let (a, b) = (octave(4) as f64, octave(12) as f64);
        assert!((a / b - 1.0).abs() < 0.1, "octaves 4 and 12: {a} vs {b}");
        // Most pages are seldom written, and a good part never in this many writes.
        let untouched = count.iter().filter(|&&c| c == 0).count();
        assert!(untouched > 0 && untouched < pages as usize);
    }
}
