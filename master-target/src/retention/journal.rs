//! The per-disk undo journal on the retention volume: what a disk's target looked like
//! before each batch, and which batches (and markers) are committed.
//!
//! Files: `RETENTION/disks/<disk_id>.journal/<16 hex digits>.seg`, numbered from 1 with no
//! gaps; the highest is the *active* segment, the others are sealed.
//!
//! Byte layout, version 1 (all integers little-endian):
//!
//! ```text
//! segment: header record*
//! header:  { magic "FBMTJRN1" (8) | version u32 | crc32 u32 | base_seq u64 | created_unix_ms i64 }
//! record:  { kind u8 | reserved [0; 3] | len u32 | crc32 u32 | payload[len] }
//! UNDO   (kind 1): { seq u64 | batch_unix_ms i64 | n u32 | piece[n] | bytes }
//!          piece:  { offset u64 | len u32 | zero u8 }   (bytes holds the non-zero pieces in order)
//! COMMIT (kind 2): { applied_unix_ms i64 | nb u32 | batch[nb] | nm u32 | marker[nm] }
//!          batch:  { seq u64 | batch_unix_ms i64 | flags u32 }        (flags bit 0: in resync,
//!                                                  bit 1: thinned, no longer a point)
//!          marker: { seq u64 | time_unix_ms i64 | kind u32 | id_len u16 | id
//!                  | group_len u16 | group | tag_len u16 | tag }
//! ```
//!
//! The header's `crc32` covers the header with the crc field read as zero; a record's `crc32`
//! covers its first 8 header bytes and the payload, seeded with the segment number, so a
//! record copied from another segment never passes. `len` is capped at [`MAX_RECORD`].
//! `base_seq` is the disk's committed seq when the segment was started: the segment holds
//! undo data for later batches only.
//!
//! Invariants (the order of a commit group, PITFALLS.md §3-4, enforced by `apply`):
//! 1. UNDO records of every batch of the group are durable (fdatasync) before the first
//!    byte of the group reaches the target's map;
//! 2. the target's data is durable (msync) before the group's COMMIT record is written;
//! 3. the COMMIT record is durable before the state file says the batches are applied.
//!
//! Hence after a crash, UNDO records after the last COMMIT of the active segment belong to
//! a group that may be partly on the target: [`Journal::open`] restores their old bytes
//! (newest first; restoring absolute bytes is idempotent, so a crash during that is
//! harmless), syncs the target and truncates them. A torn record at the tail is truncated;
//! a bad record followed by valid bytes, or any bad record in a sealed segment, is
//! corruption and refuses to open: it is never skipped silently.
//!
//! A group that fails for lack of space while the process runs is cut back the same way
//! by [`Journal::abort_group`] (any COMMIT after its UNDO records is cut first), so the
//! disk goes on at its committed seq.
//!
//! Every committed batch outside a resync interval is a recovery point; going back to seq
//! `p` = applying, newest first, every committed UNDO record with seq > p. A segment is
//! sealed only right after a COMMIT and whole sealed segments are pruned (window, quota),
//! so the oldest point still reachable is the oldest segment's `base_seq`.
//!
//! Older points are thinned and their undo data compacted (compact.rs): a thinned batch
//! keeps its COMMIT entry (flag bit 1) but is no longer a point, its markers are dropped,
//! and the UNDO records between two remaining points are merged into records that hold,
//! for each block, only the oldest before-image, with the seq of the newest batch merged.
//! Rolling back to a remaining point applies exactly the same bytes as before.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use protocol::pb::{Marker, MarkerKind};

const MAGIC: &[u8; 8] = b"FBMTJRN1";
const VERSION: u32 = 1;
/// Bytes of a segment header.
pub const SEGMENT_HEADER: u64 = 32;
const RECORD_HEADER: usize = 12;
/// Largest record payload (an UNDO record holds at most [`UNDO_RECORD_DATA`] plus pieces).
pub const MAX_RECORD: usize = 6 << 20;
/// Old bytes per UNDO record before a batch's undo is split over several records.
pub const UNDO_RECORD_DATA: usize = 4 << 20;
/// Pieces per UNDO record: with [`UNDO_RECORD_DATA`] (+ one piece) the payload stays
/// under [`MAX_RECORD`] (65536 x 13 bytes of piece headers = 832 KiB).
pub const UNDO_RECORD_PIECES: usize = 65536;
/// An undo piece covers at most this many bytes, so all-zero stretches cost no space.
pub const UNDO_PIECE: usize = 64 << 10;
/// A segment is sealed (after a commit) once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 64 << 20;

pub(super) const KIND_UNDO: u8 = 1;
pub(super) const KIND_COMMIT: u8 = 2;
const FLAG_IN_RESYNC: u32 = 1;
const FLAG_THINNED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path} is corrupt at byte {offset}: {reason} (refusing to skip it)")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("reading the target's old bytes: {0}")]
    ReadTarget(io::Error),
    #[error("restoring the target from {path}: {source}")]
    Restore { path: PathBuf, source: io::Error },
}

pub(super) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A failed sync of `path`: never a retryable lack of space (crate::storage).
pub(super) fn sync_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| io_err(op, path)(crate::storage::sync_failed(source))
}

impl crate::storage::SpaceError for JournalError {
    fn is_no_space(&self) -> bool {
        matches!(self, JournalError::Io { source, .. } if crate::storage::is_no_space(source))
    }
}

/// How long and how much undo data to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Records whose batches are all older than this (source time, ms) are pruned.
    pub window_ms: i64,
    /// Most bytes of journal per disk (0 = no quota); the oldest segments go first.
    pub quota_bytes: u64,
    /// Every point newer than this (source time, ms, before the newest batch) is kept;
    /// older ones are thinned (compact.rs). Default 2 h.
    pub thin_after_ms: i64,
    /// Older than [`Self::thin_after_ms`], one point is kept per this much source time
    /// (per whole, wall-clock aligned period). Default 1 h.
    pub thin_every_ms: i64,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            window_ms: 24 * 3600 * 1000,
            quota_bytes: 0,
            thin_after_ms: 2 * 3600 * 1000,
            thin_every_ms: 3600 * 1000,
        }
    }
}

/// A stretch of the target as it was before a batch: zeros, or the bytes that follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u32,
    pub zero: bool,
}

/// Where an UNDO record is, and what it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoInfo {
    pub seq: u64,
    pub batch_unix_ms: i64,
    /// Target bytes this record restores.
    pub bytes: u64,
    pub(super) segment: u64,
    payload_at: u64,
    payload_len: u32,
}

/// A committed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry {
    pub seq: u64,
    pub batch_unix_ms: i64,
    /// The disk is inside a resync interval after this batch: not a recovery point.
    pub in_resync: bool,
    /// Thinned out of the retained points (compact.rs): not a recovery point any more.
    pub thinned: bool,
}

impl BatchEntry {
    /// Whether the disk right after this batch can be recovered to.
    pub fn is_point(&self) -> bool {
        !self.in_resync && !self.thinned
    }
}

/// A marker and the batch that carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerEntry {
    pub seq: u64,
    pub marker: Marker,
}

impl MarkerEntry {
    pub fn kind_name(&self) -> &'static str {
        match MarkerKind::try_from(self.marker.kind) {
            Ok(MarkerKind::Crash) => "crash",
            Ok(MarkerKind::App) => "app",
            Ok(MarkerKind::User) => "user",
            _ => "unknown",
        }
    }
}

/// One commit group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Commit {
    pub applied_unix_ms: i64,
    pub batches: Vec<BatchEntry>,
    pub markers: Vec<MarkerEntry>,
}

