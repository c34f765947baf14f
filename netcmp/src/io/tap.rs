//! Linux tap devices.
//!
//! The device is created (or attached, if it exists and is persistent) through
//! `/dev/net/tun` with `IFF_TAP | IFF_NO_PI`: every read is one Ethernet frame, every write
//! sends one. No offloads are enabled, so the kernel hands over whole, checksummed frames.
//! The descriptor may be moved to another network namespace afterwards (`ip link set NAME
//! netns NS`); it keeps working.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Duration;

use super::{FrameReader, FrameWriter, Port, Recv, Sent};
use crate::error::{Error, Result};

/// `TUNSETIFF` = `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// The largest frame a tap hands over: 64 KiB plus an Ethernet and VLAN header.
const MAX_TAP_FRAME: usize = 65536 + 18;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags, padded to 40 bytes.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: Arc<File>,
    name: String,
}

impl Tap {
    /// Creates the tap device `name` (or attaches to it) in the caller's network namespace.
    ///
    /// # Errors
    /// [`Error::Tap`] when `/dev/net/tun` cannot be opened (not root, no tun module) or
    /// the ioctl fails (a bad name, a device of another kind by that name).
    pub fn open(name: &str) -> Result<Self> {
        let err = |source| Error::Tap {
            name: name.into(),
            source,
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(err(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(err)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: `file` is an open /dev/net/tun descriptor and `req` is a properly
        // initialised `struct ifreq` (40 bytes, NUL-terminated name) that outlives the call;
        // TUNSETIFF reads and writes only within it.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if rc < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(Self {
            file: Arc::new(file),
            name: name.into(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tap as a proxy port.
    ///
    /// # Errors
    /// None today; kept fallible like the other backends.
    pub fn into_port(self) -> Result<Port> {
        let label = format!("tap:{}", self.name);
        Ok(Port::new(
            label,
            Box::new(TapReader {
                file: Arc::clone(&self.file),
                buf: vec![0; MAX_TAP_FRAME],
            }),
            Box::new(TapWriter { file: self.file }),
        ))
    }
}

/// Waits up to `timeout` for `file` to be readable. Returns whether it is.
fn wait_readable(file: &File, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd that lives across the call, and the count is 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    match rc {
        r if r < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

struct TapReader {
    file: Arc<File>,
    buf: Vec<u8>,
}

impl FrameReader for TapReader {
    fn recv(&mut self, timeout: Duration) -> Result<Recv> {
        let read_err = |source| Error::Read {
            port: "tap",
            source,
        };
        if !wait_readable(&self.file, timeout).map_err(read_err)? {
            return Ok(Recv::Idle);
        }
        match (&*self.file).read(&mut self.buf) {
            Ok(0) => Ok(Recv::Closed),
            Ok(n) => Ok(Recv::Frame(self.buf[..n].to_vec())),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(Recv::Idle)
            }
            Err(e) => Err(read_err(e)),
        }
    }
}

struct TapWriter {
    file: Arc<File>,
}

impl FrameWriter for TapWriter {
    fn send(&mut self, frame: &[u8]) -> Result<Sent> {
        match (&*self.file).write(frame) {
            Ok(_) => Ok(Sent::Written),
            // EIO: the interface is down. The frame is lost as on a cable with no link.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(Sent::Dropped),
            Err(source) => Err(Error::Write {
                port: "tap",
                source,
            }),
        }
    }
}
