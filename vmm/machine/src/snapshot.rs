//! The VM state snapshot: a versioned, checksummed binary image of everything about a VM
//! except its RAM (which travels separately, as pages): every vCPU in index order (each
//! with every MSR the host's KVM lists that the vCPU can read and write), the interrupt
//! controllers, the PIT, the clock and every device. Version 2 added the PIT and the
//! host's full MSR list; version 3 the vCPU count and one vCPU state per vCPU; version 4
//! the serial port (registers and FIFO) and each virtio-mmio transport's InterruptStatus.
//!
//! ```text
//! header (32 bytes): "COLOSNAP" | version u32 | reserved u32 | body length u64 | FNV-1a u64
//! body: length-prefixed items in a fixed order (codec.rs), each checked on decode:
//!       vCPU count u64, then per vCPU its registers ... debug registers; then the VM's
//! ```

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_msr_entry, kvm_pit_state2};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::codec::{Reader, Writer};
use super::error::{Error, Result};
use super::vcpu::VcpuState;

/// "COLOSNAP".
pub const MAGIC: u64 = u64::from_le_bytes(*b"COLOSNAP");
/// The snapshot format version this build writes and reads.
pub const VERSION: u32 = 4;
/// The largest snapshot body accepted.
pub const MAX_BODY: u64 = 16 << 20;
/// Most MSRs in a snapshot.
const MAX_MSRS: u64 = 256;
/// Most vCPUs in a snapshot.
const MAX_VCPUS: u64 = super::abi::MAX_VCPUS as u64;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Debug, Clone, Copy)]
#[repr(C)]
struct Header {
    magic: u64,
    version: u32,
    reserved: u32,
    body_len: u64,
    checksum: u64,
}

/// What a snapshot holds, decoded.
#[derive(Clone, Debug)]
pub struct VmState {
    /// Every vCPU, in index order (at least one).
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchip: [kvm_irqchip; 3],
    /// kvmclock's view of time.
    pub clock: kvm_clock_data,
    /// The in-kernel PIT (channels, speaker, flags).
    pub pit: kvm_pit_state2,
    /// The devices' bytes (decoded by the devices themselves).
    pub devices: Vec<u8>,
}

/// FNV-1a, 64 bit.
fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl VmState {
    /// Encodes the state.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.vcpus.len() as u64);
        for v in &self.vcpus {
            encode_vcpu(&mut w, v);
        }
        for c in &self.irqchip {
            w.pod(c);
        }
        w.pod(&self.clock);
        w.pod(&self.pit);
        w.bytes(&self.devices);
        let body = w.into_bytes();
        let h = Header {
            magic: MAGIC,
            version: VERSION,
            reserved: 0,
            body_len: body.len() as u64,
            checksum: fnv1a(&body),
        };
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a snapshot.
    ///
    /// # Errors
    /// [`Error::Snapshot`] saying what is wrong: too short, wrong magic or version, a body
    /// length over the limit or different from the bytes given, a checksum mismatch, or an
    /// item of the wrong length.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (h, body) = Header::read_from_prefix(bytes).map_err(|_| {
            Error::Snapshot(format!(
                "{} bytes is shorter than the 32-byte header",
                bytes.len()
            ))
        })?;
        if h.magic != MAGIC {
            return Err(Error::Snapshot("not a colo snapshot (bad magic)".into()));
        }
        if h.version != VERSION {
            return Err(Error::Snapshot(format!(
                "snapshot version {} is not supported (this build reads version {VERSION})",
                h.version
            )));
        }
        if h.reserved != 0 {
            return Err(Error::Snapshot(format!(
                "reserved header field is {:#x}, not 0",
                h.reserved
            )));
        }
        if h.body_len > MAX_BODY || h.body_len != body.len() as u64 {
            return Err(Error::Snapshot(format!(
                "body length {} does not match the {} bytes present (limit {MAX_BODY})",
                h.body_len,
                body.len()
            )));
        }
        if fnv1a(body) != h.checksum {
            return Err(Error::Snapshot(
                "checksum mismatch: the snapshot is corrupt".into(),
            ));
        }
        let mut r = Reader::new(body, "vm state");
        let n = r.u64("vcpu count")?;
        if !(1..=MAX_VCPUS).contains(&n) {
            return Err(Error::Snapshot(format!(
                "{n} vCPUs, expected 1 to {MAX_VCPUS}"
            )));
        }
        let vcpus = (0..n)
            .map(|_| decode_vcpu(&mut r))
            .collect::<Result<Vec<_>>>()?;
        let irqchip = [r.pod("pic master")?, r.pod("pic slave")?, r.pod("ioapic")?];
        let clock = r.pod("clock")?;
        let pit = r.pod("pit")?;
        let devices = r.bytes("devices")?.to_vec();
        r.finish()?;
        Ok(Self {
            vcpus,
            irqchip,
            clock,
            pit,
            devices,
        })
    }
}

