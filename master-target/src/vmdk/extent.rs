//! The data of a target disk, whatever its layout:
//!
//! ```text
//!  Extent (writer, owned by the applier)      Reader (hashing, recovery copies)
//!    |- Flat(FlatExtent)    NAME-flat.vmdk      |- Flat(File)          pread
//!    `- Sparse(SparseExtent) NAME.vmdk          `- Sparse(SparseReader) through the GTs
//! ```
//!
//! Both sides read the same bytes: a flat extent's map shares the page cache with `pread`,
//! and a sparse extent's tables are re-read by each reader once the writer synced them.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::VmdkError;
use super::flat::FlatExtent;
use super::sparse::{SparseExtent, SparseReader};
use crate::retention::journal::UndoTarget;

/// Where a disk's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRef {
    /// The flat extent, or the sparse `.vmdk` itself.
    pub path: PathBuf,
    pub sparse: bool,
}

/// An open, locked extent taking writes.
#[derive(Debug)]
pub enum Extent {
    Flat(FlatExtent),
    Sparse(SparseExtent),
}

impl Extent {
    /// Opens the extent `data` names, of exactly `capacity` bytes, for writing.
    pub fn open(data: &DataRef, capacity: u64) -> Result<Extent, VmdkError> {
        Ok(if data.sparse {
            Extent::Sparse(SparseExtent::open(&data.path, capacity)?)
        } else {
            Extent::Flat(FlatExtent::open(&data.path, capacity)?)
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Extent::Flat(f) => f.path(),
            Extent::Sparse(s) => s.path(),
        }
    }

    pub fn data_ref(&self) -> DataRef {
        DataRef {
            path: self.path().to_path_buf(),
            sparse: matches!(self, Extent::Sparse(_)),
        }
    }

    pub fn capacity(&self) -> u64 {
        match self {
            Extent::Flat(f) => f.capacity(),
            Extent::Sparse(s) => s.capacity(),
        }
    }

    /// Reads the current bytes at `offset` (the caller keeps the range inside the disk).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), VmdkError> {
        match self {
            Extent::Flat(f) => {
                buf.copy_from_slice(f.read(offset, buf.len()));
                Ok(())
            }
            Extent::Sparse(s) => Ok(s.read_at(offset, buf)?),
        }
    }

    /// Writes `data` at `offset` (not durable until [`Self::sync`]).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), VmdkError> {
        match self {
            Extent::Flat(f) => {
                f.write(offset, data);
                Ok(())
            }
            Extent::Sparse(s) => Ok(s.write(offset, data)?),
        }
    }

    /// Zero-fills `[offset, offset + len)`.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), VmdkError> {
        match self {
            Extent::Flat(f) => Ok(f.zero(offset, len)?),
            Extent::Sparse(s) => Ok(s.zero(offset, len)?),
        }
    }

    /// Makes every write since the last sync durable; an error is fatal for the disk.
    pub fn sync(&mut self) -> Result<(), VmdkError> {
        match self {
            Extent::Flat(f) => Ok(f.sync()?),
            Extent::Sparse(s) => Ok(s.sync()?),
        }
    }
}

/// Undo records restore through the same writes as batches.
impl UndoTarget for Extent {
    fn restore(&mut self, offset: u64, len: u32, data: Option<&[u8]>) -> io::Result<()> {
        if offset + u64::from(len) > self.capacity() {
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
}

impl Reader {
    pub fn open(data: &DataRef) -> Result<Reader, VmdkError> {
        Ok(if data.sparse {
            Reader::Sparse(SparseReader::open(&data.path)?)
        } else {
            Reader::Flat(File::open(&data.path).map_err(|e| VmdkError::io("open", &data.path, e))?)
        })
    }

    /// Fills `buf` from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Reader::Flat(f) => f.read_exact_at(buf, offset),
            Reader::Sparse(s) => s.read_at(buf, offset),
        }
    }
}
