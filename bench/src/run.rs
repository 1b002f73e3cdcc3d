//! `bench run`: full syncs of a source disk through agent -> process server -> WAN
//! emulator -> master target over a grid of RTT x link rate, next to peer tools copying
//! the same disk through the same emulator, with medians over repeats; or, with
//! `--scenario differential`, resyncs of a changed disk to a target that holds its earlier
//! state (failback's differential sync next to rsync's delta transfer), by wire bytes.
//!
//! The emulator is `bench wan`, run in this process. In proxy mode (the default, no root)
//! it terminates TCP, so the figures include h2 flow control, the process server's forward
//! window and every application acknowledgement round trip, but no TCP dynamics (slow
//! start, loss, congestion control, kernel buffer limits). In packet mode (`--wan packet`,
//! root) it forwards IP packets to a second network namespace where the receivers run, so
//! real TCP crosses it. Each row carries its analytic bound (link rate and every window
//! over the RTT) so that a figure can be read against what the configuration allows. See
//! docs/bench.md.

use std::borrow::Cow;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use protocol::limits::MAX_BATCH_DATA;
use serde::Serialize;

use crate::cluster::{Cluster, free_port, run_with_timeout};
use crate::peers::{Measured, Peer, Transfer};
use crate::rpo::RpoArgs;
use crate::usage::{self, Usage};
use crate::wan::{Relayed, WanArgs};
use crate::workload::{self, Workload};
use crate::{plot, verify};

/// Options of `bench run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// CI smoke run: RTT 20 ms at 1 Gbit/s, a 32 MiB disk, one repeat (flags given
    /// explicitly still win).
    #[arg(long)]
    pub quick: bool,
    /// Round-trip times in ms, comma-separated [default: 0,20,50,100,150].
    #[arg(long, value_delimiter = ',')]
    pub rtt: Vec<u64>,
    /// Link rates in Mbit/s, comma-separated [default: 100,1000,10000].
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<u64>,
    /// Size of the source disk (K/M/G suffixes) [default: 256M; --quick: 32M].
    #[arg(long, value_parser = protocol::cli::parse_size)]
    pub size: Option<u64>,
    /// Source disks to replicate, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "mixed")]
    pub workload: Vec<Workload>,
    /// Runs per row; the row reports medians [default: 3; --quick: 1].
    #[arg(long)]
    pub repeat: Option<usize>,
    /// Directory for the JSON report and the plots.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Peer tools to compare with, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lz4-socat,nbdcopy,qemu-img,rsync"
    )]
    pub peers: Vec<Peer>,
    /// Measure failback alone.
    #[arg(long)]
    pub no_peers: bool,
    /// Working directory (disks, datastores, caches, logs); kept afterwards. Default: a
    /// temporary directory, removed at the end.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run both failback hops over TLS (the peers have no encryption, so off by default;
    /// proxy mode only).
    #[arg(long)]
    pub tls: bool,
    /// WAN emulation: `proxy` (TCP-terminating, no root, no TCP dynamics) or `packet`
    /// (IP packets to a second network namespace over TUN devices, real TCP; root).
    #[arg(long, value_enum, default_value = "proxy")]
    pub wan: WanMode,
    /// Process server: connections to the master target.
    #[arg(long, default_value_t = 4)]
    pub connections: u64,
    /// Process server: bytes in flight to the master target.
    #[arg(long, default_value = "64M", value_parser = protocol::cli::parse_size)]
    pub forward_window: u64,
    /// HTTP/2 stream window of every role.
    #[arg(long, default_value = "32M", value_parser = protocol::cli::parse_size)]
    pub h2_stream_window: u64,
    /// HTTP/2 connection window of every role.
    #[arg(long, default_value = "64M", value_parser = protocol::cli::parse_size)]
    pub h2_connection_window: u64,
    /// Emulator: bytes in flight per connection and direction (stands in for TCP's window).
    #[arg(long, default_value = "4M", value_parser = protocol::cli::parse_size)]
    pub proxy_window: u64,
    /// Emulator: router queue beyond the delay line, in ms of the link rate.
    #[arg(long, default_value_t = 50)]
    pub buffer_ms: u64,
    /// Emulator, packet mode: random loss in percent of packets, each direction (the
    /// bound then includes Mathis' limit for Reno/CUBIC).
    #[arg(long, default_value_t = 0.0)]
    pub loss_percent: f64,
    /// What each copy does: `full` copies the whole disk to an empty target;
    /// `differential` starts from a target that holds the disk, changes --change-percent of
    /// its 4 KiB blocks, and measures sending the change (failback: `agent sync --mode
    /// differential`; peers: `rsync --inplace --no-whole-file` only); `continuous` runs
    /// `bench rpo` at each grid point (failback alone: --churn-mb through the agent's NBD
    /// export for --churn-seconds, RPO reported).
    #[arg(long, value_enum, default_value = "full")]
    pub scenario: Scenario,
    /// Differential scenario: percent of the disk's 4 KiB blocks changed (distinct blocks,
    /// at random, with random data).
    #[arg(long, default_value_t = 5.0)]
    pub change_percent: f64,
    /// Differential scenario: the chunk failback compares (`agent sync --chunk-size`).
    #[arg(long, default_value = "4K", value_parser = protocol::cli::parse_size)]
    pub chunk_size: u64,
    /// Continuous scenario: churn rate, MB/s (10^6 bytes) of random 64 KiB writes.
    #[arg(long, default_value_t = 54.0)]
    pub churn_mb: f64,
    /// Continuous scenario: how long to churn at each grid point [default: 30; --quick: 5].
    #[arg(long)]
    pub churn_seconds: Option<u64>,
    /// Seed of the generated disks.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Give up on one copy after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
}

/// What one copy does (see `RunArgs::scenario`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Full,
    Differential,
    Continuous,
}

/// How the WAN is emulated.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WanMode {
    Proxy,
    Packet,
}

