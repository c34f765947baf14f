//! Page-level helpers of the benchmark: random contents, random page choice, bitmaps and
//! the runs they give, and a checksum over the pages a bitmap names.
//!
//! Regions are read and written through raw pointers only (as the transport does), never
//! through Rust references.

use colo_memory::Region;
use colo_transport::push::WriteRun;

/// Page size of the benchmark's epoch bitmaps.
pub const PAGE_SIZE: u32 = 4096;

const PAGE: u64 = PAGE_SIZE as u64;
const WORDS_PER_PAGE: usize = PAGE_SIZE as usize / 8;

/// The splitmix64 generator: small, fast, and good enough for benchmark data.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The splitmix64 finalizer: every input bit affects every output bit.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills the whole region with random bytes from `seed`.
pub fn fill_random(region: &Region, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let base = region.as_ptr().cast::<u64>();
    for i in 0..region.len() / 8 {
        // SAFETY: i * 8 + 8 <= len, so the word lies inside the region's mapping, which is
        // page-aligned (so the word is aligned). Nothing else accesses the region now.
        unsafe { base.add(i).write(rng.next_u64()) };
    }
}

/// Sets every byte of the region to `byte`.
pub fn fill_byte(region: &Region, byte: u8) {
    // SAFETY: the span is exactly the region's mapping.
    unsafe { region.as_ptr().write_bytes(byte, region.len()) };
}

/// Words of a bitmap over `pages` pages.
pub fn bitmap_words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// A bitmap of `count` distinct pages out of `pages`, chosen at random.
///
/// # Panics
/// If `count > pages` (the arguments are checked before).
pub fn random_bitmap(rng: &mut SplitMix64, pages: u64, count: u64) -> Vec<u64> {
    assert!(count <= pages, "{count} pages asked of {pages}");
    let mut bitmap = vec![0u64; bitmap_words(pages)];
    let mut chosen = 0;
    while chosen < count {
        let p = rng.below(pages);
        let (w, b) = ((p / 64) as usize, p % 64);
        if bitmap[w] & (1 << b) == 0 {
            bitmap[w] |= 1 << b;
            chosen += 1;
        }
    }
    bitmap
}

/// A bitmap with every one of `pages` pages set.
pub fn full_bitmap(pages: u64) -> Vec<u64> {
    let mut bitmap = vec![u64::MAX; bitmap_words(pages)];
    let tail = pages % 64;
    if tail != 0 {
        if let Some(last) = bitmap.last_mut() {
            *last = (1 << tail) - 1;
        }
    }
    bitmap
}

/// The set pages of a bitmap, in ascending order.
pub fn set_pages(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(wi, &w)| {
        let mut bits = w;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let b = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            Some(wi as u64 * 64 + b)
        })
    })
}

/// Pages set in a bitmap.
pub fn count_pages(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// The runs of adjacent set pages, each at the same offset on both sides.
pub fn runs_from_bitmap(bitmap: &[u64]) -> Vec<WriteRun> {
    let mut runs = Vec::new();
    let mut cur: Option<(u64, u64)> = None;
    for p in set_pages(bitmap) {
        cur = match cur {
            Some((first, n)) if first + n == p => Some((first, n + 1)),
            Some((first, n)) => {
                runs.push(WriteRun::pages(first, n, PAGE_SIZE));
                Some((p, 1))
            }
            None => Some((p, 1)),
        };
    }
    if let Some((first, n)) = cur {
        runs.push(WriteRun::pages(first, n, PAGE_SIZE));
    }
    runs
}

/// A checksum of exactly the pages set in `bitmap`, each mixed with its page number, so
/// that a page landing at the wrong place changes the sum.
///
/// # Errors
/// [`colo_transport::Error::Memory`] (out of bounds) if the bitmap names a page past the region.
pub fn checksum(region: &Region, bitmap: &[u64]) -> colo_transport::Result<u64> {
    let mut sum = 0u64;
    for p in set_pages(bitmap) {
        let ptr = region.ptr_at(p * PAGE, PAGE)?.cast::<u64>().cast_const();
        // SAFETY: ptr_at checked that the page lies inside the region; the region is
        // page-aligned, so the words are aligned. The sender's source is not written during
        // the bench, and the receiver's pages are not written between a commit and its
        // release, when this runs.
        sum = sum.wrapping_add(unsafe { page_hash(ptr, p) });
    }
    Ok(sum)
}

/// Hashes one page in four independent lanes (so the loop is not one long dependency
/// chain) and finishes with an avalanche mix.
///
/// # Safety
/// `ptr` must be valid for reads of one page and aligned to 8 bytes.
unsafe fn page_hash(ptr: *const u64, page: u64) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut lanes = [page ^ K, page.rotate_left(17), !page, page.wrapping_mul(K)];
    for i in (0..WORDS_PER_PAGE).step_by(4) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            // SAFETY: i + l < WORDS_PER_PAGE, inside the page the caller vouched for.
            let w = unsafe { ptr.add(i + l).read() };
            *lane = (*lane ^ w).wrapping_mul(K).rotate_left(29);
        }
    }
    mix64(lanes[0] ^ lanes[1].rotate_left(16) ^ lanes[2].rotate_left(32) ^ lanes[3].rotate_left(48))
}