impl Commit {
    /// A commit of the one batch `seq` (source time `seq` seconds) with `markers`.
    #[cfg(test)]
    pub(crate) fn of_one(seq: u64, markers: Vec<MarkerEntry>) -> Commit {
        Commit {
            applied_unix_ms: 1,
            batches: vec![BatchEntry {
                seq,
                batch_unix_ms: seq as i64 * 1000,
                in_resync: false,
                thinned: false,
            }],
            markers,
        }
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.applied_unix_ms.to_le_bytes());
        out.extend_from_slice(&(self.batches.len() as u32).to_le_bytes());
        for b in &self.batches {
            out.extend_from_slice(&b.seq.to_le_bytes());
            out.extend_from_slice(&b.batch_unix_ms.to_le_bytes());
            let flags = if b.in_resync { FLAG_IN_RESYNC } else { 0 }
                | if b.thinned { FLAG_THINNED } else { 0 };
            out.extend_from_slice(&flags.to_le_bytes());
        }
        out.extend_from_slice(&(self.markers.len() as u32).to_le_bytes());
        for m in &self.markers {
            out.extend_from_slice(&m.seq.to_le_bytes());
            out.extend_from_slice(&m.marker.time_unix_ms.to_le_bytes());
            out.extend_from_slice(&(m.marker.kind as u32).to_le_bytes());
            for s in [&m.marker.id, &m.marker.group, &m.marker.tag] {
                out.extend_from_slice(&(s.len() as u16).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
    }

    fn decode(p: &[u8]) -> Option<Commit> {
        let mut r = Reader(p);
        let applied_unix_ms = r.u64()? as i64;
        let nb = r.u32()? as usize;
        let mut batches = Vec::with_capacity(nb.min(1024));
        for _ in 0..nb {
            let (seq, batch_unix_ms, flags) = (r.u64()?, r.u64()? as i64, r.u32()?);
            batches.push(BatchEntry {
                seq,
                batch_unix_ms,
                in_resync: flags & FLAG_IN_RESYNC != 0,
                thinned: flags & FLAG_THINNED != 0,
            });
        }
        let nm = r.u32()? as usize;
        let mut markers = Vec::with_capacity(nm.min(1024));
        for _ in 0..nm {
            let seq = r.u64()?;
            let time_unix_ms = r.u64()? as i64;
            let kind = r.u32()? as i32;
            let id = r.str()?;
            let group = r.str()?;
            let tag = r.str()?;
            markers.push(MarkerEntry {
                seq,
                marker: Marker {
                    id,
                    kind,
                    time_unix_ms,
                    group,
                    tag,
                },
            });
        }
        r.0.is_empty().then_some(Commit {
            applied_unix_ms,
            batches,
            markers,
        })
    }

    /// Highest seq of the group.
    pub fn last_seq(&self) -> Option<u64> {
        self.batches.last().map(|b| b.seq)
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<String> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

/// Decodes an UNDO payload's head: (seq, batch_unix_ms, pieces, offset of the bytes).
fn decode_undo_head(p: &[u8]) -> Option<(u64, i64, Vec<Piece>, usize)> {
    let mut r = Reader(p);
    let seq = r.u64()?;
    let batch_unix_ms = r.u64()? as i64;
    let n = r.u32()? as usize;
    if n > p.len() / 13 {
        return None;
    }
    let mut pieces = Vec::with_capacity(n);
    let mut data = 0usize;
    for _ in 0..n {
        let offset = r.u64()?;
        let len = r.u32()?;
        let zero = match r.take(1)?[0] {
            0 => false,
            1 => true,
            _ => return None,
        };
        if !zero {
            data += len as usize;
        }
        pieces.push(Piece { offset, len, zero });
    }
    let at = p.len() - r.0.len();
    (r.0.len() == data).then_some((seq, batch_unix_ms, pieces, at))
}

/// An UNDO payload (see the module docs).
pub(super) fn undo_payload(seq: u64, ms: i64, pieces: &[Piece], data: &[u8]) -> Vec<u8> {
    let mut p = undo_prefix(seq, ms, pieces, data.len());
    p.extend_from_slice(data);
    p
}

/// An UNDO payload up to its old bytes (seq, time, piece table), with room for `data` more.
fn undo_prefix(seq: u64, ms: i64, pieces: &[Piece], data: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(20 + pieces.len() * 13 + data);
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&ms.to_le_bytes());
    p.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
    for piece in pieces {
        p.extend_from_slice(&piece.offset.to_le_bytes());
        p.extend_from_slice(&piece.len.to_le_bytes());
        p.push(u8::from(piece.zero));
    }
    p
}

/// Directory of `disk_id`'s journal.
pub fn journal_dir(retention: &Path, disk_id: &str) -> PathBuf {
    crate::state::disks_dir(retention).join(format!("{disk_id}.journal"))
}

pub(super) fn segment_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:016x}.seg"))
}

/// Where a segment is written before it is renamed into place (new or rewritten).
pub(super) fn segment_tmp_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!(".{no:016x}.seg.tmp"))
}

fn record_crc(segment: u64, head: &[u8], payload: &[u8]) -> u32 {
    record_crc_parts(segment, head, &[payload])
}

/// [`record_crc`] of a payload given as consecutive parts.
fn record_crc_parts(segment: u64, head: &[u8], parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(segment as u32 ^ (segment >> 32) as u32);
    h.update(head);
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

pub(super) fn encode_record(segment: u64, kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    encode_record_head(segment, kind, &[payload], out);
    out.extend_from_slice(payload);
}

/// Appends to `out` the head and CRC of a record whose payload is `parts` one after the
/// other (the payload itself is not appended).
fn encode_record_head(segment: u64, kind: u8, parts: &[&[u8]], out: &mut Vec<u8>) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut head = [0u8; 8];
    head[0] = kind;
    head[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&record_crc_parts(segment, &head, parts).to_le_bytes());
}

