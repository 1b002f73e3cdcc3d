//! `master-target verify`: the structural checks of an image that `qemu-img check` does
//! not make (for VMDK it only checks that each allocated grain starts before EOF, so a GT
//! entry into the metadata, a GD entry out of range or a damaged redundant GD all pass it;
//! VMDK-NOTES.md (f)).
//!
//! Checked, each problem reported with its file, byte offset and entry index:
//! * descriptor: it parses (known createType, RW extents of the matching kind, one extent
//!   but for twoGbMaxExtentFlat, no parent),
//!   every extent file resolves inside the datastore (no `..`, no symlink out of it),
//!   `ddb.uuid` is well formed; a missing `ddb.uuid` is only a warning, because
//!   `qemu-img create` never writes one and we adopt such images;
//! * flat extents: a regular file of exactly the declared sectors x 512 bytes;
//! * sparse extents: the header (magic, version, grain size, GTEs per GT, descriptor area,
//!   capacity equal to the descriptor's, newline detector bytes), GD and redundant GD
//!   inside the metadata area, every GD entry naming a GT inside it, no two metadata
//!   structures overlapping, every redundant GT equal to its primary GT, every GT entry 0
//!   or a whole grain between overHead and EOF (0 past the capacity), no two grains
//!   overlapping.
//!
//! Nothing is written and no lock is taken, so it can run beside a serving master target;
//! a grain allocated between two reads may then show up as a redundant GT difference.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::descriptor::Descriptor;
use super::sparse::{self, DESC_OFFSET, GTES_PER_GT, Header, SECTOR};

/// Problems listed one by one; beyond this a count stands for the rest (a garbage table
/// would otherwise print 512 lines per GT).
const MAX_LISTED: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "no image of disk {disk_id} in {datastore}: no descriptor has its ddb.uuid \
         \"{uuid}\" and there is no {disk_id}.vmdk"
    )]
    NotFound {
        disk_id: String,
        datastore: PathBuf,
        uuid: String,
    },
}

/// One problem (or warning) about one place of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// File name, relative to the datastore.
    pub file: String,
    /// Byte offset in `file` of the field or entry concerned.
    pub offset: Option<u64>,
    pub problem: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(o) => write!(f, "{} @ byte {o}: {}", self.file, self.problem),
            None => write!(f, "{}: {}", self.file, self.problem),
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Default)]
pub struct Report {
    pub descriptor: PathBuf,
    pub create_type: Option<String>,
    /// Virtual size in bytes, per the descriptor.
    pub capacity: Option<u64>,
    pub extents: usize,
    /// Allocated grains, for sparse images.
    pub grains: Option<u64>,
    pub problems: Vec<Finding>,
    /// Problems beyond [`MAX_LISTED`], counted only.
    pub unlisted: usize,
    pub warnings: Vec<Finding>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, file: &str, offset: Option<u64>, problem: String) {
        if self.problems.len() >= MAX_LISTED {
            self.unlisted += 1;
            return;
        }
        self.problems.push(Finding {
            file: file.to_string(),
            offset,
            problem,
        });
    }

    fn warning(&mut self, file: &str, offset: Option<u64>, problem: String) {
        self.warnings.push(Finding {
            file: file.to_string(),
            offset,
            problem,
        });
    }

    /// One line: the layout, size and extents, or the number of problems.
    pub fn summary(&self) -> String {
        let what = format!(
            "{}: {}, {} bytes, {} extent(s){}",
            self.descriptor.display(),
            self.create_type.as_deref().unwrap_or("unknown layout"),
            self.capacity.unwrap_or(0),
            self.extents,
            self.grains
                .map(|g| format!(", {g} grain(s) allocated"))
                .unwrap_or_default()
        );
        if self.ok() {
            format!("ok: {what}")
        } else {
            format!("{} problem(s): {what}", self.problems.len() + self.unlisted)
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let list = |v: &[Finding]| -> Vec<serde_json::Value> {
            v.iter()
                .map(|f| serde_json::json!({"file": f.file, "offset": f.offset, "problem": f.problem}))
                .collect()
        };
        serde_json::json!({
            "ok": self.ok(),
            "descriptor": self.descriptor,
            "create_type": self.create_type,
            "capacity": self.capacity,
            "extents": self.extents,
            "grains": self.grains,
            "problems": list(&self.problems),
            "unlisted_problems": self.unlisted,
            "warnings": list(&self.warnings),
        })
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> VerifyError + 'a {
    move |source| VerifyError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The descriptor of disk `disk_id` on `datastore`: the image whose `ddb.uuid` is the
/// disk's (its name is the replicating side's choice), else `DISK_ID.vmdk` (an image
/// without a uuid, e.g. made by qemu-img, named after the id).
pub fn find_image(datastore: &Path, disk_id: &str) -> Result<PathBuf, VerifyError> {
    let uuid = super::uuid_for(disk_id);
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(datastore)
        .map_err(io_err("list", datastore))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "vmdk"))
        .collect();
    candidates.sort();
    for p in candidates {
        if let Ok((d, _)) = super::read_image(datastore, &p)
            && d.ddb_get("uuid")
                .is_some_and(|u| super::same_uuid(u, &uuid))
        {
            return Ok(p);
        }
    }
    let by_name = super::Disk::descriptor_path(datastore, disk_id);
    if protocol::disk::is_safe_name(disk_id) && by_name.is_file() {
        return Ok(by_name);
    }
    Err(VerifyError::NotFound {
        disk_id: disk_id.to_string(),
        datastore: datastore.to_path_buf(),
        uuid,
    })
}

