//! The protocol between the `vmm` and its tiny guest kernel, in one place that
//! both sides build from.
//!
//! * [`layout`]: where things live in guest-physical memory.
//! * [`boot_info`]: the boot-info page the VMM fills and each vCPU reads, with
//!   the per-vCPU **command word** the VMM writes and the guest polls.
//! * [`numa`]: the guest's NUMA topology (node ranges, each vCPU's node).
//! * [`control`]: the guest-to-VMM channel (serial port, control port, event
//!   codes).
//! * [`schedule`]: the deterministic write schedule of every workload and the
//!   word each page store writes.
//! * [`oracle`]: the consistency check that replays the schedule and counts the
//!   pages whose word differs. The guest runs it on its own memory; the VMM
//!   runs the very same code on a memory image.
//!
//! The crate is `no_std`, has no dependencies and uses no floating point, so
//! it builds for the guest with SSE turned off.
#![no_std]

pub mod boot_info;
pub mod control;
pub mod layout;
pub mod numa;
pub mod oracle;
pub mod schedule;

pub use boot_info::{BootInfo, Command, CommandOp, SeedEntry, VcpuState, Workload};
