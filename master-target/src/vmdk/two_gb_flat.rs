//! A `twoGbMaxExtentFlat` disk: a text descriptor and the disk's bytes cut into flat
//! extents of at most 2 GiB (4194304 sectors) each, the last one holding the remainder, as
//! `qemu-img create -o subformat=twoGbMaxExtentFlat` makes it (VMDK-NOTES.md (a)):
//!
//! ```text
//! NAME.vmdk        createType="twoGbMaxExtentFlat"
//!                  RW 4194304 FLAT "NAME-f001.vmdk" 0      disk bytes [0, 2 GiB)
//!                  RW 4194304 FLAT "NAME-f002.vmdk" 0      [2 GiB, 4 GiB)
//!                  RW 2097152 FLAT "NAME-f003.vmdk" 0      [4 GiB, 5 GiB)
//! NAME-fNNN.vmdk   raw bytes, exactly its line's sectors x 512 (3 digits, from 001)
//! ```
//!
//! Each extent is a [`FlatExtent`], so flat.rs's invariants hold file by file (locked,
//! fallocated, mapped, synced by msync); this module only maps a disk offset to (extent,
//! offset in it) and splits ranges that cross a boundary. Opening honours the extent sizes
//! the descriptor states (their sum is the capacity); new disks are cut at 2 GiB.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::descriptor::ExtentSpec;
use super::flat::{DataIo, FlatError, FlatExtent};

/// Most bytes of one extent of a disk we create, as VMware and qemu cut them.
pub const EXTENT_BYTES: u64 = 2 << 30;

/// The extents of a new disk `name` of `capacity` bytes, cut every `extent_bytes`.
pub fn layout(name: &str, capacity: u64, extent_bytes: u64) -> Vec<ExtentSpec> {
    (0..capacity.div_ceil(extent_bytes))
        .map(|i| ExtentSpec {
            sectors: (capacity - i * extent_bytes).min(extent_bytes) / 512,
            file: format!("{name}-f{:03}.vmdk", i + 1),
        })
        .collect()
}

/// Where each extent starts in the disk; the last entry is the capacity.
#[derive(Debug, Clone)]
struct Bounds(Vec<u64>);

impl Bounds {
    fn new(sizes: impl IntoIterator<Item = u64>) -> Bounds {
        let mut starts = vec![0];
        for size in sizes {
            let end = starts[starts.len() - 1] + size;
            starts.push(end);
        }
        Bounds(starts)
    }

    fn capacity(&self) -> u64 {
        self.0[self.0.len() - 1]
    }

    /// `(extent, offset in it, range of 0..len)` for each extent that `[offset, offset +
    /// len)` touches, in order. The caller keeps the range inside the disk (as for a single
    /// flat extent, out of range panics rather than writing anywhere).
    fn pieces(&self, offset: u64, len: u64) -> Vec<(usize, u64, Range<usize>)> {
        let mut out = Vec::with_capacity(2);
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            // The last extent starting at or before `at` (empty extents are skipped).
            let i = self.0.partition_point(|&s| s <= at) - 1;
            let n = (self.0[i + 1] - at).min(len - done);
            out.push((i, at - self.0[i], done as usize..(done + n) as usize));
            done += n;
        }
        out
    }
}

/// The open, locked and mapped extents of a twoGbMaxExtentFlat disk.
#[derive(Debug)]
pub struct SplitFlat {
    extents: Vec<FlatExtent>,
    bounds: Bounds,
}

impl SplitFlat {
    /// Creates the extents `specs` in `dir` (none may exist), each reserved, synced and
    /// mapped; on failure the ones already made are removed.
    pub fn create(dir: &Path, specs: &[ExtentSpec]) -> Result<SplitFlat, FlatError> {
        let mut extents: Vec<FlatExtent> = Vec::with_capacity(specs.len());
        for e in specs {
            match FlatExtent::create(&dir.join(&e.file), e.sectors * 512) {
                Ok(x) => extents.push(x),
                Err(err) => {
                    for x in extents {
                        let p = x.path().to_path_buf();
                        drop(x);
                        let _ = std::fs::remove_file(p);
                    }
                    return Err(err);
                }
            }
        }
        Ok(Self::new(extents))
    }

