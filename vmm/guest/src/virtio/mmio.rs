//! The virtio-mmio (version 2) register window and the device initialization sequence of
//! the virtio 1.x specification (section 3.1.1, "Driver Requirements: Device
//! Initialization", and 4.2.3, "MMIO-specific Initialization And Device Operation").

use core::fmt;

use super::queue::VirtQueue;

/// "virt".
const MAGIC: u32 = 0x7472_6976;

mod reg {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    pub const CONFIG: usize = 0x100;
}

mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const FAILED: u32 = 128;
}

/// VIRTIO_F_VERSION_1: the modern (virtio 1.x) interface.
pub const F_VERSION_1: u64 = 1 << 32;

/// Why a device could not be initialized.
#[derive(Debug, Clone, Copy)]
pub enum InitError {
    /// No virtio-mmio window at the address (wrong magic value).
    NoDevice(u32),
    /// A transport version other than 2 (modern).
    Version(u32),
    /// Another device type than expected.
    DeviceId {
        /// The id expected.
        want: u32,
        /// The id found.
        found: u32,
    },
    /// The device does not offer features the driver requires.
    MissingFeatures(u64),
    /// The device cleared FEATURES_OK: it refused the negotiated features.
    FeaturesRefused,
    /// A queue is already live, or its size is zero.
    QueueUnavailable(u16),
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoDevice(m) => write!(f, "no virtio-mmio device (magic {m:#x})"),
            Self::Version(v) => write!(f, "virtio-mmio version {v}, need 2"),
            Self::DeviceId { want, found } => write!(f, "device id {found}, expected {want}"),
            Self::MissingFeatures(b) => write!(f, "required features {b:#x} not offered"),
            Self::FeaturesRefused => write!(f, "the device refused FEATURES_OK"),
            Self::QueueUnavailable(q) => write!(f, "queue {q} is unavailable"),
        }
    }
}

/// One device's register window (4 KiB of MMIO; every access exits to the VMM).
#[derive(Debug, Clone, Copy)]
pub struct Mmio {
    base: usize,
}

impl Mmio {
    fn reg(&self, offset: usize) -> *mut u32 {
        core::ptr::with_exposed_provenance_mut(self.base + offset)
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `base` is a virtio-mmio window of the VMM (colo_guest_abi::boot),
        // identity-mapped and not RAM; `offset` is an aligned register inside it. The read
        // exits to the VMM.
        unsafe { self.reg(offset).read_volatile() }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in `read`; writing a register has no effect on guest memory other
        // than what the virtio protocol lets the device do.
        unsafe { self.reg(offset).write_volatile(value) }
    }

    /// One byte of the device-specific configuration space.
    pub fn config_u8(&self, offset: usize) -> u8 {
        let p = core::ptr::with_exposed_provenance::<u8>(self.base + reg::CONFIG + offset);
        // SAFETY: as in `read`; the config space starts at 0x100 of the window.
        unsafe { p.read_volatile() }
    }

    /// A little-endian u64 of the configuration space, read as two 32-bit halves.
    pub fn config_u64(&self, offset: usize) -> u64 {
        let lo = self.read(reg::CONFIG + offset);
        let hi = self.read(reg::CONFIG + offset + 4);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Tells the device that queue `index` has new buffers. KVM completes the write
    /// without an exit; the VMM's device thread processes the queue while the guest runs
    /// on, so its used entries come later.
    pub fn notify(&self, index: u16) {
        // The ring updates must be visible before the device looks at the queue.
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        self.write(reg::QUEUE_NOTIFY, u32::from(index));
    }
}

/// An initialized device: its window, its queues and the features both sides agreed on.
pub struct Device {
    /// The register window.
    pub mmio: Mmio,
    /// The queues, by index.
    pub queues: alloc::vec::Vec<VirtQueue>,
    /// Negotiated feature bits.
    pub features: u64,
}

/// What a driver asks of [`init`].
pub struct Spec<'a> {
    /// Guest-physical address of the window.
    pub base: u64,
    /// Expected device id (1 net, 2 block).
    pub device_id: u32,
    /// Features the driver cannot do without (VERSION_1 is added).
    pub required: u64,
    /// Features the driver uses when offered.
    pub optional: u64,
    /// Largest size wanted for each queue (clamped to the device's maximum).
    pub queue_sizes: &'a [u16],
}

