//! The receiving half of the verbs pipeline: commits in, releases out.
//!
//! The data itself never passes through here: RDMA WRITEs land in the registered region
//! without the receiver's CPU. The receiver only takes the commit messages (which arrive
//! after every byte of their epoch) and answers each applied epoch with a release.

use std::time::{Duration, Instant};

use super::message::{self, Message};
use super::{Endpoint, POLL_SLICE, Wc, WcStatus};
use crate::error::{Error, Result};
use crate::framing;
use crate::push::{EpochCommit, PushReceiver, RegionDesc};

const RELEASE_ID: u64 = 1 << 62;
/// How long a release send may take to complete before the queue pair is called dead.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Takes epoch commits from an [`Endpoint`] whose peer writes into the region `desc`.
#[derive(Debug)]
pub struct VerbsReceiver<E: Endpoint> {
    ep: E,
    desc: RegionDesc,
    committed: u64,
    released: u64,
    /// A release send not yet seen complete.
    release_in_flight: bool,
    buf: Vec<u8>,
    msg: Vec<u8>,
    wcs: Vec<Wc>,
    closed: bool,
}

impl<E: Endpoint> VerbsReceiver<E> {
    /// A receiver over the connected endpoint `ep` for the region `desc`, whose last
    /// committed and released epoch is `last_epoch` (0 for a new region).
    pub fn new(ep: E, desc: RegionDesc, last_epoch: u64) -> Self {
        Self {
            ep,
            desc,
            committed: last_epoch,
            released: last_epoch,
            release_in_flight: false,
            buf: Vec::new(),
            msg: Vec::new(),
            wcs: Vec::new(),
            closed: false,
        }
    }

    /// The last committed epoch.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    fn fail(&mut self, e: Error) -> Error {
        self.closed = true;
        e
    }

    /// Waits for the previous release send to complete (its buffer is reused).
    fn reap_release(&mut self) -> Result<()> {
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        while self.release_in_flight {
            if Instant::now() >= deadline {
                return Err(self.fail(Error::Timeout(RELEASE_TIMEOUT, "a release send")));
            }
            self.wcs.clear();
            if let Err(e) = self.ep.poll_send(&mut self.wcs, POLL_SLICE) {
                return Err(self.fail(e));
            }
            for i in 0..self.wcs.len() {
                let wc = self.wcs[i];
                if wc.status != WcStatus::Success {
                    return Err(self.fail(wc.status.into_error("a release (SEND)")));
                }
                if wc.wr_id & RELEASE_ID != 0 {
                    self.release_in_flight = false;
                }
            }
        }
        Ok(())
    }
}

impl<E: Endpoint> PushReceiver for VerbsReceiver<E> {
    fn desc(&self) -> &RegionDesc {
        &self.desc
    }

    fn next_commit(&mut self, timeout: Duration) -> Result<EpochCommit> {
        if self.closed {
            return Err(Error::Closed);
        }
        let imm = match self.ep.recv(&mut self.buf, timeout) {
            Ok(imm) => imm,
            Err(e @ Error::Timeout(..)) => return Err(e),
            Err(e) => return Err(self.fail(e)),
        };
        let m = match message::decode(&self.buf, imm, self.desc.bitmap_words()) {
            Ok(m) => m,
            Err(e) => return Err(self.fail(e)),
        };
        if let Message::Close { .. } = m {
            // The sender's orderly end, as a TCP stream's goodbye.
            self.closed = true;
            return Err(framing::Error::PeerClosed.into());
        }
        let Message::Commit {
            epoch,
            bytes,
            bitmap,
        } = m
        else {
            return Err(self.fail(Error::Protocol(format!(
                "expected an epoch commit, got {m:?}"
            ))));
        };
        if epoch != self.committed + 1 || self.released != self.committed {
            return Err(self.fail(Error::Protocol(format!(
                "commit of epoch {epoch}, but epoch {} is the last committed and {} the last \
                 released",
                self.committed, self.released
            ))));
        }
        let bitmap = match self.desc.bitmap_from_words(bitmap) {
            Ok(b) => b,
            Err(e) => return Err(self.fail(e)),
        };
        if bytes > self.desc.len.saturating_mul(64) {
            // Bytes may exceed the region (a page rewritten within an epoch), but not by
            // orders of magnitude: a header this far off is corrupt.
            return Err(self.fail(Error::Protocol(format!(
                "commit of epoch {epoch} claims {bytes} bytes into a {}-byte region",
                self.desc.len
            ))));
        }
        self.committed = epoch;
        Ok(EpochCommit {
            epoch,
            bitmap,
            bytes,
        })
    }

    fn release(&mut self, epoch: u64) -> Result<()> {
        if epoch != self.committed || epoch <= self.released {
            return Err(Error::Protocol(format!(
                "release of epoch {epoch}, but the last committed is {} and the last released {}",
                self.committed, self.released
            )));
        }
        if self.closed {
            return Err(Error::Closed);
        }
        self.reap_release()?;
        message::encode_release(&mut self.msg, epoch);
        if let Err(e) = self
            .ep
            .post_send(RELEASE_ID | epoch, epoch as u32, &self.msg)
        {
            return Err(self.fail(e));
        }
        self.release_in_flight = true;
        self.released = epoch;
        Ok(())
    }
}
