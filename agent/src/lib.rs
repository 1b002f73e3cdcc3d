//! The source-side failback agent: reads a VM's disk, cuts it into ordered, compressed,
//! checksummed batches and streams them to a process server (see `DESIGN.md`).
//!
//! Modules, from the disk to the wire:
//! * [`source`]: the source disk (raw image or block device), its capacity and data regions;
//! * [`scan`]: the full-sync reader, producing batches on a blocking thread;
//! * [`window`]: unacknowledged batches, bounded in bytes;
//! * [`transfer`]: one pass across connections (window, producer, acked/applied seqs);
//! * [`session`]: one authenticated stream to the process server;
//! * [`retry`]: backoff and outage handling;
//! * [`progress`]: progress bar or periodic log lines;
//! * [`sync`]: `agent sync` put together; [`cli`]: the command line.

pub mod cli;
pub mod progress;
pub mod retry;
pub mod scan;
pub mod session;
pub mod source;
pub mod sync;
pub mod transfer;
pub mod window;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, SyncArgs};

/// Entry point of the `agent` binary (and of the test harness's `fb-agent`): parses
/// `std::env::args_os()`, runs the command, prints errors as `error ...` on stderr, and
/// returns 0 only on success.
pub fn run_cli() -> ExitCode {
    let cli = match Cli::try_parse_from(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Sync(args) => sync_command(*args),
    }
}

fn sync_command(args: SyncArgs) -> ExitCode {
    let config = match args.merged().and_then(|a| {
        progress::init_logging(a.log_format.unwrap_or_default());
        a.into_config()
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = sync::run(config) => Some(r),
            _ = protocol::cli::shutdown_signal() => None,
        }
    });
    match outcome {
        Some(Ok(summary)) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Some(Err(e)) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
        None => {
            eprintln!("error: interrupted before the sync finished");
            ExitCode::FAILURE
        }
    }
}
