//! The worker of every vCPU but the first: it writes its share of the dirty load into its
//! own slice of the scratch area ([`BootParams::dirty_share`]), at the same pace as vCPU
//! 0's ([`DirtyLoad`]), and counts the turns of its loop in [`TURNS`], which the service
//! reports (`VCPUS`). The counters live in guest memory, so a checkpoint carries them with
//! the worker's registers: a VM restored from it counts on from there.
//!
//! A worker shares nothing with vCPU 0 but its counter: it never allocates, prints or
//! panics (the heap and the console are vCPU 0's alone), and stops its VM through the exit
//! port directly if its boot parameters are wrong.

use core::sync::atomic::{AtomicU64, Ordering};

use colo_guest_abi::boot::{BOOT_MAGIC, BOOT_PARAMS_GPA, BOOT_VERSION, BootParams, MAX_VCPUS};

use crate::arch::{self, Clock};
use crate::dirty::DirtyLoad;
use crate::rt::EXIT_BAD_BOOT;

/// Turns of each worker's loop, by vCPU index (index 0, the service's vCPU, stays 0).
pub static TURNS: [AtomicU64; MAX_VCPUS as usize] =
    [const { AtomicU64::new(0) }; MAX_VCPUS as usize];

/// Shortest wait between turns: the pages due meanwhile are written together, so a
/// worker makes at most about a thousand idle exits a second whatever its rate.
const MIN_WAIT_US: u64 = 1_000;
/// Longest wait between turns (and the wait of a worker with no pages to write).
const MAX_WAIT_US: u64 = 10_000;

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

/// Called by `_start` on vCPU `index` (1 and up) with the boot parameters' address.
pub extern "C" fn worker_main(params: *const BootParams, index: u64) -> ! {
    if params as u64 != BOOT_PARAMS_GPA {
        stop(EXIT_BAD_BOOT);
    }
    // SAFETY: as in `boot_params` (main.rs): the VMM wrote the parameters at this
    // identity-mapped, aligned address before any vCPU ran, and nothing writes them after;
    // any bytes are a valid BootParams.
    let b = unsafe { params.read_volatile() };
    let Some(turns) = TURNS.get(index as usize) else {
        stop(EXIT_BAD_BOOT)
    };
    if b.magic != BOOT_MAGIC
        || b.version != BOOT_VERSION
        || b.tsc_khz == 0
        || index >= u64::from(b.vcpus)
    {
        stop(EXIT_BAD_BOOT);
    }
    let share = b.dirty_share(index as u32);
    let end = share.gpa.checked_add(share.len);
    if share.pages_per_sec > 0
        && (share.gpa < crate::rt::image_end() || end.is_none_or(|e| e > b.ram_size))
    {
        stop(EXIT_BAD_BOOT);
    }
    let clock = Clock::new(b.tsc_khz);
    let mut load = DirtyLoad::new(share.gpa, share.len, share.pages_per_sec, clock);
    loop {
        let wait = load.as_mut().map_or(MAX_WAIT_US, DirtyLoad::run);
        turns.fetch_add(1, Ordering::Relaxed);
        if wait > 0 {
            arch::idle(wait.clamp(MIN_WAIT_US, MAX_WAIT_US) as u32);
        }
    }
}
