//! # colo-memory
//!
//! The bottom layer of colo: the memory model every other crate shares.
//!
//! - [`Region`]: a mapped span that the push path reads and writes through raw pointers,
//!   bounds-checked on every access, and kept mapped by the owner it holds (an `Arc` of a
//!   [`Mapping`]), so no drop order decides whether a push in flight reads unmapped memory.
//! - [`GuestMemory`]: vm-memory's mmap-backed guest memory with a [`DirtyBitmap`] per
//!   region, so every write the VMM makes through it (device DMA, virtio rings, loading)
//!   marks its page dirty by itself: no device marks pages by hand.
//! - [`PageBitmap`]: one bit per page in `u64` words (KVM's layout), checked once where it is
//!   built from foreign words ([`PageBitmap::from_words`]) and then passed as a type; merged
//!   page runs come from [`PageBitmap::runs`].
//! - [`GuestLayout`]: several guest memory regions numbered as one flat run of pages, the
//!   numbering the dirty bitmap, the RAM cache and the push path share; [`flat::in_one_file`]
//!   maps such a guest so that one [`Region`] sees all of it in that numbering.
//!
//! ```
//! use colo_memory::PageBitmap;
//! let mut b = PageBitmap::new(1000);
//! b.set_range(10, 5);
//! b.set(64);
//! assert_eq!(b.runs().collect::<Vec<_>>(), vec![(10, 5), (64, 1)]);
//! ```

mod bitmap;
mod dirty;
mod error;
pub mod flat;
mod layout;
mod region;

pub use bitmap::{PageBitmap, Runs};
pub use dirty::DirtyBitmap;
pub use error::{Error, Result};
pub use layout::{GuestLayout, GuestRegion};
pub use region::{Mapping, Region};

/// Guest memory as the VMM maps it: vm-memory's mmap regions, each with a dirty bitmap
/// ([`DirtyBitmap`]) that every write through it marks.
pub type GuestMemory = vm_memory::GuestMemoryMmap<DirtyBitmap>;

/// The page size of dirty tracking, of the RAM cache and of the push path.
pub const PAGE_SIZE: u64 = 4096;
