//! Crash points for tests: with the `failpoints` feature in a debug build, the environment
//! variable `FAILBACK_FAILPOINT=after-undo|after-data|after-commit` makes the process
//! SIGKILL itself at that step of a commit group (the first group whose last seq is at
//! least `FAILBACK_FAILPOINT_SEQ`, default 1). Without the feature, or in a release build,
//! [`hit`] is an empty inline function: no test hook reaches production.

/// Dies here if the environment names this point (see the module docs).
#[cfg(all(feature = "failpoints", debug_assertions))]
pub fn hit(name: &str, seq: u64) {
    let armed = std::env::var("FAILBACK_FAILPOINT").is_ok_and(|v| v == name);
    let from: u64 = std::env::var("FAILBACK_FAILPOINT_SEQ")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if armed && seq >= from {
        tracing::error!(failpoint = name, seq, "failpoint: killing the process");
        // SAFETY: kill(2) on our own pid with a constant signal; no memory is passed.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Without the `failpoints` feature (or in release builds) crash points do nothing.
#[cfg(not(all(feature = "failpoints", debug_assertions)))]
#[inline(always)]
pub fn hit(_name: &str, _seq: u64) {}
