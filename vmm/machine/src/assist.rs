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
//!   word leaves unmasked, which is a #MF (exception 16) at the instruction;
//! - `ldmxcsr m32` / `stmxcsr m32` (0f ae /2, /3; the kernel's `kernel_fpu_begin` runs one):
//!   MXCSR from or to memory through KVM's FPU state, the operand's address decoded from
//!   its ModRM, SIB and displacement ([`MemOperand`]).
//!
//! On a host with hardware virtualization none of this runs: these exits do not happen.

use kvm_bindings::{KVM_INTERNAL_ERROR_EMULATION, kvm_regs};
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
    /// `ldmxcsr`: MXCSR loaded from memory.
    Ldmxcsr,
    /// `stmxcsr`: MXCSR stored to memory.
    Stmxcsr,
}

/// A decoded 64-bit memory operand: ModRM (with SIB and displacement), the REX prefix's
/// X and B bits, no segment override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    /// ModRM's reg field (the opcode extension of group instructions).
    pub reg: u8,
    /// Base register number (0 = rax .. 15 = r15), if any.
    pub base: Option<u8>,
    /// Index register number and scale, if any.
    pub index: Option<(u8, u8)>,
    /// Displacement.
    pub disp: i64,
    /// RIP-relative (`disp` from the next instruction).
    pub rip_relative: bool,
    /// Bytes of ModRM, SIB and displacement.
    pub len: usize,
}

impl MemOperand {
    /// Decodes `b` (starting at ModRM) with REX bits `rex`; `None` for a register operand
    /// or too few bytes.
    pub fn decode(b: &[u8], rex: u8) -> Option<Self> {
        let modrm = *b.first()?;
        let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
        if md == 3 {
            return None;
        }
        let (rex_x, rex_b) = ((rex >> 1) & 1, rex & 1);
        let mut len = 1;
        let (mut base, mut index, mut rip_relative) = (None, None, false);
        let mut disp_len = match md {
            1 => 1,
            2 => 4,
            _ => 0,
        };
        if rm == 4 {
            let sib = *b.get(1)?;
            len += 1;
            let (scale, idx, bs) = (sib >> 6, ((sib >> 3) & 7) | (rex_x << 3), sib & 7);
            if idx != 4 {
                index = Some((idx, 1 << scale));
            }
            if bs == 5 && md == 0 {
                disp_len = 4;
            } else {
                base = Some(bs | (rex_b << 3));
            }
        } else if rm == 5 && md == 0 {
            rip_relative = true;
            disp_len = 4;
        } else {
            base = Some(rm | (rex_b << 3));
        }
        let d = b.get(len..len + disp_len)?;
        let disp = match disp_len {
            1 => i64::from(d[0] as i8),
            4 => i64::from(i32::from_le_bytes([d[0], d[1], d[2], d[3]])),
            _ => 0,
        };
        Some(Self {
            reg,
            base,
            index,
            disp,
            rip_relative,
            len: len + disp_len,
        })
    }