/// Checks the image whose descriptor is `desc` (see the module docs). `Err` only when the
/// descriptor cannot be read at all; every flaw of the image is a finding in the report.
pub fn verify(datastore: &Path, desc: &Path) -> Result<Report, VerifyError> {
    let name = file_name(desc);
    let mut r = Report {
        descriptor: desc.to_path_buf(),
        ..Report::default()
    };
    // A descriptor we cannot open is an error of the command, not a finding on the image.
    File::open(desc).map_err(io_err("open", desc))?;
    let descriptor = match super::read_image(datastore, desc) {
        Ok((d, _)) => d,
        Err(e) => {
            r.problem(&name, None, format!("descriptor: {e}"));
            return Ok(r);
        }
    };
    r.create_type = Some(descriptor.create_type.as_str().to_string());
    r.capacity = Some(descriptor.capacity());
    r.extents = descriptor.extents.len();
    check_uuid(&descriptor, &name, &mut r);
    let dir = desc.parent().unwrap_or(Path::new("."));
    let sparse = sparse::is_sparse(desc);
    for e in &descriptor.extents {
        let path = dir.join(&e.file);
        if !inside(datastore, &path) {
            r.problem(
                &name,
                None,
                format!("extent \"{}\" resolves outside the datastore", e.file),
            );
            continue;
        }
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(err) => {
                r.problem(&e.file, None, format!("cannot open the extent: {err}"));
                continue;
            }
        };
        let meta = file.metadata().map_err(io_err("stat", &path))?;
        if !meta.is_file() {
            r.problem(&e.file, None, "extent is not a regular file".into());
        } else if !sparse {
            check_flat_size(&e.file, meta.len(), e.sectors, &mut r);
        } else if e.file != name {
            r.problem(
                &name,
                None,
                format!(
                    "the embedded descriptor names extent \"{}\", not its own file",
                    e.file
                ),
            );
        } else {
            check_sparse(&file, &path, &name, e.sectors, &mut r)?;
        }
    }
    Ok(r)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// Whether `path` (resolving symlinks) is inside `datastore`; a missing file counts as
/// inside when its directory is (the open reports it missing).
fn inside(datastore: &Path, path: &Path) -> bool {
    let Ok(root) = datastore.canonicalize() else {
        return false;
    };
    let resolved = path.canonicalize().or_else(|_| {
        path.parent()
            .unwrap_or(Path::new("."))
            .canonicalize()
            .map(|d| d.join(path.file_name().unwrap_or_default()))
    });
    resolved.is_ok_and(|p| p.starts_with(&root))
}

