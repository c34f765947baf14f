//! The proxy's ports: where frames come from and go to.
//!
//! A [`Port`] is a [`FrameReader`] and a [`FrameWriter`] for one peer (the client, the
//! primary or the secondary). Backends:
//! - [`tap`]: a Linux tap device (frames as the kernel gives them, no packet info header).
//! - [`stream`]: length-prefixed frames ([`crate::framing`]) over a Unix or TCP socket,
//!   connecting or listening, like QEMU's chardev socket with vnet_hdr off, so a QEMU VM
//!   (`-netdev socket` or a colo-compare chardev) can be plugged in.
//! - [`channel`]: an in-process channel, for a VMM in the same process.

pub mod channel;
mod spec;
pub mod stream;
#[allow(unsafe_code)]
pub mod tap;

use std::time::Duration;

pub use self::spec::PortSpec;
use crate::error::Result;

/// What one read from a port gave.
#[derive(Debug)]
#[non_exhaustive]
pub enum Recv {
    /// A frame.
    Frame(Vec<u8>),
    /// Nothing within the timeout.
    Idle,
    /// The port is gone for good.
    Closed,
    /// A listening port's peer left (end of stream, a read error, a stream out of step);
    /// the port accepts the next one. Frames after this come from a new peer.
    Disconnected,
}

/// What one write to a port did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Sent {
    /// The frame went out.
    Written,
    /// The frame was dropped: no peer is connected, or its queue is full.
    Dropped,
}

/// The receiving half of a port.
pub trait FrameReader: Send {
    /// Waits up to `timeout` for the next frame.
    ///
    /// # Errors
    /// A read failure the port cannot recover from.
    fn recv(&mut self, timeout: Duration) -> Result<Recv>;
}

/// The sending half of a port.
pub trait FrameWriter: Send {
    /// Sends one frame.
    ///
    /// # Errors
    /// A write failure (the frame is lost; the port may recover, e.g. a listening socket
    /// accepting a new peer).
    fn send(&mut self, frame: &[u8]) -> Result<Sent>;
}

/// One of the proxy's three ports.
pub struct Port {
    pub(crate) reader: Box<dyn FrameReader>,
    pub(crate) writer: Box<dyn FrameWriter>,
    pub(crate) label: String,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port").field("label", &self.label).finish()
    }
}

impl Port {
    /// A port from a reader and a writer of any backend; `label` names it in logs.
    pub fn new(
        label: impl Into<String>,
        reader: Box<dyn FrameReader>,
        writer: Box<dyn FrameWriter>,
    ) -> Self {
        Self {
            reader,
            writer,
            label: label.into(),
        }
    }

    /// Opens the port a [`PortSpec`] describes.
    ///
    /// # Errors
    /// The tap device cannot be created, the socket cannot be bound or connected.
    pub fn open(spec: &PortSpec) -> Result<Self> {
        match spec {
            PortSpec::Tap(name) => tap::Tap::open(name)?.into_port(),
            PortSpec::UnixConnect(path) => stream::connect_unix(path),
            PortSpec::UnixListen(path) => stream::listen_unix(path),
            PortSpec::TcpConnect(addr) => stream::connect_tcp(addr),
            PortSpec::TcpListen(addr) => stream::listen_tcp(addr),
        }
    }

    /// The port's name in logs.
    pub fn label(&self) -> &str {
        &self.label
    }
}
