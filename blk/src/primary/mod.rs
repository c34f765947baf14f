//! The primary side: a block backend that applies every guest write to the local disk
//! and forwards it, in order and asynchronously, to the secondary.
//!
//! - **Writes** go to the local disk first, then into a bounded in-flight window (frames
//!   and bytes) drained by a sender thread; `write_at` returns once the local write is
//!   done and the frame is queued. A full window blocks the writer until acknowledgements
//!   free it; if it stays full for [`PrimaryOptions::stall_timeout`] the link is
//!   declared lost and the primary runs unprotected ("the primary loses its secondary").
//! - **Forwarded data** of a write of 32 KiB or more is not copied: the sender thread
//!   sends it from the local disk's page cache (`sendfile`) when the frame's turn comes,
//!   so a later write to the same sectors may already show in it. That is harmless: the
//!   later write is forwarded too, after it, so once the secondary has applied every frame
//!   up to a barrier its disk holds what the primary's did at the barrier; and a frame
//!   of the running epoch never reaches the SVM's view, which failover restores from the
//!   hidden buffer. The data is read when the secondary receives it (the socket holds
//!   page references, not copies), so across an epoch boundary a write waits until the
//!   secondary has acknowledged the epoch marker: no write of epoch N+1 can show in a
//!   frame of epoch N. The secondary never sees data the primary's disk did not hold.
//! - **Flush** syncs the local disk and forwards an ordered flush; **ordering** is kept
//!   because frames are queued in the order the local writes completed (one writer at a
//!   time) and the secondary applies them in sequence.
//! - **Checkpoint**: [`PrimaryDisk::checkpoint_barrier`] queues an end-of-epoch marker
//!   and waits until the secondary has acknowledged it, hence every write before it: the
//!   epoch protocol's "disk acknowledged" step.
//! - **Resync**: [`PrimaryDisk::attach`] with [`SyncMode::Resync`] copies the whole disk
//!   in the background while writes go on, tracking the chunks they dirty;
//!   [`PrimaryDisk::complete_resync`] copies what is left with writes held, and from then
//!   on every write is forwarded.

mod dirty;
mod link;

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dirty::DirtyMap;
pub(crate) use link::LinkState;
pub use link::ReplicationState;
use link::{Link, Payload};

use crate::backend::BlockBackend;
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::frame_io::{read_frame, write_frame};
use crate::sector::SECTOR_SIZE;
use crate::wire::{Frame, MAX_WRITE_BYTES, SyncMode};

/// Tuning of the primary's link.
#[derive(Debug, Clone)]
pub struct PrimaryOptions {
    /// Most frames sent and not yet acknowledged.
    pub window_frames: usize,
    /// Most payload bytes sent and not yet acknowledged (one frame may exceed it alone).
    pub window_bytes: u64,
    /// How long the window may stay full before the link is declared lost; also the
    /// socket send timeout.
    pub stall_timeout: Duration,
    /// Chunk size of the resync copy and of its dirty tracking: a multiple of 512, at
    /// most 1 MiB.
    pub resync_chunk: u64,
    /// How long the sender gathers frames after a batch before it sends the next one
    /// (zero: it sends each frame as soon as it is queued). A checkpoint marker is sent
    /// at once. Forwarding is asynchronous, so this delays no guest write; it trades up
    /// to this much lag of the secondary's copy for far fewer wake-ups and system calls
    /// on both sides.
    pub send_delay: Duration,
}

impl Default for PrimaryOptions {
    fn default() -> Self {
        Self {
            window_frames: 1024,
            window_bytes: 64 << 20,
            stall_timeout: Duration::from_secs(10),
            resync_chunk: 1 << 20,
            send_delay: Duration::from_millis(1),
        }
    }
}

/// What [`PrimaryDisk::stats`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrimaryStats {
    /// The replication state.
    pub state: ReplicationState,
    /// Guest writes completed.
    pub writes: u64,
    /// Bytes of guest writes completed.
    pub write_bytes: u64,
    /// Frames queued to the secondary on the current link.
    pub forwarded_frames: u64,
    /// Payload bytes queued to the secondary on the current link.
    pub forwarded_bytes: u64,
    /// Frames sent and not yet acknowledged.
    pub inflight_frames: usize,
    /// Payload bytes sent and not yet acknowledged.
    pub inflight_bytes: u64,
    /// The last sequence number the secondary acknowledged.
    pub acked_seq: u64,
    /// The secondary's disk buffer footprint, as of its last acknowledgement: the
    /// controller checkpoints when it grows too large.
    pub secondary_buffered: u64,
}

