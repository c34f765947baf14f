//! The verbs push pipeline, written once for every reliable-connected queue pair.
//!
//! [`VerbsSender`] and [`VerbsReceiver`] implement the push model ([`crate::push`]) on top
//! of an [`Endpoint`]: one side of a connected RC queue pair, reduced to the operations
//! the pipeline needs (post a chain of RDMA WRITEs, post a SEND with immediate, poll the
//! send completion queue, take a received message). Two endpoints exist:
//!
//! - the verbs device (`crate::rdma`, feature `rdma`), through rdma-sys;
//! - [`sim`], an in-process queue pair that enforces the verbs rules (rkey, bounds, send
//!   queue depth, max_sge, in-order execution, selective signaling, the error state that
//!   flushes every later request, receiver-not-ready) and injects faults.
//!
//! So the pipeline logic that runs on InfiniBand and soft-RoCE is the same code that the
//! tests on a machine without RDMA drive through [`sim`].
//!
//! The epoch protocol on a queue pair:
//! 1. Before the first write of epoch E (E > the first epoch of the connection), the sender
//!    waits for the receiver's release of E-1: one-sided writes land at once, so the
//!    receiver cannot hold them back the way the TCP backend does.
//! 2. Page runs become RDMA WRITE work requests: runs adjacent in the remote region merge
//!    into one request, gathering up to the device's `max_sge` scatter-gather entries.
//! 3. Only every Nth request, and the last of each `post`, is signaled; the number of
//!    requests in flight never exceeds the send queue. The completion of a signaled request
//!    retires it and every earlier one (RC completes in order).
//! 4. The commit is a SEND with immediate (the epoch), posted only after the completion of
//!    the epoch's last write, carrying the epoch's bitmap ([`message`]).

pub mod message;
mod receiver;
mod sender;
pub mod sim;

use std::time::Duration;

pub use receiver::VerbsReceiver;
pub use sender::{SenderStats, VerbsAbort, VerbsOptions, VerbsSender};

use crate::error::{Error, Result};

/// The status of a completed work request, as verbs reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WcStatus {
    /// Completed.
    Success,
    /// A local length error (a message longer than the posted receive buffer).
    LocalLength,
    /// A local protection error (an SGE outside a local memory region).
    LocalProtection,
    /// Flushed: the queue pair was already in the error state.
    Flushed,
    /// The responder refused the access: a bad rkey, or a write outside its region.
    RemoteAccess,
    /// The responder could not take the request (no room in its receive buffer).
    RemoteInvalidRequest,
    /// The responder failed the operation.
    RemoteOperation,
    /// The transport retry count was exceeded: the link or the peer is gone.
    RetryExceeded,
    /// The peer had no receive buffer posted, beyond the RNR retry count.
    RnrRetryExceeded,
    /// Any other status, with the verbs code.
    Other(u32),
}

impl std::fmt::Display for WcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Success => "success",
            Self::LocalLength => "local length error",
            Self::LocalProtection => "local protection error",
            Self::Flushed => "flushed (queue pair in error state)",
            Self::RemoteAccess => "remote access error (bad rkey or write outside the region)",
            Self::RemoteInvalidRequest => "remote invalid request",
            Self::RemoteOperation => "remote operation error",
            Self::RetryExceeded => "transport retry count exceeded (link or peer lost)",
            Self::RnrRetryExceeded => "receiver not ready, retry count exceeded",
            Self::Other(c) => return write!(f, "verbs completion status {c}"),
        };
        f.write_str(s)
    }
}

impl WcStatus {
    /// The error a failed completion of `what` becomes.
    pub fn into_error(self, what: &'static str) -> Error {
        Error::Completion { what, status: self }
    }
}

/// Which local registered memory a scatter-gather entry reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalMr {
    /// The source region (guest memory), registered once.
    Source,
    /// The registered bounce buffers, used where the source could not be registered.
    Bounce,
}

/// One scatter-gather entry: `len` bytes at `offset` of a local memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    /// The memory region.
    pub mr: LocalMr,
    /// Offset in it.
    pub offset: u64,
    /// Bytes.
    pub len: u32,
}

