//! A hosted sparse extent (`createType="monolithicSparse"`): one file holding a header, an
//! embedded descriptor, grain directories and tables, and grains allocated on first write.
//!
//! Layout as qemu creates it (VMDK-NOTES.md (b)-(c); little-endian, sector = 512 bytes):
//!
//! ```text
//! sector 0        header { magic "KDMV" u32 | version u32 (1) | flags u32 (3: newline check,
//!                 redundant GD) | capacity u64 | grainSize u64 (128) | descriptorOffset u64 (1)
//!                 | descriptorSize u64 (20) | numGTEsPerGT u32 (512) | rgdOffset u64 (21)
//!                 | gdOffset u64 | overHead u64 | uncleanShutdown u8 | "\n \r\n" | compress u16 (0) }
//! sectors 1..21   embedded text descriptor, NUL padded
//! 21              redundant GD (nGT u32 entries, gdSec sectors), then nGT redundant GTs
//! gdOffset        GD, then nGT GTs (4 sectors = 512 u32 each), all preallocated and zero
//! overHead        first grain (rounded up to a grain); grains follow, grain-aligned
//! ```
//!
//! with nGT = ceil(ceil(capacity / grainSize) / 512), gdSec = ceil(nGT * 4 / 512),
//! gdOffset = 21 + gdSec + 4 nGT, overHead = roundup(gdOffset + gdSec + 4 nGT, grainSize).
//! A GT entry is the absolute sector of its grain, 0 = unallocated (reads as zeros).
//!
//! Invariants of an open [`SparseExtent`]:
//! * the file is exclusively `flock`ed; every GD entry is set (images with lazily
//!   allocated GTs are refused: qemu itself corrupts them on write, VMDK-NOTES.md (c));
//! * grains are written with `pwrite` (no map: a map of a growing file would need remapping
//!   and would SIGBUS on a full datastore, PITFALLS.md §3); space is reserved ahead with
//!   `fallocate(KEEP_SIZE)` in [`GROW_CHUNK`] steps, so the file size stays the end of the
//!   last grain, as qemu expects at open;
//! * a new grain is written whole (zeros around the data) at the next free grain-aligned
//!   sector; its GT entries (GD side and redundant side) are written only by [`sync`],
//!   after the grains are durable (fdatasync), then synced again: a crash leaves at worst
//!   an unreferenced grain, never an entry pointing at unwritten data.
//!
//! [`sync`]: SparseExtent::sync

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub(super) const SECTOR: u64 = 512;
const MAGIC: u32 = 0x564D_444B; // "KDMV" on disk
/// Grain size of images we create (64 KiB), as qemu.
pub const GRAIN_SECTORS: u64 = 128;
pub(super) const GTES_PER_GT: u64 = 512;
pub(super) const DESC_OFFSET: u64 = 1;
const DESC_SECTORS: u64 = 20;
/// Bytes of the embedded descriptor area.
pub const DESC_BYTES: usize = (DESC_SECTORS * SECTOR) as usize;
/// flags: bit 0 newline detection valid, bit 1 redundant GD in use.
const FLAGS: u32 = 3;
const FLAG_REDUNDANT_GD: u32 = 2;
/// flags bit 2 (version 2 only): a GT entry of 1 means "zeroed grain", not a sector.
const FLAG_ZEROED_GTE: u32 = 4;
/// Incompatible flags we cannot write: compressed grains, markers (streamOptimized).
const FLAGS_UNSUPPORTED: u32 = (1 << 16) | (1 << 17);
/// Reserve this much file space ahead of the grain allocator.
pub const GROW_CHUNK: u64 = 16 << 20;
/// GT entries are u32 sectors: the file (and so the disk) stays below 2 TiB.
pub const MAX_CAPACITY: u64 = (1 << 41) - (64 << 20);

#[derive(Debug, thiserror::Error)]
pub enum SparseError {
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
    #[error("{path} is not a sparse VMDK we can write: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SparseError + 'a {
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return SparseError::NoSpace {
                path: path.to_path_buf(),
                detail: format!("{op} failed: {source}"),
            };
        }
        SparseError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A failed sync of `path`: never a lack of space, whatever its errno (crate::storage).
fn sync_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SparseError + 'a {
    move |source| io_err(op, path)(crate::storage::sync_failed(source))
}

