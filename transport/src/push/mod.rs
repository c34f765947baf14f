//! The one-sided page-push model, written once for every backend.
//!
//! 1. The receiver registers a region (its RAM cache) and publishes a [`RegionDesc`]:
//!    address, key, length, page size (and, for TCP, the port to connect to).
//! 2. The sender posts [`WriteRun`]s: a span of its own source region (guest memory) to be
//!    placed at an offset of the remote region.
//! 3. The sender may fence: [`PushSender::fence`] returns once every posted byte has
//!    landed.
//! 4. The sender commits the epoch with the bitmap of pages written; the commit fences by
//!    itself, so an epoch costs one round trip. The receiver's
//!    [`PushReceiver::next_commit`] yields the epoch only after every byte of it landed.
//!
//! The receiver then applies the epoch (the RAM cache flushes into the SVM) and calls
//! [`PushReceiver::release`]. Writes of the next epoch may not land in the region before
//! that: the TCP backend holds them back (backpressure), the test double refuses them, and
//! over RDMA the primary waits for `VmstateLoaded` before it pushes again.

mod pipeline;

use std::time::Duration;

pub use pipeline::{EpochStats, push_epoch, start_epoch};

use colo_memory::PageBitmap;

use crate::error::{Error, Result};

/// A registered receive region, as the sender needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionDesc {
    /// The region's address on the receiver (used by RDMA; informational for TCP).
    pub addr: u64,
    /// The key that grants writes into exactly this region.
    pub key: u64,
    /// Length in bytes.
    pub len: u64,
    /// Page size of the epoch bitmap.
    pub page_size: u32,
    /// Port of the receiver's push listener (TCP, or rdma_cm).
    pub port: u16,
    /// The receiver's endpoint name, where its transport addresses endpoints by name
    /// rather than by port (libfabric's reliable datagram endpoints); empty otherwise.
    pub name: EndpointName,
}

/// An endpoint's transport address as its provider gives it (`fi_getname`): opaque bytes,
/// at most [`EndpointName::MAX`] of them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EndpointName {
    len: u8,
    bytes: [u8; EndpointName::MAX],
}

impl EndpointName {
    /// The longest name carried (libfabric's `FI_NAME_MAX`).
    pub const MAX: usize = 64;

    /// No name.
    pub const EMPTY: Self = Self {
        len: 0,
        bytes: [0; Self::MAX],
    };

    /// A name of these bytes.
    ///
    /// # Errors
    /// [`Error::Protocol`] if longer than [`EndpointName::MAX`].
    pub fn new(bytes: &[u8]) -> Result<Self> {
        let mut n = Self::EMPTY;
        let dst = n.bytes.get_mut(..bytes.len()).ok_or_else(|| {
            Error::Protocol(format!(
                "an endpoint name of {} bytes (at most {} are carried)",
                bytes.len(),
                Self::MAX
            ))
        })?;
        dst.copy_from_slice(bytes);
        n.len = bytes.len() as u8;
        Ok(n)
    }

    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Whether there is no name.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for EndpointName {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl std::fmt::Debug for EndpointName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Printable names (shm's "fi_shm://...") as text, others in hex.
        let b = self.as_bytes();
        if b.iter().all(|c| c.is_ascii_graphic() || *c == 0) {
            let text = String::from_utf8_lossy(b);
            write!(f, "{:?}", text.trim_end_matches('\0'))
        } else {
            b.iter().try_for_each(|c| write!(f, "{c:02x}"))
        }
    }
}

impl RegionDesc {
    /// Pages in the region (a trailing partial page counts as one).
    pub fn pages(&self) -> u64 {
        self.len.div_ceil(u64::from(self.page_size.max(1)))
    }

    /// Words in an epoch bitmap of this region.
    pub fn bitmap_words(&self) -> usize {
        Self::words_for(self.len, self.page_size)
    }

    /// Words in an epoch bitmap of a region of `len` bytes in pages of `page_size` (a
    /// trailing partial page counts as one).
    pub fn words_for(len: u64, page_size: u32) -> usize {
        len.div_ceil(u64::from(page_size.max(1))).div_ceil(64) as usize
    }

