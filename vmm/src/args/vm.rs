//! The options that describe one VM, and the VM they build (shared by `colo run`, the two
//! sides of a pair and `colo bench vm`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Args;
use colo_machine::devices::backend::NetBackend;
use colo_machine::devices::console::ConsoleSink;
use colo_machine::{
    BuiltInGuest, DirtyPattern, Error, Guest, LinuxGuest, Machine, Result, VmConfig,
};

use super::parse_size;

/// The options that describe one VM (shared by `colo run` and the pair commands).
#[derive(Debug, Args, Clone)]
pub struct VmArgs {
    /// Guest RAM (a multiple of 2MiB, at least 32MiB) [default: 64MiB; 256MiB with
    /// --kernel]. A Linux guest with more than 3GiB gets the rest above 4GiB.
    #[arg(long, value_parser = parse_size)]
    pub ram: Option<u64>,
    /// vCPUs (1 to 8), each on its own thread. vCPU 0 runs the guest's service; every
    /// other vCPU runs a worker that dirties its own share of --dirty-rate in its own
    /// pages and counts its turns (the service's VCPUS command reports the counts).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub vcpus: u32,
    /// The disk image (a raw file). Created with --disk-size if it does not exist.
    #[arg(long, default_value = "colo-disk.img")]
    pub disk: PathBuf,
    /// Size of a new disk image; if given for an existing image, the sizes must agree.
    #[arg(long, value_parser = parse_size)]
    pub disk_size: Option<u64>,
    /// The tap device to attach (created if missing; needs root) [default: colo0 for the
    /// built-in guest; a Linux guest gets a network device only when --tap or
    /// --net-socket is given].
    #[arg(long)]
    pub tap: Option<String>,
    /// Address given to the host side of the tap, or "none" to leave the tap unconfigured.
    #[arg(long, default_value = "10.0.2.1/24")]
    pub host_ip: String,
    /// The guest's address.
    #[arg(long, default_value = "10.0.2.15/24")]
    pub guest_ip: String,
    /// The service's TCP port in the guest.
    #[arg(long, default_value_t = 7000)]
    pub port: u16,
    /// Instead of a tap, exchange frames over this Unix socket (4-byte big-endian length,
    /// then the frame; the VMM connects to it).
    #[arg(long, conflicts_with = "tap")]
    pub net_socket: Option<PathBuf>,
    /// Put the guest's TSC into every reply, so two copies of the guest answer differently.
    #[arg(long)]
    pub nondeterministic: bool,
    /// Pages per second the guest dirties in its scratch memory (a checkpoint load), in
    /// all: every vCPU writes an equal share into its own slice.
    #[arg(long, default_value_t = 0)]
    pub dirty_rate: u64,
    /// Which pages the built-in guest's dirty load writes: zipf (a few pages very often,
    /// most seldom, like a service's working set: ranks from a Zipf distribution of
    /// exponent 1), hot (a fixed set of 4 MiB per vCPU rewritten in turn) or sweep (every
    /// page of its slice in turn: each write is to a page not written for the longest time).
    /// Hot and sweep check each page before writing it again and stop the guest (exit
    /// status 7) if it lost what they wrote.
    #[arg(long, default_value = "zipf", value_parser = parse_pattern)]
    pub dirty_pattern: DirtyPattern,
    /// A guest image to run instead of the built-in one (an x86-64 ELF linked at 0x200000).
    #[arg(long)]
    pub image: Option<PathBuf>,
    #[command(flatten)]
    pub kernel: KernelArgs,
}

/// The built-in guest's tap device when none is given.
const DEFAULT_TAP: &str = "colo0";
/// Default size of a new disk image.
const DEFAULT_DISK: u64 = 16 << 20;
/// Default RAM of the built-in guest.
const DEFAULT_RAM: u64 = 64 << 20;
/// Default RAM of a Linux guest.
const DEFAULT_LINUX_RAM: u64 = 256 << 20;

/// The options that boot a Linux kernel instead of the built-in guest.
#[derive(Debug, Args, Clone, Default)]
pub struct KernelArgs {
    /// Boot this Linux kernel instead of the built-in guest: an ELF vmlinux with the PVH
    /// note (CONFIG_PVH=y), or a bzImage (64-bit boot protocol).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// An initramfs for --kernel.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line [default: console=ttyS0 earlyprintk=serial,ttyS0 reboot=k
    /// panic=-1 pci=off 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd]; colo
    /// appends the entries it owns.
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
}

impl KernelArgs {
    /// The Linux guest these describe, if --kernel was given.
    pub fn guest(&self) -> Option<LinuxGuest> {
        self.kernel.as_ref().map(|k| LinuxGuest {
            kernel: k.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
        })
    }
}

/// The names `--dirty-pattern` takes.
const PATTERNS: [DirtyPattern; 3] = [DirtyPattern::Zipf, DirtyPattern::Hot, DirtyPattern::Sweep];

/// Parses `--dirty-pattern`.
pub fn parse_pattern(s: &str) -> std::result::Result<DirtyPattern, String> {
    DirtyPattern::from_name(s).ok_or_else(|| {
        let names: Vec<_> = PATTERNS.iter().map(|p| p.name()).collect();
        format!("'{s}' is not a dirty pattern: one of {}", names.join(", "))
    })
}

/// Parses an IPv4 address with a prefix length (`10.0.2.15/24`).
pub fn parse_cidr(s: &str) -> Result<([u8; 4], u8)> {
    let bad = || {
        Error::Config(format!(
            "'{s}' is not an IPv4 address with a prefix, like 10.0.2.15/24"
        ))
    };
    let (ip, len) = s.split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(1..=30).contains(&len) {
        return Err(bad());
    }
    Ok((ip.octets(), len))
}

