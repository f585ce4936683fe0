//! Resolving one fault: find the region without the global lock, lock it,
//! populate the faulting page and its fault-around neighbours, record them.

use crate::core::{MemoryCore, WpMode};
use crate::entry::{Entry, Flag, Frame, Marker, PAGE_SIZE};
use crate::fault::stats::FaultCounters;
use crate::region::{BackingKind, Region};
use crate::sync::LockOrRecover;
use crate::table::LEAF_TABLE_SPAN;
use crate::uffd::sys::{
    UffdMsg, UFFDIO_CONTINUE_MODE_DONTWAKE, UFFDIO_CONTINUE_MODE_WP, UFFDIO_COPY_MODE_DONTWAKE,
    UFFDIO_COPY_MODE_WP, UFFDIO_ZEROPAGE_MODE_DONTWAKE, UFFD_EVENT_PAGEFAULT,
    UFFD_PAGEFAULT_FLAG_MINOR, UFFD_PAGEFAULT_FLAG_WP, UFFD_PAGEFAULT_FLAG_WRITE,
};
use std::sync::Arc;
use std::time::Instant;

impl MemoryCore {
    pub(crate) fn handle_message(&self, m: &UffdMsg) {
        if m.event != UFFD_EVENT_PAGEFAULT {
            log::debug!("ignoring userfaultfd event {:#x}", m.event);
            return;
        }
        let start = Instant::now();
        self.resolve_fault(m.address & !(PAGE_SIZE - 1), m.flags, m.ptid);
        self.counters.record_latency(start.elapsed());
    }

    fn find_region(&self, addr: u64) -> Option<Arc<Region>> {
        self.regions
            .load()
            .iter()
            .find(|r| r.contains_host(addr))
            .cloned()
    }

