//! `vmm`: a minimal KVM virtual machine monitor whose guest RAM is run by its
//! own guest-memory manager (`guest-mem`).
//!
//! * [`config`]: the VM and workload to run, validated.
//! * [`vstate`]: KVM VM and vCPUs, long-mode boot state, the vCPU run loop.
//! * [`devices`]: serial line and control port.
//! * [`numa`]: the guest's NUMA nodes, their host placement, the scanner.
//! * [`fork`]: forking a running VM into children that share its memory.
//! * [`runner`]: boots a VM and supervises it from an event loop.
//! * [`oracle`]: the host-side consistency check of guest memory.
//! * [`report`]: run results, JSON and exit codes.
//! * [`bench`]: `vmm bench ...`.
//! * [`cli`]: the command line.
//! * [`clock`]: monotonic timestamps shared with the benchmarks.
//! * [`host_fs`]: which filesystem a host file lies on.

pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod devices;
pub mod dirty;
pub mod fork;
pub mod guest_image;
pub mod host_fs;
pub mod numa;
pub mod oracle;
pub mod report;
pub mod runner;
pub mod signals;
pub mod size;
pub mod snapshot;
pub mod vm_set;
pub mod vstate;
