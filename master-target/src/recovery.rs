//! Recovery points of a disk and recovery to one of them, from the undo journal.
//!
//! Points: every committed batch outside a resync interval (kind `batch`, crash-consistent
//! for that disk) and every marker (`crash`, `app`, `user`) whose batch is outside one,
//! as long as the journal still holds the undo data to go back to it (seq >= the oldest
//! segment's base). A point at seq `p` is the disk right after batch `p`.
//!
//! Recovery to a point:
//! * to a new VMDK (`recover --out`): under the disk's commit lock (so a live applier is
//!   between commits) the journal is read and the target's flat extent copied; the lock is
//!   then released, replication goes on, and the undo records above `p` are applied to the
//!   copy, newest first. The copy gets a new `ddb.uuid` (it is another disk).
//! * in place (`recover --in-place`): only while no master target serves the retention
//!   volume (its lock is taken here). An intent file `disks/<id>.rollback` ([`Intent`]:
//!   the seq `p` resolved from `--point`, and that point) is written before the target
//!   changes and removed last: while it exists the server refuses to open the disk and
//!   `recover --out` refuses to copy it, because an interrupted roll back must be run
//!   again, to the same seq (rolling back is idempotent as a whole pass; the point is not
//!   resolved again, the journal may be cut back already), and a re-run with another
//!   `--point` is refused. Order: uncommitted tail rolled back -> point resolved -> intent
//!   -> undo above `p` applied and synced -> journal cut back to `p` (atomically) -> state
//!   file says `p` -> intent removed.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::retention::CommitLock;
use crate::retention::journal::{self, History, JournalError, RetentionPolicy, UndoTarget};
use crate::state::{DiskState, StateError};
use crate::status::format_time;
use crate::vmdk::descriptor::CreateType;
use crate::vmdk::extent::{DataLayout, DataRef, Extent, Reader};
use crate::vmdk::{self, VmdkError};

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("no disk {disk_id} on the retention volume {retention}")]
    UnknownDisk { disk_id: String, retention: String },
    #[error("disk {0} has no undo journal yet: nothing to recover to")]
    NoJournal(String),
    #[error("no recovery point matches '{0}' (see recovery-points)")]
    NoSuchPoint(String),
    #[error("{0} already exists; choose a new --out")]
    OutputExists(PathBuf),
    #[error("--out must name a .vmdk file in an existing directory, not {0}")]
    BadOutput(PathBuf),
    #[error(
        "disk {0} is being received by a running master target ({1}); stop it before an in-place recovery"
    )]
    InUse(String, String),
    #[error(
        "an in-place recovery of disk {disk_id} to point '{point}' (seq {seq}) was interrupted \
         and left the disk between points ({path} exists): finish it first with \
         `master-target recover --in-place --point '{point}'`"
    )]
    Interrupted {
        disk_id: String,
        point: String,
        seq: u64,
        path: PathBuf,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("no disk on this retention volume holds a marker of group '{0}'")]
    NoSuchGroup(String),
    #[error(
        "recovering disk {disk_id} of the group failed ({done} disk(s) before it were recovered): {source}"
    )]
    GroupDisk {
        disk_id: String,
        done: usize,
        source: Box<RecoveryError>,
    },
    #[error("{0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Journal(#[from] JournalError),
    #[error("{0}")]
    Vmdk(#[from] VmdkError),
}

/// One recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    /// Source time of the point (ms since the epoch).
    pub time_unix_ms: i64,
    /// `crash`, `app`, `user` for markers; `batch` for a committed batch boundary.
    pub kind: String,
    pub tag: String,
    pub marker_id: String,
    pub group: String,
    /// The batch after which the point holds.
    pub seq: u64,
    /// Bytes of undo data a recovery to this point rolls back.
    pub undo_bytes: u64,
}

/// Bytes read at a time when copying a sparse disk.
const COPY_CHUNK: usize = 1 << 20;

/// Path of the in-place intent file of `disk_id`.
pub fn intent_path(retention: &Path, disk_id: &str) -> PathBuf {
    crate::state::disks_dir(retention).join(format!("{disk_id}.rollback"))
}

/// What an unfinished in-place recovery was doing, from its intent file (text: the seq it
/// goes back to, a newline, the `--point` it was given). A re-run must go back to that same
/// seq: the point cannot be resolved again, as the journal may be cut back already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub seq: u64,
    pub point: String,
}

