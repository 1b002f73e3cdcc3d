//! The batch codec: building, checking and decoding [`pb::Batch`].
//!
//! A batch is an ordered unit of writes to one disk (see `proto/failback.proto`):
//!
//! ```text
//! Batch { disk_id | seq | writes[] | zeros[] | markers[] | data_len | payload_crc | data_crc
//!         | payload (one lz4 block, no size prefix) | time_unix_ms | flags | header_crc }
//! ```
//!
//! Checksums: `payload_crc` = CRC32(payload), `data_crc` = CRC32(decompressed data),
//! `header_crc` = CRC32 over every other field in the canonical order of [`header_crc`].
//! Together they cover every bit of the batch.
//!
//! Invariants enforced by [`check`] before anything is allocated or decompressed:
//! extents are non-empty, inside the disk, and pairwise disjoint (writes and zeros alike), so
//! their order within a batch is irrelevant; the declared data length equals the sum of the
//! write lengths, is at most [`MAX_BATCH_DATA`] and at most [`LZ4_MAX_RATIO`] times the
//! payload length. [`decode_into`] then decompresses into an exact-size buffer and requires
//! both the returned length and `data_crc` to match.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use lz4_flex::block::{
    CompressTable, compress_into_with_table, decompress_into, get_maximum_output_size,
};

use crate::error::{Code, Refusal};
use crate::limits::{LZ4_MAX_RATIO, MAX_BATCH_DATA, MAX_EXTENTS, MAX_MARKERS, MAX_NAME_LEN};
use crate::pb::{Batch, Extent, Marker, MarkerKind};

/// Bits of `Batch.flags`.
pub mod flags {
    /// The batch belongs to an out-of-order interval (a full, differential or bitmap resync
    /// pass): the disk offers no recovery point until the interval ends.
    pub const RESYNC: u32 = 1;
    /// The batch ends a resync interval: after it the disk is consistent again.
    pub const RESYNC_END: u32 = 2;
    /// Every bit this version knows; others are refused.
    pub const KNOWN: u32 = RESYNC | RESYNC_END;
}

/// Why a batch was refused. Every variant leaves stored data untouched: checks run before
/// any byte of the batch is applied or stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch has no disk id")]
    MissingDiskId,
    #[error("batch seq 0 is not allowed (seqs start at 1)")]
    ZeroSeq,
    #[error("batch seq {0} is above 2^63-1")]
    SeqTooLarge(u64),
    #[error("batch time {0} is before 1970")]
    NegativeTime(i64),
    #[error("batch has {count} {kind} extents, more than the limit of {limit}")]
    TooManyExtents {
        kind: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("batch has {count} markers, more than the limit of {MAX_MARKERS}")]
    TooManyMarkers { count: usize },
    #[error("batch has an empty extent at offset {offset}")]
    EmptyExtent { offset: u64 },
    #[error("extent [{offset}, +{length}) is outside the disk of {capacity} bytes")]
    OutOfRange {
        offset: u64,
        length: u64,
        capacity: u64,
    },
    #[error("extents at offsets {first} and {second} overlap")]
    Overlap { first: u64, second: u64 },
    #[error("batch declares {declared} data bytes but its writes cover {extents}")]
    DataLenMismatch { declared: u64, extents: u64 },
    #[error("batch declares {declared} data bytes, more than the cap of {MAX_BATCH_DATA}")]
    TooLarge { declared: u64 },
    #[error(
        "batch declares {declared} data bytes from {compressed} compressed bytes, beyond lz4's \
         maximum ratio of {LZ4_MAX_RATIO}:1 (decompression bomb)"
    )]
    ImpossibleRatio { declared: u64, compressed: usize },
    #[error("payload CRC mismatch: batch says {expected:08x}, payload has {actual:08x}")]
    PayloadCrc { expected: u32, actual: u32 },
    #[error("header CRC mismatch: batch says {expected:08x}, header has {actual:08x}")]
    HeaderCrc { expected: u32, actual: u32 },
    #[error("payload does not decompress: {0}")]
    Decompress(String),
    #[error("payload decompressed to {actual} bytes, batch declares {expected}")]
    DecompressedLen { expected: usize, actual: usize },
    #[error(
        "data CRC mismatch after decompression: batch says {expected:08x}, data has {actual:08x}"
    )]
    DataCrc { expected: u32, actual: u32 },
    #[error("bad marker: {0}")]
    BadMarker(String),
    #[error("unknown batch flags {0:#x}")]
    UnknownFlags(u32),
}

