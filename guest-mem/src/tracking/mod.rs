//! Dirty-page tracking primitives of the memory layer (no KVM here):
//! userfaultfd write-protect, synchronous and asynchronous (`WP_ASYNC` with
//! `PAGEMAP_SCAN`), soft-dirty detection, and the log of writes the VMM
//! itself makes into guest RAM. The `vmm` crate puts these and KVM's dirty
//! log and ring behind one tracker interface.

pub mod pagemap;
pub mod soft_dirty;

use crate::core::WpMode;
use crate::entry::{Entry, Flag, PAGE_SIZE};
use crate::ram::GuestRam;
use crate::sync::LockOrRecover;
use crate::table::{WalkAction, Walker, LEAF_TABLE_SPAN};
use crate::uffd::UffdError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Tracking errors.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// The backing has no fault engine (`plain`).
    #[error("{0} needs the fault engine's userfaultfd: use --backing memfd or anon")]
    NoFaultEngine(&'static str),
    /// The userfaultfd was not opened in the mode this tracker needs.
    #[error("{tracker} needs a userfaultfd opened {needed}")]
    WrongMode {
        /// The tracker.
        tracker: &'static str,
        /// What it needs.
        needed: &'static str,
    },
    /// A userfaultfd ioctl failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// `PAGEMAP_SCAN` failed.
    #[error("PAGEMAP_SCAN failed: {0}")]
    PagemapScan(std::io::Error),
    /// Soft-dirty is not available.
    #[error(
        "soft-dirty tracking is not available: this kernel was built without CONFIG_MEM_SOFT_DIRTY \
         (pagemap bit 55 never sets); pick another --track backend"
    )]
    SoftDirtyUnsupported,
    /// `/proc` access failed.
    #[error("soft-dirty: {0}")]
    Proc(std::io::Error),
    /// A live snapshot is still being written.
    #[error("a live snapshot is still being written; take the next one when it is done")]
    LiveSnapshotBusy,
}

/// The guest pages the VMM itself wrote (device emulation, host-side
/// writes), which KVM's dirty log never sees. VMM writes are rare next to
/// guest writes, so the log is a list of page numbers (deduplicated when
/// taken), not a bitmap over all of RAM: it costs what the VMM wrote.
#[derive(Debug, Default)]
pub struct HostDirtyLog {
    enabled: AtomicBool,
    pages: Mutex<Vec<u64>>,
}

impl HostDirtyLog {
    /// An empty log, off.
    pub fn new() -> HostDirtyLog {
        HostDirtyLog::default()
    }

    /// Turns logging on or off.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
    }

    /// Records a write of `len` bytes at guest-physical `gpa`.
    pub fn mark(&self, gpa: u64, len: u64) {
        if !self.enabled.load(Ordering::Acquire) || len == 0 {
            return;
        }
        let mut pages = self.pages.lock_or_recover();
        for page in gpa / PAGE_SIZE..=(gpa + len - 1) / PAGE_SIZE {
            if pages.last() != Some(&page) {
                pages.push(page);
            }
        }
    }

    /// Takes (and clears) the logged page numbers, sorted and unique.
    pub fn take(&self) -> Vec<u64> {
        let mut out = std::mem::take(&mut *self.pages.lock_or_recover());
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Bytes the log occupies now.
    pub fn bytes(&self) -> u64 {
        self.pages.lock_or_recover().capacity() as u64 * 8
    }
}

/// Collects pages whose entries match a predicate.
struct Collect<F: Fn(Entry) -> bool>(Vec<u64>, F);

impl<F: Fn(Entry) -> bool> Walker for Collect<F> {
    fn leaf(&mut self, gpa: u64, e: Entry) -> WalkAction {
        if (self.1)(e) {
            self.0.push(gpa);
        }
        WalkAction::Continue
    }
}

/// Coalesces sorted page addresses into `[start, end)` runs.
pub fn runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((_, end)) if *end == p => *end += PAGE_SIZE,
            _ => out.push((p, p + PAGE_SIZE)),
        }
    }
    out
}

impl GuestRam {
    /// The log of the VMM's own writes.
    pub fn host_dirty(&self) -> &HostDirtyLog {
        &self.host_dirty
    }

    /// True when the userfaultfd was opened with `WP_ASYNC`.
    pub fn wp_async(&self) -> bool {
        self.config().wp_async
    }

