//! The vCPUs of a machine, each behind a lock of its own: every vCPU thread holds its own
//! vCPU while it runs `KVM_RUN` and handles the exit, and locks the machine (devices, RAM)
//! only for the exits that need it, so the vCPUs run at once. A vCPU thread lets go of its
//! vCPU while it is parked; the controller then reads or writes every vCPU's state (a
//! snapshot) through [`Vcpus::lock`].

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::{VcpuFd, VmFd};

use super::abi::MAX_VCPUS;
use super::error::{Error, Result};

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
    /// Creates `n` vCPUs on `vm`, each set up by `setup(index, vcpu)`. vCPU 0 (the BSP)
    /// is runnable; the others stay as KVM makes them with the in-kernel irqchip
    /// (`KVM_MP_STATE_UNINITIALIZED`) until the guest starts them with INIT/SIPI through
    /// its local APIC, as on a PC.
    ///
    /// # Errors
    /// [`Error::Config`] for a count out of range, [`Error::Kvm`] if KVM refuses, or what
    /// `setup` returns.
    pub(crate) fn create(
        vm: &VmFd,
        n: u32,
        mut setup: impl FnMut(u32, &VcpuFd) -> Result<()>,
    ) -> Result<Self> {
        check_count(n)?;
        let mut all = Vec::with_capacity(n as usize);
        for i in 0..n {
            let v = vm
                .create_vcpu(u64::from(i))
                .map_err(Error::kvm("create a vCPU"))?;
            setup(i, &v)?;
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
