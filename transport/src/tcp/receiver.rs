//! The receiving side of the TCP push path: one thread per stream reads run descriptors,
//! checks them, and `readv`s the bytes straight into the registered region.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use zerocopy::IntoBytes;

use super::io::ScatterIo;
use super::wire::{MAX_STREAMS, PUSH_HEADER_LEN, PushFrame, RUN_DESC_LEN, RunDesc};
use crate::error::{Error, Result};
use crate::framing::{self, read_full};
use crate::push::{EpochCommit, PushReceiver, RegionDesc};
use colo_auth::seal::{Sealed, SessionKeys};
use colo_auth::{Channel, Credentials, HANDSHAKE_TIMEOUT, Peer, Role as AuthRole};
use colo_memory::{PageBitmap, Region};

/// How long a connecting stream has to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound, not yet connected push receiver. Publish [`desc`](Self::desc) to the sender
/// (the control channel's `Region` message), then [`accept`](Self::accept).
#[derive(Debug)]
pub struct TcpPushListener {
    listener: TcpListener,
    region: Arc<Region>,
    desc: RegionDesc,
    creds: Credentials,
}

impl TcpPushListener {
    /// Binds `addr` (port 0 picks a free port) for pushes into `region`, whose epoch
    /// bitmaps count pages of `page_size`. A fresh random key is drawn for the region.
    /// Every stream must authenticate with `creds` (as the primary) before its Hello is
    /// read; one that does not is logged and dropped, and the listener waits on.
    ///
    /// # Errors
    /// [`Error::Bind`] if the address cannot be bound.
    pub fn bind(
        addr: &str,
        region: Arc<Region>,
        page_size: u32,
        creds: Credentials,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|source| Error::Bind {
            addr: addr.into(),
            source,
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| Error::Bind {
                addr: addr.into(),
                source,
            })?
            .port();
        let desc = RegionDesc {
            addr: region.as_ptr() as u64,
            key: crate::push::random_key(),
            len: region.len() as u64,
            page_size,
            port,
            name: crate::push::EndpointName::EMPTY,
        };
        Ok(Self {
            listener,
            region,
            desc,
            creds,
        })
    }

    /// What the sender needs to know to push into this region.
    pub fn desc(&self) -> &RegionDesc {
        &self.desc
    }

