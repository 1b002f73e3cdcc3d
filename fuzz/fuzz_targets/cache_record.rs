//! The process server's cache segment header and record decoders on arbitrary bytes (what a
//! torn or corrupted cache volume holds): a verdict, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use process_server::cache::segment::{Decoded, Record, decode_header, decode_record};

fuzz_target!(|data: &[u8]| {
    let _ = decode_header(data, 1);
    let mut at = 0;
    // Walk the bytes as a segment body, as recovery does, a bounded number of steps.
    for _ in 0..64 {
        if at >= data.len() {
            break;
        }
        match decode_record(1, &data[at..]) {
            Decoded::Record(Record { total_len, .. }) => at += total_len,
            _ => break,
        }
    }
});
