//! Failure points for the servers' crash and fault tests.
//!
//! A role built with its `failpoints` feature (which turns on this crate's) and debug
//! assertions reads `FAILBACK_FAILPOINT=NAME` and `FAILBACK_FAILPOINT_SEQ=N` (default 1): the
//! point `NAME` is armed for every commit group whose last seq is at least `N`. Otherwise
//! [`armed`] is a constant `false` the compiler removes with the code it guards: no test
//! hook reaches production.

/// Whether the environment arms point `name` for a group ending at `seq`.
#[cfg(all(feature = "failpoints", debug_assertions))]
pub fn armed(name: &str, seq: u64) -> bool {
    let from: u64 = std::env::var("FAILBACK_FAILPOINT_SEQ")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    std::env::var("FAILBACK_FAILPOINT").is_ok_and(|v| v == name) && seq >= from
}

/// Without the feature (or in release builds) nothing is ever armed.
#[cfg(not(all(feature = "failpoints", debug_assertions)))]
#[inline(always)]
pub fn armed(_name: &str, _seq: u64) -> bool {
    false
}

/// The error an armed sync point returns instead of syncing, logged as
/// `failpoint: injected EIO` so that a test can count the attempts (a failed sync must never
/// be retried).
pub fn injected_eio(name: &str, seq: u64) -> std::io::Error {
    tracing::error!(failpoint = name, seq, "failpoint: injected EIO");
    std::io::Error::from_raw_os_error(libc::EIO)
}
