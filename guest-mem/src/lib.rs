//! Guest RAM for the `vmm`, and the page-tracking layer under it.
//!
//! This crate knows nothing of KVM.
//!
//! * [`access_order`]: the guest's first-touch order of pages (the working-set trace).
//! * [`entry`]: one entry of the table (EPT-like bit layout, markers, rule 10's frame helper).
//! * [`table`]: `Stage2Table`, the 4-level table of per-page state, and its range walk.
//! * [`region`]: regions (the VMA analogue) and their host backings.
//! * [`uffd`]: the userfaultfd ABI and a safe wrapper.
//! * [`fault`]: the fault engine (handler threads, fault-around, counters).
//! * [`live_copy`]: copy-before-write for live snapshots.
//! * [`tracking`]: write-protect (sync and async) dirty tracking, soft-dirty detection, the VMM-write log.
//! * [`fork`]: freezing guest RAM into an image a forked VM's children share.
//! * [`numa`]: NUMA topology, write sampling and the page-placement scanner.
//! * [`pin`]: pinning guest memory for devices, with unshare-on-pin (rule 13).
//! * [`sharing`]: which pages a VM shares copy-on-write and which are its own.
//! * [`ram`]: `GuestRam`, the front: regions, engine and a vm-memory view.

pub mod access_order;
mod core;
pub mod entry;
pub mod fault;
pub mod fork;
pub mod live_copy;
pub mod numa;
pub mod pin;
pub mod ram;
pub mod region;
pub mod sharing;
pub mod sync;
pub mod table;
pub mod tracking;
pub mod uffd;

pub use core::PageSource;
pub use entry::{Entry, Flag, Frame, Marker};
pub use fault::stats::FaultStats;
pub use ram::{GuestRam, MemoryStats, RamConfig, RamError, RegionStats};
pub use region::{AccessHint, BackingKind, Region, RegionFlags};
pub use sync::LockOrRecover;
pub use table::{Stage2Table, WalkAction, WalkOutcome, Walker};
