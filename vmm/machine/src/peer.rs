//! The far end of a VM's network as a smoltcp device, so that a user-space TCP stack can
//! talk to the guest's service with no tap device and no root: `colo pair`'s client load
//! (through the proxy) and this crate's tests (straight into a channel backend,
//! [`NetBackend::channel`](crate::devices::backend::NetBackend::channel)).

use std::time::Duration;

use crossbeam_channel::Receiver;
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

/// Sends one frame towards the network.
pub type FrameOut = Box<dyn Fn(Vec<u8>) + Send>;

/// A smoltcp Ethernet device whose frames leave through a [`FrameOut`] and arrive on a
/// channel.
pub struct PeerDevice {
    tx: FrameOut,
    rx: Receiver<Vec<u8>>,
    /// A frame taken off `rx` while waiting, delivered first.
    front: Option<Vec<u8>>,
}

impl std::fmt::Debug for PeerDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerDevice")
            .field("waiting", &self.front.is_some())
            .finish_non_exhaustive()
    }
}

impl PeerDevice {
    /// A device that sends on `tx` and receives from `rx`.
    pub fn new(tx: FrameOut, rx: Receiver<Vec<u8>>) -> Self {
        Self {
            tx,
            rx,
            front: None,
        }
    }

    /// Moves the device onto other frame channels (the same connection, now to another
    /// VM); a frame kept from the old channel is dropped.
    pub fn rebind(&mut self, tx: FrameOut, rx: Receiver<Vec<u8>>) {
        self.tx = tx;
        self.rx = rx;
        self.front = None;
    }

    /// Waits up to `timeout` for a frame, unless one is already waiting; the next poll of
    /// the interface receives it.
    pub fn wait(&mut self, timeout: Duration) {
        if self.front.is_none() {
            self.front = self.rx.recv_timeout(timeout).ok();
        }
    }
}

/// A received frame.
#[derive(Debug)]
pub struct Rx(Vec<u8>);

/// The right to send one frame.
pub struct Tx<'a>(&'a FrameOut);

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        tracing::trace!(len, "peer frame out");
        (self.0)(b);
        r
    }
}

impl Device for PeerDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        self.front
            .take()
            .or_else(|| self.rx.try_recv().ok())
            .map(|f| {
                tracing::trace!(len = f.len(), "peer frame in");
                (Rx(f), Tx(&self.tx))
            })
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}
