//! Differential sync: compare the source with the target chunk by chunk and send only the
//! chunks that differ (`docs/internals.md`, "Differential sync").
//!
//! ```text
//!  fetcher task: Challenge -> DiskHashes(page k) -> verify proof -> check page --[bounded]-->
//!  disk-reader thread: per page, hash the source chunks (xxh3-128, little-endian; all-zero
//!  chunks detected without hashing), collect the differing ranges, send them as one part of
//!  the resync interval (scan::scan_part), and close the interval after the last page.
//! ```
//!
//! Invariants: every page comes from an authenticated reply whose server proof was checked,
//! and is checked against what was asked (first chunk, chunk size, hash and bitmap lengths)
//! before a byte of it is trusted; memory holds at most [`PAGES_AHEAD`] + 1 pages (1 MiB of
//! hashes each at [`PAGE_CHUNKS`]); a chunk is skipped only when the target holds the same
//! bytes (same hash, or both all-zero); every other chunk is re-read and sent in full (its
//! all-zero blocks as zero extents), so the target ends equal to the source. The differing
//! chunks are read twice (hash, then send); the second read is normally served by the page
//! cache.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use protocol::auth::ClientAuth;
use protocol::client::{begin_auth, refusal_from_status};
use protocol::error::Refusal;
use protocol::pb::{Batch, DiskHashes, DiskHashesRequest, DiskInfo};
use protocol::transport::{differential_client, process_server_client};
use tokio::sync::mpsc;

use crate::scan::{Cancelled, Part, ScanError, ScanPlan, ScanStats, is_zero, scan_part};
use crate::session::Target;
use crate::source::{Source, SourceError};

/// Default bytes per chunk.
pub const DEFAULT_CHUNK: u32 = 64 << 10;
/// Smallest and largest chunk sizes (powers of two).
pub const MIN_CHUNK: u32 = 4 << 10;
pub const MAX_CHUNK: u32 = 4 << 20;
/// Chunks asked per page (the protocol's maximum).
pub const PAGE_CHUNKS: u32 = 65536;
/// Pages fetched ahead of the reader.
pub const PAGES_AHEAD: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("differential sync: {0}")]
    Refused(#[from] Refusal),
    #[error("differential sync: the process server sent a bad page of hashes: {0}")]
    BadPage(String),
}

/// One checked page of hashes.
#[derive(Debug, Clone)]
pub struct Page {
    pub first_chunk: u64,
    pub chunk_size: u32,
    /// Chunks in this page.
    pub count: usize,
    hashes: Bytes,
    zero_chunks: Bytes,
}

impl Page {
    fn is_zero(&self, i: usize) -> bool {
        self.zero_chunks[i / 8] & (1 << (i % 8)) != 0
    }

    fn hash(&self, i: usize) -> &[u8] {
        &self.hashes[i * 16..i * 16 + 16]
    }
}

/// What the target holds.
#[derive(Debug)]
pub enum Hashes {
    /// The target disk does not exist, or nobody serves hashes: sync in full.
    Unavailable(String),
    Pages(HashPages),
}

/// The first page, and the rest as they come.
#[derive(Debug)]
pub struct HashPages {
    pub first: Page,
    pub rest: mpsc::Receiver<Result<Page, DiffError>>,
}

/// A chunk size is a power of two in [`MIN_CHUNK`, `MAX_CHUNK`].
pub fn valid_chunk_size(c: u64) -> bool {
    c.is_power_of_two() && (u64::from(MIN_CHUNK)..=u64::from(MAX_CHUNK)).contains(&c)
}

