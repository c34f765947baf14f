//! Why guest memory has colo's own `DirtyBitmap` instead of vm-memory's `AtomicBitmap`:
//! draining the marks the VMM's writes left, at every dirty-page collection (each
//! background push round), for guests of several sizes with a device-like handful of
//! marked pages, against `AtomicBitmap::get_and_reset` of the same size with the same
//! marks, in the same run.
//!
//! `cargo bench -p colo-memory --bench drain` prints the time per drain of each and the
//! ratio.

use std::hint::black_box;
use std::time::Instant;

use colo_memory::{DirtyBitmap, PAGE_SIZE, PageBitmap};
use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap};

/// Pages a device writes between two collections (a few frames and their rings).
const MARKED: u64 = 16;

fn main() {
    println!("drain of the VMM's dirty marks ({MARKED} pages marked), per collection:");
    println!(
        "{:>10} {:>14} {:>18} {:>8}",
        "guest", "DirtyBitmap", "AtomicBitmap", "ratio"
    );
    for gib in [1u64, 4, 16, 64] {
        let bytes = (gib << 30) as usize;
        let pages = bytes as u64 / PAGE_SIZE;
        let ours = DirtyBitmap::with_len(bytes);
        let theirs = AtomicBitmap::with_len(bytes);
        let mut out = PageBitmap::new(pages);
        let reps = (256 / gib).max(8) as u32;
        let mark = |b: &dyn Fn(usize)| {
            for i in 0..MARKED {
                b(((i * 7919 * 64) % pages * PAGE_SIZE) as usize);
            }
        };
        let t = Instant::now();
        for _ in 0..reps {
            mark(&|o| ours.mark_dirty(o, 1));
            black_box(ours.drain_into(&mut out, 0));
        }
        let a = t.elapsed() / reps;
        let t = Instant::now();
        for _ in 0..reps {
            mark(&|o| theirs.mark_dirty(o, 1));
            let words = theirs.get_and_reset();
            out.or_words_at(0, &words);
            black_box(words);
        }
        let b = t.elapsed() / reps;
        println!(
            "{:>7} GiB {:>11.1} us {:>15.1} us {:>7.1}x",
            gib,
            a.as_secs_f64() * 1e6,
            b.as_secs_f64() * 1e6,
            b.as_secs_f64() / a.as_secs_f64()
        );
    }
}