impl BatchError {
    /// The refusal sent to the peer for this batch.
    pub fn refusal(&self, disk_id: &str, seq: u64) -> Refusal {
        Refusal::for_disk(Code::BadBatch, disk_id, format!("batch seq {seq}: {self}"))
    }
}

/// Accumulates the writes, zero extents and markers of one batch, then compresses them with
/// a reused lz4 table and output buffer. One builder per producing thread.
pub struct BatchBuilder {
    table: CompressTable,
    data: Vec<u8>,
    out: BytesMut,
    writes: Vec<Extent>,
    zeros: Vec<Extent>,
    markers: Vec<Marker>,
    /// start -> end of every extent in the batch, to refuse overlaps as they are pushed.
    covered: BTreeMap<u64, u64>,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    pub fn new() -> Self {
        BatchBuilder {
            table: CompressTable::large(),
            data: Vec::new(),
            out: BytesMut::new(),
            writes: Vec::new(),
            zeros: Vec::new(),
            markers: Vec::new(),
            covered: BTreeMap::new(),
        }
    }

    /// Uncompressed write data gathered so far.
    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    /// Number of write plus zero extents gathered so far.
    pub fn extent_count(&self) -> usize {
        self.writes.len() + self.zeros.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.zeros.is_empty() && self.markers.is_empty()
    }

    /// Whether `[offset, offset + len)` overlaps an extent already in the batch; the caller
    /// then finishes this batch first, which keeps write order across batches.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        match self.covered.range(..end).next_back() {
            Some((_, &e)) => e > offset,
            None => false,
        }
    }

    /// Whether a write of `len` bytes still fits under the limits with `budget` data bytes.
    pub fn has_room(&self, len: usize, budget: usize) -> bool {
        self.writes.len() < MAX_EXTENTS && self.data.len() + len <= budget.min(MAX_BATCH_DATA)
    }

    /// Adds a write. The caller has checked [`Self::overlaps`] and [`Self::has_room`].
    pub fn push_write(&mut self, offset: u64, data: &[u8]) {
        debug_assert!(!data.is_empty() && !self.overlaps(offset, data.len() as u64));
        self.covered.insert(offset, offset + data.len() as u64);
        self.writes.push(Extent {
            offset,
            length: data.len() as u64,
        });
        self.data.extend_from_slice(data);
    }

    /// Adds a zero-fill extent, merging it with the previous one when they touch.
    pub fn push_zero(&mut self, offset: u64, length: u64) {
        debug_assert!(length > 0 && !self.overlaps(offset, length));
        if let Some(last) = self.zeros.last_mut()
            && last.offset + last.length == offset
        {
            last.length += length;
            self.covered.insert(last.offset, offset + length);
            return;
        }
        self.covered.insert(offset, offset + length);
        self.zeros.push(Extent { offset, length });
    }

    /// Whether another zero extent may be added.
    pub fn has_zero_room(&self) -> bool {
        self.zeros.len() < MAX_EXTENTS
    }

    /// Adds a marker; it takes effect after every write of this batch.
    pub fn push_marker(&mut self, marker: Marker) {
        self.markers.push(marker);
    }

    /// Compresses what was gathered into a finished batch and resets the builder.
    pub fn finish(&mut self, disk_id: &str, seq: u64, time_unix_ms: i64, flags: u32) -> Batch {
        let data_crc = crc32fast::hash(&self.data);
        self.out.clear();
        self.out.resize(get_maximum_output_size(self.data.len()), 0);
        let n = if self.data.is_empty() {
            0
        } else {
            compress_into_with_table(&self.data, &mut self.out, &mut self.table)
                .expect("output sized by get_maximum_output_size")
        };
        self.out.truncate(n);
        let payload: Bytes = self.out.split().freeze();
        let mut batch = Batch {
            disk_id: disk_id.to_string(),
            seq,
            writes: std::mem::take(&mut self.writes),
            zeros: std::mem::take(&mut self.zeros),
            markers: std::mem::take(&mut self.markers),
            data_len: self.data.len() as u32,
            payload_crc: crc32fast::hash(&payload),
            data_crc,
            payload,
            time_unix_ms,
            flags,
            header_crc: 0,
        };
        batch.header_crc = header_crc(&batch);
        self.data.clear();
        self.covered.clear();
        batch
    }
}

