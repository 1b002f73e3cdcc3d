//! Thinning of old recovery points and compaction of the undo data between the points that
//! remain, in place in a disk's journal (format: journal.rs).
//!
//! Policy ([`RetentionPolicy`]): every point whose batch is at most `thin_after_ms` (2 h)
//! older than the newest batch (source time) is kept; older ones are kept one per
//! `thin_every_ms` (1 h) period, periods aligned on the epoch so the choice never changes
//! once made. Only whole periods older than the horizon are thinned. The point kept in a
//! period is its newest batch carrying an `app` marker, else the newest carrying any
//! marker, else its newest batch.
//!
//! Compaction: going back to a point applies, newest first, every UNDO record above it, so
//! between two consecutive remaining points only the *oldest* before-image of each byte
//! matters. A segment holding a newly thinned batch is rewritten with, per stretch between
//! remaining points, one run of UNDO records holding just those bytes (seq and time of the
//! newest batch merged, at the place of the first record merged, so every undo still
//! precedes its COMMIT and records stay in seq order), and its COMMIT records with the
//! thinned batches flagged and their markers dropped. Segments are rewritten one by one,
//! each on its own: a stretch split over two segments is merged per segment, which is
//! exact because every record of the later segment is above any point in the earlier one.
//!
//! Crash safety: the new segment is written to `.<no>.seg.tmp`, fsynced, renamed over the
//! segment (same number, so record CRCs stay valid) and the directory fsynced. A crash
//! leaves either the old or the new segment, each complete; a reader that opened the old
//! one keeps reading it. Leftover temporary files are removed when the journal opens.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::Path;

use protocol::pb::MarkerKind;

use super::journal::{
    Commit, Entry, JournalError, KIND_COMMIT, KIND_UNDO, Piece, RetentionPolicy, Scanned,
    UNDO_RECORD_DATA, UNDO_RECORD_PIECES, UndoInfo, encode_header, encode_record, io_err,
    read_undo, scan, segment_path, segment_tmp_path, sync_dir, sync_err, undo_payload,
};

/// What one thinning pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compacted {
    /// Batches that stopped being points.
    pub thinned: usize,
    /// (segment number, new length) of each rewritten segment.
    pub rewritten: Vec<(u64, u64)>,
    /// Journal bytes freed.
    pub bytes_saved: u64,
}

/// The thinnable period a batch of source time `ms` falls in, if whole periods up to it are
/// older than `horizon_ms`.
fn period(ms: i64, horizon_ms: i64, every_ms: i64) -> Option<i64> {
    let p = ms.div_euclid(every_ms);
    ((p + 1).saturating_mul(every_ms) <= horizon_ms).then_some(p)
}

/// Thins the points of the journal in `dir` (segments `nos`, ascending; the last is the
/// active one, which must end with a COMMIT) as `policy` says, relative to the newest
/// batch at `newest_unix_ms`, and compacts the segments that held the thinned ones.
pub fn thin(
    dir: &Path,
    nos: &[u64],
    newest_unix_ms: i64,
    policy: &RetentionPolicy,
) -> Result<Compacted, JournalError> {
    let horizon = newest_unix_ms.saturating_sub(policy.thin_after_ms);
    let every = policy.thin_every_ms.max(1);
    let segments = nos
        .iter()
        .map(|&no| scan(dir, no, Some(&no) == nos.last(), false).map(|s| (no, s)))
        .collect::<Result<Vec<_>, _>>()?;
    // Per period: (rank, seq) of the point to keep; rank prefers app markers, then any.
    let mut best: HashMap<i64, ((bool, bool, u64), u64)> = HashMap::new();
    let mut candidates: Vec<(u64, i64)> = Vec::new();
    for c in segments.iter().flat_map(|(_, s)| commits(s)) {
        for b in c.batches.iter().filter(|b| b.is_point()) {
            let Some(p) = period(b.batch_unix_ms, horizon, every) else {
                continue;
            };
            let markers = c.markers.iter().filter(|m| m.seq == b.seq);
            let app = markers
                .clone()
                .any(|m| m.marker.kind == MarkerKind::App as i32);
            let rank = (app, markers.count() > 0, b.seq);
            let e = best.entry(p).or_insert((rank, b.seq));
            if rank > e.0 {
                *e = (rank, b.seq);
            }
            candidates.push((b.seq, p));
        }
    }
    let thinned: HashSet<u64> = candidates
        .iter()
        .filter(|(seq, p)| best[p].1 != *seq)
        .map(|(seq, _)| *seq)
        .collect();
    let mut done = Compacted {
        thinned: thinned.len(),
        ..Compacted::default()
    };
    if thinned.is_empty() {
        return Ok(done);
    }
    let mut kept: Vec<u64> = segments
        .iter()
        .flat_map(|(_, s)| commits(s))
        .flat_map(|c| &c.batches)
        .filter(|b| b.is_point() && !thinned.contains(&b.seq))
        .map(|b| b.seq)
        .collect();
    kept.sort_unstable();
    for (no, s) in &segments {
        let touched = commits(s)
            .flat_map(|c| &c.batches)
            .any(|b| thinned.contains(&b.seq));
        if touched {
            let len = rewrite(dir, *no, s, &thinned, &kept)?;
            done.bytes_saved += s.len.saturating_sub(len);
            done.rewritten.push((*no, len));
        }
    }
    Ok(done)
}

