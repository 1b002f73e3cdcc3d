//! The per-disk marker log, `RETENTION/disks/<disk_id>.markers`: every marker applied to a
//! disk, in stream order, appended durably before the batch carrying it is acknowledged.
//!
//! Byte layout, version 1 (all integers little-endian):
//!
//! ```text
//! file:    { magic "FBMTMRK1" (8) | version u32 | reserved u32 (0) } record*
//! Format:  { len u32 | crc32 u32 | payload[len] }           (one record)
//! payload: { seq u64 | batch_unix_ms i64 | time_unix_ms i64 | kind u32
//!          | id_len u16 | id | group_len u16 | group | tag_len u16 | tag }
//! ```
//!
//! `crc32` covers `len` and the payload, so a torn or stale length is caught too; `len` is
//! capped at [`MAX_RECORD`]. `seq` is the batch that carried the marker.
//!
//! Recovery on open ([`MarkerLog::open`]): records are read until the first one that is
//! incomplete or fails its CRC. If that bad record reaches the end of the file it is a torn
//! append and the file is truncated there (and fsynced before the next append); if valid
//! bytes follow it, the log is corrupt in the middle and opening fails: it is never skipped
//! silently. Records whose seq is above the disk's durable applied seq belong to a batch
//! that was not committed when the process stopped; they are truncated too, since the
//! process server re-sends that batch.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use protocol::pb::{Marker, MarkerKind};

const MAGIC: &[u8; 8] = b"FBMTMRK1";
const VERSION: u32 = 1;
const FILE_HEADER: u64 = 16;
const MAX_RECORD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is corrupt at byte {offset}: {reason} (valid records follow; refusing to skip)"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

/// A marker as recorded: the protocol marker plus the batch that carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerRecord {
    pub seq: u64,
    pub batch_unix_ms: i64,
    pub marker: Marker,
}

impl MarkerRecord {
    pub fn kind_name(&self) -> &'static str {
        match MarkerKind::try_from(self.marker.kind) {
            Ok(MarkerKind::Crash) => "crash",
            Ok(MarkerKind::App) => "app",
            Ok(MarkerKind::User) => "user",
            _ => "unknown",
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let mut p = Vec::with_capacity(64);
        p.extend_from_slice(&self.seq.to_le_bytes());
        p.extend_from_slice(&self.batch_unix_ms.to_le_bytes());
        p.extend_from_slice(&self.marker.time_unix_ms.to_le_bytes());
        p.extend_from_slice(&(self.marker.kind as u32).to_le_bytes());
        for s in [&self.marker.id, &self.marker.group, &self.marker.tag] {
            p.extend_from_slice(&(s.len() as u16).to_le_bytes());
            p.extend_from_slice(s.as_bytes());
        }
        let len = (p.len() as u32).to_le_bytes();
        let mut h = crc32fast::Hasher::new();
        h.update(&len);
        h.update(&p);
        out.extend_from_slice(&len);
        out.extend_from_slice(&h.finalize().to_le_bytes());
        out.extend_from_slice(&p);
    }

    fn decode(p: &[u8]) -> Option<MarkerRecord> {
        let mut at = 0usize;
        let mut take = |n: usize| {
            let s = p.get(at..at + n)?;
            at += n;
            Some(s)
        };
        let u64_ = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8"));
        let seq = u64_(take(8)?);
        let batch_unix_ms = u64_(take(8)?) as i64;
        let time_unix_ms = u64_(take(8)?) as i64;
        let kind = u32::from_le_bytes(take(4)?.try_into().expect("4")) as i32;
        let mut strs = Vec::with_capacity(3);
        for _ in 0..3 {
            let n = u16::from_le_bytes(take(2)?.try_into().expect("2")) as usize;
            strs.push(String::from_utf8(take(n)?.to_vec()).ok()?);
        }
        if at != p.len() {
            return None;
        }
        let tag = strs.pop()?;
        let group = strs.pop()?;
        let id = strs.pop()?;
        Some(MarkerRecord {
            seq,
            batch_unix_ms,
            marker: Marker {
                id,
                kind,
                time_unix_ms,
                group,
                tag,
            },
        })
    }
}

