//! The segmented append-only log: recovery scan, the group-commit writer thread, record reads
//! and segment deletion. Record and segment layout: [`super::segment`].
//!
//! Group commit (modelled on raft-engine's write barrier, without a timer): one dedicated
//! thread drains the bounded queue of append requests, writes every queued record with
//! buffered `pwrite`s, issues **one** `fdatasync`, then completes each request. A lone writer
//! syncs at once; under load the queue fills while a sync runs, so the next group is larger.
//!
//! Segments are preallocated to the segment size (`fallocate`), so appends overwrite reserved
//! blocks instead of growing the file; a segment is cut to its last record when it is sealed.
//! Segments whose records are all applied are kept for reuse (up to [`MAX_FREE`] files named
//! `<seq>.free`) rather than deleted: the next segment takes one, writes its own header (its
//! seq seeds every record's CRC, so the previous use's records can never pass as its own),
//! and is renamed into place.
//!
//! Failure model (PITFALLS §4):
//! * `fdatasync`/`fsync` errors are fatal and never retried: Linux may have dropped the dirty
//!   pages, so a retry could "succeed" over lost data. The writer reports it and stops; the
//!   records of the failed group and of every queued request are never acknowledged, and the
//!   server refuses agents and stops forwarding until it is restarted (`crate::server`).
//!   Recovery then reads the segments from the volume, not from cached pages ([`recover`]).
//! * `ENOSPC`/`EDQUOT` on a write: the partial write is truncated away, the cache reports
//!   "no space" (agents are paused), the free segment files are deleted to make room, and the
//!   same records are written again once a segment is retired (deleted, not kept, while the
//!   volume is full) or after a second. Nothing acknowledged is touched.
//! * Recovery: a torn record (or a stale one from the file's previous use) at the end of the
//!   newest segment is truncated away (and the truncation synced) before anything is
//!   appended. A bad record followed by a valid one, or a bad record in a sealed segment, is
//!   corruption in the middle of the log: it is reported as [`Damage`] so that the disks
//!   concerned (only those) can be put into "resync required".

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use prost::Message;
use protocol::pb::Batch;
use tokio::sync::{mpsc, oneshot};

use super::index::{Index, Loc};
use super::segment::{self, Decoded, HEADER_LEN};

/// Most requests one group commit takes from the queue.
const MAX_GROUP: usize = 1024;
/// Most record bytes one group commit writes before it syncs (and so the size of the
/// writer's buffer, which holds a copy of them: memory beyond the ingest budget).
pub const MAX_GROUP_BYTES: usize = 64 << 20;
/// Applied segments kept for reuse rather than deleted: overwriting a file already written
/// costs about half of writing new blocks (PITFALLS §4), while this bounds the space they
/// hold beyond the quota to `MAX_FREE x segment_size`.
pub const MAX_FREE: usize = 4;
/// File name suffix of free segments (`<last seq, 16 digits>.free`).
const FREE_SUFFIX: &str = ".free";

/// Seqs (former names) of the free segment files, shared by the writer (takes) and the
/// janitor (gives).
pub type FreePool = Arc<parking_lot::Mutex<Vec<u64>>>;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot list cache directory {path}: {source}")]
    ListingDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open cache segment {path}: {source}")]
    OpeningSegment {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read cache segment {path}: {source}")]
    ReadingSegment {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write cache segment {path}: {source}")]
    WritingSegment {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot truncate cache segment {path}: {source}")]
    TruncatingSegment {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{op} of {path} failed with {errno}: {source} (fatal: a failed sync is never retried)",
        errno = errno_name(.source)
    )]
    Syncing {
        /// `fsync` or `fdatasync`.
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot delete cache segment {path}: {source}")]
    DeletingSegment {
        path: String,
        source: std::io::Error,
    },
    #[error("record of disk {disk} seq {seq} at {path} offset {offset} is corrupt")]
    CorruptRecord {
        path: String,
        offset: u64,
        disk: String,
        seq: u64,
    },
    #[error("the cache log writer has stopped after a fatal error")]
    WriterStopped,
    #[error("a cache I/O task panicked")]
    TaskFailed,
}

/// The symbolic name of an I/O error's errno (`EIO`), which operators search for; the
/// number for the rarer ones.
pub fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EIO) => "EIO".into(),
        Some(libc::ENOSPC) => "ENOSPC".into(),
        Some(libc::EDQUOT) => "EDQUOT".into(),
        Some(libc::EROFS) => "EROFS".into(),
        Some(n) => format!("errno {n}"),
        None => "an I/O error".into(),
    }
}

