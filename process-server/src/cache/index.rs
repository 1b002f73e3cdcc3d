//! In-memory index of the cache log: disk -> seq -> where the record lies, and per segment
//! which disks it holds up to which seq (to know when a segment may be deleted).
//!
//! Rebuilt from the segments on every start; never persisted. Entries at or below a disk's
//! applied seq are pruned as acks arrive (they will never be read again), while the per-segment
//! summary keeps each disk's highest seq until the segment itself is deleted.

use std::collections::{BTreeMap, HashMap};

/// Where one record lies in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub segment: u64,
    /// Offset of the record header in the segment file.
    pub offset: u64,
    /// Bytes of the whole record (header included).
    pub len: u32,
    /// Source time of the batch (for RPO).
    pub time_unix_ms: i64,
}

/// What one segment holds.
#[derive(Debug, Default, Clone)]
pub struct SegmentUse {
    /// Bytes of the segment file.
    pub bytes: u64,
    /// Highest seq of each disk with a record in the segment.
    pub max_seq: HashMap<String, u64>,
}

#[derive(Debug, Default)]
pub struct Index {
    disks: HashMap<String, BTreeMap<u64, Loc>>,
    segments: BTreeMap<u64, SegmentUse>,
}

impl Index {
    /// Records that `(disk, seq)` lies at `loc`.
    pub fn insert(&mut self, disk: &str, seq: u64, loc: Loc) {
        self.disks
            .entry(disk.to_string())
            .or_default()
            .insert(seq, loc);
        self.note_segment(disk, seq, loc.segment, loc.offset + u64::from(loc.len));
    }

    /// Records that segment `segment` exists and is at least `end` bytes long.
    pub fn note_segment_len(&mut self, segment: u64, end: u64) {
        let s = self.segments.entry(segment).or_default();
        s.bytes = s.bytes.max(end);
    }

    fn note_segment(&mut self, disk: &str, seq: u64, segment: u64, end: u64) {
        self.note_segment_len(segment, end);
        let s = self.segments.get_mut(&segment).expect("just inserted");
        let m = s.max_seq.entry(disk.to_string()).or_default();
        *m = (*m).max(seq);
    }

    /// The location of `(disk, seq)`, if cached and not yet pruned.
    pub fn get(&self, disk: &str, seq: u64) -> Option<Loc> {
        self.disks.get(disk)?.get(&seq).copied()
    }

    /// Seqs of `disk` in the index, ascending.
    pub fn seqs(&self, disk: &str) -> Vec<u64> {
        self.disks
            .get(disk)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Disks with records in the index or in any segment.
    pub fn disk_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.disks.keys().cloned().collect();
        for s in self.segments.values() {
            ids.extend(s.max_seq.keys().cloned());
        }
        ids.sort();
        ids.dedup();
        ids
    }

    /// Disks with a record in `segment`.
    pub fn disks_in_segment(&self, segment: u64) -> Vec<String> {
        self.segments
            .get(&segment)
            .map(|s| s.max_seq.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets the entries of `disk` at or below `applied` (they are applied at the master
    /// target and will not be read again).
    pub fn prune(&mut self, disk: &str, applied: u64) {
        if let Some(m) = self.disks.get_mut(disk) {
            *m = m.split_off(&applied.saturating_add(1));
        }
    }

    /// Record bytes of `disk` above `applied`: what still has to reach the master target.
    pub fn backlog_bytes(&self, disk: &str, applied: u64) -> u64 {
        self.disks
            .get(disk)
            .map(|m| m.range(applied + 1..).map(|(_, l)| u64::from(l.len)).sum())
            .unwrap_or(0)
    }

    /// Sealed segments (below `active`) whose every record is at or below the persisted
    /// applied floor of its disk. `floor` returns `None` for a disk whose records must be
    /// kept (unknown disk).
    pub fn deletable(&self, active: u64, floor: impl Fn(&str) -> Option<u64>) -> Vec<u64> {
        self.segments
            .range(..active)
            .filter(|(_, s)| {
                s.max_seq
                    .iter()
                    .all(|(d, &max)| floor(d).is_some_and(|f| max <= f))
            })
            .map(|(&seq, _)| seq)
            .collect()
    }

    /// Forgets a deleted segment; returns its size.
    pub fn remove_segment(&mut self, segment: u64) -> u64 {
        self.segments.remove(&segment).map_or(0, |s| s.bytes)
    }

    /// Number of segments and their total bytes.
    pub fn segment_usage(&self) -> (usize, u64) {
        (
            self.segments.len(),
            self.segments.values().map(|s| s.bytes).sum(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(segment: u64, offset: u64) -> Loc {
        Loc {
            segment,
            offset,
            len: 100,
            time_unix_ms: 0,
        }
    }

    #[test]
    fn a_segment_is_deletable_only_when_every_disk_in_it_is_applied() {
        let mut ix = Index::default();
        ix.insert("a", 1, loc(1, 32));
        ix.insert("b", 1, loc(1, 132));
        ix.insert("a", 2, loc(2, 32));
        let floors = |a: u64, b: u64| {
            move |d: &str| match d {
                "a" => Some(a),
                "b" => Some(b),
                _ => None,
            }
        };
        assert!(ix.deletable(3, floors(1, 0)).is_empty());
        assert_eq!(ix.deletable(3, floors(1, 1)), vec![1]);
        // The active segment is never deletable.
        assert_eq!(ix.deletable(2, floors(2, 1)), vec![1]);
        assert_eq!(ix.remove_segment(1), 232);
    }

    #[test]
    fn prune_drops_applied_entries_and_backlog_counts_the_rest() {
        let mut ix = Index::default();
        for s in 1..=5 {
            ix.insert("a", s, loc(1, 32 + 100 * s));
        }
        assert_eq!(ix.backlog_bytes("a", 2), 300);
        ix.prune("a", 3);
        assert_eq!(ix.seqs("a"), vec![4, 5]);
        assert!(ix.get("a", 3).is_none());
    }
}
