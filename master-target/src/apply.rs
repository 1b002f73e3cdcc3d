//! The per-disk applier: the one owner of a disk's image, undo journal and state file.
//!
//! It runs on a dedicated thread (msync, fsync and fallocate block) and takes commands from
//! a bounded channel, fed by every connection that carries the disk's batches.
//!
//! Invariants (watermarks, per disk): `durable_seq <= admitted seq`, where the admitted seq
//! is the last batch taken into the current commit group and `durable_seq` the last one
//! whose undo, data, commit record and state file are durable. Only `durable_seq` is ever
//! acknowledged or reported.
//! * Batches are applied strictly in seq order: `seq <= admitted` is a duplicate (re-acked
//!   once durable), `admitted + 1` is admitted, anything higher waits in a reorder buffer
//!   bounded in batches ([`MAX_REORDER_BATCHES`]) and bytes ([`MAX_REORDER_BYTES`]);
//!   overflow is refused with `OutOfSequence` and the process server re-sends.
//! * A batch is fully checked and decompressed ([`Checked::new`]) by the connection that
//!   received it, before it is queued here (so that several connections decode in parallel
//!   while the applier writes), and so before any of its bytes is written: a bad batch
//!   changes nothing; when its turn comes it is refused with `BadBatch` and stops the disk
//!   at its durable seq until a connection declares the disk again.
//! * Group commit (up to [`GROUP_MAX_BATCHES`] / [`GROUP_MAX_BYTES`]), under the disk's
//!   commit lock: undo records of every batch (old bytes read from the target) are
//!   fdatasynced -> the data goes to the target (into the map, or pwrite with `--data-io
//!   pwrite`) -> msync of the span (fdatasync with pwrite) -> the commit record (seqs,
//!   times, markers in stream order) is fdatasynced -> the state file is replaced -> acks.
//!   The undo of a batch must describe the disk just before it, so a batch that overlaps
//!   an earlier batch of the open group closes that group first (then undo can be read
//!   from the target, which holds the state before the whole group).
//! * A write refused for lack of space (undo or commit record on the retention volume,
//!   grain or zero-fill on the datastore, state file) is not fatal: the journal is cut back
//!   to its last COMMIT, after restoring from the group's durable undo whatever of its data
//!   reached the target, the group's batches are refused with `Code::NoSpace`, and the disk
//!   goes on at its durable seq: re-sent batches apply once space frees.
//! * A failed sync (any errno) is fatal for the disk (never retried, PITFALLS.md §4,
//!   crate::storage): it stops with `Code::Io` until the process restarts; then the journal
//!   rolls the uncommitted group back and the process server re-sends it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use protocol::batch::{Decoded, decode_into, flags};
use protocol::error::{Code, Refusal};
use protocol::pb::Batch;
use tokio::sync::mpsc;

use crate::failpoint;
use crate::outbox::Outbox;
use crate::retention::CommitLock;
use crate::retention::journal::{BatchEntry, Commit, Journal, MarkerEntry};
use crate::state::DiskState;
use crate::storage::{SpaceError, sync_failed};
use crate::vmdk::Disk;

/// Commands queued per disk before the senders wait (h2 flow control then pushes back).
pub const QUEUE_DEPTH: usize = 64;
/// Early batches held per disk.
pub const MAX_REORDER_BATCHES: usize = 512;
/// Decompressed bytes held per disk in the reorder buffer.
pub const MAX_REORDER_BYTES: usize = 256 << 20;
/// Most batches made durable by one commit.
pub const GROUP_MAX_BATCHES: usize = 64;
/// Most uncompressed bytes made durable by one commit.
pub const GROUP_MAX_BYTES: usize = 64 << 20;

/// A batch as the applier takes it: checked and decompressed, or the refusal it earned.
#[derive(Debug)]
pub struct Checked {
    /// The batch, its compressed payload dropped.
    batch: Batch,
    data: Result<Vec<u8>, Refusal>,
}

impl Checked {
    /// Checks `batch` against the disk of `shared` and decompresses it
    /// (`protocol::batch::decode_into`) into one of its pooled buffers. CPU work of about a
    /// millisecond per MiB: run it off the async workers.
    pub fn new(mut batch: Batch, shared: &DiskShared) -> Checked {
        let mut data = shared.buffers.take();
        let data = match decode_into(&batch, shared.capacity, &mut data) {
            Ok(_) => Ok(data),
            Err(e) => Err(e.refusal(&batch.disk_id, batch.seq)),
        };
        batch.payload = Default::default();
        Checked { batch, data }
    }

    /// A batch whose seq is durable already ([`DiskShared::is_durable`]): the applier only
    /// acknowledges it again, so it is not decompressed.
    pub fn durable(mut batch: Batch) -> Checked {
        batch.payload = Default::default();
        Checked {
            batch,
            data: Ok(Vec::new()),
        }
    }

    /// Bytes it holds in memory.
    fn size(&self) -> usize {
        self.data.as_ref().map_or(0, Vec::len)
    }
}

/// A command for a disk's applier.
#[derive(Debug)]
pub enum ApplyCmd {
    /// A batch and the connection that delivered it.
    Batch {
        batch: Box<Checked>,
        from: Arc<Outbox>,
    },
    /// A connection declared the disk again: a disk stopped by a bad batch may go on.
    Resume,
    /// Commit what is admitted and stop.
    Shutdown,
}

/// What the rest of the server may see of a disk while its applier runs.
#[derive(Debug)]
pub struct DiskShared {
    pub disk_id: String,
    pub name: String,
    pub capacity: u64,
    /// Where the disk's data is (for readers such as chunk hashing).
    pub data: crate::vmdk::extent::DataRef,
    /// Highest durable seq.
    pub durable_seq: AtomicU64,
    /// Bytes applied since start (uncompressed).
    pub bytes_applied: AtomicU64,
    /// Bytes of the disk's undo journal, as of the last commit.
    pub journal_bytes: AtomicU64,
    /// Durable state as of the last commit.
    pub state: Mutex<DiskState>,
    /// Why the disk is stopped, if it is.
    pub stopped: Mutex<Option<Refusal>>,
    /// Decode buffers of committed batches, for the connections to decode into again.
    pub buffers: Buffers,
}