/// Whether an I/O error means the volume is full.
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Corruption found in the middle of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub segment: u64,
    pub offset: u64,
    /// The disk the bad record's header names, when readable; `None` = any disk of the segment.
    pub disk_hint: Option<String>,
    pub what: String,
}

/// The state of the log after a recovery scan.
#[derive(Debug)]
pub struct Recovered {
    pub index: Index,
    pub damage: Vec<Damage>,
    /// Total bytes of all segment files.
    pub usage: u64,
    /// Bytes cut off the newest segment's torn tail.
    pub truncated: u64,
    pub(super) active: Active,
    /// Free segment files, for reuse.
    pub(super) free: Vec<u64>,
}

/// The segment appends go to.
#[derive(Debug)]
pub(super) struct Active {
    pub seq: u64,
    pub file: File,
    pub len: u64,
}

pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(segment::file_name(seq))
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

/// fsync of a directory, so that created, renamed or deleted entries are durable.
pub fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| LogError::Syncing {
            op: "fsync",
            path: shown(dir),
            source,
        })
}

/// Segment seqs in `dir`, ascending.
pub fn list_segments(dir: &Path) -> Result<Vec<u64>, LogError> {
    let err = |source| LogError::ListingDir {
        path: shown(dir),
        source,
    };
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        if let Some(seq) = entry
            .file_name()
            .to_str()
            .and_then(segment::parse_file_name)
        {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Scans every segment of `dir` as the volume holds it (cached pages dropped first),
/// truncates a torn tail of the newest one (synced before returning), rebuilds the index,
/// opens (or creates) the segment to append to, preallocated to `segment_size`, and collects
/// the free segments for reuse.
pub fn recover(dir: &Path, segment_size: u64) -> Result<Recovered, LogError> {
    let free = recover_free(dir)?;
    let seqs = list_segments(dir)?;
    let mut index = Index::default();
    let mut damage = Vec::new();
    let mut usage = 0;
    let mut truncated = 0;
    let mut active = None;
    for (i, &seq) in seqs.iter().enumerate() {
        let newest = i + 1 == seqs.len();
        let path = segment_path(dir, seq);
        let data = read_whole(&path)?;
        if let Err(e) = segment::decode_header(&data, seq) {
            if newest && data.iter().skip(HEADER_LEN).all(|&b| b == 0) {
                // Torn at creation (before or after its preallocation): no record was ever
                // written to it, so nothing in it was acknowledged.
                tracing::warn!(
                    segment = seq,
                    "newest cache segment has a torn header ({e}); rewriting it"
                );
                active = Some(create_segment_file(dir, seq, true, segment_size)?);
                usage += HEADER_LEN as u64;
                index.note_segment_len(seq, HEADER_LEN as u64);
                continue;
            }
            // The records carry their own checks, seeded by the seq of the file name.
            tracing::error!(
                segment = seq,
                "cache segment header is damaged ({e}); scanning its records anyway"
            );
        }
        let end = scan(seq, &data, newest, &mut index, &mut damage);
        index.note_segment_len(seq, end as u64);
        if newest {
            let (file, cut) = open_newest(&path, &data, end, segment_size)?;
            truncated = cut;
            active = Some(Active {
                seq,
                file,
                len: end as u64,
            });
            usage += end as u64;
        } else {
            usage += data.len() as u64;
        }
    }
    let active = match active {
        Some(a) => a,
        None => {
            let a = create_segment_file(dir, 1, false, segment_size)?;
            index.note_segment_len(1, HEADER_LEN as u64);
            usage += HEADER_LEN as u64;
            a
        }
    };
    Ok(Recovered {
        index,
        damage,
        usage,
        truncated,
        active,
        free,
    })
}

/// Opens the newest segment to append at `end` (where its good records end) and preallocates
/// it; returns the file and how many bytes of a torn or stale tail were cut.
///
/// A preallocated tail reads as zeros; anything else after the last good record (a torn
/// write, or records of the file's previous use) is cut and synced before anything is
/// appended, so a later append can never end next to a leftover that passes its check.
fn open_newest(
    path: &Path,
    data: &[u8],
    end: usize,
    segment_size: u64,
) -> Result<(File, u64), LogError> {
    let file = open_rw(path)?;
    let mut truncated = 0;
    if data[end..].iter().any(|&b| b != 0) {
        truncated = (data.len() - end) as u64;
        tracing::warn!(
            path = %path.display(),
            offset = end,
            bytes = truncated,
            "truncating the torn tail of the newest cache segment"
        );
        file.set_len(end as u64)
            .map_err(|source| LogError::TruncatingSegment {
                path: shown(path),
                source,
            })?;
    }
    preallocate(&file, segment_size).map_err(|source| LogError::WritingSegment {
        path: shown(path),
        source,
    })?;
    file.sync_all().map_err(|source| LogError::Syncing {
        op: "fsync",
        path: shown(path),
        source,
    })?;
    Ok((file, truncated))
}

/// Scans the records of one segment into `index`; returns the offset where valid data ends.
fn scan(seq: u64, data: &[u8], newest: bool, index: &mut Index, damage: &mut Vec<Damage>) -> usize {
    let mut off = HEADER_LEN.min(data.len());
    loop {
        match segment::decode_record(seq, &data[off..]) {
            Decoded::Record(r) => {
                index.insert(
                    r.disk_id,
                    r.seq,
                    Loc {
                        segment: seq,
                        offset: off as u64,
                        len: r.total_len as u32,
                        time_unix_ms: r.time_unix_ms,
                    },
                );
                off += r.total_len;
            }
            Decoded::End => {
                if !newest && data[off..].iter().any(|&b| b != 0) {
                    damage.push(Damage {
                        segment: seq,
                        offset: off as u64,
                        disk_hint: None,
                        what: "zeroed region followed by data in a sealed segment".into(),
                    });
                }
                // In the newest segment anything after the end marker was never acknowledged.
                return if newest { off } else { data.len() };
            }
            Decoded::Bad {
                total_len,
                disk_hint,
            } => {
                // Its length is intact if a valid record follows, or, in a sealed segment (cut
                // to its last record and synced when sealed), if it ends the segment exactly:
                // then only this record is lost.
                let bounded = total_len.filter(|&t| {
                    let rest = &data[off + t..];
                    matches!(segment::decode_record(seq, rest), Decoded::Record(_))
                        || (!newest && rest.is_empty())
                });
                if let Some(t) = bounded {
                    damage.push(Damage {
                        segment: seq,
                        offset: off as u64,
                        disk_hint,
                        what: "corrupt record between intact ones".into(),
                    });
                    off += t;
                    continue;
                }
                if newest {
                    // A torn tail: the write never completed, so it was never acknowledged.
                    return off;
                }
                damage.push(Damage {
                    segment: seq,
                    offset: off as u64,
                    disk_hint: None,
                    what: "corrupt record in a sealed segment; the rest of it is unreadable".into(),
                });
                return data.len();
            }
        }
    }
}

/// Reads a whole segment from the volume, not from cached pages: after a failed sync the
/// kernel may keep pages whose write-back failed, marked clean, that the disk never got
/// (PITFALLS §4), and a recovery that trusted them would forward records that are not
/// durable. `POSIX_FADV_DONTNEED` drops the file's clean cached pages first (dirty ones, of a
/// log that was not synced, stay and were never acknowledged anyway).
fn read_whole(path: &Path) -> Result<Vec<u8>, LogError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| {
            // SAFETY: posix_fadvise on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc != 0 {
                tracing::debug!(path = %path.display(), rc, "cannot drop cached pages; reading them");
            }
            f.read_to_end(&mut data)
        })
        .map_err(|source| LogError::ReadingSegment {
            path: shown(path),
            source,
        })?;
    Ok(data)
}

