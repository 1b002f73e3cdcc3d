//! `agent sync`: one full (or differential, see [`crate::diff`]) pass of a disk to the
//! process server, surviving any number of lost connections.
//!
//! ```text
//!  disk-reader thread                async task (this module + session)
//!  Source -> scan -> BatchBuilder --[bounded channel]--> Window --[h2 stream]--> process server
//!                                                         ^  acks drop batches      |
//!                                                         +-------------------------+
//! ```
//!
//! Invariants: the first batch of the pass is the first welcome's `cached_seq + 1` (seqs
//! never restart); after every reconnect the window resumes from that connection's welcome,
//! so batches are sent in seq order and none is lost or skipped; the pass succeeds only when
//! [`Transfer::done`] holds; a non-retryable error, or an outage longer than `retry_for`,
//! ends it with an error.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use protocol::error::Refusal;
use protocol::pb::{DiskFormat, DiskInfo};

use crate::diff::{self, DiffCounts, DiffError, Hashes};
use crate::progress::{Display, Meter};
use crate::retry::{Backoff, GaveUp, Outage};
use crate::scan::{READ_CHUNK, ScanPlan, spawn_pass, spawn_producer};
use crate::session::{Session, SessionError, Target};
use crate::source::{Source, SourceError};
use crate::transfer::Transfer;

/// Everything a full pass needs, already validated.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub target: Target,
    /// The source disk (raw image or block device).
    pub disk: PathBuf,
    pub marker_tag: Option<String>,
    /// Wait until the master target has applied the whole pass.
    pub wait: bool,
    /// Bound of unacknowledged batch bytes held in memory.
    pub window_bytes: usize,
    /// Uncompressed data bytes per batch.
    pub batch_data: usize,
    /// How long one outage may last before the pass gives up.
    pub retry_for: Duration,
    /// `--mode differential` with this chunk size; `None` for a full pass.
    pub differential: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    OpeningSource(#[from] SourceError),
    #[error(transparent)]
    DeclaringDisk(Refusal),
    #[error("cannot start the disk reader: {0}")]
    StartingReader(std::io::Error),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    GaveUp(#[from] GaveUp),
    #[error(transparent)]
    Hashes(#[from] DiffError),
}

/// What a finished pass did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub first_seq: u64,
    pub last_seq: u64,
    pub capacity: u64,
    pub read_bytes: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub wire_bytes: u64,
    pub resent_bytes: u64,
    pub applied: bool,
    pub elapsed: Duration,
    /// For a differential pass: chunks compared and chunks sent.
    pub differential: Option<(u64, u64)>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        writeln!(
            f,
            "{} sync done: batches {}..={} {}",
            if self.differential.is_some() {
                "differential"
            } else {
                "full"
            },
            self.first_seq,
            self.last_seq,
            if self.applied {
                "applied and durable at the master target"
            } else {
                "durable in the process server's cache"
            }
        )?;
        writeln!(f, "  disk capacity   {:>16} bytes", self.capacity)?;
        writeln!(f, "  bytes read      {:>16} bytes", self.read_bytes)?;
        writeln!(f, "  data sent       {:>16} bytes", self.data_bytes)?;
        writeln!(f, "  zeros (no data) {:>16} bytes", self.zero_bytes)?;
        writeln!(f, "  wire bytes      {:>16} bytes", self.wire_bytes)?;
        writeln!(f, "  resent bytes    {:>16} bytes", self.resent_bytes)?;
        if let Some((chunks, differing)) = self.differential {
            writeln!(f, "  chunks compared {:>16}", chunks)?;
            writeln!(f, "  chunks sent     {:>16}", differing)?;
            writeln!(
                f,
                "  sent of disk    {:>16.1} %",
                (self.data_bytes + self.zero_bytes) as f64 * 100.0 / self.capacity.max(1) as f64
            )?;
        }
        writeln!(
            f,
            "  rate            {:>16.1} MB/s of disk",
            self.capacity as f64 / secs.max(1e-3) / 1e6
        )?;
        write!(f, "  seconds         {:>16.2}", secs)
    }
}

