//! The batch decoder on arbitrary bytes: prost decoding, then every check and the
//! decompression. It must never panic, allocate beyond the caps, or accept a batch whose
//! decompressed data fails its CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use protocol::pb::Batch;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = Batch::decode(data) {
        let mut buf = Vec::new();
        if let Ok(decoded) = protocol::batch::decode_into(&batch, 1 << 40, &mut buf) {
            assert_eq!(decoded.data.len(), batch.data_len as usize);
            assert_eq!(decoded.writes().count(), batch.writes.len());
        }
    }
});
