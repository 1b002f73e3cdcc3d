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
//! * [`sync`]: `agent sync` put together; [`cli`]: the command line; [`config`]: its
//!   `--config` file and `--print-config`.
//!
//! `agent replicate`, from the NBD client to the wire:
//! * [`nbd`]: the NBD export (wire format and server);
//! * [`replicate`]: the files behind the exports, the initial pass and catch-up, group
//!   markers, status;
//! * [`dirty`]: the dirty bitmap of writes made during the initial pass;
//! * [`changes`]: acknowledged changes cut into ordered batches, with markers;
//! * [`control`]: the control API of `agent marker` and `agent status`.

pub mod changes;
pub mod cli;
pub mod config;
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

/// What a command does with its effective options: print them (`--print-config`, exit 0),
/// or validate them, start logging and the async runtime (exit 2 on a bad option).
enum Prepared<C> {
    Run(C, tokio::runtime::Runtime),
    Exit(ExitCode),
}

fn prepare<F: serde::Serialize, C>(
    options: Result<F, config::ConfigError>,
    print_config: bool,
    log_format: impl Fn(&F) -> Option<protocol::cli::LogFormat>,
    into_config: impl FnOnce(F) -> Result<C, config::ConfigError>,
) -> Prepared<C> {
    let options = match options {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return Prepared::Exit(ExitCode::from(2));
        }
    };
    if print_config {
        print!("{}", protocol::cli::render_config(&options));
        return Prepared::Exit(ExitCode::SUCCESS);
    }
    progress::init_logging(log_format(&options).unwrap_or_default());
    let config = match into_config(options) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Prepared::Exit(ExitCode::from(2));
        }
    };
    match runtime() {
        Some(rt) => Prepared::Run(config, rt),
        None => Prepared::Exit(ExitCode::FAILURE),
    }
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
    let (config, runtime) = match prepare(
        args.options(),
        args.print_config,
        |o| o.log_format,
        config::ReplicateFile::into_config,
    ) {
        Prepared::Run(c, rt) => (c, rt),
        Prepared::Exit(code) => return code,
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

/// `agent marker` and `agent status`: requests to a running agent's control API (one, or
/// one per refresh with `status --watch`).
fn control_command(call: ControlCall) -> ExitCode {
    let (connect, passphrase_file) = match &call {
        ControlCall::Marker(a) => (a.connect.clone(), a.passphrase_file.clone()),
        ControlCall::Status(a) => (a.connect.clone(), a.passphrase_file.clone()),
    };
    let auth = match protocol::auth::Passphrase::load(passphrase_file.as_deref())
        .map_err(config::ConfigError::from)
        .and_then(|p| Ok(protocol::auth::ClientAuth::new(p, config::identity(None)?)))
    {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let outcome = match call {
        ControlCall::Marker(a) => {
            let request = control::Request::Marker {
                disk_id: a.disk_id,
                kind: a.kind,
                tag: a.tag,
            };
            runtime
                .block_on(control::call(&connect, &auth, &request))
                .map(|reply| println!("{}", reply.marker_id.unwrap_or_default()))
        }
        ControlCall::Status(a) => {
            let render = || async {
                let reply = control::call(&connect, &auth, &control::Request::Status).await?;
                let disks = reply.disks.unwrap_or_default();
                Ok::<_, control::ControlError>(match (a.json, a.watch.watch) {
                    // Watching: one document per line.
                    (true, Some(_)) => {
                        serde_json::to_string(&disks).expect("status serialises") + "\n"
                    }
                    (true, None) => {
                        serde_json::to_string_pretty(&disks).expect("status serialises") + "\n"
                    }
                    (false, _) => control::table(&disks),
                })
            };
            runtime.block_on(protocol::cli::watch(a.watch.watch, !a.json, render))
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {connect}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn sync_command(args: SyncArgs) -> ExitCode {
    let (config, runtime) = match prepare(
        args.options(),
        args.print_config,
        |o| o.log_format,
        config::SyncFile::into_config,
    ) {
        Prepared::Run(c, rt) => (c, rt),
        Prepared::Exit(code) => return code,
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
