//! A flat extent (`NAME-flat.vmdk`): raw disk bytes, written either through a shared memory
//! map (the default, [`DataIo::Mmap`]) or with `pwrite` on the file ([`DataIo::Pwrite`],
//! `master-target serve --data-io pwrite`), and read with `pread` in both modes.
//!
//! Invariants while a [`FlatExtent`] exists (PITFALLS.md §3, VMDK-NOTES.md (g)):
//! * the file holds an exclusive `flock`, so no cooperating process maps or truncates it;
//! * its length was checked to be at least the mapped capacity before mapping, and every
//!   byte of the mapped range is allocated (`fallocate`), so a store through the map can
//!   neither touch a page beyond EOF nor fill a hole on a full filesystem: both would be a
//!   SIGBUS, not an error. In pwrite mode there is no map at all: a full filesystem or a
//!   file truncated underneath gives an ordinary `ENOSPC`/short read, reported as an error;
//! * zero-fill never punches holes (`FALLOC_FL_ZERO_RANGE` keeps the blocks allocated);
//! * nothing written is durable until [`FlatExtent::sync`] returns: in mmap mode it msyncs
//!   the dirty span (an fdatasync of that range) and, if zero ranges changed extent
//!   metadata, fdatasyncs; in pwrite mode it fdatasyncs once. Either way the applier calls
//!   it after the undo records are durable and before the commit record is written, so the
//!   commit order is the same for both modes.
//!
//! Why two modes: a store into a mapped page that was synced (clean, write-protected) takes
//! a write fault (`page_mkwrite`) per 4 KiB page, and a store into a page not cached makes
//! the kernel read (or, on a never-written extent, zero, with read-ahead beyond it) the page
//! first; `pwrite` of whole pages does neither, with one system call per write. So even in
//! mmap mode a write none of whose pages is cached (`mincore`) goes with `pwrite`: on a new
//! disk that halved the master target's CPU per GiB (`bench apply`, fresh pass); the span's
//! msync (an fdatasync of that file range) makes those pages durable with the mapped ones.
//! (Prefaulting the map with `madvise(MADV_POPULATE_WRITE)` was tried and cost more CPU per
//! GiB.)
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

use crate::storage::sync_failed;

/// Zero ranges smaller than this are memset: a syscall costs more than the stores.
const ZERO_RANGE_MIN: u64 = 64 * 1024;
const PAGE: u64 = 4096;
/// Zeros for pwrite-mode zero-fill of the unaligned edges (and of ranges where the
/// filesystem lacks `FALLOC_FL_ZERO_RANGE`).
static ZEROS: [u8; ZERO_RANGE_MIN as usize] = [0; ZERO_RANGE_MIN as usize];

/// How a flat extent's data is written and read (`master-target serve --data-io`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DataIo {
    /// Stores through a shared memory map (pwrite where no page of a write is cached), made
    /// durable by msync of the dirty span.
    #[default]
    Mmap,
    /// `pwrite` on the file, made durable by fdatasync; nothing is mapped.
    Pwrite,
}

impl DataIo {
    pub fn name(self) -> &'static str {
        match self {
            DataIo::Mmap => "mmap",
            DataIo::Pwrite => "pwrite",
        }
    }
}

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

/// An open, locked, fully allocated flat extent, mapped in mmap mode.
pub struct FlatExtent {
    path: PathBuf,
    /// The map in [`DataIo::Mmap`] mode; `None` in pwrite mode. Declared before `file`, so
    /// that it is unmapped before the file (and its lock) is closed.
    map: Option<MmapMut>,
    file: File,
    capacity: u64,
    /// Byte span written (through the map or with pwrite) since the last sync: [start, end).
    dirty: Option<(u64, u64)>,
    /// Whether a `FALLOC_FL_ZERO_RANGE` ran since the last sync (extent metadata changed).
    metadata_dirty: bool,
    /// Whether this file's filesystem is one whose `SEEK_DATA` is known to count dirty
    /// page-cache pages as data ([`seek_data_trusted`]); elsewhere holes are read.
    holes_trusted: bool,
}

/// statfs magics of the filesystems whose `SEEK_DATA` reports every byte written (even
/// unsynced, even through a map) as data: ext4 (also ext2/3), XFS, Btrfs, tmpfs. Others
/// (OpenZFS before 2.2.2, for one) have reported dirty ranges as holes; trusting them would
/// journal zeros as the old bytes of a block, and a rollback would then write zeros.
fn seek_data_trusted(fs_type: i64) -> bool {
    matches!(fs_type, 0xEF53 | 0x5846_5342 | 0x9123_683E | 0x0102_1994)
}

