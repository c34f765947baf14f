//! The primary's replication link: the bounded in-flight window, the sender thread and
//! the acknowledgement thread.

use std::collections::VecDeque;
use std::io::{self, BufReader, IoSlice};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::frame_io::{read_frame, write_all_vectored};
use crate::wire::{Frame, HEADER_LEN};

/// Most frames the sender gathers into one `writev`.
const SEND_BATCH_FRAMES: usize = 64;
/// Most payload bytes the sender gathers into one `writev`.
const SEND_BATCH_BYTES: usize = 4 << 20;

/// The state of the primary's replication, as the VMM and the controller see it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicationState {
    /// No secondary: writes go to the local disk only.
    Unprotected,
    /// A full copy to a new secondary is running while writes go on.
    Resyncing,
    /// Every write is forwarded; checkpoints wait for the secondary.
    Replicating,
    /// The link failed; writes go to the local disk only. A new secondary needs a resync.
    Lost(String),
}

/// What follows a queued frame's header on the wire.
#[derive(Debug)]
pub(crate) enum Payload {
    /// Bytes held in memory: small writes, resync chunks, nothing at all.
    Bytes(Vec<u8>),
    /// `len` bytes of the primary's disk at `offset`, sent straight from its page cache
    /// (`sendfile`) when the frame goes out. See the module docs of `primary` for why
    /// reading them then rather than at the write is correct.
    Disk { offset: u64, len: u32 },
}

impl Payload {
    pub fn len(&self) -> u64 {
        match self {
            Self::Bytes(v) => v.len() as u64,
            Self::Disk { len, .. } => u64::from(*len),
        }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Self {
        Self::Bytes(v)
    }
}

/// One queued frame and its payload.
pub(crate) type Outgoing = (Frame, Payload);

#[derive(Debug)]
pub(crate) struct LinkState {
    pub mode: ReplicationState,
    /// Bumped by every attach, so that threads of an old connection cannot touch the
    /// state of a new one.
    pub generation: u64,
    pub next_seq: u64,
    pub acked: u64,
    inflight: VecDeque<(u64, u64)>,
    pub inflight_bytes: u64,
    pub tx: Option<Sender<Outgoing>>,
    pub sock: Option<TcpStream>,
    pub secondary_buffered: u64,
    pub forwarded_frames: u64,
    pub forwarded_bytes: u64,
    pub last_epoch: u64,
    pub last_marker_seq: Option<u64>,
    /// The local disk holds writes the secondary never got (written unprotected).
    pub diverged: bool,
    /// The sender thread of the current generation has not exited yet.
    pub sender_running: bool,
}

impl LinkState {
    pub fn new() -> Self {
        Self {
            mode: ReplicationState::Unprotected,
            generation: 0,
            next_seq: 1,
            acked: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            tx: None,
            sock: None,
            secondary_buffered: 0,
            forwarded_frames: 0,
            forwarded_bytes: 0,
            last_epoch: 0,
            last_marker_seq: None,
            diverged: false,
            sender_running: false,
        }
    }

    /// A replicating link state with frames 1..=`frames` in flight, for fuzzing the
    /// acknowledgement decoder.
    pub fn for_fuzz(frames: u64) -> Self {
        let mut s = Self::new();
        s.mode = ReplicationState::Replicating;
        for seq in 1..=frames {
            s.inflight.push_back((seq, 512));
            s.inflight_bytes += 512;
        }
        s.next_seq = frames + 1;
        s
    }

    pub fn linked(&self) -> bool {
        matches!(
            self.mode,
            ReplicationState::Replicating | ReplicationState::Resyncing
        )
    }

    pub fn inflight_frames(&self) -> usize {
        self.inflight.len()
    }

    /// Starts a new connection's bookkeeping.
    pub fn reset_for(&mut self, mode: ReplicationState, tx: Sender<Outgoing>, sock: TcpStream) {
        self.mode = mode;
        self.generation += 1;
        self.next_seq = 1;
        self.acked = 0;
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.tx = Some(tx);
        self.sock = Some(sock);
        self.secondary_buffered = 0;
        self.last_epoch = 0;
        self.last_marker_seq = None;
        self.sender_running = true;
    }

    /// Ends the link with `reason`: the primary runs unprotected from here on.
    pub fn lose(&mut self, reason: String) {
        if !self.linked() {
            return;
        }
        tracing::warn!(%reason, "primary: replication to the secondary lost; running unprotected");
        self.mode = ReplicationState::Lost(reason);
        self.diverged = true;
        self.close();
    }

