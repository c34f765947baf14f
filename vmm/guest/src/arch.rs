//! The few machine instructions the guest needs: port output (every `out` exits to the
//! VMM, see colo_guest_abi::boot) and the time stamp counter.

use core::arch::asm;

use colo_guest_abi::boot::{PORT_EXIT, PORT_IDLE, PORT_SLEEP_CONTROL, SLEEP_S5};

/// Writes `value` to I/O port `port` with `out dx, eax`.
///
/// The VMM handles the exit before the guest continues. The asm is not marked `nomem`, so
/// every memory write before the call (the console buffer, for example) is done before the
/// VMM looks at guest memory.
pub fn out32(port: u16, value: u32) {
    // SAFETY: `out` to the VMM's ports only causes a VM exit; the instruction touches no
    // guest memory and no stack, and leaves the flags alone.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    }
}

/// Reads the time stamp counter (not trapped at CPL3, about 27 cycles).
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` only reads the counter; the VMM leaves CR4.TSD clear so it works at
    // CPL3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Asks the VMM to wait for at most `us` microseconds, or until a device has work.
pub fn idle(us: u32) {
    out32(PORT_IDLE, us);
}

/// Stops the VM with exit status `status` (0: success).
pub fn exit(status: u32) -> ! {
    crate::console::flush();
    loop {
        out32(PORT_EXIT, status);
        core::hint::spin_loop();
    }
}

/// Powers the machine off through its ACPI sleep control register (S5), as Linux's
/// `poweroff` does.
pub fn power_off() -> ! {
    crate::console::flush();
    loop {
        // SAFETY: as in `out32`; the TSS allows this one port (a byte write).
        unsafe {
            asm!("out dx, al", in("dx") PORT_SLEEP_CONTROL, in("al") SLEEP_S5,
                 options(nostack, preserves_flags));
        }
        core::hint::spin_loop();
    }
}

/// Converts TSC ticks to time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: u64,
    khz: u64,
}

impl Clock {
    /// A clock that counts from now, for a TSC running at `khz` kHz (non-zero).
    pub fn new(khz: u64) -> Self {
        Self {
            start: rdtsc(),
            khz: khz.max(1),
        }
    }

    /// TSC ticks per second.
    pub fn hz(&self) -> u64 {
        self.khz * 1000
    }

    /// Microseconds since the clock started.
    pub fn micros(&self) -> u64 {
        self.ticks_to_micros(rdtsc().wrapping_sub(self.start))
    }

    /// `ticks` as whole microseconds.
    pub fn ticks_to_micros(&self, ticks: u64) -> u64 {
        (u128::from(ticks) * 1000 / u128::from(self.khz)) as u64
    }

    /// The current time for smoltcp.
    pub fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.micros() as i64)
    }
}
