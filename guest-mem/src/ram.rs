//! Guest RAM: the memory manager's front. It owns the regions (through the
//! shared core), the fault engine, and a vm-memory view of the RAM regions
//! created at boot, for loaders and devices.

use crate::core::{CoreError, MemoryCore};
use crate::entry::Entry;
use crate::entry::PAGE_SIZE;
use crate::fault::stats::FaultStats;
use crate::fault::FaultEngine;
use crate::region::{BackingKind, Region, RegionFlags};
use crate::sync::LockOrRecover;
use crate::table::{Stage2Table, WalkAction, Walker};
use crate::tracking::HostDirtyLog;
use crate::uffd::sys::{
    UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFD_FEATURE_POISON,
    UFFD_FEATURE_THREAD_ID, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    UFFD_FEATURE_WP_UNPOPULATED,
};
use crate::uffd::{UffdError, Userfaultfd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use vm_memory::{
    mmap::MmapRegionBuilder, Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

/// Errors of guest RAM set-up and access.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// The size is zero or not a multiple of the 4 KiB page size.
    #[error("guest memory size {0:#x} is not a non-zero multiple of 4 KiB")]
    BadSize(u64),
    /// `fault_around_pages` is not a power of two in 1..=512.
    #[error("fault-around of {0} pages is not a power of two between 1 and 512")]
    BadFaultAround(u64),
    /// userfaultfd is unavailable.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// A region could not be set up.
    #[error(transparent)]
    Region(#[from] CoreError),
    /// The fault engine's threads could not start.
    #[error("cannot start the fault engine: {0}")]
    Engine(std::io::Error),
    /// vm-memory refused the region.
    #[error("cannot describe guest memory to vm-memory: {0}")]
    Describe(String),
    /// The page is poisoned (a memory error).
    #[error("guest-physical page {0:#x} is poisoned (a memory error)")]
    Poisoned(u64),
    /// Releasing pages failed.
    #[error("cannot discard guest pages: {0}")]
    Discard(std::io::Error),
    /// A device asked for a page it has not pinned, or held twice.
    #[error("guest-physical page {0:#x}: {1}")]
    Device(u64, &'static str),
    /// A device write (or a read-write pin) aimed at a read-only region.
    #[error("guest-physical page {0:#x} lies in a read-only region: the write is refused")]
    ReadOnly(u64),
    /// The range holds pinned pages (a device holds them).
    #[error("guest-physical page {0:#x} is pinned by a device")]
    Pinned(u64),
    /// Making the range private and present for a pin failed.
    #[error("cannot unshare guest pages for a pin: {0}")]
    Pin(std::io::Error),
    /// An access fell outside guest RAM.
    #[error("guest-physical range {addr:#x}+{len:#x} is outside guest RAM (or not page-aligned)")]
    OutOfRange {
        /// First guest-physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// How guest RAM is backed and populated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamConfig {
    /// The backing of the RAM region(s).
    pub backing: BackingKind,
    /// Ask for transparent huge pages.
    pub thp: bool,
    /// Fault-around window in pages (power of two, 1..=512).
    pub fault_around_pages: u64,
    /// Fault handler threads.
    pub handler_threads: usize,
    /// Open the userfaultfd with `UFFD_FEATURE_WP_ASYNC` (the `uffd-async`
    /// tracker): write-protect faults are then resolved by the kernel, so
    /// synchronous write-protect (live snapshots, `uffd-wp`) is impossible.
    pub wp_async: bool,
    /// Missing pages are put into a page cache shared with other VMs (see
    /// [`GuestRam::set_shared_cache`]) and mapped from there, instead of
    /// being copied into this VM privately: registers minor faults too.
    pub shared_cache: bool,
    /// How the guest will access its RAM: the boot regions' hint (the NUMA
    /// scanner's rule 9) and the kernel's (`madvise`).
    pub hint: crate::region::AccessHint,
}

impl Default for RamConfig {
    fn default() -> Self {
        RamConfig {
            backing: BackingKind::Memfd,
            thp: false,
            fault_around_pages: 16,
            handler_threads: 1,
            wp_async: false,
            shared_cache: false,
            hint: crate::region::AccessHint::Normal,
        }
    }
}

/// Memory statistics for reports.
#[derive(Clone, Debug)]
pub struct MemoryStats {
    /// The backing.
    pub backing: BackingKind,
    /// Pages populated (from the table, or resident pages for `plain`).
    pub populated_pages: u64,
    /// Fault counters (all zero for `plain`).
    pub faults: FaultStats,
    /// The fault-around window.
    pub fault_around_pages: u64,
    /// Bytes of table memory.
    pub table_bytes: u64,
    /// The live regions.
    pub regions: Vec<RegionStats>,
    /// THP was asked for.
    pub thp_requested: bool,
    /// Bytes the host backs with huge pages now (from /proc/self/smaps).
    pub thp_bytes: Option<u64>,
    /// Poisoned pages (guest-physical addresses; rule 12's markers).
    pub poisoned_pages: Vec<u64>,
}

/// One region's part of [`MemoryStats`].
#[derive(Clone, Debug)]
pub struct RegionStats {
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// vCPUs that faulted on it (bit = vCPU id % 64).
    pub accessors: u64,
    /// Its access hint.
    pub hint: crate::region::AccessHint,
    /// The guest may not write it (a ROM).
    pub read_only: bool,
    /// Shared, not copy-on-write (memory shared with the host).
    pub shared: bool,
}

/// Guest RAM.
pub struct GuestRam {
    // Field order is drop order: the engine stops before the core (and the
    // mappings it owns) goes away.
    engine: Option<FaultEngine>,
    pub(crate) core: Arc<MemoryCore>,
    memory: GuestMemoryMmap,
    boot_regions: Vec<Arc<Region>>,
    rom: Option<Arc<Region>>,
    shared_file: Option<Arc<Region>>,
    size: u64,
    config: RamConfig,
    pub(crate) host_dirty: HostDirtyLog,
}

/// The userfaultfd features the fault engine needs, and those it uses when present.
fn uffd_features(backing: BackingKind, wp_async: bool, shared_cache: bool) -> (u64, u64) {
    let mut required = UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_PAGEFAULT_FLAG_WP;
    if shared_cache {
        required |= crate::uffd::sys::UFFD_FEATURE_MINOR_SHMEM;
    }
    if backing == BackingKind::Memfd {
        required |= UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    }
    if wp_async {
        required |= UFFD_FEATURE_WP_ASYNC;
    }
    (required, UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_POISON)
}

impl GuestRam {
    /// Guest RAM of `size` bytes at guest-physical 0, one region, backed and
    /// populated as `config` says.
    pub fn new(size: u64, config: RamConfig) -> Result<GuestRam, RamError> {
        GuestRam::with_mapping(size, config, None)
    }

    /// Guest RAM that starts as a private (copy-on-write) mapping of `file`,
    /// e.g. a snapshot's `memory.bin`. With `config.backing` `anon` the
    /// fault engine serves the file's holes (userfaultfd registers on a
    /// private mapping of a tmpfs file, not of an ext4 one); with `plain`
    /// the kernel does.
    pub fn from_file_private(
        size: u64,
        config: RamConfig,
        file: &std::fs::File,
    ) -> Result<GuestRam, RamError> {
        let mapping =
            crate::region::HostMapping::from_file_private(file, size).map_err(CoreError::from)?;
        GuestRam::with_mapping(size, config, Some(mapping))
    }

    fn with_mapping(
        size: u64,
        config: RamConfig,
        mapping: Option<crate::region::HostMapping>,
    ) -> Result<GuestRam, RamError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(RamError::BadSize(size));
        }
        let fa = config.fault_around_pages;
        if !(1..=512).contains(&fa) || !fa.is_power_of_two() {
            return Err(RamError::BadFaultAround(fa));
        }
        let uffd = if config.backing.uses_fault_engine() {
            let (required, optional) =
                uffd_features(config.backing, config.wp_async, config.shared_cache);
            Some(Userfaultfd::open(required, optional)?)
        } else {
            None
        };
        let mut core = MemoryCore::new(uffd, fa).map_err(CoreError::from)?;
        core.minor_faults = config.shared_cache;
        let core = Arc::new(core);
        let engine = if config.backing.uses_fault_engine() {
            Some(
                FaultEngine::start(core.clone(), config.handler_threads)
                    .map_err(RamError::Engine)?,
            )
        } else {
            None
        };
        let region = core.add_region(
            0,
            size,
            RegionFlags {
                hint: config.hint,
                ..RegionFlags::default()
            },
            config.backing,
            config.thp,
            mapping,
        )?;
        if config.hint != crate::region::AccessHint::Normal {
            // SAFETY: advice over the region's own live mapping; it changes
            // no content.
            let rc = unsafe {
                libc::madvise(
                    region.host_start() as *mut libc::c_void,
                    size as usize,
                    config.hint.advice(),
                )
            };
            if rc != 0 {
                log::warn!(
                    "madvise({}) on guest RAM: {}",
                    config.hint.name(),
                    std::io::Error::last_os_error()
                );
            }
        }
        let memory = vm_memory_view(std::slice::from_ref(&region))?;
        Ok(GuestRam {
            engine,
            core,
            memory,
            boot_regions: vec![region],
            rom: None,
            shared_file: None,
            size,
            config,
            host_dirty: HostDirtyLog::new(),
        })
    }

    /// Splits boot RAM into one region per guest NUMA node, of `sizes`
    /// bytes each (page multiples adding up to the RAM size), in order
    /// from guest-physical 0. The regions share the one host mapping (so
    /// one KVM memory slot, one backing file, one snapshot image) and each
    /// gets its own lock, accessor bitmap and host memory policy. Call
    /// before the guest runs; one size leaves RAM as it is.
    pub fn split_into_nodes(&mut self, sizes: &[u64]) -> Result<(), RamError> {
        if sizes.len() <= 1 && sizes.iter().all(|s| *s == self.size) {
            return Ok(());
        }
        let [boot] = self.boot_regions.as_slice() else {
            return Err(RamError::Describe(
                "guest RAM is split into NUMA nodes already".into(),
            ));
        };
        self.boot_regions = self.core.split_region(boot.id, sizes)?;
        Ok(())
    }

    /// Makes the last `bytes` of guest memory a read-only region (a ROM):
    /// the guest may read it, a device pin for writing is refused and an
    /// unshare there does nothing (rule 14); the VMM loads it with
    /// [`GuestRam::write`] before the guest runs. It is carved from the
    /// last boot region (so it shares that region's mapping, backing file
    /// and snapshot image) and is not one of [`GuestRam::boot_regions`].
    /// Call once, after [`GuestRam::split_into_nodes`], before the guest
    /// runs.
    pub fn set_rom(&mut self, bytes: u64) -> Result<Arc<Region>, RamError> {
        if self.rom.is_some() {
            return Err(RamError::Describe("guest memory has a ROM already".into()));
        }
        let rom = self.carve_top(
            bytes,
            |f| RegionFlags {
                read_only: true,
                ..f
            },
            None,
        )?;
        self.rom = Some(rom.clone());
        Ok(rom)
    }

    /// Makes the top of guest memory (below the ROM, if any) a shared
    /// region: `file`, all of it, mapped shared (`MAP_SHARED`) over that
    /// part of guest RAM's mapping. It is not copy-on-write: the guest's
    /// and devices' writes reach the file, whoever else maps it sees them,
    /// and a pin's unshare does nothing there (rule 14). The kernel serves
    /// its faults (the fault engine and the table do not see it), so
    /// write-protect tracking and live snapshots pass it by
    /// ([`GuestRam::engine_regions`]) and a fork keeps it shared. Call
    /// once, after [`GuestRam::split_into_nodes`], before the guest runs.
    pub fn set_shared_file(&mut self, file: &std::fs::File) -> Result<Arc<Region>, RamError> {
        if self.shared_file.is_some() {
            return Err(RamError::Describe(
                "guest memory has a shared file region already".into(),
            ));
        }
        let len = file
            .metadata()
            .map_err(|e| RamError::Describe(format!("the shared file: {e}")))?
            .len();
        // Mapped first, so that a failure leaves the regions as they were.
        let last = self.top_fit(len)?;
        let host = last.host_start() + (last.size - len);
        // SAFETY: replaces the top `len` bytes of the last boot region's
        // part of guest RAM's own mapping (checked to lie inside it),
        // before the guest runs and before anything else maps them, by a
        // shared mapping of `file` (all of it) at the same address; the
        // mapping's owner unmaps the whole range later.
        let addr = unsafe {
            libc::mmap(
                host as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                std::os::fd::AsRawFd::as_raw_fd(file),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(RamError::Describe(format!(
                "mapping the shared file into guest memory: {}",
                std::io::Error::last_os_error()
            )));
        }
        let region = self.carve_top(
            len,
            |f| RegionFlags { shared: true, ..f },
            Some(BackingKind::Plain),
        )?;
        self.shared_file = Some(region.clone());
        Ok(region)
    }

    /// Splits the top `bytes` off the last boot region into a region of
    /// its own with the flags `flags` makes of the last region's (and
    /// `backing`, if given).
    fn carve_top(
        &mut self,
        bytes: u64,
        flags: impl FnOnce(RegionFlags) -> RegionFlags,
        backing: Option<BackingKind>,
    ) -> Result<Arc<Region>, RamError> {
        let last = self.top_fit(bytes)?;
        let (head, top) = self
            .core
            .split_off_tail(last.id, bytes, flags(last.flags), backing)?;
        if let Some(slot) = self.boot_regions.last_mut() {
            *slot = head;
        }
        Ok(top)
    }

    /// The last boot region, when `bytes` can be carved from its top.
    fn top_fit(&self, bytes: u64) -> Result<Arc<Region>, RamError> {
        let Some(last) = self.boot_regions.last().cloned() else {
            return Err(RamError::Describe("guest RAM has no region".into()));
        };
        if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE) || bytes >= last.size {
            return Err(RamError::Describe(format!(
                "a region of {bytes:#x} bytes does not fit below the top of guest memory: it must be a page multiple smaller than the last region ({:#x} bytes)",
                last.size
            )));
        }
        Ok(last)
    }

    /// The ROM region, if [`GuestRam::set_rom`] made one.
    pub fn rom(&self) -> Option<&Arc<Region>> {
        self.rom.as_ref()
    }

    /// The shared file region, if [`GuestRam::set_shared_file`] made one.
    pub fn shared_file(&self) -> Option<&Arc<Region>> {
        self.shared_file.as_ref()
    }

    /// True when the fault engine serves the page at `gpa` (guest RAM of
    /// a `memfd` or `anon` backing; not a shared file the kernel serves).
    pub fn engine_serves(&self, gpa: u64) -> bool {
        self.core.uffd.is_some()
            && self
                .region_for(gpa, 0)
                .is_ok_and(|r| r.backing.uses_fault_engine())
    }

    /// Bytes of guest memory the guest may write: all of it but the ROM.
    pub fn writable_bytes(&self) -> u64 {
        self.size - self.rom.as_ref().map_or(0, |r| r.size)
    }

    /// Anonymous RAM without the fault engine (kernel-managed).
    pub fn new_anonymous(size: u64) -> Result<GuestRam, RamError> {
        GuestRam::new(
            size,
            RamConfig {
                backing: BackingKind::Plain,
                ..RamConfig::default()
            },
        )
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The configuration.
    pub fn config(&self) -> RamConfig {
        self.config
    }

    /// Host virtual address of guest-physical address 0.
    pub fn host_addr(&self) -> u64 {
        self.boot_regions[0].mapping.addr()
    }

    /// The RAM regions created at boot (one KVM memory slot each).
    pub fn boot_regions(&self) -> &[Arc<Region>] {
        &self.boot_regions
    }

    /// The table of per-page state.
    pub fn table(&self) -> &Stage2Table {
        &self.core.table
    }

    /// The vm-memory view, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Serves missing faults from `source` instead of zero pages (lazy
    /// restore). Must be set before the guest touches memory; a second call
    /// is refused.
    pub fn set_page_source(
        &self,
        source: Arc<dyn crate::core::PageSource>,
    ) -> Result<(), RamError> {
        if !self.config.backing.uses_fault_engine() {
            return Err(RamError::Describe(
                "a page source needs the fault engine".into(),
            ));
        }
        self.core
            .page_source
            .set(source)
            .map_err(|_| RamError::Describe("the page source is set already".into()))
    }

    /// Populates `[start, end)` from the page source now, in large copies,
    /// instead of fault by fault (a lazy restore's prefetch). Returns the
    /// pages populated; an error names what could not be served (and is
    /// poisoned).
    pub fn prefill(&self, start: u64, end: u64) -> Result<u64, String> {
        self.core.prefill(start, end.min(self.size))
    }

    /// Records the pages that the private file mapping of
    /// [`GuestRam::from_file_private`] already backs (`pages`: guest page
    /// numbers whose content is the file's). The table then shows them
    /// populated, not exclusive (they are the page cache's until written),
    /// so fault-around fills only the holes around a fault and never covers
    /// file content with zeros (rule 4), and live and diff snapshots copy
    /// them. Call before anything runs in the guest. Returns the pages
    /// recorded (pages already populated are left as they are).
    pub fn mark_file_backed(&self, pages: &[u64]) -> Result<u64, RamError> {
        let regions = self.regions();
        let mut recorded = 0;
        for &page in pages {
            let gpa = page * PAGE_SIZE;
            self.check(gpa, PAGE_SIZE)?;
            let region =
                regions
                    .iter()
                    .find(|r| r.contains_gpa(gpa))
                    .ok_or(RamError::OutOfRange {
                        addr: gpa,
                        len: PAGE_SIZE,
                    })?;
            let frame = crate::entry::Frame(region.mapping_offset(gpa) / PAGE_SIZE);
            // The image's page until the guest writes it (then the kernel
            // copies it; `refresh_sharing` records that).
            let entry =
                Entry::page(frame, !region.flags.read_only).with(crate::entry::Flag::CowShared);
            let (old, _) = self
                .core
                .table
                .update(gpa, |e| e.is_empty().then_some(entry))
                .map_err(|e| RamError::Describe(format!("recording page {gpa:#x}: {e}")))?;
            if old.is_empty() {
                recorded += 1;
            }
        }
        Ok(recorded)
    }

    /// Rule 12: marks the unpopulated page at `gpa` poisoned (a memory
    /// error): the guest touching it gets a memory error, the VMM's own
    /// accesses are refused, never zeros. Needs the fault engine.
    pub fn poison_page(&self, gpa: u64, why: &str) -> Result<(), RamError> {
        let gpa = gpa & !(PAGE_SIZE - 1);
        self.check(gpa, PAGE_SIZE)?;
        if self.core.uffd.is_none() {
            return Err(RamError::Describe(
                "poisoning a page needs the fault engine (--backing memfd or anon)".into(),
            ));
        }
        if !self.core.table.get(gpa).is_empty() {
            return Err(RamError::Describe(format!(
                "page {gpa:#x} is populated: only an unpopulated page can be poisoned"
            )));
        }
        let region = self.region_for(gpa, PAGE_SIZE)?;
        self.core.poison(&region, gpa, gpa + PAGE_SIZE, why);
        self.take_memory_errors();
        Ok(())
    }

    /// The poisoned pages the table records (guest-physical addresses).
    pub fn poisoned_pages(&self) -> Vec<u64> {
        struct Poisoned(Vec<u64>);
        impl Walker for Poisoned {
            fn leaf(&mut self, gpa: u64, e: Entry) -> WalkAction {
                if e.marker_kind() == Some(crate::entry::Marker::Poisoned) {
                    self.0.push(gpa);
                }
                WalkAction::Continue
            }
        }
        let mut p = Poisoned(Vec::new());
        self.core.table.walk_range(0, self.size, &mut p);
        p.0
    }

    /// Memory errors met while serving faults (ranges poisoned), drained.
    pub fn take_memory_errors(&self) -> Vec<String> {
        std::mem::take(&mut *self.core.memory_errors.lock_or_recover())
    }

    /// Records that the calling thread runs vCPU `vcpu`, so faults it takes
    /// are attributed to that vCPU (userfaultfd reports the thread id).
    pub fn register_vcpu_thread(&self, vcpu: u32) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        self.core.register_vcpu_thread(tid, vcpu);
    }

    /// Adds a region at `gpa` (not part of the vm-memory view).
    pub fn add_region(
        &self,
        gpa: u64,
        size: u64,
        flags: RegionFlags,
    ) -> Result<Arc<Region>, RamError> {
        Ok(self
            .core
            .add_region(gpa, size, flags, self.config.backing, self.config.thp, None)?)
    }

    /// Removes a region added with [`GuestRam::add_region`].
    pub fn remove_region(&self, id: u64) -> Result<(), RamError> {
        if self.boot_regions.iter().any(|r| r.id == id) {
            return Err(RamError::Region(CoreError::NoSuchRegion(id)));
        }
        Ok(self.core.remove_region(id)?)
    }

    /// The region holding all of `[gpa, gpa + len)` (`len` 0: the byte
    /// at `gpa`).
    pub fn region_for(&self, gpa: u64, len: u64) -> Result<Arc<Region>, RamError> {
        let end = gpa
            .checked_add(len.max(1))
            .ok_or(RamError::OutOfRange { addr: gpa, len })?;
        self.regions()
            .into_iter()
            .find(|r| r.contains_gpa(gpa) && end <= r.gpa + r.size)
            .ok_or(RamError::OutOfRange { addr: gpa, len })
    }

    /// The live regions the fault engine serves (not a shared file the
    /// kernel serves): what write-protection, sampling and live snapshots
    /// cover.
    pub fn engine_regions(&self) -> Vec<Arc<Region>> {
        let mut regions = self.regions();
        regions.retain(|r| r.backing.uses_fault_engine());
        regions
    }

    /// The live regions.
    pub fn regions(&self) -> Vec<Arc<Region>> {
        self.core.regions.load().iter().cloned().collect()
    }

    /// Fault counters.
    pub fn fault_stats(&self) -> FaultStats {
        self.core.counters.snapshot()
    }

    /// Pages the table records as populated in `[start, end)`.
    pub fn populated_pages_in(&self, start: u64, end: u64) -> u64 {
        struct Count(u64);
        impl Walker for Count {
            fn leaf(&mut self, _gpa: u64, e: Entry) -> WalkAction {
                if e.is_present() {
                    self.0 += 1;
                }
                WalkAction::Continue
            }
            fn huge(&mut self, level: u8, _s: u64, e: Entry) -> WalkAction {
                if e.is_present() {
                    self.0 += crate::table::level_size(level) / PAGE_SIZE;
                }
                WalkAction::Continue
            }
        }
        let mut c = Count(0);
        self.core.table.walk_range(start, end, &mut c);
        c.0
    }

    /// Sets the page cache shared with other VMs that this VM's missing
    /// pages are put into and mapped from: the file this VM's RAM maps
    /// privately (see [`GuestRam::from_file_private`]), opened with
    /// `RamConfig::shared_cache`. Set once, before anything runs.
    pub fn set_shared_cache(&self, cache: std::fs::File) -> Result<(), RamError> {
        if !self.config.shared_cache {
            return Err(RamError::Describe(
                "a shared page cache needs RamConfig::shared_cache (minor faults)".into(),
            ));
        }
        self.core
            .shared_cache
            .set(cache)
            .map_err(|_| RamError::Describe("the shared page cache is set already".into()))
    }

    /// The guest page numbers the vCPUs' demand faults (and a restore's
    /// prefetch) populated, in first-touch order, each once: the working
    /// set a snapshot records for prefetch.
    pub fn access_order(&self) -> Vec<u64> {
        self.core.access_order.pages()
    }

    /// Guest page numbers that may hold non-zero data, in order: present,
    /// non-zero-page table entries for the fault engine's backings,
    /// resident pages for `plain` memory.
    pub fn populated_pages(&self) -> Vec<u64> {
        if !self.config.backing.uses_fault_engine() {
            return self
                .boot_regions
                .iter()
                .flat_map(|r| resident_pages(r))
                .collect();
        }
        struct Pages(Vec<u64>);
        impl Walker for Pages {
            fn leaf(&mut self, gpa: u64, e: Entry) -> WalkAction {
                if e.is_present() && !e.is_zero_page() {
                    self.0.push(gpa / PAGE_SIZE);
                }
                WalkAction::Continue
            }
        }
        let mut p = Pages(Vec::new());
        self.core.table.walk_range(0, u64::MAX, &mut p);
        p.0
    }

    /// Statistics for reports.
    pub fn stats(&self) -> MemoryStats {
        let populated_pages = if self.config.backing.uses_fault_engine() {
            self.populated_pages_in(0, u64::MAX)
        } else {
            self.boot_regions
                .iter()
                .map(|r| resident_pages(r).len() as u64)
                .sum()
        };
        MemoryStats {
            backing: self.config.backing,
            populated_pages,
            faults: self.fault_stats(),
            fault_around_pages: self.config.fault_around_pages,
            table_bytes: self.core.table.table_bytes() as u64,
            regions: self
                .core
                .regions
                .load()
                .iter()
                .map(|r| RegionStats {
                    gpa: r.gpa,
                    size: r.size,
                    accessors: r.accessors.load(Ordering::Relaxed),
                    hint: r.flags.hint,
                    read_only: r.flags.read_only,
                    shared: r.flags.shared,
                })
                .collect(),
            thp_requested: self.config.thp,
            thp_bytes: self
                .config
                .thp
                .then(|| self.boot_regions.iter().map(|r| thp_bytes(r)).sum()),
            poisoned_pages: self.poisoned_pages(),
        }
    }

    /// Bounds, and rule 12: a poisoned page is an error, never read or
    /// written (touching it would raise SIGBUS in the VMM itself).
    fn check(&self, addr: u64, len: u64) -> Result<(), RamError> {
        let end = match addr.checked_add(len) {
            Some(end) if end <= self.size => end,
            _ => return Err(RamError::OutOfRange { addr, len }),
        };
        let mut page = addr & !(PAGE_SIZE - 1);
        let source = self.core.page_source.get();
        while page < end {
            let e = self.core.table.get(page);
            if e.marker_kind() == Some(crate::entry::Marker::Poisoned) {
                return Err(RamError::Poisoned(page));
            }
            if let Some(src) = source {
                if e.is_empty() && src.check(page).is_err() {
                    return Err(RamError::Poisoned(page));
                }
            }
            page += PAGE_SIZE;
        }
        Ok(())
    }

    /// Copies `data` into guest RAM at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), RamError> {
        self.check(addr, data.len() as u64)?;
        self.host_dirty.mark(addr, data.len() as u64);
        self.memory
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| RamError::OutOfRange {
                addr,
                len: data.len() as u64,
            })
    }

    /// Copies guest RAM at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), RamError> {
        self.check(addr, buf.len() as u64)?;
        self.memory
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| RamError::OutOfRange {
                addr,
                len: buf.len() as u64,
            })
    }

    /// Atomically stores an aligned 64-bit word (release ordering).
    pub fn store_u64(&self, addr: u64, value: u64) -> Result<(), RamError> {
        self.check(addr, 8)?;
        self.host_dirty.mark(addr, 8);
        self.memory
            .store(value, GuestAddress(addr), Ordering::Release)
            .map_err(|_| RamError::OutOfRange { addr, len: 8 })
    }

    /// Atomically loads an aligned 64-bit word (acquire ordering).
    pub fn load_u64(&self, addr: u64) -> Result<u64, RamError> {
        self.check(addr, 8)?;
        self.memory
            .load(GuestAddress(addr), Ordering::Acquire)
            .map_err(|_| RamError::OutOfRange { addr, len: 8 })
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // Stop the handler threads while the mappings still exist.
        self.engine.take();
    }
}

