//! The state shared by guest RAM's owner and the fault engine's handler
//! threads: the region list, the global lock, the table and the userfaultfd.

use crate::fault::stats::FaultCounters;
use crate::region::{BackingKind, HostMapping, Region, RegionError, RegionFlags};
use crate::sync::LockOrRecover;
use crate::table::Stage2Table;
use crate::uffd::sys::{UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP};
use crate::uffd::{UffdError, Userfaultfd};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Errors adding or removing regions.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The region could not be created.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// userfaultfd registration failed.
    #[error("cannot register guest memory with userfaultfd: {0}")]
    Register(UffdError),
    /// No region has this id.
    #[error("no region with id {0}")]
    NoSuchRegion(u64),
}

/// A private, never-written zero buffer: the source of zero-filled copies.
pub(crate) struct ZeroSource {
    mapping: HostMapping,
}

impl ZeroSource {
    fn new(bytes: u64) -> Result<ZeroSource, RegionError> {
        Ok(ZeroSource {
            mapping: HostMapping::new(BackingKind::Plain, bytes, false)?,
        })
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.mapping.addr() as *const u8
    }
}

/// Shared memory-manager state.
pub(crate) struct MemoryCore {
    /// Live regions, replaced as a whole (RCU-style): faults read it
    /// without any lock.
    pub(crate) regions: ArcSwap<Vec<Arc<Region>>>,
    /// The `mmap_lock` analogue: region changes and first faults of a leaf table.
    pub(crate) global: Mutex<()>,
    pub(crate) table: Stage2Table,
    pub(crate) uffd: Option<Userfaultfd>,
    pub(crate) counters: FaultCounters,
    /// Fault-around window in pages (a power of two, 1..=512).
    pub(crate) fault_around: u64,
    pub(crate) zero: ZeroSource,
    /// Write-protect tracking in force (a [`WpMode`] as u8): the engine then
    /// populates pages write-protected, so no write escapes tracking.
    pub(crate) wp_mode: AtomicU8,
    /// The live snapshot in progress, if any: write-protect faults copy
    /// the page into it before the write goes ahead.
    pub(crate) live_copy: arc_swap::ArcSwapOption<crate::live_copy::LiveCopy>,
    /// Between a live snapshot's protect and its freeze: the pages that
    /// became writable (written, or populated) and must be protected again.
    pub(crate) live_window: Mutex<Option<Vec<u64>>>,
    /// Where missing pages come from when they are not zero (a snapshot
    /// being restored lazily).
    pub(crate) page_source: std::sync::OnceLock<Arc<dyn PageSource>>,
    /// Memory errors met while serving faults (poisoned ranges).
    pub(crate) memory_errors: Mutex<Vec<String>>,
    /// The guest's first-touch order of pages.
    pub(crate) access_order: crate::access_order::AccessOrder,
    /// Pin counts of the pages devices hold.
    pub(crate) pins: crate::pin::PinCounts,
    /// Register minor faults (a shared page cache serves this VM).
    pub(crate) minor_faults: bool,
    /// The page cache shared with other VMs that missing pages are put
    /// into and mapped from (`RamConfig::shared_cache`).
    pub(crate) shared_cache: std::sync::OnceLock<std::fs::File>,
    /// Write-sampling windows (the NUMA scanner): armed guest pages, each
    /// with the vCPUs (bit = id % 64) whose writes faulted on it.
    pub(crate) samples: Mutex<HashMap<u64, u64>>,
    /// Windows armed to be read from the KVM dirty rings are open.
    pub(crate) ring_sampling: AtomicBool,
    /// Pages a device holds exclusively (rule 6), each with the host
    /// addresses of the write faults waiting for it.
    pub(crate) device_held: Mutex<HashMap<u64, Vec<u64>>>,
    vcpu_tids: RwLock<HashMap<u32, u32>>,
    next_id: AtomicU64,
}

/// A source of page contents for missing faults (instead of zeros).
pub trait PageSource: Send + Sync {
    /// Fills `buf` with the guest-physical bytes at `gpa` (page-aligned,
    /// a whole number of pages, within one 2 MiB leaf table). An error
    /// means the content cannot be trusted: the pages are poisoned.
    fn fill(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String>;

    /// Whether the page at `gpa` can be served, without serving it: the VMM
    /// asks before touching a page itself, since touching a page that a
    /// failed fill poisons would kill the VMM with SIGBUS.
    fn check(&self, _gpa: u64) -> Result<(), String> {
        Ok(())
    }
}

/// Write-protect tracking state of the fault engine's userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WpMode {
    /// No write-protect tracking.
    Off = 0,
    /// Synchronous: each first write to a protected page is a fault the
    /// engine records and resolves.
    Sync = 1,
    /// `UFFD_FEATURE_WP_ASYNC`: the kernel resolves write faults itself;
    /// written pages are found with `PAGEMAP_SCAN`.
    Async = 2,
}

