//! An in-process RC queue pair that enforces the verbs rules, for testing the pipeline on
//! machines without RDMA.
//!
//! Each side has a "NIC" thread that executes its posted requests in order, as an RC send
//! queue does:
//! - an RDMA WRITE presents an rkey and a remote address: a key other than the region's, or
//!   any byte outside the region, fails it with a remote access error and nothing of it
//!   lands (the region grants remote write and nothing else: there is no read operation);
//! - local SGEs must lie inside the registered source or bounce buffers (local protection
//!   error otherwise);
//! - a completion is generated only for signaled requests, after their bytes are in the
//!   target; it retires every earlier unsignaled request from the send queue;
//! - posting beyond the send queue depth, or with more SGEs than `max_sge`, fails at post
//!   time, as `ibv_post_send` does;
//! - a SEND needs a receive buffer posted on the peer (else receiver-not-ready) that is large
//!   enough (else the peer sees a length error);
//! - after the first failure the connection is in the error state: every later request is
//!   flushed with a completion each, and the peer's receives fail.
//!
//! [`Faults`] injects a lost link, a corrupted rkey or an out-of-bounds address at a chosen
//! RDMA WRITE; [`SimEndpoint::inject`] arms faults later, counted from that point.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{Caps, Endpoint, LocalMr, Sge, Wc, WcStatus, WriteWr};
use crate::error::{Error, Result};
use crate::framing;
use colo_memory::Region;

/// Faults to inject, each at the n-th RDMA WRITE (counting from 0) that the sending side's
/// NIC executes after the faults were armed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// The link drops before this write lands (retry count exceeded; the queue pair goes to
    /// the error state).
    pub lose_connection_at: Option<u64>,
    /// This write arrives with a corrupted rkey.
    pub corrupt_key_at: Option<u64>,
    /// This write arrives with its address pushed past the end of the region.
    pub out_of_bounds_at: Option<u64>,
}

/// The shape of the simulated queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimConfig {
    /// SGEs per request.
    pub max_sge: usize,
    /// Send queue depth.
    pub max_send_wr: usize,
    /// Receive buffers posted on each side.
    pub recv_depth: usize,
    /// Largest message.
    pub max_msg: u64,
    /// `Some(len)`: the source "could not be registered", and the sender gets `len` bytes of
    /// registered bounce buffers instead.
    pub bounce: Option<usize>,
    /// Receive buffer sizes of (the writing side, the region's side), as the verbs
    /// endpoints size them; `None`: `max_msg` on both.
    pub recv_lens: Option<(usize, usize)>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            max_sge: 8,
            max_send_wr: 64,
            recv_depth: 2,
            max_msg: 1 << 31,
            bounce: None,
            recv_lens: None,
        }
    }
}

#[derive(Debug)]
enum SimWr {
    Write(WriteWr, Vec<Sge>),
    Send { wr_id: u64, imm: u32, msg: Vec<u8> },
    Arm(Faults),
}

type Delivery = Result<(u32, Vec<u8>)>;

/// The memory a side exposes to its peer's writes.
#[derive(Debug, Clone)]
struct Target {
    region: Arc<Region>,
    rkey: u32,
}

/// One side of a simulated connection.
#[derive(Debug)]
pub struct SimEndpoint {
    caps: Caps,
    bounce: Option<Arc<Region>>,
    wr: Option<Sender<SimWr>>,
    nic: Option<JoinHandle<()>>,
    cq: Receiver<(Wc, usize)>,
    sq_used: usize,
    rq: Receiver<Delivery>,
    /// Receive buffers this side has posted (the peer's NIC consumes them).
    credits: Arc<AtomicUsize>,
    /// The SEND whose completion has not been polled: its (single) send buffer is busy.
    send_busy: Option<u64>,
}

