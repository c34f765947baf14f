//! The handshake: each side says who it is, what guest memory it protects and how many
//! vCPUs its VM has, and each refuses a peer that does not match.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Error, Result};
use crate::framing;

/// Most guest memory regions a handshake may describe.
pub const MAX_REGIONS: usize = 64;
/// Most vCPUs a handshake may announce.
pub const MAX_VCPUS: u32 = 1024;

pub use colo_auth::Role;

/// One guest memory region: guest-physical base and length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    /// Guest-physical base address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What a side announces in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    role: Role,
    pair_id: u64,
    page_size: u32,
    features: u64,
    vcpus: u32,
    regions: Vec<MemRegion>,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HelloWire {
    role: u8,
    reserved: [u8; 3],
    page_size: U32,
    pair_id: U64,
    features: U64,
    region_count: U32,
    vcpus: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RegionWire {
    gpa: U64,
    len: U64,
}

const FIXED: usize = size_of::<HelloWire>();
const PER_REGION: usize = size_of::<RegionWire>();

/// Largest encoded Hello.
pub const MAX_HELLO_LEN: usize = FIXED + MAX_REGIONS * PER_REGION;

impl Hello {
    /// A Hello for `role` in pair `pair_id`, protecting `regions` with pages of `page_size`,
    /// of a VM with one vCPU (see [`Hello::with_vcpus`]).
    ///
    /// # Errors
    /// [`Error::Handshake`] if the page size is not a power of two of at least 4 KiB, a
    /// region is empty or not page-aligned, regions overlap, or there are more than
    /// [`MAX_REGIONS`].
    pub fn new(role: Role, pair_id: u64, page_size: u32, regions: Vec<MemRegion>) -> Result<Self> {
        let h = Self {
            role,
            pair_id,
            page_size,
            features: 0,
            vcpus: 1,
            regions,
        };
        h.validate()?;
        Ok(h)
    }

    /// Sets the VM's vCPU count (1 by default; must match the peer's).
    ///
    /// # Errors
    /// [`Error::Handshake`] for 0 or more than `MAX_VCPUS`.
    pub fn with_vcpus(mut self, vcpus: u32) -> Result<Self> {
        self.vcpus = vcpus;
        self.validate()?;
        Ok(self)
    }

    /// The VM's vCPU count.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Sets the feature bits (reserved for optional capabilities; must match the peer's).
    pub fn with_features(mut self, features: u64) -> Self {
        self.features = features;
        self
    }

    /// The announcing side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The pair's identifier.
    pub fn pair_id(&self) -> u64 {
        self.pair_id
    }

    /// The page size of the guest memory layout.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The guest memory regions.
    pub fn regions(&self) -> &[MemRegion] {
        &self.regions
    }

    /// Total guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    fn validate(&self) -> Result<()> {
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(Error::Handshake(format!(
                "{} vCPUs, expected 1 to {MAX_VCPUS}",
                self.vcpus
            )));
        }
        let ps = u64::from(self.page_size);
        if !self.page_size.is_power_of_two() || self.page_size < 4096 {
            return Err(Error::Handshake(format!(
                "page size {} is not a power of two >= 4096",
                self.page_size
            )));
        }
        if self.regions.len() > MAX_REGIONS {
            return Err(Error::Handshake(format!(
                "{} memory regions, at most {MAX_REGIONS}",
                self.regions.len()
            )));
        }
        let mut sorted = self.regions.clone();
        sorted.sort_by_key(|r| r.gpa);
        for (i, r) in sorted.iter().enumerate() {
            if r.len == 0 || r.gpa % ps != 0 || r.len % ps != 0 {
                return Err(Error::Handshake(format!(
                    "memory region gpa={:#x} len={:#x} is empty or not aligned to {ps}",
                    r.gpa, r.len
                )));
            }
            let end = r
                .gpa
                .checked_add(r.len)
                .ok_or_else(|| Error::Handshake("memory region wraps".into()))?;
            if let Some(next) = sorted.get(i + 1) {
                if next.gpa < end {
                    return Err(Error::Handshake(format!(
                        "memory regions at {:#x} and {:#x} overlap",
                        r.gpa, next.gpa
                    )));
                }
            }
        }
        Ok(())
    }

    /// Encodes the Hello payload.
    pub fn encode(&self) -> Vec<u8> {
        let fixed = HelloWire {
            role: self.role.code(),
            reserved: [0; 3],
            page_size: self.page_size.into(),
            pair_id: self.pair_id.into(),
            features: self.features.into(),
            region_count: (self.regions.len() as u32).into(),
            vcpus: self.vcpus.into(),
        };
        let mut out = Vec::with_capacity(FIXED + self.regions.len() * PER_REGION);
        out.extend_from_slice(fixed.as_bytes());
        for r in &self.regions {
            out.extend_from_slice(
                RegionWire {
                    gpa: r.gpa.into(),
                    len: r.len.into(),
                }
                .as_bytes(),
            );
        }
        out
    }

    /// Decodes and validates a Hello payload.
    ///
    /// # Errors
    /// [`framing::Error::Truncated`] if `bytes` is shorter than the region count says,
    /// [`Error::Protocol`] for trailing bytes or an unknown role, [`Error::Handshake`] for
    /// an invalid layout.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (fixed, rest) =
            HelloWire::read_from_prefix(bytes).map_err(|_| framing::Error::Truncated {
                got: bytes.len(),
                want: FIXED,
            })?;
        if fixed.reserved != [0; 3] {
            return Err(Error::Protocol("reserved Hello fields are not zero".into()));
        }
        let count = fixed.region_count.get() as usize;
        if count > MAX_REGIONS {
            return Err(framing::Error::TooLarge {
                what: "region count",
                len: count as u64,
                max: MAX_REGIONS as u64,
            }
            .into());
        }
        let want = count * PER_REGION;
        if rest.len() < want {
            return Err(framing::Error::Truncated {
                got: bytes.len(),
                want: FIXED + want,
            }
            .into());
        }
        if rest.len() > want {
            return Err(Error::Protocol(format!(
                "{} trailing bytes after the Hello",
                rest.len() - want
            )));
        }
        let regions = rest
            .chunks_exact(PER_REGION)
            .map(|c| {
                let r = RegionWire::read_from_bytes(c).expect("chunk has the region's size");
                MemRegion {
                    gpa: r.gpa.get(),
                    len: r.len.get(),
                }
            })
            .collect();
        let h = Self {
            role: Role::from_code(fixed.role)
                .ok_or_else(|| Error::Protocol(format!("unknown role code {}", fixed.role)))?,
            pair_id: fixed.pair_id.get(),
            page_size: fixed.page_size.get(),
            features: fixed.features.get(),
            vcpus: fixed.vcpus.get(),
            regions,
        };
        h.validate()?;
        Ok(h)
    }

    /// Checks that `peer` is the partner this side expects: the opposite role, the same
    /// pair, page size, features, memory layout and vCPU count.
    ///
    /// # Errors
    /// [`Error::Handshake`] naming the first mismatch.
    pub fn check_peer(&self, peer: &Hello) -> Result<()> {
        if peer.role != self.role.peer() {
            return Err(Error::Handshake(format!(
                "peer is also {:?}; expected {:?}",
                peer.role,
                self.role.peer()
            )));
        }
        if peer.pair_id != self.pair_id {
            return Err(Error::Handshake(format!(
                "pair id mismatch: ours {:#x}, peer's {:#x}",
                self.pair_id, peer.pair_id
            )));
        }
        if peer.page_size != self.page_size {
            return Err(Error::Handshake(format!(
                "page size mismatch: ours {}, peer's {}",
                self.page_size, peer.page_size
            )));
        }
        if peer.features != self.features {
            return Err(Error::Handshake(format!(
                "feature mismatch: ours {:#x}, peer's {:#x}",
                self.features, peer.features
            )));
        }
        if peer.regions != self.regions {
            return Err(Error::Handshake(format!(
                "guest memory layout mismatch: ours {:?}, peer's {:?}",
                self.regions, peer.regions
            )));
        }
        if peer.vcpus != self.vcpus {
            return Err(Error::Handshake(format!(
                "vCPU count mismatch: ours {}, peer's {} (give both sides the same --vcpus)",
                self.vcpus, peer.vcpus
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(role: Role) -> Hello {
        Hello::new(
            role,
            0xabcd,
            4096,
            vec![
                MemRegion {
                    gpa: 0,
                    len: 1 << 20,
                },
                MemRegion {
                    gpa: 1 << 32,
                    len: 8192,
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn golden_encode_decode() {
        let h = Hello::new(
            Role::Secondary,
            0x0102,
            4096,
            vec![MemRegion {
                gpa: 0x1000,
                len: 0x2000,
            }],
        )
        .unwrap();
        let golden: Vec<u8> = [
            &[2u8, 0, 0, 0][..],          // role secondary, reserved
            &[0, 0x10, 0, 0],             // page size 4096
            &[2, 1, 0, 0, 0, 0, 0, 0],    // pair id
            &[0; 8],                      // features
            &[1, 0, 0, 0],                // region count
            &[1, 0, 0, 0],                // vCPUs
            &[0, 0x10, 0, 0, 0, 0, 0, 0], // gpa
            &[0, 0x20, 0, 0, 0, 0, 0, 0], // len
        ]
        .concat();
        assert_eq!(h.encode(), golden);
        assert_eq!(Hello::decode(&golden).unwrap(), h);
    }

    #[test]
    fn matching_peers_accept_each_other() {
        let p = hello(Role::Primary);
        let s = hello(Role::Secondary);
        p.check_peer(&s).unwrap();
        s.check_peer(&p).unwrap();
    }

    #[test]
    fn each_mismatch_is_refused_with_a_reason() {
        let p = hello(Role::Primary);
        let e = p.check_peer(&hello(Role::Primary)).unwrap_err().to_string();
        assert!(e.contains("also Primary"), "{e}");
        let other_pair = Hello::new(Role::Secondary, 1, 4096, p.regions().to_vec()).unwrap();
        assert!(
            p.check_peer(&other_pair)
                .unwrap_err()
                .to_string()
                .contains("pair id")
        );
        let other_ps = Hello::new(
            Role::Secondary,
            0xabcd,
            8192,
            vec![MemRegion {
                gpa: 0,
                len: 1 << 20,
            }],
        )
        .unwrap();
        assert!(
            p.check_peer(&other_ps)
                .unwrap_err()
                .to_string()
                .contains("page size")
        );
        let other_mem = Hello::new(
            Role::Secondary,
            0xabcd,
            4096,
            vec![MemRegion {
                gpa: 0,
                len: 1 << 21,
            }],
        )
        .unwrap();
        assert!(
            p.check_peer(&other_mem)
                .unwrap_err()
                .to_string()
                .contains("layout")
        );
        let other_feat = hello(Role::Secondary).with_features(1);
        assert!(
            p.check_peer(&other_feat)
                .unwrap_err()
                .to_string()
                .contains("feature")
        );
        let other_vcpus = hello(Role::Secondary).with_vcpus(2).unwrap();
        let e = p.check_peer(&other_vcpus).unwrap_err().to_string();
        assert!(e.contains("vCPU count mismatch: ours 1, peer's 2"), "{e}");
        let two = hello(Role::Primary).with_vcpus(2).unwrap();
        two.check_peer(&other_vcpus).unwrap();
    }

    #[test]
    fn the_vcpu_count_travels_and_is_checked() {
        let h = hello(Role::Primary).with_vcpus(8).unwrap();
        let b = h.encode();
        assert_eq!(b[28..32], 8u32.to_le_bytes());
        assert_eq!(Hello::decode(&b).unwrap().vcpus(), 8);
        assert!(hello(Role::Primary).with_vcpus(0).is_err());
        assert!(hello(Role::Primary).with_vcpus(MAX_VCPUS + 1).is_err());
        let mut zero = b;
        zero[28..32].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(Hello::decode(&zero), Err(Error::Handshake(_))));
    }

    #[test]
    fn invalid_layouts_are_refused() {
        assert!(Hello::new(Role::Primary, 1, 4095, vec![]).is_err());
        assert!(
            Hello::new(
                Role::Primary,
                1,
                4096,
                vec![MemRegion { gpa: 1, len: 4096 }]
            )
            .is_err()
        );
        assert!(Hello::new(Role::Primary, 1, 4096, vec![MemRegion { gpa: 0, len: 0 }]).is_err());
        let overlap = vec![
            MemRegion { gpa: 0, len: 8192 },
            MemRegion {
                gpa: 4096,
                len: 4096,
            },
        ];
        assert!(Hello::new(Role::Primary, 1, 4096, overlap).is_err());
        let wrap = vec![MemRegion {
            gpa: u64::MAX - 4095,
            len: 8192,
        }];
        assert!(Hello::new(Role::Primary, 1, 4096, wrap).is_err());
    }

    #[test]
    fn truncated_and_trailing_payloads_are_refused() {
        let b = hello(Role::Primary).encode();
        for cut in 0..b.len() {
            assert!(Hello::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(Hello::decode(&long), Err(Error::Protocol(_))));
        let mut reserved = b.clone();
        reserved[1] = 1;
        assert!(matches!(Hello::decode(&reserved), Err(Error::Protocol(_))));
        let mut many = b;
        many[24..28].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            Hello::decode(&many),
            Err(Error::Frame(framing::Error::TooLarge { .. }))
        ));
    }
}
