//! Which guest pages a VM shares with others and which are its own: the
//! kernel knows (a private mapping of an image file keeps the page cache's
//! page until the guest writes it, then the kernel gives this VM an
//! anonymous copy), so the table learns it from `/proc/self/pagemap`
//! instead of taking a fault on every first write.

use crate::entry::{Flag, PAGE_SIZE};
use crate::ram::{GuestRam, RamError};
use std::os::unix::fs::FileExt;

/// pagemap: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// pagemap: a file page or shared anonymous memory (not a private copy).
const PM_FILE: u64 = 1 << 61;
/// pagemap: the page frame number (visible with CAP_SYS_ADMIN, else 0).
const PM_PFN: u64 = (1 << 55) - 1;

/// The frame number of the kernel's shared zero page, found by reading a
/// fresh private anonymous page and looking it up; `None` when page frame
/// numbers are hidden (no CAP_SYS_ADMIN).
fn zero_pfn(pagemap: &std::fs::File) -> Option<u64> {
    // SAFETY: a new private anonymous page at an address the kernel picks,
    // read once and unmapped below; nothing else refers to it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return None;
        }
        std::ptr::read_volatile(p as *const u8);
        let mut w = [0u8; 8];
        let ok = pagemap
            .read_exact_at(&mut w, p as u64 / PAGE_SIZE * 8)
            .is_ok();
        libc::munmap(p, PAGE_SIZE as usize);
        let pfn = u64::from_le_bytes(w) & PM_PFN;
        (ok && pfn != 0).then_some(pfn)
    }
}

/// How a VM's mapped guest pages are shared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharingStats {
    /// Pages mapped from a shared source (the image's page cache, a
    /// shared memfd): the guest has not written them.
    pub shared_pages: u64,
    /// Pages that are this VM's own (written, or populated privately).
    pub exclusive_pages: u64,
    /// Pages mapped to the host's shared zero page (read, never written):
    /// they cost nothing.
    pub zero_pages: u64,
}

impl GuestRam {
    /// Reads the kernel's page map of guest RAM and records in the table,
    /// for every page the host has mapped, whether it is shared
    /// ([`Flag::CowShared`]) or this VM's own ([`Flag::Exclusive`]).
    /// Pages the guest never touched are not mapped and count as neither;
    /// pages mapped to the shared zero page are counted apart.
    pub fn refresh_sharing(&self) -> Result<SharingStats, RamError> {
        self.scan_sharing(None)
    }

    /// The guest-physical addresses of the pages that are this VM's own
    /// (as [`GuestRam::refresh_sharing`] counts them), in order; the table
    /// is refreshed on the way.
    pub fn own_pages(&self) -> Result<Vec<u64>, RamError> {
        let mut own = Vec::new();
        self.scan_sharing(Some(&mut own))?;
        Ok(own)
    }

    fn scan_sharing(&self, mut own: Option<&mut Vec<u64>>) -> Result<SharingStats, RamError> {
        let pagemap = std::fs::File::open("/proc/self/pagemap")
            .map_err(|e| RamError::Describe(format!("/proc/self/pagemap: {e}")))?;
        let mut stats = SharingStats::default();
        let zero = zero_pfn(&pagemap);
        let mut buf = Vec::new();
        for region in self.regions() {
            let image = region.mapping.is_private_image();
            // One read per 2 MiB of guest memory (512 entries).
            let mut gpa = region.gpa;
            let end = region.gpa + region.size;
            while gpa < end {
                let n = ((end - gpa) / PAGE_SIZE).min(512);
                buf.resize(n as usize * 8, 0);
                let at = region.host_of(gpa) / PAGE_SIZE * 8;
                pagemap
                    .read_exact_at(&mut buf, at)
                    .map_err(|e| RamError::Describe(format!("reading /proc/self/pagemap: {e}")))?;
                for (i, word) in buf.chunks_exact(8).enumerate() {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(word);
                    let pm = u64::from_le_bytes(w);
                    if pm & PM_PRESENT == 0 {
                        continue;
                    }
                    let page_gpa = gpa + i as u64 * PAGE_SIZE;
                    if zero.is_some_and(|z| pm & PM_PFN == z) {
                        stats.zero_pages += 1;
                        continue;
                    }
                    // A VM's own memfd is a file too, but nobody else
                    // maps it: only an image's pages are shared, and a
                    // pinned page is never shared (a fork copied it). A
                    // shared region's pages always are (the host's file).
                    let shared = region.flags.shared
                        || image
                            && pm & PM_FILE != 0
                            && !self.core.pins.is_pinned(page_gpa / PAGE_SIZE);
                    if shared {
                        stats.shared_pages += 1;
                    } else {
                        stats.exclusive_pages += 1;
                        if let Some(own) = own.as_deref_mut() {
                            own.push(page_gpa);
                        }
                    }
                    let _ = self.core.table.update(page_gpa, |e| {
                        e.is_present().then(|| {
                            if shared {
                                e.with(Flag::CowShared).without(Flag::Exclusive)
                            } else {
                                e.with(Flag::Exclusive).without(Flag::CowShared)
                            }
                        })
                    });
                }
                gpa += n * PAGE_SIZE;
            }
        }
        Ok(stats)
    }
}
