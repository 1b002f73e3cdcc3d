//! `bench rpo` (and `bench run --scenario continuous`): continuous replication under churn,
//! and the RPO it keeps, at each point of a grid of WAN round-trip times x link rates.
//!
//! One run per grid point, each from scratch: a master target and a process server on
//! 127.0.0.1 (`Cluster`), with the WAN emulator (proxy mode, as `bench run`) between them
//! unless the grid is empty, and `agent replicate --nbd-listen` serving a freshly generated
//! source disk. Once its initial pass is applied, a churn
//! generator (`crate::churn`) writes random data through the NBD export at `--churn-mb`
//! MB/s for `--seconds`, with an NBD flush every `--flush-ms`. Meanwhile the process
//! server's status is sampled every `--sample-ms`: the disk's RPO as the process server
//! reports it (now minus the source time of the newest batch the master target applied),
//! its cached and applied seqs and its backlog. After the churn, the run waits for the
//! backlog to drain and compares the target disk with the source byte for byte.
//!
//! Reported per grid point: the samples, the achieved churn rate, the RPO's median, 95th
//! percentile and maximum over the churn, the wire bytes the emulator relayed, and an SVG
//! plot of RPO over time; for the run, the target (RPO <= 5 s under 54 MB/s of
//! churn at 1 Gbit/s and 100 ms, checked against the maximum; reported, never asserted).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use protocol::pb::DiskStatus;
use serde::Serialize;

use crate::churn::{self, NbdClient, Pace, Written};
use crate::cluster::{Cluster, free_port};
use crate::run::{Cmp, Host, Proxy, Start, Target, build_kind, keep_on_err, median, start};
use crate::{plot, usage, verify, workload};

/// Options of `bench rpo`.
#[derive(clap::Args, Debug, Clone)]
pub struct RpoArgs {
    /// Size of the generated source disk (a multiple of --write-size).
    #[arg(long, default_value = "256M", value_parser = protocol::cli::parse_size)]
    pub size: u64,
    /// Churn rate, MB/s (10^6 bytes) written through NBD.
    #[arg(long, default_value_t = 54.0)]
    pub churn_mb: f64,
    /// Where the writes go: uniform, hotspot (Zipf-like) or log (sequential).
    #[arg(long, value_enum, default_value = "uniform")]
    pub pattern: churn::Pattern,
    /// Bytes per NBD write (random data at an aligned offset the pattern picks).
    #[arg(long, default_value = "64K", value_parser = protocol::cli::parse_size)]
    pub write_size: u64,
    /// How long to churn, in seconds.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// An NBD flush (a crash-consistent point) every this many ms of churn.
    #[arg(long, default_value_t = 1000)]
    pub flush_ms: u64,
    /// Put a WAN emulator (proxy mode, as `bench run`) between the process server and the
    /// master target, at each of these round-trip times in ms (comma-separated; every RTT x
    /// rate is one run) [default: none, direct on 127.0.0.1].
    #[arg(long, value_delimiter = ',')]
    pub rtt_ms: Vec<u64>,
    /// Link rates of the emulator, Mbit/s each direction, comma-separated (with --rtt-ms).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000",
        requires = "rtt_ms"
    )]
    pub rate_mbit: Vec<u64>,
    /// Emulator: router queue beyond the delay line, in ms of the link rate (with --rtt-ms).
    #[arg(long, default_value_t = 50)]
    pub buffer_ms: u64,
    /// Emulator: bytes in flight per connection and direction (with --rtt-ms).
    #[arg(long, default_value = "4M", value_parser = protocol::cli::parse_size)]
    pub proxy_window: u64,
    /// Status sampling interval, in ms.
    #[arg(long, default_value_t = 500)]
    pub sample_ms: u64,
    /// Directory for the JSON report and the plot.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Working directory (source, datastore, cache, logs); kept afterwards. Default: a
    /// temporary directory, removed at the end (kept on failure).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seed of the generated disk and of the churn.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Give up on the initial pass, or on the drain after the churn, after this many
    /// seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

/// One status sample.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the churn started.
    pub t: f64,
    /// RPO the process server reports; None while unknown.
    pub rpo_seconds: Option<f64>,
    pub cached_seq: u64,
    pub applied_seq: u64,
    pub backlog_bytes: u64,
    /// Bytes the churn had written (and NBD acknowledged) by then.
    pub churned_bytes: u64,
}

