//! Chunk hashes of a target disk for differential sync (`MasterTarget.DiskHashes`).
//!
//! A page covers chunks `[first_chunk, first_chunk + n)` of `chunk_size` bytes (the last
//! chunk of the disk may be shorter). Per chunk: 16 bytes of xxh3-128, little-endian, or 16
//! zero bytes and a set bit in `zero_chunks` (LSB first) when the chunk is all zeros. xxh3
//! rather than CRC32: a 32-bit digest would wrongly match a changed chunk far too often
//! over a whole disk (PITFALLS.md §6).
//!
//! Reads go through `pread` on the extent file (the page cache is shared with the
//! applier's map, so they see every applied byte without touching the map), or through
//! the grain tables of a sparse image ([`crate::vmdk::extent::Reader`]).

use std::io;

use crate::vmdk::extent::{DataRef, Reader};

use protocol::error::{Code, Refusal};

/// Chunk size when the request says 0.
pub const DEFAULT_CHUNK: u32 = 64 * 1024;
pub const MIN_CHUNK: u32 = 4 * 1024;
pub const MAX_CHUNK: u32 = 4 * 1024 * 1024;
/// Most chunks in one page (1 MiB of hashes).
pub const MAX_CHUNKS: u32 = 65536;

/// The chunk size a request asks for, checked.
pub fn chunk_size(requested: u32) -> Result<u32, Refusal> {
    match requested {
        0 => Ok(DEFAULT_CHUNK),
        c if c.is_power_of_two() && (MIN_CHUNK..=MAX_CHUNK).contains(&c) => Ok(c),
        c => Err(Refusal::new(
            Code::BadRequest,
            format!("chunk size {c} must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}"),
        )),
    }
}

/// One page of hashes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub hashes: Vec<u8>,
    pub zero_chunks: Vec<u8>,
}

/// Hashes up to `max_chunks` (0 = [`MAX_CHUNKS`]) chunks from `first_chunk` of the disk of
/// `capacity` bytes stored in `extent`; a page starting past the end is empty.
pub fn hash_page(
    extent: &DataRef,
    capacity: u64,
    chunk: u32,
    first_chunk: u64,
    max_chunks: u32,
) -> io::Result<Page> {
    let file = Reader::open(extent).map_err(io::Error::other)?;
    let chunk = u64::from(chunk);
    let total = capacity.div_ceil(chunk);
    let n = total
        .saturating_sub(first_chunk)
        .min(u64::from(match max_chunks {
            0 => MAX_CHUNKS,
            n => n.min(MAX_CHUNKS),
        }));
    let mut page = Page {
        hashes: vec![0u8; n as usize * 16],
        zero_chunks: vec![0u8; (n as usize).div_ceil(8)],
    };
    let mut buf = vec![0u8; chunk as usize];
    for i in 0..n {
        let offset = (first_chunk + i) * chunk;
        let len = chunk.min(capacity - offset) as usize;
        file.read_at(&mut buf[..len], offset)?;
        let data = &buf[..len];
        if data.iter().all(|&b| b == 0) {
            page.zero_chunks[i as usize / 8] |= 1 << (i % 8);
        } else {
            let h = xxhash_rust::xxh3::xxh3_128(data).to_le_bytes();
            page.hashes[i as usize * 16..i as usize * 16 + 16].copy_from_slice(&h);
        }
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunks_are_flagged_and_others_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x-flat.vmdk");
        let mut data = vec![0u8; 3 * 4096 + 512];
        data[4096] = 1;
        data[3 * 4096 + 10] = 2;
        std::fs::write(&p, &data).unwrap();
        let p = DataRef::flat(p);
        let page = hash_page(&p, data.len() as u64, 4096, 0, 0).unwrap();
        assert_eq!(page.zero_chunks, vec![0b0101]);
        assert_eq!(page.hashes.len(), 4 * 16);
        assert_eq!(&page.hashes[..16], &[0u8; 16]);
        let h1 = xxhash_rust::xxh3::xxh3_128(&data[4096..8192]).to_le_bytes();
        assert_eq!(&page.hashes[16..32], &h1);
        let last = xxhash_rust::xxh3::xxh3_128(&data[3 * 4096..]).to_le_bytes();
        assert_eq!(&page.hashes[48..], &last, "short last chunk hashed as is");
        let tail = hash_page(&p, data.len() as u64, 4096, 3, 10).unwrap();
        assert_eq!(tail.hashes, page.hashes[48..].to_vec());
        assert_eq!(
            hash_page(&p, data.len() as u64, 4096, 9, 10).unwrap(),
            Page::default()
        );
    }

    #[test]
    fn chunk_sizes_are_checked() {
        assert_eq!(chunk_size(0).unwrap(), DEFAULT_CHUNK);
        assert_eq!(chunk_size(1 << 20).unwrap(), 1 << 20);
        assert!(chunk_size(3000).is_err());
        assert!(chunk_size(8 << 20).is_err());
    }
}
