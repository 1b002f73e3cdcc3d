//! Runtime state of every known disk, shared by ingest, the forwarder, the janitor and status.
//!
//! Watermarks per disk (like neon's safekeeper): `appended >= cached >= applied >= floor`.
//! * `appended`: highest seq handed to the cache writer (the next batch must be `appended + 1`);
//! * `cached`: highest seq durable in the cache (after its group commit's fdatasync) or
//!   already applied: what agents are acknowledged and what may be forwarded;
//! * `applied`: highest seq the master target acknowledged as applied and durable;
//! * `floor`: the applied seq persisted in the registry; segments are deleted only below it.
//!
//! Every change of `cached` or `applied` bumps [`Disks::progress`], which agent streams watch
//! to send cumulative acks, and `cached` changes wake the forwarder.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use protocol::error::Refusal;
use protocol::pb::{DiskInfo, DiskProgress};
use tokio::sync::{Notify, watch};

use crate::rate::Traffic;
use crate::registry::DiskRecord;

#[derive(Debug, Clone)]
pub struct DiskState {
    pub info: DiskInfo,
    pub appended: u64,
    pub cached: u64,
    pub applied: u64,
    pub floor: u64,
    /// Source time of the newest applied batch (ms since epoch), 0 = unknown.
    pub applied_time_ms: i64,
    /// Refused by the master target: not forwarded until the next connection.
    pub failed: Option<Refusal>,
    /// Batches acknowledged earlier were lost to cache corruption: the agent must resync.
    pub resync_required: Option<String>,
    pub last_heard: Option<Instant>,
    /// Agent streams that declared the disk.
    pub agents: u32,
    /// Bytes in (durable in the cache) and out (applied at the master target).
    pub traffic: Traffic,
    /// Token of the stream allowed to send batches (the newest to declare the disk).
    owner: u64,
    /// Held across "reserve seq + queue the append" so records of a disk reach the log in
    /// seq order even while a new stream takes over from an old one.
    order: Arc<tokio::sync::Mutex<()>>,
}

impl DiskState {
    fn new(info: DiskInfo, applied: u64) -> Self {
        DiskState {
            info,
            appended: applied,
            cached: applied,
            applied,
            floor: applied,
            applied_time_ms: 0,
            failed: None,
            resync_required: None,
            last_heard: None,
            agents: 0,
            traffic: Traffic::default(),
            owner: 0,
            order: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    pub fn progress(&self) -> DiskProgress {
        DiskProgress {
            disk_id: self.info.disk_id.clone(),
            cached_seq: self.cached,
            applied_seq: self.applied,
        }
    }
}

/// The answer to [`Disks::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// The next seq: append it.
    Next,
    /// Already appended: drop it and re-ack.
    Duplicate,
    /// Not the next seq.
    Gap {
        expected: u64,
    },
    /// Another stream took the disk over.
    NotOwner,
    Unknown,
}

#[derive(Debug)]
pub struct Disks {
    inner: Mutex<BTreeMap<String, DiskState>>,
    progress: watch::Sender<u64>,
    data_ready: Notify,
    next_owner: Mutex<u64>,
}

impl Disks {
    /// Disks from the registry, with `last_seq(disk)` = the highest seq contiguous above the
    /// floor in the recovered cache.
    pub fn new(records: &[DiskRecord], last_seq: impl Fn(&str, u64) -> u64) -> Self {
        let mut inner = BTreeMap::new();
        for r in records {
            let mut s = DiskState::new(r.info(), r.applied_floor);
            let last = last_seq(&r.disk_id, r.applied_floor).max(r.applied_floor);
            s.appended = last;
            s.cached = last;
            inner.insert(r.disk_id.clone(), s);
        }
        Disks {
            inner: Mutex::new(inner),
            progress: watch::Sender::new(0),
            data_ready: Notify::new(),
            next_owner: Mutex::new(0),
        }
    }

