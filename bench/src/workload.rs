//! Source disks for runs: deterministic mixes of holes, written zeros, compressible and
//! random data, so that a replication run exercises every path of the agent's scanner and
//! of the codec; and the [`Workload`]s of `bench run` (that mix, a real ext4 image of files
//! from this machine, random data, a mostly empty disk).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};

/// What one region of a generated disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// Never written: a hole in a sparse file.
    Hole,
    /// Written with zero bytes (allocated, but all zero).
    Zeros,
    /// Text-like data that lz4 compresses about 3:1.
    Compressible,
    /// A 4 KiB pattern repeated (a filled-in block device, a swap area).
    Repeated,
    /// Incompressible random bytes.
    Random,
}

/// Byte counts per region kind of a generated disk.
#[derive(Debug, Default, Clone, Copy)]
pub struct Mix {
    pub hole: u64,
    pub zeros: u64,
    pub compressible: u64,
    pub repeated: u64,
    pub random: u64,
}

impl Mix {
    fn add(&mut self, r: Region, n: u64) {
        match r {
            Region::Hole => self.hole += n,
            Region::Zeros => self.zeros += n,
            Region::Compressible => self.compressible += n,
            Region::Repeated => self.repeated += n,
            Region::Random => self.random += n,
        }
    }

    /// "25% holes, 10% zeros, ..." for reports.
    pub fn describe(&self) -> String {
        let total = (self.hole + self.zeros + self.compressible + self.repeated + self.random)
            .max(1) as f64;
        let pct = |n: u64| 100.0 * n as f64 / total;
        format!(
            "{:.0}% holes, {:.0}% zeros, {:.0}% compressible, {:.0}% repeated, {:.0}% random",
            pct(self.hole),
            pct(self.zeros),
            pct(self.compressible),
            pct(self.repeated),
            pct(self.random)
        )
    }
}

const WORDS: &[&str] = &[
    "replica",
    "failback",
    "datastore",
    "vmdk",
    "block",
    "journal",
    "marker",
    "cache",
    "azure",
    "esxi",
    "recovery",
    "point",
    "sector",
    "extent",
    "grain",
    "batch",
    "stream",
    "window",
    "latency",
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "for",
    "it",
    "with",
    "as",
    "was",
    "on",
];

fn fill(region: Region, rng: &mut StdRng, buf: &mut [u8]) {
    match region {
        Region::Hole | Region::Zeros => buf.fill(0),
        Region::Random => rng.fill_bytes(buf),
        Region::Repeated => {
            let mut block = [0u8; 4096];
            rng.fill_bytes(&mut block);
            for chunk in buf.chunks_mut(4096) {
                chunk.copy_from_slice(&block[..chunk.len()]);
            }
        }
        Region::Compressible => {
            let mut at = 0;
            while at < buf.len() {
                let w = WORDS[rng.random_range(0..WORDS.len())].as_bytes();
                let sep: &[u8] = if rng.random_range(0..12) == 0 {
                    b".\n"
                } else {
                    b" "
                };
                for &c in w.iter().chain(sep) {
                    if at == buf.len() {
                        break;
                    }
                    buf[at] = c;
                    at += 1;
                }
            }
        }
    }
}

/// Writes a `size`-byte sparse disk image at `path` made of regions of 64 KiB..8 MiB drawn
/// with the weights below from `seed`. The same seed gives the same bytes.
pub fn generate_disk(path: &Path, size: u64, seed: u64) -> io::Result<Mix> {
    const WEIGHTS: [(Region, u32); 5] = [
        (Region::Hole, 25),
        (Region::Zeros, 10),
        (Region::Compressible, 30),
        (Region::Repeated, 10),
        (Region::Random, 25),
    ];
    let file = File::create(path)?;
    file.set_len(size)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mix = Mix::default();
    let mut buf = vec![0u8; 8 << 20];
    let mut at = 0u64;
    while at < size {
        let len = (rng.random_range(1..=128u64) * 65536).min(size - at);
        let mut pick = rng.random_range(0..100u32);
        let region = WEIGHTS
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map(|(r, _)| *r)
            .unwrap_or(Region::Random);
        if region != Region::Hole {
            let b = &mut buf[..len as usize];
            fill(region, &mut rng, b);
            file.write_all_at(b, at)?;
        }
        mix.add(region, len);
        at += len;
    }
    file.sync_all()?;
    Ok(mix)
}

