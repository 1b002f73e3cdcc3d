//! The monolithicSparse header parser, then the sparse reader (grain directory and grain
//! tables) over an image made of arbitrary bytes: errors, never a panic or an out-of-range
//! read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use master_target::vmdk::sparse::{Header, SparseReader};

fuzz_target!(|data: &[u8]| {
    let _ = Header::parse(data);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.vmdk");
    std::fs::write(&path, data).unwrap();
    if let Ok(reader) = SparseReader::open(&path) {
        let mut buf = vec![0u8; 4096];
        for offset in [0u64, 65536, 1 << 20] {
            let _ = reader.read_at(&mut buf, offset);
        }
    }
});
