//! The per-disk applier: the one owner of a disk's image, marker log and state file.
//!
//! It runs on a dedicated thread (msync, fsync and fallocate block) and takes commands from
//! a bounded channel, fed by every connection that carries the disk's batches.
//!
//! Invariants (watermarks, per disk): `durable_seq <= applied_seq`, where `applied_seq` is
//! the last batch copied into the map and `durable_seq` the last one whose data, markers and
//! state file are durable. Only `durable_seq` is ever acknowledged or reported.
//! * Batches are applied strictly in seq order: `seq <= applied` is a duplicate (re-acked
//!   once durable), `applied + 1` is applied, anything higher waits in a reorder buffer
//!   bounded in batches ([`MAX_REORDER_BATCHES`]) and bytes ([`MAX_REORDER_BYTES`]);
//!   overflow is refused with `OutOfSequence` and the process server re-sends.
//! * A batch is fully checked and decompressed (`protocol::batch::decode_into`) before its
//!   first byte is written: a bad batch changes nothing, is refused with `BadBatch`, and
//!   stops the disk at its applied seq until a connection declares the disk again.
//! * Group commit: every ready batch (up to [`GROUP_MAX_BATCHES`] / [`GROUP_MAX_BYTES`]) is
//!   applied, then data is msynced, markers appended and fdatasynced, the state file
//!   replaced, and only then are acks sent to every connection that delivered a batch.
//! * A failed sync is fatal for the disk (never retried, PITFALLS.md §4): it stops with
//!   `Code::Io`; after a restart it resumes from the state file, and re-applying the
//!   batches above it is idempotent because batches carry absolute writes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use protocol::batch::{decode_into, flags};
use protocol::error::{Code, Refusal};
use protocol::pb::Batch;
use tokio::sync::mpsc;

use crate::markers::{MarkerLog, MarkerRecord};
use crate::outbox::Outbox;
use crate::state::DiskState;
use crate::vmdk::Disk;

/// Commands queued per disk before the senders wait (h2 flow control then pushes back).
pub const QUEUE_DEPTH: usize = 64;
/// Early batches held per disk.
pub const MAX_REORDER_BATCHES: usize = 512;
/// Compressed bytes held per disk in the reorder buffer.
pub const MAX_REORDER_BYTES: usize = 256 << 20;
/// Most batches made durable by one commit.
pub const GROUP_MAX_BATCHES: usize = 64;
/// Most uncompressed bytes made durable by one commit.
pub const GROUP_MAX_BYTES: usize = 64 << 20;

/// A command for a disk's applier.
#[derive(Debug)]
pub enum ApplyCmd {
    /// A batch and the connection that delivered it.
    Batch { batch: Batch, from: Arc<Outbox> },
    /// A connection declared the disk again: a disk stopped by a bad batch may go on.
    Resume,
    /// Commit what is applied and stop.
    Shutdown,
}

/// What the rest of the server may see of a disk while its applier runs.
#[derive(Debug)]
pub struct DiskShared {
    pub disk_id: String,
    pub name: String,
    pub capacity: u64,
    /// The flat extent file (for readers such as chunk hashing).
    pub extent_path: PathBuf,
    /// Highest durable seq.
    pub durable_seq: AtomicU64,
    /// Bytes applied since start (uncompressed).
    pub bytes_applied: AtomicU64,
    /// Durable state as of the last commit.
    pub state: Mutex<DiskState>,
    /// Why the disk is stopped, if it is.
    pub stopped: Mutex<Option<Refusal>>,
}

struct Group {
    acks: Vec<Arc<Outbox>>,
    markers: Vec<MarkerRecord>,
    batches: usize,
    bytes: usize,
}

impl Group {
    fn new() -> Group {
        Group {
            acks: Vec::new(),
            markers: Vec::new(),
            batches: 0,
            bytes: 0,
        }
    }

    fn full(&self) -> bool {
        self.batches >= GROUP_MAX_BATCHES || self.bytes >= GROUP_MAX_BYTES
    }
}

/// The applier of one disk (see the module invariants).
pub struct Applier {
    disk: Disk,
    markers: MarkerLog,
    retention: PathBuf,
    /// In-memory state: `applied_seq` may be ahead of the durable state until a commit.
    state: DiskState,
    durable_seq: u64,
    reorder: BTreeMap<u64, (Batch, Vec<Arc<Outbox>>)>,
    reorder_bytes: usize,
    stopped: Option<Refusal>,
    /// A sync failed: the disk stays stopped until the process restarts.
    fatal: bool,
    buf: Vec<u8>,
    shared: Arc<DiskShared>,
}

