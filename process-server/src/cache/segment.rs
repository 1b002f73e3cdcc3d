//! On-disk format of one cache segment file (format version 1).
//!
//! A segment is `CACHE_DIR/<segment seq, 16 digits zero-padded>.seg`, so names sort in log
//! order. All integers are little-endian.
//!
//! ```text
//! // Format: { magic [8] = "FBCACHE\x01" | version u32 | reserved u32 | segment_seq u64
//! //           | header_crc u32 | reserved u32 }                                  (32 bytes)
//! // then records, back to back:
//! // Format: { len u32 | crc u32 | seq u64 | time_unix_ms i64 | id_len u16
//! //           | disk_id [id_len] | batch [len] }
//! ```
//!
//! * `header_crc` = CRC32 of the 20 header bytes before it.
//! * `batch` is the prost encoding of `protocol::pb::Batch` exactly as it is forwarded (the
//!   wire bytes: no recompression).
//! * `crc` = CRC32 *seeded with the segment seq* ([`crc_seed`]) over `len` and every byte after
//!   `crc` up to the end of the record. The seed makes a stale record (from a reused or
//!   preallocated file, or a copy of an older segment) fail its check in a segment with another
//!   seq, so it can never pass as new.
//! * `len` is 1..=[`MAX_BATCH_BYTES`] and `id_len` 1..=`MAX_NAME_LEN`: a length is checked
//!   before anything is sliced or allocated. A record header of zeros marks the end of the log.

use std::ops::Range;

use protocol::limits::{MAX_MESSAGE_BYTES, MAX_NAME_LEN};

/// Magic of a segment file: "FBCACHE" then the format version byte.
pub const MAGIC: [u8; 8] = *b"FBCACHE\x01";
/// Format version stored in the header.
pub const VERSION: u32 = 1;
/// Bytes of the segment header.
pub const HEADER_LEN: usize = 32;
/// Bytes of the fixed part of a record header (before the disk id).
pub const RECORD_FIXED_LEN: usize = 4 + 4 + 8 + 8 + 2;
/// Largest batch a record may hold: the largest gRPC message accepted.
pub const MAX_BATCH_BYTES: usize = MAX_MESSAGE_BYTES;
/// File name suffix of segments.
pub const SUFFIX: &str = ".seg";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error("segment header is {0} bytes, shorter than {HEADER_LEN}")]
    ShortHeader(usize),
    #[error("segment header magic is {0:02x?}, not a cache segment")]
    BadMagic([u8; 8]),
    #[error("segment format version {0} is not supported (this build reads {VERSION})")]
    UnsupportedVersion(u32),
    #[error("segment header CRC mismatch")]
    HeaderCrc,
    #[error("segment header says seq {found}, its file name says {expected}")]
    SeqMismatch { expected: u64, found: u64 },
}

/// The file name of segment `seq`.
pub fn file_name(seq: u64) -> String {
    format!("{seq:016}{SUFFIX}")
}

/// The segment seq of a file name made by [`file_name`], or `None` for any other file.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 16 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The CRC32 seed of records in segment `segment_seq`. Never 0 for seq 0..2^32, so a record
/// checksummed with the plain CRC (seed 0) does not pass either.
pub fn crc_seed(segment_seq: u64) -> u32 {
    ((segment_seq ^ (segment_seq >> 32)) as u32) ^ 0x9e37_79b9
}

// Format: { magic [8] | version u32 | reserved u32 | segment_seq u64 | header_crc u32 | reserved u32 }
pub fn encode_header(segment_seq: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&segment_seq.to_le_bytes());
    let crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header and returns its segment seq.
pub fn decode_header(h: &[u8], expected_seq: u64) -> Result<u64, SegmentError> {
    if h.len() < HEADER_LEN {
        return Err(SegmentError::ShortHeader(h.len()));
    }
    let magic: [u8; 8] = h[0..8].try_into().expect("8 bytes");
    if magic != MAGIC {
        return Err(SegmentError::BadMagic(magic));
    }
    if u32_at(h, 24) != crc32fast::hash(&h[0..24]) {
        return Err(SegmentError::HeaderCrc);
    }
    let version = u32_at(h, 8);
    if version != VERSION {
        return Err(SegmentError::UnsupportedVersion(version));
    }
    let found = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    if found != expected_seq {
        return Err(SegmentError::SeqMismatch {
            expected: expected_seq,
            found,
        });
    }
    Ok(found)
}