/// What a finished [`PrimaryDisk::checkpoint_barrier`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BarrierStats {
    /// The epoch.
    pub epoch: u64,
    /// How long the wait for acknowledgements took.
    pub waited: Duration,
    /// The secondary's buffer footprint at the marker.
    pub secondary_buffered: u64,
}

/// Progress of a resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResyncProgress {
    /// Chunks still to copy (never copied, or written since).
    pub dirty_chunks: u64,
    /// Chunks of the disk.
    pub total_chunks: u64,
    /// Bytes copied so far (chunks copied twice count twice).
    pub copied_bytes: u64,
}

#[derive(Debug)]
struct Shared {
    disk: Disk,
    opts: PrimaryOptions,
    /// Held by each write from its local write to its queueing, so the forwarded order
    /// is the order the local writes completed in; held by mode changes.
    write_lock: Mutex<()>,
    link: Link,
    dirty: DirtyMap,
    resync_stop: AtomicBool,
    copied: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
}

impl Shared {
    fn enqueue(&self, make: impl FnOnce(u64) -> Frame, payload: impl Into<Payload>) -> Option<u64> {
        self.link.enqueue(
            make,
            payload.into(),
            self.opts.window_frames,
            self.opts.window_bytes,
            self.opts.stall_timeout,
        )
    }

