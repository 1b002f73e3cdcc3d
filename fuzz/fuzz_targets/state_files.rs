//! The state files read at start-up: the master target's per-disk state and the process
//! server's disk registry. Arbitrary bytes give an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use master_target::state::DiskState;
use process_server::registry::{FILE_NAME, Registry};

fuzz_target!(|data: &[u8]| {
    let _ = DiskState::decode(data);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FILE_NAME), data).unwrap();
    let _ = Registry::new(dir.path()).load();
});
