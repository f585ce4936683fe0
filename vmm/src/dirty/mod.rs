//! Dirty-page tracking: every mechanism the kernel offers behind one
//! interface. A tracker starts, yields rounds of dirty guest page numbers,
//! and stops; [`Tracking`] merges in the VMM's own writes, feeds the table's
//! dirty bits and an accumulated dirty set, and keeps per-round statistics.
//!
//! Which trackers can run with which other mechanisms is worked out in
//! `docs/dirty-tracking.md`; [`check_combination`] refuses the impossible ones.

pub mod kvm_bitmap;
pub mod kvm_ring;
pub mod soft_dirty;
pub mod uffd;

use guest_mem::{BackingKind, GuestRam};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::Serialize;
use std::time::Instant;

/// The tracking backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackerKind {
    /// `KVM_GET_DIRTY_LOG` with manual protect and chunked `KVM_CLEAR_DIRTY_LOG`.
    KvmBitmap,
    /// The per-vCPU KVM dirty ring.
    KvmRing,
    /// Synchronous userfaultfd write-protect.
    UffdWp,
    /// `UFFD_FEATURE_WP_ASYNC` with `PAGEMAP_SCAN`.
    UffdAsync,
    /// Soft-dirty bits (`clear_refs` and pagemap bit 55).
    SoftDirty,
}

impl TrackerKind {
    /// Every backend, in CLI order.
    pub const ALL: [TrackerKind; 5] = [
        TrackerKind::KvmBitmap,
        TrackerKind::KvmRing,
        TrackerKind::UffdWp,
        TrackerKind::UffdAsync,
        TrackerKind::SoftDirty,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            TrackerKind::KvmBitmap => "kvm-bitmap",
            TrackerKind::KvmRing => "kvm-ring",
            TrackerKind::UffdWp => "uffd-wp",
            TrackerKind::UffdAsync => "uffd-async",
            TrackerKind::SoftDirty => "soft-dirty",
        }
    }

    /// Parses a CLI name.
    pub fn from_name(s: &str) -> Option<TrackerKind> {
        TrackerKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The fault engine's userfaultfd must be opened with `WP_ASYNC`.
    pub fn needs_wp_async(self) -> bool {
        self == TrackerKind::UffdAsync
    }
}

/// Tracking failures.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was attempted.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The memory layer refused.
    #[error(transparent)]
    Mem(#[from] guest_mem::tracking::TrackError),
    /// The host lacks what the backend needs.
    #[error("{0}")]
    Unsupported(String),
    /// The backend cannot run with the rest of the configuration.
    #[error("{0}")]
    Combination(String),
    /// Mapping a dirty ring failed.
    #[error("cannot map the dirty ring of vCPU {0}: {1}")]
    RingMap(u32, std::io::Error),
}

/// What a tracker needs to reach.
pub struct TrackCtx<'a> {
    /// The VM.
    pub vm: &'a VmFd,
    /// Guest RAM.
    pub ram: &'a GuestRam,
}

/// One harvested round.
#[derive(Clone, Debug, Default)]
pub struct Harvest {
    /// Dirty guest page numbers, sorted, unique.
    pub pages: Vec<u64>,
    /// Per-vCPU attribution where the backend knows it (the dirty ring).
    pub by_vcpu: Option<Vec<Vec<u64>>>,
    /// Bytes of address space scanned (PAGEMAP_SCAN, soft-dirty).
    pub scanned_bytes: u64,
}

/// A dirty-tracking backend.
pub trait DirtyTracker: Send {
    /// Which backend.
    fn kind(&self) -> TrackerKind;

    /// Set-up that must happen before vCPUs exist (the dirty ring).
    fn before_vcpus(&mut self, _vm: &VmFd) -> Result<(), TrackError> {
        Ok(())
    }

    /// Set-up that needs the vCPUs (mapping their rings).
    fn after_vcpus(&mut self, _vm: &VmFd, _vcpus: &[VcpuFd]) -> Result<(), TrackError> {
        Ok(())
    }

    /// Starts tracking: the first round starts now.
    fn start(&mut self, ctx: &TrackCtx) -> Result<(), TrackError>;

    /// Ends the current round and returns its dirty pages; the next round
    /// starts at once.
    fn harvest(&mut self, ctx: &TrackCtx) -> Result<Harvest, TrackError>;

    /// Stops tracking.
    fn stop(&mut self, ctx: &TrackCtx) -> Result<(), TrackError>;