impl DiskShared {
    /// Whether `seq` is durable (the durable seq only grows).
    pub fn is_durable(&self, seq: u64) -> bool {
        seq <= self.durable_seq.load(Ordering::Acquire)
    }
}

/// Decode buffers handed back by the applier once their group is durable (at most
/// [`POOLED_BUFFERS`]). A new 1 MiB buffer per batch cost page faults and the kernel's
/// zeroing of every page, about a tenth of the master target's CPU in `bench apply`.
#[derive(Debug, Default)]
pub struct Buffers(Mutex<Vec<Vec<u8>>>);

/// Buffers kept per disk: one commit group's worth of default 1 MiB batches.
pub const POOLED_BUFFERS: usize = 64;

impl Buffers {
    fn take(&self) -> Vec<u8> {
        self.0.lock().pop().unwrap_or_default()
    }

    fn give(&self, buf: Vec<u8>) {
        let mut pool = self.0.lock();
        if pool.len() < POOLED_BUFFERS && buf.capacity() > 0 {
            pool.push(buf);
        }
    }
}

/// A checked, decompressed batch waiting for its group's commit.
struct Ready {
    batch: Batch,
    data: Vec<u8>,
    in_resync: bool,
}

impl Ready {
    fn decoded(&self) -> Decoded<'_> {
        Decoded {
            batch: &self.batch,
            data: &self.data,
        }
    }
}

/// Every extent a batch changes: its writes, then its zero ranges.
fn extents(b: &Batch) -> impl Iterator<Item = (u64, u64)> + '_ {
    b.writes
        .iter()
        .map(|e| (e.offset, e.length))
        .chain(b.zeros.iter().map(|z| (z.offset, z.length)))
}

/// Why a group could not be made durable.
enum Failed {
    /// A write was refused for lack of space; `data`: some of the group's bytes may be on
    /// the target already (its undo is durable).
    NoSpace { why: String, data: bool },
    /// A failed sync or another I/O error: the disk stops until restart.
    Fatal(String),
}

/// Maps a storage error of a commit step: `data` as in [`Failed::NoSpace`].
fn failed<E: SpaceError>(data: bool) -> impl FnOnce(E) -> Failed {
    move |e| {
        if e.is_no_space() {
            Failed::NoSpace {
                why: e.to_string(),
                data,
            }
        } else {
            Failed::Fatal(e.to_string())
        }
    }
}

struct Group {
    acks: Vec<Arc<Outbox>>,
    ready: Vec<Ready>,
    /// Merged, disjoint `start -> end` of every extent in `ready`.
    touched: BTreeMap<u64, u64>,
    bytes: usize,
}

impl Group {
    fn new() -> Group {
        Group {
            acks: Vec::new(),
            ready: Vec::new(),
            touched: BTreeMap::new(),
            bytes: 0,
        }
    }

    fn full(&self) -> bool {
        self.ready.len() >= GROUP_MAX_BATCHES || self.bytes >= GROUP_MAX_BYTES
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.touched
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
    }

    fn touch(&mut self, mut start: u64, mut end: u64) {
        while let Some((&s, &e)) = self.touched.range(..=end).next_back() {
            if e < start {
                break;
            }
            self.touched.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.touched.insert(start, end);
    }
}

/// The applier of one disk (see the module invariants).
pub struct Applier {
    disk: Disk,
    journal: Journal,
    commit_lock: CommitLock,
    retention: PathBuf,
    /// In-memory state: `applied_seq` is the admitted seq, ahead of the durable state
    /// until a commit.
    state: DiskState,
    durable_seq: u64,
    reorder: BTreeMap<u64, (Checked, Vec<Arc<Outbox>>)>,
    reorder_bytes: usize,
    stopped: Option<Refusal>,
    /// A sync failed: the disk stays stopped until the process restarts.
    fatal: bool,
    shared: Arc<DiskShared>,
}

impl Applier {
    pub fn new(
        disk: Disk,
        journal: Journal,
        commit_lock: CommitLock,
        retention: PathBuf,
        state: DiskState,
        shared: Arc<DiskShared>,
    ) -> Applier {
        Applier {
            disk,
            journal,
            commit_lock,
            retention,
            durable_seq: state.applied_seq,
            state,
            reorder: BTreeMap::new(),
            reorder_bytes: 0,
            stopped: None,
            fatal: false,
            shared,
        }
    }

    /// Starts the applier on its own thread; the returned sender is its only input.
    pub fn spawn(self) -> std::io::Result<(mpsc::Sender<ApplyCmd>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let handle = std::thread::Builder::new()
            .name(format!("apply-{}", self.shared.disk_id))
            .spawn(move || self.run(rx))?;
        Ok((tx, handle))
    }

    /// Serves commands until `Shutdown` or until every sender is gone.
    pub fn run(mut self, mut rx: mpsc::Receiver<ApplyCmd>) {
        while let Some(cmd) = rx.blocking_recv() {
            let mut group = Group::new();
            let mut stop = self.handle(cmd, &mut group);
            while !stop && !group.full() {
                match rx.try_recv() {
                    Ok(cmd) => stop = self.handle(cmd, &mut group),
                    Err(_) => break,
                }
            }
            self.commit(group);
            if stop {
                break;
            }
        }
        tracing::debug!(disk = %self.shared.disk_id, seq = self.durable_seq, "applier stopped");
    }

    /// Handles one command; `true` means stop after this group.
    fn handle(&mut self, cmd: ApplyCmd, group: &mut Group) -> bool {
        match cmd {
            ApplyCmd::Shutdown => return true,
            ApplyCmd::Resume => {
                if !self.fatal && self.stopped.take().is_some() {
                    *self.shared.stopped.lock() = None;
                    tracing::info!(disk = %self.shared.disk_id, "disk resumed");
                }
            }
            ApplyCmd::Batch { batch, from } => self.offer(*batch, from, group),
        }
        false
    }

