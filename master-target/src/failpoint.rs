//! Failure points for tests: with the `failpoints` feature in a debug build, the
//! environment variable `FAILBACK_FAILPOINT` arms one of them for the first commit group
//! whose last seq is at least `FAILBACK_FAILPOINT_SEQ` (default 1):
//! * `after-undo|after-data|after-commit`: the process SIGKILLs itself at that step;
//! * `fsync-eio`: the journal's undo sync (or, with `FAILBACK_FAILPOINT_SYNC=extent`, the
//!   target's data sync) fails with EIO instead of running, every time it is attempted,
//!   and the process goes on. Each injected failure is logged (`failpoint: injected EIO`),
//!   so a test can count the attempts and see that a failed sync is never retried.
//!
//! Without the feature, or in a release build, every hook is an empty inline function: no
//! test hook reaches production.

#[cfg(all(feature = "failpoints", debug_assertions))]
fn armed(name: &str, seq: u64) -> bool {
    let from: u64 = std::env::var("FAILBACK_FAILPOINT_SEQ")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    std::env::var("FAILBACK_FAILPOINT").is_ok_and(|v| v == name) && seq >= from
}

/// Dies here if the environment names this point (see the module docs).
#[cfg(all(feature = "failpoints", debug_assertions))]
pub fn hit(name: &str, seq: u64) {
    if armed(name, seq) {
        tracing::error!(failpoint = name, seq, "failpoint: killing the process");
        // SAFETY: kill(2) on our own pid with a constant signal; no memory is passed.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Fails the sync of `what` (`journal` or `extent`) with EIO if `fsync-eio` is armed for
/// it (see the module docs); the caller then does not run the real sync.
#[cfg(all(feature = "failpoints", debug_assertions))]
pub fn sync_eio(what: &str, seq: u64) -> std::io::Result<()> {
    let target = std::env::var("FAILBACK_FAILPOINT_SYNC").unwrap_or_else(|_| "journal".into());
    if armed("fsync-eio", seq) && target == what {
        tracing::error!(
            failpoint = "fsync-eio",
            what,
            seq,
            "failpoint: injected EIO"
        );
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

/// Without the `failpoints` feature (or in release builds) crash points do nothing.
#[cfg(not(all(feature = "failpoints", debug_assertions)))]
#[inline(always)]
pub fn hit(_name: &str, _seq: u64) {}

/// Without the `failpoints` feature (or in release builds) syncs are never failed.
#[cfg(not(all(feature = "failpoints", debug_assertions)))]
#[inline(always)]
pub fn sync_eio(_what: &str, _seq: u64) -> std::io::Result<()> {
    Ok(())
}
