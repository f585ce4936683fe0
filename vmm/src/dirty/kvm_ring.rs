//! `kvm-ring`: the per-vCPU KVM dirty ring (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`
//! where available). Enabled before vCPUs exist; each ring is mapped from its
//! vCPU fd; a harvest collects the entries KVM published, marks them for
//! reset and calls `KVM_RESET_DIRTY_RINGS`. A vCPU whose ring fills up exits
//! with `KVM_EXIT_DIRTY_RING_FULL` and drains its own ring from its thread.
//! Rings tell which vCPU wrote which page: the attribution is kept.

use super::{DirtyTracker, Harvest, RingFullHandler, TrackCtx, TrackError, TrackerKind};
use guest_mem::LockOrRecover;
use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

/// Entries per ring (16 bytes each: 256 KiB per vCPU). This host's KVM
/// logs every emulated write, not each page's first: a pass of a few
/// hundred page stores fills about 4500 entries, so a ring holds a round
/// without a ring-full exit.
pub const RING_ENTRIES: u32 = 16384;
const GFN_DIRTY: u32 = 1 << 0;
const GFN_RESET: u32 = 1 << 1;

/// One vCPU's mapped ring and the index of the next entry to collect.
struct Ring {
    base: *mut kvm_dirty_gfn,
    next: u32,
}

// SAFETY: the ring is shared memory with KVM, accessed with atomics on the
// flags word and only under the Mutex that owns this struct.
unsafe impl Send for Ring {}

impl Ring {
    /// Entry `i` (modulo the ring) and its flags word.
    fn entry(&self, i: u32) -> (*mut kvm_dirty_gfn, &AtomicU32) {
        // SAFETY: i % RING_ENTRIES < RING_ENTRIES, inside the mapping made
        // in `after_vcpus`, which lives as long as the tracker.
        let entry = unsafe { self.base.add((i % RING_ENTRIES) as usize) };
        // SAFETY: `flags` is the first u32 of the entry, 4-aligned; KVM
        // publishes an entry by setting DIRTY with release ordering.
        (entry, unsafe { &*(entry as *const AtomicU32) })
    }

    /// Takes entry `i` if KVM published it: its page number (slot 0 only)
    /// goes to `out` and it is marked for reset. False when it is not
    /// published.
    fn take(&mut self, i: u32, out: &mut Vec<u64>) -> bool {
        let (entry, flags) = self.entry(i);
        if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
            return false;
        }
        // SAFETY: the entry is published (acquire above).
        let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
        if slot == 0 {
            out.push(offset);
        }
        flags.store(GFN_RESET, Ordering::Release);
        true
    }

    /// Collects published entries as guest page numbers, in ring order
    /// from where the last collection stopped.
    fn collect(&mut self, out: &mut Vec<u64>) {
        while self.take(self.next, out) {
            self.next = self.next.wrapping_add(1);
        }
    }

    /// A ring KVM says is full but that holds nothing to collect: KVM
    /// pushed past the ring's end (this host's KVM logs every emulated
    /// write, and can overrun the ring between its full checks), so it
    /// counts entries that were overwritten. Marks the next entry for
    /// reset, so the reset that follows moves KVM's reset index on by one;
    /// the ring-full exits that follow repeat it until KVM's count is
    /// back under its limit (one entry at a time, so the reset index
    /// never passes KVM's dirty index).
    fn skip_lost_entry(&mut self) {
        let (_, flags) = self.entry(self.next);
        if flags.load(Ordering::Acquire) == 0 {
            flags.store(GFN_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
        }
    }
}

/// The rings of every vCPU, shared with the vCPU threads for ring-full exits.
pub struct RingSet {
    rings: Vec<Mutex<Ring>>,
    /// Ring-full exits that found nothing to collect (KVM overran a ring).
    overruns: std::sync::atomic::AtomicU64,
    pending: Mutex<Vec<Vec<u64>>>,
    vm_fd: RawFd,
}

