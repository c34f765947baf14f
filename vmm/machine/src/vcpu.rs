//! The vCPU's part of a VM state snapshot, and what a crash report says about a vCPU.

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, Msrs, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};

use super::error::{Error, Result};

/// MSRs KVM lists (`KVM_GET_MSR_INDEX_LIST`) that a snapshot leaves out: the TSC deadline
/// (the LAPIC's state carries the timer, and restoring an absolute deadline from another
/// host's clock would fire it at once or never). Any other listed MSR the vCPU can read and
/// write back is saved.
const UNSAVED_MSRS: [u32; 1] = [
    0x6e0, // IA32_TSC_DEADLINE
];

/// The MSRs a snapshot carries for this host: every MSR `KVM_GET_MSR_INDEX_LIST` names that
/// `vcpu` can read and write back (checked by reading each and writing the value it read,
/// on a vCPU that has not run), except [`UNSAVED_MSRS`]. On these hosts this covers the
/// syscall/sysenter set, the TSC and TSC_ADJUST, PAT, MISC_ENABLE, the kvm-clock and
/// paravirtual MSRs, the MTRRs and more: whatever the guest can change.
///
/// # Errors
/// [`Error::Kvm`] if KVM cannot list its MSRs.
pub fn saved_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(Error::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut out = Vec::new();
    for &index in list.as_slice() {
        if UNSAVED_MSRS.contains(&index) {
            continue;
        }
        let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }]) else {
            continue;
        };
        if !matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            continue;
        }
        if matches!(vcpu.set_msrs(&one), Ok(1)) {
            out.push(index);
        }
    }
    Ok(out)
}

/// Everything KVM holds about one vCPU.
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state.
    pub fpu: kvm_fpu,
    /// The legacy 4 KiB XSAVE area (KVM_GET_XSAVE).
    pub xsave: Box<[u32; 1024]>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// The MSRs of [`saved_msrs`], with their values.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Running/halted state.
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debug: kvm_debugregs,
}

/// The bytes of a `kvm_fpu`.
pub fn fpu_bytes(f: &kvm_fpu) -> &[u8] {
    const _: () = assert!(size_of::<kvm_fpu>() == 416, "kvm_fpu has no hidden padding");
    // SAFETY: kvm_fpu is repr(C) with only integer fields and its padding named as fields
    // (416 bytes, checked above), so every byte is initialized.
    unsafe { std::slice::from_raw_parts((f as *const kvm_fpu).cast::<u8>(), size_of::<kvm_fpu>()) }
}

/// A `kvm_fpu` from exactly its bytes.
pub fn fpu_from(b: &[u8]) -> Option<kvm_fpu> {
    if b.len() != size_of::<kvm_fpu>() {
        return None;
    }
    let mut f = kvm_fpu::default();
    // SAFETY: lengths are equal (checked); any bytes are a valid kvm_fpu (integers only).
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut f as *mut kvm_fpu).cast::<u8>(), b.len())
    };
    Some(f)
}

/// Reads the whole vCPU state, with the MSRs `saved_msrs` names ([`saved_msrs`]). The vCPU
/// must not be running.
///
/// # Errors
/// [`Error::Kvm`] if an ioctl fails or KVM returns fewer MSRs than asked for.
pub fn save(vcpu: &VcpuFd, saved_msrs: &[u32]) -> Result<VcpuState> {
    let mut msrs = Msrs::from_entries(
        &saved_msrs
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect::<Vec<_>>(),
    )
    .map_err(|_| Error::Snapshot("too many MSRs".into()))?;
    let n = vcpu.get_msrs(&mut msrs).map_err(Error::kvm("get MSRs"))?;
    if n != saved_msrs.len() {
        return Err(Error::Snapshot(format!(
            "KVM returned {n} of {} MSRs",
            saved_msrs.len()
        )));
    }
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(Error::kvm("get regs"))?,
        sregs: vcpu.get_sregs().map_err(Error::kvm("get sregs"))?,
        fpu: vcpu.get_fpu().map_err(Error::kvm("get fpu"))?,
        xsave: Box::new(vcpu.get_xsave().map_err(Error::kvm("get xsave"))?.region),
        xcrs: vcpu.get_xcrs().map_err(Error::kvm("get xcrs"))?,
        lapic: vcpu.get_lapic().map_err(Error::kvm("get lapic"))?,
        msrs: msrs.as_slice().to_vec(),
        events: vcpu
            .get_vcpu_events()
            .map_err(Error::kvm("get vcpu events"))?,
        mp_state: vcpu.get_mp_state().map_err(Error::kvm("get mp state"))?,
        debug: vcpu
            .get_debug_regs()
            .map_err(Error::kvm("get debug regs"))?,
    })
}

