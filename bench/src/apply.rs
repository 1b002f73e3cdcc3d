//! `bench apply`: how fast a real master target applies a disk's batches with its retention
//! volume on, through each of its data paths (`serve --data-io mmap|pwrite`), against
//! `qemu-img convert -O vmdk` of the same raw data onto the same filesystem; and how fast
//! `master-target recover --out` writes the disk as of an earlier point, against a plain
//! sequential write + fsync of the disk's size.
//!
//! One repeat runs steps 1-4 once per data path of `--data-io` (in that order, each on a
//! fresh cluster: `serve --data-io PATH`), then steps 5 (on the first path's retention
//! volume) and 6:
//! 1. a fresh master target and process server (`Cluster`); one simulated agent stream
//!    (`crate::streams`) opens its connection, which registers the disk with the master
//!    target, and the master target is then SIGKILLed;
//! 2. the stream pushes two passes into the process server's cache (not timed): a *base*
//!    disk (same workload, another seed; seqs 1..=n) as ordinary writes onto the new disk,
//!    then the source as ordinary writes over all of it (the churn; seqs n+1..=2n, source
//!    times 1 ms apart so that every batch is a recovery point, the last flagged
//!    `RESYNC_END`, which ends the agent's transfer). The process server is then stopped
//!    (SIGTERM):
//!    its cache holds every batch durably;
//! 3. the master target is started again (its datastore and retention volume as left), then
//!    the process server: it recovers its cache volume, and its forwarder opens a fresh
//!    session at once (no reconnect backoff) and sends the cached batches. The clock starts
//!    when its status (polled every 2 ms) shows the link up, as a daemon's link is up before
//!    any sync (the batches applied by then, at most a tenth, are left out of the fresh
//!    figure). Its status is then polled every 10 ms: *fresh* = start until seq n is seen
//!    applied (the whole disk written onto an empty one); *apply* = from then until seq 2n
//!    is seen applied (every byte overwrites data, so the undo journal takes the old bytes
//!    of the whole disk). The master target acks a batch once its undo, data and commit are
//!    durable;
//! 4. the replica's flat extent is compared byte for byte with the source (not timed);
//! 5. recover: `master-target recover --point T --out NEW.vmdk` to the point 10 % of the
//!    churn back (seq 2n - n/10), timed from the command's start to its exit; its flat
//!    extent must equal the source for the batches up to that seq and the base after;
//! 6. baselines, same directory: `qemu-img convert -f raw -O vmdk -o subformat=monolithicFlat
//!    SRC DST` plus fsync of DST's flat extent, timed together and verified; the source
//!    written to a new file in one sequential pass of 1 MiB writes plus one fsync (dd
//!    `conv=fsync`); and the floor ([`journaled_overwrite`]): the churn pass done locally
//!    with the least work the undo-before-write contract allows.
//!
//! Reported: medians over the repeats of MB/s and 4 KiB blocks/s per data path, the master
//! target's CPU seconds per GiB of the churn pass, the ratios apply / qemu-img per path (the
//! target >= 1.0 is judged on the first path), pwrite / mmap, recover / sequential write
//! (target >= 0.5), and floor / qemu-img and apply / floor: while the floor is below
//! qemu-img, no master target that journals the old bytes before overwriting them (DESIGN.md)
//! can meet the apply target on that filesystem.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use protocol::pb::Batch;
use serde::Serialize;

use crate::cluster::{Cluster, run_with_timeout};
use crate::run::{
    Cmp, Host, Start, Target, build_kind, check_batch_size, keep_on_err, median, start,
};
use crate::streams::{self, Disk};
use crate::usage;
use crate::verify;
use crate::workload::Workload;
use master_target::apply::{GROUP_MAX_BATCHES, GROUP_MAX_BYTES};
use protocol::pb::StatusReply;

/// Options of `bench apply`.
#[derive(clap::Args, Debug, Clone)]
pub struct ApplyArgs {
    /// Source disk size (K/M/G suffixes; a multiple of 4 KiB).
    #[arg(long, default_value = "512M", value_parser = protocol::cli::parse_size)]
    pub size: u64,
    /// Source data (and the base it overwrites): mixed, random, filesystem or sparse.
    #[arg(long, value_enum, default_value_t = Workload::Mixed)]
    pub workload: Workload,
    /// Uncompressed data per batch (the agent's default is 1M).
    #[arg(long, default_value = "1M", value_parser = protocol::cli::parse_size)]
    pub batch_size: u64,
    /// Repeats of every measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Directory for the JSON report.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Working directory (sources, and per repeat the cluster, the copies and the logs; the
    /// data is removed after each repeat, the logs are kept). Default: a temporary
    /// directory, removed at the end. Put it on the filesystem to measure.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seed of the source data (the base uses seed + 1000).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Give up on one repeat's apply or recover after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// The master target's data paths to measure, in order, each on a fresh cluster
    /// (`serve --data-io PATH`); the first one is judged against the target and used for
    /// the recover measurement.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "mmap,pwrite")]
    pub data_io: Vec<master_target::vmdk::DataIo>,
}

