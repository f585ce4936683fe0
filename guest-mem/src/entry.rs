//! One entry of the [`Stage2Table`](crate::table::Stage2Table): a 64-bit
//! word with an EPT-like layout, updated atomically by compare-and-swap.
//!
//! ```text
//!  63   62..61  60..58  57  56  55  54  53  52  51 ........ 12  11  10  9  8  7  6..3  2  1  0
//! [0]  [resvd] [marker][Z] [P] [E] [C] [S] [U] [frame / payload] [M] [0] [D][A][H][0] [X][W][R]
//! ```
//!
//! | bits | name | meaning |
//! |---|---|---|
//! | 0, 1, 2 | R, W, X | the guest may read / write / execute (R = present) |
//! | 7 | H (huge) | the entry maps 2 MiB (level 1) or 1 GiB (level 2) |
//! | 8 | A (accessed) | the VMM saw an access (fault, or sampled) |
//! | 9 | D (dirty) | the VMM saw or harvested a write |
//! | 11 | M (marker) | not present; bits 58..60 say which marker |
//! | 12..51 | frame | present: the backing page (index into the region's backing); snapshot marker: the snapshot file page |
//! | 52 | U (uffd-wp) | write-protect tracking is on: never together with W (rule 11) |
//! | 53 | S (soft-dirty) | written since the last soft-dirty clear |
//! | 54 | C (cow-shared) | shared copy-on-write with another VM or an image |
//! | 55 | E (exclusive) | this VM's private page |
//! | 56 | P (pinned) | pinned for a device |
//! | 57 | Z (zero page) | mapped to the host's shared zero page (read-only) |
//! | 58..60 | marker kind | 1 write-protected-but-unpopulated, 2 poisoned, 3 backed by snapshot |
//!
//! Bits 52..62 are the ones EPT leaves to software. An all-zero entry is
//! "nothing recorded" (unpopulated).

use std::fmt;

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// Frame numbers have 40 bits.
pub const FRAME_MASK: u64 = ((1u64 << 40) - 1) << 12;

const R: u64 = 1 << 0;
const W: u64 = 1 << 1;
const X: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const ACCESSED: u64 = 1 << 8;
const DIRTY: u64 = 1 << 9;
const MARKER: u64 = 1 << 11;
const UFFD_WP: u64 = 1 << 52;
const SOFT_DIRTY: u64 = 1 << 53;
const COW_SHARED: u64 = 1 << 54;
const EXCLUSIVE: u64 = 1 << 55;
const PINNED: u64 = 1 << 56;
const ZERO_PAGE: u64 = 1 << 57;
const MARKER_SHIFT: u32 = 58;
const MARKER_KIND: u64 = 0b111 << MARKER_SHIFT;

/// The kinds of non-present marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Marker {
    /// Write-protected although not populated (`WP_UNPOPULATED`, rule 5).
    WpUnpopulated,
    /// A memory error: touching the page is an error, never zeros (rule 12).
    Poisoned,
    /// The page's content is page `payload` of the snapshot file.
    Snapshot,
}

impl Marker {
    fn code(self) -> u64 {
        match self {
            Marker::WpUnpopulated => 1,
            Marker::Poisoned => 2,
            Marker::Snapshot => 3,
        }
    }

    fn from_code(c: u64) -> Option<Marker> {
        match c {
            1 => Some(Marker::WpUnpopulated),
            2 => Some(Marker::Poisoned),
            3 => Some(Marker::Snapshot),
            _ => None,
        }
    }
}

/// A backing page: the index of a 4 KiB page in its region's backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frame(pub u64);

/// Software state bits of a present entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    /// Accessed.
    Accessed,
    /// Dirty.
    Dirty,
    /// Soft-dirty.
    SoftDirty,
    /// Shared copy-on-write.
    CowShared,
    /// Exclusive to this VM.
    Exclusive,
    /// Pinned for a device.
    Pinned,
}

impl Flag {
    fn bit(self) -> u64 {
        match self {
            Flag::Accessed => ACCESSED,
            Flag::Dirty => DIRTY,
            Flag::SoftDirty => SOFT_DIRTY,
            Flag::CowShared => COW_SHARED,
            Flag::Exclusive => EXCLUSIVE,
            Flag::Pinned => PINNED,
        }
    }
}

/// A table entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Entry(u64);

impl Entry {
    /// Nothing recorded.
    pub const EMPTY: Entry = Entry(0);

    /// The raw word.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Reinterprets a raw word (as read from the table).
    pub const fn from_raw(raw: u64) -> Entry {
        Entry(raw)
    }

    /// A present, readable page backed by `frame`; writable when `writable`.
    pub fn page(frame: Frame, writable: bool) -> Entry {
        let mut e = R | X | ((frame.0 << 12) & FRAME_MASK);
        if writable {
            e |= W;
        }
        Entry(e)
    }

    /// A present entry for the host's shared zero page: readable, never
    /// writable, no frame of its own (rule 10).
    pub fn zero_page() -> Entry {
        Entry(R | X | ZERO_PAGE)
    }

    /// A non-present marker with an optional payload (the snapshot page).
    pub fn marker(kind: Marker, payload: u64) -> Entry {
        Entry(MARKER | (kind.code() << MARKER_SHIFT) | ((payload << 12) & FRAME_MASK))
    }

    /// The same entry as a huge (2 MiB or 1 GiB) leaf.
    pub fn huge(self) -> Entry {
        Entry(self.0 | HUGE)
    }

    /// True for an all-zero entry.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Readable by the guest (a page is mapped).
    pub fn is_present(self) -> bool {
        self.0 & R != 0
    }

