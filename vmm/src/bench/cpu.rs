//! CPU time of this process (every thread, user and system), for the CPU per GiB of
//! `colo bench transport`. On loopback the kernel's TCP work on both ends is charged to
//! the sending and receiving processes, so the sum of both sides' figures is the whole
//! cost of moving the bytes.

use std::ops::Sub;

/// CPU seconds this process has used so far, or a difference of two such readings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cpu {
    /// Seconds in user mode.
    pub user: f64,
    /// Seconds in the kernel.
    pub sys: f64,
}

impl Cpu {
    /// What this process (all its threads) has used since it started.
    pub fn now() -> Self {
        // SAFETY: `rusage` is plain old data, for which all zero bytes are a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid, writable rusage; RUSAGE_SELF needs nothing else.
        // getrusage cannot fail with these arguments; a failure leaves zeros.
        let _ = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        Self {
            user: secs(ru.ru_utime),
            sys: secs(ru.ru_stime),
        }
    }

    /// User plus system seconds.
    pub fn total(self) -> f64 {
        self.user + self.sys
    }

    /// The reading as whole microseconds of user and system time, for a reply line.
    pub fn to_micros(self) -> (u64, u64) {
        let us = |s: f64| (s.max(0.0) * 1e6).round() as u64;
        (us(self.user), us(self.sys))
    }

    /// A reading from whole microseconds of user and system time.
    pub fn from_micros(user: u64, sys: u64) -> Self {
        Self {
            user: user as f64 * 1e-6,
            sys: sys as f64 * 1e-6,
        }
    }
}

impl Sub for Cpu {
    type Output = Cpu;

    fn sub(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user - earlier.user,
            sys: self.sys - earlier.sys,
        }
    }
}

impl std::ops::Add for Cpu {
    type Output = Cpu;

    fn add(self, other: Cpu) -> Cpu {
        Cpu {
            user: self.user + other.user,
            sys: self.sys + other.sys,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_loop_shows_up_as_cpu() {
        let before = Cpu::now();
        let mut x = 1u64;
        let t = std::time::Instant::now();
        while t.elapsed().as_millis() < 30 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        let used = Cpu::now() - before;
        assert!(used.total() > 0.0, "{used:?}");
        assert!(used.user >= 0.0 && used.sys >= 0.0);
    }

    #[test]
    fn micros_round_trip() {
        let c = Cpu::from_micros(1_500_000, 250);
        assert_eq!(c.to_micros(), (1_500_000, 250));
        assert!((c.total() - 1.50025).abs() < 1e-9);
    }
}
