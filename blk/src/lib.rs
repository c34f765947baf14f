//! # colo-blk
//!
//! Block replication for COLO: the disk follows the same checkpoints as memory, in the
//! manner of QEMU's replication driver.
//!
//! - [`PrimaryDisk`]: the primary's block backend. Every guest write goes to the local
//!   disk and is forwarded, in order and asynchronously through a bounded in-flight
//!   window, to the secondary; [`PrimaryDisk::checkpoint_barrier`] is the epoch's "disk
//!   acknowledged" step. [`PrimaryDisk::attach`] with [`SyncMode::Resync`] brings a new
//!   secondary in sync while writes go on (the drive-mirror role).
//! - [`SecondaryDisk`]: the secondary's disk buffer. Primary writes copy the original
//!   sectors into the *hidden* buffer (once per epoch) and then land on the secondary
//!   disk; the SVM's writes go to the *active* buffer; the SVM reads active over hidden
//!   over disk. [`SecondaryDisk::commit`] drops both buffers; [`SecondaryDisk::failover`]
//!   undoes the uncommitted epoch and flushes the SVM's writes into the disk. The buffer
//!   lives in memory and spills to a file past a limit; its size is reported
//!   ([`SecondaryDisk::stats`], and to the primary in every acknowledgement).
//! - [`wire`]: the protocol of forwarded writes (headers on `colo_transport::framing`:
//!   magic, version and type checked there; length and offset checks here).
//! - [`BlockBackend`]: the interface the VMM's virtio-blk calls; [`PlainDisk`] is the
//!   unreplicated one; [`SwitchableDisk`] lets a secondary that took over become a
//!   primary (its disk then replicated to a new secondary) under the same device.
//!
//! ## What the secondary's disk holds
//!
//! Sectors are 512 bytes; every offset and length must be a non-empty multiple of it.
//! An epoch's writes are those the primary completed (its `write_at` returned) before
//! `checkpoint_barrier(epoch)` was called. Epoch N is *committed* when the secondary's
//! controller calls `commit(N)`, after the whole checkpoint has arrived.
//!
//! - After `commit(N)` the secondary disk equals the primary's disk as it was at the
//!   barrier of epoch N, byte for byte, and both buffers are empty.
//! - The SVM always sees the disk as of the last commit plus its own writes since. (The
//!   primary's writes of the running epoch are not visible to it: they are on the disk,
//!   but the hidden buffer holds what was there before, and reads go through it. Showing
//!   them would let the SVM read data that failover then takes away.)
//! - After `failover()` the disk is exactly that view, made durable: every write the
//!   primary completed before the barrier of the last committed epoch (unless the SVM
//!   wrote the same sectors since), plus all of the SVM's own writes since that commit,
//!   and nothing of the primary's later writes, whole or in part. A primary that dies
//!   after a barrier but before the commit loses that epoch: the checkpoint did not
//!   happen, and the SVM goes on from its own state.
//!
//! The primary's guest can see a write completed that the secondary never keeps (one of
//! the uncommitted epoch). That is COLO's contract: the SVM, which ran the same
//! workload, made its own equivalent writes, and nothing the client saw depended on a
//! state the SVM does not reproduce (output is compared, or held until the commit in
//! periodic mode).

// Three system calls are the only unsafe code, each allowed where it is made: `poll`
// (secondary/receiver.rs), `sendfile` and `sync_file_range` (disk.rs).
#![deny(unsafe_code)]

mod aligned;
mod backend;
mod buffer;
mod disk;
mod error;
mod frame_io;
#[doc(hidden)]
pub mod fuzzing;
mod primary;
mod secondary;
mod sector;
mod switch;
pub mod wire;

pub use backend::BlockBackend;
pub use buffer::{BufferOptions, BufferStats};
pub use disk::{Disk, PlainDisk};
pub use error::{Error, Result};
pub use primary::{
    BarrierStats, PrimaryDisk, PrimaryOptions, PrimaryStats, ReplicationState, ResyncProgress,
};
pub use secondary::{CommitStats, FailoverStats, SecondaryDisk, SecondaryPhase, SecondaryStats};
pub use sector::{SECTOR_SIZE, check_span};
pub use switch::SwitchableDisk;
pub use wire::SyncMode;
