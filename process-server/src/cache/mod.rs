//! The cache volume: every batch an agent sends is made durable here before it is
//! acknowledged, and stays until the master target has applied it.
//!
//! Watermarks, per disk (documented on `crate::disks::DiskState` too):
//! `appended >= durable (cached) >= applied at the master target`. Only `durable` records are
//! acknowledged to agents or forwarded; only segments whose every record is at or below the
//! *persisted* applied floor of its disk are retired (kept for reuse or deleted).
//!
//! Layout of the directory: `NNNNNNNNNNNNNNNN.seg` segments ([`segment`]), up to
//! [`log::MAX_FREE`] retired segments `NNNNNNNNNNNNNNNN.free` kept for reuse, the disk
//! registry (`crate::registry`), and a `lock` file held with `flock` while a server uses the
//! directory. Usage and the quota count record and header bytes; on disk the active segment's
//! preallocated tail and the free files take up to `(1 + MAX_FREE) x segment_size` more.

pub mod flow;
pub mod index;
pub mod log;
pub mod segment;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use self::flow::Flow;
use self::index::{Index, Loc};
pub use self::log::Payload;
use self::log::{Append, Damage, FreePool, LogError, Writer, WriterEvents};
use crate::budget::Share;

/// Depth of the append queue in front of the writer thread (requests, each up to one batch).
/// Its bytes are bounded by the ingest memory budget each request holds a share of
/// (`crate::budget`).
const APPEND_QUEUE: usize = 1024;

/// Called, in log order, for every record once it is durable: `(disk, seq, record bytes)`.
pub type OnDurable = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot create cache directory {path}: {source}")]
    CreatingDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cache directory {path} is in use by another process-server ({source})")]
    Locked {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Sizing of the cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// A segment is sealed once it would grow beyond this many bytes.
    pub segment_size: u64,
    /// Bytes the cache may use.
    pub quota: u64,
    /// Agents are paused above this percentage of the quota.
    pub high_water_percent: u8,
}

pub struct Cache {
    dir: PathBuf,
    index: Arc<Mutex<Index>>,
    flow: Arc<Flow>,
    syncs: Arc<AtomicU64>,
    active_seq: Arc<AtomicU64>,
    free: FreePool,
    tx: Mutex<Option<mpsc::Sender<Append>>>,
    /// The writer, until `start` moves it onto its thread.
    pending: Mutex<Option<(log::Active, mpsc::Receiver<Append>)>>,
    segment_size: u64,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The `flock` on `DIR/lock`: held until [`Cache::close`], not until the last clone of
    /// the server's context drops (a stream task may outlive the server by a moment, and a
    /// restarted server must not find the directory still locked).
    lock: Mutex<Option<File>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cache({})", self.dir.display())
    }
}

struct Events {
    /// The cache volume, named in the fatal error agents and status show.
    dir: PathBuf,
    index: Arc<Mutex<Index>>,
    flow: Arc<Flow>,
    on_durable: OnDurable,
}

impl WriterEvents for Events {
    fn durable(&self, group: &[Append], locs: &[Loc]) {
        self.flow
            .committed(locs.iter().map(|l| u64::from(l.len)).sum());
        {
            let mut ix = self.index.lock();
            for (a, loc) in group.iter().zip(locs) {
                ix.insert(&a.disk_id, a.seq, *loc);
            }
        }
        for (a, loc) in group.iter().zip(locs) {
            (self.on_durable)(&a.disk_id, a.seq, u64::from(loc.len));
        }
    }
    fn grew(&self, bytes: u64) {
        self.flow.grew(bytes);
    }
    fn no_space(&self, full: bool) {
        self.flow.set_no_space(full);
    }
    fn wait_for_space(&self) {
        self.flow.wait_for_space();
    }
    fn fatal(&self, error: &LogError) {
        self.flow.set_fatal(format!(
            "cache volume {} failed: {error}",
            self.dir.display()
        ));
    }
}

fn lock_dir(dir: &Path) -> Result<File, CacheError> {
    let path = dir.join("lock");
    let shown = path.display().to_string();
    let f = File::create(&path).map_err(|source| CacheError::Locked {
        path: shown.clone(),
        source,
    })?;
    // SAFETY: flock on a file descriptor we own and keep open; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(CacheError::Locked {
            path: dir.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(f)
}

