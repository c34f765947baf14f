//! The sending half of the verbs pipeline: page runs to RDMA WRITE work requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::message::{self, Message};
use super::{Caps, Endpoint, LocalMr, POLL_SLICE, Sge, Wc, WcStatus, WriteWr, rkey_of};
use crate::error::{Error, Result};
use crate::framing;
use crate::push::{PushSender, RegionDesc, WriteRun};
use colo_memory::{PageBitmap, Region};

/// Work-request ids of commit sends carry this bit; write ids are sequence numbers.
const COMMIT_ID: u64 = 1 << 63;
/// Write requests handed to the endpoint per post call.
const POST_BATCH: usize = 32;

/// Tuning of the sending pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerbsOptions {
    /// Signal every Nth write request (and always the last of each `post`). Clamped to
    /// `1..=max_outstanding`.
    pub signal_every: usize,
    /// Write requests in flight at most. Clamped below the send queue depth (one slot is
    /// kept for the commit).
    pub max_outstanding: usize,
    /// The largest single RDMA WRITE in bytes (clamped to the device's message limit and,
    /// with bounce buffers, to one bounce slot).
    pub max_write: u64,
    /// How long to wait for the receiver's release of the previous epoch.
    pub release_timeout: Duration,
    /// How long to wait for a completion before calling the queue pair dead.
    pub completion_timeout: Duration,
}

impl Default for VerbsOptions {
    fn default() -> Self {
        Self {
            signal_every: 16,
            max_outstanding: 128,
            max_write: 8 << 20,
            release_timeout: Duration::from_secs(30),
            completion_timeout: Duration::from_secs(30),
        }
    }
}

/// What the sender has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderStats {
    /// RDMA WRITE work requests posted.
    pub writes: u64,
    /// Of them, signaled.
    pub signaled: u64,
    /// Scatter-gather entries posted.
    pub sges: u64,
    /// Payload bytes posted.
    pub bytes: u64,
    /// Bytes copied through bounce buffers.
    pub bounced: u64,
    /// Epochs committed.
    pub commits: u64,
    /// The most write requests in flight at once.
    pub max_in_flight: u64,
}

/// The work request being built: contiguous in the remote region.
#[derive(Debug, Clone, Copy)]
struct Building {
    dst: u64,
    len: u64,
    first_sge: usize,
}

/// Pushes pages over an [`Endpoint`] with one-sided RDMA WRITEs.
#[derive(Debug)]
pub struct VerbsSender<E: Endpoint> {
    ep: E,
    remote: RegionDesc,
    rkey: u64,
    source: Arc<Region>,
    opts: VerbsOptions,
    caps: Caps,
    /// Bounce slots (0 when the source is registered) and their size.
    slots: u64,
    slot_len: u64,
    max_write: u64,
    epoch: u64,
    released: u64,
    epoch_bytes: u64,
    /// Sequence number of the last write handed to the endpoint (writes count from 1).
    posted: u64,
    /// Every write up to this sequence number has completed.
    completed: u64,
    /// The epoch whose commit send completed last.
    commit_done: u64,
    chain: Vec<WriteWr>,
    sges: Vec<Sge>,
    wcs: Vec<Wc>,
    msg: Vec<u8>,
    closed: bool,
    stats: SenderStats,
    abort: Arc<AtomicBool>,
}

/// Ends a [`VerbsSender`]'s waits from any thread: for a caller that learned by other
/// means (a heartbeat) that the receiver is gone, so that waiting for its release or for
/// a completion fails at its next poll (within 50 ms) instead of at
/// [`VerbsOptions::release_timeout`] or [`VerbsOptions::completion_timeout`].
#[derive(Debug, Clone)]
pub struct VerbsAbort(Arc<AtomicBool>);

