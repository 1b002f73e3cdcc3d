//! Target disks: VMDK images on the datastore directory.
//!
//! ```text
//!   DATASTORE/NAME.vmdk         text descriptor   (descriptor.rs: parse / render)
//!   DATASTORE/NAME-flat.vmdk    raw extent        (flat.rs: locked, fallocated, mmapped)
//!   DATASTORE/NAME.vmdk         or monolithicSparse: header, embedded descriptor, GD/GTs,
//!                               grains             (sparse.rs: locked, pwrite, grains)
//!   DATASTORE/NAME-fNNN.vmdk    or twoGbMaxExtentFlat: 2 GiB flat extents
//!                               (two_gb_flat.rs: one flat.rs extent per file)
//!          \______________________ Disk (this module): open-or-create, identity, CID;
//!                                  extent.rs: one writer/reader API over both layouts;
//!                                  verify.rs: structural checks (`master-target verify`)
//! ```
//!
//! Invariants:
//! * a disk is identified by `ddb.uuid`, the replicated disk id itself when that is a UUID,
//!   else derived from it ([`uuid_for`]); an existing image whose uuid differs belongs to another disk and is
//!   refused ([`VmdkError::NameCollision`]), one without a uuid (e.g. made by qemu-img) is
//!   adopted and gets ours on its first descriptor rewrite;
//! * the capacity declared by the replicating side equals the descriptor's, or the disk
//!   is refused ([`VmdkError::CapacityMismatch`]);
//! * the descriptor is only ever replaced atomically (tmp, fsync, rename, fsync dir);
//!   the exclusive lock is therefore held on the flat extent (the file that is mapped and
//!   never replaced), not on the descriptor, whose inode each rewrite replaces;
//! * the CID is renewed once per open, before the first byte is written, as VMware and
//!   qemu do, so tools that cache content by CID see the change; `ddb.uuid` never changes.

pub mod descriptor;
pub mod extent;
pub mod flat;
pub mod sparse;
pub mod two_gb_flat;
pub mod verify;

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use protocol::error::{Code, Refusal};
use protocol::pb::DiskFormat;
use sha2::{Digest, Sha256};

use self::descriptor::{CreateType, Descriptor, DescriptorError, ExtentSpec};
use self::extent::{DataRef, Extent};
pub use self::flat::DataIo;
use self::flat::{FlatError, FlatExtent};
use self::sparse::{SparseError, SparseExtent};
use self::two_gb_flat::SplitFlat;

/// Virtual hardware version written into new descriptors (ESXi 6.5+).
const VIRTUAL_HW_VERSION: &str = "13";

#[derive(Debug, thiserror::Error)]
pub enum VmdkError {
    #[error("{path}: {source}")]
    Descriptor {
        path: PathBuf,
        source: DescriptorError,
    },
    #[error("{0}")]
    Flat(#[from] FlatError),
    #[error("{0}")]
    Sparse(#[from] SparseError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{path} belongs to another disk (ddb.uuid \"{found}\", disk id expects \"{expected}\"); \
         choose another name or remove the image"
    )]
    NameCollision {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path} exists without its descriptor; remove it or choose another name")]
    OrphanExtent { path: PathBuf },
    #[error(
        "{path} is missing but the retention volume says the disk was replicated to it; \
         restore the image, or remove the disk's state file to start a full sync"
    )]
    Missing { path: PathBuf },
    #[error("{path} has {found} bytes but the disk declares {declared}")]
    CapacityMismatch {
        path: PathBuf,
        found: u64,
        declared: u64,
    },
    #[error(
        "{path} has snapshots ({child} is beside it): writing the base disk would corrupt \
         them; remove the snapshots first"
    )]
    HasSnapshots { path: PathBuf, child: String },
    #[error("the datastore {path} is not usable: {reason}")]
    DatastoreNotUsable { path: PathBuf, reason: String },
}

impl crate::storage::SpaceError for VmdkError {
    fn is_no_space(&self) -> bool {
        match self {
            VmdkError::Flat(FlatError::NoSpace { .. })
            | VmdkError::Sparse(SparseError::NoSpace { .. }) => true,
            VmdkError::Io { source, .. } => crate::storage::is_no_space(source),
            _ => false,
        }
    }
}

impl VmdkError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> VmdkError {
        VmdkError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The refusal sent to the peer for this error.
    pub fn refusal(&self, disk_id: &str) -> Refusal {
        let code = match self {
            VmdkError::Descriptor {
                source: DescriptorError::Delta { .. },
                ..
            } => Code::DiskHasSnapshots,
            VmdkError::HasSnapshots { .. } => Code::DiskHasSnapshots,
            VmdkError::Descriptor { .. } => Code::DiskConflict,
            VmdkError::Flat(FlatError::NoSpace { .. }) => Code::NoSpace,
            VmdkError::Flat(FlatError::Locked { .. } | FlatError::WrongSize { .. }) => {
                Code::DiskConflict
            }
            VmdkError::Flat(FlatError::Io { .. }) | VmdkError::Io { .. } => Code::Io,
            VmdkError::Sparse(SparseError::NoSpace { .. }) => Code::NoSpace,
            VmdkError::Sparse(SparseError::Io { .. }) => Code::Io,
            VmdkError::Sparse(
                SparseError::Locked { .. }
                | SparseError::Unsupported { .. }
                | SparseError::Corrupt { .. },
            ) => Code::DiskConflict,
            VmdkError::NameCollision { .. } | VmdkError::OrphanExtent { .. } => {
                Code::DiskNameCollision
            }
            VmdkError::CapacityMismatch { .. } | VmdkError::Missing { .. } => Code::DiskConflict,
            VmdkError::DatastoreNotUsable { .. } => Code::DatastoreNotUsable,
        };
        Refusal::for_disk(code, disk_id, self.to_string())
    }
}

