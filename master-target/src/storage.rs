//! Which storage failures a disk survives.
//!
//! A *write* refused for lack of space (ENOSPC from `pwrite`, `fallocate`...) is
//! retryable: the applier cuts the group back and refuses it with `NoSpace`, and the
//! batches apply once space frees. A failed *sync* (`fsync`, `fdatasync`, `msync`) never
//! is, whatever its errno: Linux marks the failed pages clean, so a retry would "succeed"
//! without the data (PITFALLS.md §4). Every sync error is therefore wrapped in
//! [`SyncFailed`], which hides its errno from [`is_no_space`].

use std::io;

/// A failed sync, carried as the source of an `io::Error` (see the module docs).
#[derive(Debug, thiserror::Error)]
#[error("{source} (a failed sync is never retried)")]
pub struct SyncFailed {
    source: io::Error,
}

/// Wraps the error of a sync so that it can never read as a retryable lack of space.
pub fn sync_failed(source: io::Error) -> io::Error {
    io::Error::new(source.kind(), SyncFailed { source })
}

/// Makes the entries of directory `dir` durable: a file created, renamed or removed in it
/// (a file's own fsync does not promise its name).
pub fn sync_dir(dir: &std::path::Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all().map_err(sync_failed)
}

/// Whether `e` is a write refused for lack of space (never true for a [`sync_failed`]).
pub fn is_no_space(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}

/// Errors that can say whether they are a write refused for lack of space.
pub trait SpaceError: std::fmt::Display {
    fn is_no_space(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_that_failed_with_enospc_is_not_a_lack_of_space() {
        let enospc = || io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(is_no_space(&enospc()));
        let e = sync_failed(enospc());
        assert!(!is_no_space(&e));
        assert!(e.to_string().contains("never retried"), "{e}");
    }
}