impl VerbsAbort {
    /// Closes the sender: its current and later waits fail with [`Error::Closed`].
    pub fn abort(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl<E: Endpoint> VerbsSender<E> {
    /// A sender over the connected endpoint `ep`, writing from `source` into `remote`,
    /// whose first epoch is `first_epoch` (the receiver has released `first_epoch - 1`).
    ///
    /// # Errors
    /// [`Error::Protocol`] for a remote key wider than the endpoint's keys (a verbs rkey
    /// is 32 bits, a libfabric key 64), or bounce buffers too
    /// small to hold one page per in-flight request.
    pub fn new(
        ep: E,
        remote: RegionDesc,
        source: Arc<Region>,
        first_epoch: u64,
        opts: VerbsOptions,
    ) -> Result<Self> {
        let caps = ep.caps();
        let rkey = if caps.wide_keys {
            remote.key
        } else {
            u64::from(rkey_of(remote.key)?)
        };
        if caps.max_send_wr < 2 || caps.max_sge == 0 {
            return Err(Error::Protocol(format!(
                "queue pair too small: {} send requests, {} SGEs",
                caps.max_send_wr, caps.max_sge
            )));
        }
        let max_outstanding = opts.max_outstanding.clamp(1, caps.max_send_wr - 1);
        let signal_every = opts.signal_every.clamp(1, max_outstanding);
        let mut max_write = opts.max_write.min(caps.max_msg).max(1);
        let (slots, slot_len) = match ep.bounce() {
            None => (0, 0),
            Some(b) => {
                let slot_len = b.len() as u64 / max_outstanding as u64;
                if slot_len < u64::from(remote.page_size) {
                    return Err(Error::Protocol(format!(
                        "bounce buffers of {} bytes cannot hold a {}-byte page for each of \
                         {max_outstanding} requests in flight",
                        b.len(),
                        remote.page_size
                    )));
                }
                max_write = max_write.min(slot_len);
                (max_outstanding as u64, slot_len)
            }
        };
        let first_epoch = first_epoch.max(1);
        Ok(Self {
            ep,
            remote,
            rkey,
            source,
            opts: VerbsOptions {
                signal_every,
                max_outstanding,
                ..opts
            },
            caps,
            slots,
            slot_len,
            max_write,
            epoch: first_epoch,
            released: first_epoch - 1,
            epoch_bytes: 0,
            posted: 0,
            completed: 0,
            commit_done: first_epoch - 1,
            chain: Vec::with_capacity(POST_BATCH),
            sges: Vec::new(),
            wcs: Vec::new(),
            msg: Vec::new(),
            closed: false,
            stats: SenderStats::default(),
            abort: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Ends the session in order: every posted write completes, then a close message
    /// tells the receiver, whose next wait returns the peer's close
    /// ([`framing::Error::PeerClosed`]), as a TCP push's goodbye does. A reliable datagram
    /// endpoint has no connection whose end the receiver would otherwise see.
    ///
    /// # Errors
    /// [`Error::Closed`] after a failure, or the error of the fence or of the send.
    pub fn close(mut self) -> Result<()> {
        if self.closed {
            return Err(Error::Closed);
        }
        self.fence()?;
        let epoch = self.epoch;
        message::encode_close(&mut self.msg, epoch);
        self.send_message(epoch)?;
        self.closed = true;
        Ok(())
    }

    /// Sends the message in `self.msg` (a commit or a close of `epoch`, its immediate the
    /// epoch's low bits) and waits for its completion.
    fn send_message(&mut self, epoch: u64) -> Result<()> {
        if let Err(e) = self
            .ep
            .post_send(COMMIT_ID | epoch, epoch as u32, &self.msg)
        {
            return Err(self.fail(e));
        }
        while self.commit_done < epoch {
            self.reap()?;
        }
        Ok(())
    }

    /// A handle that ends this sender's waits from another thread.
    pub fn abort_handle(&self) -> VerbsAbort {
        VerbsAbort(Arc::clone(&self.abort))
    }

    /// Fails with [`Error::Closed`] once [`VerbsAbort::abort`] was called.
    fn check_abort(&mut self) -> Result<()> {
        if self.abort.load(Ordering::SeqCst) {
            return Err(self.fail(Error::Closed));
        }
        Ok(())
    }

    /// What the sender has done so far.
    pub fn stats(&self) -> SenderStats {
        self.stats
    }

    /// The endpoint (for fault injection in tests).
    pub fn endpoint_mut(&mut self) -> &mut E {
        &mut self.ep
    }

    fn fail(&mut self, e: Error) -> Error {
        self.closed = true;
        e
    }

    /// Waits until the receiver has released the epoch before the open one.
    fn await_release(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.opts.release_timeout;
        let mut buf = Vec::new();
        while self.released + 1 < self.epoch {
            self.check_abort()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(
                    self.opts.release_timeout,
                    "the receiver's release of the previous epoch (its writes must wait)",
                ));
            }
            let imm = match self.ep.recv(&mut buf, left.min(POLL_SLICE)) {
                Ok(imm) => imm,
                Err(Error::Timeout(..)) => continue,
                Err(e) => return Err(self.fail(e)),
            };
            match message::decode(&buf, imm, 0) {
                Ok(Message::Release { epoch }) if epoch == self.released + 1 => {
                    self.released = epoch;
                }
                Ok(other) => {
                    let e = Error::Protocol(format!(
                        "expected the release of epoch {}, got {other:?}",
                        self.released + 1
                    ));
                    return Err(self.fail(e));
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        Ok(())
    }

    /// Waits for at least one completion and applies every one that arrived.
    fn reap(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.opts.completion_timeout;
        self.wcs.clear();
        while self.wcs.is_empty() {
            self.check_abort()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.fail(Error::Timeout(
                    self.opts.completion_timeout,
                    "a send completion",
                )));
            }
            if let Err(e) = self.ep.poll_send(&mut self.wcs, left.min(POLL_SLICE)) {
                return Err(self.fail(e));
            }
        }
        let wcs = std::mem::take(&mut self.wcs);
        let mut first_err = None;
        for wc in &wcs {
            if wc.status != WcStatus::Success {
                let what = if wc.wr_id & COMMIT_ID != 0 {
                    "the epoch commit (SEND with immediate)"
                } else {
                    "an RDMA WRITE"
                };
                // The first failure is the cause; later ones are flushes it caused.
                first_err.get_or_insert(wc.status.into_error(what));
            } else if wc.wr_id & COMMIT_ID != 0 {
                self.commit_done = self.commit_done.max(wc.wr_id & !COMMIT_ID);
            } else {
                self.completed = self.completed.max(wc.wr_id);
            }
        }
        self.wcs = wcs;
        match first_err {
            Some(e) => Err(self.fail(e)),
            None => Ok(()),
        }
    }

    /// Hands the chain of built requests to the endpoint.
    fn flush_chain(&mut self) -> Result<()> {
        if self.chain.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.ep.post_writes(&self.chain, &self.sges) {
            return Err(self.fail(e));
        }
        self.posted += self.chain.len() as u64;
        self.stats.max_in_flight = self.stats.max_in_flight.max(self.posted - self.completed);
        self.chain.clear();
        self.sges.clear();
        Ok(())
    }

    /// Waits until the next request fits the in-flight bound. Called before a request is
    /// started, while no SGE of it is queued.
    fn make_room(&mut self) -> Result<()> {
        let seq = self.posted + self.chain.len() as u64 + 1;
        while seq - self.completed > self.opts.max_outstanding as u64 {
            // Post what is queued (its signaled request is what frees room), then wait.
            self.flush_chain()?;
            self.reap()?;
        }
        Ok(())
    }

    /// Closes the request being built and queues it; `last` signals it.
    fn finish(&mut self, b: Building, last: bool) -> Result<()> {
        // make_room ran when this request was started.
        let seq = self.posted + self.chain.len() as u64 + 1;
        let signaled = last || seq % self.opts.signal_every as u64 == 0;
        if self.slots > 0 {
            // Gather the source spans into this request's bounce slot. The slot was last
            // used by request seq - slots, which completed: in-flight requests never
            // outnumber the slots.
            let slot_off = (seq % self.slots) * self.slot_len;
            let bounce = self.ep.bounce().ok_or(Error::Closed)?;
            let mut at = slot_off;
            for s in &self.sges[b.first_sge..] {
                bounce.copy_from(at, &self.source, s.offset, u64::from(s.len))?;
                at += u64::from(s.len);
            }
            self.sges.truncate(b.first_sge);
            self.sges.push(Sge {
                mr: LocalMr::Bounce,
                offset: slot_off,
                len: b.len as u32,
            });
            self.stats.bounced += b.len;
        }
        let num_sge = self.sges.len() - b.first_sge;
        self.chain.push(WriteWr {
            wr_id: seq,
            remote_addr: self.remote.addr + b.dst,
            rkey: self.rkey,
            first_sge: b.first_sge,
            num_sge,
            signaled,
        });
        self.stats.writes += 1;
        self.stats.signaled += u64::from(signaled);
        self.stats.sges += num_sge as u64;
        self.stats.bytes += b.len;
        self.epoch_bytes += b.len;
        if self.chain.len() >= POST_BATCH {
            self.flush_chain()?;
        }
        Ok(())
    }

    /// Adds `len` bytes from `src` at remote offset `dst` to the request being built, or
    /// starts a new one.
    fn add(&mut self, cur: &mut Option<Building>, src: u64, dst: u64, len: u64) -> Result<()> {
        if let Some(b) = cur.as_mut() {
            if b.dst + b.len == dst && b.len + len <= self.max_write {
                let in_wr = self.sges.len() - b.first_sge;
                match self.sges.last_mut() {
                    // Contiguous in the source too: grow the last SGE.
                    Some(s) if in_wr > 0 && s.offset + u64::from(s.len) == src => {
                        s.len += len as u32;
                        b.len += len;
                        return Ok(());
                    }
                    // With bounce buffers the spans are copied, so any count gathers.
                    _ if self.slots > 0 || in_wr < self.caps.max_sge => {
                        self.sges.push(Sge {
                            mr: LocalMr::Source,
                            offset: src,
                            len: len as u32,
                        });
                        b.len += len;
                        return Ok(());
                    }
                    _ => {}
                }
            }
            let done = *b;
            *cur = None;
            self.finish(done, false)?;
        }
        self.make_room()?;
        *cur = Some(Building {
            dst,
            len,
            first_sge: self.sges.len(),
        });
        self.sges.push(Sge {
            mr: LocalMr::Source,
            offset: src,
            len: len as u32,
        });
        Ok(())
    }
}

impl<E: Endpoint> PushSender for VerbsSender<E> {
    fn remote(&self) -> &RegionDesc {
        &self.remote
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn post(&mut self, runs: &[WriteRun]) -> Result<()> {
        if self.closed {
            return Err(Error::Closed);
        }
        for r in runs {
            self.remote.check_run(r, &self.source)?;
        }
        self.await_release()?;
        let mut cur = None;
        for r in runs {
            let mut off = 0;
            while off < r.len {
                // Pieces never straddle a max_write boundary of the run, so they fit one
                // request (and one u32 SGE length).
                let len = (r.len - off).min(self.max_write);
                self.add(&mut cur, r.src + off, r.dst + off, len)?;
                off += len;
            }
        }
        if let Some(b) = cur {
            self.finish(b, true)?;
        }
        self.flush_chain()
    }

    fn fence(&mut self) -> Result<()> {
        if self.closed {
            return Err(Error::Closed);
        }
        self.flush_chain()?;
        while self.completed < self.posted {
            self.reap()?;
        }
        Ok(())
    }

    fn commit(&mut self, bitmap: &PageBitmap) -> Result<u64> {
        self.remote.check_bitmap(bitmap)?;
        if self.closed {
            return Err(Error::Closed);
        }
        self.await_release()?;
        // The commit goes out only after the completion of the epoch's last write.
        self.fence()?;
        let epoch = self.epoch;
        message::encode_commit(&mut self.msg, epoch, self.epoch_bytes, bitmap.words());
        if self.msg.len() as u64 > self.caps.max_msg {
            return Err(framing::Error::TooLarge {
                what: "commit message",
                len: self.msg.len() as u64,
                max: self.caps.max_msg,
            }
            .into());
        }
        self.send_message(epoch)?;
        self.epoch += 1;
        self.epoch_bytes = 0;
        self.stats.commits += 1;
        Ok(epoch)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Event {
        Write {
            id: u64,
            signaled: bool,
            in_flight: u64,
        },
        Send {
            id: u64,
        },
        Completion {
            id: u64,
        },
    }

    /// A scripted queue pair: completes signaled requests one per poll, in order, with
    /// an error status at `fail_at`, and logs everything.
    #[derive(Debug, Default)]
    struct Script {
        /// Caps::wide_keys.
        wide_keys: bool,
        log: Vec<Event>,
        pending: VecDeque<(u64, bool)>,
        posted: u64,
        retired: u64,
        fail_at: Option<u64>,
    }

    impl Endpoint for Script {
        fn caps(&self) -> Caps {
            Caps {
                max_sge: 4,
                max_send_wr: 16,
                max_msg: 1 << 20,
                recv_len: 64,
                wide_keys: self.wide_keys,
            }
        }
        fn bounce(&self) -> Option<&Region> {
            None
        }
        fn post_writes(&mut self, wrs: &[WriteWr], _: &[Sge]) -> Result<()> {
            for w in wrs {
                self.posted += 1;
                self.pending.push_back((w.wr_id, w.signaled));
                self.log.push(Event::Write {
                    id: w.wr_id,
                    signaled: w.signaled,
                    in_flight: self.posted - self.retired,
                });
            }
            Ok(())
        }
        fn post_send(&mut self, wr_id: u64, _: u32, _: &[u8]) -> Result<()> {
            self.log.push(Event::Send { id: wr_id });
            self.pending.push_back((wr_id, true));
            Ok(())
        }
        fn poll_send(&mut self, out: &mut Vec<Wc>, _: Duration) -> Result<()> {
            while let Some((id, signaled)) = self.pending.pop_front() {
                if id & COMMIT_ID == 0 {
                    self.retired += 1;
                }
                let status = if self.fail_at == Some(id) {
                    WcStatus::RemoteAccess
                } else {
                    WcStatus::Success
                };
                if signaled || status != WcStatus::Success {
                    self.log.push(Event::Completion { id });
                    out.push(Wc { wr_id: id, status });
                    return Ok(());
                }
            }
            Ok(())
        }
        fn recv(&mut self, _: &mut Vec<u8>, t: Duration) -> Result<u32> {
            Err(Error::Timeout(t, "nothing scripted"))
        }
    }

    fn sender(fail_at: Option<u64>) -> VerbsSender<Script> {
        let src = Arc::new(Region::anonymous(256 * 4096).unwrap());
        let remote = RegionDesc {
            addr: 1 << 40,
            key: 7,
            len: 256 * 4096,
            page_size: 4096,
            port: 0,
            name: crate::push::EndpointName::EMPTY,
        };
        let opts = VerbsOptions {
            signal_every: 4,
            max_outstanding: 8,
            ..VerbsOptions::default()
        };
        let ep = Script {
            fail_at,
            ..Script::default()
        };
        VerbsSender::new(ep, remote, src, 1, opts).unwrap()
    }

    /// A key wider than 32 bits is refused by an endpoint with verbs rkeys and carried
    /// whole by one with wide (libfabric) keys.
    #[test]
    fn keys_wider_than_an_rkey_need_an_endpoint_with_wide_keys() {
        let src = Arc::new(Region::anonymous(4 * 4096).unwrap());
        let remote = RegionDesc {
            addr: 0,
            key: (1 << 40) | 5,
            len: 4 * 4096,
            page_size: 4096,
            port: 0,
            name: crate::push::EndpointName::EMPTY,
        };
        let narrow = Script::default();
        assert!(matches!(
            VerbsSender::new(narrow, remote, Arc::clone(&src), 1, VerbsOptions::default()),
            Err(Error::Protocol(_))
        ));
        let wide = Script {
            wide_keys: true,
            ..Script::default()
        };
        let mut tx = VerbsSender::new(wide, remote, src, 1, VerbsOptions::default()).unwrap();
        tx.post(&[WriteRun::pages(1, 1, 4096)]).unwrap();
        tx.flush_chain().unwrap();
        assert_eq!(tx.rkey, remote.key);
    }

    /// 40 separate pages: 40 requests, every 4th signaled, never more than 8 in flight,
    /// and the commit posted only after the completion of the 40th.
    #[test]
    fn commit_follows_the_last_completion_and_the_bound_holds() {
        let mut tx = sender(None);
        let runs: Vec<WriteRun> = (0..40).map(|p| WriteRun::pages(p * 2, 1, 4096)).collect();
        tx.post(&runs).unwrap();
        let mut bitmap = colo_memory::PageBitmap::new(tx.remote().pages());
        for p in 0..40u64 {
            bitmap.set(p * 2);
        }
        assert_eq!(tx.commit(&bitmap).unwrap(), 1);
        let log = &tx.ep.log;
        let mut last_write_done = false;
        for e in log {
            match *e {
                Event::Write {
                    id,
                    signaled,
                    in_flight,
                } => {
                    assert!(in_flight <= 8, "{e:?}");
                    assert_eq!(signaled, id % 4 == 0, "{e:?}");
                }
                Event::Completion { id: 40 } => last_write_done = true,
                Event::Send { .. } => assert!(last_write_done, "commit before the data"),
                Event::Completion { .. } => {}
            }
        }
        let sends = log
            .iter()
            .filter(|e| matches!(e, Event::Send { .. }))
            .count();
        assert_eq!(sends, 1);
        assert_eq!(tx.stats().writes, 40);
    }

    #[test]
    fn a_failed_write_fails_the_commit_and_closes_the_sender() {
        let mut tx = sender(Some(12));
        let runs: Vec<WriteRun> = (0..40).map(|p| WriteRun::pages(p * 2, 1, 4096)).collect();
        let none = colo_memory::PageBitmap::new(tx.remote().pages());
        let r = tx.post(&runs).and_then(|()| tx.commit(&none));
        assert!(
            matches!(
                r,
                Err(Error::Completion {
                    status: WcStatus::RemoteAccess,
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(!tx.ep.log.iter().any(|e| matches!(e, Event::Send { .. })));
        assert!(matches!(tx.post(&runs[..1]), Err(Error::Closed)));
    }
}