    /// Checks a run against this (remote) region and `source`: not empty, and inside
    /// both.
    ///
    /// # Errors
    /// [`Error::Protocol`] for an empty run, [`Error::Memory`] (out of bounds) otherwise.
    pub fn check_run(&self, run: &WriteRun, source: &colo_memory::Region) -> Result<()> {
        if run.len == 0 {
            return Err(Error::Protocol("empty write run".into()));
        }
        source.check(run.src, run.len)?;
        match run.dst.checked_add(run.len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(colo_memory::Error::OutOfBounds {
                offset: run.dst,
                len: run.len,
                region_len: self.len,
            }
            .into()),
        }
    }

    /// Checks that an epoch bitmap covers exactly this region's pages. A [`PageBitmap`]
    /// was checked where it was built, so this is one comparison.
    ///
    /// # Errors
    /// [`Error::Memory`] with `BitmapPages` otherwise.
    pub fn check_bitmap(&self, bitmap: &PageBitmap) -> Result<()> {
        if bitmap.pages() != self.pages() {
            return Err(colo_memory::Error::BitmapPages {
                found: bitmap.pages(),
                expected: self.pages(),
            }
            .into());
        }
        Ok(())
    }

    /// Turns the words of an epoch bitmap that came over the wire into a [`PageBitmap`] of
    /// this region: the one place such words are checked.
    ///
    /// # Errors
    /// [`Error::Memory`] with `BitmapSize` or `BitmapExcess`.
    pub fn bitmap_from_words(&self, words: Vec<u64>) -> Result<PageBitmap> {
        Ok(PageBitmap::from_words(words, self.pages())?)
    }
}

/// One write: `len` bytes from the sender's source region at `src` to the receiver's
/// region at `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRun {
    /// Offset in the sender's source region.
    pub src: u64,
    /// Offset in the receiver's region.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

impl WriteRun {
    /// A run of `count` pages starting at page `first`, at the same offset on both sides
    /// (the usual case: guest memory to a RAM cache of the same layout).
    pub fn pages(first: u64, count: u64, page_size: u32) -> Self {
        let ps = u64::from(page_size);
        Self {
            src: first * ps,
            dst: first * ps,
            len: count * ps,
        }
    }
}

/// A complete epoch, as the receiver learns of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochCommit {
    /// The epoch number (1 for the first).
    pub epoch: u64,
    /// The pages the sender wrote in this epoch, one bit per page of the region.
    pub bitmap: PageBitmap,
    /// Payload bytes that landed in this epoch.
    pub bytes: u64,
}

/// The sending side of the push model.
pub trait PushSender: Send {
    /// The remote region this sender writes into.
    fn remote(&self) -> &RegionDesc;

    /// The open epoch: the one that posts now belong to.
    fn epoch(&self) -> u64;

    /// Posts writes of the open epoch. They may still be in flight when this returns.
    ///
    /// # Errors
    /// [`Error::Memory`] (out of bounds) for a run outside either region (nothing of it is posted),
    /// or the backend's transport error.
    fn post(&mut self, runs: &[WriteRun]) -> Result<()>;

    /// Returns once every write posted so far has landed in the remote region.
    ///
    /// # Errors
    /// The first transport error of any posted write; the sender is closed after it.
    fn fence(&mut self) -> Result<()>;

    /// Commits the open epoch with the bitmap of pages written. The commit fences by itself:
    /// the receiver sees the epoch only once every write posted before it has landed
    /// (TCP: the epoch end follows the data on every stream; verbs: the commit is posted
    /// after the last data write completes). Returns the committed epoch; the next one
    /// opens.
    ///
    /// # Errors
    /// [`Error::Memory`] for a bitmap of another number of pages than the region, or a
    /// transport error.
    fn commit(&mut self, bitmap: &PageBitmap) -> Result<u64>;