/// Overwrites `count` distinct 4 KiB blocks of the disk at `path`, chosen at random, with
/// random data.
pub fn churn(path: &Path, count: u64, seed: u64) -> io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let blocks = file.metadata()?.len() / 4096;
    if count > blocks {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot change {count} distinct blocks of a disk of {blocks}"),
        ));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut block = [0u8; 4096];
    for b in rand::seq::index::sample(&mut rng.clone(), blocks as usize, count as usize) {
        rng.fill_bytes(&mut block);
        file.write_all_at(&block, b as u64 * 4096)?;
    }
    file.sync_all()
}

/// The source disks `bench run` can replicate.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// The generated mix of holes, zeros, compressible, repeated and random regions.
    Mixed,
    /// An ext4 image (`mke2fs -d`) of files copied from /usr, about 60% full.
    Filesystem,
    /// Incompressible random bytes throughout.
    Random,
    /// A sparse disk with about 1.5% of its blocks written.
    Sparse,
}

/// Share of a filesystem image's size filled with file contents; ext4's own metadata
/// brings the used share to about 60%.
const FILESYSTEM_FILL: f64 = 0.57;

/// Fixed so that the same size and seed give the same filesystem layout.
const MKE2FS_FAKE_TIME: &str = "1700000000";

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Mixed => "mixed",
            Workload::Filesystem => "filesystem",
            Workload::Random => "random",
            Workload::Sparse => "sparse",
        }
    }

    /// Writes this workload's `size`-byte disk at `path`; returns a description of it.
    pub fn build(self, path: &Path, size: u64, seed: u64) -> anyhow::Result<String> {
        match self {
            Workload::Mixed => Ok(generate_disk(path, size, seed)?.describe()),
            Workload::Filesystem => filesystem_image(path, size, seed),
            Workload::Random => Ok(fill_strides(path, size, seed, None)?.describe()),
            Workload::Sparse => Ok(fill_strides(path, size, seed, Some(128 << 10))?.describe()),
        }
    }
}

/// Fills `path` in 8 MiB strides: each stride entirely with random data (`piece` = None),
/// or, for a sparse disk, with one `piece`-byte region of random or compressible data at a
/// random 4 KiB-aligned place in the stride, the rest left as a hole.
fn fill_strides(path: &Path, size: u64, seed: u64, piece: Option<u64>) -> io::Result<Mix> {
    const STRIDE: u64 = 8 << 20;
    let file = File::create(path)?;
    file.set_len(size)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; STRIDE as usize];
    let mut mix = Mix::default();
    let mut at = 0;
    while at < size {
        let stride = STRIDE.min(size - at);
        let (kind, off, len) = match piece {
            None => (Region::Random, 0, stride),
            Some(p) => {
                let len = p.min(stride);
                let kind = if rng.random_range(0..2) == 0 {
                    Region::Compressible
                } else {
                    Region::Random
                };
                (
                    kind,
                    rng.random_range(0..=(stride - len) / 4096) * 4096,
                    len,
                )
            }
        };
        let b = &mut buf[..len as usize];
        fill(kind, &mut rng, b);
        file.write_all_at(b, at + off)?;
        mix.add(kind, len);
        mix.add(Region::Hole, stride - len);
        at += stride;
    }
    file.sync_all()?;
    Ok(mix)
}

