//! Continuous replication: the changes acknowledged to NBD clients, in acknowledgement order,
//! cut into batches.
//!
//! ```text
//!  NBD writers / control / timers --[bounded sync channel of Change]--> Batcher (own thread)
//!      --[bounded channel of Batch]--> Transfer / Session
//! ```
//!
//! Invariants: changes enter the channel in the order they were acknowledged (the producer
//! of writes holds one lock across "write the file" and "queue the change"), and the batcher
//! keeps that order: seqs follow one another, a change overlapping one already in the open
//! batch closes that batch first ([`BatchBuilder::overlaps`]), so applying the batches in
//! seq order replays the writes in order. A marker closes its batch, so it takes effect
//! after every change queued before it and before any queued after. A batch is closed at
//! the data budget, at a marker, or [`Linger`] after its first change, so a quiet disk's
//! last writes leave within that time. Continuous batches carry no resync flag.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use protocol::batch::BatchBuilder;
use protocol::limits::MAX_NAME_LEN;
use protocol::pb::{Batch, Marker, MarkerKind};
use tokio::sync::mpsc;

use crate::scan::{Cancelled, ScanError};

/// Default time a batch waits for more changes once it holds one (bounds the RPO a quiet
/// disk adds).
pub const LINGER: Duration = Duration::from_millis(50);
/// Changes queued between the NBD writers and the batcher; past it, writers wait until the
/// batcher takes one. Counted in changes: at most this many NBD payloads (each at most
/// 32 MiB, typically 4 KiB to 1 MiB) wait here.
pub const CHANGE_QUEUE: usize = 16;
/// Default [`BatchPlan::overflow_grace`].
pub const OVERFLOW_GRACE: Duration = Duration::from_secs(1);

/// One acknowledged change.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    Marker(Marker),
}

/// Makes markers with ids unique for the life of the process (one maker per agent, shared
/// by its disks, so that a group marker's id is unique on each of them).
#[derive(Debug, Default)]
pub struct MarkerIds {
    next: AtomicU64,
}

impl MarkerIds {
    /// A marker of `kind` cut now, in no group: id `<prefix>-<kind>-<ms>-<n>`, the prefix
    /// being the disk id (or the group's name for a group marker).
    pub fn marker(&self, prefix: &str, kind: MarkerKind, tag: &str) -> Marker {
        let now = protocol::now_unix_ms();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let kind_name = match kind {
            MarkerKind::App => "app",
            MarkerKind::User => "user",
            MarkerKind::Crash | MarkerKind::Unspecified => "crash",
        };
        let mut id = format!("{prefix}-{kind_name}-{now}-{n}");
        if id.len() > MAX_NAME_LEN {
            id = format!("{kind_name}-{now}-{n}");
        }
        Marker {
            id,
            kind: kind as i32,
            time_unix_ms: now,
            group: String::new(),
            tag: tag.to_string(),
        }
    }
}

/// How the batcher cuts and numbers batches.
#[derive(Debug, Clone)]
pub struct BatchPlan {
    pub disk_id: String,
    pub first_seq: u64,
    pub batch_data: usize,
    pub linger: Duration,
    /// How long a finished batch may wait for room in the transfer (whose window is full)
    /// before the batcher gives up on memory and falls back to the dirty bitmap.
    pub overflow_grace: Duration,
}

/// Notified after every batch handed on: its seq and the marker it carries, if any.
pub type OnBatch<'a> = &'a mut dyn FnMut(u64, Option<&Marker>);

/// Why the batcher stopped.
#[derive(Debug)]
pub enum BatcherEnd {
    /// The transfer went away (or the change channel closed): replication is over.
    Stopped,
    /// The transfer had no room for `unsent` within the grace: the caller falls back to the
    /// dirty bitmap. `unsent` was not handed on (its seq is free again), and `extent` is the
    /// range of the change being batched, of which only a part may be in `unsent`.
    Overflow {
        unsent: Box<Batch>,
        extent: Option<(u64, u64)>,
    },
}

/// Why a batch could not be handed on.
enum Halt {
    Cancelled,
    Overflow(Box<Batch>),
}

impl From<Cancelled> for Halt {
    fn from(_: Cancelled) -> Self {
        Halt::Cancelled
    }
}

