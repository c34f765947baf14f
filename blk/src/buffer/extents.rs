//! A map of non-overlapping sector extents, each pointing at its data in the
//! [`Store`](super::store::Store).

use std::collections::BTreeMap;

use super::store::Loc;
use crate::sector::SECTOR_SIZE;

/// One buffered extent: `sectors` sectors whose bytes lie contiguously at `loc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub sectors: u64,
    pub loc: Loc,
}

/// Non-overlapping extents keyed by first sector. Dropping every extent is a
/// `BTreeMap::clear`: O(extents), no I/O.
#[derive(Debug, Default)]
pub(crate) struct ExtentMap {
    map: BTreeMap<u64, Extent>,
    sectors: u64,
}

impl ExtentMap {
    /// Number of extents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Sectors covered.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Drops every extent.
    pub fn clear(&mut self) {
        self.map.clear();
        self.sectors = 0;
    }

    /// Every extent in sector order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Extent)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }

    /// Calls `f(first, end, loc)` for each piece of `start..end` in order: `Some(loc)` (the
    /// data of `first`) where an extent covers it, `None` for gaps.
    pub fn walk<E>(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(u64, u64, Option<Loc>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut pos = start;
        if let Some((&s, e)) = self.map.range(..start).next_back() {
            let e_end = s + e.sectors;
            if e_end > start {
                let seg_end = e_end.min(end);
                f(start, seg_end, Some(e.loc.add((start - s) * SECTOR_SIZE)))?;
                pos = seg_end;
            }
        }
        if pos < end {
            for (&s, e) in self.map.range(start..end) {
                if s > pos {
                    f(pos, s, None)?;
                }
                let seg_end = (s + e.sectors).min(end);
                f(s, seg_end, Some(e.loc))?;
                pos = seg_end;
            }
        }
        if pos < end {
            f(pos, end, None)?;
        }
        Ok(())
    }

    /// Inserts an extent over sectors the caller knows are not covered.
    pub fn insert_new(&mut self, start: u64, end: u64, loc: Loc) {
        debug_assert!(start < end);
        let old = self.map.insert(
            start,
            Extent {
                sectors: end - start,
                loc,
            },
        );
        debug_assert!(old.is_none());
        self.sectors += end - start;
    }

    /// The location of an extent that covers exactly `start..end`, if there is one.
    pub fn exact(&self, start: u64, end: u64) -> Option<Loc> {
        self.map
            .get(&start)
            .filter(|e| e.sectors == end - start)
            .map(|e| e.loc)
    }

    /// Makes `start..end` one extent at `loc`, trimming or splitting whatever it
    /// overlaps. Returns the sectors whose old data became unreachable.
    pub fn overwrite(&mut self, start: u64, end: u64, loc: Loc) -> u64 {
        debug_assert!(start < end);
        let mut dead = 0;
        let mut tail = None;
        if let Some((&s, e)) = self.map.range_mut(..start).next_back() {
            let e_end = s + e.sectors;
            if e_end > start {
                e.sectors = start - s;
                dead += e_end.min(end) - start;
                if e_end > end {
                    tail = Some((
                        end,
                        Extent {
                            sectors: e_end - end,
                            loc: e.loc.add((end - s) * SECTOR_SIZE),
                        },
                    ));
                }
            }
        }
        while let Some((&s, _)) = self.map.range(start..end).next() {
            let e = self.map.remove(&s).expect("key just seen");
            let e_end = s + e.sectors;
            if e_end > end {
                dead += end - s;
                tail = Some((
                    end,
                    Extent {
                        sectors: e_end - end,
                        loc: e.loc.add((end - s) * SECTOR_SIZE),
                    },
                ));
            } else {
                dead += e.sectors;
            }
        }
        if let Some((s, e)) = tail {
            self.map.insert(s, e);
        }
        self.map.insert(
            start,
            Extent {
                sectors: end - start,
                loc,
            },
        );
        self.sectors = self.sectors + (end - start) - dead;
        dead
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A per-sector reference: which "write id" and byte position each sector holds.
    fn check(map: &ExtentMap, model: &[Option<(u64, u64)>]) {
        // Reconstruct per sector from the map: Loc::Mem(id << 32 | byte offset).
        let mut got = vec![None; model.len()];
        map.walk(0, model.len() as u64, |a, b, loc| -> Result<(), ()> {
            for s in a..b {
                got[s as usize] = loc.map(|l| {
                    let Loc::Mem(v) = l else { unreachable!() };
                    let v = v + (s - a) * SECTOR_SIZE;
                    (v >> 32, v & 0xFFFF_FFFF)
                });
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(got, model);
        assert_eq!(
            map.sectors(),
            model.iter().filter(|x| x.is_some()).count() as u64
        );
        // Extents never overlap and are never empty.
        let mut last_end = 0;
        for (s, e) in map.iter() {
            assert!(e.sectors > 0);
            assert!(s >= last_end);
            last_end = s + e.sectors;
        }
    }

    proptest! {
        #[test]
        fn overwrite_and_insert_match_a_per_sector_model(
            ops in proptest::collection::vec((0u64..40, 1u64..12, any::<bool>()), 1..40)
        ) {
            let n = 64usize;
            let mut map = ExtentMap::default();
            let mut model: Vec<Option<(u64, u64)>> = vec![None; n];
            for (id, (start, len, fill_gaps)) in ops.into_iter().enumerate() {
                let id = id as u64 + 1;
                let end = (start + len).min(n as u64);
                if fill_gaps {
                    let mut gaps = Vec::new();
                    map.walk(start, end, |a, b, l| -> Result<(), ()> {
                        if l.is_none() { gaps.push((a, b)); }
                        Ok(())
                    }).unwrap();
                    for (a, b) in gaps {
                        map.insert_new(a, b, Loc::Mem(id << 32));
                        for s in a..b {
                            model[s as usize] = Some((id, (s - a) * SECTOR_SIZE));
                        }
                    }
                } else {
                    let before = map.sectors();
                    let dead = map.overwrite(start, end, Loc::Mem(id << 32));
                    let covered = model[start as usize..end as usize].iter().filter(|x| x.is_some()).count() as u64;
                    prop_assert_eq!(dead, covered);
                    prop_assert_eq!(map.sectors(), before + (end - start) - covered);
                    for s in start..end {
                        model[s as usize] = Some((id, (s - start) * SECTOR_SIZE));
                    }
                }
                check(&map, &model);
            }
            map.clear();
            prop_assert_eq!(map.len(), 0);
        }
    }
}