/// `ddb.uuid` as VMware prints it: 16 hex bytes separated by spaces and one dash.
fn check_uuid(d: &Descriptor, name: &str, r: &mut Report) {
    match d.ddb_get("uuid") {
        None => r.warning(
            name,
            None,
            "no ddb.uuid: the disk has no identity (it gets one on its first replicated write)"
                .into(),
        ),
        Some(u) => {
            let hex: String = u.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
            if hex.len() != 32 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                r.problem(name, None, format!("ddb.uuid \"{u}\" is not 16 hex bytes"));
            }
        }
    }
}

fn check_flat_size(name: &str, len: u64, sectors: u64, r: &mut Report) {
    let want = sectors * SECTOR;
    if len != want {
        let how = if len < want { "truncated" } else { "too long" };
        r.problem(
            name,
            None,
            format!(
                "{how}: the file is {len} bytes, the descriptor declares {sectors} sectors \
                 ({want} bytes)"
            ),
        );
    }
}

/// A run of metadata sectors `[start, end)` and what it holds.
struct Region {
    start: u64,
    end: u64,
    what: String,
}

fn check_sparse(
    file: &File,
    path: &Path,
    name: &str,
    desc_sectors: u64,
    r: &mut Report,
) -> Result<(), VerifyError> {
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    let mut raw = [0u8; 512];
    if len < SECTOR {
        r.problem(
            name,
            Some(0),
            format!("file of {len} bytes holds no header"),
        );
        return Ok(());
    }
    file.read_exact_at(&mut raw, 0)
        .map_err(io_err("read", path))?;
    let h = match Header::parse(&raw) {
        Ok(h) => h,
        Err(reason) => {
            r.problem(name, Some(0), format!("header: {reason}"));
            return Ok(());
        }
    };
    if h.capacity_sectors != desc_sectors {
        r.problem(
            name,
            Some(12),
            format!(
                "header capacity {} sectors, the descriptor declares {desc_sectors}",
                h.capacity_sectors
            ),
        );
    }
    if h.flags & 1 != 0 && &raw[73..77] != b"\n \r\n" {
        r.problem(
            name,
            Some(73),
            "newline detector bytes damaged (a text-mode transfer?)".into(),
        );
    }
    if raw[72] != 0 {
        r.warning(
            name,
            Some(72),
            "uncleanShutdown is set: the image was not closed cleanly".into(),
        );
    }
    if h.overhead * SECTOR > len || h.overhead % h.grain_sectors != 0 {
        r.problem(
            name,
            Some(64),
            format!(
                "overHead {} sectors is past the end of the file ({len} bytes) or not a \
                 whole number of grains",
                h.overhead
            ),
        );
        return Ok(());
    }
    let tables = check_directories(file, path, name, &h, r)?;
    r.grains = Some(check_tables(file, path, name, &h, len, &tables, r)?);
    Ok(())
}

/// The GT sector of each GD entry (primary, then redundant when in use), `None` where the
/// entry is unusable (already reported); also reports overlapping metadata.
struct Directories {
    primary: Vec<Option<u64>>,
    redundant: Vec<Option<u64>>,
    metadata: Vec<Region>,
}