/// The JSON report: the run's settings, one row per grid point, the target.
#[derive(Debug, Clone, Serialize)]
pub struct RpoReport {
    pub started_unix: u64,
    pub build: &'static str,
    pub host: Host,
    /// "proxy, no TCP dynamics" with an emulator, "direct (loopback)" without.
    pub mode: &'static str,
    pub disk_bytes: u64,
    pub churn_mb_per_sec_wanted: f64,
    pub pattern: churn::Pattern,
    pub write_bytes: u64,
    pub flush_ms: u64,
    pub rows: Vec<RpoRow>,
    /// Checked on the row at 1 Gbit/s and 100 ms, or on the only row of a one-row run.
    pub target: Target,
}

/// One grid point: one run from scratch.
#[derive(Debug, Clone, Serialize)]
pub struct RpoRow {
    /// The emulated WAN between process server and master target; None: direct.
    pub rtt_ms: Option<u64>,
    pub rate_mbit: Option<u64>,
    pub churn_mb_per_sec: f64,
    pub churn_seconds: f64,
    pub nbd_flushes: u64,
    /// Seconds from the end of the churn until the master target had applied everything.
    pub drain_seconds: f64,
    pub rpo_median: f64,
    pub rpo_p95: f64,
    pub rpo_max: f64,
    pub process_server_peak_rss_bytes: u64,
    /// Bytes the emulator relayed towards the master target (initial pass, churn and
    /// drain); None without an emulator.
    pub wire_bytes_up: Option<u64>,
    pub samples: Vec<Sample>,
    pub plot: PathBuf,
}

impl RpoRow {
    fn point(&self) -> String {
        match (self.rtt_ms, self.rate_mbit) {
            (Some(rtt), Some(rate)) => format!("{rtt} ms, {rate} Mbit/s"),
            _ => "direct".to_string(),
        }
    }
}

const DISK_ID: &str = "6000C29d-e40d-4c5a-9e6b-0000000000c1";
const DISK_NAME: &str = "rpo-disk";

/// The agent process; killed on drop unless stopped.
struct Agent(Option<Child>);

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run(args: &RpoArgs, exe: &Path) -> Result<RpoReport> {
    if args.write_size == 0 || !args.write_size.is_multiple_of(512) {
        bail!("--write-size must be a nonzero multiple of 512");
    }
    if args.size == 0
        || !args.size.is_multiple_of(args.write_size)
        || !args.size.is_multiple_of(4096)
    {
        bail!("--size must be a nonzero multiple of --write-size and of 4 KiB");
    }
    if args.churn_mb <= 0.0 || args.seconds == 0 || args.sample_ms == 0 {
        bail!("--churn-mb, --seconds and --sample-ms must be positive");
    }
    if args.rate_mbit.contains(&0) {
        bail!("--rate-mbit must be positive (Mbit/s)");
    }
    let mut start = start(args.dir.as_deref(), "failback-rpo-", &args.out)?;
    let outcome = measure_grid(args, exe, &start);
    keep_on_err(&mut start.tmp, outcome)
}

/// The grid points: every RTT x rate, or one direct run.
fn points(args: &RpoArgs) -> Vec<Option<(u64, u64)>> {
    if args.rtt_ms.is_empty() {
        return vec![None];
    }
    args.rate_mbit
        .iter()
        .flat_map(|&rate| args.rtt_ms.iter().map(move |&rtt| Some((rtt, rate))))
        .collect()
}

fn measure_grid(args: &RpoArgs, exe: &Path, start: &Start) -> Result<RpoReport> {
    let (dir, started_unix, host) = (&start.dir, start.started_unix, start.host.clone());
    let points = points(args);
    println!(
        "bench rpo: {} MiB disk (the mixed workload), {:?} churn {} MB/s in {} KiB writes for {} s, {} run(s), in {}",
        args.size >> 20,
        args.pattern,
        args.churn_mb,
        args.write_size >> 10,
        args.seconds,
        points.len(),
        dir.display()
    );
    let mut rows = Vec::new();
    for (i, point) in points.iter().enumerate() {
        let run_dir = dir.join(match point {
            Some((rtt, rate)) => format!("rtt{rtt}-{rate}mbit"),
            None => "direct".to_string(),
        });
        let name = match point {
            Some((rtt, rate)) => format!("rpo-{started_unix}-{rtt}ms-{rate}mbit"),
            None => format!("rpo-{started_unix}"),
        };
        let row = measure(args, exe, &run_dir, *point, &args.out.join(name))
            .with_context(|| format!("run {} of {}", i + 1, points.len()))?;
        rows.push(row);
        // Each run leaves a disk, a replica, a cache and a retention volume behind.
        if args.dir.is_none() {
            let _ = fs::remove_dir_all(&run_dir);
        }
    }
    let at_target = rows
        .iter()
        .find(|r| r.rtt_ms == Some(100) && r.rate_mbit == Some(1000))
        .or(if rows.len() == 1 { rows.first() } else { None });
    let target = Target::check(
        "RPO under churn, max over the samples (s)",
        at_target.filter(|r| !r.rpo_max.is_nan()).map(|r| r.rpo_max),
        Cmp::AtMost,
        5.0,
    );
    let at = at_target.map_or("no row at 1 Gbit/s, 100 ms".to_string(), RpoRow::point);
    let report = RpoReport {
        started_unix,
        build: build_kind(),
        host,
        mode: if args.rtt_ms.is_empty() {
            "direct (loopback)"
        } else {
            "proxy, no TCP dynamics"
        },
        disk_bytes: args.size,
        churn_mb_per_sec_wanted: args.churn_mb,
        pattern: args.pattern,
        write_bytes: args.write_size,
        flush_ms: args.flush_ms,
        target,
        rows,
    };
    let json = args.out.join(format!("rpo-{started_unix}.json"));
    fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    println!("\n{}", report.host.heading(report.mode, report.build));
    println!("{ROW_HEADER}");
    for r in &report.rows {
        println!("{}", row_line(r));
    }
    println!(
        "target (reported, not asserted), at {at}:\n{}",
        report.target.line()
    );
    println!("  report  {}", json.display());
    for r in &report.rows {
        println!("  plot    {}", r.plot.display());
    }
    Ok(report)
}

