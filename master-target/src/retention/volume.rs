//! Prerequisite checks of the retention volume, and its claim by one master target
//! (the table of checks, codes and remedies is `docs/prerequisites.md`).
//!
//! The claim is `RETENTION/.lock`: an exclusive `flock` held for the server's lifetime
//! (and by `recover --in-place`), plus a line naming the holder (host, pid, start time)
//! written into it, so a refusal can say who holds the volume. The lock, not the text, is
//! the claim: a file left by a dead process is simply taken over.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use protocol::error::Code;

use crate::vmdk;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(
        "retention volume {path} is not usable: {reason}; create it (or fix its permissions) \
         and make it writable by this user"
    )]
    NotWritable { path: PathBuf, reason: String },
    #[error("retention volume {path} overlaps the datastore {datastore}; use a separate directory")]
    IsDatastore { path: PathBuf, datastore: PathBuf },
    #[error(
        "retention volume {path} looks like a process-server cache volume ({found} exists); \
         use a separate directory"
    )]
    IsCache { path: PathBuf, found: String },
    #[error(
        "retention volume {path} is already claimed by another master target ({holder}); \
         stop it or use another directory"
    )]
    Claimed { path: PathBuf, holder: String },
    #[error(
        "retention volume {path} is FAT/FAT32, which cannot hold files over 4 GiB nor sync \
         safely; use ext4 or xfs"
    )]
    Fat { path: PathBuf },
    #[error("retention volume {path} has no capacity (0 bytes free); free space or grow it")]
    NoCapacity { path: PathBuf },
}

impl VolumeError {
    /// The code a refusal carries.
    pub fn code(&self) -> Code {
        match self {
            VolumeError::NotWritable { .. } => Code::Io,
            VolumeError::IsDatastore { .. } | VolumeError::IsCache { .. } => Code::BadRequest,
            VolumeError::Claimed { .. } => Code::Unavailable,
            VolumeError::Fat { .. } => Code::BadRequest,
            VolumeError::NoCapacity { .. } => Code::NoSpace,
        }
    }
}

fn same_or_nested(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Runs every check of the retention volume (creating it and its `disks/` directory if
/// missing) and claims it; the returned file holds the claim.
pub fn check_and_claim(datastore: &Path, retention: &Path) -> Result<File, VolumeError> {
    let path = retention.to_path_buf();
    let not_writable = |reason: String| VolumeError::NotWritable {
        path: path.clone(),
        reason,
    };
    let disks = crate::state::disks_dir(retention);
    std::fs::create_dir_all(&disks)
        .map_err(|e| not_writable(format!("cannot create {}: {e}", disks.display())))?;
    let probe = retention.join(".failback-write-probe");
    File::create(&probe)
        .and_then(|f| f.sync_all())
        .map_err(|e| not_writable(format!("cannot create files: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    if vmdk::fs_type(retention) == Some(vmdk::MSDOS_SUPER_MAGIC) {
        return Err(VolumeError::Fat { path });
    }
    if free_bytes(retention) == Some(0) {
        return Err(VolumeError::NoCapacity { path });
    }
    let ds = datastore
        .canonicalize()
        .map_err(|e| not_writable(e.to_string()))?;
    let rt = retention
        .canonicalize()
        .map_err(|e| not_writable(e.to_string()))?;
    if same_or_nested(&ds, &rt) {
        return Err(VolumeError::IsDatastore {
            path,
            datastore: ds,
        });
    }
    if let Some(found) = cache_volume_sign(retention) {
        return Err(VolumeError::IsCache { path, found });
    }
    claim(retention).map_err(|holder| VolumeError::Claimed { path, holder })
}

/// A file the process server keeps in its cache volume, if `dir` has one: its `lock`, or a
/// `<16 digits>.seg` segment at the top level.
fn cache_volume_sign(dir: &Path) -> Option<String> {
    if dir.join("lock").is_file() {
        return Some("lock".into());
    }
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let digits = name.strip_suffix(".seg")?;
        (digits.len() == 16 && digits.bytes().all(|c| c.is_ascii_digit())).then_some(name)
    })
}

/// Bytes free for this user on the filesystem of `path`, if statvfs works.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is NUL-terminated and `st` valid for writes of a statvfs; it is read only
    // after statvfs returned success.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Takes `RETENTION/.lock` and writes who holds it; `Err` names the current holder.
pub fn claim(retention: &Path) -> Result<File, String> {
    let path = retention.join(".lock");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a valid, owned descriptor; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = f.take(256).read_to_string(&mut holder);
        let holder = holder.trim();
        return Err(if holder.is_empty() {
            format!("{} is locked", path.display())
        } else {
            format!("{holder}; a running master target holds {}", path.display())
        });
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let line = format!(
        "master-target on {} pid {} since {}\n",
        host.trim(),
        std::process::id(),
        crate::status::format_time(protocol::now_unix_ms())
    );
    // The text is informative only: failing to write it does not lose the claim.
    let _ = f
        .set_len(0)
        .and_then(|()| f.seek(SeekFrom::Start(0)))
        .and_then(|_| f.write_all(line.as_bytes()));
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retention_volume_serves_one_master_target_and_is_no_datastore_or_cache() {
        let t = tempfile::tempdir().unwrap();
        let (ds, ret) = (t.path().join("ds"), t.path().join("ret"));
        std::fs::create_dir_all(&ds).unwrap();
        let first = check_and_claim(&ds, &ret).unwrap();
        let e = check_and_claim(&ds, &ret).unwrap_err();
        assert!(
            matches!(&e, VolumeError::Claimed { holder, .. } if holder.contains("pid")),
            "{e}"
        );
        drop(first);
        check_and_claim(&ds, &ret).unwrap();
        let e = check_and_claim(&ds, &ds.join("retention")).unwrap_err();
        assert!(matches!(e, VolumeError::IsDatastore { .. }), "{e}");
        let cache = t.path().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(cache.join("0000000000000001.seg"), b"x").unwrap();
        let e = check_and_claim(&ds, &cache).unwrap_err();
        assert!(matches!(e, VolumeError::IsCache { .. }), "{e}");
        let e = check_and_claim(&ds, Path::new("/proc/failback-retention")).unwrap_err();
        assert_eq!(e.code(), Code::Io, "{e}");
    }
}
