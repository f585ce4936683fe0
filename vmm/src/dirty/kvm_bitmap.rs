//! `kvm-bitmap`: `KVM_GET_DIRTY_LOG` with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`
//! in initially-all-set mode (enabling logging write-protects nothing up
//! front) and `KVM_CLEAR_DIRTY_LOG` only over the 64-page chunks that were
//! dirty. kvm-ioctls has no `KVM_CLEAR_DIRTY_LOG`, so it is a raw ioctl here.

use super::{bitmap_pages, DirtyTracker, Harvest, TrackCtx, TrackError, TrackerKind};
use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_userspace_memory_region,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_clear_dirty_log
);

/// Largest chunk cleared by one ioctl (pages; a multiple of 64).
const CLEAR_CHUNK: u64 = 1 << 18;

/// The `kvm-bitmap` backend (memory slot 0).
pub struct KvmBitmapTracker {
    pages: u64,
}

impl KvmBitmapTracker {
    /// A tracker, not started.
    pub fn new() -> KvmBitmapTracker {
        KvmBitmapTracker { pages: 0 }
    }
}

impl Default for KvmBitmapTracker {
    fn default() -> Self {
        Self::new()
    }
}

/// Re-registers memory slot 0 over `ram`'s RAM with `flags` (its ROM,
/// if any, is another slot, read-only: never dirty).
pub(super) fn set_slot_flags(ctx: &TrackCtx, flags: u32) -> Result<(), TrackError> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags,
        guest_phys_addr: 0,
        memory_size: ctx.ram.writable_bytes(),
        userspace_addr: ctx.ram.host_addr(),
    };
    // SAFETY: the same live mapping as the slot already has; only the flags change.
    unsafe { ctx.vm.set_user_memory_region(region) }.map_err(|source| TrackError::Kvm {
        what: "setting dirty logging on the memory slot",
        source,
    })
}

/// Clears (and so re-protects) the pages of slot 0 set in `bits`, which
/// describes `num_pages` pages from `first_page` (a multiple of 64).
fn clear(vm: &VmFd, first_page: u64, num_pages: u64, bits: &[u64]) -> Result<(), TrackError> {
    debug_assert!(bits.len() as u64 * 64 >= num_pages);
    let arg = kvm_clear_dirty_log {
        slot: 0,
        num_pages: num_pages as u32,
        first_page,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bits.as_ptr() as *mut libc::c_void,
        },
    };
    // SAFETY: KVM reads `num_pages` bits from `bits`, which holds at least
    // that many; the struct is fully initialised.
    let r = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if r < 0 {
        return Err(TrackError::Kvm {
            what: "KVM_CLEAR_DIRTY_LOG",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}

impl DirtyTracker for KvmBitmapTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::KvmBitmap
    }

    fn start(&mut self, ctx: &TrackCtx) -> Result<(), TrackError> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET) as u64;
        ctx.vm.enable_cap(&cap).map_err(|source| TrackError::Kvm {
            what: "enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
            source,
        })?;
        set_slot_flags(ctx, KVM_MEM_LOG_DIRTY_PAGES)?;
        self.pages = ctx.ram.writable_bytes() / 4096;
        // Initially all set: clear everything once, so the first round holds
        // only the pages written from now on (this write-protects them).
        let ones = vec![u64::MAX; (CLEAR_CHUNK / 64) as usize];
        let mut first = 0u64;
        while first < self.pages {
            let n = CLEAR_CHUNK.min(self.pages - first);
            clear(ctx.vm, first, n, &ones)?;
            first += n;
        }
        Ok(())
    }

    fn harvest(&mut self, ctx: &TrackCtx) -> Result<Harvest, TrackError> {
        let bitmap = ctx
            .vm
            .get_dirty_log(0, ctx.ram.writable_bytes() as usize)
            .map_err(|source| TrackError::Kvm {
                what: "KVM_GET_DIRTY_LOG",
                source,
            })?;
        let mut pages = Vec::new();
        bitmap_pages(&bitmap, 0, &mut pages);
        // Clear only runs of words that had dirty bits.
        let mut i = 0;
        while i < bitmap.len() {
            if bitmap[i] == 0 {
                i += 1;
                continue;
            }
            let start = i;
            while i < bitmap.len() && bitmap[i] != 0 && (i - start) < (CLEAR_CHUNK / 64) as usize {
                i += 1;
            }
            let first = start as u64 * 64;
            let n = ((i - start) as u64 * 64).min(self.pages - first);
            clear(ctx.vm, first, n, &bitmap[start..])?;
        }
        Ok(Harvest {
            pages,
            by_vcpu: None,
            scanned_bytes: 0,
        })
    }

    fn stop(&mut self, ctx: &TrackCtx) -> Result<(), TrackError> {
        set_slot_flags(ctx, 0)
    }

    fn memory_bytes(&self) -> u64 {
        // KVM's bitmap: one bit per page (a harvest briefly holds a copy).
        self.pages.div_ceil(8)
    }

    fn granularity(&self) -> &'static str {
        "4 KiB: while dirty logging is on, KVM maps the slot with 4 KiB pages (huge pages are split)"
    }
}