    /// Bytes the backend itself uses (bitmaps, rings).
    fn memory_bytes(&self) -> u64;

    /// The granularity of what the backend reports, and how transparent
    /// huge pages are dealt with (split, or tracked whole).
    fn granularity(&self) -> &'static str;

    /// The handler a vCPU thread calls on `KVM_EXIT_DIRTY_RING_FULL`.
    fn ring_full_handler(&self) -> Option<std::sync::Arc<dyn RingFullHandler>> {
        None
    }
}

/// Harvests a vCPU's full dirty ring from its own thread.
pub trait RingFullHandler: Send + Sync {
    /// Drains vCPU `vcpu`'s ring into the pending round and resets it.
    fn ring_full(&self, vcpu: u32) -> Result<(), TrackError>;
}

/// Refuses combinations the kernel cannot do (see docs/dirty-tracking.md).
pub fn check_combination(kind: TrackerKind, backing: BackingKind) -> Result<(), TrackError> {
    match kind {
        TrackerKind::UffdWp | TrackerKind::UffdAsync if !backing.uses_fault_engine() => {
            Err(TrackError::Combination(format!(
                "--track {} needs the fault engine's userfaultfd (one userfaultfd per range) and the \
                 table's record of populated pages: use --backing memfd or anon",
                kind.name()
            )))
        }
        TrackerKind::SoftDirty if !guest_mem::tracking::soft_dirty::supported() => {
            Err(TrackError::Mem(guest_mem::tracking::TrackError::SoftDirtyUnsupported))
        }
        _ => Ok(()),
    }
}

/// Creates a backend for a VM with `vcpus` vCPUs.
pub fn new_tracker(kind: TrackerKind, vcpus: u32) -> Box<dyn DirtyTracker> {
    match kind {
        TrackerKind::KvmBitmap => Box::new(kvm_bitmap::KvmBitmapTracker::new()),
        TrackerKind::KvmRing => Box::new(kvm_ring::KvmRingTracker::new(vcpus)),
        TrackerKind::UffdWp => Box::new(uffd::UffdWpTracker),
        TrackerKind::UffdAsync => Box::new(uffd::UffdAsyncTracker::default()),
        TrackerKind::SoftDirty => Box::new(soft_dirty::SoftDirtyTracker),
    }
}

/// Statistics of one round.
#[derive(Clone, Debug, Serialize)]
pub struct RoundStats {
    /// Pages in the round (guest and VMM writes).
    pub pages: u64,
    /// Of which the VMM's own writes.
    pub vmm_pages: u64,
    /// Microseconds the harvest took.
    pub harvest_us: u64,
    /// Bytes of address space the harvest scanned (PAGEMAP_SCAN, soft-dirty).
    pub scanned_bytes: u64,
    /// Pages reported that the round's known writes do not explain (set by
    /// the caller that knows the writes).
    pub false_positives: Option<u64>,
    /// Known writes the round missed (must be 0).
    pub missed: Option<u64>,
}

/// The `"tracking"` object of a run report.
#[derive(Clone, Debug, Serialize)]
pub struct TrackingReport {
    /// The backend.
    pub backend: String,
    /// Rounds harvested.
    pub rounds: u64,
    /// Pages per round.
    pub pages_per_round: Vec<u64>,
    /// Harvest µs per round.
    pub harvest_us: Vec<u64>,
    /// Bytes scanned per round (scanning backends).
    pub scanned_bytes: Vec<u64>,
    /// False positives per round (in the work area), where known.
    pub false_positives: Vec<Option<u64>>,
    /// Known writes missed, all rounds together (0, or the tracker is broken).
    pub missed_pages: u64,
    /// Bytes the tracker keeps: the backend's own (KVM's bitmap, the rings)
    /// plus the log of VMM writes.
    pub memory_bytes: u64,
    /// Pages ever dirtied (the accumulated dirty set).
    pub dirty_set_pages: u64,
    /// Reporting granularity and how huge pages are handled.
    pub granularity: String,
    /// Bytes of the accumulated dirty set (one bit per guest page), which
    /// snapshots consume.
    pub dirty_set_bytes: u64,
}

/// A running tracker with its accumulated dirty set and statistics.
pub struct Tracking {
    tracker: Box<dyn DirtyTracker>,
    dirty_set: Vec<u64>,
    rounds: Vec<RoundStats>,
    host_log_bytes: u64,
}