    /// The operand's linear address, with `next_rip` the address after the instruction.
    pub fn address(&self, regs: &kvm_regs, next_rip: u64) -> u64 {
        let r = |n: u8| -> u64 {
            [
                regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi,
                regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
            ][usize::from(n & 15)]
        };
        let mut a = self.disp as u64;
        if self.rip_relative {
            a = a.wrapping_add(next_rip);
        }
        if let Some(b) = self.base {
            a = a.wrapping_add(r(b));
        }
        if let Some((i, scale)) = self.index {
            a = a.wrapping_add(r(i).wrapping_mul(u64::from(scale)));
        }
        a
    }
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
    let Some(code) = read_virt::<16>(vcpu, mem, regs.rip) else {
        return Ok(None);
    };
    let (done, vector) = match code[0] {
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
        _ => match mxcsr(vcpu, mem, &mut regs, &code)? {
            Some(done) => (done, None),
            None => return Ok(None),
        },
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

/// `N` bytes at guest-virtual `addr` (those past the end of its page read as zero), if its
/// page is mapped.
pub(crate) fn read_virt<const N: usize>(
    vcpu: &VcpuFd,
    mem: &colo_memory::GuestMemory,
    addr: u64,
) -> Option<[u8; N]> {
    let t = vcpu.translate_gva(addr).ok().filter(|t| t.valid != 0)?;
    let in_page = (0x1000 - (addr & 0xfff)) as usize;
    let mut b = [0u8; N];
    let n = N.min(in_page);
    mem.read_slice(&mut b[..n], GuestAddress(t.physical_address))
        .ok()?;
    Some(b)
}

/// `ldmxcsr`/`stmxcsr` with an optional REX prefix; `None` for anything else (other
/// prefixes, a reserved MXCSR bit, an operand that crosses a page).
fn mxcsr(
    vcpu: &VcpuFd,
    mem: &colo_memory::GuestMemory,
    regs: &mut kvm_regs,
    code: &[u8; 16],
) -> Result<Option<Assisted>> {
    let (rex, at) = match code[0] {
        r @ 0x40..=0x4f => (r, 1),
        _ => (0, 0),
    };
    if code[at..at + 2] != [0x0f, 0xae] {
        return Ok(None);
    }
    let Some(op) = MemOperand::decode(&code[at + 2..], rex) else {
        return Ok(None);
    };
    if !matches!(op.reg, 2 | 3) {
        return Ok(None);
    }
    let next = regs.rip + (at + 2 + op.len) as u64;
    let addr = op.address(regs, next);
    if addr & 0xfff > 0xffc {
        return Ok(None);
    }
    let Some(phys) = vcpu
        .translate_gva(addr)
        .ok()
        .filter(|t| t.valid != 0)
        .map(|t| GuestAddress(t.physical_address))
    else {
        return Ok(None);
    };
    let mut fpu = vcpu.get_fpu().map_err(Error::kvm("get fpu"))?;
    let done = if op.reg == 2 {
        let Ok(v) = mem.read_obj::<u32>(phys) else {
            return Ok(None);
        };
        // Bits 16 and up are reserved (#GP): leave that to the report.
        if v >> 16 != 0 {
            return Ok(None);
        }
        fpu.mxcsr = v;
        vcpu.set_fpu(&fpu).map_err(Error::kvm("set fpu"))?;
        Assisted::Ldmxcsr
    } else {
        if mem.write_obj(fpu.mxcsr, phys).is_err() {
            return Ok(None);
        }
        Assisted::Stmxcsr
    };
    regs.rip = next;
    Ok(Some(done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_operands_decode_like_the_kernels_ldmxcsr_and_friends() {
        let regs = kvm_regs {
            rsp: 0x1000,
            rbx: 0x20,
            rsi: 3,
            r13: 0x500,
            ..Default::default()
        };
        // ldmxcsr [rsp + 4]: 0f ae 54 24 04 (the failure seen in the Debian kernel).
        let op = MemOperand::decode(&[0x54, 0x24, 0x04], 0).unwrap();
        assert_eq!((op.reg, op.len), (2, 3));
        assert_eq!(op.address(&regs, 0), 0x1004);
        // stmxcsr [rbx + rsi*8 - 8]: 5c f3 f8.
        let op = MemOperand::decode(&[0x5c, 0xf3, 0xf8], 0).unwrap();
        assert_eq!((op.reg, op.address(&regs, 0)), (3, 0x20 + 24 - 8));
        // ldmxcsr [r13 + 0x100] with REX.B: 95 00 01 00 00.
        let op = MemOperand::decode(&[0x95, 0, 1, 0, 0], 0x41).unwrap();
        assert_eq!((op.len, op.address(&regs, 0)), (5, 0x600));
        // RIP-relative: 15 10 00 00 00.
        let op = MemOperand::decode(&[0x15, 0x10, 0, 0, 0], 0).unwrap();
        assert_eq!(op.address(&regs, 0x7000), 0x7010);
        // A register operand, and too few bytes.
        assert_eq!(MemOperand::decode(&[0xd0], 0), None);
        assert_eq!(MemOperand::decode(&[0x54, 0x24], 0), None);
    }
}