/// The `ddb.uuid` of a replicated disk, printed as VMware prints it
/// (`"xx xx xx xx xx xx xx xx-xx xx xx xx xx xx xx xx"`):
/// * a disk id that is a UUID (32 hex digits, bare or dashed 8-4-4-4-12, any case) gives
///   exactly those 16 bytes, so a source disk replicated back onto its original ESXi disk
///   (whose `ddb.uuid` is the same UUID) is recognised and adopted, not refused;
/// * any other id gives the first 16 bytes of SHA-256 over it, with the leading bytes
///   ESXi uses (`60 00 C2 9x`).
pub fn uuid_for(disk_id: &str) -> String {
    let b = uuid_bytes(disk_id).unwrap_or_else(|| {
        let h = Sha256::digest(format!("failback-disk-uuid\0{disk_id}").as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&h[..16]);
        b[0] = 0x60;
        b[1] = 0x00;
        b[2] = 0xc2;
        b[3] = 0x90 | (b[3] & 0x0f);
        b
    });
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}", hex[..8].join(" "), hex[8..].join(" "))
}

/// The 16 bytes of a disk id written as a UUID, if it is one.
fn uuid_bytes(id: &str) -> Option<[u8; 16]> {
    let dashed = id.len() == 36
        && id
            .char_indices()
            .all(|(i, c)| (c == '-') == matches!(i, 8 | 13 | 18 | 23));
    let bare = id.len() == 32;
    if !dashed && !bare {
        return None;
    }
    let hex: String = id.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(b)
}

fn same_uuid(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

/// A random CID that is never one of the reserved values.
fn new_cid() -> u32 {
    loop {
        let c: u32 = rand::random();
        if c < 0xffff_fffe {
            return c;
        }
    }
}

/// Replaces `path` with `bytes` atomically and durably: tmp -> fsync -> rename -> fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = File::create(&tmp)?;
    if let Err(e) = f.write_all(bytes) {
        // On a full volume the partial file would hold space the retry needs; the write's
        // error is the one to report.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    f.sync_all().map_err(crate::storage::sync_failed)?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    crate::storage::sync_dir(dir)
}

/// What the retention volume knew of a disk before this open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nothing: the disk is new here. An extent without a descriptor is someone else's.
    New,
    /// Claimed by an earlier run, nothing applied: an extent without a descriptor is what
    /// an interrupted create left, and is redone.
    Unapplied,
    /// Batches were applied: the image must exist.
    Applied,
}

/// What the replicating side declares about a disk.
#[derive(Debug, Clone)]
pub struct DiskSpec<'a> {
    pub disk_id: &'a str,
    pub name: &'a str,
    pub capacity: u64,
    pub format: DiskFormat,
}

/// An open target disk, ready to take writes.
#[derive(Debug)]
pub struct Disk {
    descriptor_path: PathBuf,
    descriptor: Descriptor,
    extent: Extent,
    uuid: String,
    /// Whether this open already gave the disk a new CID.
    cid_renewed: bool,
}

impl Disk {
    /// Path of the descriptor of disk `name` on `datastore`.
    pub fn descriptor_path(datastore: &Path, name: &str) -> PathBuf {
        datastore.join(format!("{name}.vmdk"))
    }

    /// Opens `DATASTORE/NAME.vmdk`, or creates it when neither it nor its extent exists.
    /// `claim` says what the retention volume knows of this disk (see [`Claim`]).
    pub fn open_or_create(
        datastore: &Path,
        spec: &DiskSpec<'_>,
        claim: Claim,
    ) -> Result<Disk, VmdkError> {
        let desc = Self::descriptor_path(datastore, spec.name);
        if let Some(child) = snapshot_beside(datastore, spec.name) {
            return Err(VmdkError::HasSnapshots { path: desc, child });
        }
        if desc.exists() {
            return Self::open(datastore, &desc, spec);
        }
        let create_type = create_type_of(spec.format);
        // The data files a create would make, beside the descriptor.
        let leftovers: Vec<PathBuf> = extents_for(create_type, spec.name, spec.capacity)
            .into_iter()
            .map(|e| datastore.join(e.file))
            .filter(|p| *p != desc && p.exists())
            .collect();
        match claim {
            Claim::Applied => return Err(VmdkError::Missing { path: desc }),
            Claim::New if !leftovers.is_empty() => {
                return Err(VmdkError::OrphanExtent {
                    path: leftovers[0].clone(),
                });
            }
            Claim::Unapplied => {
                for p in &leftovers {
                    tracing::warn!(path = %p.display(), "removing the extent of an interrupted create");
                    std::fs::remove_file(p).map_err(|e| VmdkError::io("remove", p, e))?;
                }
            }
            Claim::New => {}
        }
        Self::create(datastore, &desc, spec, create_type)
    }

    fn open(datastore: &Path, desc: &Path, spec: &DiskSpec<'_>) -> Result<Disk, VmdkError> {
        // Identity first (without taking the lock), then the extent.
        let (descriptor, uuid, data) = check_descriptor(datastore, desc, spec)?;
        Ok(Disk {
            descriptor_path: desc.to_path_buf(),
            descriptor,
            extent: Extent::open(&data, spec.capacity)?,
            uuid,
            cid_renewed: false,
        })
    }

