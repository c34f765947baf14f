//! The dirty-page load: one `u64` written into successive 4 KiB pages of the scratch area
//! at a steady rate, wrapping around, so that the VMM has pages to track and copy.

use crate::arch::{Clock, rdtsc};

const PAGE: u64 = 4096;
/// Most pages written in one main-loop turn (the first touch of a page can cost 15 us
/// here, so this bounds a turn to a few milliseconds).
const BATCH: u64 = 256;

/// The load generator.
#[derive(Debug)]
pub struct DirtyLoad {
    base: u64,
    pages: u64,
    rate: u64,
    start: u64,
    /// Pages written since `start` (the schedule's position).
    done: u64,
    /// Next page to write.
    next: u64,
    clock: Clock,
}

impl DirtyLoad {
    /// Writes `rate` pages per second into `[base, base + len)`, which must be
    /// page-aligned RAM that nothing else uses. `None` if `rate` or the area is zero.
    pub fn new(base: u64, len: u64, rate: u64, clock: Clock) -> Option<Self> {
        let pages = len / PAGE;
        (rate > 0 && pages > 0).then(|| Self {
            base,
            pages,
            rate,
            start: rdtsc(),
            done: 0,
            next: 0,
            clock,
        })
    }

    /// Writes the pages that are due, at most [`BATCH`]. Returns the microseconds until
    /// the next one is due.
    pub fn run(&mut self) -> u64 {
        self.run_at_most(BATCH)
    }

    /// Writes at most `max` of the pages that are due: the service calls this between
    /// requests, so that neither starves the other.
    pub fn run_at_most(&mut self, max: u64) -> u64 {
        let elapsed = rdtsc().wrapping_sub(self.start);
        let due =
            (u128::from(elapsed) * u128::from(self.rate) / u128::from(self.clock.hz())) as u64;
        let mut behind = due.saturating_sub(self.done);
        if behind > BATCH.max(self.rate / 10) {
            // More than 100 ms behind: drop the backlog rather than starve the network.
            self.done = due - BATCH;
            behind = BATCH;
        }
        for _ in 0..behind.min(max) {
            let at = self.base + self.next * PAGE;
            let p = core::ptr::with_exposed_provenance_mut::<u64>(at as usize);
            // SAFETY: `at` is a page inside the scratch area, identity-mapped RAM that the
            // command line gives to this load alone (checked against the image and the
            // RAM size at boot); the address is 8-byte aligned.
            unsafe { p.write_volatile(self.done) };
            self.done += 1;
            self.next = (self.next + 1) % self.pages;
        }
        // When the next page (the `done + 1`-th) falls due, in ticks since start, rounded
        // up. (It used to be the time the `done`-th fell due, which has always passed: the
        // wait was always 0 and the guest never idled while its load ran.)
        let next_due = (u128::from(self.done + 1) * u128::from(self.clock.hz()))
            .div_ceil(u128::from(self.rate));
        let wait = (next_due as u64).saturating_sub(rdtsc().wrapping_sub(self.start));
        self.clock.ticks_to_micros(wait)
    }
}
