//! The per-disk state file, `RETENTION/disks/<disk_id>.state`: where a disk stands durably.
//!
//! Byte layout, version 1 (all integers little-endian):
//!
//! ```text
//! Format: { magic "FBMTSTA1" (8) | version u32 | body_len u32 | body | crc32 u32 }
//! body:   { applied_seq u64 | last_batch_unix_ms i64 | applied_unix_ms i64
//!         | consistent_seq u64 | consistent_unix_ms i64 | capacity u64 | flags u32
//!         | id_len u16 | disk_id | name_len u16 | name }
//! ```
//!
//! `crc32` covers every byte before it (magic to end of body). `body_len` is capped at
//! [`MAX_BODY`]. `flags` bit 0: the disk is inside a resync interval (no recovery point).
//!
//! Invariant: the file says `applied_seq = N` only once batch N's data (msync) and markers
//! are durable; it is replaced atomically (tmp, fsync, rename, fsync dir), so after a crash
//! it holds either the old or the new state, never a mix. A state with `applied_seq = 0`
//! is the disk's claim on its name, written before its image is created.

use std::path::{Path, PathBuf};

use crate::vmdk::write_atomic;

const MAGIC: &[u8; 8] = b"FBMTSTA1";
const VERSION: u32 = 1;
const MAX_BODY: usize = 1024;
/// `flags` bit: the last applied batch is inside a resync interval.
const FLAG_IN_RESYNC: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

impl crate::storage::SpaceError for StateError {
    fn is_no_space(&self) -> bool {
        matches!(self, StateError::Io { source, .. } if crate::storage::is_no_space(source))
    }
}

/// Where one disk stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskState {
    pub disk_id: String,
    pub name: String,
    pub capacity: u64,
    /// Highest seq applied and durable.
    pub applied_seq: u64,
    /// Source time of batch `applied_seq` (ms since epoch; 0 = none).
    pub last_batch_unix_ms: i64,
    /// When batch `applied_seq` became durable here.
    pub applied_unix_ms: i64,
    /// Highest seq after which the disk was consistent (not inside a resync interval),
    /// and its source time: the latest crash-consistent point.
    pub consistent_seq: u64,
    pub consistent_unix_ms: i64,
    pub in_resync: bool,
}

/// Directory of the state files under a retention volume.
pub fn disks_dir(retention: &Path) -> PathBuf {
    retention.join("disks")
}