    /// Starts write-protect tracking on every fault-engine region: from now
    /// on the engine installs pages protected, and every populated page is
    /// protected now (unpopulated ones too where `WP_UNPOPULATED` exists).
    pub fn start_wp_tracking(&self) -> Result<(), TrackError> {
        if self.core.uffd.is_none() {
            return Err(TrackError::NoFaultEngine("write-protect tracking"));
        }
        let mode = if self.wp_async() {
            WpMode::Async
        } else {
            WpMode::Sync
        };
        self.core.wp_mode.store(mode as u8, Ordering::Release);
        self.protect_all()
    }

    /// Write-protects every fault-engine region (`WP_UNPOPULATED`: no page
    /// is faulted in to be protected) and records it in the table.
    pub(crate) fn protect_all(&self) -> Result<(), TrackError> {
        let uffd = self
            .core
            .uffd
            .as_ref()
            .ok_or(TrackError::NoFaultEngine("write-protect tracking"))?;
        for r in self.engine_regions() {
            let _g = r.lock.lock_or_recover();
            uffd.write_protect(r.host_start(), r.size, true)?;
            let mut c = Collect(Vec::new(), |e: Entry| e.is_present() && !e.is_uffd_wp());
            self.core.table.walk_range(r.gpa, r.gpa + r.size, &mut c);
            for gpa in c.0 {
                let _ = self.core.table.update(gpa, |e| Some(e.write_protected()));
            }
        }
        Ok(())
    }

    /// Stops write-protect tracking: un-protects everything.
    pub fn stop_wp_tracking(&self) -> Result<(), TrackError> {
        let Some(uffd) = self.core.uffd.as_ref() else {
            return Ok(());
        };
        self.core
            .wp_mode
            .store(WpMode::Off as u8, Ordering::Release);
        for r in self.engine_regions() {
            let _g = r.lock.lock_or_recover();
            uffd.write_protect(r.host_start(), r.size, false)?;
            let mut c = Collect(Vec::new(), |e: Entry| e.is_uffd_wp());
            self.core.table.walk_range(r.gpa, r.gpa + r.size, &mut c);
            let writable = !r.flags.read_only;
            for gpa in c.0 {
                let _ = self
                    .core
                    .table
                    .update(gpa, |e| Some(e.write_unprotected(writable)));
            }
        }
        Ok(())
    }

    /// Live snapshot, step 1 (guest running): write-protect all of guest
    /// RAM; pages that become writable meanwhile (written, or populated) are
    /// remembered for [`GuestRam::live_freeze`].
    pub fn live_protect(&self) -> Result<(), TrackError> {
        if self.wp_async() {
            return Err(TrackError::WrongMode {
                tracker: "a live snapshot",
                needed: "without WP_ASYNC (synchronous write-protect)",
            });
        }
        {
            let mut window = self.core.live_window.lock_or_recover();
            if window.is_some() || self.core.live_copy.load().is_some() {
                return Err(TrackError::LiveSnapshotBusy);
            }
            *window = Some(Vec::new());
        }
        let r = self.protect_all();
        if r.is_err() {
            *self.core.live_window.lock_or_recover() = None;
        }
        r
    }

    /// Live snapshot, step 2 (vCPUs paused): protects again only the pages
    /// that became writable since [`GuestRam::live_protect`], then installs
    /// copy-before-write. No walk over all pages: the pause does not grow
    /// with memory size.
    pub fn live_freeze(
        &self,
        file: std::fs::File,
        page_sum: crate::live_copy::PageSum,
    ) -> Result<std::sync::Arc<crate::live_copy::LiveCopy>, TrackError> {
        let uffd = self
            .core
            .uffd
            .as_ref()
            .ok_or(TrackError::NoFaultEngine("a live snapshot"))?;
        let mut window = self
            .core
            .live_window
            .lock_or_recover()
            .take()
            .unwrap_or_default();
        window.sort_unstable();
        window.dedup();
        for r in self.engine_regions() {
            let _g = r.lock.lock_or_recover();
            let mine: Vec<u64> = window
                .iter()
                .copied()
                .filter(|g| r.contains_gpa(*g))
                .collect();
            for (s, e) in runs(&mine) {
                uffd.write_protect(r.host_of(s), e - s, true)?;
            }
            for gpa in mine {
                let _ = self
                    .core
                    .table
                    .update(gpa, |e| e.is_present().then(|| e.write_protected()));
            }
        }
        let lc = std::sync::Arc::new(crate::live_copy::LiveCopy::new(
            file,
            self.size() / PAGE_SIZE,
            page_sum,
        ));
        self.core.live_copy.store(Some(lc.clone()));
        Ok(lc)
    }

