//! The VMDK descriptor parser on arbitrary bytes (a descriptor file, or the one embedded in
//! a sparse image): a descriptor or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use master_target::vmdk::descriptor::Descriptor;

fuzz_target!(|data: &[u8]| {
    let _ = Descriptor::parse(data);
});