    fn offer(&mut self, batch: Checked, from: Arc<Outbox>, group: &mut Group) {
        let seq = batch.batch.seq;
        if seq <= self.durable_seq {
            from.ack(&self.shared.disk_id, self.durable_seq);
            return;
        }
        if seq <= self.state.applied_seq {
            group.acks.push(from);
            return;
        }
        if let Some(r) = &self.stopped {
            from.error(r.clone());
            return;
        }
        if seq > self.state.applied_seq + 1 {
            self.hold(batch, from);
            return;
        }
        self.admit(batch, from, group);
        while let Some((batch, froms)) = self.reorder.remove(&(self.state.applied_seq + 1)) {
            self.reorder_bytes -= batch.size();
            let mut froms = froms.into_iter();
            let first = froms.next().expect("a held batch has a sender");
            group.acks.extend(froms);
            self.admit(batch, first, group);
            if self.stopped.is_some() {
                break;
            }
        }
    }

    fn hold(&mut self, batch: Checked, from: Arc<Outbox>) {
        if let Some((_, froms)) = self.reorder.get_mut(&batch.batch.seq) {
            froms.push(from);
            return;
        }
        let size = batch.size();
        if self.reorder.len() >= MAX_REORDER_BATCHES
            || self.reorder_bytes + size > MAX_REORDER_BYTES
        {
            from.error(Refusal::for_disk(
                Code::OutOfSequence,
                &self.shared.disk_id,
                format!(
                    "batch seq {} arrived while waiting for seq {} and the reorder buffer is full \
                     ({} batches, {} bytes); re-send from seq {}",
                    batch.batch.seq,
                    self.state.applied_seq + 1,
                    self.reorder.len(),
                    self.reorder_bytes,
                    self.durable_seq + 1
                ),
            ));
            return;
        }
        self.reorder_bytes += size;
        self.reorder.insert(batch.batch.seq, (batch, vec![from]));
    }

    /// Adds the next batch to the group (nothing written), or stops the disk if it is bad.
    fn admit(&mut self, checked: Checked, from: Arc<Outbox>, group: &mut Group) {
        let Checked { batch, data } = checked;
        let data = match data {
            Ok(data) => data,
            Err(r) => {
                tracing::error!(disk = %self.shared.disk_id, seq = batch.seq, "refusing batch: {r}; disk stopped");
                self.stop(r.clone());
                from.error(r);
                return;
            }
        };
        if extents(&batch).any(|(o, l)| group.overlaps(o, o + l)) {
            let full = std::mem::replace(group, Group::new());
            if let Some(r) = self.commit(full) {
                from.error(r);
                return;
            }
        }
        for (o, l) in extents(&batch) {
            group.touch(o, o + l);
        }
        let s = &mut self.state;
        s.applied_seq = batch.seq;
        s.last_batch_unix_ms = batch.time_unix_ms;
        s.in_resync = batch.flags & flags::RESYNC != 0 && batch.flags & flags::RESYNC_END == 0;
        if !s.in_resync {
            s.consistent_seq = batch.seq;
            s.consistent_unix_ms = batch.time_unix_ms;
        }
        group.acks.push(from);
        group.bytes += batch.data_len as usize;
        self.shared
            .bytes_applied
            .fetch_add(u64::from(batch.data_len), Ordering::Relaxed);
        group.ready.push(Ready {
            in_resync: s.in_resync,
            batch,
            data,
        });
    }

    fn stop(&mut self, r: Refusal) {
        // Batches held above the refused one can only be applied after it: drop them, the
        // process server re-sends from the applied seq.
        self.reorder.clear();
        self.reorder_bytes = 0;
        *self.shared.stopped.lock() = Some(r.clone());
        self.stopped = Some(r);
    }

    /// Makes the group durable (undo, data, commit record, state) and acknowledges it;
    /// returns the refusal its batches got if it failed.
    fn commit(&mut self, group: Group) -> Option<Refusal> {
        if self.fatal {
            let r = self.stopped.clone().expect("fatal implies stopped");
            refuse(&group, &r);
            return Some(r);
        }
        if !group.ready.is_empty() {
            let commit = match self.make_durable(&group) {
                Ok(c) => c,
                Err(f) => {
                    let r = self.fail(&group, f);
                    refuse(&group, &r);
                    return Some(r);
                }
            };
            self.durable_seq = self.state.applied_seq;
            self.shared
                .durable_seq
                .store(self.durable_seq, Ordering::Release);
            *self.shared.state.lock() = self.state.clone();
            // The group is durable whatever happens now: sealing and pruning wait for the
            // next commit if the volume is full.
            if let Err(e) = self.journal.maintain(&commit) {
                if e.is_no_space() {
                    tracing::warn!(disk = %self.shared.disk_id, "retention volume full: {e}; retried after the next commit");
                } else {
                    let r = self.fail(&group, Failed::Fatal(e.to_string()));
                    refuse(&group, &r);
                    return Some(r);
                }
            }
            self.shared
                .journal_bytes
                .store(self.journal.bytes(), Ordering::Relaxed);
        }
        for o in senders(&group) {
            o.ack(&self.shared.disk_id, self.durable_seq);
        }
        for r in group.ready {
            self.shared.buffers.give(r.data);
        }
        None
    }

