//! The retention journal reader over a segment file of arbitrary bytes: it must refuse or
//! truncate, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use master_target::retention::journal::{History, journal_dir};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let journal = journal_dir(dir.path(), "fuzz");
    std::fs::create_dir_all(&journal).unwrap();
    std::fs::write(journal.join(format!("{:016x}.seg", 1)), data).unwrap();
    let _ = History::read(dir.path(), "fuzz");
});