/// One data path's figures in one repeat.
#[derive(Debug, Clone, Serialize)]
pub struct PathRun {
    /// The master target's `--data-io`.
    pub data_io: &'static str,
    /// The base written onto the empty disk, from the clock's start (the process server's
    /// link up); MB/s of what was left of it then.
    pub fresh_seconds: f64,
    pub fresh_mb_per_sec: f64,
    /// The churn pass over written data (undo of the whole disk journaled).
    pub apply_seconds: f64,
    pub apply_mb_per_sec: f64,
    pub apply_blocks_per_sec: f64,
    /// From starting the process server until its link was up (before the clock).
    pub process_server_ready_seconds: f64,
    /// Batches of the base applied before the clock started (at most a tenth).
    pub applied_before_start: u64,
    /// CPU seconds (user + system) of the master target during the fresh pass (from the
    /// clock's start: its own start-up is before it).
    pub master_target_fresh_cpu_secs: f64,
    /// CPU seconds (user + system) of the master target during the churn pass.
    pub master_target_cpu_secs: f64,
    /// The same per GiB of disk churned.
    pub master_target_cpu_secs_per_gib: f64,
    /// CPU seconds of the process server (reading its cache, forwarding) in the churn pass.
    pub process_server_cpu_secs: f64,
    pub master_target_peak_rss_bytes: u64,
    /// Size of the retention volume after both passes (undo journal and metadata).
    pub retention_bytes: u64,
}

/// One repeat's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyRun {
    /// The first data path's figures (also at the top level, as before `--data-io`).
    #[serde(flatten)]
    pub first: PathRun,
    /// The other data paths, in `--data-io` order.
    pub other_paths: Vec<PathRun>,
    pub qemu_seconds: f64,
    pub qemu_mb_per_sec: f64,
    pub qemu_blocks_per_sec: f64,
    /// The seq recovered to, and the spec given to `--point`.
    pub recover_seq: u64,
    pub recover_point: String,
    pub recover_seconds: f64,
    pub recover_mb_per_sec: f64,
    pub seq_write_seconds: f64,
    pub seq_write_mb_per_sec: f64,
    /// [`journaled_overwrite`] of the churn pass: the contract's least work.
    pub floor_seconds: f64,
    pub floor_mb_per_sec: f64,
}

impl ApplyRun {
    fn paths(&self) -> impl Iterator<Item = &PathRun> {
        std::iter::once(&self.first).chain(&self.other_paths)
    }
}

/// Medians of one data path over the repeats.
#[derive(Debug, Clone, Serialize)]
pub struct PathSummary {
    pub data_io: &'static str,
    pub fresh_mb_per_sec: f64,
    pub apply_mb_per_sec: f64,
    pub apply_blocks_per_sec: f64,
    pub master_target_cpu_secs_per_gib: f64,
    /// The master target's CPU seconds per GiB of the fresh pass.
    pub master_target_fresh_cpu_secs_per_gib: f64,
    /// apply (churn pass) / qemu-img MB/s.
    pub apply_ratio: f64,
    /// fresh / qemu-img MB/s.
    pub fresh_ratio: f64,
    /// The most apply / qemu-img could be on this host given the CPU the churn pass took:
    /// qemu-img's seconds x CPUs / (master target + process server CPU seconds of the
    /// pass), as if every core did nothing but that work, perfectly overlapped.
    pub cpu_ceiling_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub started_unix: u64,
    pub build: &'static str,
    pub host: Host,
    pub work_dir: PathBuf,
    pub workload: Workload,
    pub workload_description: String,
    pub base_description: String,
    pub disk_bytes: u64,
    pub batch_bytes: u64,
    /// Batches per pass.
    pub batches: usize,
    pub repeat: usize,
    pub method: &'static str,
    pub runs: Vec<ApplyRun>,
    /// Per data path, in `--data-io` order; the top-level apply and fresh figures below
    /// are the first path's.
    pub paths: Vec<PathSummary>,
    /// pwrite apply MB/s / mmap apply MB/s (medians), when both were measured.
    pub pwrite_vs_mmap_apply: Option<f64>,
    pub fresh_mb_per_sec: f64,
    pub apply_mb_per_sec: f64,
    pub apply_blocks_per_sec: f64,
    pub qemu_mb_per_sec: f64,
    pub qemu_blocks_per_sec: f64,
    pub recover_mb_per_sec: f64,
    pub seq_write_mb_per_sec: f64,
    /// [`journaled_overwrite`] of the churn pass (median).
    pub floor_mb_per_sec: f64,
    /// floor / qemu-img MB/s (medians): above what any master target that journals the
    /// old bytes before overwriting them can reach here; below 1.0, the apply target cannot
    /// be met on this filesystem under that contract.
    pub floor_ratio: f64,
    /// The first path's apply / floor MB/s (medians): how close it comes to the least work.
    pub apply_vs_floor: f64,
    /// apply (churn pass) / qemu-img MB/s (medians).
    pub apply_ratio: f64,
    /// fresh (base onto the empty disk) / qemu-img MB/s (medians).
    pub fresh_ratio: f64,
    /// recover / sequential write MB/s (medians).
    pub recover_ratio: f64,
    pub targets: Vec<Target>,
}