/// CRC32 of every field but `payload` and `header_crc`, in field order, each length-prefixed
/// or fixed-width little-endian, so that the encoding is unambiguous.
pub fn header_crc(b: &Batch) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let str_ = |h: &mut crc32fast::Hasher, s: &str| {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    str_(&mut h, &b.disk_id);
    h.update(&b.seq.to_le_bytes());
    for list in [&b.writes, &b.zeros] {
        h.update(&(list.len() as u64).to_le_bytes());
        for e in list.iter() {
            h.update(&e.offset.to_le_bytes());
            h.update(&e.length.to_le_bytes());
        }
    }
    h.update(&(b.markers.len() as u64).to_le_bytes());
    for m in &b.markers {
        str_(&mut h, &m.id);
        h.update(&m.kind.to_le_bytes());
        h.update(&m.time_unix_ms.to_le_bytes());
        str_(&mut h, &m.group);
        str_(&mut h, &m.tag);
    }
    h.update(&b.data_len.to_le_bytes());
    h.update(&b.payload_crc.to_le_bytes());
    h.update(&b.data_crc.to_le_bytes());
    h.update(&(b.payload.len() as u64).to_le_bytes());
    h.update(&b.time_unix_ms.to_le_bytes());
    h.update(&b.flags.to_le_bytes());
    h.finalize()
}

/// Checks everything about a batch that can be checked without decompressing it, against a
/// disk of `capacity` bytes. Cost: O(extents log extents) plus one CRC pass over the payload.
pub fn check(b: &Batch, capacity: u64) -> Result<(), BatchError> {
    if b.disk_id.is_empty() {
        return Err(BatchError::MissingDiskId);
    }
    if b.seq == 0 {
        return Err(BatchError::ZeroSeq);
    }
    // Values of 2^63 and above (and negative times) take 10-byte varints, whose spare high
    // bits prost ignores: refusing them keeps every bit of the encoding significant.
    if b.seq > i64::MAX as u64 {
        return Err(BatchError::SeqTooLarge(b.seq));
    }
    if b.time_unix_ms < 0 {
        return Err(BatchError::NegativeTime(b.time_unix_ms));
    }
    if b.flags & !flags::KNOWN != 0 {
        return Err(BatchError::UnknownFlags(b.flags & !flags::KNOWN));
    }
    for (kind, list) in [("write", &b.writes), ("zero", &b.zeros)] {
        if list.len() > MAX_EXTENTS {
            return Err(BatchError::TooManyExtents {
                kind,
                count: list.len(),
                limit: MAX_EXTENTS,
            });
        }
    }
    if b.markers.len() > MAX_MARKERS {
        return Err(BatchError::TooManyMarkers {
            count: b.markers.len(),
        });
    }
    let expected = header_crc(b);
    if expected != b.header_crc {
        return Err(BatchError::HeaderCrc {
            expected: b.header_crc,
            actual: expected,
        });
    }
    let declared = u64::from(b.data_len);
    if declared > MAX_BATCH_DATA as u64 {
        return Err(BatchError::TooLarge { declared });
    }
    if declared > (b.payload.len() as u64) * LZ4_MAX_RATIO as u64 {
        return Err(BatchError::ImpossibleRatio {
            declared,
            compressed: b.payload.len(),
        });
    }
    let mut extents: Vec<(u64, u64)> = Vec::with_capacity(b.writes.len() + b.zeros.len());
    let mut write_bytes = 0u64;
    for (is_write, e) in b
        .writes
        .iter()
        .map(|e| (true, e))
        .chain(b.zeros.iter().map(|e| (false, e)))
    {
        if e.length == 0 {
            return Err(BatchError::EmptyExtent { offset: e.offset });
        }
        let end = e
            .offset
            .checked_add(e.length)
            .filter(|&end| end <= capacity);
        let Some(end) = end else {
            return Err(BatchError::OutOfRange {
                offset: e.offset,
                length: e.length,
                capacity,
            });
        };
        if is_write {
            write_bytes += e.length;
        }
        extents.push((e.offset, end));
    }
    if write_bytes != declared {
        return Err(BatchError::DataLenMismatch {
            declared,
            extents: write_bytes,
        });
    }
    extents.sort_unstable();
    for pair in extents.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(BatchError::Overlap {
                first: pair[0].0,
                second: pair[1].0,
            });
        }
    }
    for m in &b.markers {
        check_marker(m)?;
    }
    let actual = crc32fast::hash(&b.payload);
    if actual != b.payload_crc {
        return Err(BatchError::PayloadCrc {
            expected: b.payload_crc,
            actual,
        });
    }
    Ok(())
}

