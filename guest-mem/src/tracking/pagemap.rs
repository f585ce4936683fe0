//! The `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` (Linux 6.7+): find the
//! pages of a range in given categories, optionally write-protecting them
//! again in the same call.

use std::fs::File;
use std::os::fd::AsRawFd;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

/// Re-protect the matched pages (uffd-wp) in the same walk.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail unless the range is registered with `WP_ASYNC`.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// Category: written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// Category: soft-dirty.
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`: `[start, end)` with its categories.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// Categories (masked by the return mask).
    pub categories: u64,
}

ioctl_iowr_nr!(PAGEMAP_SCAN, 0x66, 16, PmScanArg);

/// An open `/proc/self/pagemap`.
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens this process's pagemap.
    pub fn open() -> std::io::Result<Pagemap> {
        Ok(Pagemap {
            file: File::open("/proc/self/pagemap")?,
        })
    }

    /// Scans host range `[start, end)` for pages in `category`; with `flags`
    /// containing [`PM_SCAN_WP_MATCHING`] it re-protects them. Calls `found`
    /// for every returned region.
    ///
    /// Resumption follows the `walk_end` rule seen on 6.18: `walk_end` may
    /// report an intermediate address although the walk finished, so the
    /// scan resumes only when the output vector came back full, and never
    /// past the end of the last region returned.
    pub fn scan(
        &self,
        start: u64,
        end: u64,
        flags: u64,
        category: u64,
        mut found: impl FnMut(PageRegion),
    ) -> std::io::Result<()> {
        const VEC_LEN: usize = 512;
        let mut vec = vec![PageRegion::default(); VEC_LEN];
        let mut cur = start;
        while cur < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags,
                start: cur,
                end,
                vec: vec.as_mut_ptr() as u64,
                vec_len: VEC_LEN as u64,
                category_mask: category,
                return_mask: category,
                ..Default::default()
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
            // page_region entries into `vec`, which holds that many.
            let n = unsafe { ioctl_with_mut_ref(&self.file, PAGEMAP_SCAN(), &mut arg) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = n as usize;
            for r in &vec[..n.min(VEC_LEN)] {
                found(*r);
            }
            if n < VEC_LEN {
                return Ok(());
            }
            // Full vector: resume where the walk says it stopped, but never
            // before the end of the last region returned.
            let last_end = vec[VEC_LEN - 1].end;
            let next = arg.walk_end.max(last_end);
            if next <= cur {
                return Ok(());
            }
            cur = next;
        }
        Ok(())
    }
}

impl AsRawFd for Pagemap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}
