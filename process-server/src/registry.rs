//! The disk registry: every disk this process server knows, with its `applied_floor` (the
//! highest seq the master target acknowledged, as far as this file knows). One small state
//! file in the cache directory, replaced atomically.
//!
//! ```text
//! // Format: { magic [8] = "FBREGST\x01" | version u32 | body_len u32 | body_crc u32
//! //           | body [body_len] }
//! ```
//!
//! * `body` is UTF-8 JSON: `{"disks":[{"disk_id","name","capacity","format","group",
//!   "applied_floor"}]}` (format = the `DiskFormat` enum value).
//! * `body_crc` = CRC32 of `body`; `body_len` is at most [`MAX_BODY`].
//! * Written as `registry.tmp` -> fsync -> rename to `registry` -> fsync of the directory, so
//!   a crash leaves either the old or the new file, never a mix.
//!
//! The applied floor is persisted **before** cache segments holding those batches are
//! deleted, so after a crash the floor never lags behind what the cache still has.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use protocol::pb::DiskInfo;
use serde::{Deserialize, Serialize};

/// Magic of the registry file: "FBREGST" then the format version byte.
pub const MAGIC: [u8; 8] = *b"FBREGST\x01";
pub const VERSION: u32 = 1;
/// File name inside the cache directory.
pub const FILE_NAME: &str = "registry";
const TMP_NAME: &str = "registry.tmp";
const HEADER_LEN: usize = 20;
/// Largest body accepted (far above 10 000 disks).
pub const MAX_BODY: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read disk registry {path}: {source}")]
    Reading {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write disk registry {path}: {source}")]
    Writing {
        path: String,
        source: std::io::Error,
    },
    #[error("disk registry {path} is damaged: {what} (restore it or start with an empty cache)")]
    Damaged { path: String, what: String },
}

/// One known disk, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub disk_id: String,
    pub name: String,
    pub capacity: u64,
    pub format: i32,
    pub group: String,
    /// Highest seq the master target acknowledged, persisted before segments are deleted.
    pub applied_floor: u64,
}

impl DiskRecord {
    pub fn new(info: &DiskInfo, applied_floor: u64) -> Self {
        DiskRecord {
            disk_id: info.disk_id.clone(),
            name: info.name.clone(),
            capacity: info.capacity,
            format: info.format,
            group: info.group.clone(),
            applied_floor,
        }
    }

    pub fn info(&self) -> DiskInfo {
        DiskInfo {
            disk_id: self.disk_id.clone(),
            name: self.name.clone(),
            capacity: self.capacity,
            format: self.format,
            group: self.group.clone(),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Body {
    disks: Vec<DiskRecord>,
}

/// The registry file of a cache directory. [`Registry::store`] serialises writers with an
/// internal lock, so concurrent stores never interleave their temp files.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    write: parking_lot::Mutex<()>,
}

impl Registry {
    pub fn new(dir: &Path) -> Self {
        Registry {
            dir: dir.to_path_buf(),
            write: parking_lot::Mutex::new(()),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The stored disks; none when the file does not exist yet.
    pub fn load(&self) -> Result<Vec<DiskRecord>, RegistryError> {
        let path = self.path();
        let shown = path.display().to_string();
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(RegistryError::Reading {
                    path: shown,
                    source,
                });
            }
        };
        decode(&data)
            .map(|b| b.disks)
            .map_err(|what| RegistryError::Damaged { path: shown, what })
    }

    /// Replaces the stored disks atomically (blocking: call off the async workers).
    pub fn store(&self, disks: &[DiskRecord]) -> Result<(), RegistryError> {
        let _serial = self.write.lock();
        let tmp = self.dir.join(TMP_NAME);
        let path = self.path();
        let err = |p: &Path| {
            let p = p.display().to_string();
            move |source| RegistryError::Writing { path: p, source }
        };
        let bytes = encode(&Body {
            disks: disks.to_vec(),
        });
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(err(&tmp))?;
        f.write_all(&bytes).map_err(err(&tmp))?;
        f.sync_all().map_err(err(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(err(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err(&self.dir))
    }
}

// Format: { magic [8] | version u32 | body_len u32 | body_crc u32 | body }
fn encode(body: &Body) -> Vec<u8> {
    let json = serde_json::to_vec(body).expect("registry body serialises");
    let mut out = Vec::with_capacity(HEADER_LEN + json.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

fn decode(data: &[u8]) -> Result<Body, String> {
    if data.len() < HEADER_LEN {
        return Err(format!("{} bytes, shorter than its header", data.len()));
    }
    if data[0..8] != MAGIC {
        return Err("bad magic".into());
    }
    let word = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"));
    let version = word(8);
    if version != VERSION {
        return Err(format!("format version {version} is not supported"));
    }
    let len = word(12) as usize;
    if len > MAX_BODY || HEADER_LEN + len != data.len() {
        return Err(format!(
            "body length {len} does not match the file size {}",
            data.len()
        ));
    }
    let body = &data[HEADER_LEN..];
    if crc32fast::hash(body) != word(16) {
        return Err("CRC mismatch".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("bad body: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, floor: u64) -> DiskRecord {
        DiskRecord {
            disk_id: id.into(),
            name: format!("{id}-name"),
            capacity: 1 << 20,
            format: 1,
            group: String::new(),
            applied_floor: floor,
        }
    }

    #[test]
    fn store_then_load_round_trips_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::new(dir.path());
        assert!(r.load().unwrap().is_empty());
        r.store(&[rec("a", 1), rec("b", 2)]).unwrap();
        r.store(&[rec("a", 5)]).unwrap();
        assert_eq!(r.load().unwrap(), vec![rec("a", 5)]);
        assert!(!dir.path().join(TMP_NAME).exists());
    }

    #[test]
    fn a_leftover_temp_file_does_not_change_what_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::new(dir.path());
        r.store(&[rec("a", 3)]).unwrap();
        // A crash between writing the temp file and the rename.
        std::fs::write(dir.path().join(TMP_NAME), b"half").unwrap();
        assert_eq!(r.load().unwrap(), vec![rec("a", 3)]);
        r.store(&[rec("a", 4)]).unwrap();
        assert_eq!(r.load().unwrap(), vec![rec("a", 4)]);
    }

    #[test]
    fn a_flipped_bit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::new(dir.path());
        r.store(&[rec("a", 3)]).unwrap();
        let p = dir.path().join(FILE_NAME);
        let mut data = std::fs::read(&p).unwrap();
        let last = data.len() - 3;
        data[last] ^= 0x10;
        std::fs::write(&p, data).unwrap();
        assert!(matches!(r.load(), Err(RegistryError::Damaged { .. })));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever the file holds, loading it gives records or an error, never a panic; a
        /// valid file with random bytes changed loads only if the change left it intact.
        #[test]
        fn arbitrary_bytes_never_panic(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            flips in proptest::collection::vec((0usize..4096, 1u8..=255), 0..4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let r = Registry::new(dir.path());
            std::fs::write(dir.path().join(FILE_NAME), &data).unwrap();
            let _ = r.load();

            r.store(&[rec("a", 3), rec("b", 9)]).unwrap();
            let p = dir.path().join(FILE_NAME);
            let mut valid = std::fs::read(&p).unwrap();
            let len = valid.len();
            for (at, x) in &flips {
                valid[at % len] ^= x;
            }
            std::fs::write(&p, &valid).unwrap();
            if let Ok(loaded) = r.load() {
                proptest::prop_assert_eq!(loaded, vec![rec("a", 3), rec("b", 9)]);
            }
        }
    }
}