    /// Handles a group that could not be made durable: the refusal for its batches.
    fn fail(&mut self, group: &Group, f: Failed) -> Refusal {
        let id = &self.shared.disk_id;
        let first = group
            .ready
            .first()
            .map_or(self.durable_seq, |r| r.batch.seq);
        let last = self.state.applied_seq;
        let (why, data) = match f {
            Failed::Fatal(why) => {
                let r = Refusal::for_disk(
                    Code::Io,
                    id,
                    format!(
                        "{why}; disk stopped until the master target restarts and needs a \
                         resync: a failed sync is never retried (on restart the journal rolls \
                         back what was not committed and batches are re-sent from seq {}; \
                         check the volume)",
                        self.durable_seq + 1
                    ),
                );
                tracing::error!(disk = %id, "{r}");
                self.fatal = true;
                self.stop(r.clone());
                return r;
            }
            Failed::NoSpace { why, data } => (why, data),
        };
        // Under the commit lock, like the commit itself: a `recover --out` never copies
        // the target half restored.
        let cut = self.commit_lock.lock().and_then(|_guard| {
            let target =
                data.then(|| self.disk.extent() as &mut dyn crate::retention::journal::UndoTarget);
            self.journal
                .abort_group(target)
                .map_err(std::io::Error::other)
        });
        if let Err(e) = cut {
            return self.fail(
                group,
                Failed::Fatal(format!("{why}; then cutting the group back failed: {e}")),
            );
        }
        // Back to the durable state: the group's batches are applied again when re-sent.
        self.state = self.shared.state.lock().clone();
        self.reorder.clear();
        self.reorder_bytes = 0;
        self.shared
            .bytes_applied
            .fetch_sub(group.bytes as u64, Ordering::Relaxed);
        self.shared
            .journal_bytes
            .store(self.journal.bytes(), Ordering::Relaxed);
        let r = Refusal::for_disk(
            Code::NoSpace,
            id,
            format!(
                "{why}; batches {first}..={last} were not applied (the disk stays at seq {}); \
                 free space on the volume: they apply when re-sent from seq {}",
                self.durable_seq,
                self.durable_seq + 1
            ),
        );
        tracing::warn!(disk = %id, "{r}");
        r
    }

