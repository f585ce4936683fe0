//! Copy-before-write for live snapshots.
//!
//! The snapshot's content is guest memory at the moment the vCPUs are
//! paused. From then on each page populated at that moment is copied to the
//! snapshot file exactly once — by the background writer, or by the fault
//! engine when a write-protect fault hits it first (copy, then un-protect).
//! Both claim a page by setting its "copied" bit while holding the page's
//! region lock, so the page cannot change between the claim and the copy.
//! Pages populated after the freeze are marked "born" by the fault engine
//! and never copied (they were zero, a hole). Nothing in the pause walks
//! the pages: its cost does not grow with memory size.

use crate::entry::PAGE_SIZE;
use crate::sync::LockOrRecover;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A page's contribution to its 2 MiB chunk's checksum (the snapshot format
/// decides; the sum over a chunk's pages is order-independent).
pub type PageSum = fn(u64, &[u8]) -> u32;

/// Bytes covered by one checksum chunk (the snapshot format's chunk).
pub const CHUNK_BYTES: u64 = 2 << 20;

/// The copy-before-write state of one live snapshot.
#[derive(Debug)]
pub struct LiveCopy {
    file: File,
    page_sum: PageSum,
    sums: Vec<std::sync::atomic::AtomicU32>,
    /// Pages copied (by the writer or a fault).
    copied: Vec<AtomicU64>,
    /// Pages populated after the freeze (not part of the snapshot).
    born: Vec<AtomicU64>,
    pub(crate) by_faults: AtomicU64,
    pub(crate) by_writer: AtomicU64,
    pub(crate) stored: AtomicU64,
    error: Mutex<Option<String>>,
}

/// What a live copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveCopyStats {
    /// Pages copied by write faults (before the write went ahead).
    pub by_faults: u64,
    /// Pages copied by the background writer.
    pub by_writer: u64,
    /// Non-zero pages stored in the file.
    pub stored: u64,
}