fn check_directories(
    file: &File,
    path: &Path,
    name: &str,
    h: &Header,
    r: &mut Report,
) -> Result<Directories, VerifyError> {
    let n_gt = h.n_gts();
    let gd_sectors = h.gd_sectors();
    let desc_end = DESC_OFFSET + h.descriptor_sectors;
    let mut metadata = vec![
        Region {
            start: 0,
            end: 1,
            what: "the header".into(),
        },
        Region {
            start: DESC_OFFSET,
            end: desc_end,
            what: "the embedded descriptor".into(),
        },
    ];
    let in_metadata = |s: u64, n: u64| s >= desc_end && s + n <= h.overhead;
    let mut dirs = [
        ("GD", "GT", h.gd_offset, 56u64, Vec::new()),
        ("redundant GD", "redundant GT", h.rgd_offset, 48, Vec::new()),
    ];
    let used = if h.has_redundant_gd() { 2 } else { 1 };
    for (dir, gt, offset, field, out) in dirs.iter_mut().take(used) {
        if !in_metadata(*offset, gd_sectors) {
            r.problem(
                name,
                Some(*field),
                format!(
                    "{dir} at sectors {offset}..{} is outside the metadata area (sectors \
                     {desc_end}..{})",
                    *offset + gd_sectors,
                    h.overhead
                ),
            );
            continue;
        }
        metadata.push(Region {
            start: *offset,
            end: *offset + gd_sectors,
            what: format!("the {dir}"),
        });
        let entries =
            sparse::read_u32s(file, path, *offset, n_gt as usize).map_err(|e| VerifyError::Io {
                op: "read",
                path: path.to_path_buf(),
                source: io::Error::other(e),
            })?;
        for (i, &s) in entries.iter().enumerate() {
            let at = Some(*offset * SECTOR + 4 * i as u64);
            let s = u64::from(s);
            if s == 0 {
                r.problem(
                    name,
                    at,
                    format!(
                        "{dir} entry {i} is 0: {gt} {i} is not allocated (qemu corrupts such \
                         images when it writes them)"
                    ),
                );
                out.push(None);
            } else if !in_metadata(s, 4) {
                r.problem(
                    name,
                    at,
                    format!(
                        "{dir} entry {i} points at sector {s}, outside the metadata area \
                         (sectors {desc_end}..{})",
                        h.overhead
                    ),
                );
                out.push(None);
            } else {
                metadata.push(Region {
                    start: s,
                    end: s + 4,
                    what: format!("{gt} {i}"),
                });
                out.push(Some(s));
            }
        }
    }
    report_overlaps(name, &mut metadata, r);
    let [(.., primary), (.., redundant)] = dirs;
    Ok(Directories {
        primary,
        redundant,
        metadata,
    })
}

/// Reports every region that starts inside an earlier one (sorted by start).
fn report_overlaps(name: &str, regions: &mut [Region], r: &mut Report) {
    regions.sort_by_key(|x| (x.start, x.end));
    let mut widest = 0usize;
    for i in 1..regions.len() {
        let (a, b) = (&regions[widest], &regions[i]);
        if b.start < a.end {
            r.problem(
                name,
                Some(b.start * SECTOR),
                format!(
                    "{} (sectors {}..{}) overlaps {} (sectors {}..{})",
                    b.what, b.start, b.end, a.what, a.start, a.end
                ),
            );
        }
        if b.end > regions[widest].end {
            widest = i;
        }
    }
}

