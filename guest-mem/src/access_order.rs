//! The order in which the guest first touched its pages: the working-set
//! trace a snapshot stores so that a lazy restore prefetches pages in the
//! order the guest will want them (REAP-style record and prefetch).
//!
//! Only the guest's own demand faults (and a restore's prefetch, which
//! replays an earlier trace) are recorded: pages the VMM writes itself or
//! loads eagerly say nothing about what the guest needs first.

use crate::entry::PAGE_SIZE;
use crate::sync::LockOrRecover;
use std::sync::Mutex;

/// Most pages recorded (4 GiB of guest memory); later first touches are
/// dropped, the early part of a trace being the one a restore needs first.
pub const MAX_TRACE_PAGES: usize = 1 << 20;

/// An append-only trace of guest page numbers, in first-touch order.
#[derive(Default)]
pub struct AccessOrder {
    pages: Mutex<Vec<u32>>,
}

impl AccessOrder {
    /// Appends the pages of `[start, end)` (guest-physical bytes) in
    /// address order; `first` (inside the range) goes first: it is the page
    /// the guest actually touched, the rest came with it (fault-around).
    pub fn record(&self, first: u64, start: u64, end: u64) {
        let touched = (start..end).contains(&first).then_some(first);
        let rest = (start..end)
            .step_by(PAGE_SIZE as usize)
            .filter(|gpa| Some(*gpa) != touched);
        let mut pages = self.pages.lock_or_recover();
        let room = MAX_TRACE_PAGES.saturating_sub(pages.len());
        pages.extend(
            touched
                .into_iter()
                .chain(rest)
                .filter_map(|gpa| u32::try_from(gpa / PAGE_SIZE).ok())
                .take(room),
        );
    }

    /// The guest page numbers recorded, first touch first, each once.
    pub fn pages(&self) -> Vec<u64> {
        let pages = self.pages.lock_or_recover();
        let mut seen = std::collections::HashSet::with_capacity(pages.len());
        pages
            .iter()
            .filter(|p| seen.insert(**p))
            .map(|p| *p as u64)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_touched_page_leads_its_run_and_repeats_are_dropped() {
        let t = AccessOrder::default();
        t.record(0x5000, 0x4000, 0x7000);
        t.record(0x1000, 0x1000, 0x2000);
        t.record(0x4000, 0x4000, 0x5000);
        assert_eq!(t.pages(), vec![5, 4, 6, 1]);
    }

    #[test]
    fn a_touch_outside_the_run_records_only_the_run() {
        let t = AccessOrder::default();
        t.record(u64::MAX, 0x2000, 0x4000);
        assert_eq!(t.pages(), vec![2, 3]);
    }
}