/// Opens or creates the disk image.
pub fn prepare_disk(path: &Path, size: Option<u64>) -> Result<()> {
    let disk = |reason: String| Error::Disk {
        path: path.display().to_string(),
        reason,
    };
    if let Some(s) = size {
        if s == 0 || s % 512 != 0 {
            return Err(disk(format!(
                "--disk-size {s} is not a non-zero multiple of 512"
            )));
        }
    }
    match std::fs::metadata(path) {
        Ok(m) => {
            if let Some(s) = size.filter(|&s| s != m.len()) {
                return Err(disk(format!(
                    "the image is {} bytes, --disk-size says {s}",
                    m.len()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f =
                std::fs::File::create_new(path).map_err(|e| disk(format!("cannot create: {e}")))?;
            f.set_len(size.unwrap_or(DEFAULT_DISK))
                .map_err(|e| disk(format!("cannot size: {e}")))?;
            tracing::info!(path = %path.display(), bytes = size.unwrap_or(DEFAULT_DISK), "created a disk image");
            Ok(())
        }
        Err(e) => Err(disk(format!("cannot stat: {e}"))),
    }
}

/// Gives the host side of tap `name` the address `host_ip` (replacing any an earlier run
/// left) and brings it up; "none" leaves the tap alone.
///
/// # Errors
/// A malformed address, or ip(8) failing.
pub fn configure_tap(name: &str, host_ip: &str) -> Result<()> {
    if host_ip == "none" {
        return Ok(());
    }
    parse_cidr(host_ip)?;
    ip(&["addr", "flush", "dev", name])?;
    ip(&["addr", "add", host_ip, "dev", name])?;
    ip(&["link", "set", name, "up"])
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(Error::io("run ip(8)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A locally administered MAC derived from the guest address.
fn mac_for(ip: [u8; 4]) -> [u8; 6] {
    [0x52, 0x54, ip[0], ip[1], ip[2], ip[3]]
}

impl VmArgs {
    /// The RAM to give the guest: --ram, or the default for its kind.
    pub fn ram_for(&self, linux: bool) -> u64 {
        self.ram.unwrap_or(if linux {
            DEFAULT_LINUX_RAM
        } else {
            DEFAULT_RAM
        })
    }

    /// Builds the VM this describes (the built-in guest, or the Linux kernel of
    /// --kernel), with its disk, network backend and console.
    ///
    /// # Errors
    /// Bad arguments, a bad image or disk, a tap that cannot be attached, a KVM failure.
    pub fn build(&self, name: &str, console: ConsoleSink) -> Result<Machine> {
        self.build_with(name, console, |_| Ok(None))
    }

    /// As [`VmArgs::build`], with the disk backend made by `disk` from the checked image
    /// (block replication); `None` keeps the plain image.
    ///
    /// # Errors
    /// As [`VmArgs::build`], or `disk`'s error.
    pub fn build_with(
        &self,
        name: &str,
        console: ConsoleSink,
        disk: impl FnOnce(colo_blk::Disk) -> Result<Option<std::sync::Arc<dyn colo_blk::BlockBackend>>>,
    ) -> Result<Machine> {
        let guest_ip = parse_cidr(&self.guest_ip)?;
        let linux = self.kernel.guest();
        let guest = match linux {
            Some(_) if self.image.is_some() => {
                return Err(Error::Config(
                    "--kernel and --image both name what the VM runs: give one".into(),
                ));
            }
            Some(l) => Guest::Linux(l),
            None => {
                let image = match &self.image {
                    Some(p) => std::fs::read(p)
                        .map_err(|e| Error::Image(format!("{}: {e}", p.display())))?,
                    None => colo_machine::guest_image::GUEST_ELF.to_vec(),
                };
                colo_machine::check_image(&image)?;
                Guest::BuiltIn(BuiltInGuest {
                    image,
                    ip: guest_ip,
                    port: self.port,
                    nondeterministic: self.nondeterministic,
                    dirty_pages_per_sec: self.dirty_rate,
                    dirty_pattern: self.dirty_pattern,
                })
            }
        };
        let linux = matches!(guest, Guest::Linux(_));
        let ram = self.ram_for(linux);
        if ram < 32 << 20 {
            return Err(Error::Config(format!(
                "{} MiB of RAM is too little: at least 32 MiB",
                ram >> 20
            )));
        }
        prepare_disk(&self.disk, self.disk_size)?;
        let disk_backend = disk(colo_machine::devices::blk::open_raw(&self.disk)?)?;
        let tap = match (&self.tap, linux) {
            (Some(t), _) => Some(t.as_str()),
            (None, false) => Some(DEFAULT_TAP),
            (None, true) => None,
        };
        let net = match (&self.net_socket, tap) {
            (Some(p), _) => {
                let s = std::os::unix::net::UnixStream::connect(p)
                    .map_err(Error::io(format!("connect to {}", p.display())))?;
                NetBackend::socket(s)?
            }
            (None, Some(tap)) => {
                let backend = NetBackend::tap(tap)?;
                configure_tap(tap, &self.host_ip)?;
                backend
            }
            (None, None) => NetBackend::none(),
        };
        Machine::new(VmConfig {
            name: name.into(),
            ram,
            vcpus: self.vcpus,
            guest,
            disk: self.disk.clone(),
            disk_backend,
            net,
            mac: mac_for(guest_ip.0),
            console,
        })
    }
}