    /// The commit order of the module docs. A lack of space is left for [`Self::fail`] to
    /// cut back; any other error leaves the disk to be rolled back by the journal at the
    /// next start.
    fn make_durable(&mut self, group: &Group) -> Result<Commit, Failed> {
        let last = self.state.applied_seq;
        let _guard = self
            .commit_lock
            .lock()
            .map_err(|e| Failed::Fatal(format!("taking the commit lock: {e}")))?;
        for r in &group.ready {
            let extent = &*self.disk.extent();
            self.journal
                .append_undo(
                    r.batch.seq,
                    r.batch.time_unix_ms,
                    extents(&r.batch),
                    |o, buf| extent.read_at(o, buf).map_err(std::io::Error::other),
                )
                .map_err(failed(false))?;
        }
        failpoint::sync_eio("journal", last).map_err(|e| {
            let path = self.journal.active_path();
            Failed::Fatal(format!("fdatasync {}: {}", path.display(), sync_failed(e)))
        })?;
        self.journal.sync().map_err(failed(false))?;
        failpoint::hit("after-undo", last);
        self.disk.renew_cid().map_err(failed(false))?;
        let extent = self.disk.extent();
        for r in &group.ready {
            for (offset, data) in r.decoded().writes() {
                extent.write(offset, data).map_err(failed(true))?;
            }
            for z in &r.batch.zeros {
                extent.zero(z.offset, z.length).map_err(failed(true))?;
            }
        }
        failpoint::sync_eio("extent", last).map_err(|e| {
            let (op, path) = (extent.sync_call(), extent.path().display());
            Failed::Fatal(format!("{op} {path}: {}", sync_failed(e)))
        })?;
        extent.sync().map_err(failed(true))?;
        failpoint::hit("after-data", last);
        let commit = Commit {
            applied_unix_ms: protocol::now_unix_ms(),
            batches: group
                .ready
                .iter()
                .map(|r| BatchEntry {
                    seq: r.batch.seq,
                    batch_unix_ms: r.batch.time_unix_ms,
                    in_resync: r.in_resync,
                    thinned: false,
                })
                .collect(),
            markers: group
                .ready
                .iter()
                .flat_map(|r| {
                    r.batch.markers.iter().map(|m| MarkerEntry {
                        seq: r.batch.seq,
                        marker: m.clone(),
                    })
                })
                .collect(),
        };
        self.journal.append_commit(&commit).map_err(failed(true))?;
        failpoint::hit("after-commit", last);
        self.state.applied_unix_ms = commit.applied_unix_ms;
        self.state.store(&self.retention).map_err(failed(true))?;
        Ok(commit)
    }
}

/// Every connection that delivered a batch of `group`, once each.
fn senders(group: &Group) -> Vec<&Arc<Outbox>> {
    let mut out: Vec<&Arc<Outbox>> = Vec::with_capacity(group.acks.len());
    for o in &group.acks {
        if !out.iter().any(|p| Arc::ptr_eq(p, o)) {
            out.push(o);
        }
    }
    out
}

/// Sends `r` once to every connection that delivered a batch of `group`.
fn refuse(group: &Group, r: &Refusal) {
    for o in senders(group) {
        o.error(r.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::journal::{History, RetentionPolicy};
    use crate::vmdk::DiskSpec;
    use protocol::batch::BatchBuilder;
    use protocol::pb::{DiskFormat, Marker, apply_message::Body};
    use std::io::Write;
    use std::path::Path;

    const CAP: u64 = 1 << 20;

    struct Fixture {
        dir: tempfile::TempDir,
        applier: Applier,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let applier = open_applier(
            &dir.path().join("ds"),
            &dir.path().join("ret"),
            DiskFormat::Vmfs,
            CAP,
        );
        Fixture { dir, applier }
    }

    /// The applier of a new disk `d1` on `ds`, its journal on `ret`.
    fn open_applier(ds: &Path, ret: &Path, format: DiskFormat, capacity: u64) -> Applier {
        std::fs::create_dir_all(ds).unwrap();
        std::fs::create_dir_all(crate::state::disks_dir(ret)).unwrap();
        let spec = DiskSpec {
            disk_id: "d1",
            name: "d1",
            capacity,
            format,
        };
        let mut disk = Disk::open_or_create(ds, &spec, crate::vmdk::Claim::New).unwrap();
        let state = DiskState {
            disk_id: "d1".into(),
            name: "d1".into(),
            capacity,
            ..Default::default()
        };
        let (journal, _) =
            Journal::open(ret, "d1", 0, RetentionPolicy::default(), disk.extent()).unwrap();
        let lock = CommitLock::open(ret, "d1").unwrap();
        let shared = Arc::new(DiskShared {
            disk_id: "d1".into(),
            name: "d1".into(),
            capacity,
            data: disk.extent().data_ref(),
            durable_seq: AtomicU64::new(0),
            bytes_applied: AtomicU64::new(0),
            journal_bytes: AtomicU64::new(0),
            state: Mutex::new(state.clone()),
            stopped: Mutex::new(None),
            buffers: Buffers::default(),
        });
        Applier::new(disk, journal, lock, ret.to_path_buf(), state, shared)
    }

    fn batch(seq: u64, fill: u8) -> Batch {
        let mut b = BatchBuilder::new();
        b.push_write(seq * 4096, &[fill; 4096]);
        b.push_marker(Marker {
            id: format!("m{seq}"),
            kind: 1,
            time_unix_ms: 5,
            group: String::new(),
            tag: String::new(),
        });
        b.finish("d1", seq, 1000 + seq as i64, 0)
    }

    fn run(a: &mut Applier, batches: Vec<Batch>, from: &Arc<Outbox>) {
        let mut g = Group::new();
        for b in batches {
            let checked = Checked::new(b, &a.shared);
            a.handle(
                ApplyCmd::Batch {
                    batch: Box::new(checked),
                    from: from.clone(),
                },
                &mut g,
            );
        }
        a.commit(g);
    }

    fn drain(o: &Outbox) -> Vec<Body> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        o.ack("zz-sentinel", 0);
        rt.block_on(o.next())
            .unwrap()
            .into_iter()
            .filter_map(|m| m.body)
            .filter(|b| !matches!(b, Body::Ack(p) if p.disk_id == "zz-sentinel"))
            .collect()
    }

    #[test]
    fn out_of_order_batches_apply_in_seq_order_and_ack_once_durable() {
        let mut f = fixture();
        let o = Arc::new(Outbox::new());
        run(&mut f.applier, vec![batch(3, 3), batch(2, 2)], &o);
        assert_eq!(f.applier.durable_seq, 0, "waiting for seq 1");
        assert!(drain(&o).is_empty());
        run(&mut f.applier, vec![batch(1, 1)], &o);
        assert_eq!(f.applier.durable_seq, 3);
        let msgs = drain(&o);
        assert!(
            matches!(&msgs[..], [Body::Ack(p)] if p.applied_seq == 3),
            "{msgs:?}"
        );
        let st = DiskState::load(&f.applier.retention, "d1")
            .unwrap()
            .unwrap();
        assert_eq!(st.applied_seq, 3);
        let h = History::read(&f.applier.retention, "d1").unwrap().unwrap();
        let ids: Vec<_> = h
            .commits
            .iter()
            .flat_map(|c| &c.markers)
            .map(|m| m.marker.id.as_str())
            .collect();
        assert_eq!(ids, ["m1", "m2", "m3"]);
        let flat = std::fs::read(f.dir.path().join("ds/d1-flat.vmdk")).unwrap();
        assert_eq!(flat[4096], 1);
        assert_eq!(flat[3 * 4096], 3);
    }

    /// A disk image in memory, to roll back copies of the target.
    struct Mem(Vec<u8>);

    impl crate::retention::journal::UndoTarget for Mem {
        fn restore(&mut self, o: u64, l: u32, d: Option<&[u8]>) -> std::io::Result<()> {
            let r = &mut self.0[o as usize..o as usize + l as usize];
            match d {
                Some(d) => r.copy_from_slice(d),
                None => r.fill(0),
            }
            Ok(())
        }
        fn sync(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Random batches (writes and zero ranges, overlapping across batches) in random
        /// commit groups, through the map or pwrite: rolling the final target back to any seq
        /// gives the disk at it.
        #[test]
        fn any_committed_seq_is_recovered_exactly(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u64..CAP / 512 - 1, 1u64..300, proptest::bool::ANY, 1u8..255), 1..6),
                1..10,
            ),
            cuts in proptest::collection::vec(1usize..4, 10),
            pwrite in proptest::bool::ANY,
        ) {
            let mut f = fixture();
            if pwrite {
                f.applier.disk.set_data_io(crate::vmdk::DataIo::Pwrite).unwrap();
            }
            let o = Arc::new(Outbox::new());
            let mut states = vec![vec![0u8; CAP as usize]];
            let mut all = Vec::new();
            for (i, extents) in batches.iter().enumerate() {
                let seq = i as u64 + 1;
                let mut b = BatchBuilder::new();
                let mut disk = states.last().unwrap().clone();
                for &(sector, sectors, zero, fill) in extents {
                    let (off, len) = (sector * 512, (sectors * 512).min(CAP - sector * 512));
                    if b.overlaps(off, len) {
                        continue;
                    }
                    let r = &mut disk[off as usize..(off + len) as usize];
                    if zero {
                        b.push_zero(off, len);
                        r.fill(0);
                    } else {
                        b.push_write(off, &vec![fill; len as usize]);
                        r.fill(fill);
                    }
                }
                all.push(b.finish("d1", seq, 1000 + seq as i64, 0));
                states.push(disk);
            }
            let mut rest = all.into_iter().peekable();
            let mut cut = cuts.iter().cycle();
            while rest.peek().is_some() {
                let n = *cut.next().unwrap();
                run(&mut f.applier, rest.by_ref().take(n).collect(), &o);
            }
            let flat = std::fs::read(f.dir.path().join("ds/d1-flat.vmdk")).unwrap();
            proptest::prop_assert!(flat == *states.last().unwrap());
            let h = History::read(&f.applier.retention, "d1").unwrap().unwrap();
            for (seq, want) in states.iter().enumerate() {
                let mut m = Mem(flat.clone());
                h.roll_back(seq as u64, &mut m).unwrap();
                proptest::prop_assert!(m.0 == *want, "state at seq {}", seq);
            }
        }
    }