impl Intent {
    fn encode(&self) -> Vec<u8> {
        format!("{}\n{}", self.seq, self.point).into_bytes()
    }

    /// The intent of `disk_id`, if an in-place recovery of it is unfinished.
    pub fn read(retention: &Path, disk_id: &str) -> Result<Option<Intent>, RecoveryError> {
        let path = intent_path(retention, disk_id);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_at("read", &path)(e)),
        };
        let parsed = text
            .split_once('\n')
            .and_then(|(seq, point)| Some((seq.parse().ok()?, point)));
        match parsed {
            Some((seq, point)) => Ok(Some(Intent {
                seq,
                point: point.to_string(),
            })),
            None => Err(io_at("parse", &path)(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an in-place recovery intent (SEQ, newline, POINT)",
            ))),
        }
    }

    fn refusal(self, retention: &Path, disk_id: &str) -> RecoveryError {
        RecoveryError::Interrupted {
            disk_id: disk_id.to_string(),
            point: self.point,
            seq: self.seq,
            path: intent_path(retention, disk_id),
        }
    }
}

fn load_state(retention: &Path, disk_id: &str) -> Result<DiskState, RecoveryError> {
    DiskState::load(retention, disk_id)?.ok_or_else(|| RecoveryError::UnknownDisk {
        disk_id: disk_id.to_string(),
        retention: retention.display().to_string(),
    })
}

/// The points a history offers, oldest first.
pub fn history_points(h: &History) -> Vec<Point> {
    // undo_bytes(p) = bytes of every undo record above p: suffix sums over seq order.
    let mut seqs: Vec<(u64, u64)> = h.undos.iter().map(|u| (u.seq, u.bytes)).collect();
    seqs.sort_unstable();
    let mut suffix = vec![0u64; seqs.len() + 1];
    for i in (0..seqs.len()).rev() {
        suffix[i] = suffix[i + 1] + seqs[i].1;
    }
    let above = |p: u64| suffix[seqs.partition_point(|(s, _)| *s <= p)];
    let mut out = Vec::new();
    for c in &h.commits {
        for b in &c.batches {
            if !b.is_point() || b.seq < h.base_seq {
                continue;
            }
            out.push(Point {
                time_unix_ms: b.batch_unix_ms,
                kind: "batch".into(),
                tag: String::new(),
                marker_id: String::new(),
                group: String::new(),
                seq: b.seq,
                undo_bytes: 0,
            });
            for m in c.markers.iter().filter(|m| m.seq == b.seq) {
                out.push(Point {
                    time_unix_ms: m.marker.time_unix_ms,
                    kind: m.kind_name().into(),
                    tag: m.marker.tag.clone(),
                    marker_id: m.marker.id.clone(),
                    group: m.marker.group.clone(),
                    seq: m.seq,
                    undo_bytes: 0,
                });
            }
        }
    }
    for p in &mut out {
        p.undo_bytes = above(p.seq);
    }
    out
}

/// The points of `disk_id`, oldest first.
pub fn points(retention: &Path, disk_id: &str) -> Result<Vec<Point>, RecoveryError> {
    load_state(retention, disk_id)?;
    Ok(match History::read(retention, disk_id)? {
        Some(h) => history_points(&h),
        None => Vec::new(),
    })
}

