//! An in-process test double of the push model that enforces the verbs rules.
//!
//! A "NIC" thread executes posted work requests in order, as an RC queue pair would:
//! - every write presents the region key, which must match (else a remote access error);
//! - every write must fall inside the region (else a remote access error; nothing lands);
//! - a completion is generated only after the write's bytes are in the target region;
//! - after the first error the queue pair is in the error state: every later request
//!   completes with an error and nothing more lands;
//! - a commit is posted only when every earlier write has completed, and a write into
//!   epoch E is refused until epoch E-1 was released by the receiver.
//!
//! [`Faults`] injects a lost connection, a corrupted request (bad key) or an out-of-bounds
//! offset at a chosen write.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::error::{Error, Result};
use crate::push::{EpochCommit, PushReceiver, PushSender, RegionDesc, WriteRun};
use crate::region::Region;

/// Faults to inject, each at the n-th write request (counting from 0) the NIC executes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// The connection drops before this write lands.
    pub lose_connection_at: Option<u64>,
    /// This write arrives with a corrupted key.
    pub corrupt_key_at: Option<u64>,
    /// This write arrives with its offset pushed past the end of the region.
    pub out_of_bounds_at: Option<u64>,
}

#[derive(Debug)]
enum Wr {
    Write { key: u64, run: WriteRun, epoch: u64 },
    Commit { epoch: u64, bitmap: Vec<u64> },
}

#[derive(Debug)]
enum Completion {
    Write,
    Commit(u64),
    Error(Error),
}

#[derive(Debug, Default)]
struct RxState {
    committed: u64,
    applied: u64,
}

/// The receiving side: a registered target region and the commits that reach it.
#[derive(Debug)]
pub struct DoubleReceiver {
    desc: RegionDesc,
    target: Arc<Region>,
    state: Arc<Mutex<RxState>>,
    commits_tx: Sender<Result<EpochCommit>>,
    commits: Receiver<Result<EpochCommit>>,
}

impl DoubleReceiver {
    /// Registers `target` with pages of `page_size`.
    pub fn new(target: Arc<Region>, page_size: u32) -> Self {
        let (commits_tx, commits) = crossbeam_channel::unbounded();
        let desc = RegionDesc {
            addr: target.as_ptr() as u64,
            key: 0x5eed_0000_0000_0001 ^ target.len() as u64,
            len: target.len() as u64,
            page_size,
            port: 0,
        };
        Self {
            desc,
            target,
            state: Arc::default(),
            commits_tx,
            commits,
        }
    }

    /// Connects a sender that writes from `source` using `remote` (normally this
    /// receiver's [`desc`](PushReceiver::desc); a test may alter the key).
    pub fn connect(&self, remote: RegionDesc, source: Arc<Region>, faults: Faults) -> DoubleSender {
        let (wr_tx, wr_rx) = crossbeam_channel::unbounded();
        let (cq_tx, cq) = crossbeam_channel::unbounded();
        let nic = Nic {
            desc: self.desc,
            source: Arc::clone(&source),
            target: Arc::clone(&self.target),
            state: Arc::clone(&self.state),
            commits: self.commits_tx.clone(),
            faults,
            writes: 0,
            error: false,
        };
        let thread = std::thread::spawn(move || nic.run(&wr_rx, &cq_tx));
        DoubleSender {
            remote,
            source,
            epoch: self.state.lock().map_or(1, |s| s.committed + 1),
            wr: Some(wr_tx),
            cq,
            outstanding: 0,
            closed: false,
            thread: Some(thread),
        }
    }
}

impl PushReceiver for DoubleReceiver {
    fn desc(&self) -> &RegionDesc {
        &self.desc
    }

    fn next_commit(&mut self, timeout: Duration) -> Result<EpochCommit> {
        match self.commits.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout(timeout, "an epoch commit")),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Closed),
        }
    }

    fn release(&mut self, epoch: u64) -> Result<()> {
        let mut st = self.state.lock().map_err(|_| Error::Closed)?;
        if epoch != st.committed || epoch <= st.applied {
            return Err(Error::Protocol(format!(
                "release of epoch {epoch}, but the last committed is {} and the last released {}",
                st.committed, st.applied
            )));
        }
        st.applied = epoch;
        Ok(())
    }
}

struct Nic {
    desc: RegionDesc,
    source: Arc<Region>,
    target: Arc<Region>,
    state: Arc<Mutex<RxState>>,
    commits: Sender<Result<EpochCommit>>,
    faults: Faults,
    writes: u64,
    error: bool,
}