    /// Accepts every stream of one sender (the first stream's Hello says how many) and
    /// starts one receive thread per stream.
    ///
    /// # Errors
    /// [`Error::Timeout`] if the streams do not all arrive in `timeout`,
    /// [`Error::BadKey`] for a wrong region key, [`Error::Handshake`] for a mismatched
    /// layout or stream numbering, or a socket error. Every accepted stream is closed.
    pub fn accept(self, timeout: Duration) -> Result<TcpPushReceiver> {
        let deadline = Instant::now() + timeout;
        self.listener
            .set_nonblocking(true)
            .map_err(|source| Error::SocketOption {
                option: "O_NONBLOCK",
                source,
            })?;
        let mut slots: Vec<Option<(TcpStream, Peer)>> = Vec::new();
        let mut expected: Option<u32> = None;
        while expected.is_none_or(|n| slots.iter().flatten().count() < n as usize) {
            let (mut s, peer) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout(timeout, "the push streams to connect"));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => return Err(Error::Accept(e)),
            };
            // A connection that does not prove the pair key is dropped unread; the
            // listener waits on for the primary's streams.
            s.set_nonblocking(false)
                .map_err(|source| Error::SocketOption {
                    option: "O_NONBLOCK",
                    source,
                })?;
            let limit = HANDSHAKE_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
            let authenticated = match colo_auth::accept(
                &mut s,
                &self.creds,
                AuthRole::Secondary,
                Channel::Push(0),
                limit.max(Duration::from_millis(1)),
            ) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "refused a push connection that did not authenticate");
                    continue;
                }
            };
            let stream = authenticated.channel;
            let (idx, n, s) = self.greet(s)?;
            if stream != Channel::Push(idx) {
                return Err(Error::Handshake(format!(
                    "a stream authenticated as {stream} says it is stream {idx}"
                )));
            }
            let n_expected = *expected.get_or_insert(n);
            if n != n_expected {
                return Err(Error::Handshake(format!(
                    "stream {idx} says {n} streams, an earlier one said {n_expected}"
                )));
            }
            slots.resize_with(n as usize, || None);
            let slot = &mut slots[idx as usize];
            if slot.is_some() {
                return Err(Error::Handshake(format!(
                    "stream index {idx} connected twice"
                )));
            }
            *slot = Some((s, authenticated));
        }
        let streams: Vec<(TcpStream, Peer)> = slots.into_iter().flatten().collect();
        for (s, _) in &streams {
            let mut s: &TcpStream = s;
            s.write_all(&PushFrame::HelloAck.to_bytes())
                .map_err(Error::Send)?;
        }
        tracing::info!(
            streams = streams.len(),
            region_bytes = self.desc.len,
            "push streams connected"
        );
        TcpPushReceiver::start(self.desc, self.region, streams, self.creds.encrypts())
    }

    /// Reads and checks one stream's Hello.
    fn greet(&self, mut s: TcpStream) -> Result<(u32, u32, TcpStream)> {
        let opt = |option, source| Error::SocketOption { option, source };
        s.set_nonblocking(false).map_err(|e| opt("O_NONBLOCK", e))?;
        s.set_nodelay(true).map_err(|e| opt("TCP_NODELAY", e))?;
        s.set_read_timeout(Some(HELLO_TIMEOUT))
            .map_err(|e| opt("SO_RCVTIMEO", e))?;
        let mut hdr = [0u8; PUSH_HEADER_LEN];
        read_full(&mut s, &mut hdr, true)?;
        let PushFrame::Hello {
            key,
            region_len,
            page_kib,
            stream,
            streams,
        } = PushFrame::parse(&hdr)?
        else {
            return Err(Error::Protocol("a push stream must open with Hello".into()));
        };
        if key != self.desc.key {
            return Err(Error::BadKey { found: key });
        }
        if region_len != self.desc.len || u32::from(page_kib) * 1024 != self.desc.page_size {
            return Err(Error::Handshake(format!(
                "sender expects a region of {region_len} bytes with {page_kib} KiB pages; this one has {} bytes with {} byte pages",
                self.desc.len, self.desc.page_size
            )));
        }
        let streams = u32::from(streams);
        if streams == 0 || streams > MAX_STREAMS || stream >= streams {
            return Err(Error::Handshake(format!(
                "stream {stream} of {streams} (at most {MAX_STREAMS})"
            )));
        }
        s.set_read_timeout(None)
            .map_err(|e| opt("SO_RCVTIMEO", e))?;
        Ok((stream, streams, s))
    }
}

#[derive(Debug, Default)]
struct EpochState {
    committed: u64,
    applied: u64,
    arrived: u32,
    bitmap: Option<PageBitmap>,
    goodbyes: u32,
    closed: bool,
}

/// State shared by the receive threads of one sender.
#[derive(Debug)]
pub(crate) struct Shared {
    region: Arc<Region>,
    desc: RegionDesc,
    streams: u32,
    state: Mutex<EpochState>,
    cond: Condvar,
    commits: Sender<Result<EpochCommit>>,
    sockets: Mutex<Vec<TcpStream>>,
    bytes: AtomicU64,
}

impl Shared {
    pub(crate) fn new(
        region: Arc<Region>,
        desc: RegionDesc,
        streams: u32,
    ) -> (Arc<Self>, Receiver<Result<EpochCommit>>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let sh = Self {
            region,
            desc,
            streams,
            state: Mutex::new(EpochState::default()),
            cond: Condvar::new(),
            commits: tx,
            sockets: Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
        };
        (Arc::new(sh), rx)
    }

