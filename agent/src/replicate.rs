//! `agent replicate`: serve the source files over NBD and replicate every write, in order.
//!
//! Each disk has its own NBD export, producer thread, batcher and stream (the diagram below);
//! the disks of one agent share one marker clock ([`Controls`]), so every periodic or
//! requested marker is a *group marker*: cut on every disk at one instant.
//!
//! ```text
//!  NBD clients -> nbd::server -> FileDisk: pwrite FILE, then
//!                                  tracking: mark DirtyMap          (initial pass running)
//!                                  queueing: Change -> changes::run_batcher
//!  producer thread: full or differential pass (RESYNC) -> dirty rounds (RESYNC) -> last
//!                   dirty round with the writers held (RESYNC_END) -> continuous batches
//!                   -> (transfer full: dirty bitmap -> dirty rounds -> ...) -> continuous
//!      --[bounded channel]--> Transfer (endless) --> Session --> process server
//! ```
//!
//! Invariants:
//! * one lock ([`FileDisk::sink`]) covers "write FILE" and "record the change", so the
//!   order of changes in the stream is the order in which the file took them and in which
//!   the clients got their replies;
//! * the initial pass (differential if the target has the disk, else full), the dirty
//!   rounds and the final round are one resync interval: only its last batch carries
//!   `RESYNC_END`, and it is cut while the writers are held, so at that point the target
//!   equals FILE; changes are queued only from then on, so every continuous batch follows it
//!   in seq order;
//! * an NBD flush is fdatasync'd, then a crash marker is queued behind every change it
//!   covers; before the interval ends there is no consistent point, so no marker is cut;
//! * every channel is bounded, and so is memory (the backpressure ladder): a slow or
//!   unreachable (or pausing) process server fills the window, then the batch channel; a
//!   batch that finds no room within the overflow grace switches the disk to the dirty
//!   bitmap (writers then only mark it, and never wait for the network); once the transfer
//!   has room again, the dirty regions are re-read from FILE and sent as a resync interval
//!   (`RESYNC` ... `RESYNC_END`, no markers inside), after which continuous batches resume;
//! * blocking file I/O happens on the producer thread or the blocking pool only;
//! * a group marker is queued on every disk while the cutter holds every disk's sink lock
//!   (taken in disk order, so two cutters cannot deadlock): no write is acknowledged on any
//!   disk between the marker's positions in the streams, so the marker sits after every write
//!   acknowledged before it on any disk and before every write acknowledged after it. If any
//!   disk is in a resync interval, no disk gets the marker.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::Duration;

use parking_lot::Mutex;
use protocol::auth::Passphrase;
use protocol::error::Refusal;
use protocol::pb::{Batch, Marker, MarkerKind};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};

use crate::changes::{BatchPlan, BatcherEnd, CHANGE_QUEUE, Change, MarkerIds, run_batcher};
use crate::control::{self, DiskStatus, MarkerStatus};
use crate::diff::{self, DEFAULT_CHUNK, DiffCounts, HashPages, Hashes, differential_pass};
use crate::dirty::DirtyMap;
use crate::nbd::proto::EIO;
use crate::nbd::server::{self, Backend};
use crate::progress::Meter;
use crate::scan::{
    Cancelled, PRODUCER_AHEAD, Part, READ_CHUNK, ScanError, ScanPlan, ScanStats, scan_part,
};
use crate::session::Target;
use crate::source::{Source, SourceError};
use crate::sync::{Retry, SyncError};
use crate::transfer::Transfer;

/// Default interval of periodic crash-consistent markers.
pub const DEFAULT_CRASH_INTERVAL: Duration = Duration::from_secs(300);
/// Default interval of periodic app-consistent markers (with `--app-quiesce-cmd`).
pub const DEFAULT_APP_INTERVAL: Duration = Duration::from_secs(3600);
/// Dirty bytes under which the catch-up stops iterating and does its last round with the
/// writers held (so they wait at most as long as reading this much takes).
pub const FINAL_ROUND: u64 = 8 << 20;
/// Catch-up rounds before the last one, whatever is left dirty.
pub const CATCH_UP_ROUNDS: usize = 4;
/// How long an unreachable process server is retried: continuous replication does not give
/// up by itself (the NBD clients wait meanwhile).
pub const RETRY_FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Everything `agent replicate` needs, already validated.
#[derive(Debug, Clone)]
pub struct ReplicateConfig {
    /// At least one; several form a group.
    pub disks: Vec<DiskConfig>,
    /// Group name carried by markers cut on every disk (empty: none, for a single disk).
    pub group: String,
    /// Control API address and the passphrase its clients must know.
    pub control: Option<(String, Passphrase)>,
    /// Per disk.
    pub window_bytes: usize,
    pub batch_data: usize,
    pub linger: Duration,
    pub crash_interval: Duration,
    pub app_interval: Duration,
    pub app_quiesce_cmd: Option<String>,
    pub retry_for: Duration,
    /// How long a full transfer is waited for before falling back to the dirty bitmap.
    pub overflow_grace: Duration,
}

