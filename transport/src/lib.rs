//! # colo-transport
//!
//! The wire between a COLO primary and its secondary:
//!
//! - [`framing`]: what every colo protocol's frames share (here and in `colo-blk`): a
//!   zerocopy-checked header of magic, version and type, reading whole frames off a
//!   stream, and the errors of both.
//! - [`control`]: the versioned handshake and the COLO control messages (checkpoint
//!   request/reply, vmstate send/size/received/loaded, heartbeat, failover).
//! - [`push`]: the one-sided page-push model: a registered receive region, posted writes of
//!   page runs, a fence, and an epoch commit carrying the bitmap of pages written.
//! - Backends of that model: [`tcp`] (default), and [`verbs`]: one pipeline of RDMA WRITE
//!   work requests over a queue-pair endpoint, which is either a verbs device (`rdma`,
//!   feature `rdma`, through rdma-sys) or an in-process queue pair that enforces the verbs
//!   rules and injects faults ([`verbs::sim`], wrapped as [`double`]).
//!
//! Every frame is checked before use (magic, version, lengths, offsets inside the region);
//! a bad frame closes its connection with a typed [`Error`], and no write ever lands
//! outside the region.
//!
//! ```
//! use std::sync::Arc;
//! use colo_memory::{PageBitmap, Region};
//! use colo_transport::push::{PushReceiver, PushSender, WriteRun, push_epoch};
//! use colo_transport::tcp::{TcpPushListener, TcpPushOptions, TcpPushSender};
//!
//! let cache = Arc::new(Region::anonymous(64 * 4096)?);
//! let guest = Arc::new(Region::anonymous(64 * 4096)?);
//! guest.write_at(5 * 4096, b"dirty page")?;
//!
//! // Both sides hold the pair's key; every stream proves it before anything else.
//! let creds = colo_auth::Credentials::generate()?;
//! let listener = TcpPushListener::bind("127.0.0.1:0", Arc::clone(&cache), 4096, creds.clone())?;
//! let desc = *listener.desc();
//! let rx = std::thread::spawn(move || -> colo_transport::Result<_> {
//!     let mut rx = listener.accept(std::time::Duration::from_secs(5))?;
//!     let c = rx.next_commit(std::time::Duration::from_secs(5))?;
//!     rx.release(c.epoch)?;
//!     Ok((c, rx))
//! });
//! let addr = ([127, 0, 0, 1], desc.port).into();
//! let mut tx = TcpPushSender::connect(addr, desc, guest, &creds, TcpPushOptions::default())?;
//! let mut dirty = PageBitmap::new(64);
//! dirty.set(5);
//! push_epoch(&mut tx, [WriteRun::pages(5, 1, 4096)], &dirty)?;
//! // Dropping the receiver closes its streams, so keep it until the sender is done.
//! let (commit, _rx) = rx.join().unwrap()?;
//! drop(tx);
//! assert_eq!((commit.epoch, commit.bitmap, commit.bytes), (1, dirty, 4096));
//! let mut b = [0u8; 10];
//! cache.read_at(5 * 4096, &mut b)?;
//! assert_eq!(&b, b"dirty page");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod control;
pub mod double;
mod error;
pub mod framing;
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "ofi")]
pub mod ofi;
pub mod push;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod tcp;
#[doc(hidden)]
pub mod testing;
pub mod verbs;

pub use error::{Error, Result};
