//! # colo-dirty-track
//!
//! Which guest pages changed since the last checkpoint:
//!
//! - [`PageBitmap`]: one bit per page in `u64` words, with union, count and an iterator of
//!   merged runs ([`PageBitmap::runs`]) that is fast on sparse and dense bitmaps alike.
//! - [`AtomicPageBitmap`]: the VMM's own bitmap for writes it makes into guest memory
//!   (device DMA), which KVM's dirty log does not see.
//! - [`GuestLayout`]: several memory regions numbered as one flat run of pages.
//! - [`DirtyTracker`]: reads KVM's dirty log per slot (with `KVM_CLEAR_DIRTY_LOG` under
//!   manual protection) and merges it with the VMM's bitmap.
//!
//! ```
//! use colo_dirty_track::PageBitmap;
//! let mut b = PageBitmap::new(1000);
//! b.set_range(10, 5);
//! b.set(64);
//! assert_eq!(b.runs().collect::<Vec<_>>(), vec![(10, 5), (64, 1)]);
//! ```

mod atomic;
mod bitmap;
mod kvm;
mod layout;

pub use atomic::AtomicPageBitmap;
pub use bitmap::{PageBitmap, Runs};
pub use kvm::{CollectStats, DirtyTracker, clear_dirty_log, enable_manual_protect};
pub use layout::{GuestLayout, GuestRegion};

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A guest memory layout or bitmap that does not fit.
    #[error("invalid layout: {0}")]
    Layout(String),
    /// KVM refused to enable manual dirty-log protection.
    #[error("cannot enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")]
    EnableManualProtect(#[source] kvm_ioctls::Error),
    /// KVM_GET_DIRTY_LOG failed for a slot.
    #[error("KVM_GET_DIRTY_LOG failed for slot {slot}")]
    GetDirtyLog {
        /// The memory slot.
        slot: u32,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_CLEAR_DIRTY_LOG failed for a slot.
    #[error("KVM_CLEAR_DIRTY_LOG failed for slot {slot}")]
    ClearDirtyLog {
        /// The memory slot.
        slot: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
