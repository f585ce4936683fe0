//! Guest RAM for the `vmm`: the host mapping of guest-physical memory.
//!
//! This crate knows nothing of KVM. Today it owns the anonymous mapping that
//! backs guest RAM and exposes it through vm-memory; the EPT-style page table,
//! regions with their own backings and the userfaultfd fault engine grow here
//! (see docs/architecture.md).

pub mod ram;

pub use ram::{GuestRam, RamError};