/// Picks the point `spec` names: `latest`, `latest-crash`, `latest-app`, a marker id, a
/// tag, or an RFC 3339 time (the latest point at or before it). `latest` is everything
/// committed, even inside a resync interval.
pub fn select(h: &History, points: &[Point], spec: &str) -> Result<(u64, String), RecoveryError> {
    let none = || RecoveryError::NoSuchPoint(spec.to_string());
    let found = match spec {
        "latest" => return Ok((h.committed_seq, "latest".into())),
        "latest-crash" => points.last(),
        "latest-app" => points.iter().rev().find(|p| p.kind == "app"),
        _ => points
            .iter()
            .rev()
            .find(|p| !p.marker_id.is_empty() && p.marker_id == spec)
            .or_else(|| {
                points
                    .iter()
                    .rev()
                    .find(|p| !p.tag.is_empty() && p.tag == spec)
            })
            .or_else(|| {
                let t = parse_rfc3339(spec)?;
                points.iter().rev().find(|p| p.time_unix_ms <= t)
            }),
    };
    let p = found.ok_or_else(none)?;
    let what = if p.marker_id.is_empty() {
        format!(
            "{} point at seq {} ({})",
            p.kind,
            p.seq,
            format_time(p.time_unix_ms)
        )
    } else {
        format!("{} marker {} at seq {}", p.kind, p.marker_id, p.seq)
    };
    Ok((p.seq, what))
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff][Z|±HH:MM]` to ms since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut ms = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let f = &frac[..digits.min(3)];
        ms = f.parse::<i64>().ok()? * 10i64.pow(3 - f.len() as u32);
        rest = &frac[digits..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (oh, om) = rest[1..].split_once(':')?;
            if oh.len() != 2 || om.len() != 2 {
                return None;
            }
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
        }
    };
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + sec - offset_s) * 1000 + ms)
}

/// A recovered copy being written: restores go through `pwrite`.
struct FileTarget<'a> {
    file: &'a File,
    /// The disk's size: an undo range beyond it (read from disk) is refused rather than
    /// growing the copy.
    capacity: u64,
}

impl UndoTarget for FileTarget<'_> {
    fn restore(&mut self, offset: u64, len: u32, data: Option<&[u8]>) -> io::Result<()> {
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > self.capacity)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("undo range {offset}+{len} is beyond the disk"),
            ));
        }
        match data {
            Some(d) => self.file.write_all_at(d, offset),
            None => self.file.write_all_at(&vec![0u8; len as usize], offset),
        }
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data().map_err(crate::storage::sync_failed)
    }
}

/// What `recover` should do.
#[derive(Debug, Clone)]
pub struct RecoverRequest {
    pub datastore: PathBuf,
    pub retention: PathBuf,
    pub disk_id: String,
    pub point: String,
    /// A new VMDK, or `None` for in place.
    pub out: Option<PathBuf>,
    pub format: CreateType,
}

/// What a recovery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub seq: u64,
    pub point: String,
    pub path: PathBuf,
}

/// Recovers a disk to a point (see the module docs).
pub fn recover(req: &RecoverRequest) -> Result<Recovered, RecoveryError> {
    let state = load_state(&req.retention, &req.disk_id)?;
    let desc_path = vmdk::Disk::descriptor_path(&req.datastore, &state.name);
    let (_, data) = vmdk::read_image(&req.datastore, &desc_path)?;
    match &req.out {
        Some(out) => to_copy(req, &state, &data, out),
        None => in_place(req, &state, &data),
    }
}

fn io_at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RecoveryError + 'a {
    move |source| RecoveryError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn to_copy(
    req: &RecoverRequest,
    state: &DiskState,
    data: &DataRef,
    out: &Path,
) -> Result<Recovered, RecoveryError> {
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".vmdk"))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| RecoveryError::BadOutput(out.to_path_buf()))?;
    let dir = out.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if !dir.is_dir() {
        return Err(RecoveryError::BadOutput(out.to_path_buf()));
    }
    // An unfinished in-place recovery left the target between points: a copy of it
    // rolled back would match no point either.
    if let Some(i) = Intent::read(&req.retention, &req.disk_id)? {
        return Err(i.refusal(&req.retention, &req.disk_id));
    }
    // A sparse or split output is assembled in a raw scratch file first, then packed into
    // its extents; a single flat extent is rolled back where it lies.
    let packed = matches!(
        req.format,
        CreateType::MonolithicSparse | CreateType::TwoGbMaxExtentFlat
    );
    let flat_name = if packed {
        format!(".{name}.recover.raw")
    } else {
        format!("{name}-flat.vmdk")
    };
    let flat = dir.join(&flat_name);
    let extents = vmdk::extents_for(req.format, name, state.capacity);
    // Every file this recovery makes; none may exist, so all are removed on failure.
    let mut outputs = vec![out.to_path_buf(), flat.clone()];
    for e in &extents {
        let p = dir.join(&e.file);
        if !outputs.contains(&p) {
            outputs.push(p);
        }
    }
    for p in &outputs {
        if p.exists() {
            return Err(RecoveryError::OutputExists(p.clone()));
        }
    }
    let made = (|| {
        let copy = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&flat)
            .map_err(io_at("create", &flat))?;
        // Hold the applier between commits while the journal is read and the target
        // copied: the copy is then exactly the disk as of the history's last commit.
        let lock = CommitLock::open(&req.retention, &req.disk_id)
            .map_err(io_at("open", &req.retention))?;
        let (history, seq, what) = {
            let _guard = lock.lock().map_err(io_at("lock", &req.retention))?;
            let history = History::read(&req.retention, &req.disk_id)?
                .ok_or_else(|| RecoveryError::NoJournal(req.disk_id.clone()))?;
            let points = history_points(&history);
            let (seq, what) = select(&history, &points, &req.point)?;
            copy_data(data, state.capacity, &copy, &flat)?;
            (history, seq, what)
        };
        history.roll_back(
            seq,
            &mut FileTarget {
                file: &copy,
                capacity: state.capacity,
            },
        )?;
        copy.set_len(state.capacity)
            .map_err(io_at("truncate", &flat))?;
        copy.sync_all().map_err(io_at("fsync", &flat))?;
        let uuid = vmdk::uuid_for(&format!(
            "{}@{}@{}",
            req.disk_id,
            seq,
            protocol::now_unix_ms()
        ));
        let d = vmdk::fresh_descriptor(req.format, extents, &uuid);
        let text = d.render().map_err(|source| VmdkError::Descriptor {
            path: out.to_path_buf(),
            source,
        })?;
        if packed {
            let mut target = match req.format {
                CreateType::MonolithicSparse => Extent::Sparse(
                    vmdk::sparse::SparseExtent::create(out, state.capacity, &text)
                        .map_err(VmdkError::from)?,
                ),
                _ => Extent::Split(
                    vmdk::two_gb_flat::SplitFlat::create(dir, &d.extents)
                        .map_err(VmdkError::from)?,
                ),
            };
            pack(&copy, &flat, &mut target, state.capacity)?;
            drop(copy);
            std::fs::remove_file(&flat).map_err(io_at("remove", &flat))?;
        }
        if req.format != CreateType::MonolithicSparse {
            vmdk::write_atomic(out, text.as_bytes()).map_err(io_at("write", out))?;
        }
        Ok(Recovered {
            seq,
            point: what,
            path: out.to_path_buf(),
        })
    })();
    if made.is_err() {
        for p in &outputs {
            let _ = std::fs::remove_file(p);
        }
    }
    made
}

/// Writes the raw disk in `raw` into the new, zero-filled `target` (all-zero grains are
/// skipped: a sparse target leaves them unallocated) and makes it durable.
fn pack(
    raw: &File,
    raw_path: &Path,
    target: &mut Extent,
    capacity: u64,
) -> Result<(), RecoveryError> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut at = 0u64;
    while at < capacity {
        let n = (capacity - at).min(COPY_CHUNK as u64) as usize;
        raw.read_exact_at(&mut buf[..n], at)
            .map_err(io_at("read", raw_path))?;
        let grain = (vmdk::sparse::GRAIN_SECTORS * 512) as usize;
        for (i, g) in buf[..n].chunks(grain).enumerate() {
            if g.iter().any(|&b| b != 0) {
                target.write(at + (i * grain) as u64, g)?;
            }
        }
        at += n as u64;
    }
    target.sync()?;
    Ok(())
}

/// Copies the disk's bytes into `copy` (raw): a flat extent by a file copy, a sparse or
/// split one through its reader.
fn copy_data(data: &DataRef, capacity: u64, copy: &File, path: &Path) -> Result<(), RecoveryError> {
    if data.layout == DataLayout::Flat {
        let mut src = File::open(&data.path).map_err(io_at("open", &data.path))?;
        let mut dst = copy;
        io::copy(&mut src, &mut dst).map_err(io_at("copy to", path))?;
        return Ok(());
    }
    let reader = Reader::open(data)?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut at = 0u64;
    while at < capacity {
        let n = (capacity - at).min(COPY_CHUNK as u64) as usize;
        reader
            .read_at(&mut buf[..n], at)
            .map_err(io_at("read", &data.path))?;
        // Holes stay holes: all-zero chunks are left to set_len.
        if buf[..n].iter().any(|&b| b != 0) {
            copy.write_all_at(&buf[..n], at)
                .map_err(io_at("write", path))?;
        }
        at += n as u64;
    }
    Ok(())
}

fn in_place(
    req: &RecoverRequest,
    state: &DiskState,
    data: &DataRef,
) -> Result<Recovered, RecoveryError> {
    let _lock = crate::retention::volume::claim(&req.retention)
        .map_err(|why| RecoveryError::InUse(req.disk_id.clone(), why))?;
    let intent = intent_path(&req.retention, &req.disk_id);
    let unfinished = Intent::read(&req.retention, &req.disk_id)?;
    if let Some(i) = &unfinished
        && i.point != req.point
    {
        return Err(i.clone().refusal(&req.retention, &req.disk_id));
    }
    let mut extent = Extent::open(data, state.capacity)?;
    // Roll back what a crashed server left uncommitted, and reconcile with the journal.
    let (j, opened) = journal::Journal::open(
        &req.retention,
        &req.disk_id,
        state.applied_seq,
        RetentionPolicy::default(),
        &mut extent,
    )?;
    drop(j);
    let history = History::read(&req.retention, &req.disk_id)?
        .ok_or_else(|| RecoveryError::NoJournal(req.disk_id.clone()))?;
    let points = history_points(&history);
    let (seq, what) = match unfinished {
        Some(i) => (
            i.seq,
            format!(
                "{} at seq {} (an interrupted recovery, finished)",
                i.point, i.seq
            ),
        ),
        None => {
            let (seq, what) = select(&history, &points, &req.point)?;
            let i = Intent {
                seq,
                point: req.point.clone(),
            };
            vmdk::write_atomic(&intent, &i.encode()).map_err(io_at("write", &intent))?;
            (seq, what)
        }
    };
    history.roll_back(seq, &mut extent)?;
    journal::truncate_to(&req.retention, &req.disk_id, seq)?;
    let point_time = points
        .iter()
        .rev()
        .find(|p| p.seq == seq)
        .map_or(state.last_batch_unix_ms, |p| p.time_unix_ms);
    let mut st = state.clone();
    st.applied_seq = seq.min(opened.committed_seq);
    st.last_batch_unix_ms = point_time;
    st.applied_unix_ms = protocol::now_unix_ms();
    st.consistent_seq = st.applied_seq;
    st.consistent_unix_ms = point_time;
    st.in_resync = false;
    st.store(&req.retention)?;
    std::fs::remove_file(&intent).map_err(io_at("remove", &intent))?;
    // The removal is the end of the recovery: make it durable, or a crash could bring the
    // intent back and keep the disk refused until `recover` runs again.
    let dir = intent.parent().unwrap_or(&req.retention);
    crate::storage::sync_dir(dir).map_err(io_at("fsync dir", dir))?;
    Ok(Recovered {
        seq,
        point: what,
        path: data.path.clone(),
    })
}

/// The fields every listed point has (a disk's or a group's), as a JSON object to which
/// the caller adds its own.
pub(crate) fn point_json(
    time_unix_ms: i64,
    kind: &str,
    tag: &str,
    marker_id: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let serde_json::Value::Object(m) = json!({
        "time": format_time(time_unix_ms),
        "time_unix_ms": time_unix_ms,
        "kind": kind,
        "tag": tag,
        "marker_id": marker_id,
    }) else {
        unreachable!("json! of an object literal is an object")
    };
    m
}

pub fn to_json(disk_id: &str, points: &[Point]) -> serde_json::Value {
    let list: Vec<_> = points
        .iter()
        .map(|p| {
            let mut m = point_json(p.time_unix_ms, &p.kind, &p.tag, &p.marker_id);
            m.insert("group".into(), json!(p.group));
            m.insert("seq".into(), json!(p.seq));
            m.insert("undo_bytes".into(), json!(p.undo_bytes));
            serde_json::Value::Object(m)
        })
        .collect();
    json!({ "disk_id": disk_id, "points": list })
}

pub fn to_table(points: &[Point]) -> String {
    let mut s = format!(
        "{:<24} {:<7} {:<20} {:<36} {:<16} {:>10} {:>14}\n",
        "TIME", "KIND", "TAG", "MARKER ID", "GROUP", "SEQ", "UNDO BYTES"
    );
    for p in points {
        s.push_str(&format!(
            "{:<24} {:<7} {:<20} {:<36} {:<16} {:>10} {:>14}\n",
            format_time(p.time_unix_ms),
            p.kind,
            p.tag,
            p.marker_id,
            p.group,
            p.seq,
            p.undo_bytes
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_parse_to_epoch_ms() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2026-12-01T07:04:52.5Z"),
            Some(1_796_108_692_500)
        );
        assert_eq!(
            parse_rfc3339("2026-12-01T09:04:52+02:00"),
            Some(1_796_108_692_000)
        );
        for t in [format_time(1_796_108_692_123), format_time(951_782_400_000)] {
            assert_eq!(format_time(parse_rfc3339(&t).unwrap()), t);
        }
        for bad in [
            "m5",
            "2026-13-01T00:00:00Z",
            "2026-12-01T00:00:00",
            "2026-12-01",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