    fn create(
        datastore: &Path,
        desc: &Path,
        spec: &DiskSpec<'_>,
        create_type: CreateType,
    ) -> Result<Disk, VmdkError> {
        check_writable(datastore)?;
        let uuid = uuid_for(spec.disk_id);
        let extents = extents_for(create_type, spec.name, spec.capacity);
        let descriptor = fresh_descriptor(create_type, extents, &uuid);
        let extent = match create_type {
            CreateType::MonolithicSparse => {
                let text = descriptor
                    .render()
                    .map_err(|source| VmdkError::Descriptor {
                        path: desc.to_path_buf(),
                        source,
                    })?;
                Extent::Sparse(SparseExtent::create(desc, spec.capacity, &text)?)
            }
            CreateType::TwoGbMaxExtentFlat => {
                Extent::Split(SplitFlat::create(datastore, &descriptor.extents)?)
            }
            CreateType::Vmfs | CreateType::MonolithicFlat => Extent::Flat(FlatExtent::create(
                &datastore.join(&descriptor.extents[0].file),
                spec.capacity,
            )?),
        };
        let disk = Disk {
            descriptor_path: desc.to_path_buf(),
            descriptor,
            extent,
            uuid,
            // A new disk's CID is fresh already.
            cid_renewed: true,
        };
        disk.write_descriptor()?;
        tracing::info!(path = %desc.display(), capacity = spec.capacity, "created disk");
        Ok(disk)
    }

    fn write_descriptor(&self) -> Result<(), VmdkError> {
        let text = self
            .descriptor
            .render()
            .map_err(|source| VmdkError::Descriptor {
                path: self.descriptor_path.clone(),
                source,
            })?;
        match &self.extent {
            Extent::Sparse(s) => Ok(s.write_descriptor(&text)?),
            Extent::Flat(_) | Extent::Split(_) => {
                write_atomic(&self.descriptor_path, text.as_bytes())
                    .map_err(|e| VmdkError::io("write descriptor", &self.descriptor_path, e))
            }
        }
    }

    /// Gives the disk a new CID (and matching longContentID, and our uuid if it had none)
    /// unless this open did already. Call before the first write.
    pub fn renew_cid(&mut self) -> Result<(), VmdkError> {
        if self.cid_renewed {
            return Ok(());
        }
        let cid = new_cid();
        self.descriptor.cid = cid;
        let long = match self.descriptor.ddb_get("longContentID") {
            Some(old) if old.len() == 32 => format!("{}{cid:08x}", &old[..24]),
            _ => long_content_id(cid),
        };
        self.descriptor.ddb_set("longContentID", long);
        if self.descriptor.ddb_get("uuid").is_none() {
            self.descriptor.ddb_set("uuid", self.uuid.clone());
        }
        self.write_descriptor()?;
        self.cid_renewed = true;
        Ok(())
    }

    pub fn capacity(&self) -> u64 {
        self.extent.capacity()
    }

    /// Selects how the data of a flat layout is written (see [`flat::DataIo`]); call it
    /// right after opening. A sparse disk always writes with pwrite.
    pub fn set_data_io(&mut self, io: DataIo) -> Result<(), VmdkError> {
        self.extent.set_data_io(io)
    }

    pub fn extent(&mut self) -> &mut Extent {
        &mut self.extent
    }

    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }
}

