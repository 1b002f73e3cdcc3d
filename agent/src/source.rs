//! The source disk: a raw image file or a block device, opened read-only.
//!
//! Invariants:
//! * `capacity` is fixed when the source is opened and is a nonzero multiple of
//!   [`SECTOR`] bytes (a regular file's length, or a block device's size found by seeking to
//!   its end, since `metadata().len()` is 0 for devices).
//! * [`Source::next_data`] never reports data before `offset` and never past `capacity`;
//!   regions it skips are holes and read as zeros. On filesystems without
//!   `SEEK_DATA`/`SEEK_HOLE` (EINVAL/EOPNOTSUPP) the whole disk is reported as data, which is
//!   always correct, only slower.
//! * Every call is blocking file I/O: run it on a blocking thread, never on an async worker.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use protocol::limits::{MAX_CAPACITY, SECTOR};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot open source disk {path}: {source}")]
    Opening {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot find the size of source disk {path}: {source}")]
    Sizing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "source disk {path} is {capacity} bytes: a disk must be a nonzero multiple of {SECTOR} \
         bytes and at most {MAX_CAPACITY}"
    )]
    BadCapacity { path: PathBuf, capacity: u64 },
    #[error("source disk {path} is neither a regular file nor a block device")]
    NotADisk { path: PathBuf },
    #[error("cannot read source disk {path} at offset {offset}: {source}")]
    Reading {
        path: PathBuf,
        offset: u64,
        source: std::io::Error,
    },
    #[error("cannot find data regions of {path} at offset {offset}: {source}")]
    SeekingData {
        path: PathBuf,
        offset: u64,
        source: std::io::Error,
    },
}

/// A read-only source disk of fixed capacity.
#[derive(Debug)]
pub struct Source {
    file: File,
    path: PathBuf,
    capacity: u64,
    /// False once the filesystem said it does not support `SEEK_DATA`.
    sparse_aware: bool,
}

impl Source {
    /// Opens `path` read-only and finds its capacity.
    pub fn open(path: &Path) -> Result<Source, SourceError> {
        let mut file = File::open(path).map_err(|source| SourceError::Opening {
            path: path.to_path_buf(),
            source,
        })?;
        let sizing = |source| SourceError::Sizing {
            path: path.to_path_buf(),
            source,
        };
        let meta = file.metadata().map_err(sizing)?;
        let capacity = if meta.file_type().is_block_device() {
            file.seek(SeekFrom::End(0)).map_err(sizing)?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(SourceError::NotADisk {
                path: path.to_path_buf(),
            });
        };
        if capacity == 0 || !capacity.is_multiple_of(SECTOR) || capacity > MAX_CAPACITY {
            return Err(SourceError::BadCapacity {
                path: path.to_path_buf(),
                capacity,
            });
        }
        // The pass reads front to back: ask for aggressive readahead. Advisory only, so a
        // failure changes nothing but speed.
        // SAFETY: posix_fadvise only reads the descriptor number, which `file` keeps open.
        let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        Ok(Source {
            file,
            path: path.to_path_buf(),
            capacity,
            sparse_aware: true,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next data region at or after `offset`: `Some((start, end))` with
    /// `offset <= start < end <= capacity`, everything in `[offset, start)` being a hole; or
    /// `None` when only holes remain.
    pub fn next_data(&mut self, offset: u64) -> Result<Option<(u64, u64)>, SourceError> {
        if offset >= self.capacity {
            return Ok(None);
        }
        if !self.sparse_aware {
            return Ok(Some((offset, self.capacity)));
        }
        let start = match self.seek(offset, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            // ENXIO: no data at or after offset.
            Ok(None) => return Ok(None),
            Err(e) if unsupported(&e) => {
                self.sparse_aware = false;
                return Ok(Some((offset, self.capacity)));
            }
            Err(source) => {
                return Err(SourceError::SeekingData {
                    path: self.path.clone(),
                    offset,
                    source,
                });
            }
        };
        if start >= self.capacity {
            return Ok(None);
        }
        // A file always has a virtual hole at its end, so SEEK_HOLE after data succeeds; a
        // file grown since open may report its end past our capacity: clamp it.
        // A hole at or before `start` can only come from a file changed under us: treat the
        // rest as data, which is always correct.
        let end = match self.seek(start, libc::SEEK_HOLE) {
            Ok(Some(h)) if h > start => h.min(self.capacity),
            Ok(_) => self.capacity,
            Err(source) => {
                return Err(SourceError::SeekingData {
                    path: self.path.clone(),
                    offset: start,
                    source,
                });
            }
        };
        Ok(Some((start, end)))
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| SourceError::Reading {
                path: self.path.clone(),
                offset,
                source,
            })
    }

    /// `lseek(fd, offset, whence)`; `Ok(None)` on ENXIO (nothing of that kind after offset).
    fn seek(&self, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek only reads the descriptor number; `self.file` keeps the descriptor
        // open for the duration of the call. The file position it moves is not used elsewhere
        // (reads go through pread).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn capacity_must_be_whole_sectors() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[1u8; 1000]).unwrap();
        assert!(matches!(
            Source::open(f.path()),
            Err(SourceError::BadCapacity { capacity: 1000, .. })
        ));
    }

    #[test]
    fn empty_file_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            Source::open(f.path()),
            Err(SourceError::BadCapacity { capacity: 0, .. })
        ));
    }

    #[test]
    fn a_directory_is_not_a_disk() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            Source::open(d.path()),
            Err(SourceError::NotADisk { .. })
        ));
    }

    #[test]
    fn data_regions_skip_holes_and_stay_inside_the_disk() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let cap = 64 << 20;
        f.as_file().set_len(cap).unwrap();
        f.as_file().write_all_at(&[9u8; 4096], 32 << 20).unwrap();
        let mut s = Source::open(f.path()).unwrap();
        assert_eq!(s.capacity(), cap);
        let mut covered = Vec::new();
        let mut at = 0;
        while let Some((start, end)) = s.next_data(at).unwrap() {
            assert!(start >= at && end > start && end <= cap);
            covered.push((start, end));
            at = end;
        }
        // Whatever the filesystem's granularity, the written block is reported as data.
        assert!(
            covered
                .iter()
                .any(|&(a, b)| a <= 32 << 20 && b >= (32 << 20) + 4096)
        );
        assert_eq!(s.next_data(cap).unwrap(), None);
    }
}
