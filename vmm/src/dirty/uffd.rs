//! The userfaultfd write-protect backends, built on the memory layer's
//! primitives (`guest_mem::tracking`).

use super::{DirtyTracker, Harvest, TrackCtx, TrackError, TrackerKind};
use guest_mem::tracking::pagemap::Pagemap;

/// `uffd-wp`: synchronous write-protect; the first write to a page in a
/// round faults, the fault engine records it and un-protects the page.
pub struct UffdWpTracker;

impl DirtyTracker for UffdWpTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::UffdWp
    }

    fn start(&mut self, ctx: &TrackCtx) -> Result<(), TrackError> {
        Ok(ctx.ram.start_wp_tracking()?)
    }

    fn harvest(&mut self, ctx: &TrackCtx) -> Result<Harvest, TrackError> {
        Ok(Harvest {
            pages: ctx.ram.harvest_wp_sync()?,
            by_vcpu: None,
            scanned_bytes: 0,
        })
    }

    fn stop(&mut self, ctx: &TrackCtx) -> Result<(), TrackError> {
        Ok(ctx.ram.stop_wp_tracking()?)
    }

    fn memory_bytes(&self) -> u64 {
        // The state lives in the table's entries (the U bit).
        0
    }

    fn granularity(&self) -> &'static str {
        "4 KiB: the fault engine installs 4 KiB pages, and write-protecting splits any huge page"
    }
}

/// `uffd-async`: `WP_ASYNC` (the kernel resolves write faults itself) and
/// `PAGEMAP_SCAN` over the populated ranges, re-protecting in the same call.
#[derive(Default)]
pub struct UffdAsyncTracker {
    pagemap: Option<Pagemap>,
}

impl DirtyTracker for UffdAsyncTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::UffdAsync
    }

    fn start(&mut self, ctx: &TrackCtx) -> Result<(), TrackError> {
        self.pagemap = Some(Pagemap::open().map_err(|e| {
            TrackError::Unsupported(format!("cannot open /proc/self/pagemap: {e}"))
        })?);
        Ok(ctx.ram.start_wp_tracking()?)
    }

    fn harvest(&mut self, ctx: &TrackCtx) -> Result<Harvest, TrackError> {
        let pagemap = self
            .pagemap
            .as_ref()
            .ok_or_else(|| TrackError::Unsupported("uffd-async was not started".into()))?;
        let (pages, scanned_bytes) = ctx.ram.harvest_wp_async(pagemap)?;
        Ok(Harvest {
            pages,
            by_vcpu: None,
            scanned_bytes,
        })
    }

    fn stop(&mut self, ctx: &TrackCtx) -> Result<(), TrackError> {
        Ok(ctx.ram.stop_wp_tracking()?)
    }

    fn memory_bytes(&self) -> u64 {
        // PAGEMAP_SCAN's result vector.
        512 * 24
    }

    fn granularity(&self) -> &'static str {
        "4 KiB: the fault engine installs 4 KiB pages, and write-protecting splits any huge page"
    }
}
