//! One counter of KVM's binary statistics of a vCPU (`KVM_GET_STATS_FD`, Linux 5.14): a
//! file whose header lists named descriptors and whose data block holds the values, read
//! with `pread` while the vCPU runs. colo reads `pf_taken`, the page faults KVM took
//! (under dirty logging mostly the write-protect faults a guest takes on its first write
//! to each page after a dirty-log collection), and `exits`, every exit from the guest.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl;

/// The ioctl number (kvm-ioctls 0.25 does not wrap it).
mod nr {
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);
}
use nr::KVM_GET_STATS_FD;

/// The fixed header of a stats file: flags, name size, descriptor count, and the
/// offsets of the id string, the descriptors and the data.
const HEADER_LEN: usize = 24;
/// A descriptor's fixed part before its name: flags, exponent, size, offset, bucket size.
const DESC_LEN: usize = 16;
/// The most descriptors looked at (kernels list a few dozen per vCPU).
const MAX_DESCS: usize = 4096;
/// The longest descriptor name accepted.
const MAX_NAME: usize = 256;

/// One counter of one vCPU.
#[derive(Debug)]
pub struct VcpuCounter {
    file: File,
    /// Where its value sits in the file.
    at: u64,
}

/// A vCPU's page faults taken and exits.
#[derive(Debug)]
pub struct VcpuCounters {
    faults: VcpuCounter,
    exits: VcpuCounter,
}

/// Counts of page faults and exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Page faults KVM took (`pf_taken`).
    pub faults: u64,
    /// Exits from the guest (`exits`).
    pub exits: u64,
}

impl std::iter::Sum for ExitCounts {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |a, b| Self {
            faults: a.faults + b.faults,
            exits: a.exits + b.exits,
        })
    }
}

impl VcpuCounters {
    /// Both counters of `vcpu`, or `None` (see [`VcpuCounter::open`]).
    pub fn open(vcpu: &VcpuFd) -> Option<Self> {
        Some(Self {
            faults: VcpuCounter::open(vcpu, "pf_taken")?,
            exits: VcpuCounter::open(vcpu, "exits")?,
        })
    }

    /// Their values now.
    pub fn read(&self) -> Option<ExitCounts> {
        Some(ExitCounts {
            faults: self.faults.read()?,
            exits: self.exits.read()?,
        })
    }
}

impl VcpuCounter {
    /// The counter `name` of `vcpu`; `None` where the kernel has no binary statistics or
    /// no such counter (the caller then reports nothing rather than a wrong figure).
    pub fn open(vcpu: &VcpuFd, name: &str) -> Option<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor or -1.
        let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "no KVM binary statistics (Linux 5.14 and later have them)"
            );
            return None;
        }
        // SAFETY: a descriptor the kernel just gave us, owned from here on.
        let file = unsafe { File::from_raw_fd(fd) };
        let at = find(&file, name)?;
        Some(Self { file, at })
    }

    /// Its value now.
    pub fn read(&self) -> Option<u64> {
        let mut b = [0u8; 8];
        self.file.read_exact_at(&mut b, self.at).ok()?;
        Some(u64::from_ne_bytes(b))
    }
}

/// The file offset of the first value of the counter `name`, from the header and the
/// descriptors (kernel data, still checked: a malformed file gives `None`).
fn find(file: &File, name: &str) -> Option<u64> {
    let mut h = [0u8; HEADER_LEN];
    file.read_exact_at(&mut h, 0).ok()?;
    let word = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let (name_size, count) = (word(4) as usize, word(8) as usize);
    let (desc_offset, data_offset) = (u64::from(word(16)), u64::from(word(20)));
    if name_size == 0 || name_size > MAX_NAME || count > MAX_DESCS {
        return None;
    }
    let mut descs = vec![0u8; count * (DESC_LEN + name_size)];
    file.read_exact_at(&mut descs, desc_offset).ok()?;
    offset_of(&descs, name_size, name).map(|off| data_offset + off)
}

/// The data offset of `name` among packed descriptors of `name_size`-byte names.
fn offset_of(descs: &[u8], name_size: usize, name: &str) -> Option<u64> {
    descs.chunks_exact(DESC_LEN + name_size).find_map(|d| {
        let (fixed, raw) = d.split_at(DESC_LEN);
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        (&raw[..end] == name.as_bytes()).then(|| {
            u64::from(u32::from_ne_bytes([
                fixed[8], fixed[9], fixed[10], fixed[11],
            ]))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(offset: u32, name: &str, name_size: usize) -> Vec<u8> {
        let mut d = vec![0u8; DESC_LEN + name_size];
        d[8..12].copy_from_slice(&offset.to_ne_bytes());
        d[DESC_LEN..DESC_LEN + name.len()].copy_from_slice(name.as_bytes());
        d
    }

    #[test]
    fn a_counter_is_found_by_its_whole_name() {
        let mut descs = desc(0, "pf_taken", 48);
        descs.extend(desc(8, "pf_fixed", 48));
        descs.extend(desc(16, "pf_fixed_extra", 48));
        assert_eq!(offset_of(&descs, 48, "pf_fixed"), Some(8));
        assert_eq!(offset_of(&descs, 48, "pf_fixed_extra"), Some(16));
        assert_eq!(offset_of(&descs, 48, "pf"), None);
        assert_eq!(offset_of(&descs[..10], 48, "pf_taken"), None);
    }

    #[test]
    fn a_real_vcpu_counts_its_faults() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().expect("a VM");
        let vcpu = vm.create_vcpu(0).expect("a vCPU");
        match VcpuCounters::open(&vcpu) {
            // A vCPU that never ran has taken no faults and made no exits.
            Some(c) => assert_eq!(c.read(), Some(ExitCounts::default())),
            None => eprintln!("skipped: this kernel has no KVM binary statistics"),
        }
        assert!(VcpuCounter::open(&vcpu, "no_such_counter").is_none());
    }
}