const METHOD: &str = "per data path (serve --data-io, each on a fresh cluster): two passes \
     cached in a stopped process server first (not timed): a base disk written onto the new \
     disk, then the source as ordinary writes over all of it; master target restarted with its \
     retention volume, process server started, clock started once its link to the master \
     target is up (its forwarder reads the cache and sends over 4 connections: inside the \
     time); its status polled every 10 ms: fresh = until the base's last seq is applied (MB/s \
     of what was left of it at the start), apply = from then until the \
     source's last seq is applied (durable, undo journaled); replica verified byte for byte; \
     recover (first path's retention) = `master-target recover --out` to the point 10 % of \
     the churn back, process start to exit, verified; baselines in the same directory: \
     qemu-img convert -f raw -O vmdk -o subformat=monolithicFlat + fsync, verified; \
     sequential 1 MiB writes of the disk's size + one fsync; the floor: the churn pass \
     journaled locally with the least work (old bytes appended to an undo file + fdatasync, \
     new bytes written + fdatasync, commit record + fdatasync, per 64-batch group; all-zero \
     pieces skipped or zero-ranged)";

pub fn run(args: &ApplyArgs, exe: &Path) -> Result<ApplyReport> {
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    if args.data_io.is_empty() {
        bail!("--data-io needs at least one of mmap, pwrite");
    }
    check_batch_size(args.batch_size)?;
    if !args.batch_size.is_multiple_of(4096) {
        bail!("--batch-size must be a multiple of 4 KiB");
    }
    if args.size < 2 * args.batch_size || !args.size.is_multiple_of(4096) {
        bail!("--size must be a multiple of 4 KiB of at least two batches");
    }
    if !verify::have_qemu_img() {
        bail!("qemu-img is not installed (Debian: qemu-utils); it is the baseline");
    }
    let Start {
        dir,
        mut tmp,
        started_unix,
        host,
    } = start(args.dir.as_deref(), "failback-apply-", &args.out)?;
    fs::create_dir_all(dir.join("sources"))?;
    let disk = |file: &str| Disk {
        disk_id: "bench-apply-0000".into(),
        name: "bench-apply-0000".into(),
        source: dir.join("sources").join(file),
        capacity: args.size,
    };
    let (base, source) = (disk("base.raw"), disk("source.raw"));
    let base_description = args
        .workload
        .build(&base.source, args.size, args.seed + 1000)?;
    let description = args.workload.build(&source.source, args.size, args.seed)?;
    let path_names: Vec<&str> = args.data_io.iter().map(|d| d.name()).collect();
    println!(
        "bench apply: {} MiB {} disk ({description}) over a base of the same kind, {} KiB \
         batches, data paths {}, {} repeat(s), in {}",
        args.size >> 20,
        args.workload.name(),
        args.batch_size >> 10,
        path_names.join(", "),
        args.repeat,
        dir.display()
    );
    let bs = args.batch_size as usize;
    let mut batches = streams::build_pass(&base, bs, 1, false, false, None)?;
    let n = batches.len() as u64;
    batches.extend(streams::build_pass(
        &source,
        bs,
        n + 1,
        false,
        true,
        Some(protocol::now_unix_ms() + 1),
    )?);
    let rt = tokio::runtime::Runtime::new()?;
    println!(
        "  {:>6} {:>6} {:>10} {:>10} {:>11} {:>9} {:>9} {:>9} {:>7} {:>10} {:>9} {:>7}",
        "repeat",
        "path",
        "fresh MB/s",
        "apply MB/s",
        "apply blk/s",
        "MT CPU s",
        "CPU s/GiB",
        "qemu MB/s",
        "ratio",
        "recov MB/s",
        "dd MB/s",
        "ratio"
    );
    let mut runs = Vec::new();
    for i in 1..=args.repeat {
        let scratch = dir.join(format!("repeat-{i}"));
        let r = keep_on_err(
            &mut tmp,
            repeat_once(&rt, args, exe, &scratch, &base, &source, &batches),
        )
        .with_context(|| format!("repeat {i} (files in {})", scratch.display()))?;
        for (k, p) in r.paths().enumerate() {
            // Recover and the baselines are measured once per repeat: on the first line.
            let once = |v: f64| {
                if k == 0 {
                    format!("{v:.1}")
                } else {
                    String::new()
                }
            };
            println!(
                "  {i:>6} {:>6} {:>10.1} {:>10.1} {:>11.0} {:>9.2} {:>9.2} {:>9.1} {:>7.2} {:>10} {:>9} {:>7}",
                p.data_io,
                p.fresh_mb_per_sec,
                p.apply_mb_per_sec,
                p.apply_blocks_per_sec,
                p.master_target_cpu_secs,
                p.master_target_cpu_secs_per_gib,
                r.qemu_mb_per_sec,
                p.apply_mb_per_sec / r.qemu_mb_per_sec,
                once(r.recover_mb_per_sec),
                once(r.seq_write_mb_per_sec),
                if k == 0 {
                    format!("{:.2}", r.recover_mb_per_sec / r.seq_write_mb_per_sec)
                } else {
                    String::new()
                },
            );
        }
        runs.push(r);
    }
    let med = |f: &dyn Fn(&ApplyRun) -> f64| median(runs.iter().map(f).collect());
    let qemu = med(&|r| r.qemu_mb_per_sec);
    let paths: Vec<PathSummary> = (0..args.data_io.len())
        .map(|k| {
            let path = |r: &ApplyRun| r.paths().nth(k).cloned().expect("one per path");
            let (fresh, apply) = (
                med(&|r| path(r).fresh_mb_per_sec),
                med(&|r| path(r).apply_mb_per_sec),
            );
            PathSummary {
                data_io: args.data_io[k].name(),
                fresh_mb_per_sec: fresh,
                apply_mb_per_sec: apply,
                apply_blocks_per_sec: med(&|r| path(r).apply_blocks_per_sec),
                master_target_cpu_secs_per_gib: med(&|r| path(r).master_target_cpu_secs_per_gib),
                master_target_fresh_cpu_secs_per_gib: med(&|r| {
                    path(r).master_target_fresh_cpu_secs / (args.size as f64 / GIB)
                }),
                apply_ratio: apply / qemu,
                fresh_ratio: fresh / qemu,
                cpu_ceiling_ratio: med(&|r| {
                    let p = path(r);
                    host.cpus as f64 * r.qemu_seconds
                        / (p.master_target_cpu_secs + p.process_server_cpu_secs)
                }),
            }
        })
        .collect();
    let by_name = |name: &str| paths.iter().find(|p| p.data_io == name);
    let pwrite_vs_mmap_apply = by_name("pwrite")
        .zip(by_name("mmap"))
        .map(|(p, m)| p.apply_mb_per_sec / m.apply_mb_per_sec);
    let first = paths[0].clone();
    let (recover, seq_write) = (
        med(&|r| r.recover_mb_per_sec),
        med(&|r| r.seq_write_mb_per_sec),
    );
    let floor = med(&|r| r.floor_mb_per_sec);
    let report = ApplyReport {
        started_unix,
        build: build_kind(),
        host,
        work_dir: dir.clone(),
        workload: args.workload,
        workload_description: description,
        base_description,
        disk_bytes: args.size,
        batch_bytes: args.batch_size,
        batches: n as usize,
        repeat: args.repeat,
        method: METHOD,
        fresh_mb_per_sec: first.fresh_mb_per_sec,
        apply_mb_per_sec: first.apply_mb_per_sec,
        apply_blocks_per_sec: first.apply_blocks_per_sec,
        qemu_mb_per_sec: qemu,
        qemu_blocks_per_sec: med(&|r| r.qemu_blocks_per_sec),
        recover_mb_per_sec: recover,
        seq_write_mb_per_sec: seq_write,
        floor_mb_per_sec: floor,
        floor_ratio: floor / qemu,
        apply_vs_floor: first.apply_mb_per_sec / floor,
        apply_ratio: first.apply_ratio,
        fresh_ratio: first.fresh_ratio,
        recover_ratio: recover / seq_write,
        runs,
        paths: paths.clone(),
        pwrite_vs_mmap_apply,
        targets: vec![
            Target::check(
                format!(
                    "master target apply (--data-io {}), retention on (churn pass) / qemu-img \
                     convert -O vmdk",
                    first.data_io
                ),
                Some(first.apply_ratio),
                Cmp::AtLeast,
                1.0,
            ),
            Target::check(
                "recover --out, 10 % of churn back / sequential write + fsync",
                Some(recover / seq_write),
                Cmp::AtLeast,
                0.5,
            ),
        ],
    };
    let json = args.out.join(format!("apply-{started_unix}.json"));
    fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    println!("median:");
    for p in &paths {
        println!(
            "  {:>6}: fresh {:.1} MB/s ({:.2} MT CPU s/GiB), apply {:.1} MB/s ({:.0} blocks/s, \
             {:.2} MT CPU s/GiB), apply / qemu-img {:.2} (CPU ceiling {:.2}), fresh / qemu-img \
             {:.2}",
            p.data_io,
            p.fresh_mb_per_sec,
            p.master_target_fresh_cpu_secs_per_gib,
            p.apply_mb_per_sec,
            p.apply_blocks_per_sec,
            p.master_target_cpu_secs_per_gib,
            p.apply_ratio,
            p.cpu_ceiling_ratio,
            p.fresh_ratio
        );
    }
    if let Some(r) = pwrite_vs_mmap_apply {
        println!("  pwrite / mmap apply: {r:.2}");
    }
    println!(
        "  qemu-img {qemu:.1} MB/s ({:.0} blocks/s); recover {recover:.1} MB/s, sequential \
         write {seq_write:.1} MB/s\n  journaled overwrite (the contract's least work) \
         {floor:.1} MB/s: floor / qemu-img {:.2}, {} apply / floor {:.2}\ntargets \
         (reported, not asserted):",
        report.qemu_blocks_per_sec, report.floor_ratio, first.data_io, report.apply_vs_floor,
    );
    for t in &report.targets {
        println!("{}", t.line());
    }
    println!("  report  {}", json.display());
    drop(tmp);
    Ok(report)
}