/// Runs one full pass of `cfg.disk`.
pub async fn run(mut cfg: SyncConfig) -> Result<Summary, SyncError> {
    let started = Instant::now();
    let path = cfg.disk.clone();
    let source = tokio::task::spawn_blocking(move || Source::open(&path))
        .await
        .expect("opening the source does not panic")?;
    let capacity = source.capacity();
    cfg.target.disk.capacity = capacity;
    protocol::disk::check_disk_info(&cfg.target.disk).map_err(SyncError::DeclaringDisk)?;

    let hashes = match cfg.differential {
        Some(chunk) => match diff::fetch(&cfg.target, chunk).await? {
            Hashes::Unavailable(why) => {
                tracing::info!("{why}: falling back to a full sync");
                None
            }
            Hashes::Pages(pages) => Some(pages),
        },
        None => None,
    };
    let mut retry = Retry::new(cfg.retry_for);
    let session = retry.connect(&cfg.target).await?;
    let welcome = session.welcome.clone();
    tracing::info!(
        "syncing {} ({capacity} bytes) as disk {}: the process server holds seq {}, the master \
         target applied seq {}",
        source.path().display(),
        cfg.target.disk.disk_id,
        welcome.cached_seq,
        welcome.applied_seq
    );
    let plan = ScanPlan {
        disk_id: cfg.target.disk.disk_id.clone(),
        first_seq: welcome.cached_seq + 1,
        batch_data: cfg.batch_data,
        marker_tag: cfg.marker_tag.clone(),
        read_chunk: READ_CHUNK,
    };
    let counts = Arc::new(DiffCounts::default());
    let differential = hashes.is_some();
    let producer = match hashes {
        None => spawn_producer(source, plan),
        Some(pages) => {
            let counts = counts.clone();
            spawn_pass(source, move |source, stats, emit| {
                diff::differential_pass(source, &plan, stats, &counts, pages, true, emit)
                    .map(|_| ())
            })
        }
    }
    .map_err(SyncError::StartingReader)?;
    let meter = Arc::new(Meter::default());
    let mut transfer = Transfer::new(
        &welcome,
        cfg.window_bytes,
        producer.batches,
        cfg.wait,
        meter.clone(),
    );
    let display = Display::start(capacity, producer.stats.clone(), meter.clone());
    retry.drive(session, &mut transfer, &cfg.target).await?;
    display.finish().await;
    let scan = &producer.stats;
    Ok(Summary {
        first_seq: welcome.cached_seq + 1,
        last_seq: transfer.last_seq().unwrap_or(welcome.cached_seq),
        capacity,
        read_bytes: scan.read_bytes.load(Ordering::Relaxed),
        data_bytes: scan.data_bytes.load(Ordering::Relaxed),
        zero_bytes: scan.zero_bytes.load(Ordering::Relaxed),
        wire_bytes: meter.wire_bytes.load(Ordering::Relaxed),
        resent_bytes: meter.resent_bytes.load(Ordering::Relaxed),
        applied: cfg.wait,
        elapsed: started.elapsed(),
        differential: differential.then(|| {
            (
                counts.chunks.load(Ordering::Relaxed),
                counts.differing.load(Ordering::Relaxed),
            )
        }),
    })
}

/// Reconnection state of a pass (or of continuous replication).
#[derive(Debug)]
pub(crate) struct Retry {
    outage: Outage,
    backoff: Backoff,
}

impl Retry {
    pub(crate) fn new(retry_for: Duration) -> Self {
        Retry {
            outage: Outage::new(retry_for),
            backoff: Backoff::default(),
        }
    }

    /// Drives sessions until the pass is done, reconnecting after every retryable failure
    /// and resuming from each new welcome.
    pub(crate) async fn drive(
        &mut self,
        mut session: Session,
        transfer: &mut Transfer,
        target: &Target,
    ) -> Result<(), SyncError> {
        loop {
            match session.drive(transfer).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() => {
                    if transfer.take_progress() {
                        self.backoff.reset();
                    }
                    self.outage.failed(e)?;
                    tokio::time::sleep(self.backoff.delay()).await;
                    session = self.connect(target).await?;
                    transfer
                        .resume(&session.welcome)
                        .map_err(SessionError::from)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Opens a session, retrying with backoff while failures are retryable.
    pub(crate) async fn connect(&mut self, target: &Target) -> Result<Session, SyncError> {
        loop {
            match Session::open(target).await {
                Ok(s) => {
                    self.outage.recovered();
                    return Ok(s);
                }
                Err(e) if e.is_retryable() => {
                    self.outage.failed(e)?;
                    tokio::time::sleep(self.backoff.delay()).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The `DiskInfo` to declare; the capacity is filled in once the source is open.
pub fn disk_info(disk_id: &str, name: &str, format: DiskFormat) -> DiskInfo {
    DiskInfo {
        disk_id: disk_id.to_string(),
        name: name.to_string(),
        capacity: 0,
        format: format as i32,
        group: String::new(),
    }
}