/// Overwrites the pages set in `bitmap` with `byte`, so that the next epoch's check cannot
/// pass on data an earlier one left behind.
///
/// # Errors
/// [`colo_transport::Error::Memory`] (out of bounds) if the bitmap names a page past the region.
pub fn scribble(region: &Region, bitmap: &[u64], byte: u8) -> colo_transport::Result<()> {
    for p in set_pages(bitmap) {
        let ptr = region.ptr_at(p * PAGE, PAGE)?;
        // SAFETY: ptr_at checked that the page lies inside the region.
        unsafe { ptr.write_bytes(byte, PAGE_SIZE as usize) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bitmap_has_exactly_count_distinct_pages() {
        let mut rng = SplitMix64::new(7);
        for (pages, count) in [(100, 0), (100, 37), (130, 130), (4096, 1000)] {
            let b = random_bitmap(&mut rng, pages, count);
            assert_eq!(b.len(), bitmap_words(pages));
            assert_eq!(count_pages(&b), count);
            assert!(set_pages(&b).all(|p| p < pages));
        }
    }

    #[test]
    fn runs_merge_adjacent_pages() {
        let mut b = vec![0u64; 2];
        for p in [0, 1, 2, 5, 63, 64, 65, 127] {
            b[p / 64] |= 1 << (p % 64);
        }
        let runs = runs_from_bitmap(&b);
        let got: Vec<(u64, u64)> = runs.iter().map(|r| (r.src / PAGE, r.len / PAGE)).collect();
        assert_eq!(got, vec![(0, 3), (5, 1), (63, 3), (127, 1)]);
        assert!(runs.iter().all(|r| r.src == r.dst));
    }

    #[test]
    fn full_bitmap_masks_the_tail() {
        assert_eq!(full_bitmap(64), vec![u64::MAX]);
        assert_eq!(full_bitmap(66), vec![u64::MAX, 0b11]);
        assert_eq!(count_pages(&full_bitmap(1000)), 1000);
        assert_eq!(runs_from_bitmap(&full_bitmap(1000)).len(), 1);
    }

    #[test]
    fn checksum_sees_contents_and_placement() {
        let a = Region::anonymous(8 * 4096).unwrap();
        let b = Region::anonymous(8 * 4096).unwrap();
        fill_random(&a, 1);
        let bitmap = vec![0b1010_0110u64];
        b.copy_from(0, &a, 0, 8 * 4096).unwrap();
        assert_eq!(
            checksum(&a, &bitmap).unwrap(),
            checksum(&b, &bitmap).unwrap()
        );
        // One flipped byte in a checked page changes the sum.
        b.write_at(5 * 4096 + 77, &[!0]).unwrap();
        assert_ne!(
            checksum(&a, &bitmap).unwrap(),
            checksum(&b, &bitmap).unwrap()
        );
        // Two pages swapped change it too.
        b.copy_from(0, &a, 0, 8 * 4096).unwrap();
        b.copy_from(4096, &a, 2 * 4096, 4096).unwrap();
        b.copy_from(2 * 4096, &a, 4096, 4096).unwrap();
        assert_ne!(
            checksum(&a, &bitmap).unwrap(),
            checksum(&b, &bitmap).unwrap()
        );
        // Pages outside the bitmap do not count; scribbling checked ones does.
        b.copy_from(0, &a, 0, 8 * 4096).unwrap();
        b.write_at(0, &[1, 2, 3]).unwrap();
        assert_eq!(
            checksum(&a, &bitmap).unwrap(),
            checksum(&b, &bitmap).unwrap()
        );
        scribble(&b, &bitmap, 0xA5).unwrap();
        assert_ne!(
            checksum(&a, &bitmap).unwrap(),
            checksum(&b, &bitmap).unwrap()
        );
        assert!(checksum(&a, &[1 << 8]).is_err());
    }
}