const GIB: f64 = (1u64 << 30) as f64;

fn mb_per_sec(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / 1e6 / seconds
}

/// Total size of the regular files under `dir`.
fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            total += dir_bytes(&e.path())?;
        } else if t.is_file() {
            total += e.metadata()?.len();
        }
    }
    Ok(total)
}

/// One repeat (module docs): every data path, then recover and the baselines.
fn repeat_once(
    rt: &tokio::runtime::Runtime,
    args: &ApplyArgs,
    exe: &Path,
    scratch: &Path,
    base: &Disk,
    source: &Disk,
    batches: &[Batch],
) -> Result<ApplyRun> {
    let mut measured = Vec::new();
    let mut first_cluster = None;
    for (k, &io) in args.data_io.iter().enumerate() {
        let (path, cluster) =
            apply_pass(rt, args, exe, &scratch.join(io.name()), source, batches, io)?;
        measured.push(path);
        if k == 0 {
            first_cluster = Some(cluster);
        } else {
            // Only the first path's disk is recovered: the others' data goes now.
            for d in [&cluster.datastore, &cluster.retention, &cluster.cache] {
                fs::remove_dir_all(d)?;
            }
        }
    }
    let cluster = first_cluster.expect("at least one data path");
    let timeout = Duration::from_secs(args.timeout_secs);
    let (n, last) = (batches.len() as u64 / 2, batches.len() as u64);

    // Recover 10 % of the churn back: the batches after `seq` are rolled back.
    let back = (n / 10).max(1);
    let seq = last - back;
    let point = master_target::status::format_time(batches[seq as usize - 1].time_unix_ms);
    let recovered = scratch.join("recovered.vmdk");
    let mut cmd = cluster.role("master-target");
    cmd.arg("recover")
        .arg("--datastore")
        .arg(&cluster.datastore)
        .arg("--retention")
        .arg(&cluster.retention)
        .args(["--disk", &source.disk_id, "--point", &point, "--out"])
        .arg(&recovered);
    let t = Instant::now();
    let o = run_with_timeout(&mut cmd, timeout)?;
    let recover_seconds = t.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!(
            "master-target recover: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let expected = scratch.join("expected.raw");
    expected_at(&expected, base, source, (seq - n) * args.batch_size)?;
    verify::files_equal(&scratch.join("recovered-flat.vmdk"), &expected)
        .with_context(|| format!("the disk recovered to seq {seq} differs from the expected"))?;
    // The logs stay (with the working directory); the data goes.
    for d in [&cluster.datastore, &cluster.retention, &cluster.cache] {
        fs::remove_dir_all(d)?;
    }
    for f in ["recovered.vmdk", "recovered-flat.vmdk", "expected.raw"] {
        fs::remove_file(scratch.join(f))?;
    }

    let qemu_seconds = qemu_convert(&source.source, &scratch.join("qemu"))?;
    let seq_file = scratch.join("seq-write.bin");
    let seq_write_seconds = sequential_write(&source.source, &seq_file)?;
    fs::remove_file(&seq_file)?;
    let floor_seconds = journaled_overwrite(
        &base.source,
        &source.source,
        &scratch.join("floor"),
        args.batch_size as usize,
    )?;
    let mut measured = measured.into_iter();
    Ok(ApplyRun {
        first: measured.next().expect("at least one data path"),
        other_paths: measured.collect(),
        qemu_seconds,
        qemu_mb_per_sec: mb_per_sec(args.size, qemu_seconds),
        qemu_blocks_per_sec: args.size as f64 / 4096.0 / qemu_seconds,
        recover_seq: seq,
        recover_point: point,
        recover_seconds,
        recover_mb_per_sec: mb_per_sec(args.size, recover_seconds),
        seq_write_seconds,
        seq_write_mb_per_sec: mb_per_sec(args.size, seq_write_seconds),
        floor_seconds,
        floor_mb_per_sec: mb_per_sec(args.size, floor_seconds),
    })
}

/// Steps 1-4 of the module docs with the master target on data path `io`: returns the
/// figures and the stopped cluster, its datastore and retention volume as left.
fn apply_pass(
    rt: &tokio::runtime::Runtime,
    args: &ApplyArgs,
    exe: &Path,
    scratch: &Path,
    source: &Disk,
    batches: &[Batch],
    io: master_target::vmdk::DataIo,
) -> Result<(PathRun, Cluster)> {
    let mut cluster = Cluster::new(exe, scratch)?;
    cluster.process_server_flags = vec![
        "--cache-quota".into(),
        (3 * args.size + (1 << 30)).to_string(),
        "--high-water".into(),
        "80".into(),
    ];
    cluster.master_target_flags = vec!["--data-io".into(), io.name().into()];
    cluster.start().with_context(|| cluster.log_tails())?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let ready = rt
        .block_on(streams::open_all(
            &cluster,
            std::slice::from_ref(source),
            &[batches.to_vec()],
            false,
        ))
        .with_context(|| cluster.log_tails())?;
    cluster.kill_master_target();
    rt.block_on(streams::drive_all(ready, timeout))
        .with_context(|| cluster.log_tails())?;
    cluster.stop_clean(Duration::from_secs(20))?;
    cluster
        .start_master_target()
        .with_context(|| cluster.log_tails())?;
    let mt = cluster
        .master_target_pid()
        .context("master target not running")?;
    let (n, last) = (batches.len() as u64 / 2, batches.len() as u64);
    let spawned = Instant::now();
    cluster
        .start_process_server()
        .with_context(|| cluster.log_tails())?;
    // Its start-up (recovering its cache volume) is not the master target's apply: the
    // clock starts once its link is up, when its forwarder starts sending.
    let at_start = cluster
        .wait_link_up(rt, timeout)
        .with_context(|| cluster.log_tails())?;
    let start = Instant::now();
    let mt_at_start = usage::sample(mt)?;
    let ready = spawned.elapsed();
    let applied_before = applied_seq(&at_start, &source.disk_id);
    if applied_before >= n / 10 {
        bail!(
            "{applied_before} of {n} batches were applied before the process server reported its link up: \
             too small a --size to time the passes"
        );
    }
    // Bytes of the base pass still to apply when the clock started.
    let fresh_bytes = args.size * (n - applied_before) / n;
    let ps = cluster
        .process_server_pid()
        .context("process server not running")?;
    let mut base_done: Option<(Duration, usage::Usage, usage::Usage)> = None;
    loop {
        let status = cluster.ps_status(rt)?;
        let seen = start.elapsed();
        let applied = applied_seq(&status, &source.disk_id);
        if applied >= n && base_done.is_none() {
            if applied >= last {
                bail!(
                    "both passes were applied within one status poll: too small a --size to time them apart"
                );
            }
            base_done = Some((seen, usage::sample(mt)?, usage::sample(ps)?));
        }
        if applied >= last {
            break;
        }
        if seen > timeout {
            bail!(
                "applied seq {applied} of {last} after {timeout:?}\n{}",
                cluster.log_tails()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let end = start.elapsed();
    let (fresh, mt_before, ps_before) = base_done.expect("set before the last seq");
    let used = usage::sample(mt)?.since(mt_before);
    let ps_used = usage::sample(ps)?.since(ps_before);
    cluster.stop_clean(Duration::from_secs(20))?;
    verify::files_equal(&cluster.flat_path(&source.name), &source.source).with_context(|| {
        format!(
            "the replica differs from the source (--data-io {})",
            io.name()
        )
    })?;
    let retention_bytes = dir_bytes(&cluster.retention)?;
    let apply_seconds = (end - fresh).as_secs_f64();
    let path = PathRun {
        data_io: io.name(),
        fresh_seconds: fresh.as_secs_f64(),
        fresh_mb_per_sec: mb_per_sec(fresh_bytes, fresh.as_secs_f64()),
        apply_seconds,
        apply_mb_per_sec: mb_per_sec(args.size, apply_seconds),
        apply_blocks_per_sec: args.size as f64 / 4096.0 / apply_seconds,
        process_server_ready_seconds: ready.as_secs_f64(),
        applied_before_start: applied_before,
        master_target_fresh_cpu_secs: mt_before.since(mt_at_start).cpu_secs,
        master_target_cpu_secs: used.cpu_secs,
        master_target_cpu_secs_per_gib: used.cpu_secs / (args.size as f64 / GIB),
        process_server_cpu_secs: ps_used.cpu_secs,
        master_target_peak_rss_bytes: used.peak_rss_bytes,
        retention_bytes,
    };
    Ok((path, cluster))
}

/// The applied seq of `disk_id` in a process server's status (0 if it is not listed).
fn applied_seq(status: &StatusReply, disk_id: &str) -> u64 {
    status
        .disks
        .iter()
        .find(|d| d.disk_id == disk_id)
        .map_or(0, |d| d.applied_seq)
}

/// Writes at `path` the disk as of a point in the churn pass: the source's first `upto`
/// bytes, the base's after.
fn expected_at(path: &Path, base: &Disk, source: &Disk, upto: u64) -> Result<()> {
    fs::copy(&base.source, path)?;
    let out = OpenOptions::new().write(true).open(path)?;
    let src = File::open(&source.source)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < upto {
        let k = (upto - at).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..k], at)?;
        out.write_all_at(&buf[..k], at)?;
        at += k as u64;
    }
    Ok(())
}

/// `qemu-img convert` of `source` to a monolithicFlat VMDK in `dir` plus fsync of its flat
/// extent, timed; verified against the source and removed. Returns the seconds.
pub fn qemu_convert(source: &Path, dir: &Path) -> Result<f64> {
    fs::create_dir_all(dir)?;
    let vmdk = dir.join("copy.vmdk");
    let flat = dir.join("copy-flat.vmdk");
    let start = Instant::now();
    let o = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
        ])
        .arg(source)
        .arg(&vmdk)
        .output()
        .context("running qemu-img")?;
    if !o.status.success() {
        bail!("qemu-img convert: {}", String::from_utf8_lossy(&o.stderr));
    }
    File::open(&flat)
        .with_context(|| format!("opening {}", flat.display()))?
        .sync_all()?;
    let seconds = start.elapsed().as_secs_f64();
    verify::files_equal(&flat, source).context("qemu-img's copy differs from the source")?;
    fs::remove_dir_all(dir)?;
    Ok(seconds)
}

