//! The built-in guest's parameters on its kernel command line ([`crate::boot`] lists the
//! words): [`Params`] is what the VMM writes (its `Display`) and what the guest reads
//! back ([`Params::parse`]), without allocating, so that the guest can parse it on any
//! vCPU.

use core::fmt;

use crate::boot::{
    DirtyPattern, FLAG_NONDETERMINISTIC, FLAG_SELFTEST_IO, FLAG_SELFTEST_UD, MAX_VCPUS,
};

/// Most `virtio_mmio.device=` entries the guest keeps.
pub const MAX_DEVICES: usize = 8;

/// A virtio-mmio device announced on the command line (Linux's
/// `virtio_mmio.device=<size>@<base>:<irq>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of its registers.
    pub base: u64,
    /// Bytes of its window.
    pub size: u64,
    /// Its interrupt line (the built-in guest polls and does not use it).
    pub irq: u32,
}

impl fmt::Display for MmioDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.size % 1024 == 0 {
            write!(f, "{}K@{:#x}:{}", self.size / 1024, self.base, self.irq)
        } else {
            write!(f, "{}@{:#x}:{}", self.size, self.base, self.irq)
        }
    }
}

/// The built-in guest's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// The IPv4 address.
    pub ip: [u8; 4],
    /// Its prefix length.
    pub prefix_len: u8,
    /// The service's TCP port.
    pub port: u16,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Pages per second to dirty, over all vCPUs.
    pub dirty_pages_per_sec: u64,
    /// Which pages the dirty load writes.
    pub dirty_pattern: DirtyPattern,
    /// The TSC frequency in kHz.
    pub tsc_khz: u64,
    /// Number of vCPUs (1 to [`MAX_VCPUS`]).
    pub vcpus: u32,
    /// The virtio-mmio devices, the first `device_count` of them.
    pub devices: [MmioDevice; MAX_DEVICES],
    /// How many of `devices` are set.
    pub device_count: usize,
}

/// Why a command line does not give the guest what it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamError {
    /// A word of ours has a value that does not parse (the word's key).
    Bad(&'static str),
    /// A required word is missing (its key).
    Missing(&'static str),
    /// More `virtio_mmio.device=` words than [`MAX_DEVICES`].
    TooManyDevices,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bad(k) => write!(f, "the value of {k}= does not parse"),
            Self::Missing(k) => write!(f, "no {k}= on the command line"),
            Self::TooManyDevices => write!(
                f,
                "more than {MAX_DEVICES} virtio_mmio.device= entries on the command line"
            ),
        }
    }
}

const IP: &str = "colo.ip";
const PORT: &str = "colo.port";
const NONDET: &str = "colo.nondeterministic";
const SELFTEST: &str = "colo.selftest";
const DIRTY: &str = "colo.dirty";
const PATTERN: &str = "colo.dirty_pattern";
const TSC: &str = "colo.tsc_khz";
const VCPUS: &str = "colo.vcpus";
const DEVICE: &str = "virtio_mmio.device";

/// A decimal or `0x` hexadecimal number.
fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A size with an optional K, M or G suffix (Linux's `memparse`).
fn size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    number(digits)?.checked_mul(1 << shift)
}

fn ip(s: &str) -> Option<([u8; 4], u8)> {
    let (addr, prefix) = s.split_once('/')?;
    let mut out = [0u8; 4];
    let mut parts = addr.split('.');
    for o in &mut out {
        *o = parts.next()?.parse().ok()?;
    }
    let prefix: u8 = prefix.parse().ok()?;
    (parts.next().is_none() && prefix <= 32).then_some((out, prefix))
}

fn device(s: &str) -> Option<MmioDevice> {
    let (sz, rest) = s.split_once('@')?;
    let (base, irq) = rest.split_once(':')?;
    Some(MmioDevice {
        base: number(base)?,
        size: size(sz)?,
        irq: u32::try_from(number(irq)?).ok()?,
    })
}

impl Params {
    /// The parameters of `cmdline`; words it does not know are skipped.
    ///
    /// # Errors
    /// [`ParamError`] for a missing address, port or TSC frequency, a value that does not
    /// parse, a vCPU count outside 1 to [`MAX_VCPUS`], or too many devices.
    pub fn parse(cmdline: &str) -> Result<Self, ParamError> {
        let mut p = Self {
            ip: [0; 4],
            prefix_len: 0,
            port: 0,
            flags: 0,
            dirty_pages_per_sec: 0,
            dirty_pattern: DirtyPattern::Sweep,
            tsc_khz: 0,
            vcpus: 1,
            devices: [MmioDevice {
                base: 0,
                size: 0,
                irq: 0,
            }; MAX_DEVICES],
            device_count: 0,
        };
        let (mut have_ip, mut have_port) = (false, false);
        for word in cmdline.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                IP => {
                    (p.ip, p.prefix_len) = ip(value).ok_or(ParamError::Bad(IP))?;
                    have_ip = true;
                }
                PORT => {
                    p.port = value
                        .parse()
                        .ok()
                        .filter(|&v| v != 0)
                        .ok_or(ParamError::Bad(PORT))?;
                    have_port = true;
                }
                NONDET => p.flags |= FLAG_NONDETERMINISTIC,
                SELFTEST => {
                    p.flags |= match value {
                        "ud" => FLAG_SELFTEST_UD,
                        "io" => FLAG_SELFTEST_IO,
                        _ => return Err(ParamError::Bad(SELFTEST)),
                    }
                }
                DIRTY => p.dirty_pages_per_sec = number(value).ok_or(ParamError::Bad(DIRTY))?,
                PATTERN => {
                    p.dirty_pattern =
                        DirtyPattern::from_name(value).ok_or(ParamError::Bad(PATTERN))?;
                }
                TSC => {
                    p.tsc_khz = number(value)
                        .filter(|&v| v != 0)
                        .ok_or(ParamError::Bad(TSC))?;
                }
                VCPUS => {
                    p.vcpus = value
                        .parse()
                        .ok()
                        .filter(|v| (1..=MAX_VCPUS).contains(v))
                        .ok_or(ParamError::Bad(VCPUS))?;
                }
                DEVICE => {
                    let d = device(value).ok_or(ParamError::Bad(DEVICE))?;
                    let slot = p
                        .devices
                        .get_mut(p.device_count)
                        .ok_or(ParamError::TooManyDevices)?;
                    *slot = d;
                    p.device_count += 1;
                }
                _ => {}
            }
        }
        if !have_ip {
            return Err(ParamError::Missing(IP));
        }
        if !have_port {
            return Err(ParamError::Missing(PORT));
        }
        if p.tsc_khz == 0 {
            return Err(ParamError::Missing(TSC));
        }
        Ok(p)
    }

    /// The devices the command line announces.
    pub fn devices(&self) -> &[MmioDevice] {
        &self.devices[..self.device_count.min(MAX_DEVICES)]
    }
}