/// Total bytes of a record for `disk_id` and a batch of `batch_len` bytes.
pub fn record_len(disk_id: &str, batch_len: usize) -> usize {
    RECORD_FIXED_LEN + disk_id.len() + batch_len
}

/// Appends one record to `out`.
///
/// Format: { len u32 | crc u32 | seq u64 | time_unix_ms i64 | id_len u16 | disk_id | batch }
pub fn encode_record(
    out: &mut Vec<u8>,
    segment_seq: u64,
    disk_id: &str,
    seq: u64,
    time_unix_ms: i64,
    batch: &[u8],
) {
    encode_record_with(
        out,
        segment_seq,
        disk_id,
        seq,
        time_unix_ms,
        batch.len(),
        |o| o.extend_from_slice(batch),
    );
}

/// [`encode_record`] with a batch of `batch_len` bytes that `put` appends to `out` (the
/// writer encodes a checked `Batch` message straight into its group buffer this way).
pub fn encode_record_with(
    out: &mut Vec<u8>,
    segment_seq: u64,
    disk_id: &str,
    seq: u64,
    time_unix_ms: i64,
    batch_len: usize,
    put: impl FnOnce(&mut Vec<u8>),
) {
    debug_assert!(batch_len > 0 && batch_len <= MAX_BATCH_BYTES);
    debug_assert!(!disk_id.is_empty() && disk_id.len() <= MAX_NAME_LEN);
    let start = out.len();
    out.extend_from_slice(&(batch_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&time_unix_ms.to_le_bytes());
    out.extend_from_slice(&(disk_id.len() as u16).to_le_bytes());
    out.extend_from_slice(disk_id.as_bytes());
    put(out);
    // The length field was written first: what `put` appended must match it exactly.
    assert_eq!(
        out.len() - start,
        record_len(disk_id, batch_len),
        "record payload length"
    );
    let crc = record_crc(segment_seq, &out[start..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// CRC of an encoded record (its `crc` field is skipped).
fn record_crc(segment_seq: u64, rec: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(crc_seed(segment_seq));
    h.update(&rec[0..4]);
    h.update(&rec[8..]);
    h.finalize()
}

/// One record that passed its checks. `batch` indexes the buffer given to [`decode_record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub disk_id: &'a str,
    pub seq: u64,
    pub time_unix_ms: i64,
    pub batch: Range<usize>,
    /// Bytes of the whole record, header included.
    pub total_len: usize,
}

/// What lies at an offset of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    Record(Record<'a>),
    /// Nothing more: end of the buffer, or a zero header.
    End,
    /// Not a valid record. `total_len` is the length its header claims when that length is
    /// plausible and fits in the buffer (so the scan can test whether a valid record follows);
    /// `disk_hint` the disk id its header names, when readable (it may be wrong).
    Bad {
        total_len: Option<usize>,
        disk_hint: Option<String>,
    },
}

/// Decodes the record at the start of `buf` (a slice of segment `segment_seq` from a record
/// boundary to the end of the valid data).
pub fn decode_record(segment_seq: u64, buf: &[u8]) -> Decoded<'_> {
    if buf.is_empty() {
        return Decoded::End;
    }
    if buf.len() < RECORD_FIXED_LEN {
        if buf.iter().all(|&b| b == 0) {
            return Decoded::End;
        }
        return Decoded::Bad {
            total_len: None,
            disk_hint: None,
        };
    }
    let len = u32_at(buf, 0) as usize;
    let id_len = u16::from_le_bytes([buf[24], buf[25]]) as usize;
    if len == 0 && buf[..RECORD_FIXED_LEN].iter().all(|&b| b == 0) {
        return Decoded::End;
    }
    let total = RECORD_FIXED_LEN + id_len + len;
    let plausible = (1..=MAX_BATCH_BYTES).contains(&len) && (1..=MAX_NAME_LEN).contains(&id_len);
    let disk_hint = buf
        .get(RECORD_FIXED_LEN..RECORD_FIXED_LEN + id_len)
        .filter(|_| plausible)
        .and_then(|b| std::str::from_utf8(b).ok())
        .filter(|s| protocol::disk::is_safe_name(s))
        .map(str::to_string);
    if !plausible || total > buf.len() {
        return Decoded::Bad {
            total_len: None,
            disk_hint,
        };
    }
    let rec = &buf[..total];
    if u32_at(rec, 4) != record_crc(segment_seq, rec) {
        return Decoded::Bad {
            total_len: Some(total),
            disk_hint,
        };
    }
    let Ok(disk_id) = std::str::from_utf8(&rec[RECORD_FIXED_LEN..RECORD_FIXED_LEN + id_len]) else {
        // A checksummed record with a non-UTF-8 id was never written by us.
        return Decoded::Bad {
            total_len: Some(total),
            disk_hint: None,
        };
    };
    Decoded::Record(Record {
        disk_id,
        seq: u64::from_le_bytes(rec[8..16].try_into().expect("8 bytes")),
        time_unix_ms: i64::from_le_bytes(rec[16..24].try_into().expect("8 bytes")),
        batch: RECORD_FIXED_LEN + id_len..total,
        total_len: total,
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one(seg: u64, disk: &str, seq: u64, batch: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_record(&mut v, seg, disk, seq, 1234, batch);
        v
    }

    #[test]
    fn header_round_trips_and_rejects_another_seq() {
        let h = encode_header(7);
        assert_eq!(decode_header(&h, 7), Ok(7));
        assert_eq!(
            decode_header(&h, 8),
            Err(SegmentError::SeqMismatch {
                expected: 8,
                found: 7
            })
        );
        let mut bad = h;
        bad[17] ^= 1;
        assert_eq!(decode_header(&bad, 7), Err(SegmentError::HeaderCrc));
    }

    #[test]
    fn file_names_sort_and_parse() {
        assert_eq!(file_name(42), "0000000000000042.seg");
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert_eq!(parse_file_name("42.seg"), None);
        assert_eq!(parse_file_name("registry"), None);
    }

    #[test]
    fn stale_record_from_another_segment_is_refused() {
        let rec = one(3, "disk-a", 9, b"batch bytes");
        assert!(matches!(decode_record(3, &rec), Decoded::Record(_)));
        assert!(matches!(
            decode_record(4, &rec),
            Decoded::Bad {
                total_len: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn zero_header_is_end_of_log() {
        assert_eq!(decode_record(1, &[0u8; 64]), Decoded::End);
        assert_eq!(decode_record(1, &[]), Decoded::End);
    }

    proptest! {
        #[test]
        fn record_round_trips(seg in 0u64..u64::MAX, seq in 1u64..i64::MAX as u64,
                              disk in "[a-z0-9]{1,20}",
                              batch in proptest::collection::vec(any::<u8>(), 1..2048)) {
            let rec = one(seg, &disk, seq, &batch);
            match decode_record(seg, &rec) {
                Decoded::Record(r) => {
                    prop_assert_eq!(r.disk_id, disk.as_str());
                    prop_assert_eq!(r.seq, seq);
                    prop_assert_eq!(r.time_unix_ms, 1234);
                    prop_assert_eq!(&rec[r.batch.clone()], &batch[..]);
                    prop_assert_eq!(r.total_len, rec.len());
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn every_torn_tail_is_rejected(batch in proptest::collection::vec(any::<u8>(), 1..512),
                                       cut in 0.0f64..1.0) {
            let rec = one(5, "d", 1, &batch);
            let keep = ((rec.len() as f64) * cut) as usize;
            prop_assume!(keep < rec.len());
            let torn = &rec[..keep];
            prop_assert!(!matches!(decode_record(5, torn), Decoded::Record(_)));
        }

        #[test]
        fn every_bit_flip_is_rejected(batch in proptest::collection::vec(any::<u8>(), 1..512),
                                      pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut rec = one(5, "disk", 3, &batch);
            let i = pos.index(rec.len());
            rec[i] ^= 1 << bit;
            prop_assert!(!matches!(decode_record(5, &rec), Decoded::Record(_)));
        }
    }
}