/// The fields of a sparse header we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub capacity_sectors: u64,
    pub grain_sectors: u64,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub overhead: u64,
    pub flags: u32,
    pub version: u32,
    /// Sectors of the embedded descriptor area (at sector 1).
    pub descriptor_sectors: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// The layout qemu creates for `capacity` bytes.
    pub fn for_capacity(capacity: u64) -> Header {
        let capacity_sectors = capacity / SECTOR;
        let n_gt = n_gts(capacity_sectors, GRAIN_SECTORS);
        let gd_sectors = (n_gt * 4).div_ceil(SECTOR);
        let rgd_offset = DESC_OFFSET + DESC_SECTORS;
        let gd_offset = rgd_offset + gd_sectors + 4 * n_gt;
        Header {
            capacity_sectors,
            grain_sectors: GRAIN_SECTORS,
            rgd_offset,
            gd_offset,
            overhead: (gd_offset + gd_sectors + 4 * n_gt).next_multiple_of(GRAIN_SECTORS),
            flags: FLAGS,
            version: 1,
            descriptor_sectors: DESC_SECTORS,
        }
    }

    fn encode(&self) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&self.version.to_le_bytes());
        h[8..12].copy_from_slice(&self.flags.to_le_bytes());
        h[12..20].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        h[20..28].copy_from_slice(&self.grain_sectors.to_le_bytes());
        h[28..36].copy_from_slice(&DESC_OFFSET.to_le_bytes());
        h[36..44].copy_from_slice(&self.descriptor_sectors.to_le_bytes());
        h[44..48].copy_from_slice(&(GTES_PER_GT as u32).to_le_bytes());
        h[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        h[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        h[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        h[73..77].copy_from_slice(b"\n \r\n");
        h
    }

    /// Parses and checks a header (see the module invariants); `Err` says why.
    pub fn parse(h: &[u8]) -> Result<Header, String> {
        if h.len() < 512 || u32_at(h, 0) != MAGIC {
            return Err("no KDMV magic".into());
        }
        let version = u32_at(h, 4);
        if !(1..=2).contains(&version) {
            return Err(format!("version {version} (1 and 2 are supported)"));
        }
        let flags = u32_at(h, 8);
        if flags & FLAGS_UNSUPPORTED != 0 {
            return Err(format!("flags {flags:#x}: compressed grains or markers"));
        }
        let header = Header {
            capacity_sectors: u64_at(h, 12),
            grain_sectors: u64_at(h, 20),
            rgd_offset: u64_at(h, 48),
            gd_offset: u64_at(h, 56),
            overhead: u64_at(h, 64),
            flags,
            version,
            descriptor_sectors: u64_at(h, 36),
        };
        let g = header.grain_sectors;
        if !g.is_power_of_two() || !(8..=128).contains(&g) {
            return Err(format!("grain size {g} sectors"));
        }
        if u64::from(u32_at(h, 44)) != GTES_PER_GT {
            return Err(format!("{} entries per GT (512 expected)", u32_at(h, 44)));
        }
        if u64_at(h, 28) != DESC_OFFSET || u64_at(h, 36) > DESC_SECTORS {
            return Err("embedded descriptor not at sector 1".into());
        }
        if header.gd_offset == u64::MAX || header.gd_offset == 0 {
            return Err("grain directory at the end (streamOptimized)".into());
        }
        // Checked: the fields are untrusted, and a wrapped product would pass the cap.
        let capacity = header.capacity_sectors.checked_mul(SECTOR);
        if header.capacity_sectors == 0 || capacity.is_none_or(|c| c > MAX_CAPACITY) {
            return Err(format!("capacity {} sectors", header.capacity_sectors));
        }
        Ok(header)
    }

    pub(super) fn n_gts(&self) -> u64 {
        n_gts(self.capacity_sectors, self.grain_sectors)
    }

    /// Sectors of one grain directory.
    pub(super) fn gd_sectors(&self) -> u64 {
        (self.n_gts() * 4).div_ceil(SECTOR)
    }

    /// Whether a GT entry of 1 means "zeroed grain" rather than sector 1.
    pub(super) fn zeroed_gte_allowed(&self) -> bool {
        self.version >= 2 && self.flags & FLAG_ZEROED_GTE != 0
    }

    /// Whether the redundant GD is in use.
    pub(super) fn has_redundant_gd(&self) -> bool {
        self.flags & FLAG_REDUNDANT_GD != 0
    }
}

fn n_gts(capacity_sectors: u64, grain_sectors: u64) -> u64 {
    capacity_sectors
        .div_ceil(grain_sectors)
        .div_ceil(GTES_PER_GT)
}

pub(super) fn read_u32s(
    file: &File,
    path: &Path,
    sector: u64,
    n: usize,
) -> Result<Vec<u32>, SparseError> {
    let offset = sector
        .checked_mul(SECTOR)
        .ok_or_else(|| SparseError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("table at sector {sector} is past any file"),
        })?;
    let mut b = vec![0u8; n * 4];
    file.read_exact_at(&mut b, offset)
        .map_err(io_err("read", path))?;
    Ok(b.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

/// The tables of a sparse file, read once: enough to read its data.
#[derive(Debug)]
struct Tables {
    header: Header,
    gd: Vec<u32>,
    rgd: Vec<u32>,
    /// Every GT entry, GT after GT.
    gte: Vec<u32>,
}

impl Tables {
    fn load(file: &File, path: &Path) -> Result<Tables, SparseError> {
        let mut h = [0u8; 512];
        file.read_exact_at(&mut h, 0)
            .map_err(io_err("read", path))?;
        let header = Header::parse(&h).map_err(|reason| SparseError::Unsupported {
            path: path.to_path_buf(),
            reason,
        })?;
        let n_gt = header.n_gts() as usize;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        let corrupt = |reason: String| SparseError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if header.overhead.checked_mul(SECTOR).is_none_or(|o| len < o) {
            return Err(corrupt(format!(
                "file of {len} bytes ends inside its metadata"
            )));
        }
        let gd = read_u32s(file, path, header.gd_offset, n_gt)?;
        let rgd = if header.has_redundant_gd() {
            read_u32s(file, path, header.rgd_offset, n_gt)?
        } else {
            Vec::new()
        };
        let mut gte = Vec::with_capacity(n_gt * GTES_PER_GT as usize);
        for &sector in gd.iter().chain(&rgd) {
            if sector == 0 {
                return Err(SparseError::Unsupported {
                    path: path.to_path_buf(),
                    reason: "a grain table is not allocated (lazy GT allocation)".into(),
                });
            }
            if u64::from(sector) + 4 > header.overhead {
                return Err(corrupt(format!(
                    "grain table at sector {sector} is past overHead"
                )));
            }
        }
        for &sector in &gd {
            gte.extend(read_u32s(
                file,
                path,
                u64::from(sector),
                GTES_PER_GT as usize,
            )?);
        }
        let end = len.div_ceil(SECTOR);
        for (g, &s) in gte.iter().enumerate() {
            let s = u64::from(s);
            if s != 0
                && (s < header.overhead
                    || s + header.grain_sectors > end.next_multiple_of(header.grain_sectors))
            {
                return Err(corrupt(format!(
                    "grain {g} points at sector {s}, outside the data area"
                )));
            }
        }
        Ok(Tables {
            header,
            gd,
            rgd,
            gte,
        })
    }

    fn grain_bytes(&self) -> u64 {
        self.header.grain_sectors * SECTOR
    }

    /// Reads `buf.len()` bytes at `offset` (zeros for unallocated grains).
    fn read_at(&self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let gb = self.grain_bytes();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let n = ((gb - at % gb) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.gte.get((at / gb) as usize) {
                Some(0) => out.fill(0),
                Some(&s) => file.read_exact_at(out, u64::from(s) * SECTOR + at % gb)?,
                None => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            }
            done += n;
        }
        Ok(())
    }
}

/// Reads a sparse image's data (for hashing and copying), without locking or writing it.
#[derive(Debug)]
pub struct SparseReader {
    file: File,
    tables: Tables,
}

impl SparseReader {
    pub fn open(path: &Path) -> Result<SparseReader, SparseError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        let tables = Tables::load(&file, path)?;
        Ok(SparseReader { file, tables })
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.tables.read_at(&self.file, offset, buf)
    }
}

/// The embedded descriptor's text (up to the first NUL).
pub fn read_embedded_descriptor(path: &Path) -> Result<Vec<u8>, SparseError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let mut b = vec![0u8; DESC_BYTES];
    file.read_exact_at(&mut b, DESC_OFFSET * SECTOR)
        .map_err(io_err("read", path))?;
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    b.truncate(end);
    Ok(b)
}