/// One replicated disk: its source file, its NBD address and its stream's target.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub target: Target,
    pub path: PathBuf,
    pub nbd_listen: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error(transparent)]
    OpeningSource(#[from] SourceError),
    #[error("cannot open {path} for writing: {source}")]
    OpeningForWrite {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    DeclaringDisk(Refusal),
    #[error("cannot listen on {addr}: {source}")]
    Listening {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot start the replication thread: {0}")]
    StartingProducer(std::io::Error),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error("replication stopped: the disk reader or batcher ended")]
    Stopped,
    #[error("no disk to replicate")]
    NoDisk,
    #[error("disk {disk_id}: {source}")]
    OfDisk {
        disk_id: String,
        source: Box<ReplicateError>,
    },
}

/// Where replication of the disk stands (`agent status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    FullSync = 0,
    CatchUp = 1,
    Continuous = 2,
    Bitmap = 3,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::FullSync => "full-sync",
            Mode::CatchUp => "catch-up",
            Mode::Continuous => "continuous",
            Mode::Bitmap => "bitmap",
        }
    }
}

/// Shared view of one replicated disk, for status and tests.
#[derive(Debug)]
pub struct DiskState {
    pub disk_id: String,
    pub name: String,
    pub meter: Arc<Meter>,
    mode: AtomicU8,
    /// Highest seq handed to the transfer.
    produced_seq: AtomicU64,
    last_marker: Mutex<Option<Marker>>,
    last_error: Mutex<Option<String>>,
    /// Woken on every mode change, produced batch and hook outcome.
    changed: Notify,
}

impl DiskState {
    fn new(disk_id: &str, name: &str) -> Self {
        DiskState {
            disk_id: disk_id.to_string(),
            name: name.to_string(),
            meter: Arc::default(),
            mode: AtomicU8::new(Mode::FullSync as u8),
            produced_seq: AtomicU64::new(0),
            last_marker: Mutex::new(None),
            last_error: Mutex::new(None),
            changed: Notify::new(),
        }
    }

    pub fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Relaxed) {
            0 => Mode::FullSync,
            1 => Mode::CatchUp,
            2 => Mode::Continuous,
            _ => Mode::Bitmap,
        }
    }

    fn set_mode(&self, m: Mode) {
        self.mode.store(m as u8, Ordering::Relaxed);
        tracing::info!("disk {}: {}", self.disk_id, m.name());
        self.changed.notify_waiters();
    }

    fn produced(&self, seq: u64, marker: Option<&Marker>) {
        self.produced_seq.store(seq, Ordering::Relaxed);
        if let Some(m) = marker {
            *self.last_marker.lock() = Some(m.clone());
        }
        self.changed.notify_waiters();
    }

    fn failed(&self, what: String) {
        tracing::error!("disk {}: {what}", self.disk_id);
        *self.last_error.lock() = Some(what);
        self.changed.notify_waiters();
    }

    /// Waits until `done` holds (checked on every change of this state).
    pub async fn wait_until(&self, mut done: impl FnMut(&DiskState) -> bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(self) {
                return;
            }
            notified.await;
        }
    }

    pub fn produced_seq(&self) -> u64 {
        self.produced_seq.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> DiskStatus {
        let m = &self.meter;
        DiskStatus {
            disk_id: self.disk_id.clone(),
            name: self.name.clone(),
            mode: match self.mode() {
                Mode::Continuous if m.paused.load(Ordering::Relaxed) => "paused",
                mode => mode.name(),
            }
            .to_string(),
            last_seq_produced: self.produced_seq(),
            last_seq_sent: m.sent_seq.load(Ordering::Relaxed),
            cached_seq: m.acked_seq.load(Ordering::Relaxed),
            applied_seq: m.applied_seq.load(Ordering::Relaxed),
            backlog_bytes: m.window_bytes.load(Ordering::Relaxed),
            last_marker: self.last_marker.lock().as_ref().map(MarkerStatus::from),
            last_error: self.last_error.lock().clone(),
        }
    }
}