/// Asks for the first page; if the target has the disk, starts fetching the others.
pub async fn fetch(target: &Target, chunk_size: u32) -> Result<Hashes, DiffError> {
    let mut fetcher = Fetcher::connect(target, chunk_size).await?;
    let total = target.disk.capacity.div_ceil(u64::from(chunk_size));
    let first = match fetcher.page(0, total).await? {
        Reply::Page(p) => p,
        Reply::Unimplemented => {
            return Ok(Hashes::Unavailable(
                "the process server does not serve chunk hashes".into(),
            ));
        }
        Reply::Absent => {
            return Ok(Hashes::Unavailable(
                "the target disk does not exist yet".into(),
            ));
        }
    };
    let (tx, rest) = mpsc::channel(PAGES_AHEAD);
    let mut next = first.count as u64;
    tokio::spawn(async move {
        while next < total {
            let page = match fetcher.page(next, total).await {
                Ok(Reply::Page(p)) => Ok(p),
                Ok(_) => Err(DiffError::BadPage(
                    "the target disk vanished during the sync".into(),
                )),
                Err(e) => Err(e),
            };
            let failed = page.is_err();
            next += page.as_ref().map_or(0, |p| p.count as u64);
            // The reader went away (pass cancelled) or the page failed: stop either way.
            if tx.send(page).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(Hashes::Pages(HashPages { first, rest }))
}

enum Reply {
    Page(Page),
    Absent,
    Unimplemented,
}

struct Fetcher {
    main: protocol::pb::process_server_client::ProcessServerClient<tonic::transport::Channel>,
    hashes: protocol::pb::differential_client::DifferentialClient<tonic::transport::Channel>,
    auth: ClientAuth,
    disk: DiskInfo,
    chunk_size: u32,
}

impl Fetcher {
    async fn connect(target: &Target, chunk_size: u32) -> Result<Fetcher, DiffError> {
        let channel = protocol::client::connect(&target.url, &target.tuning, &target.tls).await?;
        Ok(Fetcher {
            main: process_server_client(channel.clone()),
            hashes: differential_client(channel),
            auth: target.auth.clone(),
            disk: target.disk.clone(),
            chunk_size,
        })
    }

    /// One page from `first` (of `total` chunks); a fresh challenge each time, since nonces
    /// are single-use.
    async fn page(&mut self, first: u64, total: u64) -> Result<Reply, DiffError> {
        let pending = begin_auth(&mut self.main, &self.auth).await?;
        let want = (total - first).min(u64::from(PAGE_CHUNKS)) as u32;
        let req = DiskHashesRequest {
            auth: Some(pending.auth.clone()),
            disk: Some(self.disk.clone()),
            chunk_size: self.chunk_size,
            after_seq: 0,
            first_chunk: first,
            max_chunks: want,
        };
        let r = match self.hashes.disk_hashes(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(Reply::Unimplemented),
            Err(s) => return Err(refusal_from_status(&s).into()),
        };
        self.auth.verify_server(&pending, &r.server_proof)?;
        if !r.exists {
            return Ok(Reply::Absent);
        }
        check_page(r, first, self.chunk_size, want).map(Reply::Page)
    }
}

/// Checks a reply against the request before any of it is used.
fn check_page(r: DiskHashes, first: u64, chunk_size: u32, want: u32) -> Result<Page, DiffError> {
    let bad = |m: String| Err(DiffError::BadPage(m));
    if r.first_chunk != first || r.chunk_size != chunk_size {
        return bad(format!(
            "asked chunks from {first} of {chunk_size} bytes, got from {} of {} bytes",
            r.first_chunk, r.chunk_size
        ));
    }
    if !r.hashes.len().is_multiple_of(16) {
        return bad(format!("{} bytes of hashes", r.hashes.len()));
    }
    let count = r.hashes.len() / 16;
    if count == 0 || count > want as usize {
        return bad(format!("{count} hashes for {want} chunks asked"));
    }
    if r.zero_chunks.len() < count.div_ceil(8) {
        return bad(format!(
            "a zero bitmap of {} bytes for {count} chunks",
            r.zero_chunks.len()
        ));
    }
    Ok(Page {
        first_chunk: first,
        chunk_size,
        count,
        hashes: r.hashes,
        zero_chunks: r.zero_chunks,
    })
}

/// Counters of a differential pass, shared with the summary.
#[derive(Debug, Default)]
pub struct DiffCounts {
    /// Source chunks compared.
    pub chunks: AtomicU64,
    /// Of those, the ones sent.
    pub differing: AtomicU64,
}

/// A differential pass over every page: one part of a resync interval per page, closed
/// after the last page when `end`. Returns the next seq, or `Ok(None)` when cancelled.
pub fn differential_pass(
    source: &mut Source,
    plan: &ScanPlan,
    stats: &ScanStats,
    counts: &DiffCounts,
    pages: HashPages,
    end: bool,
    emit: &mut dyn FnMut(Batch) -> Result<(), Cancelled>,
) -> Result<Option<u64>, ScanError> {
    let mut plan = plan.clone();
    let mut buf = Vec::new();
    let HashPages {
        first: mut page,
        mut rest,
    } = pages;
    loop {
        let ranges = differing_ranges(source, &page, &mut buf, counts)?;
        let reached = ((page.first_chunk + page.count as u64) * u64::from(page.chunk_size))
            .min(source.capacity());
        let part = Part::Ranges(&mut ranges.into_iter());
        let Some(next) = scan_part(source, &plan, stats, part, false, emit)? else {
            return Ok(None);
        };
        plan.first_seq = next;
        stats.scanned.store(reached, Ordering::Relaxed);
        page = match rest.blocking_recv() {
            Some(p) => p?,
            None => break,
        };
    }
    if !end {
        return Ok(Some(plan.first_seq));
    }
    scan_part(
        source,
        &plan,
        stats,
        Part::Ranges(&mut std::iter::empty()),
        true,
        emit,
    )
}

/// The ranges of `page` whose source bytes differ from the target's, merged, ascending.
/// Blocking reads: run on the disk-reader thread.
pub fn differing_ranges(
    source: &Source,
    page: &Page,
    buf: &mut Vec<u8>,
    counts: &DiffCounts,
) -> Result<Vec<(u64, u64)>, SourceError> {
    let capacity = source.capacity();
    let chunk = u64::from(page.chunk_size);
    buf.resize(page.chunk_size as usize, 0);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for i in 0..page.count {
        let start = (page.first_chunk + i as u64) * chunk;
        if start >= capacity {
            break;
        }
        let end = (start + chunk).min(capacity);
        let data = &mut buf[..(end - start) as usize];
        source.read_exact_at(data, start)?;
        counts.chunks.fetch_add(1, Ordering::Relaxed);
        let same = if is_zero(data) {
            page.is_zero(i)
        } else {
            !page.is_zero(i) && xxhash_rust::xxh3::xxh3_128(data).to_le_bytes() == page.hash(i)
        };
        if same {
            continue;
        }
        counts.differing.fetch_add(1, Ordering::Relaxed);
        match ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => ranges.push((start, end)),
        }
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn page_of(disk: &[u8], chunk: usize) -> DiskHashes {
        let n = disk.len().div_ceil(chunk);
        let mut hashes = Vec::new();
        let mut zero = vec![0u8; n.div_ceil(8)];
        for (i, c) in disk.chunks(chunk).enumerate() {
            if is_zero(c) {
                zero[i / 8] |= 1 << (i % 8);
                hashes.extend_from_slice(&[0; 16]);
            } else {
                hashes.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(c).to_le_bytes());
            }
        }
        DiskHashes {
            server_proof: Bytes::new(),
            exists: true,
            first_chunk: 0,
            chunk_size: chunk as u32,
            hashes: hashes.into(),
            zero_chunks: zero.into(),
            applied_seq: 0,
        }
    }

    #[test]
    fn only_differing_chunks_are_reported() {
        let chunk = 4096;
        let mut target = vec![0u8; 16 * chunk];
        target[..chunk].fill(1);
        target[5 * chunk..6 * chunk].fill(2);
        let mut src = target.clone();
        src[10] = 9; // chunk 0 changed
        src[5 * chunk..6 * chunk].fill(0); // chunk 5 zeroed
        src[7 * chunk] = 1; // chunk 7 written
        src[8 * chunk] = 1; // chunk 8 written, merges with 7
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().write_all_at(&src, 0).unwrap();
        let source = Source::open(f.path()).unwrap();
        let page = check_page(page_of(&target, chunk), 0, chunk as u32, 16).unwrap();
        let counts = DiffCounts::default();
        let r = differing_ranges(&source, &page, &mut Vec::new(), &counts).unwrap();
        let c = chunk as u64;
        assert_eq!(r, vec![(0, c), (5 * c, 6 * c), (7 * c, 9 * c)]);
        assert_eq!(counts.chunks.load(Ordering::Relaxed), 16);
        assert_eq!(counts.differing.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn malformed_pages_are_refused() {
        let good = page_of(&[1u8; 8192], 4096);
        assert!(check_page(good.clone(), 0, 4096, 2).is_ok());
        assert!(check_page(good.clone(), 1, 4096, 2).is_err());
        assert!(check_page(good.clone(), 0, 8192, 2).is_err());
        assert!(
            check_page(good.clone(), 0, 4096, 1).is_err(),
            "more than asked"
        );
        let mut short = good.clone();
        short.hashes = short.hashes.slice(..17);
        assert!(check_page(short, 0, 4096, 2).is_err());
        let mut no_bitmap = good;
        no_bitmap.zero_chunks = Bytes::new();
        assert!(check_page(no_bitmap, 0, 4096, 2).is_err());
        assert!(valid_chunk_size(65536) && !valid_chunk_size(65535) && !valid_chunk_size(2048));
    }
}