fn open_rw(path: &Path) -> Result<File, LogError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| LogError::OpeningSegment {
            path: shown(path),
            source,
        })
}

/// Reserves the first `len` bytes of `file` (`fallocate`, mode 0: the file grows to `len`,
/// reading as zeros), so appends neither allocate nor change the file size. A filesystem
/// without `fallocate` just goes without.
fn preallocate(file: &File, len: u64) -> std::io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: fallocate on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Ok(()),
        _ => Err(e),
    }
}

/// Creates segment `seq` with its header, preallocated to `size`, then fsyncs the file and
/// the directory.
fn create_segment_file(dir: &Path, seq: u64, replace: bool, size: u64) -> Result<Active, LogError> {
    let path = segment_path(dir, seq);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .create_new(!replace)
        .truncate(replace)
        .open(&path)
        .map_err(|source| LogError::OpeningSegment {
            path: shown(&path),
            source,
        })?;
    file.write_all_at(&segment::encode_header(seq), 0)
        .and_then(|()| preallocate(&file, size))
        .map_err(|source| LogError::WritingSegment {
            path: shown(&path),
            source,
        })?;
    file.sync_all().map_err(|source| LogError::Syncing {
        op: "fsync",
        path: shown(&path),
        source,
    })?;
    sync_dir(dir)?;
    Ok(Active {
        seq,
        file,
        len: HEADER_LEN as u64,
    })
}