/// The least work the undo-before-write contract asks of the churn pass, done locally: no
/// network, checksum, decompression or recovery-point bookkeeping. `base` is copied to a
/// new disk file in `dir` and synced (not timed); then, per commit group as large as the
/// master target's largest ([`GROUP_MAX_BATCHES`] / [`GROUP_MAX_BYTES`]), the old bytes of
/// each `batch`-sized piece are read and appended to an undo file (skipped when all zero),
/// the undo file is fdatasynced, the new bytes are written over the disk (an all-zero
/// piece as `FALLOC_FL_ZERO_RANGE`), the disk is fdatasynced and a 64-byte commit record
/// appended and fdatasynced. The source's reads are not timed (the master target gets its
/// bytes from the network). The disk is verified against `source` and `dir` removed.
/// Returns the seconds.
pub fn journaled_overwrite(base: &Path, source: &Path, dir: &Path, batch: usize) -> Result<f64> {
    fs::create_dir_all(dir)?;
    let disk_path = dir.join("disk.raw");
    fs::copy(base, &disk_path)?;
    let disk = OpenOptions::new().read(true).write(true).open(&disk_path)?;
    disk.sync_all()?;
    let mut undo = File::create(dir.join("undo"))?;
    let src = File::open(source)?;
    let size = src.metadata()?.len();
    let group_bytes = (GROUP_MAX_BATCHES * batch).min(GROUP_MAX_BYTES) as u64;
    let (mut new, mut old) = (vec![0u8; group_bytes as usize], vec![0u8; batch]);
    let mut spent = Duration::ZERO;
    let mut at = 0;
    while at < size {
        let len = (size - at).min(group_bytes) as usize;
        src.read_exact_at(&mut new[..len], at)?;
        let t = Instant::now();
        for piece in (0..len).step_by(batch) {
            let k = batch.min(len - piece);
            disk.read_exact_at(&mut old[..k], at + piece as u64)?;
            if old[..k].iter().any(|&b| b != 0) {
                undo.write_all(&old[..k])?;
            }
        }
        undo.sync_data()?;
        for piece in (0..len).step_by(batch) {
            let bytes = &new[piece..len.min(piece + batch)];
            let offset = at + piece as u64;
            if bytes.iter().all(|&b| b == 0) {
                master_target::vmdk::flat::zero_range(&disk, offset, bytes.len() as u64)
                    .context("fallocate(ZERO_RANGE)")?;
            } else {
                disk.write_all_at(bytes, offset)?;
            }
        }
        disk.sync_data()?;
        undo.write_all(&[0u8; 64])?;
        undo.sync_data()?;
        spent += t.elapsed();
        at += len as u64;
    }
    drop(disk);
    verify::files_equal(&disk_path, source)
        .context("the journaled copy differs from the source")?;
    fs::remove_dir_all(dir)?;
    Ok(spent.as_secs_f64())
}