    /// Serves one fault at host page `addr` (rule 2: the region is found
    /// without the global lock and only its lock is taken, except for the
    /// first fault of a leaf table, which falls back to the global lock).
    fn resolve_fault(&self, addr: u64, flags: u64, ptid: u32) {
        let c = &self.counters;
        for _attempt in 0..8 {
            let Some(region) = self.find_region(addr) else {
                FaultCounters::add(&c.outside, 1);
                self.wake(addr);
                return;
            };
            let gpa = region.gpa_of(addr);
            let needs_table = !self.table.has_leaf_table(gpa);
            let _global = needs_table.then(|| self.global.lock_or_recover());
            let _region = region.lock.lock_or_recover();
            if !region.is_live() {
                // Removed meanwhile: look again (it is gone from the list).
                FaultCounters::add(&c.retries, 1);
                continue;
            }
            FaultCounters::add(
                if needs_table {
                    &c.fallbacks
                } else {
                    &c.fast_path
                },
                1,
            );
            if needs_table {
                if let Err(e) = self.table.ensure_leaf_table(gpa) {
                    log::error!("cannot record the fault at {gpa:#x}: {e}");
                }
            }
            let vcpu = self.vcpu_of(ptid);
            if let Some(vcpu) = vcpu {
                region.note_accessor(vcpu);
            }
            if flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
                // Rule 6: a write to a page a device holds exclusively
                // waits (its thread stays blocked in the kernel) until the
                // device lets go, which re-resolves it from the entry as it
                // is then.
                if let Some(waiting) = self.device_held.lock_or_recover().get_mut(&gpa) {
                    waiting.push(addr);
                    return;
                }
                // A write-sampling window: note who wrote.
                if let Some(users) = self.samples.lock_or_recover().get_mut(&gpa) {
                    if let Some(v) = vcpu {
                        *users |= 1 << (v % 64);
                    }
                }
                self.resolve_wp(&region, addr, gpa);
            } else if flags & UFFD_PAGEFAULT_FLAG_MINOR != 0 {
                self.resolve_minor(&region, addr, gpa);
            } else {
                let write = flags & UFFD_PAGEFAULT_FLAG_WRITE != 0;
                self.resolve_missing(&region, gpa, write, vcpu.is_some());
            }
            return;
        }
        log::warn!("fault at {addr:#x}: region kept changing; leaving it to the kernel");
        self.wake(addr);
    }

    pub(crate) fn wake(&self, addr: u64) {
        if let Some(u) = &self.uffd {
            if let Err(e) = u.wake(addr, PAGE_SIZE) {
                log::debug!("wake {addr:#x}: {e}");
            }
        }
    }

    /// Rule 4: the neighbours to populate with the faulting page: aligned
    /// down to `fault_around` pages, never across the 2 MiB leaf table or the
    /// region's end, and only the run of unpopulated entries around the page.
    fn fault_around_run(&self, region: &Region, gpa: u64) -> (u64, u64) {
        let window = self.fault_around * PAGE_SIZE;
        let table_start = gpa & !(LEAF_TABLE_SPAN - 1);
        let lo = (gpa & !(window - 1)).max(table_start).max(region.gpa);
        let hi = ((gpa & !(window - 1)) + window)
            .min(table_start + LEAF_TABLE_SPAN)
            .min(region.gpa + region.size);
        let mut start = gpa;
        while start > lo && self.table.get(start - PAGE_SIZE).is_empty() {
            start -= PAGE_SIZE;
        }
        let mut end = gpa + PAGE_SIZE;
        while end < hi && self.table.get(end).is_empty() {
            end += PAGE_SIZE;
        }
        (start, end)
    }

    /// Rule 8: missing pages get zero-filled frames: a copy from the zero
    /// buffer for writes (a private, zeroed frame at once), the zero page
    /// (anon) or a zeroed page-cache page (memfd) for reads. The whole run
    /// is filled with one ioctl unless the kernel stops early (a partial
    /// copy, or a page that exists already), in which case the rest is
    /// filled from where it stopped.
    ///
    /// The ioctls do not wake the faulting thread: the table and counters
    /// are updated first and one `UFFDIO_WAKE` over the run follows, so
    /// whoever resumes after the fault sees the table already in its new
    /// state.
    /// `by_guest`: a vCPU faulted (recorded in the access order).
    fn resolve_missing(&self, region: &Region, gpa: u64, write: bool, by_guest: bool) {
        let Some(uffd) = &self.uffd else { return };
        let c = &self.counters;
        FaultCounters::add(
            if write {
                &c.missing_write
            } else {
                &c.missing_read
            },
            1,
        );
        // Rule 12: the table's marker outlives the kernel's. A mapping
        // change (a fork remaps the parent's RAM) drops the poison the
        // kernel held for the page; the table still says poisoned, so the
        // page is poisoned again, never served.
        if self.table.get(gpa).marker_kind() == Some(Marker::Poisoned) {
            let host = region.host_of(gpa);
            if let Err(e) = uffd.poison(host, PAGE_SIZE) {
                if e.errno() != Some(libc::EEXIST) {
                    log::error!("UFFDIO_POISON {gpa:#x} again: {e}");
                }
            }
            self.wake(host);
            return;
        }
        let (start, end) = self.fault_around_run(region, gpa);
        // While write-protect tracking runs, every page is installed
        // protected (never the zero page, whose copy-on-write no tracker
        // would see); the faulting page of a write is then un-protected
        // below and recorded dirty.
        let tracking = self.wp_mode() != WpMode::Off;
        // Lazy restore: the content comes from the snapshot, not zeros.
        let sourced = match self.page_source.get() {
            Some(src) => {
                let mut buf = vec![0u8; (end - start) as usize];
                match src.fill(start, &mut buf) {
                    Ok(()) => Some(buf),
                    Err(why) => {
                        self.poison(region, start, end, &why);
                        return;
                    }
                }
            }
            None => None,
        };
        let mut cur = start;
        let mut retries = 0;
        while cur < end {
            let len = end - cur;
            let host = region.host_of(cur);
            let result = if let (Some(buf), Some(cache)) = (&sourced, self.shared_cache.get()) {
                let bytes = &buf[(cur - start) as usize..];
                self.map_from_cache(cache, region, cur, bytes, tracking)
            } else if let Some(buf) = &sourced {
                let src = buf[(cur - start) as usize..].as_ptr();
                let wp = if tracking { UFFDIO_COPY_MODE_WP } else { 0 };
                uffd.copy(host, src, len, UFFDIO_COPY_MODE_DONTWAKE | wp)
            } else if tracking {
                uffd.copy(
                    host,
                    self.zero.as_ptr(),
                    len,
                    UFFDIO_COPY_MODE_DONTWAKE | UFFDIO_COPY_MODE_WP,
                )
            } else if write {
                uffd.copy(host, self.zero.as_ptr(), len, UFFDIO_COPY_MODE_DONTWAKE)
            } else {
                uffd.zeropage(host, len, UFFDIO_ZEROPAGE_MODE_DONTWAKE)
            };
            let (done, errno) = match result {
                Ok(n) => (n.min(len), None),
                Err((e, partial)) => {
                    if !matches!(e.errno(), Some(libc::EEXIST) | Some(libc::EAGAIN)) {
                        log::error!("resolving the fault at {gpa:#x}: {e}");
                    }
                    ((partial.max(0) as u64).min(len), e.errno())
                }
            };
            let done = done - done % PAGE_SIZE;
            self.record_populated(
                region,
                cur,
                done / PAGE_SIZE,
                gpa,
                write || sourced.is_some(),
                tracking,
            );
            cur += done;
            match errno {
                None => {}
                Some(libc::EAGAIN) if retries < 16 => retries += 1,
                Some(libc::EEXIST) => {
                    // That page exists already: skip it.
                    if cur == gpa {
                        FaultCounters::add(&c.races, 1);
                    }
                    cur += PAGE_SIZE;
                }
                Some(_) => break,
            }
        }
        if tracking && write && self.table.get(gpa).is_uffd_wp() {
            // The write goes ahead: un-protect the faulting page, record it dirty.
            let writable = !region.flags.read_only;
            let _ = self.table.update(gpa, |e| {
                Some(e.write_unprotected(writable).with(Flag::Dirty))
            });
            if let Err(e) = uffd.write_unprotect_nowake(region.host_of(gpa), PAGE_SIZE) {
                log::error!("un-protecting {gpa:#x}: {e}");
            }
        }
        if sourced.is_some() && self.shared_cache.get().is_some() {
            self.mark_shared(start, cur.min(end));
        }
        // A live snapshot must know about pages that appear unprotected.
        if !tracking {
            self.note_unprotected(start, cur.min(end));
        }
        if by_guest {
            self.access_order.record(gpa, start, cur.min(end));
        }
        if let Err(e) = uffd.wake(region.host_of(start), end - start) {
            log::error!("waking the fault at {gpa:#x}: {e}");
        }
    }

    /// A shared page cache (`RamConfig::shared_cache`): puts `bytes` (the
    /// content of the pages from `gpa` on) into the cache, then maps the
    /// cache's pages here (`UFFDIO_CONTINUE`): every VM mapping the cache
    /// privately shares them until it writes one. Pages another VM put
    /// there already are written again with the same bytes.
    fn map_from_cache(
        &self,
        cache: &std::fs::File,
        region: &Region,
        gpa: u64,
        bytes: &[u8],
        tracking: bool,
    ) -> Result<u64, (crate::uffd::UffdError, i64)> {
        use std::os::unix::fs::FileExt;
        let Some(uffd) = &self.uffd else {
            return Ok(0);
        };
        if let Err(e) = cache.write_all_at(bytes, region.mapping_offset(gpa)) {
            return Err((
                crate::uffd::UffdError::Ioctl {
                    op: "filling the shared page cache",
                    start: gpa,
                    len: bytes.len() as u64,
                    source: e,
                },
                0,
            ));
        }
        let wp = if tracking { UFFDIO_CONTINUE_MODE_WP } else { 0 };
        uffd.continue_mapping(
            region.host_of(gpa),
            bytes.len() as u64,
            UFFDIO_CONTINUE_MODE_DONTWAKE | wp,
        )
    }

    /// Pages of `[start, end)` mapped from the shared cache: shared, not
    /// this VM's own.
    fn mark_shared(&self, start: u64, end: u64) {
        let mut gpa = start;
        while gpa < end {
            let _ = self.table.update(gpa, |e| {
                e.is_present()
                    .then(|| e.without(Flag::Exclusive).with(Flag::CowShared))
            });
            gpa += PAGE_SIZE;
        }
    }

    /// A minor fault: the page is in the shared cache (another VM put it
    /// there) but not mapped here yet: map it.
    fn resolve_minor(&self, region: &Region, addr: u64, gpa: u64) {
        let Some(uffd) = &self.uffd else { return };
        FaultCounters::add(&self.counters.minor, 1);
        let tracking = self.wp_mode() != WpMode::Off;
        let wp = if tracking { UFFDIO_CONTINUE_MODE_WP } else { 0 };
        match uffd.continue_mapping(addr, PAGE_SIZE, wp) {
            Ok(_) => {
                self.record_populated(region, gpa, 1, gpa, false, tracking);
                self.mark_shared(gpa, gpa + PAGE_SIZE);
                if !tracking {
                    self.note_unprotected(gpa, gpa + PAGE_SIZE);
                }
            }
            Err((e, _)) => {
                if e.errno() != Some(libc::EEXIST) {
                    log::error!("mapping the cached page {gpa:#x}: {e}");
                }
                self.wake(addr);
            }
        }
    }

    /// Rule 12's markers: `[start, end)` cannot be served (its content
    /// failed a check): install poison, record it, never hand out zeros.
    pub(crate) fn poison(&self, region: &Region, start: u64, end: u64, why: &str) {
        let Some(uffd) = &self.uffd else { return };
        log::error!("poisoning guest memory {start:#x}..{end:#x}: {why}");
        if let Err(e) = uffd.poison(region.host_of(start), end - start) {
            log::error!("UFFDIO_POISON {start:#x}..{end:#x}: {e}");
        }
        let mut gpa = start;
        while gpa < end {
            let _ = self.table.set(gpa, Entry::marker(Marker::Poisoned, 0));
            gpa += PAGE_SIZE;
        }
        self.memory_errors
            .lock_or_recover()
            .push(format!("{start:#x}..{end:#x}: {why}"));
        if let Err(e) = uffd.wake(region.host_of(start), end - start) {
            log::error!("waking after poisoning {start:#x}: {e}");
        }
    }

    /// Populates the unpopulated pages of `[start, end)` from the page
    /// source with large `UFFDIO_COPY`s, without waiting for faults (a lazy
    /// restore's prefetch). Returns the pages populated; a source error
    /// poisons the run it concerns and is returned.
    pub(crate) fn prefill(&self, start: u64, end: u64) -> Result<u64, String> {
        let (Some(uffd), Some(src)) = (&self.uffd, self.page_source.get()) else {
            return Ok(0);
        };
        let tracking = self.wp_mode() != WpMode::Off;
        let mut total = 0;
        let engine_served = self.regions.load();
        for region in engine_served
            .iter()
            .filter(|r| r.backing.uses_fault_engine())
        {
            let lo = start.max(region.gpa);
            let hi = end.min(region.gpa + region.size);
            if lo >= hi {
                continue;
            }
            let _g = region.lock.lock_or_recover();
            let mut gpa = lo & !(PAGE_SIZE - 1);
            while gpa < hi {
                if !self.table.get(gpa).is_empty() {
                    gpa += PAGE_SIZE;
                    continue;
                }
                // A run of empty entries inside one leaf table.
                let table_end = ((gpa / LEAF_TABLE_SPAN) + 1) * LEAF_TABLE_SPAN;
                let mut run_end = gpa + PAGE_SIZE;
                while run_end < hi.min(table_end) && self.table.get(run_end).is_empty() {
                    run_end += PAGE_SIZE;
                }
                if !self.table.has_leaf_table(gpa) {
                    let _ = self.table.ensure_leaf_table(gpa);
                }
                let mut buf = vec![0u8; (run_end - gpa) as usize];
                if let Err(why) = src.fill(gpa, &mut buf) {
                    self.poison(region, gpa, run_end, &why);
                    return Err(why);
                }
                let wp = if tracking { UFFDIO_COPY_MODE_WP } else { 0 };
                let copied = match self.shared_cache.get() {
                    Some(cache) => self.map_from_cache(cache, region, gpa, &buf, tracking),
                    None => uffd.copy(region.host_of(gpa), buf.as_ptr(), run_end - gpa, wp),
                };
                let done = match copied {
                    Ok(n) => n,
                    Err((_, partial)) => partial.max(0) as u64,
                };
                let done = done - done % PAGE_SIZE;
                self.record_populated(region, gpa, done / PAGE_SIZE, u64::MAX, true, tracking);
                if self.shared_cache.get().is_some() {
                    self.mark_shared(gpa, gpa + done);
                    if let Err(e) = uffd.wake(region.host_of(gpa), done.max(PAGE_SIZE)) {
                        log::debug!("waking after a prefetch: {e}");
                    }
                }
                // A prefetch replays an earlier trace: keep its order.
                self.access_order.record(u64::MAX, gpa, gpa + done);
                total += done / PAGE_SIZE;
                // Skip a page the kernel had already (EEXIST) or go on after
                // the run.
                gpa += done.max(PAGE_SIZE);
            }
        }
        Ok(total)
    }

    fn record_populated(
        &self,
        region: &Region,
        start: u64,
        pages: u64,
        fault_gpa: u64,
        write: bool,
        protected: bool,
    ) {
        let c = &self.counters;
        FaultCounters::add(&c.pages_populated, pages);
        if pages > 1 {
            FaultCounters::add(&c.fault_around_pages, pages - 1);
        }
        let writable = !region.flags.read_only;
        for i in 0..pages {
            let gpa = start + i * PAGE_SIZE;
            let frame = Frame(region.mapping_offset(gpa) / PAGE_SIZE);
            let mut e = if protected {
                Entry::page(frame, writable)
                    .with(Flag::Exclusive)
                    .write_protected()
            } else if !write && region.backing == BackingKind::Anon {
                Entry::zero_page()
            } else {
                Entry::page(frame, writable).with(Flag::Exclusive)
            };
            if gpa == fault_gpa {
                e = e.with(Flag::Accessed);
                if write && !protected {
                    e = e.with(Flag::Dirty);
                }
            }
            if let Err(err) = self.table.set(gpa, e) {
                log::error!("cannot record page {gpa:#x}: {err}");
            }
        }
    }

    /// A write to a write-protected page: record it dirty and unprotect.
    pub(crate) fn resolve_wp(&self, region: &Region, addr: u64, gpa: u64) {
        let Some(uffd) = &self.uffd else { return };
        FaultCounters::add(&self.counters.wp, 1);
        // A live snapshot still needs this page's content: copy it before
        // the write goes ahead (we hold the region lock, so the background
        // writer cannot be copying it at the same time).
        if let Some(lc) = self.live_copy.load_full() {
            if lc.claim(gpa / PAGE_SIZE) {
                lc.copy(gpa / PAGE_SIZE, region.host_of(gpa));
                lc.by_faults
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        } else if let Some(w) = self.live_window.lock_or_recover().as_mut() {
            // Written between a live snapshot's protect and its freeze.
            w.push(gpa);
        }
        let writable = !region.flags.read_only;
        let frame = Frame(region.mapping_offset(gpa) / PAGE_SIZE);
        let _ = self.table.update(gpa, |e| {
            // A protected zero page is copied by the kernel once the write
            // goes ahead: from then on it is a private page.
            let e = if e.is_zero_page() {
                Entry::page(frame, writable).with(Flag::Exclusive)
            } else if e.is_empty() {
                return None;
            } else {
                e
            };
            Some(
                e.write_unprotected(writable)
                    .with(Flag::Dirty)
                    .with(Flag::Accessed),
            )
        });
        if let Err(e) = uffd.write_protect(addr, PAGE_SIZE, false) {
            log::error!("un-protecting {gpa:#x}: {e}");
            self.wake(addr);
        }
    }
}