/// The file of free segment `id` (its last seq), kept for reuse.
fn free_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016}{FREE_SUFFIX}"))
}

/// The free segment files of `dir`; beyond [`MAX_FREE`] they are deleted.
fn recover_free(dir: &Path) -> Result<Vec<u64>, LogError> {
    let err = |source| LogError::ListingDir {
        path: shown(dir),
        source,
    };
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let name = entry.map_err(err)?.file_name();
        let id = name
            .to_str()
            .and_then(|n| n.strip_suffix(FREE_SUFFIX))
            .filter(|d| d.len() == 16 && d.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|d| d.parse::<u64>().ok());
        ids.extend(id);
    }
    ids.sort_unstable();
    if ids.len() > MAX_FREE {
        for &id in &ids[MAX_FREE..] {
            remove(&free_path(dir, id))?;
        }
        sync_dir(dir)?;
        ids.truncate(MAX_FREE);
    }
    Ok(ids)
}

fn remove(path: &Path) -> Result<(), LogError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LogError::DeletingSegment {
            path: shown(path),
            source,
        }),
    }
}

/// Takes a free segment file and makes it segment `seq`: the new header first (every record
/// of its previous use then fails its CRC, which is seeded with the segment seq), then the
/// preallocation, an fsync, and the rename to its new name (and a directory fsync). A crash
/// before the rename leaves a free file, after it a valid empty segment.
fn reuse_segment(dir: &Path, id: u64, seq: u64, size: u64) -> Result<Active, LogError> {
    let from = free_path(dir, id);
    let file = open_rw(&from)?;
    let wrote = |source| LogError::WritingSegment {
        path: shown(&from),
        source,
    };
    file.write_all_at(&segment::encode_header(seq), 0)
        .map_err(wrote)?;
    preallocate(&file, size).map_err(wrote)?;
    file.sync_all().map_err(|source| LogError::Syncing {
        op: "fsync",
        path: shown(&from),
        source,
    })?;
    let to = segment_path(dir, seq);
    std::fs::rename(&from, &to).map_err(|source| LogError::WritingSegment {
        path: shown(&to),
        source,
    })?;
    sync_dir(dir)?;
    Ok(Active {
        seq,
        file,
        len: HEADER_LEN as u64,
    })
}

/// Reads and checks the record at `loc`; returns the batch bytes.
pub fn read_record(dir: &Path, loc: Loc, disk: &str, seq: u64) -> Result<Bytes, LogError> {
    let path = segment_path(dir, loc.segment);
    let mut buf = vec![0u8; loc.len as usize];
    File::open(&path)
        .and_then(|f| f.read_exact_at(&mut buf, loc.offset))
        .map_err(|source| LogError::ReadingSegment {
            path: shown(&path),
            source,
        })?;
    match segment::decode_record(loc.segment, &buf) {
        Decoded::Record(r) if r.disk_id == disk && r.seq == seq => {
            let range = r.batch.clone();
            Ok(Bytes::from(buf).slice(range))
        }
        _ => Err(LogError::CorruptRecord {
            path: shown(&path),
            offset: loc.offset,
            disk: disk.to_string(),
            seq,
        }),
    }
}