impl std::fmt::Debug for FlatExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FlatExtent({}, {} bytes, {})",
            self.path.display(),
            self.capacity,
            self.data_io().name()
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

/// Maps the first `capacity` bytes of `file` for writing.
///
/// The caller holds the file's exclusive flock for the map's lifetime, has checked (or set)
/// its length to `capacity` and reserved every byte, so the mapping stays backed. Other
/// processes that ignore the lock could still truncate it: that is the documented limit of
/// mapped files, which the lock exists to prevent.
fn map_file(file: &File, path: &Path, capacity: u64) -> Result<MmapMut, FlatError> {
    let len = usize::try_from(capacity)
        .map_err(|_| FlatError::io("map", path, io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: see above: locked, length checked, every byte allocated.
    unsafe { memmap2::MmapOptions::new().len(len).map_mut(file) }
        .map_err(|e| FlatError::io("mmap", path, e))
}

/// Whether any page of `[offset, offset + len)` of the mapped file is in the page cache
/// (`mincore`); `true` when it cannot tell, so that the store goes through the map.
/// `fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)`: `[offset, offset + len)` of
/// `file` reads as zeros, its blocks stay allocated (no hole is punched).
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an open descriptor, with no pointers.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn any_resident(map: &MmapMut, offset: u64, len: usize) -> bool {
    const CHUNK: usize = 256;
    let start = (offset / PAGE * PAGE) as usize;
    let end = ((offset + len as u64).div_ceil(PAGE) * PAGE) as usize;
    let mut vec = [0u8; CHUNK];
    let mut at = start;
    while at < end {
        let n = ((end - at) / PAGE as usize).min(CHUNK);
        // SAFETY: `[at, at + n pages)` lies inside the mapping (which extends to the end of
        // its last page), `at` is page aligned and `vec` has room for one byte per page.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr().add(at) as *mut libc::c_void,
                n * PAGE as usize,
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 || vec[..n].iter().any(|v| v & 1 != 0) {
            return true;
        }
        at += n * PAGE as usize;
    }
    false
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
        let map = map_file(&file, &path, capacity)?;
        Ok(FlatExtent {
            holes_trusted: super::fs_type(&path).is_some_and(seek_data_trusted),
            path,
            file,
            capacity,
            map: Some(map),
            dirty: None,
            metadata_dirty: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn data_io(&self) -> DataIo {
        if self.map.is_some() {
            DataIo::Mmap
        } else {
            DataIo::Pwrite
        }
    }

    /// Switches how the data is written. Whatever is pending is synced first, so that
    /// each mode's [`Self::sync`] only has its own writes to make durable.
    pub fn set_data_io(&mut self, io: DataIo) -> Result<(), FlatError> {
        if io == self.data_io() {
            return Ok(());
        }
        self.sync()?;
        match io {
            DataIo::Pwrite => self.map = None,
            DataIo::Mmap => {
                // The file stayed locked and allocated; check its length again before
                // mapping anyway, as `open` does (a map past EOF would SIGBUS).
                let actual = self
                    .file
                    .metadata()
                    .map_err(|e| FlatError::io("stat", &self.path, e))?
                    .len();
                if actual != self.capacity {
                    return Err(FlatError::WrongSize {
                        path: self.path.clone(),
                        expected: self.capacity,
                        actual,
                    });
                }
                self.map = Some(map_file(&self.file, &self.path, self.capacity)?);
            }
        }
        Ok(())
    }

    fn mark(&mut self, start: u64, end: u64) {
        self.dirty = Some(match self.dirty {
            Some((s, e)) => (s.min(start), e.max(end)),
            None => (start, end),
        });
    }

    /// Copies `data` to `offset`. The caller guarantees the range is inside the disk
    /// (`protocol::batch::check` did); out of range panics rather than corrupting memory
    /// (or, in pwrite mode, growing the file).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), FlatError> {
        let end = offset + data.len() as u64;
        assert!(end <= self.capacity, "write beyond the extent");
        match &mut self.map {
            Some(map) if any_resident(map, offset, data.len()) => {
                let at = offset as usize;
                map[at..at + data.len()].copy_from_slice(data);
            }
            // In mmap mode too when no page of the range is cached: a store would fault
            // each page in (read, or zero-fill with read-ahead, only to overwrite it).
            // The span's msync makes these pages durable like the mapped ones.
            _ => self
                .file
                .write_all_at(data, offset)
                .map_err(|e| FlatError::io("pwrite", &self.path, e))?,
        }
        self.mark(offset, end);
        Ok(())
    }

    /// Fills `buf` with the current bytes at `offset` (what the disk holds once synced).
    /// The caller guarantees the range is inside the disk.
    ///
    /// A range the filesystem reports as a hole is filled with zeros without being read:
    /// on a fallocated, never-written extent (a new disk), reading would make the kernel
    /// allocate and zero a page-cache page per 4 KiB just to read zeros, which was most of
    /// the CPU of a full sync onto a new disk (the undo journal reads every old byte).
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), FlatError> {
        if self.is_hole(offset, buf.len() as u64) {
            buf.fill(0);
            return Ok(());
        }
        // pread in both modes (the map's stores are in the same page cache): it reads ahead
        // for itself and maps nothing, where reading through the map faults every page in.
        // A short read (the file was truncated underneath) is an error, not a SIGBUS.
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| FlatError::io("pread", &self.path, e))
    }

    /// Whether `[offset, offset + len)` holds no data by `lseek(SEEK_DATA)`: a hole (or an
    /// unwritten, fallocated extent with no page cached) reads as zeros by definition, and
    /// the filesystem counts dirty or cached pages (our own unsynced stores) as data.
    /// `false` whenever it cannot tell (no SEEK_DATA support, any error): then the range
    /// is simply read. `lseek` moves the file offset, which nothing here uses (all I/O is
    /// positional or through the map).
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        if len == 0 || !self.holes_trusted {
            return false;
        }
        let Ok(at) = libc::off_t::try_from(offset) else {
            return false;
        };
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let next = unsafe { libc::lseek(self.file.as_raw_fd(), at, libc::SEEK_DATA) };
        if next < 0 {
            // ENXIO: no data at or after `offset`, or `offset` is past EOF (a file cut
            // short underneath): only the first is a hole, the second must fail the read.
            return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)
                && self
                    .file
                    .metadata()
                    .is_ok_and(|m| m.len() >= offset.saturating_add(len));
        }
        next as u64 >= offset.saturating_add(len)
    }

    /// Zero-fills `[offset, offset + len)`, keeping the blocks allocated.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), FlatError> {
        let end = offset + len;
        let inner_start = offset.next_multiple_of(PAGE);
        let inner_end = end / PAGE * PAGE;
        if len < ZERO_RANGE_MIN || inner_end <= inner_start {
            return self.memset(offset, end);
        }
        // The kernel drops the page-cache pages of the range, so the map reads the zeros.
        if let Err(e) = zero_range(&self.file, inner_start, inner_end - inner_start) {
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
            ) {
                // tmpfs and some others lack ZERO_RANGE: plain stores are equivalent.
                return self.memset(offset, end);
            }
            return Err(FlatError::io("fallocate(ZERO_RANGE)", &self.path, e));
        }
        self.metadata_dirty = true;
        self.memset(offset, inner_start)?;
        self.memset(inner_end, end)
    }

    /// Stores zeros over `[start, end)`.
    fn memset(&mut self, start: u64, end: u64) -> Result<(), FlatError> {
        if end <= start {
            return Ok(());
        }
        match &mut self.map {
            Some(map) => map[start as usize..end as usize].fill(0),
            None => {
                let mut at = start;
                while at < end {
                    let n = (end - at).min(ZEROS.len() as u64);
                    self.file
                        .write_all_at(&ZEROS[..n as usize], at)
                        .map_err(|e| FlatError::io("pwrite", &self.path, e))?;
                    at += n;
                }
            }
        }
        self.mark(start, end);
        Ok(())
    }

    /// Makes every write and zero-fill since the last sync durable: in mmap mode msync of
    /// the dirty span first (PITFALLS.md §3), then fdatasync if extent metadata changed; in
    /// pwrite mode one fdatasync (it covers both). An error is fatal for the disk: a failed
    /// sync cannot be retried (the kernel marks pages clean).
    /// The system call [`Self::sync`] makes first: msync while mapped writes are pending,
    /// else fdatasync.
    pub fn sync_call(&self) -> &'static str {
        if self.map.is_some() && self.dirty.is_some() {
            "msync"
        } else {
            "fdatasync"
        }
    }

    pub fn sync(&mut self) -> Result<(), FlatError> {
        let dirty = self.dirty.take();
        if let (Some((start, end)), Some(map)) = (dirty, &self.map) {
            let page_start = start / PAGE * PAGE;
            map.flush_range(page_start as usize, (end - page_start) as usize)
                .map_err(|e| FlatError::io("msync", &self.path, sync_failed(e)))?;
        } else if dirty.is_some() {
            // pwrite mode: the written pages are ordinary dirty page-cache pages.
            self.metadata_dirty = false;
            return self
                .file
                .sync_data()
                .map_err(|e| FlatError::io("fdatasync", &self.path, sync_failed(e)));
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
        f.write(4096, b"hello").unwrap();
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

    /// In mmap mode a store into pages none of which is cached goes with pwrite, one into a
    /// cached page through the map. Which path a write took is not observable here; what
    /// this checks is the promise of both: the map sees the bytes, and the sync makes them
    /// durable.
    #[test]
    fn mapped_writes_into_cached_and_uncached_pages_are_seen_and_durable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m-flat.vmdk");
        let mut f = FlatExtent::create(&p, 1 << 20).unwrap();
        assert_eq!(f.data_io(), DataIo::Mmap);
        // Not cached on a disk filesystem (tmpfs keeps every allocated page).
        f.write(0, &[1u8; 8192]).unwrap();
        let map = f.map.as_ref().unwrap();
        assert!(any_resident(map, 0, 8192), "written pages are cached");
        assert_eq!(&map[..8192], &[1u8; 8192][..], "the map sees a pwrite");
        f.write(4096, &[2u8; 100]).unwrap();
        f.write(700_000, &[3u8; 5000]).unwrap();
        f.sync().unwrap();
        drop(f);
        let bytes = std::fs::read(&p).unwrap();
        let mut want = vec![0u8; 1 << 20];
        want[..8192].fill(1);
        want[4096..4196].fill(2);
        want[700_000..705_000].fill(3);
        assert!(bytes == want);
    }

    #[test]
    fn unaligned_zero_ranges_zero_exactly_and_keep_space_allocated() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z-flat.vmdk");
        let mut f = FlatExtent::create(&p, 1 << 20).unwrap();
        f.write(0, &[0xff; 1 << 20]).unwrap();
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

    /// Reads see every store at once, synced or not, in both modes and across a switch:
    /// the hole shortcut of `read_into` must never hide an unsynced write.
    #[test]
    fn reads_see_unsynced_stores_holes_read_as_zeros_in_both_modes() {
        let dir = tempfile::tempdir().unwrap();
        for io in [DataIo::Mmap, DataIo::Pwrite] {
            let p = dir.path().join(format!("{}-flat.vmdk", io.name()));
            let mut f = FlatExtent::create(&p, 4 << 20).unwrap();
            f.set_data_io(io).unwrap();
            assert_eq!(f.data_io(), io);
            let mut buf = vec![0xeeu8; 256 << 10];
            f.read_into(1 << 20, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "a new extent reads zeros");
            f.write((1 << 20) + 4097, &[7u8; 100_000]).unwrap();
            f.read_into(1 << 20, &mut buf).unwrap();
            assert!(buf[..4097].iter().all(|&b| b == 0));
            assert!(
                buf[4097..104_097].iter().all(|&b| b == 7),
                "unsynced store seen"
            );
            assert!(buf[104_097..].iter().all(|&b| b == 0));
            f.sync().unwrap();
            f.zero(1 << 20, 256 << 10).unwrap();
            f.read_into(1 << 20, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "zeroed");
            f.write(3 << 20, &[9u8; 8192]).unwrap();
            // Switching syncs what is pending and keeps every byte.
            let other = match io {
                DataIo::Mmap => DataIo::Pwrite,
                DataIo::Pwrite => DataIo::Mmap,
            };
            f.set_data_io(other).unwrap();
            let mut got = [0u8; 8192];
            f.read_into(3 << 20, &mut got).unwrap();
            assert_eq!(got, [9u8; 8192]);
            f.write(2 << 20, &[5u8; 512]).unwrap();
            f.sync().unwrap();
            drop(f);
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(bytes[3 << 20], 9);
            assert_eq!(bytes[2 << 20], 5);
            assert_eq!(bytes[(1 << 20) + 5000], 0);
        }
    }

    /// In pwrite mode a file cut short underneath (by a process ignoring the lock) gives
    /// an error, where a map would have raised SIGBUS.
    #[test]
    fn pwrite_mode_reports_a_truncated_file_as_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t-flat.vmdk");
        let mut f = FlatExtent::create(&p, 1 << 20).unwrap();
        f.set_data_io(DataIo::Pwrite).unwrap();
        f.write(900_000, &[3u8; 4096]).unwrap();
        f.sync().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let mut buf = [0u8; 4096];
        assert!(f.read_into(900_000, &mut buf).is_err());
        assert!(matches!(
            f.set_data_io(DataIo::Mmap),
            Err(FlatError::WrongSize { .. })
        ));
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
