//! The machine: KVM VM and vCPUs, long-mode boot state, and the vCPU run loop.

pub mod boot;
pub mod capture;
pub mod control;
pub mod host_cpu;
pub mod start_gate;
pub mod vcpu;
pub mod vm;
