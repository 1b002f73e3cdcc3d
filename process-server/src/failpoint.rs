//! Failure points for tests: with the `failpoints` feature in a debug build, the environment
//! variable `FAILBACK_FAILPOINT=cache-fsync-eio` makes the cache's group-commit fdatasync fail
//! with EIO, instead of running, for every group whose highest seq is at least
//! `FAILBACK_FAILPOINT_SEQ` (default 1). Each injected failure is logged
//! (`failpoint: injected EIO`), so a test counts the sync attempts and sees that a failed
//! sync is never retried.
//!
//! Without the feature, or in a release build, nothing is armed
//! ([`protocol::failpoint::armed`]): no test hook reaches production.

/// Fails the group commit's data sync with EIO if `cache-fsync-eio` is armed for a group
/// whose highest seq is `seq` (see the module docs); the caller then does not run the real
/// sync.
pub fn sync_eio(seq: u64) -> std::io::Result<()> {
    if protocol::failpoint::armed("cache-fsync-eio", seq) {
        return Err(protocol::failpoint::injected_eio("cache-fsync-eio", seq));
    }
    Ok(())
}