/// Connects two simulated endpoints: the first may write into `target` under `rkey` from
/// `source` (or from its bounce buffers); the second owns `target`.
///
/// # Errors
/// [`Error::Memory`] if the bounce buffers cannot be mapped.
pub fn connect(
    target: Arc<Region>,
    rkey: u32,
    source: Arc<Region>,
    cfg: SimConfig,
    faults: Faults,
) -> Result<(SimEndpoint, SimEndpoint)> {
    let broken = Arc::new(AtomicBool::new(false));
    let bounce = match cfg.bounce {
        Some(len) => Some(Arc::new(Region::anonymous(len)?)),
        None => None,
    };
    let (a_rq_tx, a_rq) = crossbeam_channel::unbounded();
    let (b_rq_tx, b_rq) = crossbeam_channel::unbounded();
    let a_credits = Arc::new(AtomicUsize::new(cfg.recv_depth));
    let b_credits = Arc::new(AtomicUsize::new(cfg.recv_depth));
    let (a_recv, b_recv) = cfg
        .recv_lens
        .unwrap_or((cfg.max_msg as usize, cfg.max_msg as usize));
    let caps = |recv_len| Caps {
        max_sge: cfg.max_sge,
        max_send_wr: cfg.max_send_wr,
        max_msg: cfg.max_msg,
        recv_len,
        wide_keys: false,
    };
    let local = match &bounce {
        Some(b) => (None, Some(Arc::clone(b))),
        None => (Some(source), None),
    };
    let a = SimEndpoint::start(
        caps(a_recv),
        bounce,
        Nic {
            source: local.0,
            bounce: local.1,
            target: Some(Target {
                region: target,
                rkey,
            }),
            peer_rq: b_rq_tx.clone(),
            peer_credits: Arc::clone(&b_credits),
            peer_recv_len: b_recv,
            faults,
            writes: 0,
            broken: Arc::clone(&broken),
            own_rq: a_rq_tx.clone(),
        },
        a_rq,
        Arc::clone(&a_credits),
    )?;
    let b = SimEndpoint::start(
        caps(b_recv),
        None,
        Nic {
            source: None,
            bounce: None,
            target: None,
            peer_rq: a_rq_tx,
            peer_credits: a_credits,
            peer_recv_len: a_recv,
            faults: Faults::default(),
            writes: 0,
            broken,
            own_rq: b_rq_tx,
        },
        b_rq,
        b_credits,
    )?;
    Ok((a, b))
}

impl SimEndpoint {
    fn start(
        caps: Caps,
        bounce: Option<Arc<Region>>,
        nic: Nic,
        rq: Receiver<Delivery>,
        credits: Arc<AtomicUsize>,
    ) -> Result<Self> {
        let (wr_tx, wr_rx) = crossbeam_channel::unbounded();
        let (cq_tx, cq) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("sim-nic".into())
            .spawn(move || nic.run(&wr_rx, &cq_tx))
            .map_err(Error::Thread)?;
        Ok(Self {
            caps,
            bounce,
            wr: Some(wr_tx),
            nic: Some(thread),
            cq,
            sq_used: 0,
            rq,
            credits,
            send_busy: None,
        })
    }

    /// Arms `faults`, counted from the next RDMA WRITE this side's NIC executes.
    ///
    /// # Errors
    /// [`Error::Closed`] if the NIC is gone.
    pub fn inject(&mut self, faults: Faults) -> Result<()> {
        self.wr
            .as_ref()
            .ok_or(Error::Closed)?
            .send(SimWr::Arm(faults))
            .map_err(|_| Error::Closed)
    }

    fn submit(&mut self, wr: SimWr) -> Result<()> {
        if self.sq_used >= self.caps.max_send_wr {
            return Err(Error::Post(format!(
                "ENOMEM: the send queue is full ({} requests)",
                self.caps.max_send_wr
            )));
        }
        self.wr
            .as_ref()
            .ok_or(Error::Closed)?
            .send(wr)
            .map_err(|_| Error::Post("the queue pair is destroyed".into()))?;
        self.sq_used += 1;
        Ok(())
    }
}

impl Endpoint for SimEndpoint {
    fn caps(&self) -> Caps {
        self.caps
    }