/// One RDMA WRITE work request: its SGEs are `sges[first_sge..first_sge + num_sge]` of the
/// slice posted with it, written contiguously from `remote_addr` under `rkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteWr {
    /// The work request id (the pipeline's sequence number).
    pub wr_id: u64,
    /// The remote address.
    pub remote_addr: u64,
    /// The remote key.
    pub rkey: u64,
    /// Index of the first SGE.
    pub first_sge: usize,
    /// Number of SGEs.
    pub num_sge: usize,
    /// Whether it generates a completion on success.
    pub signaled: bool,
}

impl WriteWr {
    /// Bytes the request writes.
    pub fn len(&self, sges: &[Sge]) -> u64 {
        sges[self.first_sge..self.first_sge + self.num_sge]
            .iter()
            .map(|s| u64::from(s.len))
            .sum()
    }
}

/// A send-queue completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wc {
    /// The work request it completes.
    pub wr_id: u64,
    /// Its status.
    pub status: WcStatus,
}

/// What an endpoint's queue pair allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Scatter-gather entries per work request.
    pub max_sge: usize,
    /// Send queue depth: work requests posted and not yet retired by a polled completion.
    pub max_send_wr: usize,
    /// Largest message (and RDMA WRITE) in bytes.
    pub max_msg: u64,
    /// Size of each posted receive buffer (the largest message this side can receive).
    pub recv_len: usize,
    /// Whether writes carry remote keys wider than a verbs rkey (32 bits): libfabric keys
    /// are 64 bits.
    pub wide_keys: bool,
}

/// One side of a connected RC queue pair, as the pipeline uses it.
pub trait Endpoint: Send {
    /// The queue pair's limits.
    fn caps(&self) -> Caps;

    /// The registered bounce buffers, if the source memory could not be registered (then
    /// every SGE must read from [`LocalMr::Bounce`]); `None` when the source is
    /// registered.
    fn bounce(&self) -> Option<&colo_memory::Region>;

    /// Posts a chain of RDMA WRITEs, in order.
    ///
    /// # Errors
    /// A post failure (send queue full, too many SGEs, queue pair in error); nothing of the
    /// chain after the failing request is posted.
    fn post_writes(&mut self, wrs: &[WriteWr], sges: &[Sge]) -> Result<()>;

    /// Posts a signaled SEND with immediate `imm` of `msg` (at most
    /// [`Caps::max_msg`], copied to a registered send buffer: at most one send may be
    /// outstanding).
    ///
    /// # Errors
    /// As [`post_writes`](Self::post_writes).
    fn post_send(&mut self, wr_id: u64, imm: u32, msg: &[u8]) -> Result<()>;

    /// Waits up to `timeout` for send completions and appends them to `out` (returning
    /// with none at the timeout).
    ///
    /// # Errors
    /// A failure of the completion queue itself; failed work requests are completions
    /// with a non-success status, not errors.
    fn poll_send(&mut self, out: &mut Vec<Wc>, timeout: Duration) -> Result<()>;

    /// Waits up to `timeout` for the next received message, copies it into `buf` and
    /// reposts its receive buffer. Returns the immediate data.
    ///
    /// # Errors
    /// [`Error::Timeout`], or the failed receive completion (the queue pair went to the
    /// error state: the peer broke the connection or violated an access rule).
    fn recv(&mut self, buf: &mut Vec<u8>, timeout: Duration) -> Result<u32>;
}

/// Checks that a key published by a receiver fits a verbs rkey (32 bits).
///
/// # Errors
/// [`Error::Protocol`] for a wider key.
pub fn rkey_of(key: u64) -> Result<u32> {
    u32::try_from(key)
        .map_err(|_| Error::Protocol(format!("remote key {key:#x} is wider than a verbs rkey")))
}

/// The soft locked-memory limit, readable (for the error of a refused registration).
#[cfg(any(feature = "rdma", feature = "ofi"))]
pub(crate) fn memlock_limit() -> String {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return "unknown".into();
    }
    if r.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        format!("{} KiB", r.rlim_cur / 1024)
    }
}

/// Waits at most this long per poll while blocked on a completion.
pub(crate) const POLL_SLICE: Duration = Duration::from_millis(50);
