//! The boot contract between the colo VMM and its built-in guest (version 3).
//!
//! It holds only plain constants and `#[repr(C)]` types; the byte layout of
//! [`BootParams`] is checked by a test below.
//!
//! # Machine
//! - [`BootParams::vcpus`] vCPUs (1 to [`MAX_VCPUS`]), each in 64-bit long mode at CPL3.
//!   The VMM builds the GDT, the page tables (identity map of RAM and of the MMIO window,
//!   2 MiB pages, U and W bits on every entry) and loads the guest ELF's PT_LOAD segments.
//!   Every vCPU enters at the ELF entry point at once, with `rsp` = 0 (the guest sets a
//!   stack of its own for each vCPU in `_start`), `rdi` = [`BOOT_PARAMS_GPA`] and `rsi` =
//!   the vCPU's index (0 to `vcpus - 1`).
//! - The devices run on a VMM thread of their own, while the guest runs. When a device
//!   has put buffers into a used ring (a frame received or sent, a disk request done), the
//!   VMM ends vCPU 0's idle wait early. The other vCPUs' idle waits end on time alone.
//! - RAM starts at guest-physical 0. The first 2 MiB below [`IMAGE_GPA`] hold VMM data:
//!   the GDT, the page tables, the boot parameters and the console buffer.
//! - The guest runs with interrupts off (RFLAGS.IF = 0), so the devices' interrupt lines
//!   (GSI 5 net, GSI 6 block, edge-triggered) are raised but never taken. The guest polls
//!   its virtqueues and, when it has nothing to do, waits with [`PORT_IDLE`].
//!
//! # Ports (`out` at CPL3 exits to the VMM; each exit costs about 20 us, so batch)
//! - [`PORT_CONSOLE`]: `out dx, eax` with eax = number of bytes the guest put at
//!   [`CONSOLE_GPA`] (at most [`CONSOLE_LEN`]). The VMM logs them (UTF-8, lossy).
//! - [`PORT_IDLE`]: `out dx, eax` with eax = most microseconds to wait. On vCPU 0 the VMM
//!   returns earlier when a device used buffers (and a wait may end early for no reason
//!   the guest can see, e.g. a checkpoint).
//! - [`PORT_EXIT`]: `out dx, eax` with eax = exit status. The VM stops.
//!
//! # Devices: virtio-mmio version 2 (modern), polled
//! - net at [`NET_MMIO_GPA`] (device id 1): queue 0 receive, queue 1 transmit, at most
//!   [`NET_QUEUE_SIZE`] entries each. Offers VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MAC (MAC in
//!   config space). Every buffer starts with the 12-byte `virtio_net_hdr_v1` (all zero on
//!   transmit).
//! - block at [`BLK_MMIO_GPA`] (device id 2): queue 0, at most [`BLK_QUEUE_SIZE`] entries.
//!   Offers VIRTIO_F_VERSION_1 and VIRTIO_BLK_F_FLUSH; capacity (in 512-byte sectors) in
//!   config space at 0x100. Requests: header {type u32, reserved u32, sector u64}, data,
//!   status byte.
//! - Notification: write the queue index to QueueNotify (0x50) as one 32-bit write. KVM
//!   completes the write itself (an ioeventfd: no exit) and the VMM's device thread
//!   processes the queue shortly after, while the guest runs on: used entries appear
//!   later, so a driver waits for them (polling the used ring, then [`PORT_IDLE`]).
//!   (Version 2 processed the queue during the write's exit.)
//! - Time: `rdtsc` (not trapped) and [`BootParams::tsc_khz`].

/// Where the VMM puts [`BootParams`].
pub const BOOT_PARAMS_GPA: u64 = 0x7000;
/// The console buffer.
pub const CONSOLE_GPA: u64 = 0x8000;
/// Size of the console buffer.
pub const CONSOLE_LEN: u64 = 0x1000;
/// Where the guest image is linked and loaded.
pub const IMAGE_GPA: u64 = 0x20_0000;

/// Console output port.
pub const PORT_CONSOLE: u16 = 0x510;
/// Idle/wait port.
pub const PORT_IDLE: u16 = 0x511;
/// Exit port.
pub const PORT_EXIT: u16 = 0x512;

/// The virtio-net device's MMIO window.
pub const NET_MMIO_GPA: u64 = 0xd000_0000;
/// The virtio-blk device's MMIO window.
pub const BLK_MMIO_GPA: u64 = 0xd000_1000;
/// Size of each device's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;
/// Largest virtio-net queue.
pub const NET_QUEUE_SIZE: u16 = 256;
/// Largest virtio-blk queue.
pub const BLK_QUEUE_SIZE: u16 = 64;

/// "COLOBOOT".
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"COLOBOOT");
/// This contract's version (2: several vCPUs, `rsi` = the vCPU's index; 3: devices
/// complete queues after the notification, not during it).
pub const BOOT_VERSION: u32 = 3;
/// Most vCPUs a VM of this contract has (the guest keeps a stack for each).
pub const MAX_VCPUS: u32 = 8;

/// [`BootParams::flags`]: put the guest's TSC into every reply, so that two copies of the
/// guest answer differently (work for the COLO compare).
pub const FLAG_NONDETERMINISTIC: u32 = 1;

