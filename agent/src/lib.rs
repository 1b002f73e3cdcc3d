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
//! * [`diff`]: differential sync (chunk hashes of the target, only differing chunks sent);
//! * [`sync`]: `agent sync` put together; [`cli`]: the command line.
//!
//! `agent replicate`, from the NBD client to the wire:
//! * [`nbd`]: the NBD export (wire format and server);
//! * [`replicate`]: the file behind the export, the initial pass and catch-up, status;
//! * [`dirty`]: the dirty bitmap of writes made during the initial pass;
//! * [`changes`]: acknowledged changes cut into ordered batches, with markers;
//! * [`control`]: the control API of `agent marker` and `agent status`.

pub mod changes;
pub mod cli;
pub mod control;
pub mod diff;
pub mod dirty;
pub mod nbd;
pub mod progress;
pub mod replicate;
pub mod retry;
pub mod scan;
pub mod session;
pub mod source;
pub mod sync;
pub mod transfer;
pub mod window;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, ReplicateArgs, SyncArgs};

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
        Command::Replicate(args) => replicate_command(*args),
        Command::Marker(args) => control_command(ControlCall::Marker(args)),
        Command::Status(args) => control_command(ControlCall::Status(args)),
    }
}

/// The config, or exit code 2 after reporting why there is none; then the async runtime, or a
/// failure after reporting why it did not start.
fn config_and_runtime<C>(
    config: anyhow::Result<C>,
) -> Result<(C, tokio::runtime::Runtime), ExitCode> {
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Err(ExitCode::from(2));
        }
    };
    let runtime = runtime().ok_or(ExitCode::FAILURE)?;
    Ok((config, runtime))
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            None
        }
    }
}

fn replicate_command(args: ReplicateArgs) -> ExitCode {
    progress::init_logging(args.log_format.unwrap_or_default());
    let (config, runtime) = match config_and_runtime(args.into_config()) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(async {
        let running = replicate::start(config).await?;
        tokio::select! {
            e = running.wait() => Err(e),
            _ = protocol::cli::shutdown_signal() => Ok(()),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

enum ControlCall {
    Marker(cli::MarkerArgs),
    Status(cli::StatusArgs),
}

/// `agent marker` and `agent status`: one request to a running agent's control API.
fn control_command(call: ControlCall) -> ExitCode {
    let (connect, passphrase_file) = match &call {
        ControlCall::Marker(a) => (a.connect.clone(), a.passphrase_file.clone()),
        ControlCall::Status(a) => (a.connect.clone(), a.passphrase_file.clone()),
    };
    let auth = match protocol::auth::Passphrase::load(passphrase_file.as_deref())
        .map_err(anyhow::Error::from)
        .and_then(|p| Ok(protocol::auth::ClientAuth::new(p, cli::identity(None)?)))
    {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let request = match &call {
        ControlCall::Marker(a) => control::Request::Marker {
            disk_id: a.disk_id.clone(),
            kind: a.kind,
            tag: a.tag.clone(),
        },
        ControlCall::Status(_) => control::Request::Status,
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let reply = match runtime.block_on(control::call(&connect, &auth, &request)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {connect}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match call {
        ControlCall::Marker(_) => println!("{}", reply.marker_id.unwrap_or_default()),
        ControlCall::Status(a) => {
            let disks = reply.disks.unwrap_or_default();
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&disks).expect("status serialises")
                );
            } else {
                print!("{}", control::table(&disks));
            }
        }
    }
    ExitCode::SUCCESS
}

fn sync_command(args: SyncArgs) -> ExitCode {
    let config = args.merged().and_then(|a| {
        progress::init_logging(a.log_format.unwrap_or_default());
        a.into_config()
    });
    let (config, runtime) = match config_and_runtime(config) {
        Ok(v) => v,
        Err(code) => return code,
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
