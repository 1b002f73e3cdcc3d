//! The data of a target disk, whatever its layout:
//!
//! ```text
//!  Extent (writer, owned by the applier)      Reader (hashing, recovery copies)
//!    |- Flat(FlatExtent)    NAME-flat.vmdk      |- Flat(File)          pread
//!    |- Sparse(SparseExtent) NAME.vmdk          |- Sparse(SparseReader) through the GTs
//!    `- Split(SplitFlat)    NAME-fNNN.vmdk      `- Split(SplitReader)   pread per extent
//! ```
//!
//! Both sides read the same bytes: a flat extent's map shares the page cache with `pread`,
//! and a sparse extent's tables are re-read by each reader once the writer synced them.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::VmdkError;
use super::flat::{DataIo, FlatExtent};
use super::sparse::{SparseExtent, SparseReader};
use super::two_gb_flat::{SplitFlat, SplitReader};
use crate::retention::journal::UndoTarget;

/// Where a disk's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRef {
    /// The flat extent (the first one of a split disk) or the sparse `.vmdk` itself: the
    /// file that stands for the data in messages.
    pub path: PathBuf,
    pub layout: DataLayout,
}

/// How a disk's data is laid out in files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataLayout {
    /// One flat extent, `path` (vmfs, monolithicFlat).
    Flat,
    /// A monolithicSparse file, `path`.
    Sparse,
    /// The flat extents of a twoGbMaxExtentFlat disk in disk order, with their sizes.
    Split(Vec<(PathBuf, u64)>),
}

impl DataRef {
    pub fn flat(path: PathBuf) -> DataRef {
        DataRef {
            path,
            layout: DataLayout::Flat,
        }
    }

    pub fn sparse(path: PathBuf) -> DataRef {
        DataRef {
            path,
            layout: DataLayout::Sparse,
        }
    }

    /// `files` must not be empty (a descriptor has at least one extent).
    pub fn split(files: Vec<(PathBuf, u64)>) -> DataRef {
        DataRef {
            path: files[0].0.clone(),
            layout: DataLayout::Split(files),
        }
    }
}

/// An open, locked extent taking writes.
#[derive(Debug)]
pub enum Extent {
    Flat(FlatExtent),
    Sparse(SparseExtent),
    Split(SplitFlat),
}

impl Extent {
    /// Opens the extent `data` names, of exactly `capacity` bytes, for writing.
    pub fn open(data: &DataRef, capacity: u64) -> Result<Extent, VmdkError> {
        let p = &data.path;
        Ok(match &data.layout {
            DataLayout::Flat => Extent::Flat(FlatExtent::open(p, capacity)?),
            DataLayout::Sparse => Extent::Sparse(SparseExtent::open(p, capacity)?),
            DataLayout::Split(files) => {
                // Each extent is checked against its descriptor line; their sum here.
                let total: u64 = files.iter().map(|(_, len)| len).sum();
                if total != capacity {
                    return Err(VmdkError::CapacityMismatch {
                        path: p.clone(),
                        found: total,
                        declared: capacity,
                    });
                }
                Extent::Split(SplitFlat::open(files)?)
            }
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Extent::Flat(f) => f.path(),
            Extent::Sparse(s) => s.path(),
            Extent::Split(s) => s.path(),
        }
    }

    pub fn data_ref(&self) -> DataRef {
        match self {
            Extent::Flat(f) => DataRef::flat(f.path().to_path_buf()),
            Extent::Sparse(s) => DataRef::sparse(s.path().to_path_buf()),
            Extent::Split(s) => DataRef::split(s.files()),
        }
    }

    pub fn capacity(&self) -> u64 {
        match self {
            Extent::Flat(f) => f.capacity(),
            Extent::Sparse(s) => s.capacity(),
            Extent::Split(s) => s.capacity(),
        }
    }

    /// Reads the current bytes at `offset` (the caller keeps the range inside the disk).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), VmdkError> {
        match self {
            Extent::Flat(f) => Ok(f.read_into(offset, buf)?),
            Extent::Sparse(s) => Ok(s.read_at(offset, buf)?),
            Extent::Split(s) => Ok(s.read(offset, buf)?),
        }
    }