    #[test]
    fn overlapping_batches_of_one_group_each_go_back_exactly() {
        overlapping_batches_go_back_exactly(crate::vmdk::DataIo::Mmap);
    }

    /// The same through pwrite/pread (`serve --data-io pwrite`): the same bytes on the
    /// target, the same undo, every seq recovered exactly.
    #[test]
    fn overlapping_batches_of_one_group_each_go_back_exactly_with_pwrite() {
        overlapping_batches_go_back_exactly(crate::vmdk::DataIo::Pwrite);
    }

    fn overlapping_batches_go_back_exactly(io: crate::vmdk::DataIo) {
        let mut f = fixture();
        f.applier.disk.set_data_io(io).unwrap();
        assert_eq!(f.applier.disk.extent().data_io(), Some(io));
        let o = Arc::new(Outbox::new());
        let mut states = vec![vec![0u8; CAP as usize]];
        let mut batches = Vec::new();
        for seq in 1..=6u64 {
            let mut b = BatchBuilder::new();
            // Every batch rewrites [0, 8 KiB) and a stretch of its own, so they overlap.
            b.push_write(0, &[seq as u8; 8192]);
            b.push_write(seq * 65536, &[seq as u8 | 0x80; 4096]);
            if seq == 4 {
                b.push_zero(8192, 65536 * 3);
            }
            batches.push(b.finish("d1", seq, 1000 + seq as i64, 0));
            let mut next = states.last().unwrap().clone();
            next[..8192].fill(seq as u8);
            let at = (seq * 65536) as usize;
            next[at..at + 4096].fill(seq as u8 | 0x80);
            if seq == 4 {
                next[8192..8192 + 65536 * 3].fill(0);
            }
            states.push(next);
        }
        run(&mut f.applier, batches, &o);
        assert_eq!(f.applier.durable_seq, 6);
        let flat = f.dir.path().join("ds/d1-flat.vmdk");
        assert!(std::fs::read(&flat).unwrap() == states[6]);
        let h = History::read(&f.applier.retention, "d1").unwrap().unwrap();
        for (seq, want) in states.iter().enumerate() {
            let mut m = Mem(std::fs::read(&flat).unwrap());
            h.roll_back(seq as u64, &mut m).unwrap();
            assert!(m.0 == *want, "state at seq {seq}");
        }
    }

    #[test]
    fn duplicates_are_dropped_and_re_acked() {
        let mut f = fixture();
        let o = Arc::new(Outbox::new());
        run(&mut f.applier, vec![batch(1, 1), batch(2, 2)], &o);
        drain(&o);
        run(&mut f.applier, vec![batch(1, 9)], &o);
        let msgs = drain(&o);
        assert!(matches!(&msgs[..], [Body::Ack(p)] if p.applied_seq == 2));
        let flat = std::fs::read(f.dir.path().join("ds/d1-flat.vmdk")).unwrap();
        assert_eq!(flat[4096], 1, "duplicate not re-applied");
    }

    /// A batch whose data does not match its CRC (its header still checks).
    fn bad_batch(seq: u64) -> Batch {
        let mut bad = batch(seq, 7);
        bad.data_crc ^= 1;
        bad.header_crc = protocol::batch::header_crc(&bad);
        bad
    }

    #[test]
    fn a_bad_batch_changes_nothing_and_stops_the_disk() {
        let mut f = fixture();
        let o = Arc::new(Outbox::new());
        run(&mut f.applier, vec![bad_batch(1), batch(2, 2)], &o);
        let msgs = drain(&o);
        assert!(
            msgs.iter()
                .all(|m| matches!(m, Body::Error(e) if e.code == Code::BadBatch.value())),
            "{msgs:?}"
        );
        assert_eq!(f.applier.durable_seq, 0);
        let flat = std::fs::read(f.dir.path().join("ds/d1-flat.vmdk")).unwrap();
        assert_eq!(flat[4096], 0);
        run(&mut f.applier, vec![batch(1, 1)], &o);
        assert!(matches!(&drain(&o)[..], [Body::Error(_)]), "still stopped");
        let mut g = Group::new();
        f.applier.handle(ApplyCmd::Resume, &mut g);
        run(&mut f.applier, vec![batch(1, 1)], &o);
        assert_eq!(f.applier.durable_seq, 1);
    }

    /// The decode buffers of a durable group go back to the disk's pool, and batches
    /// decoded into them again land exactly.
    #[test]
    fn decode_buffers_are_pooled_once_durable_and_reused_exactly() {
        let mut f = fixture();
        let o = Arc::new(Outbox::new());
        run(&mut f.applier, vec![batch(1, 1), batch(2, 2)], &o);
        assert_eq!(f.applier.shared.buffers.0.lock().len(), 2);
        let mut b = BatchBuilder::new();
        b.push_write(64 << 10, &[9; 100]);
        run(&mut f.applier, vec![b.finish("d1", 3, 0, 0)], &o);
        assert_eq!(f.applier.durable_seq, 3);
        assert_eq!(
            f.applier.shared.buffers.0.lock().len(),
            2,
            "one taken, one given"
        );
        let flat = std::fs::read(f.dir.path().join("ds/d1-flat.vmdk")).unwrap();
        assert_eq!(flat[(64 << 10) - 1..(64 << 10) + 101], {
            let mut want = vec![0u8; 102];
            want[1..101].fill(9);
            want
        });
        assert_eq!((flat[4096], flat[8192]), (1, 2));
    }