    /// Drops the channel (the sender drains it and exits) and shuts the socket down.
    pub fn close(&mut self) {
        self.tx = None;
        if let Some(s) = self.sock.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.inflight.clear();
        self.inflight_bytes = 0;
    }

    /// Applies one frame from the secondary. Returns whether to keep reading.
    ///
    /// # Errors
    /// [`Error::Protocol`] for an acknowledgement of a frame never sent or going
    /// backwards, or for a frame the secondary never sends; [`Error::Rejected`] when the
    /// secondary refused something.
    pub fn on_frame(&mut self, frame: Frame, payload: &[u8]) -> Result<bool> {
        match frame {
            Frame::Ack { seq, buffered } => {
                if seq < self.acked || seq >= self.next_seq {
                    return Err(Error::Protocol(format!(
                        "acknowledgement of frame {seq}, outside {}..{}",
                        self.acked, self.next_seq
                    )));
                }
                while let Some(&(s, b)) = self.inflight.front() {
                    if s > seq {
                        break;
                    }
                    self.inflight.pop_front();
                    self.inflight_bytes -= b;
                }
                self.acked = seq;
                self.secondary_buffered = buffered;
                Ok(true)
            }
            Frame::Reject { .. } => Err(Error::Rejected(
                String::from_utf8_lossy(payload).into_owned(),
            )),
            Frame::Goodbye => Ok(false),
            other => Err(Error::Protocol(format!(
                "unexpected {other:?} from the secondary"
            ))),
        }
    }
}

/// Payload buffers kept for reuse, at most.
const POOL_BUFFERS: usize = 256;
/// Largest payload buffer kept for reuse.
const POOL_MAX_CAPACITY: usize = 256 << 10;

/// How long the sender sleeps with nothing queued before it looks again on its own. A
/// frame queued meanwhile wakes it, so this only bounds the cost of a wake-up lost to a
/// bug.
const IDLE_PROBE: Duration = Duration::from_millis(100);

/// The link state, shared by the API and the link's threads.
#[derive(Debug)]
pub(crate) struct Link {
    st: Mutex<LinkState>,
    cond: Condvar,
    /// The sender thread, to wake it (registered when it starts).
    sender: Mutex<Option<Thread>>,
    /// The sender sleeps with nothing queued: the next frame wakes it. While it is not
    /// set the sender is busy or gathering frames for
    /// [`PrimaryOptions::send_delay`](crate::PrimaryOptions::send_delay), and only a frame
    /// something waits for wakes it.
    sender_idle: AtomicBool,
    /// Payload buffers the sender has finished with, for the next writes: memory that
    /// stays touched instead of fresh allocations that fault their pages in again.
    pool_tx: Sender<Vec<u8>>,
    pool_rx: Receiver<Vec<u8>>,
}

impl Link {
    pub fn new() -> Self {
        let (pool_tx, pool_rx) = crossbeam_channel::bounded(POOL_BUFFERS);
        Self {
            st: Mutex::new(LinkState::new()),
            cond: Condvar::new(),
            sender: Mutex::new(None),
            sender_idle: AtomicBool::new(false),
            pool_tx,
            pool_rx,
        }
    }

    /// A copy of `data` in a pooled buffer when one is free.
    pub fn payload(&self, data: &[u8]) -> Vec<u8> {
        match self.pool_rx.try_recv() {
            Ok(mut v) => {
                v.clear();
                v.extend_from_slice(data);
                v
            }
            Err(_) => data.to_vec(),
        }
    }

