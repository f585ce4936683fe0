//! The NUMA scanner: learns which vCPU writes which page from write-sampling
//! windows, and moves pages to the node of the vCPUs that use them.
//!
//! Rule 1: a scan on behalf of vCPU `v` skips a region whose accessor
//! bitmaps (this window's and the last one's) lack `v`, except the first
//! two scans of that region for `v`, which are unconditional; the bitmaps
//! are renewed every `accessor_window` rounds, so stale accessors age out.
//! Every `REFRESH_WINDOWS` windows one round scans every region again
//! (as Linux later did for VMAs the PID bits had excluded): the bitmaps
//! learn from the samples' own faults, so a vCPU that paused for two
//! windows would otherwise never be sampled in its region again.
//! Rule 9: in a region hinted sequential or random, the window rotates over
//! every present page; elsewhere it prefers the pages the table has seen
//! accessed. Rule 15: a page's dirty state is handed to the trackers before
//! it moves.

use super::topology::Topology;
use crate::entry::{Flag, PAGE_SIZE};
use crate::ram::{GuestRam, RamError};
use crate::region::AccessHint;
use crate::table::{WalkAction, Walker};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// How the scanner works.
#[derive(Clone, Debug)]
pub struct ScannerConfig {
    /// The node of each vCPU (index = vCPU id).
    pub vcpu_node: Vec<u32>,
    /// Pages sampled per region per round.
    pub window_pages: u64,
    /// Most pages moved per round (the rate limit).
    pub max_moves: u64,
    /// Skip regions a vCPU does not access (rule 1); off: scan everything.
    pub filter_accessors: bool,
    /// Rounds per accessor window.
    pub accessor_window: u32,
    /// Where the sampled writes come from.
    pub signal: SampleSignal,
}

/// How a sampling window learns who writes its pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SampleSignal {
    /// Write-protect the window; each write fault names its vCPU thread.
    #[default]
    WriteProtect,
    /// Read the per-vCPU KVM dirty rings at their harvests (the ring
    /// tracker must be on); nothing is protected.
    DirtyRing,
}

impl SampleSignal {
    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            SampleSignal::WriteProtect => "write-protect",
            SampleSignal::DirtyRing => "dirty-ring",
        }
    }
}

/// Every this many accessor windows, one round scans every region.
pub const REFRESH_WINDOWS: u32 = 4;

/// What one round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundStats {
    /// (vCPU, region) scans made.
    pub regions_scanned: u64,
    /// (vCPU, region) scans skipped by the accessor filter.
    pub regions_skipped: u64,
    /// Pages armed for sampling.
    pub pages_sampled: u64,
    /// Pages moved to another node.
    pub pages_moved: u64,
    /// Moves the rate limit put off.
    pub moves_deferred: u64,
    /// µs the round took.
    pub scan_us: u64,
}

/// The scanner's state across rounds.
pub struct NumaScanner {
    cfg: ScannerConfig,
    topology: Arc<dyn Topology>,
    /// Scans made per (region id, vCPU).
    scans: HashMap<(u64, u32), u32>,
    /// Each region's accessor bitmap of the previous window.
    previous: HashMap<u64, u64>,
    /// Where each (region, vCPU)'s next window starts (guest-physical),
    /// over all present pages (`false`) and over those seen accessed
    /// (`true`).
    cursor: HashMap<(u64, u32, bool), u64>,
    round: u32,
}

/// Present pages of a range, and those the table saw accessed.
struct Present {
    all: Vec<u64>,
    accessed: Vec<u64>,
}

impl Walker for Present {
    fn leaf(&mut self, gpa: u64, e: crate::entry::Entry) -> WalkAction {
        if e.is_present() {
            self.all.push(gpa);
            if e.has(Flag::Accessed) {
                self.accessed.push(gpa);
            }
        }
        WalkAction::Continue
    }
}

impl NumaScanner {
    /// A scanner placing pages on `topology`'s nodes.
    pub fn new(cfg: ScannerConfig, topology: Arc<dyn Topology>) -> NumaScanner {
        NumaScanner {
            cfg,
            topology,
            scans: HashMap::new(),
            previous: HashMap::new(),
            cursor: HashMap::new(),
            round: 0,
        }
    }

    /// The node most of `users` (a vCPU bitmap) are on; ties go to the
    /// lowest node.
    fn preferred_node(&self, users: u64) -> Option<u32> {
        let mut votes: HashMap<u32, u32> = HashMap::new();
        for (v, node) in self.cfg.vcpu_node.iter().enumerate() {
            if users & (1 << (v % 64)) != 0 {
                *votes.entry(*node).or_insert(0) += 1;
            }
        }
        votes
            .into_iter()
            .max_by_key(|(node, n)| (*n, std::cmp::Reverse(*node)))
            .map(|(node, _)| node)
    }

    /// The next `n` pages of `pool` (sorted guest-physical addresses) after
    /// the cursor `key`, wrapping around; moves the cursor past them.
    fn next_window(&mut self, key: (u64, u32, bool), pool: &[u64], n: usize) -> Vec<u64> {
        if pool.is_empty() || n == 0 {
            return Vec::new();
        }
        let at = self.cursor.get(&key).copied().unwrap_or(0);
        let first = pool.iter().position(|g| *g >= at).unwrap_or(0);
        let window: Vec<u64> = (0..n.min(pool.len()))
            .map(|i| pool[(first + i) % pool.len()])
            .collect();
        if let Some(last) = window.last() {
            self.cursor.insert(key, last + PAGE_SIZE);
        }
        window
    }

