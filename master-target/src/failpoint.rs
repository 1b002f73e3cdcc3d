//! Failure points for tests: with the `failpoints` feature in a debug build, the
//! environment variable `FAILBACK_FAILPOINT` arms one of them for the first commit group
//! whose last seq is at least `FAILBACK_FAILPOINT_SEQ` (default 1):
//! * `after-undo|after-data|after-commit`: the process SIGKILLs itself at that step;
//! * `fsync-eio`: the journal's undo sync (or, with `FAILBACK_FAILPOINT_SYNC=extent`, the
//!   target's data sync) fails with EIO instead of running, every time it is attempted,
//!   and the process goes on. Each injected failure is logged (`failpoint: injected EIO`),
//!   so a test can count the attempts and see that a failed sync is never retried.
//!
//! Without the feature, or in a release build, nothing is armed
//! ([`protocol::failpoint::armed`]): no test hook reaches production.

use protocol::failpoint::{armed, injected_eio};

/// Dies here if the environment names this point (see the module docs).
pub fn hit(name: &str, seq: u64) {
    if armed(name, seq) {
        tracing::error!(failpoint = name, seq, "failpoint: killing the process");
        // SAFETY: kill(2) on our own pid with a constant signal; no memory is passed.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Fails the sync of `what` (`journal` or `extent`) with EIO if `fsync-eio` is armed for
/// it (see the module docs); the caller then does not run the real sync.
pub fn sync_eio(what: &str, seq: u64) -> std::io::Result<()> {
    let aimed =
        || std::env::var("FAILBACK_FAILPOINT_SYNC").map_or(what == "journal", |t| t == what);
    if armed("fsync-eio", seq) && aimed() {
        return Err(injected_eio("fsync-eio", seq));
    }
    Ok(())
}
