//! A dirty bitmap: which [`DIRTY_BLOCK`]-byte blocks of a disk were written since it was
//! last taken.
//!
//! Invariants: memory is fixed when the map is created (one bit per block of the capacity,
//! 32 MiB per TiB) whatever is written; a write of any byte of a block marks the whole
//! block; [`DirtyMap::ranges`] yields maximal runs of dirty blocks, ascending, clamped to the
//! capacity, so re-reading them from the disk covers every byte written.

/// Bytes per bit (DESIGN.md: 4 KiB per bit).
pub const DIRTY_BLOCK: u64 = 4096;

#[derive(Debug, Clone)]
pub struct DirtyMap {
    words: Vec<u64>,
    capacity: u64,
    /// Number of set bits, kept so that [`Self::bytes`] is O(1).
    set: u64,
}

impl DirtyMap {
    pub fn new(capacity: u64) -> Self {
        let blocks = capacity.div_ceil(DIRTY_BLOCK);
        DirtyMap {
            words: vec![0; blocks.div_ceil(64) as usize],
            capacity,
            set: 0,
        }
    }

    /// Marks every block touched by `[offset, offset + len)` (clamped to the capacity).
    pub fn mark(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.capacity);
        if len == 0 || offset >= end {
            return;
        }
        for block in offset / DIRTY_BLOCK..end.div_ceil(DIRTY_BLOCK) {
            let (w, bit) = ((block / 64) as usize, block % 64);
            if self.words[w] & (1 << bit) == 0 {
                self.words[w] |= 1 << bit;
                self.set += 1;
            }
        }
    }

    /// Bytes covered by dirty blocks (the last block counted in full).
    pub fn bytes(&self) -> u64 {
        self.set * DIRTY_BLOCK
    }

    pub fn is_empty(&self) -> bool {
        self.set == 0
    }

    /// Returns the current map and leaves an empty one of the same capacity.
    pub fn take(&mut self) -> DirtyMap {
        std::mem::replace(self, DirtyMap::new(self.capacity))
    }

    /// Maximal runs of dirty blocks as `[start, end)` byte ranges, ascending.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let blocks = self.capacity.div_ceil(DIRTY_BLOCK);
        let mut block = 0u64;
        std::iter::from_fn(move || {
            // Skip clean words whole: a mostly clean map is the common case.
            while block < blocks {
                let w = self.words[(block / 64) as usize] >> (block % 64);
                if w == 0 {
                    block = (block / 64 + 1) * 64;
                } else {
                    block += u64::from(w.trailing_zeros());
                    break;
                }
            }
            if block >= blocks {
                return None;
            }
            let start = block;
            while block < blocks && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0 {
                block += 1;
            }
            Some((
                start * DIRTY_BLOCK,
                (block * DIRTY_BLOCK).min(self.capacity),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runs_merge_and_stop_at_the_capacity() {
        let cap = 10 * DIRTY_BLOCK + 512;
        let mut m = DirtyMap::new(cap);
        m.mark(100, 1);
        m.mark(DIRTY_BLOCK, DIRTY_BLOCK + 1);
        m.mark(10 * DIRTY_BLOCK, 1 << 20);
        m.mark(cap + 5, 10);
        assert_eq!(
            m.ranges().collect::<Vec<_>>(),
            vec![(0, 3 * DIRTY_BLOCK), (10 * DIRTY_BLOCK, cap)]
        );
        assert_eq!(m.bytes(), 4 * DIRTY_BLOCK);
        let taken = m.take();
        assert!(m.is_empty() && !taken.is_empty());
        assert_eq!(m.ranges().count(), 0);
    }

    proptest! {
        #[test]
        fn ranges_cover_every_marked_byte_and_only_dirty_blocks(
            writes in proptest::collection::vec((0u64..1 << 20, 1u64..70_000), 0..20)
        ) {
            let cap = 1 << 20;
            let mut m = DirtyMap::new(cap);
            let mut truth = vec![false; (cap / DIRTY_BLOCK) as usize];
            for &(o, l) in &writes {
                m.mark(o, l);
                let end = (o + l).min(cap);
                for b in o / DIRTY_BLOCK..end.div_ceil(DIRTY_BLOCK) {
                    truth[b as usize] = true;
                }
            }
            let mut seen = vec![false; truth.len()];
            let mut last_end = 0;
            for (s, e) in m.ranges() {
                prop_assert!(s >= last_end && e > s && e <= cap);
                last_end = e;
                for b in s / DIRTY_BLOCK..e.div_ceil(DIRTY_BLOCK) {
                    seen[b as usize] = true;
                }
            }
            prop_assert_eq!(seen, truth);
        }
    }
}
