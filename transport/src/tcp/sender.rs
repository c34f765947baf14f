//! The sending side of the TCP push path: runs are batched into large gather writes, one
//! worker thread per stream, so several streams move data in parallel.

use colo_auth::seal::{Sealed, SessionKeys};
use colo_auth::{Channel, Credentials, HANDSHAKE_TIMEOUT, Role as AuthRole};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use zerocopy::IntoBytes;

use super::io::ScatterIo;
use super::wire::{
    MAX_BATCH_BYTES, MAX_BATCH_RUNS, MAX_STREAMS, PUSH_HEADER_LEN, PushFrame, RUN_DESC_LEN, RunDesc,
};
use crate::error::{Error, Result};
use crate::framing::{self, read_full};
use crate::push::{PushSender, RegionDesc, WriteRun};
use colo_memory::{PageBitmap, Region};

/// Tuning of a [`TcpPushSender`].
#[derive(Debug, Clone)]
pub struct TcpPushOptions {
    /// Parallel TCP streams (1 to 16). Default 2.
    pub streams: usize,
    /// Most runs per batch (one gather write). Default 512.
    pub batch_runs: usize,
    /// Most bytes per batch; longer runs are split. Default 4 MiB.
    pub batch_bytes: u64,
    /// Batches queued per stream before `post` blocks. Default 4.
    pub queue_depth: usize,
    /// How long a fence or commit waits for the receiver. Default 60 s.
    pub ack_timeout: Duration,
    /// How long connecting may take (the receiver may still be starting). Default 10 s.
    pub connect_timeout: Duration,
}