    /// Copies one chunk to the secondary.
    fn copy_chunk(&self, chunk: u64) -> Result<()> {
        let offset = chunk * self.dirty.chunk();
        let len = self.dirty.chunk().min(self.disk.len() - offset);
        let mut buf = vec![0u8; len as usize];
        self.disk.read_unchecked(offset, &mut buf)?;
        self.enqueue(
            |seq| Frame::SyncData {
                seq,
                offset,
                len: len as u32,
            },
            buf,
        );
        self.copied.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

/// Writes of at least this many bytes are forwarded from the primary's page cache with
/// `sendfile` (no copy into a queue buffer, none into the socket); smaller ones are copied
/// and gathered into large `writev`s, which costs less than a `sendfile` call each.
const SENDFILE_MIN: usize = 32 << 10;

/// How long stopping replication waits for the queued frames and the goodbye to go out.
const GOODBYE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Threads {
    link: Vec<JoinHandle<()>>,
    copier: Option<JoinHandle<()>>,
}

/// The primary's disk: a [`BlockBackend`] the VMM uses in place of a plain file. See the
/// the module docs and [`SecondaryDisk`](crate::SecondaryDisk) for an example.
#[derive(Debug)]
pub struct PrimaryDisk {
    shared: Arc<Shared>,
    threads: Mutex<Threads>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PrimaryDisk {
    /// A primary over `disk`, unprotected until [`attach`](Self::attach).
    ///
    /// # Panics
    /// If `opts.resync_chunk` is not a non-zero multiple of 512 of at most 1 MiB, or the
    /// window is empty.
    pub fn new(disk: Disk, opts: PrimaryOptions) -> Self {
        assert!(
            opts.resync_chunk > 0
                && opts.resync_chunk % SECTOR_SIZE == 0
                && opts.resync_chunk <= MAX_WRITE_BYTES,
            "resync_chunk must be a multiple of 512 in 512..=1MiB"
        );
        assert!(
            opts.window_frames > 0 && opts.window_bytes > 0,
            "empty window"
        );
        let dirty = DirtyMap::new(disk.len(), opts.resync_chunk);
        Self {
            shared: Arc::new(Shared {
                disk,
                opts,
                write_lock: Mutex::new(()),
                link: Link::new(),
                dirty,
                resync_stop: AtomicBool::new(false),
                copied: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                write_bytes: AtomicU64::new(0),
            }),
            threads: Mutex::new(Threads::default()),
        }
    }

    /// Connects a secondary over `stream`: handshake (within `timeout`), then the sender
    /// and acknowledgement threads. With [`SyncMode::Resync`] a background full copy
    /// starts; finish it with [`complete_resync`](Self::complete_resync). With
    /// [`SyncMode::InSync`] the caller vouches that both disks are equal; it is refused
    /// once this primary has written anything the secondary did not get.
    ///
    /// # Errors
    /// [`Error::WrongState`] if a secondary is attached or `InSync` is not possible,
    /// [`Error::Rejected`] or [`Error::Handshake`] if the two sides disagree, a decoding
    /// error, [`Error::Timeout`], [`Error::SocketOption`] or [`Error::Thread`].
    pub fn attach(&self, stream: TcpStream, mode: SyncMode, timeout: Duration) -> Result<()> {
        let sh = &self.shared;
        let _w = lock(&sh.write_lock);
        {
            let st = sh.link.lock();
            if st.linked() {
                return Err(Error::WrongState {
                    op: "attaching a secondary",
                    state: "a secondary is attached",
                });
            }
            if mode == SyncMode::InSync && st.diverged {
                return Err(Error::WrongState {
                    op: "attaching an in-sync secondary",
                    state: "the disk was written while unprotected",
                });
            }
        }
        self.join_link_threads();
        handshake(&stream, sh.disk.len(), mode, timeout)?;
        let opt = |option, r: std::io::Result<()>| {
            r.map_err(|source| Error::SocketOption { option, source })
        };
        opt(
            "SO_SNDTIMEO",
            stream.set_write_timeout(Some(sh.opts.stall_timeout)),
        )?;
        let dup = |s: &TcpStream| {
            s.try_clone().map_err(|source| Error::SocketOption {
                option: "dup",
                source,
            })
        };
        let (ack_sock, ctl_sock) = (dup(&stream)?, dup(&stream)?);
        let (tx, rx) = crossbeam_channel::bounded(sh.opts.window_frames + 1);
        let generation = {
            let mut st = sh.link.lock();
            st.reset_for(
                match mode {
                    SyncMode::Resync => ReplicationState::Resyncing,
                    SyncMode::InSync => ReplicationState::Replicating,
                },
                tx,
                ctl_sock,
            );
            st.generation
        };
        let mut th = lock(&self.threads);
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(Error::Thread)
        };
        let s1 = Arc::clone(sh);
        let delay = sh.opts.send_delay;
        let sender = spawn(
            "colo-blk-tx",
            Box::new(move || link::run_sender(&s1.link, &s1.disk, rx, stream, generation, delay)),
        );
        let s2 = Arc::clone(sh);
        let acker = spawn(
            "colo-blk-ack",
            Box::new(move || link::run_acker(&s2.link, ack_sock, generation)),
        );
        for h in [sender, acker] {
            match h {
                Ok(h) => th.link.push(h),
                Err(e) => {
                    sh.link
                        .lose(generation, "cannot start the link threads".into());
                    return Err(e);
                }
            }
        }
        if mode == SyncMode::Resync {
            sh.dirty.set_all();
            sh.copied.store(0, Ordering::Relaxed);
            sh.resync_stop.store(false, Ordering::SeqCst);
            let s3 = Arc::clone(sh);
            match spawn("colo-blk-resync", Box::new(move || run_copier(&s3))) {
                Ok(h) => th.copier = Some(h),
                Err(e) => {
                    sh.link
                        .lose(generation, "cannot start the resync thread".into());
                    return Err(e);
                }
            }
        }
        tracing::info!(?mode, "primary: secondary attached");
        Ok(())
    }

    /// Finishes a resync: holds guest writes, stops the background copy, copies every
    /// chunk still dirty, marks the end of the copy, and from then on forwards every
    /// write. Waits (at most `timeout`) until the secondary has the whole copy. Call it
    /// when [`resync_progress`](Self::resync_progress) shows few dirty chunks (or with
    /// the guest paused, at the first checkpoint).
    ///
    /// # Errors
    /// [`Error::WrongState`] unless a resync is running, [`Error::ReplicationLost`],
    /// [`Error::Timeout`], or a read error of the local disk.
    pub fn complete_resync(&self, timeout: Duration) -> Result<()> {
        let sh = &self.shared;
        let w = lock(&sh.write_lock);
        self.check_mode(ReplicationState::Resyncing, "completing a resync")?;
        sh.resync_stop.store(true, Ordering::SeqCst);
        if let Some(h) = lock(&self.threads).copier.take() {
            let _ = h.join();
        }
        let mut at = 0;
        while let Some(c) = sh.dirty.take_next(at) {
            sh.copy_chunk(c)?;
            at = c + 1;
        }
        let seq = sh.enqueue(|seq| Frame::SyncDone { seq, epoch: 0 }, Vec::new());
        {
            let mut st = sh.link.lock();
            if st.mode == ReplicationState::Resyncing {
                st.mode = ReplicationState::Replicating;
            }
        }
        drop(w);
        let seq = seq.ok_or_else(|| self.lost())?;
        sh.link
            .wait_acked(seq, timeout, "the secondary to apply the resync")?;
        tracing::info!(
            copied = sh.copied.load(Ordering::Relaxed),
            "primary: resync complete"
        );
        Ok(())
    }

    /// How far a resync is, or `None` if none is running.
    pub fn resync_progress(&self) -> Option<ResyncProgress> {
        let sh = &self.shared;
        (sh.link.lock().mode == ReplicationState::Resyncing).then(|| ResyncProgress {
            dirty_chunks: sh.dirty.count(),
            total_chunks: sh.dirty.chunks(),
            copied_bytes: sh.copied.load(Ordering::Relaxed),
        })
    }

    /// Ends epoch `epoch` and waits (at most `timeout`) until the secondary has
    /// acknowledged every write queued before this call. Epochs must grow; after a
    /// [`Error::Timeout`] the same epoch may be waited for again. If
    /// [`checkpoint_marker`](Self::checkpoint_marker) already ended `epoch`, this only
    /// waits.
    ///
    /// # Errors
    /// [`Error::ReplicationLost`] if the link failed, [`Error::WrongState`] if no
    /// secondary is attached or a resync is running, [`Error::EpochOrder`],
    /// [`Error::Timeout`].
    pub fn checkpoint_barrier(&self, epoch: u64, timeout: Duration) -> Result<BarrierStats> {
        let span = tracing::info_span!("blk_barrier", epoch);
        let _g = span.enter();
        let sh = &self.shared;
        let start = Instant::now();
        let seq = self.marker_seq(epoch)?;
        sh.link
            .wait_acked(seq, timeout, "the secondary to acknowledge the epoch")?;
        let stats = BarrierStats {
            epoch,
            waited: start.elapsed(),
            secondary_buffered: sh.link.lock().secondary_buffered,
        };
        tracing::debug!(?stats, "disk acknowledged");
        Ok(stats)
    }

    /// Ends epoch `epoch` without waiting: queues its end-of-epoch marker behind every
    /// write queued so far. A controller that learns from the secondary itself that the
    /// marker arrived (the secondary waits for it before it answers the checkpoint) can
    /// overlap this round trip with its own; [`checkpoint_barrier`](Self::checkpoint_barrier)
    /// for the same epoch then waits for the acknowledgement. Ending the same epoch again
    /// does nothing.
    ///
    /// # Errors
    /// As [`checkpoint_barrier`](Self::checkpoint_barrier), without the timeout.
    pub fn checkpoint_marker(&self, epoch: u64) -> Result<()> {
        self.marker_seq(epoch).map(|_| ())
    }

    /// The sequence number of epoch `epoch`'s marker, queued now unless it already was.
    fn marker_seq(&self, epoch: u64) -> Result<u64> {
        let sh = &self.shared;
        let _w = lock(&sh.write_lock);
        self.check_mode(ReplicationState::Replicating, "a checkpoint barrier")?;
        {
            let mut st = sh.link.lock();
            match st.last_marker_seq {
                Some(s) if epoch == st.last_epoch => return Ok(s),
                _ if epoch <= st.last_epoch => {
                    return Err(Error::EpochOrder {
                        epoch,
                        after: st.last_epoch,
                    });
                }
                _ => {
                    st.last_epoch = epoch;
                    st.last_marker_seq = None;
                }
            }
        }
        let s = sh
            .enqueue(|seq| Frame::Checkpoint { seq, epoch }, Vec::new())
            .ok_or_else(|| self.lost())?;
        sh.link.lock().last_marker_seq = Some(s);
        Ok(s)
    }

    /// Stops replication (the primary leaves COLO and keeps serving): says goodbye to the
    /// secondary, closes the link and joins its threads. Writes go to the local disk
    /// only from here on; a new secondary needs a resync.
    pub fn stop_replication(&self) {
        let sh = &self.shared;
        let _w = lock(&sh.write_lock);
        sh.resync_stop.store(true, Ordering::SeqCst);
        let sock = {
            let mut st = sh.link.lock();
            if st.linked() {
                if let Some(tx) = &st.tx {
                    let _ = tx.try_send((Frame::Goodbye, Payload::Bytes(Vec::new())));
                }
                st.mode = ReplicationState::Unprotected;
                st.diverged = true;
                st.tx = None;
            }
            st.sock.take()
        };
        sh.link.notify();
        let mut th = lock(&self.threads);
        if let Some(h) = th.copier.take() {
            let _ = h.join();
        }
        // The sender drains the queue (ending with the goodbye) and exits, unless the
        // secondary stopped reading; either way the socket then goes down, which ends
        // both threads.
        let drained = sh
            .link
            .wait_sender_exit(GOODBYE_WAIT.min(sh.opts.stall_timeout));
        if let Some(s) = sock {
            if !drained {
                // The secondary stopped reading: queued bytes would hold our FIN back
                // for good. Reset the connection instead, so it sees the end.
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            }
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for h in th.link.drain(..) {
            let _ = h.join();
        }
    }

    /// Ends the link at once, without waiting for a write or a resync in progress: for a
    /// controller that learned by other means (its heartbeat) that the secondary is gone.
    /// Whatever waits on the link (a full window, a barrier, [`complete_resync`]) returns
    /// [`Error::ReplicationLost`] with `reason`, and writes go to the local disk only. A
    /// new secondary needs a resync. Follow with [`stop_replication`](Self::stop_replication)
    /// to join the link's threads.
    ///
    /// [`complete_resync`]: Self::complete_resync
    pub fn drop_secondary(&self, reason: &str) {
        let generation = self.shared.link.lock().generation;
        self.shared.link.lose(generation, reason.to_string());
    }

    fn join_link_threads(&self) {
        let mut th = lock(&self.threads);
        if let Some(h) = th.copier.take() {
            let _ = h.join();
        }
        for h in th.link.drain(..) {
            let _ = h.join();
        }
    }

    fn check_mode(&self, want: ReplicationState, op: &'static str) -> Result<()> {
        let st = self.shared.link.lock();
        match &st.mode {
            m if *m == want => Ok(()),
            ReplicationState::Lost(r) => Err(Error::ReplicationLost(r.clone())),
            ReplicationState::Unprotected => Err(Error::WrongState {
                op,
                state: "no secondary is attached",
            }),
            ReplicationState::Resyncing => Err(Error::WrongState {
                op,
                state: "a resync is running",
            }),
            ReplicationState::Replicating => Err(Error::WrongState {
                op,
                state: "replicating",
            }),
        }
    }

    fn lost(&self) -> Error {
        match &self.shared.link.lock().mode {
            ReplicationState::Lost(r) => Error::ReplicationLost(r.clone()),
            _ => Error::WrongState {
                op: "forwarding",
                state: "replication was stopped",
            },
        }
    }

    /// The replication state.
    pub fn state(&self) -> ReplicationState {
        self.shared.link.lock().mode.clone()
    }

    /// Counters and the window's state.
    pub fn stats(&self) -> PrimaryStats {
        let sh = &self.shared;
        let st = sh.link.lock();
        PrimaryStats {
            state: st.mode.clone(),
            writes: sh.writes.load(Ordering::Relaxed),
            write_bytes: sh.write_bytes.load(Ordering::Relaxed),
            forwarded_frames: st.forwarded_frames,
            forwarded_bytes: st.forwarded_bytes,
            inflight_frames: st.inflight_frames(),
            inflight_bytes: st.inflight_bytes,
            acked_seq: st.acked,
            secondary_buffered: st.secondary_buffered,
        }
    }

    /// The disk's size in bytes.
    pub fn len(&self) -> u64 {
        self.shared.disk.len()
    }

    /// Whether the disk is empty (never).
    pub fn is_empty(&self) -> bool {
        self.shared.disk.is_empty()
    }

    /// Reads from the local disk.
    ///
    /// # Errors
    /// A span error or [`Error::DiskRead`].
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.shared.disk.read_at(offset, buf)
    }

    /// A guest write: to the local disk, then queued for the secondary (split into frames
    /// of at most 1 MiB). Returns when the local write is done and the frames are queued.
    /// A failure of the link does not fail the write (see [`ReplicationState::Lost`]).
    ///
    /// # Errors
    /// A span error or [`Error::DiskWrite`]: then nothing was forwarded.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let sh = &self.shared;
        sh.disk.check(offset, data.len() as u64)?;
        let _w = lock(&sh.write_lock);
        sh.link.wait_marker_acked(sh.opts.stall_timeout);
        sh.disk.write_unchecked(offset, data)?;
        sh.writes.fetch_add(1, Ordering::Relaxed);
        sh.write_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let mode = {
            let mut st = sh.link.lock();
            if !st.linked() {
                st.diverged = true;
            }
            st.mode.clone()
        };
        match mode {
            ReplicationState::Replicating => {
                for (i, chunk) in data.chunks(MAX_WRITE_BYTES as usize).enumerate() {
                    let at = offset + i as u64 * MAX_WRITE_BYTES;
                    let len = chunk.len() as u32;
                    let payload = if chunk.len() >= SENDFILE_MIN {
                        Payload::Disk { offset: at, len }
                    } else {
                        Payload::Bytes(sh.link.payload(chunk))
                    };
                    sh.enqueue(
                        |seq| Frame::Write {
                            seq,
                            offset: at,
                            len,
                        },
                        payload,
                    );
                }
            }
            ReplicationState::Resyncing => sh.dirty.mark(offset, data.len() as u64),
            _ => {}
        }
        Ok(())
    }

    /// A guest flush: syncs the local disk, then forwards an ordered flush (the
    /// secondary makes it durable when it commits the epoch, and failover syncs). Returns
    /// once the local disk is synced.
    ///
    /// # Errors
    /// [`Error::DiskFlush`].
    pub fn flush(&self) -> Result<()> {
        let sh = &self.shared;
        sh.disk.sync()?;
        let _w = lock(&sh.write_lock);
        if sh.link.lock().mode == ReplicationState::Replicating {
            sh.enqueue(|seq| Frame::Flush { seq }, Vec::new());
        }
        Ok(())
    }
}

impl Drop for PrimaryDisk {
    fn drop(&mut self) {
        self.stop_replication();
    }
}

impl BlockBackend for PrimaryDisk {
    fn len(&self) -> u64 {
        PrimaryDisk::len(self)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        PrimaryDisk::read_at(self, offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        PrimaryDisk::write_at(self, offset, data)
    }
    fn flush(&self) -> Result<()> {
        PrimaryDisk::flush(self)
    }
}

/// The primary's half of the handshake.
fn handshake(stream: &TcpStream, disk_len: u64, mode: SyncMode, timeout: Duration) -> Result<()> {
    let opt =
        |option, r: std::io::Result<()>| r.map_err(|source| Error::SocketOption { option, source });
    opt("TCP_NODELAY", stream.set_nodelay(true))?;
    opt("SO_RCVTIMEO", stream.set_read_timeout(Some(timeout)))?;
    let mut s = stream;
    write_frame(&mut s, Frame::Hello { disk_len, mode }, &[])?;
    let mut payload = Vec::new();
    let reply = read_frame(&mut s, &mut payload).map_err(|e| match e {
        Error::Frame(colo_transport::framing::Error::Timeout) => {
            Error::Timeout(timeout, "the secondary's hello")
        }
        e => e,
    })?;
    match reply {
        Frame::HelloAck { disk_len: theirs } if theirs == disk_len => {}
        Frame::HelloAck { disk_len: theirs } => {
            return Err(Error::Handshake(format!(
                "disk size mismatch: the primary's disk has {disk_len} bytes, the secondary's {theirs}"
            )));
        }
        Frame::Reject { .. } => {
            return Err(Error::Rejected(
                String::from_utf8_lossy(&payload).into_owned(),
            ));
        }
        other => {
            return Err(Error::Protocol(format!(
                "expected the secondary's hello, got {other:?}"
            )));
        }
    }
    opt("SO_RCVTIMEO", stream.set_read_timeout(None))?;
    Ok(())
}

/// The background copy of a resync: dirty chunks in disk order, pass after pass.
fn run_copier(sh: &Shared) {
    let mut at = 0;
    loop {
        if sh.resync_stop.load(Ordering::SeqCst) {
            return;
        }
        if sh.link.lock().mode != ReplicationState::Resyncing {
            return;
        }
        match sh.dirty.take_next(at) {
            Some(c) => {
                if let Err(e) = sh.copy_chunk(c) {
                    // The chunk stays wanted; the link cannot be trusted with a gap.
                    sh.dirty.mark(c * sh.dirty.chunk(), 1);
                    let g = sh.link.lock().generation;
                    sh.link.lose(g, format!("resync: {e}"));
                    return;
                }
                at = c + 1;
            }
            None if at == 0 => std::thread::sleep(Duration::from_millis(2)),
            None => at = 0,
        }
    }
}
