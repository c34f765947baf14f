//! Hot pages kept writable.
//!
//! Under manual dirty-log protection a page is write-protected again only when its bit is
//! cleared (`KVM_CLEAR_DIRTY_LOG`); a page whose bit is left set stays writable and keeps
//! being reported dirty by every `KVM_GET_DIRTY_LOG`. Every first write to a cleared page
//! costs the guest a write-protect fault (6-15 us on the hosts this project runs on), so a
//! page the guest rewrites all the time (a stack, a counter, a buffer) costs one fault per
//! collection, and the background push rounds collect every few milliseconds.
//!
//! [`HotPages`] decides, at each collection, which pages to leave set: those set in the log
//! now that were dirty in each of the last [`HotPolicy::after`]` - 1` epochs (an epoch is
//! the time between two checkpoint collections, background rounds included: a page
//! rewritten every 40 ms is dirty in every 100 ms epoch but not in every 10 ms round), up
//! to [`HotPolicy::budget_pages`]. Such a page is then:
//! - left out of a background round (it is dirty by definition until the checkpoint, and
//!   pushing it earlier would only push it twice);
//! - in every checkpoint's set, since its bit is still set: it is pushed at every
//!   checkpoint whether the guest wrote it or not (the price: its bytes in the pause);
//! - cleared again every [`HotPolicy::lease`] epochs (all kept pages at once, pushed in
//!   that checkpoint), so a page that cooled off returns to normal tracking, and one that
//!   is still hot is kept again at the next checkpoint.
//!
//! The last push round before a checkpoint can be a [`Collection::Flush`]: it clears and
//! reports the kept pages like any dirty page, while they stay hot. The checkpoint then
//! carries only the hot pages the guest wrote again since that round (their bits are set
//! again, and they are kept again without being cleared), not the whole hot set; a hot page
//! costs at most one fault per epoch, taken in the last moments before the pause; and one
//! the guest did not write again stays write-protected until it is written, then is kept
//! as soon as a round sees it.

/// When pages are kept writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotPolicy {
    /// A page dirty in this many epochs in a row is kept (at least 2).
    pub after: u32,
    /// Most pages kept at once (their bytes go into every checkpoint's pause).
    pub budget_pages: u64,
    /// Every this many epochs, all kept pages are cleared and must qualify again.
    pub lease: u32,
}

impl HotPolicy {
    /// Epochs in a row that make a page hot, by default.
    pub const DEFAULT_AFTER: u32 = 2;
    /// Epochs a page stays kept before it must qualify again, by default (at 100 ms per
    /// checkpoint: 1.6 s, one fault per kept page per lease).
    pub const DEFAULT_LEASE: u32 = 16;
}

/// What a collection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collection {
    /// A push round while the VM runs: hot pages are left out (and left set).
    Background,
    /// The last push round before a checkpoint, while the VM runs: every dirty page, hot
    /// ones too, all cleared; the hot pages stay hot (kept again once written again).
    Flush,
    /// The checkpoint's collection, with the VM paused: every dirty page, hot ones too.
    /// It ends an epoch.
    Checkpoint,
}

/// The state of [`HotPolicy`] over the pages of one guest, as words of 64 flat pages.
#[derive(Debug)]
pub struct HotPages {
    policy: HotPolicy,
    /// The hot pages: kept writable (their bits left set in KVM's log), but for those
    /// cleared by a flush and not written since.
    hot: Vec<u64>,
    hot_count: u64,
    /// The pages dirty in this epoch so far.
    epoch: Vec<u64>,
    /// The dirty pages of the last `after - 1` epochs, a ring; `oldest` is the next to be
    /// overwritten.
    history: Vec<Vec<u64>>,
    oldest: usize,
    /// Epochs since the kept pages were last released.
    since_lease: u32,
    /// The collection in progress: its kind, and whether it releases every kept page (it
    /// then keeps none).
    kind: Collection,
    releasing: bool,
}

impl HotPages {
    /// No page kept yet, over `words` words of 64 flat pages.
    pub fn new(words: usize, policy: HotPolicy) -> Self {
        let after = policy.after.max(2);
        Self {
            policy: HotPolicy { after, ..policy },
            hot: vec![0; words],
            hot_count: 0,
            epoch: vec![0; words],
            history: (1..after).map(|_| vec![0; words]).collect(),
            oldest: 0,
            since_lease: 0,
            kind: Collection::Background,
            releasing: false,
        }
    }

    /// Hot pages now (kept writable, but for those flushed and not written since).
    pub fn kept(&self) -> u64 {
        self.hot_count
    }

    /// The hot pages, as words of 64 flat pages.
    pub fn kept_words(&self) -> &[u64] {
        &self.hot
    }

