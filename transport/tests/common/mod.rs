//! Running the other side of a test in a second process: the test binary re-executes
//! itself, running only one `#[ignore]`d entry test, with the role in an environment
//! variable.

#![allow(dead_code)]

/// A deterministic byte pattern for page `page` of epoch `epoch`.
pub fn pattern(epoch: u64, page: u64, out: &mut [u8]) {
    let mut x =
        epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ page.wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// The pages written in `epoch` of the two-process tests: a sparse, deterministic set.
pub fn epoch_pages(epoch: u64, pages: u64) -> Vec<u64> {
    (0..pages)
        .filter(|p| (p * 7 + epoch * 3) % 5 == 0 || (*p == pages - 1))
        .collect()
}

/// The bitmap of `list` for a region of `pages` pages.
pub fn bitmap_of(list: &[u64], pages: u64) -> colo_memory::PageBitmap {
    let mut b = colo_memory::PageBitmap::new(pages);
    for &p in list {
        b.set(p);
    }
    b
}
