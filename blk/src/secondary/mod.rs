//! The secondary side: the disk buffer behind the secondary VM's block device, fed by the
//! primary's forwarded writes.
//!
//! ```text
//!  primary write  ─▶ copy originals of sectors not yet in hidden ─▶ hidden buffer
//!                 └▶ write the primary's data ───────────────────▶ secondary disk
//!  SVM write      ─────────────────────────────────────────────────▶ active buffer
//!  SVM read       ◀─ active, else hidden, else secondary disk
//!  commit(epoch)  ─ drop hidden and active: the disk equals the primary's at the checkpoint
//!  failover()     ─ hidden back onto the disk (undo the uncommitted epoch), then active
//!                   onto it (the SVM keeps its own view), fdatasync; replication stops
//! ```
//!
//! After the primary's end-of-epoch marker the receiver stops reading the stream until the
//! controller commits that epoch or fails over, so writes of the next epoch never mix with
//! the one being committed (they wait in the primary's window and the socket).

mod reader;
mod receiver;

use std::net::TcpStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::BlockBackend;
use crate::buffer::{BufferOptions, BufferStats, DiskBuffer};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::wire::SyncMode;

/// Where a secondary is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecondaryPhase {
    /// No primary has connected yet.
    Waiting,
    /// A full copy from the primary is running; the disk is not usable yet.
    Syncing,
    /// Following the primary epoch by epoch; the SVM uses the disk buffer.
    Replicating,
    /// Failed over: the disk is a plain disk holding the SVM's view.
    FailedOver,
    /// Stopped at the last commit: the disk equals the primary's as of that checkpoint
    /// and takes no more requests.
    Stopped,
}

impl SecondaryPhase {
    fn words(self) -> &'static str {
        match self {
            Self::Waiting => "no primary has connected",
            Self::Syncing => "the resync is incomplete",
            Self::Replicating => "replicating",
            Self::FailedOver => "failed over",
            Self::Stopped => "stopped",
        }
    }
}

/// What a secondary reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SecondaryStats {
    /// The disk buffer.
    pub buffer: BufferStats,
    /// The last committed epoch.
    pub committed: u64,
    /// The last end-of-epoch marker received.
    pub last_marker: Option<u64>,
    /// The sequence number of the last frame applied.
    pub applied_seq: u64,
    /// Primary writes applied.
    pub writes: u64,
    /// Bytes of primary writes applied.
    pub write_bytes: u64,
    /// Bytes of the full copy applied.
    pub sync_bytes: u64,
    /// Why the link to the primary ended, once it has.
    pub link_error: Option<String>,
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommitStats {
    /// The committed epoch.
    pub epoch: u64,
    /// The buffer as it was just before it was dropped.
    pub dropped: BufferStats,
    /// How long the drop took.
    pub drop_time: Duration,
}

/// What a failover did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailoverStats {
    /// The last committed epoch: the disk is the primary's as of it, plus the SVM's writes.
    pub committed: u64,
    /// Bytes of original sectors written back (the uncommitted epoch undone).
    pub rolled_back_bytes: u64,
    /// Bytes of SVM writes flushed into the disk.
    pub kept_bytes: u64,
}

#[derive(Debug)]
pub(crate) struct State {
    pub buf: DiskBuffer,
    pub phase: SecondaryPhase,
    pub committed: u64,
    pub last_marker: Option<u64>,
    pub applied_seq: u64,
    pub stop: bool,
    pub link: Option<TcpStream>,
    pub link_error: Option<String>,
    pub writes: u64,
    pub write_bytes: u64,
    pub sync_bytes: u64,
    /// A primary flush arrived since the disk was last synced: the next commit syncs.
    pub flush_pending: bool,
    /// When writeback was last started at a primary flush.
    pub last_writeback: Option<Instant>,
    /// Pacing of the SVM by the primary's flushes ([`SecondaryDisk::set_flush_lead`]).
    pub pace: FlushPace,
}

/// The SVM paced by its disk: an SVM flush waits until the primary has sent at least as
/// many flushes since the last checkpoint, less the lead.
#[derive(Debug, Default)]
pub(crate) struct FlushPace {
    /// How many flushes the SVM may be ahead; `None`: not paced.
    pub lead: Option<u64>,
    /// The primary's flushes since its last end-of-epoch marker.
    pub primary: u64,
    /// The SVM's flushes since the last commit.
    pub svm: u64,
    /// Bumped to let every waiting SVM flush go (a checkpoint starts, or a commit).
    pub generation: u64,
    /// A checkpoint is under way: no SVM flush waits until the next commit.
    pub open: bool,
    /// SVM flushes waiting now (the receiver wakes them at each primary flush).
    pub waiting: u32,
    /// SVM flushes that waited, and the time they waited in all.
    pub waits: u64,
    pub waited: Duration,
}

