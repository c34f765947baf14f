//! Reading KVM's dirty log, one memory slot at a time, and merging it with the VMM's own
//! bitmap into one bitmap of the whole guest.
//!
//! With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, `KVM_GET_DIRTY_LOG` only reads the log and
//! `KVM_CLEAR_DIRTY_LOG` clears the bits read and write-protects those pages again; the
//! pages must be copied *after* the clear, so that a write racing the read is either in
//! the copy or logged again. Without the capability, `KVM_GET_DIRTY_LOG` reads and
//! re-protects in one call. The dirty ring is not used: on these hosts it overflows and
//! loses pages for CPL0 guest code (shared/ENVIRONMENT.md).

use std::os::fd::AsRawFd;
use std::sync::{Mutex, PoisonError};

use colo_memory::{GuestLayout, GuestMemory, PAGE_SIZE, PageBitmap};
use kvm_bindings::{
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, kvm_clear_dirty_log,
    kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap,
};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryBackend;

use crate::hot::{Collection, HotPages, HotPolicy};
use crate::{Error, Result};

/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`; kvm-ioctls 0.25 has no wrapper.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xC018_AEC0;

/// Turns on manual dirty-log protection for `vm`. Call it before creating memory slots
/// with dirty logging. Returns whether the capability is on (false where KVM lacks it).
///
/// # Errors
/// [`Error::EnableManualProtect`] if KVM offers the capability but refuses to enable it.
pub fn enable_manual_protect(vm: &VmFd) -> Result<bool> {
    let supported = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
    if supported & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32 == 0 {
        return Ok(false);
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    // Not INITIALLY_SET: a new slot starts with a clear log, so the first collect reports
    // exactly what the guest wrote.
    cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.into();
    vm.enable_cap(&cap).map_err(Error::EnableManualProtect)?;
    Ok(true)
}

/// Clears the bits of `bitmap` (pages `first_page..first_page + num_pages` of `slot`) in
/// KVM's log and write-protects those pages again.
///
/// KVM requires `first_page` to be a multiple of 64, and `num_pages` to be a multiple of
/// 64 or to reach the end of the slot.
///
/// # Errors
/// [`Error::ClearDirtyLog`] with the OS error (EINVAL for a misaligned range or a slot
/// without manual protection).
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &mut [u64],
) -> Result<()> {
    if bitmap.len() < (num_pages as usize).div_ceil(64) {
        return Err(Error::Layout(format!(
            "clear of {num_pages} pages with a bitmap of {} words",
            bitmap.len()
        )));
    }
    let arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `arg` is a valid kvm_clear_dirty_log whose bitmap pointer covers at least
    // `num_pages` bits (checked above) and stays alive for the call; KVM only reads it.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &arg) };
    if r < 0 {
        return Err(Error::ClearDirtyLog {
            slot,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// What one collection found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CollectStats {
    /// Pages KVM logged as written by the guest.
    pub kvm_pages: u64,
    /// Pages the VMM wrote through guest memory (device DMA, virtio rings), as marked by
    /// the memory's own bitmap; some may overlap the KVM ones.
    pub vmm_pages: u64,
    /// Of `kvm_pages`, the hot pages left writable ([`HotPolicy`]): in the output of a
    /// checkpoint's collection, not in that of a background one.
    pub kept_pages: u64,
    /// Hot pages whose lease ended in this collection: cleared and reported like any other.
    pub released_pages: u64,
}

impl CollectStats {
    /// Pages put into the output (some VMM pages may have been KVM pages too).
    pub fn reported(&self, kind: Collection) -> u64 {
        let kept = match kind {
            Collection::Background => self.kept_pages,
            Collection::Flush | Collection::Checkpoint => 0,
        };
        self.kvm_pages - kept + self.vmm_pages
    }
}

/// Collects dirty pages of a guest: KVM's log of every slot plus the dirty bitmap of the
/// guest memory itself, which every write the VMM makes through it marks (KVM does not log
/// those). No device marks pages by hand.
#[derive(Debug)]
pub struct DirtyTracker {
    layout: GuestLayout,
    mem: GuestMemory,
    manual_protect: bool,
    /// Hot pages kept writable, if a policy is set.
    hot: Mutex<Option<HotPages>>,
}

impl DirtyTracker {
    /// A tracker for `mem`, whose region `i` KVM has as slot `i`, created with
    /// `KVM_MEM_LOG_DIRTY_PAGES`. `manual_protect` says whether [`enable_manual_protect`]
    /// succeeded for the VM. Tracking starts now: what the VMM wrote before (loading the
    /// guest) is forgotten.
    ///
    /// # Errors
    /// [`Error::Memory`] for guest memory that does not form a layout.
    pub fn new(mem: GuestMemory, manual_protect: bool) -> Result<Self> {
        let layout = GuestLayout::of_guest(&mem, PAGE_SIZE)?;
        for r in mem.iter() {
            r.get_mmap().bitmap().reset();
        }
        Ok(Self {
            layout,
            mem,
            manual_protect,
            hot: Mutex::new(None),
        })
    }

    /// Keeps hot pages writable under `policy` from the next collection on, or stops
    /// (`None`: the pages kept so far are cleared and reported by the next collection,
    /// since their bits are still set). Returns whether the policy is on: it needs manual
    /// protection, and slots that start on a 64-page boundary of the flat layout.
    pub fn set_hot_policy(&self, policy: Option<HotPolicy>) -> bool {
        let aligned = (0..self.layout.regions().len()).all(|i| self.layout.flat_start(i) % 64 == 0);
        let on = policy.filter(|_| self.manual_protect && aligned);
        let words = self.layout.pages().div_ceil(64) as usize;
        *self.hot.lock().unwrap_or_else(PoisonError::into_inner) =
            on.map(|p| HotPages::new(words, p));
        on.is_some()
    }

    /// Removes the pages kept writable from `out` (a bitmap of [`GuestLayout::pages`]
    /// flat pages).
    pub fn remove_kept(&self, out: &mut PageBitmap) {
        if let Some(h) = self
            .hot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            out.subtract_words(h.kept_words());
        }
    }

    /// Hot pages kept writable now.
    pub fn kept_pages(&self) -> u64 {
        self.hot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, HotPages::kept)
    }

    /// The layout tracked.
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// Whether KVM_CLEAR_DIRTY_LOG is in use.
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// Adds every page written since the last collection to `out` (a bitmap of
    /// [`GuestLayout::pages`] flat pages), and resets the logs so the next collection sees
    /// only later writes; hot pages kept writable are in `out` every time. Copy the pages
    /// after this returns.
    ///
    /// # Errors
    /// [`Error::GetDirtyLog`] or [`Error::ClearDirtyLog`] for a slot KVM refuses,
    /// [`Error::Memory`] for a bitmap that does not cover the guest.
    pub fn collect(&self, vm: &VmFd, out: &mut PageBitmap) -> Result<CollectStats> {
        self.collect_for(vm, out, Collection::Checkpoint)
    }

    /// [`Self::collect`] for `kind`: a [`Collection::Background`] one leaves the hot pages
    /// kept writable out of `out` (they stay dirty, for the checkpoint).
    ///
    /// # Errors
    /// As [`Self::collect`].
    pub fn collect_for(
        &self,
        vm: &VmFd,
        out: &mut PageBitmap,
        kind: Collection,
    ) -> Result<CollectStats> {
        if out.pages() != self.layout.pages() {
            return Err(Error::Memory(colo_memory::Error::BitmapPages {
                found: out.pages(),
                expected: self.layout.pages(),
            }));
        }
        let mut stats = CollectStats::default();
        let mut hot = self.hot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = hot.as_mut() {
            stats.released_pages = h.begin(kind);
        }
        for (i, (r, m)) in self
            .layout
            .regions()
            .iter()
            .zip(self.mem.iter())
            .enumerate()
        {
            let mut log =
                vm.get_dirty_log(r.slot, r.len as usize)
                    .map_err(|source| Error::GetDirtyLog {
                        slot: r.slot,
                        source,
                    })?;
            stats.kvm_pages += count(&log);
            // Every slot goes through the policy, dirty or not: its history covers all.
            let kept = match hot.as_mut() {
                Some(h) => h.take_slot((self.layout.flat_start(i) / 64) as usize, &mut log),
                None => Vec::new(),
            };
            // `log` now holds the pages to clear and report; the kept ones stay set.
            if log.iter().any(|&w| w != 0) {
                if self.manual_protect {
                    let pages = (r.len / self.layout.page_size()) as u32;
                    clear_dirty_log(vm, r.slot, 0, pages, &mut log)?;
                }
                out.or_words_at(self.layout.flat_start(i), &log);
            }
            stats.kept_pages += count(&kept);
            if kind == Collection::Checkpoint && !kept.is_empty() {
                out.or_words_at(self.layout.flat_start(i), &kept);
            }
            // Only words with a mark are swapped (DirtyBitmap::drain_into says why a mark
            // made meanwhile is never lost), straight into `out`.
            stats.vmm_pages += m
                .get_mmap()
                .bitmap()
                .drain_into(out, self.layout.flat_start(i));
        }
        if let Some(h) = hot.as_mut() {
            h.end();
        }
        tracing::trace!(
            kvm = stats.kvm_pages,
            vmm = stats.vmm_pages,
            kept = stats.kept_pages,
            released = stats.released_pages,
            ?kind,
            "dirty pages collected"
        );
        Ok(stats)
    }
}

/// Pages marked in `words`.
fn count(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}