/// The first snapshot file of disk `name` on `datastore`, if there is one: ESXi names a
/// snapshot's descriptor `NAME-000001.vmdk` (6 digits) and its extent
/// `NAME-000001-delta.vmdk` or `NAME-000001-sesparse.vmdk`, beside the base disk.
fn snapshot_beside(datastore: &Path, name: &str) -> Option<String> {
    let prefix = format!("{name}-");
    let mut found: Vec<String> = std::fs::read_dir(datastore)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let rest = file.strip_prefix(&prefix)?;
            let digits = ["-delta.vmdk", "-sesparse.vmdk", ".vmdk"]
                .iter()
                .find_map(|suffix| rest.strip_suffix(suffix))?;
            (digits.len() == 6 && digits.bytes().all(|c| c.is_ascii_digit())).then_some(file)
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// The layout a disk format is created with (unspecified: vmfs, as on ESXi).
pub fn create_type_of(format: DiskFormat) -> CreateType {
    match format {
        DiskFormat::Unspecified | DiskFormat::Vmfs => CreateType::Vmfs,
        DiskFormat::MonolithicFlat => CreateType::MonolithicFlat,
        DiskFormat::MonolithicSparse => CreateType::MonolithicSparse,
        DiskFormat::TwoGbMaxExtentFlat => CreateType::TwoGbMaxExtentFlat,
    }
}

/// The extent files of a new disk `name` of `capacity` bytes in `create_type`.
pub fn extents_for(create_type: CreateType, name: &str, capacity: u64) -> Vec<ExtentSpec> {
    let one = |file: String| {
        vec![ExtentSpec {
            sectors: capacity / 512,
            file,
        }]
    };
    match create_type {
        CreateType::Vmfs | CreateType::MonolithicFlat => one(format!("{name}-flat.vmdk")),
        CreateType::MonolithicSparse => one(format!("{name}.vmdk")),
        CreateType::TwoGbMaxExtentFlat => {
            two_gb_flat::layout(name, capacity, two_gb_flat::EXTENT_BYTES)
        }
    }
}

/// The descriptor of a new disk made of `extents` with `uuid`.
pub fn fresh_descriptor(
    create_type: CreateType,
    extents: Vec<ExtentSpec>,
    uuid: &str,
) -> Descriptor {
    let cid = new_cid();
    let sectors: u64 = extents.iter().map(|e| e.sectors).sum();
    let cylinders = (sectors / (255 * 63)).min(65535);
    let mut header_extra = vec![("encoding".to_string(), "UTF-8".to_string())];
    if create_type == CreateType::Vmfs {
        header_extra.push(("isNativeSnapshot".into(), "no".into()));
    }
    Descriptor {
        cid,
        create_type,
        extents,
        header_extra,
        ddb: vec![
            ("adapterType".into(), "lsilogic".into()),
            ("geometry.cylinders".into(), cylinders.to_string()),
            ("geometry.heads".into(), "255".into()),
            ("geometry.sectors".into(), "63".into()),
            ("longContentID".into(), long_content_id(cid)),
            ("uuid".into(), uuid.to_string()),
            ("virtualHWVersion".into(), VIRTUAL_HW_VERSION.into()),
        ],
    }
}

/// Reads and parses the descriptor of the image at `desc` (a text descriptor, or the one
/// embedded in a sparse file), with no identity check; also says where its data is.
pub fn read_image(datastore: &Path, desc: &Path) -> Result<(Descriptor, DataRef), VmdkError> {
    let sparse = sparse::is_sparse(desc);
    let bytes = if sparse {
        sparse::read_embedded_descriptor(desc)?
    } else {
        read_limited(desc)?
    };
    let descriptor = Descriptor::parse(&bytes).map_err(|source| VmdkError::Descriptor {
        path: desc.to_path_buf(),
        source,
    })?;
    // A sparse layout is only valid embedded; a text descriptor naming one is a layout
    // (hosted sparse with a separate extent file) we do not write.
    if sparse != (descriptor.create_type == CreateType::MonolithicSparse) {
        return Err(VmdkError::Descriptor {
            path: desc.to_path_buf(),
            source: DescriptorError::UnsupportedCreateType(format!(
                "{} ({})",
                descriptor.create_type.as_str(),
                if sparse {
                    "in a sparse file"
                } else {
                    "in a text descriptor"
                }
            )),
        });
    }
    let dir = desc.parent().unwrap_or(datastore);
    let data = match descriptor.create_type {
        CreateType::MonolithicSparse => DataRef::sparse(desc.to_path_buf()),
        CreateType::TwoGbMaxExtentFlat => DataRef::split(
            descriptor
                .extents
                .iter()
                .map(|e| (dir.join(&e.file), e.sectors * 512))
                .collect(),
        ),
        CreateType::Vmfs | CreateType::MonolithicFlat => {
            DataRef::flat(dir.join(&descriptor.extents[0].file))
        }
    };
    Ok((descriptor, data))
}

/// Reads `desc` and checks that it is `spec`'s disk (uuid, capacity); returns the
/// descriptor, the disk's uuid and where its data is.
fn check_descriptor(
    datastore: &Path,
    desc: &Path,
    spec: &DiskSpec<'_>,
) -> Result<(Descriptor, String, DataRef), VmdkError> {
    let (descriptor, data) = read_image(datastore, desc)?;
    let uuid = uuid_for(spec.disk_id);
    if let Some(found) = descriptor.ddb_get("uuid")
        && !same_uuid(found, &uuid)
    {
        return Err(VmdkError::NameCollision {
            path: desc.to_path_buf(),
            found: found.to_string(),
            expected: uuid,
        });
    }
    if descriptor.capacity() != spec.capacity {
        return Err(VmdkError::CapacityMismatch {
            path: desc.to_path_buf(),
            found: descriptor.capacity(),
            declared: spec.capacity,
        });
    }
    Ok((descriptor, uuid, data))
}

/// Looks at `spec`'s image without opening it for writing: `Ok(None)` when it does not
/// exist, else where its data is, once its identity and capacity are checked.
pub fn inspect(datastore: &Path, spec: &DiskSpec<'_>) -> Result<Option<DataRef>, VmdkError> {
    let desc = Disk::descriptor_path(datastore, spec.name);
    if !desc.exists() {
        return Ok(None);
    }
    let (_, _, data) = check_descriptor(datastore, &desc, spec)?;
    Ok(Some(data))
}

/// 32 hex digits, random but for the last 8, which are the CID.
fn long_content_id(cid: u32) -> String {
    let r: [u8; 12] = rand::random();
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}{cid:08x}")
}

fn read_limited(path: &Path) -> Result<Vec<u8>, VmdkError> {
    use std::io::Read;
    let f = File::open(path).map_err(|e| VmdkError::io("open", path, e))?;
    let mut bytes = Vec::new();
    f.take(descriptor::MAX_DESCRIPTOR_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| VmdkError::io("read", path, e))?;
    Ok(bytes)
}

