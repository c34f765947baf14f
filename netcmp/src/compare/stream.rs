//! One side's TCP byte stream from the compare point onward, with out-of-order pieces.

use super::seq;

/// Pieces further ahead of the compare point than this are not buffered: no TCP window
/// reaches that far (the largest is 2^30 bytes).
const MAX_AHEAD: i64 = 1 << 30;

/// What happened to bytes offered to a [`StreamBuf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placed {
    /// Every byte was already known (before the compare point or already buffered): a
    /// retransmission.
    Old,
    /// New bytes extended the contiguous stream.
    New,
    /// The bytes lie after a hole and wait for it to fill.
    OutOfOrder,
    /// The bytes lie too far ahead to belong to this stream.
    TooFar,
}

/// The bytes of one side's stream that follow the compare point, contiguous ones in `data`
/// (from `head`) and pieces after a hole in `ooo`, keyed by absolute sequence number.
#[derive(Debug, Default)]
pub(crate) struct StreamBuf {
    data: Vec<u8>,
    head: usize,
    ooo: Vec<(u32, Vec<u8>)>,
}

impl StreamBuf {
    /// Contiguous bytes available from the compare point.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.data.get(self.head..).unwrap_or_default()
    }

    /// How many contiguous bytes follow the compare point.
    pub(crate) fn avail(&self) -> usize {
        self.data.len().saturating_sub(self.head)
    }

    /// Pieces waiting behind a hole.
    pub(crate) fn ooo_len(&self) -> usize {
        self.ooo.len()
    }

    /// Bytes held, contiguous and out of order.
    pub(crate) fn held_bytes(&self) -> usize {
        self.avail() + self.ooo.iter().map(|(_, b)| b.len()).sum::<usize>()
    }

    /// Places `bytes`, which start at sequence number `at`, given compare point `cmp`.
    /// Holds at most `cap` bytes: what would go past it is refused as [`Placed::TooFar`].
    pub(crate) fn insert(&mut self, cmp: u32, at: u32, bytes: &[u8], cap: usize) -> Placed {
        if bytes.is_empty() {
            return Placed::Old;
        }
        if self.held_bytes().saturating_add(bytes.len()) > cap {
            return Placed::TooFar;
        }
        let rel = seq::dist(cmp, at);
        let (rel, bytes) = if rel < 0 {
            let skip = usize::try_from(-rel).unwrap_or(usize::MAX);
            match bytes.get(skip..) {
                Some(rest) if !rest.is_empty() => (0usize, rest),
                _ => return Placed::Old,
            }
        } else if rel > MAX_AHEAD {
            return Placed::TooFar;
        } else {
            (rel as usize, bytes)
        };
        let have = self.avail();
        if rel <= have {
            let fresh = have - rel;
            match bytes.get(fresh..) {
                Some(rest) if !rest.is_empty() => self.data.extend_from_slice(rest),
                _ => return Placed::Old,
            }
            self.merge(cmp);
            Placed::New
        } else {
            self.ooo
                .push((cmp.wrapping_add(rel as u32), bytes.to_vec()));
            Placed::OutOfOrder
        }
    }

    /// Moves out-of-order pieces that now touch the contiguous bytes into them.
    fn merge(&mut self, cmp: u32) {
        loop {
            let have = self.avail() as i64;
            let Some(i) = self
                .ooo
                .iter()
                .position(|(at, _)| seq::dist(cmp, *at) <= have)
            else {
                return;
            };
            let (at, piece) = self.ooo.swap_remove(i);
            let skip = have - seq::dist(cmp, at);
            if let Some(rest) = usize::try_from(skip).ok().and_then(|s| piece.get(s..)) {
                self.data.extend_from_slice(rest);
            }
        }
    }

    /// Drops `n` bytes from the front (they have been compared).
    pub(crate) fn consume(&mut self, n: usize) {
        self.head = (self.head + n).min(self.data.len());
        if self.head == self.data.len() {
            self.data.clear();
            self.head = 0;
        } else if self.head >= 64 * 1024 && self.head * 2 >= self.data.len() {
            self.data.drain(..self.head);
            self.head = 0;
        }
    }

    /// Drops everything. Keeps the allocation.
    pub(crate) fn clear(&mut self) {
        self.data.clear();
        self.head = 0;
        self.ooo.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_overlap_and_holes() {
        let mut b = StreamBuf::default();
        let max = usize::MAX;
        let base = u32::MAX - 2; // crosses the wrap
        assert_eq!(b.insert(base, base, b"abc", max), Placed::New);
        let at = |n: u32| base.wrapping_add(n);
        assert_eq!(b.insert(base, at(6), b"ghi", max), Placed::OutOfOrder);
        assert_eq!(b.insert(base, at(1), b"bc", max), Placed::Old);
        assert_eq!(b.insert(base, at(2), b"cdef", max), Placed::New);
        assert_eq!(b.bytes(), b"abcdefghi");
        assert_eq!(b.ooo_len(), 0);
        b.consume(4);
        let cmp = at(4);
        assert_eq!(b.bytes(), b"efghi");
        assert_eq!(b.insert(cmp, base, b"abcd", max), Placed::Old);
        assert_eq!(b.insert(cmp, base, b"abcdefghij", max), Placed::New);
        assert_eq!(b.bytes(), b"efghij");
        assert_eq!(
            b.insert(cmp, cmp.wrapping_add(1 << 31), b"x", max),
            Placed::Old
        );
        let far = cmp.wrapping_add((1 << 30) + 1);
        assert_eq!(b.insert(cmp, far, b"x", max), Placed::TooFar);
        // The byte cap: six bytes held, room for two more.
        assert_eq!(
            b.insert(cmp, cmp.wrapping_add(6), b"klm", 8),
            Placed::TooFar
        );
        assert_eq!(b.insert(cmp, cmp.wrapping_add(6), b"kl", 8), Placed::New);
    }
}