impl MemoryCore {
    pub(crate) fn new(
        uffd: Option<Userfaultfd>,
        fault_around: u64,
    ) -> Result<MemoryCore, RegionError> {
        Ok(MemoryCore {
            regions: ArcSwap::from_pointee(Vec::new()),
            global: Mutex::new(()),
            table: Stage2Table::new(),
            uffd,
            counters: FaultCounters::default(),
            fault_around,
            zero: ZeroSource::new(512 * crate::entry::PAGE_SIZE)?,
            wp_mode: AtomicU8::new(WpMode::Off as u8),
            live_copy: arc_swap::ArcSwapOption::empty(),
            live_window: Mutex::new(None),
            page_source: std::sync::OnceLock::new(),
            memory_errors: Mutex::new(Vec::new()),
            access_order: Default::default(),
            pins: Default::default(),
            device_held: Mutex::new(HashMap::new()),
            samples: Mutex::new(HashMap::new()),
            ring_sampling: AtomicBool::new(false),
            minor_faults: false,
            shared_cache: std::sync::OnceLock::new(),
            vcpu_tids: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    pub(crate) fn wp_mode(&self) -> WpMode {
        match self.wp_mode.load(Ordering::Acquire) {
            1 => WpMode::Sync,
            2 => WpMode::Async,
            _ => WpMode::Off,
        }
    }

    /// Notes pages a live snapshot must re-protect or must not copy.
    pub(crate) fn note_unprotected(&self, start: u64, end: u64) {
        if let Some(lc) = self.live_copy.load_full() {
            let mut gpa = start;
            while gpa < end {
                lc.mark_born(gpa / crate::entry::PAGE_SIZE);
                gpa += crate::entry::PAGE_SIZE;
            }
        }
        if let Some(w) = self.live_window.lock_or_recover().as_mut() {
            let mut gpa = start;
            while gpa < end {
                w.push(gpa);
                gpa += crate::entry::PAGE_SIZE;
            }
        }
    }

    pub(crate) fn vcpu_of(&self, tid: u32) -> Option<u32> {
        self.vcpu_tids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&tid)
            .copied()
    }

    pub(crate) fn register_vcpu_thread(&self, tid: u32, vcpu: u32) {
        self.vcpu_tids
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tid, vcpu);
    }

    /// Adds a region (under the global lock) and publishes the new list.
    pub(crate) fn add_region(
        &self,
        gpa: u64,
        size: u64,
        flags: RegionFlags,
        backing: BackingKind,
        thp: bool,
        mapping: Option<HostMapping>,
    ) -> Result<Arc<Region>, CoreError> {
        let page = crate::entry::PAGE_SIZE;
        if size == 0
            || !gpa.is_multiple_of(page)
            || !size.is_multiple_of(page)
            || gpa.checked_add(size).is_none()
        {
            return Err(RegionError::Unaligned { gpa, size }.into());
        }
        let _g = self.global.lock_or_recover();
        let current = self.regions.load_full();
        if let Some(o) = current
            .iter()
            .find(|r| gpa < r.gpa + r.size && r.gpa < gpa + size)
        {
            return Err(RegionError::Overlap {
                gpa,
                size,
                other: o.id,
            }
            .into());
        }
        let mapping = match mapping {
            Some(m) => m,
            None => HostMapping::new(backing, size, thp)?,
        };
        if backing.uses_fault_engine() {
            if let Some(u) = &self.uffd {
                let minor = if self.minor_faults {
                    crate::uffd::sys::UFFDIO_REGISTER_MODE_MINOR
                } else {
                    0
                };
                u.register(
                    mapping.addr(),
                    size,
                    UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP | minor,
                )
                .map_err(CoreError::Register)?;
            }
        }
        let region = Arc::new(Region {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            gpa,
            size,
            flags,
            guest_node: None,
            backing,
            mapping: Arc::new(mapping),
            offset: 0,
            accessors: AtomicU64::new(0),
            lock: Mutex::new(()),
            live: AtomicBool::new(true),
        });
        let mut list: Vec<Arc<Region>> = current.iter().cloned().collect();
        list.push(region.clone());
        list.sort_by_key(|r| r.gpa);
        self.regions.store(Arc::new(list));
        Ok(region)
    }

    /// Replaces region `id` by consecutive regions of `sizes` bytes (which
    /// add up to its size), guest node `i` each, sharing its mapping and
    /// its userfaultfd registration: one region per guest NUMA node over
    /// one host mapping (and one KVM memory slot). Call before any fault
    /// is served on the region.
    pub(crate) fn split_region(
        &self,
        id: u64,
        sizes: &[u64],
    ) -> Result<Vec<Arc<Region>>, CoreError> {
        self.split_region_with(id, |old| {
            sizes
                .iter()
                .enumerate()
                .map(|(node, size)| (*size, old.flags, Some(node as u32), old.backing))
                .collect()
        })
    }

    /// Replaces region `id` by two over its mapping: the first keeps its
    /// flags, node and backing, the last `tail` bytes get `tail_flags` and
    /// `tail_backing` (a ROM, or a shared file the kernel serves, at the
    /// top of guest memory). Call before any fault is served there.
    pub(crate) fn split_off_tail(
        &self,
        id: u64,
        tail: u64,
        tail_flags: RegionFlags,
        tail_backing: Option<BackingKind>,
    ) -> Result<(Arc<Region>, Arc<Region>), CoreError> {
        let parts = self.split_region_with(id, |old| {
            vec![
                (
                    old.size.saturating_sub(tail),
                    old.flags,
                    old.guest_node,
                    old.backing,
                ),
                (
                    tail,
                    tail_flags,
                    old.guest_node,
                    tail_backing.unwrap_or(old.backing),
                ),
            ]
        })?;
        match <[Arc<Region>; 2]>::try_from(parts) {
            Ok([head, tail]) => Ok((head, tail)),
            Err(_) => Err(CoreError::NoSuchRegion(id)),
        }
    }

    /// Replaces region `id` by consecutive regions of the (size, flags,
    /// guest node, backing) `parts` returns for it, which must add up to
    /// its size.
    fn split_region_with(
        &self,
        id: u64,
        parts: impl FnOnce(&Region) -> Vec<(u64, RegionFlags, Option<u32>, BackingKind)>,
    ) -> Result<Vec<Arc<Region>>, CoreError> {
        let _g = self.global.lock_or_recover();
        let current = self.regions.load_full();
        let old = current
            .iter()
            .find(|r| r.id == id)
            .ok_or(CoreError::NoSuchRegion(id))?;
        let page = crate::entry::PAGE_SIZE;
        let parts = parts(old);
        if parts.iter().any(|p| p.0 == 0 || !p.0.is_multiple_of(page))
            || parts.iter().try_fold(0u64, |a, p| a.checked_add(p.0)) != Some(old.size)
        {
            return Err(RegionError::Unaligned {
                gpa: old.gpa,
                size: old.size,
            }
            .into());
        }
        let mut regions = Vec::with_capacity(parts.len());
        let mut offset = old.offset;
        for (size, flags, guest_node, backing) in parts {
            regions.push(Arc::new(Region {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                gpa: old.gpa + (offset - old.offset),
                size,
                flags,
                guest_node,
                backing,
                mapping: old.mapping.clone(),
                offset,
                accessors: AtomicU64::new(0),
                lock: Mutex::new(()),
                live: AtomicBool::new(true),
            }));
            offset += size;
        }
        let mut list: Vec<Arc<Region>> = current.iter().filter(|r| r.id != id).cloned().collect();
        list.extend(regions.iter().cloned());
        list.sort_by_key(|r| r.gpa);
        self.regions.store(Arc::new(list));
        Ok(regions)
    }

    /// Removes a region: isolates it (no new fault can find it, rule 3),
    /// waits for a fault in flight on it, unregisters it from userfaultfd
    /// and frees its tables without per-entry locking.
    pub(crate) fn remove_region(&self, id: u64) -> Result<(), CoreError> {
        let _g = self.global.lock_or_recover();
        let current = self.regions.load_full();
        let region = current
            .iter()
            .find(|r| r.id == id)
            .cloned()
            .ok_or(CoreError::NoSuchRegion(id))?;
        region.live.store(false, Ordering::Release);
        let list: Vec<Arc<Region>> = current.iter().filter(|r| r.id != id).cloned().collect();
        self.regions.store(Arc::new(list));
        // A fault that found the region before it was isolated holds its lock.
        drop(region.lock.lock_or_recover());
        if region.backing.uses_fault_engine() {
            if let Some(u) = &self.uffd {
                if let Err(e) = u.unregister(region.host_start(), region.size) {
                    log::warn!("unregistering region {id}: {e}");
                }
            }
        }
        self.table.free_range(region.gpa, region.gpa + region.size);
        Ok(())
    }
}