    /// Opens the extents `files` (path and exact size, in disk order).
    pub fn open(files: &[(PathBuf, u64)]) -> Result<SplitFlat, FlatError> {
        let extents = files
            .iter()
            .map(|(p, len)| FlatExtent::open(p, *len))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(extents))
    }

    fn new(extents: Vec<FlatExtent>) -> SplitFlat {
        let bounds = Bounds::new(extents.iter().map(FlatExtent::capacity));
        SplitFlat { extents, bounds }
    }

    /// The first extent (the disk's data, for messages).
    pub fn path(&self) -> &Path {
        self.extents[0].path()
    }

    /// Every extent with its size, in disk order.
    pub fn files(&self) -> Vec<(PathBuf, u64)> {
        self.extents
            .iter()
            .map(|e| (e.path().to_path_buf(), e.capacity()))
            .collect()
    }

    pub fn capacity(&self) -> u64 {
        self.bounds.capacity()
    }

    /// How the extents' data is written (all alike, set by [`Self::set_data_io`]).
    pub fn data_io(&self) -> DataIo {
        self.extents[0].data_io()
    }

    /// How the extents' data is written (all alike).
    pub fn set_data_io(&mut self, io: DataIo) -> Result<(), FlatError> {
        self.extents.iter_mut().try_for_each(|e| e.set_data_io(io))
    }

    /// Copies `data` to `offset` (inside the disk), across extent boundaries.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), FlatError> {
        for (i, at, r) in self.bounds.pieces(offset, data.len() as u64) {
            self.extents[i].write(at, &data[r])?;
        }
        Ok(())
    }

    /// Fills `buf` with the current bytes at `offset` (inside the disk).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), FlatError> {
        for (i, at, r) in self.bounds.pieces(offset, buf.len() as u64) {
            self.extents[i].read_into(at, &mut buf[r])?;
        }
        Ok(())
    }

    /// Zero-fills `[offset, offset + len)`, keeping the blocks allocated.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), FlatError> {
        for (i, at, r) in self.bounds.pieces(offset, len) {
            self.extents[i].zero(at, r.len() as u64)?;
        }
        Ok(())
    }

    /// Makes every write since the last sync durable, extent by extent (each syncs only
    /// what it has dirty).
    pub fn sync(&mut self) -> Result<(), FlatError> {
        self.extents.iter_mut().try_for_each(FlatExtent::sync)
    }

    /// The system call [`Self::sync`] makes first ([`FlatExtent::sync_call`]): msync if any
    /// extent has mapped writes pending.
    pub fn sync_call(&self) -> &'static str {
        if self.extents.iter().any(|e| e.sync_call() == "msync") {
            "msync"
        } else {
            "fdatasync"
        }
    }
}

/// Reads a twoGbMaxExtentFlat disk's data without locking it.
#[derive(Debug)]
pub struct SplitReader {
    files: Vec<File>,
    bounds: Bounds,
}

impl SplitReader {
    /// Opens the extents `files` (path and size, in disk order); `Err` names the file.
    pub fn open(files: &[(PathBuf, u64)]) -> Result<SplitReader, (PathBuf, io::Error)> {
        let opened = files
            .iter()
            .map(|(p, _)| File::open(p).map_err(|e| (p.clone(), e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SplitReader {
            files: opened,
            bounds: Bounds::new(files.iter().map(|(_, len)| *len)),
        })
    }

    /// Fills `buf` from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset + buf.len() as u64 > self.bounds.capacity() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        for (i, at, r) in self.bounds.pieces(offset, buf.len() as u64) {
            self.files[i].read_exact_at(&mut buf[r], at)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_layout_cuts_at_2_gib_as_qemu_does() {
        let l = layout("t", 5 << 30, EXTENT_BYTES);
        let got: Vec<_> = l.iter().map(|e| (e.sectors, e.file.as_str())).collect();
        assert_eq!(
            got,
            [
                (4194304, "t-f001.vmdk"),
                (4194304, "t-f002.vmdk"),
                (2097152, "t-f003.vmdk")
            ]
        );
        assert_eq!(layout("u", 3 << 20, EXTENT_BYTES).len(), 1);
    }

    #[test]
    fn ranges_split_at_extent_boundaries() {
        let b = Bounds::new([100, 0, 50, 30]);
        assert_eq!(
            b.pieces(90, 70),
            [(0, 90, 0..10), (2, 0, 10..60), (3, 0, 60..70)]
        );
        assert_eq!(b.pieces(100, 1), [(2, 0, 0..1)]);
        assert_eq!(b.pieces(179, 1), [(3, 29, 0..1)]);
    }

    #[test]
    fn a_failed_create_removes_the_extents_already_made() {
        let dir = tempfile::tempdir().unwrap();
        let specs = [
            ExtentSpec {
                sectors: 8,
                file: "x-f001.vmdk".into(),
            },
            ExtentSpec {
                sectors: 1 << 50,
                file: "x-f002.vmdk".into(),
            },
        ];
        let e = SplitFlat::create(dir.path(), &specs).unwrap_err();
        assert!(matches!(e, FlatError::NoSpace { .. }), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Random writes and zero ranges over small extents (so most cross a boundary)
        /// read back like a plain file, through the map and through the reader after a
        /// reopen, and each extent file holds its slice of the plain file.
        #[test]
        fn random_writes_across_extents_read_back_like_a_plain_file(
            ops in prop::collection::vec((0u64..(3 << 20) - 1, 1u64..700_000, any::<u8>(), any::<bool>()), 1..24),
            pwrite in any::<bool>(),
        ) {
            let extent = 1u64 << 20;
            let cap = 3 * extent - 64 * 1024;
            let dir = tempfile::tempdir().unwrap();
            let specs = layout("p", cap, extent);
            let mut e = SplitFlat::create(dir.path(), &specs).unwrap();
            if pwrite {
                e.set_data_io(DataIo::Pwrite).unwrap();
            }
            let mut plain = vec![0u8; cap as usize];
            for (off, len, v, zero) in ops {
                let off = off.min(cap - 1);
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
            e.read(0, &mut got).unwrap();
            prop_assert!(got == plain);
            e.sync().unwrap();
            let files = e.files();
            drop(e);
            let r = SplitReader::open(&files).unwrap();
            let mut got = vec![0u8; cap as usize];
            r.read_at(&mut got, 0).unwrap();
            prop_assert!(got == plain);
            for (i, (p, len)) in files.iter().enumerate() {
                let start = i * extent as usize;
                prop_assert!(std::fs::read(p).unwrap() == plain[start..start + *len as usize]);
            }
        }
    }
}