/// Appends one vCPU's items.
fn encode_vcpu(w: &mut Writer, v: &VcpuState) {
    w.pod(&v.regs);
    w.pod(&v.sregs);
    w.bytes(super::vcpu::fpu_bytes(&v.fpu));
    w.pod(&*v.xsave);
    w.pod(&v.xcrs);
    w.pod(&v.lapic);
    w.u64(v.msrs.len() as u64);
    for m in &v.msrs {
        w.pod(m);
    }
    w.pod(&v.events);
    w.pod(&v.mp_state);
    w.pod(&v.debug);
}

/// Reads one vCPU's items.
fn decode_vcpu(r: &mut Reader<'_>) -> Result<VcpuState> {
    let regs = r.pod("regs")?;
    let sregs = r.pod("sregs")?;
    let fpu = super::vcpu::fpu_from(r.bytes("fpu")?)
        .ok_or_else(|| Error::Snapshot("vm state: fpu has the wrong length".into()))?;
    let xsave = Box::new(r.pod("xsave")?);
    let xcrs = r.pod("xcrs")?;
    let lapic = r.pod("lapic")?;
    let n = r.u64("msr count")?;
    if n > MAX_MSRS {
        return Err(Error::Snapshot(format!("{n} MSRs, at most {MAX_MSRS}")));
    }
    let msrs = (0..n)
        .map(|_| r.pod::<kvm_msr_entry>("msr"))
        .collect::<Result<Vec<_>>>()?;
    Ok(VcpuState {
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        lapic,
        msrs,
        events: r.pod("vcpu events")?,
        mp_state: r.pod("mp state")?,
        debug: r.pod("debug regs")?,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn vcpu(rip: u64) -> VcpuState {
        VcpuState {
            regs: kvm_bindings::kvm_regs {
                rip,
                ..Default::default()
            },
            sregs: Default::default(),
            fpu: Default::default(),
            xsave: Box::new([7; 1024]),
            xcrs: Default::default(),
            lapic: Default::default(),
            msrs: vec![Default::default(); 3],
            events: Default::default(),
            mp_state: Default::default(),
            debug: Default::default(),
        }
    }

    /// A valid snapshot of made-up state of two vCPUs (decoding does not care where it
    /// came from).
    fn sample() -> Vec<u8> {
        VmState {
            vcpus: vec![vcpu(1), vcpu(2)],
            irqchip: Default::default(),
            clock: Default::default(),
            pit: Default::default(),
            devices: vec![1, 2, 3],
        }
        .encode()
    }

    #[test]
    fn every_header_byte_is_checked() {
        let good = sample();
        for i in 0..32 {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(VmState::decode(&bad).is_err(), "header byte {i}");
        }
    }

    #[test]
    fn a_sample_round_trips() {
        let s = VmState::decode(&sample()).unwrap();
        assert_eq!(s.devices, [1, 2, 3]);
        assert_eq!(s.vcpus.len(), 2);
        assert_eq!(
            s.vcpus.iter().map(|v| v.regs.rip).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(s.vcpus[1].msrs.len(), 3);
        assert_eq!(s.vcpus[1].xsave[5], 7);
    }

    #[test]
    fn a_vcpu_count_out_of_range_is_refused() {
        for n in [0, MAX_VCPUS + 1] {
            let mut s = VmState::decode(&sample()).unwrap();
            s.vcpus = vec![vcpu(0); n as usize];
            let e = VmState::decode(&s.encode()).unwrap_err().to_string();
            assert!(e.contains(&format!("{n} vCPUs")), "{e}");
        }
    }

    proptest! {
        /// The state arrives over the network (vmstate-size): no input may panic, and a
        /// snapshot that decodes re-encodes to the same bytes.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            if let Ok(s) = VmState::decode(&bytes) {
                prop_assert_eq!(s.encode(), bytes);
            }
        }

        /// Corrupting any byte or cutting the snapshot anywhere is refused (the checksum
        /// and lengths cover every byte).
        #[test]
        fn any_corruption_is_refused(at in any::<prop::sample::Index>(), flip in 1u8..=255, cut in any::<bool>()) {
            let good = sample();
            let i = at.index(good.len());
            let mut bad = good.clone();
            if cut {
                bad.truncate(i);
            } else {
                bad[i] ^= flip;
            }
            prop_assert!(VmState::decode(&bad).is_err());
        }
    }
}
