//! `soft-dirty`: `/proc/self/clear_refs` and pagemap bit 55 over the ranges
//! the table knows are populated. Kernels without `CONFIG_MEM_SOFT_DIRTY`
//! (like the one this was built on) are refused up front by
//! [`super::check_combination`].

use super::{DirtyTracker, Harvest, TrackCtx, TrackError, TrackerKind};
use guest_mem::tracking::soft_dirty::{clear_refs, pagemap_entries, supported, PM_SOFT_DIRTY};
use guest_mem::tracking::TrackError as MemError;

/// The `soft-dirty` backend.
pub struct SoftDirtyTracker;

impl DirtyTracker for SoftDirtyTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::SoftDirty
    }

    fn start(&mut self, _ctx: &TrackCtx) -> Result<(), TrackError> {
        if !supported() {
            return Err(MemError::SoftDirtyUnsupported.into());
        }
        clear_refs().map_err(|e| TrackError::Mem(MemError::Proc(e)))
    }

    fn harvest(&mut self, ctx: &TrackCtx) -> Result<Harvest, TrackError> {
        let mut pages = Vec::new();
        let mut scanned = 0;
        for r in ctx.ram.boot_regions() {
            let n = (r.size / 4096) as usize;
            let entries = pagemap_entries(r.host_start(), n)
                .map_err(|e| TrackError::Mem(MemError::Proc(e)))?;
            scanned += r.size;
            for (i, e) in entries.iter().enumerate() {
                if e & PM_SOFT_DIRTY != 0 {
                    pages.push(r.gpa / 4096 + i as u64);
                }
            }
        }
        clear_refs().map_err(|e| TrackError::Mem(MemError::Proc(e)))?;
        Ok(Harvest {
            pages,
            by_vcpu: None,
            scanned_bytes: scanned,
        })
    }

    fn stop(&mut self, _ctx: &TrackCtx) -> Result<(), TrackError> {
        Ok(())
    }

    fn memory_bytes(&self) -> u64 {
        0
    }

    fn granularity(&self) -> &'static str {
        "4 KiB; a transparent huge page that stays whole has one soft-dirty bit, reported for all its 4 KiB pages"
    }
}