    /// A batch durable already skips decompression and is acknowledged again, unchanged.
    #[test]
    fn a_durable_batch_is_not_decoded_again_and_is_re_acked() {
        let mut f = fixture();
        let o = Arc::new(Outbox::new());
        run(&mut f.applier, vec![batch(1, 1)], &o);
        drain(&o);
        assert!(!f.applier.shared.is_durable(2));
        assert!(f.applier.shared.is_durable(1));
        let again = Checked::durable(batch(1, 9));
        assert!(again.batch.payload.is_empty() && again.size() == 0);
        let mut g = Group::new();
        f.applier.handle(
            ApplyCmd::Batch {
                batch: Box::new(again),
                from: o.clone(),
            },
            &mut g,
        );
        f.applier.commit(g);
        assert!(matches!(&drain(&o)[..], [Body::Ack(p)] if p.applied_seq == 1));
        let flat = std::fs::read(f.dir.path().join("ds/d1-flat.vmdk")).unwrap();
        assert_eq!(flat[4096], 1);
    }

    /// Checked on arrival, a bad batch that arrives early waits for its turn: the batches
    /// before it apply, then it stops the disk.
    #[test]
    fn a_bad_batch_that_arrives_early_is_refused_in_its_turn() {
        let mut f = fixture();
        let o = Arc::new(Outbox::new());
        run(&mut f.applier, vec![bad_batch(3)], &o);
        assert!(drain(&o).is_empty(), "held until seqs 1 and 2 arrive");
        assert!(f.applier.stopped.is_none());
        run(&mut f.applier, vec![batch(1, 1), batch(2, 2)], &o);
        let msgs = drain(&o);
        assert!(
            msgs.iter().any(
                |m| matches!(m, Body::Error(e) if e.code == Code::BadBatch.value()
                    && e.message.contains("seq 3"))
            ),
            "{msgs:?}"
        );
        assert_eq!(f.applier.durable_seq, 2);
        assert!(f.applier.stopped.is_some());
        let flat = std::fs::read(f.dir.path().join("ds/d1-flat.vmdk")).unwrap();
        assert_eq!((flat[4096], flat[8192], flat[12288]), (1, 2, 0));
    }

    #[test]
    fn reorder_overflow_is_out_of_sequence() {
        let mut f = fixture();
        let o = Arc::new(Outbox::new());
        let early: Vec<_> = (2..=MAX_REORDER_BATCHES as u64 + 2)
            .map(|s| {
                let mut b = BatchBuilder::new();
                b.push_zero(0, 512);
                b.finish("d1", s, 0, 0)
            })
            .collect();
        run(&mut f.applier, early, &o);
        let msgs = drain(&o);
        assert!(
            matches!(&msgs[..], [Body::Error(e)] if e.code == Code::OutOfSequence.value()),
            "{msgs:?}"
        );
    }

