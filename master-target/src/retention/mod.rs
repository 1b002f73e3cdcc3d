//! The retention volume of one master target: per disk, the undo journal (`journal`), the
//! state file (`crate::state`), and the commit lock that lets `recover` take a consistent
//! copy of a disk while its applier runs.
//!
//! ```text
//!  RETENTION/.lock                     one master target per volume (registry)
//!  RETENTION/disks/<id>.state          where the disk stands (state.rs)
//!  RETENTION/disks/<id>.journal/*.seg  undo + commit records (journal.rs), old points
//!                                      thinned and their undo compacted (compact.rs)
//!  RETENTION/disks/<id>.commit-lock    held (flock) by the applier during each commit
//! ```

pub mod compact;
pub mod journal;
pub mod volume;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Path of `disk_id`'s commit lock.
pub fn commit_lock_path(retention: &Path, disk_id: &str) -> PathBuf {
    crate::state::disks_dir(retention).join(format!("{disk_id}.commit-lock"))
}

/// A per-disk lock that exists between commits only: the applier holds it from the first
/// undo record of a group to its state file; `recover` holds it while it copies the
/// target, so it sees the disk exactly as of a committed seq.
#[derive(Debug)]
pub struct CommitLock {
    file: File,
}

/// The lock while held; released on drop.
#[derive(Debug)]
pub struct CommitGuard<'a>(&'a File);

impl CommitLock {
    pub fn open(retention: &Path, disk_id: &str) -> io::Result<CommitLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(commit_lock_path(retention, disk_id))?;
        Ok(CommitLock { file })
    }

    /// Waits for and takes the lock.
    pub fn lock(&self) -> io::Result<CommitGuard<'_>> {
        loop {
            // SAFETY: flock on a valid, owned descriptor; no memory is passed.
            if unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(CommitGuard(&self.file));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: flock on a valid descriptor borrowed from the lock; no memory is passed.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}