impl Change {
    /// The byte range a write or zero change covers.
    pub fn extent(&self) -> Option<(u64, u64)> {
        match self {
            Change::Write { offset, data } => Some((*offset, data.len() as u64)),
            Change::Zero { offset, len } => Some((*offset, *len)),
            Change::Marker(_) => None,
        }
    }
}

/// Runs until the change channel closes (every sender gone), the receiver of batches goes
/// away, or the transfer stays full for longer than the grace. Blocking: run it on its own
/// thread; `rt` is the runtime the transfer runs on (to wait for room with a timeout).
/// Periodic markers are not cut here: they arrive as changes from the group's clock
/// (`replicate`), which cuts them on every disk of the group at one instant.
pub fn run_batcher(
    plan: &BatchPlan,
    changes: &Receiver<Change>,
    out: &mpsc::Sender<Result<Batch, ScanError>>,
    rt: &tokio::runtime::Handle,
    on_batch: OnBatch<'_>,
) -> BatcherEnd {
    let mut b = Batcher {
        builder: BatchBuilder::new(),
        plan,
        next_seq: plan.first_seq,
        opened: None,
        emit: &mut |batch: Batch| {
            // The timer is built inside `block_on`, where the runtime's time driver is.
            let wait = async { tokio::time::timeout(plan.overflow_grace, out.reserve()).await };
            let permit = match rt.block_on(wait) {
                Ok(Ok(permit)) => permit,
                Ok(Err(_closed)) => return Err(Halt::Cancelled),
                Err(_elapsed) => return Err(Halt::Overflow(Box::new(batch))),
            };
            let (seq, marker) = (batch.seq, batch.markers.last().cloned());
            permit.send(Ok(batch));
            on_batch(seq, marker.as_ref());
            Ok(())
        },
    };
    loop {
        // An open batch waits for more changes at most until its linger ends.
        let received = match b.opened {
            Some(opened) => changes
                .recv_timeout((opened + plan.linger).saturating_duration_since(Instant::now())),
            None => changes.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let mut extent = None;
        let step = match received {
            Ok(change) => {
                extent = change.extent();
                b.push(change)
            }
            Err(RecvTimeoutError::Timeout) => b.cut(),
            Err(RecvTimeoutError::Disconnected) => {
                let _ = b.cut();
                return BatcherEnd::Stopped;
            }
        };
        match step {
            Ok(()) => {}
            Err(Halt::Cancelled) => return BatcherEnd::Stopped,
            // `cut` empties the builder before it emits, so `unsent` is all it held.
            Err(Halt::Overflow(unsent)) => return BatcherEnd::Overflow { unsent, extent },
        }
    }
}

struct Batcher<'a> {
    builder: BatchBuilder,
    plan: &'a BatchPlan,
    next_seq: u64,
    /// When the open batch got its first change.
    opened: Option<Instant>,
    emit: &'a mut dyn FnMut(Batch) -> Result<(), Halt>,
}