fn check_marker(m: &Marker) -> Result<(), BatchError> {
    if m.id.is_empty() || m.id.len() > MAX_NAME_LEN {
        return Err(BatchError::BadMarker(format!(
            "marker id must be 1..={MAX_NAME_LEN} bytes"
        )));
    }
    if m.group.len() > MAX_NAME_LEN || m.tag.len() > MAX_NAME_LEN {
        return Err(BatchError::BadMarker(format!(
            "marker {}: group and tag must be at most {MAX_NAME_LEN} bytes",
            m.id
        )));
    }
    if m.time_unix_ms < 0 {
        return Err(BatchError::BadMarker(format!(
            "marker {}: time before 1970",
            m.id
        )));
    }
    match MarkerKind::try_from(m.kind) {
        Ok(MarkerKind::Unspecified) | Err(_) => Err(BatchError::BadMarker(format!(
            "marker {}: unknown kind {}",
            m.id, m.kind
        ))),
        Ok(_) => Ok(()),
    }
}

/// A checked, decompressed batch: `data` holds the writes' bytes back to back.
#[derive(Debug)]
pub struct Decoded<'a> {
    pub batch: &'a Batch,
    pub data: &'a [u8],
}

impl<'a> Decoded<'a> {
    /// Each write's offset and its bytes, in batch order.
    pub fn writes(&self) -> impl Iterator<Item = (u64, &'a [u8])> + '_ {
        let mut at = 0usize;
        self.batch.writes.iter().map(move |e| {
            let len = e.length as usize;
            let slice = &self.data[at..at + len];
            at += len;
            (e.offset, slice)
        })
    }
}

/// Checks `b` (see [`check`]), decompresses its payload into `buf` (reused between calls,
/// resized to exactly `data_len`), and verifies the decompressed length and `data_crc`.
///
/// A reused buffer is not zeroed first: a decompression that succeeds with the expected
/// length has written every byte of it. After an error its contents are unspecified (old
/// bytes of earlier batches may remain).
pub fn decode_into<'a>(
    b: &'a Batch,
    capacity: u64,
    buf: &'a mut Vec<u8>,
) -> Result<Decoded<'a>, BatchError> {
    check(b, capacity)?;
    let n = b.data_len as usize;
    buf.truncate(n);
    buf.resize(n, 0);
    if n > 0 {
        let got =
            decompress_into(&b.payload, buf).map_err(|e| BatchError::Decompress(e.to_string()))?;
        if got != n {
            return Err(BatchError::DecompressedLen {
                expected: n,
                actual: got,
            });
        }
    } else if !b.payload.is_empty() {
        return Err(BatchError::DecompressedLen {
            expected: 0,
            actual: b.payload.len(),
        });
    }
    let actual = crc32fast::hash(buf);
    if actual != b.data_crc {
        return Err(BatchError::DataCrc {
            expected: b.data_crc,
            actual,
        });
    }
    Ok(Decoded {
        batch: b,
        data: buf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    const CAP: u64 = 1 << 30;

    fn sample() -> Batch {
        let mut b = BatchBuilder::new();
        b.push_write(0, &[7u8; 4096]);
        b.push_zero(8192, 65536);
        let random: Vec<u8> = (0..3000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        b.push_write(1 << 20, &random);
        b.push_marker(Marker {
            id: "m1".into(),
            kind: MarkerKind::User as i32,
            time_unix_ms: 1,
            group: String::new(),
            tag: "t".into(),
        });
        b.finish("disk-1", 3, 1234, 0)
    }

    /// A buffer reused from a bigger batch is cut to size and fully overwritten, not zeroed.
    #[test]
    fn decode_into_a_reused_buffer_gives_exactly_the_new_batch() {
        let mut big = BatchBuilder::new();
        big.push_write(0, &[0xAB; 65536]);
        let big = big.finish("disk-1", 1, 0, 0);
        let small = sample();
        let mut buf = Vec::new();
        decode_into(&big, CAP, &mut buf).unwrap();
        let fresh = decode_into(&small, CAP, &mut Vec::new())
            .unwrap()
            .data
            .to_vec();
        let d = decode_into(&small, CAP, &mut buf).unwrap();
        assert_eq!(d.data, &fresh[..]);
        assert_eq!(d.data.len(), small.data_len as usize);
    }

    #[test]
    fn decode_returns_the_writes_that_were_built() {
        let batch = sample();
        let mut buf = Vec::new();
        let d = decode_into(&batch, CAP, &mut buf).unwrap();
        let w: Vec<_> = d.writes().collect();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0], (0, &[7u8; 4096][..]));
        assert_eq!(w[1].0, 1 << 20);
        assert_eq!(w[1].1.len(), 3000);
    }

    #[test]
    fn decode_rejects_batch_with_bad_payload_crc() {
        let mut batch = sample();
        let mut p = batch.payload.to_vec();
        p[0] ^= 1;
        batch.payload = p.into();
        assert!(matches!(
            check(&batch, CAP),
            Err(BatchError::HeaderCrc { .. } | BatchError::PayloadCrc { .. })
        ));
    }

    #[test]
    fn check_rejects_decompression_bomb() {
        let mut batch = sample();
        batch.data_len = u32::MAX; // 4 GiB declared
        batch.header_crc = header_crc(&batch);
        assert_eq!(
            check(&batch, CAP),
            Err(BatchError::TooLarge {
                declared: u32::MAX as u64
            })
        );
        batch.writes = vec![Extent {
            offset: 0,
            length: 1 << 20,
        }];
        batch.zeros.clear();
        batch.data_len = 1 << 20;
        batch.payload = Bytes::from_static(&[0u8; 8]);
        batch.payload_crc = crc32fast::hash(&batch.payload);
        batch.header_crc = header_crc(&batch);
        assert!(matches!(
            check(&batch, CAP),
            Err(BatchError::ImpossibleRatio { .. })
        ));
    }

    #[test]
    fn check_rejects_extent_past_the_end_and_overlaps() {
        let mut batch = sample();
        batch.zeros[0].offset = CAP - 10;
        batch.header_crc = header_crc(&batch);
        assert!(matches!(
            check(&batch, CAP),
            Err(BatchError::OutOfRange { .. })
        ));
        batch.zeros[0].offset = u64::MAX - 5;
        batch.header_crc = header_crc(&batch);
        assert!(matches!(
            check(&batch, CAP),
            Err(BatchError::OutOfRange { .. })
        ));
        batch.zeros[0].offset = 4000;
        batch.header_crc = header_crc(&batch);
        assert!(matches!(
            check(&batch, CAP),
            Err(BatchError::Overlap {
                first: 0,
                second: 4000
            })
        ));
    }

    #[test]
    fn builder_reports_overlaps() {
        let mut b = BatchBuilder::new();
        b.push_write(4096, &[1; 4096]);
        assert!(b.overlaps(0, 4097));
        assert!(!b.overlaps(0, 4096));
        assert!(b.overlaps(8191, 1));
        assert!(!b.overlaps(8192, 10));
    }

    fn arb_batch() -> impl Strategy<Value = Batch> {
        let write = (
            0u64..64,
            prop::collection::vec(any::<u8>(), 1..600),
            any::<bool>(),
        );
        (
            prop::collection::vec(write, 0..12),
            1u64..1000,
            0i64..i64::MAX,
            prop::option::of("[a-z]{1,8}"),
        )
            .prop_map(|(writes, seq, time, marker)| {
                let mut b = BatchBuilder::new();
                for (slot, data, zero) in writes {
                    let offset = slot * 1024;
                    let len = data.len() as u64;
                    if b.overlaps(offset, len) {
                        continue;
                    }
                    if zero {
                        b.push_zero(offset, len);
                    } else {
                        b.push_write(offset, &data);
                    }
                }
                if let Some(tag) = marker {
                    b.push_marker(Marker {
                        id: format!("id-{tag}"),
                        kind: 3,
                        time_unix_ms: time,
                        group: "g".into(),
                        tag,
                    });
                }
                b.finish("disk-x", seq, time, 0)
            })
    }

    fn accepted(bytes: &[u8]) -> bool {
        match Batch::decode(bytes) {
            Ok(b) => {
                let mut buf = Vec::new();
                decode_into(&b, CAP, &mut buf).is_ok()
            }
            Err(_) => false,
        }
    }

    proptest! {
        #[test]
        fn round_trip_preserves_every_write(batch in arb_batch()) {
            let bytes = batch.encode_to_vec();
            let back = Batch::decode(&bytes[..]).unwrap();
            prop_assert_eq!(&back, &batch);
            let mut buf = Vec::new();
            let d = decode_into(&back, CAP, &mut buf).unwrap();
            prop_assert_eq!(d.writes().count(), batch.writes.len());
        }

        #[test]
        fn every_single_bit_flip_is_rejected(batch in arb_batch()) {
            let bytes = batch.encode_to_vec();
            for i in 0..bytes.len() * 8 {
                let mut bad = bytes.clone();
                bad[i / 8] ^= 1 << (i % 8);
                prop_assert!(!accepted(&bad), "flip of bit {} accepted", i);
            }
        }

        /// The fuzz target `fuzz/fuzz_targets/batch.rs`, bounded: arbitrary bytes and random
        /// multi-byte corruptions of valid batches never panic, and whatever is accepted
        /// decompresses to exactly its declared length.
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(
            batch in arb_batch(),
            noise in prop::collection::vec(any::<u8>(), 0..256),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            for bytes in [noise.clone(), {
                let mut b = batch.encode_to_vec();
                for (i, v) in &edits {
                    let i = i.index(b.len());
                    b[i] = *v;
                }
                b
            }] {
                if let Ok(b) = Batch::decode(&bytes[..]) {
                    let mut buf = Vec::new();
                    if let Ok(d) = decode_into(&b, CAP, &mut buf) {
                        prop_assert_eq!(d.data.len(), b.data_len as usize);
                    }
                }
            }
        }

        #[test]
        fn every_truncation_is_rejected(batch in arb_batch()) {
            let bytes = batch.encode_to_vec();
            for n in 0..bytes.len() {
                prop_assert!(!accepted(&bytes[..n]), "truncation to {} accepted", n);
            }
        }
    }
}
