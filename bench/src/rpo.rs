//! `bench rpo`: continuous replication under churn, and the RPO it keeps.
//!
//! A master target and a process server on 127.0.0.1 (`Cluster`), and `agent replicate
//! --nbd-listen` serving a generated source disk. Once its initial pass is applied, a churn
//! generator (`crate::churn`) writes random data through the NBD export at `--churn-mb`
//! MB/s for `--seconds`, with an NBD flush every `--flush-ms`. Meanwhile the process
//! server's status is sampled every `--sample-ms`: the disk's RPO as the process server
//! reports it (now minus the source time of the newest batch the master target applied),
//! its cached and applied seqs and its backlog. After the churn, the run waits for the
//! backlog to drain and compares the target disk with the source byte for byte.
//!
//! Reported: the samples, the achieved churn rate, the RPO's median, 95th percentile and
//! maximum over the churn, the target (RPO <= 5 s under 54 MB/s of churn, checked
//! against the maximum; reported, never asserted) and an SVG plot of RPO over time.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use protocol::auth::{ClientAuth, Passphrase};
use protocol::pb::DiskStatus;
use protocol::transport::TlsFiles;
use serde::Serialize;

use crate::churn::{self, NbdClient, Pace, Written};
use crate::cluster::{Cluster, free_port};
use crate::run::{Cmp, Host, Proxy, Target, build_kind, median, work_dir};
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
    /// Put a WAN emulator (proxy mode, as `bench run`) with this round-trip time between
    /// the process server and the master target [default: none, direct on 127.0.0.1].
    #[arg(long)]
    pub rtt_ms: Option<u64>,
    /// Link rate of the emulator, Mbit/s each direction (with --rtt-ms).
    #[arg(long, default_value_t = 1000, requires = "rtt_ms")]
    pub rate_mbit: u64,
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

#[derive(Debug, Clone, Serialize)]
pub struct RpoReport {
    pub started_unix: u64,
    pub build: &'static str,
    pub host: Host,
    pub disk_bytes: u64,
    /// The emulated WAN between process server and master target, if any.
    pub rtt_ms: Option<u64>,
    pub rate_mbit: Option<u64>,
    pub churn_mb_per_sec_wanted: f64,
    pub pattern: churn::Pattern,
    pub churn_mb_per_sec: f64,
    pub write_bytes: u64,
    pub flush_ms: u64,
    pub churn_seconds: f64,
    pub nbd_flushes: u64,
    /// Seconds from the end of the churn until the master target had applied everything.
    pub drain_seconds: f64,
    pub rpo_median: f64,
    pub rpo_p95: f64,
    pub rpo_max: f64,
    pub process_server_peak_rss_bytes: u64,
    pub samples: Vec<Sample>,
    pub target: Target,
    pub plot: PathBuf,
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
    if args.size == 0 || !args.size.is_multiple_of(args.write_size.max(4096)) {
        bail!("--size must be a nonzero multiple of --write-size and of 4 KiB");
    }
    if args.churn_mb <= 0.0 || args.seconds == 0 || args.sample_ms == 0 {
        bail!("--churn-mb, --seconds and --sample-ms must be positive");
    }
    let (dir, mut tmp) = work_dir(args.dir.as_deref(), "failback-rpo-")?;
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let outcome = measure(args, exe, &dir);
    if outcome.is_err()
        && let Some(t) = tmp.take()
    {
        // Keep the logs the error points at.
        let _ = t.keep();
    }
    outcome
}

