//! `bench`: measures the failback data path. Also acts as `agent`, `process-server` or
//! `master-target` when run under those names (see `bench::roles`), which is how the demo
//! starts each role as a real process.

use std::process::ExitCode;

use bench::run::Scenario;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    version,
    about = "failback bench: replication demo and throughput runs"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Replicate a generated disk through a local agent -> process server -> master target
    /// chain, report MB/s and 4 KiB blocks/s, and verify the VMDK against the source.
    Demo(bench::demo::DemoArgs),
    /// Full syncs through a WAN emulator over a grid of RTT x link rate, next to peer
    /// tools on the same data: MB/s, blocks/s, wire bytes, CPU and memory per role, the
    /// analytic bound of each row; a table, a JSON report and SVG plots in --out. With
    /// --scenario differential: resyncs of a changed disk (failback vs rsync's delta); with
    /// --scenario continuous: `bench rpo` at every grid point (RPO under churn).
    Run(bench::run::RunArgs),
    /// Process server ingest throughput (simulated agent streams into its cache volume,
    /// master target stopped) against raw sequential write + fdatasync of the same bytes.
    Ingest(bench::ingest::IngestArgs),
    /// Master target apply throughput with retention on (batches forwarded from a process
    /// server's cache) against `qemu-img convert -O vmdk` of the same data on the same
    /// filesystem; the replica is verified byte for byte.
    Apply(bench::apply::ApplyArgs),
    /// Many simulated agents (default 200) against one process server and master target:
    /// total and per-agent MB/s, fairness, the process server's peak memory; every disk is
    /// verified byte for byte.
    Scale(bench::scale::ScaleArgs),
    /// Continuous replication under churn through the agent's NBD export: RPO over time
    /// (process server status), a JSON report and an SVG plot.
    Rpo(bench::rpo::RpoArgs),
    /// Emulate a WAN link (delay, rate, queue, window) as a TCP proxy between a process
    /// server and a master target.
    Wan(bench::wan::WanArgs),
}

fn main() -> ExitCode {
    if let Some(code) = bench::roles::dispatch() {
        return code;
    }
    let cli = Cli::parse();
    let result = std::env::current_exe()
        .map_err(anyhow::Error::from)
        .and_then(|exe| match &cli.command {
            Cmd::Demo(args) => bench::demo::run(args, &exe).map(|_| ()),
            Cmd::Run(args) if args.scenario == Scenario::Continuous => args
                .continuous()
                .and_then(|rpo| bench::rpo::run(&rpo, &exe))
                .map(|_| ()),
            Cmd::Run(args) => bench::run::run(args, &exe).map(|_| ()),
            Cmd::Ingest(args) => bench::ingest::run(args, &exe).map(|_| ()),
            Cmd::Apply(args) => bench::apply::run(args, &exe).map(|_| ()),
            Cmd::Scale(args) => bench::scale::run(args, &exe).map(|_| ()),
            Cmd::Rpo(args) => bench::rpo::run(args, &exe).map(|_| ()),
            Cmd::Wan(args) => tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(bench::wan::serve(
                        args.clone(),
                        protocol::cli::shutdown_signal(),
                    ))
                }),
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
