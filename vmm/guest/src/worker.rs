//! The worker of every vCPU but the first: it writes its share of the dirty load into its
//! own slice of the scratch area (`colo_guest_abi::boot::dirty_share`), at the same pace as vCPU
//! 0's ([`DirtyLoad`]), and counts the turns of its loop in [`TURNS`], which the service
//! reports (`VCPUS`). The counters live in guest memory, so a checkpoint carries them with
//! the worker's registers: a VM restored from it counts on from there.
//!
//! A worker shares nothing with vCPU 0 but its counter: it never allocates, prints or
//! panics (the heap and the console are vCPU 0's alone), and stops its VM through the exit
//! port directly if its start info or command line is wrong.

use core::sync::atomic::{AtomicU64, Ordering};

use colo_guest_abi::boot::MAX_VCPUS;

use crate::arch::{self, Clock};
use crate::dirty::DirtyLoad;
use crate::rt::EXIT_BAD_BOOT;

/// Turns of each worker's loop, by vCPU index (index 0, the service's vCPU, stays 0).
pub static TURNS: [AtomicU64; MAX_VCPUS as usize] =
    [const { AtomicU64::new(0) }; MAX_VCPUS as usize];

/// Shortest wait between turns: the pages due meanwhile are written together, so a
/// worker makes at most about a thousand idle exits a second whatever its rate.
const MIN_WAIT_US: u64 = 1_000;
/// Longest wait between turns of a worker with pages to write.
const MAX_WAIT_US: u64 = 10_000;
/// The wait of a worker with no pages to write (the VMM's longest idle wait): it only
/// counts, so it need not wake the host often.
const IDLE_WAIT_US: u32 = 50_000;

/// The counters of workers 1 to `vcpus - 1`.
pub fn turns(vcpus: u32) -> impl Iterator<Item = u64> {
    TURNS
        .iter()
        .take(vcpus.min(MAX_VCPUS) as usize)
        .skip(1)
        .map(|t| t.load(Ordering::Relaxed))
}

/// Stops the VM without the console (vCPU 0's).
fn stop(status: u32) -> ! {
    loop {
        arch::out32(colo_guest_abi::boot::PORT_EXIT, status);
        core::hint::spin_loop();
    }
}

/// Entered at CPL3 on vCPU `index` (1 and up; entry.rs) with the PVH start info's
/// address.
pub extern "C" fn worker_main(start_info: u64, index: u64) -> ! {
    let Ok(b) = crate::pvh::read_boot(start_info) else {
        stop(EXIT_BAD_BOOT)
    };
    let Some(turns) = TURNS.get(index as usize) else {
        stop(EXIT_BAD_BOOT)
    };
    if index >= u64::from(b.params.vcpus) {
        stop(EXIT_BAD_BOOT);
    }
    let clock = Clock::new(b.params.tsc_khz);
    let Ok(mut load) = crate::dirty_load(&b, index as u32, clock) else {
        stop(EXIT_BAD_BOOT)
    };
    loop {
        turns.fetch_add(1, Ordering::Relaxed);
        match load.as_mut().map(DirtyLoad::run) {
            None => arch::idle(IDLE_WAIT_US),
            Some(Ok(0)) => {}
            Some(Ok(wait)) => arch::idle(wait.clamp(MIN_WAIT_US, MAX_WAIT_US) as u32),
            // Without the console (vCPU 0's): the status alone says it.
            Some(Err(_)) => stop(colo_guest_abi::boot::EXIT_MEMORY_LOST),
        }
    }
}