fn commits(s: &Scanned) -> impl Iterator<Item = &Commit> {
    s.entries.iter().filter_map(|(e, _)| match e {
        Entry::Commit(c) => Some(c),
        Entry::Undo(_) => None,
    })
}

/// Writes segment `no` anew (see the module docs); returns its new length.
fn rewrite(
    dir: &Path,
    no: u64,
    s: &Scanned,
    thinned: &HashSet<u64>,
    kept: &[u64],
) -> Result<u64, JournalError> {
    // The stretch of an undo record: index of the first remaining point at or above it.
    let stretch = |seq: u64| kept.partition_point(|&k| k < seq);
    let mut groups: BTreeMap<usize, Vec<&UndoInfo>> = BTreeMap::new();
    for (e, _) in &s.entries {
        if let Entry::Undo(u) = e {
            groups.entry(stretch(u.seq)).or_default().push(u);
        }
    }
    let mut out = encode_header(s.base_seq, s.created_unix_ms).to_vec();
    let mut emitted = HashSet::new();
    for (e, _) in &s.entries {
        match e {
            Entry::Undo(u) => {
                let k = stretch(u.seq);
                if emitted.insert(k) {
                    merge(s, no, &groups[&k], &mut out)?;
                }
            }
            Entry::Commit(c) => {
                let mut c = c.clone();
                for b in &mut c.batches {
                    b.thinned |= thinned.contains(&b.seq);
                }
                c.markers.retain(|m| !thinned.contains(&m.seq));
                let mut p = Vec::new();
                c.encode(&mut p);
                encode_record(no, KIND_COMMIT, &p, &mut out);
            }
        }
    }
    let tmp = segment_tmp_path(dir, no);
    let path = segment_path(dir, no);
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(&out).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(sync_err("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
    sync_dir(dir)?;
    Ok(out.len() as u64)
}

/// Appends to `out` the UNDO records holding, per byte `undos` (oldest first) cover, the
/// oldest before-image, under the seq and time of the newest of them.
fn merge(s: &Scanned, no: u64, undos: &[&UndoInfo], out: &mut Vec<u8>) -> Result<(), JournalError> {
    // start -> end of what an older record already covers (never overlapping).
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    // (offset, len, old bytes or None for zeros), in no particular order.
    let mut pieces: Vec<(u64, u32, Option<Vec<u8>>)> = Vec::new();
    for u in undos {
        let (ps, payload, mut at) = read_undo(&s.file, &s.path, u)?;
        for p in ps {
            let bytes = (!p.zero).then(|| {
                let b = &payload[at..at + p.len as usize];
                at += p.len as usize;
                b
            });
            let (start, end) = (p.offset, p.offset + u64::from(p.len));
            for (gs, ge) in gaps(&covered, start, end) {
                covered.insert(gs, ge);
                let slice = bytes.map(|b| b[(gs - start) as usize..(ge - start) as usize].to_vec());
                pieces.push((gs, (ge - gs) as u32, slice));
            }
        }
    }
    pieces.sort_unstable_by_key(|p| p.0);
    let newest = undos.last().expect("a stretch has at least one record");
    let (seq, ms) = (newest.seq, newest.batch_unix_ms);
    let mut head: Vec<Piece> = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    for (offset, len, bytes) in pieces {
        head.push(Piece {
            offset,
            len,
            zero: bytes.is_none(),
        });
        if let Some(b) = bytes {
            data.extend_from_slice(&b);
        }
        // The same bounds as the writer's records (journal.rs), so MAX_RECORD holds.
        if data.len() >= UNDO_RECORD_DATA || head.len() >= UNDO_RECORD_PIECES {
            encode_record(no, KIND_UNDO, &undo_payload(seq, ms, &head, &data), out);
            head.clear();
            data.clear();
        }
    }
    if !head.is_empty() {
        encode_record(no, KIND_UNDO, &undo_payload(seq, ms, &head, &data), out);
    }
    Ok(())
}

/// The parts of `[start, end)` that `covered` does not cover, in order.
fn gaps(covered: &BTreeMap<u64, u64>, start: u64, end: u64) -> Vec<(u64, u64)> {
    let before = covered
        .range(..=start)
        .next_back()
        .map(|(&s, &e)| (s, e))
        .filter(|&(_, e)| e > start);
    let mut out = Vec::new();
    let mut cur = start;
    for (s, e) in before
        .into_iter()
        .chain(covered.range(start + 1..end).map(|(&s, &e)| (s, e)))
    {
        if s > cur {
            out.push((cur, s));
        }
        cur = cur.max(e);
    }
    if cur < end {
        out.push((cur, end));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_what_is_not_covered() {
        let mut c = BTreeMap::new();
        c.insert(10, 20);
        c.insert(30, 40);
        assert_eq!(gaps(&c, 0, 50), [(0, 10), (20, 30), (40, 50)]);
        assert_eq!(gaps(&c, 15, 35), [(20, 30)]);
        assert_eq!(gaps(&c, 12, 18), []);
        assert_eq!(gaps(&c, 40, 41), [(40, 41)]);
    }

    #[test]
    fn only_whole_periods_older_than_the_horizon_are_thinned() {
        let h = 3_600_000;
        assert_eq!(period(10, 2 * h, h), Some(0));
        assert_eq!(period(h + 10, 2 * h, h), Some(1));
        assert_eq!(period(h + 10, 2 * h - 1, h), None, "period 1 not whole yet");
    }
}