impl Cache {
    /// Opens (creating if needed) the cache in `cfg.dir` and recovers it: torn tail truncated,
    /// index rebuilt. Blocking; the writer starts with [`Cache::start`].
    pub fn open(cfg: &CacheConfig) -> Result<(Cache, Vec<Damage>), CacheError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|source| CacheError::CreatingDir {
            path: cfg.dir.display().to_string(),
            source,
        })?;
        let lock = lock_dir(&cfg.dir)?;
        let rec = log::recover(&cfg.dir, cfg.segment_size)?;
        if rec.truncated > 0 {
            tracing::warn!(bytes = rec.truncated, "cache recovery cut a torn tail");
        }
        let flow = Arc::new(Flow::new(rec.usage, cfg.quota, cfg.high_water_percent));
        let syncs = Arc::new(AtomicU64::new(0));
        let active_seq = Arc::new(AtomicU64::new(rec.active.seq));
        let (tx, rx) = mpsc::channel(APPEND_QUEUE);
        let index = Arc::new(Mutex::new(rec.index));
        Ok((
            Cache {
                dir: cfg.dir.clone(),
                index,
                flow,
                syncs,
                active_seq,
                free: Arc::new(Mutex::new(rec.free)),
                tx: Mutex::new(Some(tx)),
                pending: Mutex::new(Some((rec.active, rx))),
                segment_size: cfg.segment_size,
                thread: Mutex::new(None),
                lock: Mutex::new(Some(lock)),
            },
            rec.damage,
        ))
    }

    /// Starts the writer thread; `on_durable` runs on it for every durable record.
    pub fn start(&self, on_durable: OnDurable) -> std::io::Result<()> {
        let Some((active, rx)) = self.pending.lock().take() else {
            return Ok(());
        };
        let writer = Writer {
            dir: self.dir.clone(),
            active,
            segment_size: self.segment_size,
            events: Arc::new(Events {
                dir: self.dir.clone(),
                index: self.index.clone(),
                flow: self.flow.clone(),
                on_durable,
            }),
            syncs: self.syncs.clone(),
            active_seq: self.active_seq.clone(),
            free: self.free.clone(),
            buf: Vec::new(),
        };
        let handle = std::thread::Builder::new()
            .name("cache-writer".into())
            .spawn(move || writer.run(rx))?;
        *self.thread.lock() = Some(handle);
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn flow(&self) -> &Arc<Flow> {
        &self.flow
    }

    /// Data syncs done so far (one per group commit).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Queues a record holding `hold` of the memory budget (given back once it is durable);
    /// the receiver completes after the group commit that made it durable.
    pub async fn append(
        &self,
        disk_id: &str,
        seq: u64,
        time_unix_ms: i64,
        batch: Payload,
        hold: Share,
    ) -> Result<oneshot::Receiver<Result<Loc, Arc<LogError>>>, LogError> {
        let tx = self.tx.lock().clone().ok_or(LogError::WriterStopped)?;
        let bytes = segment::record_len(disk_id, batch.len());
        self.flow.queued(bytes as u64);
        let (done, rx) = oneshot::channel();
        tx.send(Append {
            disk_id: disk_id.to_string(),
            seq,
            time_unix_ms,
            batch,
            done,
            hold,
        })
        .await
        .map_err(|_| LogError::WriterStopped)?;
        Ok(rx)
    }

    /// Runs `f` on the index.
    pub fn with_index<R>(&self, f: impl FnOnce(&mut Index) -> R) -> R {
        f(&mut self.index.lock())
    }

    /// Reads the batches at `locs` (off the async workers).
    pub async fn read(&self, locs: Vec<(String, u64, Loc)>) -> Vec<Result<Bytes, LogError>> {
        let dir = self.dir.clone();
        let n = locs.len();
        tokio::task::spawn_blocking(move || {
            locs.iter()
                .map(|(disk, seq, loc)| log::read_record(&dir, *loc, disk, *seq))
                .collect()
        })
        .await
        .unwrap_or_else(|_| (0..n).map(|_| Err(LogError::TaskFailed)).collect())
    }

    /// Retires every sealed segment whose records are all at or below the persisted applied
    /// floor of their disk (`floor` returns `None` for disks whose records must be kept): it
    /// is kept for reuse or deleted ([`log::retire_segment`]). Returns how many were retired.
    pub async fn retire_applied(
        &self,
        floor: impl Fn(&str) -> Option<u64>,
    ) -> Result<usize, LogError> {
        let active = self.active_seq.load(Ordering::Acquire);
        let victims = self.index.lock().deletable(active, floor);
        for &seq in &victims {
            let (dir, free) = (self.dir.clone(), self.free.clone());
            // A full volume needs the space now more than a file to reuse later.
            let keep = !self.flow.out_of_space();
            tokio::task::spawn_blocking(move || log::retire_segment(&dir, seq, &free, keep))
                .await
                .map_err(|_| LogError::TaskFailed)??;
            let bytes = self.index.lock().remove_segment(seq);
            self.flow.shrank(bytes);
            tracing::debug!(segment = seq, bytes, "retired fully applied cache segment");
        }
        Ok(victims.len())
    }

    /// Stops taking appends and waits until the writer finished its last group commit.
    pub async fn close(&self) {
        self.tx.lock().take();
        self.pending.lock().take();
        let handle = self.thread.lock().take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        // The writer is gone: nothing appends any more, so the directory is free.
        self.lock.lock().take();
    }
}

#[cfg(test)]
mod tests;
