//! The range walk, in the spirit of the kernel's `walk_page_range`: a
//! visitor with optional callbacks per kind of entry and for holes, which
//! can skip a subtree or stop early. Only populated subtrees are entered.

use super::{level_size, Node, ENTRIES, HUGE_BIT};
use crate::entry::Entry;
use std::sync::atomic::Ordering;

/// What a callback asks the walk to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkAction {
    /// Go on (descend into the table, if any).
    Continue,
    /// Do not descend into this table (from `table`), or skip the rest of
    /// the current leaf table (from `leaf`).
    Skip,
    /// End the walk now.
    Stop,
}

/// How a walk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkOutcome {
    /// Every entry in range was visited.
    Completed,
    /// A callback answered `Stop`.
    Stopped,
}

/// Callbacks of a walk; all optional. Ranges are clipped to the walked range.
pub trait Walker {
    /// A table at `level` (1..=3 is the level of the entry pointing to it)
    /// covering `[start, end)`, before descending.
    fn table(&mut self, _level: u8, _start: u64, _end: u64) -> WalkAction {
        WalkAction::Continue
    }

    /// A huge leaf at `level` (1: 2 MiB, 2: 1 GiB) starting at `start`.
    fn huge(&mut self, _level: u8, _start: u64, _entry: Entry) -> WalkAction {
        WalkAction::Continue
    }

    /// A non-empty 4 KiB entry. Empty entries inside a leaf table are not
    /// reported.
    fn leaf(&mut self, _gpa: u64, _entry: Entry) -> WalkAction {
        WalkAction::Continue
    }

    /// `[start, end)` has no table below it: nothing is recorded there.
    fn hole(&mut self, _start: u64, _end: u64) -> WalkAction {
        WalkAction::Continue
    }
}

pub(super) fn walk_node(
    node: &Node,
    level: u8,
    base: u64,
    start: u64,
    end: u64,
    w: &mut dyn Walker,
) -> WalkOutcome {
    let size = level_size(level);
    let span_end = base.saturating_add(size * ENTRIES as u64);
    let first = ((start.max(base) - base) / size) as usize;
    let last = ((end.min(span_end) - base).div_ceil(size) as usize).min(ENTRIES);
    for i in first..last {
        let s = base + i as u64 * size;
        let (cs, ce) = (s.max(start), (s + size).min(end));
        let v = node.slots[i].load(Ordering::Acquire);
        let action = if level == 0 {
            if v == 0 {
                continue;
            }
            w.leaf(s, Entry::from_raw(v))
        } else if v == 0 {
            w.hole(cs, ce)
        } else if v & HUGE_BIT != 0 {
            w.huge(level, s, Entry::from_raw(v))
        } else {
            match w.table(level, cs, ce) {
                WalkAction::Continue => {
                    // SAFETY: non-huge, non-zero upper slot: a live child
                    // table; the caller holds the structure read lock.
                    let child = unsafe { &*(v as *const Node) };
                    if walk_node(child, level - 1, s, start, end, w) == WalkOutcome::Stopped {
                        return WalkOutcome::Stopped;
                    }
                    WalkAction::Continue
                }
                other => other,
            }
        };
        match action {
            WalkAction::Continue => {}
            WalkAction::Skip if level == 0 => return WalkOutcome::Completed,
            WalkAction::Skip => {}
            WalkAction::Stop => return WalkOutcome::Stopped,
        }
    }
    WalkOutcome::Completed
}