fn measure(args: &RpoArgs, exe: &Path, dir: &Path) -> Result<RpoReport> {
    let started_unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let host = Host::here();
    let source = dir.join("source.raw");
    let mix = workload::generate_disk(&source, args.size, args.seed)?;
    println!(
        "bench rpo: {} MiB disk ({}), {:?} churn {} MB/s in {} KiB writes for {} s, in {}",
        args.size >> 20,
        mix.describe(),
        args.pattern,
        args.churn_mb,
        args.write_size >> 10,
        args.seconds,
        dir.display()
    );
    let rt = tokio::runtime::Runtime::new()?;
    let mut cluster = Cluster::new(exe, &dir.join("cluster"))?;
    let wan = match args.rtt_ms {
        Some(rtt) => {
            let proxy = Proxy::start(&rt, cluster.mt_port, rtt, args.rate_mbit, 50, 4 << 20)?;
            cluster.master_target_via = Some(proxy.port);
            println!(
                "  WAN emulator between process server and master target: {rtt} ms RTT, {} Mbit/s (proxy, no TCP dynamics)",
                args.rate_mbit
            );
            Some(proxy)
        }
        None => None,
    };
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

    let auth = ClientAuth::new(
        Passphrase::load(Some(&cluster.passphrase_file))?,
        "bench-rpo",
    );
    let status = || -> Result<Option<DiskStatus>> {
        let reply = rt
            .block_on(process_server::status::fetch(
                &cluster.ps_url(),
                &TlsFiles::default(),
                &auth,
            ))
            .context("process server status")?;
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
    let codes = cluster.stop(Duration::from_secs(20));
    if codes.iter().any(|c| *c != Some(0)) {
        bail!("a server did not stop cleanly: {codes:?}");
    }
    if let Some(proxy) = wan {
        proxy.finish(&rt)?;
    }

    let mut rpos: Vec<f64> = samples.iter().filter_map(|s| s.rpo_seconds).collect();
    rpos.sort_by(f64::total_cmp);
    let p95 = rpos
        .get(((rpos.len() as f64 * 0.95).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(f64::NAN);
    let max = rpos.last().copied().unwrap_or(f64::NAN);
    let churned = written.bytes.load(Ordering::Relaxed);
    let stem = args.out.join(format!("rpo-{started_unix}"));
    let svg = stem.with_extension("svg");
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| s.rpo_seconds.map(|r| (s.t, r)))
        .collect();
    plot::rpo_over_time(
        &svg,
        &format!(
            "RPO under {:.0} MB/s of {:?} churn ({} KiB writes), process server status",
            args.churn_mb,
            args.pattern,
            args.write_size >> 10
        ),
        &points,
        5.0,
    )?;
    let report = RpoReport {
        started_unix,
        build: build_kind(),
        host,
        disk_bytes: args.size,
        rtt_ms: args.rtt_ms,
        rate_mbit: args.rtt_ms.map(|_| args.rate_mbit),
        churn_mb_per_sec_wanted: args.churn_mb,
        pattern: args.pattern,
        churn_mb_per_sec: churned as f64 / 1e6 / churn_seconds,
        write_bytes: args.write_size,
        flush_ms: args.flush_ms,
        churn_seconds,
        nbd_flushes: written.flushes.load(Ordering::Relaxed),
        drain_seconds,
        rpo_median: median(rpos.clone()),
        rpo_p95: p95,
        rpo_max: max,
        process_server_peak_rss_bytes: ps_peak,
        samples,
        target: Target::check(
            "RPO under churn, max over the samples (s)",
            (!rpos.is_empty()).then_some(max),
            Cmp::AtMost,
            5.0,
        ),
        plot: svg.clone(),
    };
    let json = stem.with_extension("json");
    fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    println!(
        "  churn {:.1} MB/s for {:.1} s ({} flushes); RPO median {:.2} s, p95 {:.2} s, max {:.2} s over {} samples; drained and verified {:.1} s after",
        report.churn_mb_per_sec,
        report.churn_seconds,
        report.nbd_flushes,
        report.rpo_median,
        report.rpo_p95,
        report.rpo_max,
        rpos.len(),
        report.drain_seconds
    );
    println!("target (reported, not asserted):\n{}", report.target.line());
    println!("  report  {}\n  plot    {}", json.display(), svg.display());
    Ok(report)
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