/// FILE as the NBD export, recording every change for replication.
#[derive(Debug)]
struct FileDisk {
    file: File,
    size: u64,
    /// `Some` while the initial pass runs (changes are only marked dirty), `None` once
    /// changes are queued. Held across "write FILE" and "record": see the module invariants.
    sink: Mutex<Option<DirtyMap>>,
    queue: SyncSender<Change>,
    ids: Arc<MarkerIds>,
    state: Arc<DiskState>,
}

/// Zeros written per `pwrite` for TRIM and WRITE_ZEROES.
const ZERO_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    #[error("a resync interval is running: there is no consistent point to mark until it ends")]
    NotConsistentYet,
    #[error("replication has stopped")]
    Stopped,
    #[error("the quiesce command failed: {0}")]
    Hook(String),
    #[error("unknown disk {0}")]
    UnknownDisk(String),
}

impl FileDisk {
    /// Records a change that FILE already holds. The caller holds the sink lock.
    fn record(&self, sink: &mut Option<DirtyMap>, change: Change) -> Result<(), u32> {
        match sink {
            Some(dirty) => {
                if let Some((offset, len)) = change.extent() {
                    dirty.mark(offset, len);
                }
                Ok(())
            }
            // The batcher is gone only when replication stopped: the client must not believe
            // its write is being replicated.
            None => self.queue.send(change).map_err(|_| EIO),
        }
    }

    /// After a write or zero that failed (`errno`) once FILE may have taken part of it:
    /// whatever FILE now holds in `[offset, offset + len)` must still reach the target, or
    /// the target silently differs from the source. In bitmap mode the range is marked
    /// (re-read later); otherwise FILE's bytes are read back and queued as writes. Returns
    /// `errno` for the client.
    fn record_failed(
        &self,
        sink: &mut Option<DirtyMap>,
        offset: u64,
        len: u64,
        errno: u32,
    ) -> Result<(), u32> {
        if let Some(dirty) = sink {
            dirty.mark(offset, len);
            return Err(errno);
        }
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(ZERO_CHUNK as u64) as usize;
            let data = match self.read(at, n) {
                Ok(d) => d,
                Err(e) => {
                    let why = format!(
                        "a write to [{offset}, {}) failed (errno {errno}) and reading it back \
                         failed too (errno {e}): the target may differ there; run a \
                         differential sync",
                        offset + len
                    );
                    tracing::error!(disk = %self.state.disk_id, "{why}");
                    *self.state.last_error.lock() = Some(why);
                    return Err(errno);
                }
            };
            self.record(sink, Change::Write { offset: at, data })?;
            at += n as u64;
        }
        Err(errno)
    }

    fn sync(&self, fua: bool) -> Result<(), u32> {
        if fua {
            self.file.sync_data().map_err(|e| io_errno(&e))?;
        }
        Ok(())
    }

    /// Switches to the dirty bitmap: marks what `unsent` and the change being batched
    /// (`extent`) cover, and every change still queued; queued markers are dropped, since
    /// a resync interval has no consistent point inside. Writers hold the sink lock while
    /// they queue, so once the batcher holds it and has drained the queue, nothing more can
    /// arrive; until then, draining is what lets a writer blocked on a full queue finish.
    fn fall_back(
        &self,
        unsent: &Batch,
        extent: Option<(u64, u64)>,
        changes: &std::sync::mpsc::Receiver<Change>,
    ) {
        let mut map = DirtyMap::new(self.size);
        for e in unsent.writes.iter().chain(&unsent.zeros) {
            map.mark(e.offset, e.length);
        }
        if let Some((offset, len)) = extent {
            map.mark(offset, len);
        }
        let drain = |map: &mut DirtyMap| {
            while let Ok(c) = changes.try_recv() {
                match c.extent() {
                    Some((offset, len)) => map.mark(offset, len),
                    None => {
                        if let Change::Marker(m) = c {
                            tracing::warn!(
                                "marker {} dropped: the disk is being resynchronised",
                                m.id
                            );
                        }
                    }
                }
            }
        };
        for m in &unsent.markers {
            tracing::warn!("marker {} dropped: the disk is being resynchronised", m.id);
        }
        loop {
            drain(&mut map);
            if let Some(mut sink) = self.sink.try_lock_for(Duration::from_millis(10)) {
                drain(&mut map);
                *sink = Some(map);
                return;
            }
        }
    }
}

