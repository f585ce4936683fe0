//! Pinning guest memory for device access, with unshare-on-pin (rule 13).
//!
//! A device that holds a page (a DMA engine, an io_uring fixed buffer)
//! holds the host frame that was mapped when it pinned. If that frame is
//! shared copy-on-write (the zero page, a snapshot image's page-cache page,
//! a page shared with a clone or a fork), the guest's next write gives the
//! guest a new private frame and the device keeps the old one: writes get
//! lost in either direction. So pinning first gives this VM an exclusive
//! private copy of every page of the range, read-only pins included, and
//! pinned pages are never shared again: a fork copies them eagerly
//! (`GuestRam::freeze_for_fork`), and discarding them is refused.

use crate::entry::{Flag, PAGE_SIZE};
use crate::ram::{GuestRam, RamError};
use crate::sync::LockOrRecover;
use crate::table::{WalkAction, Walker};
use std::collections::HashMap;
use std::sync::Mutex;

/// What the device may do with a pinned range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinAccess {
    /// The device reads guest memory (e.g. a block write from the guest).
    ReadOnly,
    /// The device writes guest memory (e.g. a block read into the guest).
    ReadWrite,
}

/// A pinned guest-physical range; give it back with [`GuestRam::unpin`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a pin holds its pages until unpinned"]
pub struct Pin {
    /// First guest-physical byte (page-aligned).
    pub gpa: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
    /// The access it was taken for.
    pub access: PinAccess,
}

impl Pin {
    /// Host address of the range's first byte, for the device.
    pub fn host_addr(&self, ram: &GuestRam) -> Option<u64> {
        ram.region_for(self.gpa, self.len)
            .ok()
            .map(|r| r.host_of(self.gpa))
    }
}

/// Pin counts per guest page.
#[derive(Default)]
pub(crate) struct PinCounts {
    counts: Mutex<HashMap<u64, u32>>,
}

impl PinCounts {
    /// The counts, locked.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        self.counts.lock_or_recover()
    }

    /// True when `page` (a guest page number) is pinned.
    pub(crate) fn is_pinned(&self, page: u64) -> bool {
        self.lock().contains_key(&page)
    }

    /// True when any page of `[start, end)` (bytes) is pinned.
    pub(crate) fn any_in(&self, start: u64, end: u64) -> bool {
        self.lock()
            .keys()
            .any(|p| (start..end).contains(&(p * PAGE_SIZE)))
    }

    /// The pinned guest page numbers, sorted.
    pub(crate) fn pages(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.lock().keys().copied().collect();
        v.sort_unstable();
        v
    }
}

