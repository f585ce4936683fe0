//! `Stage2Table`: the VMM's EPT-style record of guest pages.
//!
//! Indexed by guest-physical address like EPT: four levels of 512 entries
//! (level 3 = root, 512 GiB per entry; level 2, 1 GiB; level 1, 2 MiB;
//! level 0, 4 KiB leaves). Levels 1 and 2 may hold huge leaves. Tables below
//! the root are allocated lazily on first store, so an empty subtree costs
//! nothing; every entry is an `AtomicU64` updated by compare-and-swap.
//!
//! An upper-level slot holds 0 (nothing below), a huge leaf (the `H` bit),
//! or the address of the child table (tables are 4 KiB-aligned).
//!
//! The table records what the VMM did and observed; it does not mirror the
//! host page tables (see docs/guest-mem.md for what it cannot see alone).
//!
//! Concurrency: lookups and updates hold `structure` for reading; only
//! [`Stage2Table::free_range`] takes it for writing, to free the tables of an
//! isolated range without per-entry locking (rule 3).

mod walk;

pub use walk::{WalkAction, WalkOutcome, Walker};

use crate::entry::{Entry, PAGE_SIZE};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Entries per table.
pub const ENTRIES: usize = 512;
/// Levels: 3 (root) to 0 (4 KiB leaves).
pub const LEVELS: u8 = 4;
/// Bytes one table occupies.
pub const TABLE_BYTES: usize = std::mem::size_of::<Node>();
/// One past the highest guest-physical address the table covers (256 TiB).
pub const GPA_LIMIT: u64 = 1 << 48;
const HUGE_BIT: u64 = 1 << 7;

/// Bytes covered by one entry at `level`.
pub const fn level_size(level: u8) -> u64 {
    PAGE_SIZE << (9 * level as u32)
}

/// Bytes one leaf table (512 4 KiB entries) covers: 2 MiB.
pub const LEAF_TABLE_SPAN: u64 = level_size(1);

fn index(level: u8, gpa: u64) -> usize {
    ((gpa >> (12 + 9 * level as u32)) & (ENTRIES as u64 - 1)) as usize
}

#[repr(C, align(4096))]
struct Node {
    slots: [AtomicU64; ENTRIES],
}

