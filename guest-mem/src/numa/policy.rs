//! Host memory policies for guest RAM (`mbind(2)`), checked back with
//! `get_mempolicy(2)`, and where guest pages live (`move_pages(2)`
//! queries).

use super::topology::Topology;
use crate::entry::PAGE_SIZE;
use crate::ram::{GuestRam, RamError};

/// MPOL_F_ADDR: get_mempolicy reports the policy at an address.
const MPOL_F_ADDR: libc::c_ulong = 1 << 1;

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
    /// Applies `policy` over `nodes` to every region of guest RAM. Pages
    /// allocated from now on follow it (the fault engine allocates through
    /// the same mappings); pages already there stay where they are.
    pub fn apply_numa_policy(&self, policy: NumaPolicy, nodes: &[u32]) -> Result<(), RamError> {
        let m = mask(nodes);
        if m == 0 {
            return Err(RamError::Describe(
                "a NUMA policy needs at least one node".into(),
            ));
        }
        for r in self.regions() {
            // SAFETY: mbind over the region's own live mapping with a
            // one-word node mask that outlives the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_mbind,
                    r.mapping.addr(),
                    r.size,
                    policy.mode(),
                    &m as *const libc::c_ulong,
                    64 as libc::c_ulong,
                    0 as libc::c_uint,
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
                        r.mapping.addr(),
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
                    gpa: r.gpa,
                    size: r.size,
                    policy: policy.into(),
                    nodes: (0..64).filter(|n| m & (1 << n) != 0).collect(),
                    pages_per_node,
                }
            })
            .collect()
    }
}
