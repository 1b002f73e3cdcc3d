//! Helpers for the tests of the crates built on this one (feature `testing`, turned on only
//! by their dev-dependencies).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A size-limited tmpfs (a small volume to fill up), lazily unmounted on drop. Needs root.
///
/// Mounted with mount(2) and unmounted with umount2(2) themselves: forking mount(8) would give
/// the child, until it execs, a copy of every descriptor of the test process, and with them
/// the locks of the files other tests are closing and reopening, which then look taken.
#[derive(Debug)]
pub struct Tmpfs(CString);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (bytes, or with a k/m/g suffix) on the directory `dir`.
    pub fn mount(dir: &Path, size: &str) -> io::Result<Tmpfs> {
        let target = CString::new(dir.as_os_str().as_bytes())?;
        let opts = CString::new(format!("size={size}"))?;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Tmpfs(target))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
    }
}