    /// Starts a collection of `kind`. If it is a checkpoint's and the lease of the kept
    /// pages ran out, they are all released: this collection clears them in KVM and
    /// reports them like any dirty page, and keeps no page (the next checkpoint keeps again
    /// those written since). Returns how many were released.
    pub fn begin(&mut self, kind: Collection) -> u64 {
        self.kind = kind;
        self.releasing = false;
        if kind != Collection::Checkpoint {
            return 0;
        }
        self.since_lease += 1;
        if self.since_lease < self.policy.lease.max(1) {
            return 0;
        }
        self.releasing = true;
        self.since_lease = 0;
        self.hot.fill(0);
        std::mem::take(&mut self.hot_count)
    }

    /// Takes the log of one slot read in this collection, `log` (bit `j` of word `i` is
    /// flat page `64 * (word + i) + j`): keeps the pages set in it that were dirty in each
    /// of the last [`HotPolicy::after`]` - 1` epochs (within the budget), adds it to the
    /// epoch's pages, and at a checkpoint ends the epoch. Then removes the kept pages from
    /// `log`, which is left holding the bits to clear in KVM. Returns the kept pages of the
    /// slot, word by word (all of them in KVM's log).
    ///
    /// Call it for every slot of a collection, after [`Self::begin`] and before
    /// [`Self::end`], so that the history covers every page.
    pub fn take_slot(&mut self, word: usize, log: &mut [u64]) -> Vec<u64> {
        let mut kept = vec![0u64; log.len()];
        for (i, (w, k)) in log.iter_mut().zip(kept.iter_mut()).enumerate() {
            let at = word + i;
            let (Some(hot), Some(epoch)) = (self.hot.get_mut(at), self.epoch.get_mut(at)) else {
                continue;
            };
            *epoch |= *w;
            // Set now (so dirty in this epoch) and dirty in each remembered epoch.
            let mut qualified = *w;
            for h in &self.history {
                qualified &= h.get(at).copied().unwrap_or(0);
            }
            if self.kind == Collection::Checkpoint {
                // The epoch ends: it replaces the oldest of the ring (read above for this
                // word, not needed any more).
                let this = std::mem::take(epoch);
                if let Some(slot) = self
                    .history
                    .get_mut(self.oldest)
                    .and_then(|h| h.get_mut(at))
                {
                    *slot = this;
                }
            }
            let flush = self.kind == Collection::Flush;
            let mut new = if self.releasing || flush {
                0
            } else {
                qualified & !*hot
            };
            while new != 0 && self.hot_count < self.policy.budget_pages {
                let bit = new & new.wrapping_neg();
                new &= !bit;
                *hot |= bit;
                self.hot_count += 1;
            }
            // A kept page's bit is not cleared (but by a flush), so it is in the log; the
            // `&` leaves out a hot page flushed and not written since (write-protected,
            // not dirty), and keeps a log without it from being reported kept.
            *k = if flush { 0 } else { *hot & *w };
            *w &= !*k;
        }
        kept
    }