impl FlushPace {
    /// Whether an SVM flush of `generation` must wait on.
    fn must_wait(&self, generation: u64) -> bool {
        self.generation == generation
            && !self.open
            && self
                .lead
                .is_some_and(|lead| self.svm > self.primary.saturating_add(lead))
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub st: Mutex<State>,
    pub cond: Condvar,
    pub disk_len: u64,
}

impl Inner {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn new(disk: Disk, opts: &BufferOptions) -> Self {
        let disk_len = disk.len();
        Self {
            st: Mutex::new(State {
                buf: DiskBuffer::new(disk, opts),
                phase: SecondaryPhase::Waiting,
                committed: 0,
                last_marker: None,
                flush_pending: false,
                last_writeback: None,
                applied_seq: 0,
                stop: false,
                link: None,
                link_error: None,
                writes: 0,
                write_bytes: 0,
                sync_bytes: 0,
                pace: FlushPace::default(),
            }),
            cond: Condvar::new(),
            disk_len,
        }
    }
}

/// The secondary's disk: a [`BlockBackend`] for the SVM over the disk buffer, fed by one
/// primary connection.
///
/// ```
/// use std::time::Duration;
/// use colo_blk::{BlockBackend, BufferOptions, Disk, PrimaryDisk, PrimaryOptions,
///                SecondaryDisk, SyncMode};
///
/// let t = Duration::from_secs(10);
/// let image = |n| { let f = tempfile::tempfile()?; f.set_len(n)?; Ok::<_, std::io::Error>(f) };
/// let primary = PrimaryDisk::new(Disk::from_file(image(1 << 20)?)?, PrimaryOptions::default());
/// let secondary = SecondaryDisk::new(Disk::from_file(image(1 << 20)?)?, BufferOptions::default());
///
/// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
/// let addr = listener.local_addr()?;
/// let s = std::thread::spawn(move || -> colo_blk::Result<SecondaryDisk> {
///     let (conn, _) = listener.accept().unwrap();
///     secondary.serve(conn, t)?;
///     Ok(secondary)
/// });
/// primary.attach(std::net::TcpStream::connect(addr)?, SyncMode::InSync, t)?;
/// let secondary = s.join().unwrap()?;
///
/// primary.write_at(4096, &[1; 512])?;          // the guest writes; forwarded at once
/// secondary.write_at(8192, &[2; 512])?;        // the SVM writes into its active buffer
/// primary.checkpoint_barrier(1, t)?;           // the epoch's "disk acknowledged" step
/// secondary.commit(1, t)?;                     // the secondary drops its buffer
/// let mut b = [0u8; 512];
/// secondary.read_at(4096, &mut b)?;
/// assert_eq!(b, [1; 512]);                     // the primary's write is on its disk
/// secondary.read_at(8192, &mut b)?;
/// assert_eq!(b, [0; 512]);                     // the SVM's own write was dropped
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SecondaryDisk {
    inner: Arc<Inner>,
    receiver: Mutex<Option<JoinHandle<()>>>,
}

impl SecondaryDisk {
    /// A secondary over `disk`, waiting for its primary.
    pub fn new(disk: Disk, opts: BufferOptions) -> Self {
        Self {
            inner: Arc::new(Inner::new(disk, &opts)),
            receiver: Mutex::new(None),
        }
    }

    /// Takes the primary's connection: runs the handshake (within `timeout`) and starts
    /// the receiver thread. Returns the mode the primary asked for: after
    /// [`SyncMode::Resync`] the disk is usable once [`wait_synced`](Self::wait_synced)
    /// returns.
    ///
    /// # Errors
    /// [`Error::WrongState`] if a primary was already served (a secondary is used once),
    /// [`Error::Handshake`] on a disk size mismatch (the primary is told why), a
    /// decoding error, [`Error::Timeout`], or [`Error::Thread`].
    pub fn serve(&self, stream: TcpStream, timeout: Duration) -> Result<SyncMode> {
        let phase = self.inner.lock().phase;
        if phase != SecondaryPhase::Waiting {
            return Err(Error::WrongState {
                op: "serving a primary",
                state: "a primary was already served",
            });
        }
        let mode = receiver::handshake(&stream, self.inner.disk_len, timeout)?;
        {
            let mut st = self.inner.lock();
            st.phase = match mode {
                SyncMode::Resync => SecondaryPhase::Syncing,
                SyncMode::InSync => SecondaryPhase::Replicating,
            };
            st.link = Some(stream.try_clone().map_err(|source| Error::SocketOption {
                option: "dup",
                source,
            })?);
        }
        let inner = Arc::clone(&self.inner);
        let h = std::thread::Builder::new()
            .name("colo-blk-rx".into())
            .spawn(move || receiver::run(&inner, stream))
            .map_err(Error::Thread)?;
        *self.receiver.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        tracing::info!(?mode, "secondary: primary connected");
        Ok(mode)
    }