impl GuestRam {
    /// Pins `[gpa, gpa + len)` for a device. Every page of the range is
    /// first made this VM's own private page (rule 13, read-only pins
    /// included): populated if it was not, copied if it was shared. A
    /// read-write pin of a read-only region is refused (rule 14); on a
    /// shared (not copy-on-write) region the unshare does nothing.
    pub fn pin(&self, gpa: u64, len: u64, access: PinAccess) -> Result<Pin, RamError> {
        let bad = || RamError::OutOfRange { addr: gpa, len };
        if len == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(bad());
        }
        let end = gpa.checked_add(len).ok_or_else(bad)?;
        let region = self.region_for(gpa, len)?;
        if region.flags.read_only && access == PinAccess::ReadWrite {
            return Err(RamError::ReadOnly(gpa));
        }
        for page in gpa / PAGE_SIZE..end / PAGE_SIZE {
            if self.core.table.get(page * PAGE_SIZE).marker_kind()
                == Some(crate::entry::Marker::Poisoned)
            {
                return Err(RamError::Poisoned(page * PAGE_SIZE));
            }
        }
        // Rule 13: a write fault on every page breaks any sharing without
        // changing a byte (MADV_POPULATE_WRITE); missing pages fault into
        // the fault engine, protected ones go through it (a live snapshot
        // copies them first). Not under the region lock: the engine takes
        // it to serve those faults. A read-only region has nothing to
        // break: its pages are only made present.
        let advice = if region.flags.read_only {
            libc::MADV_POPULATE_READ
        } else {
            libc::MADV_POPULATE_WRITE
        };
        // SAFETY: the range lies inside the region's live mapping; the
        // advice only faults pages in, it never changes their content.
        let rc = unsafe {
            libc::madvise(
                region.host_of(gpa) as *mut libc::c_void,
                len as usize,
                advice,
            )
        };
        if rc != 0 {
            return Err(RamError::Pin(std::io::Error::last_os_error()));
        }
        let _g = region.lock.lock_or_recover();
        let mut counts = self.core.pins.lock();
        for page in gpa / PAGE_SIZE..end / PAGE_SIZE {
            *counts.entry(page).or_insert(0) += 1;
            let _ = self.core.table.update(page * PAGE_SIZE, |e| {
                e.is_present().then(|| {
                    e.with(Flag::Pinned)
                        .with(Flag::Exclusive)
                        .without(Flag::CowShared)
                })
            });
        }
        Ok(Pin { gpa, len, access })
    }

    /// Releases a pin; a page stays pinned while another pin holds it.
    pub fn unpin(&self, pin: Pin) -> Result<(), RamError> {
        let end = pin.gpa + pin.len;
        let region = self.region_for(pin.gpa, pin.len)?;
        let _g = region.lock.lock_or_recover();
        let mut counts = self.core.pins.lock();
        for page in pin.gpa / PAGE_SIZE..end / PAGE_SIZE {
            let last = match counts.get_mut(&page) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => true,
                None => false,
            };
            if last {
                counts.remove(&page);
                let _ = self.core.table.update(page * PAGE_SIZE, |e| {
                    e.has(Flag::Pinned).then(|| e.without(Flag::Pinned))
                });
            }
        }
        Ok(())
    }

    /// A device is about to write `[gpa, gpa + len)` through its pin,
    /// behind the page tables' back (no write fault, no write-protect, no
    /// KVM dirty log): a live snapshot in progress copies those pages
    /// first, exactly as a write fault would have made it.
    pub fn before_device_write(&self, gpa: u64, len: u64) -> Result<(), RamError> {
        let end = gpa
            .checked_add(len)
            .ok_or(RamError::OutOfRange { addr: gpa, len })?;
        let Some(lc) = self.core.live_copy.load_full() else {
            return Ok(());
        };
        for region in self.regions() {
            let lo = gpa.max(region.gpa) & !(PAGE_SIZE - 1);
            let hi = end.min(region.gpa + region.size);
            if lo >= hi {
                continue;
            }
            let _g = region.lock.lock_or_recover();
            let mut page = lo;
            while page < hi {
                if self.core.table.get(page).is_present() && lc.claim(page / PAGE_SIZE) {
                    lc.copy(page / PAGE_SIZE, region.host_of(page));
                    lc.by_faults
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                page += PAGE_SIZE;
            }
        }
        Ok(())
    }

    /// A device wrote `[gpa, gpa + len)`: the pages are dirty in the table
    /// and in the log of writes the VMM makes itself, which every dirty
    /// tracker merges into its rounds.
    pub fn after_device_write(&self, gpa: u64, len: u64) {
        self.host_dirty.mark(gpa, len);
        let mut page = gpa & !(PAGE_SIZE - 1);
        while page < gpa.saturating_add(len) {
            let _ = self
                .core
                .table
                .update(page, |e| e.is_present().then(|| e.with(Flag::Dirty)));
            page += PAGE_SIZE;
        }
    }

    /// The device takes pinned page `gpa` exclusively (e.g. while it
    /// assembles a block in it): from now on the guest's writes to it wait
    /// until [`GuestRam::release_exclusive`] (rule 6). Reads go on.
    pub fn hold_exclusive(&self, gpa: u64) -> Result<(), RamError> {
        let gpa = gpa & !(PAGE_SIZE - 1);
        let region = self.region_for(gpa, PAGE_SIZE)?;
        let uffd = self
            .core
            .uffd
            .as_ref()
            .ok_or(RamError::Device(gpa, "guest RAM has no fault engine"))?;
        let _g = region.lock.lock_or_recover();
        if !self.core.pins.is_pinned(gpa / PAGE_SIZE) {
            return Err(RamError::Device(gpa, "a device holds only pages it pinned"));
        }
        let mut held = self.core.device_held.lock_or_recover();
        if held.contains_key(&gpa) {
            return Err(RamError::Device(gpa, "already held by a device"));
        }
        uffd.write_protect(region.host_of(gpa), PAGE_SIZE, true)?;
        held.insert(gpa, Vec::new());
        let _ = self
            .core
            .table
            .update(gpa, |e| e.is_present().then(|| e.write_protected()));
        Ok(())
    }

    /// The device lets go of `gpa`. Rule 6: every write that waited is
    /// resolved from the page's entry as it is now, not as it was when the
    /// write faulted (the page may have been unpinned and discarded
    /// meanwhile: then the writer just faults again and gets a new page).
    pub fn release_exclusive(&self, gpa: u64) -> Result<(), RamError> {
        let gpa = gpa & !(PAGE_SIZE - 1);
        let region = self.region_for(gpa, PAGE_SIZE)?;
        let _g = region.lock.lock_or_recover();
        let waiting = self
            .core
            .device_held
            .lock_or_recover()
            .remove(&gpa)
            .ok_or(RamError::Device(gpa, "not held by a device"))?;
        let entry = self.core.table.get(gpa);
        let tracked =
            self.core.wp_mode() != crate::core::WpMode::Off || self.core.live_copy.load().is_some();
        if entry.is_present() && !waiting.is_empty() {
            // One resolution un-protects the page (recording the write for
            // a tracker, or copying the page for a live snapshot, first).
            self.core.resolve_wp(&region, region.host_of(gpa), gpa);
        } else if entry.is_present() && !tracked {
            // Nobody wrote meanwhile: just lift the hold's protection (a
            // tracker's own protection, if any, stays).
            if let Some(uffd) = &self.core.uffd {
                uffd.write_protect(region.host_of(gpa), PAGE_SIZE, false)?;
            }
            let writable = !region.flags.read_only;
            let _ = self.core.table.update(gpa, |e| {
                e.is_present().then(|| e.write_unprotected(writable))
            });
        }
        for addr in waiting {
            self.core.wake(addr);
        }
        Ok(())
    }

    /// The pinned guest pages (guest-physical addresses), in order.
    pub fn pinned_pages(&self) -> Vec<u64> {
        self.core
            .pins
            .pages()
            .into_iter()
            .map(|p| p * PAGE_SIZE)
            .collect()
    }

    /// Pages whose table entry carries the pinned bit, in order (the table's
    /// view, which tests compare with the pin counts).
    pub fn table_pinned_pages(&self) -> Vec<u64> {
        struct Pinned(Vec<u64>);
        impl Walker for Pinned {
            fn leaf(&mut self, gpa: u64, e: crate::entry::Entry) -> WalkAction {
                if e.has(Flag::Pinned) {
                    self.0.push(gpa);
                }
                WalkAction::Continue
            }
        }
        let mut p = Pinned(Vec::new());
        self.core.table.walk_range(0, self.size(), &mut p);
        p.0
    }
}

