//! A flat extent (`NAME-flat.vmdk`): raw disk bytes, written through a shared memory map.
//!
//! Invariants while a [`FlatExtent`] exists (PITFALLS.md §3, VMDK-NOTES.md (g)):
//! * the file holds an exclusive `flock`, so no cooperating process maps or truncates it;
//! * its length was checked to be at least the mapped capacity before mapping, and every
//!   byte of the mapped range is allocated (`fallocate`), so a store through the map can
//!   neither touch a page beyond EOF nor fill a hole on a full filesystem: both would be a
//!   SIGBUS, not an error;
//! * zero-fill never punches holes (`FALLOC_FL_ZERO_RANGE` keeps the blocks allocated);
//! * nothing written is durable until [`FlatExtent::sync`] returns: it msyncs the dirty span
//!   (an fdatasync of that range) and, if zero ranges changed extent metadata, fdatasyncs.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

use crate::storage::sync_failed;

/// Zero ranges smaller than this are memset: a syscall costs more than the stores.
const ZERO_RANGE_MIN: u64 = 64 * 1024;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum FlatError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("not enough space on the datastore for {path}: {detail}")]
    NoSpace { path: PathBuf, detail: String },
    #[error("{path} is in use by another process (locked)")]
    Locked { path: PathBuf },
    #[error("{path} holds {actual} bytes but the descriptor declares {expected}")]
    WrongSize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
}

impl FlatError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> FlatError {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return FlatError::NoSpace {
                path: path.to_path_buf(),
                detail: format!("{op} failed: {source}"),
            };
        }
        FlatError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// An open, locked, fully allocated and mapped flat extent.
pub struct FlatExtent {
    path: PathBuf,
    file: File,
    map: MmapMut,
    /// Byte span written through the map since the last sync: [start, end).
    dirty: Option<(u64, u64)>,
    /// Whether a `FALLOC_FL_ZERO_RANGE` ran since the last sync (extent metadata changed).
    metadata_dirty: bool,
}

impl std::fmt::Debug for FlatExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FlatExtent({}, {} bytes)",
            self.path.display(),
            self.map.len()
        )
    }
}

fn lock(file: &File, path: &Path) -> Result<(), FlatError> {
    match super::try_lock(file) {
        Ok(true) => Ok(()),
        Ok(false) => Err(FlatError::Locked {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(FlatError::io("lock", path, e)),
    }
}

/// Free bytes for an unprivileged writer on the filesystem of `file`.
fn available(file: &File, path: &Path) -> Result<u64, FlatError> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: fstatvfs writes a statvfs into the pointer we give it, which is valid for
    // writes of that size; we read it only after it returned success.
    let rc = unsafe { libc::fstatvfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(FlatError::io("statvfs", path, io::Error::last_os_error()));
    }
    // SAFETY: fstatvfs returned 0, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Allocates `[0, len)` of `file` (keeping existing data): after this, stores through a map
/// of that range cannot fail for lack of space.
fn reserve(file: &File, path: &Path, len: u64) -> Result<(), FlatError> {
    // SAFETY: posix_fallocate on a valid descriptor; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        libc::ENOSPC => Err(FlatError::NoSpace {
            path: path.to_path_buf(),
            detail: format!(
                "reserving {len} bytes failed, {} bytes free",
                available(file, path).unwrap_or(0)
            ),
        }),
        e => Err(FlatError::io(
            "fallocate",
            path,
            io::Error::from_raw_os_error(e),
        )),
    }
}

impl FlatExtent {
    /// Creates `path` (which must not exist) with `capacity` bytes reserved, synced, and
    /// mapped. On failure the partial file is removed.
    pub fn create(path: &Path, capacity: u64) -> Result<FlatExtent, FlatError> {
        let file = super::open_rw(path, true).map_err(|e| FlatError::io("create", path, e))?;
        let made = (|| {
            lock(&file, path)?;
            // Refuse up front rather than fill the datastore and fail half way.
            let free = available(&file, path)?;
            if capacity > free {
                return Err(FlatError::NoSpace {
                    path: path.to_path_buf(),
                    detail: format!("{capacity} bytes needed, {free} bytes free"),
                });
            }
            reserve(&file, path, capacity)?;
            file.sync_all()
                .map_err(|e| FlatError::io("fsync", path, sync_failed(e)))?;
            Self::map(path.to_path_buf(), file, capacity)
        })();
        super::remove_if_failed(path, made)
    }

    /// Opens an existing extent of exactly `capacity` bytes, locks it, reserves its space
    /// (a thin or qemu-made hole-only file becomes fully allocated) and maps it.
    pub fn open(path: &Path, capacity: u64) -> Result<FlatExtent, FlatError> {
        let file = super::open_rw(path, false).map_err(|e| FlatError::io("open", path, e))?;
        lock(&file, path)?;
        let actual = file
            .metadata()
            .map_err(|e| FlatError::io("stat", path, e))?
            .len();
        if actual != capacity {
            return Err(FlatError::WrongSize {
                path: path.to_path_buf(),
                expected: capacity,
                actual,
            });
        }
        reserve(&file, path, capacity)?;
        Self::map(path.to_path_buf(), file, capacity)
    }