/// Whether `path` starts with the sparse magic.
pub fn is_sparse(path: &Path) -> bool {
    let mut m = [0u8; 4];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut m, 0))
        .is_ok_and(|()| u32::from_le_bytes(m) == MAGIC)
}

/// An open, locked sparse extent (see the module invariants).
pub struct SparseExtent {
    path: PathBuf,
    file: File,
    tables: Tables,
    /// Grains whose GT entry changed since the last sync.
    dirty_gte: BTreeSet<usize>,
    data_dirty: bool,
    /// Next free sector for a grain.
    next_free: u64,
    /// File space reserved up to this byte.
    reserved: u64,
    zeros: Vec<u8>,
}

impl std::fmt::Debug for SparseExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SparseExtent({})", self.path.display())
    }
}

fn lock(file: &File, path: &Path) -> Result<(), SparseError> {
    match super::try_lock(file) {
        Ok(true) => Ok(()),
        Ok(false) => Err(SparseError::Locked {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(io_err("lock", path)(e)),
    }
}

impl SparseExtent {
    /// Creates `path` (which must not exist) for `capacity` bytes with the qemu layout and
    /// `descriptor` embedded; on failure the partial file is removed.
    pub fn create(
        path: &Path,
        capacity: u64,
        descriptor: &str,
    ) -> Result<SparseExtent, SparseError> {
        if capacity > MAX_CAPACITY || capacity == 0 {
            return Err(SparseError::Unsupported {
                path: path.to_path_buf(),
                reason: format!("capacity {capacity} (a sparse extent holds up to 2 TiB)"),
            });
        }
        let file = super::open_rw(path, true).map_err(io_err("create", path))?;
        let made = (|| {
            lock(&file, path)?;
            let h = Header::for_capacity(capacity);
            let n_gt = h.n_gts();
            let gd_sectors = h.gd_sectors();
            file.set_len(h.overhead * SECTOR)
                .map_err(io_err("truncate", path))?;
            file.write_all_at(&h.encode(), 0)
                .map_err(io_err("write", path))?;
            for (dir, first_gt) in [
                (h.rgd_offset, h.rgd_offset + gd_sectors),
                (h.gd_offset, h.gd_offset + gd_sectors),
            ] {
                let entries: Vec<u8> = (0..n_gt)
                    .flat_map(|i| ((first_gt + 4 * i) as u32).to_le_bytes())
                    .collect();
                file.write_all_at(&entries, dir * SECTOR)
                    .map_err(io_err("write", path))?;
            }
            write_descriptor_area(&file, path, descriptor)?;
            file.sync_all().map_err(sync_err("fsync", path))?;
            // The descriptor is inside: no later rename makes the new name durable.
            let dir = path.parent().unwrap_or(Path::new("."));
            crate::storage::sync_dir(dir).map_err(io_err("fsync dir", dir))?;
            Self::from_file(path, file)
        })();
        super::remove_if_failed(path, made)
    }

    /// Opens and locks an existing sparse file (ours or qemu's) of exactly `capacity`.
    pub fn open(path: &Path, capacity: u64) -> Result<SparseExtent, SparseError> {
        let file = super::open_rw(path, false).map_err(io_err("open", path))?;
        lock(&file, path)?;
        let e = Self::from_file(path, file)?;
        if e.capacity() != capacity {
            return Err(SparseError::Unsupported {
                path: path.to_path_buf(),
                reason: format!(
                    "it holds {} bytes, the disk declares {capacity}",
                    e.capacity()
                ),
            });
        }
        Ok(e)
    }

    fn from_file(path: &Path, file: File) -> Result<SparseExtent, SparseError> {
        let tables = Tables::load(&file, path)?;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        let next_free = len
            .div_ceil(SECTOR)
            .next_multiple_of(tables.header.grain_sectors);
        let grain = tables.grain_bytes() as usize;
        Ok(SparseExtent {
            path: path.to_path_buf(),
            file,
            tables,
            dirty_gte: BTreeSet::new(),
            data_dirty: false,
            next_free,
            reserved: len,
            zeros: vec![0u8; grain],
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn capacity(&self) -> u64 {
        self.tables.header.capacity_sectors * SECTOR
    }

    /// Replaces the embedded descriptor (NUL padded) and syncs it.
    pub fn write_descriptor(&self, text: &str) -> Result<(), SparseError> {
        write_descriptor_area(&self.file, &self.path, text)?;
        self.file
            .sync_data()
            .map_err(sync_err("fdatasync", &self.path))
    }

    /// Reads `buf.len()` bytes at `offset`: zeros where no grain is allocated.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SparseError> {
        self.tables
            .read_at(&self.file, offset, buf)
            .map_err(io_err("read", &self.path))
    }

    /// Writes `data` at `offset`, allocating whole grains where there are none.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), SparseError> {
        self.each_grain(offset, data.len() as u64, |me, g, at, range| {
            me.put(g, at, &data[range])
        })
    }

    /// Zero-fills `[offset, offset + len)`; unallocated grains already read as zeros.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), SparseError> {
        self.each_grain(offset, len, |me, g, at, range| {
            if me.tables.gte[g] == 0 {
                return Ok(());
            }
            let zeros = std::mem::take(&mut me.zeros);
            let r = me.put(g, at, &zeros[..range.len()]);
            me.zeros = zeros;
            r
        })
    }

    /// Calls `f(self, grain, offset in grain, range of the input)` per grain touched.
    fn each_grain(
        &mut self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut Self, usize, u64, std::ops::Range<usize>) -> Result<(), SparseError>,
    ) -> Result<(), SparseError> {
        if offset + len > self.capacity() {
            return Err(SparseError::Io {
                op: "write",
                path: self.path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "range beyond the disk"),
            });
        }
        let gb = self.tables.grain_bytes();
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let n = (gb - at % gb).min(len - done);
            f(
                self,
                (at / gb) as usize,
                at % gb,
                done as usize..(done + n) as usize,
            )?;
            done += n;
        }
        Ok(())
    }

    /// Writes `bytes` at `in_grain` of grain `g`, allocating it (written whole) if needed.
    fn put(&mut self, g: usize, in_grain: u64, bytes: &[u8]) -> Result<(), SparseError> {
        let gb = self.tables.grain_bytes();
        self.data_dirty = true;
        let s = self.tables.gte[g];
        if s != 0 {
            return self
                .file
                .write_all_at(bytes, u64::from(s) * SECTOR + in_grain)
                .map_err(io_err("write", &self.path));
        }
        let sector = self.next_free;
        if sector + self.tables.header.grain_sectors > u64::from(u32::MAX) {
            return Err(SparseError::NoSpace {
                path: self.path.clone(),
                detail: "a sparse extent cannot grow past 2 TiB".into(),
            });
        }
        self.reserve((sector + self.tables.header.grain_sectors) * SECTOR)?;
        let mut grain = vec![0u8; gb as usize];
        grain[in_grain as usize..in_grain as usize + bytes.len()].copy_from_slice(bytes);
        self.file
            .write_all_at(&grain, sector * SECTOR)
            .map_err(io_err("write", &self.path))?;
        self.next_free += self.tables.header.grain_sectors;
        self.tables.gte[g] = sector as u32;
        self.dirty_gte.insert(g);
        Ok(())
    }

    /// Reserves file space up to `end` in [`GROW_CHUNK`] steps, keeping the file size.
    fn reserve(&mut self, end: u64) -> Result<(), SparseError> {
        if end <= self.reserved {
            return Ok(());
        }
        let to = end.next_multiple_of(GROW_CHUNK);
        // SAFETY: fallocate on a valid descriptor; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                self.reserved as libc::off_t,
                (to - self.reserved) as libc::off_t,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // Filesystems without fallocate: pwrite still reports ENOSPC (no map here).
            if !matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
            ) {
                return Err(io_err("fallocate", &self.path)(e));
            }
        }
        self.reserved = to;
        Ok(())
    }

    /// Grains durable -> their GT entries (GD side and redundant side) -> durable.
    pub fn sync(&mut self) -> Result<(), SparseError> {
        if std::mem::take(&mut self.data_dirty) {
            self.file
                .sync_data()
                .map_err(sync_err("fdatasync", &self.path))?;
        }
        if self.dirty_gte.is_empty() {
            return Ok(());
        }
        let per = GTES_PER_GT as usize;
        let mut sectors = BTreeSet::new();
        for &g in &self.dirty_gte {
            sectors.insert(g / 128); // 128 entries per 512-byte sector
        }
        for s in sectors {
            let (gt, first) = (s * 128 / per, s * 128);
            let bytes: Vec<u8> = self.tables.gte[first..(first + 128).min(self.tables.gte.len())]
                .iter()
                .flat_map(|e| e.to_le_bytes())
                .collect();
            let within = (first % per) as u64 * 4;
            for dir in [&self.tables.gd, &self.tables.rgd] {
                if let Some(&table) = dir.get(gt) {
                    self.file
                        .write_all_at(&bytes, u64::from(table) * SECTOR + within)
                        .map_err(io_err("write", &self.path))?;
                }
            }
        }
        self.dirty_gte.clear();
        self.file
            .sync_data()
            .map_err(sync_err("fdatasync", &self.path))
    }
}

