//! The in-process double of the push model: the verbs pipeline ([`crate::verbs`]) over a
//! simulated RC queue pair ([`crate::verbs::sim`]) that enforces the verbs rules and injects
//! faults. It is the same sender and receiver code that runs on an RDMA device.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::push::{EpochCommit, PushReceiver, RegionDesc};
use crate::verbs::sim::{self, SimEndpoint};
pub use crate::verbs::sim::{Faults, SimConfig};
use crate::verbs::{VerbsOptions, VerbsReceiver, VerbsSender};
use colo_memory::Region;

/// The sending side of the double.
pub type DoubleSender = VerbsSender<SimEndpoint>;

/// The receiving side: a registered target region and the connection that writes into it.
/// A new [`connect`](Self::connect) replaces the connection and continues from the last
/// committed epoch. Like the device path, every connection gets a registration of its
/// own: a second connection registers the region again with a new rkey (see
/// [`renew`](Self::renew)), so a sender still holding an earlier descriptor writes
/// nothing.
#[derive(Debug)]
pub struct DoubleReceiver {
    desc: RegionDesc,
    target: Arc<Region>,
    inner: Mutex<Option<VerbsReceiver<SimEndpoint>>>,
    /// Whether a connection used the current registration.
    used: bool,
}

/// A fresh 32-bit rkey, never `old`.
fn fresh_rkey(old: u64) -> u64 {
    loop {
        let k = crate::push::random_key() & u64::from(u32::MAX);
        if k != old && k != 0 {
            return k;
        }
    }
}

impl DoubleReceiver {
    /// Registers `target` with pages of `page_size`.
    pub fn new(target: Arc<Region>, page_size: u32) -> Self {
        let desc = RegionDesc {
            addr: target.as_ptr() as u64,
            // A verbs rkey is 32 bits.
            key: fresh_rkey(0),
            len: target.len() as u64,
            page_size,
            port: 0,
            name: crate::push::EndpointName::EMPTY,
        };
        Self {
            desc,
            target,
            inner: Mutex::new(None),
            used: false,
        }
    }

    /// Registers the region again for the next connection (a new rkey; the old one
    /// writes nothing from now on) and returns the descriptor to hand its sender.
    pub fn renew(&mut self) -> RegionDesc {
        self.desc.key = fresh_rkey(self.desc.key);
        self.used = false;
        tracing::debug!(
            rkey = self.desc.key,
            "region registered again for a new connection"
        );
        self.desc
    }

    /// Connects a sender that writes from `source` using `remote` (normally this
    /// receiver's [`desc`](PushReceiver::desc); a test may alter the key), with default
    /// queue pair and pipeline settings.
    ///
    /// # Errors
    /// As [`connect_with`](Self::connect_with).
    pub fn connect(
        &mut self,
        remote: RegionDesc,
        source: Arc<Region>,
        faults: Faults,
    ) -> Result<DoubleSender> {
        self.connect_with(
            remote,
            source,
            faults,
            SimConfig::default(),
            VerbsOptions::default(),
        )
    }

    /// Connects a sender with a chosen queue pair shape and pipeline tuning.
    ///
    /// # Errors
    /// [`Error::Protocol`] for a key wider than an rkey, [`Error::Memory`] or
    /// [`Error::Thread`] if the simulated queue pair cannot be set up.
    pub fn connect_with(
        &mut self,
        remote: RegionDesc,
        source: Arc<Region>,
        faults: Faults,
        cfg: SimConfig,
        opts: VerbsOptions,
    ) -> Result<DoubleSender> {
        if self.used {
            // A registration serves one connection: one that did not ask for a new one
            // (renew) still gets it, and its sender's descriptor is stale.
            self.renew();
        }
        self.used = true;
        let rkey = crate::verbs::rkey_of(self.desc.key)?;
        // Receive buffers sized as the verbs endpoints size them: releases to the writer,
        // commits of this region's bitmap to the region's side.
        let cfg = SimConfig {
            recv_lens: cfg.recv_lens.or(Some((
                crate::verbs::message::HEADER_LEN,
                crate::verbs::message::commit_len(self.desc.bitmap_words()),
            ))),
            ..cfg
        };
        let (tx, rx) = sim::connect(Arc::clone(&self.target), rkey, source.clone(), cfg, faults)?;
        let mut inner = self.inner.lock().map_err(|_| Error::Closed)?;
        let last = inner.as_ref().map_or(0, VerbsReceiver::committed);
        *inner = Some(VerbsReceiver::new(rx, self.desc, last));
        drop(inner);
        VerbsSender::new(tx, remote, source, last + 1, opts)
    }

    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut VerbsReceiver<SimEndpoint>) -> Result<T>,
    ) -> Result<T> {
        match self.inner.get_mut() {
            Ok(Some(rx)) => f(rx),
            Ok(None) => Err(Error::Protocol("no sender has connected".into())),
            Err(_) => Err(Error::Closed),
        }
    }
}

impl PushReceiver for DoubleReceiver {
    fn desc(&self) -> &RegionDesc {
        &self.desc
    }

    fn next_commit(&mut self, timeout: Duration) -> Result<EpochCommit> {
        self.with(|rx| rx.next_commit(timeout))
    }

    fn release(&mut self, epoch: u64) -> Result<()> {
        self.with(|rx| rx.release(epoch))
    }
}