/// The result of one round.
#[derive(Clone, Debug)]
pub struct Round {
    /// Dirty guest page numbers (guest and VMM writes), sorted, unique.
    pub pages: Vec<u64>,
    /// Per-vCPU attribution, where known.
    pub by_vcpu: Option<Vec<Vec<u64>>>,
}

impl Tracking {
    /// Wraps a backend for guest RAM of `ram_pages` pages.
    pub fn new(tracker: Box<dyn DirtyTracker>, ram_pages: u64) -> Tracking {
        Tracking {
            tracker,
            dirty_set: vec![0; ram_pages.div_ceil(64) as usize],
            rounds: Vec::new(),
            host_log_bytes: 0,
        }
    }

    /// The backend.
    pub fn tracker(&self) -> &dyn DirtyTracker {
        self.tracker.as_ref()
    }

    /// The backend, mutably.
    pub fn tracker_mut(&mut self) -> &mut dyn DirtyTracker {
        self.tracker.as_mut()
    }

    /// Starts the backend and the log of VMM writes.
    pub fn start(&mut self, ctx: &TrackCtx) -> Result<(), TrackError> {
        ctx.ram.host_dirty().set_enabled(true);
        self.tracker.start(ctx)
    }

    /// Harvests a round: the backend's pages plus the VMM's own writes,
    /// recorded in the table and the dirty set.
    pub fn round(&mut self, ctx: &TrackCtx) -> Result<Round, TrackError> {
        let start = Instant::now();
        let h = self.tracker.harvest(ctx)?;
        self.host_log_bytes = self.host_log_bytes.max(ctx.ram.host_dirty().bytes());
        let vmm = ctx.ram.host_dirty().take();
        let harvest_us = start.elapsed().as_micros() as u64;
        let mut pages = h.pages;
        pages.extend_from_slice(&vmm);
        pages.sort_unstable();
        pages.dedup();
        ctx.ram.mark_dirty(&pages);
        for &p in &pages {
            if let Some(w) = self.dirty_set.get_mut((p / 64) as usize) {
                *w |= 1 << (p % 64);
            }
        }
        self.rounds.push(RoundStats {
            pages: pages.len() as u64,
            vmm_pages: vmm.len() as u64,
            harvest_us,
            scanned_bytes: h.scanned_bytes,
            false_positives: None,
            missed: None,
        });
        Ok(Round {
            pages,
            by_vcpu: h.by_vcpu,
        })
    }

    /// Records what the caller knows about the last round's accuracy.
    pub fn note_accuracy(&mut self, false_positives: u64, missed: u64) {
        if let Some(r) = self.rounds.last_mut() {
            r.false_positives = Some(false_positives);
            r.missed = Some(missed);
        }
    }

    /// Stops the backend and the VMM-write log.
    pub fn stop(&mut self, ctx: &TrackCtx) -> Result<(), TrackError> {
        ctx.ram.host_dirty().set_enabled(false);
        self.tracker.stop(ctx)
    }

    /// Clears the accumulated dirty set (a new baseline).
    pub fn reset_dirty_set(&mut self) {
        self.dirty_set.iter_mut().for_each(|w| *w = 0);
    }

    /// The report.
    pub fn report(&self) -> TrackingReport {
        TrackingReport {
            backend: self.tracker.kind().name().to_string(),
            rounds: self.rounds.len() as u64,
            pages_per_round: self.rounds.iter().map(|r| r.pages).collect(),
            harvest_us: self.rounds.iter().map(|r| r.harvest_us).collect(),
            scanned_bytes: self.rounds.iter().map(|r| r.scanned_bytes).collect(),
            false_positives: self.rounds.iter().map(|r| r.false_positives).collect(),
            missed_pages: self.rounds.iter().filter_map(|r| r.missed).sum(),
            memory_bytes: self.tracker.memory_bytes() + self.host_log_bytes,
            dirty_set_pages: self.dirty_set.iter().map(|w| w.count_ones() as u64).sum(),
            dirty_set_bytes: self.dirty_set.len() as u64 * 8,
            granularity: self.tracker.granularity().to_string(),
        }
    }
}

/// Collects the set bits of a bitmap as page numbers offset by `base`.
pub fn bitmap_pages(bitmap: &[u64], base: u64, out: &mut Vec<u64>) {
    for (i, w) in bitmap.iter().enumerate() {
        let mut v = *w;
        while v != 0 {
            out.push(base + i as u64 * 64 + v.trailing_zeros() as u64);
            v &= v - 1;
        }
    }
}