/// What the VMM tells the guest at boot.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootParams {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`BOOT_VERSION`].
    pub version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Bytes of RAM from guest-physical 0.
    pub ram_size: u64,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// The guest's IPv4 address.
    pub ip: [u8; 4],
    /// The gateway (unused by the service, kept for completeness).
    pub gateway: [u8; 4],
    /// Prefix length of the guest's subnet.
    pub prefix_len: u8,
    /// Padding.
    pub _pad: u8,
    /// TCP port of the service.
    pub port: u16,
    /// Padding.
    pub _pad2: u32,
    /// Pages per second the guest dirties in its scratch area (0: none), in all: each of
    /// the `vcpus` vCPUs writes an equal share into its own equal slice of the area.
    pub dirty_pages_per_sec: u64,
    /// Guest-physical start of the scratch area (page-aligned).
    pub scratch_gpa: u64,
    /// Bytes of the scratch area.
    pub scratch_len: u64,
    /// Number of vCPUs (1 to [`MAX_VCPUS`]).
    pub vcpus: u32,
    /// Padding.
    pub _pad3: u32,
}

/// One vCPU's part of the dirty load ([`BootParams::dirty_pages_per_sec`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyShare {
    /// Pages per second this vCPU writes.
    pub pages_per_sec: u64,
    /// Guest-physical start of its slice of the scratch area (page-aligned).
    pub gpa: u64,
    /// Bytes of its slice (whole pages).
    pub len: u64,
}

impl BootParams {
    /// vCPU `index`'s share of the dirty load: the rate split evenly over the vCPUs (the
    /// first ones take the remainder), and the scratch area cut into as many equal slices
    /// of whole pages, one per vCPU in order. `vcpus` of 0 counts as 1.
    pub fn dirty_share(&self, index: u32) -> DirtyShare {
        const PAGE: u64 = 4096;
        let n = u64::from(self.vcpus.max(1));
        let i = u64::from(index);
        let rate = self.dirty_pages_per_sec;
        let slice = self.scratch_len / PAGE / n * PAGE;
        DirtyShare {
            pages_per_sec: rate / n + u64::from(i < rate % n),
            gpa: self.scratch_gpa + i * slice,
            len: slice,
        }
    }
}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn boot_params_keep_their_byte_layout() {
        assert_eq!(size_of::<BootParams>(), 80);
        let offsets = [
            offset_of!(BootParams, magic),
            offset_of!(BootParams, version),
            offset_of!(BootParams, flags),
            offset_of!(BootParams, ram_size),
            offset_of!(BootParams, tsc_khz),
            offset_of!(BootParams, ip),
            offset_of!(BootParams, gateway),
            offset_of!(BootParams, prefix_len),
            offset_of!(BootParams, _pad),
            offset_of!(BootParams, port),
            offset_of!(BootParams, _pad2),
            offset_of!(BootParams, dirty_pages_per_sec),
            offset_of!(BootParams, scratch_gpa),
            offset_of!(BootParams, scratch_len),
            offset_of!(BootParams, vcpus),
            offset_of!(BootParams, _pad3),
        ];
        assert_eq!(
            offsets,
            [0, 8, 12, 16, 24, 32, 36, 40, 41, 42, 44, 48, 56, 64, 72, 76]
        );
        assert_eq!(BOOT_MAGIC.to_le_bytes(), *b"COLOBOOT");
    }

    fn params(vcpus: u32, rate: u64, scratch_len: u64) -> BootParams {
        BootParams {
            magic: BOOT_MAGIC,
            version: BOOT_VERSION,
            flags: 0,
            ram_size: 64 << 20,
            tsc_khz: 1,
            ip: [0; 4],
            gateway: [0; 4],
            prefix_len: 24,
            _pad: 0,
            port: 7000,
            _pad2: 0,
            dirty_pages_per_sec: rate,
            scratch_gpa: 16 << 20,
            scratch_len,
            vcpus,
            _pad3: 0,
        }
    }

    #[test]
    fn the_dirty_load_is_shared_evenly_over_disjoint_slices() {
        let one = params(1, 25_600, 48 << 20).dirty_share(0);
        assert_eq!(
            (one.pages_per_sec, one.gpa, one.len),
            (25_600, 16 << 20, 48 << 20)
        );
        // 3 vCPUs: 10 pages/s and 10 pages of scratch (plus a partial page) split 4/3/3
        // and 3 pages each, back to back.
        let p = params(3, 10, 10 * 4096 + 100);
        let shares: [DirtyShare; 3] = [p.dirty_share(0), p.dirty_share(1), p.dirty_share(2)];
        assert_eq!(shares.map(|s| s.pages_per_sec), [4, 3, 3]);
        assert_eq!(shares.map(|s| s.len), [3 * 4096; 3]);
        assert_eq!(
            shares.map(|s| s.gpa),
            [16 << 20, (16 << 20) + 3 * 4096, (16 << 20) + 6 * 4096]
        );
        assert_eq!(params(0, 7, 4096).dirty_share(0).pages_per_sec, 7);
    }
}
