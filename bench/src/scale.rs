//! `bench scale`: many agents against one process server.
//!
//! `--agents` simulated agents (`crate::streams`, one stream and one disk of `--per-agent`
//! random bytes each) push a full pass at the same instant into one real process server,
//! which forwards to one real master target, all on 127.0.0.1. A stream is complete when
//! the master target has applied and made durable its last batch (as `agent sync --wait`).
//! Reported: the total MB/s (all data / time until the last stream completed), each agent's
//! MB/s (its data / its own time from the common start), their min, median, max and max/min
//! (issue target: equal agents within 20 %, i.e. max/min <= 1.2), and the peak resident set
//! (`VmHWM`) of the process server and of the master target, the process server's next to
//! its configured memory budget and to what its configuration bounds the batches it holds
//! at (budget + agents x (stream window + largest message)). Every target disk is then
//! compared with its source byte for byte; any difference fails the run.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::cluster::{Cluster, PsMemoryArgs};
use crate::run::{
    Cmp, Host, Start, Target, build_kind, check_batch_size, keep_on_err, median, start,
};
use crate::{streams, usage, verify};

/// Options of `bench scale`.
#[derive(clap::Args, Debug, Clone)]
pub struct ScaleArgs {
    /// Simulated agents, each with its own disk and connection.
    #[arg(long, default_value_t = 200)]
    pub agents: usize,
    /// Data each agent sends: its disk's size (K/M/G suffixes; a multiple of 4 KiB).
    #[arg(long, default_value = "8M", value_parser = protocol::cli::parse_size)]
    pub per_agent: u64,
    /// Uncompressed data per batch (the agent's default is 1M).
    #[arg(long, default_value = "1M", value_parser = protocol::cli::parse_size)]
    pub batch_size: u64,
    /// Directory for the JSON report.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Working directory (sources, datastore, cache, logs); kept afterwards. Default: a
    /// temporary directory, removed at the end.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seed of the random source data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Give up if the agents are not all done after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
    #[command(flatten)]
    pub ps_memory: PsMemoryArgs,
}

const MIB: f64 = (1 << 20) as f64;

/// Min, median and max of the agents' MB/s.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub max_over_min: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub started_unix: u64,
    pub build: &'static str,
    pub host: Host,
    pub agents: usize,
    pub per_agent_bytes: u64,
    pub batch_bytes: u64,
    /// The process server's `--h2-stream-window` (its default when not set).
    pub ps_stream_window: u64,
    /// The process server's `--memory-budget` (its default when not set).
    pub ps_memory_budget: u64,
    /// Until the last agent completed.
    pub seconds: f64,
    pub total_mb_per_sec: f64,
    pub per_agent_mb_per_sec: Spread,
    /// Each agent's time from the common start to its completion, in agent order.
    pub per_agent_seconds: Vec<f64>,
    pub process_server_peak_rss_bytes: u64,
    /// The process server's peak RSS once every stream was open, before the push.
    pub process_server_rss_before_push_bytes: u64,
    /// What the configuration bounds the batch bytes the process server holds at: the
    /// memory budget, plus per agent stream its HTTP/2 stream window (unread) and two
    /// messages (one read and waiting for budget, the next partly read behind it; the
    /// largest the bench sends), plus the cache writer's group buffer.
    pub process_server_held_bound_bytes: u64,
    pub master_target_peak_rss_bytes: u64,
    /// CPU seconds (user + system) during the push.
    pub process_server_cpu_secs: f64,
    pub master_target_cpu_secs: f64,
    /// Disks found identical to their sources (all of them, or the run fails).
    pub verified_disks: usize,
    pub target: Target,
}