    fn map(path: PathBuf, file: File, capacity: u64) -> Result<FlatExtent, FlatError> {
        let len = usize::try_from(capacity).map_err(|_| {
            FlatError::io("map", &path, io::Error::from(io::ErrorKind::InvalidInput))
        })?;
        // SAFETY: the file is exclusively flocked for the map's lifetime (the lock lives in
        // `file`, dropped after `map` by field order), its length was checked or set to
        // `capacity` and every byte is allocated, so the mapping stays backed. Other
        // processes that ignore the lock could still truncate it: that is the documented
        // limit of mapped files, which the lock exists to prevent.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map_mut(&file) }
            .map_err(|e| FlatError::io("mmap", &path, e))?;
        Ok(FlatExtent {
            path,
            file,
            map,
            dirty: None,
            metadata_dirty: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn capacity(&self) -> u64 {
        self.map.len() as u64
    }

    fn mark(&mut self, start: u64, end: u64) {
        self.dirty = Some(match self.dirty {
            Some((s, e)) => (s.min(start), e.max(end)),
            None => (start, end),
        });
    }

    /// Copies `data` to `offset`. The caller guarantees the range is inside the disk
    /// (`protocol::batch::check` did); out of range panics rather than corrupting memory.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let at = offset as usize;
        self.map[at..at + data.len()].copy_from_slice(data);
        self.mark(offset, offset + data.len() as u64);
    }

    /// The current bytes of `[offset, offset + len)` (as mapped: what the disk holds once
    /// synced). The caller guarantees the range is inside the disk.
    pub fn read(&self, offset: u64, len: usize) -> &[u8] {
        &self.map[offset as usize..offset as usize + len]
    }

    /// Zero-fills `[offset, offset + len)`, keeping the blocks allocated.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), FlatError> {
        let end = offset + len;
        let inner_start = offset.next_multiple_of(PAGE);
        let inner_end = end / PAGE * PAGE;
        if len < ZERO_RANGE_MIN || inner_end <= inner_start {
            self.memset(offset, end);
            return Ok(());
        }
        // SAFETY: fallocate on a valid descriptor over a range inside the file; the kernel
        // drops the page-cache pages of the range, so the map reads the zeros.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                inner_start as libc::off_t,
                (inner_end - inner_start) as libc::off_t,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
            ) {
                // tmpfs and some others lack ZERO_RANGE: plain stores are equivalent.
                self.memset(offset, end);
                return Ok(());
            }
            return Err(FlatError::io("fallocate(ZERO_RANGE)", &self.path, e));
        }
        self.metadata_dirty = true;
        self.memset(offset, inner_start);
        self.memset(inner_end, end);
        Ok(())
    }

    fn memset(&mut self, start: u64, end: u64) {
        if end > start {
            self.map[start as usize..end as usize].fill(0);
            self.mark(start, end);
        }
    }

    /// Makes every write and zero-fill since the last sync durable: msync of the dirty
    /// span first (PITFALLS.md §3), then fdatasync if extent metadata changed. An error is
    /// fatal for the disk: a failed sync cannot be retried (the kernel marks pages clean).
    pub fn sync(&mut self) -> Result<(), FlatError> {
        if let Some((start, end)) = self.dirty.take() {
            let page_start = start / PAGE * PAGE;
            self.map
                .flush_range(page_start as usize, (end - page_start) as usize)
                .map_err(|e| FlatError::io("msync", &self.path, sync_failed(e)))?;
        }
        if std::mem::take(&mut self.metadata_dirty) {
            self.file
                .sync_data()
                .map_err(|e| FlatError::io("fdatasync", &self.path, sync_failed(e)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_reserves_every_byte_and_writes_land() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d-flat.vmdk");
        let mut f = FlatExtent::create(&p, 1 << 20).unwrap();
        f.write(4096, b"hello");
        f.zero(0, 512).unwrap();
        f.zero(8192, 512 * 1024).unwrap();
        f.sync().unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 >= 1 << 20, "space is reserved");
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[4096..4101], b"hello");
    }

    #[test]
    fn unaligned_zero_ranges_zero_exactly_and_keep_space_allocated() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z-flat.vmdk");
        let mut f = FlatExtent::create(&p, 1 << 20).unwrap();
        f.write(0, &[0xff; 1 << 20]);
        f.sync().unwrap();
        let blocks = std::fs::metadata(&p).unwrap().blocks();
        f.zero(1000, 300_000).unwrap();
        f.zero(700_001, 17).unwrap();
        f.sync().unwrap();
        let bytes = std::fs::read(&p).unwrap();
        for (i, &b) in bytes.iter().enumerate() {
            let zeroed = (1000..301_000).contains(&i) || (700_001..700_018).contains(&i);
            assert_eq!(b, if zeroed { 0 } else { 0xff }, "byte {i}");
        }
        assert_eq!(
            std::fs::metadata(&p).unwrap().blocks(),
            blocks,
            "no hole punched"
        );
    }

    #[test]
    fn create_on_a_full_datastore_is_no_space_not_sigbus() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("huge-flat.vmdk");
        let e = FlatExtent::create(&p, 1 << 60).unwrap_err();
        assert!(matches!(e, FlatError::NoSpace { .. }), "{e}");
        assert!(!p.exists(), "partial file removed");
    }

    #[test]
    fn a_locked_extent_cannot_be_opened_twice() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d-flat.vmdk");
        let _f = FlatExtent::create(&p, 65536).unwrap();
        assert!(matches!(
            FlatExtent::open(&p, 65536),
            Err(FlatError::Locked { .. })
        ));
    }

    #[test]
    fn open_refuses_a_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d-flat.vmdk");
        std::fs::write(&p, [0u8; 512]).unwrap();
        assert!(matches!(
            FlatExtent::open(&p, 4096),
            Err(FlatError::WrongSize { .. })
        ));
    }
}
