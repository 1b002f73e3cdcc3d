//! The master target of the failback data path: it receives the process server's
//! `MasterTarget.Apply` streams and applies each disk's batches, strictly in seq order, to
//! VMDK images on a datastore directory through memory maps (or pwrite: `serve --data-io`),
//! durably, acknowledging a batch only once its data, markers and state are on stable
//! storage.
//!
//! ```text
//!  server (gRPC, per connection) -> registry (disk id <-> name, open disks)
//!        -> apply (one thread per disk: reorder, group commit)
//!             -> retention::journal (undo + commit records)        [retention volume]
//!             -> vmdk (descriptor + flat extent through mmap or pwrite)
//!             -> state (applied seq)                               [retention volume]
//!  recovery (points, recover) reads the journal and copies or rolls back a target;
//!  group_recovery does it for every disk of a replication group
//! ```

pub mod apply;
pub mod cli;
pub mod failpoint;
pub mod group_recovery;
pub mod hashes;
pub mod metrics;
pub mod outbox;
pub mod recovery;
pub mod registry;
pub mod retention;
pub mod server;
pub mod state;
pub mod status;
pub mod storage;
pub mod vmdk;

/// Entry point of the `master-target` binary (and of the test harness's wrappers).
pub fn run_cli() -> std::process::ExitCode {
    cli::run()
}