/// Resets and initializes the device described by `spec`, sets up its queues and sets
/// DRIVER_OK.
///
/// # Errors
/// [`InitError`] if there is no such device or it refuses the driver; the device is then
/// left with FAILED set.
pub fn init(spec: &Spec<'_>) -> Result<Device, InitError> {
    let mmio = Mmio {
        base: spec.base as usize,
    };
    let magic = mmio.read(reg::MAGIC);
    if magic != MAGIC {
        return Err(InitError::NoDevice(magic));
    }
    let version = mmio.read(reg::VERSION);
    if version != 2 {
        return Err(InitError::Version(version));
    }
    let found = mmio.read(reg::DEVICE_ID);
    if found != spec.device_id {
        return Err(InitError::DeviceId {
            want: spec.device_id,
            found,
        });
    }
    let r = negotiate(mmio, spec);
    if r.is_err() {
        let s = mmio.read(reg::STATUS);
        mmio.write(reg::STATUS, s | status::FAILED);
    }
    r
}

fn negotiate(mmio: Mmio, spec: &Spec<'_>) -> Result<Device, InitError> {
    mmio.write(reg::STATUS, 0);
    while mmio.read(reg::STATUS) != 0 {
        core::hint::spin_loop();
    }
    let mut s = status::ACKNOWLEDGE;
    mmio.write(reg::STATUS, s);
    s |= status::DRIVER;
    mmio.write(reg::STATUS, s);

    mmio.write(reg::DEVICE_FEATURES_SEL, 0);
    let lo = mmio.read(reg::DEVICE_FEATURES);
    mmio.write(reg::DEVICE_FEATURES_SEL, 1);
    let hi = mmio.read(reg::DEVICE_FEATURES);
    let offered = u64::from(lo) | (u64::from(hi) << 32);
    let required = spec.required | F_VERSION_1;
    if offered & required != required {
        return Err(InitError::MissingFeatures(required & !offered));
    }
    let features = required | (spec.optional & offered);
    mmio.write(reg::DRIVER_FEATURES_SEL, 0);
    mmio.write(reg::DRIVER_FEATURES, features as u32);
    mmio.write(reg::DRIVER_FEATURES_SEL, 1);
    mmio.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
    s |= status::FEATURES_OK;
    mmio.write(reg::STATUS, s);
    if mmio.read(reg::STATUS) & status::FEATURES_OK == 0 {
        return Err(InitError::FeaturesRefused);
    }

    let mut queues = alloc::vec::Vec::with_capacity(spec.queue_sizes.len());
    for (index, &want) in spec.queue_sizes.iter().enumerate() {
        let index = index as u16;
        mmio.write(reg::QUEUE_SEL, u32::from(index));
        if mmio.read(reg::QUEUE_READY) != 0 {
            return Err(InitError::QueueUnavailable(index));
        }
        let max = mmio.read(reg::QUEUE_NUM_MAX).min(u32::from(want)) as u16;
        // Split queues need a power of two; take the largest one that fits.
        let size = if max == 0 {
            0
        } else {
            1 << (15 - max.leading_zeros())
        };
        if size == 0 {
            return Err(InitError::QueueUnavailable(index));
        }
        let q = VirtQueue::new(index, size);
        let (desc, driver, device) = q.addresses();
        mmio.write(reg::QUEUE_NUM, u32::from(size));
        mmio.write(reg::QUEUE_DESC_LOW, desc as u32);
        mmio.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        mmio.write(reg::QUEUE_DRIVER_LOW, driver as u32);
        mmio.write(reg::QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
        mmio.write(reg::QUEUE_DEVICE_LOW, device as u32);
        mmio.write(reg::QUEUE_DEVICE_HIGH, (device >> 32) as u32);
        mmio.write(reg::QUEUE_READY, 1);
        queues.push(q);
    }

    s |= status::DRIVER_OK;
    mmio.write(reg::STATUS, s);
    Ok(Device {
        mmio,
        queues,
        features,
    })
}

/// The device id of the virtio-mmio device at `base` (0, virtio's "no device", if no
/// virtio-mmio magic is there): how the guest tells the command line's devices apart.
pub fn device_id(base: u64) -> u32 {
    let mmio = Mmio {
        base: base as usize,
    };
    if mmio.read(reg::MAGIC) == MAGIC {
        mmio.read(reg::DEVICE_ID)
    } else {
        0
    }
}