impl Nic {
    fn run(mut self, wrs: &Receiver<Wr>, cq: &Sender<Completion>) {
        let mut epoch_bytes = 0;
        for wr in wrs {
            if self.error {
                let _ = cq.send(Completion::Error(Error::Injected(
                    "work request flushed: queue pair in error state",
                )));
                continue;
            }
            let c = match wr {
                Wr::Write { key, run, epoch } => self.write(key, run, epoch).map(|()| {
                    epoch_bytes += run.len;
                    Completion::Write
                }),
                Wr::Commit { epoch, bitmap } => {
                    self.commit(epoch, bitmap, std::mem::take(&mut epoch_bytes))
                }
            };
            let c = c.unwrap_or_else(|e| {
                self.error = true;
                // The responder sees the failure too, as its queue pair goes to error.
                let peer = match &e {
                    Error::Injected(_) => Error::PeerClosed,
                    Error::BadKey { found } => Error::BadKey { found: *found },
                    Error::OutOfBounds {
                        offset,
                        len,
                        region_len,
                    } => Error::OutOfBounds {
                        offset: *offset,
                        len: *len,
                        region_len: *region_len,
                    },
                    other => Error::Protocol(other.to_string()),
                };
                let _ = self.commits.send(Err(peer));
                Completion::Error(e)
            });
            let _ = cq.send(c);
        }
    }

    fn write(&mut self, mut key: u64, mut run: WriteRun, epoch: u64) -> Result<()> {
        let n = self.writes;
        self.writes += 1;
        if self.faults.lose_connection_at == Some(n) {
            return Err(Error::Injected("connection lost"));
        }
        if self.faults.corrupt_key_at == Some(n) {
            key ^= 0xdead_beef;
        }
        if self.faults.out_of_bounds_at == Some(n) {
            run.dst = self.desc.len - run.len / 2;
        }
        if key != self.desc.key {
            return Err(Error::BadKey { found: key });
        }
        self.target.check(run.dst, run.len)?;
        {
            let st = self.state.lock().map_err(|_| Error::Closed)?;
            if epoch != st.committed + 1 || st.applied != st.committed {
                return Err(Error::Protocol(format!(
                    "write into epoch {epoch} while epoch {} is committed and {} released",
                    st.committed, st.applied
                )));
            }
        }
        self.target
            .copy_from(run.dst, &self.source, run.src, run.len)
    }

    fn commit(&mut self, epoch: u64, bitmap: Vec<u64>, bytes: u64) -> Result<Completion> {
        self.desc.check_bitmap(&bitmap)?;
        let mut st = self.state.lock().map_err(|_| Error::Closed)?;
        if epoch != st.committed + 1 {
            return Err(Error::Protocol(format!(
                "commit of epoch {epoch} while {} is open",
                st.committed + 1
            )));
        }
        st.committed = epoch;
        let _ = self.commits.send(Ok(EpochCommit {
            epoch,
            bitmap,
            bytes,
        }));
        Ok(Completion::Commit(epoch))
    }
}

/// The sending side of the double.
#[derive(Debug)]
pub struct DoubleSender {
    remote: RegionDesc,
    source: Arc<Region>,
    epoch: u64,
    wr: Option<Sender<Wr>>,
    cq: Receiver<Completion>,
    outstanding: u64,
    closed: bool,
    thread: Option<JoinHandle<()>>,
}

impl DoubleSender {
    fn submit(&mut self, wr: Wr) -> Result<()> {
        if self.closed {
            return Err(Error::Closed);
        }
        self.wr
            .as_ref()
            .ok_or(Error::Closed)?
            .send(wr)
            .map_err(|_| Error::Closed)?;
        self.outstanding += 1;
        Ok(())
    }

    fn poll_one(&mut self) -> Result<Completion> {
        let c = self
            .cq
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| Error::Closed)?;
        self.outstanding -= 1;
        if let Completion::Error(e) = c {
            self.closed = true;
            return Err(e);
        }
        Ok(c)
    }
}

impl PushSender for DoubleSender {
    fn remote(&self) -> &RegionDesc {
        &self.remote
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn post(&mut self, runs: &[WriteRun]) -> Result<()> {
        for r in runs {
            self.source.check(r.src, r.len)?;
        }
        for &run in runs {
            self.submit(Wr::Write {
                key: self.remote.key,
                run,
                epoch: self.epoch,
            })?;
        }
        Ok(())
    }

    fn fence(&mut self) -> Result<()> {
        while self.outstanding > 0 {
            self.poll_one()?;
        }
        Ok(())
    }

    fn commit(&mut self, bitmap: &[u64]) -> Result<u64> {
        self.remote.check_bitmap(bitmap)?;
        // The commit is posted only after every data write completed, as the verbs
        // backend does: the receiver can never see the commit before the data.
        self.fence()?;
        let epoch = self.epoch;
        self.submit(Wr::Commit {
            epoch,
            bitmap: bitmap.to_vec(),
        })?;
        match self.poll_one()? {
            Completion::Commit(e) if e == epoch => {
                self.epoch += 1;
                Ok(epoch)
            }
            other => Err(Error::Protocol(format!("unexpected completion {other:?}"))),
        }
    }
}

impl Drop for DoubleSender {
    fn drop(&mut self) {
        self.wr = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