/// Path of `disk_id`'s marker log.
pub fn log_path(retention: &Path, disk_id: &str) -> PathBuf {
    crate::state::disks_dir(retention).join(format!("{disk_id}.markers"))
}

/// Where scanning stopped.
struct Scan {
    records: Vec<MarkerRecord>,
    /// End of the last good record.
    good_end: u64,
}

/// Scans `bytes` (a whole log); `Err` for corruption in the middle.
fn scan(bytes: &[u8], path: &Path) -> Result<Scan, MarkerError> {
    let corrupt = |offset: u64, reason: &str| MarkerError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.to_string(),
    };
    if bytes.len() < FILE_HEADER as usize {
        // A torn creation: nothing was ever appended after an incomplete header.
        return Ok(Scan {
            records: Vec::new(),
            good_end: 0,
        });
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt(0, "bad magic"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4"));
    if version != VERSION {
        return Err(corrupt(8, &format!("unsupported version {version}")));
    }
    let mut at = FILE_HEADER as usize;
    let mut records = Vec::new();
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < 8 {
            break; // torn header at the tail
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4"));
        if len > MAX_RECORD || rest.len() < 8 + len {
            if len <= MAX_RECORD {
                break; // the record runs past EOF: torn append
            }
            // A length beyond the cap: torn if nothing after the header could hold a
            // record, corrupt otherwise.
            if rest.len() <= 8 + MAX_RECORD {
                break;
            }
            return Err(corrupt(at as u64, "record length beyond the cap"));
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&rest[..4]);
        h.update(&rest[8..8 + len]);
        let decoded = (h.finalize() == crc)
            .then(|| MarkerRecord::decode(&rest[8..8 + len]))
            .flatten();
        match decoded {
            Some(r) => records.push(r),
            None if rest.len() == 8 + len => break, // torn last record
            None => return Err(corrupt(at as u64, "CRC mismatch")),
        }
        at += 8 + len;
    }
    Ok(Scan {
        records,
        good_end: at as u64,
    })
}

/// Reads the markers of a log without changing it (for `recovery-points`, possibly while a
/// server appends): a torn tail is ignored, not truncated.
pub fn read(path: &Path) -> Result<Vec<MarkerRecord>, MarkerError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(MarkerError::Io {
                op: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    Ok(scan(&bytes, path)?.records)
}

/// An open marker log, positioned for appending.
#[derive(Debug)]
pub struct MarkerLog {
    path: PathBuf,
    file: File,
    len: u64,
}

impl MarkerLog {
    /// Opens or creates the log, truncating a torn tail and every record above
    /// `applied_seq` (see the module docs), and makes that truncation durable.
    pub fn open(path: &Path, applied_seq: u64) -> Result<MarkerLog, MarkerError> {
        let io = |op, source| MarkerError::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io("open", e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io("read", e))?;
        let s = scan(&bytes, path)?;
        let keep: u64 = s
            .records
            .iter()
            .take_while(|r| r.seq <= applied_seq)
            .map(|r| {
                let mut v = Vec::new();
                r.encode(&mut v);
                v.len() as u64
            })
            .sum();
        let mut len = if s.good_end == 0 {
            0
        } else {
            FILE_HEADER + keep
        };
        if len == 0 {
            let mut header = Vec::with_capacity(FILE_HEADER as usize);
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&VERSION.to_le_bytes());
            header.extend_from_slice(&0u32.to_le_bytes());
            file.set_len(0).map_err(|e| io("truncate", e))?;
            file.seek(SeekFrom::Start(0)).map_err(|e| io("seek", e))?;
            file.write_all(&header).map_err(|e| io("write", e))?;
            len = FILE_HEADER;
        }
        if len != bytes.len() as u64 {
            tracing::warn!(path = %path.display(), from = bytes.len(), to = len, "truncating marker log tail");
        }
        file.set_len(len).map_err(|e| io("truncate", e))?;
        file.sync_all().map_err(|e| io("fsync", e))?;
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("fsync dir", e))?;
        }
        Ok(MarkerLog {
            path: path.to_path_buf(),
            file,
            len,
        })
    }

    /// Appends `records` and fdatasyncs: they are durable when this returns. On error the
    /// log must not be used again (a failed sync cannot be retried).
    pub fn append(&mut self, records: &[MarkerRecord]) -> Result<(), MarkerError> {
        if records.is_empty() {
            return Ok(());
        }
        let io = |op, source| MarkerError::Io {
            op,
            path: self.path.clone(),
            source,
        };
        let mut buf = Vec::new();
        for r in records {
            r.encode(&mut buf);
        }
        self.file
            .seek(SeekFrom::Start(self.len))
            .map_err(|e| io("seek", e))?;
        self.file.write_all(&buf).map_err(|e| io("write", e))?;
        self.file.sync_data().map_err(|e| io("fdatasync", e))?;
        self.len += buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, id: &str) -> MarkerRecord {
        MarkerRecord {
            seq,
            batch_unix_ms: 1000 + seq as i64,
            marker: Marker {
                id: id.into(),
                kind: MarkerKind::User as i32,
                time_unix_ms: 2000 + seq as i64,
                group: "g".into(),
                tag: format!("tag-{id}"),
            },
        }
    }

    #[test]
    fn appended_markers_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.markers");
        let mut log = MarkerLog::open(&p, 0).unwrap();
        log.append(&[rec(1, "a"), rec(2, "b")]).unwrap();
        log.append(&[rec(3, "c")]).unwrap();
        drop(log);
        assert_eq!(
            read(&p).unwrap(),
            vec![rec(1, "a"), rec(2, "b"), rec(3, "c")]
        );
        let mut log = MarkerLog::open(&p, 3).unwrap();
        log.append(&[rec(4, "d")]).unwrap();
        assert_eq!(read(&p).unwrap().len(), 4);
    }

    #[test]
    fn a_torn_tail_is_truncated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.markers");
        let mut log = MarkerLog::open(&p, 0).unwrap();
        log.append(&[rec(1, "a"), rec(2, "b")]).unwrap();
        drop(log);
        let full = std::fs::metadata(&p).unwrap().len();
        for cut in [full - 1, full - 10, full - 20] {
            let f = OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(cut).unwrap();
            drop(f);
            let log = MarkerLog::open(&p, 10).unwrap();
            drop(log);
            assert_eq!(read(&p).unwrap(), vec![rec(1, "a")], "cut at {cut}");
            let mut log = MarkerLog::open(&p, 10).unwrap();
            log.append(&[rec(2, "b")]).unwrap();
        }
    }

    #[test]
    fn corruption_in_the_middle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.markers");
        let mut log = MarkerLog::open(&p, 0).unwrap();
        log.append(&[rec(1, "a"), rec(2, "b")]).unwrap();
        drop(log);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[FILE_HEADER as usize + 12] ^= 0xff;
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(
            MarkerLog::open(&p, 10),
            Err(MarkerError::Corrupt { .. })
        ));
    }

    #[test]
    fn markers_of_an_uncommitted_batch_are_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.markers");
        let mut log = MarkerLog::open(&p, 0).unwrap();
        log.append(&[rec(1, "a"), rec(2, "b"), rec(3, "c")])
            .unwrap();
        drop(log);
        drop(MarkerLog::open(&p, 2).unwrap());
        assert_eq!(read(&p).unwrap(), vec![rec(1, "a"), rec(2, "b")]);
    }
}