pub(super) fn encode_header(base_seq: u64, created_unix_ms: i64) -> [u8; SEGMENT_HEADER as usize] {
    let mut h = [0u8; SEGMENT_HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&base_seq.to_le_bytes());
    h[24..32].copy_from_slice(&created_unix_ms.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// (base_seq, created_unix_ms) of a valid header.
fn decode_header(h: &[u8]) -> Option<(u64, i64)> {
    if h.len() < SEGMENT_HEADER as usize || &h[..8] != MAGIC {
        return None;
    }
    let mut copy = [0u8; SEGMENT_HEADER as usize];
    copy.copy_from_slice(&h[..SEGMENT_HEADER as usize]);
    let crc = u32::from_le_bytes(copy[12..16].try_into().ok()?);
    copy[12..16].fill(0);
    if crc32fast::hash(&copy) != crc || u32::from_le_bytes(copy[8..12].try_into().ok()?) != VERSION
    {
        return None;
    }
    Some((
        u64::from_le_bytes(copy[16..24].try_into().ok()?),
        i64::from_le_bytes(copy[24..32].try_into().ok()?),
    ))
}

pub(super) enum Entry {
    Undo(UndoInfo),
    Commit(Commit),
}

/// A scanned segment.
pub(super) struct Scanned {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) base_seq: u64,
    pub(super) created_unix_ms: i64,
    /// Entries with the file offset just past each.
    pub(super) entries: Vec<(Entry, u64)>,
    pub(super) len: u64,
}

/// Reads one segment; `last` allows a torn tail (the active segment).
pub(super) fn scan(
    dir: &Path,
    no: u64,
    last: bool,
    writable: bool,
) -> Result<Scanned, JournalError> {
    let path = segment_path(dir, no);
    let mut file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(&path)
        .map_err(io_err("open", &path))?;
    let len = file.metadata().map_err(io_err("stat", &path))?.len();
    let corrupt = |offset: u64, reason: &str| JournalError::Corrupt {
        path: path.clone(),
        offset,
        reason: reason.to_string(),
    };
    let mut head = [0u8; SEGMENT_HEADER as usize];
    file.read_exact(&mut head)
        .map_err(|_| corrupt(0, "short segment header"))?;
    let (base_seq, created_unix_ms) =
        decode_header(&head).ok_or_else(|| corrupt(0, "bad segment header"))?;
    let mut entries = Vec::new();
    let mut at = SEGMENT_HEADER;
    let mut payload = Vec::new();
    let mut reader = io::BufReader::with_capacity(1 << 20, &mut file);
    reader
        .seek(SeekFrom::Start(at))
        .map_err(io_err("seek", &path))?;
    loop {
        let rest = len - at;
        if rest == 0 {
            break;
        }
        let bad = |reason: &str, end: u64| {
            if last && end >= len {
                Ok(()) // torn tail: the caller truncates
            } else {
                Err(corrupt(at, reason))
            }
        };
        if rest < RECORD_HEADER as u64 {
            bad("torn record header", len)?;
            break;
        }
        let mut rh = [0u8; RECORD_HEADER];
        reader.read_exact(&mut rh).map_err(io_err("read", &path))?;
        let plen = u32::from_le_bytes(rh[4..8].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(rh[8..12].try_into().expect("4"));
        if plen > MAX_RECORD {
            // Never a torn append, even at the tail: bytes past what reached the disk read
            // as zeros, so a partly written length is at most the real one (<= the cap).
            return Err(corrupt(at, "record length beyond the cap"));
        }
        let end = at + (RECORD_HEADER + plen) as u64;
        if end > len {
            bad("record runs past the end", end)?;
            break;
        }
        payload.resize(plen, 0);
        reader
            .read_exact(&mut payload)
            .map_err(io_err("read", &path))?;
        let entry = if record_crc(no, &rh[..8], &payload) != crc {
            None
        } else {
            match rh[0] {
                KIND_UNDO => decode_undo_head(&payload).map(|(seq, ms, pieces, _)| {
                    Entry::Undo(UndoInfo {
                        seq,
                        batch_unix_ms: ms,
                        bytes: pieces.iter().map(|p| u64::from(p.len)).sum(),
                        segment: no,
                        payload_at: at + RECORD_HEADER as u64,
                        payload_len: plen as u32,
                    })
                }),
                KIND_COMMIT => Commit::decode(&payload).map(Entry::Commit),
                _ => None,
            }
        };
        match entry {
            Some(e) => entries.push((e, end)),
            None => {
                bad("CRC mismatch or bad record", end)?;
                break;
            }
        }
        at = end;
    }
    drop(reader);
    Ok(Scanned {
        path,
        file,
        base_seq,
        created_unix_ms,
        entries,
        len,
    })
}

/// Segment numbers present in `dir`, ascending; leftover temporary files are ignored.
pub(super) fn list_segments(dir: &Path) -> Result<Vec<u64>, JournalError> {
    let mut nos = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(nos),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for entry in rd {
        let name = entry.map_err(io_err("list", dir))?.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name.strip_suffix(".seg")
            && hex.len() == 16
            && let Ok(no) = u64::from_str_radix(hex, 16)
        {
            nos.push(no);
        }
    }
    nos.sort_unstable();
    Ok(nos)
}

/// Where old bytes go when undo records are applied: the live target, or a recovered copy.
pub trait UndoTarget {
    /// Writes `data` (or `len` zeros when `data` is `None`) at `offset`.
    fn restore(&mut self, offset: u64, len: u32, data: Option<&[u8]>) -> io::Result<()>;
    /// Makes every restore durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// Reads an UNDO record: its pieces, its payload, and where the old bytes start in it.
pub(super) fn read_undo(
    file: &File,
    path: &Path,
    u: &UndoInfo,
) -> Result<(Vec<Piece>, Vec<u8>, usize), JournalError> {
    let mut payload = vec![0u8; u.payload_len as usize];
    file.read_exact_at(&mut payload, u.payload_at)
        .map_err(io_err("read", path))?;
    let (_, _, pieces, at) = decode_undo_head(&payload).ok_or_else(|| JournalError::Corrupt {
        path: path.to_path_buf(),
        offset: u.payload_at,
        reason: "undo record changed since it was scanned".into(),
    })?;
    Ok((pieces, payload, at))
}

/// Reads an UNDO record's payload and restores its pieces into `target`.
fn apply_undo(
    file: &File,
    path: &Path,
    u: &UndoInfo,
    target: &mut dyn UndoTarget,
) -> Result<(), JournalError> {
    let (pieces, payload, mut at) = read_undo(file, path, u)?;
    let restore = |source| JournalError::Restore {
        path: path.to_path_buf(),
        source,
    };
    for p in pieces {
        if p.zero {
            target.restore(p.offset, p.len, None).map_err(restore)?;
        } else {
            let data = &payload[at..at + p.len as usize];
            at += p.len as usize;
            target
                .restore(p.offset, p.len, Some(data))
                .map_err(restore)?;
        }
    }
    Ok(())
}

/// The committed history of a disk, read without changing anything (a live server may be
/// appending: its uncommitted tail is ignored).
pub struct History {
    /// Oldest seq the history can go back to.
    pub base_seq: u64,
    /// Highest committed seq.
    pub committed_seq: u64,
    pub commits: Vec<Commit>,
    /// UNDO records, oldest first (committed ones, then those of an uncommitted tail).
    pub undos: Vec<UndoInfo>,
    files: Vec<(u64, PathBuf, File)>,
}

impl History {
    /// Reads `disk_id`'s journal; `Ok(None)` when it has none.
    pub fn read(retention: &Path, disk_id: &str) -> Result<Option<History>, JournalError> {
        let dir = journal_dir(retention, disk_id);
        let nos = list_segments(&dir)?;
        let Some(&last_no) = nos.last() else {
            return Ok(None);
        };
        let mut h = History {
            base_seq: 0,
            committed_seq: 0,
            commits: Vec::new(),
            undos: Vec::new(),
            files: Vec::new(),
        };
        for &no in &nos {
            let s = match scan(&dir, no, no == last_no, false) {
                Ok(s) => s,
                // Pruned by a live server between listing and opening.
                Err(JournalError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound && no != last_no =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !h.files.is_empty() && s.base_seq != h.committed_seq {
                // A segment started above where the journal reached (opened behind the
                // state file, `Journal::open`): the undo between is missing, so no point
                // before the gap can be rebuilt. The history starts after it.
                tracing::warn!(
                    disk = disk_id,
                    "undo journal segment {no} starts at seq {} where the history reached seq \
                     {}: points before seq {} are gone",
                    s.base_seq,
                    h.committed_seq,
                    s.base_seq
                );
                h.commits.clear();
                h.undos.clear();
                h.files.clear();
            }
            if h.files.is_empty() {
                h.base_seq = s.base_seq;
                h.committed_seq = s.base_seq;
            }
            for (e, _) in s.entries {
                match e {
                    // Undo records after the last commit belong to a group that may be
                    // partly on the target (a crashed server): they are kept, so that a
                    // roll back restores what was there before it too.
                    Entry::Undo(u) => h.undos.push(u),
                    Entry::Commit(c) => {
                        if let Some(seq) = c.last_seq() {
                            h.committed_seq = seq;
                        }
                        h.commits.push(c);
                    }
                }
            }
            h.files.push((no, s.path, s.file));
        }
        Ok(Some(h))
    }

    /// Applies, newest first, every UNDO record with seq above `seq` to `target` (which
    /// holds the disk as the journal's writer left it), then syncs it.
    pub fn roll_back(&self, seq: u64, target: &mut dyn UndoTarget) -> Result<(), JournalError> {
        for u in self.undos.iter().rev().take_while(|u| u.seq > seq) {
            let (_, path, file) = self
                .files
                .iter()
                .find(|(no, _, _)| *no == u.segment)
                .expect("every undo record comes from a scanned segment");
            apply_undo(file, path, u, target)?;
        }
        target.sync().map_err(|source| JournalError::Restore {
            path: PathBuf::from("target"),
            source,
        })
    }
}

/// Cuts the journal back to seq `seq` after an in-place roll back to it: segments based at
/// or above it go, and the segment holding it keeps its records up to it (a group that
/// straddles it keeps the undo and a new commit record of its batches up to `seq`).
pub fn truncate_to(retention: &Path, disk_id: &str, seq: u64) -> Result<(), JournalError> {
    let dir = journal_dir(retention, disk_id);
    let nos = list_segments(&dir)?;
    for &no in nos.iter().rev() {
        let s = scan(&dir, no, Some(&no) == nos.last(), true)?;
        if s.base_seq >= seq {
            std::fs::remove_file(&s.path).map_err(io_err("remove", &s.path))?;
            continue;
        }
        let mut cut = SEGMENT_HEADER;
        let mut partial = None;
        for (e, end) in &s.entries {
            match e {
                Entry::Undo(u) if u.seq <= seq => cut = *end,
                Entry::Undo(_) => {}
                Entry::Commit(c) if c.last_seq().is_none_or(|l| l <= seq) => cut = *end,
                Entry::Commit(c) => {
                    partial = Some(Commit {
                        applied_unix_ms: c.applied_unix_ms,
                        batches: c.batches.iter().filter(|b| b.seq <= seq).cloned().collect(),
                        markers: c.markers.iter().filter(|m| m.seq <= seq).cloned().collect(),
                    });
                    break;
                }
            }
        }
        match partial.filter(|c| !c.batches.is_empty()) {
            // A cut at a COMMIT: truncating is atomic (a crash leaves the old length, and
            // the roll back and cut are simply made again).
            None => {
                s.file.set_len(cut).map_err(io_err("truncate", &s.path))?;
                s.file.sync_all().map_err(sync_err("fsync", &s.path))?;
            }
            // Inside a group: the kept records and their new COMMIT go to a copy renamed
            // over the segment. Cutting in place and then appending the COMMIT could crash
            // in between, and the next open would roll the kept batches back as an
            // uncommitted group, below the point.
            Some(c) => {
                let mut p = Vec::new();
                c.encode(&mut p);
                let mut rec = Vec::new();
                encode_record(no, KIND_COMMIT, &p, &mut rec);
                let tmp = segment_tmp_path(&dir, no);
                let mut out = File::create(&tmp).map_err(io_err("create", &tmp))?;
                (&s.file)
                    .seek(SeekFrom::Start(0))
                    .map_err(io_err("seek", &s.path))?;
                io::copy(&mut (&s.file).take(cut), &mut out).map_err(io_err("copy", &tmp))?;
                out.write_all(&rec).map_err(io_err("write", &tmp))?;
                out.sync_all().map_err(sync_err("fsync", &tmp))?;
                std::fs::rename(&tmp, &s.path).map_err(io_err("rename", &s.path))?;
            }
        }
        break;
    }
    sync_dir(&dir)
}

/// Metadata of a segment kept by the writer.
#[derive(Debug)]
struct SegMeta {
    no: u64,
    base_seq: u64,
    len: u64,
    /// Source time of the newest batch committed in it (0 = none).
    newest_unix_ms: i64,
}

/// What opening found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Opened {
    /// Highest committed seq (the segment base when nothing is committed after it).
    pub committed_seq: u64,
    /// The last committed batch, if the journal holds one.
    pub last_batch: Option<BatchEntry>,
    /// The last committed batch outside a resync interval.
    pub last_consistent: Option<BatchEntry>,
    /// UNDO records of an uncommitted group that were rolled back.
    pub rolled_back: usize,
}

/// The writer of one disk's journal (owned by its applier).
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    active: File,
    segments: VecDeque<SegMeta>,
    policy: RetentionPolicy,
    buf: Vec<u8>,
    /// The old bytes of the UNDO record being built, kept between batches: a fresh
    /// buffer of up to 4 MiB per batch costs a page fault per 4 KiB on first touch.
    undo_data: Vec<u8>,
    /// End of the last finished group's COMMIT record in the active segment: what a
    /// failed group is cut back to ([`Self::abort_group`]).
    committed: u64,
    /// Oldest reachable seq the last quota warning named, to warn once per change.
    warned_reach_seq: u64,
    /// The newest thinning period (compact.rs) a pass already covered: a pass runs once
    /// per new period, and once after each open.
    thinned_through: i64,
}

impl Journal {
    /// Opens (or creates) `disk_id`'s journal: rolls the uncommitted tail back into
    /// `target`, truncates it, and starts a fresh segment at `applied_seq` when there is
    /// no journal yet or it ends below that seq (nothing to undo before it).
    pub fn open(
        retention: &Path,
        disk_id: &str,
        applied_seq: u64,
        policy: RetentionPolicy,
        target: &mut dyn UndoTarget,
    ) -> Result<(Journal, Opened), JournalError> {
        let dir = journal_dir(retention, disk_id);
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        // The journal's directory may be new: its name must be durable before anything in
        // it is relied on.
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        remove_temporaries(&dir)?;
        let nos = list_segments(&dir)?;
        let mut segments = VecDeque::new();
        let mut opened = Opened::default();
        let mut active = None;
        let mut committed = SEGMENT_HEADER;
        for &no in &nos {
            let last = Some(&no) == nos.last();
            let s = scan(&dir, no, last, last)?;
            opened.committed_seq = opened.committed_seq.max(s.base_seq);
            let mut newest = 0;
            let mut commit_end = SEGMENT_HEADER;
            let mut pending = Vec::new();
            for (e, end) in s.entries {
                match e {
                    Entry::Undo(u) => pending.push(u),
                    Entry::Commit(c) => {
                        pending.clear();
                        commit_end = end;
                        if let Some(b) = c.batches.last() {
                            newest = b.batch_unix_ms;
                            opened.committed_seq = b.seq;
                            opened.last_batch = Some(b.clone());
                        }
                        if let Some(b) = c.batches.iter().rev().find(|b| !b.in_resync) {
                            opened.last_consistent = Some(b.clone());
                        }
                    }
                }
            }
            if last {
                // Newest first: each record restores what was there before its batch.
                for u in pending.iter().rev() {
                    apply_undo(&s.file, &s.path, u, target)?;
                }
                if !pending.is_empty() {
                    target.sync().map_err(|source| JournalError::Restore {
                        path: s.path.clone(),
                        source,
                    })?;
                    tracing::warn!(path = %s.path.display(), records = pending.len(), "rolled back an uncommitted group");
                }
                opened.rolled_back = pending.len();
                if commit_end != s.len {
                    s.file
                        .set_len(commit_end)
                        .map_err(io_err("truncate", &s.path))?;
                    s.file.sync_all().map_err(sync_err("fsync", &s.path))?;
                }
                committed = commit_end;
                active = Some(s.file);
            }
            segments.push_back(SegMeta {
                no,
                base_seq: s.base_seq,
                len: commit_end.max(SEGMENT_HEADER),
                newest_unix_ms: newest,
            });
        }
        let mut j = Journal {
            dir,
            active: match active {
                Some(f) => f,
                None => File::open("/dev/null").map_err(io_err("open", Path::new("/dev/null")))?,
            },
            segments,
            policy,
            buf: Vec::new(),
            undo_data: Vec::new(),
            committed,
            warned_reach_seq: 0,
            thinned_through: i64::MIN,
        };
        if nos.is_empty() || opened.committed_seq < applied_seq {
            // No undo data exists for what is already applied: start at the applied seq.
            j.rotate(applied_seq)?;
            opened.committed_seq = applied_seq;
        }
        Ok((j, opened))
    }

    /// Starts a new active segment whose base is `base_seq`.
    fn rotate(&mut self, base_seq: u64) -> Result<(), JournalError> {
        let no = self.segments.back().map_or(1, |s| s.no + 1);
        let path = segment_path(&self.dir, no);
        let tmp = segment_tmp_path(&self.dir, no);
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&encode_header(base_seq, protocol::now_unix_ms()))
            .map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(sync_err("fsync", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
        sync_dir(&self.dir)?;
        self.active = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        self.segments.push_back(SegMeta {
            no,
            base_seq,
            len: SEGMENT_HEADER,
            newest_unix_ms: 0,
        });
        self.committed = SEGMENT_HEADER;
        Ok(())
    }

    fn active_meta(&mut self) -> &mut SegMeta {
        self.segments
            .back_mut()
            .expect("an open journal has an active segment")
    }

    fn write_record(&mut self, kind: u8, payload: &[u8]) -> Result<(), JournalError> {
        self.write_record_parts(kind, payload, &[])
    }

    /// Appends a record whose payload is `payload` followed by `bulk`: the same bytes as
    /// [`encode_record`] of the whole, but `bulk` (the old bytes of an UNDO record, up to
    /// 4 MiB) goes to the file as it is instead of being copied into the record first.
    /// Not atomic either way: a record cut short by a failure or a crash is a torn tail,
    /// which the CRC catches and the next open (or `abort_group`) truncates.
    fn write_record_parts(
        &mut self,
        kind: u8,
        payload: &[u8],
        bulk: &[u8],
    ) -> Result<(), JournalError> {
        let no = self.active_meta().no;
        self.buf.clear();
        encode_record_head(no, kind, &[payload, bulk], &mut self.buf);
        self.buf.extend_from_slice(payload);
        let at = self.active_meta().len;
        let path = segment_path(&self.dir, no);
        self.active
            .write_all_at(&self.buf, at)
            .map_err(io_err("write", &path))?;
        if !bulk.is_empty() {
            self.active
                .write_all_at(bulk, at + self.buf.len() as u64)
                .map_err(io_err("write", &path))?;
        }
        self.active_meta().len += (self.buf.len() + bulk.len()) as u64;
        Ok(())
    }

    /// Appends the undo of one batch: its `extents` in order, with `read(offset, buf)`
    /// filling `buf` with the target's current bytes. Not durable until [`Self::sync`].
    pub fn append_undo(
        &mut self,
        seq: u64,
        batch_unix_ms: i64,
        extents: impl Iterator<Item = (u64, u64)>,
        mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<u64, JournalError> {
        let mut pieces: Vec<Piece> = Vec::new();
        // Kept between calls at its largest size so far (at most UNDO_RECORD_DATA +
        // UNDO_PIECE) and only grown, never cleared: zeroing it for every piece cost a
        // memset of every old byte. `used` is the record's data so far.
        let mut buf = std::mem::take(&mut self.undo_data);
        let mut used = 0;
        let mut total = 0u64;
        for (offset, len) in extents {
            let mut at = offset;
            let end = offset + len;
            while at < end {
                let n = ((end - at) as usize).min(UNDO_PIECE);
                // Read straight into the record's data (one copy from the target); an
                // all-zero piece is not kept.
                if buf.len() < used + n {
                    buf.resize(used + n, 0);
                }
                let piece = &mut buf[used..used + n];
                read(at, piece).map_err(JournalError::ReadTarget)?;
                let zero = is_zero(piece);
                if !zero {
                    used += n;
                }
                pieces.push(Piece {
                    offset: at,
                    len: n as u32,
                    zero,
                });
                total += n as u64;
                at += n as u64;
                if used >= UNDO_RECORD_DATA || pieces.len() >= UNDO_RECORD_PIECES {
                    self.undo_record(seq, batch_unix_ms, &pieces, &buf[..used])?;
                    pieces.clear();
                    used = 0;
                }
            }
        }
        if !pieces.is_empty() {
            self.undo_record(seq, batch_unix_ms, &pieces, &buf[..used])?;
        }
        self.undo_data = buf;
        Ok(total)
    }

    fn undo_record(
        &mut self,
        seq: u64,
        ms: i64,
        pieces: &[Piece],
        data: &[u8],
    ) -> Result<(), JournalError> {
        self.write_record_parts(KIND_UNDO, &undo_prefix(seq, ms, pieces, 0), data)
    }

    /// Makes every record appended so far durable. An error is fatal (never retried).
    pub fn sync(&mut self) -> Result<(), JournalError> {
        let no = self.active_meta().no;
        self.active
            .sync_data()
            .map_err(sync_err("fdatasync", &segment_path(&self.dir, no)))
    }

    /// Appends `commit`, makes it durable, then seals and prunes ([`Self::maintain`]).
    pub fn commit(&mut self, commit: &Commit) -> Result<(), JournalError> {
        self.append_commit(commit)?;
        self.maintain(commit)
    }

    /// Appends `commit` and makes it durable: the group is committed once this returns,
    /// but until [`Self::maintain`] says it is finished (the applier's state file is
    /// written), [`Self::abort_group`] still cuts it back.
    pub fn append_commit(&mut self, commit: &Commit) -> Result<(), JournalError> {
        let mut p = Vec::with_capacity(64 + commit.batches.len() * 20);
        commit.encode(&mut p);
        self.write_record(KIND_COMMIT, &p)?;
        self.sync()
    }

    /// Cuts the active segment back to its last COMMIT after a group failed for lack of
    /// space. With `target` (the group's data may be on it already), the old bytes of the
    /// group's UNDO records, durable before any data was written, are restored first,
    /// newest first, and synced. Returns the UNDO records restored.
    ///
    /// Crash safety: a COMMIT (whole or torn) after the group's UNDO records is cut, and
    /// the cut made durable, before anything is restored, so a crash meanwhile finds the
    /// group uncommitted and [`Self::open`] rolls it back again (restoring is idempotent).
    pub fn abort_group(
        &mut self,
        target: Option<&mut dyn UndoTarget>,
    ) -> Result<usize, JournalError> {
        let no = self.active_meta().no;
        let path = segment_path(&self.dir, no);
        let mut restored = 0;
        if let Some(target) = target {
            let s = scan(&self.dir, no, true, false)?;
            let mut undo = Vec::new();
            let mut undo_end = self.committed;
            for (e, end) in s.entries {
                match e {
                    _ if end <= self.committed => {}
                    Entry::Undo(u) => {
                        undo.push(u);
                        undo_end = end;
                    }
                    Entry::Commit(_) => break,
                }
            }
            if undo_end < s.len {
                self.active
                    .set_len(undo_end)
                    .map_err(io_err("truncate", &path))?;
                self.active
                    .sync_data()
                    .map_err(sync_err("fdatasync", &path))?;
            }
            for u in undo.iter().rev() {
                apply_undo(&s.file, &s.path, u, target)?;
            }
            target.sync().map_err(|source| JournalError::Restore {
                path: path.clone(),
                source,
            })?;
            restored = undo.len();
        }
        self.active
            .set_len(self.committed)
            .map_err(io_err("truncate", &path))?;
        self.active
            .sync_data()
            .map_err(sync_err("fdatasync", &path))?;
        let committed = self.committed;
        self.active_meta().len = committed;
        Ok(restored)
    }

    /// After a durable commit: seals the segment if it is full, prunes what the policy no
    /// longer keeps and thins old points. A failure for lack of space leaves the journal
    /// as it was (a half-written segment file is removed): sealing is retried after the
    /// next commit, thinning with the next period (each pass covers all older ones).
    pub fn maintain(&mut self, commit: &Commit) -> Result<(), JournalError> {
        // The group is finished: a later failure no longer cuts it back.
        self.committed = self.active_meta().len;
        if let Some(b) = commit.batches.last() {
            self.active_meta().newest_unix_ms = b.batch_unix_ms;
        }
        let done = self.maintain_now(commit);
        if done
            .as_ref()
            .is_err_and(crate::storage::SpaceError::is_no_space)
        {
            // The volume is full: free what a rotation or rewrite left half written. If
            // that fails too, the next open removes it.
            if let Err(e) = remove_temporaries(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), "{e}");
            }
        }
        done
    }

    fn maintain_now(&mut self, commit: &Commit) -> Result<(), JournalError> {
        if self.active_meta().len >= SEGMENT_BYTES
            && let Some(seq) = commit.last_seq()
        {
            self.rotate(seq)?;
        }
        let Some(newest) = commit.batches.last().map(|b| b.batch_unix_ms) else {
            return self.prune(0);
        };
        self.prune(newest)?;
        self.thin(newest)
    }

    /// Thins old points and compacts their undo data (compact.rs) when a new period has
    /// become old enough since the last pass.
    fn thin(&mut self, newest_unix_ms: i64) -> Result<(), JournalError> {
        let every = self.policy.thin_every_ms.max(1);
        let through = newest_unix_ms
            .saturating_sub(self.policy.thin_after_ms)
            .div_euclid(every)
            - 1;
        if through <= self.thinned_through {
            return Ok(());
        }
        self.thinned_through = through;
        let nos: Vec<u64> = self.segments.iter().map(|s| s.no).collect();
        let done = super::compact::thin(&self.dir, &nos, newest_unix_ms, &self.policy)?;
        let active_no = self.active_meta().no;
        for &(no, len) in &done.rewritten {
            if let Some(m) = self.segments.iter_mut().find(|m| m.no == no) {
                m.len = len;
            }
            if no == active_no {
                // Rewritten right after a commit: it ends with that commit.
                self.committed = len;
                // Renamed over: the handle we hold names the old file.
                let path = segment_path(&self.dir, no);
                self.active = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open", &path))?;
            }
        }
        if done.thinned > 0 {
            tracing::info!(
                dir = %self.dir.display(),
                thinned = done.thinned,
                segments = done.rewritten.len(),
                bytes_saved = done.bytes_saved,
                journal_bytes = self.bytes(),
                "thinned old recovery points and compacted their undo data: {} bytes saved",
                done.bytes_saved
            );
        }
        Ok(())
    }

    /// Deletes sealed segments that are out of the window, then, oldest first, those the
    /// quota cannot hold (with a warning saying how far back points now reach).
    fn prune(&mut self, now_unix_ms: i64) -> Result<(), JournalError> {
        let mut deleted = false;
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            // A sealed segment without commits holds nothing to go back to.
            let expired = oldest.newest_unix_ms == 0
                || now_unix_ms - oldest.newest_unix_ms > self.policy.window_ms;
            let total: u64 = self.segments.iter().map(|s| s.len).sum();
            let over = self.policy.quota_bytes > 0 && total > self.policy.quota_bytes;
            if !expired && !over {
                break;
            }
            let s = self.segments.pop_front().expect("len > 1");
            let path = segment_path(&self.dir, s.no);
            std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
            deleted = true;
            if over && !expired {
                let reach = self.segments[0].base_seq;
                if reach != self.warned_reach_seq {
                    self.warned_reach_seq = reach;
                    tracing::warn!(
                        dir = %self.dir.display(),
                        quota = self.policy.quota_bytes,
                        oldest_point_seq = reach,
                        oldest_point_age_s = (now_unix_ms - s.newest_unix_ms).max(0) / 1000,
                        "retention quota cannot hold the window: dropped the oldest undo data; \
                         recovery points now reach back to seq {reach} only"
                    );
                }
            }
        }
        if deleted {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// The active segment's file (named in errors about it).
    pub fn active_path(&self) -> PathBuf {
        segment_path(&self.dir, self.segments.back().map_or(0, |s| s.no))
    }

    /// Bytes of journal on the retention volume.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }
}

/// Removes segment files a crash left half written (`.<no>.seg.tmp`): each names a segment
/// that was never renamed into place, or whose rewrite never replaced it.
fn remove_temporaries(dir: &Path) -> Result<(), JournalError> {
    for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))? {
        let path = entry.map_err(io_err("list", dir))?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".seg.tmp"))
        {
            std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
        }
    }
    Ok(())
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .map_err(io_err("open", dir))?
        .sync_all()
        .map_err(sync_err("fsync dir", dir))
}