    /// Waits until a resync has finished (the disk equals the primary's).
    ///
    /// # Errors
    /// [`Error::Timeout`], or [`Error::ReplicationLost`] if the link ended first.
    pub fn wait_synced(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.lock();
        loop {
            match st.phase {
                SecondaryPhase::Replicating | SecondaryPhase::FailedOver => return Ok(()),
                _ if st.link_error.is_some() => {
                    return Err(Error::ReplicationLost(
                        st.link_error.clone().unwrap_or_default(),
                    ));
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout, "the resync to finish"));
            }
            st = self
                .inner
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Commits `epoch`: waits (at most `timeout`) for the primary's end-of-epoch marker,
    /// then drops both buffers. Afterwards the disk equals the primary's as of the
    /// checkpoint, and the receiver goes on with the next epoch's writes. Call it when the
    /// whole epoch (RAM and device state) has arrived.
    ///
    /// # Errors
    /// [`Error::WrongState`] unless replicating, [`Error::EpochOrder`] for an epoch not
    /// above the last committed one, [`Error::EpochNotReady`] if the marker did not
    /// arrive in time (or the link ended without it), or a spill file error.
    pub fn commit(&self, epoch: u64, timeout: Duration) -> Result<CommitStats> {
        self.commit_inner(Some(epoch), timeout)
    }

    /// As [`commit`](Self::commit), for the epoch of the next end-of-epoch marker the
    /// primary sends (the first one above the last commit): for a controller that does
    /// not count epochs itself, e.g. after a re-protection.
    ///
    /// # Errors
    /// As [`commit`](Self::commit).
    pub fn commit_next(&self, timeout: Duration) -> Result<CommitStats> {
        self.commit_inner(None, timeout)
    }

    /// Waits (at most `timeout`) until the primary's next end-of-epoch marker (the first
    /// above the last commit) has arrived, hence every write before it has been applied,
    /// and returns its epoch. A controller that answers the primary's checkpoint only after
    /// this lets the primary skip its own wait for the marker's acknowledgement.
    ///
    /// # Errors
    /// As [`commit_next`](Self::commit_next).
    pub fn wait_next_marker(&self, timeout: Duration) -> Result<u64> {
        self.wait_marker(None, Instant::now() + timeout)
            .map(|(_, epoch)| epoch)
    }

    /// Waits until the marker of epoch `want` (or of the next epoch) has arrived; returns
    /// the state, still locked, and the epoch.
    fn wait_marker(
        &self,
        want: Option<u64>,
        deadline: Instant,
    ) -> Result<(MutexGuard<'_, State>, u64)> {
        let mut st = self.inner.lock();
        loop {
            let epoch = match (want, st.last_marker) {
                (Some(e), _) => e,
                (None, Some(m)) if m > st.committed => m,
                (None, _) => st.committed + 1,
            };
            if st.phase != SecondaryPhase::Replicating {
                return Err(Error::WrongState {
                    op: "commit",
                    state: st.phase.words(),
                });
            }
            if epoch <= st.committed {
                return Err(Error::EpochOrder {
                    epoch,
                    after: st.committed,
                });
            }
            if st.last_marker == Some(epoch) {
                return Ok((st, epoch));
            }
            let now = Instant::now();
            if now >= deadline || st.link_error.is_some() {
                return Err(Error::EpochNotReady {
                    epoch,
                    last: st.last_marker,
                });
            }
            st = self
                .inner
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn commit_inner(&self, want: Option<u64>, timeout: Duration) -> Result<CommitStats> {
        let span = tracing::info_span!("blk_commit", epoch = want);
        let _g = span.enter();
        let (mut st, epoch) = self.wait_marker(want, Instant::now() + timeout)?;
        let dropped = st.buf.stats();
        let t = Instant::now();
        // The primary's flushes of this epoch become durable here, once per epoch instead
        // of once per flush (which stalled the stream and the primary's barrier). Nothing
        // depends on the secondary's disk being durable earlier: the primary acknowledged
        // its guest after its own sync, and failover() syncs before the SVM goes on.
        if std::mem::take(&mut st.flush_pending) {
            st.buf.disk().sync()?;
        }
        st.buf.drop_all()?;
        let drop_time = t.elapsed();
        st.committed = epoch;
        // The SVM is the primary's copy as of the marker: its flushes count afresh.
        st.pace.svm = 0;
        st.pace.open = false;
        st.pace.generation = st.pace.generation.wrapping_add(1);
        drop(st);
        self.inner.cond.notify_all();
        tracing::debug!(
            ?drop_time,
            extents = dropped.hidden_extents + dropped.active_extents,
            "disk buffer dropped"
        );
        Ok(CommitStats {
            epoch,
            dropped,
            drop_time,
        })
    }

    /// Fails over: stops the receiver (closing the primary's connection), writes the
    /// hidden originals back (undoing every primary write after the last committed
    /// checkpoint), writes the active buffer over them, and syncs the disk. Afterwards
    /// the disk is the primary's as of the last commit plus the SVM's own writes since,
    /// and reads and writes go straight to it.
    ///
    /// # Errors
    /// [`Error::WrongState`] unless replicating (before a resync has finished the disk
    /// is not usable), or an I/O error of the flush.
    pub fn failover(&self) -> Result<FailoverStats> {
        let span = tracing::info_span!("blk_failover");
        let _g = span.enter();
        self.stop_receiver();
        let mut st = self.inner.lock();
        if st.phase != SecondaryPhase::Replicating {
            return Err(Error::WrongState {
                op: "failover",
                state: st.phase.words(),
            });
        }
        let b = st.buf.stats();
        st.buf.flush_into_disk()?;
        st.phase = SecondaryPhase::FailedOver;
        let stats = FailoverStats {
            committed: st.committed,
            rolled_back_bytes: b.hidden_bytes,
            kept_bytes: b.active_bytes,
        };
        drop(st);
        self.inner.cond.notify_all();
        tracing::info!(?stats, "secondary failed over");
        Ok(stats)
    }

    /// Stops following the primary and leaves the disk as of the last committed
    /// checkpoint (the primary's writes of the running epoch undone, the SVM's own writes
    /// dropped, synced): a secondary told to stop leaves an image that a later resync or
    /// a promotion can start from. Before the first full copy ended there is nothing to
    /// restore (the image is then a partial copy; a new secondary resyncs it).
    ///
    /// # Errors
    /// An I/O error while writing the originals back or syncing.
    pub fn stop_at_commit(&self) -> Result<()> {
        self.stop_receiver();
        let mut st = self.inner.lock();
        if st.phase == SecondaryPhase::Replicating {
            st.buf.roll_back_into_disk()?;
            tracing::info!(
                committed = st.committed,
                "secondary disk left as of the last commit"
            );
        }
        if st.phase != SecondaryPhase::FailedOver {
            st.phase = SecondaryPhase::Stopped;
        }
        drop(st);
        self.inner.cond.notify_all();
        Ok(())
    }

    fn stop_receiver(&self) {
        {
            let mut st = self.inner.lock();
            st.stop = true;
            if let Some(s) = st.link.take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        self.inner.cond.notify_all();
        if let Some(h) = self
            .receiver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = h.join();
        }
    }

    /// The current phase.
    pub fn phase(&self) -> SecondaryPhase {
        self.inner.lock().phase
    }

    /// Counters, the buffer's size and the link's state.
    pub fn stats(&self) -> SecondaryStats {
        let st = self.inner.lock();
        SecondaryStats {
            buffer: st.buf.stats(),
            committed: st.committed,
            last_marker: st.last_marker,
            applied_seq: st.applied_seq,
            writes: st.writes,
            write_bytes: st.write_bytes,
            sync_bytes: st.sync_bytes,
            link_error: st.link_error.clone(),
        }
    }

    /// The disk's size in bytes.
    pub fn len(&self) -> u64 {
        self.inner.disk_len
    }

    /// Whether the disk is empty (never).
    pub fn is_empty(&self) -> bool {
        self.inner.disk_len == 0
    }

    /// An SVM read: active over hidden over disk (the disk alone after failover).
    ///
    /// # Errors
    /// A span error, [`Error::WrongState`] before the disk is usable, or an I/O error.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let st = self.inner.lock();
        st.buf.disk().check(offset, buf.len() as u64)?;
        match st.phase {
            SecondaryPhase::Replicating => st.buf.svm_read(offset, buf),
            SecondaryPhase::FailedOver => st.buf.disk().read_unchecked(offset, buf),
            p => Err(Error::WrongState {
                op: "an SVM read",
                state: p.words(),
            }),
        }
    }

    /// An SVM write: into the active buffer (straight to the disk after failover).
    ///
    /// # Errors
    /// A span error, [`Error::WrongState`] before the disk is usable, or an I/O error.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = self.inner.lock();
        st.buf.disk().check(offset, data.len() as u64)?;
        match st.phase {
            SecondaryPhase::Replicating => st.buf.svm_write(offset, data),
            SecondaryPhase::FailedOver => st.buf.disk().write_unchecked(offset, data),
            p => Err(Error::WrongState {
                op: "an SVM write",
                state: p.words(),
            }),
        }
    }

    /// An SVM flush. While replicating there is nothing to do: the SVM's writes are only
    /// kept if it takes over, and [`failover`](Self::failover) syncs them to the disk.
    /// After failover it syncs the disk.
    ///
    /// # Errors
    /// [`Error::DiskFlush`].
    pub fn flush(&self) -> Result<()> {
        let mut st = self.inner.lock();
        match st.phase {
            SecondaryPhase::FailedOver => st.buf.disk().sync(),
            SecondaryPhase::Replicating if st.pace.lead.is_some() => {
                st.pace.svm += 1;
                let generation = st.pace.generation;
                if !st.pace.must_wait(generation) {
                    return Ok(());
                }
                let t = Instant::now();
                st.pace.waiting += 1;
                let (mut st, _) = self
                    .inner
                    .cond
                    .wait_timeout_while(st, MAX_FLUSH_WAIT, |st| {
                        st.phase == SecondaryPhase::Replicating
                            && !st.stop
                            && st.pace.must_wait(generation)
                    })
                    .unwrap_or_else(|p| p.into_inner());
                st.pace.waiting -= 1;
                st.pace.waits += 1;
                st.pace.waited += t.elapsed();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Paces the SVM by the primary's flushes (`Some(lead)`), or not (`None`, the
    /// default). The SVM answers without the primary's disk latency (its writes land in
    /// the buffer), so unpaced it runs ahead of the primary, and each checkpoint throws
    /// that work away. Paced, the SVM's flush waits (at most 100 ms each) until the
    /// primary has sent as many flushes since the last checkpoint, less `lead`;
    /// [`release_flushes`](Self::release_flushes), a commit and a failover let waiting
    /// flushes go at once.
    pub fn set_flush_lead(&self, lead: Option<u64>) {
        let mut st = self.inner.lock();
        st.pace.lead = lead;
        st.pace.generation = st.pace.generation.wrapping_add(1);
        drop(st);
        self.inner.cond.notify_all();
    }

    /// Lets every SVM flush that waits for the primary's go now, and any until the next
    /// commit: call it when a checkpoint starts, so that the SVM's disk requests end
    /// before its epoch commits.
    pub fn release_flushes(&self) {
        let mut st = self.inner.lock();
        st.pace.open = true;
        st.pace.generation = st.pace.generation.wrapping_add(1);
        drop(st);
        self.inner.cond.notify_all();
    }

    /// SVM flushes that waited for the primary's, and how long they waited in all.
    pub fn flush_waits(&self) -> (u64, Duration) {
        let st = self.inner.lock();
        (st.pace.waits, st.pace.waited)
    }
}

/// Longest an SVM flush waits for the primary's ([`SecondaryDisk::set_flush_lead`]).
const MAX_FLUSH_WAIT: Duration = Duration::from_millis(100);

impl Drop for SecondaryDisk {
    fn drop(&mut self) {
        self.stop_receiver();
    }
}

impl BlockBackend for SecondaryDisk {
    fn len(&self) -> u64 {
        SecondaryDisk::len(self)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        SecondaryDisk::read_at(self, offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        SecondaryDisk::write_at(self, offset, data)
    }
    fn flush(&self) -> Result<()> {
        SecondaryDisk::flush(self)
    }
}

/// Runs the receive loop over in-memory input for the fuzz targets, committing every
/// epoch at its marker.
pub(crate) fn serve_for_fuzz(inner: &Inner, input: &[u8], acks: &mut Vec<u8>) -> Result<()> {
    receiver::serve_loop(inner, input, acks, None)
}
