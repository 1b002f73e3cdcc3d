//! Checks on a disk declaration (`DiskInfo`) from a peer.

use crate::error::{Code, Refusal};
use crate::limits::{MAX_CAPACITY, MAX_NAME_LEN, SECTOR};
use crate::pb::{DiskFormat, DiskInfo};

/// Whether `s` is a safe identifier: 1..=128 of `[A-Za-z0-9._:-]`, not starting with '.'
/// (so it can never be a path component like `..`).
pub fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && !s.starts_with('.')
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b':'))
}

/// Refuses a declaration with an unsafe id or name, a capacity that is zero, not a multiple
/// of 512 or above the 64 TiB limit, or an unknown format.
pub fn check_disk_info(d: &DiskInfo) -> Result<(), Refusal> {
    let refuse = |m: String| Err(Refusal::for_disk(Code::BadRequest, &d.disk_id, m));
    if !is_safe_name(&d.disk_id) {
        return refuse(format!(
            "disk id '{}' must be 1..={MAX_NAME_LEN} of [A-Za-z0-9._:-]",
            d.disk_id.escape_debug()
        ));
    }
    if !is_safe_name(&d.name) || d.name.contains(':') {
        return refuse(format!(
            "disk name '{}' must be 1..={MAX_NAME_LEN} of [A-Za-z0-9._-]",
            d.name.escape_debug()
        ));
    }
    if d.capacity == 0 || !d.capacity.is_multiple_of(SECTOR) || d.capacity > MAX_CAPACITY {
        return refuse(format!(
            "disk capacity {} must be a nonzero multiple of {SECTOR} bytes and at most {MAX_CAPACITY}",
            d.capacity
        ));
    }
    if DiskFormat::try_from(d.format).is_err() {
        return refuse(format!("unknown disk format {}", d.format));
    }
    if !d.group.is_empty() && !is_safe_name(&d.group) {
        return refuse(format!(
            "group '{}' must be 1..={MAX_NAME_LEN} of [A-Za-z0-9._:-]",
            d.group.escape_debug()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_leave_the_datastore_are_refused() {
        for bad in ["..", "../x", "/etc/passwd", "a/b", "", ".hidden", "a b"] {
            assert!(!is_safe_name(bad), "{bad}");
        }
        assert!(is_safe_name("6000C29a-1234.disk_0"));
    }

    #[test]
    fn capacity_must_be_whole_sectors() {
        let mut d = DiskInfo {
            disk_id: "d".into(),
            name: "n".into(),
            capacity: 1000,
            format: 0,
            group: String::new(),
        };
        assert!(check_disk_info(&d).is_err());
        d.capacity = 1024;
        assert!(check_disk_info(&d).is_ok());
    }
}