    fn bounce(&self) -> Option<&Region> {
        self.bounce.as_deref()
    }

    fn post_writes(&mut self, wrs: &[WriteWr], sges: &[Sge]) -> Result<()> {
        for wr in wrs {
            if wr.num_sge > self.caps.max_sge {
                return Err(Error::Post(format!(
                    "EINVAL: {} SGEs, the queue pair allows {}",
                    wr.num_sge, self.caps.max_sge
                )));
            }
            let list = sges
                .get(wr.first_sge..wr.first_sge + wr.num_sge)
                .ok_or_else(|| Error::Post("SGE list out of range".into()))?;
            let len: u64 = list.iter().map(|s| u64::from(s.len)).sum();
            if len > self.caps.max_msg {
                return Err(Error::Post(format!(
                    "a {len}-byte RDMA WRITE exceeds the port's {}-byte message limit",
                    self.caps.max_msg
                )));
            }
            self.submit(SimWr::Write(*wr, list.to_vec()))?;
        }
        Ok(())
    }

    fn post_send(&mut self, wr_id: u64, imm: u32, msg: &[u8]) -> Result<()> {
        if let Some(busy) = self.send_busy {
            return Err(Error::Post(format!(
                "the send buffer still holds request {busy:#x}, whose completion was not polled"
            )));
        }
        if msg.len() as u64 > self.caps.max_msg {
            return Err(Error::Post(format!(
                "a {}-byte message exceeds the {}-byte limit",
                msg.len(),
                self.caps.max_msg
            )));
        }
        self.submit(SimWr::Send {
            wr_id,
            imm,
            msg: msg.to_vec(),
        })?;
        self.send_busy = Some(wr_id);
        Ok(())
    }

    fn poll_send(&mut self, out: &mut Vec<Wc>, timeout: Duration) -> Result<()> {
        let first = match self.cq.recv_timeout(timeout) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => return Ok(()),
            Err(RecvTimeoutError::Disconnected) => return Err(Error::Closed),
        };
        for (wc, retired) in std::iter::once(first).chain(self.cq.try_iter()) {
            self.sq_used = self.sq_used.saturating_sub(retired);
            if self.send_busy == Some(wc.wr_id) {
                self.send_busy = None;
            }
            out.push(wc);
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut Vec<u8>, timeout: Duration) -> Result<u32> {
        match self.rq.recv_timeout(timeout) {
            Ok(Ok((imm, msg))) => {
                *buf = msg;
                // Repost the receive buffer.
                self.credits.fetch_add(1, Ordering::AcqRel);
                Ok(imm)
            }
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => {
                Err(Error::Timeout(timeout, "a message on the queue pair"))
            }
            Err(RecvTimeoutError::Disconnected) => Err(framing::Error::PeerClosed.into()),
        }
    }
}

impl Drop for SimEndpoint {
    fn drop(&mut self) {
        self.wr = None;
        if let Some(t) = self.nic.take() {
            let _ = t.join();
        }
    }
}

struct Nic {
    source: Option<Arc<Region>>,
    bounce: Option<Arc<Region>>,
    target: Option<Target>,
    peer_rq: Sender<Delivery>,
    peer_credits: Arc<AtomicUsize>,
    peer_recv_len: usize,
    faults: Faults,
    writes: u64,
    broken: Arc<AtomicBool>,
    /// This side's own receive queue: its receives fail too when the connection breaks.
    own_rq: Sender<Delivery>,
}