    /// Live snapshot, step 3 (guest running): copies every page of the
    /// snapshot not yet copied, a leaf table (512 pages) at a time under
    /// the region's lock, walking only populated tables.
    pub fn live_write_all(&self, lc: &crate::live_copy::LiveCopy) {
        let mut buf = vec![0u8; LEAF_TABLE_SPAN as usize];
        for r in self.engine_regions() {
            let mut start = r.gpa;
            let end = r.gpa + r.size;
            while start < end {
                let stop = ((start / LEAF_TABLE_SPAN + 1) * LEAF_TABLE_SPAN).min(end);
                let mut c = Collect(Vec::new(), |e: Entry| e.is_present());
                self.core.table.walk_range(start, stop, &mut c);
                if !c.0.is_empty() {
                    // Claim and read under the region lock (a write fault
                    // on these pages waits, then finds them claimed); store
                    // after it, so faults wait for a memcpy, not a pwrite.
                    let claimed_runs = {
                        let _g = r.lock.lock_or_recover();
                        let claimed: Vec<u64> =
                            c.0.into_iter()
                                .filter(|gpa| lc.claim(gpa / PAGE_SIZE))
                                .collect();
                        lc.by_writer
                            .fetch_add(claimed.len() as u64, Ordering::Relaxed);
                        let claimed_runs = runs(&claimed);
                        for &(s, e) in &claimed_runs {
                            let at = (s - start) as usize..(e - start) as usize;
                            crate::live_copy::read_run(r.host_of(s), &mut buf[at]);
                        }
                        claimed_runs
                    };
                    for (s, e) in claimed_runs {
                        let at = (s - start) as usize..(e - start) as usize;
                        lc.store(s / PAGE_SIZE, &buf[at]);
                    }
                }
                start = stop;
            }
        }
    }

    /// Live snapshot, step 4 (or abort): copy-before-write off, protection
    /// removed everywhere.
    pub fn live_finish(&self) -> Result<(), TrackError> {
        self.core.live_copy.store(None);
        *self.core.live_window.lock_or_recover() = None;
        self.stop_wp_tracking()
    }

    /// Synchronous write-protect harvest: the pages written since the last
    /// harvest are the present entries the fault engine un-protected. Each
    /// region is re-protected under its lock (faults on it wait), so a write
    /// lands either in this round or, faulting, in the next. Returns guest
    /// page numbers, sorted.
    pub fn harvest_wp_sync(&self) -> Result<Vec<u64>, TrackError> {
        if self.wp_async() {
            return Err(TrackError::WrongMode {
                tracker: "uffd-wp",
                needed: "without WP_ASYNC",
            });
        }
        let uffd = self
            .core
            .uffd
            .as_ref()
            .ok_or(TrackError::NoFaultEngine("uffd-wp"))?;
        let mut out = Vec::new();
        for r in self.engine_regions() {
            let _g = r.lock.lock_or_recover();
            let mut c = Collect(Vec::new(), |e: Entry| e.is_present() && !e.is_uffd_wp());
            self.core.table.walk_range(r.gpa, r.gpa + r.size, &mut c);
            for (s, e) in runs(&c.0) {
                uffd.write_protect(r.host_of(s), e - s, true)?;
            }
            for &gpa in &c.0 {
                let _ = self
                    .core
                    .table
                    .update(gpa, |e| Some(e.with(Flag::Dirty).write_protected()));
                out.push(gpa / PAGE_SIZE);
            }
        }
        Ok(out)
    }

