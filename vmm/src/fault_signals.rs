//! Fatal signals left to the kernel: handlers that a library linked into colo installed
//! for them at load time are taken back out.
//!
//! Debian's libfabric links libpsm2, whose load-time constructor hooks SIGSEGV, SIGBUS,
//! SIGILL, SIGFPE and SIGABRT to write a backtrace file (`colo.80s-PID,HOST.btr`) into the
//! working directory of any process that dies by one of them: every crash-point test, and
//! an operator's `colo` that aborts, would leave one behind. colo's own abort (a crash
//! point, a panic) must end the process as the kernel does, with a core dump where the
//! system keeps them.

/// The signals whose foreign handlers are removed.
const FATAL: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
];

/// The base address of the object (executable or shared library) that holds `addr`, if
/// the dynamic loader knows it.
fn object_of(addr: usize) -> Option<usize> {
    // SAFETY: dladdr only reads the loader's tables and fills the struct it is given,
    // which lives across the call; any address may be asked about.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        (libc::dladdr(addr as *const libc::c_void, &mut info) != 0)
            .then_some(info.dli_fbase as usize)
    }
}

/// Resets to the default action every fatal signal whose handler lives outside colo's own
/// executable (the Rust runtime's stack-overflow handler lives inside it and stays).
/// Returns the signals reset. Call it first in `main`, before any thread starts.
pub fn drop_foreign_handlers() -> Vec<libc::c_int> {
    let own = object_of(drop_foreign_handlers as *const () as usize);
    let mut reset = Vec::new();
    for sig in FATAL {
        // SAFETY: an all-zero sigaction is a valid value; sigaction with a null new action
        // only reads the current one into `old`, which lives across the call.
        let got = unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            (libc::sigaction(sig, std::ptr::null(), &mut old) == 0).then_some(old)
        };
        let Some(old) = got else {
            continue;
        };
        let h = old.sa_sigaction;
        if h == libc::SIG_DFL || h == libc::SIG_IGN {
            continue;
        }
        if own.is_some() && object_of(h) == own {
            continue;
        }
        // SAFETY: installing the default action for a signal is always valid.
        if unsafe { libc::signal(sig, libc::SIG_DFL) } != libc::SIG_ERR {
            reset.push(sig);
        }
    }
    reset
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn ours(_: libc::c_int) {}

    fn install(sig: libc::c_int, handler: usize) {
        // SAFETY: a zeroed sigaction with a handler address and an empty mask is valid.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
        }
    }

    fn current(sig: libc::c_int) -> usize {
        // SAFETY: reads the current action into a struct that lives across the call.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut old);
            old.sa_sigaction
        }
    }

    /// One test (both signals in one call): the reset is process-wide.
    #[test]
    fn a_shared_librarys_handler_is_reset_and_our_own_stays() {
        // `abort` lives in libc, a shared object other than this test binary: a handler
        // there stands for one that a library installed. Nothing here raises SIGILL or
        // SIGFPE while they are set.
        install(libc::SIGILL, libc::abort as *const () as usize);
        install(libc::SIGFPE, ours as *const () as usize);
        let reset = drop_foreign_handlers();
        let (ill, fpe) = (current(libc::SIGILL), current(libc::SIGFPE));
        install(libc::SIGFPE, libc::SIG_DFL);
        assert!(reset.contains(&libc::SIGILL), "reset {reset:?}");
        assert_eq!(ill, libc::SIG_DFL);
        assert!(!reset.contains(&libc::SIGFPE), "reset {reset:?}");
        assert_eq!(fpe, ours as *const () as usize);
    }
}
