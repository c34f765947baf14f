//! Why `PageBitmap` keeps hand-written words instead of `bitvec`: the merged-run iterator
//! the push path walks every epoch, against the same runs built from bitvec's `iter_ones`
//! over the same words (bitvec's `BitSlice<u64, Lsb0>` has KVM's layout, so this is the
//! natural bitvec version).
//!
//! `cargo bench -p colo-memory --bench runs` prints, for a 1 GiB guest (262,144 pages) at
//! several densities, the time per walk of each and their ratio, in the same run.
//! Measured on this project's 2-core machine (2026-12-04, two runs): hand-written runs were
//! 2.1-2.3x as fast on random pages (0.1% and 5% dirty) and 130-630x as fast on bitmaps of
//! long runs (25% and 90% dirty): bitvec visits every set bit, the words cross a full word
//! in one step. So the words stay hand-written.

use std::hint::black_box;
use std::time::Instant;

use bitvec::order::Lsb0;
use bitvec::slice::BitSlice;
use colo_memory::PageBitmap;

const PAGES: u64 = 262_144;

/// A small deterministic generator (xorshift), so runs are comparable.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn bitvec_runs(words: &[u64]) -> Vec<(u64, u64)> {
    let bits = BitSlice::<u64, Lsb0>::from_slice(words);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in bits.iter_ones() {
        let p = p as u64;
        match out.last_mut() {
            Some((f, c)) if *f + *c == p => *c += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

fn time<T>(rounds: u32, mut f: impl FnMut() -> T) -> f64 {
    black_box(f());
    let t = Instant::now();
    for _ in 0..rounds {
        black_box(f());
    }
    t.elapsed().as_secs_f64() / f64::from(rounds)
}

fn main() {
    println!("merged runs of a {PAGES}-page bitmap: hand-written words vs bitvec iter_ones");
    println!(
        "{:>24} {:>12} {:>12} {:>8}",
        "bitmap", "words us", "bitvec us", "ratio"
    );
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let cases: [(&str, u64, u64); 4] = [
        ("0.1% random pages", 262, 1),
        ("5% random pages", 13_107, 1),
        ("runs of 64, 25%", 1024, 64),
        ("90% in runs of 512", 460, 512),
    ];
    for (name, count, len) in cases {
        let mut b = PageBitmap::new(PAGES);
        for _ in 0..count {
            b.set_range(next(&mut seed) % PAGES, len);
        }
        let words = b.words().to_vec();
        let expect: Vec<_> = b.runs().collect();
        assert_eq!(bitvec_runs(&words), expect, "both walks agree");
        let rounds = 200;
        let ours = time(rounds, || b.runs().collect::<Vec<_>>().len());
        let theirs = time(rounds, || bitvec_runs(&words).len());
        println!(
            "{name:>24} {:>12.1} {:>12.1} {:>7.1}x",
            ours * 1e6,
            theirs * 1e6,
            theirs / ours
        );
    }
}