const ROW_HEADER: &str = "WAN                   churn MB/s  RPO median     p95     max  drain s  wire MB  PS peak RSS MiB";

fn row_line(r: &RpoRow) -> String {
    format!(
        "{:<20} {:>11.1} {:>11.2} {:>7.2} {:>7.2} {:>8.1} {:>8} {:>16.0}",
        r.point(),
        r.churn_mb_per_sec,
        r.rpo_median,
        r.rpo_p95,
        r.rpo_max,
        r.drain_seconds,
        r.wire_bytes_up
            .map_or("-".to_string(), |b| format!("{:.1}", b as f64 / 1e6)),
        r.process_server_peak_rss_bytes as f64 / (1 << 20) as f64
    )
}

/// One run at one grid point (`wan`: RTT ms and Mbit/s; None: direct), in `dir`; the
/// plot goes to `stem`.svg.
fn measure(
    args: &RpoArgs,
    exe: &Path,
    dir: &Path,
    wan: Option<(u64, u64)>,
    stem: &Path,
) -> Result<RpoRow> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let source = dir.join("source.raw");
    let mix = workload::generate_disk(&source, args.size, args.seed)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut cluster = Cluster::new(exe, &dir.join("cluster"))?;
    let proxy = match wan {
        Some((rtt, rate)) => {
            let proxy = Proxy::start(
                &rt,
                cluster.mt_port,
                rtt,
                rate,
                args.buffer_ms,
                args.proxy_window,
            )?;
            cluster.master_target_via = Some(proxy.port);
            Some(proxy)
        }
        None => None,
    };
    println!(
        "  {}: {} disk; initial pass",
        match wan {
            Some((rtt, rate)) => format!("{rtt} ms, {rate} Mbit/s (proxy, no TCP dynamics)"),
            None => "direct on 127.0.0.1".to_string(),
        },
        mix.describe()
    );
    cluster.start().with_context(|| cluster.log_tails())?;
    let nbd = format!("127.0.0.1:{}", free_port()?);
    let log = cluster.dir.join("logs").join("agent-replicate.log");
    let f = fs::File::create(&log)?;
    let child = cluster
        .role("agent")
        .args(["replicate", "--process-server", &cluster.ps_url(), "--disk"])
        .arg(&source)
        .args([
            "--disk-id",
            DISK_ID,
            "--name",
            DISK_NAME,
            "--nbd-listen",
            &nbd,
        ])
        .arg("--passphrase-file")
        .arg(&cluster.passphrase_file)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .context("starting agent replicate")?;
    let mut agent = Agent(Some(child));

    let status = || -> Result<Option<DiskStatus>> {
        let reply = cluster.ps_status(&rt)?;
        Ok(reply.disks.into_iter().find(|d| d.disk_id == DISK_ID))
    };
    let timeout = Duration::from_secs(args.timeout_secs);
    let failed = |what: &str| {
        format!(
            "{what}; agent log:\n{}\n{}",
            crate::cluster::tail(&log),
            cluster.log_tails()
        )
    };
    wait_drained(&status, timeout).with_context(|| failed("the initial pass"))?;
    println!("  initial pass applied; churning");

    let mut client = NbdClient::connect(&nbd).with_context(|| failed("the NBD export"))?;
    let pace = Pace {
        bytes_per_sec: args.churn_mb * 1e6,
        pattern: args.pattern,
        write_size: args.write_size as usize,
        flush_every: Duration::from_millis(args.flush_ms),
        seed: args.seed + 1,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(Written::default());
    let churner = {
        let (stop, written) = (stop.clone(), written.clone());
        std::thread::spawn(move || churn::run(&mut client, &pace, &stop, &written))
    };
    let start = Instant::now();
    let mut samples = Vec::new();
    let every = Duration::from_millis(args.sample_ms);
    let mut next = start;
    while start.elapsed() < Duration::from_secs(args.seconds) && !churner.is_finished() {
        next += every;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let d = status()?.context("the process server lost the disk")?;
        samples.push(Sample {
            t: start.elapsed().as_secs_f64(),
            rpo_seconds: (d.rpo_seconds >= 0.0).then_some(d.rpo_seconds),
            cached_seq: d.cached_seq,
            applied_seq: d.applied_seq,
            backlog_bytes: d.backlog_bytes,
            churned_bytes: written.bytes.load(Ordering::Relaxed),
        });
    }
    stop.store(true, Ordering::Relaxed);
    let churn_seconds = churner
        .join()
        .map_err(|_| anyhow::anyhow!("the churn thread panicked"))?
        .with_context(|| failed("the churn"))?;
    let drain_started = Instant::now();
    wait_drained(&status, timeout).with_context(|| failed("draining after the churn"))?;
    // The agent cuts its last batch on its own schedule: the target may trail the drain
    // seen above by that batch, so the comparison is retried until the deadline.
    let deadline = Instant::now() + timeout;
    loop {
        match verify::files_equal(&cluster.flat_path(DISK_NAME), &source) {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(failed("verifying the target after the churn")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    let ps_peak =
        usage::sample(cluster.process_server_pid().context("no process server")?)?.peak_rss_bytes;
    if let Some(mut c) = agent.0.take() {
        let watch = usage::RssWatch::start(c.id());
        let (status, _) = usage::terminate_with_usage(&mut c, Duration::from_secs(20), watch)?;
        if !status.success() {
            bail!("agent replicate did not stop cleanly on SIGTERM ({status})");
        }
    }
    cluster.stop_clean(Duration::from_secs(20))?;
    let wire_bytes_up = match proxy {
        Some(p) => Some(p.finish(&rt)?.up.load(Ordering::Relaxed)),
        None => None,
    };

    let mut rpos: Vec<f64> = samples.iter().filter_map(|s| s.rpo_seconds).collect();
    rpos.sort_by(f64::total_cmp);
    let p95 = rpos
        .get(((rpos.len() as f64 * 0.95).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(f64::NAN);
    let max = rpos.last().copied().unwrap_or(f64::NAN);
    let churned = written.bytes.load(Ordering::Relaxed);
    let svg = stem.with_extension("svg");
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| s.rpo_seconds.map(|r| (s.t, r)))
        .collect();
    let row = RpoRow {
        rtt_ms: wan.map(|w| w.0),
        rate_mbit: wan.map(|w| w.1),
        churn_mb_per_sec: churned as f64 / 1e6 / churn_seconds,
        churn_seconds,
        nbd_flushes: written.flushes.load(Ordering::Relaxed),
        drain_seconds,
        rpo_median: median(rpos.clone()),
        rpo_p95: p95,
        rpo_max: max,
        process_server_peak_rss_bytes: ps_peak,
        wire_bytes_up,
        samples,
        plot: svg.clone(),
    };
    plot::rpo_over_time(
        &svg,
        &format!(
            "RPO under {:.0} MB/s of {:?} churn ({} KiB writes), {}",
            args.churn_mb,
            args.pattern,
            args.write_size >> 10,
            row.point()
        ),
        &points,
        5.0,
    )?;
    println!(
        "  churn {:.1} MB/s for {:.1} s ({} flushes); RPO median {:.2} s, p95 {:.2} s, max {:.2} s over {} samples; drained and verified {:.1} s after",
        row.churn_mb_per_sec,
        row.churn_seconds,
        row.nbd_flushes,
        row.rpo_median,
        row.rpo_p95,
        row.rpo_max,
        rpos.len(),
        row.drain_seconds
    );
    Ok(row)
}

/// Waits until the master target has applied everything the process server holds, seen in
/// two samples 500 ms apart with the same seq.
fn wait_drained(status: &dyn Fn() -> Result<Option<DiskStatus>>, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let now = status()?
            .filter(|d| d.applied_seq > 0 && d.applied_seq == d.cached_seq)
            .map(|d| d.applied_seq);
        if now.is_some() && now == last {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the master target did not catch up within {timeout:?}");
        }
        last = now;
        std::thread::sleep(Duration::from_millis(500));
    }
}
