//! Kicking a vCPU thread out of `KVM_RUN`: a real-time signal whose handler sets the
//! thread's own `kvm_run.immediate_exit`, so `KVM_RUN` returns `EINTR` at once (about
//! 25 us here) whether the signal lands before or during the ioctl.

use std::cell::Cell;
use std::sync::Once;

use kvm_ioctls::VcpuFd;

thread_local! {
    /// The running vCPU's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int) {
    // Only touches a const-initialized thread-local Cell (no allocation, no lock): safe
    // in a signal handler.
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer is this thread's kvm_run mapping, set by the vCPU thread
            // and valid until it clears it.
            unsafe { p.write_volatile(1) };
        }
    });
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Installs the kick signal's handler (once per process).
pub(super) fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and no SA_RESTART (KVM_RUN must
        // return EINTR) is a valid argument; the handler is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// Points the calling thread's kick at `vcpu`'s `immediate_exit`. The caller must keep
/// `vcpu` alive until [`disarm`] (its thread owns a handle to it).
pub(super) fn arm(vcpu: &mut VcpuFd) {
    let p: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(p));
}

/// Undoes [`arm`]: a kick now only interrupts the thread's system call, if any.
pub(super) fn disarm() {
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
}

/// Sends the kick signal to `thread`.
///
/// # Safety
/// `thread` must be a thread of this process that has not been joined or detached.
pub(super) unsafe fn kick(thread: libc::pthread_t) {
    // SAFETY: the caller guarantees the pthread is alive or at least not yet joined; the
    // handler is installed before any vCPU thread starts.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}