    fn recycle(&self, v: Vec<u8>) {
        if (4096..=POOL_MAX_CAPACITY).contains(&v.capacity()) {
            let _ = self.pool_tx.try_send(v);
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every thread waiting for the link's state to change, and the sender: for a
    /// link that ended or stops (the sender must see its queue close).
    pub fn notify(&self) {
        self.cond.notify_all();
        self.wake_sender();
    }

    /// Wakes the threads waiting for acknowledgements (not the sender).
    fn notify_waiters(&self) {
        self.cond.notify_all();
    }

    /// Whether the sender of `generation` may sleep to gather frames: not once its link
    /// ended or stops, when it must drain its queue and exit.
    fn sender_may_gather(&self, generation: u64) -> bool {
        let st = self.lock();
        st.generation == generation && st.linked()
    }

    fn wake_sender(&self) {
        if let Some(t) = self
            .sender
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            t.unpark();
        }
    }

    /// Queues a frame once the window has room for it. Returns its sequence number, or
    /// `None` if the link is not up (the write stays local). A window that stays full for
    /// `stall` ends the link: a stuck secondary must not stop the primary's guest.
    pub fn enqueue(
        &self,
        make: impl FnOnce(u64) -> Frame,
        payload: Payload,
        window_frames: usize,
        window_bytes: u64,
        stall: Duration,
    ) -> Option<u64> {
        let bytes = payload.len();
        let deadline = Instant::now() + stall;
        let mut st = self.lock();
        loop {
            if !st.linked() {
                return None;
            }
            let full = st.inflight.len() >= window_frames
                || (!st.inflight.is_empty() && st.inflight_bytes + bytes > window_bytes);
            if !full {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                st.lose(format!(
                    "the in-flight window stayed full for {stall:?}: the secondary stopped acknowledging"
                ));
                drop(st);
                self.notify();
                return None;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let seq = st.next_seq;
        let frame = make(seq);
        // Something waits for these as soon as they are queued; other frames may wait for
        // the sender's next round, unless the window fills up.
        let urgent = matches!(frame, Frame::Checkpoint { .. } | Frame::SyncDone { .. })
            || 2 * (st.inflight.len() + 1) >= window_frames;
        let tx = st.tx.as_ref().expect("a linked state has a channel");
        // The channel holds at most the frames in flight, so this never blocks.
        if tx.send((frame, payload)).is_err() {
            st.lose("the sender thread is gone".into());
            drop(st);
            self.notify();
            return None;
        }
        st.next_seq += 1;
        st.inflight.push_back((seq, bytes));
        st.inflight_bytes += bytes;
        st.forwarded_frames += 1;
        st.forwarded_bytes += bytes;
        drop(st);
        // Pairs with the fence in `run_sender`: either the sender sees this frame before
        // it sleeps, or this sees that it sleeps.
        fence(Ordering::SeqCst);
        if urgent || self.sender_idle.load(Ordering::SeqCst) {
            self.wake_sender();
        }
        Some(seq)
    }

    /// Waits until the last epoch marker is acknowledged, for a write about to change the
    /// local disk: frames sent from the page cache ([`Payload::Disk`]) are read when the
    /// secondary receives them, so a write must not change the disk before the secondary
    /// has every frame of the epoch before it. (The controller pauses the guest during a
    /// checkpoint, so this rarely waits.) If the marker stays unacknowledged for `stall`
    /// the link is declared lost, as for a full window.
    pub fn wait_marker_acked(&self, stall: Duration) {
        let mut deadline = None;
        let mut st = self.lock();
        loop {
            match st.last_marker_seq {
                Some(s) if st.linked() && st.acked < s => {}
                _ => return,
            }
            let now = Instant::now();
            let d = *deadline.get_or_insert(now + stall);
            if now >= d {
                st.lose(format!(
                    "the secondary did not acknowledge the epoch marker within {stall:?}"
                ));
                drop(st);
                self.notify();
                return;
            }
            st = self
                .cond
                .wait_timeout(st, d - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits until frame `seq` is acknowledged.
    ///
    /// # Errors
    /// [`Error::ReplicationLost`] if the link ends first, [`Error::WrongState`] if
    /// replication was stopped, [`Error::Timeout`].
    pub fn wait_acked(&self, seq: u64, timeout: Duration, what: &'static str) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            match &st.mode {
                ReplicationState::Lost(r) => return Err(Error::ReplicationLost(r.clone())),
                ReplicationState::Unprotected => {
                    return Err(Error::WrongState {
                        op: "waiting for the secondary",
                        state: "replication was stopped",
                    });
                }
                _ => {}
            }
            if st.acked >= seq {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout, what));
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits at most `limit` for the current sender thread to exit; returns whether it
    /// did.
    pub fn wait_sender_exit(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut st = self.lock();
        while st.sender_running {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Ends the link of `generation` (if it is still the current one) with `reason`.
    pub fn lose(&self, generation: u64, reason: String) {
        let mut st = self.lock();
        if st.generation == generation {
            st.lose(reason);
        }
        drop(st);
        self.notify();
    }
}

/// The sender thread: drains the queue, gathering frames into large `writev`s; the data
/// of a [`Payload::Disk`] frame follows its header (and whatever was gathered before it,
/// sent with `MSG_MORE`) by `sendfile` from `disk`.
///
/// After a batch that did not fill up it sleeps for `delay` and gathers what was queued
/// meanwhile, so that a guest writing steadily costs one wake-up and one `writev` per
/// `delay` instead of one per frame (and the secondary one read and one acknowledgement).
/// A checkpoint marker, the end of a resync or a filling window wakes it at once. With
/// nothing queued it sleeps until the next frame.
pub(crate) fn run_sender(
    link: &Link,
    disk: &Disk,
    rx: Receiver<Outgoing>,
    sock: TcpStream,
    generation: u64,
    delay: Duration,
) {
    *link.sender.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::thread::current());
    let _exit = SenderExit { link, generation };
    let mut batch: Vec<Outgoing> = Vec::with_capacity(SEND_BATCH_FRAMES);
    let mut headers: Vec<[u8; HEADER_LEN]> = Vec::with_capacity(SEND_BATCH_FRAMES);
    loop {
        let first = match rx.try_recv() {
            Ok(x) => x,
            Err(crossbeam_channel::TryRecvError::Disconnected) => return,
            Err(crossbeam_channel::TryRecvError::Empty) => {
                link.sender_idle.store(true, Ordering::SeqCst);
                // Pairs with the fence in `Link::enqueue`.
                fence(Ordering::SeqCst);
                match rx.try_recv() {
                    Ok(x) => {
                        link.sender_idle.store(false, Ordering::SeqCst);
                        x
                    }
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return,
                    Err(crossbeam_channel::TryRecvError::Empty) => {
                        std::thread::park_timeout(IDLE_PROBE);
                        link.sender_idle.store(false, Ordering::SeqCst);
                        continue;
                    }
                }
            }
        };
        let mut bytes = first.1.len();
        batch.push(first);
        while batch.len() < SEND_BATCH_FRAMES && bytes < SEND_BATCH_BYTES as u64 {
            match rx.try_recv() {
                Ok(x) => {
                    bytes += x.1.len();
                    batch.push(x);
                }
                Err(_) => break,
            }
        }
        let full = batch.len() >= SEND_BATCH_FRAMES || bytes >= SEND_BATCH_BYTES as u64;
        headers.clear();
        headers.extend(batch.iter().map(|(f, _)| f.to_bytes()));
        if let Err(e) = send_batch(&sock, disk, &headers, &batch) {
            link.lose(generation, format!("cannot send to the secondary: {e}"));
            return;
        }
        for (_, p) in batch.drain(..) {
            if let Payload::Bytes(v) = p {
                link.recycle(v);
            }
        }
        if !full && !delay.is_zero() && link.sender_may_gather(generation) {
            std::thread::park_timeout(delay);
        }
    }
}

/// Marks the sender of `generation` as exited when it returns (for
/// [`Link::wait_sender_exit`]).
struct SenderExit<'a> {
    link: &'a Link,
    generation: u64,
}

impl Drop for SenderExit<'_> {
    fn drop(&mut self) {
        let mut st = self.link.lock();
        if st.generation == self.generation {
            st.sender_running = false;
        }
        drop(st);
        self.link.notify_waiters();
    }
}

/// Sends a batch of frames in order.
fn send_batch(
    mut sock: &TcpStream,
    disk: &Disk,
    headers: &[[u8; HEADER_LEN]],
    batch: &[Outgoing],
) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
    for (h, (_, p)) in headers.iter().zip(batch) {
        slices.push(IoSlice::new(h));
        match p {
            Payload::Bytes(v) if v.is_empty() => {}
            Payload::Bytes(v) => slices.push(IoSlice::new(v)),
            &Payload::Disk { offset, len } => {
                send_all_vectored_more(sock, &mut slices)?;
                slices.clear();
                disk.send_to(sock, offset, len as usize)?;
            }
        }
    }
    write_all_vectored(&mut sock, &mut slices)
}

/// Writes every slice in full with `MSG_MORE`: more data follows at once, so a short
/// header is not pushed out alone.
fn send_all_vectored_more(sock: &TcpStream, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    let s = socket2::SockRef::from(sock);
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match s.send_vectored_with_flags(bufs, libc::MSG_MORE) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The acknowledgement thread: reads the secondary's frames until the link ends.
pub(crate) fn run_acker(link: &Link, sock: TcpStream, generation: u64) {
    let mut r = BufReader::with_capacity(4096, sock);
    let mut payload = Vec::new();
    loop {
        let frame = read_frame(&mut r, &mut payload);
        let mut st = link.lock();
        if st.generation != generation || !st.linked() {
            return;
        }
        let keep = frame.and_then(|f| st.on_frame(f, &payload));
        match keep {
            Ok(true) => {
                drop(st);
                link.notify_waiters();
            }
            Ok(false) => {
                st.lose("the secondary said goodbye".into());
                drop(st);
                link.notify();
                return;
            }
            Err(e) => {
                st.lose(e.to_string());
                drop(st);
                link.notify();
                return;
            }
        }
    }
}