impl RingSet {
    fn reset(&self) -> Result<(), TrackError> {
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; `vm_fd` is the
        // VM's fd, which outlives every vCPU thread and the tracker.
        let r = unsafe { libc::ioctl(self.vm_fd, KVM_RESET_DIRTY_RINGS() as _, 0) };
        if r < 0 {
            return Err(TrackError::Kvm {
                what: "KVM_RESET_DIRTY_RINGS",
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    /// Collects every ring (and what full rings left pending), then resets.
    fn harvest(&self) -> Result<Vec<Vec<u64>>, TrackError> {
        let mut per_vcpu = std::mem::take(&mut *self.pending.lock_or_recover());
        per_vcpu.resize(self.rings.len(), Vec::new());
        for (v, ring) in self.rings.iter().enumerate() {
            ring.lock_or_recover().collect(&mut per_vcpu[v]);
        }
        self.reset()?;
        Ok(per_vcpu)
    }
}

impl RingFullHandler for RingSet {
    fn ring_full(&self, vcpu: u32) -> Result<(), TrackError> {
        let mut got = Vec::new();
        if let Some(r) = self.rings.get(vcpu as usize) {
            let mut ring = r.lock_or_recover();
            ring.collect(&mut got);
            if got.is_empty() {
                // Overrun: the pages of the overwritten entries are lost
                // to this round (the accuracy check reports them).
                ring.skip_lost_entry();
                self.overruns.fetch_add(1, Ordering::Relaxed);
            }
        }
        {
            let mut p = self.pending.lock_or_recover();
            p.resize(self.rings.len(), Vec::new());
            p[vcpu as usize].extend(got);
        }
        self.reset()
    }
}

/// The `kvm-ring` backend.
pub struct KvmRingTracker {
    vcpus: u32,
    ring_bytes: usize,
    set: Option<Arc<RingSet>>,
    maps: Vec<(usize, usize)>,
}

impl KvmRingTracker {
    /// A tracker for `vcpus` vCPUs, not set up.
    pub fn new(vcpus: u32) -> KvmRingTracker {
        KvmRingTracker {
            vcpus,
            ring_bytes: RING_ENTRIES as usize * std::mem::size_of::<kvm_dirty_gfn>(),
            set: None,
            maps: Vec::new(),
        }
    }
}

impl DirtyTracker for KvmRingTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::KvmRing
    }

    fn before_vcpus(&mut self, vm: &VmFd) -> Result<(), TrackError> {
        let mut last = None;
        for cap in [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING] {
            let mut c = kvm_enable_cap {
                cap,
                ..Default::default()
            };
            c.args[0] = self.ring_bytes as u64;
            match vm.enable_cap(&c) {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(TrackError::Unsupported(format!(
            "this host's KVM has no dirty ring: {}",
            last.map_or("unknown".into(), |e| e.to_string())
        )))
    }

    fn after_vcpus(&mut self, vm: &VmFd, vcpus: &[VcpuFd]) -> Result<(), TrackError> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
        let mut rings = Vec::new();
        for (i, fd) in vcpus.iter().enumerate() {
            // SAFETY: maps the vCPU's dirty ring at the offset KVM defines;
            // the result is checked; the mapping is unmapped in Drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    self.ring_bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    KVM_DIRTY_LOG_PAGE_OFFSET as i64 * page,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(TrackError::RingMap(
                    i as u32,
                    std::io::Error::last_os_error(),
                ));
            }
            self.maps.push((p as usize, self.ring_bytes));
            rings.push(Mutex::new(Ring {
                base: p as *mut kvm_dirty_gfn,
                next: 0,
            }));
        }
        debug_assert_eq!(rings.len(), self.vcpus as usize);
        self.set = Some(Arc::new(RingSet {
            rings,
            overruns: Default::default(),
            pending: Mutex::new(Vec::new()),
            vm_fd: vm.as_raw_fd(),
        }));
        Ok(())
    }

    fn start(&mut self, ctx: &TrackCtx) -> Result<(), TrackError> {
        super::kvm_bitmap::set_slot_flags(ctx, KVM_MEM_LOG_DIRTY_PAGES)
    }

    fn harvest(&mut self, ctx: &TrackCtx) -> Result<Harvest, TrackError> {
        let set = self
            .set
            .as_ref()
            .ok_or_else(|| TrackError::Unsupported("dirty rings were not mapped".into()))?;
        let per_vcpu = set.harvest()?;
        let overruns = set.overruns.swap(0, Ordering::Relaxed);
        if overruns > 0 {
            log::warn!(
                "KVM overran a dirty ring ({overruns} entries lost): the round may miss pages"
            );
        }
        let mut pages: Vec<u64> = per_vcpu.iter().flatten().copied().collect();
        pages.sort_unstable();
        pages.dedup();
        let by_vcpu: Vec<Vec<u64>> = per_vcpu
            .into_iter()
            .map(|mut v| {
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect();
        // The rings say which vCPU wrote where: the NUMA scanner's
        // accessor bitmaps learn it (rule 1).
        for (vcpu, pages) in by_vcpu.iter().enumerate() {
            ctx.ram.note_writers(vcpu as u32, pages);
        }
        Ok(Harvest {
            pages,
            by_vcpu: Some(by_vcpu),
            scanned_bytes: 0,
        })
    }

    fn stop(&mut self, ctx: &TrackCtx) -> Result<(), TrackError> {
        super::kvm_bitmap::set_slot_flags(ctx, 0)
    }

    fn memory_bytes(&self) -> u64 {
        (self.ring_bytes * self.vcpus as usize) as u64
    }

    fn granularity(&self) -> &'static str {
        "4 KiB: while dirty logging is on, KVM maps the slot with 4 KiB pages (huge pages are split)"
    }

    fn ring_full_handler(&self) -> Option<Arc<dyn RingFullHandler>> {
        self.set.clone().map(|s| s as Arc<dyn RingFullHandler>)
    }
}

impl Drop for KvmRingTracker {
    fn drop(&mut self) {
        for (addr, len) in self.maps.drain(..) {
            // SAFETY: unmapping a ring mapped in `after_vcpus`; no vCPU
            // thread uses it any more (the runner joins them first).
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}