/// Writes the whole vCPU state, in the order KVM needs (special registers before the
/// APIC and MSRs, events last).
///
/// # Errors
/// [`Error::Kvm`] if an ioctl fails.
pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<()> {
    vcpu.set_mp_state(s.mp_state)
        .map_err(Error::kvm("set mp state"))?;
    vcpu.set_sregs(&s.sregs).map_err(Error::kvm("set sregs"))?;
    vcpu.set_regs(&s.regs).map_err(Error::kvm("set regs"))?;
    vcpu.set_fpu(&s.fpu).map_err(Error::kvm("set fpu"))?;
    let mut xsave = kvm_xsave::default();
    xsave.region = *s.xsave;
    // SAFETY: a legacy 4 KiB area, the size KVM_SET_XSAVE reads (no extra components:
    // KVM_CAP_XSAVE2 is not used).
    unsafe { vcpu.set_xsave(&xsave) }.map_err(Error::kvm("set xsave"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(Error::kvm("set xcrs"))?;
    vcpu.set_debug_regs(&s.debug)
        .map_err(Error::kvm("set debug regs"))?;
    vcpu.set_lapic(&s.lapic).map_err(Error::kvm("set lapic"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| Error::Snapshot("too many MSRs".into()))?;
    let n = vcpu.set_msrs(&msrs).map_err(Error::kvm("set MSRs"))?;
    if n != s.msrs.len() {
        return Err(Error::Snapshot(format!(
            "KVM took {n} of {} MSRs",
            s.msrs.len()
        )));
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(Error::kvm("set vcpu events"))?;
    Ok(())
}

/// What `KVM_EXIT_INTERNAL_ERROR` says: the suberror (1 is an instruction KVM's emulator
/// cannot emulate, the usual end of a guest kernel on a host that emulates CPL0 code), the
/// data words KVM adds, and the bytes at the guest's RIP, so that the report names the
/// instruction.
pub fn internal_error(vcpu: &mut VcpuFd, mem: &colo_memory::GuestMemory) -> String {
    // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit, `internal` is the member of the exit
    // union KVM filled in; every bit pattern of its integers is valid.
    let info = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
    let n = (info.ndata as usize).min(info.data.len());
    let what = match info.suberror {
        KVM_INTERNAL_ERROR_EMULATION => "emulation failure".to_string(),
        other => format!("suberror {other}"),
    };
    let data: Vec<String> = info.data[..n].iter().map(|d| format!("{d:#x}")).collect();
    let insn = vcpu
        .get_regs()
        .ok()
        .and_then(|r| crate::assist::read_virt::<15>(vcpu, mem, r.rip))
        .map_or_else(
            || "unreadable".to_string(),
            |b| {
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            },
        );
    format!(
        "KVM internal error: {what} (data [{}]); bytes at rip: {insn}",
        data.join(", ")
    )
}

/// The registers, formatted for a crash report.
pub fn dump(vcpu: &VcpuFd) -> String {
    let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
        return "registers unavailable".into();
    };
    format!(
        "rip={:#018x} rsp={:#018x} rflags={:#x}\n\
         rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
         rsi={:#018x} rdi={:#018x} rbp={:#018x}\n\
         cs={:#x} ss={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
        r.rip,
        r.rsp,
        r.rflags,
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rbp,
        s.cs.selector,
        s.ss.selector,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer
    )
}