impl LiveCopy {
    pub(crate) fn new(file: File, ram_pages: u64, page_sum: PageSum) -> LiveCopy {
        let bits = || {
            (0..ram_pages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        };
        let chunks = (ram_pages * PAGE_SIZE).div_ceil(CHUNK_BYTES);
        LiveCopy {
            file,
            page_sum,
            sums: (0..chunks)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            copied: bits(),
            born: bits(),
            by_faults: AtomicU64::new(0),
            by_writer: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            error: Mutex::new(None),
        }
    }

    /// Records that `page` was populated after the freeze: its content is
    /// not part of the snapshot (it was zero then).
    pub(crate) fn mark_born(&self, page: u64) {
        if let Some(w) = self.born.get((page / 64) as usize) {
            w.fetch_or(1 << (page % 64), Ordering::AcqRel);
        }
    }

    /// Claims page `page` for copying: true if it belongs to the snapshot
    /// (populated before the freeze) and nobody copied it yet. The caller
    /// holds the page's region lock.
    pub(crate) fn claim(&self, page: u64) -> bool {
        let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        if self
            .born
            .get(w)
            .is_none_or(|b| b.load(Ordering::Acquire) & bit != 0)
        {
            return false;
        }
        self.copied
            .get(w)
            .is_some_and(|c| c.fetch_or(bit, Ordering::AcqRel) & bit == 0)
    }

    /// Copies the page at host address `host` (guest page `page`) into the
    /// file, unless it is all zeros (a hole). The page is present, so
    /// reading it cannot fault into the userfaultfd; the caller holds its
    /// region lock.
    pub(crate) fn copy(&self, page: u64, host: u64) {
        let mut buf = [0u8; PAGE_SIZE as usize];
        read_run(host, &mut buf);
        self.store(page, &buf);
    }

    /// Stores the frozen content `bytes` of consecutive claimed pages from
    /// guest page `page`: each run of non-zero pages with one `pwrite`
    /// (zero pages stay holes), each page summed into its chunk. Needs no
    /// lock: the content was read while the pages were still protected and
    /// their claim makes this the only copy that writes them.
    pub(crate) fn store(&self, page: u64, bytes: &[u8]) {
        let pages: Vec<&[u8]> = bytes.chunks(PAGE_SIZE as usize).collect();
        let mut i = 0;
        while i < pages.len() {
            if is_zero(pages[i]) {
                i += 1;
                continue;
            }
            let first = i;
            while i < pages.len() && !is_zero(pages[i]) {
                let p = page + i as u64;
                if let Some(s) = self.sums.get((p * PAGE_SIZE / CHUNK_BYTES) as usize) {
                    s.fetch_add((self.page_sum)(p, pages[i]), Ordering::Relaxed);
                }
                i += 1;
            }
            let run = &bytes[first * PAGE_SIZE as usize..i * PAGE_SIZE as usize];
            match self
                .file
                .write_all_at(run, (page + first as u64) * PAGE_SIZE)
            {
                Ok(()) => {
                    self.stored.fetch_add((i - first) as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    let mut err = self.error.lock_or_recover();
                    err.get_or_insert_with(|| {
                        format!(
                            "writing page {:#x} to the snapshot: {e}",
                            (page + first as u64) * PAGE_SIZE
                        )
                    });
                }
            }
        }
    }

    /// The chunk checksums of everything copied (complete once the copy is).
    pub fn chunk_sums(&self) -> Vec<u32> {
        self.sums
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .collect()
    }

    /// The first error any copy hit.
    pub fn error(&self) -> Option<String> {
        self.error.lock_or_recover().clone()
    }

    /// Counters so far.
    pub fn stats(&self) -> LiveCopyStats {
        LiveCopyStats {
            by_faults: self.by_faults.load(Ordering::Relaxed),
            by_writer: self.by_writer.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
        }
    }
}

/// Reads the present pages at host address `host` into `buf` (its length
/// says how many bytes). A user-space copy into a hot buffer, then
/// `pwrite` from it, beat `pwrite` straight from guest memory (the kernel
/// copying from cold, 4 KiB-mapped pages) by 1.5x at 1 GiB here (see
/// docs/benchmarks.md), and it lets the background writer drop the region
/// lock before the `pwrite`.
pub(crate) fn read_run(host: u64, buf: &mut [u8]) {
    // SAFETY: the caller passes present pages of a live region mapping,
    // still write-protected (nobody copied them yet, so no fault
    // un-protected them), and holds their region lock: their content
    // cannot change while it is read.
    let src = unsafe { std::slice::from_raw_parts(host as *const u8, buf.len()) };
    buf.copy_from_slice(src);
}

/// True when every byte of `page` is zero (such pages are holes in a
/// snapshot file).
pub fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use crate::entry::PAGE_SIZE;
    use crate::ram::{GuestRam, RamConfig};
    use crate::region::BackingKind;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn the_file_holds_the_frozen_content_while_writers_run() {
        for backing in [BackingKind::Memfd, BackingKind::Anon] {
            let ram = Arc::new(
                GuestRam::new(
                    8 << 20,
                    RamConfig {
                        backing,
                        ..RamConfig::default()
                    },
                )
                .expect("ram"),
            );
            let pages = 1024u64;
            let put = |ram: &GuestRam, p: u64, v: u64| {
                let a = ram.host_addr() + p * PAGE_SIZE;
                // SAFETY: inside the live mapping of `ram`.
                unsafe { (a as *mut u64).write_volatile(v) };
            };
            for p in 0..pages {
                put(&ram, p, p + 1);
            }
            ram.live_protect().expect("protect");
            // Writes between protecting and freezing are part of the snapshot.
            for p in (0..pages).step_by(10) {
                put(&ram, p, 10_000 + p);
            }
            let path = std::env::temp_dir()
                .join(format!("vmm-live-copy-{}-{backing:?}", std::process::id()));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .expect("file");
            file.set_len(8 << 20).expect("len");
            let sum: super::PageSum = |p, c| (p as u32).wrapping_add(c[0] as u32);
            let lc = ram
                .live_freeze(file.try_clone().expect("clone"), sum)
                .expect("freeze");
            // After the freeze a writer overwrites the first half (each
            // first write faults and is copied first), then races the
            // background copy over the rest.
            let half_done = Arc::new(AtomicBool::new(false));
            let writer = {
                let (ram, half_done) = (ram.clone(), half_done.clone());
                std::thread::spawn(move || {
                    for p in (0..pages / 2).chain((pages / 2..pages).rev()) {
                        let a = ram.host_addr() + p * PAGE_SIZE;
                        // SAFETY: inside the live mapping.
                        unsafe { (a as *mut u64).write_volatile(99_999) };
                        if p == pages / 2 - 1 {
                            half_done.store(true, Ordering::Release);
                        }
                    }
                })
            };
            while !half_done.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            ram.live_write_all(&lc);
            writer.join().expect("writer");
            ram.live_finish().expect("finish");
            let s = lc.stats();
            assert_eq!(s.by_faults + s.by_writer, pages, "{s:?}");
            assert!(
                s.by_faults >= pages / 2,
                "the fault path was not exercised: {s:?}"
            );
            assert!(lc.error().is_none());
            // The chunk sums cover every stored page, whichever copied it.
            let want: u32 = (0..pages).fold(0u32, |acc, p| {
                let mut b = [0u8; 1];
                file.read_exact_at(&mut b, p * PAGE_SIZE).expect("read");
                acc.wrapping_add(sum(p, &b))
            });
            assert_eq!(
                lc.chunk_sums().iter().fold(0u32, |a, s| a.wrapping_add(*s)),
                want
            );
            for p in 0..pages {
                let mut b = [0u8; 8];
                file.read_exact_at(&mut b, p * PAGE_SIZE).expect("read");
                let want = if p % 10 == 0 { 10_000 + p } else { p + 1 };
                assert_eq!(u64::from_le_bytes(b), want, "{backing:?} page {p} ({s:?})");
            }
            // The writer's later writes went ahead: protection is gone.
            put(&ram, 5, 5);
            let _ = std::fs::remove_file(path);
        }
    }
}
