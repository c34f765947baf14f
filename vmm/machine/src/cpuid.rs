//! The CPUID a Linux guest sees: what KVM supports (`KVM_GET_SUPPORTED_CPUID`), minus the
//! features whose instructions this host's emulator of guest kernel code lacks, with the
//! vCPU's own APIC ID.
//!
//! On the hosts this is built on, KVM runs nested through PVM and emulates every guest
//! instruction at CPL0 (ENVIRONMENT.md beside the repository); an instruction the emulator
//! does not know stops the VM with "emulation failure". Linux picks most of those
//! instructions only when CPUID offers them (alternatives, `cmpxchg16b`, `xsave`, `popcnt`,
//! `rdrand`, the AVX and SSE4 paths of its crypto and RAID code), so hiding them moves the
//! failure further. On a real KVM host nothing needs hiding; the list costs only speed
//! there (the guest falls back to plainer code).
//!
//! PVM does not let the VMM hide features: it ORs the host's back into what the vCPU
//! reports ([`not_hidden`] finds them). For those, colo appends a `clearcpuid=` entry
//! ([`clearcpuid`]) to the kernel command line, so the kernel itself leaves them alone.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::Kvm;

use crate::error::{Error, Result};

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// A feature bit hidden from a Linux guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hidden {
    /// CPUID leaf.
    pub leaf: u32,
    /// Subleaf.
    pub sub: u32,
    /// Register.
    pub reg: Reg,
    /// Bit.
    pub bit: u32,
    /// Linux's name of the feature (as in /proc/cpuinfo and `clearcpuid=`).
    pub name: &'static str,
    /// Whether [`clearcpuid`] names it when the host does not hide it: the kernel reads at
    /// most 127 bytes of `clearcpuid=`, so only the features whose instructions a kernel
    /// runs early are named (those depending on `xsave`, like the AVX family, go with it).
    pub on_cmdline: bool,
}

impl Hidden {
    const fn new(
        leaf: u32,
        sub: u32,
        reg: Reg,
        bit: u32,
        name: &'static str,
        on_cmdline: bool,
    ) -> Self {
        Self {
            leaf,
            sub,
            reg,
            bit,
            name,
            on_cmdline,
        }
    }

    fn is_set(&self, entries: &[kvm_cpuid_entry2]) -> bool {
        entries.iter().any(|e| {
            e.function == self.leaf && e.index == self.sub && {
                let v = match self.reg {
                    Reg::Ebx => e.ebx,
                    Reg::Ecx => e.ecx,
                    Reg::Edx => e.edx,
                };
                v & (1 << self.bit) != 0
            }
        })
    }
}