impl Default for TcpPushOptions {
    fn default() -> Self {
        Self {
            streams: 2,
            batch_runs: 512,
            batch_bytes: 4 << 20,
            queue_depth: 4,
            ack_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Default)]
struct Batch {
    epoch: u64,
    runs: Vec<WriteRun>,
    bytes: u64,
}

#[derive(Debug)]
enum Cmd {
    Batch(Batch),
    Fence(u64),
    EpochEnd {
        epoch: u64,
        bitmap: Option<Arc<Vec<u64>>>,
    },
    Goodbye,
}

#[derive(Debug)]
enum Done {
    Fence(u64),
    Epoch(u64),
    Failed(Error),
}

#[derive(Debug)]
struct Worker {
    tx: Sender<Cmd>,
    thread: Option<JoinHandle<()>>,
}

/// Pushes page runs from a local source region into a remote `TcpPushReceiver`
/// (crate::tcp::TcpPushReceiver) over one or more TCP streams.
#[derive(Debug)]
pub struct TcpPushSender {
    remote: RegionDesc,
    source: Arc<Region>,
    opts: TcpPushOptions,
    epoch: u64,
    workers: Vec<Worker>,
    done: Receiver<Done>,
    pending: Batch,
    next_worker: usize,
    fence_id: u64,
    /// The epoch bitmap handed to stream 0, kept to be reused.
    bitmap: Arc<Vec<u64>>,
    /// The epoch whose end was sent and whose acknowledgements are not yet taken.
    committing: Option<u64>,
    closed: bool,
    abort: TcpPushAbort,
}

/// Ends a [`TcpPushSender`]'s streams from any thread: for a caller that learned by other
/// means (a heartbeat) that the receiver is gone, so that a fence or commit waiting for
/// it fails now instead of at [`TcpPushOptions::ack_timeout`].
#[derive(Debug, Clone)]
pub struct TcpPushAbort {
    socks: Arc<Vec<TcpStream>>,
}

impl TcpPushAbort {
    /// Shuts every stream down: the sender's waits and its workers' blocked sends and
    /// receives fail at once, and the sender is closed.
    pub fn abort(&self) {
        for s in self.socks.iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl TcpPushSender {
    /// Connects `opts.streams` streams to the receiver at `addr` (its port is
    /// `remote.port`), authenticates each with `creds` (as the primary), and presents the
    /// region key.
    ///
    /// # Errors
    /// [`Error::Connect`], [`Error::Auth`] (the receiver is not the pair's secondary, or
    /// refused this side), a socket error, or the receiver closing the stream (a wrong
    /// key or layout: the receiver logs which).
    pub fn connect(
        addr: SocketAddr,
        remote: RegionDesc,
        source: Arc<Region>,
        creds: &Credentials,
        opts: TcpPushOptions,
    ) -> Result<Self> {
        let n = opts.streams;
        if n == 0 || n > MAX_STREAMS as usize {
            return Err(Error::Handshake(format!(
                "{n} streams asked for, 1 to {MAX_STREAMS} allowed"
            )));
        }
        if remote.page_size % 1024 != 0 || remote.page_size / 1024 > u32::from(u16::MAX) {
            return Err(Error::Handshake(format!(
                "page size {} cannot be announced",
                remote.page_size
            )));
        }
        let batch_runs = opts.batch_runs.clamp(1, MAX_BATCH_RUNS as usize);
        let batch_bytes = opts
            .batch_bytes
            .clamp(u64::from(remote.page_size), MAX_BATCH_BYTES);
        let opts = TcpPushOptions {
            batch_runs,
            batch_bytes,
            ..opts
        };
        let deadline = Instant::now() + opts.connect_timeout;
        let mut socks = Vec::with_capacity(n);
        let mut peers = Vec::with_capacity(n);
        for i in 0..n {
            let mut s = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    // The receiver stops listening once it refuses a stream's Hello: a
                    // later stream's refused connect then means that refusal, and is
                    // reported at once rather than after the whole connect timeout.
                    Err(_) if socks.iter().any(closed_by_peer) => {
                        return Err(Error::Handshake(
                            "the receiver closed the stream: wrong key or layout".into(),
                        ));
                    }
                    Err(source) if Instant::now() >= deadline => {
                        return Err(Error::Connect {
                            addr: addr.to_string(),
                            source,
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            };
            s.set_nodelay(true).map_err(|source| Error::SocketOption {
                option: "TCP_NODELAY",
                source,
            })?;
            peers.push(colo_auth::connect(
                &mut s,
                creds,
                AuthRole::Primary,
                Channel::Push(i as u32),
                HANDSHAKE_TIMEOUT,
            )?);
            let hello = PushFrame::Hello {
                key: remote.key,
                region_len: remote.len,
                page_kib: (remote.page_size / 1024) as u16,
                stream: i as u32,
                streams: n as u16,
            };
            s.write_all(&hello.to_bytes()).map_err(Error::Send)?;
            socks.push(s);
        }
        // The receiver acknowledges only once every stream is in.
        for s in &mut socks {
            s.set_read_timeout(Some(opts.connect_timeout))
                .map_err(|source| Error::SocketOption {
                    option: "SO_RCVTIMEO",
                    source,
                })?;
            let mut hdr = [0u8; PUSH_HEADER_LEN];
            read_full(s, &mut hdr, true).map_err(|e| match e {
                framing::Error::PeerClosed => {
                    Error::Handshake("the receiver closed the stream: wrong key or layout".into())
                }
                e => e.into(),
            })?;
            if PushFrame::parse(&hdr)? != PushFrame::HelloAck {
                return Err(Error::Protocol("expected HelloAck".into()));
            }
            s.set_read_timeout(None)
                .map_err(|source| Error::SocketOption {
                    option: "SO_RCVTIMEO",
                    source,
                })?;
        }
        let abort = TcpPushAbort {
            socks: Arc::new(
                socks
                    .iter()
                    .map(TcpStream::try_clone)
                    .collect::<std::io::Result<_>>()
                    .map_err(|source| Error::SocketOption {
                        option: "dup",
                        source,
                    })?,
            ),
        };
        let (done_tx, done) = crossbeam_channel::unbounded();
        let mut workers = Vec::with_capacity(n);
        for (i, (s, peer)) in socks.into_iter().zip(peers).enumerate() {
            let (tx, rx) = crossbeam_channel::bounded(opts.queue_depth.max(1));
            let src = Arc::clone(&source);
            let done_tx = done_tx.clone();
            let raw = s.try_clone().map_err(|source| Error::SocketOption {
                option: "dup",
                source,
            })?;
            let builder = std::thread::Builder::new().name(format!("push-tx-{i}"));
            // From here on (after the plain Hello and HelloAck) an encrypted pair seals
            // every byte of the stream.
            let thread = if creds.encrypts() {
                let sealed = Sealed::new(s, SessionKeys::from_peer(&peer));
                builder.spawn(move || worker(sealed, &raw, &src, &rx, &done_tx))
            } else {
                builder.spawn(move || worker(s, &raw, &src, &rx, &done_tx))
            }
            .map_err(Error::Thread)?;
            workers.push(Worker {
                tx,
                thread: Some(thread),
            });
        }
        tracing::info!(streams = n, %addr, "push sender connected");
        Ok(Self {
            remote,
            source,
            opts,
            epoch: 1,
            workers,
            done,
            pending: Batch {
                epoch: 1,
                ..Batch::default()
            },
            next_worker: 0,
            fence_id: 0,
            bitmap: Arc::new(Vec::new()),
            committing: None,
            closed: false,
            abort,
        })
    }

    /// A handle that ends this sender's streams from another thread.
    pub fn abort_handle(&self) -> TcpPushAbort {
        self.abort.clone()
    }

    fn fail(&mut self, e: Error) -> Error {
        self.closed = true;
        // A failed sender is closed for good: end the streams too, so that no worker stays
        // blocked on a receiver that stopped reading (dropping the sender joins them).
        self.abort.abort();
        for w in &self.workers {
            // Wake workers blocked on a full queue of a dead peer.
            let _ = w.tx.try_send(Cmd::Goodbye);
        }
        e
    }

    /// The error a dead worker reported, if any.
    fn worker_error(&mut self) -> Error {
        while let Ok(d) = self.done.try_recv() {
            if let Done::Failed(e) = d {
                return self.fail(e);
            }
        }
        self.fail(Error::Closed)
    }

    fn send_to(&mut self, i: usize, cmd: Cmd) -> Result<()> {
        if self.workers[i].tx.send(cmd).is_err() {
            return Err(self.worker_error());
        }
        Ok(())
    }

    fn dispatch(&mut self) -> Result<()> {
        if self.pending.runs.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(
            &mut self.pending,
            Batch {
                epoch: self.epoch,
                ..Batch::default()
            },
        );
        let i = self.next_worker;
        self.next_worker = (i + 1) % self.workers.len();
        self.send_to(i, Cmd::Batch(batch))
    }

    fn broadcast(&mut self, make: impl Fn(usize) -> Cmd) -> Result<()> {
        for i in 0..self.workers.len() {
            self.send_to(i, make(i))?;
        }
        Ok(())
    }

    fn wait_all(&mut self, want: impl Fn(&Done) -> bool, what: &'static str) -> Result<()> {
        let deadline = Instant::now() + self.opts.ack_timeout;
        let mut got = 0;
        while got < self.workers.len() {
            match self.done.recv_deadline(deadline) {
                Ok(Done::Failed(e)) => return Err(self.fail(e)),
                Ok(d) if want(&d) => got += 1,
                Ok(d) => {
                    return Err(self.fail(Error::Protocol(format!(
                        "unexpected completion {d:?} awaiting {what}"
                    ))));
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.fail(Error::Timeout(self.opts.ack_timeout, what)));
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.fail(Error::Closed)),
            }
        }
        Ok(())
    }

    fn goodbye(&mut self) {
        if !self.closed {
            self.closed = true;
            let _ = self.dispatch();
            let _ = self.broadcast(|_| Cmd::Goodbye);
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// Says goodbye on every stream and waits for the workers.
    ///
    /// # Errors
    /// [`Error::Closed`] if the sender had already failed.
    pub fn close(mut self) -> Result<()> {
        let was_closed = self.closed;
        self.goodbye();
        if was_closed {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }
}

impl PushSender for TcpPushSender {
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
        for r in runs {
            let mut off = 0;
            while off < r.len {
                let room = self.opts.batch_bytes - self.pending.bytes;
                let take = room.min(r.len - off);
                self.pending.runs.push(WriteRun {
                    src: r.src + off,
                    dst: r.dst + off,
                    len: take,
                });
                self.pending.bytes += take;
                off += take;
                if self.pending.runs.len() >= self.opts.batch_runs
                    || self.pending.bytes >= self.opts.batch_bytes
                {
                    self.dispatch()?;
                }
            }
        }
        Ok(())
    }

    fn fence(&mut self) -> Result<()> {
        self.finish_commit()?;
        if self.closed {
            return Err(Error::Closed);
        }
        self.dispatch()?;
        self.fence_id += 1;
        let id = self.fence_id;
        self.broadcast(|_| Cmd::Fence(id))?;
        self.wait_all(
            |d| matches!(d, Done::Fence(x) if *x == id),
            "a fence acknowledgement",
        )
    }

    fn commit(&mut self, bitmap: &PageBitmap) -> Result<u64> {
        let epoch = self.start_commit(bitmap)?;
        self.finish_commit()?;
        Ok(epoch)
    }

    fn start_commit(&mut self, bitmap: &PageBitmap) -> Result<u64> {
        self.finish_commit()?;
        if self.closed {
            return Err(Error::Closed);
        }
        self.remote.check_bitmap(bitmap)?;
        self.dispatch()?;
        let epoch = self.epoch;
        // Reuse the buffer: the worker dropped its handle before it reported the last
        // epoch's ack, so this copies in place instead of allocating.
        let buf = Arc::make_mut(&mut self.bitmap);
        buf.clear();
        buf.extend(bitmap.words().iter().map(|w| w.to_le()));
        let shared = Arc::clone(&self.bitmap);
        self.broadcast(|i| Cmd::EpochEnd {
            epoch,
            bitmap: (i == 0).then(|| Arc::clone(&shared)),
        })?;
        drop(shared);
        // Each worker takes its stream's acknowledgement before it sends anything of the
        // next epoch, so the next epoch may open now.
        self.committing = Some(epoch);
        self.epoch += 1;
        self.pending.epoch = self.epoch;
        Ok(epoch)
    }

    fn finish_commit(&mut self) -> Result<()> {
        let Some(epoch) = self.committing.take() else {
            return Ok(());
        };
        self.wait_all(
            |d| matches!(d, Done::Epoch(e) if *e == epoch),
            "an epoch acknowledgement",
        )
    }
}

impl Drop for TcpPushSender {
    fn drop(&mut self) {
        self.goodbye();
    }
}

/// One stream's sender thread. `s` is the stream as the protocol reads and writes it (a
/// socket, or a record layer over one); `raw` is the socket itself, shut down on failure.
fn worker<S: ScatterIo>(
    mut s: S,
    raw: &TcpStream,
    src: &Region,
    rx: &Receiver<Cmd>,
    done: &Sender<Done>,
) {
    let mut table: Vec<u8> = Vec::new();
    let mut iovs: Vec<libc::iovec> = Vec::new();
    for cmd in rx {
        let r = match cmd {
            Cmd::Batch(b) => send_batch(&mut s, src, &b, &mut table, &mut iovs),
            Cmd::Fence(id) => {
                round_trip(&mut s, PushFrame::Fence(id), &[], PushFrame::FenceAck(id))
                    .map(|()| done.send(Done::Fence(id)).unwrap_or(()))
            }
            Cmd::EpochEnd { epoch, bitmap } => {
                let words = bitmap.as_ref().map_or(0, |b| b.len() as u32);
                let body = bitmap.as_deref().map_or(&[][..], |b| b.as_bytes());
                let r = round_trip(
                    &mut s,
                    PushFrame::EpochEnd { epoch, words },
                    body,
                    PushFrame::EpochAck(epoch),
                );
                // Hand the bitmap buffer back before the sender learns of the ack.
                drop(bitmap);
                r.map(|()| done.send(Done::Epoch(epoch)).unwrap_or(()))
            }
            Cmd::Goodbye => {
                let _ = s
                    .write_all(&PushFrame::Goodbye.to_bytes())
                    .and_then(|()| s.flush());
                return;
            }
        };
        if let Err(e) = r {
            let _ = raw.shutdown(std::net::Shutdown::Both);
            let _ = done.send(Done::Failed(e));
            return;
        }
    }
}

fn send_batch(
    s: &mut impl ScatterIo,
    src: &Region,
    b: &Batch,
    table: &mut Vec<u8>,
    iovs: &mut Vec<libc::iovec>,
) -> Result<()> {
    table.clear();
    table.extend_from_slice(
        &PushFrame::Batch {
            epoch: b.epoch,
            runs: b.runs.len() as u32,
            bytes: b.bytes,
        }
        .to_bytes(),
    );
    for r in &b.runs {
        table.extend_from_slice(RunDesc::new(r.dst, r.len).as_bytes());
    }
    iovs.clear();
    iovs.push(libc::iovec {
        iov_base: table.as_mut_ptr().cast(),
        iov_len: table.len(),
    });
    for r in &b.runs {
        let p = src.ptr_at(r.src, r.len)?;
        iovs.push(libc::iovec {
            iov_base: p.cast(),
            iov_len: r.len as usize,
        });
    }
    debug_assert_eq!(table.len(), PUSH_HEADER_LEN + b.runs.len() * RUN_DESC_LEN);
    // SAFETY: iovs[0] points at `table`, alive for the call; the others were bounds-checked
    // by `Region::ptr_at` against the source region, which outlives the worker.
    unsafe { s.write_all_iov(iovs) }.map_err(Error::Send)
}

fn round_trip(s: &mut impl ScatterIo, req: PushFrame, body: &[u8], want: PushFrame) -> Result<()> {
    let mut hdr = req.to_bytes();
    let mut iovs = [
        libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: body.as_ptr().cast_mut().cast(),
            iov_len: body.len(),
        },
    ];
    // SAFETY: both iovecs describe live buffers (`hdr` on this stack frame, `body`
    // borrowed for the call) that are only read.
    unsafe { s.write_all_iov(&mut iovs) }.map_err(Error::Send)?;
    let mut hdr = [0u8; PUSH_HEADER_LEN];
    read_full(s, &mut hdr, true)?;
    let got = PushFrame::parse(&hdr)?;
    if got != want {
        return Err(Error::Protocol(format!("expected {want:?}, got {got:?}")));
    }
    Ok(())
}

/// Whether the peer has closed or reset `s` (which it has not written to): a
/// non-blocking peek sees the end of the stream or an error rather than "would block".
fn closed_by_peer(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    let closed = match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = s.set_nonblocking(false);
    closed
}
