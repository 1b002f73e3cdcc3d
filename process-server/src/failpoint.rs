//! Failure points for tests: with the `failpoints` feature in a debug build, the environment
//! variable `FAILBACK_FAILPOINT=cache-fsync-eio` makes the cache's group-commit fdatasync fail
//! with EIO, instead of running, for every group whose highest seq is at least
//! `FAILBACK_FAILPOINT_SEQ` (default 1). Each injected failure is logged
//! (`failpoint: injected EIO`), so a test counts the sync attempts and sees that a failed
//! sync is never retried.
//!
//! Without the feature, or in a release build, the hook is an empty inline function: no test
//! hook reaches production.

/// Fails the group commit's data sync with EIO if `cache-fsync-eio` is armed for a group
/// whose highest seq is `seq` (see the module docs); the caller then does not run the real
/// sync.
#[cfg(all(feature = "failpoints", debug_assertions))]
pub fn sync_eio(seq: u64) -> std::io::Result<()> {
    let from: u64 = std::env::var("FAILBACK_FAILPOINT_SEQ")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if std::env::var("FAILBACK_FAILPOINT").is_ok_and(|v| v == "cache-fsync-eio") && seq >= from {
        tracing::error!(
            failpoint = "cache-fsync-eio",
            seq,
            "failpoint: injected EIO"
        );
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

/// Without the `failpoints` feature (or in release builds) syncs are never failed.
#[cfg(not(all(feature = "failpoints", debug_assertions)))]
#[inline(always)]
pub fn sync_eio(_seq: u64) -> std::io::Result<()> {
    Ok(())
}