/// The feature bits hidden from a Linux guest.
pub const HIDDEN: &[Hidden] = &[
    // Leaf 1 ECX.
    Hidden::new(1, 0, Reg::Ecx, 1, "pclmulqdq", true),
    Hidden::new(1, 0, Reg::Ecx, 9, "ssse3", true),
    Hidden::new(1, 0, Reg::Ecx, 12, "fma", false),
    // `lock cmpxchg16b` killed the 6.1 kernel in the QEMU probe.
    Hidden::new(1, 0, Reg::Ecx, 13, "cx16", true),
    Hidden::new(1, 0, Reg::Ecx, 17, "pcid", true),
    Hidden::new(1, 0, Reg::Ecx, 19, "sse4_1", false),
    Hidden::new(1, 0, Reg::Ecx, 20, "sse4_2", true),
    // `popcnt` killed it too (hweight via alternatives).
    Hidden::new(1, 0, Reg::Ecx, 23, "popcnt", true),
    Hidden::new(1, 0, Reg::Ecx, 25, "aes", true),
    // `xsave`/`xrstor`/`xsaveopt`: the FPU falls back to fxsave/fxrstor.
    Hidden::new(1, 0, Reg::Ecx, 26, "xsave", true),
    Hidden::new(1, 0, Reg::Ecx, 27, "osxsave", false),
    Hidden::new(1, 0, Reg::Ecx, 28, "avx", false),
    Hidden::new(1, 0, Reg::Ecx, 29, "f16c", false),
    Hidden::new(1, 0, Reg::Ecx, 30, "rdrand", true),
    // Leaf 7 EBX.
    Hidden::new(7, 0, Reg::Ebx, 0, "fsgsbase", true),
    Hidden::new(7, 0, Reg::Ebx, 3, "bmi1", true),
    Hidden::new(7, 0, Reg::Ebx, 4, "hle", true),
    Hidden::new(7, 0, Reg::Ebx, 5, "avx2", false),
    Hidden::new(7, 0, Reg::Ebx, 7, "smep", true),
    Hidden::new(7, 0, Reg::Ebx, 8, "bmi2", true),
    Hidden::new(7, 0, Reg::Ebx, 10, "invpcid", true),
    Hidden::new(7, 0, Reg::Ebx, 11, "rtm", true),
    Hidden::new(7, 0, Reg::Ebx, 16, "avx512f", false),
    Hidden::new(7, 0, Reg::Ebx, 17, "avx512dq", false),
    Hidden::new(7, 0, Reg::Ebx, 18, "rdseed", true),
    Hidden::new(7, 0, Reg::Ebx, 19, "adx", false),
    Hidden::new(7, 0, Reg::Ebx, 20, "smap", true),
    Hidden::new(7, 0, Reg::Ebx, 21, "avx512ifma", false),
    Hidden::new(7, 0, Reg::Ebx, 23, "clflushopt", false),
    Hidden::new(7, 0, Reg::Ebx, 24, "clwb", false),
    Hidden::new(7, 0, Reg::Ebx, 28, "avx512cd", false),
    Hidden::new(7, 0, Reg::Ebx, 29, "sha_ni", false),
    Hidden::new(7, 0, Reg::Ebx, 30, "avx512bw", false),
    Hidden::new(7, 0, Reg::Ebx, 31, "avx512vl", false),
    // Leaf 7 ECX.
    Hidden::new(7, 0, Reg::Ecx, 1, "avx512vbmi", false),
    Hidden::new(7, 0, Reg::Ecx, 2, "umip", true),
    Hidden::new(7, 0, Reg::Ecx, 3, "pku", false),
    Hidden::new(7, 0, Reg::Ecx, 6, "avx512_vbmi2", false),
    Hidden::new(7, 0, Reg::Ecx, 8, "gfni", false),
    Hidden::new(7, 0, Reg::Ecx, 9, "vaes", false),
    Hidden::new(7, 0, Reg::Ecx, 10, "vpclmulqdq", false),
    Hidden::new(7, 0, Reg::Ecx, 11, "avx512_vnni", false),
    Hidden::new(7, 0, Reg::Ecx, 12, "avx512_bitalg", false),
    Hidden::new(7, 0, Reg::Ecx, 14, "avx512_vpopcntdq", false),
    Hidden::new(7, 0, Reg::Ecx, 16, "la57", false),
    Hidden::new(7, 0, Reg::Ecx, 22, "rdpid", true),
    Hidden::new(7, 0, Reg::Ecx, 25, "cldemote", false),
    Hidden::new(7, 0, Reg::Ecx, 27, "movdiri", false),
    Hidden::new(7, 0, Reg::Ecx, 28, "movdir64b", false),
    // Leaf 7 EDX.
    Hidden::new(7, 0, Reg::Edx, 4, "fsrm", false),
    Hidden::new(7, 0, Reg::Edx, 14, "serialize", false),
    Hidden::new(7, 0, Reg::Edx, 16, "tsxldtrk", false),
    Hidden::new(7, 0, Reg::Edx, 22, "amx_bf16", false),
    Hidden::new(7, 0, Reg::Edx, 23, "avx512_fp16", false),
    Hidden::new(7, 0, Reg::Edx, 24, "amx_tile", false),
    Hidden::new(7, 0, Reg::Edx, 25, "amx_int8", false),
    // Leaf 0x80000001.
    Hidden::new(0x8000_0001, 0, Reg::Ecx, 5, "abm", true),
    Hidden::new(0x8000_0001, 0, Reg::Ecx, 8, "3dnowprefetch", false),
    Hidden::new(0x8000_0001, 0, Reg::Edx, 27, "rdtscp", false),
];

