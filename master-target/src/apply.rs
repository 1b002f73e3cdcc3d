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
//! * A batch is fully checked and decompressed (`protocol::batch::decode_into`) when it is
//!   admitted, before any of its bytes is written: a bad batch changes nothing, is refused
//!   with `BadBatch`, and stops the disk at its durable seq until a connection declares the
//!   disk again.
//! * Group commit (up to [`GROUP_MAX_BATCHES`] / [`GROUP_MAX_BYTES`]), under the disk's
//!   commit lock: undo records of every batch (old bytes read through the map) are
//!   fdatasynced -> the data goes into the map -> msync -> the commit record (seqs, times,
//!   markers in stream order) is fdatasynced -> the state file is replaced -> acks. The
//!   undo of a batch must describe the disk just before it, so a batch that overlaps an
//!   earlier batch of the open group closes that group first (then undo can be read from
//!   the map, which holds the state before the whole group).
//! * A failed sync is fatal for the disk (never retried, PITFALLS.md §4): it stops with
//!   `Code::Io`; after a restart the journal rolls the uncommitted group back and the
//!   process server re-sends it.

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
    reorder: BTreeMap<u64, (Batch, Vec<Arc<Outbox>>)>,
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
        self.admit(batch, from, group);
        while let Some((batch, froms)) = self.reorder.remove(&(self.state.applied_seq + 1)) {
            self.reorder_bytes -= batch.payload.len();
            let mut froms = froms.into_iter();
            let first = froms.next().expect("a held batch has a sender");
            group.acks.extend(froms);
            self.admit(batch, first, group);
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

    /// Checks and decompresses the next batch and adds it to the group (nothing written).
    fn admit(&mut self, batch: Batch, from: Arc<Outbox>, group: &mut Group) {
        let mut data = Vec::new();
        if let Err(e) = decode_into(&batch, self.shared.capacity, &mut data) {
            let r = e.refusal(&self.shared.disk_id, batch.seq);
            tracing::error!(disk = %self.shared.disk_id, seq = batch.seq, "refusing batch: {e}; disk stopped");
            self.stop(r.clone());
            from.error(r);
            return;
        }
        if extents(&batch).any(|(o, l)| group.overlaps(o, o + l)) {
            let full = std::mem::replace(group, Group::new());
            self.commit(full);
            if let Some(r) = self.fatal.then(|| self.stopped.clone()).flatten() {
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

    /// Makes the group durable (undo, data, commit record, state) and acknowledges it.
    fn commit(&mut self, group: Group) {
        if self.fatal {
            for o in &group.acks {
                o.error(self.stopped.clone().expect("fatal implies stopped"));
            }
            return;
        }
        if !group.ready.is_empty() {
            if let Err(e) = self.make_durable(&group) {
                let r = Refusal::for_disk(Code::Io, &self.shared.disk_id, e);
                tracing::error!(disk = %self.shared.disk_id, "{r}; disk stopped until restart");
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
            self.shared
                .journal_bytes
                .store(self.journal.bytes(), Ordering::Relaxed);
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

    /// The commit order of the module docs; an error leaves the disk to be rolled back by
    /// the journal at the next start.
    fn make_durable(&mut self, group: &Group) -> Result<(), String> {
        let last = self.state.applied_seq;
        let _guard = self
            .commit_lock
            .lock()
            .map_err(|e| format!("taking the commit lock: {e}"))?;
        for r in &group.ready {
            let extent = &*self.disk.extent();
            self.journal
                .append_undo(
                    r.batch.seq,
                    r.batch.time_unix_ms,
                    extents(&r.batch),
                    |o, buf| extent.read_at(o, buf).map_err(std::io::Error::other),
                )
                .map_err(|e| e.to_string())?;
        }
        self.journal.sync().map_err(|e| e.to_string())?;
        failpoint::hit("after-undo", last);
        self.disk.renew_cid().map_err(|e| e.to_string())?;
        let extent = self.disk.extent();
        for r in &group.ready {
            for (offset, data) in r.decoded().writes() {
                extent.write(offset, data).map_err(|e| e.to_string())?;
            }
            for z in &r.batch.zeros {
                extent.zero(z.offset, z.length).map_err(|e| e.to_string())?;
            }
        }
        extent.sync().map_err(|e| e.to_string())?;
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
        self.journal.commit(&commit).map_err(|e| e.to_string())?;
        failpoint::hit("after-commit", last);
        self.state.applied_unix_ms = commit.applied_unix_ms;
        self.state.store(&self.retention).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::journal::{History, RetentionPolicy};
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
        let mut disk = Disk::open_or_create(&ds, &spec, crate::vmdk::Claim::New).unwrap();
        let state = DiskState {
            disk_id: "d1".into(),
            name: "d1".into(),
            capacity: CAP,
            ..Default::default()
        };
        let (journal, _) =
            Journal::open(&ret, "d1", 0, RetentionPolicy::default(), disk.extent()).unwrap();
        let lock = CommitLock::open(&ret, "d1").unwrap();
        let shared = Arc::new(DiskShared {
            disk_id: "d1".into(),
            name: "d1".into(),
            capacity: CAP,
            data: crate::vmdk::extent::DataRef::flat(ds.join("d1-flat.vmdk")),
            durable_seq: AtomicU64::new(0),
            bytes_applied: AtomicU64::new(0),
            journal_bytes: AtomicU64::new(0),
            state: Mutex::new(state.clone()),
            stopped: Mutex::new(None),
        });
        let applier = Applier::new(disk, journal, lock, ret, state, shared);
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
        /// commit groups: rolling the final target back to any seq gives the disk at it.
        #[test]
        fn any_committed_seq_is_recovered_exactly(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u64..CAP / 512 - 1, 1u64..300, proptest::bool::ANY, 1u8..255), 1..6),
                1..10,
            ),
            cuts in proptest::collection::vec(1usize..4, 10),
        ) {
            let mut f = fixture();
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
        let mut f = fixture();
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
