//! The cache mapping, epoch staging and the commit into SVM memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use colo_memory::{GuestLayout, PageBitmap, Region};
use colo_transport::push::EpochCommit;

use crate::error::{Error, Result};
use crate::staging::{Stage, StageStatus, Staging};

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The checkpoint committed (1 for the first).
    pub checkpoint: u64,
    /// The device state to load into the SVM now.
    pub state: Vec<u8>,
    /// Pages copied into SVM memory: |pushed ∪ svm_dirty|.
    pub pages: u64,
    /// Of those, pages the primary pushed.
    pub pushed_pages: u64,
    /// Of those, pages only the SVM had dirtied (reverted to the primary's copy).
    pub reverted_pages: u64,
    /// Contiguous runs copied.
    pub runs: u64,
    /// Time spent copying.
    pub flush: Duration,
}

/// The secondary's RAM cache and the epoch being staged in it.
pub struct RamCache {
    layout: GuestLayout,
    cache: Arc<Region>,
    svm: Vec<Arc<Region>>,
    staging: Staging,
    /// The last push epoch landed (0 before the first).
    last_push: u64,
    /// The last checkpoint committed (0 before the first).
    committed: u64,
    /// Set by an abort: the cache holds uncommitted pages.
    abandoned: bool,
    /// Scratch for the union, kept to avoid an allocation per commit.
    union: PageBitmap,
}

impl std::fmt::Debug for RamCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamCache")
            .field("bytes", &self.layout.bytes())
            .field("committed", &self.committed)
            .field("last_push", &self.last_push)
            .field("abandoned", &self.abandoned)
            .finish_non_exhaustive()
    }
}

impl RamCache {
    /// Maps and pre-faults a cache for `layout` that commits into `svm`, the SVM's memory:
    /// one region per guest region, in the layout's order and of the same lengths.
    ///
    /// The cache starts zeroed. The initial full sync from the primary is an ordinary
    /// epoch whose pushed bitmap has every page set.
    ///
    /// # Errors
    /// [`Error::Layout`] if `svm` does not match the layout, [`Error::Memory`] if the
    /// mapping fails.
    pub fn new(layout: GuestLayout, svm: Vec<Arc<Region>>) -> Result<Self> {
        if svm.len() != layout.regions().len() {
            return Err(Error::Layout(format!(
                "{} SVM regions for {} guest regions",
                svm.len(),
                layout.regions().len()
            )));
        }
        for (i, (r, s)) in layout.regions().iter().zip(&svm).enumerate() {
            if s.len() as u64 != r.len {
                return Err(Error::Layout(format!(
                    "SVM region {i} is {} bytes, guest region at {:#x} is {}",
                    s.len(),
                    r.gpa,
                    r.len
                )));
            }
        }
        let bytes = layout.bytes();
        let started = Instant::now();
        let cache = Region::anonymous(bytes as usize)?;
        tracing::info!(
            bytes,
            huge_pages = cache.huge_pages(),
            prefault_ms = started.elapsed().as_millis() as u64,
            "RAM cache mapped and pre-faulted"
        );
        let pages = layout.pages();
        Ok(Self {
            layout,
            cache: Arc::new(cache),
            svm,
            staging: Staging::new(pages),
            last_push: 0,
            committed: 0,
            abandoned: false,
            union: PageBitmap::new(pages),
        })
    }

    /// The cache mapping: register it as the push transport's receive region. Byte
    /// offsets in it are flat offsets of the guest layout.
    pub fn region(&self) -> &Arc<Region> {
        &self.cache
    }

    /// The guest layout the cache follows.
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// Whether the cache got transparent huge pages.
    pub fn huge_pages(&self) -> bool {
        self.cache.huge_pages()
    }

    /// The last committed checkpoint (0 before the first).
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The last push epoch landed (0 before the first).
    pub fn last_push_epoch(&self) -> u64 {
        self.last_push
    }

    /// How far the staged checkpoint has come.
    pub fn status(&self) -> StageStatus {
        let s = &self.staging;
        StageStatus {
            checkpoint: self.committed + 1,
            push_epochs: s.push_epochs,
            pages: s.pushed.count(),
            sealed: s.sealed,
            state_bytes: s.state.as_ref().map(Vec::len),
            disk_acked: s.disk_acked,
        }
    }

    fn usable(&self) -> Result<()> {
        if self.abandoned {
            Err(Error::Abandoned)
        } else {
            Ok(())
        }
    }

    /// Records a push epoch whose bytes have all landed in the cache (the push receiver's
    /// `next_commit`). Its pages join the staged checkpoint. Several push epochs may make
    /// up one checkpoint (the background push while the primary runs).
    ///
    /// # Errors
    /// [`Error::PushOrder`] for an epoch that is not the next one, [`Error::Memory`] for a
    /// bitmap of another number of pages than the guest (its words were checked where it
    /// was built),
    /// [`Error::Duplicate`] after the seal, [`Error::Abandoned`] after an abort.
    pub fn land(&mut self, commit: &EpochCommit) -> Result<()> {
        self.usable()?;
        if commit.epoch != self.last_push + 1 {
            return Err(Error::PushOrder {
                got: commit.epoch,
                last: self.last_push,
            });
        }
        if self.staging.sealed {
            return Err(self.duplicate(Stage::Pages));
        }
        if commit.bitmap.pages() != self.layout.pages() {
            return Err(colo_memory::Error::BitmapPages {
                found: commit.bitmap.pages(),
                expected: self.layout.pages(),
            }
            .into());
        }
        self.staging.pushed.union_with(&commit.bitmap);
        self.staging.push_epochs += 1;
        self.last_push = commit.epoch;
        tracing::debug!(
            push_epoch = commit.epoch,
            bytes = commit.bytes,
            checkpoint = self.committed + 1,
            "push epoch landed"
        );
        Ok(())
    }

