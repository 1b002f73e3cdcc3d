//! Generated source disks: deterministic mixes of holes, written zeros, compressible and
//! random data, so that a replication run exercises every path of the agent's scanner and
//! of the codec.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

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

/// Overwrites `count` random 4 KiB blocks of the disk at `path` with random data.
pub fn churn(path: &Path, count: u64, seed: u64) -> io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let blocks = file.metadata()?.len() / 4096;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut block = [0u8; 4096];
    for _ in 0..count {
        rng.fill_bytes(&mut block);
        file.write_all_at(&block, rng.random_range(0..blocks) * 4096)?;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
