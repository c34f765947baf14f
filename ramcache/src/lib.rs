//! # colo-ramcache
//!
//! The secondary's RAM cache: a full copy of the primary VM's memory as of the last
//! committed checkpoint, plus the pages of the epoch that is arriving.
//!
//! - The cache is one pre-faulted mapping (transparent huge pages where the system offers
//!   them) laid out in the flat page numbering of [`colo_memory::GuestLayout`]: every
//!   guest region is a contiguous span of it. [`RamCache::region`] is what the secondary
//!   registers as the receive region of the page-push transport, so pushed pages land in it
//!   directly, with no copy.
//! - Each epoch is *staged* ([`RamCache::land`], [`RamCache::seal_pages`],
//!   [`RamCache::stage_state`], [`RamCache::stage_disk_acked`]). The SVM's memory is not
//!   touched until all of it is there: every pushed page, the whole device state and the
//!   disk acknowledgement.
//! - [`RamCache::commit`] then copies cache → SVM memory for exactly the union of the pages
//!   the primary pushed this epoch and the pages the SVM dirtied since the last commit, and
//!   hands back the device state to load. Pages in neither set are not copied.
//! - [`RamCache::abort`] drops an incomplete epoch: the SVM's memory stays exactly what it
//!   was.
//!
//! ```text
//!   push transport ──pages──> cache (staging)      SVM memory (running, untouched)
//!   land(commit) · seal_pages(k) · stage_state(s) · stage_disk_acked()
//!                                   │ commit(svm_dirty)
//!                                   └── copy union(pushed, svm_dirty) ──> SVM memory
//! ```
//!
//! ## Release gating
//! Pages of the next epoch must not land in the cache before [`RamCache::commit`] has
//! copied this one, or the SVM would get bytes from the future. The push transport's
//! `release(epoch)` provides that gate, and [`Landing`] drives it: its thread lands every
//! push epoch and releases it at once, except the one that closes a checkpoint
//! ([`Landing::hold`]), which [`Landing::commit_and_release`] lets go after the commit. The
//! controller waits for an epoch with [`Landing::wait_landed`], on a condition variable.
//!
//! ```
//! use std::sync::Arc;
//! use colo_memory::{GuestLayout, GuestRegion, PageBitmap};
//! use colo_ramcache::RamCache;
//! use colo_memory::Region;
//! use colo_transport::push::EpochCommit;
//!
//! let layout = GuestLayout::new(4096, vec![GuestRegion { slot: 0, gpa: 0, len: 16 * 4096 }])?;
//! let svm = Arc::new(Region::anonymous(16 * 4096)?);
//! let mut cache = RamCache::new(layout, vec![Arc::clone(&svm)])?;
//!
//! // The push transport writes page 3 into the cache and commits push epoch 1.
//! cache.region().write_at(3 * 4096, b"from the primary")?;
//! let mut pushed = PageBitmap::new(16);
//! pushed.set(3);
//! cache.land(&EpochCommit { epoch: 1, bitmap: pushed, bytes: 4096 })?;
//! cache.seal_pages(1)?;
//! cache.stage_state(b"device state".to_vec())?;
//! cache.stage_disk_acked()?;
//!
//! // The SVM wrote page 7 itself; the commit reverts it to the primary's copy.
//! svm.write_at(7 * 4096, b"svm only")?;
//! let mut svm_dirty = PageBitmap::new(16);
//! svm_dirty.set(7);
//! let done = cache.commit(&svm_dirty)?;
//! assert_eq!((done.checkpoint, done.pages, &done.state[..]), (1, 2, &b"device state"[..]));
//! let mut b = [0u8; 16];
//! svm.read_at(3 * 4096, &mut b)?;
//! assert_eq!(&b, b"from the primary");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cache;
mod error;
mod landing;
mod staging;

pub use cache::{Committed, RamCache};
pub use error::{Error, Result};
pub use landing::{Interrupt, Landing, LandingEnd};
pub use staging::{Stage, StageStatus};