pub fn run(args: &ScaleArgs, exe: &Path) -> Result<ScaleReport> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    if args.per_agent == 0 || !args.per_agent.is_multiple_of(4096) {
        bail!("--per-agent must be a nonzero multiple of 4 KiB");
    }
    check_batch_size(args.batch_size)?;
    let Start {
        dir,
        mut tmp,
        started_unix,
        host,
    } = start(args.dir.as_deref(), "failback-scale-", &args.out)?;
    println!(
        "bench scale: {} agents x {} KiB, one process server and master target, in {}",
        args.agents,
        args.per_agent >> 10,
        dir.display()
    );
    let disks = streams::random_disks(
        &dir.join("sources"),
        "bench-scale",
        args.agents,
        args.per_agent,
        args.seed,
    )?;
    let batches = disks
        .iter()
        .map(|d| streams::build_batches(d, args.batch_size as usize))
        .collect::<Result<Vec<_>>>()?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut cluster = Cluster::new(exe, &dir.join("cluster"))?;
    let (window, budget) = args.ps_memory.effective();
    cluster.process_server_flags = args.ps_memory.flags();
    // A gRPC message is the encoded batch behind a 5-byte header.
    let largest = batches
        .iter()
        .flatten()
        .map(|b| process_server::cache::Payload::batch(b.clone()).len() as u64 + 5)
        .max()
        .unwrap_or(0);
    let held_bound = budget
        + args.agents as u64 * (window + 2 * largest)
        + process_server::cache::log::MAX_GROUP_BYTES as u64;
    let (times, ps_before, ps, mt) = keep_on_err(
        &mut tmp,
        push_and_verify(&rt, args, &mut cluster, &disks, &batches),
    )?;
    let seconds: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    let rates: Vec<f64> = seconds
        .iter()
        .map(|s| args.per_agent as f64 / 1e6 / s)
        .collect();
    let (min, max) = rates.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| {
        (lo.min(r), hi.max(r))
    });
    let last = seconds.iter().copied().fold(0.0, f64::max);
    let spread = Spread {
        min,
        median: median(rates),
        max,
        max_over_min: max / min,
    };
    let report = ScaleReport {
        started_unix,
        build: build_kind(),
        host,
        agents: args.agents,
        per_agent_bytes: args.per_agent,
        batch_bytes: args.batch_size,
        ps_stream_window: window,
        ps_memory_budget: budget,
        seconds: last,
        total_mb_per_sec: (args.agents as u64 * args.per_agent) as f64 / 1e6 / last,
        target: Target::check(
            "per-agent MB/s, max / min",
            Some(spread.max_over_min),
            Cmp::AtMost,
            1.2,
        ),
        per_agent_mb_per_sec: spread,
        per_agent_seconds: seconds,
        process_server_peak_rss_bytes: ps.peak_rss_bytes,
        process_server_rss_before_push_bytes: ps_before.peak_rss_bytes,
        process_server_held_bound_bytes: held_bound,
        master_target_peak_rss_bytes: mt.peak_rss_bytes,
        process_server_cpu_secs: ps.cpu_secs,
        master_target_cpu_secs: mt.cpu_secs,
        verified_disks: disks.len(),
    };
    let json = args.out.join(format!("scale-{started_unix}.json"));
    fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let s = &report.per_agent_mb_per_sec;
    println!(
        "  {} agents done in {:.2} s: total {:.1} MB/s; per agent MB/s min {:.2} / median {:.2} / max {:.2} (max/min {:.2})",
        report.agents,
        report.seconds,
        report.total_mb_per_sec,
        s.min,
        s.median,
        s.max,
        s.max_over_min
    );
    println!(
        "  peak RSS: process server {:.1} MiB, master target {:.1} MiB; CPU s: process server {:.1}, master target {:.1}",
        report.process_server_peak_rss_bytes as f64 / MIB,
        report.master_target_peak_rss_bytes as f64 / MIB,
        report.process_server_cpu_secs,
        report.master_target_cpu_secs
    );
    println!(
        "  process server memory: budget {:.0} MiB, stream window {:.1} MiB; batches held <= {:.0} MiB (budget + {} x (window + 2 messages) + writer buffer); peak RSS {:.1} MiB, {:.1} MiB before the push",
        report.ps_memory_budget as f64 / MIB,
        report.ps_stream_window as f64 / MIB,
        report.process_server_held_bound_bytes as f64 / MIB,
        report.agents,
        report.process_server_peak_rss_bytes as f64 / MIB,
        report.process_server_rss_before_push_bytes as f64 / MIB
    );
    println!("  verified {} disks byte for byte", disks.len());
    println!("target (reported, not asserted):\n{}", report.target.line());
    println!("  report  {}", json.display());
    Ok(report)
}

/// Starts the cluster, pushes every agent's pass, stops the cluster and compares every
/// target disk with its source; returns each agent's time, the process server's usage
/// before the push, the process server's and master target's usage during it, and how
/// many disks were compared equal with their source.
fn push_and_verify(
    rt: &tokio::runtime::Runtime,
    args: &ScaleArgs,
    cluster: &mut Cluster,
    disks: &[streams::Disk],
    batches: &[Vec<protocol::pb::Batch>],
) -> Result<(Vec<Duration>, usage::Usage, usage::Usage, usage::Usage)> {
    cluster.start().with_context(|| cluster.log_tails())?;
    let ready = rt
        .block_on(streams::open_all(cluster, disks, batches, true))
        .with_context(|| cluster.log_tails())?;
    let pids = [cluster.process_server_pid(), cluster.master_target_pid()]
        .map(|p| p.context("server not running"));
    let [ps, mt] = pids;
    let (ps, mt) = (ps?, mt?);
    let (ps_before, mt_before) = (usage::sample(ps)?, usage::sample(mt)?);
    let times = rt
        .block_on(streams::drive_all(
            ready,
            Duration::from_secs(args.timeout_secs),
        ))
        .with_context(|| cluster.log_tails())?;
    let (ps_used, mt_used) = (
        usage::sample(ps)?.since(ps_before),
        usage::sample(mt)?.since(mt_before),
    );
    cluster.stop_clean(Duration::from_secs(30))?;
    // Every disk, or an error: the report's count of verified disks is `disks.len()`.
    for d in disks {
        verify::files_equal(&cluster.flat_path(&d.name), &d.source)
            .with_context(|| format!("verifying disk {} ({})", d.disk_id, cluster.dir.display()))?;
    }
    Ok((times, ps_before, ps_used, mt_used))
}