    fn lock(&self) -> MutexGuard<'_, EpochState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Blocks until data of `epoch` may land: it must be the open epoch, and the previous
    /// one must have been released by the consumer.
    fn wait_open(&self, epoch: u64) -> Result<()> {
        let mut st = self.lock();
        loop {
            if st.closed {
                return Err(Error::Closed);
            }
            if epoch != st.committed + 1 {
                return Err(Error::Protocol(format!(
                    "data for epoch {epoch} while epoch {} is open",
                    st.committed + 1
                )));
            }
            if st.applied == st.committed {
                return Ok(());
            }
            st = self
                .cond
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Stream `idx` reached the end of `epoch`. The last stream to arrive publishes the
    /// commit; every byte of the epoch has landed by then.
    fn arrive(&self, idx: u32, epoch: u64, bitmap: Option<PageBitmap>) -> Result<()> {
        let mut st = self.lock();
        if st.closed {
            return Err(Error::Closed);
        }
        if epoch != st.committed + 1 {
            return Err(Error::Protocol(format!(
                "end of epoch {epoch} while epoch {} is open",
                st.committed + 1
            )));
        }
        let bit = 1u32 << idx;
        if st.arrived & bit != 0 {
            return Err(Error::Protocol(format!(
                "stream {idx} ended epoch {epoch} twice"
            )));
        }
        st.arrived |= bit;
        if let Some(b) = bitmap {
            st.bitmap = Some(b);
        }
        if st.arrived.count_ones() == self.streams {
            st.arrived = 0;
            st.committed = epoch;
            let bitmap = st
                .bitmap
                .take()
                .expect("stream 0 always carries the bitmap");
            let bytes = self.bytes.swap(0, Ordering::Relaxed);
            tracing::debug!(epoch, bytes, "epoch landed");
            let _ = self.commits.send(Ok(EpochCommit {
                epoch,
                bitmap,
                bytes,
            }));
        }
        Ok(())
    }

    fn goodbye(&self) {
        let mut st = self.lock();
        st.goodbyes += 1;
        if st.goodbyes == self.streams && !st.closed {
            st.closed = true;
            let _ = self.commits.send(Err(framing::Error::PeerClosed.into()));
            self.cond.notify_all();
        }
    }

    /// Closes the transport after an error: the consumer sees the first error, every stream
    /// is shut down, and blocked threads wake.
    pub(crate) fn fail(&self, e: Error) {
        let mut st = self.lock();
        if !st.closed {
            st.closed = true;
            tracing::warn!(error = %e, "push receiver closing");
            let _ = self.commits.send(Err(e));
        }
        drop(st);
        self.cond.notify_all();
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn release(&self, epoch: u64) -> Result<()> {
        let mut st = self.lock();
        if epoch != st.committed || epoch <= st.applied {
            return Err(Error::Protocol(format!(
                "release of epoch {epoch}, but the last committed is {} and the last released {}",
                st.committed, st.applied
            )));
        }
        st.applied = epoch;
        drop(st);
        self.cond.notify_all();
        Ok(())
    }
}

/// Serves one push stream until Goodbye or an error. Every run is bounds-checked before any
/// byte of its batch is read, so nothing lands outside the region.
pub(crate) fn serve_stream<S: ScatterIo>(s: &mut S, idx: u32, sh: &Shared) -> Result<()> {
    let mut hdr = [0u8; PUSH_HEADER_LEN];
    let mut table: Vec<u8> = Vec::new();
    let mut iovs: Vec<libc::iovec> = Vec::new();
    loop {
        read_full(s, &mut hdr, true)?;
        match PushFrame::parse(&hdr)? {
            PushFrame::Batch { epoch, runs, bytes } => {
                sh.wait_open(epoch)?;
                table.resize(runs as usize * RUN_DESC_LEN, 0);
                read_full(s, &mut table, false)?;
                iovs.clear();
                let mut total: u64 = 0;
                for d in RunDesc::slice_from(&table)? {
                    if d.is_empty() {
                        return Err(Error::Protocol("empty run in a batch".into()));
                    }
                    let p = sh.region.ptr_at(d.offset(), d.len())?;
                    total = total.saturating_add(d.len());
                    iovs.push(libc::iovec {
                        iov_base: p.cast(),
                        iov_len: d.len() as usize,
                    });
                }
                if total != bytes {
                    return Err(Error::Protocol(format!(
                        "batch header says {bytes} bytes, its runs add up to {total}"
                    )));
                }
                // SAFETY: every iovec was produced by `Region::ptr_at`, which checked that
                // the span lies inside the region, and the region outlives `sh`.
                unsafe { s.read_all_iov(&mut iovs) }.map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => framing::Error::Truncated {
                        got: 0,
                        want: bytes as usize,
                    },
                    _ => framing::Error::Recv(e),
                })?;
                sh.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            PushFrame::Fence(id) => s
                .write_all(&PushFrame::FenceAck(id).to_bytes())
                .and_then(|()| s.flush())
                .map_err(Error::Send)?,
            PushFrame::EpochEnd { epoch, words } => {
                // An epoch with no data (an idle guest) must wait for the release of the
                // previous one too, or it would commit ahead of the consumer.
                sh.wait_open(epoch)?;
                let bitmap = if idx == 0 {
                    let expected = sh.desc.bitmap_words();
                    if words as usize != expected {
                        return Err(colo_memory::Error::BitmapSize {
                            found: words as usize,
                            expected,
                            pages: sh.desc.pages(),
                        }
                        .into());
                    }
                    let mut b = vec![0u64; expected];
                    read_full(s, b.as_mut_bytes(), false)?;
                    for w in &mut b {
                        *w = u64::from_le(*w);
                    }
                    Some(sh.desc.bitmap_from_words(b)?)
                } else if words != 0 {
                    return Err(Error::Protocol(format!(
                        "stream {idx} sent a bitmap; only stream 0 does"
                    )));
                } else {
                    None
                };
                sh.arrive(idx, epoch, bitmap)?;
                s.write_all(&PushFrame::EpochAck(epoch).to_bytes())
                    .and_then(|()| s.flush())
                    .map_err(Error::Send)?;
            }
            PushFrame::Goodbye => {
                sh.goodbye();
                return Ok(());
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {other:?} on a push stream"
                )));
            }
        }
    }
}