impl Batcher<'_> {
    fn push(&mut self, change: Change) -> Result<(), Halt> {
        match change {
            Change::Write { mut offset, data } => {
                let budget = self.plan.batch_data;
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let n = rest.len().min(budget);
                    if self.builder.overlaps(offset, n as u64) || !self.builder.has_room(n, budget)
                    {
                        self.cut()?;
                    }
                    self.builder.push_write(offset, &rest[..n]);
                    self.opened.get_or_insert_with(Instant::now);
                    offset += n as u64;
                    rest = &rest[n..];
                }
            }
            Change::Zero { offset, len } => {
                if self.builder.overlaps(offset, len) || !self.builder.has_zero_room() {
                    self.cut()?;
                }
                self.builder.push_zero(offset, len);
                self.opened.get_or_insert_with(Instant::now);
            }
            Change::Marker(m) => {
                self.builder.push_marker(m);
                self.cut()?;
            }
        }
        Ok(())
    }

    /// Closes the open batch, if it holds anything.
    fn cut(&mut self) -> Result<(), Halt> {
        self.opened = None;
        if self.builder.is_empty() {
            return Ok(());
        }
        let batch = self.builder.finish(
            &self.plan.disk_id,
            self.next_seq,
            protocol::now_unix_ms(),
            0,
        );
        (self.emit)(batch)?;
        self.next_seq += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::batch::decode_into;

    fn plan() -> BatchPlan {
        BatchPlan {
            disk_id: "d".into(),
            first_seq: 10,
            batch_data: 8192,
            linger: Duration::from_secs(60),
            overflow_grace: Duration::from_secs(60),
        }
    }

    /// Feeds `changes`, closes the channel, and returns the batches.
    fn batches(changes: Vec<Change>) -> Vec<Batch> {
        let (tx, rx) = std::sync::mpsc::sync_channel(changes.len() + 1);
        for c in changes {
            tx.send(c).unwrap();
        }
        drop(tx);
        let (out, mut got) = mpsc::channel(64);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let end = run_batcher(&plan(), &rx, &out, rt.handle(), &mut |_, _| {});
        assert!(matches!(end, BatcherEnd::Stopped));
        drop(out);
        let mut v = Vec::new();
        while let Ok(b) = got.try_recv() {
            v.push(b.unwrap());
        }
        v
    }

    fn apply(batches: &[Batch], disk: &mut [u8]) {
        let mut buf = Vec::new();
        for b in batches {
            let d = decode_into(b, disk.len() as u64, &mut buf).unwrap();
            for (off, data) in d.writes() {
                disk[off as usize..off as usize + data.len()].copy_from_slice(data);
            }
            for z in &b.zeros {
                disk[z.offset as usize..(z.offset + z.length) as usize].fill(0);
            }
        }
    }

    #[test]
    fn overlapping_changes_keep_their_order_across_batches() {
        let w = |offset, v: u8, n| Change::Write {
            offset,
            data: vec![v; n],
        };
        let got = batches(vec![
            w(0, 1, 4096),
            w(4096, 2, 100),
            w(0, 3, 512),
            Change::Zero {
                offset: 100,
                len: 100,
            },
            w(20000, 4, 20000),
        ]);
        let seqs: Vec<u64> = got.iter().map(|b| b.seq).collect();
        assert_eq!(seqs, (10..10 + got.len() as u64).collect::<Vec<_>>());
        assert!(got.iter().all(|b| b.flags == 0));
        let mut disk = vec![9u8; 64 << 10];
        apply(&got, &mut disk);
        let mut want = vec![9u8; 64 << 10];
        want[..4096].fill(1);
        want[4096..4196].fill(2);
        want[..512].fill(3);
        want[100..200].fill(0);
        want[20000..40000].fill(4);
        assert_eq!(disk, want);
    }

    #[test]
    fn a_marker_closes_its_batch_after_the_writes_before_it() {
        let ids = MarkerIds::default();
        let m = ids.marker("d", MarkerKind::Crash, "");
        let got = batches(vec![
            Change::Write {
                offset: 0,
                data: vec![1; 512],
            },
            Change::Marker(m.clone()),
            Change::Write {
                offset: 512,
                data: vec![2; 512],
            },
        ]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].markers, vec![m]);
        assert_eq!(got[0].writes.len(), 1);
        assert!(got[1].markers.is_empty());
    }

    /// A one-worker runtime with timers: `Handle::block_on` drives timers only on a
    /// multi-thread runtime.
    fn timer_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn a_full_transfer_ends_the_batcher_with_what_it_could_not_send() {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let write = |offset| Change::Write {
            offset,
            data: vec![1; 8192],
        };
        for _ in 0..3 {
            tx.send(write(0)).unwrap();
        }
        let (out, _kept) = mpsc::channel(1);
        let rt = timer_runtime();
        let mut p = plan();
        p.overflow_grace = Duration::from_millis(10);
        p.linger = Duration::from_millis(10);
        let mut seen = Vec::new();
        let end = run_batcher(&p, &rx, &out, rt.handle(), &mut |s, _| seen.push(s));
        // The first batch filled the channel; the second, cut by the third (overlapping)
        // write, found no room.
        assert_eq!(seen, vec![10]);
        match end {
            BatcherEnd::Overflow { unsent, extent } => {
                assert_eq!(unsent.seq, 11);
                assert_eq!(extent, Some((0, 8192)));
            }
            BatcherEnd::Stopped => panic!("expected an overflow"),
        }
    }

    #[test]
    fn marker_ids_are_unique() {
        let ids = MarkerIds::default();
        let a = ids.marker("d", MarkerKind::App, "t");
        let b = ids.marker("d", MarkerKind::App, "t");
        assert_ne!(a.id, b.id);
        assert_eq!(a.kind, MarkerKind::App as i32);
        let long = ids.marker(&"x".repeat(200), MarkerKind::User, "");
        assert!(long.id.len() <= MAX_NAME_LEN);
    }
}