/// Retires a segment whose records are all applied: with `keep` it joins the free pool for
/// reuse while the pool holds fewer than [`MAX_FREE`]; otherwise (or while the volume is full
/// and its space is needed) it is deleted. Durable either way.
///
/// Only one caller retires at a time (the janitor), so the pool cannot fill up between the
/// check and the push; the pool's lock is not held across the rename and directory fsync,
/// which the writer would otherwise wait for when it rotates.
pub fn retire_segment(dir: &Path, seq: u64, free: &FreePool, keep: bool) -> Result<(), LogError> {
    let path = segment_path(dir, seq);
    if keep && free.lock().len() < MAX_FREE {
        let to = free_path(dir, seq);
        std::fs::rename(&path, &to).map_err(|source| LogError::DeletingSegment {
            path: shown(&path),
            source,
        })?;
        sync_dir(dir)?;
        free.lock().push(seq);
        return Ok(());
    }
    remove(&path)?;
    sync_dir(dir)
}

/// The batch of a record: the prost encoding of a `protocol::pb::Batch`.
#[derive(Debug)]
pub enum Payload {
    /// Encoded already.
    Encoded(Bytes),
    /// The checked message, encoded by the writer straight into its group buffer: ingest
    /// does not copy a batch into an encoding of its own first (its `payload` still points
    /// into the buffer it was received in). `len` is its `encoded_len()`.
    Batch { batch: Box<Batch>, len: usize },
}

impl Payload {
    pub fn batch(batch: Batch) -> Self {
        let len = batch.encoded_len();
        Payload::Batch {
            batch: Box::new(batch),
            len,
        }
    }

