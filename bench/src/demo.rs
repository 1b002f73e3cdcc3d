//! `bench demo`: the whole chain on one machine, in one command.
//!
//! Starts a master target and a process server on 127.0.0.1 with a generated passphrase and
//! throwaway TLS certificates,
//! generates a source disk (holes, zeros, compressible, repeated and random regions), runs
//! `agent sync --wait --marker demo` through them, reports MB/s and 4 KiB blocks/s, and
//! verifies the resulting VMDK against the source byte for byte and with qemu-img.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cluster::{Cluster, run_with_timeout};
use crate::{verify, workload};

/// Options of `bench demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Size of the generated source disk (K/M/G suffixes).
    #[arg(long, default_value = "256M", value_parser = protocol::cli::parse_size)]
    pub size: u64,
    /// Directory for the demo (source disk, datastore, cache, retention, logs); kept
    /// afterwards. Default: a new directory under the system temp dir.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seed of the generated disk.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run without TLS (by default both hops use TLS with throwaway certificates).
    #[arg(long)]
    pub no_tls: bool,
    /// Give up if the sync takes longer than this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

/// What a demo run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    pub disk_bytes: u64,
    pub seconds: f64,
    pub mb_per_sec: f64,
    pub blocks_per_sec: f64,
    pub vmdk: PathBuf,
}

pub fn run(args: &DemoArgs, exe: &Path) -> Result<DemoReport> {
    if args.size == 0 || !args.size.is_multiple_of(4096) {
        bail!("--size must be a nonzero multiple of 4096 bytes");
    }
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tempfile::Builder::new()
            .prefix("failback-demo-")
            .tempdir()?
            .keep(),
    };
    let mut cluster = Cluster::new(exe, &dir)?;
    if !args.no_tls {
        cluster
            .enable_tls()
            .context("generating throwaway TLS certificates")?;
    }
    let source = dir.join("source.raw");
    println!("failback demo in {}", dir.display());
    let mix = workload::generate_disk(&source, args.size, args.seed)
        .context("generating the source disk")?;
    println!(
        "  source      {} ({} MiB: {})",
        source.display(),
        args.size >> 20,
        mix.describe()
    );
    cluster.start().with_context(|| cluster.log_tails())?;
    println!(
        "  roles       master target {} <- process server {} <- agent ({}; passphrase proven on both hops)",
        cluster.mt_url(),
        cluster.ps_url(),
        if args.no_tls {
            "no TLS"
        } else {
            "TLS with a throwaway CA"
        }
    );

    let name = "demo-disk";
    let started = Instant::now();
    let out = run_with_timeout(
        &mut cluster.agent_sync(
            &source,
            "6000C29d-e40d-4c5a-9e6b-000000000001",
            name,
            &["--wait", "--marker", "demo"],
        ),
        Duration::from_secs(args.timeout_secs),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "agent sync failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            cluster.log_tails()
        );
    }
    let report = DemoReport {
        disk_bytes: args.size,
        seconds,
        mb_per_sec: args.size as f64 / 1e6 / seconds,
        blocks_per_sec: (args.size / 4096) as f64 / seconds,
        vmdk: cluster.vmdk_path(name),
    };
    println!(
        "  replicated  {} MiB in {:.2} s: {:.1} MB/s, {:.0} blocks/s (4 KiB), applied and durable on the target",
        args.size >> 20,
        report.seconds,
        report.mb_per_sec,
        report.blocks_per_sec
    );
    println!(
        "  target      {} (data in {})",
        report.vmdk.display(),
        cluster.flat_path(name).display()
    );

    verify::files_equal(&cluster.flat_path(name), &source).context("verifying the replica")?;
    if verify::have_qemu_img() {
        verify::qemu_check(&report.vmdk)?;
        verify::qemu_compare(&report.vmdk, &source)?;
        println!(
            "  verified    byte for byte; qemu-img check: no errors; qemu-img compare: identical"
        );
    } else {
        println!(
            "  verified    byte for byte (qemu-img not installed: VMDK structure not checked)"
        );
    }
    cluster.stop_clean(Duration::from_secs(20))?;
    Ok(report)
}