/// A vm-memory view over regions' mappings (which it does not own).
fn vm_memory_view(regions: &[Arc<Region>]) -> Result<GuestMemoryMmap, RamError> {
    let mut mm = Vec::new();
    for r in regions {
        let (prot, flags) = match r.backing {
            BackingKind::Memfd => (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED),
            _ => (
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            ),
        };
        // SAFETY: the region's mapping is live for `size` bytes with this
        // protection and stays mapped while the GuestRam (which owns both
        // the view and, through the core, the region) exists.
        let region: MmapRegion = unsafe {
            MmapRegionBuilder::new(r.size as usize)
                .with_raw_mmap_pointer(r.mapping.addr() as *mut u8)
                .with_mmap_prot(prot)
                .with_mmap_flags(flags)
                .build()
        }
        .map_err(|e| RamError::Describe(e.to_string()))?;
        mm.push(
            GuestRegionMmap::new(region, GuestAddress(r.gpa))
                .ok_or_else(|| RamError::Describe("region overflows the address space".into()))?,
        );
    }
    GuestMemoryMmap::from_regions(mm).map_err(|e| RamError::Describe(e.to_string()))
}

/// Guest page numbers of a region's resident pages (`mincore`), for
/// kernel-managed memory.
fn resident_pages(r: &Region) -> Vec<u64> {
    let pages = (r.size / PAGE_SIZE) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: the mapping is live and `vec` has one byte per page.
    let rc = unsafe {
        libc::mincore(
            r.host_start() as *mut libc::c_void,
            r.size as usize,
            vec.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Vec::new();
    }
    vec.iter()
        .enumerate()
        .filter(|(_, b)| *b & 1 != 0)
        .map(|(i, _)| r.gpa / PAGE_SIZE + i as u64)
        .collect()
}

/// Bytes of a region's mapping backed by huge pages, from /proc/self/smaps.
fn thp_bytes(r: &Region) -> u64 {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let start = format!("{:x}-", r.host_start());
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        if line.chars().next().is_some_and(|c| c.is_ascii_hexdigit())
            && line.contains('-')
            && line.contains(' ')
        {
            inside = line.starts_with(&start);
            continue;
        }
        if !inside {
            continue;
        }
        for key in ["AnonHugePages:", "ShmemPmdMapped:", "FilePmdMapped:"] {
            if let Some(v) = line.strip_prefix(key) {
                total += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
                    * 1024;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ram_maps_zeroed_memory_and_checks_bounds() {
        let ram = GuestRam::new_anonymous(1 << 20).expect("map 1 MiB");
        assert_eq!(ram.load_u64(0x1000).expect("load"), 0);
        ram.store_u64(0x1000, 42).expect("store");
        assert_eq!(ram.load_u64(0x1000).expect("load"), 42);
        let mut buf = [0u8; 8];
        ram.read(0x1000, &mut buf).expect("read");
        assert_eq!(u64::from_le_bytes(buf), 42);
        assert!(matches!(
            ram.load_u64(1 << 20),
            Err(RamError::OutOfRange { .. })
        ));
        assert!(matches!(
            ram.write(u64::MAX, &[1]),
            Err(RamError::OutOfRange { .. })
        ));
        assert_eq!(ram.stats().populated_pages, 1);
    }

    #[test]
    fn rejects_bad_sizes_and_fault_around() {
        assert!(matches!(
            GuestRam::new_anonymous(0),
            Err(RamError::BadSize(0))
        ));
        assert!(matches!(
            GuestRam::new_anonymous(4097),
            Err(RamError::BadSize(4097))
        ));
        let bad = RamConfig {
            fault_around_pages: 3,
            ..RamConfig::default()
        };
        assert!(matches!(
            GuestRam::new(1 << 20, bad),
            Err(RamError::BadFaultAround(3))
        ));
    }
}
