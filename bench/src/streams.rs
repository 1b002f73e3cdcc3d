//! Simulated agents inside the bench process: many agent streams against one real process
//! server, each with its own disk, driven by the agent's own session and transfer code
//! (`agent::session`, `agent::transfer`) so that the wire traffic is exactly an agent's.
//!
//! Each stream's batches are built from its source file before the clock starts (lz4 and
//! CRCs are the agent's cost, not the process server's): one write of `batch_data` bytes
//! per batch, in offset order, flagged as a full-sync pass whose last batch ends it
//! (`RESYNC_END`). Every stream opens its connection (challenge, hello, welcome: a new disk
//! is registered with the master target then) before the clock starts, and all of them start
//! sending at the same instant.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::progress::Meter;
use agent::session::{HEARTBEAT, Session, Target};
use agent::transfer::Transfer;
use anyhow::{Context, Result, bail};
use protocol::auth::{ClientAuth, Passphrase};
use protocol::batch::{BatchBuilder, flags};
use protocol::pb::{Batch, DiskFormat, DiskInfo};
use protocol::transport::{TlsFiles, WanTuning};

use crate::cluster::Cluster;

/// Unacknowledged bytes each stream may have in flight: the agent's default `--window`.
const WINDOW_BYTES: usize = agent::config::DEFAULT_WINDOW as usize;

/// One simulated agent's disk: its id and name on the wire and the file it replicates.
#[derive(Debug, Clone)]
pub struct Disk {
    pub disk_id: String,
    pub name: String,
    pub source: PathBuf,
    pub capacity: u64,
}

/// The batches of a full pass over `disk`, seqs from 1, `batch_data` bytes of data each.
pub fn build_batches(disk: &Disk, batch_data: usize) -> Result<Vec<Batch>> {
    build_pass(disk, batch_data, 1, true, true, None)
}

/// The batches of a pass over the whole of `disk`, seqs from `first_seq`, `batch_data`
/// bytes of data each: flagged as a full-sync pass (`resync`) or as ordinary writes, its
/// last batch flagged `RESYNC_END` if `end` (which also ends the agent's transfer). Source
/// times: the clock at each batch, or with `start_ms` that time
/// plus 1 ms per batch (distinct times, so each batch is a recovery point of its own).
pub fn build_pass(
    disk: &Disk,
    batch_data: usize,
    first_seq: u64,
    resync: bool,
    end: bool,
    start_ms: Option<i64>,
) -> Result<Vec<Batch>> {
    let file =
        File::open(&disk.source).with_context(|| format!("opening {}", disk.source.display()))?;
    let mut builder = BatchBuilder::new();
    let mut buf = vec![0u8; batch_data];
    let mut batches = Vec::new();
    let mut at = 0u64;
    while at < disk.capacity {
        let n = (disk.capacity - at).min(batch_data as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        builder.push_write(at, &buf[..n]);
        at += n as u64;
        let mut pass = if resync { flags::RESYNC } else { 0 };
        if end && at == disk.capacity {
            pass |= flags::RESYNC_END;
        }
        let i = batches.len() as u64;
        let time = start_ms.map_or_else(protocol::now_unix_ms, |t| t + i as i64);
        batches.push(builder.finish(&disk.disk_id, first_seq + i, time, pass));
    }
    Ok(batches)
}

/// A welcomed stream with its pass loaded, ready to send.
pub struct Ready {
    session: Session,
    transfer: Transfer,
}

/// Opens one stream per disk to the cluster's process server (concurrently) and loads each
/// with its batches. `wait_applied`: a stream is done once the master target has applied
/// its last batch; otherwise once the process server holds it durably in its cache.
pub async fn open_all(
    cluster: &Cluster,
    disks: &[Disk],
    batches: &[Vec<Batch>],
    wait_applied: bool,
) -> Result<Vec<Ready>> {
    let passphrase = Passphrase::load(Some(&cluster.passphrase_file))?;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (disk, batches)) in disks.iter().zip(batches).enumerate() {
        let target = Target {
            url: cluster.ps_url(),
            tuning: WanTuning::default(),
            tls: TlsFiles::default(),
            auth: ClientAuth::new(passphrase.clone(), format!("bench-agent-{i}")),
            disk: DiskInfo {
                disk_id: disk.disk_id.clone(),
                name: disk.name.clone(),
                capacity: disk.capacity,
                format: DiskFormat::Vmfs as i32,
                group: String::new(),
            },
            heartbeat: HEARTBEAT,
        };
        let batches = batches.clone();
        tasks.spawn(async move {
            let session = Session::open(&target)
                .await
                .with_context(|| format!("opening the stream of {}", target.disk.disk_id))?;
            if session.welcome.cached_seq != 0 {
                bail!(
                    "disk {} is not new: the process server already holds seq {}",
                    target.disk.disk_id,
                    session.welcome.cached_seq
                );
            }
            let (tx, rx) = tokio::sync::mpsc::channel(batches.len().max(1));
            for b in batches {
                tx.try_send(Ok(b)).expect("the channel holds every batch");
            }
            let transfer = Transfer::new(
                &session.welcome,
                WINDOW_BYTES,
                rx,
                wait_applied,
                Arc::new(Meter::default()),
            );
            Ok::<_, anyhow::Error>((i, Ready { session, transfer }))
        });
    }
    let mut ready: Vec<Option<Ready>> = (0..disks.len()).map(|_| None).collect();
    while let Some(r) = tasks.join_next().await {
        let (i, s) = r??;
        ready[i] = Some(s);
    }
    Ok(ready.into_iter().flatten().collect())
}

/// Sends every stream's pass at once; returns each stream's time from the common start to
/// its completion, in the order of `ready`. Any stream failing, or not done within
/// `timeout`, fails the whole run.
pub async fn drive_all(ready: Vec<Ready>, timeout: Duration) -> Result<Vec<Duration>> {
    let n = ready.len();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut r) in ready.into_iter().enumerate() {
        tasks.spawn(async move {
            r.session
                .drive(&mut r.transfer)
                .await
                .with_context(|| format!("stream {i}"))?;
            Ok::<_, anyhow::Error>((i, start.elapsed()))
        });
    }
    let mut times = vec![Duration::ZERO; n];
    let collect = async {
        while let Some(r) = tasks.join_next().await {
            let (i, t) = r??;
            times[i] = t;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(timeout, collect)
        .await
        .with_context(|| format!("the streams were not done within {timeout:?}"))??;
    Ok(times)
}

/// `count` disks of `size` random bytes each under `dir` (seeds `seed`, `seed + 1`, ...),
/// with ids `PREFIX-NNNN`.
pub fn random_disks(
    dir: &Path,
    prefix: &str,
    count: usize,
    size: u64,
    seed: u64,
) -> Result<Vec<Disk>> {
    std::fs::create_dir_all(dir)?;
    (0..count)
        .map(|i| {
            let name = format!("{prefix}-{i:04}");
            let source = dir.join(format!("{name}.raw"));
            crate::workload::Workload::Random.build(&source, size, seed + i as u64)?;
            Ok(Disk {
                disk_id: name.clone(),
                name,
                source,
                capacity: size,
            })
        })
        .collect()
}
