//! In-process ports: crossbeam channels of frames, for a VMM that runs in the same process
//! as the proxy.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};

use super::{FrameReader, FrameWriter, Port, Recv, Sent};
use crate::error::{Error, Result};

/// The VMM's end of an in-process port: it sends the frames its NIC transmits and receives
/// the frames the proxy delivers to it.
#[derive(Debug, Clone)]
pub struct VmEnd {
    to_proxy: Sender<Vec<u8>>,
    from_proxy: Receiver<Vec<u8>>,
}

impl VmEnd {
    /// Hands a frame to the proxy. Blocks while the proxy's queue is full.
    ///
    /// # Errors
    /// [`Error::Stopped`] when the proxy is gone.
    pub fn send(&self, frame: Vec<u8>) -> Result<()> {
        self.to_proxy.send(frame).map_err(|_| Error::Stopped)
    }

    /// The next frame from the proxy, waiting up to `timeout`; `None` on timeout.
    ///
    /// # Errors
    /// [`Error::Stopped`] when the proxy is gone.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        match self.from_proxy.recv_timeout(timeout) {
            Ok(f) => Ok(Some(f)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Stopped),
        }
    }

    /// The next frame from the proxy if one is waiting.
    ///
    /// # Errors
    /// [`Error::Stopped`] when the proxy is gone.
    pub fn try_recv(&self) -> Result<Option<Vec<u8>>> {
        match self.from_proxy.try_recv() {
            Ok(f) => Ok(Some(f)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(Error::Stopped),
        }
    }

    /// The receiver of frames from the proxy, to `select!` on.
    pub fn receiver(&self) -> &Receiver<Vec<u8>> {
        &self.from_proxy
    }
}

struct ChannelReader(Receiver<Vec<u8>>);

impl FrameReader for ChannelReader {
    fn recv(&mut self, timeout: Duration) -> Result<Recv> {
        Ok(match self.0.recv_timeout(timeout) {
            Ok(f) => Recv::Frame(f),
            Err(RecvTimeoutError::Timeout) => Recv::Idle,
            Err(RecvTimeoutError::Disconnected) => Recv::Closed,
        })
    }
}

struct ChannelWriter(Sender<Vec<u8>>);

impl FrameWriter for ChannelWriter {
    fn send(&mut self, frame: &[u8]) -> Result<Sent> {
        Ok(match self.0.try_send(frame.to_vec()) {
            Ok(()) => Sent::Written,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Sent::Dropped,
        })
    }
}

/// An in-process port named `label` and the VMM's end of it. Each direction queues up to
/// `capacity` frames; frames to a full VMM queue are dropped and counted, as a full NIC
/// ring would drop them.
pub fn port(label: &str, capacity: usize) -> (Port, VmEnd) {
    let (to_proxy, from_vm) = crossbeam_channel::bounded(capacity);
    let (to_vm, from_proxy) = crossbeam_channel::bounded(capacity);
    let p = Port::new(
        label,
        Box::new(ChannelReader(from_vm)),
        Box::new(ChannelWriter(to_vm)),
    );
    (
        p,
        VmEnd {
            to_proxy,
            from_proxy,
        },
    )
}