    /// The primary says the checkpoint's pages end with push epoch `through`. It must have
    /// landed.
    ///
    /// # Errors
    /// [`Error::SealMismatch`] if it has not, [`Error::Duplicate`] if already sealed,
    /// [`Error::Abandoned`] after an abort.
    pub fn seal_pages(&mut self, through: u64) -> Result<()> {
        self.usable()?;
        if self.staging.sealed {
            return Err(self.duplicate(Stage::Pages));
        }
        if through != self.last_push {
            return Err(Error::SealMismatch {
                through,
                landed: self.last_push,
            });
        }
        self.staging.sealed = true;
        Ok(())
    }

    /// Stages the checkpoint's whole device state, buffered until the commit.
    ///
    /// # Errors
    /// [`Error::Duplicate`] if state was already staged, [`Error::Abandoned`] after an
    /// abort.
    pub fn stage_state(&mut self, state: Vec<u8>) -> Result<()> {
        self.usable()?;
        if self.staging.state.is_some() {
            return Err(self.duplicate(Stage::State));
        }
        self.staging.state = Some(state);
        Ok(())
    }

    /// Records that the disk acknowledged every write of the checkpoint.
    ///
    /// # Errors
    /// [`Error::Duplicate`] if already recorded, [`Error::Abandoned`] after an abort.
    pub fn stage_disk_acked(&mut self) -> Result<()> {
        self.usable()?;
        if self.staging.disk_acked {
            return Err(self.duplicate(Stage::Disk));
        }
        self.staging.disk_acked = true;
        Ok(())
    }

    fn duplicate(&self, stage: Stage) -> Error {
        Error::Duplicate {
            checkpoint: self.committed + 1,
            stage,
        }
    }

    /// Commits the staged checkpoint: copies cache → SVM memory for exactly the pages in
    /// `pushed ∪ svm_dirty`, then returns the device state to load. Call it with the SVM
    /// paused and `svm_dirty` collected (KVM log and the VMM's own bitmap) since the last
    /// commit.
    ///
    /// # Errors
    /// [`Error::Incomplete`] if a step is missing (nothing is touched, and staging goes
    /// on), [`Error::DirtySize`] for a bitmap of the wrong size, [`Error::Abandoned`] after
    /// an abort.
    pub fn commit(&mut self, svm_dirty: &PageBitmap) -> Result<Committed> {
        self.usable()?;
        if let Some(missing) = self.staging.missing() {
            return Err(Error::Incomplete {
                checkpoint: self.committed + 1,
                missing,
            });
        }
        if svm_dirty.pages() != self.layout.pages() {
            return Err(Error::DirtySize {
                got: svm_dirty.pages(),
                pages: self.layout.pages(),
            });
        }
        let started = Instant::now();
        self.union.clear_all();
        self.union.union_with(&self.staging.pushed);
        let pushed_pages = self.union.count();
        self.union.union_with(svm_dirty);
        let (pages, runs) = self.flush_union()?;
        let flush = started.elapsed();
        let state = self.staging.state.take().unwrap_or_default();
        self.staging.reset();
        self.committed += 1;
        tracing::debug!(
            checkpoint = self.committed,
            pages,
            pushed_pages,
            runs,
            flush_us = flush.as_micros() as u64,
            "checkpoint committed into SVM memory"
        );
        Ok(Committed {
            checkpoint: self.committed,
            state,
            pages,
            pushed_pages,
            reverted_pages: pages - pushed_pages,
            runs,
            flush,
        })
    }

    /// Copies every run of `self.union` from the cache into SVM memory, splitting runs at
    /// region boundaries. Returns (pages, runs).
    fn flush_union(&self) -> Result<(u64, u64)> {
        let ps = self.layout.page_size();
        let regions = self.layout.regions();
        let (mut pages, mut runs) = (0, 0);
        let mut ri = 0;
        for (first, count) in self.union.runs() {
            let mut p = first;
            let end = first + count;
            while p < end {
                // Runs come in ascending order, so the region index only moves forward.
                while p >= self.layout.flat_start(ri) + regions[ri].len / ps {
                    ri += 1;
                }
                let region_start = self.layout.flat_start(ri);
                let region_end = region_start + regions[ri].len / ps;
                let n = end.min(region_end) - p;
                self.svm[ri].copy_from((p - region_start) * ps, &self.cache, p * ps, n * ps)?;
                pages += n;
                runs += 1;
                p += n;
            }
        }
        Ok((pages, runs))
    }

    /// Drops the staged checkpoint (failover mid-epoch). SVM memory is untouched: it is
    /// exactly what the last commit left plus the SVM's own writes. The cache may already
    /// hold pages of the dropped epoch, so it is abandoned: every later call fails with
    /// [`Error::Abandoned`], and a new secondary starts with a new cache and a full sync.
    /// Returns what was dropped.
    pub fn abort(&mut self) -> StageStatus {
        let status = self.status();
        self.staging.reset();
        self.abandoned = true;
        tracing::warn!(
            checkpoint = status.checkpoint,
            pages = status.pages,
            sealed = status.sealed,
            state = status.state_bytes.is_some(),
            disk_acked = status.disk_acked,
            "incomplete checkpoint dropped; SVM memory untouched"
        );
        status
    }
}