/// Builds an ext4 image of `size` bytes at `path` from regular files copied out of /usr
/// (walked in name order until [`FILESYSTEM_FILL`] of the size), with a UUID and directory
/// hash seed derived from `seed`, so that the same inputs give the same layout.
fn filesystem_image(path: &Path, size: u64, seed: u64) -> anyhow::Result<String> {
    let staging = tempfile::Builder::new()
        .prefix("fs-staging-")
        .tempdir_in(path.parent().unwrap_or(Path::new(".")))?;
    let budget = (size as f64 * FILESYSTEM_FILL) as u64;
    let (files, bytes) = copy_tree(Path::new("/usr"), staging.path(), budget)?;
    let uuid = format!("6000c29d-0000-4000-8000-{:012x}", seed & 0xffff_ffff_ffff);
    File::create(path)?.set_len(size)?;
    let out = Command::new("mke2fs")
        .env("E2FSPROGS_FAKE_TIME", MKE2FS_FAKE_TIME)
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-U", &uuid, "-E"])
        .arg(format!("hash_seed={uuid}"))
        .arg("-d")
        .arg(staging.path())
        .arg(path)
        .output()
        .context("running mke2fs (package e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "mke2fs -d failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(format!(
        "ext4 with {files} files ({} MiB) from /usr",
        bytes >> 20
    ))
}

/// Copies regular files and directories under `from` into `to`, in name order, until
/// `budget` bytes are copied; returns (files, bytes). Unreadable entries are skipped.
fn copy_tree(from: &Path, to: &Path, budget: u64) -> io::Result<(u64, u64)> {
    let mut stack: Vec<(PathBuf, PathBuf)> = vec![(from.to_path_buf(), to.to_path_buf())];
    let (mut files, mut bytes) = (0u64, 0u64);
    while let Some((src, dst)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&src) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        // Reverse order on the stack = name order when popped.
        entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
        std::fs::create_dir_all(&dst)?;
        for e in entries {
            let Ok(ft) = e.file_type() else { continue };
            let target = dst.join(e.file_name());
            if ft.is_dir() {
                stack.push((e.path(), target));
            } else if ft.is_file() {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                if bytes + len > budget {
                    continue;
                }
                if std::fs::copy(e.path(), &target).is_ok() {
                    files += 1;
                    bytes += len;
                }
            }
        }
        if bytes >= budget - budget / 100 {
            break;
        }
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_changes_exactly_that_many_distinct_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        Workload::Random.build(&path, 1 << 20, 5).unwrap();
        let before = std::fs::read(&path).unwrap();
        // 200 of 256 blocks: drawing with replacement would repeat some.
        churn(&path, 200, 6).unwrap();
        let after = std::fs::read(&path).unwrap();
        let changed = before
            .chunks(4096)
            .zip(after.chunks(4096))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(changed, 200);
        assert!(churn(&path, 257, 6).is_err());
    }

    #[test]
    fn same_seed_same_disk_and_every_kind_present() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mix = generate_disk(&a, 64 << 20, 7).unwrap();
        generate_disk(&b, 64 << 20, 7).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(
            mix.hole > 0 && mix.zeros > 0 && mix.compressible > 0 && mix.random > 0,
            "{mix:?}"
        );
        assert_eq!(
            mix.hole + mix.zeros + mix.compressible + mix.repeated + mix.random,
            64 << 20
        );
    }

    #[test]
    fn random_and_sparse_disks_are_reproducible_and_shaped() {
        let dir = tempfile::tempdir().unwrap();
        for (w, min_data, max_data) in
            [(Workload::Random, 1.0, 1.0), (Workload::Sparse, 0.01, 0.02)]
        {
            let (a, b) = (dir.path().join("a"), dir.path().join("b"));
            w.build(&a, 32 << 20, 3).unwrap();
            w.build(&b, 32 << 20, 3).unwrap();
            let bytes = std::fs::read(&a).unwrap();
            assert_eq!(bytes, std::fs::read(&b).unwrap(), "{w:?}");
            let nonzero_blocks = bytes
                .chunks(4096)
                .filter(|c| c.iter().any(|&x| x != 0))
                .count() as f64;
            let share = nonzero_blocks / (bytes.len() / 4096) as f64;
            assert!(
                (min_data..=max_data).contains(&share),
                "{w:?}: {share} of blocks hold data"
            );
        }
    }

    #[test]
    fn filesystem_image_is_reproducible_and_about_60_percent_used() {
        if Command::new("mke2fs").arg("-V").output().is_err() {
            eprintln!("e2fsprogs not installed: filesystem workload not tested");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        Workload::Filesystem.build(&a, 64 << 20, 5).unwrap();
        // mke2fs -d copies each staged file's ctime (the time of the copy), so two builds
        // a second apart differ in their inode tables, but not in their layout or data.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        Workload::Filesystem.build(&b, 64 << 20, 5).unwrap();
        let (a, b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let blocks = (a.len() / 4096) as f64;
        let used = |img: &[u8]| -> Vec<bool> {
            img.chunks(4096)
                .map(|c| c.iter().any(|&x| x != 0))
                .collect()
        };
        assert_eq!(used(&a), used(&b), "the two builds place data differently");
        let differing = a
            .chunks(4096)
            .zip(b.chunks(4096))
            .filter(|(x, y)| x != y)
            .count() as f64;
        let share = used(&a).iter().filter(|&&u| u).count() as f64 / blocks;
        eprintln!(
            "filesystem image: {:.1}% of blocks hold data, {:.2}% differ between builds",
            share * 100.0,
            differing / blocks * 100.0
        );
        assert!(differing / blocks < 0.01, "{differing} blocks differ");
        assert!((0.5..=0.7).contains(&share), "{share} of blocks hold data");
    }

    #[test]
    fn filesystem_image_is_a_clean_ext4() {
        if Command::new("e2fsck").arg("-V").output().is_err() {
            eprintln!("e2fsprogs not installed: filesystem workload not tested");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let what = Workload::Filesystem.build(&img, 16 << 20, 1).unwrap();
        assert!(what.contains("files"), "{what}");
        let out = Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "e2fsck: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