#[cfg(test)]
mod tests {
    //! Real userfaultfd, real page frames: a pinned page must keep its
    //! frame when the guest writes it (else the device and the guest part
    //! ways), which `/proc/self/pagemap` shows (frame numbers need root;
    //! those checks are skipped without them).

    use super::*;
    use crate::ram::RamConfig;
    use crate::region::{BackingKind, RegionFlags};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    fn frame(host: u64) -> Option<u64> {
        let f = std::fs::File::open("/proc/self/pagemap").ok()?;
        let mut w = [0u8; 8];
        f.read_exact_at(&mut w, host / PAGE_SIZE * 8).ok()?;
        let pm = u64::from_le_bytes(w);
        let pfn = pm & ((1 << 55) - 1);
        (pm >> 63 == 1 && pfn != 0).then_some(pfn)
    }

    fn store(ram: &GuestRam, gpa: u64, v: u64) {
        // SAFETY: inside the live mapping of `ram`.
        unsafe { ((ram.host_addr() + gpa) as *mut u64).write_volatile(v) };
    }

    fn load(ram: &GuestRam, gpa: u64) -> u64 {
        // SAFETY: as above.
        unsafe { ((ram.host_addr() + gpa) as *const u64).read_volatile() }
    }

    /// A memfd holding an image whose first two pages are not zero.
    fn image() -> std::fs::File {
        let fd = {
            // SAFETY: memfd_create takes a NUL-terminated name and flags.
            let fd = unsafe { libc::memfd_create(c"pin-test".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: a new descriptor nothing else owns.
            unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        };
        fd.set_len(4 * MIB).expect("size");
        fd.write_all_at(&[0xaa; 8192], 0).expect("write");
        fd
    }

    #[test]
    fn pinning_an_image_page_gives_the_vm_its_own_frame_first() {
        let file = image();
        let cfg = RamConfig {
            backing: BackingKind::Memfd,
            ..RamConfig::default()
        };
        let ram = GuestRam::from_file_private(4 * MIB, cfg, &file).expect("ram");
        ram.mark_file_backed(&[0, 1]).expect("mark");
        assert_eq!(load(&ram, 0) & 0xff, 0xaa); // mapped from the image
        assert_eq!(ram.refresh_sharing().expect("pagemap").shared_pages, 1);
        // A read-only pin unshares too (rule 13).
        let pin = ram.pin(0, 2 * PAGE_SIZE, PinAccess::ReadOnly).expect("pin");
        let s = ram.refresh_sharing().expect("pagemap");
        assert_eq!((s.shared_pages, s.exclusive_pages), (0, 2));
        assert_eq!(load(&ram, 0) & 0xff, 0xaa, "the unshare kept the content");
        let before = frame(ram.host_addr());
        store(&ram, 0, 7); // the guest writes the page the device reads
        assert_eq!(
            frame(ram.host_addr()),
            before,
            "the device and the guest share one frame"
        );
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, 0).expect("read");
        assert_eq!(b[0], 0xaa, "the image is untouched");
        assert_eq!(ram.pinned_pages(), vec![0, PAGE_SIZE]);
        assert_eq!(ram.table_pinned_pages(), vec![0, PAGE_SIZE]);
        ram.unpin(pin).expect("unpin");
        assert!(ram.pinned_pages().is_empty() && ram.table_pinned_pages().is_empty());
    }

    #[test]
    fn pinning_a_zero_page_allocates_a_frame_and_pins_count() {
        let ram = GuestRam::new(
            4 * MIB,
            RamConfig {
                backing: BackingKind::Anon,
                ..RamConfig::default()
            },
        )
        .expect("ram");
        assert_eq!(load(&ram, 0), 0); // a read: the shared zero page
        let zero_before = ram.refresh_sharing().expect("pagemap").zero_pages;
        let a = ram.pin(0, PAGE_SIZE, PinAccess::ReadWrite).expect("pin");
        let b = ram.pin(0, PAGE_SIZE, PinAccess::ReadOnly).expect("pin");
        let before = frame(ram.host_addr());
        store(&ram, 0, 9);
        assert_eq!(frame(ram.host_addr()), before);
        // Page 0 left the zero page (its neighbours, faulted in around
        // it, are still there).
        let zero_after = ram.refresh_sharing().expect("pagemap").zero_pages;
        if frame(ram.host_addr()).is_some() {
            assert_eq!(zero_after + 1, zero_before);
        }
        // Pinned pages cannot be discarded; a page stays pinned while any
        // pin holds it.
        assert!(matches!(
            ram.discard(0, PAGE_SIZE),
            Err(RamError::Pinned(0))
        ));
        ram.unpin(a).expect("unpin");
        assert!(matches!(
            ram.discard(0, PAGE_SIZE),
            Err(RamError::Pinned(0))
        ));
        ram.unpin(b).expect("unpin");
        ram.discard(0, PAGE_SIZE).expect("discard");
        assert_eq!(load(&ram, 0), 0);
    }

    #[test]
    fn read_only_and_shared_regions_follow_rule_14() {
        let ram = GuestRam::new(4 * MIB, RamConfig::default()).expect("ram");
        let rom = RegionFlags {
            read_only: true,
            ..RegionFlags::default()
        };
        ram.add_region(64 * MIB, MIB, rom).expect("rom");
        assert!(matches!(
            ram.pin(64 * MIB, PAGE_SIZE, PinAccess::ReadWrite),
            Err(RamError::ReadOnly(g)) if g == 64 * MIB
        ));
        let p = ram
            .pin(64 * MIB, PAGE_SIZE, PinAccess::ReadOnly)
            .expect("a read-only pin of a ROM");
        ram.unpin(p).expect("unpin");
        // A shared (memfd, not copy-on-write) region: the unshare keeps
        // the very frame that is there.
        let shared = RegionFlags {
            shared: true,
            ..RegionFlags::default()
        };
        let r = ram.add_region(80 * MIB, MIB, shared).expect("shared");
        // SAFETY: inside the region's live mapping.
        unsafe { (r.host_of(80 * MIB) as *mut u64).write_volatile(5) };
        let before = frame(r.host_of(80 * MIB));
        let p = ram
            .pin(80 * MIB, PAGE_SIZE, PinAccess::ReadWrite)
            .expect("pin");
        assert_eq!(frame(r.host_of(80 * MIB)), before);
        ram.unpin(p).expect("unpin");
        // Out of range and unaligned pins are refused.
        assert!(ram.pin(3, PAGE_SIZE, PinAccess::ReadOnly).is_err());
        assert!(ram.pin(0, 0, PinAccess::ReadOnly).is_err());
        assert!(ram.pin(200 * MIB, PAGE_SIZE, PinAccess::ReadOnly).is_err());
    }

    #[test]
    fn a_rom_carved_from_boot_ram_refuses_write_pins() {
        let mut ram = GuestRam::new(4 * MIB, RamConfig::default()).expect("ram");
        let rom = ram.set_rom(2 * PAGE_SIZE).expect("rom");
        assert_eq!(
            (rom.gpa, rom.size),
            (4 * MIB - 2 * PAGE_SIZE, 2 * PAGE_SIZE)
        );
        assert!(rom.flags.read_only);
        assert_eq!(ram.writable_bytes(), 4 * MIB - 2 * PAGE_SIZE);
        assert_eq!(ram.boot_regions().len(), 1);
        assert_eq!(ram.boot_regions()[0].size, 4 * MIB - 2 * PAGE_SIZE);
        // The VMM loads it through the one mapping; the guest may read it,
        // a device may not write it.
        ram.write(rom.gpa, &[0x5a; 16]).expect("load");
        assert_eq!(load(&ram, rom.gpa) & 0xff, 0x5a);
        assert!(matches!(
            ram.pin(rom.gpa, PAGE_SIZE, PinAccess::ReadWrite),
            Err(RamError::ReadOnly(g)) if g == rom.gpa
        ));
        let p = ram
            .pin(rom.gpa, 2 * PAGE_SIZE, PinAccess::ReadOnly)
            .expect("a read-only pin of the ROM");
        ram.unpin(p).expect("unpin");
        // Below the ROM, RAM pins as before.
        let p = ram
            .pin(rom.gpa - PAGE_SIZE, PAGE_SIZE, PinAccess::ReadWrite)
            .expect("pin");
        ram.unpin(p).expect("unpin");
        assert!(ram.set_rom(PAGE_SIZE).is_err(), "one ROM");
        let mut small = GuestRam::new(MIB, RamConfig::default()).expect("ram");
        assert!(small.set_rom(MIB).is_err(), "no RAM left below it");
        assert!(small.set_rom(100).is_err(), "not a page multiple");
    }

    #[test]
    fn a_shared_file_region_stays_shared_under_a_pin() {
        let mut ram = GuestRam::new(4 * MIB, RamConfig::default()).expect("ram");
        let file = image();
        file.set_len(2 * PAGE_SIZE).expect("size");
        let r = ram.set_shared_file(&file).expect("shared");
        assert_eq!((r.gpa, r.size), (4 * MIB - 2 * PAGE_SIZE, 2 * PAGE_SIZE));
        assert!(r.flags.shared && r.backing == BackingKind::Plain);
        assert!(!ram.engine_serves(r.gpa) && ram.engine_serves(0));
        assert_eq!(load(&ram, r.gpa) & 0xff, 0xaa, "the file's content");
        // Rule 14: the unshare of a read-write pin does nothing there: the
        // page stays the file's, whose frame the device and guest share.
        let pin = ram
            .pin(r.gpa, PAGE_SIZE, PinAccess::ReadWrite)
            .expect("pin");
        let before = frame(r.host_of(r.gpa));
        store(&ram, r.gpa, 0x77);
        assert_eq!(frame(r.host_of(r.gpa)), before);
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, 0).expect("read");
        assert_eq!(b[0], 0x77, "the write reached the file");
        ram.unpin(pin).expect("unpin");
        assert!(ram.set_shared_file(&file).is_err(), "one shared file");
    }