    /// Bytes of the encoded batch.
    pub fn len(&self) -> usize {
        match self {
            Payload::Encoded(b) => b.len(),
            Payload::Batch { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Encoded(b) => out.extend_from_slice(b),
            // A `Vec` grows as needed, so encoding into it cannot run out of room.
            Payload::Batch { batch, .. } => {
                batch.encode(out).expect("encoding into a Vec cannot fail")
            }
        }
    }
}

/// One append request.
#[derive(Debug)]
pub struct Append {
    pub disk_id: String,
    pub seq: u64,
    pub time_unix_ms: i64,
    pub batch: Payload,
    pub done: oneshot::Sender<Result<Loc, Arc<LogError>>>,
    /// Its share of the ingest memory budget (`crate::budget`), given back when the request
    /// is dropped: after its group commit, or when the writer fails.
    pub hold: crate::budget::Share,
}

/// What the writer tells the rest of the cache.
pub trait WriterEvents: Send + Sync {
    /// The records of `group` are durable at `locs` (called before any request completes).
    fn durable(&self, group: &[Append], locs: &[Loc]);
    /// `bytes` more are in segment files outside records (a new segment's header).
    fn grew(&self, bytes: u64);
    /// The volume is full (`true`) or writing again (`false`).
    fn no_space(&self, full: bool);
    /// Blocks until space may have been freed, or a short while.
    fn wait_for_space(&self);
    /// A fatal error: the writer stops.
    fn fatal(&self, error: &LogError);
}

/// The group-commit writer. Runs on its own thread (see [`Writer::run`]).
pub(super) struct Writer {
    pub dir: PathBuf,
    pub active: Active,
    pub segment_size: u64,
    pub events: Arc<dyn WriterEvents>,
    /// Number of data syncs done (one per group), for tests and status.
    pub syncs: Arc<AtomicU64>,
    /// Seq of the segment being appended to (never deleted).
    pub active_seq: Arc<AtomicU64>,
    /// Applied segments kept for reuse.
    pub free: FreePool,
    pub buf: Vec<u8>,
}

impl Writer {
    /// Serves append requests until every sender is gone or a fatal error.
    pub fn run(mut self, mut rx: mpsc::Receiver<Append>) {
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = first.batch.len();
            let mut group = vec![first];
            while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(a) => {
                        bytes += a.batch.len();
                        group.push(a);
                    }
                    Err(_) => break,
                }
            }
            // A group that fills the active segment is committed in parts, one per segment:
            // each part is announced (index, acks) before the next segment is created, so a
            // full volume (ENOSPC at rotation) never holds back records already synced, and
            // the segments they sealed can be forwarded and deleted to free space.
            while !group.is_empty() {
                let (locs, full) = match self.commit(&group) {
                    Ok(r) => r,
                    Err(e) => return self.fail(e, group, &mut rx),
                };
                let rest = group.split_off(locs.len());
                if !locs.is_empty() {
                    self.events.durable(&group, &locs);
                    for (a, loc) in group.into_iter().zip(locs) {
                        // The budget share goes back before the ack, so whoever the ack
                        // wakes finds it free.
                        let Append { done, hold, .. } = a;
                        drop(hold);
                        let _ = done.send(Ok(loc));
                    }
                }
                if full && let Err(e) = self.rotate() {
                    return self.fail(e, rest, &mut rx);
                }
                // Published only now: segments below the active one are candidates for
                // deletion, so the index must know their records first (`durable`).
                self.active_seq.store(self.active.seq, Ordering::Release);
                group = rest;
            }
        }
    }

    /// A fatal error: fails `group` and everything queued, and stops taking appends.
    fn fail(&self, e: LogError, group: Vec<Append>, rx: &mut mpsc::Receiver<Append>) {
        // The pages of this group may have been dropped or marked clean by the kernel (a
        // retry would "succeed" over lost data), so the page cache of the whole volume is
        // untrusted from here on: a restart re-reads the log from the disk.
        tracing::error!(
            "cache volume {}: {e}; no batch is accepted or forwarded until the process server \
             is restarted",
            self.dir.display()
        );
        self.events.fatal(&e);
        let e = Arc::new(e);
        rx.close();
        for a in group {
            let _ = a.done.send(Err(e.clone()));
        }
        while let Ok(a) = rx.try_recv() {
            let _ = a.done.send(Err(e.clone()));
        }
    }

    /// Writes the records of `group` that fit in the active segment and syncs them; returns
    /// where each went (a prefix of `group`) and whether the segment is full (the next record
    /// does not fit, so the caller rotates).
    fn commit(&mut self, group: &[Append]) -> Result<(Vec<Loc>, bool), LogError> {
        self.buf.clear();
        let mut locs = Vec::with_capacity(group.len());
        let mut full = false;
        for a in group {
            let rec_len = segment::record_len(&a.disk_id, a.batch.len()) as u64;
            let end = self.active.len + self.buf.len() as u64;
            if end + rec_len > self.segment_size && end > HEADER_LEN as u64 {
                full = true;
                break;
            }
            let offset = self.active.len + self.buf.len() as u64;
            segment::encode_record_with(
                &mut self.buf,
                self.active.seq,
                &a.disk_id,
                a.seq,
                a.time_unix_ms,
                a.batch.len(),
                |out| a.batch.put(out),
            );
            locs.push(Loc {
                segment: self.active.seq,
                offset,
                len: rec_len as u32,
                time_unix_ms: a.time_unix_ms,
            });
        }
        if !locs.is_empty() {
            self.write_buf()?;
            let last_seq = group[..locs.len()].iter().map(|a| a.seq).max();
            self.sync(last_seq.unwrap_or_default())?;
        }
        Ok((locs, full))
    }

    fn path(&self) -> String {
        shown(&segment_path(&self.dir, self.active.seq))
    }

    /// Writes the buffer at the end of the active segment, waiting out a full volume.
    fn write_buf(&mut self) -> Result<(), LogError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut waited = false;
        loop {
            match self.active.file.write_all_at(&self.buf, self.active.len) {
                Ok(()) => break,
                Err(e) if is_no_space(&e) => {
                    // Cut the partial write so the log ends on a record boundary.
                    self.active
                        .file
                        .set_len(self.active.len)
                        .map_err(|source| LogError::TruncatingSegment {
                            path: self.path(),
                            source,
                        })?;
                    if !waited {
                        tracing::warn!(
                            "cache volume full (ENOSPC) writing {}; pausing agents",
                            self.path()
                        );
                    }
                    waited = true;
                    self.events.no_space(true);
                    if !self.drop_free() {
                        self.events.wait_for_space();
                    }
                }
                Err(source) => {
                    return Err(LogError::WritingSegment {
                        path: self.path(),
                        source,
                    });
                }
            }
        }
        if waited {
            self.events.no_space(false);
        }
        // Usage grows in `WriterEvents::durable`, when the queued bytes become records.
        self.active.len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// The group commit's one data sync; `last_seq` (the group's highest seq) only picks
    /// the groups a test failpoint fails.
    fn sync(&mut self, last_seq: u64) -> Result<(), LogError> {
        crate::failpoint::sync_eio(last_seq)
            .and_then(|()| self.active.file.sync_data())
            .map_err(|source| LogError::Syncing {
                op: "fdatasync",
                path: self.path(),
                source,
            })?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Seals the active segment (already synced) and starts the next one.
    fn rotate(&mut self) -> Result<(), LogError> {
        self.seal()?;
        let next = self.active.seq + 1;
        let active = loop {
            match self.next_segment(next) {
                Ok(a) => break a,
                Err(LogError::WritingSegment { source, .. }) if is_no_space(&source) => {
                    self.events.no_space(true);
                    self.events.wait_for_space();
                }
                Err(e) => return Err(e),
            }
        };
        self.events.no_space(false);
        self.active = active;
        self.events.grew(HEADER_LEN as u64);
        tracing::debug!(segment = next, "new cache segment");
        Ok(())
    }

    /// Cuts the active segment's unused preallocated tail, durably: a sealed segment ends at
    /// its last record, so recovery can tell a zeroed block in the middle of the log (damage)
    /// from the end, and a reused file's stale tail never follows a sealed segment's records.
    fn seal(&mut self) -> Result<(), LogError> {
        let path = self.path();
        self.active
            .file
            .set_len(self.active.len)
            .map_err(|source| LogError::TruncatingSegment {
                path: path.clone(),
                source,
            })?;
        self.active
            .file
            .sync_all()
            .map_err(|source| LogError::Syncing {
                op: "fsync",
                path,
                source,
            })
    }

    /// Deletes every free segment file, to give its space to the volume; returns whether
    /// there was any. A failure is logged: waiting for the janitor is the fallback.
    fn drop_free(&self) -> bool {
        let ids = std::mem::take(&mut *self.free.lock());
        for &id in &ids {
            if let Err(e) = remove(&free_path(&self.dir, id)) {
                tracing::warn!("cannot delete free cache segment {id}: {e}");
            }
        }
        !ids.is_empty()
    }

    /// Segment `seq`, from a free file if there is one, else a new file.
    fn next_segment(&mut self, seq: u64) -> Result<Active, LogError> {
        let reused = self.free.lock().pop();
        if let Some(id) = reused {
            match reuse_segment(&self.dir, id, seq, self.segment_size) {
                Ok(a) => return Ok(a),
                // A failed sync is fatal for the volume, never worked around (module doc).
                Err(e @ LogError::Syncing { .. }) => return Err(e),
                Err(e) => {
                    // The free file is dropped; a new one serves instead.
                    tracing::warn!("cannot reuse free cache segment {id}: {e}");
                    remove(&free_path(&self.dir, id))?;
                }
            }
        }
        create_segment_file(&self.dir, seq, true, self.segment_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_sync_names_the_file_and_the_errno() {
        let e = LogError::Syncing {
            op: "fdatasync",
            path: "/cache/0000000000000001.seg".into(),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        };
        let text = e.to_string();
        assert!(
            text.starts_with("fdatasync of /cache/0000000000000001.seg failed with EIO: "),
            "{text}"
        );
        assert!(text.contains("never retried"), "{text}");
        assert_eq!(
            errno_name(&std::io::Error::from_raw_os_error(libc::EBADF)),
            format!("errno {}", libc::EBADF)
        );
    }
}