    /// The window vCPU `v`'s scan of region `r` samples next: a walk over
    /// the region's entries (the cost a skipped scan saves). Rule 9: in a
    /// hinted region the window rotates over every present page; elsewhere
    /// half of it comes from the pages the table saw accessed (recency),
    /// half from the rotation over all, so every page is sampled in time.
    fn scan_window(&mut self, ram: &GuestRam, r: &crate::region::Region, v: u32) -> Vec<u64> {
        let mut present = Present {
            all: Vec::new(),
            accessed: Vec::new(),
        };
        ram.table().walk_range(r.gpa, r.gpa + r.size, &mut present);
        let w = self.cfg.window_pages as usize;
        let (recent, rest) = if r.flags.hint == AccessHint::Normal {
            (w / 2, w - w / 2)
        } else {
            (0, w)
        };
        let mut window = self.next_window((r.id, v, false), &present.all, rest);
        window.extend(self.next_window((r.id, v, true), &present.accessed, recent));
        window
    }

    /// Ends the windows armed in the last round without acting on them
    /// (the scanner stops).
    pub fn disarm(&mut self, ram: &GuestRam) -> Result<(), RamError> {
        match self.cfg.signal {
            SampleSignal::WriteProtect => ram.take_write_samples().map(drop),
            SampleSignal::DirtyRing => {
                ram.take_ring_samples(true);
                Ok(())
            }
        }
    }

    /// One round: harvest the windows armed in the last round (who wrote
    /// which page), move pages towards their writers' node (rate limited,
    /// dirty state first), then arm the next windows in every region some
    /// vCPU still needs scanned.
    pub fn round(&mut self, ram: &GuestRam) -> Result<RoundStats, RamError> {
        let start = Instant::now();
        let mut stats = RoundStats::default();
        let regions = ram.regions();
        // Who wrote what since the last round.
        let samples = match self.cfg.signal {
            SampleSignal::WriteProtect => ram.take_write_samples()?,
            SampleSignal::DirtyRing => ram.take_ring_samples(false),
        };
        let mut wanted: Vec<(u64, u64, u32)> = Vec::new(); // (gpa, host, node)
        for (gpa, users) in samples {
            let (Some(node), Some(r)) = (
                self.preferred_node(users),
                regions.iter().find(|r| r.contains_gpa(gpa)),
            ) else {
                continue;
            };
            wanted.push((gpa, r.host_of(gpa), node));
        }
        wanted.sort_unstable();
        let hosts: Vec<u64> = wanted.iter().map(|w| w.1).collect();
        let now = self.topology.nodes_of(&hosts);
        let mut moves: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
        for ((gpa, host, node), cur) in wanted.into_iter().zip(now) {
            if cur == Some(node) {
                continue;
            }
            if stats.pages_moved + stats.moves_deferred >= self.cfg.max_moves {
                stats.moves_deferred += 1;
                continue;
            }
            moves.entry(node).or_default().push((gpa, host));
            stats.pages_moved += 1;
        }
        for (node, pages) in moves {
            // Rule 15: a tracker learns of the pages before they move.
            for (gpa, _) in &pages {
                ram.host_dirty().mark(*gpa, PAGE_SIZE);
            }
            let hosts: Vec<u64> = pages.iter().map(|p| p.1).collect();
            self.topology.move_to(&hosts, node);
        }
        // Rule 1's windows: a new one every `accessor_window` rounds; the
        // last one still counts.
        self.round += 1;
        let renew =
            self.cfg.accessor_window > 0 && self.round.is_multiple_of(self.cfg.accessor_window);
        let refresh = self.cfg.accessor_window > 0
            && self
                .round
                .is_multiple_of(self.cfg.accessor_window * REFRESH_WINDOWS);
        let mut arm = Vec::new();
        for r in &regions {
            let prev = self.previous.get(&r.id).copied().unwrap_or(0);
            let accessors = r.accessors.load(Ordering::Relaxed) | prev;
            if renew {
                self.previous
                    .insert(r.id, r.accessors.swap(0, Ordering::Relaxed));
            }
            for v in 0..self.cfg.vcpu_node.len() as u32 {
                let scans = self.scans.entry((r.id, v)).or_insert(0);
                if self.cfg.filter_accessors
                    && !refresh
                    && *scans >= 2
                    && accessors & (1 << (v % 64)) == 0
                {
                    stats.regions_skipped += 1;
                    continue;
                }
                *scans += 1;
                stats.regions_scanned += 1;
                arm.extend(self.scan_window(ram, r, v));
            }
        }
        arm.sort_unstable();
        arm.dedup();
        stats.pages_sampled = match self.cfg.signal {
            SampleSignal::WriteProtect => ram.arm_write_samples(&arm)?,
            SampleSignal::DirtyRing => ram.arm_ring_samples(&arm),
        };
        stats.scan_us = start.elapsed().as_micros() as u64;
        Ok(stats)
    }
}