    /// Writable by the guest.
    pub fn is_writable(self) -> bool {
        self.0 & W != 0
    }

    /// A huge leaf.
    pub fn is_huge(self) -> bool {
        self.0 & HUGE != 0
    }

    /// Mapped to the shared zero page.
    pub fn is_zero_page(self) -> bool {
        self.0 & ZERO_PAGE != 0
    }

    /// The marker kind of a non-present entry.
    pub fn marker_kind(self) -> Option<Marker> {
        if self.0 & MARKER == 0 {
            return None;
        }
        Marker::from_code((self.0 & MARKER_KIND) >> MARKER_SHIFT)
    }

    /// The marker payload (snapshot page) of a marker entry.
    pub fn marker_payload(self) -> Option<u64> {
        self.marker_kind().map(|_| (self.0 & FRAME_MASK) >> 12)
    }

    /// Write-protect tracking is on.
    pub fn is_uffd_wp(self) -> bool {
        self.0 & UFFD_WP != 0
    }

    /// Whether a software flag is set.
    pub fn has(self, flag: Flag) -> bool {
        self.0 & flag.bit() != 0
    }

    /// Sets a software flag.
    pub fn with(self, flag: Flag) -> Entry {
        Entry(self.0 | flag.bit())
    }

    /// Clears a software flag.
    pub fn without(self, flag: Flag) -> Entry {
        Entry(self.0 & !flag.bit())
    }

    /// Turns write-protect tracking on: the entry loses W (rule 11: a
    /// write-protect-tracked entry is never writable).
    pub fn write_protected(self) -> Entry {
        Entry((self.0 | UFFD_WP) & !W)
    }

    /// Turns write-protect tracking off; `writable` restores W for a
    /// present, non-zero-page entry.
    pub fn write_unprotected(self, writable: bool) -> Entry {
        let mut e = self.0 & !UFFD_WP;
        if writable && self.is_present() && !self.is_zero_page() {
            e |= W;
        }
        Entry(e)
    }

    /// Rule 10: the frame behind an entry, or `None` for markers, the zero
    /// page, empty entries and anything else without a page of its own.
    pub fn frame(self) -> Option<Frame> {
        if !self.is_present() || self.is_zero_page() || self.0 & MARKER != 0 {
            return None;
        }
        Some(Frame((self.0 & FRAME_MASK) >> 12))
    }

    /// Checks the layout's invariants; `Err` names the broken one.
    pub fn check(self) -> Result<(), &'static str> {
        if self.is_uffd_wp() && self.is_writable() {
            return Err("rule 11: write-protect-tracked entry is writable");
        }
        if self.0 & MARKER != 0 {
            if self.0 & (R | W | X) != 0 {
                return Err("marker entry is present");
            }
            if self.marker_kind().is_none() {
                return Err("unknown marker kind");
            }
        }
        if self.is_zero_page() && self.is_writable() {
            return Err("zero page mapped writable");
        }
        Ok(())
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "Entry(empty)");
        }
        if let Some(m) = self.marker_kind() {
            return write!(f, "Entry({m:?} {:#x})", self.marker_payload().unwrap_or(0));
        }
        write!(f, "Entry({:#018x}", self.0)?;
        for (bit, name) in [
            (W, " W"),
            (HUGE, " huge"),
            (ACCESSED, " A"),
            (DIRTY, " D"),
            (UFFD_WP, " uffd-wp"),
            (SOFT_DIRTY, " soft-dirty"),
            (COW_SHARED, " cow"),
            (EXCLUSIVE, " excl"),
            (PINNED, " pinned"),
            (ZERO_PAGE, " zero"),
        ] {
            if self.0 & bit != 0 {
                f.write_str(name)?;
            }
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_helper_answers_none_for_markers_and_zero_page() {
        assert_eq!(Entry::page(Frame(42), true).frame(), Some(Frame(42)));
        assert_eq!(Entry::zero_page().frame(), None);
        assert_eq!(Entry::marker(Marker::Poisoned, 0).frame(), None);
        assert_eq!(Entry::marker(Marker::Snapshot, 7).frame(), None);
        assert_eq!(Entry::EMPTY.frame(), None);
    }

    #[test]
    fn markers_round_trip() {
        for m in [Marker::WpUnpopulated, Marker::Poisoned, Marker::Snapshot] {
            let e = Entry::marker(m, 12345);
            assert_eq!(e.marker_kind(), Some(m));
            assert_eq!(e.marker_payload(), Some(12345));
            assert!(!e.is_present());
            assert_eq!(e.check(), Ok(()));
        }
    }

    #[test]
    fn write_protect_always_removes_write() {
        let e = Entry::page(Frame(1), true).write_protected();
        assert!(e.is_uffd_wp() && !e.is_writable());
        assert_eq!(e.check(), Ok(()));
        let u = e.write_unprotected(true);
        assert!(!u.is_uffd_wp() && u.is_writable());
        // The zero page never becomes writable.
        assert!(!Entry::zero_page()
            .write_protected()
            .write_unprotected(true)
            .is_writable());
        assert!(Entry::from_raw(UFFD_WP | W | R).check().is_err());
    }

    #[test]
    fn flags() {
        let e = Entry::page(Frame(3), false)
            .with(Flag::Dirty)
            .with(Flag::Pinned);
        assert!(e.has(Flag::Dirty) && e.has(Flag::Pinned) && !e.has(Flag::Accessed));
        assert!(!e.without(Flag::Dirty).has(Flag::Dirty));
        assert_eq!(e.frame(), Some(Frame(3)));
    }
}