    /// Writes `data` at `offset` (not durable until [`Self::sync`]).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), VmdkError> {
        match self {
            Extent::Flat(f) => Ok(f.write(offset, data)?),
            Extent::Sparse(s) => Ok(s.write(offset, data)?),
            Extent::Split(s) => Ok(s.write(offset, data)?),
        }
    }

    /// Selects how a flat layout's data is written ([`DataIo`]); a monolithicSparse disk
    /// always uses pwrite (its grains are appended and its tables updated with pwrite
    /// already), so the setting does not apply to it.
    pub fn set_data_io(&mut self, io: DataIo) -> Result<(), VmdkError> {
        match self {
            Extent::Flat(f) => Ok(f.set_data_io(io)?),
            Extent::Sparse(_) => Ok(()),
            Extent::Split(s) => Ok(s.set_data_io(io)?),
        }
    }

    /// How the data is written: `None` for a sparse disk (always pwrite).
    pub fn data_io(&self) -> Option<DataIo> {
        match self {
            Extent::Flat(f) => Some(f.data_io()),
            Extent::Sparse(_) => None,
            Extent::Split(s) => Some(s.data_io()),
        }
    }

    /// Zero-fills `[offset, offset + len)`.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), VmdkError> {
        match self {
            Extent::Flat(f) => Ok(f.zero(offset, len)?),
            Extent::Sparse(s) => Ok(s.zero(offset, len)?),
            Extent::Split(s) => Ok(s.zero(offset, len)?),
        }
    }

    /// The system call [`Self::sync`] makes first, for messages about it.
    pub fn sync_call(&self) -> &'static str {
        match self {
            Extent::Flat(f) => f.sync_call(),
            Extent::Sparse(_) => "fdatasync",
            Extent::Split(s) => s.sync_call(),
        }
    }

    /// Makes every write since the last sync durable; an error is fatal for the disk.
    pub fn sync(&mut self) -> Result<(), VmdkError> {
        match self {
            Extent::Flat(f) => Ok(f.sync()?),
            Extent::Sparse(s) => Ok(s.sync()?),
            Extent::Split(s) => Ok(s.sync()?),
        }
    }
}

/// Undo records restore through the same writes as batches.
impl UndoTarget for Extent {
    fn restore(&mut self, offset: u64, len: u32, data: Option<&[u8]>) -> io::Result<()> {
        // The range comes from disk: an offset near u64::MAX must not wrap past the check.
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > self.capacity())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("undo range {offset}+{len} is beyond the disk"),
            ));
        }
        match data {
            Some(d) => self.write(offset, d),
            None => self.zero(offset, u64::from(len)),
        }
        .map_err(io::Error::other)
    }

    fn sync(&mut self) -> io::Result<()> {
        Extent::sync(self).map_err(io::Error::other)
    }
}

/// A read-only view of a disk's data.
#[derive(Debug)]
pub enum Reader {
    Flat(File),
    Sparse(SparseReader),
    Split(SplitReader),
}

impl Reader {
    pub fn open(data: &DataRef) -> Result<Reader, VmdkError> {
        let p = &data.path;
        Ok(match &data.layout {
            DataLayout::Flat => {
                Reader::Flat(File::open(p).map_err(|e| VmdkError::io("open", p, e))?)
            }
            DataLayout::Sparse => Reader::Sparse(SparseReader::open(p)?),
            DataLayout::Split(files) => Reader::Split(
                SplitReader::open(files).map_err(|(p, e)| VmdkError::io("open", &p, e))?,
            ),
        })
    }

    /// Fills `buf` from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Reader::Flat(f) => f.read_exact_at(buf, offset),
            Reader::Sparse(s) => s.read_at(buf, offset),
            Reader::Split(s) => s.read_at(buf, offset),
        }
    }
}