fn io_errno(e: &std::io::Error) -> u32 {
    e.raw_os_error()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(EIO)
}

impl Backend for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| io_errno(&e))?;
        Ok(buf)
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), u32> {
        if data.is_empty() {
            return Ok(());
        }
        let mut sink = self.sink.lock();
        let done = self
            .file
            .write_all_at(&data, offset)
            .map_err(|e| io_errno(&e))
            .and_then(|()| self.sync(fua));
        match done {
            Ok(()) => self.record(&mut sink, Change::Write { offset, data }),
            Err(errno) => self.record_failed(&mut sink, offset, data.len() as u64, errno),
        }
    }

    fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), u32> {
        if len == 0 {
            return Ok(());
        }
        let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut sink = self.sink.lock();
        let mut at = offset;
        let mut done = Ok(());
        while at < offset + len && done.is_ok() {
            let n = (zeros.len() as u64).min(offset + len - at) as usize;
            done = self
                .file
                .write_all_at(&zeros[..n], at)
                .map_err(|e| io_errno(&e));
            at += n as u64;
        }
        match done.and_then(|()| self.sync(fua)) {
            Ok(()) => self.record(&mut sink, Change::Zero { offset, len }),
            Err(errno) => self.record_failed(&mut sink, offset, len, errno),
        }
    }

    fn flush(&self) -> Result<(), u32> {
        let mut sink = self.sink.lock();
        self.file.sync_data().map_err(|e| io_errno(&e))?;
        if sink.is_some() {
            return Ok(());
        }
        let m = self.ids.marker(&self.state.disk_id, MarkerKind::Crash, "");
        self.record(&mut sink, Change::Marker(m))
    }
}

/// The disks of one agent and their one marker clock: marker requests and status, as the
/// control API and the periodic markers use them.
#[derive(Debug)]
pub struct Controls {
    disks: Vec<Arc<FileDisk>>,
    group: String,
    ids: Arc<MarkerIds>,
    quiesce: Option<String>,
}

impl Controls {
    pub fn status(&self) -> Vec<DiskStatus> {
        self.disks.iter().map(|d| d.state.status()).collect()
    }

    /// Cuts a marker now, on `disk_id` alone or (`None`) on every disk at one instant with
    /// the group's name; an app marker runs the quiesce hook (once) around it.
    pub async fn marker(
        &self,
        disk_id: Option<&str>,
        kind: MarkerKind,
        tag: &str,
    ) -> Result<Marker, MarkerError> {
        let (disks, prefix, group) = match disk_id {
            Some(id) => {
                let disk = self.disks.iter().find(|d| d.state.disk_id == id);
                let disk = disk.ok_or_else(|| MarkerError::UnknownDisk(id.to_string()))?;
                (vec![disk.clone()], id, "")
            }
            // Without a group there is one disk (the config requires a group for several).
            None if self.group.is_empty() => {
                (self.disks.clone(), self.disks[0].state.disk_id.as_str(), "")
            }
            None => (self.disks.clone(), self.group.as_str(), self.group.as_str()),
        };
        let hook = match (kind, &self.quiesce) {
            (MarkerKind::App, Some(cmd)) => Some(cmd.as_str()),
            _ => None,
        };
        if let Some(cmd) = hook
            && let Err(e) = run_hook(cmd, "freeze").await
        {
            // Undo whatever part of the freeze happened; its own failure is secondary.
            let _ = run_hook(cmd, "thaw").await;
            let e = format!("app marker not cut: {cmd} freeze: {e}");
            for d in &disks {
                d.state.failed(e.clone());
            }
            return Err(MarkerError::Hook(e));
        }
        let mut marker = self.ids.marker(prefix, kind, tag);
        marker.group = group.to_string();
        let cut = {
            let disks = disks.clone();
            tokio::task::spawn_blocking(move || cut(&disks, marker))
                .await
                .unwrap_or(Err(MarkerError::Stopped))
        };
        if let Some(cmd) = hook
            && let Err(e) = run_hook(cmd, "thaw").await
        {
            for d in &disks {
                d.state.failed(format!("{cmd} thaw: {e}"));
            }
        }
        cut
    }
}