impl WanMode {
    fn label(self) -> &'static str {
        match self {
            WanMode::Proxy => "proxy, no TCP dynamics",
            WanMode::Packet => "packet, real TCP (TUN forwarder, MTU 1400)",
        }
    }

    /// What the figures of this mode leave out.
    fn caveat(self) -> &'static str {
        match self {
            WanMode::Proxy => {
                "proxy mode: TCP is terminated at the emulator, so there are no TCP dynamics \
                 (slow start, loss, congestion control, kernel buffer limits)"
            }
            WanMode::Packet => {
                "packet mode: real TCP through a user-space forwarder that releases packets \
                 with the tokio timer (1 ms granularity) and shares the CPUs with the roles; \
                 losses are tail drops of its queue, plus random ones with --loss-percent"
            }
        }
    }
}

/// The grid a run covers, after `--quick` and the defaults.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub rtt_ms: Vec<u64>,
    pub rate_mbit: Vec<u64>,
    pub size: u64,
    pub repeat: usize,
    pub scenario: Scenario,
    /// Differential scenario: 4 KiB blocks changed, and failback's chunk size.
    pub changed_blocks: Option<u64>,
    pub chunk_size: Option<u64>,
}

impl RunArgs {
    pub fn plan(&self) -> Result<Plan> {
        let pick = |given: &[u64], quick: u64, full: &[u64]| -> Vec<u64> {
            match (given.is_empty(), self.quick) {
                (false, _) => given.to_vec(),
                (true, true) => vec![quick],
                (true, false) => full.to_vec(),
            }
        };
        let mut plan = Plan {
            rtt_ms: pick(&self.rtt, 20, &[0, 20, 50, 100, 150]),
            rate_mbit: pick(&self.rate, 1000, &[100, 1000, 10_000]),
            size: self
                .size
                .unwrap_or(if self.quick { 32 << 20 } else { 256 << 20 }),
            repeat: self.repeat.unwrap_or(if self.quick { 1 } else { 3 }),
            scenario: self.scenario,
            changed_blocks: None,
            chunk_size: None,
        };
        if self.scenario == Scenario::Differential {
            if !(self.change_percent > 0.0 && self.change_percent <= 100.0) {
                bail!("--change-percent must be in (0, 100]");
            }
            if !self.chunk_size.is_power_of_two() || !(4096..=4 << 20).contains(&self.chunk_size) {
                bail!("--chunk-size must be a power of two from 4K to 4M");
            }
            let blocks = plan.size / 4096;
            plan.changed_blocks =
                Some(((blocks as f64 * self.change_percent / 100.0).round() as u64).max(1));
            plan.chunk_size = Some(self.chunk_size);
        }
        if plan.size == 0 || !plan.size.is_multiple_of(4096) {
            bail!("--size must be a nonzero multiple of 4096 bytes");
        }
        if plan.repeat == 0 {
            bail!("--repeat must be at least 1");
        }
        if self.tls && self.wan == WanMode::Packet {
            bail!("--tls works in proxy mode only (the certificates name 127.0.0.1)");
        }
        // SAFETY: geteuid has no preconditions.
        if self.wan == WanMode::Packet && unsafe { libc::geteuid() } != 0 {
            bail!("--wan packet needs root (network namespaces and TUN devices)");
        }
        if self.loss_percent != 0.0 && self.wan != WanMode::Packet {
            bail!("--loss-percent needs --wan packet (the proxy has no packets to lose)");
        }
        if !(0.0..100.0).contains(&self.loss_percent) {
            bail!("--loss-percent must be in [0, 100)");
        }
        if plan.rate_mbit.contains(&0) {
            bail!("--rate must be positive (Mbit/s)");
        }
        Ok(plan)
    }

    /// The `bench rpo` grid that `--scenario continuous` runs.
    pub fn continuous(&self) -> Result<RpoArgs> {
        let plan = self.plan()?;
        if self.wan != WanMode::Proxy || self.tls {
            bail!("--scenario continuous runs in proxy mode without TLS (as `bench rpo`)");
        }
        if self.workload != [Workload::Mixed] {
            bail!("--scenario continuous replicates the generated mixed disk: --workload mixed");
        }
        if self.repeat.is_some() {
            bail!("--scenario continuous runs each grid point once: no --repeat");
        }
        Ok(RpoArgs {
            size: plan.size,
            churn_mb: self.churn_mb,
            pattern: crate::churn::Pattern::Uniform,
            write_size: 64 << 10,
            seconds: self
                .churn_seconds
                .unwrap_or(if self.quick { 5 } else { 30 }),
            flush_ms: 1000,
            rtt_ms: plan.rtt_ms,
            rate_mbit: plan.rate_mbit,
            buffer_ms: self.buffer_ms,
            proxy_window: self.proxy_window,
            sample_ms: 500,
            out: self.out.clone(),
            dir: self.dir.clone(),
            seed: self.seed,
            timeout_secs: self.timeout_secs,
        })
    }
}

/// A system under test: failback itself or one of the peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Failback,
    Peer(Peer),
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Failback => "failback",
            System::Peer(p) => p.name(),
        }
    }
}

/// CPU and memory of one process role, per GiB of source disk.
#[derive(Debug, Clone, Serialize)]
pub struct RoleUsage {
    pub role: String,
    pub cpu_secs_per_gib: f64,
    pub peak_rss_mib: f64,
}

/// The analytic upper bound of a row, in MB/s of wire bytes, and its tightest term.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bound {
    pub mb_per_sec: f64,
    pub limited_by: String,
}

/// min(link rate, each window / RTT). `windows` are (name, bytes in flight allowed).
pub fn bound(rate_mbit: u64, rtt_ms: u64, windows: &[(&str, u64)]) -> Bound {
    let mut best = (rate_mbit as f64 / 8.0, "link rate".to_string());
    if rtt_ms > 0 {
        for (name, bytes) in windows {
            let mbps = *bytes as f64 / 1e6 / (rtt_ms as f64 / 1000.0);
            if mbps < best.0 {
                best = (mbps, format!("{name} / RTT"));
            }
        }
    }
    Bound {
        mb_per_sec: best.0,
        limited_by: best.1,
    }
}