/// Checks every GT against its redundant copy and every grain it points at; returns the
/// number of allocated grains.
fn check_tables(
    file: &File,
    path: &Path,
    name: &str,
    h: &Header,
    len: u64,
    dirs: &Directories,
    r: &mut Report,
) -> Result<u64, VerifyError> {
    let per = GTES_PER_GT as usize;
    let grains_in_capacity = h.capacity_sectors.div_ceil(h.grain_sectors);
    let read = |s: u64| {
        sparse::read_u32s(file, path, s, per).map_err(|e| VerifyError::Io {
            op: "read",
            path: path.to_path_buf(),
            source: io::Error::other(e),
        })
    };
    // (grain sector, GT, entry)
    let mut grains: Vec<(u64, usize, usize)> = Vec::new();
    for (i, gt) in dirs.primary.iter().enumerate() {
        let Some(gt) = *gt else { continue };
        let entries = read(gt)?;
        if let Some(Some(rgt)) = dirs.redundant.get(i) {
            for (j, (a, b)) in entries.iter().zip(read(*rgt)?).enumerate() {
                if *a != b {
                    r.problem(
                        name,
                        Some(rgt * SECTOR + 4 * j as u64),
                        format!("redundant GT {i} entry {j} is {b}, GT {i} entry {j} is {a}"),
                    );
                }
            }
        }
        for (j, &s) in entries.iter().enumerate() {
            let s = u64::from(s);
            if s == 0 || (s == 1 && h.zeroed_gte_allowed()) {
                continue;
            }
            let at = Some(gt * SECTOR + 4 * j as u64);
            let g = (i * per + j) as u64;
            let entry = format!("GT {i} entry {j} (grain {g})");
            if g >= grains_in_capacity {
                r.problem(
                    name,
                    at,
                    format!("{entry} is past the capacity but points at sector {s}"),
                );
            } else if s < h.overhead {
                let what = dirs
                    .metadata
                    .iter()
                    .find(|m| s < m.end && s + h.grain_sectors > m.start)
                    .map_or("the metadata area".to_string(), |m| m.what.clone());
                r.problem(
                    name,
                    at,
                    format!(
                        "{entry} points at sector {s}, inside {what} (grains start at \
                         overHead, sector {})",
                        h.overhead
                    ),
                );
            } else if (s + h.grain_sectors) * SECTOR > len {
                r.problem(
                    name,
                    at,
                    format!(
                        "{entry} points at sectors {s}..{}, past the end of the file \
                         ({len} bytes)",
                        s + h.grain_sectors
                    ),
                );
            } else {
                grains.push((s, i, j));
            }
        }
    }
    grains.sort_unstable();
    for w in grains.windows(2) {
        let ((s1, i1, j1), (s2, i2, j2)) = (w[0], w[1]);
        if s2 < s1 + h.grain_sectors {
            let how = if s1 == s2 {
                format!("both point at the grain at sector {s1}")
            } else {
                format!("point at overlapping grains (sectors {s1} and {s2})")
            };
            r.problem(
                name,
                Some(dirs.primary[i2].unwrap_or(0) * SECTOR + 4 * j2 as u64),
                format!("GT {i1} entry {j1} and GT {i2} entry {j2} {how}"),
            );
        }
    }
    Ok(grains.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmdk::tests::qemu_create;
    use crate::vmdk::{Claim, Disk, DiskSpec};
    use protocol::pb::DiskFormat;

    const CAP: u64 = 4 << 20;
    const GRAIN: u64 = 64 << 10;

    fn make(dir: &Path, name: &str, format: DiskFormat) -> PathBuf {
        let spec = DiskSpec {
            disk_id: "id-v",
            name,
            capacity: CAP,
            format,
        };
        let mut disk = Disk::open_or_create(dir, &spec, Claim::New).unwrap();
        disk.renew_cid().unwrap();
        for g in [0u64, 5, 63] {
            disk.extent().write(g * GRAIN + 100, &[0xab; 9000]).unwrap();
        }
        disk.extent().sync().unwrap();
        Disk::descriptor_path(dir, name)
    }

    fn verify_at(dir: &Path, desc: &Path) -> Report {
        let r = verify(dir, desc).unwrap();
        eprintln!("{}", r.summary());
        for p in &r.problems {
            eprintln!("  {p}");
        }
        r
    }

    fn patch_u32(path: &Path, at: u64, v: u32) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&v.to_le_bytes(), at).unwrap();
    }

    fn read_u32(path: &Path, at: u64) -> u32 {
        let mut b = [0u8; 4];
        File::open(path).unwrap().read_exact_at(&mut b, at).unwrap();
        u32::from_le_bytes(b)
    }

    /// The header of our 4 MiB sparse image: RGD at 21 -> GT at 22, GD at 26 -> GT at 27,
    /// overHead 128, grains from sector 128.
    fn layout() -> Header {
        let h = Header::for_capacity(CAP);
        assert_eq!((h.rgd_offset, h.gd_offset, h.overhead), (21, 26, 128));
        h
    }

    fn only_problem(r: &Report) -> &Finding {
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        &r.problems[0]
    }

    #[test]
    fn a_good_disk_of_each_layout_passes() {
        for format in [
            DiskFormat::Vmfs,
            DiskFormat::MonolithicFlat,
            DiskFormat::MonolithicSparse,
            DiskFormat::TwoGbMaxExtentFlat,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let desc = make(dir.path(), "g", format);
            let r = verify_at(dir.path(), &desc);
            assert!(r.ok(), "{format:?}: {:?}", r.problems);
            assert!(r.warnings.is_empty(), "{:?}", r.warnings);
            assert_eq!(r.capacity, Some(CAP));
            assert!(r.summary().starts_with("ok: "), "{}", r.summary());
            if format == DiskFormat::MonolithicSparse {
                assert_eq!(r.grains, Some(3));
            }
        }
    }

    #[test]
    fn images_made_by_qemu_img_pass_with_a_uuid_warning() {
        for sub in ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentFlat"] {
            let dir = tempfile::tempdir().unwrap();
            let desc = dir.path().join("q.vmdk");
            qemu_create(&desc, sub, "64M");
            let r = verify_at(dir.path(), &desc);
            assert!(r.ok(), "{sub}: {:?}", r.problems);
            assert!(r.warnings[0].problem.contains("no ddb.uuid"), "{r:?}");
            assert_eq!(
                find_image(dir.path(), "q").unwrap(),
                desc,
                "found by name without a uuid"
            );
        }
    }

    #[test]
    fn a_qemu_converted_sparse_image_with_data_passes() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("ref.raw");
        let mut bytes = vec![0u8; CAP as usize];
        bytes[70_000..200_000].fill(0x5a);
        bytes[CAP as usize - 10..].fill(1);
        std::fs::write(&raw, &bytes).unwrap();
        let desc = dir.path().join("c.vmdk");
        crate::vmdk::tests::qemu_convert(&raw, &desc, "monolithicSparse");
        let r = verify_at(dir.path(), &desc);
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(r.grains, Some(4));
    }

    #[test]
    fn the_image_is_found_by_its_uuid_whatever_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let desc = make(dir.path(), "some-name", DiskFormat::Vmfs);
        assert_eq!(find_image(dir.path(), "id-v").unwrap(), desc);
        assert!(matches!(
            find_image(dir.path(), "other"),
            Err(VerifyError::NotFound { .. })
        ));
    }

    #[test]
    fn a_gd_entry_out_of_range_is_reported_with_its_index_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let desc = make(dir.path(), "s", DiskFormat::MonolithicSparse);
        let h = layout();
        let at = h.gd_offset * SECTOR; // GD entry 0
        patch_u32(&desc, at, 100_000);
        let r = verify_at(dir.path(), &desc);
        let f = only_problem(&r);
        assert_eq!(f.offset, Some(at));
        assert!(
            f.problem
                .contains("GD entry 0 points at sector 100000, outside the metadata area"),
            "{f}"
        );
    }

    #[test]
    fn a_redundant_gd_that_differs_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let desc = make(dir.path(), "s", DiskFormat::MonolithicSparse);
        let h = layout();
        // The redundant GD entry 0 names the primary GT: both tables are shared.
        let primary_gt = read_u32(&desc, h.gd_offset * SECTOR);
        patch_u32(&desc, h.rgd_offset * SECTOR, primary_gt);
        let r = verify_at(dir.path(), &desc);
        let f = only_problem(&r);
        assert_eq!(f.offset, Some(u64::from(primary_gt) * SECTOR));
        assert!(
            f.problem
                .contains("redundant GT 0 (sectors 27..31) overlaps GT 0 (sectors 27..31)"),
            "{f}"
        );
        // A redundant GT entry that differs from its primary.
        let desc = make(dir.path(), "t", DiskFormat::MonolithicSparse);
        let rgt = u64::from(read_u32(&desc, h.rgd_offset * SECTOR));
        patch_u32(&desc, rgt * SECTOR + 4 * 5, 0);
        let r = verify_at(dir.path(), &desc);
        let f = only_problem(&r);
        assert_eq!(f.offset, Some(rgt * SECTOR + 20));
        assert!(
            f.problem
                .contains("redundant GT 0 entry 5 is 0, GT 0 entry 5 is"),
            "{f}"
        );
    }

    /// Sets GT entry `j` of GT 0 on both sides (so only the intended flaw shows).
    fn set_gte(desc: &Path, j: u64, v: u32) -> u64 {
        let h = layout();
        let gt = u64::from(read_u32(desc, h.gd_offset * SECTOR));
        let rgt = u64::from(read_u32(desc, h.rgd_offset * SECTOR));
        patch_u32(desc, rgt * SECTOR + 4 * j, v);
        patch_u32(desc, gt * SECTOR + 4 * j, v);
        gt * SECTOR + 4 * j
    }

    #[test]
    fn two_gt_entries_pointing_at_the_same_grain_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let desc = make(dir.path(), "s", DiskFormat::MonolithicSparse);
        let h = layout();
        let gt = u64::from(read_u32(&desc, h.gd_offset * SECTOR));
        let grain0 = read_u32(&desc, gt * SECTOR);
        let at = set_gte(&desc, 7, grain0);
        let r = verify_at(dir.path(), &desc);
        let f = only_problem(&r);
        assert_eq!(f.offset, Some(at));
        assert_eq!(
            f.problem,
            format!("GT 0 entry 0 and GT 0 entry 7 both point at the grain at sector {grain0}")
        );
    }

    #[test]
    fn a_grain_inside_the_metadata_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let desc = make(dir.path(), "s", DiskFormat::MonolithicSparse);
        let at = set_gte(&desc, 9, 2);
        let r = verify_at(dir.path(), &desc);
        let f = only_problem(&r);
        assert_eq!(f.offset, Some(at));
        assert!(
            f.problem.contains(
                "GT 0 entry 9 (grain 9) points at sector 2, inside the embedded descriptor"
            ),
            "{f}"
        );
    }

    #[test]
    fn a_truncated_flat_extent_is_reported() {
        for (format, extent) in [
            (DiskFormat::Vmfs, "f-flat.vmdk"),
            (DiskFormat::MonolithicFlat, "f-flat.vmdk"),
            (DiskFormat::TwoGbMaxExtentFlat, "f-f001.vmdk"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let desc = make(dir.path(), "f", format);
            let flat = dir.path().join(extent);
            File::options()
                .write(true)
                .open(&flat)
                .unwrap()
                .set_len(CAP - 4096)
                .unwrap();
            let r = verify_at(dir.path(), &desc);
            let f = only_problem(&r);
            assert_eq!(f.file, extent);
            assert_eq!(
                f.problem,
                format!(
                    "truncated: the file is {} bytes, the descriptor declares {} sectors \
                     ({CAP} bytes)",
                    CAP - 4096,
                    CAP / 512
                )
            );
        }
    }

    #[test]
    fn an_extent_outside_the_datastore_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("ds");
        std::fs::create_dir(&ds).unwrap();
        let desc = make(&ds, "f", DiskFormat::Vmfs);
        let flat = ds.join("f-flat.vmdk");
        let elsewhere = dir.path().join("elsewhere-flat.vmdk");
        std::fs::rename(&flat, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &flat).unwrap();
        let r = verify_at(&ds, &desc);
        assert!(
            only_problem(&r)
                .problem
                .contains("resolves outside the datastore"),
            "{r:?}"
        );
    }

    #[test]
    fn a_bad_header_is_reported_at_its_field() {
        let dir = tempfile::tempdir().unwrap();
        let desc = make(dir.path(), "s", DiskFormat::MonolithicSparse);
        patch_u32(&desc, 4, 4);
        let f = verify_at(dir.path(), &desc).problems.remove(0);
        assert_eq!(f.offset, Some(0));
        assert!(f.problem.contains("version 4"), "{f}");
    }
}