/// A connected push receiver.
#[derive(Debug)]
pub struct TcpPushReceiver {
    shared: Arc<Shared>,
    commits: Receiver<Result<EpochCommit>>,
    threads: Vec<JoinHandle<()>>,
}

impl TcpPushReceiver {
    /// Starts a receive thread per stream; with `encrypt`, each stream is sealed from
    /// here on (after the plain Hello and HelloAck) with its own session's keys.
    fn start(
        desc: RegionDesc,
        region: Arc<Region>,
        streams: Vec<(TcpStream, Peer)>,
        encrypt: bool,
    ) -> Result<Self> {
        let (shared, commits) = Shared::new(region, desc, streams.len() as u32);
        let mut threads = Vec::new();
        for (i, (s, peer)) in streams.into_iter().enumerate() {
            let clone = s.try_clone().map_err(|source| Error::SocketOption {
                option: "dup",
                source,
            })?;
            shared
                .sockets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(clone);
            let sh = Arc::clone(&shared);
            let builder = std::thread::Builder::new().name(format!("push-rx-{i}"));
            let t = if encrypt {
                let mut sealed = Sealed::new(s, SessionKeys::from_peer(&peer));
                builder.spawn(move || {
                    if let Err(e) = serve_stream(&mut sealed, i as u32, &sh) {
                        sh.fail(e);
                    }
                })
            } else {
                let mut s = s;
                builder.spawn(move || {
                    if let Err(e) = serve_stream(&mut s, i as u32, &sh) {
                        sh.fail(e);
                    }
                })
            }
            .map_err(Error::Thread)?;
            threads.push(t);
        }
        Ok(Self {
            shared,
            commits,
            threads,
        })
    }

    /// Payload bytes that have landed in the open epoch so far.
    pub fn open_epoch_bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }
}

impl PushReceiver for TcpPushReceiver {
    fn desc(&self) -> &RegionDesc {
        &self.shared.desc
    }

    fn next_commit(&mut self, timeout: Duration) -> Result<EpochCommit> {
        match self.commits.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout(timeout, "an epoch commit")),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Closed),
        }
    }

    fn release(&mut self, epoch: u64) -> Result<()> {
        self.shared.release(epoch)
    }
}

/// Dropping the receiver closes every stream at once. A sender still waiting for the
/// acknowledgement of an epoch this receiver already committed then sees the connection
/// close; the control channel's `VmstateReceived` is what confirms an epoch to the
/// primary.
impl Drop for TcpPushReceiver {
    fn drop(&mut self) {
        self.shared.fail(Error::Closed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