    /// Asynchronous harvest: `PAGEMAP_SCAN` for written pages over the
    /// ranges the table knows are populated, re-protecting them in the same
    /// call. Returns guest page numbers (sorted) and the bytes scanned.
    pub fn harvest_wp_async(
        &self,
        pagemap: &pagemap::Pagemap,
    ) -> Result<(Vec<u64>, u64), TrackError> {
        if !self.wp_async() {
            return Err(TrackError::WrongMode {
                tracker: "uffd-async",
                needed: "with WP_ASYNC",
            });
        }
        struct Tables(Vec<(u64, u64)>);
        impl Walker for Tables {
            fn table(&mut self, level: u8, start: u64, end: u64) -> WalkAction {
                if level == 1 {
                    match self.0.last_mut() {
                        Some((_, e)) if *e == start => *e = end,
                        _ => self.0.push((start, end)),
                    }
                    return WalkAction::Skip;
                }
                WalkAction::Continue
            }
        }
        let mut out = Vec::new();
        let mut scanned = 0;
        for r in self.engine_regions() {
            let mut t = Tables(Vec::new());
            self.core.table.walk_range(r.gpa, r.gpa + r.size, &mut t);
            for (s, e) in t.0 {
                scanned += e - s;
                pagemap
                    .scan(
                        r.host_of(s),
                        r.host_of(e - 1) + 1,
                        pagemap::PM_SCAN_WP_MATCHING | pagemap::PM_SCAN_CHECK_WPASYNC,
                        pagemap::PAGE_IS_WRITTEN,
                        |pr| {
                            let mut a = pr.start;
                            while a < pr.end {
                                out.push(r.gpa_of(a) / PAGE_SIZE);
                                a += PAGE_SIZE;
                            }
                        },
                    )
                    .map_err(TrackError::PagemapScan)?;
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok((out, scanned))
    }

    /// Discards guest pages `[gpa, gpa + len)` the way a balloon does: their
    /// frames go back to the host and the next touch gets a zeroed page.
    ///
    /// Rule 15: the pages' dirty state is taken before they are released —
    /// while tracking, the discarded range goes into the VMM-write log (its
    /// content changes to zeros, and a write made just before the discard
    /// must not vanish with the page table entries that recorded it, as it
    /// would for `uffd-async`, whose "written" state lives in the PTEs).
    /// The region lock keeps the fault engine from repopulating the range
    /// half way.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), crate::ram::RamError> {
        use crate::ram::RamError;
        if len == 0 {
            return Ok(());
        }
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(RamError::OutOfRange { addr: gpa, len });
        }
        let end = gpa
            .checked_add(len)
            .ok_or(RamError::OutOfRange { addr: gpa, len })?;
        let region = self.region_for(gpa, len)?;
        let _g = region.lock.lock_or_recover();
        // A device holds pinned pages: dropping them would leave it
        // writing to frames the guest no longer sees (rule 13).
        if self.core.pins.any_in(gpa, end) {
            return Err(RamError::Pinned(gpa));
        }
        self.host_dirty.mark(gpa, len);
        let host = region.host_of(gpa);
        // SAFETY: the range lies inside the region's live mapping; dropping
        // its pages only makes the next access read zeros (anon) or a hole
        // (memfd), which is what a discard means.
        let rc = unsafe {
            match region.mapping.memfd() {
                Some(f) => libc::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(f),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    region.mapping_offset(gpa) as libc::off_t,
                    len as libc::off_t,
                ),
                None => libc::madvise(host as *mut libc::c_void, len as usize, libc::MADV_DONTNEED),
            }
        };
        if rc != 0 {
            return Err(RamError::Discard(std::io::Error::last_os_error()));
        }
        let mut c = Collect(Vec::new(), |e: Entry| {
            !e.is_empty() && e.marker_kind().is_none()
        });
        self.core.table.walk_range(gpa, end, &mut c);
        for p in c.0 {
            self.core.table.clear(p);
        }
        Ok(())
    }

    /// Records a harvested round in the table: every present page gets its
    /// dirty bit (the table's record of "written since the baseline").
    pub fn mark_dirty(&self, pages: &[u64]) {
        for &p in pages {
            let gpa = p * PAGE_SIZE;
            let _ = self
                .core
                .table
                .update(gpa, |e| e.is_present().then(|| e.with(Flag::Dirty)));
        }
    }

    /// Clears every dirty bit (a new baseline, e.g. after a full snapshot).
    pub fn clear_dirty(&self) {
        for r in self.engine_regions() {
            let mut c = Collect(Vec::new(), |e: Entry| e.has(Flag::Dirty));
            self.core.table.walk_range(r.gpa, r.gpa + r.size, &mut c);
            for gpa in c.0 {
                let _ = self
                    .core
                    .table
                    .update(gpa, |e| Some(e.without(Flag::Dirty)));
            }
        }
    }
}

#[cfg(test)]
mod tests;