/// dd `bs=1M conv=fsync`: `source`'s bytes written to a new file at `path` in 1 MiB writes,
/// then one fsync; returns the seconds of the writes and the fsync (reads not timed).
pub fn sequential_write(source: &Path, path: &Path) -> Result<f64> {
    let mut src = File::open(source)?;
    let mut out = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut spent = Duration::ZERO;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let t = Instant::now();
        out.write_all(&buf[..n])?;
        spent += t.elapsed();
    }
    let t = Instant::now();
    out.sync_all()?;
    Ok((spent + t.elapsed()).as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_convert_copies_every_byte() {
        if !verify::have_qemu_img() {
            eprintln!("qemu-img not installed; skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.raw");
        Workload::Mixed.build(&src, 4 << 20, 3).unwrap();
        let secs = qemu_convert(&src, &dir.path().join("q")).unwrap();
        assert!(secs > 0.0);
        assert!(!dir.path().join("q").exists());
    }

    #[test]
    fn sequential_write_copies_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.raw");
        Workload::Random.build(&src, (3 << 20) + 4096, 5).unwrap();
        let out = dir.path().join("out");
        assert!(sequential_write(&src, &out).unwrap() > 0.0);
        verify::files_equal(&src, &out).unwrap();
    }

    #[test]
    fn journaled_overwrite_leaves_the_disk_equal_to_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let (base, src) = (dir.path().join("base"), dir.path().join("src"));
        // Mixed disks hold holes and zeros: zero-ranged and skipped pieces are exercised.
        Workload::Mixed.build(&base, 8 << 20, 1).unwrap();
        Workload::Mixed.build(&src, 8 << 20, 2).unwrap();
        let out = dir.path().join("floor");
        // The copy is verified against the source inside (an error if it differs).
        assert!(journaled_overwrite(&base, &src, &out, 64 << 10).unwrap() > 0.0);
        assert!(!out.exists(), "its files are removed");
    }

    #[test]
    fn expected_image_takes_the_source_up_to_the_point() {
        let dir = tempfile::tempdir().unwrap();
        let disk = |name: &str, seed| {
            let d = Disk {
                disk_id: "d".into(),
                name: "d".into(),
                source: dir.path().join(name),
                capacity: 64 << 10,
            };
            Workload::Random.build(&d.source, d.capacity, seed).unwrap();
            d
        };
        let (base, source) = (disk("base", 1), disk("source", 2));
        let path = dir.path().join("expected");
        expected_at(&path, &base, &source, 24 << 10).unwrap();
        let (got, b, s) = (
            fs::read(&path).unwrap(),
            fs::read(&base.source).unwrap(),
            fs::read(&source.source).unwrap(),
        );
        assert_eq!(got[..24 << 10], s[..24 << 10]);
        assert_eq!(got[24 << 10..], b[24 << 10..]);
    }

    #[test]
    fn dir_bytes_sums_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("x"), [0u8; 10]).unwrap();
        fs::write(dir.path().join("a/b/y"), [0u8; 5]).unwrap();
        assert_eq!(dir_bytes(dir.path()).unwrap(), 15);
    }
}