/// Refuses a datastore that is missing, not a directory, or not writable (8061).
pub fn check_writable(datastore: &Path) -> Result<(), VmdkError> {
    let bad = |reason: String| VmdkError::DatastoreNotUsable {
        path: datastore.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(datastore).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a directory".into()));
    }
    if fs_type(datastore) == Some(NFS_SUPER_MAGIC) {
        return Err(bad(
            "it is on NFS; use a local (VMFS-like) filesystem".into()
        ));
    }
    let probe = datastore.join(".failback-write-probe");
    File::create(&probe)
        .and_then(|f| f.sync_all())
        .map_err(|e| bad(format!("cannot create files: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// statfs magic of NFS.
pub const NFS_SUPER_MAGIC: i64 = 0x6969;
/// statfs magic of FAT/FAT32 (msdos, vfat).
pub const MSDOS_SUPER_MAGIC: i64 = 0x4d44;

/// The filesystem type (statfs `f_type`) of `path`, if it can be read.
pub fn fs_type(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` is valid for writes of a statfs; it is
    // read only after statfs returned success.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statfs returned 0, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    // f_type's integer type differs between libc targets; the cast is a no-op on some.
    #[allow(clippy::unnecessary_cast)]
    Some(st.f_type as i64)
}

/// Opens `path` for reading and writing; with `create`, creates it and refuses one that
/// already exists.
fn open_rw(path: &Path, create: bool) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .open(path)
}

/// How long [`try_lock`] keeps trying before it reports the extent as held.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Takes an exclusive `flock` on `file`: `Ok(false)` when another process still holds it
/// after [`LOCK_PATIENCE`]. The short wait is there because a lock we just released can
/// linger for a moment: a `fork` in another thread of this process (spawning any helper)
/// shares every descriptor, and with it the lock, until the child's `exec` closes it.
fn try_lock(file: &File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        // SAFETY: flock on a valid, owned descriptor; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Passes `made` on, first removing the partial file at `path` when making it failed.
fn remove_if_failed<T, E>(path: &Path, made: Result<T, E>) -> Result<T, E> {
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    /// Runs qemu-img with `args`; returns (success, stdout + stderr).
    pub(crate) fn qemu_img(args: &[&str]) -> (bool, String) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Has qemu-img create an empty vmdk of `subformat` and `size` at `vmdk`.
    pub(crate) fn qemu_create(vmdk: &Path, subformat: &str, size: &str) {
        let (ok, text) = qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={subformat}"),
            vmdk.to_str().unwrap(),
            size,
        ]);
        assert!(ok, "{text}");
    }

    /// Has qemu-img convert the raw image `raw` into a vmdk of `subformat` at `vmdk`.
    pub(crate) fn qemu_convert(raw: &Path, vmdk: &Path, subformat: &str) {
        let (ok, text) = qemu_img(&[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={subformat}"),
            raw.to_str().unwrap(),
            vmdk.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
    }

    /// Asserts that qemu-img accepts `vmdk` and finds it identical to `raw`.
    pub(crate) fn assert_qemu_identical(vmdk: &Path, raw: &Path) {
        let v = vmdk.to_str().unwrap();
        let (ok, text) = qemu_img(&["info", v]);
        assert!(ok, "qemu-img info: {text}");
        let (ok, text) = qemu_img(&["check", v]);
        assert!(ok, "qemu-img check: {text}");
        let (ok, text) = qemu_img(&[
            "compare",
            "-f",
            "vmdk",
            "-F",
            "raw",
            v,
            raw.to_str().unwrap(),
        ]);
        assert!(ok, "qemu-img compare: {text}");
    }

    fn spec<'a>(id: &'a str, name: &'a str, cap: u64, format: DiskFormat) -> DiskSpec<'a> {
        DiskSpec {
            disk_id: id,
            name,
            capacity: cap,
            format,
        }
    }

    #[test]
    fn uuid_is_stable_and_esxi_shaped() {
        let u = uuid_for("disk-1");
        assert_eq!(u, uuid_for("disk-1"));
        assert_ne!(u, uuid_for("disk-2"));
        assert!(u.starts_with("60 00 c2 9"), "{u}");
        assert_eq!(u.len(), 47);
    }

    #[test]
    fn a_uuid_disk_id_is_the_ddb_uuid_itself() {
        let want = "60 00 c2 91 23 45 67 89-ab cd ef 01 23 45 67 89";
        assert_eq!(uuid_for("6000C291-2345-6789-ABCD-EF0123456789"), want);
        assert_eq!(uuid_for("6000c29123456789abcdef0123456789"), want);
        for not_uuid in [
            "6000C291-2345-6789-ABCD-EF012345678",
            "6000C2912-345-6789-ABCD-EF012345678",
            "6000C291-2345-6789-ABCD-EF012345678g",
        ] {
            assert!(uuid_for(not_uuid).starts_with("60 00 c2 9"), "{not_uuid}");
            assert_ne!(uuid_for(not_uuid), want, "{not_uuid}");
        }
    }

    #[test]
    fn an_existing_disk_with_the_source_uuid_is_adopted_and_another_refused() {
        let dir = tempfile::tempdir().unwrap();
        let id = "6000c291-2345-6789-abcd-ef0123456789";
        let text = format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n\
             RW 2048 VMFS \"esx-flat.vmdk\"\n\nddb.uuid = \"{}\"\n",
            uuid_for(id)
        );
        std::fs::write(dir.path().join("esx.vmdk"), &text).unwrap();
        std::fs::write(dir.path().join("esx-flat.vmdk"), vec![7u8; 1 << 20]).unwrap();
        let disk = Disk::open_or_create(
            dir.path(),
            &spec(id, "esx", 1 << 20, DiskFormat::Vmfs),
            Claim::New,
        )
        .unwrap();
        drop(disk);
        let other = "6000c291-2345-6789-abcd-ef0123456780";
        let e = Disk::open_or_create(
            dir.path(),
            &spec(other, "esx", 1 << 20, DiskFormat::Vmfs),
            Claim::New,
        )
        .unwrap_err();
        assert_eq!(e.refusal(other).code, Code::DiskNameCollision, "{e}");
    }

    fn write_pattern(disk: &mut Disk, raw: &mut [u8]) {
        disk.renew_cid().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        disk.extent().write(3 * 512, &data).unwrap();
        raw[3 * 512..3 * 512 + data.len()].copy_from_slice(&data);
        disk.extent().zero(4096, 128 * 1024).unwrap();
        raw[4096..4096 + 128 * 1024].fill(0);
        disk.extent().sync().unwrap();
    }

    #[test]
    fn created_vmfs_and_monolithic_flat_disks_pass_qemu_img() {
        for (format, ty) in [
            (DiskFormat::Vmfs, "vmfs"),
            (DiskFormat::MonolithicFlat, "monolithicFlat"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let cap = 4 << 20;
            let mut disk =
                Disk::open_or_create(dir.path(), &spec("id-a", "a", cap, format), Claim::New)
                    .unwrap();
            let mut raw = vec![0u8; cap as usize];
            write_pattern(&mut disk, &mut raw);
            let text = std::fs::read_to_string(dir.path().join("a.vmdk")).unwrap();
            assert!(text.contains(&format!("createType=\"{ty}\"")), "{text}");
            assert!(text.contains("ddb.geometry.heads = \"255\""));
            drop(disk);
            let rawp = dir.path().join("ref.raw");
            std::fs::write(&rawp, &raw).unwrap();
            assert_qemu_identical(&dir.path().join("a.vmdk"), &rawp);
            let (_, info) = qemu_img(&["info", dir.path().join("a.vmdk").to_str().unwrap()]);
            assert!(info.contains(&format!("create type: {ty}")), "{info}");
        }
    }

    #[test]
    fn created_monolithic_sparse_disks_pass_qemu_img_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 4 << 20;
        let s = spec("id-s", "s", cap, DiskFormat::MonolithicSparse);
        let mut disk = Disk::open_or_create(dir.path(), &s, Claim::New).unwrap();
        let mut raw = vec![0u8; cap as usize];
        write_pattern(&mut disk, &mut raw);
        drop(disk);
        let rawp = dir.path().join("ref.raw");
        std::fs::write(&rawp, &raw).unwrap();
        let vmdk = dir.path().join("s.vmdk");
        assert_qemu_identical(&vmdk, &rawp);
        let (_, info) = qemu_img(&["info", vmdk.to_str().unwrap()]);
        assert!(info.contains("create type: monolithicSparse"), "{info}");
        // Reopen: a new CID goes into the embedded descriptor, the data stays.
        let mut disk = Disk::open_or_create(dir.path(), &s, Claim::Applied).unwrap();
        let cid = disk.descriptor().cid;
        disk.renew_cid().unwrap();
        assert_ne!(disk.descriptor().cid, cid);
        disk.extent().write(cap - 512, &[9u8; 512]).unwrap();
        disk.extent().sync().unwrap();
        raw[cap as usize - 512..].fill(9);
        drop(disk);
        std::fs::write(&rawp, &raw).unwrap();
        assert_qemu_identical(&vmdk, &rawp);
        assert_eq!(
            std::fs::metadata(&vmdk).unwrap().len() % (64 << 10),
            0,
            "grain-aligned"
        );
    }

    #[test]
    fn opens_and_writes_a_qemu_made_monolithic_sparse_image() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 2u64 << 20;
        let mut raw = vec![0u8; cap as usize];
        raw[70_000..80_000].fill(0x5a);
        let rawp = dir.path().join("ref.raw");
        std::fs::write(&rawp, &raw).unwrap();
        let d = dir.path().join("q.vmdk");
        qemu_convert(&rawp, &d, "monolithicSparse");
        let mut disk = Disk::open_or_create(
            dir.path(),
            &spec("id-q", "q", cap, DiskFormat::MonolithicSparse),
            Claim::New,
        )
        .unwrap();
        let mut got = vec![0u8; cap as usize];
        disk.extent().read_at(0, &mut got).unwrap();
        assert!(got == raw, "reads qemu's grains");
        write_pattern(&mut disk, &mut raw);
        drop(disk);
        std::fs::write(&rawp, &raw).unwrap();
        assert_qemu_identical(&d, &rawp);
    }

    #[test]
    fn opens_and_writes_a_qemu_made_monolithic_flat_image() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("q.vmdk");
        qemu_create(&d, "monolithicFlat", "2M");
        let before = Descriptor::parse(&std::fs::read(&d).unwrap()).unwrap();
        let mut disk = Disk::open_or_create(
            dir.path(),
            &spec("id-q", "q", 2 << 20, DiskFormat::Vmfs),
            Claim::New,
        )
        .unwrap();
        let mut raw = vec![0u8; 2 << 20];
        write_pattern(&mut disk, &mut raw);
        drop(disk);
        let after = Descriptor::parse(&std::fs::read(&d).unwrap()).unwrap();
        assert_ne!(after.cid, before.cid, "CID renewed on first write");
        assert_eq!(after.ddb_get("uuid"), Some(uuid_for("id-q").as_str()));
        let rawp = dir.path().join("ref.raw");
        std::fs::write(&rawp, &raw).unwrap();
        assert_qemu_identical(&d, &rawp);
    }

    /// Writes that cross the extent boundaries (and one inside each extent) of a disk of
    /// several 2 GiB extents; returns the (offset, byte, length) written.
    fn write_across_boundaries(disk: &mut Disk) -> Vec<(u64, u8, usize)> {
        let cap = disk.capacity();
        let mut done = Vec::new();
        let mut v = 1u8;
        let mut at = two_gb_flat::EXTENT_BYTES;
        while at < cap {
            for (off, len) in [
                (at - 4096, 12_288usize),
                (at - 513, 1027),
                (at + 70_000, 300),
            ] {
                disk.extent().write(off, &vec![v; len]).unwrap();
                done.push((off, v, len));
                v += 1;
            }
            at += two_gb_flat::EXTENT_BYTES;
        }
        disk.extent().write(cap - 1000, &[0xee; 1000]).unwrap();
        done.push((cap - 1000, 0xee, 1000));
        // A zero range across the first boundary, over part of what was written.
        let z = two_gb_flat::EXTENT_BYTES - 300;
        disk.extent().zero(z, 600).unwrap();
        done.push((z, 0, 600));
        disk.extent().sync().unwrap();
        done
    }

    /// A sparse raw file with `writes` applied, for `qemu-img compare`.
    fn raw_with(path: &Path, cap: u64, writes: &[(u64, u8, usize)]) {
        use std::os::unix::fs::FileExt;
        let f = File::create(path).unwrap();
        f.set_len(cap).unwrap();
        for &(off, v, len) in writes {
            f.write_all_at(&vec![v; len], off).unwrap();
        }
    }

    #[test]
    fn writes_across_the_extents_of_a_qemu_made_two_gb_max_extent_flat_disk_land() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("t.vmdk");
        let cap = (4u64 << 30) + (1 << 20);
        qemu_create(&d, "twoGbMaxExtentFlat", &cap.to_string());
        let s = spec("id-t", "t", cap, DiskFormat::TwoGbMaxExtentFlat);
        let mut disk = Disk::open_or_create(dir.path(), &s, Claim::New).unwrap();
        assert_eq!(disk.descriptor().extents.len(), 3);
        disk.renew_cid().unwrap();
        let writes = write_across_boundaries(&mut disk);
        drop(disk);
        // Each extent holds its own slice of the writes that cross 2 GiB (byte 2 from
        // 2 GiB - 513 to 2 GiB + 514, zeroed 300 bytes either side of the boundary).
        let byte = |f: &str, at: u64| {
            use std::os::unix::fs::FileExt;
            let mut b = [0u8; 1];
            let file = File::open(dir.path().join(f)).unwrap();
            file.read_exact_at(&mut b, at).unwrap();
            b[0]
        };
        let end = two_gb_flat::EXTENT_BYTES;
        assert_eq!(
            [byte("t-f001.vmdk", end - 301), byte("t-f001.vmdk", end - 1)],
            [2, 0]
        );
        assert_eq!([byte("t-f002.vmdk", 0), byte("t-f002.vmdk", 300)], [0, 2]);
        let rawp = dir.path().join("ref.raw");
        raw_with(&rawp, cap, &writes);
        assert_qemu_identical(&d, &rawp);
        let r = verify::verify(dir.path(), &d).unwrap();
        assert!(r.ok() && r.extents == 3, "{r:?}");
    }

    #[test]
    fn a_new_two_gb_max_extent_flat_disk_is_cut_at_2_gib_and_passes_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let cap = (2u64 << 30) + (1 << 20);
        let s = spec("id-n", "n", cap, DiskFormat::TwoGbMaxExtentFlat);
        let mut disk = Disk::open_or_create(dir.path(), &s, Claim::New).unwrap();
        let writes = write_across_boundaries(&mut disk);
        drop(disk);
        let len = |f: &str| std::fs::metadata(dir.path().join(f)).unwrap().len();
        assert_eq!((len("n-f001.vmdk"), len("n-f002.vmdk")), (2 << 30, 1 << 20));
        let d = dir.path().join("n.vmdk");
        let (_, info) = qemu_img(&["info", d.to_str().unwrap()]);
        assert!(info.contains("create type: twoGbMaxExtentFlat"), "{info}");
        let rawp = dir.path().join("ref.raw");
        raw_with(&rawp, cap, &writes);
        assert_qemu_identical(&d, &rawp);
        // Reopened, it reads what was written, across the boundary.
        let mut disk = Disk::open_or_create(dir.path(), &s, Claim::Applied).unwrap();
        let mut got = vec![0u8; 12_288];
        disk.extent()
            .read_at(two_gb_flat::EXTENT_BYTES - 4096, &mut got)
            .unwrap();
        let at = |i: usize| got[i];
        assert_eq!(
            [at(0), at(3600), at(4095), at(4096), at(4500), at(5000)],
            [1, 2, 0, 0, 2, 1]
        );
    }

    #[test]
    fn cid_changes_once_per_open_and_uuid_stays() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec("id-c", "c", 1 << 20, DiskFormat::Vmfs);
        let disk = Disk::open_or_create(dir.path(), &s, Claim::New).unwrap();
        let first = disk.descriptor().clone();
        assert!(
            first
                .ddb_get("longContentID")
                .unwrap()
                .ends_with(&format!("{:08x}", first.cid))
        );
        drop(disk);
        let mut disk = Disk::open_or_create(dir.path(), &s, Claim::Unapplied).unwrap();
        disk.renew_cid().unwrap();
        let second = disk.descriptor().clone();
        disk.renew_cid().unwrap();
        assert_eq!(disk.descriptor().cid, second.cid, "once per open");
        assert_ne!(second.cid, first.cid);
        assert_eq!(second.ddb_get("uuid"), first.ddb_get("uuid"));
        assert!(
            second
                .ddb_get("longContentID")
                .unwrap()
                .ends_with(&format!("{:08x}", second.cid))
        );
    }

    #[test]
    fn refuses_another_disks_image_and_a_capacity_change() {
        let dir = tempfile::tempdir().unwrap();
        drop(
            Disk::open_or_create(
                dir.path(),
                &spec("id-1", "x", 1 << 20, DiskFormat::Vmfs),
                Claim::New,
            )
            .unwrap(),
        );
        let e = Disk::open_or_create(
            dir.path(),
            &spec("id-2", "x", 1 << 20, DiskFormat::Vmfs),
            Claim::Unapplied,
        )
        .unwrap_err();
        assert_eq!(e.refusal("id-2").code, Code::DiskNameCollision, "{e}");
        let e = Disk::open_or_create(
            dir.path(),
            &spec("id-1", "x", 2 << 20, DiskFormat::Vmfs),
            Claim::Unapplied,
        )
        .unwrap_err();
        assert_eq!(e.refusal("id-1").code, Code::DiskConflict, "{e}");
    }

    #[test]
    fn refuses_a_delta_disk_as_having_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vmdk");
        let d = dir.path().join("child.vmdk");
        assert!(
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                "subformat=monolithicFlat",
                base.to_str().unwrap(),
                "1M"
            ])
            .0
        );
        assert!(
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-b",
                "base.vmdk",
                "-F",
                "vmdk",
                d.to_str().unwrap()
            ])
            .0
        );
        let e = Disk::open_or_create(
            dir.path(),
            &spec("id", "child", 1 << 20, DiskFormat::Vmfs),
            Claim::Unapplied,
        )
        .unwrap_err();
        // qemu makes a monolithicSparse child: binary, so refused before the delta check.
        assert!(
            matches!(
                e.refusal("id").code,
                Code::DiskHasSnapshots | Code::DiskConflict
            ),
            "{e}"
        );
        let text = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=87654321\ncreateType=\"vmfs\"\n\
             parentFileNameHint=\"base.vmdk\"\nRW 2048 VMFS \"base-flat.vmdk\"\n";
        std::fs::write(dir.path().join("delta.vmdk"), text).unwrap();
        let e = Disk::open_or_create(
            dir.path(),
            &spec("id", "delta", 1 << 20, DiskFormat::Vmfs),
            Claim::Unapplied,
        )
        .unwrap_err();
        assert_eq!(e.refusal("id").code, Code::DiskHasSnapshots, "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(8))]
        /// Random writes and zero ranges through every layout we write read back equal to
        /// the same writes on a plain file, after a reopen, and `qemu-img compare` agrees.
        #[test]
        fn random_writes_through_every_layout_equal_a_plain_file(
            ops in proptest::collection::vec(
                (0u64..(2 << 20) - 1, 1u64..150_000, 1u8..255, proptest::bool::ANY),
                1..16,
            )
        ) {
            let cap = 2u64 << 20;
            for format in [
                DiskFormat::Vmfs,
                DiskFormat::MonolithicFlat,
                DiskFormat::MonolithicSparse,
                DiskFormat::TwoGbMaxExtentFlat,
            ] {
                let dir = tempfile::tempdir().unwrap();
                let s = spec("id-p", "p", cap, format);
                let mut disk = Disk::open_or_create(dir.path(), &s, Claim::New).unwrap();
                let mut plain = vec![0u8; cap as usize];
                for &(off, len, v, zero) in &ops {
                    let len = len.min(cap - off);
                    let r = &mut plain[off as usize..(off + len) as usize];
                    if zero {
                        disk.extent().zero(off, len).unwrap();
                        r.fill(0);
                    } else {
                        disk.extent().write(off, &vec![v; len as usize]).unwrap();
                        r.fill(v);
                    }
                }
                disk.extent().sync().unwrap();
                drop(disk);
                let mut disk = Disk::open_or_create(dir.path(), &s, Claim::Applied).unwrap();
                let mut got = vec![0u8; cap as usize];
                disk.extent().read_at(0, &mut got).unwrap();
                proptest::prop_assert!(got == plain, "{:?}", format);
                drop(disk);
                let rawp = dir.path().join("plain.raw");
                std::fs::write(&rawp, &plain).unwrap();
                assert_qemu_identical(&dir.path().join("p.vmdk"), &rawp);
            }
        }
    }

    #[test]
    fn refuses_a_qemu_made_stream_optimized_image_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 1u64 << 20;
        let rawp = dir.path().join("ref.raw");
        std::fs::write(&rawp, vec![7u8; cap as usize]).unwrap();
        let d = dir.path().join("so.vmdk");
        qemu_convert(&rawp, &d, "streamOptimized");
        let before = std::fs::read(&d).unwrap();
        let e = Disk::open_or_create(
            dir.path(),
            &spec("id-so", "so", cap, DiskFormat::MonolithicSparse),
            Claim::New,
        )
        .unwrap_err();
        assert_eq!(e.refusal("id-so").code, Code::DiskConflict, "{e}");
        assert!(e.to_string().contains("streamOptimized"), "{e}");
        assert!(
            std::fs::read(&d).unwrap() == before,
            "the image is untouched"
        );
    }

    #[test]
    fn a_disk_with_a_snapshot_file_beside_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec("id-s", "s", 1 << 20, DiskFormat::Vmfs);
        drop(Disk::open_or_create(dir.path(), &s, Claim::New).unwrap());
        // Look-alikes are not snapshots.
        for other in ["s-00001.vmdk", "s-000001x.vmdk", "t-000001.vmdk"] {
            std::fs::write(dir.path().join(other), b"x").unwrap();
        }
        drop(Disk::open_or_create(dir.path(), &s, Claim::Applied).unwrap());
        for child in ["s-000001-delta.vmdk", "s-000002.vmdk"] {
            let p = dir.path().join(child);
            std::fs::write(&p, b"# Disk DescriptorFile\n").unwrap();
            let e = Disk::open_or_create(dir.path(), &s, Claim::Applied).unwrap_err();
            assert_eq!(e.refusal("id-s").code, Code::DiskHasSnapshots, "{e}");
            assert!(e.to_string().contains(child), "{e}");
            assert!(e.to_string().contains("remove the snapshots first"), "{e}");
            std::fs::remove_file(&p).unwrap();
        }
        // A new disk whose name already has snapshot files is refused too.
        std::fs::write(dir.path().join("n-000001.vmdk"), b"x").unwrap();
        let n = spec("id-n", "n", 1 << 20, DiskFormat::Vmfs);
        let e = Disk::open_or_create(dir.path(), &n, Claim::New).unwrap_err();
        assert_eq!(e.refusal("id-n").code, Code::DiskHasSnapshots, "{e}");
        assert!(!dir.path().join("n.vmdk").exists());
    }

    #[test]
    fn an_extent_without_descriptor_is_redone_only_if_ours() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec("id-o", "o", 1 << 20, DiskFormat::Vmfs);
        std::fs::write(dir.path().join("o-flat.vmdk"), b"someone else's").unwrap();
        let e = Disk::open_or_create(dir.path(), &s, Claim::New).unwrap_err();
        assert_eq!(e.refusal("id-o").code, Code::DiskNameCollision, "{e}");
        let e = Disk::open_or_create(dir.path(), &s, Claim::Applied).unwrap_err();
        assert_eq!(e.refusal("id-o").code, Code::DiskConflict, "{e}");
        let disk = Disk::open_or_create(dir.path(), &s, Claim::Unapplied).unwrap();
        assert_eq!(disk.capacity(), 1 << 20);
    }

    #[test]
    fn an_unwritable_datastore_is_not_usable() {
        let e = check_writable(Path::new("/proc")).unwrap_err();
        assert_eq!(e.refusal("").code, Code::DatastoreNotUsable);
    }
}
