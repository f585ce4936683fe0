//! Host memory policies for guest RAM (`mbind(2)`), checked back with
//! `get_mempolicy(2)`, and where guest pages live (`move_pages(2)`
//! queries).

use super::topology::Topology;
use crate::entry::PAGE_SIZE;
use crate::ram::{GuestRam, RamError};

/// MPOL_F_ADDR: get_mempolicy reports the policy at an address.
const MPOL_F_ADDR: libc::c_ulong = 1 << 1;
/// MPOL_MF_MOVE: mbind also moves the pages already there that only this
/// process maps.
const MPOL_MF_MOVE: libc::c_uint = 1 << 1;

/// A host memory policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumaPolicy {
    /// Allocate only on the given nodes.
    Bind,
    /// Prefer the first given node.
    Preferred,
    /// Spread pages over the given nodes.
    Interleave,
}

impl NumaPolicy {
    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            NumaPolicy::Bind => "bind",
            NumaPolicy::Preferred => "preferred",
            NumaPolicy::Interleave => "interleave",
        }
    }

    /// Parses a CLI name.
    pub fn from_name(s: &str) -> Option<NumaPolicy> {
        [
            NumaPolicy::Bind,
            NumaPolicy::Preferred,
            NumaPolicy::Interleave,
        ]
        .into_iter()
        .find(|p| p.name() == s)
    }

    fn mode(self) -> libc::c_int {
        match self {
            NumaPolicy::Bind => libc::MPOL_BIND,
            NumaPolicy::Preferred => libc::MPOL_PREFERRED,
            NumaPolicy::Interleave => libc::MPOL_INTERLEAVE,
        }
    }
}

/// One region's policy and placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionPlacement {
    /// The guest NUMA node the region is, if RAM is split per node.
    pub guest_node: Option<u32>,
    /// First guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// The policy `get_mempolicy` reports for the region (`default`,
    /// `preferred`, `bind`, `interleave`, `local`).
    pub policy: String,
    /// The nodes of that policy.
    pub nodes: Vec<u32>,
    /// Resident pages per host node (index = node).
    pub pages_per_node: Vec<u64>,
    /// The vCPUs its accessor bitmap holds (bit = vCPU id % 64).
    pub accessors: u64,
}

/// A node bitmask of `nodes` in the kernel's format (one word is enough for
/// 64 nodes).
fn mask(nodes: &[u32]) -> libc::c_ulong {
    nodes
        .iter()
        .filter(|n| **n < 64)
        .fold(0, |m, n| m | (1 << n))
}

impl GuestRam {
    /// Applies `policy` to every region of guest RAM, over the host nodes
    /// `nodes_for` gives for the region's guest node. Pages allocated from
    /// now on follow it (the fault engine allocates through the same
    /// mappings), and pages already there (a restored image) move where it
    /// says, unless another process maps them too.
    pub fn apply_numa_policy(
        &self,
        policy: NumaPolicy,
        nodes_for: &dyn Fn(Option<u32>) -> Vec<u32>,
    ) -> Result<(), RamError> {
        for r in self.regions() {
            let m = mask(&nodes_for(r.guest_node));
            if m == 0 {
                return Err(RamError::Describe(
                    "a NUMA policy needs at least one node".into(),
                ));
            }
            // SAFETY: mbind over the region's own live mapping with a
            // one-word node mask that outlives the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_mbind,
                    r.host_start(),
                    r.size,
                    policy.mode(),
                    &m as *const libc::c_ulong,
                    64 as libc::c_ulong,
                    MPOL_MF_MOVE,
                )
            };
            if rc != 0 {
                return Err(RamError::Describe(format!(
                    "mbind({}) on guest RAM at {:#x}: {}",
                    policy.name(),
                    r.gpa,
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok(())
    }

    /// Each region's policy (from `get_mempolicy` at its first byte) and
    /// its resident pages per node (from `topology`).
    pub fn numa_placement(&self, topology: &dyn Topology) -> Vec<RegionPlacement> {
        let populated: Vec<u64> = self
            .populated_pages()
            .into_iter()
            .map(|p| p * PAGE_SIZE)
            .collect();
        self.regions()
            .iter()
            .map(|r| {
                let mut mode: libc::c_int = -1;
                let mut m: libc::c_ulong = 0;
                // SAFETY: get_mempolicy writes the mode and a one-word
                // mask we own, for an address inside the region's mapping.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_get_mempolicy,
                        &mut mode as *mut libc::c_int,
                        &mut m as *mut libc::c_ulong,
                        64 as libc::c_ulong,
                        r.host_start(),
                        MPOL_F_ADDR,
                    )
                };
                let policy = match (rc, mode) {
                    (0, libc::MPOL_DEFAULT) => "default",
                    (0, libc::MPOL_PREFERRED) => "preferred",
                    (0, libc::MPOL_BIND) => "bind",
                    (0, libc::MPOL_INTERLEAVE) => "interleave",
                    (0, libc::MPOL_LOCAL) => "local",
                    _ => "unknown",
                };
                let hosts: Vec<u64> = populated
                    .iter()
                    .filter(|g| r.contains_gpa(**g))
                    .map(|g| r.host_of(*g))
                    .collect();
                let mut pages_per_node = vec![0u64; topology.nodes() as usize];
                for n in topology.nodes_of(&hosts).into_iter().flatten() {
                    if let Some(c) = pages_per_node.get_mut(n as usize) {
                        *c += 1;
                    }
                }
                RegionPlacement {
                    guest_node: r.guest_node,
                    gpa: r.gpa,
                    size: r.size,
                    policy: policy.into(),
                    nodes: (0..64).filter(|n| m & (1 << n) != 0).collect(),
                    pages_per_node,
                    accessors: r.accessors.load(std::sync::atomic::Ordering::Relaxed),
                }
            })
            .collect()
    }
}
