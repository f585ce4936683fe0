//! The guest's NUMA topology, as the VMM lays it out and the boot-info page
//! carries it: guest RAM split into node ranges (ascending, contiguous from
//! guest-physical 0) and each vCPU's node.

use crate::layout::{MAX_VCPUS, PAGE_SIZE};

/// Most guest NUMA nodes.
pub const MAX_NODES: usize = 8;

/// One node's guest-physical memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeRange {
    /// First guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub bytes: u64,
}

impl NodeRange {
    /// One past the last byte.
    pub const fn end(&self) -> u64 {
        self.gpa + self.bytes
    }
}

/// Why a topology cannot be laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// No nodes, or more than [`MAX_NODES`].
    NodeCount,
    /// Node ranges that are empty, unaligned, out of order or leave a gap.
    Ranges,
    /// A vCPU assigned to a node that does not exist.
    VcpuNode,
}

/// The guest's NUMA topology.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NumaLayout {
    /// Nodes in use (1 to [`MAX_NODES`]).
    pub nodes: u32,
    /// Zero.
    pub reserved: u32,
    /// Each node's memory; entries from `nodes` on are zero.
    pub ranges: [NodeRange; MAX_NODES],
    /// Each vCPU's node.
    pub vcpu_node: [u8; MAX_VCPUS],
}

impl NumaLayout {
    /// One node holding all of `mem_bytes`, every vCPU on it.
    pub const fn single(mem_bytes: u64) -> NumaLayout {
        let mut ranges = [NodeRange { gpa: 0, bytes: 0 }; MAX_NODES];
        ranges[0].bytes = mem_bytes;
        NumaLayout {
            nodes: 1,
            reserved: 0,
            ranges,
            vcpu_node: [0; MAX_VCPUS],
        }
    }

    /// `node_bytes.len()` nodes of those sizes, back to back from 0, with
    /// vCPU `v` on `vcpu_node[v]`.
    pub fn new(node_bytes: &[u64], vcpu_node: &[u8]) -> Result<NumaLayout, LayoutError> {
        if node_bytes.is_empty() || node_bytes.len() > MAX_NODES || vcpu_node.len() > MAX_VCPUS {
            return Err(LayoutError::NodeCount);
        }
        let mut layout = NumaLayout::single(0);
        layout.nodes = node_bytes.len() as u32;
        let mut at = 0u64;
        for (r, bytes) in layout.ranges.iter_mut().zip(node_bytes) {
            *r = NodeRange {
                gpa: at,
                bytes: *bytes,
            };
            at = at.checked_add(*bytes).ok_or(LayoutError::Ranges)?;
        }
        layout.vcpu_node[..vcpu_node.len()].copy_from_slice(vcpu_node);
        layout.check(vcpu_node.len() as u64)?;
        Ok(layout)
    }

    /// Checks the ranges (page-aligned, non-empty, contiguous from 0) and
    /// the nodes of the first `vcpus` vCPUs.
    pub fn check(&self, vcpus: u64) -> Result<(), LayoutError> {
        let n = self.nodes as usize;
        if n == 0 || n > MAX_NODES || vcpus > MAX_VCPUS as u64 {
            return Err(LayoutError::NodeCount);
        }
        let mut at = 0;
        for r in &self.ranges[..n] {
            if r.gpa != at || r.bytes == 0 || r.bytes % PAGE_SIZE != 0 {
                return Err(LayoutError::Ranges);
            }
            at = r.gpa.checked_add(r.bytes).ok_or(LayoutError::Ranges)?;
        }
        if self.vcpu_node[..vcpus as usize]
            .iter()
            .any(|v| *v as u32 >= self.nodes)
        {
            return Err(LayoutError::VcpuNode);
        }
        Ok(())
    }

    /// vCPU `vcpu`'s node.
    pub fn node_of_vcpu(&self, vcpu: u64) -> u32 {
        self.vcpu_node.get(vcpu as usize).copied().unwrap_or(0) as u32
    }

    /// The node holding guest-physical `gpa` (the last node for addresses
    /// past the end).
    pub fn node_of_gpa(&self, gpa: u64) -> u32 {
        let n = self.nodes.clamp(1, MAX_NODES as u32);
        (0..n)
            .find(|k| gpa < self.ranges[*k as usize].end())
            .unwrap_or(n - 1)
    }

    /// How many of the first `vcpus` vCPUs sit on `node`.
    pub fn vcpus_on(&self, node: u32, vcpus: u64) -> u64 {
        self.vcpu_node[..(vcpus as usize).min(MAX_VCPUS)]
            .iter()
            .filter(|v| **v as u32 == node)
            .count() as u64
    }

    /// vCPU `vcpu`'s position among the vCPUs of its node (by id).
    pub fn index_in_node(&self, vcpu: u64) -> u64 {
        let node = self.node_of_vcpu(vcpu);
        self.vcpus_on(node, vcpu)
    }

    /// The `i`-th (from 0) of the first `vcpus` vCPUs whose node passes
    /// `on`; `None` when there are fewer.
    pub fn nth_vcpu(&self, i: u64, vcpus: u64, on: impl Fn(u32) -> bool) -> Option<u64> {
        (0..vcpus.min(MAX_VCPUS as u64))
            .filter(|v| on(self.node_of_vcpu(*v)))
            .nth(i as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_checked() {
        let l = NumaLayout::new(&[1 << 20, 3 << 20], &[0, 0, 1, 1]).unwrap();
        assert_eq!(
            l.ranges[1],
            NodeRange {
                gpa: 1 << 20,
                bytes: 3 << 20
            }
        );
        assert_eq!(l.node_of_gpa((1 << 20) - 1), 0);
        assert_eq!(l.node_of_gpa(1 << 20), 1);
        assert_eq!(l.index_in_node(3), 1);
        assert_eq!(l.vcpus_on(1, 4), 2);
        assert_eq!(l.nth_vcpu(1, 4, |n| n == 1), Some(3));
        assert_eq!(l.nth_vcpu(2, 4, |n| n == 1), None);
        assert_eq!(NumaLayout::new(&[], &[]), Err(LayoutError::NodeCount));
        assert_eq!(
            NumaLayout::new(&[4096, 100], &[0]),
            Err(LayoutError::Ranges)
        );
        assert_eq!(NumaLayout::new(&[4096], &[1]), Err(LayoutError::VcpuNode));
        assert!(NumaLayout::single(1 << 20).check(64).is_ok());
    }
}