/// Queues `marker` on every disk of `disks` behind every change recorded so far, with every
/// disk's writers held meanwhile (module invariants). Blocking.
fn cut(disks: &[Arc<FileDisk>], marker: Marker) -> Result<Marker, MarkerError> {
    let sinks: Vec<_> = disks.iter().map(|d| d.sink.lock()).collect();
    if sinks.iter().any(|s| s.is_some()) {
        return Err(MarkerError::NotConsistentYet);
    }
    for d in disks {
        d.queue
            .send(Change::Marker(marker.clone()))
            .map_err(|_| MarkerError::Stopped)?;
    }
    drop(sinks);
    Ok(marker)
}

/// Runs `CMD ARG` (through the shell, so that CMD may carry arguments) and waits for it.
async fn run_hook(cmd: &str, arg: &str) -> Result<(), String> {
    let status = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{cmd} {arg}"))
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("exited with {status}"))
    }
}

/// One disk of a running replication.
#[derive(Debug)]
pub struct Replica {
    pub nbd_addr: SocketAddr,
    pub state: Arc<DiskState>,
}

/// A running replication.
#[derive(Debug)]
pub struct Replication {
    /// In the order of the config's disks.
    pub disks: Vec<Replica>,
    pub control_addr: Option<SocketAddr>,
    /// One stream per disk; dropping the set stops them.
    streams: JoinSet<ReplicateError>,
    helpers: Vec<JoinHandle<()>>,
}

impl Replication {
    /// Waits until replication stops, which only an error on one of the disks does.
    pub async fn wait(mut self) -> ReplicateError {
        match self.streams.join_next().await {
            Some(Ok(e)) => e,
            _ => ReplicateError::Stopped,
        }
    }
}

impl Drop for Replication {
    fn drop(&mut self) {
        for h in &self.helpers {
            h.abort();
        }
    }
}