    fn bump(&self) {
        self.progress.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Bumped whenever a `cached` or `applied` seq advances.
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// Resolves after new durable batches exist (a stored permit: none is lost).
    pub async fn data_ready(&self) {
        self.data_ready.notified().await
    }

    pub fn get(&self, id: &str) -> Option<DiskState> {
        self.inner.lock().get(id).cloned()
    }

    pub fn snapshot(&self) -> Vec<DiskState> {
        self.inner.lock().values().cloned().collect()
    }

    pub fn infos(&self) -> Vec<DiskInfo> {
        self.inner.lock().values().map(|s| s.info.clone()).collect()
    }

    /// Adds a disk the master target accepted with `applied` as its applied seq. Returns
    /// `false` if it was known already.
    pub fn register(&self, info: DiskInfo, applied: u64) -> bool {
        let mut m = self.inner.lock();
        if m.contains_key(&info.disk_id) {
            return false;
        }
        m.insert(info.disk_id.clone(), DiskState::new(info, applied));
        true
    }

    pub fn mark_resync_required(&self, id: &str, why: String) {
        if let Some(s) = self.inner.lock().get_mut(id) {
            tracing::error!(disk = id, "resync required: {why}");
            s.resync_required = Some(why);
        }
    }

    /// The cache volume failed (`why`): every disk with batches handed to the cache but never
    /// made durable lost them (their agents were not acknowledged), so it needs a resync.
    pub fn cache_failed(&self, why: &str) {
        let lost: Vec<(String, u64, u64)> = self
            .inner
            .lock()
            .values()
            .filter(|s| s.appended > s.cached)
            .map(|s| (s.info.disk_id.clone(), s.cached + 1, s.appended))
            .collect();
        for (id, from, to) in lost {
            self.mark_resync_required(&id, format!("batches {from}..={to} were not cached: {why}"));
        }
    }

    pub fn set_failed(&self, id: &str, failure: Option<Refusal>) {
        if let Some(s) = self.inner.lock().get_mut(id) {
            s.failed = failure;
        }
    }

    /// Clears every master-target failure (a new connection re-declares all disks).
    pub fn clear_failures(&self) {
        for s in self.inner.lock().values_mut() {
            s.failed = None;
        }
    }

    pub fn heard(&self, id: &str) {
        if let Some(s) = self.inner.lock().get_mut(id) {
            s.last_heard = Some(Instant::now());
        }
    }

    /// A stream declares `id`; it becomes the disk's owner. Returns its token.
    pub fn attach(&self, id: &str) -> u64 {
        let token = {
            let mut n = self.next_owner.lock();
            *n += 1;
            *n
        };
        if let Some(s) = self.inner.lock().get_mut(id) {
            s.agents += 1;
            s.owner = token;
            s.last_heard = Some(Instant::now());
        }
        token
    }

    pub fn detach(&self, id: &str) {
        if let Some(s) = self.inner.lock().get_mut(id) {
            s.agents = s.agents.saturating_sub(1);
        }
    }

    /// The lock that orders a disk's appends (see `DiskState::order`).
    pub fn order_lock(&self, id: &str) -> Option<Arc<tokio::sync::Mutex<()>>> {
        self.inner.lock().get(id).map(|s| s.order.clone())
    }

    /// Takes `seq` for appending if it is the next one of `id` and `token` owns the disk.
    pub fn reserve(&self, id: &str, seq: u64, token: u64) -> Reserve {
        let mut m = self.inner.lock();
        let Some(s) = m.get_mut(id) else {
            return Reserve::Unknown;
        };
        if s.owner != token {
            Reserve::NotOwner
        } else if seq <= s.appended {
            Reserve::Duplicate
        } else if seq == s.appended + 1 {
            s.appended = seq;
            Reserve::Next
        } else {
            Reserve::Gap {
                expected: s.appended + 1,
            }
        }
    }

    /// `(id, seq)`, a record of `bytes`, is durable in the cache (called in log order).
    pub fn durable(&self, id: &str, seq: u64, bytes: u64) {
        if let Some(s) = self.inner.lock().get_mut(id) {
            s.cached = s.cached.max(seq);
            s.traffic.received(Instant::now(), bytes);
        }
        self.bump();
        self.data_ready.notify_one();
    }

    /// The master target applied `id` up to `seq` (source time `time_ms` if known). Returns
    /// whether the applied seq advanced.
    pub fn applied(&self, id: &str, seq: u64, time_ms: Option<i64>) -> bool {
        let advanced = {
            let mut m = self.inner.lock();
            let Some(s) = m.get_mut(id) else {
                return false;
            };
            if seq <= s.applied {
                false
            } else {
                s.applied = seq;
                // The master target holds it durably, so it counts as cached too.
                s.cached = s.cached.max(seq);
                s.appended = s.appended.max(seq);
                if let Some(t) = time_ms {
                    s.applied_time_ms = t;
                }
                true
            }
        };
        if advanced {
            self.bump();
        }
        advanced
    }

    /// `bytes` of `id`'s records were applied by the master target (for its out rate).
    pub fn drained(&self, id: &str, bytes: u64) {
        if let Some(s) = self.inner.lock().get_mut(id) {
            s.traffic.drained(Instant::now(), bytes);
        }
    }

    /// Registry records with the current applied seqs as floors (to persist).
    pub fn records(&self) -> Vec<DiskRecord> {
        self.inner
            .lock()
            .values()
            .map(|s| DiskRecord::new(&s.info, s.applied))
            .collect()
    }

    /// Whether some applied seq is above its persisted floor.
    pub fn floors_behind(&self) -> bool {
        self.inner.lock().values().any(|s| s.applied > s.floor)
    }

    /// `records` were persisted: their floors are durable.
    pub fn floors_persisted(&self, records: &[DiskRecord]) {
        let mut m = self.inner.lock();
        for r in records {
            if let Some(s) = m.get_mut(&r.disk_id) {
                s.floor = s.floor.max(r.applied_floor);
            }
        }
    }

    /// The persisted floor of a known disk.
    pub fn floor(&self, id: &str) -> Option<u64> {
        self.inner.lock().get(id).map(|s| s.floor)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One disk `a`, applied up to 3 of 5 cached (also used by `status` tests).
    pub(crate) fn disks() -> Disks {
        let r = DiskRecord {
            disk_id: "a".into(),
            name: "a".into(),
            capacity: 1 << 20,
            format: 0,
            group: String::new(),
            applied_floor: 3,
        };
        Disks::new(&[r], |_, _| 5)
    }

    #[test]
    fn reserve_takes_only_the_next_seq_of_the_owner() {
        let d = disks();
        let t1 = d.attach("a");
        assert_eq!(d.reserve("a", 5, t1), Reserve::Duplicate);
        assert_eq!(d.reserve("a", 7, t1), Reserve::Gap { expected: 6 });
        assert_eq!(d.reserve("a", 6, t1), Reserve::Next);
        let t2 = d.attach("a");
        assert_eq!(d.reserve("a", 7, t1), Reserve::NotOwner);
        assert_eq!(d.reserve("a", 7, t2), Reserve::Next);
        assert_eq!(d.reserve("b", 1, t2), Reserve::Unknown);
    }

    #[test]
    fn a_cache_failure_marks_only_disks_that_lost_batches() {
        let record = |id: &str| DiskRecord {
            disk_id: id.into(),
            name: id.into(),
            capacity: 1 << 20,
            format: 0,
            group: String::new(),
            applied_floor: 3,
        };
        // `b` has everything it was handed durable; `a` has seq 5 in the failed group.
        let d = Disks::new(&[record("a"), record("b")], |_, floor| floor);
        let t = d.attach("a");
        assert_eq!(d.reserve("a", 4, t), Reserve::Next);
        assert_eq!(d.reserve("a", 5, t), Reserve::Next);
        d.durable("a", 4, 100);
        d.cache_failed("EIO");
        let why = d.get("a").unwrap().resync_required.unwrap();
        assert_eq!(why, "batches 5..=5 were not cached: EIO");
        assert_eq!(d.get("b").unwrap().resync_required, None);
    }

    #[test]
    fn watermarks_stay_ordered() {
        let d = disks();
        assert!(d.applied("a", 9, Some(1)));
        let s = d.get("a").unwrap();
        assert!(s.appended >= s.cached && s.cached >= s.applied && s.applied >= s.floor);
        assert_eq!((s.cached, s.applied, s.floor), (9, 9, 3));
        assert!(d.floors_behind());
        d.floors_persisted(&d.records());
        assert_eq!(d.floor("a"), Some(9));
    }
}
