//! The dirty-page load: one `u64` written into 4 KiB pages of the scratch area at a steady
//! rate, so that the VMM has pages to track and copy. Which pages, and what each must hold
//! before it is written again, is the contract's [`PageSchedule`].

use colo_guest_abi::boot::{DirtyPattern, EXIT_MEMORY_LOST};
use colo_guest_abi::dirty::PageSchedule;

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
    /// Pages due since `start` that were written or dropped (the timetable's position).
    done: u64,
    /// Which page next.
    schedule: PageSchedule,
    clock: Clock,
}

/// Stops the VM with [`EXIT_MEMORY_LOST`], saying which page (vCPU 0 only: it owns the
/// console).
pub fn memory_lost(l: Lost) -> ! {
    crate::fatal!(
        EXIT_MEMORY_LOST,
        "memory lost: dirty-load page {:#x} holds {} where the load last wrote {}",
        l.gpa,
        l.found,
        l.wrote
    )
}

/// A page of the load that did not hold what the load last wrote there: memory was lost.
#[derive(Clone, Copy, Debug)]
pub struct Lost {
    /// The page's guest-physical address.
    pub gpa: u64,
    /// What it held.
    pub found: u64,
    /// What the load wrote there last.
    pub wrote: u64,
}

impl DirtyLoad {
    /// Writes `rate` pages per second into `[base, base + len)` in `pattern`, which must
    /// be page-aligned RAM that nothing else uses (`seed`: one per vCPU). `None` if `rate`
    /// or the area is zero.
    pub fn new(
        base: u64,
        len: u64,
        rate: u64,
        pattern: DirtyPattern,
        seed: u64,
        clock: Clock,
    ) -> Option<Self> {
        let pages = len / PAGE;
        (rate > 0 && pages > 0).then(|| Self {
            base,
            pages,
            rate,
            start: rdtsc(),
            done: 0,
            schedule: PageSchedule::new(pattern, pages, seed),
            clock,
        })
    }

    /// Writes the pages that are due, at most [`BATCH`]. Returns the microseconds until
    /// the next one is due.
    ///
    /// # Errors
    /// [`Lost`] if a page did not hold what the load last wrote there.
    pub fn run(&mut self) -> Result<u64, Lost> {
        self.run_at_most(BATCH)
    }

    /// Writes at most `max` of the pages that are due: the service calls this between
    /// requests, so that neither starves the other.
    ///
    /// # Errors
    /// [`Lost`] if a page did not hold what the load last wrote there.
    pub fn run_at_most(&mut self, max: u64) -> Result<u64, Lost> {
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
            let w = self.schedule.next_write();
            let at = self.base + w.page.min(self.pages - 1) * PAGE;
            let p = core::ptr::with_exposed_provenance_mut::<u64>(at as usize);
            if let Some(wrote) = w.expect {
                // SAFETY: as for the write below.
                let found = unsafe { p.read_volatile() };
                if found != wrote {
                    return Err(Lost {
                        gpa: at,
                        found,
                        wrote,
                    });
                }
            }
            // SAFETY: `at` is a page inside the scratch area (the schedule's pages are
            // below `pages`, and clamped), identity-mapped RAM that the command line gives
            // to this load alone (checked against the image and the RAM size at boot); the
            // address is 8-byte aligned.
            unsafe { p.write_volatile(w.value) };
            self.done += 1;
        }
        // When the next page (the `done + 1`-th) falls due, in ticks since start, rounded
        // up. (It used to be the time the `done`-th fell due, which has always passed: the
        // wait was always 0 and the guest never idled while its load ran.)
        let next_due = (u128::from(self.done + 1) * u128::from(self.clock.hz()))
            .div_ceil(u128::from(self.rate));
        let wait = (next_due as u64).saturating_sub(rdtsc().wrapping_sub(self.start));
        Ok(self.clock.ticks_to_micros(wait))
    }
}