/// One row of the report: medians over the repeats of one system at one grid point.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: String,
    pub system: String,
    pub rtt_ms: u64,
    pub rate_mbit: u64,
    pub disk_bytes: u64,
    pub repeats: usize,
    /// Every repeat's duration, in run order.
    pub runs_seconds: Vec<f64>,
    pub seconds: f64,
    /// Source disk bytes per second (holes and zeros included, as a full sync covers them).
    pub mb_per_sec: f64,
    pub blocks_per_sec: f64,
    /// Bytes the emulator relayed towards the receiver (data) and back (acknowledgements).
    pub wire_bytes_up: u64,
    pub wire_bytes_down: u64,
    /// wire_bytes_up / (link rate x seconds).
    pub link_utilisation: f64,
    /// Connections the emulator accepted (proxy) or saw opened (packet: SYNs) in one copy.
    pub connections: u64,
    /// Packets the emulator dropped: full queue, or random loss with --loss-percent
    /// (packet mode; 0 in proxy mode).
    pub dropped_packets: u64,
    pub bound: Bound,
    /// Wire throughput over the bound.
    pub of_bound: f64,
    pub roles: Vec<RoleUsage>,
    /// CPU seconds per GiB of the emulator's threads (in this process), which share the
    /// CPUs with the systems under test.
    pub emulator_cpu_secs_per_gib: f64,
    /// failback MB/s over this row's MB/s, for peers at the same grid point.
    pub failback_over_this: Option<f64>,
    /// failback's wire bytes (both directions) over this row's, for peers at the same grid
    /// point.
    pub failback_wire_over_this: Option<f64>,
}

/// The JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// "proxy, no TCP dynamics" or "packet, real TCP ...".
    pub mode: &'static str,
    pub started_unix: u64,
    pub build: &'static str,
    pub host: Host,
    pub plan: Plan,
    pub tls: bool,
    /// Random packet loss of the emulated link, in percent (packet mode).
    pub loss_percent: f64,
    pub workloads: Vec<WorkloadInfo>,
    pub notes: Vec<String>,
    pub rows: Vec<Row>,
    /// The targets (reported, never asserted), checked against this run's rows.
    pub targets: Vec<Target>,
}

/// One of the targets the bench reports against, at 1 Gbit/s and 100 ms RTT.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    pub what: Cow<'static, str>,
    /// The measured figure, and the one wanted (`>=` or `<=`, see `cmp`).
    pub measured: Option<f64>,
    pub cmp: Cmp,
    pub wanted: f64,
    /// None when this run has no row to check it with.
    pub met: Option<bool>,
}

/// How a target's measured figure must compare with the wanted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Cmp {
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<=")]
    AtMost,
}

impl Target {
    /// A target checked against `measured` (None: not measured in this run).
    pub fn check(
        what: impl Into<Cow<'static, str>>,
        measured: Option<f64>,
        cmp: Cmp,
        wanted: f64,
    ) -> Target {
        Target {
            what: what.into(),
            measured,
            cmp,
            wanted,
            met: measured.map(|m| match cmp {
                Cmp::AtLeast => m >= wanted,
                Cmp::AtMost => m <= wanted,
            }),
        }
    }

    /// "  WHAT  MEASURED (want >= WANTED): met | NOT met | no row in this run".
    pub fn line(&self) -> String {
        let (measured, verdict) = match (self.measured, self.met) {
            (Some(m), Some(true)) => (format!("{m:.2}"), "met"),
            (Some(m), _) => (format!("{m:.2}"), "NOT met"),
            (None, _) => ("-".to_string(), "no row in this run"),
        };
        let cmp = match self.cmp {
            Cmp::AtLeast => ">=",
            Cmp::AtMost => "<=",
        };
        format!(
            "  {:<50} {measured:>6} (want {cmp} {:.2}): {verdict}",
            self.what, self.wanted
        )
    }
}

/// Grid point the targets are stated at.
const TARGET_RATE_MBIT: u64 = 1000;
const TARGET_RTT_MS: u64 = 100;

/// Checks the targets of the scenario against `rows` (those at 1 Gbit/s and 100 ms RTT).
/// The RPO target is not measured by `bench run`, so it is left out rather than reported
/// as met.
pub fn targets(rows: &[Row], scenario: Scenario) -> Vec<Target> {
    let at = |workload: &str, system: &str| {
        rows.iter().find(|r| {
            r.workload == workload
                && r.system == system
                && r.rate_mbit == TARGET_RATE_MBIT
                && r.rtt_ms == TARGET_RTT_MS
        })
    };
    if scenario == Scenario::Differential {
        // Any workload: the first one with an rsync row at the target point.
        let measured = rows
            .iter()
            .find(|r| {
                r.system == "rsync" && r.rate_mbit == TARGET_RATE_MBIT && r.rtt_ms == TARGET_RTT_MS
            })
            .and_then(|r| r.failback_wire_over_this);
        return vec![Target::check(
            "differential resync: failback / rsync wire bytes",
            measured,
            Cmp::AtMost,
            0.6,
        )];
    }
    let ratio = |workload: &str, peer: &str| at(workload, peer).and_then(|r| r.failback_over_this);
    let checks = [
        (
            "filesystem full sync: failback / nbdcopy MB/s",
            ratio("filesystem", "nbdcopy"),
            2.5,
        ),
        (
            "filesystem full sync: failback / lz4|socat MB/s",
            ratio("filesystem", "lz4|socat"),
            1.5,
        ),
        (
            "random full sync: failback link utilisation",
            at("random", "failback").map(|r| r.link_utilisation),
            0.95,
        ),
    ];
    checks
        .into_iter()
        .map(|(what, measured, wanted)| Target::check(what, measured, Cmp::AtLeast, wanted))
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub cpus: usize,
    pub kernel: String,
    pub loadavg_at_start: String,
}

impl Host {
    /// "results (MODE; BUILD build; N CPUs, load at start L):", above a results table.
    pub fn heading(&self, mode: &str, build: &str) -> String {
        format!(
            "results ({mode}; {build} build; {} CPUs, load at start {}):",
            self.cpus, self.loadavg_at_start
        )
    }