    /// Ends a collection: after a checkpoint's, the epoch joins the history.
    pub fn end(&mut self) {
        if self.kind == Collection::Checkpoint {
            self.oldest = (self.oldest + 1) % self.history.len().max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(after: u32, budget_pages: u64, lease: u32) -> HotPolicy {
        HotPolicy {
            after,
            budget_pages,
            lease,
        }
    }

    /// One collection of `kind` over one slot of two words: (bits to clear, kept,
    /// released).
    fn collect(h: &mut HotPages, kind: Collection, log: [u64; 2]) -> ([u64; 2], [u64; 2], u64) {
        let released = h.begin(kind);
        let mut l = log;
        let k = h.take_slot(0, &mut l);
        h.end();
        (l, [k[0], k[1]], released)
    }

    fn checkpoint(h: &mut HotPages, log: [u64; 2]) -> ([u64; 2], [u64; 2]) {
        let (l, k, _) = collect(h, Collection::Checkpoint, log);
        (l, k)
    }

    #[test]
    fn a_page_dirty_in_k_epochs_in_a_row_is_kept_and_the_rest_cleared() {
        let mut h = HotPages::new(2, policy(3, 100, 1000));
        // Page 0 every epoch, page 1 every other one, page 64 twice then never.
        assert_eq!(checkpoint(&mut h, [0b11, 1]), ([0b11, 1], [0, 0]));
        assert_eq!(checkpoint(&mut h, [0b01, 1]), ([0b01, 1], [0, 0]));
        // Third in a row for page 0: kept (not cleared); page 64 was not in this log.
        assert_eq!(checkpoint(&mut h, [0b11, 0]), ([0b10, 0], [0b01, 0]));
        assert_eq!(h.kept(), 1);
        // It stays kept while its bit stays set (KVM keeps reporting it), and background
        // rounds leave it out.
        let (clear, kept, _) = collect(&mut h, Collection::Background, [0b101, 0]);
        assert_eq!((clear, kept), ([0b100, 0], [0b01, 0]));
        assert_eq!(checkpoint(&mut h, [0b01, 0]), ([0, 0], [0b01, 0]));
    }

    #[test]
    fn an_epoch_counts_the_writes_of_its_background_rounds() {
        let mut h = HotPages::new(2, policy(2, 100, 1000));
        // Pages 3 and 4 are written in a background round of the first epoch only (absent
        // from its checkpoint's log); page 5 in no round but the checkpoint's.
        collect(&mut h, Collection::Background, [1 << 3 | 1 << 4, 0]);
        checkpoint(&mut h, [1 << 5, 0]);
        // Written again in a round of the next epoch: pages 3 and 5 were dirty in the last
        // epoch, so they are kept at once; page 6 was not.
        let (clear, kept, _) = collect(
            &mut h,
            Collection::Background,
            [1 << 3 | 1 << 5 | 1 << 6, 0],
        );
        assert_eq!((clear, kept), ([1 << 6, 0], [1 << 3 | 1 << 5, 0]));
        assert_eq!(h.kept(), 2);
        // Their bits stay set: the checkpoint has them.
        assert_eq!(
            checkpoint(&mut h, [1 << 3 | 1 << 5, 0]),
            ([0, 0], [1 << 3 | 1 << 5, 0])
        );
    }

    #[test]
    fn a_flush_clears_the_hot_pages_which_stay_hot_and_are_kept_again_when_written() {
        let mut h = HotPages::new(2, policy(2, 100, 1000));
        checkpoint(&mut h, [0b11, 0]);
        assert_eq!(checkpoint(&mut h, [0b11, 0]), ([0, 0], [0b11, 0]));
        // A background round keeps them; the flush clears and reports them, keeps none,
        // and takes no new page in (page 2 is dirty in the last epoch too, from now on).
        assert_eq!(
            collect(&mut h, Collection::Background, [0b111, 0]),
            ([0b100, 0], [0b11, 0], 0)
        );
        assert_eq!(
            collect(&mut h, Collection::Flush, [0b111, 0]),
            ([0b111, 0], [0, 0], 0)
        );
        assert_eq!(h.kept(), 2);
        // Pages 0 and 2 are written again before the checkpoint: page 0 is in the pause,
        // kept at once; page 2 is cleared (it was not dirty in the last epoch); page 1
        // stays hot (write-protected, not in the pause).
        assert_eq!(checkpoint(&mut h, [0b101, 0]), ([0b100, 0], [0b1, 0]));
        assert_eq!(h.kept(), 2);
        // In the next epoch, page 1 is kept by a background round without a clearing, and
        // page 2 qualifies.
        assert_eq!(
            collect(&mut h, Collection::Background, [0b111, 0]),
            ([0, 0], [0b111, 0], 0)
        );
        // A flush does not count toward the lease.
        for _ in 0..10 {
            collect(&mut h, Collection::Flush, [0, 0]);
        }
        assert_eq!(h.kept(), 3);
    }

    #[test]
    fn the_budget_caps_what_is_kept() {
        let mut h = HotPages::new(2, policy(2, 3, 1000));
        checkpoint(&mut h, [u64::MAX, u64::MAX]);
        let (clear, kept) = checkpoint(&mut h, [u64::MAX, u64::MAX]);
        assert_eq!(h.kept(), 3);
        assert_eq!(kept, [0b111, 0]);
        assert_eq!(clear, [!0b111, u64::MAX]);
    }

    #[test]
    fn at_the_end_of_a_lease_every_kept_page_is_released_and_a_still_hot_one_comes_back() {
        let mut h = HotPages::new(2, policy(2, 10, 4));
        let cp = Collection::Checkpoint;
        assert_eq!(collect(&mut h, cp, [0b11, 0]), ([0b11, 0], [0, 0], 0));
        assert_eq!(collect(&mut h, cp, [0b11, 0]), ([0, 0], [0b11, 0], 0));
        // Background rounds do not count toward the lease.
        for _ in 0..10 {
            collect(&mut h, Collection::Background, [0b11, 0]);
        }
        assert_eq!(collect(&mut h, cp, [0b11, 0]), ([0, 0], [0b11, 0], 0));
        // Fourth epoch: the lease ends; both are released (cleared and reported)...
        assert_eq!(collect(&mut h, cp, [0b11, 0]), ([0b11, 0], [0, 0], 2));
        assert_eq!(h.kept(), 0);
        // ...page 0 is written again and comes straight back, page 1 has cooled off.
        assert_eq!(collect(&mut h, cp, [0b01, 0]), ([0, 0], [0b01, 0], 0));
        assert_eq!(h.kept(), 1);
        assert_eq!(h.kept_words(), [0b01, 0]);
    }

    #[test]
    fn words_outside_the_guest_are_ignored() {
        let mut h = HotPages::new(1, policy(2, 10, 100));
        for _ in 0..3 {
            h.begin(Collection::Checkpoint);
            let mut l = [1, 1];
            let k = h.take_slot(0, &mut l);
            h.end();
            assert_eq!(l[1], 1);
            assert_eq!(k[1], 0);
        }
    }
}