impl Applier {
    pub fn new(
        disk: Disk,
        markers: MarkerLog,
        retention: PathBuf,
        state: DiskState,
        shared: Arc<DiskShared>,
    ) -> Applier {
        Applier {
            disk,
            markers,
            retention,
            durable_seq: state.applied_seq,
            state,
            reorder: BTreeMap::new(),
            reorder_bytes: 0,
            stopped: None,
            fatal: false,
            buf: Vec::new(),
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
            ApplyCmd::Batch { batch, from } => self.offer(batch, from, group),
        }
        false
    }

    fn offer(&mut self, batch: Batch, from: Arc<Outbox>, group: &mut Group) {
        let seq = batch.seq;
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
        self.apply(batch, from, group);
        while let Some((batch, froms)) = self.reorder.remove(&(self.state.applied_seq + 1)) {
            self.reorder_bytes -= batch.payload.len();
            let mut froms = froms.into_iter();
            let first = froms.next().expect("a held batch has a sender");
            group.acks.extend(froms);
            self.apply(batch, first, group);
            if self.stopped.is_some() {
                break;
            }
        }
    }

    fn hold(&mut self, batch: Batch, from: Arc<Outbox>) {
        if let Some((_, froms)) = self.reorder.get_mut(&batch.seq) {
            froms.push(from);
            return;
        }
        let size = batch.payload.len();
        if self.reorder.len() >= MAX_REORDER_BATCHES
            || self.reorder_bytes + size > MAX_REORDER_BYTES
        {
            from.error(Refusal::for_disk(
                Code::OutOfSequence,
                &self.shared.disk_id,
                format!(
                    "batch seq {} arrived while waiting for seq {} and the reorder buffer is full \
                     ({} batches, {} bytes); re-send from seq {}",
                    batch.seq,
                    self.state.applied_seq + 1,
                    self.reorder.len(),
                    self.reorder_bytes,
                    self.durable_seq + 1
                ),
            ));
            return;
        }
        self.reorder_bytes += size;
        self.reorder.insert(batch.seq, (batch, vec![from]));
    }

    /// Applies the next batch into the map (not yet durable).
    fn apply(&mut self, batch: Batch, from: Arc<Outbox>, group: &mut Group) {
        match write_batch(&mut self.disk, &batch, &mut self.buf) {
            Ok(()) => {}
            Err(WriteError::Bad(e)) => {
                let r = e.refusal(&self.shared.disk_id, batch.seq);
                tracing::error!(disk = %self.shared.disk_id, seq = batch.seq, "refusing batch: {e}; disk stopped");
                self.stop(r.clone());
                from.error(r);
                return;
            }
            Err(WriteError::Storage(r)) => {
                self.fail(&from, r.for_disk_id(&self.shared.disk_id));
                return;
            }
        }
        group
            .markers
            .extend(batch.markers.iter().map(|m| MarkerRecord {
                seq: batch.seq,
                batch_unix_ms: batch.time_unix_ms,
                marker: m.clone(),
            }));
        let s = &mut self.state;
        s.applied_seq = batch.seq;
        s.last_batch_unix_ms = batch.time_unix_ms;
        s.in_resync = batch.flags & flags::RESYNC != 0 && batch.flags & flags::RESYNC_END == 0;
        if !s.in_resync {
            s.consistent_seq = batch.seq;
            s.consistent_unix_ms = batch.time_unix_ms;
        }
        group.acks.push(from);
        group.batches += 1;
        group.bytes += batch.data_len as usize;
        self.shared
            .bytes_applied
            .fetch_add(u64::from(batch.data_len), Ordering::Relaxed);
    }

    fn stop(&mut self, r: Refusal) {
        // Batches held above the refused one can only be applied after it: drop them, the
        // process server re-sends from the applied seq.
        self.reorder.clear();
        self.reorder_bytes = 0;
        *self.shared.stopped.lock() = Some(r.clone());
        self.stopped = Some(r);
    }

    /// A storage failure: the disk stops until restart.
    fn fail(&mut self, from: &Outbox, r: Refusal) {
        tracing::error!(disk = %self.shared.disk_id, "{r}; disk stopped until restart");
        self.fatal = true;
        self.stop(r.clone());
        from.error(r);
    }