    /// This machine now: CPU count, kernel release and load average.
    pub fn here() -> Host {
        Host {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            loadavg_at_start: fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

/// What `bench ingest`, `scale` and `apply` set up first.
pub struct Start {
    /// From [`work_dir`], with its guard.
    pub dir: PathBuf,
    pub tmp: Option<tempfile::TempDir>,
    pub started_unix: u64,
    pub host: Host,
}

/// Passes `r` through; if it is an error, keeps the temporary working directory behind
/// `tmp` (if any) for the logs the error points at.
pub fn keep_on_err<T>(tmp: &mut Option<tempfile::TempDir>, r: Result<T>) -> Result<T> {
    if r.is_err()
        && let Some(t) = tmp.take()
    {
        let _ = t.keep();
    }
    r
}

/// The working directory (see [`work_dir`]), the report directory `out` (created), the
/// start time and the host.
pub fn start(dir: Option<&Path>, prefix: &str, out: &Path) -> Result<Start> {
    let (dir, tmp) = work_dir(dir, prefix)?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    Ok(Start {
        dir,
        tmp,
        started_unix: SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        host: Host::here(),
    })
}

/// Checks a `--batch-size`: 1 byte up to the protocol's largest batch.
pub fn check_batch_size(batch_size: u64) -> Result<()> {
    if batch_size == 0 || batch_size > MAX_BATCH_DATA as u64 {
        bail!("--batch-size must be 1..={MAX_BATCH_DATA} bytes");
    }
    Ok(())
}

/// The working directory of a run: `dir` (created, kept), or a new temporary directory
/// named `prefix...`, removed when the returned guard drops (keep it with `TempDir::keep`).
pub fn work_dir(dir: Option<&Path>, prefix: &str) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match dir {
        Some(d) => {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            Ok((d.to_path_buf(), None))
        }
        None => {
            let t = tempfile::Builder::new().prefix(prefix).tempdir()?;
            Ok((t.path().to_path_buf(), Some(t)))
        }
    }
}

/// "release" or "debug": whether this build has debug assertions.
pub fn build_kind() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadInfo {
    pub name: &'static str,
    pub description: String,
    pub bytes: u64,
}

/// One copy's raw figures.
struct Sample {
    measured: Measured,
    /// CPU seconds of the emulator's threads during the copy (set by the caller).
    emulator_cpu: f64,
    up: u64,
    down: u64,
    connections: u64,
    dropped: u64,
}

/// The emulated WAN of one copy, and where its two sides meet.
enum Emulator {
    Proxy(Proxy),
    Packet(crate::packet::Link),
}

/// What the emulator counted during one copy: (up, down, connections, dropped packets).
type Counts = (u64, u64, u64, u64);

impl Emulator {
    /// Starts the emulator; returns it with the address receivers listen on and the one
    /// senders connect to.
    fn start(
        rt: &tokio::runtime::Runtime,
        args: &RunArgs,
        rtt_ms: u64,
        rate_mbit: u64,
    ) -> Result<(Emulator, SocketAddr, SocketAddr)> {
        let port = free_port()?;
        match args.wan {
            WanMode::Proxy => {
                let proxy = Proxy::start(
                    rt,
                    port,
                    rtt_ms,
                    rate_mbit,
                    args.buffer_ms,
                    args.proxy_window,
                )?;
                let (listen, connect) = (
                    SocketAddr::from(([127, 0, 0, 1], port)),
                    SocketAddr::from(([127, 0, 0, 1], proxy.port)),
                );
                Ok((Emulator::Proxy(proxy), listen, connect))
            }
            WanMode::Packet => {
                let _guard = rt.enter();
                let link = crate::packet::Link::create(
                    &format!("fbrun{}", std::process::id()),
                    rtt_ms,
                    rate_mbit,
                    args.buffer_ms,
                    args.loss_percent / 100.0,
                )?;
                let far = SocketAddr::from((link.far, port));
                Ok((Emulator::Packet(link), far, far))
            }
        }
    }

    /// The emulator's byte counters.
    fn relayed(&self) -> Arc<Relayed> {
        match self {
            Emulator::Proxy(p) => p.relayed.clone(),
            Emulator::Packet(link) => link.relayed.clone(),
        }
    }

    fn netns(&self) -> Option<crate::packet::Netns> {
        match self {
            Emulator::Proxy(_) => None,
            Emulator::Packet(link) => Some(link.netns()),
        }
    }

    fn finish(self, rt: &tokio::runtime::Runtime) -> Result<Counts> {
        let (relayed, dropped) = match self {
            Emulator::Proxy(p) => (p.finish(rt)?, 0),
            Emulator::Packet(link) => {
                let counts = (link.relayed.clone(), link.dropped.load(Ordering::Relaxed));
                rt.block_on(link.close());
                counts
            }
        };
        Ok((
            relayed.up.load(Ordering::Relaxed),
            relayed.down.load(Ordering::Relaxed),
            relayed.connections.load(Ordering::Relaxed),
            dropped,
        ))
    }
}

/// A WAN emulator in proxy mode on a tokio runtime, relaying to 127.0.0.1:`upstream`.
pub(crate) struct Proxy {
    /// Where senders connect (127.0.0.1).
    pub(crate) port: u16,
    relayed: Arc<Relayed>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Proxy {
    /// Starts relaying with `bench wan`'s emulation (`buffer_ms` of queue, `window` bytes
    /// in flight per connection and direction).
    pub(crate) fn start(
        rt: &tokio::runtime::Runtime,
        upstream: u16,
        rtt_ms: u64,
        rate_mbit: u64,
        buffer_ms: u64,
        window: u64,
    ) -> Result<Proxy> {
        let port = free_port()?;
        let wan = WanArgs {
            listen: Some(([127, 0, 0, 1], port).into()),
            upstream: Some(([127, 0, 0, 1], upstream).into()),
            packet: false,
            netns: String::new(),
            rtt_ms,
            rate_mbit,
            buffer_ms,
            window,
            loss_percent: 0.0,
        };
        let relayed = Arc::new(Relayed::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(crate::wan::serve_counted(wan, relayed.clone(), async {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !usage::listening(None, port) {
            if task.is_finished() || Instant::now() > deadline {
                bail!("the WAN emulator did not listen on port {port}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Proxy {
            port,
            relayed,
            stop,
            task,
        })
    }

    /// Stops the emulator; returns what it relayed.
    pub(crate) fn finish(self, rt: &tokio::runtime::Runtime) -> Result<Arc<Relayed>> {
        let _ = self.stop.send(());
        rt.block_on(self.task)??;
        Ok(self.relayed)
    }
}

/// Runs the grid and writes the report; returns it.
pub fn run(args: &RunArgs, exe: &Path) -> Result<Report> {
    let plan = args.plan()?;
    if plan.scenario == Scenario::Continuous {
        bail!("--scenario continuous is `bench rpo` over the grid: see RunArgs::continuous");
    }
    // A temporary working directory is removed at the end unless a copy failed: then its
    // logs are kept for the note that points at them.
    let (dir, mut tmp) = work_dir(args.dir.as_deref(), "failback-run-")?;
    let keep_tmp = |tmp: &mut Option<tempfile::TempDir>| {
        if let Some(t) = tmp.take() {
            let _ = t.keep();
        }
    };
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    // The emulator's threads are recorded so that its CPU time can be told apart.
    let emulator_threads: Arc<std::sync::Mutex<Vec<i32>>> = Arc::default();
    let threads = emulator_threads.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            threads.lock().unwrap_or_else(|e| e.into_inner()).push(tid);
        })
        .enable_all()
        .build()?;
    let emulator_cpu = || -> f64 {
        let tids = emulator_threads.lock().unwrap_or_else(|e| e.into_inner());
        // A thread that has ended no longer counts; its time is lost to both samples.
        tids.iter()
            .filter_map(|&t| usage::thread_cpu_secs(t).ok())
            .sum()
    };
    let mut notes = vec![args.wan.caveat().to_string()];
    let mut systems = vec![System::Failback];
    if !args.no_peers {
        for &p in &args.peers {
            match p.missing_tool() {
                _ if args.scenario == Scenario::Differential && !p.has_delta() => {
                    notes.push(format!(
                        "{}: no differential transfer, left out of this scenario",
                        p.name()
                    ))
                }
                Some(tool) => {
                    notes.push(format!("{}: skipped, `{tool}` is not installed", p.name()))
                }
                None if !systems.contains(&System::Peer(p)) => systems.push(System::Peer(p)),
                None => {}
            }
        }
    }
    let started_unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let host = Host::here();
    println!(
        "bench run: {} workload(s) x RTT {:?} ms x rate {:?} Mbit/s x {} system(s), {} repeat(s), {} MiB disk; WAN: {}",
        args.workload.len(),
        plan.rtt_ms,
        plan.rate_mbit,
        systems.len(),
        plan.repeat,
        plan.size >> 20,
        args.wan.label()
    );
    if args.loss_percent > 0.0 {
        println!("  random loss: {}% of packets each way", args.loss_percent);
    }
    for n in &notes[1..] {
        println!("  note: {n}");
    }

    println!("{HEADER}");
    let mut workloads = Vec::new();
    let mut rows = Vec::new();
    let mut copies = 0u64;
    for &w in &args.workload {
        let source = dir.join(format!("source-{}.raw", w.name()));
        let mut description = w
            .build(&source, plan.size, args.seed)
            .with_context(|| format!("building the {} disk", w.name()))?;
        // Differential scenario: the target starts with `base`; the source is changed.
        let base = match plan.changed_blocks {
            Some(changed) => {
                let base = dir.join(format!("base-{}.raw", w.name()));
                fs::copy(&source, &base)?;
                workload::churn(&source, changed, args.seed)?;
                description.push_str(&format!(
                    "; then {changed} distinct 4 KiB blocks ({}%) changed",
                    args.change_percent
                ));
                Some(base)
            }
            None => None,
        };
        println!("  workload {}: {description}", w.name());
        workloads.push(WorkloadInfo {
            name: w.name(),
            description,
            bytes: plan.size,
        });
        for &rate in &plan.rate_mbit {
            for &rtt in &plan.rtt_ms {
                let mut point: Vec<Row> = Vec::new();
                for &system in &systems {
                    let mut samples = Vec::new();
                    for _ in 0..plan.repeat {
                        copies += 1;
                        let scratch = dir.join(format!("copy-{copies}"));
                        let cpu_before = emulator_cpu();
                        let r = copy_once(
                            &rt,
                            args,
                            exe,
                            system,
                            (&source, base.as_deref()),
                            plan.size,
                            &scratch,
                            rtt,
                            rate,
                        )
                        .map(|mut s| {
                            s.emulator_cpu = emulator_cpu() - cpu_before;
                            s
                        });
                        match r {
                            Ok(s) => {
                                if let Some(n) = &s.measured.note
                                    && !notes.contains(n)
                                {
                                    eprintln!("  note: {n}");
                                    notes.push(n.clone());
                                }
                                samples.push(s);
                                let _ = fs::remove_dir_all(&scratch);
                            }
                            Err(e) if system != System::Failback => {
                                let note = format!(
                                    "{} at {rtt} ms, {rate} Mbit/s failed: {e:#} (files in {})",
                                    system.name(),
                                    scratch.display()
                                );
                                eprintln!("  note: {note}");
                                notes.push(note);
                                keep_tmp(&mut tmp);
                                break;
                            }
                            Err(e) => {
                                keep_tmp(&mut tmp);
                                return Err(e.context(format!(
                                    "failback at {rtt} ms, {rate} Mbit/s (files in {})",
                                    scratch.display()
                                )));
                            }
                        }
                    }
                    if samples.len() == plan.repeat {
                        let row = summarize(w, system, rtt, rate, plan.size, args, &samples);
                        point.push(row);
                    }
                }
                let failback = point
                    .iter()
                    .find(|r| r.system == System::Failback.name())
                    .map(|r| (r.mb_per_sec, r.wire_bytes_up + r.wire_bytes_down));
                for r in &mut point {
                    if r.system != System::Failback.name() {
                        r.failback_over_this = failback.map(|f| f.0 / r.mb_per_sec);
                        r.failback_wire_over_this = failback
                            .map(|f| f.1 as f64 / (r.wire_bytes_up + r.wire_bytes_down) as f64);
                    }
                    println!("{}", table_line(r));
                }
                rows.extend(point);
            }
        }
    }

    let report = Report {
        mode: args.wan.label(),
        started_unix,
        build: build_kind(),
        host,
        plan,
        tls: args.tls,
        loss_percent: args.loss_percent,
        workloads,
        notes,
        targets: targets(&rows, args.scenario),
        rows,
    };
    let stem = args.out.join(format!("run-{started_unix}"));
    let json = stem.with_extension("json");
    fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    println!();
    print_table(&report);
    println!("\n  report  {}", json.display());
    for svg in plot::blocks_vs_rtt(&report, &stem)? {
        println!("  plot    {}", svg.display());
    }
    Ok(report)
}

/// One copy of `source` by `system` through a fresh emulator.
#[allow(clippy::too_many_arguments)]
fn copy_once(
    rt: &tokio::runtime::Runtime,
    args: &RunArgs,
    exe: &Path,
    system: System,
    (source, base): (&Path, Option<&Path>),
    size: u64,
    scratch: &Path,
    rtt_ms: u64,
    rate_mbit: u64,
) -> Result<Sample> {
    fs::create_dir_all(scratch)?;
    let (emulator, listen, connect) = Emulator::start(rt, args, rtt_ms, rate_mbit)?;
    let t = Transfer {
        source,
        base,
        relayed: emulator.relayed(),
        size,
        dir: scratch,
        listen,
        connect,
        netns: emulator.netns(),
        timeout: Duration::from_secs(args.timeout_secs),
    };
    let measured = match system {
        System::Failback => failback_copy(rt, args, exe, &t),
        System::Peer(p) => p.transfer(&t),
    };
    let (up, down, connections, dropped) = emulator.finish(rt)?;
    let measured = measured?;
    let (up_before, down_before) = measured.wire_before;
    Ok(Sample {
        measured,
        emulator_cpu: 0.0,
        up: up - up_before,
        down: down - down_before,
        connections,
        dropped,
    })
}

const DISK_ID: &str = "6000C29d-e40d-4c5a-9e6b-0000000000b1";
const DISK_NAME: &str = "bench-disk";

/// `agent sync --wait` of the source through a fresh cluster whose process server reaches
/// the master target through the emulator.
fn failback_copy(
    rt: &tokio::runtime::Runtime,
    args: &RunArgs,
    exe: &Path,
    t: &Transfer,
) -> Result<Measured> {
    let mut cluster = Cluster::new(exe, t.dir)?;
    cluster.mt_port = t.listen.port();
    cluster.master_target_host = t.listen.ip();
    cluster.master_target_netns = t.netns.clone();
    if t.connect != t.listen {
        cluster.master_target_via = Some(t.connect.port());
    }
    if args.tls {
        cluster.enable_tls()?;
    }
    let windows = [
        "--h2-stream-window".to_string(),
        args.h2_stream_window.to_string(),
        "--h2-connection-window".to_string(),
        args.h2_connection_window.to_string(),
    ];
    cluster.master_target_flags = windows.to_vec();
    cluster.process_server_flags = windows.to_vec();
    cluster.process_server_flags.extend([
        "--connections".to_string(),
        args.connections.to_string(),
        "--forward-window".to_string(),
        args.forward_window.to_string(),
    ]);
    cluster.start().with_context(|| cluster.log_tails())?;
    // A process server is a daemon whose link to the master target is up before any sync
    // starts: setting it up (two RTTs) is not part of the copy.
    cluster
        .wait_link_up(rt, Duration::from_secs(30))
        .with_context(|| cluster.log_tails())?;
    let mut extra = vec!["--wait".to_string()];
    if let Some(base) = t.base {
        // The target disk exists: a full sync of the base, not measured.
        let out = run_with_timeout(
            &mut cluster.agent_sync(base, DISK_ID, DISK_NAME, &["--wait"]),
            t.timeout,
        )?;
        if !out.status.success() {
            bail!(
                "agent sync of the base disk failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                cluster.log_tails()
            );
        }
        let chunk = args.chunk_size.to_string();
        extra.extend(["--mode", "differential", "--chunk-size", &chunk].map(String::from));
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let servers = [
        ("process-server", cluster.process_server_pid()),
        ("master-target", cluster.master_target_pid()),
    ];
    let before = servers
        .iter()
        .map(|(_, pid)| usage::sample(pid.context("server not running")?))
        .collect::<Result<Vec<Usage>>>()?;
    let log = t.dir.join("logs").join("agent.log");
    let mut agent = cluster.agent_sync(t.source, DISK_ID, DISK_NAME, &extra);
    let f = fs::File::create(&log)?;
    agent.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
    let wire_before = t.wire_now();
    let started = Instant::now();
    let mut agent = agent.spawn().context("starting agent sync")?;
    let watch = usage::RssWatch::start(agent.id());
    let (status, agent_usage) = usage::wait_with_usage(&mut agent, t.timeout, watch)
        .with_context(|| cluster.log_tails())?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("agent sync failed ({status}):\n{}", cluster.log_tails());
    }
    let mut roles = vec![("agent".to_string(), agent_usage)];
    for ((role, pid), b) in servers.iter().zip(before) {
        let after = usage::sample(pid.context("server not running")?)?;
        roles.push((role.to_string(), after.since(b)));
    }
    cluster.stop_clean(Duration::from_secs(20))?;
    verify::files_equal(&cluster.flat_path(DISK_NAME), t.source)
        .context("verifying the replica")?;
    // The agent falls back to a full pass when it gets no chunk hashes; say so.
    let agent_log = fs::read_to_string(&log)?;
    let note = (t.base.is_some() && !agent_log.contains("differential sync done")).then(|| {
        let why: Vec<String> = agent_log
            .lines()
            .filter(|l| l.contains("falling back"))
            .map(|l| {
                // Without the time stamp, level and target: the message alone.
                let l = strip_ansi(l);
                let msg = l.split_once(" INFO ").map_or(l.as_str(), |(_, m)| m);
                msg.split_once(": ").map_or(msg, |(_, m)| m).to_string()
            })
            .collect();
        format!(
            "failback: `agent sync --mode differential` ran a full pass instead: {}",
            why.join("; ")
        )
    });
    Ok(Measured {
        seconds,
        roles,
        wire_before,
        note,
    })
}

/// `line` without its terminal colour sequences (ESC [ ... m).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The windows (bytes in flight) that bound a system's throughput over the emulated WAN.
/// Per connection: the proxy's window in proxy mode; in packet mode the kernel's socket
/// buffer maxima (`tcp_wmem` of the sender, `tcp_rmem` of the receiver; a new namespace
/// starts with this one's values).
fn window_terms(args: &RunArgs, system: System, seen_connections: u64) -> Vec<(&'static str, u64)> {
    let conns = match system {
        System::Failback => args.connections,
        System::Peer(_) => seen_connections.max(1),
    };
    let mut terms = match args.wan {
        // A proxy window of 0 means none.
        WanMode::Proxy if args.proxy_window == 0 => Vec::new(),
        WanMode::Proxy => vec![("proxy window", args.proxy_window * conns)],
        WanMode::Packet => [("tcp_wmem", "tcp_wmem max"), ("tcp_rmem", "tcp_rmem max")]
            .into_iter()
            .filter_map(|(key, name)| Some((name, tcp_buffer_max(key)? * conns)))
            .collect(),
    };
    // BBR is not loss-based: Mathis' limit does not hold for it.
    if args.wan == WanMode::Packet
        && args.loss_percent > 0.0
        && congestion_control().as_deref() != Some("bbr")
    {
        terms.push(("Mathis (loss)", mathis_window(args.loss_percent) * conns));
    }
    if system == System::Failback {
        terms.push((
            "h2 window",
            args.connections * args.h2_stream_window.min(args.h2_connection_window),
        ));
        terms.push(("forward window", args.forward_window));
    }
    terms
}

/// Mathis et al.: a Reno/CUBIC flow reaches at most (MSS / RTT) x 1.22 / sqrt(p), i.e. a
/// window of MSS x 1.22 / sqrt(p) bytes per RTT, at MSS = MTU - 40.
fn mathis_window(loss_percent: f64) -> u64 {
    let mss = f64::from(crate::packet::MTU - 40);
    (mss * 1.22 / (loss_percent / 100.0).sqrt()) as u64
}

/// `net.ipv4.tcp_congestion_control` of this namespace (the senders').
fn congestion_control() -> Option<String> {
    fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .ok()
        .map(|s| s.trim().to_string())
}

/// The third (maximum) value of `net.ipv4.KEY`.
fn tcp_buffer_max(key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/sys/net/ipv4/{key}"))
        .ok()?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// Median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn summarize(
    w: Workload,
    system: System,
    rtt_ms: u64,
    rate_mbit: u64,
    size: u64,
    args: &RunArgs,
    samples: &[Sample],
) -> Row {
    let med = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    let seconds = med(&|s| s.measured.seconds);
    let up = med(&|s| s.up as f64);
    let connections = med(&|s| s.connections as f64) as u64;
    let bound = bound(rate_mbit, rtt_ms, &window_terms(args, system, connections));
    let gib = size as f64 / (1u64 << 30) as f64;
    let roles = samples[0]
        .measured
        .roles
        .iter()
        .enumerate()
        .map(|(i, (role, _))| RoleUsage {
            role: role.clone(),
            cpu_secs_per_gib: med(&|s| s.measured.roles[i].1.cpu_secs) / gib,
            peak_rss_mib: med(&|s| s.measured.roles[i].1.peak_rss_bytes as f64) / (1 << 20) as f64,
        })
        .collect();
    let wire_mbps = up / 1e6 / seconds;
    Row {
        workload: w.name().into(),
        system: system.name().into(),
        rtt_ms,
        rate_mbit,
        disk_bytes: size,
        repeats: samples.len(),
        runs_seconds: samples.iter().map(|s| s.measured.seconds).collect(),
        seconds,
        mb_per_sec: size as f64 / 1e6 / seconds,
        blocks_per_sec: (size / 4096) as f64 / seconds,
        wire_bytes_up: up as u64,
        wire_bytes_down: med(&|s| s.down as f64) as u64,
        link_utilisation: wire_mbps / (rate_mbit as f64 / 8.0),
        connections,
        dropped_packets: med(&|s| s.dropped as f64) as u64,
        of_bound: wire_mbps / bound.mb_per_sec,
        bound,
        roles,
        emulator_cpu_secs_per_gib: med(&|s| s.emulator_cpu) / gib,
        failback_over_this: None,
        failback_wire_over_this: None,
    }
}

const HEADER: &str = "workload   system      RTT  Mbit/s     MB/s   blocks/s  wire MB  util  bound MB/s (by)              of bound  fb/peer  fb wire/peer  CPU s/GiB, peak RSS MiB per role";

fn table_line(r: &Row) -> String {
    let roles: Vec<String> = r
        .roles
        .iter()
        .map(|u| {
            format!(
                "{} {:.1}s {:.0}M",
                u.role, u.cpu_secs_per_gib, u.peak_rss_mib
            )
        })
        .chain([format!("(emulator {:.1}s)", r.emulator_cpu_secs_per_gib)])
        .collect();
    format!(
        "{:<10} {:<10} {:>4} {:>7} {:>8.1} {:>10.0} {:>8.1} {:>4.0}%  {:>8} {:<19} {:>8} {:>8} {:>13}  {}",
        r.workload,
        r.system,
        r.rtt_ms,
        r.rate_mbit,
        r.mb_per_sec,
        r.blocks_per_sec,
        r.wire_bytes_up as f64 / 1e6,
        r.link_utilisation * 100.0,
        format!("{:.1}", r.bound.mb_per_sec),
        format!("({})", r.bound.limited_by),
        format!("{:.0}%", r.of_bound * 100.0),
        r.failback_over_this
            .map_or("-".into(), |f| format!("{f:.2}")),
        r.failback_wire_over_this
            .map_or("-".into(), |f| format!("{f:.3}")),
        roles.join(", ")
    )
}

fn print_table(report: &Report) {
    println!("{}", report.host.heading(report.mode, report.build));
    println!("{HEADER}");
    for r in &report.rows {
        println!("{}", table_line(r));
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    println!(
        "targets at {TARGET_RATE_MBIT} Mbit/s, {TARGET_RTT_MS} ms (reported, not asserted; RPO is not measured by bench run):"
    );
    for t in &report.targets {
        println!("{}", t.line());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_is_the_tightest_term() {
        let w = [("h2 window", 128 << 20), ("proxy window", 16 << 20)];
        // No delay: only the link bounds.
        assert_eq!(bound(1000, 0, &w).mb_per_sec, 125.0);
        assert_eq!(bound(1000, 0, &w).limited_by, "link rate");
        // 16 MiB / 100 ms = 167.8 MB/s < 1250 MB/s at 10 Gbit/s.
        let b = bound(10_000, 100, &w);
        assert_eq!(b.limited_by, "proxy window / RTT");
        assert!((b.mb_per_sec - 167.77216).abs() < 1e-6);
        // At 100 Mbit/s the link is tighter.
        assert_eq!(bound(100, 100, &w).limited_by, "link rate");
    }

    fn row(workload: &str, system: &str, rtt_ms: u64, util: f64, fb_over: Option<f64>) -> Row {
        Row {
            workload: workload.into(),
            system: system.into(),
            rtt_ms,
            rate_mbit: 1000,
            disk_bytes: 0,
            repeats: 1,
            runs_seconds: vec![1.0],
            seconds: 1.0,
            mb_per_sec: 1.0,
            blocks_per_sec: 1.0,
            wire_bytes_up: 0,
            wire_bytes_down: 0,
            link_utilisation: util,
            connections: 1,
            dropped_packets: 0,
            bound: bound(1000, rtt_ms, &[]),
            of_bound: 0.0,
            roles: Vec::new(),
            emulator_cpu_secs_per_gib: 0.0,
            failback_over_this: fb_over,
            failback_wire_over_this: None,
        }
    }

    #[test]
    fn targets_read_the_rows_at_1_gbit_and_100_ms_only() {
        let rows = [
            row("filesystem", "failback", 100, 0.5, None),
            row("filesystem", "nbdcopy", 100, 0.2, Some(3.0)),
            row("filesystem", "lz4|socat", 100, 0.2, Some(1.2)),
            // Another RTT: ignored.
            row("random", "failback", 20, 0.99, None),
        ];
        let t = targets(&rows, Scenario::Full);
        assert_eq!(t.len(), 3);
        assert_eq!((t[0].measured, t[0].met), (Some(3.0), Some(true)));
        assert_eq!((t[1].measured, t[1].met), (Some(1.2), Some(false)));
        assert_eq!((t[2].measured, t[2].met), (None, None));
        let t = targets(
            &[row("random", "failback", 100, 0.96, None)],
            Scenario::Full,
        );
        assert_eq!(t[2].met, Some(true));
    }

    #[test]
    fn loss_adds_the_mathis_term_in_packet_mode_only() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        // 1360 B x 1.22 / sqrt(1e-4) = 165,920 B per connection: 6.6 MB/s for 4 at 100 ms.
        assert_eq!(mathis_window(0.01), 165_920);
        let args = Cli::parse_from(["bench", "--wan", "packet", "--loss-percent", "0.01"]).run;
        let terms = window_terms(&args, System::Failback, 4);
        let mathis = terms.iter().find(|(n, _)| *n == "Mathis (loss)");
        if congestion_control().as_deref() == Some("bbr") {
            assert!(mathis.is_none(), "BBR is not bound by Mathis: {terms:?}");
        } else {
            assert_eq!(mathis.unwrap().1, 4 * 165_920);
            let b = bound(1000, 100, &terms);
            assert_eq!(b.limited_by, "Mathis (loss) / RTT");
            assert!((b.mb_per_sec - 6.6368).abs() < 1e-3, "{b:?}");
        }
        // The proxy has no packets to lose.
        let proxy = Cli::parse_from(["bench", "--loss-percent", "0.01"]).run;
        assert!(proxy.plan().is_err());
        assert!(
            !window_terms(&proxy, System::Failback, 4)
                .iter()
                .any(|(n, _)| *n == "Mathis (loss)")
        );
    }

    #[test]
    fn the_differential_target_is_an_upper_bound_on_wire_bytes_against_rsync() {
        let mut rsync = row("mixed", "rsync", 100, 0.1, None);
        rsync.failback_wire_over_this = Some(0.3);
        let t = targets(std::slice::from_ref(&rsync), Scenario::Differential);
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].measured, t[0].met), (Some(0.3), Some(true)));
        assert!(
            t[0].line().contains("want <= 0.60): met"),
            "{}",
            t[0].line()
        );
        rsync.failback_wire_over_this = Some(2.6);
        let t = targets(&[rsync], Scenario::Differential);
        assert_eq!(t[0].met, Some(false));
        let t = targets(
            &[row("mixed", "failback", 100, 0.1, None)],
            Scenario::Differential,
        );
        assert_eq!((t[0].measured, t[0].met), (None, None));
    }

    #[test]
    fn strips_colour_sequences() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x: falling back"),
            "2026  INFO x: falling back"
        );
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn quick_plan_and_explicit_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let quick = Cli::parse_from(["bench", "--quick"]).run.plan().unwrap();
        assert_eq!(
            (quick.rtt_ms, quick.rate_mbit, quick.repeat),
            (vec![20], vec![1000], 1)
        );
        let full = Cli::parse_from(["bench", "--rtt", "0,50", "--size", "64M"])
            .run
            .plan()
            .unwrap();
        assert_eq!(full.rtt_ms, vec![0, 50]);
        assert_eq!(full.rate_mbit, vec![100, 1000, 10_000]);
        assert_eq!((full.size, full.repeat), (64 << 20, 3));
        assert!(
            Cli::parse_from(["bench", "--size", "1000"])
                .run
                .plan()
                .is_err()
        );
    }
}
