//! The memory map a Linux guest gets (the e820 table of the zero page, or the PVH memory
//! map: the same entries both ways), built from the guest's RAM regions:
//!
//! - the first region: usable RAM below 640 KiB (up to the EBDA at [`EBDA_START`]), the
//!   legacy BIOS area up to 1 MiB reserved, usable RAM from 1 MiB to its end;
//! - every further region (RAM above the 32-bit hole) usable;
//! - the devices' MMIO window ([`MMIO_WINDOW`]) reserved.

use colo_memory::GuestLayout;

use crate::abi::NET_MMIO_GPA;

/// Where the extended BIOS data area starts on a PC: RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where RAM above the legacy BIOS area starts.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// The window colo's MMIO devices live in (inside the 32-bit hole): the virtio-mmio
/// devices from `NET_MMIO_GPA` on, with room for more.
pub const MMIO_WINDOW: (u64, u64) = (NET_MMIO_GPA, 0x10_0000);

/// An e820 entry's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// RAM the guest may use (e820 type 1).
    Ram,
    /// Not RAM, not for the guest (e820 type 2).
    Reserved,
}

impl Kind {
    /// The e820 (and PVH memory map) type number.
    pub fn code(self) -> u32 {
        match self {
            Self::Ram => 1,
            Self::Reserved => 2,
        }
    }

    /// How Linux names the type when it prints the map.
    pub fn linux_name(self) -> &'static str {
        match self {
            Self::Ram => "usable",
            Self::Reserved => "reserved",
        }
    }
}

/// One entry of the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Guest-physical start.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
    /// What it is.
    pub kind: Kind,
}

impl Entry {
    /// The line Linux prints for this entry at boot (`e820__print_table`), after
    /// `BIOS-e820: `, e.g. `[mem 0x0000000000100000-0x0000000007ffffff] usable`.
    pub fn linux_line(&self) -> String {
        format!(
            "[mem {:#018x}-{:#018x}] {}",
            self.addr,
            self.addr + self.size - 1,
            self.kind.linux_name()
        )
    }
}

/// The map of a guest with these RAM regions, sorted by address. The first region must
/// start at 0 and reach past 1 MiB (the caller checks the RAM size).
pub fn build(layout: &GuestLayout) -> Vec<Entry> {
    let mut map = Vec::new();
    for r in layout.regions() {
        let end = r.gpa + r.len;
        if r.gpa == 0 && end > HIGH_MEMORY_START {
            map.push(Entry {
                addr: 0,
                size: EBDA_START,
                kind: Kind::Ram,
            });
            map.push(Entry {
                addr: EBDA_START,
                size: HIGH_MEMORY_START - EBDA_START,
                kind: Kind::Reserved,
            });
            map.push(Entry {
                addr: HIGH_MEMORY_START,
                size: end - HIGH_MEMORY_START,
                kind: Kind::Ram,
            });
        } else {
            map.push(Entry {
                addr: r.gpa,
                size: r.len,
                kind: Kind::Ram,
            });
        }
    }
    map.push(Entry {
        addr: MMIO_WINDOW.0,
        size: MMIO_WINDOW.1,
        kind: Kind::Reserved,
    });
    map.sort_by_key(|e| e.addr);
    map
}

#[cfg(test)]
mod tests {

    use super::*;

    fn layout(regions: &[(u64, u64)]) -> GuestLayout {
        GuestLayout::from_ranges(4096, regions).unwrap()
    }

    #[test]
    fn small_ram_is_low_memory_the_bios_hole_and_the_rest_with_the_mmio_window_reserved() {
        let map = build(&layout(&[(0, 128 << 20)]));
        let lines: Vec<_> = map.iter().map(Entry::linux_line).collect();
        assert_eq!(
            lines,
            [
                "[mem 0x0000000000000000-0x000000000009fbff] usable",
                "[mem 0x000000000009fc00-0x00000000000fffff] reserved",
                "[mem 0x0000000000100000-0x0000000007ffffff] usable",
                "[mem 0x00000000d0000000-0x00000000d00fffff] reserved",
            ]
        );
    }

    #[test]
    fn ram_above_the_hole_is_a_second_usable_range_after_the_mmio_window() {
        let map = build(&layout(&[(0, 3 << 30), (4 << 30, 1 << 30)]));
        assert_eq!(map.len(), 5);
        assert_eq!(
            map[2],
            Entry {
                addr: 1 << 20,
                size: (3 << 30) - (1 << 20),
                kind: Kind::Ram
            }
        );
        assert_eq!(map[3].kind, Kind::Reserved);
        assert_eq!(
            map[4],
            Entry {
                addr: 4 << 30,
                size: 1 << 30,
                kind: Kind::Ram
            }
        );
        assert_eq!(
            map[4].linux_line(),
            "[mem 0x0000000100000000-0x000000013fffffff] usable"
        );
    }
}
