//! The disks this master target holds: which disk id owns which name, and the running
//! applier of each open disk.
//!
//! Invariants: a disk id maps to one name and a name to one disk id, across restarts (the
//! claims are rebuilt from the state files at start-up); a disk has at most one applier;
//! opening is serialised (an async mutex held across the blocking open), so two connections
//! declaring a new disk at once create it once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex as SyncMutex;
use protocol::disk::check_disk_info;
use protocol::error::{Code, Refusal};
use protocol::pb::{DiskFormat, DiskInfo};
use tokio::sync::{Mutex, mpsc};

use crate::apply::{Applier, ApplyCmd, DiskShared};
use crate::retention::CommitLock;
use crate::retention::journal::{Journal, RetentionPolicy};
use crate::state::{self, DiskState};
use crate::vmdk::extent::DataRef;
use crate::vmdk::{self, Claim, DataIo, Disk, DiskSpec, VmdkError};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{0}")]
    Datastore(#[from] VmdkError),
    #[error("{0}")]
    Volume(#[from] crate::retention::volume::VolumeError),
    #[error("retention volume {path}: {reason}")]
    Retention { path: PathBuf, reason: String },
    #[error("{0}")]
    State(#[from] state::StateError),
}

impl SetupError {
    pub fn code(&self) -> Code {
        match self {
            SetupError::Datastore(e) => e.refusal("").code,
            SetupError::Volume(e) => e.code(),
            SetupError::Retention { .. } | SetupError::State(_) => Code::Io,
        }
    }
}

/// An open disk: its applier's input and what others may read of it.
#[derive(Debug)]
pub struct DiskEntry {
    pub shared: Arc<DiskShared>,
    pub tx: mpsc::Sender<ApplyCmd>,
}

/// How long a hash request waits for the batches it must see to be applied.
const HASH_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Inner {
    open: HashMap<String, Arc<DiskEntry>>,
    /// disk id -> (name, capacity) of every disk ever declared here.
    known: HashMap<String, (String, u64)>,
    /// name -> disk id.
    names: HashMap<String, String>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
pub struct Registry {
    datastore: PathBuf,
    retention: PathBuf,
    policy: RetentionPolicy,
    /// How flat disks' data is written (`serve --data-io`).
    data_io: DataIo,
    inner: Mutex<Inner>,
    /// States of known disks that are not open, for `Status` (disk id -> state).
    idle: SyncMutex<HashMap<String, DiskState>>,
    /// Exclusive lock on `RETENTION/.lock` for the registry's lifetime: one master target
    /// per retention volume.
    _lock: std::fs::File,
}

impl Registry {
    /// Checks the datastore and retention volume and loads every disk's claim.
    pub fn new(
        datastore: &Path,
        retention: &Path,
        policy: RetentionPolicy,
    ) -> Result<Registry, SetupError> {
        vmdk::check_writable(datastore)?;
        let lock = crate::retention::volume::check_and_claim(datastore, retention)?;
        let mut inner = Inner::default();
        let mut idle = HashMap::new();
        for s in DiskState::load_all(retention)? {
            inner.names.insert(s.name.clone(), s.disk_id.clone());
            inner
                .known
                .insert(s.disk_id.clone(), (s.name.clone(), s.capacity));
            idle.insert(s.disk_id.clone(), s);
        }
        Ok(Registry {
            datastore: datastore.to_path_buf(),
            retention: retention.to_path_buf(),
            policy,
            data_io: DataIo::default(),
            inner: Mutex::new(inner),
            idle: SyncMutex::new(idle),
            _lock: lock,
        })
    }

    /// Writes the data of flat disks opened from now on with `io`.
    pub fn with_data_io(mut self, io: DataIo) -> Registry {
        self.data_io = io;
        self
    }

    pub fn datastore(&self) -> &Path {
        &self.datastore
    }

    pub fn retention(&self) -> &Path {
        &self.retention
    }

    /// Opens (or creates) the disk a peer declares and returns its entry; a disk already
    /// open is resumed if a bad batch had stopped it.
    pub async fn attach(&self, info: &DiskInfo) -> Result<Arc<DiskEntry>, Refusal> {
        check_disk_info(info)?;
        let id = info.disk_id.as_str();
        let mut inner = self.inner.lock().await;
        Self::check_claims(&inner, info)?;
        if let Some(entry) = inner.open.get(id) {
            // A full queue only delays the resume until the applier catches up.
            let _ = entry.tx.send(ApplyCmd::Resume).await;
            return Ok(entry.clone());
        }
        let (datastore, retention, info_owned) =
            (self.datastore.clone(), self.retention.clone(), info.clone());
        let (policy, data_io) = (self.policy, self.data_io);
        let opened = tokio::task::spawn_blocking(move || {
            open(&datastore, &retention, policy, data_io, &info_owned)
        })
        .await
        .map_err(|e| Refusal::for_disk(Code::Internal, id, format!("open task failed: {e}")))??;
        let (entry, thread) = opened;
        inner.threads.push(thread);
        inner
            .known
            .insert(id.to_string(), (info.name.clone(), info.capacity));
        inner.names.insert(info.name.clone(), id.to_string());
        inner.open.insert(id.to_string(), entry.clone());
        self.idle.lock().remove(id);
        Ok(entry)
    }

    /// Checks a declaration against the claims: the id must keep its name and capacity, and
    /// the name must not belong to another id.
    fn check_claims(inner: &Inner, info: &DiskInfo) -> Result<(), Refusal> {
        let id = info.disk_id.as_str();
        if let Some((name, capacity)) = inner.known.get(id) {
            if *name != info.name {
                return Err(Refusal::for_disk(
                    Code::DiskConflict,
                    id,
                    format!(
                        "disk id {id} is already replicated to {name}.vmdk, not {}.vmdk",
                        info.name
                    ),
                ));
            }
            if *capacity != info.capacity {
                return Err(Refusal::for_disk(
                    Code::DiskConflict,
                    id,
                    format!(
                        "disk {id} was declared with {capacity} bytes, now with {}",
                        info.capacity
                    ),
                ));
            }
        }
        if !inner.known.contains_key(id) {
            // Two disk ids for one ddb.uuid (a template clone, or one UUID written twice):
            // both would claim the same target identity.
            let uuid = vmdk::uuid_for(id);
            if let Some((other, (name, _))) = inner
                .known
                .iter()
                .find(|(other, _)| vmdk::uuid_for(other) == uuid)
            {
                return Err(Refusal::for_disk(
                    Code::DiskConflict,
                    id,
                    format!(
                        "disk {id} has the ddb.uuid {uuid} of disk {other} ({name}.vmdk), which \
                         this master target already holds (a disk cloned from a template?); \
                         give the source disk a new UUID"
                    ),
                ));
            }
        }
        if let Some(owner) = inner.names.get(&info.name)
            && owner != id
        {
            return Err(Refusal::for_disk(
                Code::DiskNameCollision,
                id,
                format!(
                    "the name {} is already used by disk {owner} on this datastore; choose another name",
                    info.name
                ),
            ));
        }
        Ok(())
    }

    /// Where to hash `info`'s disk once every batch up to `after_seq` is durable: its extent
    /// file and the applied seq, or `None` when the image does not exist.
    pub async fn hash_target(
        &self,
        info: &DiskInfo,
        after_seq: u64,
    ) -> Result<Option<(DataRef, u64)>, Refusal> {
        check_disk_info(info)?;
        let id = info.disk_id.as_str();
        let open = {
            let inner = self.inner.lock().await;
            Self::check_claims(&inner, info)?;
            inner.open.get(id).cloned()
        };
        if let Some(entry) = open {
            let deadline = tokio::time::Instant::now() + HASH_WAIT;
            loop {
                let applied = entry.shared.durable_seq.load(Ordering::Acquire);
                if applied >= after_seq {
                    return Ok(Some((entry.shared.data.clone(), applied)));
                }
                // A stopped disk will not get there: say why instead of waiting.
                if let Some(r) = entry.shared.stopped.lock().clone() {
                    return Err(r);
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(Refusal::for_disk(
                        Code::Unavailable,
                        id,
                        format!(
                            "disk {id} is applied up to seq {applied}, not yet {after_seq}; retry"
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let applied = self.idle.lock().get(id).map_or(0, |s| s.applied_seq);
        let (datastore, info_owned) = (self.datastore.clone(), info.clone());
        let found = tokio::task::spawn_blocking(move || {
            let spec = DiskSpec {
                disk_id: &info_owned.disk_id,
                name: &info_owned.name,
                capacity: info_owned.capacity,
                format: DiskFormat::try_from(info_owned.format).unwrap_or(DiskFormat::Unspecified),
            };
            vmdk::inspect(&datastore, &spec).map_err(|e| e.refusal(&info_owned.disk_id))
        })
        .await
        .map_err(|e| {
            Refusal::for_disk(Code::Internal, id, format!("inspect task failed: {e}"))
        })??;
        Ok(found.map(|data| (data, applied)))
    }

    /// Every open disk, and the last known state of the others.
    pub async fn snapshot(&self) -> (Vec<Arc<DiskEntry>>, Vec<DiskState>) {
        let open: Vec<_> = self.inner.lock().await.open.values().cloned().collect();
        let idle = self.idle.lock().values().cloned().collect();
        (open, idle)
    }

    /// Asks every applier to commit and stop, and waits for them.
    pub async fn shutdown(&self) {
        let (entries, threads) = {
            let mut inner = self.inner.lock().await;
            let entries: Vec<_> = inner.open.drain().map(|(_, e)| e).collect();
            (entries, std::mem::take(&mut inner.threads))
        };
        for e in &entries {
            let _ = e.tx.send(ApplyCmd::Shutdown).await;
        }
        drop(entries);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// An in-place recovery that did not finish leaves the target half rolled back: refuse
/// the disk until it is run again.
fn refuse_interrupted_recovery(retention: &Path, id: &str) -> Result<(), Refusal> {
    // An unreadable intent refuses the disk too, without naming the point.
    let point = match crate::recovery::Intent::read(retention, id) {
        Ok(None) => return Ok(()),
        Ok(Some(i)) => format!(" --point '{}'", i.point),
        Err(_) => String::new(),
    };
    let intent = crate::recovery::intent_path(retention, id);
    Err(Refusal::for_disk(
        Code::DiskConflict,
        id,
        format!(
            "an in-place recovery of disk {id} was interrupted ({} exists); run \
             `master-target recover --in-place{point}` again before replicating it",
            intent.display()
        ),
    ))
}

/// Opens `id`'s journal, which rolls an uncommitted group back into the target, and brings
/// the state file up to the journal when a crash came between the commit record and it.
fn open_journal(
    retention: &Path,
    id: &str,
    policy: RetentionPolicy,
    disk: &mut Disk,
    state: &mut DiskState,
) -> Result<Journal, String> {
    let legacy = state::disks_dir(retention).join(format!("{id}.markers"));
    if legacy.exists() {
        tracing::warn!(path = %legacy.display(), "ignoring a marker log of an older version: its points have no undo data");
    }
    let (journal, opened) = Journal::open(retention, id, state.applied_seq, policy, disk.extent())
        .map_err(|e| e.to_string())?;
    if opened.committed_seq > state.applied_seq {
        // The commit record made it, the state file did not: the journal is the truth.
        if let Some(b) = &opened.last_batch {
            state.applied_seq = b.seq;
            state.last_batch_unix_ms = b.batch_unix_ms;
            state.in_resync = b.in_resync;
        }
        if let Some(b) = &opened.last_consistent {
            state.consistent_seq = b.seq;
            state.consistent_unix_ms = b.batch_unix_ms;
        }
        state.store(retention).map_err(|e| e.to_string())?;
    }
    Ok(journal)
}

/// Opens a disk's state, image and journal (rolling back an uncommitted group) and starts
/// its applier (blocking).
fn open(
    datastore: &Path,
    retention: &Path,
    policy: RetentionPolicy,
    data_io: DataIo,
    info: &DiskInfo,
) -> Result<(Arc<DiskEntry>, std::thread::JoinHandle<()>), Refusal> {
    let id = info.disk_id.as_str();
    let io = |e: &dyn std::fmt::Display| Refusal::for_disk(Code::Io, id, e.to_string());
    refuse_interrupted_recovery(retention, id)?;
    let existing = DiskState::load(retention, id).map_err(|e| io(&e))?;
    let claimed_now = existing.is_none();
    let claim = match &existing {
        None => Claim::New,
        Some(s) if s.applied_seq == 0 => Claim::Unapplied,
        Some(_) => Claim::Applied,
    };
    let mut state = match existing {
        Some(s) => s,
        None => {
            // The claim comes first: a create interrupted after it is recognised as ours.
            let s = DiskState {
                disk_id: id.to_string(),
                name: info.name.clone(),
                capacity: info.capacity,
                ..Default::default()
            };
            s.store(retention).map_err(|e| io(&e))?;
            s
        }
    };
    let spec = DiskSpec {
        disk_id: id,
        name: &info.name,
        capacity: info.capacity,
        format: DiskFormat::try_from(info.format).unwrap_or(DiskFormat::Unspecified),
    };
    let unclaim = |r: Refusal| {
        if claimed_now {
            let _ = std::fs::remove_file(state::state_path(retention, id));
        }
        r
    };
    let mut disk =
        Disk::open_or_create(datastore, &spec, claim).map_err(|e| unclaim(e.refusal(id)))?;
    // Before the journal opens: rolling back an uncommitted group writes the target too.
    disk.set_data_io(data_io)
        .map_err(|e| unclaim(e.refusal(id)))?;
    let data = disk.extent().data_ref();
    let journal =
        open_journal(retention, id, policy, &mut disk, &mut state).map_err(|e| unclaim(io(&e)))?;
    let commit_lock = CommitLock::open(retention, id).map_err(|e| io(&e))?;
    let shared = Arc::new(DiskShared {
        disk_id: id.to_string(),
        name: info.name.clone(),
        capacity: info.capacity,
        data,
        durable_seq: AtomicU64::new(state.applied_seq),
        bytes_applied: AtomicU64::new(0),
        journal_bytes: AtomicU64::new(journal.bytes()),
        state: SyncMutex::new(state.clone()),
        stopped: SyncMutex::new(None),
        buffers: Default::default(),
    });
    let data_io = disk
        .extent()
        .data_io()
        .map_or("pwrite (sparse)", DataIo::name);
    tracing::info!(disk = id, name = %info.name, applied_seq = state.applied_seq, data_io, "disk open");
    let applier = Applier::new(
        disk,
        journal,
        commit_lock,
        retention.to_path_buf(),
        state,
        shared.clone(),
    );
    let (tx, thread) = applier.spawn().map_err(|e| io(&e))?;
    Ok((Arc::new(DiskEntry { shared, tx }), thread))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, name: &str) -> DiskInfo {
        DiskInfo {
            disk_id: id.into(),
            name: name.into(),
            capacity: 1 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn a_disk_with_an_interrupted_in_place_recovery_is_not_opened() {
        let t = tempfile::tempdir().unwrap();
        let ret = t.path();
        std::fs::create_dir_all(state::disks_dir(ret)).unwrap();
        refuse_interrupted_recovery(ret, "d1").unwrap();
        std::fs::write(crate::recovery::intent_path(ret, "d1"), b"").unwrap();
        let e = refuse_interrupted_recovery(ret, "d1").unwrap_err();
        assert_eq!(e.code, Code::DiskConflict, "{e}");
        assert!(e.message.contains("recover --in-place"), "{e}");
        // Other disks are not affected.
        refuse_interrupted_recovery(ret, "d2").unwrap();
    }

    #[test]
    fn a_disk_whose_uuid_clashes_with_a_held_disk_is_refused() {
        let mut inner = Inner::default();
        let held = "0123456789abcdef0123456789abcdef";
        inner.known.insert(held.into(), ("a".into(), 1 << 20));
        inner.names.insert("a".into(), held.into());
        // The same disk again is fine, and so is an unrelated one.
        Registry::check_claims(&inner, &info(held, "a")).unwrap();
        Registry::check_claims(&inner, &info("other-disk", "b")).unwrap();
        // The same UUID spelt another way is another id with the same ddb.uuid.
        let clone = info("01234567-89AB-CDEF-0123-456789ABCDEF", "b");
        let e = Registry::check_claims(&inner, &clone).unwrap_err();
        assert_eq!(e.code, Code::DiskConflict, "{e}");
        assert!(
            e.message.contains(held) && e.message.contains("a.vmdk"),
            "{e}"
        );
    }
}