impl Node {
    fn new_boxed() -> Box<Node> {
        Box::new(Node {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }
}

/// Table errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    /// The address is beyond the table's reach.
    #[error("guest-physical address {0:#x} is beyond the table's 48-bit reach")]
    OutOfRange(u64),
    /// A 4 KiB operation hit a huge leaf.
    #[error("guest-physical address {0:#x} lies in a huge entry")]
    InHugeEntry(u64),
    /// A huge leaf cannot replace an existing table.
    #[error("cannot map a huge entry at {0:#x}: a table exists below it")]
    TableBelow(u64),
    /// Huge leaves exist at levels 1 and 2 only, aligned.
    #[error("bad huge entry at {0:#x}, level {1}")]
    BadHuge(u64, u8),
}

/// The EPT-style second-level table of per-page state.
pub struct Stage2Table {
    root: Box<Node>,
    tables: AtomicUsize,
    structure: RwLock<()>,
}

impl Default for Stage2Table {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a lookup ended.
enum Slot<'a> {
    /// A leaf slot at level 0.
    Leaf(&'a AtomicU64),
    /// A huge leaf.
    Huge(&'a AtomicU64),
    /// No table below this level.
    Absent,
}

impl Stage2Table {
    /// An empty table (only the root exists).
    pub fn new() -> Stage2Table {
        Stage2Table {
            root: Node::new_boxed(),
            tables: AtomicUsize::new(1),
            structure: RwLock::new(()),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, ()> {
        self.structure.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, ()> {
        self.structure.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of tables allocated (the root included).
    pub fn table_bytes(&self) -> usize {
        self.tables.load(Ordering::Relaxed) * TABLE_BYTES
    }

    /// Follows `slot` to its child table, allocating one when `alloc`.
    fn child<'a>(&'a self, slot: &'a AtomicU64, alloc: bool) -> Option<&'a Node> {
        let mut v = slot.load(Ordering::Acquire);
        if v == 0 {
            if !alloc {
                return None;
            }
            let fresh = Box::into_raw(Node::new_boxed());
            match slot.compare_exchange(0, fresh as u64, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.tables.fetch_add(1, Ordering::Relaxed);
                    v = fresh as u64;
                }
                Err(winner) => {
                    // SAFETY: `fresh` came from Box::into_raw above and was
                    // never published.
                    drop(unsafe { Box::from_raw(fresh) });
                    v = winner;
                }
            }
        }
        if v & HUGE_BIT != 0 {
            return None;
        }
        // SAFETY: a non-huge, non-zero upper slot holds a pointer to a live
        // Node published with Release; nodes are freed only under the
        // structure write lock, and callers hold the read lock.
        Some(unsafe { &*(v as *const Node) })
    }

    fn lookup<'a>(&'a self, gpa: u64, alloc: bool) -> Slot<'a> {
        let mut node: &Node = &self.root;
        for level in (1..LEVELS).rev() {
            let slot = &node.slots[index(level, gpa)];
            let v = slot.load(Ordering::Acquire);
            if v & HUGE_BIT != 0 {
                return Slot::Huge(slot);
            }
            match self.child(slot, alloc) {
                Some(n) => node = n,
                None => {
                    // A huge leaf may have raced in.
                    let v = slot.load(Ordering::Acquire);
                    if v & HUGE_BIT != 0 {
                        return Slot::Huge(slot);
                    }
                    return Slot::Absent;
                }
            }
        }
        Slot::Leaf(&node.slots[index(0, gpa)])
    }

    fn check_gpa(gpa: u64) -> Result<(), TableError> {
        if gpa >= GPA_LIMIT {
            Err(TableError::OutOfRange(gpa))
        } else {
            Ok(())
        }
    }

    /// The entry for the 4 KiB page at `gpa` (a huge entry if one covers it).
    pub fn get(&self, gpa: u64) -> Entry {
        if gpa >= GPA_LIMIT {
            return Entry::EMPTY;
        }
        let _g = self.read();
        match self.lookup(gpa, false) {
            Slot::Leaf(s) | Slot::Huge(s) => Entry::from_raw(s.load(Ordering::Acquire)),
            Slot::Absent => Entry::EMPTY,
        }
    }

    /// True when the leaf table holding `gpa` exists.
    pub fn has_leaf_table(&self, gpa: u64) -> bool {
        gpa < GPA_LIMIT && {
            let _g = self.read();
            matches!(self.lookup(gpa, false), Slot::Leaf(_))
        }
    }

    /// Allocates the leaf table holding `gpa` if it is missing.
    pub fn ensure_leaf_table(&self, gpa: u64) -> Result<(), TableError> {
        Self::check_gpa(gpa)?;
        let _g = self.read();
        match self.lookup(gpa, true) {
            Slot::Leaf(_) => Ok(()),
            Slot::Huge(_) => Err(TableError::InHugeEntry(gpa)),
            Slot::Absent => unreachable!("lookup with alloc never finds a missing table"),
        }
    }

    /// Atomically replaces the 4 KiB entry at `gpa` with `f(old)` (no change
    /// when `f` answers `None`); retries on concurrent updates. Returns
    /// `(old, new)`.
    pub fn update(
        &self,
        gpa: u64,
        mut f: impl FnMut(Entry) -> Option<Entry>,
    ) -> Result<(Entry, Entry), TableError> {
        Self::check_gpa(gpa)?;
        let _g = self.read();
        let slot = match self.lookup(gpa, true) {
            Slot::Leaf(s) => s,
            Slot::Huge(_) => return Err(TableError::InHugeEntry(gpa)),
            Slot::Absent => unreachable!("lookup with alloc never finds a missing table"),
        };
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            let old = Entry::from_raw(cur);
            let Some(new) = f(old) else {
                return Ok((old, old));
            };
            debug_assert_eq!(new.check(), Ok(()), "storing {new:?}");
            match slot.compare_exchange_weak(cur, new.raw(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok((old, new)),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Stores `entry` at `gpa`.
    pub fn set(&self, gpa: u64, entry: Entry) -> Result<Entry, TableError> {
        self.update(gpa, |_| Some(entry)).map(|(old, _)| old)
    }

    /// Clears the entry at `gpa` (no table is allocated for it).
    pub fn clear(&self, gpa: u64) -> Entry {
        if gpa >= GPA_LIMIT {
            return Entry::EMPTY;
        }
        let _g = self.read();
        match self.lookup(gpa, false) {
            Slot::Leaf(s) => Entry::from_raw(s.swap(0, Ordering::AcqRel)),
            _ => Entry::EMPTY,
        }
    }

    /// Maps a huge leaf covering `level_size(level)` bytes at `gpa`
    /// (level 1: 2 MiB, level 2: 1 GiB).
    pub fn set_huge(&self, gpa: u64, level: u8, entry: Entry) -> Result<(), TableError> {
        Self::check_gpa(gpa)?;
        if !(1..=2).contains(&level) || !gpa.is_multiple_of(level_size(level)) {
            return Err(TableError::BadHuge(gpa, level));
        }
        debug_assert_eq!(entry.check(), Ok(()));
        let _g = self.read();
        let mut node: &Node = &self.root;
        for l in ((level + 1)..LEVELS).rev() {
            let slot = &node.slots[index(l, gpa)];
            if slot.load(Ordering::Acquire) & HUGE_BIT != 0 {
                return Err(TableError::InHugeEntry(gpa));
            }
            node = self.child(slot, true).ok_or(TableError::InHugeEntry(gpa))?;
        }
        let slot = &node.slots[index(level, gpa)];
        let want = entry.huge().raw();
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            if cur != 0 && cur & HUGE_BIT == 0 {
                return Err(TableError::TableBelow(gpa));
            }
            match slot.compare_exchange_weak(cur, want, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(a) => cur = a,
            }
        }
    }

    /// Walks `[start, end)`; see [`Walker`].
    pub fn walk_range(&self, start: u64, end: u64, walker: &mut dyn Walker) -> WalkOutcome {
        let end = end.min(GPA_LIMIT);
        if start >= end {
            return WalkOutcome::Completed;
        }
        let _g = self.read();
        walk::walk_node(&self.root, LEVELS - 1, 0, start, end, walker)
    }

    /// Rule 3: frees every table wholly inside `[start, end)` and clears the
    /// entries of partly covered ones. The caller has isolated the range (no
    /// fault can reach it any more), so one write lock on the structure
    /// replaces per-entry locking.
    pub fn free_range(&self, start: u64, end: u64) {
        let end = end.min(GPA_LIMIT);
        if start >= end {
            return;
        }
        let _g = self.write();
        self.free_in(&self.root, LEVELS - 1, 0, start, end);
    }

    fn free_in(&self, node: &Node, level: u8, base: u64, start: u64, end: u64) {
        let size = level_size(level);
        let first = ((start.max(base) - base) / size) as usize;
        let last = ((end.min(base + size * ENTRIES as u64) - base).div_ceil(size)) as usize;
        for i in first..last.min(ENTRIES) {
            let s = base + i as u64 * size;
            let e = s + size;
            let slot = &node.slots[i];
            let v = slot.load(Ordering::Acquire);
            if v == 0 {
                continue;
            }
            let whole = start <= s && e <= end;
            if level == 0 || v & HUGE_BIT != 0 {
                if whole || level == 0 {
                    slot.store(0, Ordering::Release);
                }
                continue;
            }
            // SAFETY: a non-huge, non-zero upper slot points to a live child
            // node; we hold the structure write lock, so nobody else uses it.
            let child = unsafe { &*(v as *const Node) };
            if whole {
                slot.store(0, Ordering::Release);
                self.free_subtree(v as *mut Node, level - 1);
            } else {
                self.free_in(child, level - 1, s, start, end);
            }
        }
    }

    /// Frees a detached subtree rooted at `ptr` (a table at `level`).
    fn free_subtree(&self, ptr: *mut Node, level: u8) {
        // SAFETY: `ptr` was created by Box::into_raw in `child` and has been
        // unlinked from the tree by the caller; nothing else refers to it.
        let node = unsafe { Box::from_raw(ptr) };
        if level > 0 {
            for slot in node.slots.iter() {
                let v = slot.load(Ordering::Relaxed);
                if v != 0 && v & HUGE_BIT == 0 {
                    self.free_subtree(v as *mut Node, level - 1);
                }
            }
        }
        self.tables.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Stage2Table {
    fn drop(&mut self) {
        for slot in self.root.slots.iter() {
            let v = slot.load(Ordering::Relaxed);
            if v != 0 && v & HUGE_BIT == 0 {
                self.free_subtree(v as *mut Node, LEVELS - 2);
            }
        }
    }
}

#[cfg(test)]
mod tests;