/// Path of `disk_id`'s state file.
pub fn state_path(retention: &Path, disk_id: &str) -> PathBuf {
    disks_dir(retention).join(format!("{disk_id}.state"))
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl DiskState {
    /// The file bytes of this state.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(128);
        body.extend_from_slice(&self.applied_seq.to_le_bytes());
        body.extend_from_slice(&self.last_batch_unix_ms.to_le_bytes());
        body.extend_from_slice(&self.applied_unix_ms.to_le_bytes());
        body.extend_from_slice(&self.consistent_seq.to_le_bytes());
        body.extend_from_slice(&self.consistent_unix_ms.to_le_bytes());
        body.extend_from_slice(&self.capacity.to_le_bytes());
        let flags = if self.in_resync { FLAG_IN_RESYNC } else { 0 };
        body.extend_from_slice(&flags.to_le_bytes());
        put_str(&mut body, &self.disk_id);
        put_str(&mut body, &self.name);
        let mut out = Vec::with_capacity(body.len() + 20);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses file bytes; every length is checked before slicing.
    pub fn decode(bytes: &[u8]) -> Result<DiskState, String> {
        if bytes.len() < 20 || &bytes[..8] != MAGIC {
            return Err("not a state file (bad magic or too short)".into());
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(format!("unsupported state version {version}"));
        }
        let len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
        if len > MAX_BODY || bytes.len() != 16 + len + 4 {
            return Err(format!("bad length {len} for a file of {}", bytes.len()));
        }
        let crc = u32::from_le_bytes(bytes[16 + len..].try_into().expect("4 bytes"));
        if crc32fast::hash(&bytes[..16 + len]) != crc {
            return Err("CRC mismatch".into());
        }
        let mut r = Reader(&bytes[16..16 + len]);
        let state = DiskState {
            applied_seq: r.u64()?,
            last_batch_unix_ms: r.u64()? as i64,
            applied_unix_ms: r.u64()? as i64,
            consistent_seq: r.u64()?,
            consistent_unix_ms: r.u64()? as i64,
            capacity: r.u64()?,
            in_resync: r.u32()? & FLAG_IN_RESYNC != 0,
            disk_id: r.str()?,
            name: r.str()?,
        };
        if !r.0.is_empty() {
            return Err("trailing bytes in the body".into());
        }
        Ok(state)
    }

    /// Reads `disk_id`'s state; `Ok(None)` when it has none yet.
    pub fn load(retention: &Path, disk_id: &str) -> Result<Option<DiskState>, StateError> {
        Self::load_path(&state_path(retention, disk_id))
    }

    pub fn load_path(path: &Path) -> Result<Option<DiskState>, StateError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    op: "read",
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::decode(&bytes)
            .map(Some)
            .map_err(|reason| StateError::Corrupt {
                path: path.to_path_buf(),
                reason,
            })
    }

    /// Replaces the disk's state file atomically and durably.
    pub fn store(&self, retention: &Path) -> Result<(), StateError> {
        let path = state_path(retention, &self.disk_id);
        write_atomic(&path, &self.encode()).map_err(|source| StateError::Io {
            op: "write",
            path,
            source,
        })
    }

    /// Every disk state under `retention` (used at start-up to rebuild name claims).
    pub fn load_all(retention: &Path) -> Result<Vec<DiskState>, StateError> {
        let dir = disks_dir(retention);
        let io = |op, source| StateError::Io {
            op,
            path: dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| io("list", e))? {
            let path = entry.map_err(|e| io("list", e))?.path();
            let is_state = path.extension().is_some_and(|e| e == "state")
                && !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if is_state && let Some(s) = Self::load_path(&path)? {
                out.push(s);
            }
        }
        Ok(out)
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err("body too short".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn str(&mut self) -> Result<String, String> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "string is not UTF-8".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DiskState {
        DiskState {
            disk_id: "disk-1".into(),
            name: "vm1_disk0".into(),
            capacity: 1 << 30,
            applied_seq: 42,
            last_batch_unix_ms: 1_700_000_000_000,
            applied_unix_ms: 1_700_000_000_500,
            consistent_seq: 40,
            consistent_unix_ms: 1_699_999_999_000,
            in_resync: true,
        }
    }

    #[test]
    fn state_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(disks_dir(dir.path())).unwrap();
        sample().store(dir.path()).unwrap();
        assert_eq!(
            DiskState::load(dir.path(), "disk-1").unwrap(),
            Some(sample())
        );
        assert_eq!(DiskState::load(dir.path(), "other").unwrap(), None);
        assert_eq!(DiskState::load_all(dir.path()).unwrap(), vec![sample()]);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = sample().encode();
        for i in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(DiskState::decode(&bad).is_err(), "bit {i}");
        }
        for n in 0..bytes.len() {
            assert!(DiskState::decode(&bytes[..n]).is_err(), "truncated to {n}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Arbitrary bytes are refused, never a panic.
        #[test]
        fn arbitrary_bytes_are_an_error(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            proptest::prop_assert!(DiskState::decode(&bytes).is_err());
        }

        /// A well-framed file (magic, version, length, CRC) around an arbitrary body reaches
        /// the field reader: it decodes or is refused, never a panic, and whatever decodes
        /// encodes back to the same bytes.
        #[test]
        fn an_arbitrary_body_in_a_good_frame_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let mut file = Vec::new();
            file.extend_from_slice(MAGIC);
            file.extend_from_slice(&VERSION.to_le_bytes());
            file.extend_from_slice(&(body.len() as u32).to_le_bytes());
            file.extend_from_slice(&body);
            let crc = crc32fast::hash(&file);
            file.extend_from_slice(&crc.to_le_bytes());
            if let Ok(s) = DiskState::decode(&file) {
                // Only the flag bit we know survives a round trip.
                let flags = u32::from_le_bytes(body[48..52].try_into().unwrap());
                if flags & !FLAG_IN_RESYNC == 0 {
                    proptest::prop_assert_eq!(s.encode(), file);
                }
            }
        }
    }
}
