//! The vCPUs of a machine, each behind a lock of its own: every vCPU thread holds its own
//! vCPU while it runs `KVM_RUN` and handles the exit, and locks the machine (devices, RAM)
//! only for the exits that need it, so the vCPUs run at once. A vCPU thread lets go of its
//! vCPU while it is parked; the controller then reads or writes every vCPU's state (a
//! snapshot) through [`Vcpus::lock`].

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{KVM_MP_STATE_RUNNABLE, kvm_mp_state};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::abi::MAX_VCPUS;
use super::error::{Error, Result};
use super::vcpu;

/// One vCPU, shared between the machine (for snapshots) and its thread (to run it).
pub(crate) type SharedVcpu = Arc<Mutex<VcpuFd>>;

/// Every vCPU of a VM, in index order (the index is the KVM vCPU id and the APIC id).
pub(crate) struct Vcpus(Vec<SharedVcpu>);

/// Checks a vCPU count against what the machine supports (1 to [`MAX_VCPUS`]).
///
/// # Errors
/// [`Error::Config`] saying the range.
pub fn check_count(n: u32) -> Result<()> {
    if (1..=MAX_VCPUS).contains(&n) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{n} vCPUs: a VM has 1 to {MAX_VCPUS}"
        )))
    }
}

impl Vcpus {
    /// Creates `n` vCPUs on `vm`, each set up for the built-in guest's long mode at CPL3
    /// entering at `entry` with its index in `rsi`. Every vCPU is runnable at once: with
    /// the in-kernel irqchip KVM would otherwise hold vCPUs 1 and up until an INIT/SIPI.
    ///
    /// # Errors
    /// [`Error::Config`] for a count out of range, [`Error::Kvm`] if KVM refuses.
    pub(crate) fn create(kvm: &Kvm, vm: &VmFd, n: u32, entry: u64) -> Result<Self> {
        check_count(n)?;
        let mut all = Vec::with_capacity(n as usize);
        for i in 0..n {
            let v = vm
                .create_vcpu(u64::from(i))
                .map_err(Error::kvm("create a vCPU"))?;
            vcpu::setup_long_mode(kvm, &v, entry)?;
            let mut regs = v.get_regs().map_err(Error::kvm("get regs"))?;
            regs.rsi = u64::from(i);
            v.set_regs(&regs).map_err(Error::kvm("set regs"))?;
            if i > 0 {
                v.set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .map_err(Error::kvm("make a vCPU runnable"))?;
            }
            all.push(Arc::new(Mutex::new(v)));
        }
        Ok(Self(all))
    }

    /// How many.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// vCPU `i`. Blocks while its thread runs it: call it on a paused VM (or one not
    /// started).
    ///
    /// # Panics
    /// If `i` is out of range.
    pub(crate) fn lock(&self, i: usize) -> MutexGuard<'_, VcpuFd> {
        self.0[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every vCPU, in order, locked (see [`Vcpus::lock`]).
    pub(crate) fn lock_all(&self) -> Vec<MutexGuard<'_, VcpuFd>> {
        (0..self.len()).map(|i| self.lock(i)).collect()
    }

    /// vCPU `i`'s shared handle, for its thread.
    pub(crate) fn shared(&self, i: usize) -> SharedVcpu {
        Arc::clone(&self.0[i])
    }
}