async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), ReplicateError> {
    let listening = |source| ReplicateError::Listening {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(listening)?;
    let local = listener.local_addr().map_err(listening)?;
    Ok((listener, local))
}

/// A disk opened and its NBD address bound, not yet served.
struct Opened {
    source: Source,
    disk: Arc<FileDisk>,
    changes: std::sync::mpsc::Receiver<Change>,
    nbd: TcpListener,
    nbd_addr: SocketAddr,
}

async fn open_disk(d: &mut DiskConfig, ids: &Arc<MarkerIds>) -> Result<Opened, ReplicateError> {
    let path = d.path.clone();
    let (source, file) = tokio::task::spawn_blocking(move || open(&path))
        .await
        .expect("opening the disk does not panic")?;
    let capacity = source.capacity();
    d.target.disk.capacity = capacity;
    protocol::disk::check_disk_info(&d.target.disk).map_err(ReplicateError::DeclaringDisk)?;
    let (nbd, nbd_addr) = bind(&d.nbd_listen).await?;
    let (queue, changes) = std::sync::mpsc::sync_channel(CHANGE_QUEUE);
    let disk = Arc::new(FileDisk {
        file,
        size: capacity,
        sink: Mutex::new(Some(DirtyMap::new(capacity))),
        queue,
        ids: ids.clone(),
        state: Arc::new(DiskState::new(&d.target.disk.disk_id, &d.target.disk.name)),
    });
    Ok(Opened {
        source,
        disk,
        changes,
        nbd,
        nbd_addr,
    })
}

/// Opens every disk, binds the listeners and starts replicating; returns once the NBD
/// exports are being served (the initial passes go on in the background).
pub async fn start(mut cfg: ReplicateConfig) -> Result<Replication, ReplicateError> {
    if cfg.disks.is_empty() {
        return Err(ReplicateError::NoDisk);
    }
    let ids = Arc::new(MarkerIds::default());
    let mut opened = Vec::with_capacity(cfg.disks.len());
    for d in &mut cfg.disks {
        opened.push(open_disk(d, &ids).await?);
    }
    let control = match &cfg.control {
        Some((addr, pass)) => Some((bind(addr).await?, pass.clone())),
        None => None,
    };
    let controls = Arc::new(Controls {
        disks: opened.iter().map(|o| o.disk.clone()).collect(),
        group: cfg.group.clone(),
        ids,
        quiesce: cfg.app_quiesce_cmd.clone(),
    });
    let mut helpers = Vec::new();
    let mut control_addr = None;
    if let Some(((listener, addr), pass)) = control {
        control_addr = Some(addr);
        helpers.push(tokio::spawn(control::serve(
            listener,
            pass,
            controls.clone(),
        )));
    }
    if cfg.app_quiesce_cmd.is_none() {
        tracing::info!(
            "no --app-quiesce-cmd: no periodic app-consistent markers (crash-consistent every {})",
            humantime::format_duration(cfg.crash_interval)
        );
    }
    let app_interval = cfg.app_quiesce_cmd.is_some().then_some(cfg.app_interval);
    helpers.push(tokio::spawn(clock(
        controls,
        cfg.crash_interval,
        app_interval,
    )));
    let cfg = Arc::new(cfg);
    let mut streams = JoinSet::new();
    let disks = opened
        .into_iter()
        .enumerate()
        .map(|(index, o)| spawn_disk(&mut streams, &mut helpers, cfg.clone(), index, o))
        .collect();
    Ok(Replication {
        disks,
        control_addr,
        streams,
        helpers,
    })
}

/// Serves disk `index` over NBD (in `helpers`) and replicates it on its own stream (in
/// `streams`).
fn spawn_disk(
    streams: &mut JoinSet<ReplicateError>,
    helpers: &mut Vec<JoinHandle<()>>,
    cfg: Arc<ReplicateConfig>,
    index: usize,
    o: Opened,
) -> Replica {
    helpers.push(tokio::spawn(server::serve(o.nbd, o.disk.clone())));
    let d = &cfg.disks[index];
    tracing::info!("serving {} over NBD on {}", d.path.display(), o.nbd_addr);
    let replica = Replica {
        nbd_addr: o.nbd_addr,
        state: o.disk.state.clone(),
    };
    let disk_id = d.target.disk.disk_id.clone();
    streams.spawn(async move {
        let e = replicate(&cfg, index, o.source, o.disk, o.changes).await;
        // With several disks, say which one stopped.
        match cfg.disks.len() {
            1 => e,
            _ => ReplicateError::OfDisk {
                disk_id,
                source: Box::new(e),
            },
        }
    });
    replica
}

fn open(path: &Path) -> Result<(Source, File), ReplicateError> {
    let source = Source::open(path)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| ReplicateError::OpeningForWrite {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((source, file))
}

/// The marker clock of the agent's disks: a crash-consistent marker on every disk each
/// `crash` (the first after `crash`), and an app-consistent one each `app`, if given.
async fn clock(controls: Arc<Controls>, crash: Duration, app: Option<Duration>) {
    let ticker = |every: Duration| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    };
    let mut crash_tick = ticker(crash);
    let mut app_tick = app.map(ticker);
    loop {
        let kind = tokio::select! {
            _ = crash_tick.tick() => MarkerKind::Crash,
            _ = async {
                match &mut app_tick {
                    Some(t) => t.tick().await,
                    None => std::future::pending().await,
                }
            } => MarkerKind::App,
        };
        match controls.marker(None, kind, "").await {
            Ok(m) if kind == MarkerKind::App => tracing::info!("app-consistent marker {}", m.id),
            Ok(m) => tracing::debug!("crash-consistent marker {}", m.id),
            // Already recorded in the status by `marker`.
            Err(MarkerError::Hook(_)) => {}
            // A disk is being resynchronised: its resync end is the next point.
            Err(MarkerError::NotConsistentYet) => {
                tracing::debug!("no periodic marker: a disk is being resynchronised");
            }
            Err(e) => tracing::warn!("no periodic marker: {e}"),
        }
    }
}

/// Connects, starts the producer and sends until an error that retrying cannot cure.
async fn replicate(
    cfg: &ReplicateConfig,
    index: usize,
    source: Source,
    disk: Arc<FileDisk>,
    changes: std::sync::mpsc::Receiver<Change>,
) -> ReplicateError {
    let DiskConfig { target, path, .. } = &cfg.disks[index];
    let state = disk.state.clone();
    let mut retry = Retry::new(cfg.retry_for);
    let session = match retry.connect(target).await {
        Ok(s) => s,
        Err(e) => return e.into(),
    };
    let welcome = session.welcome.clone();
    tracing::info!(
        "replicating {} ({} bytes) as disk {}: the process server holds seq {}",
        path.display(),
        disk.size,
        target.disk.disk_id,
        welcome.cached_seq
    );
    // Only the differences, if the target already has the disk.
    let hashes = match diff::fetch(target, DEFAULT_CHUNK).await {
        Ok(Hashes::Pages(pages)) => Some(pages),
        Ok(Hashes::Unavailable(why)) => {
            tracing::info!("{why}: the initial pass is a full pass");
            None
        }
        Err(e) => {
            tracing::warn!("{e}; the initial pass is a full pass");
            None
        }
    };
    let (tx, rx) = mpsc::channel(PRODUCER_AHEAD);
    let plan = BatchPlan {
        disk_id: target.disk.disk_id.clone(),
        first_seq: welcome.cached_seq + 1,
        batch_data: cfg.batch_data,
        linger: cfg.linger,
        overflow_grace: cfg.overflow_grace,
    };
    let thread_state = state.clone();
    let rt = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("replicator".into())
        .spawn(move || {
            let pipeline = Pipeline {
                disk: &disk,
                changes: &changes,
                tx: &tx,
                rt: &rt,
                state: &thread_state,
            };
            produce(&pipeline, source, hashes, plan);
        });
    if let Err(e) = spawned {
        return ReplicateError::StartingProducer(e);
    }
    let mut transfer =
        Transfer::new(&welcome, cfg.window_bytes, rx, false, state.meter.clone()).endless();
    match retry.drive(session, &mut transfer, target).await {
        Ok(()) => ReplicateError::Stopped,
        Err(e) => e.into(),
    }
}

/// What the producer thread works with.
struct Pipeline<'a> {
    disk: &'a FileDisk,
    changes: &'a std::sync::mpsc::Receiver<Change>,
    tx: &'a mpsc::Sender<Result<Batch, ScanError>>,
    /// The runtime of the transfer, to wait for room in `tx` with a timeout.
    rt: &'a tokio::runtime::Handle,
    state: &'a DiskState,
}

