//! Which filesystem a host file lies on, for what the kernel lets the VMM
//! do with its pages: userfaultfd registers on a private mapping of a
//! tmpfs file (not of a disk filesystem's), and a device may pin pages for
//! long (`FOLL_LONGTERM`, as io_uring's fixed buffers do) in tmpfs and
//! hugetlbfs files only.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The filesystem magic `statfs` fills in through `query`, if it succeeds.
fn fs_magic(query: impl FnOnce(&mut libc::statfs) -> libc::c_int) -> Option<i64> {
    // SAFETY: `statfs` is plain integers: all zeros is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (query(&mut st) == 0).then_some(st.f_type as i64)
}

/// True when `path` lies on a tmpfs.
pub fn on_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path and a buffer `fs_magic` owns.
    fs_magic(|st| unsafe { libc::statfs(c.as_ptr(), st) }) == Some(TMPFS_MAGIC)
}

/// True when the kernel lets a device pin `file`'s pages for long: it
/// lies on tmpfs or hugetlbfs (a disk filesystem's page cache it refuses).
pub fn lets_devices_pin(file: &File) -> bool {
    // SAFETY: a descriptor we hold open and a buffer `fs_magic` owns.
    let magic = fs_magic(|st| unsafe { libc::fstatfs(file.as_raw_fd(), st) });
    matches!(magic, Some(TMPFS_MAGIC | HUGETLBFS_MAGIC))
}