/// The command line, as the VMM writes it (the guest's own words only; the devices are
/// the VMM's to add, like any machine's).
impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.ip;
        write!(
            f,
            "{IP}={a}.{b}.{c}.{d}/{} {PORT}={} {DIRTY}={} {PATTERN}={} {VCPUS}={}",
            self.prefix_len,
            self.port,
            self.dirty_pages_per_sec,
            self.dirty_pattern.name(),
            self.vcpus
        )?;
        // 0: not known yet (the VMM appends it once a vCPU exists).
        if self.tsc_khz != 0 {
            write!(f, " {TSC}={}", self.tsc_khz)?;
        }
        if self.flags & FLAG_NONDETERMINISTIC != 0 {
            write!(f, " {NONDET}")?;
        }
        for dev in self.devices() {
            write!(f, " {DEVICE}={dev}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString;

    use super::*;

    fn sample() -> Params {
        let mut p = Params::parse("colo.ip=10.0.0.2/24 colo.port=7000 colo.tsc_khz=1").unwrap();
        p.flags = FLAG_NONDETERMINISTIC;
        p.dirty_pages_per_sec = 25_600;
        p.dirty_pattern = DirtyPattern::Zipf;
        p.tsc_khz = 2_400_000;
        p.vcpus = 2;
        p.devices[0] = MmioDevice {
            base: 0xd000_0000,
            size: 4096,
            irq: 5,
        };
        p.devices[1] = MmioDevice {
            base: 0xd000_1000,
            size: 4096,
            irq: 6,
        };
        p.device_count = 2;
        p
    }

    #[test]
    fn the_command_line_round_trips() {
        let p = sample();
        let text = p.to_string();
        assert_eq!(
            text,
            "colo.ip=10.0.0.2/24 colo.port=7000 colo.dirty=25600 colo.dirty_pattern=zipf colo.vcpus=2 \
             colo.tsc_khz=2400000 colo.nondeterministic virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6"
        );
        // Words of others (Linux's, the user's) around ours change nothing.
        let noisy = ["console=ttyS0 ", &text, " clearcpuid=xsave quiet"].concat();
        assert_eq!(Params::parse(&noisy).unwrap(), p);
    }

    #[test]
    fn bad_or_missing_words_are_named() {
        let cases = [
            (
                "colo.port=7000 colo.tsc_khz=1",
                ParamError::Missing("colo.ip"),
            ),
            (
                "colo.ip=10.0.0.2/24 colo.tsc_khz=1",
                ParamError::Missing("colo.port"),
            ),
            (
                "colo.ip=10.0.0.2/24 colo.port=1",
                ParamError::Missing("colo.tsc_khz"),
            ),
            (
                "colo.ip=10.0.0.2/33 colo.port=1",
                ParamError::Bad("colo.ip"),
            ),
            ("colo.ip=10.0.2/24", ParamError::Bad("colo.ip")),
            ("colo.port=0", ParamError::Bad("colo.port")),
            ("colo.vcpus=9", ParamError::Bad("colo.vcpus")),
            ("colo.dirty=many", ParamError::Bad("colo.dirty")),
            (
                "colo.dirty_pattern=random",
                ParamError::Bad("colo.dirty_pattern"),
            ),
            ("colo.selftest=boom", ParamError::Bad("colo.selftest")),
            (
                "virtio_mmio.device=4K@0xd0000000",
                ParamError::Bad("virtio_mmio.device"),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(Params::parse(line), Err(want), "{line}");
        }
        let many = "virtio_mmio.device=4K@0x1000:1 ".repeat(MAX_DEVICES + 1);
        assert_eq!(Params::parse(&many), Err(ParamError::TooManyDevices));
    }

    #[test]
    fn device_sizes_read_like_linux() {
        assert_eq!(
            device("0x200@0xd0000000:5"),
            Some(MmioDevice {
                base: 0xd000_0000,
                size: 0x200,
                irq: 5
            })
        );
        assert_eq!(
            device("1M@4096:0").map(|d| (d.size, d.base)),
            Some((1 << 20, 4096))
        );
        assert_eq!(device("4K@:5"), None);
    }
}