/// The producer thread: initial pass, catch-up, then continuous batches, falling back to
/// the dirty bitmap and back as often as the transfer overflows (module docs).
fn produce(p: &Pipeline<'_>, mut source: Source, hashes: Option<HashPages>, mut plan: BatchPlan) {
    let Pipeline {
        disk,
        changes,
        tx,
        rt,
        state,
    } = *p;
    let mut emit = |b: Batch| {
        let seq = b.seq;
        tx.blocking_send(Ok(b)).map_err(|_| Cancelled)?;
        state.produced(seq, None);
        Ok(())
    };
    let mut hashes = hashes;
    loop {
        let resynced = resync(&mut source, hashes.take(), disk, &plan, state, &mut emit);
        match resynced {
            Ok(Some(next)) => plan.first_seq = next,
            Ok(None) => return,
            Err(e) => {
                state.failed(e.to_string());
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
        state.set_mode(Mode::Continuous);
        let end = run_batcher(&plan, changes, tx, rt, &mut |seq, marker| {
            state.produced(seq, marker)
        });
        let BatcherEnd::Overflow { unsent, extent } = end else {
            return;
        };
        // The seq of the batch that found no room is free again: the resync takes it.
        plan.first_seq = unsent.seq;
        state.set_mode(Mode::Bitmap);
        tracing::warn!(
            "disk {}: the process server takes no more batches and {} bytes wait unacknowledged; \
             tracking writes in a dirty bitmap until it does",
            state.disk_id,
            state.meter.window_bytes.load(Ordering::Relaxed)
        );
        disk.fall_back(&unsent, extent, changes);
        // Wait for room without holding any: the resync's first batch will take it.
        if rt.block_on(tx.reserve()).is_err() {
            return;
        }
    }
}

/// A resync interval that brings the target up to date with FILE: the initial pass
/// (differential or full) when `first_pass`, then rounds over the dirty bitmap, the last
/// with the writers held. Returns the next seq, or `None` when the transfer went away.
fn resync(
    source: &mut Source,
    hashes: Option<HashPages>,
    disk: &FileDisk,
    plan: &BatchPlan,
    state: &DiskState,
    emit: &mut dyn FnMut(Batch) -> Result<(), Cancelled>,
) -> Result<Option<u64>, ScanError> {
    let stats = ScanStats::default();
    let mut scan = ScanPlan {
        disk_id: plan.disk_id.clone(),
        first_seq: plan.first_seq,
        batch_data: plan.batch_data,
        marker_tag: None,
        read_chunk: READ_CHUNK,
    };
    let first_part = match (state.mode(), hashes) {
        (Mode::FullSync, None) => scan_part(source, &scan, &stats, Part::Whole, false, emit)?,
        (Mode::FullSync, Some(pages)) => {
            let counts = DiffCounts::default();
            let next = differential_pass(source, &scan, &stats, &counts, pages, false, emit)?;
            tracing::info!(
                "differential pass: {} of {} chunks differed",
                counts.differing.load(Ordering::Relaxed),
                counts.chunks.load(Ordering::Relaxed)
            );
            next
        }
        // After a bitmap fallback, the dirty rounds are the whole interval.
        _ => Some(scan.first_seq),
    };
    let Some(next) = first_part else {
        return Ok(None);
    };
    scan.first_seq = next;
    state.set_mode(Mode::CatchUp);
    for _ in 0..CATCH_UP_ROUNDS {
        let dirty = {
            let mut sink = disk.sink.lock();
            let map = sink.as_mut().expect("tracking until the interval ends");
            if map.bytes() <= FINAL_ROUND {
                break;
            }
            map.take()
        };
        tracing::info!("catching up with {} dirty bytes", dirty.bytes());
        let Some(next) = scan_part(
            source,
            &scan,
            &stats,
            Part::Ranges(&mut dirty.ranges()),
            false,
            emit,
        )?
        else {
            return Ok(None);
        };
        scan.first_seq = next;
    }
    // The last round holds the writers, so that RESYNC_END marks a state FILE really had.
    let mut sink = disk.sink.lock();
    let dirty = sink.take().expect("tracking until the interval ends");
    let next = scan_part(
        source,
        &scan,
        &stats,
        Part::Ranges(&mut dirty.ranges()),
        true,
        emit,
    )?;
    drop(sink);
    if next.is_some() {
        tracing::info!("the target is consistent; replicating continuously");
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails partway (ENOSPC on a small tmpfs, after FILE took some of it)
    /// must still reach the target as what FILE now holds: queued from a read-back while
    /// changes stream, marked dirty in bitmap mode. It was dropped: FILE changed and the
    /// target never learned.
    #[test]
    fn a_write_that_fails_partway_still_reaches_the_target() {
        let dir = tempfile::tempdir().unwrap();
        for tracking in [false, true] {
            let mnt = dir.path().join(format!("fs-{tracking}"));
            std::fs::create_dir_all(&mnt).unwrap();
            let _fs = match protocol::testing::Tmpfs::mount(&mnt, "65536") {
                Ok(fs) => fs,
                Err(e) => {
                    eprintln!("SKIPPED: cannot mount a tmpfs (needs root): {e}");
                    return;
                }
            };
            let path = mnt.join("source.raw");
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            let size = 1u64 << 20;
            file.set_len(size).unwrap();
            let (queue, changes) = std::sync::mpsc::sync_channel(64);
            let disk = FileDisk {
                file,
                size,
                sink: Mutex::new(tracking.then(|| DirtyMap::new(size))),
                queue,
                ids: Arc::default(),
                state: Arc::new(DiskState::new("d", "d")),
            };
            // 256 KiB into a 64 KiB volume: some pages are written, then ENOSPC.
            let e = disk.write(0, vec![7u8; 256 << 10], false).unwrap_err();
            assert_eq!(e, libc::ENOSPC as u32);
            let held = disk.read(0, 256 << 10).unwrap();
            assert!(held[..4096].iter().all(|&b| b == 7), "FILE took part of it");
            if tracking {
                let sink = disk.sink.lock();
                let marked: Vec<_> = sink.as_ref().unwrap().ranges().collect();
                assert_eq!(marked, vec![(0, 256 << 10)], "the range is re-read later");
            } else {
                // Queued: exactly what FILE holds over the whole range.
                let mut queued = vec![0u8; 256 << 10];
                while let Ok(c) = changes.try_recv() {
                    let Change::Write { offset, data } = c else {
                        panic!("only writes are queued");
                    };
                    queued[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                }
                assert!(queued == held, "the queue holds FILE's bytes");
            }
        }
    }
}
