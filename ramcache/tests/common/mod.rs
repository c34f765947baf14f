//! Shared helpers: a two-region guest, page patterns and SVM snapshots.

#![allow(dead_code)]

use std::sync::Arc;

use colo_memory::Region;
use colo_memory::{GuestLayout, GuestRegion};
use colo_ramcache::RamCache;

pub const PAGE: u64 = 4096;
/// Region 0: 40 pages at 0; region 1: 30 pages at 1 MiB. 70 pages in all, so the last
/// bitmap word is partial.
pub const REGIONS: [(u64, u64); 2] = [(0, 40), (0x10_0000, 30)];
pub const PAGES: u64 = 70;

pub fn layout() -> GuestLayout {
    GuestLayout::new(
        PAGE,
        REGIONS
            .iter()
            .enumerate()
            .map(|(i, &(gpa, pages))| GuestRegion {
                slot: i as u32,
                gpa,
                len: pages * PAGE,
            })
            .collect(),
    )
    .unwrap()
}

/// A cache over fresh (zeroed) SVM memory.
pub fn cache() -> (RamCache, Vec<Arc<Region>>) {
    let svm: Vec<Arc<Region>> = REGIONS
        .iter()
        .map(|&(_, pages)| Arc::new(Region::anonymous((pages * PAGE) as usize).unwrap()))
        .collect();
    (RamCache::new(layout(), svm.clone()).unwrap(), svm)
}

/// Region index and byte offset of flat page `p`.
pub fn locate(p: u64) -> (usize, u64) {
    if p < REGIONS[0].1 {
        (0, p * PAGE)
    } else {
        (1, (p - REGIONS[0].1) * PAGE)
    }
}

/// A page's contents derived from a tag and its number, so every page differs.
pub fn page_bytes(tag: u8, p: u64) -> Vec<u8> {
    (0..PAGE)
        .map(|i| tag ^ (p as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

/// Writes flat page `p` of SVM memory.
pub fn svm_write(svm: &[Arc<Region>], p: u64, bytes: &[u8]) {
    let (r, off) = locate(p);
    svm[r].write_at(off, bytes).unwrap();
}

/// Every SVM page, in flat order.
pub fn svm_snapshot(svm: &[Arc<Region>]) -> Vec<Vec<u8>> {
    (0..PAGES)
        .map(|p| {
            let (r, off) = locate(p);
            let mut b = vec![0u8; PAGE as usize];
            svm[r].read_at(off, &mut b).unwrap();
            b
        })
        .collect()
}
