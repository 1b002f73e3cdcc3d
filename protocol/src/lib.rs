//! What the three failback roles share on the wire: the gRPC protocol (`pb`), the batch
//! codec, limits, error codes, passphrase authentication and WAN-tuned transport.
//!
//! The roles never depend on each other; they meet only through this crate.

pub mod auth;
pub mod batch;
pub mod cli;
pub mod client;
pub mod disk;
pub mod error;
pub mod failpoint;
pub mod incoming;
pub mod limits;
pub mod metrics;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;

/// Messages and services generated from `proto/failback.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("failback.v1");
}

/// Milliseconds since the Unix epoch, the time base of batches and markers.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