    /// Makes the group durable (data, markers, state) and acknowledges it.
    fn commit(&mut self, group: Group) {
        if self.fatal {
            for o in &group.acks {
                o.error(self.stopped.clone().expect("fatal implies stopped"));
            }
            return;
        }
        if self.state.applied_seq > self.durable_seq {
            self.state.applied_unix_ms = protocol::now_unix_ms();
            let disk_id = self.shared.disk_id.clone();
            let synced = self
                .disk
                .extent()
                .sync()
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    self.markers
                        .append(&group.markers)
                        .map_err(|e| e.to_string())
                })
                .and_then(|()| self.state.store(&self.retention).map_err(|e| e.to_string()));
            if let Err(e) = synced {
                let r = Refusal::for_disk(Code::Io, &disk_id, e);
                tracing::error!(disk = %disk_id, "{r}; disk stopped until restart");
                self.fatal = true;
                self.stop(r.clone());
                for o in &group.acks {
                    o.error(r.clone());
                }
                return;
            }
            self.durable_seq = self.state.applied_seq;
            self.shared
                .durable_seq
                .store(self.durable_seq, Ordering::Release);
            *self.shared.state.lock() = self.state.clone();
        }
        let mut sent: Vec<*const Outbox> = Vec::with_capacity(group.acks.len());
        for o in &group.acks {
            let p = Arc::as_ptr(o);
            if !sent.contains(&p) {
                sent.push(p);
                o.ack(&self.shared.disk_id, self.durable_seq);
            }
        }
    }
}

enum WriteError {
    /// The batch failed its checks: nothing was written.
    Bad(protocol::batch::BatchError),
    /// The disk failed under the write.
    Storage(StorageFailure),
}

/// A storage failure, before the disk id is attached.
struct StorageFailure(Refusal);

impl StorageFailure {
    fn for_disk_id(self, disk_id: &str) -> Refusal {
        Refusal::for_disk(self.0.code, disk_id, self.0.message)
    }
}

/// Checks and decompresses `batch`, then copies its writes and zero extents into the map.
/// Nothing is written unless every check passed.
fn write_batch(disk: &mut Disk, batch: &Batch, buf: &mut Vec<u8>) -> Result<(), WriteError> {
    let decoded = decode_into(batch, disk.capacity(), buf).map_err(WriteError::Bad)?;
    disk.renew_cid()
        .map_err(|e| WriteError::Storage(StorageFailure(e.refusal(""))))?;
    let extent = disk.extent();
    for (offset, data) in decoded.writes() {
        extent.write(offset, data);
    }
    for z in &batch.zeros {
        extent.zero(z.offset, z.length).map_err(|e| {
            WriteError::Storage(StorageFailure(Refusal::new(Code::Io, e.to_string())))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::markers;
    use crate::vmdk::DiskSpec;
    use protocol::batch::BatchBuilder;
    use protocol::pb::{DiskFormat, Marker, apply_message::Body};

    const CAP: u64 = 1 << 20;

    struct Fixture {
        dir: tempfile::TempDir,
        applier: Applier,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("ds");
        let ret = dir.path().join("ret");
        std::fs::create_dir_all(&ds).unwrap();
        std::fs::create_dir_all(crate::state::disks_dir(&ret)).unwrap();
        let spec = DiskSpec {
            disk_id: "d1",
            name: "d1",
            capacity: CAP,
            format: DiskFormat::Vmfs,
        };
        let disk = Disk::open_or_create(&ds, &spec, crate::vmdk::Claim::New).unwrap();
        let state = DiskState {
            disk_id: "d1".into(),
            name: "d1".into(),
            capacity: CAP,
            ..Default::default()
        };
        let log = MarkerLog::open(&markers::log_path(&ret, "d1"), 0).unwrap();
        let shared = Arc::new(DiskShared {
            disk_id: "d1".into(),
            name: "d1".into(),
            capacity: CAP,
            extent_path: ds.join("d1-flat.vmdk"),
            durable_seq: AtomicU64::new(0),
            bytes_applied: AtomicU64::new(0),
            state: Mutex::new(state.clone()),
            stopped: Mutex::new(None),
        });
        let applier = Applier::new(disk, log, ret, state, shared);
        Fixture { dir, applier }
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
            a.handle(
                ApplyCmd::Batch {
                    batch: b,
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
        let recs = markers::read(&markers::log_path(&f.applier.retention, "d1")).unwrap();
        let ids: Vec<_> = recs.iter().map(|r| r.marker.id.as_str()).collect();
        assert_eq!(ids, ["m1", "m2", "m3"]);
        let flat = std::fs::read(f.dir.path().join("ds/d1-flat.vmdk")).unwrap();
        assert_eq!(flat[4096], 1);
        assert_eq!(flat[3 * 4096], 3);
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

    #[test]
    fn a_bad_batch_changes_nothing_and_stops_the_disk() {
        let mut f = fixture();
        let o = Arc::new(Outbox::new());
        let mut bad = batch(1, 7);
        bad.data_crc ^= 1;
        bad.header_crc = protocol::batch::header_crc(&bad);
        run(&mut f.applier, vec![bad, batch(2, 2)], &o);
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
}