    /// A tmpfs mounted on `dir` for one test (the tests run as root here); `None`, with a
    /// message saying the test is skipped, when mounting is not allowed.
    fn tmpfs(dir: &Path, bytes: u64) -> Option<protocol::testing::Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        protocol::testing::Tmpfs::mount(dir, &bytes.to_string())
            .inspect_err(|e| {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs at {} (needs root): {e}",
                    dir.display()
                )
            })
            .ok()
    }

    /// Fills the filesystem of `path` with a file, then shrinks it to leave `leave` bytes.
    fn fill(path: &Path, leave: u64) {
        let mut f = std::fs::File::create(path).unwrap();
        let chunk = vec![0xa5u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(leave)).unwrap();
    }

    /// Sends `batches` one group each, as a process server would, until one is refused:
    /// returns that refusal.
    fn send_until_refused(
        a: &mut Applier,
        batches: &[Batch],
        o: &Arc<Outbox>,
    ) -> Option<protocol::pb::ErrorReport> {
        for b in batches {
            run(a, vec![b.clone()], o);
            for m in drain(o) {
                if let Body::Error(e) = m {
                    return Some(e);
                }
            }
        }
        None
    }

    /// The disk after each seq of `batches` (index = seq), starting from zeros.
    fn states_after(batches: &[Batch], capacity: u64) -> Vec<Vec<u8>> {
        let mut states = vec![vec![0u8; capacity as usize]];
        for b in batches {
            let mut next = states.last().unwrap().clone();
            let mut data = Vec::new();
            let d = protocol::batch::decode_into(b, capacity, &mut data).unwrap();
            for (off, bytes) in d.writes() {
                next[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
            }
            states.push(next);
        }
        states
    }

    /// The target as its files hold it.
    fn on_disk(a: &Applier) -> Vec<u8> {
        let r = crate::vmdk::extent::Reader::open(&a.shared.data).unwrap();
        let mut got = vec![0u8; a.shared.capacity as usize];
        r.read_at(&mut got, 0).unwrap();
        got
    }

    /// Every committed seq rolls back to the disk it was.
    fn assert_history(a: &Applier, states: &[Vec<u8>]) {
        let h = History::read(&a.retention, "d1").unwrap().unwrap();
        assert_eq!(h.committed_seq, a.durable_seq);
        let now = on_disk(a);
        for seq in h.base_seq..=h.committed_seq {
            let mut m = Mem(now.clone());
            h.roll_back(seq, &mut m).unwrap();
            assert!(m.0 == states[seq as usize], "state at seq {seq}");
        }
    }

    #[test]
    fn a_full_retention_volume_refuses_with_no_space_and_the_resent_batches_apply() {
        let dir = tempfile::tempdir().unwrap();
        let ret = dir.path().join("ret");
        let Some(_mnt) = tmpfs(&ret, 4 << 20) else {
            return;
        };
        let mut a = open_applier(&dir.path().join("ds"), &ret, DiskFormat::Vmfs, CAP);
        // Batches 1-4 cover the disk (little undo: it was zeros), later ones overwrite
        // 192 KiB of non-zero bytes each, so each needs about that much undo.
        let batches: Vec<Batch> = (1..=12u64)
            .map(|seq| {
                let mut b = BatchBuilder::new();
                b.push_write((seq % 4) * (256 << 10), &vec![seq as u8; 192 << 10]);
                b.finish("d1", seq, 1000 + seq as i64, 0)
            })
            .collect();
        let states = states_after(&batches, CAP);
        let o = Arc::new(Outbox::new());
        assert!(send_until_refused(&mut a, &batches[..4], &o).is_none());
        fill(&ret.join("filler"), 600 << 10);
        let e = send_until_refused(&mut a, &batches[4..], &o).expect("the volume fills up");
        assert_eq!(e.code, Code::NoSpace.value(), "{}", e.message);
        let acked = a.durable_seq;
        assert!((4..12).contains(&acked), "{acked}");
        assert!(!a.fatal && a.stopped.is_none(), "the disk is not stopped");
        assert!(
            on_disk(&a) == states[acked as usize],
            "disk at the last ack"
        );
        assert_history(&a, &states);
        // Still full: the re-sent batch is refused the same way, nothing changes.
        let again = send_until_refused(&mut a, &batches[acked as usize..], &o).unwrap();
        assert_eq!(again.code, Code::NoSpace.value());
        assert_eq!(a.durable_seq, acked);
        std::fs::remove_file(ret.join("filler")).unwrap();
        assert!(send_until_refused(&mut a, &batches[acked as usize..], &o).is_none());
        assert_eq!(a.durable_seq, 12);
        assert!(on_disk(&a) == states[12]);
        assert_history(&a, &states);
    }

    #[test]
    fn a_full_datastore_rolls_back_what_the_group_wrote_and_the_resent_batches_apply() {
        const SPARSE_CAP: u64 = 32 << 20;
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("ds");
        let Some(_mnt) = tmpfs(&ds, 40 << 20) else {
            return;
        };
        let mut a = open_applier(
            &ds,
            &dir.path().join("ret"),
            DiskFormat::MonolithicSparse,
            SPARSE_CAP,
        );
        // Each batch first rewrites grain 0 in place, then fills a new MiB of grains: the
        // sparse file grows by reserving 16 MiB at a time, and the reservation past 16 MiB
        // fails after grain 0 (and maybe some new grains) took the batch's bytes.
        let batches: Vec<Batch> = (1..=24u64)
            .map(|seq| {
                let mut b = BatchBuilder::new();
                b.push_write(0, &[seq as u8; 64 << 10]);
                b.push_write(seq << 20, &vec![seq as u8 | 0x80; 1 << 20]);
                b.finish("d1", seq, 1000 + seq as i64, 0)
            })
            .collect();
        let states = states_after(&batches, SPARSE_CAP);
        let o = Arc::new(Outbox::new());
        assert!(send_until_refused(&mut a, &batches[..1], &o).is_none());
        fill(&ds.join("filler"), 8 << 20);
        let e = send_until_refused(&mut a, &batches[1..], &o).expect("the datastore fills up");
        assert_eq!(e.code, Code::NoSpace.value(), "{}", e.message);
        assert!(e.message.contains("datastore"), "{}", e.message);
        let acked = a.durable_seq;
        assert!((1..24).contains(&acked), "{acked}");
        assert!(!a.fatal && a.stopped.is_none(), "the disk is not stopped");
        assert!(
            on_disk(&a) == states[acked as usize],
            "disk at the last ack"
        );
        assert_history(&a, &states);
        std::fs::remove_file(ds.join("filler")).unwrap();
        assert!(send_until_refused(&mut a, &batches[acked as usize..], &o).is_none());
        assert_eq!(a.durable_seq, 24);
        assert!(on_disk(&a) == states[24]);
        assert_history(&a, &states);
    }

    /// The undo and commit records of a small batch fit in the journal's last page, the
    /// new state file does not: the group's COMMIT is durable when the lack of space
    /// shows, and the group is still cut back whole (data restored, COMMIT removed).
    #[test]
    fn a_state_file_that_does_not_fit_cuts_back_a_committed_group() {
        let dir = tempfile::tempdir().unwrap();
        let ret = dir.path().join("ret");
        let Some(_mnt) = tmpfs(&ret, 1 << 20) else {
            return;
        };
        let mut a = open_applier(&dir.path().join("ds"), &ret, DiskFormat::Vmfs, CAP);
        // Small batches over zeros: about 100 bytes of journal each.
        let batches: Vec<Batch> = (1..=200u64)
            .map(|seq| {
                let mut b = BatchBuilder::new();
                b.push_write(seq * 4096, &[seq as u8; 4096]);
                b.finish("d1", seq, 1000 + seq as i64, 0)
            })
            .collect();
        let states = states_after(&batches, CAP);
        let o = Arc::new(Outbox::new());
        let seg_len = |a: &Applier| std::fs::metadata(a.journal.active_path()).unwrap().len();
        let mut next = 0;
        // Leave room for one more batch's records in the segment's last page.
        while next == 0 || !(1..3800).contains(&(seg_len(&a) % 4096)) {
            assert!(send_until_refused(&mut a, &batches[next..=next], &o).is_none());
            next += 1;
        }
        let len_before = seg_len(&a);
        fill(&ret.join("filler"), 0);
        let e = send_until_refused(&mut a, &batches[next..=next], &o).expect("state file");
        assert_eq!(e.code, Code::NoSpace.value(), "{}", e.message);
        assert!(e.message.contains(".state"), "{}", e.message);
        assert_eq!(a.durable_seq, next as u64);
        assert_eq!(seg_len(&a), len_before, "the COMMIT is cut too");
        assert!(
            on_disk(&a) == states[next],
            "the batch's data is rolled back"
        );
        assert_history(&a, &states);
        std::fs::remove_file(ret.join("filler")).unwrap();
        assert!(send_until_refused(&mut a, &batches[next..next + 3], &o).is_none());
        assert!(on_disk(&a) == states[next + 3]);
        assert_history(&a, &states);
    }
}
