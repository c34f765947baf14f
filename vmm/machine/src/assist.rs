//! Instructions the host's KVM could not emulate, completed by colo.
//!
//! On the hosts this is built on, KVM runs nested through PVM and emulates every guest
//! instruction at CPL0 (ENVIRONMENT.md beside the repository). Its emulator lacks a few
//! instructions a Linux kernel executes whatever CPUID says; each stops the vCPU with
//! `KVM_EXIT_INTERNAL_ERROR` (emulation failure) at the instruction. colo completes the two
//! that have a simple architectural effect and lets every other one end the VM with a
//! report:
//!
//! - `int3` (0xcc; the kernel's alternatives self-test runs one at boot): a #BP trap, i.e.
//!   RIP past the instruction and exception 3 injected;
//! - `fwait` (0x9b): nothing, unless the x87 status word holds an exception its control
//!   word leaves unmasked, which is a #MF (exception 16) at the instruction.
//!
//! On a host with hardware virtualization none of this runs: these exits do not happen.

use kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};

/// An instruction colo completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Assisted {
    /// `int3`: #BP delivered.
    Int3,
    /// `fwait` without a pending x87 exception: skipped.
    Fwait,
    /// `fwait` with a pending unmasked x87 exception: #MF delivered.
    FwaitFault,
}

const BP: u8 = 3;
const MF: u8 = 16;

/// Completes the instruction that stopped the vCPU with an emulation failure, if it is one
/// colo knows; `None` leaves the failure to the caller.
///
/// # Errors
/// [`Error::Kvm`] if reading or writing the vCPU's registers fails.
pub fn complete(vcpu: &mut VcpuFd, mem: &colo_memory::GuestMemory) -> Result<Option<Assisted>> {
    // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit, `internal` is the member of the exit
    // union KVM filled in; every bit pattern of its integers is valid.
    let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Ok(None);
    }
    let mut regs = vcpu.get_regs().map_err(Error::kvm("get regs"))?;
    let Some(byte) = vcpu
        .translate_gva(regs.rip)
        .ok()
        .filter(|t| t.valid != 0)
        .and_then(|t| mem.read_obj::<u8>(GuestAddress(t.physical_address)).ok())
    else {
        return Ok(None);
    };
    let (done, vector) = match byte {
        0xcc => {
            // A trap: the exception frame holds the address after the instruction.
            regs.rip += 1;
            (Assisted::Int3, Some(BP))
        }
        0x9b => {
            let fpu = vcpu.get_fpu().map_err(Error::kvm("get fpu"))?;
            if fpu.fsw & !fpu.fcw & 0x3f != 0 {
                // A fault: the frame holds the fwait itself.
                (Assisted::FwaitFault, Some(MF))
            } else {
                regs.rip += 1;
                (Assisted::Fwait, None)
            }
        }
        _ => return Ok(None),
    };
    vcpu.set_regs(&regs).map_err(Error::kvm("set regs"))?;
    if let Some(nr) = vector {
        let mut ev = vcpu
            .get_vcpu_events()
            .map_err(Error::kvm("get vcpu events"))?;
        ev.exception.injected = 1;
        ev.exception.nr = nr;
        ev.exception.has_error_code = 0;
        ev.exception.error_code = 0;
        ev.exception.pending = 0;
        vcpu.set_vcpu_events(&ev)
            .map_err(Error::kvm("set vcpu events"))?;
    }
    Ok(Some(done))
}
