//! The failback process server: accepts many agents' `ProcessServer.Replicate` streams, makes
//! every batch durable in its cache volume before acknowledging it, and forwards the cached
//! batches in seq order to the master target over several connections, retiring them once the
//! master target has applied them.
//!
//! ```text
//!  agents --Replicate--> ingest --append--> cache (log writer thread, group commit)
//!                          ^  acks              | durable
//!                          |                    v
//!                        disks (watermarks) <-- forward --Apply x K--> master target
//!                          |                    | acks (applied)
//!                          +---- janitor: persist applied floor (registry), retire segments
//! ```
//!
//! Per disk: `appended >= cached (durable) >= applied (at the master target) >= floor
//! (persisted)`; see [`disks`].

// The test doubles in `tests/common` name this crate by its name both in the integration
// tests and in the unit tests that include them.
#[cfg(test)]
extern crate self as process_server;

pub mod budget;
pub mod cache;
pub mod cli;
pub mod differential;
pub mod disks;
pub mod failpoint;
pub mod fair;
pub mod forward;
pub mod ingest;
pub mod metrics;
pub mod rate;
pub mod registry;
pub mod server;
pub mod status;
pub mod throttle;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

/// Entry point of the `process-server` binary: parses `std::env::args_os()`, runs the
/// command, prints an error and exits non-zero on failure.
pub fn run_cli() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        Command::Serve(a) => a.log_format(),
        Command::Status(_) => protocol::cli::LogFormat::Text,
    };
    protocol::cli::init_logging(format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("process-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cli::run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("process-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}