fn reg(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Clears the [`HIDDEN`] bits in `entries` and gives them the APIC ID `apic_id`.
pub fn mask_for_linux(entries: &mut [kvm_cpuid_entry2], apic_id: u8) {
    for e in entries.iter_mut() {
        for h in HIDDEN {
            if e.function == h.leaf && e.index == h.sub {
                *reg(e, h.reg) &= !(1 << h.bit);
            }
        }
        match e.function {
            // Initial APIC ID in EBX[31:24].
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(apic_id) << 24),
            // x2APIC ID of every topology level.
            0xb | 0x1f => e.edx = u32::from(apic_id),
            _ => {}
        }
    }
}

/// The hidden features the vCPU still reports after `KVM_SET_CPUID2` (`vcpu` is what
/// `KVM_GET_CPUID2` returns). On this project's hosts PVM ORs the host's features back into
/// leaf 1 and 7: the guest's native CPL3 code sees the host CPU anyway. Empty on KVM.
pub fn not_hidden(vcpu: &[kvm_cpuid_entry2]) -> Vec<&'static Hidden> {
    HIDDEN.iter().filter(|h| h.is_set(vcpu)).collect()
}

/// The `clearcpuid=` entry that makes a Linux kernel (5.19 and later take names) leave
/// alone the features in `shown` that the host would not hide; `None` if there are none.
pub fn clearcpuid(shown: &[&Hidden]) -> Option<String> {
    let names: Vec<&str> = shown
        .iter()
        .filter(|h| h.on_cmdline)
        .map(|h| h.name)
        .collect();
    (!names.is_empty()).then(|| format!("clearcpuid={}", names.join(",")))
}

/// What KVM supports, masked with [`mask_for_linux`].
///
/// # Errors
/// [`Error::Kvm`] if `KVM_GET_SUPPORTED_CPUID` fails.
pub fn for_linux(kvm: &Kvm, apic_id: u8) -> Result<CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    mask_for_linux(cpuid.as_mut_slice(), apic_id);
    Ok(cpuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    #[test]
    fn the_hidden_features_are_cleared_and_nothing_else() {
        let mut e = vec![
            entry(1, 0),
            entry(7, 0),
            entry(7, 1),
            entry(0xb, 0),
            entry(0x8000_0001, 0),
        ];
        mask_for_linux(&mut e, 3);
        let bit = |e: &kvm_cpuid_entry2, r: Reg, b: u32| {
            let v = match r {
                Reg::Ebx => e.ebx,
                Reg::Ecx => e.ecx,
                Reg::Edx => e.edx,
            };
            v & (1 << b) != 0
        };
        assert!(!bit(&e[0], Reg::Ecx, 13), "cx16");
        assert!(!bit(&e[0], Reg::Ecx, 23), "popcnt");
        assert!(!bit(&e[0], Reg::Ecx, 26), "xsave");
        assert!(bit(&e[0], Reg::Ecx, 0), "sse3 stays");
        assert!(bit(&e[0], Reg::Ecx, 31), "the hypervisor bit stays");
        assert!(bit(&e[0], Reg::Edx, 25), "sse stays");
        assert_eq!(e[0].ebx >> 24, 3, "APIC ID");
        assert!(!bit(&e[1], Reg::Ebx, 5), "avx2");
        assert!(bit(&e[1], Reg::Ebx, 9), "erms stays");
        assert_eq!(e[2].ebx, !0, "subleaf 1 untouched");
        assert_eq!(e[3].edx, 3, "x2APIC ID");
        assert!(!bit(&e[4], Reg::Edx, 27), "rdtscp");
        assert!(bit(&e[4], Reg::Edx, 29), "long mode stays");
        assert!(not_hidden(&e).is_empty());
    }

    #[test]
    fn features_the_host_shows_anyway_go_to_clearcpuid_within_the_kernels_limit() {
        let e = vec![entry(1, 0), entry(7, 0), entry(0x8000_0001, 0)];
        let shown = not_hidden(&e);
        assert_eq!(shown.len(), HIDDEN.len());
        let c = clearcpuid(&shown).unwrap();
        for f in ["xsave", "cx16", "popcnt", "smap"] {
            assert!(c.contains(f), "{c}");
        }
        assert!(!c.contains("avx2"), "goes with xsave: {c}");
        // Linux 6.1 copies at most 127 bytes of the value.
        assert!(c.len() - "clearcpuid=".len() <= 127, "{} bytes", c.len());
        assert_eq!(clearcpuid(&[]), None);
    }
}