    /// Sends the commit of the open epoch like [`commit`](Self::commit), but does not wait
    /// for the receiver's acknowledgement, so that the caller can overlap that round trip
    /// with other work; [`finish_commit`](Self::finish_commit) waits for it. The next
    /// epoch opens at once (its posts go out after the acknowledgement). The source pages
    /// of the epoch must not change until `finish_commit` returns: they may still be on
    /// their way. A backend without such a round trip commits fully here (the default).
    ///
    /// # Errors
    /// As [`commit`](Self::commit).
    fn start_commit(&mut self, bitmap: &PageBitmap) -> Result<u64> {
        self.commit(bitmap)
    }

    /// Waits for the acknowledgement of the commit [`start_commit`](Self::start_commit)
    /// sent; returns at once if there is none.
    ///
    /// # Errors
    /// A transport error or a timeout; the sender is closed after it.
    fn finish_commit(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The receiving side of the push model.
pub trait PushReceiver: Send {
    /// The region this receiver exposes.
    fn desc(&self) -> &RegionDesc;

    /// Waits for the next complete epoch. Every byte of it has landed when this returns.
    ///
    /// # Errors
    /// [`Error::Timeout`] if none completes in `timeout` (the receiver stays usable), or the
    /// error that closed the transport.
    fn next_commit(&mut self, timeout: Duration) -> Result<EpochCommit>;

    /// Says that `epoch` has been applied, so the next epoch's writes may land.
    ///
    /// # Errors
    /// [`Error::Protocol`] if `epoch` is not the last committed one.
    fn release(&mut self, epoch: u64) -> Result<()>;
}

impl<T: PushSender + ?Sized> PushSender for Box<T> {
    fn remote(&self) -> &RegionDesc {
        (**self).remote()
    }
    fn epoch(&self) -> u64 {
        (**self).epoch()
    }
    fn post(&mut self, runs: &[WriteRun]) -> Result<()> {
        (**self).post(runs)
    }
    fn fence(&mut self) -> Result<()> {
        (**self).fence()
    }
    fn commit(&mut self, bitmap: &PageBitmap) -> Result<u64> {
        (**self).commit(bitmap)
    }
    fn start_commit(&mut self, bitmap: &PageBitmap) -> Result<u64> {
        (**self).start_commit(bitmap)
    }
    fn finish_commit(&mut self) -> Result<()> {
        (**self).finish_commit()
    }
}

impl<T: PushReceiver + ?Sized> PushReceiver for Box<T> {
    fn desc(&self) -> &RegionDesc {
        (**self).desc()
    }
    fn next_commit(&mut self, timeout: Duration) -> Result<EpochCommit> {
        (**self).next_commit(timeout)
    }
    fn release(&mut self, epoch: u64) -> Result<()> {
        (**self).release(epoch)
    }
}

/// A random key from the OS (a region key, an rkey of the double).
pub(crate) fn random_key() -> u64 {
    let mut k = [0u8; 8];
    match getrandom::fill(&mut k) {
        Ok(()) => u64::from_ne_bytes(k),
        // The OS has no randomness to give (not on Linux since 3.17): keep a usable key.
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(len: u64) -> RegionDesc {
        RegionDesc {
            addr: 0,
            key: 1,
            len,
            page_size: 4096,
            port: 0,
            name: crate::push::EndpointName::EMPTY,
        }
    }

    #[test]
    fn bitmap_must_fit_the_region() {
        let d = desc(70 * 4096);
        assert_eq!(d.bitmap_words(), 2);
        let b = d.bitmap_from_words(vec![u64::MAX, 0b11_1111]).unwrap();
        d.check_bitmap(&b).unwrap();
        assert!(matches!(
            d.bitmap_from_words(vec![0]),
            Err(Error::Memory(colo_memory::Error::BitmapSize {
                found: 1,
                expected: 2,
                pages: 70
            }))
        ));
        assert!(matches!(
            d.bitmap_from_words(vec![0, 1 << 6]),
            Err(Error::Memory(colo_memory::Error::BitmapExcess {
                pages: 70
            }))
        ));
        assert!(matches!(
            desc(128 * 4096).check_bitmap(&b),
            Err(Error::Memory(colo_memory::Error::BitmapPages {
                found: 70,
                expected: 128
            }))
        ));
    }
}
