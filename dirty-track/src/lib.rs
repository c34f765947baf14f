//! # colo-dirty-track
//!
//! Which guest pages changed since the last checkpoint:
//!
//! - [`DirtyTracker`]: reads KVM's dirty log per slot (with `KVM_CLEAR_DIRTY_LOG` under
//!   manual protection) and merges it with the dirty bitmap of the guest memory itself
//!   (`colo_memory::GuestMemory`), which every write the VMM makes through it marks.
//! - [`HotPolicy`]: pages the guest rewrites all the time are left writable (their bits
//!   left set) instead of taking a write-protect fault after every collection; they go
//!   into every checkpoint.
//!
//! The bitmaps, layouts and regions it works on live in `colo-memory`.

mod hot;
mod kvm;

pub use hot::{Collection, HotPolicy};
pub use kvm::{CollectStats, DirtyTracker, clear_dirty_log, enable_manual_protect};

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A guest memory layout or bitmap that does not fit.
    #[error("invalid layout: {0}")]
    Layout(String),
    /// Guest memory that does not form a layout, or a bitmap that does not cover it.
    #[error(transparent)]
    Memory(#[from] colo_memory::Error),
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