fn is_zero(b: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned
        // middle of the slice.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && body.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target in memory.
    struct Mem(Vec<u8>);

    impl UndoTarget for Mem {
        fn restore(&mut self, offset: u64, len: u32, data: Option<&[u8]>) -> io::Result<()> {
            let r = &mut self.0[offset as usize..offset as usize + len as usize];
            match data {
                Some(d) => r.copy_from_slice(d),
                None => r.fill(0),
            }
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn write(j: &mut Journal, disk: &mut Mem, seq: u64, writes: &[(u64, u8, u64)], commit: bool) {
        let snapshot = disk.0.clone();
        j.append_undo(
            seq,
            seq as i64 * 1000,
            writes.iter().map(|&(o, _, l)| (o, l)),
            |o, buf| {
                buf.copy_from_slice(&snapshot[o as usize..o as usize + buf.len()]);
                Ok(())
            },
        )
        .unwrap();
        j.sync().unwrap();
        for &(o, v, l) in writes {
            disk.0[o as usize..(o + l) as usize].fill(v);
        }
        if commit {
            j.commit(&Commit::of_one(seq, vec![])).unwrap();
        }
    }

    #[test]
    fn an_uncommitted_group_is_rolled_back_on_open_and_history_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = Mem(vec![0u8; 1 << 20]);
        let (mut j, o) =
            Journal::open(dir.path(), "d", 0, RetentionPolicy::default(), &mut disk).unwrap();
        assert_eq!(o.committed_seq, 0);
        let mut states = vec![disk.0.clone()];
        write(
            &mut j,
            &mut disk,
            1,
            &[(0, 1, 200_000), (300_000, 2, 4096)],
            true,
        );
        states.push(disk.0.clone());
        write(&mut j, &mut disk, 2, &[(100_000, 3, 300_000)], true);
        states.push(disk.0.clone());
        write(&mut j, &mut disk, 3, &[(0, 9, 1 << 20)], false);
        drop(j);
        let (_j, o) =
            Journal::open(dir.path(), "d", 2, RetentionPolicy::default(), &mut disk).unwrap();
        assert_eq!(o.committed_seq, 2);
        assert_eq!(o.rolled_back, 1);
        assert!(
            disk.0 == states[2],
            "target equals the last committed state"
        );
        let h = History::read(dir.path(), "d").unwrap().unwrap();
        assert_eq!((h.base_seq, h.committed_seq), (0, 2));
        for (seq, want) in states.iter().enumerate() {
            let mut copy = Mem(disk.0.clone());
            h.roll_back(seq as u64, &mut copy).unwrap();
            assert!(copy.0 == *want, "state at seq {seq}");
        }
    }

    #[test]
    fn cutting_back_inside_a_group_keeps_its_batches_up_to_the_point_committed() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = Mem(vec![0u8; 65536]);
        let (mut j, _) =
            Journal::open(dir.path(), "d", 0, RetentionPolicy::default(), &mut disk).unwrap();
        write(&mut j, &mut disk, 1, &[(0, 1, 8192)], true);
        let after1 = disk.0.clone();
        // Batches 2 and 3 in one commit group.
        write(&mut j, &mut disk, 2, &[(4096, 2, 8192)], false);
        let after2 = disk.0.clone();
        write(&mut j, &mut disk, 3, &[(0, 3, 4096)], false);
        let mut group = Commit::of_one(2, vec![]);
        group.batches.extend(Commit::of_one(3, vec![]).batches);
        j.commit(&group).unwrap();
        drop(j);
        let h = History::read(dir.path(), "d").unwrap().unwrap();
        h.roll_back(2, &mut disk).unwrap();
        assert_eq!(disk.0, after2);
        drop(h);
        truncate_to(dir.path(), "d", 2).unwrap();
        let jd = journal_dir(dir.path(), "d");
        assert!(
            !segment_tmp_path(&jd, 1).exists(),
            "the copy was renamed over"
        );
        // Seq 2 is committed on its own now: opening keeps it, and the history goes on.
        let (_j, o) =
            Journal::open(dir.path(), "d", 2, RetentionPolicy::default(), &mut disk).unwrap();
        assert_eq!((o.committed_seq, o.rolled_back), (2, 0));
        assert_eq!(disk.0, after2);
        let h = History::read(dir.path(), "d").unwrap().unwrap();
        assert_eq!(h.committed_seq, 2);
        h.roll_back(1, &mut disk).unwrap();
        assert_eq!(disk.0, after1);
    }

    /// Disk "d" with a journal in `dir` where seqs 1 and 2 (4 KiB at 0, filled with the
    /// seq) are committed; returns the disk.
    fn journal_of_two(dir: &Path) -> Mem {
        let mut disk = Mem(vec![0u8; 65536]);
        let (mut j, _) = Journal::open(dir, "d", 0, RetentionPolicy::default(), &mut disk).unwrap();
        write(&mut j, &mut disk, 1, &[(0, 1, 4096)], true);
        write(&mut j, &mut disk, 2, &[(0, 2, 4096)], true);
        disk
    }

    #[test]
    fn a_torn_tail_is_truncated_and_mid_segment_corruption_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disk = journal_of_two(dir.path());
        let seg = segment_path(&journal_dir(dir.path(), "d"), 1);
        let full = std::fs::read(&seg).unwrap();
        // Torn: the second commit record loses its last byte.
        std::fs::write(&seg, &full[..full.len() - 1]).unwrap();
        let mut d2 = Mem(disk.0.clone());
        let (_j, o) =
            Journal::open(dir.path(), "d", 1, RetentionPolicy::default(), &mut d2).unwrap();
        assert_eq!(o.committed_seq, 1);
        assert_eq!(&d2.0[..4096], &[1u8; 4096][..], "seq 2 rolled back");
        drop(_j);
        // Corrupt in the middle: flip a byte of the first undo record.
        let mut bad = std::fs::read(&seg).unwrap();
        bad[SEGMENT_HEADER as usize + 20] ^= 0xff;
        std::fs::write(&seg, &bad).unwrap();
        let e = Journal::open(dir.path(), "d", 1, RetentionPolicy::default(), &mut d2).unwrap_err();
        assert!(matches!(e, JournalError::Corrupt { .. }), "{e}");
        // A length above the cap is corruption too, even in the active segment: a torn
        // write leaves at most the real length. (Read as a torn tail, it cut every commit
        // after it and lost their points.)
        let mut huge = full.clone();
        huge[SEGMENT_HEADER as usize + 7] |= 0x80;
        std::fs::write(&seg, &huge).unwrap();
        let e = Journal::open(dir.path(), "d", 2, RetentionPolicy::default(), &mut d2).unwrap_err();
        assert!(
            matches!(&e, JournalError::Corrupt { reason, .. } if reason.contains("beyond the cap")),
            "{e}"
        );
    }

    #[test]
    fn history_starts_after_a_gap_in_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = journal_of_two(dir.path());
        // The state file says seq 5 (seqs 3-5 left no undo): the journal starts a segment
        // there, and its history cannot reach below it.
        let (mut j, o) =
            Journal::open(dir.path(), "d", 5, RetentionPolicy::default(), &mut disk).unwrap();
        assert_eq!(o.committed_seq, 5);
        let at5 = disk.0.clone();
        write(&mut j, &mut disk, 6, &[(0, 6, 4096)], true);
        let h = History::read(dir.path(), "d").unwrap().unwrap();
        assert_eq!((h.base_seq, h.committed_seq), (5, 6));
        assert_eq!(h.commits.len(), 1, "seqs 1 and 2 are no points any more");
        h.roll_back(5, &mut disk).unwrap();
        assert_eq!(disk.0, at5);
    }

    #[test]
    fn the_quota_drops_the_oldest_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = Mem(vec![0u8; 1 << 20]);
        let policy = RetentionPolicy {
            window_ms: i64::MAX / 2,
            quota_bytes: 1,
            ..RetentionPolicy::default()
        };
        let (mut j, _) = Journal::open(dir.path(), "d", 0, policy, &mut disk).unwrap();
        write(&mut j, &mut disk, 1, &[(0, 1, 4096)], true);
        j.rotate(1).unwrap();
        write(&mut j, &mut disk, 2, &[(0, 2, 4096)], true);
        let h = History::read(dir.path(), "d").unwrap().unwrap();
        assert_eq!(h.base_seq, 1, "segment 1 pruned");
        assert_eq!(
            list_segments(&journal_dir(dir.path(), "d")).unwrap(),
            vec![2]
        );
        // The quota, not the window, dropped it: warned once, with how far back points reach.
        assert_eq!(j.warned_reach_seq, 1);
    }

    #[test]
    fn segments_older_than_the_window_are_pruned_and_the_active_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = Mem(vec![0u8; 1 << 20]);
        let policy = RetentionPolicy {
            window_ms: 2500,
            quota_bytes: 0,
            ..RetentionPolicy::default()
        };
        let (mut j, _) = Journal::open(dir.path(), "d", 0, policy, &mut disk).unwrap();
        for seq in 1..=6u64 {
            write(
                &mut j,
                &mut disk,
                seq,
                &[(seq * 4096, seq as u8, 4096)],
                true,
            );
            j.rotate(seq).unwrap();
        }
        // Batch n has source time n s; the newest is 6 s: segments whose newest batch is
        // older than 3.5 s (seqs 1-3) are gone, the empty active segment stays.
        let h = History::read(dir.path(), "d").unwrap().unwrap();
        assert_eq!(h.base_seq, 3);
        let seqs: Vec<u64> = h.commits.iter().filter_map(Commit::last_seq).collect();
        assert_eq!(seqs, [4, 5, 6]);
        let mut copy = Mem(disk.0.clone());
        h.roll_back(3, &mut copy).unwrap();
        assert_eq!(copy.0[4 * 4096], 0);
        assert_eq!(copy.0[3 * 4096], 3);
    }

    #[test]
    fn commit_records_round_trip() {
        let c = Commit {
            applied_unix_ms: 7,
            batches: vec![BatchEntry {
                seq: 3,
                batch_unix_ms: 9,
                in_resync: true,
                thinned: false,
            }],
            markers: vec![MarkerEntry {
                seq: 3,
                marker: Marker {
                    id: "m".into(),
                    kind: 2,
                    time_unix_ms: 5,
                    group: "g".into(),
                    tag: "t".into(),
                },
            }],
        };
        let mut v = Vec::new();
        c.encode(&mut v);
        assert_eq!(Commit::decode(&v), Some(c));
        assert_eq!(Commit::decode(&v[..v.len() - 1]), None);
    }

    /// Replicates 6 hours of batches (one every 10 min, some committed in pairs, an app
    /// marker now and then, segments rotated twice) under `policy`; returns the journal's
    /// bytes, its history, the disk at the end, and the disk after each seq.
    fn six_hours(policy: RetentionPolicy) -> (u64, History, Mem, Vec<Vec<u8>>, tempfile::TempDir) {
        const MIN: i64 = 60_000;
        let t0 = 100 * 60 * MIN; // on an hour boundary
        let dir = tempfile::tempdir().unwrap();
        let mut disk = Mem(vec![0u8; 256 << 10]);
        let (mut j, _) = Journal::open(dir.path(), "d", 0, policy, &mut disk).unwrap();
        let mut states = vec![disk.0.clone()];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut seq = 0u64;
        while seq < 36 {
            // Batches 7-8, 19-20 and 29-30 are one commit group.
            let group = if matches!(seq + 1, 7 | 19 | 29) { 2 } else { 1 };
            let mut commit = Commit::default();
            for _ in 0..group {
                seq += 1;
                let ms = t0 + seq as i64 * 10 * MIN;
                let writes: Vec<(u64, u8, u64)> = (0..3)
                    .map(|_| {
                        let o = next(200 << 10);
                        // Some writes zero what was there: undo of non-zero old bytes.
                        let v = if next(4) == 0 { 0 } else { seq as u8 };
                        (o, v, 1 + next(40 << 10))
                    })
                    .collect();
                let before = disk.0.clone();
                j.append_undo(seq, ms, writes.iter().map(|&(o, _, l)| (o, l)), |o, buf| {
                    buf.copy_from_slice(&before[o as usize..o as usize + buf.len()]);
                    Ok(())
                })
                .unwrap();
                for &(o, v, l) in &writes {
                    disk.0[o as usize..(o + l) as usize].fill(v);
                }
                states.push(disk.0.clone());
                commit.batches.push(BatchEntry {
                    seq,
                    batch_unix_ms: ms,
                    in_resync: false,
                    thinned: false,
                });
                if seq % 5 == 2 {
                    commit.markers.push(MarkerEntry {
                        seq,
                        marker: Marker {
                            id: format!("m{seq}"),
                            kind: MarkerKind::App as i32,
                            time_unix_ms: ms,
                            group: String::new(),
                            tag: String::new(),
                        },
                    });
                }
            }
            j.sync().unwrap();
            j.commit(&commit).unwrap();
            if matches!(seq, 10 | 25) {
                j.rotate(seq).unwrap();
            }
        }
        let h = History::read(dir.path(), "d").unwrap().unwrap();
        (j.bytes(), h, disk, states, dir)
    }

    #[test]
    fn thinning_keeps_two_hours_then_one_point_an_hour_and_each_recovers_exactly() {
        let keep_all = RetentionPolicy {
            thin_after_ms: i64::MAX / 4,
            ..RetentionPolicy::default()
        };
        let (unthinned_bytes, h, _, _, _dir) = six_hours(keep_all);
        assert!(
            h.commits
                .iter()
                .flat_map(|c| &c.batches)
                .all(|b| b.is_point())
        );
        let (bytes, h, disk, states, _dir) = six_hours(RetentionPolicy::default());
        assert!(
            bytes < unthinned_bytes,
            "compaction saves space: {bytes} >= {unthinned_bytes}"
        );
        let points: Vec<u64> = h
            .commits
            .iter()
            .flat_map(|c| &c.batches)
            .filter(|b| b.is_point())
            .map(|b| b.seq)
            .collect();
        // Newest batch 36 at t0 + 360 min: everything from t0 + 240 min (seq 24) is kept;
        // hours [t0, t0+60) .. [t0+180, t0+240) keep one point each: the newest with an
        // app marker (seqs 2, 7, 12, 17, 22, ...), else the newest batch.
        assert_eq!(
            points,
            [
                2, 7, 17, 22, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36
            ],
            "hour 2 ([t0+120, t0+180): seqs 12-17) keeps 17, its newest app marker"
        );
        let markers: Vec<u64> = h
            .commits
            .iter()
            .flat_map(|c| &c.markers)
            .map(|m| m.seq)
            .collect();
        assert!(markers.iter().all(|s| points.contains(s)), "{markers:?}");
        for &p in &points {
            let mut copy = Mem(disk.0.clone());
            h.roll_back(p, &mut copy).unwrap();
            assert!(
                copy.0 == states[p as usize],
                "point {p} recovers byte for byte"
            );
        }
        // The oldest state the journal holds (its base) is still exact too.
        let mut copy = Mem(disk.0.clone());
        h.roll_back(h.base_seq, &mut copy).unwrap();
        assert!(copy.0 == states[h.base_seq as usize]);
    }

    #[test]
    fn a_segment_rewrite_interrupted_before_its_rename_leaves_the_old_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = Mem(vec![0u8; 1 << 20]);
        let policy = RetentionPolicy::default();
        let (mut j, _) = Journal::open(dir.path(), "d", 0, policy, &mut disk).unwrap();
        write(&mut j, &mut disk, 1, &[(0, 1, 4096)], true);
        drop(j);
        // A crash after writing the new segment, before the rename: a half-written file.
        let jd = journal_dir(dir.path(), "d");
        let tmp = segment_tmp_path(&jd, 1);
        std::fs::write(&tmp, b"FBMTJRN1 half").unwrap();
        let (_, o) = Journal::open(dir.path(), "d", 1, policy, &mut disk).unwrap();
        assert_eq!(o.committed_seq, 1);
        assert!(!tmp.exists(), "the leftover is removed");
        let h = History::read(dir.path(), "d").unwrap().unwrap();
        assert_eq!(h.undos.len(), 1);
    }

    /// A target that refuses ranges outside it instead of panicking.
    struct Bounded(Vec<u8>);

    impl UndoTarget for Bounded {
        fn restore(&mut self, offset: u64, len: u32, data: Option<&[u8]>) -> io::Result<()> {
            let r = usize::try_from(offset)
                .ok()
                .and_then(|o| self.0.get_mut(o..o.checked_add(len as usize)?))
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            match data {
                Some(d) => r.copy_from_slice(d),
                None => r.fill(0),
            }
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Reads the journal of disk `d` under `dir` as every reader does: History (and a
    /// roll back to its base), then the writer's open. None may panic.
    fn read_every_way(dir: &Path) {
        if let Ok(Some(h)) = History::read(dir, "d") {
            let _ = h.roll_back(h.base_seq, &mut Bounded(vec![0u8; 1 << 16]));
        }
        let _ = Journal::open(
            dir,
            "d",
            0,
            RetentionPolicy::default(),
            &mut Bounded(vec![0u8; 1 << 16]),
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
        /// A segment of arbitrary bytes is refused, never a panic.
        #[test]
        fn a_segment_of_arbitrary_bytes_is_an_error(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096)) {
            let dir = tempfile::tempdir().unwrap();
            let jd = journal_dir(dir.path(), "d");
            std::fs::create_dir_all(&jd).unwrap();
            std::fs::write(segment_path(&jd, 1), &bytes).unwrap();
            proptest::prop_assert!(History::read(dir.path(), "d").is_err());
            read_every_way(dir.path());
        }

        /// A valid header followed by arbitrary records: read (a torn tail is allowed in
        /// the active segment) or refused, never a panic.
        #[test]
        fn arbitrary_records_after_a_valid_header_never_panic(
            records in proptest::collection::vec((1u8..=3, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), proptest::prelude::any::<bool>()), 0..6),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let jd = journal_dir(dir.path(), "d");
            std::fs::create_dir_all(&jd).unwrap();
            let mut seg = encode_header(0, 0).to_vec();
            for (kind, payload, good_crc) in records {
                // With a good CRC the payload decoders see the arbitrary bytes too.
                let at = seg.len();
                encode_record(1, kind, &payload, &mut seg);
                if !good_crc {
                    seg[at + 8] ^= 1;
                }
            }
            std::fs::write(segment_path(&jd, 1), &seg).unwrap();
            read_every_way(dir.path());
        }

        /// A valid journal (two segments) with arbitrary bytes flipped, or cut short:
        /// refused, or read as far as it is intact, never a panic.
        #[test]
        fn a_corrupted_journal_never_panics(
            flips in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), 1u8..=255), 0..4),
            cut in proptest::option::of(proptest::prelude::any::<proptest::sample::Index>()),
            which in 1u64..=2,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut disk = Mem(vec![0u8; 1 << 16]);
            let (mut j, _) =
                Journal::open(dir.path(), "d", 0, RetentionPolicy::default(), &mut disk).unwrap();
            write(&mut j, &mut disk, 1, &[(0, 1, 4096), (8192, 0, 100)], true);
            j.rotate(1).unwrap();
            write(&mut j, &mut disk, 2, &[(4096, 2, 5000)], true);
            write(&mut j, &mut disk, 3, &[(0, 3, 60_000)], false);
            drop(j);
            let seg = segment_path(&journal_dir(dir.path(), "d"), which);
            let mut b = std::fs::read(&seg).unwrap();
            for (at, x) in flips {
                let i = at.index(b.len());
                b[i] ^= x;
            }
            if let Some(c) = cut {
                b.truncate(c.index(b.len()));
            }
            std::fs::write(&seg, &b).unwrap();
            read_every_way(dir.path());
        }
    }

    /// A group whose COMMIT is already durable (the state file then failed for lack of
    /// space) is cut back whole: the target gets its old bytes, the journal ends at the
    /// previous commit, and the next group appends after it as if nothing happened.
    #[test]
    fn abort_group_cuts_a_durable_commit_and_restores_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = Mem(vec![0u8; 1 << 16]);
        let (mut j, _) =
            Journal::open(dir.path(), "d", 0, RetentionPolicy::default(), &mut disk).unwrap();
        write(&mut j, &mut disk, 1, &[(0, 1, 8192)], true);
        let after_one = disk.0.clone();
        let len_after_one = j.bytes();
        write(&mut j, &mut disk, 2, &[(4096, 2, 30_000)], false);
        j.append_commit(&Commit::of_one(2, vec![])).unwrap();
        assert_eq!(
            History::read(dir.path(), "d")
                .unwrap()
                .unwrap()
                .committed_seq,
            2
        );
        assert_eq!(j.abort_group(Some(&mut disk)).unwrap(), 1);
        assert!(disk.0 == after_one, "seq 2 restored");
        assert_eq!(j.bytes(), len_after_one);
        let h = History::read(dir.path(), "d").unwrap().unwrap();
        assert_eq!((h.committed_seq, h.undos.len()), (1, 1));
        // Nothing of the group reached the target: only the records go.
        j.append_undo(2, 2000, [(0u64, 100u64)].into_iter(), |_, b| {
            b.fill(9);
            Ok(())
        })
        .unwrap();
        assert_eq!(j.abort_group(None).unwrap(), 0);
        assert!(disk.0 == after_one);
        // The re-sent group commits after the cut.
        write(&mut j, &mut disk, 2, &[(4096, 2, 30_000)], true);
        let h = History::read(dir.path(), "d").unwrap().unwrap();
        assert_eq!(h.committed_seq, 2);
        let mut copy = Mem(disk.0.clone());
        h.roll_back(1, &mut copy).unwrap();
        assert!(copy.0 == after_one);
    }
}