fn write_descriptor_area(file: &File, path: &Path, text: &str) -> Result<(), SparseError> {
    if text.len() > DESC_BYTES {
        return Err(SparseError::Unsupported {
            path: path.to_path_buf(),
            reason: format!(
                "descriptor of {} bytes does not fit in {DESC_BYTES}",
                text.len()
            ),
        });
    }
    let mut area = vec![0u8; DESC_BYTES];
    area[..text.len()].copy_from_slice(text.as_bytes());
    file.write_all_at(&area, DESC_OFFSET * SECTOR)
        .map_err(io_err("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_layout_matches_qemu() {
        let h = Header::for_capacity(64 << 20);
        assert_eq!((h.rgd_offset, h.gd_offset, h.overhead), (21, 30, 128));
        let h = Header::for_capacity(10 << 30);
        assert_eq!((h.gd_offset, h.overhead), (1304, 2688));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.vmdk");
        SparseExtent::create(&p, 64 << 20, "x").unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(b.len(), 65536);
        // GD -> GTs at 31 and 35, RGD -> 22 and 26, as qemu-img create writes them.
        assert_eq!(u32_at(&b, 30 * 512), 31);
        assert_eq!(u32_at(&b, 30 * 512 + 4), 35);
        assert_eq!(u32_at(&b, 21 * 512), 22);
        assert_eq!(u32_at(&b, 21 * 512 + 4), 26);
    }

    /// A crash before `sync` (here: the extent dropped without it) leaves the grains of new
    /// allocations written but unreferenced: they read as zeros after a reopen, the GD and
    /// redundant GD sides agree, and later writes land past them.
    #[test]
    fn grains_unreferenced_until_sync_read_as_zeros_after_a_crash() {
        let cap = 4u64 << 20;
        let grain = (GRAIN_SECTORS * SECTOR) as usize;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.vmdk");
        let mut e = SparseExtent::create(&p, cap, "d").unwrap();
        e.write(0, &vec![1u8; grain]).unwrap();
        e.sync().unwrap();
        // Not synced: one new grain (grain 5); the "crash" is the drop below.
        e.write(5 * grain as u64, &vec![2u8; grain]).unwrap();
        drop(e);
        let len_after_crash = std::fs::metadata(&p).unwrap().len();
        let gte_sides = |b: &[u8]| -> (u32, u32) {
            let h = Header::parse(&b[..512]).unwrap();
            let gd = u32_at(b, (h.gd_offset * SECTOR) as usize) as usize * 512;
            let rgd = u32_at(b, (h.rgd_offset * SECTOR) as usize) as usize * 512;
            (u32_at(b, gd + 5 * 4), u32_at(b, rgd + 5 * 4))
        };
        let b = std::fs::read(&p).unwrap();
        assert_eq!(
            gte_sides(&b),
            (0, 0),
            "no entry points at the unsynced grain"
        );
        let r = SparseReader::open(&p).unwrap();
        let mut got = vec![0u8; 6 * grain];
        r.read_at(&mut got, 0).unwrap();
        assert!(got[..grain].iter().all(|&x| x == 1), "synced grain kept");
        assert!(
            got[grain..].iter().all(|&x| x == 0),
            "unsynced grain unreferenced"
        );
        drop(r);
        // After the restart the batch is re-sent: it allocates afresh, past the orphan.
        let mut e = SparseExtent::open(&p, cap).unwrap();
        e.write(5 * grain as u64, &vec![3u8; grain]).unwrap();
        e.sync().unwrap();
        drop(e);
        let b = std::fs::read(&p).unwrap();
        let (gd_side, rgd_side) = gte_sides(&b);
        assert_eq!(gd_side, rgd_side, "both sides written");
        assert!(u64::from(gd_side) * SECTOR >= len_after_crash - grain as u64);
        let r = SparseReader::open(&p).unwrap();
        r.read_at(&mut got, 0).unwrap();
        assert!(got[5 * grain..].iter().all(|&x| x == 3));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Random writes and zero ranges read back like a plain file, before and after a
        /// reopen.
        #[test]
        fn random_writes_read_back_like_a_plain_file(
            ops in prop::collection::vec((0u64..(4 << 20) - 1, 1u64..200_000, any::<u8>(), any::<bool>()), 1..24)
        ) {
            let cap = 4u64 << 20;
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("s.vmdk");
            let mut e = SparseExtent::create(&p, cap, "d").unwrap();
            let mut plain = vec![0u8; cap as usize];
            for (off, len, v, zero) in ops {
                let len = len.min(cap - off);
                let r = &mut plain[off as usize..(off + len) as usize];
                if zero {
                    e.zero(off, len).unwrap();
                    r.fill(0);
                } else {
                    e.write(off, &vec![v; len as usize]).unwrap();
                    r.fill(v);
                }
            }
            let mut got = vec![0u8; cap as usize];
            e.read_at(0, &mut got).unwrap();
            prop_assert!(got == plain);
            e.sync().unwrap();
            drop(e);
            let r = SparseReader::open(&p).unwrap();
            let mut got = vec![0u8; cap as usize];
            r.read_at(&mut got, 0).unwrap();
            prop_assert!(got == plain);
        }
    }

    /// Header fields whose sector counts overflow 64 bits in bytes are refused, not
    /// wrapped (a wrapped capacity passed the cap and then asked for terabytes of tables).
    #[test]
    fn header_sector_counts_that_overflow_in_bytes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.vmdk");
        drop(SparseExtent::create(&p, 1 << 20, "d").unwrap());
        let good = std::fs::read(&p).unwrap();
        // capacity (offset 12), rgdOffset (48), gdOffset (56), overHead (64).
        for (field, value) in [
            (12, 1u64 << 55),
            (48, 1 << 60),
            (56, 1 << 60),
            (64, 1 << 56),
        ] {
            let mut b = good.clone();
            b[field..field + 8].copy_from_slice(&value.to_le_bytes());
            std::fs::write(&p, &b).unwrap();
            let e = SparseReader::open(&p).unwrap_err();
            assert!(
                matches!(
                    e,
                    SparseError::Unsupported { .. } | SparseError::Corrupt { .. }
                ),
                "field at {field}: {e}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// An arbitrary first sector is a header or an error, never a panic.
        #[test]
        fn arbitrary_headers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = Header::parse(&bytes);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// A valid header over arbitrary grain directories and tables (and an arbitrary
        /// file length): opening refuses it or reads every byte of the disk, never a panic
        /// or a read outside the file.
        #[test]
        fn arbitrary_tables_are_refused_or_read_never_a_panic(
            tables in prop::collection::vec(any::<u8>(), 0..(64 << 10)),
            pokes in prop::collection::vec((0usize..(64 << 10), any::<u32>()), 0..16),
            cut in 0u64..(256 << 10),
        ) {
            let cap = 4u64 << 20;
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("s.vmdk");
            drop(SparseExtent::create(&p, cap, "d").unwrap());
            let mut b = std::fs::read(&p).unwrap();
            let h = Header::parse(&b[..512]).unwrap();
            // Overwrite the metadata after the descriptor with arbitrary bytes, plant some
            // plausible sector numbers, and give the file an arbitrary length.
            let start = (h.rgd_offset * SECTOR) as usize;
            let meta = &mut b[start..];
            let n = tables.len().min(meta.len());
            meta[..n].copy_from_slice(&tables[..n]);
            for (at, v) in pokes {
                let at = (at / 4 * 4) % meta.len().saturating_sub(3).max(1);
                meta[at..at + 4].copy_from_slice(&(v % 1024).to_le_bytes());
            }
            b.resize((b.len() as u64 + cut) as usize, 0xee);
            std::fs::write(&p, &b).unwrap();
            if let Ok(r) = SparseReader::open(&p) {
                let mut all = vec![0u8; cap as usize];
                let _ = r.read_at(&mut all, 0);
            }
        }
    }
}