impl Nic {
    fn run(mut self, wrs: &Receiver<SimWr>, cq: &Sender<(Wc, usize)>) {
        let mut unsignaled = 0usize;
        for wr in wrs {
            let (wr_id, signaled) = match &wr {
                SimWr::Arm(f) => {
                    self.faults = *f;
                    self.writes = 0;
                    continue;
                }
                SimWr::Write(w, _) => (w.wr_id, w.signaled),
                SimWr::Send { wr_id, .. } => (*wr_id, true),
            };
            unsignaled += 1;
            if self.broken.load(Ordering::Acquire) {
                // Every request of an errored queue pair completes, flushed.
                let _ = cq.send((
                    Wc {
                        wr_id,
                        status: WcStatus::Flushed,
                    },
                    std::mem::take(&mut unsignaled),
                ));
                continue;
            }
            let status = match wr {
                SimWr::Write(w, sges) => self.write(w, &sges),
                SimWr::Send { imm, msg, .. } => self.send(imm, msg),
                SimWr::Arm(_) => continue,
            };
            if status != WcStatus::Success {
                self.broken.store(true, Ordering::Release);
            }
            if signaled || status != WcStatus::Success {
                let _ = cq.send((Wc { wr_id, status }, std::mem::take(&mut unsignaled)));
            }
        }
    }

    /// Breaks the connection as the peer sees it: its receives fail with `peer`, and so do
    /// this side's.
    fn break_with(&self, peer: Error, own: Error) {
        self.broken.store(true, Ordering::Release);
        let _ = self.peer_rq.send(Err(peer));
        let _ = self.own_rq.send(Err(own));
    }

    fn write(&mut self, mut w: WriteWr, sges: &[Sge]) -> WcStatus {
        let n = self.writes;
        self.writes += 1;
        let Some(t) = self.target.clone() else {
            return WcStatus::Other(0);
        };
        let len: u64 = sges.iter().map(|s| u64::from(s.len)).sum();
        if self.faults.lose_connection_at == Some(n) {
            self.break_with(
                framing::Error::PeerClosed.into(),
                framing::Error::PeerClosed.into(),
            );
            return WcStatus::RetryExceeded;
        }
        if self.faults.corrupt_key_at == Some(n) {
            w.rkey ^= 0xdead_beef;
        }
        let base = t.region.as_ptr() as u64;
        if self.faults.out_of_bounds_at == Some(n) {
            w.remote_addr = base + t.region.len() as u64 - len / 2;
        }
        let in_bounds = w
            .remote_addr
            .checked_sub(base)
            .is_some_and(|off| t.region.check(off, len).is_ok());
        if w.rkey != u64::from(t.rkey) || !in_bounds {
            // The responder NAKs: its queue pair goes to error too, flushing its receives.
            let flushed = || Error::Completion {
                what: "a posted receive (the peer's request violated the region's access rules)",
                status: WcStatus::Flushed,
            };
            self.break_with(flushed(), flushed());
            return WcStatus::RemoteAccess;
        }
        let mut dst = w.remote_addr - base;
        for s in sges {
            let local = match s.mr {
                LocalMr::Source => self.source.as_deref(),
                LocalMr::Bounce => self.bounce.as_deref(),
            };
            let Some(local) = local.filter(|l| l.check(s.offset, u64::from(s.len)).is_ok()) else {
                self.broken.store(true, Ordering::Release);
                return WcStatus::LocalProtection;
            };
            if t.region
                .copy_from(dst, local, s.offset, u64::from(s.len))
                .is_err()
            {
                return WcStatus::RemoteAccess;
            }
            dst += u64::from(s.len);
        }
        WcStatus::Success
    }

    fn send(&mut self, imm: u32, msg: Vec<u8>) -> WcStatus {
        if msg.len() > self.peer_recv_len {
            let e = || Error::Completion {
                what: "a receive (message longer than the posted buffer)",
                status: WcStatus::LocalLength,
            };
            self.break_with(e(), e());
            return WcStatus::RemoteInvalidRequest;
        }
        let took = self
            .peer_credits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(1));
        if took.is_err() {
            let e = || Error::Completion {
                what: "a send (no receive buffer posted on the peer)",
                status: WcStatus::RnrRetryExceeded,
            };
            self.break_with(e(), e());
            return WcStatus::RnrRetryExceeded;
        }
        let _ = self.peer_rq.send(Ok((imm, msg)));
        WcStatus::Success
    }
}
