//! Scheduling of the vCPU threads: the kernel's default time slice and a configured nice
//! value.
//!
//! A VMM on a machine whose cores its vCPUs keep busy may give its own threads a short
//! time slice ([`set_slice`], Linux 6.12+), so that their wakeups preempt a running vCPU
//! at once; a thread it spawns inherits the slice. A vCPU thread gives it back when it
//! starts: the guest's own work takes the kernel's default slice, and the nice value
//! [`set_vcpu_nice`] asked for (a secondary's VM that should yield to its primary's).

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// The nice value vCPU threads take when they start (see [`set_vcpu_nice`]).
static VCPU_NICE: AtomicI32 = AtomicI32::new(0);

/// Makes vCPU threads started from now on run at `nice` (0-19).
pub fn set_vcpu_nice(nice: i32) {
    VCPU_NICE.store(nice.clamp(0, 19), Ordering::SeqCst);
}

/// Called by a vCPU thread when it starts: the kernel's default slice, and the configured
/// nice value.
pub(crate) fn enter_vcpu_thread() {
    let nice = VCPU_NICE.load(Ordering::SeqCst);
    if nice != 0 {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        if let Err(e) = set_nice(tid, nice) {
            tracing::warn!(error = %e, nice, "cannot lower the vCPU thread's priority");
        }
    }
    set_slice(None);
}

/// Sets thread `tid`'s nice value.
///
/// # Errors
/// The `setpriority` error (raising a priority needs CAP_SYS_NICE or RLIMIT_NICE).
pub(crate) fn set_nice(tid: i32, nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority has no memory effects; on Linux PRIO_PROCESS with a thread id
    // applies to that thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `struct sched_attr` (SCHED_ATTR_SIZE_VER1).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Sets the calling thread's time slice (`None`: the kernel's default), keeping its nice
/// value and its normal policy. Returns whether the kernel took it.
pub fn set_slice(slice: Option<Duration>) -> bool {
    // SAFETY: getpriority has no memory effects; on Linux, PRIO_PROCESS with 0 means the
    // calling thread.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime: slice.map_or(0, |s| s.as_nanos() as u64),
        deadline: 0,
        period: 0,
        util_min: 0,
        util_max: 0,
    };
    // SAFETY: `attr` is a valid sched_attr of the size it declares and outlives the call;
    // pid 0 is the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if r != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "sched_setattr: no custom time slice on this kernel"
        );
    }
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice_of_this_thread() -> Option<u64> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/sched")).ok()?;
        s.lines()
            .find(|l| l.starts_with("se.slice"))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn a_vcpu_thread_takes_the_configured_nice() {
        // A fresh thread, so the test's own thread keeps its priority.
        let got = std::thread::spawn(|| {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            set_nice(tid, 3).unwrap();
            // SAFETY: as above; 0 is the calling thread.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
        })
        .join()
        .unwrap();
        assert_eq!(got, 3);
        assert!(set_nice(-1, 0).is_err(), "a bad thread id is an error");
    }

    #[test]
    fn a_thread_gets_and_gives_back_a_short_slice() {
        std::thread::spawn(|| {
            if !set_slice(Some(Duration::from_micros(100))) {
                eprintln!("skipped: the kernel refused a custom slice");
                return;
            }
            // Kernels that accept the call but do not report slices say nothing more.
            let Some(short) = slice_of_this_thread() else {
                return;
            };
            assert_eq!(short, 100_000);
            // Inherited by a new thread.
            let child = std::thread::spawn(slice_of_this_thread).join().unwrap();
            assert_eq!(child, Some(100_000));
            assert!(set_slice(None));
            assert!(slice_of_this_thread().unwrap() > 100_000);
        })
        .join()
        .unwrap();
    }
}