    #[test]
    fn a_device_write_during_a_live_snapshot_leaves_the_snapshot_the_old_page() {
        let ram = GuestRam::new(4 * MIB, RamConfig::default()).expect("ram");
        store(&ram, 0, 1);
        let pin = ram.pin(0, PAGE_SIZE, PinAccess::ReadWrite).expect("pin");
        ram.live_protect().expect("protect");
        let out = image();
        out.set_len(4 * MIB).expect("size");
        let lc = ram
            .live_freeze(out.try_clone().expect("dup"), |_, _| 0)
            .expect("freeze");
        // The device writes the pinned page behind the page tables' back:
        // through a second mapping of the memfd, which the write-protect
        // of the guest's mapping does not cover (as a DMA write would not).
        let memfd = ram.regions()[0].mapping.memfd().expect("memfd").as_raw_fd();
        // SAFETY: a new shared mapping of the memfd's first page, unmapped
        // below; the write lands in the page the guest maps.
        unsafe {
            let dma = libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd,
                0,
            );
            assert_ne!(dma, libc::MAP_FAILED);
            ram.before_device_write(0, PAGE_SIZE).expect("copy first");
            (dma as *mut u64).write_volatile(2);
            ram.after_device_write(0, PAGE_SIZE);
            libc::munmap(dma, PAGE_SIZE as usize);
        }
        ram.live_write_all(&lc);
        ram.live_finish().expect("finish");
        let mut w = [0u8; 8];
        out.read_exact_at(&mut w, 0).expect("read");
        assert_eq!(
            u64::from_le_bytes(w),
            1,
            "the snapshot holds the page as it was"
        );
        assert_eq!(load(&ram, 0), 2);
        ram.unpin(pin).expect("unpin");
    }

    /// A shared mapping of the memfd behind `ram`'s page `gpa`: the device's
    /// view (writes through it bypass the guest mapping's protection).
    fn dma_view(ram: &GuestRam, gpa: u64) -> *mut u64 {
        let fd = ram.regions()[0].mapping.memfd().expect("memfd").as_raw_fd();
        // SAFETY: a new shared mapping of one page of the memfd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                gpa as libc::off_t,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as *mut u64
    }

    #[test]
    fn writes_to_pages_a_device_holds_wait_for_it_under_stress() {
        use std::sync::atomic::{AtomicBool, Ordering};
        const PAGES: u64 = 8;
        const WRITERS: u64 = 3;
        let ram = std::sync::Arc::new(GuestRam::new(4 * MIB, RamConfig::default()).expect("ram"));
        let pin = ram
            .pin(0, PAGES * PAGE_SIZE, PinAccess::ReadWrite)
            .expect("pin");
        let views: Vec<usize> = (0..PAGES)
            .map(|p| dma_view(&ram, p * PAGE_SIZE) as usize)
            .collect();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        // Writers: each stores an increasing count in its own word of every
        // page, as vCPUs would.
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (ram, stop) = (ram.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        for p in 0..PAGES {
                            store(&ram, p * PAGE_SIZE + 8 * w, n);
                        }
                    }
                    n
                })
            })
            .collect();
        // The device: holds each page in turn; while it holds it, no
        // guest write may land (the writers' words stay as they were).
        for round in 0..300u64 {
            let p = round % PAGES;
            ram.hold_exclusive(p * PAGE_SIZE).expect("hold");
            let view = views[p as usize] as *mut u64;
            // SAFETY: the device's own mapping of the held page.
            let before: Vec<u64> = (0..WRITERS)
                .map(|w| unsafe { view.add(w as usize).read_volatile() })
                .collect();
            // SAFETY: as above; the device's word lies past the writers'.
            unsafe { view.add(64).write_volatile(round) };
            std::thread::sleep(std::time::Duration::from_micros(50));
            let after: Vec<u64> = (0..WRITERS)
                // SAFETY: as above.
                .map(|w| unsafe { view.add(w as usize).read_volatile() })
                .collect();
            assert_eq!(
                before, after,
                "a guest write landed while the device held page {p}"
            );
            ram.release_exclusive(p * PAGE_SIZE).expect("release");
        }
        stop.store(true, Ordering::Relaxed);
        let counts: Vec<u64> = writers
            .into_iter()
            .map(|t| t.join().expect("writer"))
            .collect();
        // Every writer went on after every hold, and its last store is there.
        for (w, n) in counts.iter().enumerate() {
            assert!(*n > 1, "writer {w} made progress");
            for p in 0..PAGES {
                assert_eq!(load(&ram, p * PAGE_SIZE + 8 * w as u64), *n);
            }
        }
        assert_eq!(load(&ram, 7 * PAGE_SIZE + 8 * 64), 295);
        // Holding needs a pin, and one hold at a time.
        ram.hold_exclusive(0).expect("hold");
        assert!(ram.hold_exclusive(0).is_err());
        ram.release_exclusive(0).expect("release");
        assert!(ram.release_exclusive(0).is_err());
        assert!(ram.hold_exclusive(100 * PAGE_SIZE).is_err(), "not pinned");
        for v in views {
            // SAFETY: the mappings made above.
            unsafe { libc::munmap(v as *mut libc::c_void, PAGE_SIZE as usize) };
        }
        ram.unpin(pin).expect("unpin");
    }

    #[test]
    fn a_write_waiting_for_a_discarded_page_faults_it_in_again() {
        let ram = std::sync::Arc::new(GuestRam::new(4 * MIB, RamConfig::default()).expect("ram"));
        store(&ram, 0, 5);
        let pin = ram.pin(0, PAGE_SIZE, PinAccess::ReadWrite).expect("pin");
        ram.hold_exclusive(0).expect("hold");
        let r2 = ram.clone();
        let writer = std::thread::spawn(move || store(&r2, 8, 9));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!writer.is_finished(), "the write waits for the device");
        // Meanwhile the device lets the page go entirely and it is dropped.
        ram.unpin(pin).expect("unpin");
        ram.discard(0, PAGE_SIZE).expect("discard");
        // Rule 6: the waiting write is resolved from the entry as it is now
        // (empty): it faults the page in again instead of un-protecting a
        // page that is gone.
        ram.release_exclusive(0).expect("release");
        writer.join().expect("writer");
        assert_eq!((load(&ram, 0), load(&ram, 8)), (0, 9));
    }

    #[test]
    fn a_fork_copies_pinned_pages_and_shares_the_rest_copy_on_write() {
        let ram = GuestRam::new(4 * MIB, RamConfig::default()).expect("ram");
        store(&ram, 0, 1); // shared with the child
        store(&ram, PAGE_SIZE, 2); // pinned: copied for the child
        let pin = ram
            .pin(PAGE_SIZE, PAGE_SIZE, PinAccess::ReadWrite)
            .expect("pin");
        let pinned_frame = frame(ram.host_addr() + PAGE_SIZE);
        let image = ram.freeze_for_fork().expect("freeze");
        assert_eq!(image.pinned_copies.len(), 1);
        let child =
            GuestRam::from_file_private(4 * MIB, RamConfig::default(), &image.file).expect("child");
        child.mark_file_backed(&[0, 1]).expect("mark");
        child.adopt_pinned_copies(&image).expect("adopt");
        // The parent writes both pages after the fork; the device writes
        // the pinned one too (through the parent's mapping: the same frame).
        store(&ram, 0, 10);
        store(&ram, PAGE_SIZE, 20);
        assert_eq!(frame(ram.host_addr() + PAGE_SIZE), pinned_frame);
        assert_eq!((load(&child, 0), load(&child, PAGE_SIZE)), (1, 2));
        // And the child's writes stay its own.
        store(&child, 0, 100);
        store(&child, PAGE_SIZE, 200);
        assert_eq!((load(&ram, 0), load(&ram, PAGE_SIZE)), (10, 20));
        let s = child.refresh_sharing().expect("pagemap");
        assert_eq!(s.exclusive_pages, 2);
        ram.unpin(pin).expect("unpin");
    }
}
